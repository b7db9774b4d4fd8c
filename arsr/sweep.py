"""Sweeps and ablations over any ``arsr fit`` override: a grid or an Optuna random search, one run
folder per point, resumable, with a summary table and plot of the chosen validation metrics.

    python tools/sweep.py --config recipes/quickstart.yaml --out_dir sweeps/posenc \\
        --grid model.init_args.transformer.init_args.pos_enc=arsr.components.posenc.SARoPE,arsr.components.posenc.AbsolutePerScale \\
        --trainer.max_steps 200                               # any other flag: a fixed override of every point

Each point's config is resolved once (``arsr fit --print_config`` with the base config, the fixed
overrides, the point's values and ``seed_everything``) and rewritten so that its logs go to
``<out_dir>/<point>/`` (logger ``save_dir`` = out_dir, logger ``name`` = point) and every checkpoint
callback with an explicit ``dirpath`` writes to ``<out_dir>/<point>/checkpoints``; it is saved as
``<out_dir>/<point>/sweep_config.yaml`` and run as ``arsr fit --config <that> --ckpt_path last``
(an interrupted point resumes from its last checkpoint). A finished point holds ``done.json``
(its overrides, seconds, final metrics) and is skipped on the next call with the same values.
Metrics are the last logged value of each TensorBoard scalar (``val/*`` unless ``--metrics``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

import yaml


@dataclass
class Point:
    """One run of the sweep: its folder name and its override values (dotted key -> CLI value)."""

    name: str
    values: dict[str, str]
    status: str = "pending"
    seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def short_key(key: str) -> str:
    """``model.init_args.transformer.init_args.pos_enc`` -> ``pos_enc``."""
    return [p for p in key.split(".") if p != "init_args"][-1]


def short_value(value: str) -> str:
    """A class path's class name, any other value as given; characters safe for a folder name."""
    v = value.rsplit(".", 1)[-1] if re.fullmatch(r"[A-Za-z_][\w.]*\.[A-Z]\w*", value) else value
    return re.sub(r"[^\w.+-]", "_", v)[:40]


def point_name(index: int, values: dict[str, str]) -> str:
    return f"p{index:03d}-" + "-".join(f"{short_key(k)}={short_value(v)}" for k, v in values.items())


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["key=a,b", ...]`` -> ``{key: [a, b]}``; a value list in brackets (``key=[1, 2]``) is one value."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--")
        if not sep or not key or not values:
            raise ValueError(f"--grid {item!r}: expected key=value1,value2,...")
        if key in grid:
            raise ValueError(f"--grid: {key} given twice")
        grid[key] = [values] if values.strip().startswith(("[", "{")) else [v.strip() for v in values.split(",")]
    return grid


def parse_ranges(items: list[str]) -> dict[str, tuple[float, float, bool, bool]]:
    """``["key=lo:hi[:log]", ...]`` -> ``{key: (lo, hi, log, integer)}`` (integer when both ends are)."""
    ranges = {}
    for item in items:
        key, sep, spec = item.partition("=")
        parts = spec.split(":")
        if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "log"):
            raise ValueError(f"--range {item!r}: expected key=low:high or key=low:high:log")
        integer = all(re.fullmatch(r"-?\d+", p) for p in parts[:2])
        ranges[key.removeprefix("--")] = (float(parts[0]), float(parts[1]), len(parts) == 3, integer)
    return ranges


def grid_points(grid: dict[str, list[str]]) -> list[Point]:
    """The Cartesian product, the last key varying fastest."""
    combos = itertools.product(*grid.values())
    return [Point(point_name(i, dict(zip(grid, c))), dict(zip(grid, c))) for i, c in enumerate(combos)]


def random_points(n: int, grid: dict[str, list[str]], ranges: dict[str, tuple], seed: int) -> list[Point]:
    """``n`` distinct points drawn by Optuna's RandomSampler (seeded): categorical over the grid
    values, uniform / log-uniform over the ranges. The same seed draws the same points."""
    try:
        import optuna
    except ImportError as e:
        raise ImportError("--random needs optuna: pip install -e '.[sweep]'") from e
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {k: optuna.distributions.CategoricalDistribution(v) for k, v in grid.items()}
    for k, (lo, hi, log, integer) in ranges.items():
        dists[k] = (optuna.distributions.IntDistribution(int(lo), int(hi), log=log) if integer
                    else optuna.distributions.FloatDistribution(lo, hi, log=log))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points: list[Point] = []
    seen: set[tuple] = set()
    for _ in range(100 * n):
        if len(points) == n:
            break
        values = {k: f"{v:.6g}" if isinstance(v, float) else str(v) for k, v in study.ask(dists).params.items()}
        if tuple(values.values()) not in seen:
            seen.add(tuple(values.values()))
            points.append(Point(point_name(len(points), values), values))
    return points


