#!/usr/bin/env python
"""Throughput benchmarks. Run on the machine you care about; numbers are printed, not asserted.

    python tools/bench.py degradation --batch 16 --size 256
    python tools/bench.py loader --workers 2 --batch 16 --size 128
    python tools/bench.py tokenizer --size 256 --preset tiny
    python tools/bench.py ar --preset small --batch 4
    python tools/bench.py predict --preset small --lr_size 128
    python tools/bench.py optimizer --preset small
    python tools/bench.py nsarm --preset tiny --schedule 0.06M
    python tools/bench.py paired --preset small --rounds 7          # arsr / reference-math time ratios
    python tools/bench.py paired --preset d16 --size 512 --device cuda   # + absolute ms and MFU on a GPU
"""

from __future__ import annotations

import dataclasses
import time

import torch
from jsonargparse import auto_cli


def _timeit(fn, warmup: int, iters: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)


def degradation(batch: int = 16, size: int = 256, iters: int = 10, device: str = "cpu", preset: str = "realesrgan_x4plus"):
    """Real-ESRGAN second-order degradation, images/s (median over iters)."""
    from arsr.components.degradations import RealESRGANDegradation

    kwargs = {} if preset == "realesrgan_x4plus" else dict(resize_range=(0.3, 1.5), noise_range=(1.0, 15.0), jpeg_range=(60.0, 95.0))
    d = RealESRGANDegradation(**kwargs)
    x = torch.rand(batch, 3, size, size, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        t = _timeit(lambda: d(x, g), 2, iters, device)
    med = t[len(t) // 2]
    print(f"degradation {preset} batch {batch}x{size}x{size} on {device}: median {med * 1e3:.0f} ms/batch, {batch / med:.1f} images/s "
          f"(min {t[0] * 1e3:.0f} ms, max {t[-1] * 1e3:.0f} ms; threads {torch.get_num_threads()})")


def loader(shards: str = "recipes/sample_data/train-{000000..000001}.tar", workers: int = 2, batch: int = 16, size: int = 128,
           batches: int = 40):
    """Shard reading + decode + crop with N workers, images/s (CPU side only, no degradation)."""
    from arsr.components.degradations import BicubicDegradation
    from arsr.data import ShardDataModule

    dm = ShardDataModule(shards, BicubicDegradation(4), crop_size=size, batch_size=batch, num_workers=workers,
                         batches_per_epoch=batches, shuffle_buffer=100)
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up excluded
    t, n = time.perf_counter(), 0
    for b in it:
        n += b["hr"].shape[0]
    dt = time.perf_counter() - t
    print(f"loader {workers} workers, batch {batch}, crop {size}: {n / dt:.0f} images/s ({n} images in {dt:.2f} s)")


def tokenizer(size: int = 256, batch: int = 4, preset: str = "tiny", iters: int = 5, device: str = "cpu"):
    """Tokenizer encode -> indices -> decode, images/s. preset: tiny | var (official vae_ch160v4096z32 size)."""
    from arsr.components.quantizers import MultiScaleVQ
    from arsr.nn.vae import VQVAE

    pn = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}[size]
    if preset == "var":
        vae = VQVAE(MultiScaleVQ(4096, 32, pn))
    else:
        vae = VQVAE(MultiScaleVQ(512, 16, pn), ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)
    vae = vae.to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    with torch.no_grad():
        t = _timeit(lambda: vae.indices_to_img(vae.img_to_indices(x)), 1, iters, device)
    med = t[len(t) // 2]
    print(f"tokenizer {preset} at {size}px, batch {batch} on {device}: {batch / med:.2f} images/s encode+decode ({med * 1e3:.0f} ms/batch)")


def _peak_mem_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def _ar_task(preset: str, size: int, refiner: bool = True):
    """A VARSR-style ARFinetune: 'small' (d4, width 256, tiny tokenizer) or 'd16' (VAR-d16 width, VAR's VQVAE)."""
    from arsr.components.conditioning import PrefixTokens, QualityCFG
    from arsr.components.heads import IndexHead
    from arsr.components.posenc import SARoPE
    from arsr.components.quantizers import MultiScaleVQ
    from arsr.components.refiners import DiffusionRefiner
    from arsr.nn.transformer import NextScaleTransformer
    from arsr.nn.vae import VQVAE
    from arsr.tasks.ar import ARFinetune, Inference, Training

    pn = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}[size]
    if preset == "d16":
        tok = VQVAE(MultiScaleVQ(4096, 32, pn, phi_at_last_scale=False))
        tr = NextScaleTransformer(SARoPE(), IndexHead(4096), PrefixTokens((32, 128, 256, 512, 1536), grid=pn[-1]), depth=16,
                                  latent_dim=32, patch_nums=pn, num_classes=2, null_class=None, cond_drop=0.0)
        ref = DiffusionRefiner(32, 1024) if refiner else None
    else:
        tok = VQVAE(MultiScaleVQ(512, 16, pn), ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1)
        tr = NextScaleTransformer(SARoPE(), IndexHead(512), PrefixTokens((16, 32, 64, 128, 256), grid=pn[-1]), depth=4, width=256,
                                  heads=4, latent_dim=16, patch_nums=pn, num_classes=2, null_class=None, cond_drop=0.0)
        ref = DiffusionRefiner(16, 256, 128, 2) if refiner else None
    return ARFinetune(tr, tok, QualityCFG(cfg=6.0), refiner=ref)


def ar(preset: str = "small", size: int = 256, batch: int = 2, iters: int = 3, device: str = "cpu", precision: str = "32"):
    """Teacher-forced training step (CE + refiner, AdamW): tokens/s and peak memory."""
    task = _ar_task(preset, size).to(device)
    task.log = task.log_dict = lambda *a, **k: None
    from arsr.optim import AdamW

    opt = AdamW([(n, p) for n, p in task.named_parameters() if p.requires_grad], lr=1e-4)
    hr = torch.rand(batch, 3, size, size, device=device)
    b = {"hr": hr, "lr_up": hr, "quality": torch.ones(batch, dtype=torch.long, device=device)}
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            loss = task.training_step(b, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t = _timeit(step, 1, iters, device)
    med = t[len(t) // 2]
    tokens = batch * task.transformer.layout.total_len
    n = sum(p.numel() for p in task.transformer.parameters())
    print(f"ar train {preset} ({n / 1e6:.1f}M params) at {size}px, batch {batch}, {precision} on {device}: {med:.2f} s/step, "
          f"{tokens / med:.0f} tokens/s ({task.transformer.layout.total_len} tokens/image), peak mem {_peak_mem_mb(device):.0f} MB")


def predict(preset: str = "small", lr_size: int = 64, iters: int = 2, device: str = "cpu", cfg: float = 6.0):
    """Latency per image of LR (lr_size) -> 4x SR, with / without KV cache and CFG (native size, one image)."""
    size = lr_size * 4
    task = _ar_task(preset, 256 if size <= 256 else 512).to(device).eval()
    if task.native_size != size:
        raise ValueError(f"{preset} at {size}px: native size is {task.native_size}; use lr_size {task.native_size // 4}")
    lr = torch.rand(1, 3, lr_size, lr_size, device=device)
    for use_cache in (True, False):
        for c in (0.0, cfg):
            task.inference = dataclasses.replace(task.inference, cfg=c)
            lr_up = torch.nn.functional.interpolate(lr, size=(size, size), mode="bicubic") * 2 - 1
            run = lambda: task.sample_tokens(lr_up, use_cache=use_cache)
            t = _timeit(run, 0, iters, device)
            print(f"predict {preset} {lr_size}->{size} on {device}: kv_cache={use_cache} cfg={c}: {t[len(t) // 2]:.2f} s/image")


def optimizer(preset: str = "small", iters: int = 15, device: str = "cpu", rounds: int = 3):
    """One AdamW step over the AR model's trainable weights: arsr.optim.AdamW (VAR's groups; fused
    where supported, and foreach) against plain single-tensor AdamW; medians and the ratio."""
    from arsr.optim import AdamW

    task = _ar_task(preset, 256).to(device)
    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    for _, p in named:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {"fused/auto": AdamW(named, lr=1e-4), "foreach": AdamW(named, lr=1e-4, impl="foreach"),
            "plain": torch.optim.AdamW([p for _, p in named], lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, foreach=False)}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(rounds):  # interleaved, so a busy machine slows every variant alike
        for k, opt in opts.items():
            times[k] += _timeit(opt.step, 2, iters, device)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    n = sum(p.numel() for _, p in named)
    print(f"optimizer step {preset} ({n / 1e6:.1f}M trainable params, {len(named)} tensors) on {device}, threads {torch.get_num_threads()}: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items())
          + f"; plain / {opts['fused/auto'].impl} = {med['plain'] / med['fused/auto']:.2f}x, plain / foreach = {med['plain'] / med['foreach']:.2f}x")


def nsarm(preset: str = "tiny", schedule: str = "0.06M", batch: int = 2, iters: int = 3, device: str = "cpu", cfg: float = 1.0):
    """NSARM stage 2 on Infinity: one training step (Algorithm 2 + teacher-forced bitwise CE + AdamW)
    and sampling per image (transformation network + KV cache, tau 0.5, top-p 0.97, colour fix).
    ``tiny``: the oracle-sized Infinity (2 blocks, width 64, tiny T5); ``layer12``: infinity_layer12
    (125M) with the tiny T5 (d32 stride-16 VAE at full size)."""
    from arsr.components.conditioning import NSARMTransformationNet, T5TextEncoder
    from arsr.components.postprocess import ColorFix
    from arsr.components.quantizers import MultiScaleBSQ
    from arsr.nn.infinity import InfinityTransformer
    from arsr.nn.vae import VQVAE
    from arsr.optim import AdamW
    from arsr.tasks.ar import ARFinetune, Inference, Training

    torch.manual_seed(0)
    sizes = {"tiny": dict(depth=2, width=64, heads=4), "layer12": dict(depth=12, width=768, heads=8)}[preset]
    q = MultiScaleBSQ(dim=8 if preset == "tiny" else 32, schedule=schedule)
    ch_mult = (1, 2, 2) if preset == "tiny" else (1, 2, 4, 4, 4)
    tok = VQVAE(q, ch=32 if preset == "tiny" else 128, ch_mult=ch_mult, num_res_blocks=2, using_sa=False, using_mid_sa=False, quant_conv_ks=0)
    grid = q.vae_schedule[-1][0] // 4
    sides = [hw for hw in q.vae_schedule if hw[0] <= grid][:7]
    net = NSARMTransformationNet(latent_dim=q.dim, grid=grid, sides=sides, dims=[32] * len(sides), layers=[1] * len(sides),
                                 heads=[2] * len(sides), stem=[16, 16])
    tr = InfinityTransformer(text=T5TextEncoder("recipes/sample_data/tiny_t5"), token_dim=q.dim, text_channels=128, text_maxlen=64, **sizes)
    task = ARFinetune(tr, tok, scale_predictor=net, training=Training(scale_weighting="sqrt_area"),
                      inference=Inference(cfg=cfg, temperature=0.5, top_k=0, top_p=0.97, postprocess=ColorFix())).to(device)
    task.log = task.log_dict = lambda *a, **k: None
    px = task.native_size
    hr = torch.rand(batch, 3, px, px, device=device)
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area")
    b = {"hr": hr, "lr": lr, "lr_up": torch.nn.functional.interpolate(lr, size=(px, px), mode="bicubic").clamp(0, 1), "caption": ["a photo"] * batch}
    opt = AdamW(list(task.named_parameters()), lr=1e-4)

    def step():
        loss = task.training_step(b, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_train = _timeit(step, 1, iters, device)[iters // 2]
    task.eval()
    t_sample = _timeit(lambda: task.super_resolve_any(lr[:1]), 1, iters, device)[iters // 2]
    n = sum(p.numel() for p in tr.parameters() if p.requires_grad)
    print(f"nsarm {preset} ({n / 1e6:.1f}M transformer params) {schedule} ({q.schedule[-1][0]}x{q.schedule[-1][1]} tokens last, "
          f"{px} px) on {device}: train step batch {batch} {t_train:.2f} s; sample {t_sample:.2f} s/image (cfg {cfg})")


def _var_pair(preset: str, size: int, device: str, compile: bool = False, channels_last: bool = False):
    """An arsr VAR backbone (absolute positions, index head, no prefix: VAR's own model) + tokenizer, and
    the reference re-statement (tools/reference_var.py) holding the same weights, with its own copy
    of the tokenizer (in the default memory format, as the official code keeps it)."""
    import copy
    import sys
    from pathlib import Path

    from arsr.components.conditioning import ConstantLabel
    from arsr.components.heads import IndexHead
    from arsr.components.posenc import AbsolutePerScale
    from arsr.components.quantizers import MultiScaleVQ
    from arsr.nn.transformer import NextScaleTransformer
    from arsr.nn.vae import VQVAE
    from arsr.tasks.ar import ARFinetune, Inference, Training

    sys.path.insert(0, str(Path(__file__).parent))
    import reference_var

    torch.manual_seed(0)
    pn = {256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}[size]
    if preset == "d16":  # VAR-d16: width 1024, 16 heads, VAR's VQVAE (4096 x 32)
        tok, sizes = VQVAE(MultiScaleVQ(4096, 32, pn)), dict(depth=16)
    else:  # small: 4 blocks of width 256, a small tokenizer
        tok, sizes = VQVAE(MultiScaleVQ(512, 16, pn), ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1), dict(depth=4, width=256, heads=4)
    tr = NextScaleTransformer(AbsolutePerScale(), IndexHead(), None, **sizes, num_classes=2, null_class=1, cond_drop=0.0, drop_path=0.0)
    task = ARFinetune(tr, tok, ConstantLabel(0), training=Training(compile=compile, channels_last=channels_last),
                      inference=Inference(val_samples=0)).to(device)
    task.log = task.log_dict = lambda *a, **k: None
    ref, vq = reference_var.from_arsr(tr, tok.quantize)
    ref_tok = copy.deepcopy(tok)
    task.configure_model()  # training.compile / channels_last (after the reference copied the weights)
    return task, ref.to(device), vq.to(device), ref_tok


def _adamw_reference(params, device: str):
    """The optimiser as the official trainer builds it: AdamW, betas (0.9, 0.95), fused when available."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)


def paired(preset: str = "small", size: int = 256, batch: int = 4, rounds: int = 7, device: str = "cpu",
           cfg: float = 4.0, top_k: int = 100, top_p: float = 0.95, rows: list[str] | None = None, compile: bool = False,
           channels_last: bool = False):
    """arsr against a plain PyTorch re-statement of the same math (tools/reference_var.py, VAR's
    model with arsr's weights), interleaved in one process: each round times arsr then the reference
    once per row; prints medians, the time ratio arsr / reference (< 1: arsr faster) and tokens/s.
    Checks first that both compute the same logits and sample the same tokens. Rows: train_fp32,
    train_bf16, sample (KV cache + CFG), teacher (tokens + teacher-forcing input), tokenizer (encode +
    decode), optimizer (one AdamW step); degradation has no reference and is reported alone.
    ``compile``: arsr with ``training.compile`` (torch.compile per block; the reference stays eager);
    ``channels_last``: arsr with ``training.channels_last`` (its tokenizer NHWC; the reference's
    copy stays in the default format).
    On CUDA also absolute ms and MFU of the training step (bf16 peak of the device, if known)."""
    import torch.nn.functional as F

    from arsr.optim import AdamW

    rows = rows or ["train_fp32", "train_bf16", "sample", "teacher", "tokenizer", "optimizer"]
    task, ref, vq, ref_tok = _var_pair(preset, size, device, compile, channels_last)
    tok, q, tr = task.tokenizer, task.quantizer, task.transformer
    L = tr.layout.image_len
    g = torch.Generator(device="cpu").manual_seed(0)
    hr = torch.rand(batch, 3, size, size, generator=g).to(device)
    b = {"hr": hr, "lr": F.interpolate(hr, scale_factor=0.25, mode="area"), "lr_up": hr}
    label = torch.zeros(batch, dtype=torch.long, device=device)

    # same math: logits and sampled tokens agree
    with torch.no_grad():
        f = tok.encode(hr * 2 - 1)
        tf = q.teacher(f)
        d_logits = (tr(label, tf.inputs) - ref(label, vq.teacher_input(vq.f_to_idx(f)))).abs().max().item()
        d_latent = (f - ref_tok.encode(hr * 2 - 1)).abs().max().item()
        same_tokens = all(torch.equal(a, c) for a, c in zip(tf.tokens, vq.f_to_idx(f)))
        gen = lambda: torch.Generator(device=device).manual_seed(1)
        t_arsr, _ = task.sample_tokens(hr[:1] * 2 - 1, generator=gen(), cfg=cfg, top_k=top_k, top_p=top_p)
        t_ref = ref.sample(vq, label[:1], cfg, top_k, top_p, gen())
    same_sample = all(torch.equal(a, c) for a, c in zip(t_arsr, t_ref))
    settings = ", ".join(name for name, on in (("compiled", compile), ("channels_last", channels_last)) if on)
    print(f"paired {preset}{f' (arsr {settings})' if settings else ''} at {size}px, batch {batch}, on {device} "
          f"(threads {torch.get_num_threads()}): same tokens {same_tokens}, max |latent diff| {d_latent:.1e}, "
          f"max |logits diff| {d_logits:.1e}, same sampled tokens {same_sample}")

    opt_a = AdamW(list(task.named_parameters()), lr=1e-4)
    opt_r = _adamw_reference([p for p in ref.parameters() if p.requires_grad], device)

    def train(model, precision):
        dtype = torch.bfloat16 if precision == "bf16" else None

        def arsr_step():
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                loss = task.training_step(b, 0)
            opt_a.zero_grad(set_to_none=True)
            loss.backward()
            opt_a.step()

        def ref_step():
            with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
                with torch.no_grad():
                    idx = vq.f_to_idx(ref_tok.encode(hr * 2 - 1))
                    x = vq.teacher_input(idx)
                logits = ref(label, x)
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), torch.cat(idx, 1).view(-1))
            opt_r.zero_grad(set_to_none=True)
            loss.backward()
            opt_r.step()

        return arsr_step if model == "arsr" else ref_step

    def fns(row):
        if row.startswith("train"):
            prec = row.split("_")[1]
            return train("arsr", prec), train("ref", prec), batch * (L + tr.layout.first_len - tr.layout.patch_nums[0] ** 2)
        if row == "sample":
            x = hr[:1] * 2 - 1
            return (lambda: task.sample_tokens(x, generator=gen(), cfg=cfg, top_k=top_k, top_p=top_p),
                    lambda: vq.idx_to_fhat(ref.sample(vq, label[:1], cfg, top_k, top_p, gen())), L)
        if row == "teacher":
            return (lambda: q.teacher(f), lambda: vq.teacher_input(vq.f_to_idx(f)), batch * L)
        if row == "tokenizer":
            img = hr * 2 - 1
            return (lambda: tok.indices_to_img(tok.img_to_indices(img)),
                    lambda: ref_tok.decode(vq.idx_to_fhat(vq.f_to_idx(ref_tok.encode(img)))), batch * L)
        if row == "optimizer":
            for p in list(task.parameters()) + list(ref.parameters()):
                if p.requires_grad:
                    p.grad = torch.randn_like(p) * 1e-3
            return opt_a.step, opt_r.step, None
        raise ValueError(f"unknown row {row}")

    for row in rows:
        a, r, n_tok = fns(row)
        ctx = torch.no_grad() if row in ("sample", "teacher", "tokenizer") else torch.enable_grad()
        with ctx:
            ta, tr_ = [], []
            a(), r()  # warm-up
            for _ in range(rounds):
                ta += _timeit(a, 0, 1, device)
                tr_ += _timeit(r, 0, 1, device)
        ma, mr = sorted(ta)[len(ta) // 2], sorted(tr_)[len(tr_) // 2]
        ratios = sorted(x / y for x, y in zip(ta, tr_))
        extra = f", arsr {n_tok / ma:,.0f} tokens/s" if n_tok else ""
        print(f"  {row:<11} arsr {ma * 1e3:8.1f} ms  reference {mr * 1e3:8.1f} ms  ratio {ma / mr:.2f} "
              f"(per-round ratios {ratios[0]:.2f}..{ratios[-1]:.2f}){extra}")
        if device == "cuda" and row.startswith("train"):
            n = sum(p.numel() for p in tr.parameters())
            flops = 6 * n * n_tok  # dense-transformer estimate, attention excluded
            peak = _PEAK_BF16.get(torch.cuda.get_device_name(), None)
            mfu = f", MFU {flops / ma / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if peak else ""
            print(f"              {flops / ma / 1e12:.1f} TFLOP/s achieved{mfu}")
    degradation(batch=batch, size=size, iters=max(3, rounds // 2), device=device)  # no reference: reported alone


_PEAK_BF16 = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12}  # dense bf16


if __name__ == "__main__":
    auto_cli([degradation, loader, tokenizer, ar, predict, optimizer, nsarm, paired])
