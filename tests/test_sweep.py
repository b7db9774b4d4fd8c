"""arsr-sweep: a 2-point grid on the quickstart's tiny settings writes its summary; a rerun skips both."""

import json

from arsr.sweep import main, parse_grid, random_points

from conftest import ROOT, SAMPLE

POS = "model.init_args.transformer.init_args.pos_enc"
TINY = ["--model.init_args.tokenizer.init_args.weights", "null", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1",
        "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1", "--model.init_args.inference.val_samples", "0",
        "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
        "--data.init_args.train_shards", str(SAMPLE / "train-{000000..000001}.tar"),
        "--data.init_args.val_shards", str(SAMPLE / "val-000000.tar")]


def test_two_point_grid_summary_and_resume(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--out_dir", str(out), "--in_process",
            "--grid", f"{POS}=arsr.components.posenc.SARoPE,arsr.components.posenc.AbsolutePerScale", *TINY]
    assert main(args) == 0
    names = ["p000-pos_enc=SARoPE", "p001-pos_enc=AbsolutePerScale"]
    for name in names:
        done = json.loads((out / name / "done.json").read_text())
        assert set(done["metrics"]) >= {"val/ce", "val/acc"}
        cfg = (out / name / "sweep_config.yaml").read_text()
        assert f"name: {name}" in cfg and "seed_everything: 0" in cfg
        assert list((out / name).rglob("events.out.tfevents.*")) and list((out / name).rglob("last.safetensors"))
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("point,pos_enc,status,seconds,val/acc,val/ce") and len(rows) == 3
    assert "| p001-pos_enc=AbsolutePerScale | AbsolutePerScale | done |" in (out / "summary.md").read_text()
    assert (out / "summary.png").stat().st_size > 0
    capsys.readouterr()
    assert main(args) == 0  # rerun: both points skipped, same summary
    assert capsys.readouterr().out.count("done earlier, skipped") == 2
    assert (out / "summary.csv").read_text().splitlines()[1].split(",")[:3] == ["p000-pos_enc=SARoPE", "arsr.components.posenc.SARoPE", "done (earlier)"]


def test_random_points_are_seeded_and_distinct():
    grid = parse_grid([f"{POS}=a.B,a.C", "data.init_args.batch_size=2,4"])
    ranges = {"model.init_args.optimizer.init_args.lr": (1e-4, 1e-2, True, False)}
    a, b = random_points(5, grid, ranges, seed=3), random_points(5, grid, ranges, seed=3)
    assert [p.values for p in a] == [p.values for p in b] and len({tuple(p.values.values()) for p in a}) == 5
    assert all(1e-4 <= float(p.values["model.init_args.optimizer.init_args.lr"]) <= 1e-2 for p in a)
    assert [p.values for p in random_points(5, grid, ranges, seed=4)] != [p.values for p in a]
    assert len(random_points(9, grid, {}, seed=0)) == 4  # only 4 distinct points exist
