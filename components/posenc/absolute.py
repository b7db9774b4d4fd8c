"""Additive position embeddings: VAR's per-scale table and MSVAR's resampled grid."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from arsr.interfaces import Layout, PositionalEncoding


class AbsolutePerScale(PositionalEncoding):
    """VAR: one learned (pn^2, C) table per scale, concatenated as ``pos_1LC`` (1, L, C)."""

    def bind(self, layout: Layout) -> None:
        self.pos_1LC = nn.Parameter(torch.empty(1, layout.image_len, layout.width))
        nn.init.trunc_normal_(self.pos_1LC, std=math.sqrt(1 / (3 * layout.width)))

    def additive(self, start: int, end: int) -> Tensor:
        return self.pos_1LC[0, start:end]


class LearnedResampled(PositionalEncoding):
    """MSVAR: one over-parameterised learned grid (C, P, P), resized to each scale's h x w.

    Args:
        grid: side P of the stored grid (>= the largest scale).
        mode: interpolation used to resample it (``area`` for downsampling, or ``bilinear`` / ``bicubic``).
    """

    def __init__(self, grid: int = 64, mode: Literal["area", "bilinear", "bicubic"] = "area"):
        super().__init__()
        self.grid, self.mode = grid, mode

    def bind(self, layout: Layout) -> None:
        largest = max(max(hw) for hw in layout.schedule)
        if self.grid < largest:
            raise ValueError(f"LearnedResampled grid {self.grid} is smaller than the largest scale {largest}")
        self.pos_grid = nn.Parameter(torch.empty(1, layout.width, self.grid, self.grid))
        nn.init.trunc_normal_(self.pos_grid, std=math.sqrt(1 / (3 * layout.width)))
        self.schedule = layout.schedule

    def table(self) -> Tensor:
        """(L, C): the grid resized to every scale, flattened row-major and concatenated."""
        per_scale = []
        for h, w in self.schedule:
            g = self.pos_grid if (h, w) == (self.grid, self.grid) else F.interpolate(
                self.pos_grid, size=(h, w), mode=self.mode, **({} if self.mode == "area" else {"align_corners": False}))
            per_scale.append(rearrange(g, "1 c h w -> (h w) c"))
        return torch.cat(per_scale)

    def additive(self, start: int, end: int) -> Tensor:
        return self.table()[start:end]
