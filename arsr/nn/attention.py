"""Block-causal attention over scales: a dense additive mask for SDPA, or a FlexAttention
``BlockMask`` that skips the masked blocks (about a third of the scores) without materialising
an L x L tensor. ``attention: auto`` picks flex on CUDA and SDPA elsewhere; both give the same
result (tested on CPU, where flex runs eagerly)."""

from __future__ import annotations

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


def block_causal_mask(levels: Tensor, impl: AttentionImpl, dtype: torch.dtype):
    """levels (L,) scale index of each position -> what :func:`attend` takes: a position sees every
    position of its own and coarser scales."""
    if use_flex(impl, levels.device):
        def visible(b, h, q, k):
            return levels[q] >= levels[k]

        return create_block_mask(visible, None, None, len(levels), len(levels), device=levels.device)
    return torch.where(levels[:, None] >= levels[None, :], 0.0, float("-inf")).to(dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask, scale: float) -> Tensor:
    """q, k, v (B, H, N, d); mask: None, an additive (N, N) tensor, or a BlockMask."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        fn = _compiled_flex() if q.is_cuda else flex_attention
        return fn(q, k, v.to(q.dtype), block_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
