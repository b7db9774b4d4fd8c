"""Real-ESRGAN second-order degradation, batched on the device, every random choice per sample.

Defaults are those of Real-ESRGAN x4plus (``options/train_realesrgan_x4plus.yml``), except
``sharpen_gt`` (x4plus trains against the USM-sharpened GT; here the plain GT unless set).
Every random draw of a sample comes from its own seed (:class:`SampleDraws`: blur kernels,
second-blur on/off, resize direction / factor / mode of both stages, noise type / strength /
gray, noise fields, JPEG qualities, final order and sinc, clean branch, ``lr_up`` mode), so a
sample degrades identically whatever batch it is in, on however many ranks, and after a resume.

Samples of different intermediate sizes run together on a canvas: each sample occupies the
top-left corner, the rest is its reflection (what the blur reads, as Kornia's reflect border)
or its edge (what the JPEG codec reads, as Kornia's own padding), so every op runs batched and
a sample's pixels do not depend on the canvas. Resizes are per-sample matrices (PyTorch's own
interpolation weights, area / bilinear / bicubic) applied as two batched matmuls.

Gray noise (Gaussian or Poisson) is one field copied to the three channels, as BasicSR.
Deviations from BasicSR, on purpose: each gray-noise sample draws its own noise field (BasicSR
shares one across the batch); resize factors, modes and the final order are drawn per sample
(BasicSR: per batch); JPEG is Kornia's differentiable codec (libjpeg-style tables) rather than
BasicSR's DiffJPEG; the training-pair pool is not part of the degradation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from arsr.interfaces import Degradation, DegradedBatch

from .kernels import KERNEL_TYPES, SampleDraws, delta_kernels, odd_sizes, random_mixed_kernels, sinc_kernels, to_device

Range = tuple[float, float]
RESIZE_MODES = ("area", "bilinear", "bicubic")
UpsampleMode = Literal["bicubic", "bilinear", "area", "random"]
MARGIN = 10  # canvas pixels a blur reads beyond a sample (the largest kernel radius, 21 // 2)


def draw_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    """Per-sample seeds from a batch generator (tests, benchmarks; the data module passes its own
    per-sample seeds). Reads the draw back to the host: a sync when the generator is on a GPU."""
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (n,), generator=generator, device=device).tolist()


def upsample(lr: Tensor, size: tuple[int, int], mode: UpsampleMode | Sequence[str] = "bicubic") -> Tensor:
    """LR (B, 3, h, w) in [0, 1] -> the HR grid ``size``, rounded to 8 bit: the one LR -> HR resize of
    training (``lr_up``) and inference.

    ``mode``: area / bilinear / bicubic for every sample, or a sequence with one per sample (the
    degradation's ``random`` draws them per sample, as VARSR's loader). ``random`` given here, with
    no samples to draw for (inference), is bicubic, as VARSR's test script resizes.
    """
    modes = [("bicubic" if mode == "random" else mode)] * lr.shape[0] if isinstance(mode, str) else list(mode)
    if len(modes) != lr.shape[0]:
        raise ValueError(f"{len(modes)} upsample modes for a batch of {lr.shape[0]}")
    if len(set(modes)) == 1:
        out = _interpolate(lr.float(), size, modes[0])
    else:
        out = lr.new_empty(lr.shape[0], lr.shape[1], *size, dtype=torch.float32)
        for m in sorted(set(modes)):
            idx = to_device(torch.tensor([i for i, x in enumerate(modes) if x == m]), lr.device)
            out.index_copy_(0, idx, _interpolate(lr[idx].float(), size, m))
    return (out.clamp(0, 1) * 255).round() / 255


def _interpolate(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    if mode not in RESIZE_MODES:
        raise ValueError(f"upsample mode {mode!r} is not one of {RESIZE_MODES} or 'random'")
    return F.interpolate(x, size=size, mode=mode) if mode == "area" else F.interpolate(x, size=size, mode=mode, align_corners=False)


@lru_cache(maxsize=4)
def _usm_kernel(radius: int, device: torch.device) -> Tensor:
    ks = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((ks - 1) * 0.5 - 1) + 0.8  # OpenCV's rule for sigma = 0
    return kornia.filters.get_gaussian_kernel1d(ks, sigma, device=device)


def usm_sharpen(img: Tensor, weight: float = 0.5, threshold: float = 10, radius: int = 50) -> Tensor:
    """Unsharp masking as Real-ESRGAN's USMSharp: soft-masked ``img + weight * (img - blur)``
    (the Gaussian kernel is built once per device)."""
    k = _usm_kernel(radius, img.device).to(img.dtype)
    blur = lambda x: kornia.filters.filter2d_separable(x, k, k, border_type="reflect")
    residual = img - blur(img)
    mask = (residual.abs() * 255 > threshold).to(img.dtype)
    soft_mask = blur(mask)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample kernels (B, k, k); reflect border, or replicate where the image is too small to reflect."""
    border = "reflect" if min(x.shape[-2:]) > kernels.shape[-1] // 2 else "replicate"
    return kornia.filters.filter2d(x, kernels, border_type=border)


