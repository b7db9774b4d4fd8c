"""Optimisation shared by every arsr task: AdamW with VAR's decay / no-decay parameter groups and
per-module lr multipliers, VAR's ``lin0`` family of lr / weight-decay schedules stepped per
optimizer step, and an EMA of the trainable weights.

Every ``ARSRTask.configure_optimizers`` goes through :func:`configure`: the optimizer factory
receives the trainable parameters *with their names*, so :class:`AdamW` can split them; the
schedule learns the run length from the trainer when it is not given.

YAML (``model.init_args``)::

    optimizer:
      class_path: arsr.optim.AdamW
      init_args: {lr: 5.0e-5, weight_decay: 0.05, lr_mult: {refiner: 1.0}}
    lr_scheduler:
      class_path: arsr.optim.WarmupDecay
      init_args: {warmup: 0.02, plateau: 0.3, end: 0.01}
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# VAR's no-decay names (matched as substrings of the parameter name), VARSR's refiner (everything
# under ``diffloss``), and arsr's MSVAR position grid (``pos_grid``, a position table like pos_1LC)
NO_DECAY: tuple[str, ...] = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul", "diffloss", "pos_grid",
)


def decays(name: str, p: Tensor, no_decay: Iterable[str] = NO_DECAY) -> bool:
    """VAR's rule: weight decay for every parameter except 1-D ones, biases and the named ones."""
    return p.ndim > 1 and not name.endswith("bias") and not any(k in name for k in no_decay)


def lr_multiplier(name: str, lr_mult: dict[str, float]) -> tuple[str, float]:
    """-> (the longest prefix of ``lr_mult`` that ``name`` starts with, its multiplier); ('', 1.0) if none."""
    hits = [k for k in lr_mult if name == k or name.startswith(k.rstrip(".") + ".")]
    if not hits:
        return "", 1.0
    key = max(hits, key=len)
    return key, lr_mult[key]


def param_groups(named: Iterable[tuple[str, Tensor]], lr: float, weight_decay: float,
                 no_decay: Iterable[str] = NO_DECAY, lr_mult: dict[str, float] | None = None) -> list[dict]:
    """Split named parameters into (lr multiplier prefix) x (decay, no decay) groups.

    Each group carries ``name`` (``decay`` / ``no_decay``, prefixed by its lr_mult key), ``param_names``,
    ``lr`` = lr x multiplier, ``lr_mult`` and ``weight_decay`` (0 for no-decay groups).
    """
    no_decay, lr_mult = tuple(no_decay), dict(lr_mult or {})
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        prefix, mult = lr_multiplier(name, lr_mult)
        d = decays(name, p, no_decay)
        g = groups.setdefault((prefix, d), {
            "name": f"{prefix.rstrip('.') + '/' if prefix else ''}{'decay' if d else 'no_decay'}",
            "params": [], "param_names": [], "lr": lr * mult, "lr_mult": mult, "weight_decay": weight_decay if d else 0.0})
        g["params"].append(p)
        g["param_names"].append(name)
    unused = [k for k in lr_mult if not any(key[0] == k for key in groups)]
    if unused:
        raise ValueError(f"lr_mult prefix(es) {unused} match no trainable parameter")
    return list(groups.values())


def _fused_ok(groups: list[dict]) -> bool:
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cuda", "cpu", "xpu", "mps") for p in params)


