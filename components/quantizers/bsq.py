"""Infinity's multi-scale binary spherical quantizer (BSQ) and NSARM's residual algorithms.

BSQ: a latent vector z (d channels) is l2-normalised and every channel snapped to its sign,
scaled by 1/sqrt(d), so codes stay on the unit sphere: code = sign(z / |z|) / sqrt(d) (0 -> -1),
with a straight-through gradient. A token is d bits, predicted by a bitwise classifier.

The residual walk (one loop serves the tokenizer, Infinity's teacher forcing, NSARM's
Algorithms 1 and 2 and Bitwise Self-Correction), for scales k = 1..K of the VAE-space schedule:

    r_k   = area(F - acc, (h_k, w_k))        (the last scale: F - acc itself)
    q_k   = BSQ(r_k);  label_k = bits(q_k)
    acc  += bilinear(q_k, (H, W))            (Infinity's trilinear with t = 1)
    x_k+1 = resize(acc, (h_k+1, w_k+1))      (bilinear as Infinity trains and samples; area as
                                              NSARM's released sampler does)

Infinity-8B's tokenizer (``patchify=True``) quantizes 14-channel latents at twice the
transformer's map size; a transformer token is the 2x2 pixel-unshuffle of four of them (56 bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from arsr import schedules
from arsr.interfaces import Quantizer, QuantOutput, RunningSum, ScaleWalk, TeacherForcing


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """x (B, d, h, w) -> (B, d, *size); identity at equal size. ``bilinear`` never antialiases."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False if mode == "bilinear" else None)


@dataclass
class Pyramid:
    """The multi-scale residual decomposition of one latent (NSARM Algorithm 1 / 2).

    residuals: per scale, the continuous residual before quantisation, (B, d, h_k, w_k) in VAE space
    codes:     per scale, the code accumulated, (B, d, h_k, w_k), entries +-1/sqrt(d) (flipped by BSC)
    bits:      per scale, the bit labels (of the clean code), (B, h_k * w_k, bits per token)
    inputs:    teacher-forcing inputs of scales 2..K, (B, L - 1, bits per token)
    f_hat:     the accumulated reconstruction, (B, d, H, W)
    """

    residuals: list[Tensor]
    codes: list[Tensor]
    bits: list[Tensor]
    inputs: Tensor
    f_hat: Tensor