def canvas_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """A canvas holding every sample with MARGIN to spare, in whole 16-pixel JPEG blocks."""
    return tuple(16 * math.ceil((max(s[a] for s in sizes) + MARGIN) / 16) for a in (0, 1))  # type: ignore[return-value]


def repad(x: Tensor, sizes: Tensor, mode: Literal["reflect", "replicate"]) -> Tensor:
    """Fill each sample's canvas outside its top-left ``sizes[i]`` (B, 2) region with its reflection
    (no edge repeat, as F.pad's reflect) or its edge; two batched gathers."""
    b, ch, hc, wc = x.shape

    def index(n: int, s: Tensor) -> Tensor:
        r, s = torch.arange(n, device=x.device)[None], s[:, None]
        beyond = (2 * (s - 1) - r).clamp_min(0) if mode == "reflect" else (s - 1).expand(-1, n)
        return torch.where(r < s, r, beyond)

    iy, ix = index(hc, sizes[:, 0]), index(wc, sizes[:, 1])
    x = x.gather(2, iy[:, None, :, None].expand(b, ch, hc, wc))
    return x.gather(3, ix[:, None, None, :].expand(b, ch, hc, wc))


def _resize_matrix(n_in: int, n_out: int, mode: str, device: torch.device) -> Tensor:
    """(n_out, n_in): PyTorch's 1-D interpolation (align_corners=False, no antialias) as a matrix."""
    eye = torch.eye(n_in, device=device)[None, None]  # columns are impulses; the other axis is unchanged
    return _interpolate(eye, (n_out, n_in), mode)[0, 0]


def resize(x: Tensor, sizes_in: list[tuple[int, int]], sizes_out: list[tuple[int, int]], modes: list[str],
           canvas: tuple[int, int] | None = None) -> Tensor:
    """Each sample's top-left ``sizes_in[i]`` region resized to ``sizes_out[i]`` with ``modes[i]``, on a canvas
    (default :func:`canvas_size`; outside the region: zeros, for :func:`repad`). Two batched matmuls."""
    b = x.shape[0]
    hc, wc = canvas or canvas_size(sizes_out)
    ay, ax = x.new_zeros(b, hc, x.shape[-2]), x.new_zeros(b, wc, x.shape[-1])
    built: dict[tuple[int, int, str], Tensor] = {}
    for i, ((hi, wi), (ho, wo), m) in enumerate(zip(sizes_in, sizes_out, modes)):
        for a, n_in, n_out in ((ay, hi, ho), (ax, wi, wo)):
            key = (n_in, n_out, m)
            if key not in built:
                built[key] = _resize_matrix(n_in, n_out, m, x.device)
            a[i, :n_out, :n_in] = built[key]
    return ay[:, None] @ x @ ax[:, None].transpose(-1, -2)


