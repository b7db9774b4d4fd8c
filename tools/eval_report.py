#!/usr/bin/env python
"""Score SR images against HR images and write report.json, report.md and sorted_scores.png.

    python tools/eval_report.py --sr_dir sr/ --hr_dir HR/ --out_dir report/ --crop_border 4 \
        [--lpips_vgg weights/vgg16-397923af.pth] [--dists_vgg weights/vgg16-397923af.pth] \
        [--fid_inception weights/pt_inception-2015-12-05.pth] [--pyiqa '{musiq: weights/musiq_koniq.pth}']

Metrics whose weights are not given are listed as skipped, with the reason; nothing is downloaded.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jsonargparse import auto_cli  # noqa: E402

from arsr.evaluate import evaluate_folders, write_report  # noqa: E402
from arsr.metrics import LearnedMetrics  # noqa: E402


def report(sr_dir: str, hr_dir: str, out_dir: str = "report", crop_border: int = 4, lpips_vgg: str | None = None,
           dists_vgg: str | None = None, fid_inception: str | None = None, pyiqa: dict[str, str] | None = None,
           device: str = "cpu") -> dict:
    """Evaluate the SR/HR pairs and write the reports; returns the summary."""
    metrics = LearnedMetrics(lpips_vgg, dists_vgg, fid_inception, pyiqa, device)
    rep = evaluate_folders(sr_dir, hr_dir, crop_border, metrics)
    paths = write_report(rep, out_dir)
    for name, reason in rep.metrics_skipped.items():
        print(f"skipped {name}: {reason}")
    print(rep.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return rep.summary()


if __name__ == "__main__":
    try:
        auto_cli(report, as_positional=False)
    except (FileNotFoundError, ValueError) as e:
        print(f"eval_report: error: {e}", file=sys.stderr)
        sys.exit(2)
