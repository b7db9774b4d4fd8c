"""The contracts each component family implements.

A component is any subclass of one of these bases; recipes pick one by ``class_path``.
The frame only ever talks to these interfaces, so a new component needs no change here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class DegradedBatch:
    """Output of a :class:`Degradation`.

    hr:       (B, 3, H, W) target in [0, 1] (USM-sharpened when the degradation says so)
    lr:       (B, 3, H/s, W/s) low-resolution input in [0, 1], 8-bit quantised
    lr_up:    (B, 3, H, W) ``lr`` resized back to the HR size (for models that want it)
    degraded: (B,) bool, False for samples that took a clean (bilinear-only) branch
    params:   per-sample random parameters that were drawn, for logging and replay
    """

    hr: Tensor
    lr: Tensor
    lr_up: Tensor
    degraded: Tensor
    params: dict[str, Tensor] = field(default_factory=dict)


class Degradation(nn.Module, ABC):
    """Synthesises LR inputs from a batch of HR crops, on whatever device the batch is on."""

    scale: int

    @abstractmethod
    def forward(self, hr: Tensor, generator: torch.Generator | None = None) -> DegradedBatch:
        """hr: (B, 3, H, W) in [0, 1]; H and W divisible by ``scale``."""


@dataclass
class QuantOutput:
    """Output of a quantizer's training forward.

    f_hats:   decodable quantised latents with a straight-through gradient, one per output
              scale (one for a single-output quantizer; 1x/2x/4x for hierarchical RQ)
    features: the continuous latents each of ``f_hats`` approximates (quantisation bypass)
    loss:     scalar quantizer loss (commitment / codebook / entropy terms)
    indices:  per-scale token maps, each (B, h_k * w_k) (or (B, h_k * w_k, bits) for bitwise)
    logs:     extra scalars to log (codebook usage, per-term losses)
    """

    f_hats: list[Tensor]
    features: list[Tensor]
    loss: Tensor
    indices: list[Tensor]
    logs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def f_hat(self) -> Tensor:
        """The largest output's quantised latent."""
        return self.f_hats[-1]


class Quantizer(nn.Module, ABC):
    """A next-scale (multi-scale residual) quantizer of a continuous latent ``f``.

    Attributes:
        dim: latent channels C.
        patch_nums: side of the token map at each scale, smallest first.
    """

    dim: int
    patch_nums: tuple[int, ...]

    @abstractmethod
    def forward(self, f: Tensor) -> QuantOutput:
        """Training forward: f (B, C, h, w) -> :class:`QuantOutput`."""

    @abstractmethod
    def f_to_indices(self, f: Tensor) -> list[Tensor]:
        """Tokenise: f (B, C, h, w) -> one index tensor per scale."""

    @abstractmethod
    def indices_to_fhat(self, indices: list[Tensor], upto: int | None = None) -> Tensor:
        """Accumulate the first ``upto`` scales (all by default) back into f_hat (B, C, h, w)."""

    @abstractmethod
    def indices_to_teacher_input(self, indices: list[Tensor]) -> Tensor:
        """Teacher-forcing inputs of scales 2..K: (B, L - first, C), from the tokens of scales 1..K-1."""