class AdamW(torch.optim.AdamW):
    """AdamW over VAR's parameter groups (:func:`param_groups`).

    Args:
        params: ``(name, parameter)`` pairs (what :func:`configure` passes), or plain parameters /
            groups (then no split: one group as given).
        lr: peak learning rate; with ``ref_batch`` it is VAR's ``tblr``, the rate for a global batch
            of ``ref_batch`` images, and the peak becomes lr x global_batch / ref_batch.
        betas, eps: Adam's.
        weight_decay: decoupled weight decay of the decay groups (no-decay groups get 0).
        no_decay: name substrings exempt from decay, in addition to :data:`NO_DECAY`.
        lr_mult: lr multiplier per module-name prefix (``{refiner: 0.5, scale_predictor: 10}``); the
            longest matching prefix wins.
        ref_batch: see ``lr`` (VAR: 256); None uses ``lr`` as given.
        impl: ``fused`` / ``foreach`` / ``loop`` kernels; ``auto`` takes fused where the parameters'
            device supports it, else foreach.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.05, no_decay: list[str] | None = None, lr_mult: dict[str, float] | None = None,
                 ref_batch: int | None = None, impl: Literal["auto", "fused", "foreach", "loop"] = "auto"):
        params = list(params)
        named = bool(params) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in params)
        if named:
            groups = param_groups(params, lr, weight_decay, NO_DECAY + tuple(no_decay or ()), lr_mult)
        elif lr_mult or no_decay:
            raise ValueError("no_decay / lr_mult need named parameters (model.named_parameters())")
        else:
            groups = params
        if impl == "auto":
            impl = "fused" if named and _fused_ok(groups) else "foreach"
        kernels = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[impl]
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kernels)
        self.ref_batch, self.impl = ref_batch, impl

    def scale_to_batch(self, global_batch: int) -> None:
        """VAR's peak lr rule: every group's lr x global_batch / ref_batch (once, before training)."""
        if self.ref_batch is None:
            return
        for g in self.param_groups:
            g["lr"] *= global_batch / self.ref_batch


class WarmupDecay(LRScheduler):
    """VAR's lr schedule family (``lin0`` by default) with its weight-decay half-cosine, per step.

    With peak = each group's lr and p the progress after warm-up (0 at the end of warm-up, 1 at the
    last step): linear warm-up from ``warmup_start`` x peak to peak over the warm-up steps, peak while
    p < ``plateau``, then ``linear`` or ``cosine`` decay to ``end`` x peak at the last step.
    Weight decay of the decaying groups follows a half-cosine over the whole run from the
    optimizer's weight decay to ``weight_decay_end`` (None: constant).

    Args:
        total_steps: optimizer steps of the run; None takes the trainer's (``max_steps``) when
            training starts (:func:`configure`).
        warmup: warm-up length, a fraction of ``total_steps`` when < 1, else optimizer steps.
        warmup_start: lr at step 0 as a fraction of the peak (VAR's wp0, 0.005).
        plateau: fraction of the post-warm-up span held at the peak (VAR lin0: 0.05; VARSR: 0.3).
        decay: shape of the decay after the plateau.
        end: final lr as a fraction of the peak (VAR's wpe).
        weight_decay_end: VAR's twde.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int | None = None, warmup: float = 0.02,
                 warmup_start: float = 0.005, plateau: float = 0.05, decay: Literal["linear", "cosine"] = "linear",
                 end: float = 0.01, weight_decay_end: float | None = None, last_epoch: int = -1):
        if not 0 <= plateau <= 1 or warmup < 0:
            raise ValueError(f"need 0 <= plateau <= 1 and warmup >= 0 (got plateau {plateau}, warmup {warmup})")
        self.total_steps, self.warmup, self.warmup_start = total_steps, warmup, warmup_start
        self.plateau, self.decay, self.end = plateau, decay, end
        self.weight_decay_start = optimizer.defaults["weight_decay"]
        self.weight_decay_end = weight_decay_end
        for g in optimizer.param_groups:
            g.setdefault("initial_weight_decay", g["weight_decay"])
        super().__init__(optimizer, last_epoch)

    def warmup_steps(self) -> int:
        assert self.total_steps is not None
        return round(self.warmup * self.total_steps) if self.warmup < 1 else int(self.warmup)

    def lr_factor(self, step: int) -> float:
        wp = self.warmup_steps()
        if step < wp:
            return self.warmup_start + (1 - self.warmup_start) * step / wp
        p = min(max((step - wp) / max(self.total_steps - 1 - wp, 1), 0.0), 1.0)
        if p < self.plateau:
            return 1.0
        q = (p - self.plateau) / (1 - self.plateau)  # 0 -> 1 over the decay
        shape = 1 - q if self.decay == "linear" else 0.5 + 0.5 * math.cos(math.pi * q)
        return self.end + (1 - self.end) * shape

    def weight_decay_factor(self, step: int) -> float:
        if self.weight_decay_end is None or self.weight_decay_start == 0:
            return 1.0
        p = min(step / max(self.total_steps - 1, 1), 1.0)
        wd = self.weight_decay_end + (self.weight_decay_start - self.weight_decay_end) * (0.5 + 0.5 * math.cos(math.pi * p))
        return wd / self.weight_decay_start

    def get_lr(self) -> list[float]:
        if self.total_steps is None:  # not bound yet: hold the peak (configure() binds before step 0)
            return list(self.base_lrs)
        return [base * self.lr_factor(self.last_epoch) for base in self.base_lrs]

    def _set_weight_decay(self) -> None:
        f = self.weight_decay_factor(self.last_epoch) if self.total_steps is not None else 1.0
        for g in self.optimizer.param_groups:
            g["weight_decay"] = g["initial_weight_decay"] * f

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        self._set_weight_decay()

    def bind(self, total_steps: int) -> None:
        """Set the run length (when not given) and apply the lr / weight decay of the current step."""
        if self.total_steps is None:
            self.total_steps = int(total_steps)
        self._last_lr = self.get_lr()
        for g, lr in zip(self.optimizer.param_groups, self._last_lr):
            g["lr"] = lr
        self._set_weight_decay()


def global_batch(trainer: L.Trainer) -> int:
    """Images per optimizer step over all ranks (per-rank batch x ranks x accumulation)."""
    dm = trainer.datamodule
    bs = getattr(dm, "batch_size", None) if dm is not None else None
    if bs is None:
        raise ValueError("ref_batch (lr scaling) needs a data module with a batch_size")
    return int(bs) * trainer.world_size * trainer.accumulate_grad_batches


def configure(module: L.LightningModule, make_optimizer, make_scheduler=None) -> dict:
    """What ``configure_optimizers`` returns: the optimizer over the module's named trainable
    parameters, batch-scaled lr when asked, and the scheduler stepped every optimizer step."""
    opt = make_optimizer([(n, p) for n, p in module.named_parameters() if p.requires_grad])
    trainer = module._trainer
    if getattr(opt, "ref_batch", None) is not None:
        opt.scale_to_batch(global_batch(trainer))
    if make_scheduler is None:
        return {"optimizer": opt}
    sched = make_scheduler(opt)
    if isinstance(sched, WarmupDecay):
        total = sched.total_steps
        if total is None:
            total = trainer.estimated_stepping_batches if trainer is not None else math.inf
            if not math.isfinite(total):
                raise ValueError("WarmupDecay needs total_steps or a trainer with max_steps / max_epochs")
        sched.bind(int(total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _clean(name: str) -> str:
    """Parameter name without wrapper prefixes (activation checkpointing, torch.compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


class _Params(nn.Module):
    """The trainable parameters as one flat module, the unit AveragedModel averages."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


class EMA(L.Callback):
    """Exponential moving average of the trainable weights (``AveragedModel`` + ``get_ema_multi_avg_fn``).

    After every optimizer step past ``start_step``: ema = decay x ema + (1 - decay) x weights; up
    to ``start_step`` the average is reset to the weights. The average is saved in ``.ckpt`` files
    (resumes exactly), exported as the ``.safetensors`` weights by ``SafetensorsCheckpoint``, and
    swapped in for validation, test and predict (then swapped back). Under FSDP2 the copy is
    sharded like the weights.

    Args:
        decay: EMA decay per optimizer step (BasicSR / Real-ESRGAN: 0.999).
        start_step: optimizer step from which weights are averaged.
        evaluate: validate / test / predict with the EMA weights.
        export: write the EMA weights (instead of the live ones) to the ``.safetensors`` export.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0, evaluate: bool = True, export: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1) (got {decay})")
        self.decay, self.start_step, self.evaluate, self.export = decay, start_step, evaluate, export
        self.names: list[str] = []
        self.average: AveragedModel | None = None
        self._live: _Params | None = None
        self._seen = -1
        self._pending: dict | None = None
        self._swapped = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.names = [_clean(n) for n, _ in named]
        self._live = _Params([p for _, p in named])
        self.average = AveragedModel(self._live, multi_avg_fn=get_ema_multi_avg_fn(self.decay)).requires_grad_(False)
        if self._pending is not None:
            self._load(self._pending)
            self._pending = None

    def ema_weights(self) -> dict[str, Tensor]:
        """name -> EMA tensor (the live module's parameter names)."""
        assert self.average is not None, "EMA has no average before fit starts"
        return dict(zip(self.names, self.average.module.params))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if self.average is None or step == self._seen:  # no optimizer step in this batch (accumulation)
            return
        self._seen = step
        if step <= self.start_step:
            self.average.n_averaged.zero_()  # the next update copies the weights
        self.average.update_parameters(self._live)

    # evaluation with the average
    @torch.no_grad()
    def _swap(self) -> None:
        for live, ema in zip(self._live.params, self.average.module.params):
            tmp = live.detach().clone()
            live.copy_(ema)
            ema.copy_(tmp)
        self._swapped = not self._swapped

    def _swap_in(self, *_) -> None:
        if self.evaluate and self.average is not None and not self._swapped:
            self._swap()

    def _swap_out(self, *_) -> None:
        if self._swapped:
            self._swap()

    on_validation_start = on_test_start = on_predict_start = _swap_in
    on_validation_end = on_test_end = on_predict_end = _swap_out

    # checkpoints and export
    def state_dict(self) -> dict:
        if self.average is None:
            return {}
        return {"names": list(self.names), "weights": [p.detach() for p in self.average.module.params],
                "n_averaged": self.average.n_averaged.detach().clone(), "seen": self._seen}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self._pending = state_dict

    @torch.no_grad()
    def _load(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"EMA state in the checkpoint is for other parameters (first: {state['names'][:3]} vs {self.names[:3]})")
        for p, v in zip(self.average.module.params, state["weights"]):
            p.copy_(v)
        self.average.n_averaged.copy_(state["n_averaged"])
        self._seen = state["seen"]

    def export_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """The export's weights with every trainable tensor replaced by its EMA (collective under FSDP2)."""
        if not self.export or self.average is None:
            return weights
        out = dict(weights)
        for name, p in self.ema_weights().items():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if name in out:
                out[name] = full.detach().to(out[name].device, out[name].dtype)
        return out
