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
import torch  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402

import arsr.components.degradations  # noqa: E402,F401  (short class names in configs)
import arsr.components.quantizers  # noqa: E402,F401
import arsr.predict  # noqa: E402,F401


class ARSRCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})  # errors reach main() as exceptions
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)

    def _check_ckpt_path(self) -> None:
        """A wrong --ckpt_path fails here with a message, not deep inside Lightning."""
        path = self.config[self.config.subcommand].get("ckpt_path")
        if path is None or path in ("last", "best", "hpc", "registry"):
            return
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--ckpt_path {path} does not exist")
        if p.is_dir():
            return  # a distributed (DCP) checkpoint folder
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:
            raise ValueError(f"--ckpt_path {path} is not a readable Lightning checkpoint ({type(e).__name__}); "
                             "to start from .safetensors weights use --model.init_args.init_from") from None
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"--ckpt_path {path} holds no Lightning training state; official .pth files go through "
                             "tools/convert.py and --model.init_args.init_from")

    def _parse_ckpt_path(self) -> None:  # LightningCLI reads the checkpoint's hparams here
        if self.config.get("subcommand"):
            self._check_ckpt_path()
        super()._parse_ckpt_path()


class CLIError(Exception):
    pass


def _short(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines()[:6])
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
        ARSRCLI(args=args)
    except SystemExit as e:  # --help and --print_config exit here
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except ArgumentError as e:
        if os.environ.get("ARSR_DEBUG"):
            raise
        print(f"arsr: error: {describe_parse_error(str(e))} (arsr {{fit,validate,test,predict}} --help lists the options)", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError, TypeError, MisconfigurationException) as e:
        if os.environ.get("ARSR_DEBUG"):
            raise
        print(f"arsr: error: {type(e).__name__}: {_short(e)} (set ARSR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
