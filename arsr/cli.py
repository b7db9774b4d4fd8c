"""``arsr``: LightningCLI with arsr's defaults and one-line errors.

    arsr fit --config recipes/quickstart.yaml
    arsr fit --config recipes/varsr.yaml --model.init_args.tokenizer.init_args.quantizer.init_args.beta 0.5
    arsr fit --config recipes/quickstart.yaml --print_config

Model and data are chosen by ``class_path`` (subclass mode), so any LightningModule /
LightningDataModule (arsr's or a user's) can be named in a recipe. Exact resume is
``--ckpt_path last`` (or a path); starting from weights is ``--model.init_args.init_from``.
"""

from __future__ import annotations

import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import lightning as L  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

import arsr.components.degradations  # noqa: E402,F401  (short class names in configs)
import arsr.components.quantizers  # noqa: E402,F401
from lightning.fabric.plugins import CheckpointIO  # noqa: E402

from arsr.checkpoint import AtomicCheckpointIO, check_checkpoint, ensure_writable, newest_loadable  # noqa: E402
from arsr.predict import SRWriter  # noqa: E402


class ARSRCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})  # errors reach main() as exceptions
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    exit_code = 0

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
            raise ValueError(f"--ckpt_path {e}; to start from .safetensors weights use --model.init_args.init_from") from None

    def _parse_ckpt_path(self) -> None:  # LightningCLI reads the checkpoint's hparams here
        if self.config.get("subcommand"):
            self._check_ckpt_path()
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        check_values(self.config[self.config.subcommand])

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = plugins + [AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """Output folders are proven writable before any work; ``--ckpt_path last`` becomes the newest
        checkpoint that loads (a corrupt ``last.ckpt`` is named and passed over)."""
        trainer = self.trainer
        folders = {}
        if subcommand == "fit":
            folders.update({cb.dirpath: "checkpoint folder" for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)})
        if subcommand != "predict" and trainer.logger is not None and trainer.logger.save_dir:
            folders[trainer.logger.save_dir] = "log folder"
        folders.update({cb.out_dir: "output folder" for cb in trainer.callbacks if isinstance(cb, SRWriter)})
        for folder, what in folders.items():
            ensure_writable(folder, what)
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if kwargs.get("ckpt_path") == "last":
            dirs = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
            path, problems = newest_loadable(dirs)
            for problem in problems:
                print(f"arsr: warning: skipping {problem}", file=sys.stderr)
            if path is not None:
                if problems:
                    print(f"arsr: warning: resuming from {path}, the newest checkpoint that loads", file=sys.stderr)
                kwargs["ckpt_path"] = str(path)
            elif problems:
                raise ValueError(f"--ckpt_path last: no checkpoint in {', '.join(map(str, dirs))} can be loaded ({len(problems)} tried)")
        return kwargs


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


class CLIError(Exception):
    pass


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
    m = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", detail)
    if m:
        import importlib

        module = importlib.import_module(m.group(1))
        names = [n for n in getattr(module, "__all__", dir(module)) if isinstance(getattr(module, n, None), type)]
        detail += f"; {m.group(1)} provides: {', '.join(names)}"
    return f"{'.init_args.'.join(keys)}: {detail}" if keys else detail


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
