"""Inference on image files: inputs, tiled super-resolution in latent space, and writing results.

    arsr predict --config runs/quickstart/tb/version_0/config.yaml --config recipes/predict.yaml \
        --data.init_args.inputs '[photos/]' --trainer.callbacks.init_args.out_dir sr/ \
        --ckpt_path runs/quickstart/checkpoints/last.ckpt
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor

from arsr.data.samples import IMAGE_EXTENSIONS, BadSample, image_tensor


def list_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input {item} is neither an image file nor a folder")
    if not files:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {inputs}")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """LR images (and, for ``arsr test``, the HR images of the same name in ``hr_dir``)."""

    def __init__(self, files: list[Path], min_size: int, hr_dir: str | None = None):
        self.files, self.min_size, self.hr_dir = files, min_size, Path(hr_dir) if hr_dir else None

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Tensor:
        img = image_tensor(path.read_bytes())  # converts gray / palette / 16-bit / opaque alpha
        if min(img.shape[1:]) < self.min_size:
            raise BadSample("too_small", f"{img.shape[2]}x{img.shape[1]} < {self.min_size} px")
        return img

    def __getitem__(self, i: int) -> dict | None:
        path = self.files[i]
        try:
            item = {"lr": self._load(path), "name": path.stem, "path": str(path)}
            caption = path.with_suffix(".txt")
            if caption.is_file():  # per-image prompt for text-conditioned models
                item["caption"] = caption.read_text().strip()
            if self.hr_dir is not None:
                hr = next((p for p in self.hr_dir.glob(path.stem + ".*") if p.suffix.lower() in IMAGE_EXTENSIONS), None)
                if hr is None:
                    raise BadSample("no_hr", f"no HR image named {path.stem}.* in {self.hr_dir}")
                item["hr"] = self._load(hr)
            return item
        except (BadSample, OSError) as e:
            print(f"arsr: skipping {path}: {e}", file=sys.stderr)
            return {"skipped": str(path), "reason": str(e)}


def _collate(items: list[dict]) -> dict:
    assert len(items) == 1, "images differ in size: one per batch (tiles are batched inside)"
    return items[0]


class ImageFolderInput(L.LightningDataModule):
    """Image files or folders for ``arsr predict`` (and, with ``hr_dir``, ``arsr test``).

    Args:
        inputs: files and/or folders (searched recursively for png/jpg/webp).
        hr_dir: folder of HR images with the same names (paired evaluation with ``arsr test``).
        min_size: inputs smaller than this (short side, px) are reported and skipped.
        num_workers: loader workers.
    """

    def __init__(self, inputs: list[str], hr_dir: str | None = None, min_size: int = 8, num_workers: int = 0):
        super().__init__()
        self.files = list_images(inputs)
        if hr_dir is not None and not Path(hr_dir).is_dir():
            raise FileNotFoundError(f"hr_dir {hr_dir} is not a folder")
        self.hr_dir, self.min_size, self.num_workers = hr_dir, min_size, num_workers

    def _loader(self, hr_dir):
        ds = ImageFiles(self.files, self.min_size, hr_dir)
        return torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=_collate, num_workers=self.num_workers)

    def predict_dataloader(self):
        return self._loader(None)

    def test_dataloader(self):
        if self.hr_dir is None:
            raise ValueError("arsr test with ImageFolderInput needs --data.init_args.hr_dir (HR images of the same names)")
        return self._loader(self.hr_dir)


def gaussian_weight(n: int, device) -> Tensor:
    """(n, n) separable Gaussian weight centred on the tile (variance 0.01 in units of the tile side)."""
    x = (torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2) / n
    g = torch.exp(-(x**2) / (2 * 0.01))
    return g[:, None] * g[None, :]


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)  # the last tile snaps to the border
    return starts


@torch.no_grad()
def tiled_fhat(sample_fhat, lr_up: Tensor, tile: int, overlap: int, downsample: int, batch: int) -> Tensor:
    """Super-resolve an (1, 3, H, W) image of any size >= one tile by overlapping tiles of ``tile``
    latent cells, blended in latent space with Gaussian weights. ``sample_fhat`` maps a batch of
    image tiles (n, 3, tile*ds, tile*ds) to latents (n, C, tile, tile)."""
    _, _, H, W = lr_up.shape
    h, w = H // downsample, W // downsample
    stride = tile - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the tile ({tile} latent cells)")
    coords = [(y, x) for y in tile_starts(h, tile, stride) for x in tile_starts(w, tile, stride)]
    weight = gaussian_weight(tile, lr_up.device)
    canvas, norm = None, torch.zeros(h, w, device=lr_up.device)
    px = tile * downsample
    for i in range(0, len(coords), batch):
        group = coords[i : i + batch]
        tiles = torch.cat([lr_up[..., y * downsample : y * downsample + px, x * downsample : x * downsample + px] for y, x in group])
        f = sample_fhat(tiles)
        if canvas is None:
            canvas = torch.zeros(f.shape[1], h, w, device=lr_up.device)
        for (y, x), ft in zip(group, f):
            canvas[:, y : y + tile, x : x + tile] += ft * weight
            norm[y : y + tile, x : x + tile] += weight
    return (canvas / norm)[None]


class SRWriter(BasePredictionWriter):
    """Writes each prediction as PNG: ``<name>.png``, plus ``<name>_x1.png`` / ``_x2.png`` for the
    earlier outputs of multi-scale models. Files are written to a temporary name and renamed."""

    def __init__(self, out_dir: str = "sr"):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if prediction is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        outs = prediction["outputs"]
        for k, img in enumerate(outs):
            suffix = "" if k == len(outs) - 1 else f"_x{2 ** k}"
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            target = self.out_dir / f"{prediction['name']}{suffix}.png"
            fd, tmp = tempfile.mkstemp(dir=self.out_dir, suffix=".png.tmp")
            os.close(fd)
            Image.fromarray(arr).save(tmp, format="PNG")
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
