#!/usr/bin/env python
"""Pack an image folder into WebDataset shards.

    python tools/make_shards.py --src photos/ --out_dir shards/ --prefix train --max_shard_bytes 500000000 \\
        [--workers 8] [--val_fraction 0.01 --val_prefix val]

Recursive over png/jpg/webp; ``<stem>.txt`` beside an image is its caption; quality labels from
``--labels_csv`` (``relpath,positive|negative``) or a ``positive/``/``negative/`` folder.
``--workers N`` decodes and checks images in N processes; the shards are the same as with one.
``--val_fraction`` sends a deterministic share (by a hash of each relative path) to ``val-*.tar``.
``--class_from folder`` writes each image's class (its first folder under ``--src``, ids in sorted
order) as the json ``label``, for class-to-image pretraining (recipes/varsr_c2i.yaml).
Prints a progress bar (images/s) and a summary of what was written, converted and skipped (and why).
"""

from __future__ import annotations

import sys

from jsonargparse import auto_cli

from arsr.data.shards import pack_folder


def main(argv: list[str] | None = None) -> int:
    try:
        report = auto_cli(pack_folder, args=argv, as_positional=False)
    except (FileNotFoundError, ValueError) as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    print(report)
    for shard in report.shards + report.val_shards:
        print(f"  {shard}")
    return 0 if report.written + report.val_written else 1


if __name__ == "__main__":
    sys.exit(main())
