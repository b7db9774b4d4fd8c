#!/usr/bin/env python
"""Convert an official checkpoint into arsr safetensors weights plus a config to add after a recipe.

    python tools/convert.py --src vae_ch160v4096z32.pth --preset var_vqvae --out weights/var_vqvae
    python tools/convert.py --src VQVAE.pth --preset varsr_vqvae --out weights/varsr_vqvae
    arsr fit --config recipes/varsr.yaml --config weights/varsr_vqvae.yaml

The written ``<out>.yaml`` holds the model block that matches the weights and the path to them
(a tokenizer's own ``weights``; ``training.init_from`` for a transformer).
"""

from __future__ import annotations

import argparse
import sys

from arsr.convert import PRESETS, convert


def parser() -> argparse.ArgumentParser:
    presets = "\n".join(f"  {name:18s} {p.description}" for name, p in PRESETS.items())
    ap = argparse.ArgumentParser(prog="convert.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"presets:\n{presets}")
    ap.add_argument("--list", action="store_true", help="print the presets with what each converts, and exit")
    ap.add_argument("--src", help="official checkpoint file (.pth / .safetensors) or sharded folder (*.index.json)")
    ap.add_argument("--preset", choices=sorted(PRESETS), metavar="PRESET", help="one of the presets listed below")
    ap.add_argument("--out", help="output path; .safetensors and .yaml are written beside each other")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(f"{name:18s} {p.description}" for name, p in PRESETS.items()))
        return 0
    missing = [f"--{k}" for k in ("src", "preset", "out") if getattr(args, k) is None]
    if missing:
        ap.error(f"the following arguments are required: {', '.join(missing)}")
    try:
        out = convert(args.src, args.preset, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.yaml')} (use: arsr fit --config <recipe> --config {out.with_suffix('.yaml')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
