"""Caption / prompt encoders for cross-attention."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from arsr.checkpoint import atomic_save_safetensors
from arsr.interfaces import TextConditioning


class ByteCaptionEncoder(TextConditioning):
    """A small transformer encoder over the caption's UTF-8 bytes, trained with the model.

    Self-contained (no tokenizer files, no downloads). An empty caption is the unconditional
    prompt used for CFG and caption dropout.

    Args:
        dim: feature width; depth, heads: encoder size; max_len: bytes kept per caption.
        prompt: a fixed prompt replacing every caption, or None (each sample's caption).
    """

    def __init__(self, dim: int = 256, depth: int = 2, heads: int = 4, max_len: int = 128, prompt: str | None = None):
        super().__init__()
        self.dim, self.max_len, self.prompt = dim, max_len, prompt
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


class T5TextEncoder(TextConditioning):
    """Flan-T5 encoder features (Infinity / NSARM's text path), from a local directory only.

    ``path`` holds a ``transformers`` T5 checkpoint and its tokenizer (e.g. a downloaded
    ``google/flan-t5-xl``); nothing is ever downloaded. The encoder is frozen: its weights are
    left out of arsr's checkpoints and exports (they come from ``path``), and it runs without
    gradients. Captions are truncated at ``max_len`` tokens and padded to the longest in the batch;
    the mask marks the real tokens (Infinity keeps exactly those).

    Args:
        path: local directory with the T5 weights and tokenizer files.
        max_len: tokens kept per caption (Infinity: 512).
        dtype: weights' dtype (``float32``, ``bfloat16``, ``float16``; Infinity runs T5 in fp16 on GPU).
        cache_dir: if set, features are kept per caption on disk (safetensors named by the caption's
            hash) and read back instead of running T5 again: fill it once with
            ``tools/cache_text.py``, or let training fill it as captions come.
        prompt: a fixed prompt replacing every caption in training and inference (NSARM's "Fixed"
            ablation), or None: each sample's caption (shards' captions, ``<name>.txt`` beside
            predict inputs; none: the empty prompt).
    """

    def __init__(self, path: str, max_len: int = 512, dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 cache_dir: str | None = None, prompt: str | None = None):
        super().__init__()
        from transformers import AutoTokenizer, T5EncoderModel

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"T5 text encoder folder {path} not found: download a Flan-T5 checkpoint (e.g. google/flan-t5-xl) "
                                    "to a local folder and give its path")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
            self.encoder = T5EncoderModel.from_pretrained(root, local_files_only=True, torch_dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a T5 checkpoint folder with its tokenizer ({type(e).__name__}: {e})") from None
        self.encoder.eval().requires_grad_(False)
        self.dim, self.max_len, self.prompt = self.encoder.config.d_model, max_len, prompt
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # frozen input: not in checkpoints; loading keeps the weights read from ``path``
        self._register_state_dict_hook(self._drop_own)
        self.register_load_state_dict_pre_hook(self._keep_own)

    @staticmethod
    def _drop_own(module, state_dict, prefix, local_metadata) -> None:
        for k in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
            del state_dict[k]

    def _keep_own(self, module, state_dict, prefix, *args) -> None:
        for k, v in self.encoder.state_dict().items():
            state_dict.setdefault(f"{prefix}encoder.{k}", v)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()
        return self

    def _cached(self, caption: str) -> Path:
        return self.cache_dir / f"{hashlib.sha1(f'{self.max_len}:{caption}'.encode()).hexdigest()}.safetensors"

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[Tensor]:
        """captions -> per caption its real tokens' features (T_i, dim), read from or added to the cache."""
        device = next(self.encoder.parameters()).device
        out: list[Tensor | None] = [None] * len(captions)
        if self.cache_dir is not None:
            for i, c in enumerate(captions):
                f = self._cached(c)
                if f.is_file():
                    out[i] = load_file(f)["feats"].to(device)
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            tok = self.tokenizer([captions[i] for i in todo], max_length=self.max_len, truncation=True, padding="longest",
                                 return_tensors="pt").to(device)
            hidden = self.encoder(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
            for j, i in enumerate(todo):
                out[i] = hidden[j, : int(tok.attention_mask[j].sum())].float()
                if self.cache_dir is not None:
                    self.cache_dir.mkdir(parents=True, exist_ok=True)
                    atomic_save_safetensors({"feats": out[i].cpu().contiguous()}, self._cached(captions[i]))
        return out

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.encode(captions)
        T = max(f.shape[0] for f in feats)
        x = feats[0].new_zeros(len(feats), T, self.dim)
        mask = torch.zeros(len(feats), T, dtype=torch.bool, device=x.device)
        for i, f in enumerate(feats):
            x[i, : len(f)], mask[i, : len(f)] = f, True
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return x, mask, pooled
