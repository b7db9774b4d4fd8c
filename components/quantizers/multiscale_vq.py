"""VAR's multi-scale residual vector quantizer (``VectorQuantizer2``), re-implemented.

Tokenising a latent f (B, C, H, W) walks the scales small to large: area-downsample the
residual to pn x pn, pick the nearest code per position, bicubic-upsample the codes back to
H x W, refine them with a shared 3x3 "Phi" conv and subtract them from the residual.
Parameter names match the official checkpoint (``embedding``, ``quant_resi.qresi_ls.{k}``,
``ema_vocab_hit_SV``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from arsr.interfaces import Quantizer, QuantOutput, RunningSum, ScaleWalk, TeacherForcing

# scale -> Phi index for VAR's 4 shared Phis; 10 scales has a float64 tie at si = 2 that the
# official code resolves to 1, so tables are written down rather than recomputed
PHI_TABLES = {10: (0, 0, 1, 1, 1, 2, 2, 3, 3, 3), 12: (0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3)}


def phi_index_table(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """Nearest 'tick' of each scale's relative position si / (SN - 1), as VAR shares its Phis."""
    if num_phi == 4 and num_scales in PHI_TABLES:
        return PHI_TABLES[num_scales]
    if num_phi == 1:
        return (0,) * num_scales
    cpu = dict(dtype=torch.float64, device="cpu")  # a table of ints: also under a meta-device build
    ticks = (torch.linspace(1 / (3 * num_phi), 1 - 1 / (3 * num_phi), num_phi, **cpu) if num_phi == 4
             else torch.linspace(1 / (2 * num_phi), 1 - 1 / (2 * num_phi), num_phi, **cpu))
    pos = torch.arange(num_scales, **cpu) / max(num_scales - 1, 1)
    return tuple(int(i) for i in (pos[:, None] - ticks[None]).abs().argmin(1))


class Phi(nn.Conv2d):
    """h -> (1 - r) h + r conv3x3(h): the residual refinement applied to upsampled codes."""

    def __init__(self, dim: int, ratio: float = 0.5):
        super().__init__(dim, dim, 3, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiShared(nn.Module):
    def __init__(self, dim: int, num_phi: int, ratio: float):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(dim, ratio) for _ in range(num_phi))


def area_down(x: Tensor, pn: int) -> Tensor:
    return x if x.shape[-1] == pn else F.interpolate(x, size=(pn, pn), mode="area")


def bicubic_up(x: Tensor, size: int) -> Tensor:
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bicubic")


