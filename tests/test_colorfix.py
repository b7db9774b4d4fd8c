"""Colour-fix post-processing against values derived by hand."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from arsr.components.postprocess import AdaINColorFix, ColorFix, WaveletColorFix
from arsr.components.postprocess.colorfix import atrous_blur, reference_at, split_frequencies
from arsr.postprocess import PostProcess


def impulse(side: int, at: tuple[int, int]) -> torch.Tensor:
    x = torch.zeros(1, 1, side, side, dtype=torch.float64)
    x[0, 0, at[0], at[1]] = 1.0
    return x


def test_atrous_blur_impulse_and_border():
    for d in (1, 2, 4):
        out = atrous_blur(impulse(11, (5, 5)), d)[0, 0]
        expect = torch.zeros(11, 11, dtype=torch.float64)
        for i, wi in zip((-d, 0, d), (1, 2, 1)):
            for j, wj in zip((-d, 0, d), (1, 2, 1)):
                expect[5 + i, 5 + j] = wi * wj / 16  # 0.25 centre, 0.125 edges, 0.0625 corners
        assert torch.equal(out, expect)
    # corner impulse, replicate padding: rows/cols -1 and 0 both read pixel 0 -> (1+2)/4 * (1+2)/4
    assert atrous_blur(impulse(4, (0, 0)), 1)[0, 0, 0, 0].item() == pytest.approx(9 / 16)


def test_two_level_low_band_of_impulse():
    """[1,2,1]/4 (dilation 1) convolved with [1,0,2,0,1]/4 (dilation 2) = [1,2,3,4,3,2,1]/16 per axis."""
    high, low = split_frequencies(impulse(15, (7, 7)), levels=2)
    k = torch.tensor([1, 2, 3, 4, 3, 2, 1], dtype=torch.float64) / 16
    expect = torch.zeros(15, 15, dtype=torch.float64)
    expect[4:11, 4:11] = k[:, None] * k[None, :]
    assert torch.allclose(low[0, 0], expect, atol=1e-15)
    assert torch.allclose(high + low, impulse(15, (7, 7)), atol=1e-15)


def test_split_is_exact_and_constants_are_low():
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    high, low = split_frequencies(x)
    assert torch.allclose(high + low, x, atol=1e-14)
    high, low = split_frequencies(torch.full((1, 3, 20, 20), 0.7, dtype=torch.float64))
    assert torch.allclose(low, torch.tensor(0.7, dtype=torch.float64)) and high.abs().max() < 1e-14


def test_adain_hand_values():
    sr = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    lr = torch.tensor([0.2, 0.2, 0.4, 0.4], dtype=torch.float64).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    # sr: mean 0.375, unbiased var 0.3125/3; lr: mean 0.3, unbiased var 0.04/3; eps 1e-5 inside the sqrt
    scale = math.sqrt(0.04 / 3 + 1e-5) / math.sqrt(0.3125 / 3 + 1e-5)
    expect = torch.tensor([(v - 0.375) * scale + 0.3 for v in (0.0, 0.25, 0.5, 0.75)], dtype=torch.float64)
    out = AdaINColorFix()(sr, lr)
    assert torch.allclose(out[0, 1].flatten(), expect, atol=1e-12)


def test_adain_moments_follow_lr():
    torch.manual_seed(0)
    sr = 0.2 + 0.5 * torch.rand(2, 3, 32, 32, dtype=torch.float64)
    lr = 0.3 + 0.2 * torch.rand(2, 3, 8, 8, dtype=torch.float64)
    out = AdaINColorFix()(sr, lr)  # moments stay inside [0, 1]: no clamping here
    ref = reference_at(lr, (32, 32))
    assert torch.allclose(out.mean((2, 3)), ref.mean((2, 3)), atol=1e-12)
    var_s, var_r = sr.flatten(2).var(-1), ref.flatten(2).var(-1)
    assert torch.allclose(out.flatten(2).var(-1), (var_r + 1e-5) * var_s / (var_s + 1e-5), atol=1e-12)
    # a constant SR carries no colour of its own: it becomes the LR mean
    flat = AdaINColorFix()(torch.full((1, 3, 16, 16), 0.9, dtype=torch.float64), lr[:1])
    assert torch.allclose(flat, reference_at(lr[:1], (16, 16)).mean((2, 3), keepdim=True).expand_as(flat), atol=1e-12)


def test_wavelet_removes_a_colour_cast_exactly():
    lr = 0.2 + 0.5 * torch.rand(1, 3, 24, 24, dtype=torch.float64)
    cast = torch.tensor([0.1, -0.05, 0.2], dtype=torch.float64).view(1, 3, 1, 1)
    # a constant offset lives entirely in the low band (replicate padding keeps constants)
    assert torch.allclose(WaveletColorFix()(lr + cast, lr), lr, atol=1e-12)
    c = torch.full((1, 3, 24, 24), 0.4, dtype=torch.float64)
    assert torch.allclose(WaveletColorFix()(torch.full_like(c, 0.8), c), c)


def test_reference_resize_is_pil_bicubic():
    a = np.random.default_rng(0).random((10, 14)).astype(np.float32)
    pil = np.asarray(Image.fromarray(a, mode="F").resize((56, 40), Image.BICUBIC))
    ours = reference_at(torch.from_numpy(a)[None, None], (40, 56))[0, 0].numpy()
    inside = (pil >= 0) & (pil <= 1)  # ours is clamped to [0, 1]
    assert np.abs(pil - ours)[inside].max() < 1e-5


def test_colorfix_composes_and_switches():
    sr, lr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8)
    both = ColorFix()(sr, lr)
    assert both.shape == sr.shape and both.min() >= 0 and both.max() <= 1
    assert torch.allclose(both, WaveletColorFix()(AdaINColorFix()(sr, lr), lr), atol=1e-6)
    assert torch.allclose(ColorFix(wavelet=False)(sr, lr), AdaINColorFix()(sr, lr))
    assert torch.allclose(ColorFix(adain=False)(sr, lr), WaveletColorFix()(sr, lr))
    assert torch.equal(ColorFix(adain=False, wavelet=False)(sr, lr), sr)
    assert all(isinstance(m, PostProcess) for m in (ColorFix(), AdaINColorFix(), WaveletColorFix()))
