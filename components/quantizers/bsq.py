"""Infinity's multi-scale binary spherical quantizer (BSQ) and NSARM's residual algorithms.

BSQ: a latent vector z (d channels) is l2-normalised and every channel snapped to its sign,
scaled by 1/sqrt(d) so codes stay on the unit sphere: code = sign(z / |z|) / sqrt(d). A token
is therefore d bits, predicted by a bitwise classifier. Scales are walked as in VAR (area
down, bilinear up), without Phi convs.

NSARM Algorithm 1 is :meth:`MultiScaleBSQ.decompose` (the residual pyramid of an image);
Algorithm 2 is :func:`relabel_after_substitution` (given substituted first scales, recompute
the inputs and bit labels of every later scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from arsr.interfaces import Quantizer, QuantOutput

from .multiscale_vq import area_down


def bilinear_up(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


@dataclass
class Pyramid:
    """The multi-scale residual decomposition of one latent (NSARM Algorithm 1).

    residuals: per scale, the continuous residual before quantisation, (B, d, pn, pn)
    codes:     per scale, its BSQ code, (B, d, pn, pn), entries +-1/sqrt(d)
    bits:      per scale, the bit labels, (B, pn*pn, d) in {0, 1}
    inputs:    teacher-forcing inputs of scales 2..K, (B, L - 1, d)
    f_hat:     the accumulated reconstruction, (B, d, H, W)
    """

    residuals: list[Tensor]
    codes: list[Tensor]
    bits: list[Tensor]
    inputs: Tensor
    f_hat: Tensor


class MultiScaleBSQ(Quantizer):
    """Multi-scale residual BSQ (Infinity).

    Args:
        dim: latent channels d = bits per token.
        patch_nums: token-map sides per scale.
        commitment_weight: weight of |z - code|^2 on the normalised latent.
        entropy_weight: weight of the BSQ entropy penalty (per-sample entropy minus
            ``diversity_gamma`` x codebook entropy, from soft bit probabilities).
        inv_temperature: sharpness of the soft bit probabilities.
    """

    def __init__(
        self,
        dim: int = 32,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        inv_temperature: float = 100.0,
    ):
        super().__init__()
        self.dim, self.patch_nums = dim, tuple(patch_nums)
        self.commitment_weight, self.entropy_weight = commitment_weight, entropy_weight
        self.diversity_gamma, self.inv_temperature = diversity_gamma, inv_temperature

    # -- one scale ---------------------------------------------------------------------------
    def codes_from_bits(self, bits: Tensor, pn: int) -> Tensor:
        """bits (B, pn*pn, d) -> codes (B, d, pn, pn)."""
        codes = (bits.float() * 2 - 1) / self.dim**0.5
        return rearrange(codes, "b (h w) d -> b d h w", h=pn, w=pn)

    def codes(self, tokens: Tensor, si: int) -> Tensor:
        return self.codes_from_bits(tokens, self.patch_nums[si])

    def bsq(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, d, h, w) -> straight-through code, bits (B, h*w, d), loss."""
        zn = F.normalize(z, dim=1)
        code = torch.where(zn > 0, 1.0, -1.0) / self.dim**0.5
        bits = rearrange(zn > 0, "b d h w -> b (h w) d").long()
        loss = self.commitment_weight * F.mse_loss(zn, code.detach())
        if self.entropy_weight > 0:
            p = torch.sigmoid(4 * zn / self.dim**0.5 * self.inv_temperature)  # P(bit = 1)
            probs = torch.stack([p, 1 - p], dim=-1)
            ent = lambda q: -(q * torch.log(q + 1e-8)).sum(-1)
            per_sample = ent(probs).sum(1).mean()
            codebook = ent(probs.mean(dim=(0, 2, 3))).sum()
            loss = loss + self.entropy_weight * (per_sample - self.diversity_gamma * codebook) / self.inv_temperature
        return zn + (code - zn).detach(), bits, loss

    # -- the residual walk shared by training, Algorithm 1 and Algorithm 2 ---------------------
    def walk(self, f: Tensor, substituted: list[Tensor] = ()) -> tuple[Pyramid, Tensor]:
        """Residual pyramid of f; the first len(substituted) scales take the given codes.

        Gradients reach f through each scale's straight-through code (the running residual
        subtracts detached codes, as Infinity does). Returns the pyramid and the BSQ loss.
        """
        H, pns = f.shape[-1], self.patch_nums
        if pns[-1] != H:
            raise ValueError(f"latent side {H} != last patch_num {pns[-1]}: image size and schedule disagree")
        for sub, pn in zip(substituted, pns):
            if sub.shape[-2:] != (pn, pn):
                raise ValueError(f"substituted scale of side {sub.shape[-1]} where the schedule has {pn}")
        rest, f_hat, loss = f.float(), torch.zeros_like(f, dtype=torch.float32), f.new_zeros((), dtype=torch.float32)
        residuals, codes, bits, inputs = [], [], [], []
        for si, pn in enumerate(pns):
            z = area_down(rest, pn)
            if si < len(substituted):
                code = substituted[si].float()
                b = rearrange(code > 0, "b d h w -> b (h w) d").long()
            else:
                code, b, l = self.bsq(z)
                loss = loss + l
            up = bilinear_up(code, H)
            rest, f_hat = rest - up.detach(), f_hat + up
            residuals.append(z)
            codes.append(code)
            bits.append(b)
            if si + 1 < len(pns):
                inputs.append(rearrange(area_down(f_hat, pns[si + 1]), "b d h w -> b (h w) d"))
        return Pyramid(residuals, codes, bits, torch.cat(inputs, 1), f_hat), loss / len(pns)

    @torch.no_grad()
    def decompose(self, f: Tensor) -> Pyramid:
        """NSARM Algorithm 1: the multi-scale residual decomposition of f."""
        return self.walk(f)[0]

    def substitute(self, f: Tensor, codes: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        """Algorithm 2 with gradients: the teacher-forcing inputs stay differentiable in ``codes``."""
        pyramid, _ = self.walk(f.detach(), codes)
        return pyramid.bits, pyramid.inputs

    # -- Quantizer interface -----------------------------------------------------------------
    def forward(self, f: Tensor) -> QuantOutput:
        with torch.autocast(f.device.type, enabled=False):
            pyramid, loss = self.walk(f.float())
        balance = torch.stack([b.float().mean() for b in pyramid.bits]).mean()
        return QuantOutput(f_hats=[pyramid.f_hat], features=[f], loss=loss, indices=pyramid.bits,
                           logs={"bsq_loss": loss.detach(), "bit_balance": balance})

    @torch.no_grad()
    def f_to_indices(self, f: Tensor) -> list[Tensor]:
        return self.decompose(f).bits

    def indices_to_fhat(self, indices: list[Tensor], upto: int | None = None) -> Tensor:
        H = self.patch_nums[-1]
        return sum(bilinear_up(self.codes_from_bits(b, pn), H) for b, pn in zip(indices[:upto], self.patch_nums))

    def step_input(self, tokens: list[Tensor]) -> Tensor:
        return rearrange(area_down(self.indices_to_fhat(tokens), self.patch_nums[len(tokens)]), "b d h w -> b (h w) d")


@torch.no_grad()
def relabel_after_substitution(quantizer: MultiScaleBSQ, f: Tensor, substituted: list[Tensor]) -> Pyramid:
    """NSARM Algorithm 2 as a pure function.

    The first k = len(substituted) scales of the pyramid are replaced by ``substituted``
    (e.g. the transformation network's predictions, each (B, d, pn_i, pn_i)); every later
    scale is re-quantised against what is left of f after them, giving the teacher-forcing
    inputs and bit labels that stage 2 trains on. With the GT codes substituted, the result
    equals :meth:`MultiScaleBSQ.decompose`.
    """
    return quantizer.walk(f, substituted)[0]
