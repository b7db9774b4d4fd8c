"""Checkpoint files: atomic writes (EXDEV, disk full, umask), corrupt last.ckpt fallback, read-only
outputs, refusal of pickled code everywhere a file is read, init_from on arsr's own exports."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arsr.checkpoint import AtomicCheckpointIO, atomic_save_safetensors, load_into, load_weights, newest_loadable

from conftest import ROOT, SAMPLE

EVIL = """
import os, sys, torch
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"state_dict": {}, "model": Evil()}, sys.argv[1])
"""


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A checkpoint whose unpickling creates a file (the marker must never appear)."""
    ckpt, marker = tmp_path / "evil.ckpt", tmp_path / "PWNED"
    subprocess.run([sys.executable, "-c", EVIL, str(ckpt), str(marker)], check=True)
    assert ckpt.is_file() and not marker.exists()
    return ckpt, marker


def run(*args, cwd):
    env = os.environ | {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_rename_never_crosses_filesystems(tmp_path, monkeypatch):
    """Lightning's default wrote under $TMPDIR and renamed across filesystems (EXDEV -> empty last.ckpt)."""
    real = os.replace

    def same_dir_only(src, dst):
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", same_dir_only)
    monkeypatch.setattr(os, "rename", same_dir_only)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 7}, tmp_path / "ck" / "last.ckpt")
    assert AtomicCheckpointIO().load_checkpoint(tmp_path / "ck" / "last.ckpt")["global_step"] == 7


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, last)
    atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "last.safetensors")

    def full(self, data):
        with open(self, "wb") as f:
            f.write(bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError, match=r"no space left on the device holding .* \(earlier files are intact\)"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 2}, last)
    with pytest.raises(OSError, match="no space left"):
        atomic_save_safetensors({"w": torch.zeros(2)}, tmp_path / "last.safetensors")
    monkeypatch.undo()
    assert io.load_checkpoint(last)["global_step"] == 1 and load_file(tmp_path / "last.safetensors")["w"].eq(1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last.safetensors"]  # no partial files left


def test_exports_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save_safetensors({"w": torch.ones(1)}, tmp_path / "w.safetensors")
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "c.ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c.ckpt").stat().st_mode & 0o777 == 0o644


def test_newest_loadable_passes_over_a_corrupt_last(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {}, "global_step": 3}, tmp_path / "epoch=0-step=3.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    path, problems = newest_loadable([tmp_path])
    assert path == tmp_path / "epoch=0-step=3.ckpt"
    assert len(problems) == 1 and "last.ckpt is not a readable checkpoint" in problems[0]


TINY = ["--config", str(ROOT / "recipes" / "quickstart_tokenizer.yaml"),
        "--model.init_args.tokenizer.init_args.quantizer.init_args.patch_nums", "[1, 2, 4, 8]",
        "--data.init_args.crop_size", "32", "--data.init_args.degradation.init_args.degrade_from_usm", "false",
        "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0", "--data.init_args.val_shards", "null",
        "--data.init_args.train_shards", str(SAMPLE / "train-{000000..000001}.tar"), "--model.init_args.image_log_every", "0",
        "--trainer.enable_progress_bar", "false"]


