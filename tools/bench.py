#!/usr/bin/env python
"""Throughput benchmarks. Run on the machine you care about; numbers are printed, not asserted.

    python tools/bench.py degradation --batch 16 --size 256
    python tools/bench.py loader --workers 2 --batch 16 --size 128
    python tools/bench.py tokenizer --size 256 --preset tiny
"""

from __future__ import annotations

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


if __name__ == "__main__":
    auto_cli([degradation, loader, tokenizer])
