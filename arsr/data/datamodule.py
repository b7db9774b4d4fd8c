"""WebDataset-fed data module: HR crops on CPU workers, degradations on the device.

Training streams resampled shards (each rank and worker draws its own shards, so ranks
always agree on the number of steps); validation reads its shards once, in order, with
centre crops and a degradation seeded by the sample keys, so it is identical run to run.
"""

from __future__ import annotations

import random
import sys
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
from .samples import BadSample, SampleStats, decode_rgb, image_field, parse_meta
from .stream import ResumableLoader, TrainStream, seeded

CropMode = Literal["random", "center", "resize_center"]


def crop_hr(arr: np.ndarray, size: int, mode: CropMode, rng: random.Random, hflip: bool) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8.

    random: a random window; center: the central window; resize_center: VARSR's recipe, short
    side resized to 1.25 x size, then the central window. ``hflip``: a random horizontal flip after any of them.
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
    if hflip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def clean_sample(sample: dict, crop_size: int, crop: CropMode, hflip: bool, rng: random.Random) -> tuple[dict, SampleStats]:
    """A raw shard sample -> a training sample (HR crop, caption, quality, class label, key) and the conversions
    applied; raises :class:`BadSample` naming the reason when it cannot be used."""
    key = image_field(sample)
    if key is None:
        raise BadSample("missing_image", f"sample {sample.get('__key__')} has fields {sorted(sample)}")
    caption, quality, label = parse_meta(sample.get("json"))
    arr, converted = decode_rgb(sample[key])
    hr = crop_hr(arr, crop_size, crop, rng, hflip)
    item = {"hr": torch.from_numpy(hr).permute(2, 0, 1), "caption": caption, "quality": quality, "label": label,
            "key": sample.get("__key__", "")}
    return item, SampleStats({f"converted_{converted}": 1} if converted else {})


class CleanSamples:
    """Pipeline stage (validation): raw shard samples -> decoded crops; bad ones counted, never raised.

    Each yielded sample carries the counts accumulated since the previous one, so the counts
    travel with the batches out of the worker processes and can be logged.
    """

    def __init__(self, crop_size: int, crop: CropMode, hflip: bool, seed: int):
        self.crop_size, self.crop, self.hflip, self.seed = crop_size, crop, hflip, seed

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        pending = SampleStats()
        for sample in src:
            try:
                item, conv = clean_sample(sample, self.crop_size, self.crop, self.hflip, random.Random(self.seed))
            except BadSample as e:
                pending[f"skipped_{e.reason}"] += 1
                continue
            # degradation seed: a function of the sample's key alone (any batch size, any run)
            yield item | {"stats": pending + conv, "seed": seeded(self.seed, "degrade", item["key"]).getrandbits(62)}
            pending = SampleStats()


