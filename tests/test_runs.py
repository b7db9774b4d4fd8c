"""One folder per run, command-line flags over a checkpoint's hyper-parameters, export metadata,
and ``arsr test`` on a training config: one tiny tokenizer + SR pair, built once, in process."""

import os

import numpy as np
import pytest
import yaml
from PIL import Image
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from arsr.checkpoint import check_tokenizer_hash, file_sha256
from arsr.cli import main

from conftest import ROOT, SAMPLE

TINY = ["--data.init_args.train_shards", str(SAMPLE / "train-{000000..000001}.tar"), "--data.init_args.val_shards", "null",
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2", "--trainer.max_steps", "1",
        "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tokenizer runs of one recipe, then an SR run named by --name on the latest of them (its
validation shards only feed the end-of-fit side-by-side image and ``arsr test``)."""
    cwd, root = os.getcwd(), tmp_path_factory.mktemp("runs")
    os.chdir(root)
    try:
        for _ in range(2):
            assert main(["fit", "--config", str(ROOT / "recipes/quickstart_tokenizer.yaml"), *TINY, "--model.init_args.image_log_every", "0"]) == 0
        assert main(["fit", "--config", str(ROOT / "recipes/quickstart.yaml"), *TINY, "--model.init_args.training.image_log_every", "0", "--name", "sr", "--trainer.num_sanity_val_steps", "0",
                     "--data.init_args.val_shards", str(SAMPLE / "val-000000.tar")]) == 0
        yield root
    finally:
        os.chdir(cwd)


def test_two_runs_of_a_recipe_get_their_own_folders(runs, tmp_path):
    tok = runs / "runs" / "quickstart_tokenizer"
    assert sorted(p.name for p in tok.iterdir()) == ["latest", "version_0", "version_1"]
    assert os.readlink(tok / "latest") == "version_1"
    for v in ("version_0", "version_1"):
        files = {p.relative_to(tok / v).as_posix() for p in (tok / v).rglob("*") if p.is_file()}
        assert {"config.yaml", "checkpoints/last.ckpt", "checkpoints/last.safetensors"} <= files
        assert any(f.startswith("events.out.tfevents.") for f in files)
    assert file_sha256(tok / "version_0/checkpoints/last.ckpt") != file_sha256(tok / "version_1/checkpoints/last.ckpt")
    # --name picked the SR run's folder; it read its tokenizer through quickstart_tokenizer/latest
    sr = runs / "runs" / "sr" / "latest" / "checkpoints" / "last.safetensors"
    with safe_open(sr, "pt") as f:
        meta = f.metadata()
    assert meta["tokenizer_sha256"] == file_sha256(tok / "version_1/checkpoints/last.safetensors")
    model = yaml.safe_load(meta["arsr_model"])["model"]
    assert model["class_path"] == "arsr.tasks.ar.ARFinetune" and model["init_args"]["transformer"]["init_args"]["depth"] == 4
    # the quickstart's summary callback super-resolved the validation photos side by side: LR | SR | HR
    assert Image.open(runs / "runs" / "sr" / "version_0" / "showcase.png").size == (3 * 192, 4 * (192 + 4))
    # init_from with another tokenizer than the export was trained with is flagged
    assert check_tokenizer_hash(str(sr), str(tok / "version_1/checkpoints/last.safetensors")) == []
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    (warning,) = check_tokenizer_hash([str(sr)], str(tmp_path / "other.safetensors"))
    assert "was trained with a tokenizer file of sha256" in warning


def test_missing_latest_weights_name_the_run(runs, tmp_path):
    from arsr.checkpoint import load_weights

    (tmp_path / "t" / "version_3").mkdir(parents=True)
    os.symlink("version_3", tmp_path / "t" / "latest")
    with pytest.raises(FileNotFoundError, match="points at version_3, the newest run of"):
        load_weights(tmp_path / "t" / "latest" / "checkpoints" / "last.safetensors")


def test_sampling_flags_apply_after_ckpt_path(runs, tmp_path):
    """--ckpt_path restores the model's saved settings; the command line's sampling flags still win."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    run = runs / "runs" / "sr" / "latest"
    outs = {}
    for seed in ("1", "2"):
        out = tmp_path / f"sr{seed}"
        assert main(["predict", "--config", str(run / "config.yaml"), "--config", str(ROOT / "recipes/predict.yaml"),
                     "--ckpt_path", str(run / "checkpoints/last.ckpt"), "--data.init_args.inputs", f"[{tmp_path / 'a.png'}]",
                     "--trainer.callbacks.init_args.out_dir", str(out), "--model.init_args.inference.top_k", "0",
                     "--model.init_args.inference.seed", seed]) == 0
        outs[seed] = np.asarray(Image.open(out / "a.png"))
    assert outs["1"].shape == (64, 64, 3) and not np.array_equal(outs["1"], outs["2"])


def test_arsr_test_on_the_training_config(runs, capsys, monkeypatch):
    """The training config's shard data module: the validation shards are the test set."""
    monkeypatch.chdir(runs)
    run = runs / "runs" / "sr" / "latest"
    assert main(["test", "--config", str(run / "config.yaml"), "--ckpt_path", str(run / "checkpoints/last.ckpt")]) == 0
    assert "test/psnr_y" in capsys.readouterr().out
    assert os.readlink(runs / "runs" / "sr" / "latest") == "version_0"  # only a fit moves latest
