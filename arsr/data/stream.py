"""The training stream: deterministic, resumable, and loud about data it cannot use.

Every rank x worker reads its own stream ``s`` of resampled shards. Draw ``j`` of stream ``s`` is
the shard ``urls[Random(seed, s, j)]``; its samples pass a shuffle buffer seeded by (seed, s, j)
and sample ``k`` of that order is cropped with a generator seeded by (seed, s, j, k). A stream's
position is therefore two integers, ``(j, k)``: resuming re-reads shard ``j`` and drops its first
``k`` shuffled samples without decoding them. Batches arrive from the workers in round-robin
order, so the loader's state (positions of all streams of all ranks, batches consumed) fits in
a checkpoint, and a resumed run yields the same batches, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import webdataset as wds

from .samples import BadSample, SampleStats

SHARD_INDEX = "shardindex.json"  # wids-shard-index-v1: {"shardlist": [{"url": ..., "nsamples": n}, ...]}
READ_ERRORS = (OSError, EOFError, ValueError, KeyError, tarfile.TarError)


class NoUsableSamples(ValueError):
    """Raised when the stream keeps producing nothing (all shards bad, crop larger than every image)."""


def seeded(*parts) -> random.Random:
    """A generator seeded by a tuple of values, identical in every process (string seeds hash with SHA-512)."""
    return random.Random(":".join(map(str, parts)))


def shard_sizes(urls: list[str]) -> dict[str, int]:
    """Sample counts from the ``*shardindex.json`` files beside local shards (written by ``tools/make_shards.py``)."""
    sizes: dict[str, int] = {}
    for folder in {Path(u).parent for u in urls if "://" not in u and not u.startswith("pipe:")}:
        for index in folder.glob(f"*{SHARD_INDEX}"):
            try:
                for entry in json.loads(index.read_text())["shardlist"]:
                    sizes[str(folder / entry["url"])] = int(entry["nsamples"])
            except (ValueError, KeyError, TypeError) as e:
                print(f"arsr: ignoring unreadable shard index {index} ({e})", file=sys.stderr)
    return sizes


def write_shard_index(shards: list[str], counts: list[int], path: Path) -> None:
    entries = [{"url": Path(u).name, "nsamples": n} for u, n in zip(shards, counts)]
    path.write_text(json.dumps({"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": entries}, indent=1))


class ShardReader:
    """Raw samples of one shard, in order; a read error ends the shard, is counted and reported once."""

    def __init__(self, sizes: dict[str, int], stats: SampleStats):
        self.sizes, self.stats, self.reported = sizes, stats, set()

    def __call__(self, url: str) -> Iterator[dict]:
        read = 0
        try:
            for sample in wds.tariterators.tarfile_samples([{"url": url}]):
                read += 1
                yield sample
        except READ_ERRORS as e:
            self.stats["skipped_unreadable_shard" if read == 0 else "truncated_shard"] += 1
            lost = self.sizes.get(url, read) - read
            if lost:
                self.stats["lost_in_truncated_shards"] += lost
            if url not in self.reported:
                self.reported.add(url)
                what = f"{lost} sample(s) lost (its index lists {self.sizes[url]})" if url in self.sizes else \
                    "the number of samples lost is unknown (no shard index beside it)"
                print(f"arsr: shard {url} is unreadable after {read} sample(s) ({type(e).__name__}: {e}); {what}", file=sys.stderr)


class TrainStream(torch.utils.data.IterableDataset):
    """Batches of cleaned, cropped samples; each carries its stream id and position ``(j, k)``.

    Args:
        urls: shard URLs.
        clean: raw sample + crop generator -> training sample (raises :class:`BadSample`).
        state: the loader state (see :class:`ResumableLoader`) to start from.
        rank, world, workers: this process's rank, the world size and loader workers per rank.
    """

    def __init__(self, urls: list[str], clean: Callable[[dict, random.Random], dict], collate: Callable,
                 batch_size: int, shuffle_buffer: int, seed: int, epoch_batches: int, state: dict,
                 rank: int, world: int, workers: int):
        self.urls, self.clean, self.collate = urls, clean, collate
        self.batch_size, self.shuffle_buffer, self.seed, self.epoch_batches = batch_size, shuffle_buffer, seed, epoch_batches
        self.state, self.rank, self.world, self.workers = state, rank, world, max(workers, 1)
        self.sizes = shard_sizes(urls)

    def __len__(self) -> int:
        return self.epoch_batches

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info else 0
        consumed, gen = self.state["consumed"], self.state["generation"]
        # the loader asks worker 0 first: rotate so the stream due next is served by worker 0
        s = self.rank * self.workers + (w + consumed) % self.workers
        remaining = self.epoch_batches - consumed % self.epoch_batches
        todo = len(range(w, remaining, self.workers))
        j, k = self.state["streams"].get(s, (0, 0))
        stats = SampleStats()
        reader = ShardReader(self.sizes, stats)
        batch: list[dict] = []
        dry, dry_urls, last_bad = 0, set(), None  # bad samples and shards since the last usable sample
        while todo > 0:
            url = self.urls[seeded(self.seed, gen, s, j).randrange(len(self.urls))]
            order = wds.filters._shuffle(reader(url), self.shuffle_buffer, self.shuffle_buffer, seeded(self.seed, gen, s, j, "order"))
            useful = False
            for idx, raw in enumerate(order):
                if idx < k:  # resuming: already consumed, dropped undecoded
                    continue
                try:
                    item = self.clean(raw, seeded(self.seed, gen, s, j, idx))
                except BadSample as e:
                    stats[f"skipped_{e.reason}"] += 1
                    dry, last_bad = dry + 1, e
                    continue
                dry, useful = 0, True
                batch.append(item)
                if len(batch) == self.batch_size:
                    out = self.collate(batch) | {"stream": s, "pos": (j, idx + 1)}
                    out["stats"] = dict(SampleStats(out["stats"]) + stats)
                    stats.clear()
                    batch = []
                    yield out
                    todo -= 1
                    if todo == 0:
                        return
            dry_urls = set() if useful else dry_urls | {url}
            if dry_urls >= set(self.urls) or (dry >= 1000 and len(dry_urls) >= 3):
                raise NoUsableSamples(self._why(dry, dry_urls, stats, last_bad))
            j, k = j + 1, 0

    def _why(self, dry: int, urls: set[str], stats: SampleStats, last: BadSample | None) -> str:
        msg = f"no usable training sample in {dry} sample(s) from {len(urls)} shard(s) ({stats.summary()})"
        if last is not None and last.reason == "too_small":
            return f"{msg}; crop_size is larger than the images ({last})"
        return f"{msg}; last problem: {last}" if last else f"{msg}; the shards hold no readable samples"


class ResumableLoader(torch.utils.data.DataLoader):
    """The training DataLoader with Lightning's ``state_dict``/``load_state_dict``: the positions of
    every rank's streams and the batches consumed (updated by :meth:`advance` as batches are used)."""

    def __init__(self, make_dataset: Callable[[dict], TrainStream], num_workers: int, rank: int, world: int):
        self.rank, self.world, self.workers = rank, world, max(num_workers, 1)
        self.stream_state: dict = {"consumed": 0, "generation": 0, "streams": {}}
        self.make_dataset = make_dataset
        super().__init__(make_dataset(self.stream_state), batch_size=None, num_workers=num_workers)

    def advance(self, batch: dict) -> None:
        """Record that ``batch`` was used for training."""
        self.stream_state["streams"][batch.pop("stream")] = batch.pop("pos")
        self.stream_state["consumed"] += 1

    def state_dict(self) -> dict:
        streams = dict(self.stream_state["streams"])
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world > 1:
            gathered: list = [None] * self.world
            torch.distributed.all_gather_object(gathered, streams)  # only rank 0 writes the checkpoint
            streams = {s: p for part in gathered for s, p in part.items()}
        layout = {"world": self.world, "workers": self.workers}
        return {"consumed": self.stream_state["consumed"], "generation": self.stream_state["generation"],
                "streams": {str(s): list(p) for s, p in streams.items()}, "layout": layout}

    def load_state_dict(self, state: dict) -> None:
        layout = {"world": self.world, "workers": self.workers}
        same = state.get("layout") == layout
        if not same:
            print(f"arsr: data stream layout changed from {state.get('layout')} to {layout}: the shard streams start "
                  "afresh (exact resume needs the same devices and num_workers)", file=sys.stderr)
        self.stream_state.update(
            consumed=state["consumed"], generation=state["generation"] + (not same),
            streams={int(s): tuple(p) for s, p in state["streams"].items()} if same else {})
