"""SR metrics with the conventions written out (BasicSR / MATLAB for PSNR and SSIM).

PSNR / SSIM: RGB in [0, 1] -> Y of BT.601 YCbCr as MATLAB's rgb2ycbcr
(Y = 16 + 65.481 R + 128.553 G + 24.966 B, range [16, 235]), ``crop_border`` pixels removed on
every side (= scale by convention), float64 on [0, 255] values; SSIM with an 11 x 11 Gaussian
window (sigma 1.5), C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2, 'valid' filtering.
Learned metrics (LPIPS, DISTS, FID, NIQE, MUSIQ, ...) need weight files: they are built from
local paths only and reported as skipped (with the reason) when the path is missing.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

BT601 = (65.481, 128.553, 24.966)


def rgb_to_y(img: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) BT.601 Y in [16, 235] (float64)."""
    w = torch.tensor(BT601, dtype=torch.float64, device=img.device).view(1, 3, 1, 1)
    return 16.0 + (img.double() * w).sum(1, keepdim=True)


def _prepare(sr: Tensor, hr: Tensor, crop_border: int, y_channel: bool) -> tuple[Tensor, Tensor]:
    if sr.shape != hr.shape:
        raise ValueError(f"SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ in shape")
    # quantise to 8 bits as images on disk are
    sr, hr = (sr.clamp(0, 1) * 255).round() / 255, (hr.clamp(0, 1) * 255).round() / 255
    if y_channel:
        sr, hr = rgb_to_y(sr), rgb_to_y(hr)
    else:
        sr, hr = sr.double() * 255, hr.double() * 255
    if crop_border:
        sr, hr = sr[..., crop_border:-crop_border, crop_border:-crop_border], hr[..., crop_border:-crop_border, crop_border:-crop_border]
    return sr, hr


def psnr(sr: Tensor, hr: Tensor, crop_border: int = 0, y_channel: bool = True) -> Tensor:
    """Per-image PSNR (B,) in dB."""
    sr, hr = _prepare(sr, hr, crop_border, y_channel)
    mse = (sr - hr).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> Tensor:
    x = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(sr: Tensor, hr: Tensor, crop_border: int = 0, y_channel: bool = True) -> Tensor:
    """Per-image SSIM (B,), MATLAB's ssim_index conventions (channels averaged when RGB)."""
    sr, hr = _prepare(sr, hr, crop_border, y_channel)
    c = sr.shape[1]
    win = _gaussian_window(device=sr.device).expand(c, 1, 11, 11)
    blur = lambda x: F.conv2d(x, win, groups=c)  # 'valid'
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = blur(sr), blur(hr)
    s11, s22, s12 = blur(sr * sr) - mu1**2, blur(hr * hr) - mu2**2, blur(sr * hr) - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s11 + s22 + c2))
    return m.mean(dim=(1, 2, 3))


class LearnedMetrics:
    """LPIPS / DISTS (torchmetrics) and pyiqa no-reference metrics, each from a local weight file.

    Args:
        lpips_vgg: torchvision ``vgg16`` weights for the LPIPS backbone.
        dists_vgg: torchvision ``vgg16`` weights for DISTS.
        fid_inception: torch-fidelity Inception weights (``pt_inception-2015-12-05``).
        pyiqa: metric name -> local ``pretrained_model_path`` (niqe, musiq, maniqa, clipiqa, topiq_nr).
    """

    def __init__(self, lpips_vgg: str | None = None, dists_vgg: str | None = None, fid_inception: str | None = None,
                 pyiqa: dict[str, str] | None = None, device: str = "cpu"):
        self.skipped: dict[str, str] = {}
        self.full_ref: dict[str, object] = {}
        self.no_ref: dict[str, object] = {}
        self.fid = None
        self.device = device
        if self._have("lpips", lpips_vgg, "--lpips_vgg <vgg16-397923af.pth>"):
            from arsr.losses import LPIPS

            lp = LPIPS(lpips_vgg).to(device)
            self.full_ref["lpips"] = lambda sr, hr: torch.stack([lp(a[None] * 2 - 1, b[None] * 2 - 1) for a, b in zip(sr, hr)])
        if self._have("dists", dists_vgg, "--dists_vgg <vgg16-397923af.pth>"):
            dists = self._dists(dists_vgg)
            self.full_ref["dists"] = lambda sr, hr: dists(sr, hr).reshape(-1)
        if self._have("fid", fid_inception, "--fid_inception <pt_inception-2015-12-05.pth>"):
            from torchmetrics.image.fid import FrechetInceptionDistance

            self.fid = FrechetInceptionDistance(feature_extractor_weights_path=fid_inception, normalize=True).to(device)
        for name, path in (pyiqa or {}).items():
            if self._have(name, path, f"--pyiqa '{{{name}: <local weights>}}'"):
                try:
                    import pyiqa as _pyiqa
                except ImportError:
                    self.skipped[name] = "pyiqa is not installed (pip install -e '.[iqa]')"
                    continue
                self.no_ref[name] = _pyiqa.create_metric(name, device=device, pretrained_model_path=path)
        for name in ("niqe", "musiq", "maniqa", "clipiqa", "topiq_nr"):
            if name not in self.no_ref and name not in self.skipped:
                self.skipped[name] = f"no local weights given (--pyiqa '{{{name}: <path>}}')"

    def _have(self, name: str, path: str | None, how: str) -> bool:
        if path is None:
            self.skipped[name] = f"no local weights given ({how})"
            return False
        if not Path(path).is_file():
            self.skipped[name] = f"weights file {path} not found"
            return False
        return True

    def _dists(self, path: str):
        """torchmetrics' DISTS network builds torchvision's VGG16 with its default weights: point
        the torch hub cache at a folder holding the given file under the expected name, so it loads
        from disk. Returns a module scoring each image pair (inputs in [0, 1])."""
        import os
        import tempfile

        import torchvision
        from torchmetrics.functional.image.dists import DISTSNetwork

        name = Path(torchvision.models.VGG16_Weights.DEFAULT.url).name
        hub = Path(tempfile.mkdtemp(prefix="arsr-hub-"))
        (hub / "checkpoints").mkdir()
        os.symlink(Path(path).resolve(), hub / "checkpoints" / name)
        old = torch.hub.get_dir()
        torch.hub.set_dir(str(hub))
        try:
            return DISTSNetwork().to(self.device).eval()
        finally:
            torch.hub.set_dir(old)

    @torch.no_grad()
    def update(self, sr: Tensor, hr: Tensor | None) -> dict[str, Tensor]:
        """Per-image scores of one batch (images in [0, 1])."""
        out = {}
        if hr is not None:
            for name, score in self.full_ref.items():  # inputs in [0, 1]
                out[name] = score(sr.to(self.device), hr.to(self.device)).cpu()
            if self.fid is not None:
                self.fid.update(hr.to(self.device), real=True)
                self.fid.update(sr.to(self.device), real=False)
        for name, m in self.no_ref.items():
            out[name] = m(sr.to(self.device)).flatten().cpu()
        return out

    def compute_fid(self) -> float | None:
        return float(self.fid.compute()) if self.fid is not None else None
