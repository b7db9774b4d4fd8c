"""arsr.optim: VAR's parameter groups, the lin0 schedule family driven by a Trainer, EMA."""

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from arsr.checkpoint import SafetensorsCheckpoint
from arsr.components.heads import IndexHead
from arsr.components.posenc import AbsolutePerScale
from arsr.components.refiners import DiffusionRefiner
from arsr.nn.transformer import NextScaleTransformer
from arsr.optim import EMA, AdamW, WarmupDecay, param_groups
from arsr.tasks.base import ARSRTask


class MemoryLogger(Logger):
    def __init__(self):
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    @property
    def name(self):
        return "mem"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.setdefault(step, {}).update(metrics)


class Tiny(ARSRTask):
    """A VAR-like layout in miniature; its loss has zero gradient, so only weight decay moves it."""

    def __init__(self, **kw):
        super().__init__(**kw)
        torch.manual_seed(0)
        self.body = nn.Linear(4, 4)
        self.pos_start = nn.Parameter(torch.randn(1, 1, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        return sum((p * 0).sum() for p in self.parameters()) + batch.sum() * 0


def hand_lr(s: int) -> float:
    """The schedule of test_schedule_..., written out: 30 steps, 6 warm-up, 25% plateau, to 0.1."""
    if s < 6:
        return 0.005 + 0.995 * s / 6
    p = (s - 6) / 23
    return 1.0 if p < 0.25 else 0.1 + 0.9 * (1 - p) / 0.75


def hand_wd(s: int) -> float:
    return 0.01 + (0.1 - 0.01) * (0.5 + 0.5 * math.cos(math.pi * s / 29))


def test_schedule_decay_groups_and_ema_over_30_trainer_steps(tmp_path):
    opt = lambda params: AdamW(params, lr=0.1, weight_decay=0.1, lr_mult={"head": 0.5})
    sched = lambda o: WarmupDecay(o, warmup=0.2, plateau=0.25, end=0.1, weight_decay_end=0.01)
    task = Tiny(optimizer=opt, lr_scheduler=sched)
    start = {n: p.detach().clone() for n, p in task.named_parameters()}
    logger, ema = MemoryLogger(), EMA(decay=0.9)
    ckpt = SafetensorsCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=30)
    trainer = L.Trainer(max_steps=30, logger=logger, log_every_n_steps=1, callbacks=[ema, ckpt], accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, DataLoader(torch.zeros(64, 2), batch_size=2))
    assert task.optimizers(use_pl_optimizer=False).impl == "fused"  # CPU supports fused AdamW

    lrs = [logger.rows[s]["lr/decay"] for s in range(30)]
    assert lrs == pytest.approx([0.1 * hand_lr(s) for s in range(30)], rel=1e-6)
    assert lrs[0] == pytest.approx(0.1 * 0.005) and lrs[-1] == pytest.approx(0.1 * 0.1)  # wp0 and wpe
    assert [logger.rows[s]["lr/head/decay"] for s in range(30)] == pytest.approx([0.05 * hand_lr(s) for s in range(30)], rel=1e-6)
    assert [logger.rows[s]["wd/decay"] for s in range(30)] == pytest.approx([hand_wd(s) for s in range(30)], rel=1e-6)
    assert "wd/no_decay" not in logger.rows[0] and "lr/no_decay" in logger.rows[0]

    # zero gradients: AdamW's update is 0, only decoupled decay p *= 1 - lr * wd acts
    shrink = math.prod(1 - 0.1 * hand_lr(s) * hand_wd(s) for s in range(30))
    shrink_head = math.prod(1 - 0.05 * hand_lr(s) * hand_wd(s) for s in range(30))
    now = dict(task.named_parameters())
    for n in ("body.bias", "pos_start", "norm.weight", "norm.bias", "head.bias"):
        assert torch.equal(now[n], start[n]), n
    torch.testing.assert_close(now["body.weight"], start["body.weight"] * shrink)
    torch.testing.assert_close(now["head.weight"], start["head.weight"] * shrink_head)

    # EMA of that sequence (w_k = w_0 * prod_{s<k}(1 - lr_s wd_s)), exported as the safetensors weights
    w = [start["body.weight"] * math.prod(1 - 0.1 * hand_lr(s) * hand_wd(s) for s in range(k)) for k in range(1, 31)]
    closed = 0.9 ** 29 * w[0] + sum(0.1 * 0.9 ** (30 - k) * w[k - 1] for k in range(2, 31))
    torch.testing.assert_close(ema.ema_weights()["body.weight"], closed)
    exported = load_file(tmp_path / "last.safetensors")
    torch.testing.assert_close(exported["body.weight"], closed)
    torch.testing.assert_close(exported["pos_start"], start["pos_start"])
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["EMA"]["n_averaged"] == 30


def test_ema_closed_form_start_step_swap_and_state():
    model = nn.Linear(3, 2)
    ema = EMA(decay=0.8, start_step=2)
    ema.on_fit_start(None, model)
    seq = [torch.full((2, 3), float(v)) for v in (1.0, -2.0, 4.0, 0.5, 3.0, -1.0)]
    for k, v in enumerate(seq, start=1):
        with torch.no_grad():
            model.weight.copy_(v)
        ema.on_train_batch_end(SimpleNamespace(global_step=k), model, None, None, k)
        ema.on_train_batch_end(SimpleNamespace(global_step=k), model, None, None, k)  # accumulation: no new step
    # up to start_step the average is the weights (w_2); then 4 updates
    closed = 0.8 ** 4 * seq[1] + sum(0.2 * 0.8 ** (6 - k) * seq[k - 1] for k in range(3, 7))
    torch.testing.assert_close(ema.ema_weights()["weight"], closed)

    ema._swap_in()
    torch.testing.assert_close(model.weight, closed)
    ema._swap_out()
    torch.testing.assert_close(model.weight, seq[-1])

    state = ema.state_dict()
    other = EMA(decay=0.8, start_step=2)
    other.load_state_dict(state)
    other.on_fit_start(None, model)
    torch.testing.assert_close(other.ema_weights()["weight"], closed)
    assert int(other.average.n_averaged) == int(ema.average.n_averaged)


def var_layout():
    """A tiny VAR-d36-style transformer (shared AdaLN -> ada_gss) with VARSR's refiner."""
    torch.manual_seed(0)
    t = NextScaleTransformer(AbsolutePerScale(), IndexHead(16), depth=2, width=32, heads=2, latent_dim=4,
                             patch_nums=(1, 2, 3), num_classes=3, null_class=2, shared_aln=True)
    return nn.ModuleDict({"transformer": t, "refiner": DiffusionRefiner(latent_dim=4, cond_dim=32, width=16, depth=1)})


def official_no_decay(name: str, p: torch.Tensor) -> bool:
    """The rule of VAR's trainer (reference facts B.8) and VARSR's refiner exemption (C.9), verbatim."""
    keys = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
            "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")
    return p.ndim == 1 or name.endswith("bias") or any(k in name for k in keys) or "diffloss" in name


