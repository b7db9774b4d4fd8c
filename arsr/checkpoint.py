"""Checkpoint I/O: atomic writes, safetensors weights, and loading weights to start from.

Training state (optimizer, step, loops) stays in Lightning ``.ckpt`` files for exact resume
(``--ckpt_path``); model weights are exported as ``.safetensors`` beside them for release and
for ``init_from`` (start from weights, fresh optimizer and step counter).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: init_from takes .safetensors weights; convert official .pth files with tools/convert.py")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str, strict: bool = True) -> None:
    """load_state_dict with a message naming the first differing keys and shapes.

    A module may define ``adapt_state_dict(state)`` to accept a related layout (e.g. one
    decoder's weights copied into each per-scale decoder).
    """
    if hasattr(module, "adapt_state_dict"):
        state = module.adapt_state_dict(state)
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if shape or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), first: {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), first: {unexpected[:3]}")
        if shape:
            parts.append(f"shape mismatch, first: {shape[:3]}")
        raise ValueError(f"weights do not match {what} ({type(module).__name__}): " + "; ".join(parts))
    module.load_state_dict(state, strict=strict)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with FSDP2-sharded (DTensor) parameters gathered; collective when sharded."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        own = module.state_dict().keys()  # the module's own filtering (e.g. frozen parts it does not save)
        return {k: v for k, v in full.items() if k in own}
    return module.state_dict()


class SafetensorsCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also writes the LightningModule's weights as ``<name>.safetensors``.

    Lightning writes ``.ckpt`` files atomically already (fsspec transaction: temp + rename);
    the safetensors export uses :func:`atomic_save_safetensors` and holds full (unsharded)
    weights also under FSDP2.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        weights = full_state_dict(trainer.lightning_module)  # every rank takes part when sharded
        for cb in trainer.callbacks:  # a callback may export other weights (arsr.optim.EMA: the average)
            weights = cb.export_weights(weights) if hasattr(cb, "export_weights") else weights
        if trainer.is_global_zero:
            atomic_save_safetensors(weights, Path(filepath).with_suffix(".safetensors"), {"step": str(trainer.global_step)})

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        side = Path(filepath).with_suffix(".safetensors")
        if trainer.is_global_zero and side.exists():
            side.unlink()
