"""Inference on image files: inputs, tiled super-resolution in latent space, and writing results.

    arsr predict --config runs/quickstart/tb/version_0/config.yaml --config recipes/predict.yaml \
        --data.init_args.inputs '[photos/]' --trainer.callbacks.init_args.out_dir sr/ \
        --ckpt_path runs/quickstart/checkpoints/last.ckpt
"""

from __future__ import annotations

import glob
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch import Tensor

from arsr.checkpoint import atomic_path
from arsr.data.samples import IMAGE_EXTENSIONS, BadSample, image_tensor


def list_images(inputs: list[str]) -> dict[Path, str]:
    """Image files and folders (recursive) -> {file: output name}. The output name is the path
    relative to its folder without the extension (``sub/a``); an input sharing that name with
    another keeps its extension (``a.png`` -> ``a``, ``a.jpg`` -> ``a.jpg``), so no two inputs
    write one output. Clashes left over (``a.png`` and ``a.PNG``) are refused up front."""
    rel: dict[Path, Path] = {}
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            rel |= {f: f.relative_to(p) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS}
        elif p.is_file():
            rel[p] = Path(p.name)
        else:
            raise FileNotFoundError(f"input {item} is neither an image file nor a folder")
    if not rel:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {inputs}")
    stems = Counter(r.with_suffix("").as_posix() for r in rel.values())
    names = {f: r.with_suffix("").as_posix() if stems[r.with_suffix("").as_posix()] == 1 or r.suffix.lower() == ".png"
             else r.as_posix() for f, r in rel.items()}
    clashes = [n for n, c in Counter(names.values()).items() if c > 1]
    if clashes:
        lists = "; ".join(", ".join(str(f) for f, n in names.items() if n == c) for c in clashes[:5])
        raise ValueError(f"{len(clashes)} output name(s) would be written by more than one input: {lists}")
    return names


class ImageFiles(torch.utils.data.Dataset):
    """LR images (and, for ``arsr test``, the HR images of the same name in ``hr_dir``, ``scale`` x the LR)."""

    def __init__(self, files: dict[Path, str], min_size: int, hr_dir: str | None = None, scale: int | None = None):
        self.files, self.names = list(files), files
        self.min_size, self.hr_dir, self.scale = min_size, Path(hr_dir) if hr_dir else None, scale

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> Tensor:
        img = image_tensor(path.read_bytes())  # EXIF orientation; gray / palette / 16-bit / opaque alpha converted
        if min(img.shape[1:]) < self.min_size:
            raise BadSample("too_small", f"{img.shape[2]}x{img.shape[1]} < {self.min_size} px")
        return img

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        try:
            item = {"lr": self._load(path), "name": self.names[path], "path": str(path)}
            caption = path.with_suffix(".txt")
            if caption.is_file():  # per-image prompt for text-conditioned models
                item["caption"] = caption.read_text().strip()
            if self.hr_dir is not None:
                hr = next((p for p in sorted(self.hr_dir.glob(glob.escape(path.stem) + ".*")) if p.suffix.lower() in IMAGE_EXTENSIONS), None)
                if hr is None:
                    raise BadSample("no_hr", f"no HR image named {path.stem}.* in {self.hr_dir}")
                item["hr"] = self._load(hr)
                (h, w), (H, W) = item["lr"].shape[1:], item["hr"].shape[1:]
                if self.scale and (H, W) != (h * self.scale, w * self.scale):
                    raise BadSample("mis_sized", f"HR {hr.name} is {W}x{H}, not {self.scale}x the LR {w}x{h}")
            return item
        except (BadSample, OSError) as e:
            print(f"arsr: skipping {path}: {e}", file=sys.stderr)
            return {"skipped": str(path), "reason": str(e)}


def _collate(items: list[dict]) -> dict:
    assert len(items) == 1, "images differ in size: one per batch (tiles are batched inside)"
    return items[0]


class ImageFolderInput(L.LightningDataModule):
    """Image files or folders for ``arsr predict`` (and, with ``hr_dir``, ``arsr test``).

    Inputs that cannot be used (unreadable, too small, no or mis-sized HR) are skipped, listed
    in ``failed`` and in the summary at the end; each input is read exactly once.

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
        self.failed: dict[str, str] = {}

    def _loader(self, hr_dir):
        scale = getattr(self.trainer.lightning_module, "scale", None) if self.trainer else None
        ds = ImageFiles(self.files, self.min_size, hr_dir, scale)
        return torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=_collate, num_workers=self.num_workers)

    def predict_dataloader(self):
        return self._loader(None)

    def test_dataloader(self):
        if self.hr_dir is None:
            raise ValueError("arsr test with ImageFolderInput needs --data.init_args.hr_dir (HR images of the same names)")
        return self._loader(self.hr_dir)

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if "skipped" in batch:
            self.failed[batch["skipped"]] = batch["reason"]
        return batch

    def teardown(self, stage: str) -> None:
        if stage == "test" and self.failed:
            print(f"arsr test: {len(self.failed)} pair(s) skipped, not in the scores:", file=sys.stderr)
            for path, reason in self.failed.items():
                print(f"  {path}: {reason}", file=sys.stderr)


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


def _write_png(arr, target: Path) -> None:
    with atomic_path(target) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


class SRWriter(BasePredictionWriter):
    """Writes each prediction as PNG under its input's relative name (``sub/a.png``), plus
    ``<name>_x1.png`` / ``_x2.png`` for the earlier outputs of multi-scale models, atomically.

    Existing outputs are kept and their inputs not computed unless ``overwrite``; the run ends
    with a summary (written, skipped, failed with reasons) and fails when any input failed.

    Args:
        out_dir: output folder (checked writable before the model runs).
        overwrite: replace existing outputs (``arsr predict ... --overwrite``).
    """

    def __init__(self, out_dir: str = "sr", overwrite: bool = False):
        super().__init__(write_interval="batch")
        self.out_dir, self.overwrite = Path(out_dir), overwrite
        self.written, self.existing = 0, 0
        self.failed: dict[str, str] = {}

    def target(self, name: str) -> Path:
        return self.out_dir / f"{name}.png"

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "predict" or self.overwrite or not isinstance(dm, ImageFolderInput):
            return
        todo = {f: n for f, n in dm.files.items() if not self.target(n).exists()}
        self.existing, dm.files = len(dm.files) - len(todo), todo

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if "skipped" in batch:
            self.failed[batch["skipped"]] = batch["reason"]
        if prediction is None:
            return
        outs = prediction["outputs"]
        for k, img in enumerate(outs):
            suffix = "" if k == len(outs) - 1 else f"_x{2 ** k}"
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            _write_png(arr, self.target(prediction["name"] + suffix))
        self.written += 1

    def summary(self) -> str:
        parts = [f"written {self.written} to {self.out_dir}"]
        if self.existing:
            parts.append(f"skipped {self.existing} whose output exists (--overwrite replaces them)")
        parts.append(f"failed {len(self.failed)}" + "".join(f"\n  {p}: {r}" for p, r in self.failed.items()))
        return "arsr predict: " + ", ".join(parts)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "predict":  # also when every output existed and the loop had nothing to run
            print(self.summary(), file=sys.stderr)
