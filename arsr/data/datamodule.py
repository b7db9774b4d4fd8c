"""WebDataset-fed data module: HR crops on CPU workers, degradations on the device.

Training streams resampled shards (each rank and worker draws its own shards, so ranks
always agree on the number of steps); validation reads its shards once, in order, with
centre crops and a degradation seeded by the sample keys, so it is identical run to run.
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from collections.abc import Iterator
from typing import Literal

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image

from arsr.interfaces import Degradation

from .pool import PairPool
from .samples import QUALITY_LABELS, BadSample, SampleStats, decode_rgb, image_field

CropMode = Literal["random", "center", "resize_center"]


def crop_hr(arr: np.ndarray, size: int, mode: CropMode, rng: random.Random, hflip: bool) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8.

    random: a random window (+ optional horizontal flip); center: the central window;
    resize_center: VARSR's recipe, short side resized to 1.25 x size, then the central window.
    """
    h, w = arr.shape[:2]
    if mode == "resize_center":
        short = round(1.25 * size)
        if min(h, w) < short:
            raise BadSample("too_small", f"{w}x{h} < {short} (1.25 x crop)")
        s = short / min(h, w)
        arr = np.asarray(Image.fromarray(arr).resize((round(w * s), round(h * s)), Image.BICUBIC))
        h, w = arr.shape[:2]
    if min(h, w) < size:
        raise BadSample("too_small", f"{w}x{h} < crop {size}")
    if mode == "random":
        top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    else:
        top, left = (h - size) // 2, (w - size) // 2
    out = arr[top : top + size, left : left + size]
    if hflip and mode == "random" and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


class CleanSamples:
    """Pipeline stage: raw shard samples -> decoded crops; bad ones counted, never raised.

    Each yielded sample carries the skip counts accumulated since the previous one, so the
    counts travel with the batches out of the worker processes and can be logged (on a
    finite stream, skips after its last good sample go unreported).
    """

    def __init__(self, crop_size: int, crop: CropMode, hflip: bool, seed: int):
        self.crop_size, self.crop, self.hflip, self.seed = crop_size, crop, hflip, seed

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        rank = int(torch.distributed.get_rank()) if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        rng = random.Random(self.seed * 1_000_003 + rank * 1009 + worker)
        pending = SampleStats()
        for sample in src:
            try:
                key = image_field(sample)
                if key is None:
                    raise BadSample("missing_image", f"sample {sample.get('__key__')} has fields {sorted(sample)}")
                arr, converted = decode_rgb(sample[key])
                if converted:
                    pending[f"converted_{converted}"] += 1
                hr = crop_hr(arr, self.crop_size, self.crop, rng, self.hflip)
                meta = json.loads(sample["json"]) if "json" in sample else {}
            except BadSample as e:
                pending[f"skipped_{e.reason}"] += 1
                continue
            except (ValueError, UnicodeDecodeError):  # unreadable metadata
                pending["skipped_bad_json"] += 1
                continue
            yield {
                "hr": torch.from_numpy(hr).permute(2, 0, 1),  # (3, H, W) uint8
                "caption": meta.get("caption") or "",
                "quality": QUALITY_LABELS.get(meta.get("quality"), -1),
                "key": sample.get("__key__", ""),
                "stats": pending,
            }
            pending = SampleStats()


