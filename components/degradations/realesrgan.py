"""Real-ESRGAN second-order degradation, batched on the device with per-sample parameters.

Defaults are those of Real-ESRGAN x4plus (``options/train_realesrgan_x4plus.yml``).
Per sample: both blur kernels and the final sinc kernel, whether the second blur happens,
Gaussian vs Poisson noise, its strength and colour/gray choice, JPEG quality, and the
clean bilinear branch. Per batch (as Real-ESRGAN, since sizes must agree inside a batch):
resize direction, factor and interpolation mode, and the order of the final stage.

Gray noise (Gaussian or Poisson) is one field copied to the three channels, as BasicSR.
Deviations from BasicSR, on purpose: each gray-noise sample draws its own noise field
(BasicSR shares one field across the batch); JPEG is Kornia's differentiable codec
(libjpeg-style tables) rather than BasicSR's DiffJPEG; the training-pair pool is not
part of the degradation (most choices here are already per sample).
"""

from __future__ import annotations

from typing import Literal

import kornia
import torch
import torch.nn.functional as F
from torch import Tensor

from arsr.interfaces import Degradation, DegradedBatch

from .kernels import delta_kernels, odd_sizes, random_mixed_kernels, sinc_kernels, uniform

Range = tuple[float, float]
RESIZE_MODES = ("area", "bilinear", "bicubic")


