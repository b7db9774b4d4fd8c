"""Parallelism as one function, torchtitan-style: the model code knows nothing about it.

:func:`parallelize` applies, in this order, activation checkpointing and ``torch.compile`` to every
transformer block, then FSDP2 ``fully_shard`` to every block and to every trainable part (with a
``MixedPrecisionPolicy`` when asked). Single device and DDP use the same function without a mesh
(checkpointing and compile only). Frozen parts (the tokenizer) are left replicated.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def parallelize(blocks: nn.ModuleList, parts: Iterable[nn.Module | None], mesh=None, activation_checkpointing: bool = False,
                compile: bool = False, param_dtype: torch.dtype | None = None) -> None:
    """blocks: the backbone's block list (modified in place); parts: modules holding trainable weights
    (sharded after their blocks); mesh: a 1-D data-parallel DeviceMesh for FSDP2, or None;
    param_dtype: FSDP2 compute dtype of the parameters (e.g. bfloat16; gradients reduce in fp32)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(blocks):
        if activation_checkpointing:
            block = checkpoint_wrapper(block)
        if compile:
            block.compile()
        blocks[i] = block
    if mesh is None:
        return
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for part in parts:
        if part is not None and any(p.requires_grad for p in part.parameters()):
            fully_shard(part, mesh=mesh, mp_policy=mp)
