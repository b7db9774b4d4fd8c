#!/usr/bin/env python
"""Score SR images (against HR images when given) and write reports.

One folder: report.json, report.md, sorted_scores.png and, with no-reference metrics, NSARM's
perceptual_curve.png:

    python tools/eval_report.py --sr_dir sr/ [--hr_dir HR/] --out_dir report/ --crop_border 4 \\
        [--lpips_vgg weights/vgg16-397923af.pth] [--dists_vgg weights/vgg16-397923af.pth] \\
        [--fid_inception weights/pt_inception-2015-12-05.pth] \\
        [--pyiqa '{clipiqa: weights/RN50.pt, musiq: weights/musiq_koniq_ckpt-e95806b9.pth,
                   maniqa: weights/ckpt_koniq10k.pt, topiq_nr: weights/cfanet_nr_koniq_res50-9a73138b.pth}'] \\
        [--perceptual '{clipiqa: 1, musiq: 100, maniqa: 1, topiq_nr: 1}'] \\
        [--levels '{deficient: 0.9, poor: 0.75, collapse: 0.5}']

Several methods (``--sr name=folder`` repeated, same options otherwise): comparison.md / .csv / .json
(mean and variance per metric and method; Deficient / Poor / Collapse per method against the
global mean of each metric over all methods) and sorted_curves.png, distributions.png,
worst_cases.png (``--worst`` images per method):

    python tools/eval_report.py --sr varsr=sr_varsr/ --sr nsarm=sr_nsarm/ [--hr_dir HR/] --out_dir cmp/

Without --hr_dir (a no-reference test set such as RP60) only the no-reference metrics run and the
full-reference ones are listed as skipped. Metrics whose weights are not given are listed as
skipped, with the reason; nothing is downloaded.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jsonargparse import ArgumentParser  # noqa: E402

from arsr.evaluate import (LEVELS, PERCEPTUAL, add_no_reference, compare_methods, evaluate_folders,  # noqa: E402
                           write_comparison, write_report)
from arsr.metrics import LearnedMetrics  # noqa: E402


def _metrics(lpips_vgg: str | None, dists_vgg: str | None, fid_inception: str | None, pyiqa: dict | None,
             device: str) -> LearnedMetrics:
    metrics = LearnedMetrics(lpips_vgg, dists_vgg, fid_inception, None, device)
    add_no_reference(metrics, pyiqa or {})
    return metrics


def report(sr_dir: str, hr_dir: str | None = None, out_dir: str = "report", crop_border: int = 4,
           lpips_vgg: str | None = None, dists_vgg: str | None = None, fid_inception: str | None = None,
           pyiqa: dict[str, str | dict] | None = None, perceptual: dict[str, float] | None = None,
           levels: dict[str, float] | None = None, device: str = "cpu") -> dict:
    """Evaluate one SR folder and write the reports; returns the summary (options as ``compare``)."""
    metrics = _metrics(lpips_vgg, dists_vgg, fid_inception, pyiqa, device)
    rep = evaluate_folders(sr_dir, hr_dir, crop_border, metrics, perceptual or PERCEPTUAL, levels or LEVELS)
    paths = write_report(rep, out_dir)
    for name, reason in rep.metrics_skipped.items():
        print(f"skipped {name}: {reason}")
    print(rep.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return rep.summary()


def compare(methods: dict[str, str], hr_dir: str | None = None, out_dir: str = "report", crop_border: int = 4,
            lpips_vgg: str | None = None, dists_vgg: str | None = None, fid_inception: str | None = None,
            pyiqa: dict[str, str | dict] | None = None, perceptual: dict[str, float] | None = None,
            levels: dict[str, float] | None = None, device: str = "cpu", worst: int = 4) -> dict:
    """Compare several methods' SR folders and write the comparison; returns its summary.

    Args:
        methods: method name -> SR folder (``--sr name=folder``, repeated).
        hr_dir: the HR folder; none: no-reference metrics only.
        out_dir: where the reports go.
        crop_border: pixels removed on every side for PSNR / SSIM (= the scale).
        lpips_vgg: torchvision VGG16 weights file for LPIPS.
        dists_vgg: torchvision VGG16 weights file for DISTS.
        fid_inception: torch-fidelity Inception weights file for FID.
        pyiqa: no-reference metric name -> local weights file (clipiqa: OpenAI's CLIP RN50.pt
            archive) or ``pyiqa.create_metric`` keyword arguments.
        perceptual: metric -> divisor of the per-image perceptual score (default NSARM's:
            CLIPIQA, MUSIQ / 100, MANIQA, TOPIQ).
        levels: case -> fraction of the mean (default 0.9 / 0.75 / 0.5; NSARM's Eq. 7 constants are not public).
        device: where the learned metrics run.
        worst: worst-case images shown per method.
    """
    metrics = _metrics(lpips_vgg, dists_vgg, fid_inception, pyiqa, device)
    cmp = compare_methods(methods, hr_dir, crop_border, metrics, perceptual or PERCEPTUAL, levels or LEVELS)
    paths = write_comparison(cmp, out_dir, worst)
    print(cmp.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return cmp.summary()


def parse_methods(items: list[str]) -> dict[str, str]:
    """``["name=folder", ...]`` -> ``{name: folder}`` (names unique)."""
    methods: dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--sr {item!r}: expected name=folder")
        if name in methods:
            raise ValueError(f"--sr: method {name!r} given twice")
        methods[name] = folder
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sr", action="append", default=[], metavar="NAME=FOLDER",
                        help="a method's SR folder; repeat to compare several methods")
    parser.add_function_arguments(compare, skip={"methods"})
    parser.add_argument("--sr_dir", type=str | None, default=None, help="one SR folder (single-method report)")
    args = parser.parse_args(argv)
    opts = {k: v for k, v in vars(args).items() if k not in ("sr", "sr_dir", "worst")}
    try:
        if bool(args.sr) == bool(args.sr_dir):
            raise ValueError("give either --sr_dir FOLDER or one or more --sr NAME=FOLDER")
        if args.sr:
            compare(parse_methods(args.sr), worst=args.worst, **opts)
        else:
            report(args.sr_dir, **opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"eval_report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
