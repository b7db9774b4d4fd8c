"""What every arsr LightningModule shares: optimiser injection, init_from, data stats, image grids."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable

import lightning as L
import torch
import torchvision
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from arsr import optim
from arsr.checkpoint import load_into, load_weights


def adamw(params: Iterable) -> torch.optim.Optimizer:
    """The default optimiser: :class:`arsr.optim.AdamW` (VAR's groups) at lr 1e-4, weight decay 0.05."""
    return optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


class ARSRTask(L.LightningModule):
    """Base of the arsr tasks.

    Args:
        optimizer: callable building the optimiser from the named trainable parameters (YAML:
            ``class_path: arsr.optim.AdamW`` + ``init_args``; VAR's decay / no-decay groups, lr
            multipliers per module prefix, fused kernels).
        lr_scheduler: optional callable building a scheduler from the optimiser, stepped every
            optimizer step (``arsr.optim.WarmupDecay``: VAR's warm-up / plateau / decay).
        init_from: ``.safetensors`` weights to start from (this task's own export, or a file
            written by ``tools/convert.py``). Not a resume: use ``--ckpt_path`` for that.
        image_log_every: log an image grid every this many training steps (0 = never).

    ``not_saved`` names child modules that are inputs rather than results (a frozen tokenizer,
    a perceptual network): their weights are left out of checkpoints and exports, and kept as
    they are when a checkpoint is loaded.
    """

    not_saved: tuple[str, ...] = ()

    def __init__(
        self,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_from: str | None = None,
        image_log_every: int = 500,
    ):
        super().__init__()
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.init_from, self.image_log_every = init_from, image_log_every

    def record_settings(self) -> None:
        """Save the constructor's arguments as hyper-parameters (called from a task's ``__init__``).
        Built by the CLI they are its plain config (class_path / init_args), which a weights-only
        checkpoint holds and ``--ckpt_path`` restores. Built in Python, arguments that are objects
        (modules, callables) are left out: their weights are in the state dict, and a pickled object
        could neither load weights-only nor be copied cheaply; dataclass settings are kept as dicts."""
        frame = inspect.currentframe().f_back
        ignore = ["optimizer", "lr_scheduler"]
        if _given_hparams() is None:
            ignore += [k for k, v in frame.f_locals.items() if not (_plain(v) or _settings(v))]
        self.save_hyperparameters(ignore=ignore, frame=frame)
        for k, v in list(self.hparams.items()):
            if _settings(v):
                self.hparams[k] = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if _plain(getattr(v, f.name))}

    # weights
    def init_module_from(self) -> torch.nn.Module:
        """The module that ``init_from`` weights are loaded into (the whole task by default)."""
        return self

    def load_initial_weights(self, state: dict[str, Tensor]) -> None:
        """Load ``init_from`` weights (into :meth:`init_module_from`, exactly)."""
        load_into(self.init_module_from(), state, f"init_from={self.init_from}")

    def setup(self, stage: str) -> None:
        if self.init_from and not getattr(self, "_initialised", False):
            self.load_initial_weights(load_weights(self.init_from))
            self._initialised = True

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        drop = tuple(f"{kwargs.get('prefix', '')}{name}." for name in self.not_saved)
        return type(state)((k, v) for k, v in state.items() if not k.startswith(drop)) if drop else state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        own = {f"{name}.{k}": v for name in self.not_saved if getattr(self, name, None) is not None
               for k, v in getattr(self, name).state_dict().items()}
        return super().load_state_dict(dict(state_dict) | own, strict=strict, assign=assign)

    # optimisation (one place for every task: arsr.optim)
    def configure_optimizers(self):
        return optim.configure(self, self.optimizer_factory, self.scheduler_factory)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Log the lr (and weight decay) of every parameter group used by this step."""
        opt = self.optimizers(use_pl_optimizer=False)
        for i, g in enumerate(opt.param_groups):
            name = g.get("name", f"pg{i}")
            self.log(f"lr/{name}", g["lr"], on_step=True, on_epoch=False, batch_size=1)
            if g.get("weight_decay", 0) > 0:
                self.log(f"wd/{name}", g["weight_decay"], on_step=True, on_epoch=False, batch_size=1)

    # logging
    def log_data_stats(self, stats: dict) -> None:
        """The batch's data-cleaning counts (skipped / converted samples by reason), summed per epoch."""
        for reason, n in stats.items():
            self.log(f"data/{reason}", float(n), reduce_fx="sum", on_step=False, on_epoch=True, batch_size=1)

    def log_images(self, tag: str, rows: list[Tensor], n: int = 4) -> None:
        """rows: images in [0, 1] of the same size, each (B, 3, H, W); one grid row per sample."""
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_image"):
            return
        cells = torch.stack([r[:n].detach().float().cpu().clamp(0, 1) for r in rows], dim=1)  # (n, cols, 3, H, W)
        grid = torchvision.utils.make_grid(cells.flatten(0, 1), nrow=len(rows), padding=2)
        exp.add_image(tag, grid, self.global_step)

    def should_log_images(self, batch_idx: int) -> bool:
        return self.image_log_every > 0 and self.global_rank == 0 and self.global_step % self.image_log_every == 0


def _plain(v) -> bool:
    """A value a weights-only checkpoint and a YAML config can hold."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return isinstance(v, dict) and all(isinstance(k, str) and _plain(x) for k, x in v.items())


def _settings(v) -> bool:
    return dataclasses.is_dataclass(v) and not isinstance(v, type)


def _given_hparams():
    """The config LightningCLI hands a module it instantiates (None when built from Python)."""
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning without it: treat as Python-built
        return None
    return _given_hyperparameters.get()
