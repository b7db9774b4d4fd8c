"""The public CLI: help, print_config, overrides, one-line errors, and a real fit + resume."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from arsr.cli import main

from conftest import ROOT, SAMPLE

QUICK = str(ROOT / "recipes" / "quickstart_tokenizer.yaml")
QUICK_AR = str(ROOT / "recipes" / "quickstart.yaml")


def run_cli(*args, cwd=ROOT, timeout=300):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "arsr", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict"):
        assert cmd in out


def test_print_config_and_override(capsys):
    assert main(["fit", "--config", QUICK, "--model.init_args.tokenizer.init_args.quantizer.init_args.beta", "0.5",
                 "--data.init_args.batch_size", "3", "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    q = cfg["model"]["init_args"]["tokenizer"]["init_args"]["quantizer"]
    assert q["class_path"] == "arsr.components.quantizers.MultiScaleVQ"
    assert q["init_args"]["beta"] == 0.5 and q["init_args"]["vocab_size"] == 256
    assert cfg["data"]["init_args"]["batch_size"] == 3
    assert cfg["data"]["init_args"]["degradation"]["init_args"]["jpeg_range"] == [30.0, 95.0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model.init_args.tokenizer.init_args.quantizer", "arsr.components.quantizers.NoSuchQuantizer"],
         "model.init_args.tokenizer.init_args.quantizer: module 'arsr.components.quantizers' has no attribute 'NoSuchQuantizer'; "
         "arsr.components.quantizers provides: HierarchicalRQ, MultiScaleBSQ, MultiScaleVQ"),
        (["--data.init_args.batch_size", "many"], "data.init_args.batch_size: Expected a <class 'int'>. Got value: many"),
        (["--data.init_args.degradation.init_args.jpeg_range", "[1]"], "degradation.init_args.jpeg_range: Expected a tuple with 2"),
        (["--data.init_args.train_shards", "missing-{0..2}.tar"], "not found"),
        (["--model.init_args.init_from", "missing.safetensors"], "not found"),
        (["--ckpt_path", "missing.ckpt"], "--ckpt_path missing.ckpt does not exist"),
        (["--ckpt_path", "README.md"], "not a readable Lightning checkpoint"),
    ],
)
def test_errors_are_one_line(args, expected, tmp_path):
    r = run_cli("fit", "--config", QUICK, *args, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path), cwd=ROOT)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("arsr: error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr[-2000:]


def test_missing_config_file():
    r = run_cli("fit", "--config", "recipes/nope.yaml")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("arsr: error: config: File does not exist") and "nope.yaml" in r.stderr


def _fit(tmp_path, *extra, config=QUICK):
    return run_cli(
        "fit", "--config", config,
        "--data.init_args.train_shards", str(SAMPLE / "train-{000000..000001}.tar"),
        "--data.init_args.val_shards", str(SAMPLE / "val-000000.tar"),
        "--data.init_args.num_workers", "0",
        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1", "--model.init_args.image_log_every", "1",
        *extra, cwd=tmp_path,
    )


def test_quickstart_fits_writes_weights_logs_and_resumes(tmp_path):
    r = _fit(tmp_path, "--trainer.max_steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt_dir = tmp_path / "runs" / "quickstart_tokenizer" / "checkpoints"
    weights = load_file(ckpt_dir / "last.safetensors")
    assert "tokenizer.quantize.embedding.weight" in weights and not any(k.startswith("lpips") for k in weights)
    tb = list((tmp_path / "runs" / "quickstart_tokenizer" / "tb").rglob("events.out.tfevents.*"))
    assert tb and (tb[0].parent / "config.yaml").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb[0].parent), size_guidance={"images": 0}).Reload()
    assert "train/reconstruction" in acc.Tags()["images"] and "val/scales" in acc.Tags()["images"]
    assert "train/loss" in acc.Tags()["scalars"]

    # exact resume continues the step counter from last.ckpt
    r = _fit(tmp_path, "--trainer.max_steps", "4", "--ckpt_path", str(ckpt_dir / "last.ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 4

    # starting from weights: a fresh run whose tokenizer starts at the exported weights
    tok = {k.removeprefix("tokenizer."): v for k, v in load_file(ckpt_dir / "last.safetensors").items()}
    from safetensors.torch import save_file

    save_file(tok, tmp_path / "tok.safetensors")
    r = _fit(tmp_path, "--trainer.max_steps", "1", "--model.init_args.init_from", str(tmp_path / "tok.safetensors"),
             "--trainer.default_root_dir", str(tmp_path / "second"))
    assert r.returncode == 0, r.stderr[-3000:]


def test_quickstart_end_to_end_sr(tmp_path):
    """Part 1 (tokenizer) then part 2 (SR model on it), as the README runs them, a few steps each."""
    assert _fit(tmp_path, "--trainer.max_steps", "2").returncode == 0
    r = _fit(tmp_path, "--trainer.max_steps", "2", config=QUICK_AR)
    assert r.returncode == 0, r.stderr[-3000:]
    weights = load_file(tmp_path / "runs" / "quickstart" / "checkpoints" / "last.safetensors")
    assert any(k.startswith("transformer.") for k in weights) and any(k.startswith("refiner.") for k in weights)
    assert not any(k.startswith("tokenizer.") for k in weights)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = next((tmp_path / "runs" / "quickstart" / "tb").rglob("events.out.tfevents.*")).parent
    acc = EventAccumulator(str(tb), size_guidance={"images": 0}).Reload()
    assert "val/lr_sr_hr" in acc.Tags()["images"] and "val/sample_psnr" in acc.Tags()["scalars"]


def test_predict_through_the_cli(tmp_path):
    from PIL import Image

    from conftest import rand_rgb

    (tmp_path / "in").mkdir()
    Image.fromarray(rand_rgb(16, 16)).save(tmp_path / "in" / "a.png")
    Image.fromarray(rand_rgb(12, 20)).save(tmp_path / "in" / "b.jpg")
    (tmp_path / "in" / "c.png").write_bytes(b"broken")
    r = run_cli("predict", "--config", QUICK_AR, "--config", str(ROOT / "recipes" / "predict.yaml"),
                "--model.init_args.tokenizer_from", "null", "--data.init_args.inputs", f"[{tmp_path / 'in'}]",
                "--trainer.callbacks.init_args.out_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipping" in r.stderr and "c.png" in r.stderr
    assert Image.open(tmp_path / "out" / "a.png").size == (64, 64)
    assert Image.open(tmp_path / "out" / "b.png").size == (80, 48)
