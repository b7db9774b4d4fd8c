"""Caption / prompt encoders for cross-attention."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from arsr.interfaces import TextConditioning


class ByteCaptionEncoder(TextConditioning):
    """A small transformer encoder over the caption's UTF-8 bytes, trained with the model.

    Self-contained (no tokenizer files, no downloads). An empty caption is the unconditional
    prompt used for CFG and caption dropout.

    Args:
        dim: feature width; depth, heads: encoder size; max_len: bytes kept per caption.
    """

    def __init__(self, dim: int = 256, depth: int = 2, heads: int = 4, max_len: int = 128):
        super().__init__()
        self.dim, self.max_len = dim, max_len
        self.embed = nn.Embedding(257, dim)  # 256 byte values + a start token (256)
        self.pos = nn.Parameter(torch.zeros(1, max_len + 1, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions: list[str], device) -> tuple[Tensor, Tensor]:
        """-> ids (B, T) with a start token first, mask (B, T) (True = real)."""
        rows = [[256] + list(c.encode("utf-8")[: self.max_len]) for c in captions]
        T = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), T, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), T, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, device=device)
            mask[i, : len(r)] = True
        return ids, mask

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        ids, mask = self.tokenize(captions, self.pos.device)
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return x, mask, pooled
