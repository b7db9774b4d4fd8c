"""MSVAR's hierarchical residual quantisation (Algorithm 1).

Target scales (latent sides ``target_sides``, e.g. 8/16/32 for 128/256/512 px outputs) are
tokenised in increasing order. Scale n starts from the encoder features Z_n of the image
resized to its own size; the steps already tokenised at lower scales are *reused* (their codes
are upsampled to S_n, refined by that step's Phi and subtracted, never re-quantised), and only
the new steps (those with rho_i <= S_n) are quantised. Steps 1-3 decode to 128 px, 1-6 to
256 px, 1-10 to 512 px; 3452 tokens in all for the paper's schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from arsr.interfaces import Quantizer, QuantOutput

from .multiscale_vq import MultiScaleVQ, area_down, bicubic_up


class HierarchicalRQ(MultiScaleVQ):
    """Multi-scale RQ whose step prefixes decode to 1x / 2x / 4x images.

    Args:
        patch_nums: step resolutions rho_i (MSVAR: 4, 6, 8, 10, 14, 16, 20, 24, 28, 32).
        target_sides: latent sides of the output scales (MSVAR: 8, 16, 32 = scales 0.25, 0.5, 1).
        Other arguments as :class:`MultiScaleVQ`; Phi is tied to the global step index.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        dim: int = 32,
        patch_nums: tuple[int, ...] = (4, 6, 8, 10, 14, 16, 20, 24, 28, 32),
        target_sides: tuple[int, ...] = (8, 16, 32),
        beta: float = 0.25,
        num_phi: int = 4,
        phi_ratio: float = 0.5,
    ):
        super().__init__(vocab_size, dim, patch_nums, beta, num_phi, phi_ratio)
        self.target_sides = tuple(target_sides)
        if self.target_sides[-1] != self.patch_nums[-1] or list(self.target_sides) != sorted(self.target_sides):
            raise ValueError(f"target_sides {target_sides} must increase and end at the last patch_num {patch_nums[-1]}")
        # inclusive rule: a step belongs to the smallest scale whose side is >= its resolution
        self.last_step = tuple(sum(1 for pn in self.patch_nums if pn <= s) for s in self.target_sides)
        if len(set(self.last_step)) != len(self.last_step) or self.last_step[0] == 0:
            raise ValueError(f"every target side in {target_sides} must add at least one step of {patch_nums}")

    # steps accumulate at their own output scale's side (not one running sum at the last side): the
    # generic teacher forcing and sampling walk, not MultiScaleVQ's single-sum ones
    teacher = Quantizer.teacher
    start_walk = Quantizer.start_walk

    @property
    def output_steps(self) -> tuple[int, ...]:
        return self.last_step

    def scale_of_step(self, num_steps: int) -> int:
        """Index of the smallest output scale that contains the first ``num_steps`` steps."""
        return next(n for n, last in enumerate(self.last_step) if last >= num_steps)

    def _check(self, fs: list[Tensor]) -> None:
        sides = tuple(f.shape[-1] for f in fs)
        if sides != self.target_sides:
            raise ValueError(f"features of sides {sides} given; expected one per target side {self.target_sides}")

    def _hierarchical(self, fs: list[Tensor], train: bool):
        """Algorithm 1 -> (indices, codes, f_hat per scale, loss)."""
        self._check(fs)
        indices, codes, f_hats = [], [], []
        loss = fs[0].new_zeros(())
        for n, (z, side) in enumerate(zip(fs, self.target_sides)):
            z = z.float()
            rest, f_hat = z.detach().clone(), torch.zeros_like(z)
            for i in range(self.last_step[n]):
                if i >= len(codes):  # a new step: quantise the residual at rho_i
                    idx = self.nearest(area_down(rest, self.patch_nums[i]))
                    indices.append(idx)
                    codes.append(self.embed(idx, self.patch_nums[i]))
                    if train:
                        self._record_hits(i, idx)
                h = self.phi(i, bicubic_up(codes[i], side))
                f_hat = f_hat + h
                rest = rest - h.detach()
            loss = loss + self.beta * F.mse_loss(f_hat.detach(), z) + F.mse_loss(f_hat, z.detach())
            f_hats.append(f_hat)
        return indices, codes, f_hats, loss / len(fs)

    def forward(self, fs: list[Tensor]) -> QuantOutput:
        with torch.autocast(fs[0].device.type, enabled=False):
            fs = [f.float() for f in fs]
            indices, _, f_hats, loss = self._hierarchical(fs, self.training)
            f_hats = [(fh - f).detach() + f for fh, f in zip(f_hats, fs)]  # straight-through per scale
        usage = (self.ema_vocab_hit_SV > 0).float().mean()
        return QuantOutput(f_hats=f_hats, features=fs, loss=loss, indices=indices,
                           logs={"vq_loss": loss.detach(), "codebook_usage": usage})

    @torch.no_grad()
    def f_to_indices(self, fs: list[Tensor]) -> list[Tensor]:
        return self._hierarchical(fs, False)[0]

    def _accumulate(self, indices: list[Tensor], upto: int, side: int) -> Tensor:
        return sum(self.phi(i, bicubic_up(self.embed(indices[i], self.patch_nums[i]), side)) for i in range(upto))

    def indices_to_fhat(self, indices: list[Tensor], upto: int | None = None) -> Tensor:
        """Sum of the first ``upto`` steps at the side of the smallest scale containing them."""
        upto = len(indices) if upto is None else upto
        return self._accumulate(indices, upto, self.target_sides[self.scale_of_step(upto)])

    def step_input(self, tokens: list[Tensor]) -> Tensor:
        """Input of step k+1: steps 1..k accumulated at step k+1's output side, area-downsampled to rho_{k+1}."""
        k = len(tokens)
        f_hat = self._accumulate(tokens, k, self.target_sides[self.scale_of_step(k + 1)])
        return area_down(f_hat, self.patch_nums[k]).flatten(2).transpose(1, 2)
