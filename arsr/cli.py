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
import sys

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import lightning as L  # noqa: E402
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
        kwargs.setdefault("parser_kwargs", {"exit_on_error": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args, **kwargs)


class CLIError(Exception):
    pass


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return " ".join(line.strip() for line in text[:6])[:800]


def main(args: list[str] | None = None) -> int:
    """Console entry point. Configuration and input errors end in one line, not a traceback."""
    try:
        ARSRCLI(args=args)
    except SystemExit as e:  # argparse errors already printed their one-line message
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except (FileNotFoundError, ValueError, KeyError, TypeError, MisconfigurationException) as e:
        if os.environ.get("ARSR_DEBUG"):
            raise
        print(f"arsr: error: {type(e).__name__}: {_short(e)} (set ARSR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
