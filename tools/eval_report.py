#!/usr/bin/env python
"""Score SR images (against HR images when given) and write report.json, report.md,
sorted_scores.png and, with no-reference metrics, NSARM's perceptual_curve.png.

    python tools/eval_report.py --sr_dir sr/ [--hr_dir HR/] --out_dir report/ --crop_border 4 \\
        [--lpips_vgg weights/vgg16-397923af.pth] [--dists_vgg weights/vgg16-397923af.pth] \\
        [--fid_inception weights/pt_inception-2015-12-05.pth] \\
        [--pyiqa '{clipiqa: weights/RN50.pt, musiq: weights/musiq_koniq_ckpt-e95806b9.pth,
                   maniqa: weights/ckpt_koniq10k.pt, topiq_nr: weights/cfanet_nr_koniq_res50-9a73138b.pth}'] \\
        [--perceptual '{clipiqa: 1, musiq: 100, maniqa: 1, topiq_nr: 1}'] \\
        [--levels '{deficient: 0.9, poor: 0.75, collapse: 0.5}']

Without --hr_dir (a no-reference test set such as RP60) only the no-reference metrics run and the
full-reference ones are listed as skipped. Metrics whose weights are not given are listed as
skipped, with the reason; nothing is downloaded.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jsonargparse import auto_cli  # noqa: E402

from arsr.evaluate import LEVELS, PERCEPTUAL, add_no_reference, evaluate_folders, write_report  # noqa: E402
from arsr.metrics import LearnedMetrics  # noqa: E402


def report(sr_dir: str, hr_dir: str | None = None, out_dir: str = "report", crop_border: int = 4,
           lpips_vgg: str | None = None, dists_vgg: str | None = None, fid_inception: str | None = None,
           pyiqa: dict[str, str | dict] | None = None, perceptual: dict[str, float] | None = None,
           levels: dict[str, float] | None = None, device: str = "cpu") -> dict:
    """Evaluate the SR images and write the reports; returns the summary.

    Args:
        pyiqa: no-reference metric name -> local weights file (clipiqa: OpenAI's CLIP RN50.pt
            archive) or ``pyiqa.create_metric`` keyword arguments.
        perceptual: metric -> divisor of the per-image perceptual score (default NSARM's:
            CLIPIQA, MUSIQ / 100, MANIQA, TOPIQ).
        levels: case -> fraction of the mean perceptual score (default 0.9 / 0.75 / 0.5).
    """
    metrics = LearnedMetrics(lpips_vgg, dists_vgg, fid_inception, None, device)
    add_no_reference(metrics, pyiqa or {})
    rep = evaluate_folders(sr_dir, hr_dir, crop_border, metrics, perceptual or PERCEPTUAL, levels or LEVELS)
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