def add_noise(
    x: Tensor,
    sizes: list[tuple[int, int]],
    draws: SampleDraws,
    gaussian_prob: float,
    sigma_range_255: Range,
    poisson_scale_range: Range,
    gray_prob: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gaussian or Poisson noise, chosen per sample, colour or gray per sample, each sample's field from
    its own generator at its own size; clamps to [0, 1]. Poisson is computed only for the samples that
    use it. ``x``: a canvas whose samples occupy ``sizes`` (the rest is ignored and left noise-free)."""
    b, device = x.shape[0], x.device
    use_gauss, gray = draws.bernoulli(gaussian_prob), draws.bernoulli(gray_prob)
    sigma, scale, seeds = draws.uniform(*sigma_range_255) / 255.0, draws.uniform(*poisson_scale_range), draws.seed()
    p = to_device(torch.stack([use_gauss, gray, sigma, scale]).float(), device)
    gauss_l, gray_l = use_gauss.tolist(), gray.tolist()  # host-side draws
    noise = torch.zeros_like(x)
    for i in range(b):
        if gauss_l[i]:
            h, w = sizes[i]
            g = torch.Generator(device=device).manual_seed(seeds[i])
            noise[i, :, :h, :w] = torch.randn((1 if gray_l[i] else 3, h, w), generator=g, device=device)
    noise = noise * p[2][:, None, None, None]

    # Poisson: counts scaled by the number of distinct 8-bit levels, rounded up to a power of 2
    pois = [i for i in range(b) if not gauss_l[i]]
    if pois:
        idx = to_device(torch.tensor(pois), device)
        xp, grayp = x[idx], p[1][idx][:, None, None, None] > 0
        q = (torch.where(grayp, kornia.color.rgb_to_grayscale(xp).expand_as(xp), xp) * 255).round().clamp(0, 255)
        hs, ws = to_device(torch.tensor([sizes[i] for i in pois]), device).unbind(1)
        inside = (torch.arange(x.shape[-2], device=device)[None, :, None] < hs[:, None, None]) & (
            torch.arange(x.shape[-1], device=device)[None, None, :] < ws[:, None, None])
        weights = inside[:, None].expand_as(q).flatten(1).to(q.dtype)
        hist = torch.zeros(len(pois), 256, device=device, dtype=q.dtype).scatter_add_(1, q.flatten(1).long(), weights)
        vals = 2 ** torch.ceil(torch.log2((hist > 0).sum(1).to(q.dtype)))
        for j, i in enumerate(pois):
            h, w = sizes[i]
            g = torch.Generator(device=device).manual_seed(seeds[i])
            qi = q[j, : 1 if gray_l[i] else 3, :h, :w].contiguous() / 255
            field = (torch.poisson(qi * vals[j], generator=g) / vals[j] - qi) * p[3][i]
            noise[i, :, :h, :w] = field  # gray: one field in all channels
    out = (x + noise).clamp(0, 1)
    params = {"gaussian_noise": use_gauss, "gray_noise": gray, "noise_sigma": sigma, "poisson_scale": scale}
    return out, params


def jpeg(x: Tensor, quality: Tensor, sizes: Tensor | None = None) -> Tensor:
    """Kornia's JPEG at per-sample ``quality`` (CPU (B,)). With ``sizes`` (a canvas): each sample's edge
    fills its canvas block as the codec's own padding would, and its reflection is restored after."""
    q = quality.double()  # stays on the CPU: Kornia checks its range there and moves it without a sync
    if sizes is not None:
        x = repad(x, sizes, "replicate")
    out = kornia.enhance.jpeg_codec_differentiable(x.clamp(0, 1), q).clamp(0, 1)
    return out if sizes is None else repad(out, sizes, "reflect")


def _quantise(x: Tensor) -> Tensor:
    return (x * 255).round().clamp(0, 255) / 255


class RealESRGANDegradation(Degradation):
    """Second-order blur -> resize -> noise -> JPEG degradation (Wang et al., 2021).

    Every stage's knob is an argument so that a YAML recipe can record and override it.
    ``clean_prob`` sends a sample down a bilinear-only branch and flags it non-degraded
    (MSVAR's second quality class). ``upsample_mode`` is the LR -> HR-grid resize of ``lr_up``
    (:func:`upsample`; ``random``: area / bilinear / bicubic per sample, as VARSR's loader), the
    one the model must use at inference.
    """

    def __init__(
        self,
        scale: int = 4,
        # first degradation
        kernel_list: tuple[str, ...] = KERNEL_TYPES,
        kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
        kernel_size_range: tuple[int, int] = (7, 21),
        sinc_prob: float = 0.1,
        blur_sigma: Range = (0.2, 3.0),
        betag_range: Range = (0.5, 4.0),
        betap_range: Range = (1.0, 2.0),
        resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1),
        resize_range: Range = (0.15, 1.5),
        gaussian_noise_prob: float = 0.5,
        noise_range: Range = (1.0, 30.0),
        poisson_scale_range: Range = (0.05, 3.0),
        gray_noise_prob: float = 0.4,
        jpeg_range: Range = (30.0, 95.0),
        # second degradation
        second_blur_prob: float = 0.8,
        kernel_list2: tuple[str, ...] = KERNEL_TYPES,
        kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
        sinc_prob2: float = 0.1,
        blur_sigma2: Range = (0.2, 1.5),
        betag_range2: Range = (0.5, 4.0),
        betap_range2: Range = (1.0, 2.0),
        resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3),
        resize_range2: Range = (0.3, 1.2),
        gaussian_noise_prob2: float = 0.5,
        noise_range2: Range = (1.0, 25.0),
        poisson_scale_range2: Range = (0.05, 2.5),
        gray_noise_prob2: float = 0.4,
        jpeg_range2: Range = (30.0, 95.0),
        # final stage
        final_sinc_prob: float = 0.8,
        final_jpeg_first_prob: float = 0.5,
        # sharpening and extras
        degrade_from_usm: bool = True,
        sharpen_gt: bool = False,
        clean_prob: float = 0.0,
        upsample_mode: UpsampleMode = "bicubic",
        kernel_grid: int = 21,
    ):
        super().__init__()
        for name, probs in (("kernel_prob", kernel_prob), ("kernel_prob2", kernel_prob2), ("resize_prob", resize_prob),
                            ("resize_prob2", resize_prob2)):
            if abs(sum(probs) - 1) > 1e-6 or min(probs) < 0:
                raise ValueError(f"{name} {tuple(probs)} must be non-negative and sum to 1")
        for name, kinds, probs in (("kernel_list", kernel_list, kernel_prob), ("kernel_list2", kernel_list2, kernel_prob2)):
            if unknown := set(kinds) - set(KERNEL_TYPES):
                raise ValueError(f"{name}: unknown kernel type(s) {sorted(unknown)}; accepted: {KERNEL_TYPES}")
            if len(kinds) != len(probs):
                raise ValueError(f"{name} has {len(kinds)} entries but its probabilities {len(probs)}")
        if upsample_mode not in (*RESIZE_MODES, "random"):
            raise ValueError(f"upsample_mode {upsample_mode!r} is not one of {RESIZE_MODES} or 'random'")
        if kernel_size_range[0] % 2 == 0 or kernel_size_range[1] % 2 == 0 or kernel_size_range[1] > kernel_grid:
            raise ValueError(f"kernel_size_range {kernel_size_range} must hold odd sizes <= kernel_grid={kernel_grid}")
        self.scale, self.upsample_mode = scale, upsample_mode
        self.cfg = dict(locals())
        self.cfg.pop("self"), self.cfg.pop("__class__", None)

    # -- pieces ---------------------------------------------------------------------------
    def _blur_kernels(self, d: SampleDraws, second: bool, device) -> tuple[Tensor, dict[str, Tensor]]:
        c, sfx = self.cfg, "2" if second else ""
        return random_mixed_kernels(d, c[f"kernel_list{sfx}"], c[f"kernel_prob{sfx}"], c[f"blur_sigma{sfx}"], c[f"betag_range{sfx}"],
                                    c[f"betap_range{sfx}"], c[f"sinc_prob{sfx}"], c["kernel_size_range"], device, c["kernel_grid"])

    @staticmethod
    def _resize_plan(d: SampleDraws, probs, factor_range: Range, base_hw: tuple[int, int]) -> tuple[list[tuple[int, int]], list[str], Tensor]:
        """Per sample: up / down / keep with ``probs``, a factor in the range, one of RESIZE_MODES -> sizes, modes, factors."""
        direction, u, mode = d.choice(probs), d(), d.choice((1 / 3, 1 / 3, 1 / 3))
        lo, hi = factor_range
        factor = torch.where(direction == 0, 1 + (hi - 1) * u, torch.where(direction == 1, lo + (1 - lo) * u, torch.ones_like(u)))
        sizes = [(max(1, int(base_hw[0] * f)), max(1, int(base_hw[1] * f))) for f in factor.tolist()]
        return sizes, [RESIZE_MODES[m] for m in mode.tolist()], factor

    # -- pipeline -------------------------------------------------------------------------
    def forward(self, hr: Tensor, generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> DegradedBatch:
        """hr (B, 3, H, W) in [0, 1]; ``seeds``: one per sample (every draw of sample i depends on
        seeds[i] alone); without them, drawn from ``generator`` (:func:`draw_seeds`)."""
        c = self.cfg
        b, _, h, w = hr.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"HR size {h}x{w} is not divisible by scale {self.scale}; crop to a multiple of it")
        seeds = draw_seeds(b, generator) if seeds is None else list(seeds)
        if len(seeds) != b:
            raise ValueError(f"{len(seeds)} seeds for a batch of {b}")
        d = SampleDraws(seeds)
        hr = hr.float().clamp(0, 1)
        device = hr.device
        lr_hw = (h // self.scale, w // self.scale)
        usm = usm_sharpen(hr) if (c["degrade_from_usm"] or c["sharpen_gt"]) else hr
        params: dict[str, Tensor] = {}

        # first degradation: blur at the HR size, then every sample on its own size within a canvas
        k1, p = self._blur_kernels(d, False, device)
        params.update({f"{k}1": v for k, v in p.items()})
        out = blur(usm if c["degrade_from_usm"] else hr, k1)
        sizes1, modes1, params["resize1"] = self._resize_plan(d, c["resize_prob"], c["resize_range"], (h, w))
        s1 = to_device(torch.tensor(sizes1), device)
        out = repad(resize(out, [(h, w)] * b, sizes1, modes1), s1, "reflect")
        out, p = add_noise(out, sizes1, d, c["gaussian_noise_prob"], c["noise_range"], c["poisson_scale_range"], c["gray_noise_prob"])
        params.update({f"{k}1": v for k, v in p.items()})
        params["jpeg_quality1"] = d.uniform(*c["jpeg_range"])
        out = jpeg(repad(out, s1, "reflect"), params["jpeg_quality1"], s1)

        # second degradation; samples that skip the blur get an identity kernel
        k2, p = self._blur_kernels(d, True, device)
        blur2 = d.bernoulli(c["second_blur_prob"])
        k2 = torch.where(to_device(blur2, device)[:, None, None], k2, delta_kernels(b, device, c["kernel_grid"]))
        params.update({f"{k}2": v for k, v in p.items()}, second_blur=blur2)
        out = blur(out, k2)
        sizes2, modes2, params["resize2"] = self._resize_plan(d, c["resize_prob2"], c["resize_range2"], lr_hw)
        s2 = to_device(torch.tensor(sizes2), device)
        out = repad(resize(out, sizes1, sizes2, modes2), s2, "reflect")
        out, p = add_noise(out, sizes2, d, c["gaussian_noise_prob2"], c["noise_range2"], c["poisson_scale_range2"], c["gray_noise_prob2"])
        params.update({f"{k}2": v for k, v in p.items()})
        out = repad(out, s2, "reflect")

        # final stage, order per sample: [resize -> sinc -> JPEG] or [JPEG -> resize -> sinc]
        sizes3, cutoff, final_sinc = odd_sizes(d, *c["kernel_size_range"]), d.uniform(math.pi / 3, math.pi), d.bernoulli(c["final_sinc_prob"])
        kp = to_device(torch.stack([sizes3.double(), cutoff, final_sinc.double()]).float(), device)
        k3 = torch.where(kp[2, :, None, None] > 0, sinc_kernels(kp[1], kp[0].long(), c["kernel_grid"]), delta_kernels(b, device, c["kernel_grid"]))
        jpeg_first, modes3, q2 = d.bernoulli(c["final_jpeg_first_prob"]), d.choice((1 / 3, 1 / 3, 1 / 3)).tolist(), d.uniform(*c["jpeg_range2"])
        final, order = out.new_empty(b, 3, *lr_hw), jpeg_first.tolist()
        for first in (True, False):
            rows = [i for i in range(b) if order[i] == first]
            if not rows:
                continue
            idx = to_device(torch.tensor(rows), device)
            x = jpeg(out[idx], q2[rows], s2[idx]) if first else out[idx]
            x = blur(resize(x, [sizes2[i] for i in rows], [lr_hw] * len(rows), [RESIZE_MODES[modes3[i]] for i in rows], lr_hw), k3[idx])
            final.index_copy_(0, idx, x if first else jpeg(x, q2[rows]))
        params.update(jpeg_quality2=q2, final_sinc=final_sinc, final_jpeg_first=jpeg_first)
        lr = _quantise(final)

        # optional clean branch: bilinear downsampling only, flagged as non-degraded
        clean = d.bernoulli(c["clean_prob"])
        clean_dev = to_device(clean, device)
        if any(clean.tolist()):
            bilinear = F.interpolate(hr, size=lr_hw, mode="bilinear", align_corners=False, antialias=True)
            lr = torch.where(clean_dev[:, None, None, None], _quantise(bilinear), lr)
        params["clean"] = clean

        up = [RESIZE_MODES[m] for m in d.choice((1 / 3, 1 / 3, 1 / 3)).tolist()]
        lr_up = upsample(lr, (h, w), up if c["upsample_mode"] == "random" else c["upsample_mode"])
        target = usm if c["sharpen_gt"] else hr
        return DegradedBatch(hr=target, lr=lr, lr_up=lr_up, degraded=~clean_dev, params=params)


class BicubicDegradation(Degradation):
    """Classic bicubic (antialiased) downsampling; the clean baseline and a fast test double.
    ``upsample_mode`` as :class:`RealESRGANDegradation`'s (``random``: per sample, from ``seeds``)."""

    def __init__(self, scale: int = 4, upsample_mode: UpsampleMode = "bicubic"):
        super().__init__()
        if upsample_mode not in (*RESIZE_MODES, "random"):
            raise ValueError(f"upsample_mode {upsample_mode!r} is not one of {RESIZE_MODES} or 'random'")
        self.scale = scale
        self.upsample_mode = upsample_mode

    def forward(self, hr: Tensor, generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> DegradedBatch:
        b, _, h, w = hr.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"HR size {h}x{w} is not divisible by scale {self.scale}; crop to a multiple of it")
        lr = _quantise(F.interpolate(hr.float(), size=(h // self.scale, w // self.scale), mode="bicubic", antialias=True).clamp(0, 1))
        mode: UpsampleMode | list[str] = self.upsample_mode
        if mode == "random":
            draws = SampleDraws(draw_seeds(b, generator) if seeds is None else list(seeds), n=1)
            mode = [RESIZE_MODES[m] for m in draws.choice((1 / 3, 1 / 3, 1 / 3)).tolist()]
        lr_up = upsample(lr, (h, w), mode)
        return DegradedBatch(hr=hr, lr=lr, lr_up=lr_up, degraded=torch.ones(b, dtype=torch.bool, device=hr.device))
