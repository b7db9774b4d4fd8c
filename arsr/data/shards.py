"""Packing an image folder into WebDataset shards.

Each sample holds ``hr.<ext>`` (the original bytes when the image is already 8-bit RGB,
else a lossless PNG of the converted pixels) and ``json`` metadata::

    {"source": "rel/path.jpg", "caption": str | null, "quality": "positive" | "negative" | null,
     "width": int, "height": int, "converted": "gray" | "16bit" | ... | null}
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from .samples import IMAGE_EXTENSIONS, BadSample, SampleStats, decode_rgb, encode_png
from .stream import SHARD_INDEX, write_shard_index


@dataclass
class PackReport:
    written: int = 0
    shards: list[str] = field(default_factory=list)
    skipped: SampleStats = field(default_factory=SampleStats)
    converted: SampleStats = field(default_factory=SampleStats)

    def __str__(self) -> str:
        return (
            f"written {self.written} samples into {len(self.shards)} shard(s); "
            f"skipped: {self.skipped.summary()}; converted: {self.converted.summary()}"
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


def pack_folder(
    src: str | Path,
    out_dir: str | Path,
    prefix: str = "shard",
    max_shard_bytes: int = 500 * 2**20,
    max_shard_count: int = 100_000,
    min_size: int = 0,
    labels_csv: str | Path | None = None,
    progress: bool = True,
) -> PackReport:
    """Pack every png/jpg/webp under ``src`` (recursively) into ``out_dir/prefix-%06d.tar``.

    A ``<stem>.txt`` beside an image is its caption. Quality labels come from ``labels_csv``
    (``relpath,positive|negative`` per line) or from a ``positive/`` or ``negative/`` folder
    in the image's path. Images whose short side is below ``min_size`` are skipped.
    """
    src, out_dir = Path(src), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"source folder {src} does not exist")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {src}")
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _read_labels(Path(labels_csv) if labels_csv else None)
    report = PackReport()
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    counts: list[int] = []
    with wds.ShardWriter(pattern, maxsize=max_shard_bytes, maxcount=max_shard_count, verbose=0) as sink:
        for path in tqdm(files, desc="packing", unit="img", disable=not progress):
            rel = path.relative_to(src)
            data = path.read_bytes()
            try:
                arr, converted = decode_rgb(data)
                if min(arr.shape[:2]) < min_size:
                    raise BadSample("too_small", f"{arr.shape[1]}x{arr.shape[0]} < {min_size}")
            except BadSample as e:
                report.skipped[e.reason] += 1
                continue
            ext = "jpg" if path.suffix.lower() == ".jpeg" else path.suffix.lower()[1:]
            if converted is not None:
                report.converted[converted] += 1
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
            sink.write({"__key__": f"{report.written:08d}", f"hr.{ext}": data, "json": json.dumps(meta).encode()})
            counts[sink.shard - 1 :] = [sink.count]  # samples in the shard being written
            report.written += 1
        report.shards = [pattern % i for i in range(sink.shard)]
    write_shard_index(report.shards, counts, out_dir / f"{prefix}-{SHARD_INDEX}")
    return report
