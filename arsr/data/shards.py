"""Packing an image folder into WebDataset shards.

Each sample holds ``hr.<ext>`` (the original bytes when the image is already 8-bit RGB,
else a lossless PNG of the converted pixels) and ``json`` metadata::

    {"source": "rel/path.jpg", "caption": str | null, "quality": "positive" | "negative" | null,
     "width": int, "height": int, "converted": "gray" | "16bit" | ... | null}

plus, with ``class_from="folder"``, ``"label": int, "class": str`` (class-to-image pretraining).

Images are decoded and checked by a pool of ``workers`` processes and written in file order, so
the shards are byte-identical whatever the number of workers (tar entries carry a fixed mtime).
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import webdataset as wds
from tqdm import tqdm

from .samples import IMAGE_EXTENSIONS, BadSample, SampleStats, decode_rgb, encode_png
from .stream import SHARD_INDEX, write_shard_index

TAR_MTIME = 0.0  # fixed entry time: the same images give the same shard bytes


@dataclass
class PackReport:
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: SampleStats = field(default_factory=SampleStats)
    converted: SampleStats = field(default_factory=SampleStats)
    val_written: int = 0
    val_shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 1

    def __str__(self) -> str:
        split = f" (+ {self.val_written} validation samples into {len(self.val_shards)} shard(s))" if self.val_shards else ""
        rate = (self.written + self.val_written + self.skipped.total()) / max(self.seconds, 1e-9)
        return (
            f"written {self.written} samples into {len(self.shards)} shard(s){split}; "
            f"skipped: {self.skipped.summary()}; converted: {self.converted.summary()}; "
            f"{rate:.1f} images/s with {self.workers} worker(s)"
        )


def _read_labels(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    labels = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2 or row[1].strip() not in ("positive", "negative"):
                raise ValueError(f"{path}: each line must be 'relative/path,positive|negative', got {row!r}")
            labels[row[0].strip()] = row[1].strip()
    return labels


def _quality_of(rel: Path, labels: dict[str, str]) -> str | None:
    if rel.as_posix() in labels:
        return labels[rel.as_posix()]
    for part in rel.parts[:-1]:
        if part in ("positive", "negative"):
            return part
    return None


def in_val_split(source: str, val_fraction: float) -> bool:
    """Deterministic split: the SHA-1 of the relative path, read as a number in [0, 1), below ``val_fraction``.
    A file stays in its split when others are added or removed."""
    return int.from_bytes(hashlib.sha1(source.encode()).digest()[:8], "big") / 2**64 < val_fraction


def folder_classes(src: Path, files: list[Path]) -> dict[str, int]:
    """Class ids from the first folder under ``src`` of each image, sorted by name (torchvision's
    ImageFolder order), so train and validation packs of the same tree agree."""
    loose = [f for f in files if len(f.relative_to(src).parts) < 2]
    if loose:
        raise ValueError(f"class_from folder: {len(loose)} image(s) lie directly in {src} with no class folder, first: {loose[0].name}")
    return {name: i for i, name in enumerate(sorted({f.relative_to(src).parts[0] for f in files}))}


def _prepare(path: Path, src: Path, min_size: int, labels: dict[str, str],
             classes: dict[str, int] | None = None) -> tuple[str, str | None, bytes, dict] | BadSample:
    """One image -> (extension, conversion, bytes, metadata), or the BadSample that skips it (runs in a worker)."""
    rel = path.relative_to(src)
    data = path.read_bytes()
    try:
        arr, converted = decode_rgb(data)
        if min(arr.shape[:2]) < min_size:
            raise BadSample("too_small", f"{arr.shape[1]}x{arr.shape[0]} < {min_size}")
    except BadSample as e:
        return e
    ext = "jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()[1:]
    if converted is not None:
        data, ext = encode_png(arr), "png"
    caption_file = path.with_suffix(".txt")
    meta = {
        "source": rel.as_posix(),
        "caption": caption_file.read_text().strip() if caption_file.exists() else None,
        "quality": _quality_of(rel, labels),
        "width": int(arr.shape[1]),
        "height": int(arr.shape[0]),
        "converted": converted,
    }
    if classes is not None:
        meta |= {"label": classes[rel.parts[0]], "class": rel.parts[0]}
    return ext, converted, data, meta


def _in_order(fn, items: list, workers: int) -> Iterator:
    """``map(fn, items)`` over a process pool, in order, with at most 4 x workers results in flight
    (memory stays bounded however many images there are)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Split:
    """One output series (``prefix-%06d.tar`` + its shard index)."""

    def __init__(self, out_dir: Path, prefix: str, max_shard_bytes: int, max_shard_count: int):
        self.out_dir, self.prefix = out_dir, prefix
        self.pattern = str(out_dir / f"{prefix}-%06d.tar")
        self.sink = wds.ShardWriter(self.pattern, maxsize=max_shard_bytes, maxcount=max_shard_count, verbose=0, mtime=TAR_MTIME)
        self.counts: list[int] = []
        self.written = 0

    def write(self, sample: dict) -> None:
        self.sink.write(sample)
        self.counts[self.sink.shard - 1 :] = [self.sink.count]  # samples in the shard being written
        self.written += 1

    def close(self) -> list[str]:
        shards = [self.pattern % i for i in range(self.sink.shard)]
        self.sink.close()
        write_shard_index(shards, self.counts, self.out_dir / f"{self.prefix}-{SHARD_INDEX}")
        return shards


