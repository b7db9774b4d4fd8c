"""The public CLI: help, print_config, overrides, one-line errors, and a real fit + resume."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

import arsr
from arsr.cli import main

from conftest import ROOT, SAMPLE

QUICK = str(ROOT / "recipes" / "quickstart_tokenizer.yaml")
QUICK_AR = str(ROOT / "recipes" / "quickstart.yaml")


def run_cli(*args, cwd=ROOT, timeout=300):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "arsr", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands_and_recipes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict"):
        assert cmd in out
    assert "next-scale autoregressive image super-resolution" in out
    assert "recipes/quickstart.yaml            Quickstart, part 2:" in out and "recipes/varsr.yaml" in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"arsr {arsr.__version__} (lightning ")


def test_short_class_names_of_every_family(capsys):
    assert main(["fit", "--config", QUICK_AR, "--model.init_args.labels", "DegradationClasses", "--model.init_args.regularizer", "DPO",
                 "--model.init_args.transformer.init_args.pos_enc", "LearnedResampled", "--model.init_args.inference.postprocess", "ColorFix",
                 "--print_config"]) == 0
    m = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert m["labels"]["class_path"] == "arsr.components.conditioning.DegradationClasses"
    assert m["regularizer"]["class_path"] == "arsr.components.regularizers.DPO"
    assert m["transformer"]["init_args"]["pos_enc"]["class_path"] == "arsr.components.posenc.LearnedResampled"
    assert m["inference"]["postprocess"]["class_path"] == "arsr.components.postprocess.ColorFix"


def test_convert_help_and_config_ready_yaml(tmp_path, monkeypatch, capsys):
    """tools/convert.py lists its presets as choices; the YAML it writes goes after a recipe with --config."""
    import importlib.util

    from arsr.convert import PRESETS, Preset
    from arsr.nn.vae import VQVAE
    from arsr.components.quantizers import MultiScaleVQ

    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools" / "convert.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert "--preset PRESET" in tool.parser().format_help() and "varsr_vqvae" in tool.parser().format_help()
    with pytest.raises(SystemExit):
        tool.main(["--src", "x.pth", "--preset", "nope", "--out", "y"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    q = {"vocab_size": 256, "dim": 8, "patch_nums": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]}  # 10 scales: convert builds on the meta device
    tiny = {"class_path": "arsr.nn.vae.VQVAE", "init_args": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
            "quantizer": {"class_path": "arsr.components.quantizers.MultiScaleVQ", "init_args": q}}}
    monkeypatch.setitem(PRESETS, "tiny_vqvae", Preset("tiny", tiny))
    torch.save(VQVAE(MultiScaleVQ(**q), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1).state_dict(), tmp_path / "tiny.pth")
    assert tool.main(["--src", str(tmp_path / "tiny.pth"), "--preset", "tiny_vqvae", "--out", str(tmp_path / "tiny")]) == 0
    capsys.readouterr()
    assert main(["fit", "--config", QUICK_AR, "--config", str(tmp_path / "tiny.yaml"), "--print_config"]) == 0
    m = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert m["tokenizer"]["init_args"]["weights"] == str(tmp_path / "tiny.safetensors") and m["tokenizer"]["init_args"]["ch"] == 32


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
        (["--data.init_args.batch_size", "0"], "data.init_args.batch_size: 0 is not accepted: it must be an integer >= 1"),
        (["--model.init_args.optimizer.init_args.lr", "-0.001"],
         "model.init_args.optimizer.init_args.lr: -0.001 is not accepted: a learning rate must be > 0"),
        (["--data.init_args.crop_size", "62"], "data.init_args.crop_size: 62 is not accepted: it must be a multiple of the tokenizer's downsampling factor 4"),
        (["--data.init_args.crop_size", "32"], "data.init_args.crop_size: 32 is not accepted: the scale schedule patch_nums ends at 16 latent cells = 64 px"),
        (["--data.init_args.degradation.init_args.jpeg_range", "[1]"], "degradation.init_args.jpeg_range: Expected a tuple with 2"),
        (["--data.init_args.train_shards", "missing-{0..2}.tar"], "not found"),
        (["--model.init_args.init_from", "missing.safetensors"], "not found"),
        (["--ckpt_path", "missing.ckpt"], "--ckpt_path missing.ckpt does not exist"),
        (["--ckpt_path", "README.md"], "--ckpt_path README.md is not a readable checkpoint (not a torch.save archive"),
    ],
)
def test_errors_are_one_line(args, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    code = main(["fit", "--config", QUICK, *args, "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.logger.init_args.save_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("arsr: error:")]
    assert len(errors) == 1 and expected in errors[0], err[-2000:]


def test_broken_yaml_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: 3\n   devices: 1\n")
    assert main(["fit", "--config", QUICK, "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("arsr: error: Problems parsing config: mapping values are not allowed")


def test_missing_config_file(monkeypatch, capsys):
    """Through the installed entry point (a subprocess), as a user meets it."""
    r = run_cli("fit", "--config", "recipes/nope.yaml")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("arsr: error: config: File does not exist") and "nope.yaml" in r.stderr


def _fit(cli, tmp_path, *extra, config=QUICK):
    return cli(
        "fit", "--config", config,
        "--data.init_args.train_shards", str(SAMPLE / "train-{000000..000001}.tar"),
        "--data.init_args.val_shards", str(SAMPLE / "val-000000.tar"),
        "--data.init_args.num_workers", "0",
        "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--model.init_args.training.image_log_every" if config == QUICK_AR else "--model.init_args.image_log_every", "1",
        *extra, cwd=tmp_path,
    )


def test_quickstart_fits_writes_weights_logs_and_resumes(tmp_path, arsr_cli):
    r = _fit(arsr_cli, tmp_path, "--trainer.max_steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "quickstart_tokenizer" / "version_0"
    ckpt_dir = run / "checkpoints"
    weights = load_file(ckpt_dir / "last.safetensors")
    assert "tokenizer.quantize.embedding.weight" in weights and not any(k.startswith("lpips") for k in weights)
    tb = list(run.glob("events.out.tfevents.*"))
    assert tb and (tb[0].parent / "config.yaml").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb[0].parent), size_guidance={"images": 0}).Reload()
    assert "train/reconstruction" in acc.Tags()["images"] and "val/scales" in acc.Tags()["images"]
    assert "train/loss" in acc.Tags()["scalars"]

    # exact resume continues the step counter from last.ckpt, in the same run folder
    r = _fit(arsr_cli, tmp_path, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in run.parent.iterdir()) == ["latest", "version_0"] and len(list(run.glob("events.*"))) == 2

    # starting from weights: a fresh run whose tokenizer starts at the exported weights
    tok = {k.removeprefix("tokenizer."): v for k, v in load_file(ckpt_dir / "last.safetensors").items()}
    from safetensors.torch import save_file

    save_file(tok, tmp_path / "tok.safetensors")
    r = _fit(arsr_cli, tmp_path, "--trainer.max_steps", "1", "--model.init_args.init_from", str(tmp_path / "tok.safetensors"),
             "--trainer.default_root_dir", str(tmp_path / "second"))
    assert r.returncode == 0, r.stderr[-3000:]


def test_quickstart_end_to_end_sr(tmp_path, arsr_cli):
    """Part 1 (tokenizer) then part 2 (SR model on it), as the README runs them, a few steps each."""
    assert _fit(arsr_cli, tmp_path, "--trainer.max_steps", "2").returncode == 0
    r = _fit(arsr_cli, tmp_path, "--trainer.max_steps", "2", config=QUICK_AR)
    assert r.returncode == 0, r.stderr[-3000:]
    weights = load_file(tmp_path / "runs" / "quickstart" / "latest" / "checkpoints" / "last.safetensors")
    assert any(k.startswith("transformer.") for k in weights) and any(k.startswith("refiner.") for k in weights)
    assert not any(k.startswith("tokenizer.") for k in weights)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = next((tmp_path / "runs" / "quickstart" / "latest").glob("events.out.tfevents.*")).parent
    acc = EventAccumulator(str(tb), size_guidance={"images": 0}).Reload()
    assert "val/lr_outputs_hr" in acc.Tags()["images"] and "val/psnr_y" in acc.Tags()["scalars"]


def test_predict_through_the_cli(tmp_path, arsr_cli):
    """Names keep relative paths (no clashes), existing outputs are kept unless overwritten, a summary,
    a failing exit code when an input failed, EXIF orientation applied."""
    from PIL import Image

    from conftest import rand_rgb
    from conftest import exif_rotated_jpeg

    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(rand_rgb(16, 16)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "a.jpg").write_bytes(exif_rotated_jpeg(rand_rgb(12, 20)))  # shown upright: 12 wide, 20 high
    Image.fromarray(rand_rgb(16, 16)).save(tmp_path / "in" / "sub" / "a.png")
    (tmp_path / "in" / "c.png").write_bytes(b"broken")
    out = tmp_path / "out"
    args = ["predict", "--config", QUICK_AR, "--config", str(ROOT / "recipes" / "predict.yaml"), "--model.init_args.tokenizer.init_args.weights", "null",
            "--data.init_args.inputs", f"[{tmp_path / 'in'}]", "--trainer.callbacks.init_args.out_dir", str(out)]
    r = arsr_cli(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]  # c.png failed; the others were written
    assert f"arsr predict: written 3 to {out}, failed 1\n  {tmp_path / 'in' / 'c.png'}: corrupt" in r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.jpg.png", "a.png", "sub/a.png"]
    assert Image.open(out / "a.png").size == (64, 64) and Image.open(out / "a.jpg.png").size == (48, 80)
    (tmp_path / "in" / "c.png").unlink()
    before = (out / "a.png").stat().st_mtime_ns
    r = arsr_cli(*args, cwd=tmp_path)
    assert r.returncode == 0 and "written 0" in r.stderr and "skipped 3 whose output exists (--overwrite replaces them)" in r.stderr
    assert (out / "a.png").stat().st_mtime_ns == before
    r = arsr_cli(*args, "--trainer.callbacks.init_args.overwrite", "true", cwd=tmp_path)
    assert r.returncode == 0 and "written 3" in r.stderr and (out / "a.png").stat().st_mtime_ns != before


def test_arsr_test_lists_mis_sized_pairs(tmp_path, arsr_cli):
    from PIL import Image

    from conftest import rand_rgb

    for d in ("lr", "hr"):
        (tmp_path / d).mkdir()
    Image.fromarray(rand_rgb(16, 16)).save(tmp_path / "lr" / "ok.png")
    Image.fromarray(rand_rgb(64, 64)).save(tmp_path / "hr" / "ok.png")
    Image.fromarray(rand_rgb(16, 16)).save(tmp_path / "lr" / "odd.png")
    Image.fromarray(rand_rgb(60, 64)).save(tmp_path / "hr" / "odd.png")
    r = arsr_cli("test", "--config", QUICK_AR, "--config", str(ROOT / "recipes" / "predict.yaml"), "--model.init_args.tokenizer.init_args.weights", "null",
                "--data.init_args.inputs", f"[{tmp_path / 'lr'}]", "--data.init_args.hr_dir", str(tmp_path / "hr"), cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "test/psnr_y" in r.stdout  # the good pair was evaluated
    assert f"arsr test: 1 pair(s) skipped, not in the scores:\n  {tmp_path / 'lr' / 'odd.png'}: mis_sized: HR odd.png is 64x60, not 4x the LR 16x16" in r.stderr


def test_null_for_a_nested_optional_string_is_none(capsys):
    """jsonargparse reads a nested `null` as 'None'; arsr passes it in the form jsonargparse reads right."""
    assert main(["fit", "--config", QUICK_AR, "--model.init_args.tokenizer.init_args.weights", "null",
                 "--model.init_args.training.init_from=null", "--print_config"]) == 0
    m = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert m["tokenizer"]["init_args"]["weights"] is None and m["training"]["init_from"] is None
    assert m["tokenizer"]["init_args"]["ch"] == 32  # the rest of the tokenizer's settings stay


def test_flags_of_the_earlier_layout_move_and_old_configs_name_the_new_place(tmp_path, capsys):
    assert main(["fit", "--config", QUICK_AR, "--model.init_args.tokenizer_from", "null", "--model.init_args.init_from", "w.safetensors",
                 "--model.init_args.image_log_every=3", "--print_config"]) == 0
    out, err = capsys.readouterr()
    m = yaml.safe_load(out)["model"]["init_args"]
    assert m["tokenizer"]["init_args"]["weights"] is None and m["training"]["init_from"] == "w.safetensors"
    assert m["training"]["image_log_every"] == 3
    assert "arsr: note: --model.init_args.tokenizer_from is now --model.init_args.tokenizer.init_args.weights; using it there" in err
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  init_args:\n    tokenizer_from: t.safetensors\n")
    assert main(["fit", "--config", QUICK_AR, "--config", str(old)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "Option 'tokenizer_from' is not accepted; a tokenizer carries its weights: tokenizer.init_args.weights" in line


def test_null_two_components_deep_is_none(capsys):
    assert main(["fit", "--config", str(ROOT / "recipes" / "nsarm_stage2.yaml"), "--print_config",
                 "--model.init_args.transformer.init_args.text.init_args.prompt", "null"]) == 0
    t = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["transformer"]["init_args"]
    assert t["text"]["init_args"]["prompt"] is None and t["depth"] == 32 and t["text"]["init_args"]["max_len"] == 512