def usm_sharpen(img: Tensor, weight: float = 0.5, threshold: float = 10, radius: int = 50) -> Tensor:
    """Unsharp masking as Real-ESRGAN's USMSharp: soft-masked ``img + weight * (img - blur)``."""
    ks = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((ks - 1) * 0.5 - 1) + 0.8  # OpenCV's rule for sigma = 0
    blur = lambda x: kornia.filters.gaussian_blur2d(x, (ks, ks), (sigma, sigma), border_type="reflect")
    residual = img - blur(img)
    mask = (residual.abs() * 255 > threshold).float()
    soft_mask = blur(mask)
    sharp = (img + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * img


def blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Per-sample kernels (B, k, k); reflect border, or replicate where the image is too small to reflect."""
    border = "reflect" if min(x.shape[-2:]) > kernels.shape[-1] // 2 else "replicate"
    return kornia.filters.filter2d(x, kernels, border_type=border)


def add_noise(
    x: Tensor,
    gaussian_prob: float,
    sigma_range_255: Range,
    poisson_scale_range: Range,
    gray_prob: float,
    g: torch.Generator | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Gaussian or Poisson noise, chosen per sample, colour or gray per sample; clamps to [0, 1]."""
    b, device = x.shape[0], x.device
    use_gauss = torch.rand(b, generator=g, device=device) < gaussian_prob
    gray = (torch.rand(b, generator=g, device=device) < gray_prob)[:, None, None, None]

    sigma = uniform(b, *sigma_range_255, g, device) / 255.0
    gauss = torch.randn(x.shape, generator=g, device=device)
    gauss = torch.where(gray, gauss[:, :1].expand_as(gauss), gauss) * sigma[:, None, None, None]

    # Poisson: counts scaled by the number of distinct 8-bit levels, rounded up to a power of 2
    scale = uniform(b, *poisson_scale_range, g, device)
    src = torch.where(gray, kornia.color.rgb_to_grayscale(x).expand_as(x), x)
    q = (src * 255).round().clamp(0, 255)
    hist = torch.zeros(b, 256, device=device).scatter_add_(1, q.flatten(1).long(), torch.ones_like(q.flatten(1)))
    levels = (hist > 0).sum(1).float()
    vals = (2 ** torch.ceil(torch.log2(levels)))[:, None, None, None]
    poisson = (torch.poisson(q / 255 * vals, generator=g) / vals - q / 255) * scale[:, None, None, None]
    poisson = torch.where(gray, poisson[:, :1].expand_as(poisson), poisson)  # gray: one field in all channels

    noise = torch.where(use_gauss[:, None, None, None], gauss, poisson)
    params = {"gaussian_noise": use_gauss, "gray_noise": gray.flatten(), "noise_sigma": sigma, "poisson_scale": scale}
    return (x + noise).clamp(0, 1), params


def jpeg(x: Tensor, quality_range: Range, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    quality = uniform(x.shape[0], *quality_range, g, x.device)
    return kornia.enhance.jpeg_codec_differentiable(x.clamp(0, 1), quality).clamp(0, 1), quality


def _choice(probs, g, device) -> int:
    """Index drawn from the categorical distribution ``probs``."""
    return int(torch.multinomial(torch.tensor(probs, device=device, dtype=torch.float32), 1, generator=g))


class RealESRGANDegradation(Degradation):
    """Second-order blur -> resize -> noise -> JPEG degradation (Wang et al., 2021).

    Every stage's knob is an argument so that a YAML recipe can record and override it.
    ``clean_prob`` sends a sample down a bilinear-only branch and flags it non-degraded
    (MSVAR's second quality class).
    """

    def __init__(
        self,
        scale: int = 4,
        # first degradation
        kernel_prob: tuple[float, float, float, float, float, float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
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
        upsample_mode: Literal["bicubic", "bilinear"] = "bicubic",
        kernel_grid: int = 21,
    ):
        super().__init__()
        if abs(sum(kernel_prob) - 1) > 1e-6 or abs(sum(resize_prob) - 1) > 1e-6 or abs(sum(resize_prob2) - 1) > 1e-6:
            raise ValueError("kernel_prob, resize_prob and resize_prob2 must each sum to 1")
        if kernel_size_range[0] % 2 == 0 or kernel_size_range[1] % 2 == 0 or kernel_size_range[1] > kernel_grid:
            raise ValueError(f"kernel_size_range {kernel_size_range} must hold odd sizes <= kernel_grid={kernel_grid}")
        self.scale = scale
        self.cfg = dict(locals())
        self.cfg.pop("self"), self.cfg.pop("__class__", None)

    # -- pieces ---------------------------------------------------------------------------
    def _blur_kernels(self, n: int, second: bool, g, device) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.cfg
        sfx = "2" if second else ""
        return random_mixed_kernels(
            n,
            c["kernel_prob"],
            c[f"blur_sigma{sfx}"],
            c[f"betag_range{sfx}"],
            c[f"betap_range{sfx}"],
            c[f"sinc_prob{sfx}"],
            c["kernel_size_range"],
            g,
            device,
            c["kernel_grid"],
        )

    def _random_resize(self, x: Tensor, probs, factor_range: Range, base_hw: tuple[int, int], g) -> tuple[Tensor, Tensor]:
        direction = _choice(probs, g, x.device)  # 0 up, 1 down, 2 keep
        lo, hi = factor_range
        factor = [uniform(1, 1.0, hi, g, x.device), uniform(1, lo, 1.0, g, x.device), torch.ones(1)][direction].item()
        mode = RESIZE_MODES[_choice((1 / 3, 1 / 3, 1 / 3), g, x.device)]
        size = (max(1, int(base_hw[0] * factor)), max(1, int(base_hw[1] * factor)))
        return kornia.geometry.transform.resize(x, size, interpolation=mode, antialias=False), torch.tensor(factor)

    def _final_resize(self, x: Tensor, size: tuple[int, int], g) -> Tensor:
        mode = RESIZE_MODES[_choice((1 / 3, 1 / 3, 1 / 3), g, x.device)]
        return kornia.geometry.transform.resize(x, size, interpolation=mode, antialias=False)

    # -- pipeline -------------------------------------------------------------------------
    def forward(self, hr: Tensor, generator: torch.Generator | None = None) -> DegradedBatch:
        c, g = self.cfg, generator
        b, _, h, w = hr.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"HR size {h}x{w} is not divisible by scale {self.scale}; crop to a multiple of it")
        hr = hr.float().clamp(0, 1)
        device = hr.device
        lr_hw = (h // self.scale, w // self.scale)
        usm = usm_sharpen(hr) if (c["degrade_from_usm"] or c["sharpen_gt"]) else hr
        params: dict[str, Tensor] = {}

        # first degradation
        k1, p = self._blur_kernels(b, False, g, device)
        params.update({f"{k}1": v for k, v in p.items()})
        out = blur(usm if c["degrade_from_usm"] else hr, k1)
        out, params["resize1"] = self._random_resize(out, c["resize_prob"], c["resize_range"], (h, w), g)
        out, p = add_noise(out, c["gaussian_noise_prob"], c["noise_range"], c["poisson_scale_range"], c["gray_noise_prob"], g)
        params.update({f"{k}1": v for k, v in p.items()})
        out, params["jpeg_quality1"] = jpeg(out, c["jpeg_range"], g)

        # second degradation; samples that skip the blur get an identity kernel
        k2, p = self._blur_kernels(b, True, g, device)
        blur2 = torch.rand(b, generator=g, device=device) < c["second_blur_prob"]
        k2 = torch.where(blur2[:, None, None], k2, delta_kernels(b, device, c["kernel_grid"]))
        params.update({f"{k}2": v for k, v in p.items()}, second_blur=blur2)
        out = blur(out, k2)
        out, params["resize2"] = self._random_resize(out, c["resize_prob2"], c["resize_range2"], lr_hw, g)
        out, p = add_noise(out, c["gaussian_noise_prob2"], c["noise_range2"], c["poisson_scale_range2"], c["gray_noise_prob2"], g)
        params.update({f"{k}2": v for k, v in p.items()})

        # final stage: [resize -> sinc -> JPEG] or [JPEG -> resize -> sinc], order per batch
        sizes = odd_sizes(b, *c["kernel_size_range"], g, device)
        cutoff = uniform(b, torch.pi / 3, torch.pi, g, device)
        final_sinc = torch.rand(b, generator=g, device=device) < c["final_sinc_prob"]
        k3 = torch.where(final_sinc[:, None, None], sinc_kernels(cutoff, sizes, c["kernel_grid"]), delta_kernels(b, device, c["kernel_grid"]))
        jpeg_first = bool(torch.rand(1, generator=g, device=device) < c["final_jpeg_first_prob"])
        if jpeg_first:
            out, q2 = jpeg(out, c["jpeg_range2"], g)
            out = blur(self._final_resize(out, lr_hw, g), k3)
        else:
            out = blur(self._final_resize(out, lr_hw, g), k3)
            out, q2 = jpeg(out, c["jpeg_range2"], g)
        params.update(jpeg_quality2=q2, final_sinc=final_sinc, final_jpeg_first=torch.tensor(jpeg_first))
        lr = (out * 255).round().clamp(0, 255) / 255

        # optional clean branch: bilinear downsampling only, flagged as non-degraded
        clean = torch.rand(b, generator=g, device=device) < c["clean_prob"]
        if c["clean_prob"] > 0:
            bilinear = F.interpolate(hr, size=lr_hw, mode="bilinear", align_corners=False, antialias=True)
            lr = torch.where(clean[:, None, None, None], (bilinear * 255).round().clamp(0, 255) / 255, lr)
        params["clean"] = clean

        target = usm if c["sharpen_gt"] else hr
        lr_up = F.interpolate(lr, size=(h, w), mode=c["upsample_mode"], align_corners=False).clamp(0, 1)
        return DegradedBatch(hr=target, lr=lr, lr_up=lr_up, degraded=~clean, params=params)


class BicubicDegradation(Degradation):
    """Classic bicubic (antialiased) downsampling; the clean baseline and a fast test double."""

    def __init__(self, scale: int = 4, upsample_mode: Literal["bicubic", "bilinear"] = "bicubic"):
        super().__init__()
        self.scale = scale
        self.upsample_mode = upsample_mode

    def forward(self, hr: Tensor, generator: torch.Generator | None = None) -> DegradedBatch:
        b, _, h, w = hr.shape
        if h % self.scale or w % self.scale:
            raise ValueError(f"HR size {h}x{w} is not divisible by scale {self.scale}; crop to a multiple of it")
        lr = F.interpolate(hr.float(), size=(h // self.scale, w // self.scale), mode="bicubic", antialias=True)
        lr = (lr.clamp(0, 1) * 255).round() / 255
        lr_up = F.interpolate(lr, size=(h, w), mode=self.upsample_mode, align_corners=False).clamp(0, 1)
        return DegradedBatch(hr=hr, lr=lr, lr_up=lr_up, degraded=torch.ones(b, dtype=torch.bool, device=hr.device))
