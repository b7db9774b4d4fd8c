"""Post-processing of SR images (colour fixes, ...): the base class of the ``postprocess`` family.

Kept apart from ``arsr/interfaces.py`` for now; it is the same kind of contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class PostProcess(nn.Module, ABC):
    """Corrects an SR image using its LR input."""

    @abstractmethod
    def forward(self, sr: Tensor, lr: Tensor) -> Tensor:
        """sr (B, 3, H, W), lr (B, 3, h, w), both in [0, 1] -> corrected sr (B, 3, H, W) in [0, 1]."""
