"""Tokenizer fine-tuning: reconstruction + perceptual + quantizer losses on HR crops."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio

from arsr.losses import LPIPS
from arsr.nn.vae import VQVAE

from .base import ARSRTask, adamw


def to_unit(x: Tensor) -> Tensor:
    return (x + 1) / 2


def resize_like(x: Tensor, ref: Tensor) -> Tensor:
    """x resized (bicubic, antialiased) to ref's spatial size; identity when they agree."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bicubic", antialias=True).clamp(-1, 1)


class TokenizerFinetune(ARSRTask):
    """Fine-tune a multi-scale tokenizer (VQ, hierarchical RQ or BSQ autoencoder).

    Args:
        tokenizer: the autoencoder with its quantizer.
        l1_weight, l2_weight: pixel reconstruction weights.
        lpips_weight: perceptual weight (LPIPS-VGG); needs ``lpips_backbone`` outside tests.
        lpips_backbone: local torchvision ``vgg16`` weights for LPIPS (None: random backbone).
        quant_weight: weight of the quantizer's own loss.
        bypass_prob: HART-style quantisation bypass: with this probability a step decodes the
            continuous latent instead of the quantised one, keeping the decoder good on both.
        trainable: parameter-name prefixes to train; everything else is frozen. None trains all.
            Scale dropout: ``[quantize]``. MSVAR: ``[quantize.embedding, decoder]``.
        log_scales: scales whose partial reconstructions are logged as images (per-scale PSNR
            is logged for every scale in validation).
    """

    not_saved = ("lpips",)  # LPIPS weights are not ours to save

    def __init__(
        self,
        tokenizer: VQVAE,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        lpips_weight: float = 0.0,
        lpips_backbone: str | None = None,
        quant_weight: float = 1.0,
        bypass_prob: float = 0.0,
        trainable: list[str] | None = None,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_from: str | None = None,
        image_log_every: int = 500,
    ):
        super().__init__(optimizer, lr_scheduler, init_from, image_log_every)
        self.record_settings()
        self.tokenizer = tokenizer
        self.lpips = LPIPS(lpips_backbone) if lpips_weight > 0 else None
        self.l1_weight, self.l2_weight, self.lpips_weight = l1_weight, l2_weight, lpips_weight
        self.quant_weight, self.bypass_prob = quant_weight, bypass_prob
        self.trainable = trainable
        if trainable is not None:
            names = [n for n, _ in tokenizer.named_parameters()]
            for prefix in trainable:
                if not any(n.startswith(prefix) for n in names):
                    raise ValueError(f"trainable prefix {prefix!r} matches no tokenizer parameter (have e.g. {names[:4]})")
            for n, p in tokenizer.named_parameters():
                p.requires_grad_(any(n.startswith(prefix) for prefix in trainable))

    def init_module_from(self):
        return self.tokenizer

    def reconstruction_loss(self, rec: Tensor, img: Tensor) -> dict[str, Tensor]:
        terms = {"l1": F.l1_loss(rec, img), "l2": F.mse_loss(rec, img)}
        if self.lpips is not None:
            terms["lpips"] = self.lpips(rec, img)
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.log_data_stats(batch.get("stats", {}))
        img = batch["hr"] * 2 - 1  # [-1, 1]
        q = self.tokenizer.quantize(self.tokenizer.encode(img))
        bypass = self.bypass_prob > 0 and torch.rand(()) < self.bypass_prob
        recs = [self.tokenizer.decode(x) for x in (q.features if bypass else q.f_hats)]
        per_output = [self.reconstruction_loss(rec, resize_like(img, rec)) for rec in recs]  # 1x/2x/4x for hierarchical RQ
        terms = {k: torch.stack([t[k] for t in per_output]).mean() for k in per_output[0]}
        loss = self.l1_weight * terms["l1"] + self.l2_weight * terms["l2"] + self.quant_weight * q.loss
        if self.lpips is not None:
            loss = loss + self.lpips_weight * terms["lpips"]
        bs = img.shape[0]
        self.log_dict({f"train/{k}": v for k, v in terms.items()} | {f"train/{k}": v for k, v in q.logs.items()}, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if self.should_log_images(batch_idx):
            self.log_images("train/reconstruction", [to_unit(img), to_unit(resize_like(recs[-1], img))])
        return loss

    @torch.no_grad()
    def per_scale_reconstructions(self, img: Tensor) -> list[Tensor]:
        """Decode the partial sums of the first 1, 2, ..., K scales: K images in [-1, 1]."""
        indices = self.tokenizer.img_to_indices(img)
        return [self.tokenizer.decode(self.tokenizer.quantize.indices_to_fhat(indices, upto=k + 1)) for k in range(len(indices))]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        img = batch["hr"] * 2 - 1
        bs = img.shape[0]
        recs = self.per_scale_reconstructions(img)
        for k, rec in enumerate(recs):  # each partial reconstruction against the target at its own size
            psnr = peak_signal_noise_ratio(to_unit(rec), to_unit(resize_like(img, rec)), data_range=1.0)
            self.log(f"val/psnr_scale{k + 1:02d}_{rec.shape[-1]}px", psnr, batch_size=bs)
        terms = self.reconstruction_loss(recs[-1], img)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, batch_size=bs)
        self.log("val/psnr", peak_signal_noise_ratio(to_unit(recs[-1]), to_unit(img), data_range=1.0), prog_bar=True, batch_size=bs)
        if batch_idx == 0 and self.global_rank == 0:
            picks = sorted({0, len(recs) // 2, len(recs) - 1})
            self.log_images("val/scales", [to_unit(img)] + [to_unit(resize_like(recs[k], img)) for k in picks])
