"""TensorBoard helpers for SR tasks: LR | every emitted scale | HR grids, and Y-channel metrics
named as ``arsr test`` names them (``<stage>/psnr_y``, ``<stage>/ssim_y``, earlier outputs ``_x<m>``).

    outs = [(o + 1) / 2 for o in self.super_resolve(lr_up[:n], generator=g)]   # [0, 1]
    log_sr_grid(self, "val/lr_scales_hr", (lr_up[:n] + 1) / 2, outs, (hr[:n] + 1) / 2)
    self.log_dict(sr_metrics(outs, (hr[:n] + 1) / 2, lr[:n], "val"), batch_size=n)
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torch import Tensor

from arsr.metrics import psnr, ssim

SSIM_WINDOW = 11


def column_titles(outputs: list[Tensor]) -> list[str]:
    """``LR``, one title per output (``16px`` for a scale at 16 x 16, the last one ``SR``), ``HR``."""
    return ["LR"] + [f"{o.shape[-1]}px" for o in outputs[:-1]] + ["SR", "HR"]


def _header(titles: list[str], cell: int, pad: int) -> Tensor:
    """A white strip with one title centred over each column, (3, 14, W) in [0, 1]."""
    width = len(titles) * (cell + pad) + pad
    img = Image.new("RGB", (width, 14), "white")
    draw = ImageDraw.Draw(img)
    for k, t in enumerate(titles):
        x = pad + k * (cell + pad) + max((cell - draw.textlength(t)) // 2, 0)
        draw.text((x, 1), t, fill="black")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def sr_grid(lr: Tensor, outputs: list[Tensor], hr: Tensor, n: int = 4, titles: bool = True) -> Tensor:
    """One row per sample: LR | each output (nearest-upsampled to the HR size, so each scale shows its
    own pixels) | HR, with a title row. Inputs (B, 3, h, w) in [0, 1]; returns (3, H, W) in [0, 1]."""
    size = hr.shape[-2:]
    up = lambda x: x if x.shape[-2:] == size else F.interpolate(x.float(), size=size, mode="nearest")
    cols = [up(lr[:n])] + [up(o[:n]) for o in outputs] + [hr[:n]]
    cells = torch.stack([c.detach().float().cpu().clamp(0, 1) for c in cols], dim=1)  # (n, cols, 3, H, W)
    pad = 2
    grid = torchvision.utils.make_grid(cells.flatten(0, 1), nrow=len(cols), padding=pad, pad_value=1.0)
    if not titles:
        return grid
    return torch.cat([_header(column_titles(outputs), size[-1], pad), grid], dim=1)


def log_sr_grid(module: L.LightningModule, tag: str, lr_up: Tensor, outputs: list[Tensor], hr: Tensor, n: int = 4) -> None:
    """Adds ``sr_grid`` to the module's TensorBoard logger at the current global step (rank 0 only;
    nothing without a logger that takes images). ``lr_up``, ``outputs``, ``hr`` in [0, 1]."""
    exp = getattr(module.logger, "experiment", None) if module.logger is not None else None
    if module.global_rank != 0 or exp is None or not hasattr(exp, "add_image"):
        return
    exp.add_image(tag, sr_grid(lr_up, outputs, hr, n), module.global_step)


def sr_metrics(outputs: list[Tensor], hr: Tensor, lr: Tensor, stage: str = "val") -> dict[str, Tensor]:
    """Mean PSNR / SSIM on BT.601 Y of every output, named as ``arsr test`` does: the last output
    ``<stage>/psnr_y`` / ``<stage>/ssim_y`` against ``hr``; earlier ones (MSVAR's 1x / 2x)
    ``<stage>/psnr_y_x<m>`` against the HR resized to their size (bicubic, antialiased). The border
    crop is the output's magnification over ``lr`` (at least 1); SSIM only where its 11 x 11 window fits.
    Images in [0, 1]."""
    out: dict[str, Tensor] = {}
    for i, sr in enumerate(outputs):
        final = i == len(outputs) - 1
        mag = round(sr.shape[-1] / lr.shape[-1])
        ref = hr if final else F.interpolate(hr, size=sr.shape[-2:], mode="bicubic", antialias=True).clamp(0, 1)
        suffix, crop = ("" if final else f"_x{mag}"), max(mag, 1)
        out[f"{stage}/psnr_y{suffix}"] = psnr(sr, ref, crop_border=crop).mean()
        if min(sr.shape[-2:]) - 2 * crop >= SSIM_WINDOW:
            out[f"{stage}/ssim_y{suffix}"] = ssim(sr, ref, crop_border=crop).mean()
    return out
