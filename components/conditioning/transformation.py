"""NSARM's transformation network: LR image -> the first scales of the residual pyramid."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from arsr.interfaces import Layout, ScalePredictor


class TransformationNet(ScalePredictor):
    """A light alternative to NSARM's network: a conv encoder of the LR image, then one 1x1 head per
    predicted scale on the map adaptively pooled to that scale's size.

    Args:
        num_scales: how many leading scales it predicts (they replace the tokenizer's).
        width: conv width.
        downsample: LR pixels -> feature map factor (stride-2 convs; 4 puts a x4 SR model's LR on
            the HR latent grid of a stride-16 tokenizer).
        depth: residual conv blocks at feature resolution.
    """

    def __init__(self, num_scales: int = 4, width: int = 128, downsample: int = 4, depth: int = 2):
        super().__init__()
        self.num_scales, self.width, self.downsample, self.depth = num_scales, width, downsample, depth

    def bind(self, layout: Layout) -> None:
        latent_dim, self.sides = layout.vae_dim, layout.vae_schedule[: self.num_scales]
        steps = max(1, self.downsample.bit_length() - 1)
        layers = [nn.Conv2d(3, self.width, 3, padding=1)]
        layers += [nn.Conv2d(self.width, self.width, 4, stride=2, padding=1) for _ in range(steps)]
        self.stem = nn.ModuleList(layers)
        self.blocks = nn.ModuleList(nn.Conv2d(self.width, self.width, 3, padding=1) for _ in range(self.depth))
        self.heads = nn.ModuleList(nn.Conv2d(self.width, latent_dim, 1) for _ in self.sides)

    def forward(self, lr: Tensor) -> list[Tensor]:
        x = lr
        for conv in self.stem:
            x = F.silu(conv(x))
        for conv in self.blocks:
            x = x + conv(F.silu(x))
        return [head(F.adaptive_avg_pool2d(x, hw)) for head, hw in zip(self.heads, self.sides)]
