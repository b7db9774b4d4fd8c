"""``arsr``: LightningCLI with arsr's defaults, one folder per run and one-line errors.

    arsr fit --config recipes/quickstart.yaml
    arsr fit --config recipes/varsr.yaml --model.init_args.tokenizer.init_args.quantizer.init_args.beta 0.5
    arsr fit --config recipes/quickstart.yaml --print_config

Model and data are chosen by ``class_path`` (subclass mode), so any LightningModule /
LightningDataModule (arsr's or a user's) can be named in a recipe. Every fit writes its config,
logs, checkpoints and exported weights into ``<logger save_dir>/<name>/version_N/`` and points
``<name>/latest`` at it. Exact resume is ``--ckpt_path last`` (the latest run's newest good
checkpoint, continued in that run's folder) or a path; starting from weights is ``init_from``
(``--model.init_args.training.init_from`` for ARFinetune, ``--model.init_args.init_from`` for the
other tasks) and a tokenizer's weights are ``--model.init_args.tokenizer.init_args.weights``.
Command-line ``--model...`` flags apply on top of the hyper-parameters a ``--ckpt_path``
checkpoint restores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from argparse import ArgumentError
from pathlib import Path
from typing import Optional

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.fabric.utilities.rank_zero import rank_zero_only  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

# every family imported: jsonargparse resolves short class names and lists the subclasses in --help
import arsr.components.conditioning  # noqa: E402,F401
import arsr.components.degradations  # noqa: E402,F401
import arsr.components.heads  # noqa: E402,F401
import arsr.components.posenc  # noqa: E402,F401
import arsr.components.postprocess  # noqa: E402,F401
import arsr.components.quantizers  # noqa: E402,F401
import arsr.components.refiners  # noqa: E402,F401
import arsr.components.regularizers  # noqa: E402,F401
import arsr.data  # noqa: E402,F401
import arsr.nn.infinity  # noqa: E402,F401
import arsr.nn.transformer  # noqa: E402,F401
import arsr.nn.vae  # noqa: E402,F401
import arsr.optim  # noqa: E402,F401
import arsr.tasks.ar  # noqa: E402,F401
import arsr.tasks.tokenizer  # noqa: E402,F401
from jsonargparse import DefaultHelpFormatter, Namespace  # noqa: E402
from lightning.fabric.plugins import CheckpointIO  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from arsr import __version__  # noqa: E402
from arsr.checkpoint import (AtomicCheckpointIO, check_checkpoint, check_tokenizer_hash, ensure_writable,  # noqa: E402
                             newest_loadable, point_latest)
from arsr.predict import SRWriter  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def recipe_list() -> str:
    """``recipes/*.yaml`` (a source checkout) with the first line of each header comment."""
    lines = []
    for r in sorted(RECIPES.glob("*.yaml")) if RECIPES.is_dir() else []:
        first = next((l.lstrip("# ").strip() for l in r.read_text().splitlines() if l.startswith("#")), "")
        lines.append(f"  {r.relative_to(RECIPES.parent).as_posix():34s} {textwrap.shorten(first, 78, placeholder=' ...')}")
    return "recipes:\n" + "\n".join(lines) if lines else ""


DESCRIPTION = textwrap.fill(
    f"arsr {__version__}: next-scale autoregressive image super-resolution (VARSR, NSARM, MSVAR) on Lightning. "
    "Train from a YAML recipe, override any value on the command line, super-resolve image folders and "
    "evaluate them. Each fit writes runs/<name>/version_N/ (config, TensorBoard logs, checkpoints, "
    "exported .safetensors) and points runs/<name>/latest at it. Start with: arsr fit --config recipes/quickstart_tokenizer.yaml",
    width=100,
)


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the recipe list's line breaks."""


LOGGERS = (TensorBoardLogger, CSVLogger)  # loggers that file runs as save_dir/name/version_N


class ARSRCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False,  # errors reach main() as exceptions
                                            "description": DESCRIPTION, "epilog": recipe_list(), "formatter_class": _HelpFormatter})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    exit_code = 0
    _argv: list[str] = []
    _pinned_version: str | None = None

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument("--version", action="version",
                                 version=f"arsr {__version__} (lightning {L.__version__}, torch {torch.__version__})")

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--name", type=Optional[str], default=None,
                            help="Run name: the run is written to <logger save_dir>/<name>/version_N/ and <name>/latest points "
                                 "at it (default: the recipe's logger name).")

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, (list, tuple)):
            args = nested_nulls(list(sys.argv[1:] if args is None else args))
        self._argv = list(args) if isinstance(args, list) else []
        for _ in range(len(MOVED_FLAGS) + 1):
            try:
                return super().parse_arguments(parser, args)
            except ArgumentError as e:  # a flag of the earlier layout: said where it went, and used there
                moved = moved_flags(self._argv, str(e))
                if moved is None:
                    raise
                args = self._argv = nested_nulls(moved)

    def after_predict(self) -> None:
        """Inputs that failed make the run fail (after the others were written)."""
        for cb in self.trainer.callbacks:
            if isinstance(cb, SRWriter) and cb.failed:
                self.exit_code = 1

    def after_test(self) -> None:
        if getattr(self.datamodule, "failed", None):
            self.exit_code = 1

    def _check_ckpt_path(self) -> None:
        """A wrong --ckpt_path fails here with a message, not deep inside Lightning; the file is
        opened weights-only, so a checkpoint carrying pickled code is refused before it can run."""
        path = self.config[self.config.subcommand].get("ckpt_path")
        if path is None or path in ("last", "best", "hpc", "registry"):
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--ckpt_path {path} does not exist")
        if p.is_dir():
            return  # a distributed (DCP) checkpoint folder
        try:
            check_checkpoint(p)
        except ValueError as e:
            raise ValueError(f"--ckpt_path {e}; to start from .safetensors weights use init_from "
                             "(--model.init_args.training.init_from for ARFinetune, --model.init_args.init_from otherwise)") from None

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the model's settings with the checkpoint's saved hyper-parameters; the
        ``--model...`` flags of the command line are then applied again, so they always win."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        self._check_ckpt_path()
        before = self.config
        super()._parse_ckpt_path()
        flags = model_flags(self._argv)
        if self.config is not before and flags:
            self.config = self.parser.parse_args([subcommand, *flags], namespace=self.config)
            if rank_zero_only.rank == 0:
                names = [f.split("=", 1)[0].removeprefix("--") for f in flags if f.startswith("--")]
                print(f"arsr: model settings restored from {self.config[subcommand].ckpt_path}, then the command line's "
                      f"{', '.join(names)}", file=sys.stderr)

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")  # None when built with run=False (from Python)
        cfg = self.config[sub] if sub else self.config
        check_values(cfg)
        log = run_logger_args(cfg)
        if log is not None:
            if cfg.get("name"):
                log.name = cfg.name
            # a resumed fit continues its run's folder; TensorBoard adds an events file there, while
            # Lightning's CSVLogger would rewrite metrics.csv, so a CSV run resumes into a new version
            tensorboard = str(cfg.trainer.logger.get("class_path", "")).endswith("TensorBoardLogger")
            if sub == "fit" and log.version is None and tensorboard:
                log.version = self._pinned_version = resume_version(cfg.get("ckpt_path"), Path(log.save_dir) / str(log.name))
        model = (cfg.get("model") or Namespace()).get("init_args") or Namespace()
        if rank_zero_only.rank == 0:
            training = model.get("training") or Namespace()
            tokenizer = (model.get("tokenizer") or Namespace()).get("init_args") or Namespace()
            for warning in check_tokenizer_hash(model.get("init_from") or training.get("init_from"), tokenizer.get("weights")):
                print(f"arsr: warning: {warning}", file=sys.stderr)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self._pinned_version is not None:  # the saved config keeps version null: reusing it starts a new run
            sub = self.config.get("subcommand")
            run_logger_args(self.config[sub] if sub else self.config).version = None

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = plugins + [AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """Output folders are proven writable before any work; a fit's run folder is created and
        ``<name>/latest`` pointed at it; ``--ckpt_path last`` becomes the newest checkpoint that
        loads (a corrupt ``last.ckpt`` is named and passed over) of the latest run."""
        trainer = self.trainer
        run = run_dir(trainer.logger)
        folders = {}
        if subcommand == "fit":
            folders.update({checkpoint_dir(cb, trainer, run): "checkpoint folder" for cb in trainer.checkpoint_callbacks})
        if subcommand != "predict" and trainer.logger is not None and trainer.logger.save_dir:
            folders[trainer.logger.save_dir] = "log folder"
        folders.update({cb.out_dir: "output folder" for cb in trainer.callbacks if isinstance(cb, SRWriter)})
        for folder, what in folders.items():
            if trainer.is_global_zero or run is None or run not in Path(folder).parents:  # other ranks never create a run
                ensure_writable(folder, what)
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":
            latest = None if run is None else run.parent / "latest"
            latest = latest.resolve() if latest is not None else None  # as Lightning names dirpaths: absolute
            dirs = [Path(cb.dirpath) if cb.dirpath else latest / "checkpoints" if latest else checkpoint_dir(cb, trainer, None)
                    for cb in trainer.checkpoint_callbacks]
            path, problems = newest_loadable(dirs)
            for problem in problems:
                print(f"arsr: warning: skipping {problem}", file=sys.stderr)
            if path is not None:
                if problems:
                    print(f"arsr: warning: resuming from {path}, the newest checkpoint that loads", file=sys.stderr)
                kwargs["ckpt_path"] = str(path)
            elif problems:
                raise ValueError(f"--ckpt_path last: no checkpoint in {', '.join(map(str, dirs))} can be loaded ({len(problems)} tried)")
        if subcommand == "fit" and run is not None and trainer.is_global_zero:
            ensure_writable(run, "run folder")
            point_latest(run)
        return kwargs


def model_flags(argv: list[str]) -> list[str]:
    """The ``--model...`` options of a command line, each with its value, in order."""
    out, i = [], 0
    while i < len(argv):
        take = (1 if "=" in argv[i] else 2) if re.match(r"--model([.=]|$)", argv[i]) else 0
        out += argv[i:i + take]
        i += take or 1
    return out


def nested_nulls(argv: list[str]) -> list[str]:
    """jsonargparse (4.x) reads ``null`` given on the command line for an optional value nested in a
    component's settings (``--model.init_args.tokenizer.init_args.weights null``) as the string
    'None'; the same value given as a mapping on the first component under ``model`` / ``data`` is
    read right, so such flags are rewritten to that form:
    ``--model.init_args.tokenizer '{"init_args": {"weights": null}}'``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        step = 1 if eq else 2
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        parts = key[2:].split(".") if arg.startswith("--") else []
        if value == "null" and len(parts) >= 4 and parts[0] in ("model", "data") and parts[1] == "init_args":
            nested = None
            for part in reversed(parts[3:]):
                nested = {part: nested}
            out += [f"--{'.'.join(parts[:3])}", json.dumps(nested)]
            i += step
            continue
        out.append(arg)
        i += 1
    return out


def run_logger_args(cfg: Namespace) -> Namespace | None:
    """init_args of the configured logger when it files runs as save_dir/name/version (TensorBoard, CSV)."""
    logger = (cfg.get("trainer") or Namespace()).get("logger")
    args = logger.get("init_args") if isinstance(logger, Namespace) else None
    return args if isinstance(args, Namespace) and all(k in args for k in ("save_dir", "name", "version")) else None


def run_dir(logger) -> Path | None:
    """``save_dir/name/version_N`` of a TensorBoard or CSV logger (the version is fixed on first access)."""
    if not isinstance(logger, LOGGERS):
        return None
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir) / str(logger.name) / version


def resume_version(ckpt_path: str | None, root: Path) -> str | None:
    """The run folder a fit resuming from ``ckpt_path`` continues in: the latest run of ``root`` for
    ``last``, the run holding the checkpoint for a path under ``root/<version>/checkpoints``; None
    starts a new version."""
    if ckpt_path == "last":
        latest = root / "latest"
        return latest.resolve().name if latest.is_dir() else None
    if ckpt_path and ckpt_path not in ("best", "hpc", "registry"):
        p = Path(ckpt_path).resolve()
        if p.parent.name == "checkpoints" and p.parent.parent.parent == root.resolve():
            return p.parent.parent.name
    return None


def checkpoint_dir(cb, trainer: L.Trainer, run: Path | None) -> Path:
    """Where a checkpoint callback writes: its dirpath, else the run's ``checkpoints/`` (Lightning's rule)."""
    if getattr(cb, "dirpath", None):
        return Path(cb.dirpath)
    return (run if run is not None else Path(trainer.default_root_dir)) / "checkpoints"


def _find(config, key: str, path: str = "") -> list[tuple[str, object]]:
    """Every (dotted path, value) of ``key`` in a nested dict/list config."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else []
    out = []
    for k, v in items:
        here = f"{path}.{k}" if path else str(k)
        out += [(here, v)] if k == key else []
        out += _find(v, key, here)
    return out


DATA_MINIMA = {"crop_size": 1, "batch_size": 1, "val_batch_size": 1, "batches_per_epoch": 1, "shuffle_buffer": 1,
               "num_workers": 0, "pool_size": 0}


def check_values(cfg) -> None:
    """Range checks jsonargparse's types cannot express, before any model is built: learning
    rates must be positive, and the training crop must tile the tokenizer's latent grid."""
    cfg = cfg.as_dict()
    for key, lr in _find(cfg.get("model"), "lr", "model"):
        if isinstance(lr, (int, float)) and lr <= 0:
            raise ArgumentError(None, f'Parser key "{key}": {lr} is not accepted: a learning rate must be > 0')
    data = (cfg.get("data") or {}).get("init_args") or {}
    for key, low in DATA_MINIMA.items():
        if isinstance(data.get(key), int) and data[key] < low:
            raise ArgumentError(None, f'Parser key "data.init_args.{key}": {data[key]} is not accepted: it must be an integer >= {low}')
    crop = data.get("crop_size")
    tok = ((cfg.get("model") or {}).get("init_args") or {}).get("tokenizer")
    targs = (tok.get("init_args") or {}) if isinstance(tok, dict) else {}
    if not isinstance(crop, int) or not targs.get("ch_mult"):
        return
    stride = 2 ** (len(targs["ch_mult"]) - 1)
    if crop % stride:
        raise ArgumentError(None, f'Parser key "data.init_args.crop_size": {crop} is not accepted: it must be a multiple of '
                                  f"the tokenizer's downsampling factor {stride} (2^(len(ch_mult)-1))")
    patch_nums = ((targs.get("quantizer") or {}).get("init_args") or {}).get("patch_nums")
    if patch_nums and patch_nums[-1] * stride != crop:
        raise ArgumentError(None, f'Parser key "data.init_args.crop_size": {crop} is not accepted: the scale schedule '
                                  f"patch_nums ends at {patch_nums[-1]} latent cells = {patch_nums[-1] * stride} px "
                                  f"(x{stride}); set crop_size {patch_nums[-1] * stride} or change patch_nums")


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    if any(line.startswith("Original Traceback") for line in lines):  # re-raised from a DataLoader worker
        lines = [re.sub(r"^[\w.]+: ", "", lines[-1])]
    text = " ".join(line.strip() for line in lines[:6])
    # jsonargparse wraps an error raised while building a class_path component in a Union report:
    # keep the component's own message
    m = re.search(r"Does not validate against any of the Union subtypes.*?Errors: - (.*?)(?: - Expected a <class 'NoneType'>|$)", text)
    return (m.group(1) if m else text)[:800]


_NOISE = ("Parser key", "Problem with given class_path", "Does not validate", "Subtypes:", "Errors:", "Given value",
          "Expected a <class 'NoneType'>", "Expected a path but")


def describe_parse_error(message: str) -> str:
    """jsonargparse's nested report -> 'full.key.path: innermost problem (what is available)'."""
    keys, detail = [], None
    for raw in message.splitlines():
        line = raw.strip().lstrip("- ").strip()
        m = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if m:
            keys.append(m.group(1))
            if m.group(2) and detail is None:
                detail = m.group(2)
        elif line and not line.startswith(_NOISE) and detail is None:
            detail = line
    if detail is None:
        detail = " ".join(message.split())[:300]
    m = re.search(r"Option '(\w+)' is not accepted", detail)
    if m and m.group(1) in MOVED_OPTIONS:
        detail += f"; {MOVED_OPTIONS[m.group(1)]}"
    m = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", detail)
    if m:
        import importlib

        module = importlib.import_module(m.group(1))
        names = [n for n in getattr(module, "__all__", dir(module)) if isinstance(getattr(module, n, None), type)]
        detail += f"; {m.group(1)} provides: {', '.join(names)}"
    return f"{'.init_args.'.join(keys)}: {detail}" if keys else detail


def moved_flags(argv: list[str], error: str) -> list[str] | None:
    """The command line with the flag the error refuses moved to its new place (``MOVED_FLAGS``),
    saying so on stderr; None when the error is about something else."""
    m = re.search(r"Option '(\w+)' is not accepted", error)
    old = f"--model.init_args.{m.group(1)}" if m else None
    if old is None or m.group(1) not in MOVED_FLAGS or not any(a == old or a.startswith(f"{old}=") for a in argv):
        return None
    new = MOVED_FLAGS[m.group(1)]
    if rank_zero_only.rank == 0:
        print(f"arsr: note: {old} is now {new}; using it there", file=sys.stderr)
    return [new + a[len(old):] if a == old or a.startswith(f"{old}=") else a for a in argv]


# flags of the earlier layout, and their place now (a command line using them still runs, with a note)
MOVED_FLAGS = {
    "tokenizer_from": "--model.init_args.tokenizer.init_args.weights",
    "init_from": "--model.init_args.training.init_from",
    "image_log_every": "--model.init_args.training.image_log_every",
}
# options that moved, and where a config written for the earlier layout finds them now
MOVED_OPTIONS = {
    "tokenizer_from": "a tokenizer carries its weights: tokenizer.init_args.weights",
    "init_from": "ARFinetune takes it in its training settings: training.init_from",
    "image_log_every": "ARFinetune takes it in its training settings: training.image_log_every",
}


def main(args: list[str] | None = None) -> int:
    """Console entry point. Configuration and input errors end in one line, not a traceback."""
    try:
        cli = ARSRCLI(args=args)
    except SystemExit as e:  # --help and --print_config exit here
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except ArgumentError as e:
        if os.environ.get("ARSR_DEBUG"):
            raise
        print(f"arsr: error: {describe_parse_error(str(e))} (arsr {{fit,validate,test,predict}} --help lists the options)", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError, TypeError, MisconfigurationException) as e:
        if os.environ.get("ARSR_DEBUG"):
            raise
        print(f"arsr: error: {type(e).__name__}: {_short(e)} (set ARSR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return cli.exit_code


if __name__ == "__main__":
    sys.exit(main())
