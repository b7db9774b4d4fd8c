"""The next-scale sampler shared by the backbones: KV cache, CFG, temperature, top-k / top-p,
forced (substituted) scales and a seeded generator.

A backbone takes part by providing

- ``begin(batch_size, guided, **condition) -> StepState``: the condition of the batch (doubled
  as [conditional; unconditional] when guided);
- ``start_tokens(state) -> (B', n_1, C)``: the inputs of scale 1;
- ``step(x, si, state) -> (B', n_si, C)``: hidden states of scale si through the KV cache;
- ``embed(inputs) -> (B, n, C)``: next-scale inputs (from the quantizer) to the model width;
- ``guidance(cfg, si, K) -> w``: guided logits = cond + w (cond - uncond) at scale si;
- ``kv_cache()``: a context manager that turns the cache on (``use_cache=False``: ``step`` recomputes
  the whole sequence so far, for checks);
- ``head``: scores and samples tokens.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class StepState:
    """What a backbone keeps for one sampling run: the condition vector (B', D) and anything else."""

    cond: Tensor
    extra: dict = field(default_factory=dict)


@dataclass
class Sampled:
    """tokens: per scale (B, n_k, ...); hidden: last scale's hidden states (B', n_K, C); cond (B', D);
    logits: per scale, the logits each scale was sampled from (after CFG and temperature, B rows);
    f_hat: the latent of all the tokens (B, C, h, w), accumulated as they were sampled."""

    tokens: list[Tensor]
    hidden: Tensor
    cond: Tensor
    logits: list[Tensor]
    f_hat: Tensor


class KVCache:
    """Keys and values of one attention layer over a sampling run, written into buffers sized for
    the whole sequence: each scale writes its own positions once (no re-concatenation of the
    earlier ones) and attends to a view of everything so far."""

    def __init__(self, length: int):
        self.length, self.filled = length, 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (B, H, n, d) of the next n positions -> keys and values of every position so far (B, H, N, d)."""
        end = self.filled + k.shape[2]
        if end > self.length:
            raise ValueError(f"KV cache of {self.length} positions cannot take {end}: the sequence is longer than the layout's")
        if self.k is None:
            b, h, _, d = k.shape
            self.k, self.v = k.new_empty(b, h, self.length, d), v.new_empty(b, h, self.length, d)
        self.k[:, :, self.filled : end] = k
        self.v[:, :, self.filled : end] = v
        self.filled = end
        return self.k[:, :, :end], self.v[:, :, :end]


@contextmanager
def caching(attentions: list, length: int):
    """A :class:`KVCache` of ``length`` positions on each of these self-attention modules for the
    duration, then none."""
    for a in attentions:
        a.cache = KVCache(length)
    try:
        yield
    finally:
        for a in attentions:
            a.cache = None


def cfg_pair(x: Tensor, negative: Tensor | None = None) -> Tensor:
    """The batch of a guided forward: [conditional; unconditional] rows, (B, ...) -> (2B, ...).
    ``negative``: the unconditional half (default: ``x`` again, for inputs both halves share)."""
    return torch.cat([x, x if negative is None else negative])


def cfg_mix(out: Tensor, w: float) -> Tensor:
    """Guided output of a [conditional; unconditional] pair (2B, ...): (1 + w) cond - w uncond, (B, ...)."""
    cond, uncond = out.chunk(2)
    return (1 + w) * cond - w * uncond


def per_scale(value, si: int):
    """The value of scale si: the value itself, or its entry of a per-scale list."""
    return value[si] if isinstance(value, (list, tuple)) else value


@torch.no_grad()
def sample_scales(
    model,
    quantizer,
    batch_size: int,
    cfg: float | list[float] | None = None,
    top_k: int | list[int] = 0,
    top_p: float | list[float] = 0.0,
    temperature: float | list[float] = 1.0,
    generator: torch.Generator | None = None,
    forced: list[Tensor] | None = None,
    num_scales: int | None = None,
    use_cache: bool = True,
    **condition,
) -> Sampled:
    """Sample every scale's tokens of a backbone.

    cfg, temperature, top_k, top_p: a value or one per scale (cfg None: no guidance). Guidance is on
    where the backbone's weight for some scale is non-zero; the logits are divided by the
    temperature before they are mixed.
    forced: tokens of the first scales (NSARM's transformation network): the model still runs on
    those scales (its cache is filled from them) and a sample is still drawn and discarded, so
    the generator advances as when nothing is forced.
    """
    B, K = batch_size, num_scales or len(quantizer.schedule)
    for name, value in (("cfg", cfg), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if isinstance(value, (list, tuple)) and len(value) != K:
            raise ValueError(f"{name} has {len(value)} values for {K} scales: give one value, or one per scale")
    forced = forced or []
    weights = [0.0 if cfg is None else model.guidance(per_scale(cfg, si), si, K) for si in range(K)]
    guided = any(w != 0 for w in weights)
    was_training = model.training
    model.eval()
    try:
        state = model.begin(B, guided, **condition)
        x = model.start_tokens(state)
        walk, logits_out = quantizer.start_walk(), []
        with model.kv_cache() if use_cache else nullcontext():
            for si in range(K):
                h = model.step(x, si, state)
                logits, tau = model.head(h, state.cond), per_scale(temperature, si)
                logits = logits if tau == 1 else logits / tau
                if guided:
                    logits = cfg_mix(logits, weights[si])
                tok = model.head.sample(logits, per_scale(top_k, si), per_scale(top_p, si), 1.0, generator)
                if si < len(forced):
                    tok = forced[si].to(tok.dtype)
                walk.add(tok)
                logits_out.append(logits)
                if si + 1 < K:
                    x = model.embed(walk.next_input())
                    x = cfg_pair(x) if guided else x
    finally:
        model.train(was_training)
    return Sampled(walk.tokens, h, state.cond, logits_out, walk.f_hat())
