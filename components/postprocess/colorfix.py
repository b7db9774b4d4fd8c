"""Colour fixes NSARM applies to its SR output (from StableSR's practice): AdaIN, then wavelet.

Both take the LR image resized to the SR size as the colour reference. The resize is bicubic
with antialiasing, which is PIL's bicubic filter (what ``Image.resize`` uses by default in the
official ``color_adjust``); arsr keeps float images between the two fixes where the official code
stores an 8-bit image, so results differ from it by at most one 8-bit level per stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from arsr.postprocess import PostProcess


def reference_at(lr: Tensor, size: tuple[int, int]) -> Tensor:
    """lr (B, C, h, w) -> (B, C, *size), PIL-bicubic, clamped to [0, 1] (a no-op at equal size)."""
    if tuple(lr.shape[-2:]) == tuple(size):
        return lr
    return F.interpolate(lr, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def channel_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per image and channel: mean and sqrt(unbiased variance + eps), each (B, C, 1, 1)."""
    flat = x.flatten(2)  # (B, C, H*W)
    mean = flat.mean(-1)
    std = (flat.var(-1, unbiased=True) + eps).sqrt()
    return mean[..., None, None], std[..., None, None]


def adain(sr: Tensor, ref: Tensor, eps: float = 1e-5) -> Tensor:
    """Moves each channel of ``sr`` to the mean / std of the same channel of ``ref``."""
    mu_s, sd_s = channel_stats(sr, eps)
    mu_r, sd_r = channel_stats(ref, eps)
    return (sr - mu_s) / sd_s * sd_r + mu_r


def atrous_blur(x: Tensor, dilation: int) -> Tensor:
    """3x3 B3-spline-like kernel [1,2,1]^T[1,2,1]/16 with holes, replicate padding; (B, C, H, W) kept."""
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=x.dtype, device=x.device)
    kernel = (k1[:, None] * k1[None, :] / 16).expand(x.shape[1], 1, 3, 3)  # depthwise (C, 1, 3, 3)
    x = F.pad(x, (dilation,) * 4, mode="replicate")
    return F.conv2d(x, kernel, dilation=dilation, groups=x.shape[1])


def split_frequencies(x: Tensor, levels: int = 5) -> tuple[Tensor, Tensor]:
    """À-trous decomposition: (high, low) with high = sum of the ``levels`` detail bands and
    low = the residual after blurring with dilations 1, 2, ..., 2^(levels-1); high + low = x."""
    low = x
    for i in range(levels):
        low = atrous_blur(low, 2**i)
    return x - low, low


class AdaINColorFix(PostProcess):
    """Per-channel mean and std of the SR image matched to the LR image's (resized to SR size).

    Args:
        eps: added to each variance (unbiased) before the square root.
    """

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, sr: Tensor, lr: Tensor) -> Tensor:
        return adain(sr, reference_at(lr, sr.shape[-2:]), self.eps).clamp(0, 1)


class WaveletColorFix(PostProcess):
    """SR high frequencies + LR low frequencies (LR resized to SR size), 5-level à-trous split.

    Args:
        levels: number of à-trous levels; the low band is the image blurred with dilations 1..2^(levels-1).
    """

    def __init__(self, levels: int = 5):
        super().__init__()
        self.levels = levels

    def forward(self, sr: Tensor, lr: Tensor) -> Tensor:
        high, _ = split_frequencies(sr, self.levels)
        _, low = split_frequencies(reference_at(lr, sr.shape[-2:]), self.levels)
        return (high + low).clamp(0, 1)


class ColorFix(PostProcess):
    """NSARM's ``color_adjust``: AdaIN fix, then wavelet fix, each switchable.

    Args:
        adain: apply the AdaIN colour fix first.
        wavelet: apply the wavelet colour fix after it.
        eps: AdaIN's variance epsilon.
        levels: wavelet levels.
    """

    def __init__(self, adain: bool = True, wavelet: bool = True, eps: float = 1e-5, levels: int = 5):
        super().__init__()
        fixes = ([AdaINColorFix(eps)] if adain else []) + ([WaveletColorFix(levels)] if wavelet else [])
        self.fixes = torch.nn.ModuleList(fixes)

    def forward(self, sr: Tensor, lr: Tensor) -> Tensor:
        ref = reference_at(lr, sr.shape[-2:])  # resized once for both fixes
        for fix in self.fixes:
            sr = fix(sr, ref)
        return sr.clamp(0, 1)
