"""Scale-aligned 2-D rotary position embedding (VARSR's SA-RoPE) and plain 2-D RoPE."""

from __future__ import annotations

import torch
from torch import Tensor

from arsr.interfaces import Layout, PositionalEncoding


def rope_2d_table(grids: tuple[int, ...], head_dim: int, theta: float, align_to: int | None) -> Tensor:
    """(sum g^2, head_dim / 2) complex rotations.

    A token at (row i, col j) of a g x g map has coordinate (i * G / g, j * G / g) with
    G = ``align_to`` (SA-RoPE: every scale lands on the final grid, top-left token at 0), or
    (i, j) when ``align_to`` is None. Pair n < d/4 rotates by row * w_n, pair d/4 + n by
    col * w_n, with w_n = theta^(-4n / d).
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float64)[:quarter] / head_dim)  # (d/4,)
    coords = []
    for g in grids:
        idx = torch.arange(g * g, dtype=torch.float64)
        scale = (align_to / g) if align_to else 1.0
        coords.append(torch.stack([(idx // g) * scale, (idx % g) * scale], dim=1))
    rc = torch.cat(coords)  # (N, 2)
    angles = torch.cat([rc[:, :1] * freqs, rc[:, 1:] * freqs], dim=1)  # (N, d/2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


class SARoPE(PositionalEncoding):
    """Rotary embedding over 2-D token coordinates, shared by all heads and layers.

    Args:
        theta: base of the frequency ladder (VARSR: 10000).
        align: True = scale-aligned (VARSR SA-RoPE: coordinates scaled to the final grid);
            False = plain 2-D RoPE on each map's own integer grid.
        align_to: grid the coordinates are aligned to (None: the last patch_num).
    """

    def __init__(self, theta: float = 10000.0, align: bool = True, align_to: int | None = None):
        super().__init__()
        self.theta, self.align, self.align_to = theta, align, align_to

    def bind(self, layout: Layout) -> None:
        if layout.head_dim % 4:
            raise ValueError(f"SARoPE needs a head_dim divisible by 4, got {layout.head_dim}")
        target = (self.align_to or layout.patch_nums[-1]) if self.align else None
        # not a buffer: derived, never saved (as VARSR)
        self.freqs = rope_2d_table(layout.grids(), layout.head_dim, self.theta, target)

    def rotary(self, start: int, end: int) -> Tensor:
        return self.freqs[start:end]

    def _apply(self, fn, recurse: bool = True):  # move the table with the module (it is not a buffer)
        moved = fn(self.freqs)  # a dtype cast (bf16-true) must not drop the imaginary part
        self.freqs = moved if moved.is_complex() else self.freqs.to(moved.device)
        return super()._apply(fn, recurse)