def test_cli_resumes_from_the_newest_good_checkpoint_and_init_from_exports(tmp_path, arsr_cli):
    r = arsr_cli("fit", *TINY, "--trainer.max_steps", "2", "--trainer.callbacks.init_args.every_n_train_steps", "1",
            "--trainer.callbacks.init_args.save_top_k", "-1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = tmp_path / "runs" / "quickstart_tokenizer" / "version_0" / "checkpoints"
    assert (ckpts / "last.safetensors").stat().st_mode & 0o044 == 0o044  # readable by group and others
    good = ckpts / "epoch=0-step=2.ckpt"
    assert good.is_file()
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:100])  # truncated by a crash
    r = arsr_cli("fit", *TINY, "--trainer.max_steps", "3", "--trainer.callbacks.init_args.every_n_train_steps", "1",
            "--ckpt_path", "last", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping {ckpts / 'last.ckpt'} is not a readable checkpoint" in r.stderr
    assert f"resuming from {good}" in r.stderr
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 3

    # init_from takes the task's own export (keys under "tokenizer."), into a fresh run
    assert all(k.startswith("tokenizer.") for k in load_file(ckpts / "last.safetensors"))
    r = arsr_cli("fit", *TINY, "--trainer.max_steps", "1", "--model.init_args.init_from", str(ckpts / "last.safetensors"),
            "--trainer.default_root_dir", "second", "--trainer.callbacks.init_args.dirpath", "second/ck", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("kind", ["read_only", "under_a_file"])
def test_unwritable_output_is_found_before_any_work(tmp_path, kind, arsr_cli):
    if kind == "read_only":
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        target = tmp_path / "ro" / "ck"
    else:
        (tmp_path / "file").write_text("")
        target = tmp_path / "file" / "ck"
    r = arsr_cli("fit", *TINY, "--trainer.max_steps", "1", "--trainer.callbacks.init_args.dirpath", str(target), cwd=tmp_path)
    assert r.returncode == 2
    assert f"checkpoint folder {target} is not writable" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and "Epoch" not in r.stderr  # stopped before training


def test_load_into_reports_keys_by_module():
    module = torch.nn.ModuleDict({"encoder": torch.nn.Linear(2, 2), "decoder": torch.nn.Linear(2, 2)})
    state = {"tokenizer." + k: v for k, v in module.state_dict().items()}
    load_into(module, state, "init_from=x")  # an owner-prefixed export loads
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("decoder")} | {"extra.w": torch.ones(1)}
    with pytest.raises(ValueError, match=r"missing 2 key\(s\): decoder \(2 keys, first decoder.weight\); unexpected 1 key\(s\): extra \(1 key, first extra.w\)"):
        load_into(module, state, "init_from=x")


def test_pickled_code_is_refused_everywhere(tmp_path, evil, monkeypatch, capsys):
    """--ckpt_path, init_from, a tokenizer's weights and tools/convert.py refuse the file, and nothing in it runs
    (in-process: the unpickling would run right here)."""
    from arsr.cli import main

    ckpt, marker = evil
    monkeypatch.chdir(tmp_path)

    def refused(argv: list[str], message: str) -> None:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err, err[-2000:]

    refused(["fit", *TINY, "--trainer.max_steps", "1", "--ckpt_path", str(ckpt)], "was refused: it holds Python objects")
    renamed = tmp_path / "evil.safetensors"
    renamed.write_bytes(ckpt.read_bytes())
    for path in (ckpt, renamed):
        with pytest.raises(ValueError, match="only|not a readable safetensors"):
            load_weights(path)  # init_from and tokenizer weights read through load_weights
    refused(["fit", *TINY, "--trainer.max_steps", "1", "--model.init_args.init_from", str(ckpt)], ".safetensors files only")
    refused(["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--model.init_args.tokenizer.init_args.weights", str(renamed),
             "--trainer.max_steps", "1"], "not a readable safetensors file")
    r = run(str(ROOT / "tools" / "convert.py"), "--src", str(ckpt), "--preset", "var_vqvae", "--out", str(tmp_path / "w"), cwd=tmp_path)
    assert r.returncode == 2 and "could not be read as a weights-only torch checkpoint" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()  # nothing ran


def test_a_task_built_in_python_checkpoints_weights_only_and_resumes(tmp_path):
    """Built without the CLI, a task's hyper-parameters keep its plain settings (the Training /
    Inference groups as dicts) and leave the component objects to the state dict: the checkpoint
    loads weights-only and a second fit resumes from it."""
    import lightning as L

    from arsr.checkpoint import AtomicCheckpointIO
    from arsr.components.conditioning import QualityCFG
    from arsr.components.heads import IndexHead
    from arsr.components.posenc import SARoPE
    from arsr.components.quantizers import MultiScaleVQ
    from arsr.nn.transformer import NextScaleTransformer
    from arsr.nn.vae import VQVAE
    from arsr.tasks.ar import ARFinetune, Inference, Training

    def task():
        torch.manual_seed(0)
        tok = VQVAE(MultiScaleVQ(32, 4, (1, 2, 4)), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
        tr = NextScaleTransformer(SARoPE(), IndexHead(), None, depth=1, width=32, heads=2, num_classes=2, null_class=1)
        return ARFinetune(tr, tok, QualityCFG(cfg=2.0), training=Training(scale_weighting="sqrt_area"),
                          inference=Inference(top_k=2, val_samples=0))

    hr = torch.rand(4, 3, 16, 16)
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area")
    batches = [{"hr": hr[i : i + 2], "lr": lr[i : i + 2], "lr_up": torch.nn.functional.interpolate(lr[i : i + 2], size=16),
                "quality": torch.ones(2, dtype=torch.long)} for i in (0, 2)]
    loader = lambda: torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = lambda steps: L.Trainer(max_steps=steps, logger=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer(1).fit(task(), loader())
    ckpt = next(tmp_path.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["inference"]["top_k"] == 2 and saved["hyper_parameters"]["training"]["scale_weighting"] == "sqrt_area"
    assert "transformer" not in saved["hyper_parameters"]
    t = trainer(2)
    t.fit(task(), loader(), ckpt_path=ckpt)
    assert t.global_step == 2
