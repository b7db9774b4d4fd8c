"""Block-causal attention over scales, computed only where it is visible.

A position sees every position of its own and coarser scales, so about a third of the L x L scores
are masked. Two kernels skip them: FlexAttention with a ``BlockMask`` (``flex``, CUDA), and SDPA
over query chunks (``sdpa``, everywhere): each scale of at least ``MIN_CHUNK`` positions is one
chunk of queries attending to the keys of its own and coarser scales with no mask at all; the
small first scales share one chunk under a small dense mask. ``attention: auto`` picks flex on
CUDA and SDPA elsewhere; both equal dense masked attention (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionImpl = Literal["auto", "sdpa", "flex"]

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # older torch: SDPA only
    BlockMask = create_block_mask = flex_attention = None


@lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def use_flex(impl: AttentionImpl, device: torch.device) -> bool:
    if impl == "flex" and flex_attention is None:
        raise ValueError("attention: flex needs torch.nn.attention.flex_attention (torch >= 2.5)")
    return impl == "flex" or (impl == "auto" and device.type == "cuda" and flex_attention is not None)


MIN_CHUNK = 64  # scales of at least this many positions get a chunk of their own


@dataclass(frozen=True, eq=False)
class ScaleChunks:
    """Block-causal attention as query chunks: chunk (qs, qe, ke) holds queries [qs, qe), which see
    keys [0, ke). ``head_mask``: the additive (qe, ke) mask of the first chunk (small scales
    together), None when it needs none."""

    chunks: tuple[tuple[int, int, int], ...]
    head_mask: Tensor | None


def dense_block_causal(levels: Tensor) -> Tensor:
    """(L, L) additive mask, 0 where a query's level >= the key's."""
    return torch.where(levels[:, None] >= levels[None, :], 0.0, float("-inf"))


@lru_cache(maxsize=16)
def _chunks(levels: tuple[int, ...], device: str, dtype: torch.dtype) -> ScaleChunks:
    bounds = [0] + [i for i in range(1, len(levels)) if levels[i] != levels[i - 1]] + [len(levels)]
    spans = list(zip(bounds[:-1], bounds[1:]))  # one (start, end) per level
    first_big = next((i for i, (s, e) in enumerate(spans) if e - s >= MIN_CHUNK), len(spans))
    chunks, head_mask = [], None
    if first_big > 0:
        end = spans[first_big - 1][1]
        chunks.append((0, end, end))
        if first_big > 1:
            head_mask = dense_block_causal(torch.tensor(levels[:end])).to(device=device, dtype=dtype)
    chunks += [(s, e, e) for s, e in spans[first_big:]]
    return ScaleChunks(tuple(chunks), head_mask)


@lru_cache(maxsize=16)
def _flex_mask(levels: tuple[int, ...], device: str):
    lv = torch.tensor(levels, device=device)

    def visible(b, h, q, k):
        return lv[q] >= lv[k]

    return create_block_mask(visible, None, None, len(levels), len(levels), device=device)


def block_causal_mask(levels: Sequence[int], impl: AttentionImpl, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """levels: the scale index of each position (host-side, best a tuple: the plan is built once per
    sequence and device, never reading the device) -> what :func:`attend` takes: a FlexAttention
    BlockMask, or :class:`ScaleChunks`."""
    device = torch.device(device)
    levels = levels if isinstance(levels, tuple) else tuple(int(v) for v in levels)
    if use_flex(impl, device):
        return _flex_mask(levels, str(device))
    return _chunks(levels, str(device), dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """q, k, v (B, H, N, d); mask: None, an additive (N, N) tensor, a BlockMask or ScaleChunks."""
    if isinstance(mask, ScaleChunks):
        if len(mask.chunks) == 1:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.head_mask, scale=scale)
        outs = []  # queries split, not sliced: the backward joins their gradients in one cat
        for i, (qc, (qs, qe, ke)) in enumerate(zip(q.split([qe - qs for qs, qe, _ in mask.chunks], dim=2), mask.chunks)):
            m = mask.head_mask if i == 0 else None  # only the first chunk can hold several scales
            outs.append(F.scaled_dot_product_attention(qc, k[:, :, :ke], v[:, :, :ke], attn_mask=m, scale=scale))
        return torch.cat(outs, dim=2)
    if BlockMask is not None and isinstance(mask, BlockMask):
        fn = _compiled_flex() if q.is_cuda else flex_attention
        return fn(q, k, v.to(q.dtype), block_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