def _cli(args: list[str]) -> tuple[int, str, str]:
    """``arsr <args>`` in this process -> (exit code, stdout, stderr)."""
    from arsr.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def resolve_config(configs: list[str], fixed: list[str], point: Point, seed: int, out_dir: Path) -> dict:
    """The point's full fit config, with its logs and checkpoints moved into ``out_dir/<point>``."""
    args = ["fit"] + [a for c in configs for a in ("--config", c)] + fixed
    args += [a for k, v in point.values.items() for a in (f"--{k}", v)] + ["--seed_everything", str(seed), "--print_config"]
    code, out, err = _cli(args)
    if code != 0:
        raise ValueError(f"{point.name}: {err.strip().splitlines()[-1] if err.strip() else 'arsr fit --print_config failed'}")
    cfg = yaml.safe_load(out)
    here = out_dir / point.name
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = str(here)
    logger = trainer.get("logger")
    for lg in logger if isinstance(logger, list) else [logger] if isinstance(logger, dict) else []:
        args_ = lg.setdefault("init_args", {})
        if "save_dir" in args_:
            args_["save_dir"], args_["name"] = str(out_dir), point.name
    for cb in trainer.get("callbacks") or []:
        if isinstance(cb, dict) and (cb.get("init_args") or {}).get("dirpath"):
            cb["init_args"]["dirpath"] = str(here / "checkpoints")
    return cfg