def collate(samples: list[dict]) -> dict:
    stats = SampleStats()
    for s in samples:
        stats.update(s["stats"])
    return {
        "hr": torch.stack([s["hr"] for s in samples]),  # (B, 3, H, W) uint8
        "caption": [s["caption"] for s in samples],
        "quality": torch.tensor([s["quality"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
        "stats": dict(stats),
    }


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace patterns (``data/shard-{000000..000009}.tar``) and lists -> a flat URL list.

    Local paths are checked up front, so a typo fails at start-up rather than in a worker.
    """
    out: list[str] = []
    for u in [urls] if isinstance(urls, str) else urls:
        out.extend(wds.shardlists.expand_urls(u))
    missing = [u for u in out if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, first: {missing[0]} (build shards with tools/make_shards.py)")
    if not out:
        raise ValueError(f"no shard URLs in {urls!r}")
    return out


class ShardDataModule(L.LightningDataModule):
    """HR crops from WebDataset shards, degraded to (LR, HR) pairs on the training device.

    Args:
        train_shards: URL(s) or brace pattern(s) of the training shards.
        val_shards: the same for validation; None disables validation.
        degradation: how LR inputs are synthesised (any :class:`arsr.interfaces.Degradation`).
        crop_size: HR crop side in pixels (must be divisible by the degradation's scale).
        crop: ``random`` (training), or ``resize_center`` (VARSR: short side to 1.25 x crop,
            then the centre). Validation always uses a deterministic centre crop.
        batch_size: per-device training batch.
        batches_per_epoch: length of one (virtual) training epoch per device.
        shuffle_buffer: samples held for shuffling inside each worker.
        pool_size: Real-ESRGAN's training-pair pool after degradation (0 = off; x4plus: 180
            with batch 12); a multiple of ``batch_size``.
        seed: base seed of crops and degradations.
    """

    def __init__(
        self,
        train_shards: str | list[str],
        degradation: Degradation,
        val_shards: str | list[str] | None = None,
        crop_size: int = 256,
        crop: Literal["random", "resize_center"] = "random",
        hflip: bool = True,
        batch_size: int = 8,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        batches_per_epoch: int = 1000,
        shuffle_buffer: int = 500,
        pool_size: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if crop_size % degradation.scale:
            raise ValueError(f"crop_size {crop_size} is not divisible by the degradation scale {degradation.scale}")
        self.train_urls = expand_urls(train_shards)
        self.val_urls = expand_urls(val_shards) if val_shards else []
        self.degradation = degradation
        self.crop_size, self.crop, self.hflip = crop_size, crop, hflip
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        if pool_size % batch_size:
            raise ValueError(f"pool_size {pool_size} is not a multiple of batch_size {batch_size}")
        self.pool = PairPool(pool_size) if pool_size else None

    def _loader(self, dataset: wds.WebDataset) -> wds.WebLoader:
        return wds.WebLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        ds = (
            wds.WebDataset(self.train_urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node,
                           handler=wds.warn_and_continue, empty_check=False)
            .shuffle(self.shuffle_buffer, rng=random.Random(self.seed))
            .compose(CleanSamples(self.crop_size, self.crop, self.hflip, self.seed))
            .batched(self.batch_size, collation_fn=collate, partial=False)
        )
        return self._loader(ds).with_epoch(self.batches_per_epoch)

    def val_dataloader(self):
        if not self.val_urls:
            return []
        ds = (
            wds.WebDataset(self.val_urls, resampled=False, shardshuffle=False, nodesplitter=wds.split_by_node,
                           handler=wds.warn_and_continue, empty_check=False)
            .compose(CleanSamples(self.crop_size, "center", False, self.seed))
            .batched(self.val_batch_size, collation_fn=collate, partial=True)
        )
        return self._loader(ds)

    def _generator(self, batch: dict, device: torch.device) -> torch.Generator:
        trainer = self.trainer
        if trainer is not None and trainer.training:
            seed = hash((self.seed, trainer.global_step, trainer.global_rank)) & 0x7FFF_FFFF_FFFF
        else:  # evaluation: a function of the samples alone
            seed = zlib.crc32("|".join(batch["key"]).encode()) + self.seed
        return torch.Generator(device=device).manual_seed(seed)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        hr = batch["hr"].float() / 255.0
        g = self._generator(batch, hr.device)
        out = self.degradation(hr, generator=g)
        batch = batch | {"hr": out.hr, "lr": out.lr, "lr_up": out.lr_up, "degraded": out.degraded}
        if self.pool is not None and self.trainer is not None and self.trainer.training:
            batch = self.pool(batch, torch.Generator().manual_seed(g.initial_seed()))
        return batch
