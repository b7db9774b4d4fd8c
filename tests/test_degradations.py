import math

import pytest
import torch

from arsr.components.degradations import BicubicDegradation, RealESRGANDegradation
from arsr.components.degradations.kernels import gaussian_family_kernels, random_mixed_kernels, sinc_kernels
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
        seen["jpeg_first"].add(bool(p["final_jpeg_first"]))
        seen["clean"] |= set(p["clean"].tolist())
        r = float(p["resize1"])
        seen["resize1"].add("up" if r > 1 else "down" if r < 1 else "keep")
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


def test_kernels_normalised_and_windowed():
    g = gen(0)
    k, p = random_mixed_kernels(64, (0.45, 0.25, 0.12, 0.03, 0.12, 0.03), (0.2, 3.0), (0.5, 4.0), (1.0, 2.0), 0.1, (7, 21), g, "cpu")
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
    prob = 1.0 if gaussian else 0.0
    gray, p = add_noise(x, prob, (10.0, 10.0), (1.0, 1.0), 1.0, gen(0))
    noise = gray - x
    assert p["gray_noise"].all() and noise.abs().max() > 0.01
    torch.testing.assert_close(noise[:, 1], noise[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(noise[:, 2], noise[:, 0], atol=1e-6, rtol=0)
    colour = add_noise(x, prob, (10.0, 10.0), (1.0, 1.0), 0.0, gen(0))[0] - x
    assert (colour[:, 1] - colour[:, 0]).abs().max() > 0.01