def read_scalars(folder: Path) -> dict[str, tuple[int, float]]:
    """tag -> (step, value) of the last logged value of every TensorBoard scalar under ``folder``
    (every event file, so a resumed run's later versions win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    last: dict[str, tuple[int, float, float]] = {}
    for d in sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                if tag not in last or (e.step, e.wall_time) >= last[tag][:2]:
                    last[tag] = (e.step, e.wall_time, e.value)
    return {tag: (step, value) for tag, (step, _, value) in last.items()}


def pick_metrics(scalars: dict[str, tuple[int, float]], wanted: list[str] | None) -> dict[str, float]:
    tags = wanted if wanted else sorted(t for t in scalars if t.startswith("val/"))
    return {t: float(scalars[t][1]) for t in tags if t in scalars}


def run_point(point: Point, cfg_path: Path, log_path: Path, in_process: bool, device: str | None) -> int:
    """``arsr fit --config <cfg> --ckpt_path last``, output to ``log_path``; returns the exit code."""
    args = ["fit", "--config", str(cfg_path), "--ckpt_path", "last"]
    if in_process:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            from arsr.cli import main

            try:
                return main(args)
            except Exception as e:  # noqa: BLE001  (a crashing point fails alone; the sweep goes on)
                print(f"sweep: {type(e).__name__}: {e}", file=log)
                return 1
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": device} if device is not None else {})
    with open(log_path, "w") as log:
        return subprocess.run([sys.executable, "-m", "arsr", *args], stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def sweep(configs: list[str], out_dir: str | Path, grid: dict[str, list[str]], fixed: list[str] | None = None,
          ranges: dict[str, tuple] | None = None, random: int = 0, seed: int = 0, metrics: list[str] | None = None,
          spread_gpus: bool = False, in_process: bool = False, log=print) -> list[Point]:
    """Runs every point not yet done, then writes ``summary.csv``, ``summary.md`` and ``summary.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fixed = list(fixed or [])
    if random:
        points = random_points(random, grid, ranges or {}, seed)
    elif ranges:
        raise ValueError("--range needs --random N (a grid takes explicit values)")
    else:
        points = grid_points(grid)
    if not points or not (grid or ranges):
        raise ValueError("nothing to sweep: give --grid key=a,b (and/or --range with --random N)")
    (out / "sweep.json").write_text(json.dumps({"configs": configs, "fixed": fixed, "seed": seed, "random": random,
                                                "grid": grid, "ranges": ranges or {},
                                                "points": {p.name: p.values for p in points}}, indent=1))
    todo = []
    for p in points:
        done = out / p.name / "done.json"
        if done.is_file() and json.loads(done.read_text()).get("values") == p.values:
            rec = json.loads(done.read_text())
            p.status, p.seconds, p.metrics = "done (earlier)", rec["seconds"], rec["metrics"]
            log(f"sweep: {p.name}: done earlier, skipped")
        else:
            todo.append(p)
    for p in todo:  # resolve every config first: a wrong key fails before any training
        (out / p.name).mkdir(exist_ok=True)
        cfg = resolve_config(configs, fixed, p, seed, out)
        (out / p.name / "sweep_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    devices: Queue = Queue()
    gpus = visible_gpus() if spread_gpus else []
    if spread_gpus and not gpus:
        raise ValueError("--spread_gpus: no CUDA device is visible")
    for d in gpus or [None]:
        devices.put(d)

    def work(p: Point) -> Point:
        device = devices.get()
        try:
            log(f"sweep: {p.name}: running" + (f" on CUDA device {device}" if device is not None else ""))
            start = time.perf_counter()
            code = run_point(p, out / p.name / "sweep_config.yaml", out / p.name / "log.txt", in_process and device is None, device)
            p.seconds = time.perf_counter() - start
            p.metrics = pick_metrics(read_scalars(out / p.name), metrics)
            if code == 0:
                p.status = "done"
                (out / p.name / "done.json").write_text(json.dumps(
                    {"values": p.values, "seconds": p.seconds, "metrics": p.metrics}, indent=1))
            else:
                p.status = f"failed (exit {code}, see {out / p.name / 'log.txt'})"
            log(f"sweep: {p.name}: {p.status} in {p.seconds:.1f}s")
            return p
        finally:
            devices.put(device)

    with ThreadPoolExecutor(max(len(gpus), 1)) as pool:
        list(pool.map(work, todo))
    write_summary(points, out, metrics)
    return points


def write_summary(points: list[Point], out: Path, wanted: list[str] | None) -> dict[str, Path]:
    """summary.csv, summary.md (one row per point: its values, status, seconds, metrics) and
    summary.png (one bar panel per metric)."""
    keys = list(dict.fromkeys(k for p in points for k in p.values))
    tags = wanted or sorted({t for p in points for t in p.metrics})
    rows = [{"point": p.name, **{short_key(k): p.values.get(k, "") for k in keys}, "status": p.status,
             "seconds": f"{p.seconds:.1f}" if p.seconds is not None else "",
             **{t: f"{p.metrics[t]:.6g}" if t in p.metrics else "" for t in tags}} for p in points]
    paths = {"csv": out / "summary.csv", "markdown": out / "summary.md", "plot": out / "summary.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols, short = list(rows[0]), {short_key(k) for k in keys}
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(short_value(r[c]) if c in short else str(r[c]) for c in cols) + " |" for r in rows]
    paths["markdown"].write_text("\n".join(md) + "\n")
    plot_summary(points, tags, paths["plot"])
    return paths


def plot_summary(points: list[Point], tags: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = tags or ["(no metric)"]
    fig, axes = plt.subplots(len(tags), 1, figsize=(max(6.4, 0.9 * len(points)), 2.8 * len(tags)), dpi=100, squeeze=False)
    labels = [p.name.split("-", 1)[-1].replace("-", "\n") for p in points]
    for ax, tag in zip(axes[:, 0], tags):
        vals = [p.metrics.get(tag, float("nan")) for p in points]
        bars = ax.bar(range(len(points)), vals, color="tab:blue")
        ax.bar_label(bars, fmt="%.4g", fontsize=7)
        ax.set_xticks(range(len(points)), labels, fontsize=7)
        ax.set_ylabel(tag)
        ax.set_title(f"{tag} at the end of each run", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="arsr-sweep", description=__doc__.split("\n\n")[0],
        epilog="Every other option is a fixed override passed to each point's arsr fit (e.g. --trainer.max_steps 200).")
    parser.add_argument("--config", action="append", required=True, help="base config (repeatable, as arsr fit --config)")
    parser.add_argument("--out_dir", required=True, help="the sweep folder: one run folder per point, summaries")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="values of one override key; several --grid multiply (with --random: categorical choices)")
    parser.add_argument("--range", action="append", default=[], metavar="KEY=LOW:HIGH[:log]",
                        help="a numeric range for --random (integer when both ends are)")
    parser.add_argument("--random", type=int, default=0, metavar="N", help="N points drawn by Optuna's random sampler instead of the grid")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything of every point and the sampler's seed")
    parser.add_argument("--metrics", default=None, help="comma-separated scalar tags to summarise (default: every val/* tag)")
    parser.add_argument("--spread_gpus", action="store_true", help="run points in parallel, one per visible CUDA device")
    parser.add_argument("--in_process", action="store_true", help="run points in this process (no start-up per point; CPU sweeps)")
    args, fixed = parser.parse_known_args(argv)
    try:
        points = sweep(args.config, args.out_dir, parse_grid(args.grid), fixed, parse_ranges(args.range), args.random, args.seed,
                       args.metrics.split(",") if args.metrics else None, args.spread_gpus, args.in_process)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"arsr-sweep: error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out_dir) / "summary.md").read_text())
    print(f"wrote {args.out_dir}/summary.csv, summary.md, summary.png")
    return 0 if all(p.status.startswith("done") for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
