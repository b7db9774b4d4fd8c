"""Every shipped recipe parses against the current signatures, and runs tiny."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from arsr.cli import main

from conftest import ROOT

PARTIAL = {"predict"}  # added on top of a training config, not a recipe of its own
RECIPES = sorted(r for r in (ROOT / "recipes").glob("*.yaml") if r.stem not in PARTIAL)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses(recipe, capsys):
    assert main(["fit", "--config", str(recipe), "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] and cfg["data"]["class_path"]


def tiny_command(recipe: Path) -> str:
    """The tiny CPU command written in the recipe's header comment."""
    lines = recipe.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("# Tiny CPU run"))
    cmd = []
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        cmd.append(line[4:].rstrip("\\").strip())
    return " ".join(cmd)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "# Tiny CPU run" in r.read_text()], ids=lambda r: r.stem)
def test_recipe_runs_tiny(recipe, tmp_path):
    import shlex

    argv = shlex.split(tiny_command(recipe))
    assert argv[0] == "arsr"
    argv = [a.replace("recipes/", str(ROOT / "recipes") + "/") for a in argv[1:]]
    r = subprocess.run([sys.executable, "-m", "arsr", *argv, "--data.init_args.num_workers", "0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(tmp_path.rglob("last.safetensors"))
