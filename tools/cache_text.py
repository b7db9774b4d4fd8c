#!/usr/bin/env python
"""Fill a T5TextEncoder feature cache with every caption of a set of shards (once, on the GPU),
so that training reads the features instead of running Flan-T5 at every step.

    python tools/cache_text.py --t5 weights/flan-t5-xl --cache_dir cache/t5 \
        --shards '/data/shards/train-{000000..000999}.tar' [--prompt 'a fixed prompt'] [--batch 64]

Then set ``cache_dir: cache/t5`` on the recipe's ``T5TextEncoder`` (same ``max_len``).
"""

from __future__ import annotations

import sys

import torch
import webdataset as wds
from jsonargparse import auto_cli
from tqdm import tqdm

from arsr.components.conditioning import T5TextEncoder
from arsr.data.samples import BadSample, parse_meta


def captions_of(shards: str) -> list[str]:
    """Distinct captions of the shards ('' always included: the dropped caption), in first-seen order."""
    seen: dict[str, None] = {"": None}
    for sample in wds.WebDataset(shards, shardshuffle=False, handler=wds.warn_and_continue, empty_check=False):
        try:
            seen.setdefault(parse_meta(sample.get("json"))[0], None)
        except BadSample:
            continue
    return list(seen)


def cache_text(t5: str, cache_dir: str, shards: str | None = None, prompt: str | None = None, max_len: int = 512,
               batch: int = 32, dtype: str = "float32", device: str = "cuda" if torch.cuda.is_available() else "cpu") -> int:
    """Encode the shards' captions (or one fixed prompt) into ``cache_dir``; returns how many were encoded."""
    captions = ([prompt, ""] if prompt is not None else []) + (captions_of(shards) if shards else [])
    if not captions:
        raise ValueError("give --shards (captions of their samples) and/or --prompt")
    encoder = T5TextEncoder(t5, max_len=max_len, dtype=dtype, cache_dir=cache_dir).to(device)
    todo = [c for c in dict.fromkeys(captions) if not encoder._cached(c).is_file()]
    for i in tqdm(range(0, len(todo), batch), desc="T5 features", unit="batch"):
        encoder.encode(todo[i : i + batch])
    print(f"cache_text: {len(todo)} captions encoded, {len(set(captions)) - len(todo)} already cached, in {cache_dir}")
    return len(todo)


if __name__ == "__main__":
    try:
        auto_cli(cache_text, as_positional=False)
    except (FileNotFoundError, ValueError) as e:
        print(f"cache_text: error: {e}", file=sys.stderr)
        sys.exit(2)
