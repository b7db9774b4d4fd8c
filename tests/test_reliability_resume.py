"""Exact resume: train 2N steps == train N, SIGKILL, resume from last, train N (bit for bit, CPU),
with 0 / 2 loader workers and under 2-process DDP; the same seed and config give the same run."""

import csv
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE

pytestmark = pytest.mark.slow

TINY = ["--config", str(ROOT / "recipes" / "quickstart_tokenizer.yaml"),
        "--model.init_args.tokenizer.init_args.ch", "32", "--model.init_args.tokenizer.init_args.ch_mult", "[1, 2, 2]",
        "--model.init_args.tokenizer.init_args.quantizer.init_args.patch_nums", "[1, 2, 4, 8]",
        "--model.init_args.tokenizer.init_args.quantizer.init_args.vocab_size", "32",
        "--model.init_args.image_log_every", "0",
        "--data.init_args.train_shards", str(SAMPLE / "train-{000000..000001}.tar"), "--data.init_args.val_shards", "null",
        "--data.init_args.crop_size", "32", "--data.init_args.degradation.init_args.degrade_from_usm", "false", "--data.init_args.batch_size", "2", "--data.init_args.batches_per_epoch", "4",
        "--data.init_args.shuffle_buffer", "8",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", "logs",
        "--trainer.logger.init_args.flush_logs_every_n_steps", "1", "--trainer.log_every_n_steps", "1",
        "--trainer.callbacks.init_args.dirpath", "ckpt", "--trainer.callbacks.init_args.every_n_train_steps", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "6"]


def fit(cwd, *extra, devices: int = 1):
    env = os.environ | {"PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    dist = ["--trainer.devices", str(devices)] + (["--trainer.strategy", "ddp"] if devices > 1 else [])
    return subprocess.run([sys.executable, "-m", "arsr", "fit", *TINY, *dist, *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def losses(cwd) -> dict[int, str]:
    """step -> train/loss as logged (full float repr), over every CSV version in the run folder."""
    out = {}
    for f in sorted((cwd / "logs").rglob("metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = row["train/loss"]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, workers):
    w = ["--data.init_args.num_workers", str(workers)]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    r = fit(whole, *w)
    assert r.returncode == 0, r.stderr[-3000:]
    r = fit(cut, *w, "--trainer.callbacks+=reliability_kill.KillAt", "--trainer.callbacks.init_args.step", "3")
    assert r.returncode == -9, r.stderr[-3000:]  # SIGKILL, mid-epoch (4 batches per epoch)
    killed = losses(cut)
    r = fit(cut, *w, "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not resumable" not in r.stderr
    ref, resumed = losses(whole), losses(cut)
    assert len(ref) == 6
    assert {s: ref[s] for s in killed} == killed  # same seed and config: the same run
    assert resumed == ref  # steps 4..6 after the resume, bit for bit


def test_ddp_kill_and_resume(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    w = ["--data.init_args.num_workers", "0"]
    assert (r := fit(whole, *w, devices=2)).returncode == 0, r.stderr[-3000:]
    r = fit(cut, *w, "--trainer.callbacks+=reliability_kill.KillAt", "--trainer.callbacks.init_args.step", "3", devices=2)
    assert r.returncode != 0
    assert (r := fit(cut, *w, "--ckpt_path", "last", devices=2)).returncode == 0, r.stderr[-3000:]
    ref, resumed = losses(whole), losses(cut)
    assert len(ref) == 6 and resumed == ref