def pack_folder(
    src: str | Path,
    out_dir: str | Path,
    prefix: str = "shard",
    max_shard_bytes: int = 500 * 2**20,
    max_shard_count: int = 100_000,
    min_size: int = 0,
    labels_csv: str | Path | None = None,
    workers: int = 1,
    val_fraction: float = 0.0,
    val_prefix: str = "val",
    class_from: Literal["folder"] | None = None,
    progress: bool = True,
) -> PackReport:
    """Pack every png/jpg/webp under ``src`` (recursively) into ``out_dir/prefix-%06d.tar``.

    A ``<stem>.txt`` beside an image is its caption. Quality labels come from ``labels_csv``
    (``relpath,positive|negative`` per line) or from a ``positive/`` or ``negative/`` folder
    in the image's path. Images whose short side is below ``min_size`` are skipped.

    Args:
        workers: processes decoding and checking images (output identical to 1 worker).
        val_fraction: share of images written to ``out_dir/val_prefix-%06d.tar`` instead, chosen by
            a hash of each image's relative path (deterministic, stable when the folder grows).
        class_from: ``folder``: each image's first folder under ``src`` is its class; its id (the
            folder's rank among the sorted class folders) is written as the json ``label``.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if val_fraction > 0 and val_prefix == prefix:
        raise ValueError(f"val_prefix and prefix are both {prefix!r}: the splits would overwrite each other")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {src}")
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _read_labels(Path(labels_csv) if labels_csv else None)
    classes = folder_classes(src, files) if class_from == "folder" else None
    report = PackReport(workers=workers)
    train = _Split(out_dir, prefix, max_shard_bytes, max_shard_count)
    val = _Split(out_dir, val_prefix, max_shard_bytes, max_shard_count) if val_fraction > 0 else None
    start = time.perf_counter()
    prepared = _in_order(partial(_prepare, src=src, min_size=min_size, labels=labels, classes=classes), files, workers)
    for item in tqdm(prepared, total=len(files), desc=f"packing ({workers} worker{'s' * (workers > 1)})", unit="img", disable=not progress):
        if isinstance(item, BadSample):
            report.skipped[item.reason] += 1
            continue
        ext, converted, data, meta = item
        if converted is not None:
            report.converted[converted] += 1
        split = val if val is not None and in_val_split(meta["source"], val_fraction) else train
        split.write({"__key__": f"{train.written + (val.written if val else 0):08d}", f"hr.{ext}": data, "json": json.dumps(meta).encode()})
    report.shards, report.written = train.close(), train.written
    if val is not None:
        report.val_shards, report.val_written = val.close(), val.written
    report.seconds = time.perf_counter() - start
    return report
