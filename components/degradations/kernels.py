"""Random blur kernels of the Real-ESRGAN family, drawn per sample on the batch's device.

Every kernel lives on a ``size x size`` grid (21 by default). A kernel of a smaller odd
size ``k`` is the same formula evaluated on the central ``k x k`` window and zero outside,
which is exactly "compute at size k, then zero-pad to 21" as BasicSR does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def uniform(shape: tuple[int, ...] | int, low: float, high: float, g: torch.Generator | None, device) -> Tensor:
    shape = (shape,) if isinstance(shape, int) else shape
    return low + (high - low) * torch.rand(shape, generator=g, device=device)


def _grid(size: int, device) -> tuple[Tensor, Tensor]:
    r = torch.arange(size, device=device, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return xx, yy  # (size, size) each


def odd_sizes(n: int, low: int, high: int, g, device) -> Tensor:
    """(n,) odd kernel sizes uniformly from {low, low+2, ..., high}."""
    choices = torch.arange(low, high + 1, 2, device=device)
    return choices[torch.randint(len(choices), (n,), generator=g, device=device)]


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
    n: int,
    kernel_prob: tuple[float, ...],
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
    sinc_prob: float,
    size_range: tuple[int, int],
    g: torch.Generator | None,
    device,
    grid_size: int = 21,
) -> tuple[Tensor, dict[str, Tensor]]:
    """n kernels as Real-ESRGAN draws them for one degradation stage -> (n, S, S), params."""
    sizes = odd_sizes(n, *size_range, g, device)
    type_idx = torch.multinomial(torch.tensor(kernel_prob, device=device).expand(n, -1), 1, generator=g)[:, 0]
    isotropic = type_idx % 2 == 0  # iso, generalized_iso, plateau_iso are even in KERNEL_TYPES
    family = type_idx // 2  # 0 gaussian, 1 generalized, 2 plateau
    sx = uniform(n, *sigma_range, g, device)
    sy = torch.where(isotropic, sx, uniform(n, *sigma_range, g, device))
    theta = torch.where(isotropic, torch.zeros_like(sx), uniform(n, -math.pi, math.pi, g, device))
    # beta: half the time below 1, half above (BasicSR's split at 1)
    low_half = torch.rand(n, generator=g, device=device) < 0.5
    betag = torch.where(low_half, uniform(n, betag_range[0], 1.0, g, device), uniform(n, 1.0, betag_range[1], g, device))
    betap = torch.where(low_half, uniform(n, betap_range[0], 1.0, g, device), uniform(n, 1.0, betap_range[1], g, device))
    beta = torch.where(family == 1, betag, torch.where(family == 2, betap, torch.ones_like(sx)))
    kernels = gaussian_family_kernels(family, sx, sy, theta, beta, sizes, grid_size)

    use_sinc = torch.rand(n, generator=g, device=device) < sinc_prob
    cutoff = torch.where(
        sizes < 13, uniform(n, math.pi / 3, math.pi, g, device), uniform(n, math.pi / 5, math.pi, g, device)
    )
    kernels = torch.where(use_sinc[:, None, None], sinc_kernels(cutoff, sizes, grid_size), kernels)
    params = {"kernel_size": sizes, "kernel_type": torch.where(use_sinc, -1, type_idx), "sigma_x": sx, "sigma_y": sy}
    return kernels, params


def delta_kernels(n: int, device, grid_size: int = 21) -> Tensor:
    """(n, S, S) identity kernels (a single 1 at the centre)."""
    k = torch.zeros(n, grid_size, grid_size, device=device)
    k[:, grid_size // 2, grid_size // 2] = 1.0
    return k
