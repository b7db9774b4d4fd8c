"""Folder-level evaluation: per-image metrics, robustness statistics, JSON / Markdown / PNG reports.

Robustness follows NSARM: judge the worst cases, not only the mean. Per image, a perceptual
score averages the no-reference metrics CLIPIQA, MUSIQ / 100, MANIQA and TOPIQ (each divided by
its normaliser; the list is configurable). Its sorted curve is plotted, and images are counted
whose score falls below a fraction of the global mean: Deficient < 0.9 x mean, Poor < 0.75 x mean,
Collapse < 0.5 x mean (arsr's defaults, configurable; the counts are cumulative, a Collapse case
is also Poor and Deficient). The same counts, mean and variance are given per metric (mirrored,
> mean / fraction, for lower-is-better metrics). Without an HR folder (a no-reference test set
such as RP60) the full-reference metrics are skipped and listed as such.

Comparisons (``compare_methods``) evaluate several SR folders (methods) on one dataset and count
each method's cases against the *global* mean of the metric over all compared methods, as NSARM
defines them (its Eq. 7 constants did not survive in the text: the thresholds are configurable,
0.9 / 0.75 / 0.5 by default); they write per-method tables (Markdown, CSV, JSON) and figures:
sorted per-image curves overlaid with the thresholds, per-metric distributions, worst cases.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from arsr.data.samples import IMAGE_EXTENSIONS, BadSample, image_tensor
from arsr.metrics import LearnedMetrics, psnr, ssim

LOWER_IS_BETTER = {"lpips", "dists", "niqe", "fid"}
LEVELS = {"deficient": 0.9, "poor": 0.75, "collapse": 0.5}
PERCEPTUAL = {"clipiqa": 1.0, "musiq": 100.0, "maniqa": 1.0, "topiq_nr": 1.0}  # metric -> divisor (NSARM)
FULL_REFERENCE = ("psnr_y", "ssim_y", "lpips", "dists", "fid")


def robustness(scores: list[float], lower_is_better: bool, levels: dict[str, float] = LEVELS,
               reference: float | None = None) -> dict:
    """Mean, variance, std, min, max and, per case, how many scores fall below ``fraction x reference``
    (above ``reference / fraction`` when lower is better); ``reference`` defaults to the scores' own mean
    (a comparison passes the global mean over all methods)."""
    x = np.asarray(scores, dtype=np.float64)
    mean = float(x.mean())
    ref = mean if reference is None else reference
    out = {"n": int(x.size), "mean": mean, "variance": float(x.var()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}
    for name, frac in levels.items():
        out[name] = int((x > ref / frac).sum()) if lower_is_better else int((x < ref * frac).sum())
    return out


def thresholds(reference: float, lower_is_better: bool, levels: dict[str, float]) -> dict[str, float]:
    """Case -> the score beyond which an image counts."""
    return {k: reference / f if lower_is_better else reference * f for k, f in levels.items()}


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
    files: dict[str, str] = field(default_factory=dict)  # image name -> SR file
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


CASE_COLORS = ("tab:orange", "tab:red", "darkred", "purple", "gray")


def plot_sorted_curves(reports: dict[str, Report], path: Path, metrics: list[str], means: dict[str, float],
                       levels: dict[str, float], panel: tuple[float, float] = (6.4, 3.6)) -> None:
    """One panel per metric: each method's per-image scores sorted from best to worst (overlaid),
    the global mean and the case thresholds as horizontal lines. ``panel`` in inches at 100 dpi."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(panel[0], panel[1] * len(metrics)), dpi=100, squeeze=False)
    for ax, m in zip(axes[:, 0], metrics):
        low = m in LOWER_IS_BETTER
        for method, rep in reports.items():
            vals = sorted((v[m] for v in rep.per_image.values() if m in v), reverse=not low)
            if vals:
                ax.plot(range(1, len(vals) + 1), vals, marker="o" if len(vals) <= 60 else None, ms=3, label=method)
        ax.axhline(means[m], color="black", lw=1, label=f"global mean {means[m]:.4g}")
        for (case, t), color in zip(thresholds(means[m], low, levels).items(), CASE_COLORS):
            ax.axhline(t, color=color, ls="--", lw=1, label=f"{case.capitalize()} {'>' if low else '<'} {t:.4g}")
        ax.set_title(f"{m} ({'lower' if low else 'higher'} is better), sorted best to worst", fontsize=9)
        ax.set_xlabel("image rank")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_perceptual_curve(report: Report, path: Path) -> None:
    """NSARM's robustness curve: per-image perceptual scores sorted from best to worst, the mean and
    the Deficient / Poor / Collapse thresholds as horizontal lines."""
    plt = _pyplot()

    r = report.summary()["perceptual"]
    vals = sorted((v["perceptual"] for v in report.per_image.values()), reverse=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(range(1, len(vals) + 1), vals, marker="o" if len(vals) <= 60 else None, ms=3, label="perceptual score")
    ax.axhline(r["mean"], color="black", lw=1, label=f"mean {r['mean']:.3f}")
    for (name, frac), color in zip(report.levels.items(), CASE_COLORS):
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
                     perceptual: dict[str, float] = PERCEPTUAL, levels: dict[str, float] = LEVELS,
                     progress: bool = True, desc: str | None = None) -> Report:
    """Score every ``sr_dir/<name>.*``: against ``hr_dir/<name>.*`` when an HR folder is given,
    with the no-reference metrics only otherwise.

    Args:
        perceptual: no-reference metric -> divisor; their per-image mean is the perceptual score.
        levels: case name -> fraction of the global mean below which an image counts.
        progress: a progress bar (stderr), labelled ``desc`` (default: the folder).
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
    sr_files = sorted(p for p in sr_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    for sr_path in tqdm(sr_files, desc=desc or str(sr_dir), unit="img", disable=not progress):
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
        report.files[name] = str(sr_path)
    if not report.per_image:
        raise ValueError(f"no image of {sr_dir} could be evaluated: {report.skipped}")
    report.fid = metrics.compute_fid() if hr_dir is not None else None
    if metrics.fid is not None:
        metrics.fid.reset()  # the next folder starts its own FID
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
    s = report.summary()
    plot_sorted_curves({"SR": report}, paths["plot"], list(s), {m: r["mean"] for m, r in s.items()}, report.levels)
    if any("perceptual" in s for s in report.per_image.values()):
        paths["curve"] = out / "perceptual_curve.png"
        plot_perceptual_curve(report, paths["curve"])
    return paths


@dataclass
class Comparison:
    """Several methods' reports on one dataset; cases are counted against each metric's global mean
    (all images of all methods pooled)."""

    reports: dict[str, Report]
    hr_dir: str | None = None
    levels: dict[str, float] = field(default_factory=lambda: dict(LEVELS))

    def metrics(self) -> list[str]:
        """Per-image metrics of any method, the perceptual score first."""
        names = sorted({m for r in self.reports.values() for s in r.per_image.values() for m in s})
        return sorted(names, key=lambda m: m != "perceptual")

    def global_means(self) -> dict[str, float]:
        return {m: float(np.mean([s[m] for r in self.reports.values() for s in r.per_image.values() if m in s]))
                for m in self.metrics()}

    def summary(self) -> dict[str, dict[str, dict]]:
        """method -> metric -> ``robustness`` against the global mean (+ ``global_mean``)."""
        means = self.global_means()
        out: dict[str, dict[str, dict]] = {}
        for method, rep in self.reports.items():
            out[method] = {}
            for m in self.metrics():
                vals = [s[m] for s in rep.per_image.values() if m in s]
                if vals:
                    out[method][m] = robustness(vals, m in LOWER_IS_BETTER, self.levels, means[m]) | {"global_mean": means[m]}
        return out

    def key_metric(self) -> str:
        """The metric that ranks worst cases: the perceptual score, else PSNR-Y, else the first."""
        ms = self.metrics()
        return next((m for m in ("perceptual", "psnr_y") if m in ms), ms[0])

    def worst(self, method: str, k: int) -> list[tuple[str, float]]:
        m = self.key_metric()
        scores = [(name, s[m]) for name, s in self.reports[method].per_image.items() if m in s]
        return sorted(scores, key=lambda t: t[1], reverse=m in LOWER_IS_BETTER)[:k]

    def to_json(self) -> dict:
        return {"hr_dir": self.hr_dir, "levels": self.levels, "global_means": self.global_means(), "summary": self.summary(),
                "fid": {k: r.fid for k, r in self.reports.items()}, "methods": {k: r.to_json() for k, r in self.reports.items()}}

    def csv_rows(self) -> list[dict]:
        return [{"method": method, "metric": m, **r} for method, per in self.summary().items() for m, r in per.items()]

    def to_markdown(self) -> str:
        s, means, ms = self.summary(), self.global_means(), self.metrics()
        arrow = lambda m: "↓" if m in LOWER_IS_BETTER else "↑"
        lines = ["# arsr comparison", "",
                 f"{len(self.reports)} methods against {self.hr_dir or 'no HR folder (no-reference metrics only)'}.", "",
                 "## Mean (variance) per metric", "",
                 "| method | images | " + " | ".join(f"{m} {arrow(m)}" for m in ms) + (" | FID ↓ |" if self._has_fid() else " |"),
                 "|---|---|" + "---|" * (len(ms) + self._has_fid())]
        for method, rep in self.reports.items():
            cells = [f"{s[method][m]['mean']:.4f} ({s[method][m]['variance']:.3g})" if m in s[method] else "-" for m in ms]
            fid = [f"{rep.fid:.3f}" if rep.fid is not None else "-"] if self._has_fid() else []
            lines.append(f"| {method} | {len(rep.per_image)} | " + " | ".join(cells + fid) + " |")
        lines += ["", "## Robustness against the global mean", "",
                  "Cases per method: " + ", ".join(f"{k.capitalize()} = below {f} x the global mean" for k, f in self.levels.items())
                  + " of the metric over all compared methods (above mean / fraction for lower-is-better metrics; cumulative).", ""]
        for m in ms:
            t = thresholds(means[m], m in LOWER_IS_BETTER, self.levels)
            sign = ">" if m in LOWER_IS_BETTER else "<"
            lines += [f"### {m} {arrow(m)}: global mean {means[m]:.4f}", "",
                      "| method | n | " + " | ".join(f"{k.capitalize()} ({sign} {v:.4g})" for k, v in t.items()) + " |",
                      "|---|---|" + "---|" * len(t)]
            lines += [f"| {method} | {s[method][m]['n']} | " + " | ".join(str(s[method][m][k]) for k in t) + " |"
                      for method in self.reports if m in s[method]]
            lines.append("")
        first = next(iter(self.reports.values()))
        lines += ["Conventions:"] + [f"- {k}: {v}" for k, v in first.conventions.items() if k != "robustness"]
        skipped_metrics = {k: v for r in self.reports.values() for k, v in r.metrics_skipped.items()}
        if skipped_metrics:
            lines += ["", "Metrics not computed:"] + [f"- {k}: {v}" for k, v in skipped_metrics.items()]
        for method, rep in self.reports.items():
            if rep.skipped:
                lines += ["", f"Images skipped ({method}):"] + [f"- {k}: {v}" for k, v in rep.skipped.items()]
        return "\n".join(lines) + "\n"

    def _has_fid(self) -> bool:
        return any(r.fid is not None for r in self.reports.values())


def compare_methods(methods: dict[str, str], hr_dir: str | None = None, crop_border: int = 4,
                    metrics: LearnedMetrics | None = None, perceptual: dict[str, float] = PERCEPTUAL,
                    levels: dict[str, float] = LEVELS, progress: bool = True) -> Comparison:
    """Evaluate each method's SR folder (``name -> folder``) against one HR folder, or with the
    no-reference metrics only when ``hr_dir`` is None; one progress bar per method."""
    if not methods:
        raise ValueError("no method to compare: give at least one name=folder")
    metrics = metrics or LearnedMetrics()
    reports = {name: evaluate_folders(d, hr_dir, crop_border, metrics, perceptual, levels, progress, desc=name)
               for name, d in methods.items()}
    return Comparison(reports, hr_dir, dict(levels))


def plot_distributions(cmp: Comparison, path: Path, panel: tuple[float, float] = (6.4, 3.2)) -> None:
    """One panel per metric: a violin (where a method has two or more distinct scores) and a box per method."""
    plt = _pyplot()
    ms, names = cmp.metrics(), list(cmp.reports)
    fig, axes = plt.subplots(len(ms), 1, figsize=(max(panel[0], 1.2 * len(names)), panel[1] * len(ms)), dpi=100, squeeze=False)
    for ax, m in zip(axes[:, 0], ms):
        data = [[s[m] for s in cmp.reports[k].per_image.values() if m in s] for k in names]
        pos = [i + 1 for i, d in enumerate(data) if len(set(d)) > 1]
        if pos:
            ax.violinplot([data[p - 1] for p in pos], positions=pos, showextrema=False)
        ax.boxplot(data, positions=range(1, len(names) + 1), widths=0.25)
        ax.set_xticks(range(1, len(names) + 1), names)
        ax.axhline(cmp.global_means()[m], color="black", lw=1, ls=":", label="global mean")
        ax.set_ylabel(m)
        ax.set_title(f"{m} per image ({'lower' if m in LOWER_IS_BETTER else 'higher'} is better)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_worst_cases(cmp: Comparison, path: Path, k: int = 4, thumb: int = 192) -> None:
    """A grid: one row per method, its ``k`` worst images by the key metric (perceptual score, else
    PSNR-Y), each titled with its name and score."""
    plt = _pyplot()
    m, names = cmp.key_metric(), list(cmp.reports)
    cols = max(min(k, max(len(r.per_image) for r in cmp.reports.values())), 1)
    fig, axes = plt.subplots(len(names), cols, figsize=(2.2 * cols, 2.4 * len(names)), dpi=100, squeeze=False)
    for row, method in zip(axes, names):
        worst = cmp.worst(method, cols)
        for j, ax in enumerate(row):
            ax.axis("off")
            if j < len(worst):
                name, score = worst[j]
                with Image.open(cmp.reports[method].files[name]) as im:
                    im = im.convert("RGB")
                    im.thumbnail((thumb, thumb))
                    ax.imshow(np.asarray(im))
                ax.set_title(f"{name}\n{m} {score:.4g}", fontsize=7)
        row[0].text(-0.08, 0.5, method, transform=row[0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    fig.suptitle(f"worst {cols} per method by {m}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_comparison(cmp: Comparison, out_dir: str | Path, worst: int = 4) -> dict[str, Path]:
    """comparison.json, comparison.md, comparison.csv (one row per method and metric) and the figures
    sorted_curves.png, distributions.png, worst_cases.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "comparison.json", "markdown": out / "comparison.md", "csv": out / "comparison.csv",
             "curves": out / "sorted_curves.png", "distributions": out / "distributions.png", "worst": out / "worst_cases.png"}
    paths["json"].write_text(json.dumps(cmp.to_json(), indent=2))
    paths["markdown"].write_text(cmp.to_markdown())
    rows = cmp.csv_rows()
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_sorted_curves(cmp.reports, paths["curves"], cmp.metrics(), cmp.global_means(), cmp.levels)
    plot_distributions(cmp, paths["distributions"])
    plot_worst_cases(cmp, paths["worst"], worst)
    return paths
