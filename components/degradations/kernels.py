"""Random blur kernels of the Real-ESRGAN family: parameters drawn per sample from each sample's own
generator (:class:`SampleDraws`, on the CPU), kernels built in one batch on the device.

Every kernel lives on a ``size x size`` grid (21 by default). A kernel of a smaller odd
size ``k`` is the same formula evaluated on the central ``k x k`` window and zero outside,
which is exactly "compute at size k, then zero-pad to 21" as BasicSR does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


class SampleDraws:
    """Per-sample random numbers: sample ``i``'s ``k``-th draw is the ``k``-th uniform of its own generator,
    seeded by ``seeds[i]``, so every parameter of a sample depends on its seed alone (not on the batch).

    Draws are made on the CPU (decisions stay on the host, no device sync); :meth:`on` moves the
    whole table to the batch's device in one transfer.
    """

    def __init__(self, seeds: list[int], n: int = 64):
        self.seeds = [int(s) for s in seeds]
        self.u = torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in self.seeds])
        self.k = 0

    def __len__(self) -> int:
        return len(self.seeds)

    def __call__(self) -> Tensor:
        """(B,) float64 in [0, 1): the next draw of every sample."""
        if self.k >= self.u.shape[1]:
            raise RuntimeError(f"more than {self.u.shape[1]} draws per sample: raise SampleDraws(n=...)")
        self.k += 1
        return self.u[:, self.k - 1]

    def uniform(self, low: float, high: float) -> Tensor:
        return low + (high - low) * self()

    def bernoulli(self, p: float) -> Tensor:
        return self() < p

    def choice(self, probs: tuple[float, ...] | list[float]) -> Tensor:
        """(B,) long indices drawn from the categorical distribution ``probs`` (inverse CDF)."""
        cdf = torch.tensor(probs, dtype=torch.float64).cumsum(0)
        return (self()[:, None] >= cdf[None, :-1] / cdf[-1]).sum(1)

    def seed(self) -> list[int]:
        """A 53-bit seed per sample (for a sample's own noise-field generator)."""
        return (self() * 2**53).long().tolist()


def uniform(shape: tuple[int, ...] | int, low: float, high: float, g: torch.Generator | None, device) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else shape
    return low + (high - low) * torch.rand(shape, generator=g, device=device)


def _grid(size: int, device) -> tuple[Tensor, Tensor]:
    r = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return xx, yy  # (size, size) each


def odd_sizes(draws: SampleDraws, low: int, high: int) -> Tensor:
    """(B,) odd kernel sizes uniformly from {low, low+2, ..., high}."""
    choices = torch.arange(low, high + 1, 2)
    return choices[(draws() * len(choices)).long().clamp_max(len(choices) - 1)]


def _window_mask(sizes: Tensor, grid_size: int) -> Tensor:
    """(n, S, S) 1 inside the central window of each sample's odd size, 0 outside."""
    xx, yy = _grid(grid_size, sizes.device)
    half = (sizes.float() // 2)[:, None, None]
    return ((xx.abs() <= half) & (yy.abs() <= half)).float()


def _normalise(k: Tensor) -> Tensor:
    return k / k.sum(dim=(-2, -1), keepdim=True)


def sinc_kernels(cutoff: Tensor, sizes: Tensor, grid_size: int = 21) -> Tensor:
    """Circular low-pass (2-D sinc, Bessel J1) kernels. cutoff, sizes: (n,) -> (n, S, S)."""
    xx, yy = _grid(grid_size, cutoff.device)
    r = torch.sqrt(xx**2 + yy**2)[None]  # (1, S, S)
    wc = cutoff[:, None, None]
    centre = wc**2 / (4 * math.pi)
    k = wc * torch.special.bessel_j1(wc * r) / (2 * math.pi * r.clamp_min(1e-12))
    k = torch.where(r == 0, centre.expand_as(k), k)
    return _normalise(k * _window_mask(sizes, grid_size))


def gaussian_family_kernels(
    kind: Tensor, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor, beta: Tensor, sizes: Tensor, grid_size: int = 21
) -> Tensor:
    """Gaussian / generalised Gaussian / plateau kernels, one per row.

    kind:  (n,) 0 = Gaussian exp(-q/2), 1 = generalised exp(-q^beta/2), 2 = plateau 1/(1+q^beta)
    with q = x^T Sigma^-1 x and Sigma = R diag(sx^2, sy^2) R^T.
    """
    xx, yy = _grid(grid_size, sigma_x.device)
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    # rotate the grid into the kernel's principal axes: u = R^T x
    u = c * xx + s * yy
    v = -s * xx + c * yy
    q = (u / sigma_x[:, None, None]) ** 2 + (v / sigma_y[:, None, None]) ** 2  # (n, S, S)
    b = beta[:, None, None]
    kind = kind[:, None, None]
    k = torch.where(
        kind == 0,
        torch.exp(-0.5 * q),
        torch.where(kind == 1, torch.exp(-0.5 * q.pow(b)), 1.0 / (1.0 + q.pow(b))),
    )
    return _normalise(k * _window_mask(sizes, grid_size))


def random_mixed_kernels(
    draws: SampleDraws,
    kernel_list: tuple[str, ...],
    kernel_prob: tuple[float, ...],
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
    sinc_prob: float,
    size_range: tuple[int, int],
    device,
    grid_size: int = 21,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One kernel per sample as Real-ESRGAN draws them for one degradation stage -> (B, S, S) on
    ``device``, and the parameters (CPU). Every sample makes the same number of draws."""
    sizes = odd_sizes(draws, *size_range)
    type_idx = torch.tensor([KERNEL_TYPES.index(k) for k in kernel_list])[draws.choice(kernel_prob)]
    isotropic = type_idx % 2 == 0  # iso, generalized_iso, plateau_iso are even in KERNEL_TYPES
    family = type_idx // 2  # 0 gaussian, 1 generalized, 2 plateau
    sx = draws.uniform(*sigma_range)
    sy = torch.where(isotropic, sx, draws.uniform(*sigma_range))
    theta = torch.where(isotropic, torch.zeros_like(sx), draws.uniform(-math.pi, math.pi))
    # beta: half the time below 1, half above (BasicSR's split at 1)
    low_half, ub = draws.bernoulli(0.5), draws()
    betag = torch.where(low_half, betag_range[0] + (1 - betag_range[0]) * ub, 1 + (betag_range[1] - 1) * ub)
    betap = torch.where(low_half, betap_range[0] + (1 - betap_range[0]) * ub, 1 + (betap_range[1] - 1) * ub)
    beta = torch.where(family == 1, betag, torch.where(family == 2, betap, torch.ones_like(sx)))
    use_sinc, uc = draws.bernoulli(sinc_prob), draws()
    cutoff = torch.where(sizes < 13, math.pi / 3 + (math.pi - math.pi / 3) * uc, math.pi / 5 + (math.pi - math.pi / 5) * uc)
    # one host-to-device transfer for all parameters
    p = to_device(torch.stack([family, sx, sy, theta, beta, sizes, cutoff, use_sinc]).float(), device)
    kernels = gaussian_family_kernels(p[0].long(), p[1], p[2], p[3], p[4], p[5].long(), grid_size)
    kernels = torch.where(p[7, :, None, None] > 0, sinc_kernels(p[6], p[5].long(), grid_size), kernels)
    params = {"kernel_size": sizes, "kernel_type": torch.where(use_sinc, -1, type_idx), "sigma_x": sx, "sigma_y": sy}
    return kernels, params


def to_device(t: Tensor, device) -> Tensor:
    """CPU tensor -> ``device`` without a host sync (pinned, non-blocking on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def delta_kernels(n: int, device, grid_size: int = 21) -> Tensor:
    """(n, S, S) identity kernels (a single 1 at the centre)."""
    k = torch.zeros(n, grid_size, grid_size, device=device)
    k[:, grid_size // 2, grid_size // 2] = 1.0
    return k
