"""Folder-level evaluation: per-image metrics, robustness statistics, JSON / Markdown / PNG reports.

Robustness follows NSARM: judge the worst cases, not only the mean. Per image, a perceptual
score averages the no-reference metrics CLIPIQA, MUSIQ / 100, MANIQA and TOPIQ (each divided by
its normaliser; the list is configurable). Its sorted curve is plotted, and images are counted
whose score falls below a fraction of the global mean: Deficient < 0.9 x mean, Poor < 0.75 x mean,
Collapse < 0.5 x mean (arsr's defaults, configurable; the counts are cumulative, a Collapse case
is also Poor and Deficient). The same counts, mean and variance are given per metric (mirrored,
> mean / fraction, for lower-is-better metrics). Without an HR folder (a no-reference test set
such as RP60) the full-reference metrics are skipped and listed as such.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from arsr.data.samples import IMAGE_EXTENSIONS, BadSample, image_tensor
from arsr.metrics import LearnedMetrics, psnr, ssim

LOWER_IS_BETTER = {"lpips", "dists", "niqe", "fid"}
LEVELS = {"deficient": 0.9, "poor": 0.75, "collapse": 0.5}
PERCEPTUAL = {"clipiqa": 1.0, "musiq": 100.0, "maniqa": 1.0, "topiq_nr": 1.0}  # metric -> divisor (NSARM)
FULL_REFERENCE = ("psnr_y", "ssim_y", "lpips", "dists", "fid")


def robustness(scores: list[float], lower_is_better: bool, levels: dict[str, float] = LEVELS) -> dict:
    x = np.asarray(scores, dtype=np.float64)
    mean = float(x.mean())
    out = {"mean": mean, "variance": float(x.var()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}
    for name, frac in levels.items():
        out[name] = int((x > mean / frac).sum()) if lower_is_better else int((x < mean * frac).sum())
    return out


def add_perceptual(per_image: dict[str, dict[str, float]], divisors: dict[str, float]) -> list[str]:
    """Adds ``perceptual`` = mean over the configured metrics of score / divisor to every image,
    using the configured metrics that every image has; returns them (empty: nothing added)."""
    used = [m for m in divisors if per_image and all(m in s for s in per_image.values())]
    for scores in per_image.values() if used else ():
        scores["perceptual"] = float(np.mean([scores[m] / divisors[m] for m in used]))
    return used


@dataclass
class Report:
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    metrics_skipped: dict[str, str] = field(default_factory=dict)
    fid: float | None = None
    conventions: dict[str, str] = field(default_factory=dict)
    levels: dict[str, float] = field(default_factory=lambda: dict(LEVELS))

    def summary(self) -> dict[str, dict]:
        names = sorted({m for scores in self.per_image.values() for m in scores})
        return {m: robustness([s[m] for s in self.per_image.values() if m in s], m in LOWER_IS_BETTER, self.levels)
                for m in names}

    def to_json(self) -> dict:
        return {"summary": self.summary(), "fid": self.fid, "per_image": self.per_image, "skipped_images": self.skipped,
                "skipped_metrics": self.metrics_skipped, "conventions": self.conventions}

    def to_markdown(self) -> str:
        s = self.summary()
        lines = ["# arsr evaluation", "", f"{len(self.per_image)} images evaluated, {len(self.skipped)} skipped.", ""]
        if "perceptual" in s:
            r = s["perceptual"]
            lines += ["## Robustness (perceptual score)", "", "| case | threshold | images |", "|---|---|---|"]
            lines += [f"| {k.capitalize()} | < {f} x mean = {f * r['mean']:.4f} | {r[k]} |" for k, f in self.levels.items()]
            lines += ["", f"mean {r['mean']:.4f}, variance {r['variance']:.4g}, n = {len(self.per_image)}", "",
                      "## Per metric", ""]
        levels = " | ".join(self.levels)
        lines += [f"| metric | mean | variance | min | max | {levels} |", "|---|---|---|---|---|" + "---|" * len(self.levels)]
        for m, r in s.items():
            arrow = "↓" if m in LOWER_IS_BETTER else "↑"
            counts = " | ".join(str(r[k]) for k in self.levels)
            lines.append(f"| {m} {arrow} | {r['mean']:.4f} | {r['variance']:.4g} | {r['min']:.4f} | {r['max']:.4f} | {counts} |")
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


def plot_perceptual_curve(report: Report, path: Path) -> None:
    """NSARM's robustness curve: per-image perceptual scores sorted from best to worst, the mean and
    the Deficient / Poor / Collapse thresholds as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = report.summary()["perceptual"]
    vals = sorted((v["perceptual"] for v in report.per_image.values()), reverse=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(range(1, len(vals) + 1), vals, marker="o" if len(vals) <= 60 else None, ms=3, label="perceptual score")
    ax.axhline(r["mean"], color="black", lw=1, label=f"mean {r['mean']:.3f}")
    for (name, frac), color in zip(report.levels.items(), ("tab:orange", "tab:red", "darkred", "purple", "gray")):
        ax.axhline(frac * r["mean"], color=color, ls="--", lw=1, label=f"{name.capitalize()} < {frac} x mean: {r[name]}")
    ax.set_xlabel("images, sorted by perceptual score")
    ax.set_ylabel("perceptual score")
    ax.set_title(report.conventions.get("perceptual", "perceptual score"), fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# How a local weights file reaches each pyiqa metric without any download. The full checkpoints
# of TOPIQ and MANIQA hold their backbones, so the backbones are built without pretrained weights.
PYIQA_LOCAL = {"clipiqa": "backbone", "topiq_nr": "pretrained_model_path", "maniqa": "pretrained_model_path"}


@contextmanager
def _timm_without_downloads():
    """MANIQA always asks timm for a pretrained ViT; its own checkpoint overwrites those weights."""
    import timm

    create = timm.create_model
    timm.create_model = lambda *a, **k: create(*a, **(k | {"pretrained": False}))
    try:
        yield
    finally:
        timm.create_model = create


def pyiqa_metric(name: str, weights: str | dict, device: str = "cpu") -> Callable[[Tensor], Tensor]:
    """A pyiqa no-reference metric from local files only. ``weights``: the local checkpoint path
    (for ``clipiqa`` the CLIP backbone file) or ``pyiqa.create_metric`` keyword arguments."""
    import pyiqa

    kwargs = dict(weights) if isinstance(weights, dict) else {PYIQA_LOCAL.get(name, "pretrained_model_path"): weights}
    for key in ("pretrained_model_path", "backbone"):
        if key in kwargs and not Path(kwargs[key]).is_file():
            raise FileNotFoundError(f"{name}: weights file {kwargs[key]} not found")
    if name.startswith("topiq"):
        kwargs.setdefault("backbone_pretrain", False)
    if name.startswith("maniqa"):
        with _timm_without_downloads():
            return pyiqa.create_metric(name, device=device, **kwargs)
    return pyiqa.create_metric(name, device=device, **kwargs)


def add_no_reference(metrics: LearnedMetrics, specs: dict[str, str | dict | Callable]) -> None:
    """Adds no-reference metrics to ``metrics``: a pyiqa name with a local weights spec (see
    ``pyiqa_metric``) or any callable (B, 3, H, W) in [0, 1] -> (B,) scores; failures are recorded
    as skipped with the reason."""
    for name, spec in specs.items():
        try:
            metrics.no_ref[name] = spec if callable(spec) else pyiqa_metric(name, spec, metrics.device)
            metrics.skipped.pop(name, None)
        except (FileNotFoundError, ImportError, RuntimeError, OSError) as e:
            metrics.skipped[name] = f"{type(e).__name__}: {e}"


def evaluate_folders(sr_dir: str, hr_dir: str | None = None, crop_border: int = 4, metrics: LearnedMetrics | None = None,
                     perceptual: dict[str, float] = PERCEPTUAL, levels: dict[str, float] = LEVELS) -> Report:
    """Score every ``sr_dir/<name>.*``: against ``hr_dir/<name>.*`` when an HR folder is given,
    with the no-reference metrics only otherwise.

    Args:
        perceptual: no-reference metric -> divisor; their per-image mean is the perceptual score.
        levels: case name -> fraction of the global mean below which an image counts.
    """
    sr_dir = Path(sr_dir)
    for d in (sr_dir, hr_dir):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"{d} is not a folder")
    metrics = metrics or LearnedMetrics()
    if hr_dir is None and not metrics.no_ref:
        raise ValueError(f"no HR folder and no no-reference metric for {sr_dir}: nothing to compute "
                         f"(give --hr_dir or local weights of a no-reference metric)")
    report = Report(metrics_skipped=dict(metrics.skipped), levels=dict(levels), conventions={
        "psnr_y / ssim_y": f"Y of BT.601 YCbCr (MATLAB rgb2ycbcr), 8-bit, crop_border={crop_border}, float64; "
                           "SSIM 11x11 Gaussian sigma 1.5, valid",
        "lpips / dists": "VGG backbones from local files; lower is better",
        "robustness": "Deficient / Poor / Collapse: score below " + ", ".join(f"{f} x" for f in levels.values())
                      + " the global mean (cumulative; mirrored for lower-is-better metrics)",
    })
    if hr_dir is None:
        for m in FULL_REFERENCE:
            report.metrics_skipped[m] = "no HR folder (no-reference evaluation)"
    hr_files = {p.stem: p for p in Path(hr_dir).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS} if hr_dir else {}
    for sr_path in sorted(p for p in sr_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        name = sr_path.stem
        if hr_dir is not None and name not in hr_files:
            report.skipped[name] = f"no HR image named {name}.* in {hr_dir}"
            continue
        try:
            sr = image_tensor(sr_path.read_bytes())[None]
            hr = image_tensor(hr_files[name].read_bytes())[None] if hr_dir is not None else None
        except BadSample as e:
            report.skipped[name] = str(e)
            continue
        scores = {}
        if hr is not None:
            if sr.shape != hr.shape:
                report.skipped[name] = f"SR {tuple(sr.shape[-2:])} and HR {tuple(hr.shape[-2:])} differ in size"
                continue
            scores = {"psnr_y": float(psnr(sr, hr, crop_border)[0]), "ssim_y": float(ssim(sr, hr, crop_border)[0])}
        scores |= {k: float(v[0]) for k, v in metrics.update(sr, hr).items()}
        report.per_image[name] = scores
    if not report.per_image:
        raise ValueError(f"no image of {sr_dir} could be evaluated: {report.skipped}")
    report.fid = metrics.compute_fid() if hr_dir is not None else None
    used = add_perceptual(report.per_image, perceptual)
    if used:
        report.conventions["perceptual"] = "perceptual = mean(" + ", ".join(
            m if perceptual[m] == 1 else f"{m}/{perceptual[m]:g}" for m in used) + ")"
    else:
        report.metrics_skipped["perceptual"] = f"none of {', '.join(perceptual)} was computed"
    return report


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """report.json, report.md, sorted_scores.png (every metric) and, with a perceptual score,
    perceptual_curve.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "sorted_scores.png"}
    paths["json"].write_text(json.dumps(report.to_json(), indent=2))
    paths["markdown"].write_text(report.to_markdown())
    plot_sorted_scores(report, paths["plot"])
    if any("perceptual" in s for s in report.per_image.values()):
        paths["curve"] = out / "perceptual_curve.png"
        plot_perceptual_curve(report, paths["curve"])
    return paths
