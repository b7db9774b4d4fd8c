"""NSARM-style robustness report: perceptual score, sorted curve, cases; no-reference folders."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from arsr.evaluate import Report, add_no_reference, add_perceptual, evaluate_folders, write_report
from arsr.metrics import LearnedMetrics
from conftest import ROOT


def brightness(x: torch.Tensor) -> torch.Tensor:
    """A tiny no-reference metric: mean intensity per image."""
    return x.mean(dim=(1, 2, 3))


def gray_folder(path, levels):
    path.mkdir()
    for k, v in enumerate(levels):
        Image.fromarray(np.full((32, 32, 3), v, np.uint8)).save(path / f"im{k}.png")
    return path


# a narrow MUSIQ (pyiqa's architecture, its sizes as create_metric kwargs) to keep the test fast
TINY_MUSIQ = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1, num_scales=2, longer_side_lengths=[64])


@pytest.fixture(scope="module")
def tool():
    """tools/eval_report.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location("eval_report", ROOT / "tools" / "eval_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def musiq_file(tmp_path_factory):
    """MUSIQ weights as a local file (random init: this checks the plumbing, not the numbers)."""
    pyiqa = pytest.importorskip("pyiqa")
    path = tmp_path_factory.mktemp("w") / "musiq_random.pth"
    torch.save(pyiqa.create_metric("musiq", device="cpu", pretrained=False, **TINY_MUSIQ).net.state_dict(), path)
    return str(path)


def test_perceptual_score_and_cases_by_hand():
    per_image = {"a": {"clipiqa": 0.8, "musiq": 60.0, "maniqa": 0.5, "topiq_nr": 0.7, "psnr_y": 30.0},
                 "b": {"clipiqa": 0.2, "musiq": 20.0, "maniqa": 0.1, "topiq_nr": 0.3}}
    used = add_perceptual(per_image, {"clipiqa": 1.0, "musiq": 100.0, "maniqa": 1.0, "topiq_nr": 1.0})
    assert used == ["clipiqa", "musiq", "maniqa", "topiq_nr"]
    assert per_image["a"]["perceptual"] == pytest.approx((0.8 + 0.6 + 0.5 + 0.7) / 4)  # 0.65
    assert per_image["b"]["perceptual"] == pytest.approx((0.2 + 0.2 + 0.1 + 0.3) / 4)  # 0.2
    r = Report(per_image=per_image).summary()["perceptual"]  # mean 0.425: b < 0.9, 0.75, 0.5 x mean
    assert r["mean"] == pytest.approx(0.425) and r["variance"] == pytest.approx(0.225**2)
    assert (r["deficient"], r["poor"], r["collapse"]) == (1, 1, 1)
    r = Report(per_image=per_image, levels={"deficient": 0.9, "severe": 0.4}).summary()["perceptual"]
    assert (r["deficient"], r["severe"]) == (1, 0)  # 0.2 > 0.4 x 0.425
    # a configured metric that some image lacks is left out; none left -> no score
    assert add_perceptual({"a": {"musiq": 50.0}}, {"musiq": 100.0, "maniqa": 1.0}) == ["musiq"]
    assert add_perceptual({"a": {"psnr_y": 1.0}}, {"musiq": 100.0}) == []


def test_no_reference_folder_report(tmp_path):
    """SR images without HR: the full-reference metrics are skipped, the NR score drives the report."""
    sr = gray_folder(tmp_path / "sr", [200, 200, 200, 200, 170, 140, 90])  # 8-bit levels
    metrics = LearnedMetrics()
    add_no_reference(metrics, {"bright": brightness})
    rep = evaluate_folders(str(sr), metrics=metrics, perceptual={"bright": 1.0})
    assert set(rep.per_image) == {f"im{k}" for k in range(7)}
    for m in ("psnr_y", "ssim_y", "lpips", "fid"):
        assert rep.metrics_skipped[m] == "no HR folder (no-reference evaluation)"
    r = rep.summary()["perceptual"]
    mean = 1200 / 7 / 255  # 0.9 x = 154.3, 0.75 x = 128.6, 0.5 x = 85.7 (in 8-bit levels)
    assert r["mean"] == pytest.approx(mean)
    assert (r["deficient"], r["poor"], r["collapse"]) == (2, 1, 0)  # 140 and 90; 90; none
    paths = write_report(rep, tmp_path / "report")
    with Image.open(paths["curve"]) as png:
        assert png.format == "PNG" and png.size == (700, 400)
    md = paths["markdown"].read_text()
    assert "| Deficient | < 0.9 x mean" in md and "| Poor | < 0.75 x mean = " in md and "perceptual = mean(bright)" in md
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["perceptual"]["deficient"] == 2 and data["fid"] is None
    with pytest.raises(ValueError, match="no HR folder and no no-reference metric"):
        evaluate_folders(str(sr), metrics=LearnedMetrics())


def test_cli_with_a_local_pyiqa_metric(tmp_path, musiq_file, capsys, tool):
    """tools/eval_report.py on an SR-only folder with MUSIQ built from a local file (no download)."""
    sr = tmp_path / "sr"
    sr.mkdir()
    for k in range(3):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(sr / f"x{k}.png")
    summary = tool.report(str(sr), out_dir=str(tmp_path / "rep"),
                          pyiqa={"musiq": {"pretrained_model_path": musiq_file, **TINY_MUSIQ}, "topiq_nr": str(tmp_path / "missing.pth")})
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert "topiq_nr" in data["skipped_metrics"] and "not found" in data["skipped_metrics"]["topiq_nr"]
    for scores in data["per_image"].values():  # only MUSIQ of the default list was computed
        assert scores["perceptual"] == pytest.approx(scores["musiq"] / 100)
    assert summary["musiq"]["variance"] >= 0 and (tmp_path / "rep" / "perceptual_curve.png").is_file()
    assert "skipped psnr_y: no HR folder" in capsys.readouterr().out


def _noisy_folder(path, hr_dir, amounts, seed):
    """SR images = HR + uniform noise of the given amplitude per image (more noise, lower PSNR)."""
    path.mkdir()
    for k, a in enumerate(amounts):
        hr = np.asarray(Image.open(hr_dir / f"im{k}.png")).astype(int)
        noise = np.random.default_rng(seed + k).integers(-a, a + 1, hr.shape)
        Image.fromarray(np.clip(hr + noise, 0, 255).astype(np.uint8)).save(path / f"im{k}.png")
    return path


@pytest.mark.parametrize("with_hr", [True, False])
def test_two_method_comparison(tmp_path, with_hr, monkeypatch, tool):
    """tools/eval_report.py --sr a=... --sr b=... with and without HR: tables against the global mean, figures."""
    hr = tmp_path / "hr"
    hr.mkdir()
    for k in range(4):
        Image.fromarray(np.random.default_rng(k).integers(60, 200, (32, 32, 3), dtype=np.uint8)).save(hr / f"im{k}.png")
    good = _noisy_folder(tmp_path / "good", hr, [1, 2, 2, 3], 0)
    bad = _noisy_folder(tmp_path / "bad", hr, [4, 30, 60, 90], 10)
    out = tmp_path / "cmp"
    args = ["--sr", f"good={good}", "--sr", f"bad={bad}", "--out_dir", str(out), "--worst", "2"]
    if not with_hr:  # a cheap no-reference "metric" through the same path: mean brightness
        monkeypatch.setattr(tool, "add_no_reference", lambda metrics, specs: add_no_reference(metrics, {"bright": brightness}))
        args += ["--perceptual", "{bright: 1}"]
    else:
        args += ["--hr_dir", str(hr)]
    assert tool.main(args) == 0
    paths = {p.name for p in out.iterdir()}
    assert paths == {"comparison.json", "comparison.md", "comparison.csv", "sorted_curves.png", "distributions.png", "worst_cases.png"}
    data = json.loads((out / "comparison.json").read_text())
    md = (out / "comparison.md").read_text()
    rows = (out / "comparison.csv").read_text().splitlines()
    assert rows[0].startswith("method,metric,n,mean,variance")
    if with_hr:
        s, g = data["summary"], data["global_means"]
        assert s["good"]["psnr_y"]["mean"] > s["bad"]["psnr_y"]["mean"]
        per = [v["psnr_y"] for m in ("good", "bad") for v in data["methods"][m]["per_image"].values()]
        assert g["psnr_y"] == pytest.approx(np.mean(per))  # the global mean pools both methods
        for m in ("good", "bad"):  # cases counted against the global mean, not the method's own
            vals = [v["psnr_y"] for v in data["methods"][m]["per_image"].values()]
            assert s[m]["psnr_y"]["deficient"] == sum(v < 0.9 * g["psnr_y"] for v in vals)
            assert s[m]["psnr_y"]["variance"] == pytest.approx(np.var(vals))
        assert s["good"]["psnr_y"]["deficient"] == 0 and s["bad"]["psnr_y"]["deficient"] >= 2
        assert "| good | 4 |" in md and "### psnr_y ↑: global mean" in md and "Deficient (< " in md
        assert len(rows) == 1 + 2 * 2  # psnr_y, ssim_y per method
    else:
        assert "no HR folder" in md and "psnr_y" not in data["summary"]["good"]
        assert set(data["summary"]["good"]) == {"bright", "perceptual"} and md.index("### perceptual") < md.index("### bright")
        assert "skipped" not in data and data["methods"]["bad"]["skipped_metrics"]["psnr_y"] == "no HR folder (no-reference evaluation)"
    with Image.open(out / "worst_cases.png") as im:
        assert im.size[1] == 2 * 240  # one row per method
    assert tool.main(["--sr", f"good={good}", "--sr_dir", str(bad), "--out_dir", str(out)]) == 2