def collate(samples: list[dict]) -> dict:
    stats = SampleStats()
    for s in samples:
        stats.update(s["stats"])
    return {
        "hr": torch.stack([s["hr"] for s in samples]),  # (B, 3, H, W) uint8
        "caption": [s["caption"] for s in samples],
        "quality": torch.tensor([s["quality"] for s in samples], dtype=torch.long),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),  # class, -1 unlabelled
        "key": [s["key"] for s in samples],
        "seed": [s["seed"] for s in samples],  # per-sample degradation seeds
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

    Training is a deterministic, resumable stream (:mod:`arsr.data.stream`): the same seed and
    config give the same batches, and ``--ckpt_path`` resumes them exactly (same devices and
    ``num_workers``). Each training batch also reseeds torch, numpy and ``random`` from (seed,
    rank, batch index), so model-side randomness (dropout, scale dropout) resumes exactly too.

    Args:
        train_shards: URL(s) or brace pattern(s) of the training shards.
        val_shards: the same for validation (and ``arsr test``); None disables validation.
        degradation: how LR inputs are synthesised (any :class:`arsr.interfaces.Degradation`).
        crop_size: HR crop side in pixels (must be divisible by the degradation's scale).
        crop: ``random`` (training), or ``resize_center`` (VARSR: short side to 1.25 x crop,
            then the centre). Validation always uses a deterministic centre crop.
        hflip: random horizontal flip of training crops, with every crop mode (VARSR flips too).
        batch_size: per-device training batch.
        batches_per_epoch: length of one (virtual) training epoch per device.
        shuffle_buffer: samples held for shuffling inside each shard read.
        pool_size: Real-ESRGAN's training-pair pool after degradation (0 = off; x4plus: 180
            with batch 12); a multiple of ``batch_size``.
        seed: base seed of shard draws, shuffling, crops and degradations.
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
        for name, value, low in (("crop_size", crop_size, 1), ("batch_size", batch_size, 1), ("val_batch_size", val_batch_size or 1, 1),
                                 ("batches_per_epoch", batches_per_epoch, 1), ("shuffle_buffer", shuffle_buffer, 1),
                                 ("num_workers", num_workers, 0), ("pool_size", pool_size, 0)):
            if value < low:
                raise ValueError(f"{name}: {value} is not accepted: it must be >= {low}")
        if crop_size % degradation.scale:
            raise ValueError(f"crop_size {crop_size} is not divisible by the degradation scale {degradation.scale}")
        if pool_size % batch_size:
            raise ValueError(f"pool_size {pool_size} is not a multiple of batch_size {batch_size}")
        self.train_urls = expand_urls(train_shards)
        self.val_urls = expand_urls(val_shards) if val_shards else []
        self.degradation = degradation
        self.crop_size, self.crop, self.hflip = crop_size, crop, hflip
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.batches_per_epoch = num_workers, batches_per_epoch
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.pool = PairPool(pool_size) if pool_size else None
        self.train_loader: ResumableLoader | None = None
        self.epoch_stats = SampleStats()

    def _clean(self, sample: dict, rng: random.Random) -> dict:
        """``rng`` is seeded by the sample's place in the stream (seed, generation, stream, shard draw,
        index): the crop and then the sample's degradation seed are drawn from it."""
        item, converted = clean_sample(sample, self.crop_size, self.crop, self.hflip, rng)
        return item | {"stats": converted, "seed": rng.getrandbits(62)}

    def train_dataloader(self) -> ResumableLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

        def stream(state: dict) -> TrainStream:
            return TrainStream(self.train_urls, self._clean, collate, self.batch_size, self.shuffle_buffer, self.seed,
                               self.batches_per_epoch, state, rank, world, self.num_workers)

        self.train_loader = ResumableLoader(stream, self.num_workers, rank, world)
        return self.train_loader

    def val_dataloader(self):
        """Validation shards once, in order, centre crops; the last batch is partial (no sample repeats)."""
        if not self.val_urls:
            return []
        ds = (
            wds.WebDataset(self.val_urls, resampled=False, shardshuffle=False, nodesplitter=wds.split_by_node,
                           handler=wds.warn_and_continue, empty_check=False)
            .compose(CleanSamples(self.crop_size, "center", False, self.seed))
            .batched(self.val_batch_size, collation_fn=collate, partial=True)
        )
        return wds.WebLoader(ds, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def test_dataloader(self):
        """``arsr test`` on shards: the validation shards, each sample once."""
        if not self.val_urls:
            raise ValueError("arsr test with ShardDataModule needs --data.init_args.val_shards")
        return self.val_dataloader()

    def _generator(self, batch: dict, device: torch.device) -> torch.Generator:
        """The batch generator of the training-pair pool (degradations use the per-sample ``seed``s)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and self.train_loader is not None:
            # a function of the batch's place in the run: survives a resume
            seed = seeded(self.seed, "degrade", trainer.global_rank, self.train_loader.stream_state["consumed"]).getrandbits(62)
        else:  # evaluation: a function of the samples alone
            seed = zlib.crc32("|".join(batch["key"]).encode()) + self.seed
        return torch.Generator(device=device).manual_seed(seed)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        trainer = self.trainer
        if trainer is None or not trainer.training or "stream" not in batch or self.train_loader is None:
            return batch
        self.train_loader.advance(batch)
        n = self.train_loader.stream_state["consumed"]
        rng = seeded(self.seed, "model", trainer.global_rank, n)
        torch.manual_seed(rng.getrandbits(63))
        np.random.seed(rng.getrandbits(32))
        random.seed(rng.getrandbits(63))
        self.epoch_stats.update(batch.get("stats", {}))
        if n % self.batches_per_epoch == 0:
            if trainer.is_global_zero:
                print(f"arsr: data, epoch ending at batch {n}: {self.epoch_stats.summary()}", file=sys.stderr)
            self.epoch_stats = SampleStats()
        return batch

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        hr = batch["hr"].float() / 255.0
        g = self._generator(batch, hr.device)
        out = self.degradation(hr, generator=g, seeds=batch.get("seed"))
        batch = batch | {"hr": out.hr, "lr": out.lr, "lr_up": out.lr_up, "degraded": out.degraded}
        if self.pool is not None and self.trainer is not None and self.trainer.training:
            batch = self.pool(batch, torch.Generator().manual_seed(g.initial_seed()))
        return batch

    def state_dict(self) -> dict:
        """The training-pair pool (the stream's position is the train loader's state)."""
        return {"pool": self.pool.state_dict()} if self.pool is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.pool is not None and "pool" in state:
            self.pool.load_state_dict(state["pool"])
