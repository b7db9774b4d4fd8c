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
