"""Folder-level evaluation: per-image metrics, robustness statistics, JSON / Markdown / PNG reports.

Robustness follows NSARM's idea of judging the worst cases, not only the mean: per metric the
variance over images, and counts of images whose score falls far below the global mean. The
thresholds are fractions of the mean (arsr's defaults; the NSARM reference facts were not
available): Deficient < 0.9 x mean, Poor < 0.75 x mean, Collapse < 0.5 x mean for
higher-is-better metrics, and the mirror (> mean / fraction) for lower-is-better ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from arsr.data.samples import IMAGE_EXTENSIONS, BadSample, image_tensor
from arsr.metrics import LearnedMetrics, psnr, ssim

LOWER_IS_BETTER = {"lpips", "dists", "niqe", "fid"}
LEVELS = {"deficient": 0.9, "poor": 0.75, "collapse": 0.5}


def robustness(scores: list[float], lower_is_better: bool, levels: dict[str, float] = LEVELS) -> dict:
    x = np.asarray(scores, dtype=np.float64)
    mean = float(x.mean())
    out = {"mean": mean, "variance": float(x.var()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}
    for name, frac in levels.items():
        out[name] = int((x > mean / frac).sum()) if lower_is_better else int((x < mean * frac).sum())
    return out


@dataclass
class Report:
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    metrics_skipped: dict[str, str] = field(default_factory=dict)
    fid: float | None = None
    conventions: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, dict]:
        names = sorted({m for scores in self.per_image.values() for m in scores})
        return {m: robustness([s[m] for s in self.per_image.values() if m in s], m in LOWER_IS_BETTER) for m in names}

    def to_json(self) -> dict:
        return {"summary": self.summary(), "fid": self.fid, "per_image": self.per_image, "skipped_images": self.skipped,
                "skipped_metrics": self.metrics_skipped, "conventions": self.conventions}

    def to_markdown(self) -> str:
        s = self.summary()
        lines = ["# arsr evaluation", "", f"{len(self.per_image)} images evaluated, {len(self.skipped)} skipped.", ""]
        lines += ["| metric | mean | variance | min | max | deficient | poor | collapse |", "|---|---|---|---|---|---|---|---|"]
        for m, r in s.items():
            arrow = "↓" if m in LOWER_IS_BETTER else "↑"
            lines.append(f"| {m} {arrow} | {r['mean']:.4f} | {r['variance']:.4g} | {r['min']:.4f} | {r['max']:.4f} | "
                         f"{r['deficient']} | {r['poor']} | {r['collapse']} |")
        if self.fid is not None:
            lines += ["", f"FID: {self.fid:.3f}"]
        lines += ["", "Conventions:"] + [f"- {k}: {v}" for k, v in self.conventions.items()]
        if self.metrics_skipped:
            lines += ["", "Metrics not computed:"] + [f"- {k}: {v}" for k, v in self.metrics_skipped.items()]
        if self.skipped:
            lines += ["", "Images skipped:"] + [f"- {k}: {v}" for k, v in self.skipped.items()]
        return "\n".join(lines) + "\n"


def plot_sorted_scores(report: Report, path: Path, size: tuple[int, int] = (640, 360)) -> None:
    """One panel per metric: scores sorted from best to worst, with the mean as a dashed line."""
    s = report.summary()
    metrics = list(s)
    w, h = size
    panel_h = h
    img = Image.new("RGB", (w, panel_h * max(len(metrics), 1)), "white")
    draw = ImageDraw.Draw(img)
    for i, m in enumerate(metrics):
        vals = sorted((v[m] for v in report.per_image.values() if m in v), reverse=m not in LOWER_IS_BETTER)
        top, left, right, bottom = i * panel_h + 24, 50, w - 10, (i + 1) * panel_h - 20
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1
        y = lambda v: bottom - (v - lo) / (hi - lo) * (bottom - top)
        x = lambda k: left + k / max(len(vals) - 1, 1) * (right - left)
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, top - 18), f"{m} sorted per image (n={len(vals)}), mean {s[m]['mean']:.3f}", fill="black")
        draw.text((2, top), f"{hi:.3g}", fill="black")
        draw.text((2, bottom - 10), f"{lo:.3g}", fill="black")
        draw.line([(x(k), y(v)) for k, v in enumerate(vals)] if len(vals) > 1 else [(left, y(vals[0])), (right, y(vals[0]))], fill="blue", width=2)
        ym = y(s[m]["mean"])
        for xs in range(left, right, 12):
            draw.line([(xs, ym), (min(xs + 6, right), ym)], fill="red")
    img.save(path)


def evaluate_folders(sr_dir: str, hr_dir: str, crop_border: int = 4, metrics: LearnedMetrics | None = None) -> Report:
    """Pair ``sr_dir/<name>.*`` with ``hr_dir/<name>.*`` and score every pair."""
    sr_dir, hr_dir = Path(sr_dir), Path(hr_dir)
    for d in (sr_dir, hr_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is not a folder")
    metrics = metrics or LearnedMetrics()
    report = Report(metrics_skipped=dict(metrics.skipped), conventions={
        "psnr_y / ssim_y": f"Y of BT.601 YCbCr (MATLAB rgb2ycbcr), 8-bit, crop_border={crop_border}, float64; "
                           "SSIM 11x11 Gaussian sigma 1.5, valid",
        "lpips / dists": "VGG backbones from local files; lower is better",
    })
    hr_files = {p.stem: p for p in hr_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    for sr_path in sorted(p for p in sr_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        name = sr_path.stem
        if name not in hr_files:
            report.skipped[name] = f"no HR image named {name}.* in {hr_dir}"
            continue
        try:
            sr, hr = image_tensor(sr_path.read_bytes())[None], image_tensor(hr_files[name].read_bytes())[None]
        except BadSample as e:
            report.skipped[name] = str(e)
            continue
        if sr.shape != hr.shape:
            report.skipped[name] = f"SR {tuple(sr.shape[-2:])} and HR {tuple(hr.shape[-2:])} differ in size"
            continue
        scores = {"psnr_y": float(psnr(sr, hr, crop_border)[0]), "ssim_y": float(ssim(sr, hr, crop_border)[0])}
        scores |= {k: float(v[0]) for k, v in metrics.update(sr, hr).items()}
        report.per_image[name] = scores
    if not report.per_image:
        raise ValueError(f"no SR/HR pairs could be evaluated between {sr_dir} and {hr_dir}: {report.skipped}")
    report.fid = metrics.compute_fid()
    return report


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "sorted_scores.png"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2))
    paths["markdown"].write_text(report.to_markdown())
    plot_sorted_scores(report, paths["plot"])
    return paths
