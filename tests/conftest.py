import io
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "recipes" / "sample_data"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def png_bytes(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr) if mode is None else Image.frombytes(mode, arr.shape[::-1], arr.astype("<u2").tobytes())
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


def exif_rotated_jpeg(arr: np.ndarray, orientation: int = 6) -> bytes:
    """A JPEG of arr whose EXIF orientation says to display it rotated (6: 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def rand_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def tiny_argv(recipe: Path) -> list[str]:
    """The tiny CPU command written in a recipe's header comment, as ``arsr`` arguments (paths made
    absolute, loader workers 0) for :func:`arsr.cli.main`."""
    import shlex

    lines = recipe.read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("# Tiny CPU run"))
    cmd = []
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        cmd.append(line[4:].rstrip("\\").strip())
    argv = shlex.split(" ".join(cmd))
    assert argv[0] == "arsr", f"{recipe.name}: the tiny command must start with arsr"
    return [a.replace("recipes/", str(ROOT / "recipes") + "/") for a in argv[1:]] + ["--data.init_args.num_workers", "0"]


@pytest.fixture
def arsr_cli(monkeypatch, capsys):
    """Run ``arsr ARGS`` in this process (the console entry point's ``main``) from a folder:
    ``arsr_cli(*args, cwd=...)`` -> an object with returncode, stdout and stderr, as a subprocess
    would give, without paying a fresh interpreter and imports for each call."""
    from types import SimpleNamespace

    from arsr.cli import main

    def run(*args, cwd=ROOT):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)

    return run