class MultiScaleBSQ(Quantizer):
    """Multi-scale residual BSQ (Infinity). Tokens are bits; NSARM's substitution is supported.

    Args:
        dim: latent channels d = bits per VAE cell (32 for d32, 14 for Infinity-8B's VAE).
        schedule: the transformer's scale schedule: an Infinity name (``0.06M``, ``0.25M``,
            ``0.60M``, ``1M``), ``var256`` / ``var512``, a list of sides or of ``[h, w]``.
        aspect: h / w of the images; Infinity names pick the nearest aspect template.
        patchify: Infinity-8B: the VAE-space schedule is twice the transformer's and a token is
            the 2x2 pixel-unshuffle of four latent cells (4 d bits).
        next_input: how the accumulated codes shrink to the next scale's input: ``bilinear``
            (Infinity's training and sampling) or ``area`` (NSARM's released sampler).
        commitment_weight, entropy_weight, diversity_gamma, inv_temperature: the BSQ losses of
            tokenizer training (commitment on the normalised latent; per-sample entropy minus
            ``diversity_gamma`` x codebook entropy of soft bit probabilities).
        bsc_scales: Bitwise Self-Correction: flip bits of the first this many scales when
            building teacher-forcing inputs (0 = off; Infinity's train.sh: 13).
        bsc_strength: maximum flip probability; each scale draws one from {0, 0.01, ..., this}.
    """

    def __init__(
        self,
        dim: int = 32,
        schedule: schedules.ScheduleSpec = "0.25M",
        aspect: float = 1.0,
        patchify: bool = False,
        next_input: Literal["bilinear", "area"] = "bilinear",
        commitment_weight: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        inv_temperature: float = 100.0,
        bsc_scales: int = 0,
        bsc_strength: float = 0.3,
    ):
        super().__init__()
        self.token_kind, self.substitutable = "bits", True
        if not 0 <= bsc_strength <= 1:
            raise ValueError(f"bsc_strength {bsc_strength} is a flip probability: use a value in [0, 1]")
        self.dim, self.patchify, self.next_input = dim, patchify, next_input
        self.schedule = schedules.resolve(schedule, aspect)
        self.commitment_weight, self.entropy_weight = commitment_weight, entropy_weight
        self.diversity_gamma, self.inv_temperature = diversity_gamma, inv_temperature
        self.bsc_scales, self.bsc_strength = bsc_scales, bsc_strength

    # -- layout: VAE-space maps <-> transformer tokens -------------------------------------------
    @property
    def vae_schedule(self) -> schedules.Schedule:
        return schedules.scaled(self.schedule, 2) if self.patchify else self.schedule

    @property
    def token_dim(self) -> int:
        return self.dim * 4 if self.patchify else self.dim

    def to_tokens(self, x: Tensor) -> Tensor:
        """(B, d, h, w) VAE-space map -> (B, h*w, token_dim) tokens (2x2 unshuffled when patchify)."""
        if self.patchify:
            x = F.pixel_unshuffle(x, 2)
        return rearrange(x, "b c h w -> b (h w) c")

    def from_tokens(self, tokens: Tensor, si: int) -> Tensor:
        """(B, h*w, token_dim) of scale si -> (B, d, h, w) in VAE space."""
        h, w = self.schedule[si]
        x = rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)
        return F.pixel_shuffle(x, 2) if self.patchify else x

    # -- one scale ---------------------------------------------------------------------------
    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """Bits in {0, 1} (any layout) -> codes +-1/sqrt(d)."""
        return (bits.float() * 2 - 1) / self.dim**0.5

    def codes(self, tokens: Tensor, si: int) -> Tensor:
        """Bit tokens of scale si (B, h*w, token_dim) -> codes (B, d, h, w) in VAE space."""
        return self.bits_to_codes(self.from_tokens(tokens, si))

    def bsq(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z (B, d, h, w) -> straight-through code (B, d, h, w), bits (B, d, h, w) in {0, 1}, loss."""
        zn = F.normalize(z, dim=1)
        bits = (zn > 0).long()
        code = self.bits_to_codes(bits)
        loss = zn.new_zeros(())
        if self.commitment_weight > 0:
            loss = loss + self.commitment_weight * F.mse_loss(zn, code.detach())
        if self.entropy_weight > 0:
            p = torch.sigmoid(4 * zn / self.dim**0.5 * self.inv_temperature)  # P(bit = 1)
            probs = torch.stack([p, 1 - p], dim=-1)
            ent = lambda q: -(q * torch.log(q + 1e-8)).sum(-1)
            per_sample = ent(probs).sum(1).mean()
            codebook = ent(probs.mean(dim=(0, 2, 3))).sum()
            loss = loss + self.entropy_weight * (per_sample - self.diversity_gamma * codebook) / self.inv_temperature
        return zn + (code - zn).detach(), bits, loss

    def flip(self, bits: Tensor) -> Tensor:
        """Bitwise Self-Correction: flip each bit with a probability drawn from {0, 0.01, ..., bsc_strength}."""
        strength = torch.randint(0, round(100 * self.bsc_strength) + 1, ()) / 100  # a 0-d CPU tensor: no host sync on a GPU
        return torch.where(torch.rand(bits.shape, device=bits.device) < strength, 1 - bits, bits)

    # -- the residual walk shared by the tokenizer, teacher forcing and NSARM ----------------
    def walk(self, f: Tensor, substituted: list[Tensor] = (), corrupt: bool = False,
             detach_residual: bool = False) -> tuple[Pyramid, Tensor]:
        """Residual pyramid of f (B, d, H, W).

        substituted: NSARM Algorithm 2: the continuous residuals of the first scales (VAE space,
            (B, d, h_k, w_k)), e.g. the transformation network's; they are BSQ-quantised (with a
            straight-through gradient) and later residuals are taken against their accumulation.
        corrupt: apply Bitwise Self-Correction flips to the first ``bsc_scales`` scales (the
            accumulated codes are re-quantised from the flipped bits; labels stay clean).
        detach_residual: the running residual subtracts detached codes (tokenizer training, as
            Infinity's VAE does); teacher forcing keeps the graph so that gradients reach
            substituted residuals through every later input.
        Returns the pyramid and the mean BSQ loss over scales.
        """
        vs, size = self.vae_schedule, self.vae_schedule[-1]
        if tuple(f.shape[-2:]) != size:
            raise ValueError(f"latent of size {tuple(f.shape[-2:])} where the schedule ends at {size}: image size and schedule disagree")
        for si, sub in enumerate(substituted):
            if tuple(sub.shape[-2:]) != vs[si]:
                raise ValueError(f"substituted scale {si + 1} has size {tuple(sub.shape[-2:])} where the schedule has {vs[si]}")
        f = f.float()
        acc, loss = torch.zeros_like(f), f.new_zeros(())
        residuals, codes, bits, inputs = [], [], [], []
        for si, hw in enumerate(vs):
            if si < len(substituted):
                r = substituted[si].float()
            else:
                r = resize(f - (acc.detach() if detach_residual else acc), hw, "area")
            code, b, scale_loss = self.bsq(r)
            loss = loss + scale_loss
            if corrupt and si < self.bsc_scales:
                code = self.bits_to_codes(self.flip(b))
            acc = acc + resize(code, size, "bilinear")
            residuals.append(r)
            codes.append(code)
            bits.append(self.to_tokens(b))
            if si + 1 < len(vs):
                inputs.append(self.to_tokens(resize(acc, vs[si + 1], self.next_input)))
        return Pyramid(residuals, codes, bits, torch.cat(inputs, 1), acc), loss / len(vs)

    @torch.no_grad()
    def decompose(self, f: Tensor) -> Pyramid:
        """NSARM Algorithm 1: the multi-scale residual decomposition of f."""
        return self.walk(f)[0]

    def teacher(self, f: Tensor, substituted: list[Tensor] = (), corrupt: bool = False) -> TeacherForcing:
        """Labels and inputs for teacher forcing; with ``substituted``, NSARM Algorithm 2 with
        gradients into the substituted residuals; ``corrupt`` applies Bitwise Self-Correction."""
        with torch.autocast(f.device.type, enabled=False):
            pyramid, _ = self.walk(f.detach(), substituted, corrupt)
        return TeacherForcing(pyramid.bits, pyramid.inputs, pyramid.residuals)

    # -- Quantizer interface -----------------------------------------------------------------
    def forward(self, f: Tensor) -> QuantOutput:
        with torch.autocast(f.device.type, enabled=False):
            pyramid, loss = self.walk(f.float(), detach_residual=True)
        balance = torch.stack([b.float().mean() for b in pyramid.bits]).mean()
        return QuantOutput(f_hats=[pyramid.f_hat], features=[f], loss=loss, indices=pyramid.bits,
                           logs={"bsq_loss": loss.detach(), "bit_balance": balance})

    @torch.no_grad()
    def f_to_indices(self, f: Tensor) -> list[Tensor]:
        return self.decompose(f).bits

    def scale_term(self, tokens: Tensor, si: int) -> Tensor:
        """Scale si's share of f_hat: its codes resized (bilinear) to the last latent size (B, d, H, W)."""
        return resize(self.codes(tokens, si), self.vae_schedule[-1], "bilinear")

    def input_from(self, f_hat: Tensor, k: int) -> Tensor:
        """Input of scale k from the sum of scales 1..k-1, resized with ``next_input`` (B, h_k * w_k, token_dim)."""
        return self.to_tokens(resize(f_hat, self.vae_schedule[k], self.next_input))

    def indices_to_fhat(self, indices: list[Tensor], upto: int | None = None) -> Tensor:
        return sum(self.scale_term(b, si) for si, b in enumerate(indices[:upto]))

    def residual_to_tokens(self, residual: Tensor, si: int) -> Tensor:
        if tuple(residual.shape[-2:]) != self.vae_schedule[si]:
            raise ValueError(f"residual of size {tuple(residual.shape[-2:])} for scale {si + 1} of size {self.vae_schedule[si]}")
        return self.to_tokens(self.bsq(residual.float())[1])

    def step_input(self, tokens: list[Tensor]) -> Tensor:
        return self.input_from(self.indices_to_fhat(tokens), len(tokens))

    def start_walk(self) -> ScaleWalk:
        return RunningSum(self)


@torch.no_grad()
def relabel_after_substitution(quantizer: MultiScaleBSQ, f: Tensor, substituted: list[Tensor]) -> Pyramid:
    """NSARM Algorithm 2 as a pure function.

    The first k = len(substituted) residuals of the pyramid are replaced by ``substituted``
    (e.g. the transformation network's predictions, each (B, d, h_i, w_i)) and BSQ-quantised;
    every later scale is re-quantised against what is left of f after their codes, giving the
    teacher-forcing inputs and bit labels that stage 2 trains on. With the GT residuals
    substituted, the result equals :meth:`MultiScaleBSQ.decompose`.
    """
    return quantizer.walk(f, substituted)[0]
