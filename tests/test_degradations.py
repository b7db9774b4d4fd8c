import math

import pytest
import torch

from arsr.components.degradations import BicubicDegradation, RealESRGANDegradation
from arsr.components.degradations import upsample
from arsr.components.degradations.kernels import KERNEL_TYPES, SampleDraws, gaussian_family_kernels, random_mixed_kernels, sinc_kernels
from arsr.components.degradations.realesrgan import usm_sharpen


def hr_batch(b=6, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear").clamp(0, 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_shapes_range_and_quantisation():
    d = RealESRGANDegradation(scale=4)
    out = d(hr_batch(), gen(0))
    assert out.lr.shape == (6, 3, 16, 16) and out.lr_up.shape == (6, 3, 64, 64) and out.hr.shape == (6, 3, 64, 64)
    assert out.lr.min() >= 0 and out.lr.max() <= 1
    assert torch.allclose(out.lr * 255, (out.lr * 255).round(), atol=1e-4)  # 8-bit levels
    assert out.degraded.dtype == torch.bool and out.degraded.all()


def test_deterministic_under_seed_and_varies_otherwise():
    d, x = RealESRGANDegradation(), hr_batch()
    a, b, c = d(x, gen(7)), d(x, gen(7)), d(x, gen(8))
    assert torch.equal(a.lr, b.lr)
    assert not torch.equal(a.lr, c.lr)


def test_per_sample_variety():
    d = RealESRGANDegradation()
    x = hr_batch(8).mean(0, keepdim=True).expand(8, -1, -1, -1).contiguous()  # identical inputs
    out = d(x, gen(3))
    diffs = [(out.lr[i] - out.lr[0]).abs().mean().item() for i in range(1, 8)]
    assert min(diffs) > 1e-3  # every sample degraded differently
    assert len(set(out.params["jpeg_quality1"].tolist())) == 8
    assert len(set(out.params["sigma_x1"].tolist())) == 8


def test_every_branch_is_reached():
    d = RealESRGANDegradation(clean_prob=0.3)
    seen: dict[str, set] = {k: set() for k in ("type1", "gauss1", "gray1", "blur2", "sinc3", "jpeg_first", "clean", "resize1")}
    for seed in range(12):
        p = d(hr_batch(8, 32), gen(seed)).params
        seen["type1"] |= set(p["kernel_type1"].tolist()) | set(p["kernel_type2"].tolist())
        seen["gauss1"] |= set(p["gaussian_noise1"].tolist())
        seen["gray1"] |= set(p["gray_noise1"].tolist())
        seen["blur2"] |= set(p["second_blur"].tolist())
        seen["sinc3"] |= set(p["final_sinc"].tolist())
        seen["jpeg_first"] |= set(p["final_jpeg_first"].tolist())
        seen["clean"] |= set(p["clean"].tolist())
        seen["resize1"] |= {"up" if r > 1 else "down" if r < 1 else "keep" for r in p["resize1"].tolist()}
    assert seen["type1"] == {-1, 0, 1, 2, 3, 4, 5}  # sinc and all six Gaussian-family types
    for k in ("gauss1", "gray1", "blur2", "sinc3", "jpeg_first", "clean"):
        assert seen[k] == {True, False}, k
    assert seen["resize1"] == {"up", "down", "keep"}


def test_clean_branch_is_bilinear_and_flagged():
    d = RealESRGANDegradation(clean_prob=1.0)
    x = hr_batch(3)
    out = d(x, gen(0))
    assert not out.degraded.any()
    ref = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True)
    assert torch.allclose(out.lr, (ref * 255).round() / 255, atol=1 / 255 + 1e-6)


def test_sharpen_gt_and_defaults_match_realesrgan_x4plus():
    d = RealESRGANDegradation()
    c = d.cfg
    assert c["resize_prob"] == (0.2, 0.7, 0.1) and c["resize_range"] == (0.15, 1.5) and c["noise_range"] == (1.0, 30.0)
    assert c["poisson_scale_range"] == (0.05, 3.0) and c["jpeg_range"] == (30.0, 95.0) and c["second_blur_prob"] == 0.8
    assert c["resize_prob2"] == (0.3, 0.4, 0.3) and c["resize_range2"] == (0.3, 1.2) and c["noise_range2"] == (1.0, 25.0)
    assert c["poisson_scale_range2"] == (0.05, 2.5) and c["final_sinc_prob"] == 0.8 and c["blur_sigma2"] == (0.2, 1.5)
    assert c["kernel_prob"] == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03) and c["degrade_from_usm"] and c["gray_noise_prob"] == 0.4
    x = hr_batch(2)
    out = RealESRGANDegradation(sharpen_gt=True)(x, gen(0))
    assert torch.allclose(out.hr, usm_sharpen(x)) and not torch.allclose(out.hr, x)
    assert not d.cfg["sharpen_gt"]  # x4plus trains against the USM GT: arsr's one departure from its defaults
    assert d.cfg["kernel_list2"] == d.cfg["kernel_list"] and d.cfg["kernel_prob2"] == d.cfg["kernel_prob"]


