"""Every shipped recipe parses against the current signatures, and runs tiny."""

import pytest
import yaml

from arsr.cli import main

from conftest import ROOT, tiny_argv

PARTIAL = {"predict"}  # added on top of a training config, not a recipe of its own
RECIPES = sorted(r for r in (ROOT / "recipes").glob("*.yaml") if r.stem not in PARTIAL)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_parses(recipe, capsys):
    assert main(["fit", "--config", str(recipe), "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["class_path"] and cfg["data"]["class_path"]


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "# Tiny CPU run" in r.read_text()], ids=lambda r: r.stem)
def test_recipe_runs_tiny(recipe, tmp_path, monkeypatch):
    """The tiny command in the recipe's header runs as written (in-process: the CLI's own entry point)."""
    monkeypatch.chdir(tmp_path)
    assert main(tiny_argv(recipe)) == 0
    assert list(tmp_path.rglob("last.safetensors"))
