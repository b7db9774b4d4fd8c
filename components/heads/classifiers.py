"""Index classifier (VAR / VARSR / MSVAR) and bitwise classifier (Infinity / NSARM)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from arsr.interfaces import Head, Layout


def sample_top_k_top_p(logits: Tensor, top_k: int, top_p: float, temperature: float, generator: torch.Generator | None) -> Tensor:
    """logits (..., V) -> samples (...). top_k keeps the k largest; top_p keeps the smallest set whose
    probability mass reaches top_p (the largest always kept); top_k = 1 is greedy."""
    if top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() if temperature == 1 else logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop_sorted[..., -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, cond_dim: int):
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        scale, shift = rearrange(self.ada_lin(cond), "b (two c) -> two b 1 c", two=2)
        return self.ln_wo_grad(h.float()) * (1 + scale) + shift


class IndexHead(Head):
    """AdaLN-modulated LayerNorm then Linear(C -> V): one logit per codebook entry (VAR's head).
    ``vocab_size`` None takes the tokenizer's codebook size."""

    def __init__(self, vocab_size: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size

    def bind(self, layout: Layout) -> None:
        if layout.token_kind is not None:
            self.check_tokens(layout)
        if self.vocab_size is None:
            raise ValueError(f"{type(self).__name__} needs its size (vocab_size / bits) when the transformer is not bound to a tokenizer")
        self.head_nm = AdaLNBeforeHead(layout.width, layout.width)
        self.head = nn.Linear(layout.width, self.vocab_size)

    def check_tokens(self, layout: Layout) -> None:
        if layout.token_kind != "index":
            raise ValueError(f"IndexHead scores codebook indices but the tokenizer gives {layout.token_kind} tokens: use BitwiseHead")
        if self.vocab_size is None:
            self.vocab_size = layout.vocab_size
        if layout.vocab_size != self.vocab_size:
            raise ValueError(f"IndexHead vocab_size {self.vocab_size} != the tokenizer's codebook size {layout.vocab_size}")

    @torch.no_grad()
    def init_weights(self, init_head: float, init_adaln: float) -> None:
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        return self.head(self.head_nm(h, cond)).float()  # (B, N, V)

    def log_prob(self, logits: Tensor, tokens: Tensor) -> Tensor:
        return logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]  # (B, N)

    def sample(self, logits, top_k, top_p, temperature, generator):
        return sample_top_k_top_p(logits, top_k, top_p, temperature, generator)


class BitwiseHead(IndexHead):
    """Infinity's bitwise classifier: Linear(C -> 2 d), an independent 2-way softmax per bit.

    A token of d bits costs d binary predictions instead of one 2^d-way softmax; its
    log-probability is the sum over its bits. ``bits`` None takes the tokenizer's bits per token.
    """

    def __init__(self, bits: int | None = None):
        super().__init__(vocab_size=None if bits is None else 2 * bits)
        self.bits = bits

    def check_tokens(self, layout: Layout) -> None:
        if layout.token_kind != "bits":
            raise ValueError(f"BitwiseHead predicts bits but the tokenizer gives {layout.token_kind} tokens: use IndexHead")
        if self.bits is None:
            self.bits, self.vocab_size = layout.latent_dim, 2 * layout.latent_dim
        if layout.latent_dim != self.bits:
            raise ValueError(f"BitwiseHead bits {self.bits} != the tokenizer's {layout.latent_dim} bits per token")

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        return rearrange(super().forward(h, cond), "b n (d two) -> b n d two", two=2)  # (B, N, d, 2)

    def log_prob(self, logits: Tensor, tokens: Tensor) -> Tensor:
        return logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0].sum(-1)  # (B, N)

    def sample(self, logits, top_k, top_p, temperature, generator):
        return sample_top_k_top_p(logits, min(top_k, 2) if top_k else 0, top_p, temperature, generator)

    def token_loss(self, logits: Tensor, tokens: Tensor) -> Tensor:
        return -self.log_prob(logits, tokens) / self.bits  # mean cross-entropy per bit

    def accuracy(self, logits: Tensor, tokens: Tensor) -> Tensor:
        return (logits.argmax(-1) == tokens).float().mean(-1)  # fraction of bits right