def test_kernels_normalised_and_windowed():
    d = SampleDraws(list(range(64)))
    k, p = random_mixed_kernels(d, KERNEL_TYPES, (0.45, 0.25, 0.12, 0.03, 0.12, 0.03), (0.2, 3.0), (0.5, 4.0), (1.0, 2.0), 0.1, (7, 21), "cpu")
    assert torch.allclose(k.sum((-2, -1)), torch.ones(64), atol=1e-5)
    for i in range(64):
        half = int(p["kernel_size"][i]) // 2
        inside = k[i, 10 - half : 11 + half, 10 - half : 11 + half].sum()
        assert math.isclose(float(inside), 1.0, rel_tol=1e-5)


def test_gaussian_kernel_equals_small_grid_then_pad():
    sx, sy, th = torch.tensor([1.3]), torch.tensor([0.6]), torch.tensor([0.7])
    k21 = gaussian_family_kernels(torch.tensor([0]), sx, sy, th, torch.ones(1), torch.tensor([7]))[0]
    # direct formula on a 7x7 grid with Sigma = R diag(sx^2, sy^2) R^T, then zero-padded
    r = torch.arange(7.0) - 3
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    R = torch.tensor([[math.cos(0.7), -math.sin(0.7)], [math.sin(0.7), math.cos(0.7)]])
    inv = torch.linalg.inv(R @ torch.diag(torch.tensor([1.3**2, 0.6**2])) @ R.T)
    pts = torch.stack([xx, yy], -1)
    q = torch.einsum("...i,ij,...j->...", pts, inv, pts)
    k7 = torch.exp(-0.5 * q)
    k7 = k7 / k7.sum()
    assert torch.allclose(k21[7:14, 7:14], k7, atol=1e-6) and k21.sum() == pytest.approx(1.0)


def test_sinc_kernel_centre_and_symmetry():
    k = sinc_kernels(torch.tensor([math.pi / 2]), torch.tensor([21]))[0]
    assert torch.allclose(k, k.flip(0)) and torch.allclose(k, k.T)
    assert k.argmax() == 10 * 21 + 10


