"""NSARM's transformation network: LR image -> the first scales of the residual pyramid."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from arsr.interfaces import ScalePredictor


class TransformationNet(ScalePredictor):
    """A small conv encoder to the latent grid, then one 1x1 head per predicted scale.

    Args:
        num_scales: how many leading scales it predicts (they replace the tokenizer's).
        width: conv width.
        downsample: image -> latent factor (16 for the VAR/Infinity tokenizers).
        depth: residual conv blocks at latent resolution.
    """

    def __init__(self, num_scales: int = 4, width: int = 128, downsample: int = 16, depth: int = 2):
        super().__init__()
        self.num_scales, self.width, self.downsample, self.depth = num_scales, width, downsample, depth

    def bind(self, latent_dim: int, patch_nums: tuple[int, ...]) -> None:
        if self.num_scales >= len(patch_nums):
            raise ValueError(f"TransformationNet predicts {self.num_scales} scales of a {len(patch_nums)}-scale schedule")
        self.patch_nums = tuple(patch_nums[: self.num_scales])
        steps = max(1, self.downsample.bit_length() - 1)
        layers = [nn.Conv2d(3, self.width, 3, padding=1)]
        layers += [nn.Conv2d(self.width, self.width, 4, stride=2, padding=1) for _ in range(steps)]
        self.stem = nn.ModuleList(layers)
        self.blocks = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, padding=1) for _ in range(self.depth))
        self.heads = nn.ModuleList(nn.Conv2d(self.width, latent_dim, 1) for _ in self.patch_nums)

    def forward(self, lr_up: Tensor) -> list[Tensor]:
        x = lr_up
        for conv in self.stem:
            x = F.silu(conv(x))
        for conv in self.blocks:
            x = x + conv(F.silu(x))
        return [head(F.adaptive_avg_pool2d(x, pn)) for head, pn in zip(self.heads, self.patch_nums)]