class MultiScaleVQ(Quantizer):
    """Multi-scale VQ (VAR), with VARSR's options.

    Args:
        vocab_size: codebook size V.
        dim: latent channels C.
        patch_nums: token-map sides per scale, the last equal to the latent side.
        beta: commitment weight.
        num_phi: number of shared Phi convs (VAR: 4).
        phi_ratio: Phi mixing ratio r.
        phi_at_last_scale: False = VARSR's variant, the last scale adds raw codes (no Phi).
        scale_dropout: probability p_d (VARSR) that a training forward keeps only a random
            prefix of the scales, so coarse partial reconstructions stay decodable.
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        dim: int = 32,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        beta: float = 0.25,
        num_phi: int = 4,
        phi_ratio: float = 0.5,
        phi_at_last_scale: bool = True,
        scale_dropout: float = 0.0,
    ):
        super().__init__()
        self.vocab_size, self.dim, self.patch_nums = vocab_size, dim, tuple(patch_nums)
        self.beta, self.phi_at_last_scale, self.scale_dropout = beta, phi_at_last_scale, scale_dropout
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.uniform_(self.embedding.weight, -1 / vocab_size, 1 / vocab_size)
        self.quant_resi = PhiShared(dim, num_phi, phi_ratio)
        self.phi_table = phi_index_table(len(self.patch_nums), num_phi)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.register_buffer("record_hit", torch.zeros((), dtype=torch.long), persistent=False)

    # -- the three primitives every path below is built from ------------------------------
    def phi(self, si: int, h: Tensor) -> Tensor:
        last = si == len(self.patch_nums) - 1
        return h if (last and not self.phi_at_last_scale) else self.quant_resi.qresi_ls[self.phi_table[si]](h)

    def nearest(self, z: Tensor) -> Tensor:
        """z (B, C, pn, pn) -> code indices (B, pn*pn), squared-L2 nearest neighbour."""
        flat = rearrange(z, "b c h w -> (b h w) c")
        e = self.embedding.weight
        d = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.T
        return rearrange(d.argmin(1), "(b n) -> b n", b=z.shape[0])

    def embed(self, idx: Tensor, pn: int) -> Tensor:
        """indices (B, pn*pn) -> codes (B, C, pn, pn)."""
        return rearrange(self.embedding(idx), "b (h w) c -> b c h w", h=pn, w=pn)

    def codes(self, tokens: Tensor, si: int) -> Tensor:
        return self.embed(tokens, self.patch_nums[si])

    # -- tokenisation ----------------------------------------------------------------------
    def _walk(self, f: Tensor, num_scales: int | None = None):
        """Yield (si, idx, h) over the scales, h being Phi(up(codes)) added to f_hat."""
        H = f.shape[-1]
        if self.patch_nums[-1] != H:
            raise ValueError(f"latent side {H} != last patch_num {self.patch_nums[-1]}: image size and schedule disagree")
        rest = f.detach().float().clone()
        for si, pn in enumerate(self.patch_nums[:num_scales]):
            idx = self.nearest(area_down(rest, pn))
            h = self.scale_term(idx, si)
            rest.sub_(h)
            yield si, idx, h

    @torch.no_grad()
    def f_to_indices(self, f: Tensor) -> list[Tensor]:
        return [idx for _, idx, _ in self._walk(f)]

    def scale_term(self, idx: Tensor, si: int) -> Tensor:
        """Scale si's share of f_hat: Phi(codes bicubic-upsampled to the latent side) (B, C, H, W)."""
        return self.phi(si, bicubic_up(self.embed(idx, self.patch_nums[si]), self.patch_nums[-1]))

    def input_from(self, f_hat: Tensor, k: int) -> Tensor:
        """Input of scale k from the sum of scales 1..k-1: area-downsampled to its side (B, pn_k^2, C)."""
        return rearrange(area_down(f_hat, self.patch_nums[k]), "b c h w -> b (h w) c")

    def indices_to_fhat(self, indices: list[Tensor], upto: int | None = None) -> Tensor:
        f_hat = 0
        for si, idx in enumerate(indices[:upto]):
            f_hat = f_hat + self.scale_term(idx, si)
        return f_hat

    @torch.no_grad()
    def teacher(self, f: Tensor, substituted: list[Tensor] = (), corrupt: bool = False) -> TeacherForcing:
        """Tokens and teacher-forcing inputs in one walk: each scale's input is the running f_hat
        area-downsampled (the same values as :meth:`step_input`, without re-accumulating)."""
        if len(substituted):
            return super().teacher(f, substituted, corrupt)
        tokens, inputs, f_hat = [], [], 0
        for si, idx, h in self._walk(f):
            tokens.append(idx)
            f_hat = f_hat + h
            if si + 1 < len(self.patch_nums):
                inputs.append(rearrange(area_down(f_hat, self.patch_nums[si + 1]), "b c h w -> b (h w) c"))
        return TeacherForcing(tokens, torch.cat(inputs, 1))

    def start_walk(self) -> ScaleWalk:
        return RunningSum(self)

    def step_input(self, tokens: list[Tensor]) -> Tensor:
        """Scale k sees everything accumulated up to scale k-1, area-downsampled to its size."""
        return self.input_from(self.indices_to_fhat(tokens), len(tokens))

    # -- training forward ------------------------------------------------------------------
    def forward(self, f: Tensor) -> QuantOutput:
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            keep = len(self.patch_nums)
            if self.training and self.scale_dropout > 0 and torch.rand(()) < self.scale_dropout:
                keep = int(torch.randint(1, len(self.patch_nums), ()))
            H, rest, f_hat = f.shape[-1], f.detach().clone(), torch.zeros_like(f)
            loss, indices = f.new_zeros(()), []
            for si, pn in enumerate(self.patch_nums[:keep]):
                idx = self.nearest(area_down(rest, pn))
                h = self.phi(si, bicubic_up(self.embed(idx, pn), H))
                f_hat = f_hat + h
                rest = rest - h.detach()
                loss = loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f.detach())
                indices.append(idx)
                if self.training:
                    self._record_hits(si, idx)
            loss = loss / keep
            f_hat = (f_hat - f).detach() + f if keep == len(self.patch_nums) else f_hat + (f - f.detach())
        usage = (self.ema_vocab_hit_SV[:keep] > 0).float().mean()
        return QuantOutput(f_hats=[f_hat], features=[f], loss=loss, indices=indices, logs={"vq_loss": loss.detach(), "codebook_usage": usage,
                                                                            "scales_kept": torch.tensor(float(keep))})

    @torch.no_grad()
    def _record_hits(self, si: int, idx: Tensor) -> None:
        hits = torch.bincount(idx.flatten(), minlength=self.vocab_size).float()
        n = int(self.record_hit)
        if n == 0:
            self.ema_vocab_hit_SV[si].copy_(hits)
        elif n < 100:
            self.ema_vocab_hit_SV[si].mul_(0.9).add_(hits, alpha=0.1)
        else:
            self.ema_vocab_hit_SV[si].mul_(0.99).add_(hits, alpha=0.01)
        if si == len(self.patch_nums) - 1:
            self.record_hit += 1

