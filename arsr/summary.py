"""What a finished fit tells its user: where the run is, its final metrics, how to look at it, and
(for SR models) a side-by-side image of the validation photos super-resolved by the final weights."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image


class RunSummary(L.Callback):
    """Prints a summary when ``fit`` ends (global rank 0).

    Args:
        showcase_images: with a model that super-resolves (``super_resolve_any``), write
            ``<run>/showcase.png``: this many validation photos, one row each, LR | SR | HR, LR
            degraded as in validation and SR sampled with the model's sampling settings; 0 writes none.
        showcase_min_side: rows are enlarged (nearest neighbour) to at least this height to be viewable.
    """

    def __init__(self, showcase_images: int = 0, showcase_min_side: int = 192):
        self.showcase_images, self.showcase_min_side = showcase_images, showcase_min_side
        self._start = time.monotonic()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()

    @torch.no_grad()
    def showcase(self, trainer: L.Trainer, pl_module: L.LightningModule, out: Path) -> Path | None:
        """LR | SR | HR rows of the first validation photos; None without validation data."""
        dm = trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else []
        rows: list[np.ndarray] = []
        was_training = pl_module.training
        pl_module.eval()
        for batch in loader:
            batch = dm.on_after_batch_transfer(dm.transfer_batch_to_device(batch, pl_module.device, 0), 0)
            for lr, hr in zip(batch["lr"], batch["hr"]):
                sr = pl_module.super_resolve_any(lr[None])[-1][0]
                up = F.interpolate(lr[None], size=hr.shape[-2:], mode="nearest")[0]
                row = torch.cat([up, sr.to(hr), hr], -1).clamp(0, 1)
                mag = max(1, -(-self.showcase_min_side // row.shape[-2]))
                row = F.interpolate(row[None], scale_factor=mag, mode="nearest")[0]
                rows.append((row.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8))
                if len(rows) == self.showcase_images:
                    break
            if len(rows) == self.showcase_images:
                break
        pl_module.train(was_training)
        if not rows:
            return None
        width = max(r.shape[1] for r in rows)
        grid = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
        Image.fromarray(grid).save(out)
        return out

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        log_dir = getattr(trainer.logger, "log_dir", None)  # not trainer.log_dir: a collective, and only rank 0 is here
        run = Path(log_dir) if log_dir else Path(trainer.default_root_dir)
        lines = [f"arsr: fit finished in {time.monotonic() - self._start:.0f} s at step {trainer.global_step}",
                 f"  run folder   {run}" + (f" (also {run.parent / 'latest'})" if (run.parent / "latest").is_symlink() else "")]
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "last_model_path", ""):
                last = Path(cb.last_model_path)
                lines.append(f"  weights      {last.with_suffix('.safetensors')} (resume: --ckpt_path {last})")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and (k.startswith("val/") or k == "train/loss")
                   and "_scale" not in k}
        if metrics:
            lines.append("  final        " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
        if self.showcase_images > 0 and hasattr(pl_module, "super_resolve_any") and trainer.world_size > 1:
            lines.append("  side by side skipped: single-process runs only (sharded weights need every rank)")
        elif self.showcase_images > 0 and hasattr(pl_module, "super_resolve_any"):
            shown = self.showcase(trainer, pl_module, run / "showcase.png")
            lines.append(f"  side by side {shown} (LR | SR | HR)" if shown else "  side by side none: no validation data")
        if isinstance(trainer.logger, TensorBoardLogger):
            lines.append(f"  TensorBoard  tensorboard --logdir {trainer.logger.save_dir}")
        print("\n".join(lines), file=sys.stderr)