def test_param_groups_follow_the_official_rule():
    model = var_layout()
    groups = param_groups(model.named_parameters(), lr=1.0, weight_decay=0.05)
    split = {n: g["weight_decay"] > 0 for g in groups for n in g["param_names"]}
    assert split.keys() == dict(model.named_parameters()).keys()
    assert split == {n: not official_no_decay(n, p) for n, p in model.named_parameters()}
    decayed = {n for n, d in split.items() if d}
    # what that means for the VAR layout: Linear / Embedding weights decay, except lvl_embed and the refiner
    assert decayed == {f"transformer.{n}.weight" for n, m in model["transformer"].named_modules()
                       if isinstance(m, (nn.Linear, nn.Embedding)) and n != "lvl_embed"}
    for n in ("transformer.pos_start", "transformer.pos_enc.pos_1LC", "transformer.lvl_embed.weight",
              "transformer.blocks.0.ada_gss", "transformer.blocks.0.attn.scale_mul_1H11", "transformer.blocks.1.attn.q_bias",
              "refiner.diffloss.net.input_proj.weight", "refiner.decoder_norm.weight"):
        assert not split[n], n


def test_lr_mult_extra_no_decay_and_errors():
    model = var_layout()
    opt = AdamW(list(model.named_parameters()), lr=1e-3, no_decay=["class_emb"], lr_mult={"refiner": 2.0, "transformer.head": 0.1})
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"decay", "no_decay", "refiner/no_decay", "transformer.head/decay", "transformer.head/no_decay"}
    assert by_name["refiner/no_decay"]["lr"] == pytest.approx(2e-3)
    assert by_name["transformer.head/decay"]["lr"] == pytest.approx(1e-4)
    assert "transformer.class_emb.weight" in by_name["no_decay"]["param_names"]
    with pytest.raises(ValueError, match="match no trainable"):
        AdamW(list(model.named_parameters()), lr_mult={"refinr": 2.0})
    opt = AdamW(list(model.named_parameters()), lr=1e-3, ref_batch=256)
    opt.scale_to_batch(768)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([3e-3] * len(opt.param_groups))


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_shapes(decay):
    opt = AdamW([nn.Parameter(torch.zeros(2, 2))], lr=1.0, weight_decay=0.0)
    s = WarmupDecay(opt, total_steps=101, warmup=10, warmup_start=0.0, plateau=0.0, decay=decay, end=0.0)
    f = [s.lr_factor(i) for i in range(101)]
    assert f[0] == 0 and f[5] == pytest.approx(0.5) and f[10] == 1 and f[100] == 0
    assert f[55] == pytest.approx(0.5)  # half way through the decay, both shapes
    assert f[30] == pytest.approx(1 - 20 / 90 if decay == "linear" else 0.5 + 0.5 * math.cos(math.pi * 20 / 90))


def test_resume_continues_schedule_and_ema_exactly(tmp_path):
    def fit(max_steps: int, ckpt_path=None, save: bool = False):
        task = Tiny(optimizer=lambda p: AdamW(p, lr=0.1, weight_decay=0.1),
                    lr_scheduler=lambda o: WarmupDecay(o, total_steps=20, warmup=4, plateau=0.2, end=0.1, weight_decay_end=0.0))
        logger, ema = MemoryLogger(), EMA(decay=0.7, start_step=3)
        cbs = [ema] + ([SafetensorsCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=max_steps)] if save else [])
        trainer = L.Trainer(max_steps=max_steps, logger=logger, log_every_n_steps=1, callbacks=cbs, accelerator="cpu",
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=save)
        trainer.fit(task, DataLoader(torch.zeros(64, 2), batch_size=2), ckpt_path=ckpt_path)
        return task, ema, logger

    whole, whole_ema, whole_log = fit(20)
    fit(10, save=True)
    resumed, resumed_ema, resumed_log = fit(20, ckpt_path=tmp_path / "last.ckpt")
    for s in range(10, 20):
        assert resumed_log.rows[s]["lr/decay"] == pytest.approx(whole_log.rows[s]["lr/decay"], rel=1e-9)
        assert resumed_log.rows[s]["wd/decay"] == pytest.approx(whole_log.rows[s]["wd/decay"], rel=1e-9)
    torch.testing.assert_close(resumed.body.weight, whole.body.weight)
    torch.testing.assert_close(resumed_ema.ema_weights()["body.weight"], whole_ema.ema_weights()["body.weight"])
