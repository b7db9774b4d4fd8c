"""Checkpoint I/O: atomic writes, safetensors weights, and loading weights to start from.

Training state (optimizer, step, loops) stays in Lightning ``.ckpt`` files for exact resume
(``--ckpt_path``); model weights are exported as ``.safetensors`` beside them for release and
for ``init_from`` (start from weights, fresh optimizer and step counter).
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Write ``path`` all or nothing: yields a temporary path in the same folder (never ``$TMPDIR``:
    a rename across filesystems would not be atomic); once written it is fsynced, given the
    mode a new file gets (0666 minus the umask; mkstemp's 0600 would hide it from other users)
    and renamed over ``path``. The previous file stays intact until then; a full disk raises a
    clear error and leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on the device holding {path.parent} while writing {path.name}; "
                                   "nothing was replaced (earlier files are intact): free space and resume with --ckpt_path last") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors export through :func:`atomic_path`."""
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` writing ``.ckpt`` files through :func:`atomic_path` (temporary file
    in the target folder, fsync, rename), so ``last.ckpt`` is replaced only by a complete file.
    Loading is weights-only: a checkpoint holding pickled code is refused, never run."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)  # serialised first: a failing write then raises a plain OSError (ENOSPC)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buf.getbuffer())

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


def check_checkpoint(path: str | Path) -> None:
    """Raise ValueError saying why ``path`` is not a loadable Lightning checkpoint (weights-only load,
    memory-mapped: cheap, and nothing in the file is executed)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable checkpoint (not a torch.save archive: truncated, empty or another format)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} was refused: it holds Python objects other than tensors and plain containers, "
                         "which could run code when loaded (nothing was executed)") from None
    except Exception as e:  # damaged archive
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'damaged'})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path} holds no Lightning training state; official .pth files go through tools/convert.py "
                         "and init_from (--model.init_args.training.init_from for ARFinetune)")


def newest_loadable(folders: list[Path]) -> tuple[Path | None, list[str]]:
    """The newest loadable ``.ckpt`` in ``folders`` (``last*`` first among equals) and why newer ones were skipped."""
    found = sorted({p for d in folders if d.is_dir() for p in d.glob("*.ckpt") if p.is_file()},
                   key=lambda p: (p.stat().st_mtime, p.name.startswith("last")), reverse=True)
    problems = []
    for p in found:
        try:
            check_checkpoint(p)
            return p, problems
        except ValueError as e:
            problems.append(str(e))
    return None, problems


def ensure_writable(folder: str | Path, what: str) -> None:
    """Create ``folder`` if needed and prove it writable now, before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".arsr-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PermissionError(f"{what} {folder} is not writable ({e.strerror or e}); choose another folder or fix its permissions") from None


def point_latest(run: Path) -> None:
    """Point ``<run>/../latest`` at ``run``: a relative symlink, replaced atomically."""
    link, tmp = run.parent / "latest", run.parent / f".latest.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(run.name, tmp, target_is_directory=True)
    os.replace(tmp, link)


def _missing(path: Path) -> str:
    """Why ``path`` is missing, naming the run when it goes through a ``latest`` pointer."""
    for parent in path.parents:
        if parent.name == "latest" and parent.is_symlink():
            return (f"weights file {path} not found: {parent} points at {parent.resolve().name}, the newest run of "
                    f"{parent.parent}, which has not written it (finish or resume that run: --ckpt_path last)")
    return f"weights file {path} not found"


_SHA256: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (cached per path, size and modification time)."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def export_metadata(module: L.LightningModule) -> dict[str, str]:
    """Metadata of a weights export: the model's config (``arsr_model``, a YAML ``model:`` block that
    ``--config`` accepts) when the CLI built it, and the sha256 of its tokenizer's ``weights`` file."""
    hparams = dict(getattr(module, "hparams", {}))
    meta = {}
    if "_class_path" in hparams:
        init_args = {k: v for k, v in hparams.items() if not k.startswith("_")}
        meta["arsr_model"] = yaml.safe_dump({"model": {"class_path": hparams["_class_path"], "init_args": init_args}}, sort_keys=False)
    tok = getattr(getattr(module, "tokenizer", None), "weights", None)
    if isinstance(tok, str) and Path(tok).is_file():
        meta |= {"tokenizer_weights": tok, "tokenizer_sha256": file_sha256(tok)}
    return meta


def check_tokenizer_hash(init_from: str | list[str] | None, tokenizer_weights: str | None) -> list[str]:
    """Warnings for ``init_from`` exports trained on another tokenizer file than ``tokenizer_weights``
    (their token indices would mean other codes)."""
    if not init_from or not tokenizer_weights or not Path(tokenizer_weights).is_file():
        return []
    warnings = []
    for path in [init_from] if isinstance(init_from, str) else init_from:
        if not str(path).endswith(".safetensors") or not Path(path).is_file():
            continue  # named by load_weights when the run starts
        try:
            with safe_open(path, "pt") as f:
                saved = (f.metadata() or {}).get("tokenizer_sha256")
        except SafetensorError:
            continue
        if saved and saved != (now := file_sha256(tokenizer_weights)):
            warnings.append(f"{path} was trained with a tokenizer file of sha256 {saved[:12]}..., but the tokenizer's weights "
                            f"{tokenizer_weights} have sha256 {now[:12]}...: its token indices may mean other codes; give "
                            "the tokenizer it was trained with, or fine-tune knowingly")
    return warnings


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_missing(path))
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are read from .safetensors files only (a pickled .pth/.ckpt could run code); "
                         "convert official .pth files with tools/convert.py, resume a .ckpt with --ckpt_path")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def by_module(keys: list[str], depth: int = 2) -> str:
    """'a.b.c', 'a.b.d', 'e.f' -> 'a.b (2 keys, first a.b.c), e.f (1 key)': key lists summarised by module."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(".".join(k.split(".")[:depth]) if k.count(".") >= depth else k.rsplit(".", 1)[0], []).append(k)
    return ", ".join(f"{m} ({len(v)} key{'s' * (len(v) > 1)}, first {v[0]})" for m, v in groups.items())


def strip_owner_prefix(state: dict[str, torch.Tensor], own: Iterable[str]) -> dict[str, torch.Tensor]:
    """Weights exported by a task hold its module names (``tokenizer.encoder...``); a file whose keys all
    share one first component that the target module lacks is read without it."""
    own = set(own)
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) == 1 and not own & set(state) and all("." in k for k in state):
        stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
        if own & set(stripped):
            return stripped
    return state


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str, strict: bool = True) -> None:
    """load_state_dict with a message naming the differing keys by module, and the shapes.

    Accepts every export of arsr's tasks (a ``tokenizer.``-prefixed TokenizerFinetune export into
    a bare tokenizer). A module may define ``adapt_state_dict(state)`` to accept a related layout
    (e.g. one decoder's weights copied into each per-scale decoder).
    """
    own = module.state_dict()
    state = strip_owner_prefix(state, own)
    if hasattr(module, "adapt_state_dict"):
        state = module.adapt_state_dict(state)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if shape or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {by_module(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {by_module(unexpected)}")
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

    ``.ckpt`` files go through :class:`AtomicCheckpointIO` (``arsr`` installs it); the safetensors
    export uses :func:`atomic_save_safetensors`, holds full (unsharded) weights also under FSDP2, and
    carries :func:`export_metadata` (model config, tokenizer sha256) and the step. Without
    ``dirpath`` it writes into the run's folder, ``<save_dir>/<name>/version_N/checkpoints``.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        weights = full_state_dict(trainer.lightning_module)  # every rank takes part when sharded
        for cb in trainer.callbacks:  # a callback may export other weights (arsr.optim.EMA: the average)
            weights = cb.export_weights(weights) if hasattr(cb, "export_weights") else weights
        if trainer.is_global_zero:
            meta = {"step": str(trainer.global_step)} | export_metadata(trainer.lightning_module)
            atomic_save_safetensors(weights, Path(filepath).with_suffix(".safetensors"), meta)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        side = Path(filepath).with_suffix(".safetensors")
        if trainer.is_global_zero and side.exists():
            side.unlink()
