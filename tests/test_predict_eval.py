"""Metrics against hand computations, seamless tiling, multi-scale outputs, writer, reports, bad inputs."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from arsr.evaluate import evaluate_folders, robustness, write_report
from arsr.metrics import LearnedMetrics, psnr, rgb_to_y, ssim
from arsr.predict import ImageFolderInput, SRWriter, tiled_fhat

from conftest import rand_rgb


def test_psnr_y_hand_computed():
    hr = torch.zeros(1, 3, 8, 8)
    sr = torch.full((1, 3, 8, 8), 10 / 255)
    dy = (65.481 + 128.553 + 24.966) * 10 / 255  # Y difference of a grey offset of 10 levels
    assert psnr(sr, hr).item() == pytest.approx(20 * math.log10(255 / dy), abs=1e-5)  # float32 inputs
    assert rgb_to_y(torch.ones(1, 3, 1, 1)).item() == pytest.approx(235.0)
    # a difference confined to the border disappears with crop_border
    sr = hr.clone()
    sr[..., :2, :] = 1.0
    assert psnr(sr, hr, crop_border=2).item() == pytest.approx(10 * math.log10(255**2 / 1e-10))
    assert psnr(sr, hr).item() < 20
    # RGB mode: plain 8-bit MSE
    sr = torch.full((1, 3, 8, 8), 5 / 255)
    assert psnr(sr, hr, y_channel=False).item() == pytest.approx(20 * math.log10(255 / 5), abs=1e-5)


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Direct MATLAB-formula SSIM with explicit 11x11 windows ('valid'), float64."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            mu_a, mu_b = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - mu_a**2, (w * pb * pb).sum() - mu_b**2
            cov = (w * pa * pb).sum() - mu_a * mu_b
            vals.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_y_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(1, 3, 16, 16, generator=g)
    sr = (hr + 0.1 * torch.randn(1, 3, 16, 16, generator=g)).clamp(0, 1)
    q = lambda t: (t * 255).round() / 255
    y = lambda t: (16 + (q(t)[0].double().permute(1, 2, 0).numpy() * np.array([65.481, 128.553, 24.966])).sum(-1))
    assert ssim(sr, hr).item() == pytest.approx(_ssim_reference(y(sr), y(hr)), abs=1e-10)
    assert ssim(hr, hr).item() == pytest.approx(1.0)


def test_tiling_an_identity_model_is_seamless():
    img = torch.rand(1, 3, 40, 56)
    out = tiled_fhat(lambda t: t, img, tile=16, overlap=6, downsample=1, batch=3)
    assert out.shape == img.shape and torch.allclose(out, img, atol=1e-6)


def test_tiling_blends_overlaps():
    img = torch.zeros(1, 1, 8, 12)
    calls = []

    def fake(t):
        calls.append(len(t))
        return torch.ones_like(t) * torch.arange(len(t)).view(-1, 1, 1, 1).float()

    out = tiled_fhat(fake, img, tile=8, overlap=4, downsample=1, batch=8)
    assert calls == [2]  # tiles at x = 0 and 4, batched together
    assert out[0, 0, :, 0].eq(0).all() and out[0, 0, :, -1].eq(1).all()
    mid = out[0, 0, 4, 4:8]
    assert (mid > 0).all() and (mid < 1).all() and (mid.diff() > 0).all()  # smooth hand-over


@pytest.fixture
def tiny_msvar():
    from arsr.components.conditioning import DegradationClasses, EncoderFeatures
    from arsr.components.heads import IndexHead
    from arsr.components.posenc import LearnedResampled
    from arsr.components.quantizers import HierarchicalRQ
    from arsr.nn.transformer import NextScaleTransformer
    from arsr.nn.vae import HierarchicalVQVAE
    from arsr.tasks.ar import ARFinetune, Inference, Training

    torch.manual_seed(0)
    pn = (1, 2, 3, 4, 6, 8)
    tok = HierarchicalVQVAE(HierarchicalRQ(32, 8, pn, (2, 4, 8)), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    tr = NextScaleTransformer(LearnedResampled(grid=8), IndexHead(32), EncoderFeatures(grid=8, latent_dim=8), depth=1,
                              width=32, heads=2, latent_dim=8, patch_nums=pn, num_classes=3, null_class=2)
    return ARFinetune(tr, tok, DegradationClasses(), inference=Inference(tile_overlap=2)).eval()


def test_test_step_scores_every_output(tiny_msvar):
    """MSVAR emits 1x / 2x / 4x: each is scored against the HR resized to its size."""
    logged = {}
    tiny_msvar.log = lambda name, value, **k: logged.__setitem__(name, float(value))
    hr = torch.rand(2, 3, 32, 32)
    lr = torch.nn.functional.interpolate(hr, size=(8, 8), mode="area")
    tiny_msvar.test_step({"hr": hr, "lr": lr, "lr_up": torch.nn.functional.interpolate(lr, size=(32, 32), mode="bicubic").clamp(0, 1)}, 0)
    # SSIM needs its 11x11 window inside the border-cropped image: not on the 8 px 1x output
    assert set(logged) == {"test/psnr_y", "test/ssim_y", "test/psnr_y_x1", "test/psnr_y_x2", "test/ssim_y_x2"}
    assert all(v == v for v in logged.values())  # finite numbers, not NaN


def test_multiscale_outputs_have_1x_2x_4x_sizes(tiny_msvar):
    outs = tiny_msvar.super_resolve_any(torch.rand(1, 3, 8, 8))  # native size: 8 px LR -> 32 px
    assert [o.shape[-1] for o in outs] == [8, 16, 32]
    big = tiny_msvar.super_resolve_any(torch.rand(1, 3, 11, 13))  # any other size: tiled
    assert big[-1].shape == (1, 3, 44, 52) and 0 <= big[-1].min() and big[-1].max() <= 1


def test_writer_and_bad_inputs(tmp_path, tiny_msvar):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(rand_rgb(8, 8)).save(src / "good.png")
    (src / "good.txt").write_text("a sharp photo\n")
    Image.fromarray(rand_rgb(8, 8)[..., 0]).save(src / "gray.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.fromarray(rand_rgb(3, 3)).save(src / "tiny.png")
    dm = ImageFolderInput([str(src)], min_size=4)
    items = list(dm.predict_dataloader())
    assert {i.get("name") or i["skipped"].split("/")[-1] for i in items} == {"good", "gray", "broken.jpg", "tiny.png"}
    reasons = {i["skipped"].split("/")[-1]: i["reason"] for i in items if "skipped" in i}
    assert next(i for i in items if i.get("name") == "good")["caption"] == "a sharp photo"
    assert "corrupt" in reasons["broken.jpg"] and "too_small" in reasons["tiny.png"]
    writer = SRWriter(str(tmp_path / "out"))
    for i, item in enumerate(items):
        writer.write_on_batch_end(None, tiny_msvar, tiny_msvar.predict_step(item, i), None, item, i, 0)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["good.png", "good_x1.png", "good_x2.png", "gray.png", "gray_x1.png", "gray_x2.png"]
    assert Image.open(tmp_path / "out" / "good.png").size == (32, 32) and Image.open(tmp_path / "out" / "good_x1.png").size == (8, 8)
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        ImageFolderInput([str(tmp_path / "missing")])


def test_robustness_counts():
    r = robustness([10.0, 10.0, 10.0, 8.0, 1.0], lower_is_better=False)  # mean 7.8
    assert r["mean"] == pytest.approx(7.8) and r["variance"] == pytest.approx(np.var([10, 10, 10, 8, 1]))
    assert (r["deficient"], r["poor"], r["collapse"]) == (1, 1, 1)  # only the 1.0 is below 0.9/0.75/0.5 x mean
    r = robustness([0.1, 0.1, 0.3], lower_is_better=True)  # mean .1667: .3 > mean/0.9, mean/0.75, not > mean/0.5
    assert (r["deficient"], r["poor"], r["collapse"]) == (1, 1, 0)


def test_report_files(tmp_path):
    sr_dir, hr_dir = tmp_path / "sr", tmp_path / "hr"
    sr_dir.mkdir(), hr_dir.mkdir()
    for k in range(4):
        hr = rand_rgb(24, 24, k)
        noisy = np.clip(hr.astype(int) + np.random.default_rng(k).integers(-8 * k - 1, 8 * k + 1, hr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(hr).save(hr_dir / f"im{k}.png")
        Image.fromarray(noisy).save(sr_dir / f"im{k}.png")
    Image.fromarray(rand_rgb(24, 24)).save(sr_dir / "orphan.png")
    Image.fromarray(rand_rgb(20, 20)).save(sr_dir / "wrongsize.png")
    Image.fromarray(rand_rgb(24, 24)).save(hr_dir / "wrongsize.png")
    rep = evaluate_folders(str(sr_dir), str(hr_dir), crop_border=4, metrics=LearnedMetrics())
    paths = write_report(rep, tmp_path / "report")
    data = json.loads(paths["json"].read_text())
    assert set(data["per_image"]) == {"im0", "im1", "im2", "im3"}
    assert set(data["skipped_images"]) == {"orphan", "wrongsize"}
    assert "lpips" in data["skipped_metrics"] and "no local weights" in data["skipped_metrics"]["lpips"]
    psnrs = [data["per_image"][f"im{k}"]["psnr_y"] for k in range(4)]
    assert psnrs == sorted(psnrs, reverse=True)  # more noise, lower PSNR
    md = paths["markdown"].read_text()
    assert "| psnr_y ↑ |" in md and "crop_border=4" in md
    assert Image.open(paths["plot"]).size[1] == 2 * 360  # one panel per metric (psnr_y, ssim_y)


def test_learned_metrics_from_local_files_only(tmp_path):
    """LPIPS and DISTS build from a local VGG16 file (random weights here) without any download."""
    import torchvision

    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path / "vgg16.pth")
    m = LearnedMetrics(lpips_vgg=str(tmp_path / "vgg16.pth"), dists_vgg=str(tmp_path / "vgg16.pth"),
                       fid_inception=str(tmp_path / "missing.pth"))
    assert set(m.full_ref) == {"lpips", "dists"} and "not found" in m.skipped["fid"] and "niqe" in m.skipped
    x = torch.rand(2, 3, 64, 64)
    same, diff = m.update(x, x), m.update(x, (x + 0.2 * torch.randn_like(x)).clamp(0, 1))
    assert same["lpips"].shape == (2,) and same["dists"].shape == (2,)
    assert (same["lpips"].abs() < 1e-5).all() and (diff["lpips"] > same["lpips"]).all()
    assert (diff["dists"] > same["dists"]).all()