def test_bicubic_and_size_check():
    out = BicubicDegradation(2)(hr_batch(2, 32))
    assert out.lr.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="not divisible"):
        RealESRGANDegradation(scale=4)(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError, match="sum to 1"):
        RealESRGANDegradation(resize_prob=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("gaussian", [True, False], ids=["gaussian", "poisson"])
def test_gray_noise_is_one_field_in_three_channels(gaussian):
    from arsr.components.degradations.realesrgan import add_noise

    x = 0.3 + 0.4 * hr_batch(4, 32)
    prob, sizes = 1.0 if gaussian else 0.0, [(32, 32)] * 4
    gray, p = add_noise(x, sizes, SampleDraws([0, 1, 2, 3]), prob, (10.0, 10.0), (1.0, 1.0), 1.0)
    noise = gray - x
    assert p["gray_noise"].all() and noise.abs().max() > 0.01
    torch.testing.assert_close(noise[:, 1], noise[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(noise[:, 2], noise[:, 0], atol=1e-6, rtol=0)
    colour = add_noise(x, sizes, SampleDraws([0, 1, 2, 3]), prob, (10.0, 10.0), (1.0, 1.0), 0.0)[0] - x
    assert (colour[:, 1] - colour[:, 0]).abs().max() > 0.01


def test_a_sample_degrades_the_same_in_any_batch():
    """Every draw of a sample depends on its seed alone: alone, in another batch, at another place."""
    d = RealESRGANDegradation(clean_prob=0.2, upsample_mode="random")
    x = hr_batch(8, 64)
    seeds = [101, 202, 303, 404, 505, 606, 707, 808]
    full = d(x, seeds=seeds)
    other = d(torch.cat([hr_batch(3, 64, seed=9), x[5:6], x[2:3]]), seeds=[1, 2, 3, 606, 303])
    alone = d(x[5:6], seeds=[606])
    for i, j in ((5, 3), (2, 4)):
        assert torch.equal(full.lr[i], other.lr[j]) and torch.equal(full.lr_up[i], other.lr_up[j])
        assert full.params["resize1"][i] == other.params["resize1"][j]
    assert torch.equal(full.lr[5], alone.lr[0]) and torch.equal(full.lr_up[5], alone.lr_up[0])
    # the batch covers different intermediate sizes, both final orders and both noise types
    assert len(set(full.params["resize1"].tolist())) == 8 and len(set(full.params["final_jpeg_first"].tolist())) == 2
    assert len(set(full.params["gaussian_noise1"].tolist() + full.params["gaussian_noise2"].tolist())) == 2


def test_no_host_sync_in_the_degradation(monkeypatch):
    """With per-sample seeds (as the data module passes them) arsr's degradation code reads no image-side
    value back: decisions are host-side draws (float64 / long / bool on the CPU); images, kernels and
    noise are float32. (Kornia's own range checks read CPU tensors only.)"""
    import sys

    def guard(name):
        original = getattr(torch.Tensor, name)

        def checked(t, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "components/degradations" in caller and t.dtype not in ((torch.float64, torch.int64, torch.bool) if name == "tolist" else (torch.float64,)):
                raise AssertionError(f"host sync: Tensor.{name} on a {t.dtype} tensor {tuple(t.shape)}")
            return original(t, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, checked)

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        guard(name)
    RealESRGANDegradation(clean_prob=0.3, upsample_mode="random")(hr_batch(6, 32), seeds=[1, 2, 3, 4, 5, 6])


def test_poisson_only_for_the_samples_that_use_it(monkeypatch):
    calls = []
    poisson = torch.poisson
    monkeypatch.setattr(torch, "poisson", lambda x, generator=None: calls.append(x.shape) or poisson(x, generator=generator))
    out = RealESRGANDegradation(gaussian_noise_prob=1.0, gaussian_noise_prob2=1.0)(hr_batch(4, 32), seeds=[1, 2, 3, 4])
    assert calls == [] and out.params["gaussian_noise1"].all()
    p = RealESRGANDegradation(gaussian_noise_prob=0.5, gaussian_noise_prob2=1.0)(hr_batch(8, 32), seeds=list(range(8))).params
    assert len(calls) == int((~p["gaussian_noise1"]).sum()) and 0 < len(calls) < 8  # one per Poisson sample of stage 1


def test_second_stage_kernel_list():
    d = RealESRGANDegradation(kernel_list2=("iso", "plateau_aniso"), kernel_prob2=(0.5, 0.5), sinc_prob2=0.0)
    p = d(hr_batch(16, 32), seeds=list(range(16))).params
    assert set(p["kernel_type2"].tolist()) == {0, 5} and len(set(p["kernel_type1"].tolist())) > 2
    with pytest.raises(ValueError, match="kernel_list2"):
        RealESRGANDegradation(kernel_list2=("iso", "box"), kernel_prob2=(0.5, 0.5))
    with pytest.raises(ValueError, match="kernel_prob2"):
        RealESRGANDegradation(kernel_prob2=(0.5, 0.6, 0.0, 0.0, 0.0, 0.0))


def test_upsample_modes_and_random_per_sample():
    lr = hr_batch(6, 16)
    for mode in ("bicubic", "bilinear", "area"):
        up = upsample(lr, (64, 64), mode)
        kw = {} if mode == "area" else {"align_corners": False}
        ref = torch.nn.functional.interpolate(lr, size=(64, 64), mode=mode, **kw).clamp(0, 1)
        assert torch.equal(up, (ref * 255).round() / 255)
    assert torch.equal(upsample(lr, (64, 64), "random"), upsample(lr, (64, 64), "bicubic"))  # inference: bicubic
    mixed = upsample(lr, (64, 64), ["area", "bicubic", "bilinear", "area", "bicubic", "bilinear"])
    assert torch.equal(mixed[1], upsample(lr[1:2], (64, 64), "bicubic")[0])
    assert torch.equal(mixed[3], upsample(lr[3:4], (64, 64), "area")[0])
    # the degradation's random mode: one of the three per sample, seeded, 8-bit
    for deg in (BicubicDegradation(4, upsample_mode="random"), RealESRGANDegradation(upsample_mode="random")):
        out = deg(hr_batch(6, 64), seeds=list(range(6)))
        per_mode = {m: upsample(out.lr, (64, 64), m) for m in ("area", "bilinear", "bicubic")}
        used = [next(m for m, u in per_mode.items() if torch.equal(u[i], out.lr_up[i])) for i in range(6)]
        assert len(set(used)) > 1
        assert torch.equal(deg(hr_batch(6, 64), seeds=list(range(6))).lr_up, out.lr_up)
    with pytest.raises(ValueError, match="upsample_mode"):
        RealESRGANDegradation(upsample_mode="nearest")


def test_degradations_never_wait_for_the_device():
    """Every random draw is made on the host from the per-sample seeds; the images themselves are never
    read back (the batch is a stand-in device tensor that raises on .item(), .tolist(), if t:, ...)."""
    from arsr.testing import on_device

    hr = on_device(torch.rand(3, 3, 64, 64))
    for d in (RealESRGANDegradation(clean_prob=0.3, upsample_mode="random"), BicubicDegradation(4, upsample_mode="random")):
        out = d(hr, seeds=[1, 2, 3])
        assert type(out.lr).__name__ == "DeviceTensor" and out.lr.shape == (3, 3, 16, 16)
