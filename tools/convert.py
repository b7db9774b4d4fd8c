#!/usr/bin/env python
"""Convert an official checkpoint into arsr safetensors weights plus the matching component YAML.

    python tools/convert.py --src vae_ch160v4096z32.pth --preset var_vqvae --out weights/var_vqvae
    python tools/convert.py --src VQVAE.pth --preset varsr_vqvae --out weights/varsr_vqvae

Then start a run from them: ``--model.init_args.init_from weights/varsr_vqvae.safetensors``.
"""

from __future__ import annotations

import sys

from jsonargparse import auto_cli

from arsr.convert import PRESETS, convert


def main(argv: list[str] | None = None) -> int:
    try:
        out = auto_cli(convert, args=argv, as_positional=False)
    except (FileNotFoundError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.yaml')}")
    return 0


if __name__ == "__main__":
    if "--list" in sys.argv:
        for name, p in PRESETS.items():
            print(f"{name:14s} {p.description}")
        sys.exit(0)
    sys.exit(main())
