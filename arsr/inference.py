"""How an AR task super-resolves: its settings (:class:`Inference`) and the sampling / tiling /
prediction / test code (:class:`SuperResolution`, a mixin of :class:`arsr.tasks.ar.ARFinetune`).

The mixin reads the task's parts (``transformer``, ``tokenizer``, ``labels``, ``refiner``,
``scale_predictor``) and its ``inference`` settings; the KV-cached, guided sampler itself is
:func:`arsr.sampling.sample_scales`, latent-space tiling is :func:`arsr.predict.tiled_fhat`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from arsr.components.degradations import upsample
from arsr.interfaces import SRBatch
from arsr.postprocess import PostProcess
from arsr.predict import tiled_fhat
from arsr.sampling import cfg_pair, sample_scales
from arsr.visual import sr_metrics


@dataclass(frozen=True)
class Inference:
    """Sampling and output settings (validation samples, ``arsr predict``, ``arsr test``).

    Attributes:
        cfg: guidance strength, one value or one per scale; None: the label policy's ``cfg``, or no
            guidance without labels. Its meaning is the backbone's: VAR's strength rising over the
            scales (0 = off), Infinity's cfg * cond + (1 - cfg) * uncond (1 = off).
        top_k, top_p: token filtering (0: off); temperature: logits divided by it. Each one value,
            or one per scale (e.g. greedy coarse scales, nucleus sampling on the fine ones).
        seed: every image is sampled from a generator seeded with it.
        scale: SR factor; upsample_mode: how the LR is resized to the HR size
            (:func:`arsr.components.degradations.upsample`); training checks it matches the
            degradation's (a ``random`` degradation resizes with bicubic at inference).
        tile_overlap, tile_batch: latent-space tiling of inputs of other sizes than the native one
            (overlap in latent cells; tiles per forward).
        val_samples: validation images super-resolved, scored and logged per validation (0: none).
        postprocess: applied to every final SR output (e.g. NSARM's colour fix).
    """

    cfg: float | list[float] | None = None
    top_k: int | list[int] = 1
    top_p: float | list[float] = 0.0
    temperature: float | list[float] = 1.0
    seed: int = 0
    scale: int = 4
    upsample_mode: Literal["bicubic", "bilinear", "area"] = "bicubic"
    tile_overlap: int = 8
    tile_batch: int = 4
    val_samples: int = 4
    postprocess: PostProcess | None = None


class SuperResolution:
    """LR image -> SR image(s) for a task holding a frozen tokenizer and a next-scale backbone."""

    inference: Inference

    @property
    def scale(self) -> int:
        """SR factor (read by the image-folder data module to check LR / HR pairs)."""
        return self.inference.scale

    # -- sampling --------------------------------------------------------------------------------
    def guidance(self) -> float | list[float] | None:
        """The CFG strength sampling uses (``Inference.cfg``, else the label policy's, else none)."""
        if self.inference.cfg is not None:
            return self.inference.cfg
        return self.labels.cfg if self.labels is not None else None

    def code_embed(self, tokens: Tensor, si: int) -> Tensor:
        """Scale si's tokens (B, n, ...) -> their codes at the backbone's width (B, n, C): the
        refiner's condition besides the hidden state."""
        code = self.quantizer.codes(tokens, si)  # (B, d, h, w)
        return self.transformer.embed(rearrange(code, "b d h w -> b (h w) d"))

    @torch.no_grad()
    def sample_tokens(self, lr_up: Tensor, generator: torch.Generator | None = None, use_cache: bool = True,
                      captions: list[str] | None = None, lr: Tensor | None = None, **overrides):
        """lr_up (B, 3, H, W) in [-1, 1] at the native size (and the LR itself for a scale predictor;
        default: lr_up area-downsampled by ``scale``) -> (tokens per scale, f_hat incl. the refiner's
        residual). ``overrides``: cfg / top_k / top_p / temperature for this call."""
        B, s = lr_up.shape[0], self.inference
        cfg = overrides.get("cfg", self.guidance())
        forced = None
        if self.scale_predictor is not None:  # NSARM: the first scales come from the LR image
            lr = F.interpolate(lr_up, scale_factor=1 / s.scale, mode="area") if lr is None else lr
            forced = [self.quantizer.residual_to_tokens(r, si) for si, r in enumerate(self.scale_predictor(lr))]
        label = self.labels.inference(B, lr_up.device) if self.labels else torch.zeros(B, dtype=torch.long, device=lr_up.device)
        out = sample_scales(
            self.transformer, self.quantizer, B, cfg=cfg, top_k=overrides.get("top_k", s.top_k), top_p=overrides.get("top_p", s.top_p),
            temperature=overrides.get("temperature", s.temperature), generator=generator, forced=forced, use_cache=use_cache,
            label=label, prefix_input=lr_up, neg_label=self.labels.neg_label if self.labels else None, captions=captions)
        f_hat = out.f_hat
        if self.refiner is not None:
            guided = out.hidden.shape[0] > B
            code = self.code_embed(out.tokens[-1], len(out.tokens) - 1)
            res = self.refiner.sample(out.hidden, cfg_pair(code) if guided else code, cfg=cfg if guided else 0.0, generator=generator)
            f_hat = f_hat + rearrange(res, "b (h w) d -> b d h w", h=f_hat.shape[-2])
        return out.tokens, f_hat

    @torch.no_grad()
    def super_resolve(self, lr_up: Tensor, generator: torch.Generator | None = None, use_cache: bool = True,
                      captions: list[str] | None = None, lr: Tensor | None = None, **overrides) -> list[Tensor]:
        """lr_up (B, 3, H, W) in [-1, 1] at the native size -> SR images in [-1, 1], one per output
        step of the tokenizer (one for VQ / BSQ; 1x / 2x / 4x for hierarchical RQ), refined one last."""
        tokens, f_hat = self.sample_tokens(lr_up, generator, use_cache, captions, lr, **overrides)
        early = [self.tokenizer.decode(self.quantizer.indices_to_fhat(tokens, upto=k)) for k in self.quantizer.output_steps[:-1]]
        return early + [self.tokenizer.decode(f_hat)]

    def finish(self, sr: Tensor, lr: Tensor) -> Tensor:
        """Final SR (B, 3, H, W) in [0, 1] -> post-processed (colour fix) against the LR in [0, 1]."""
        return sr if self.inference.postprocess is None else self.inference.postprocess(sr, lr)

    def generator(self, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.inference.seed)

    @torch.no_grad()
    def super_resolve_batch(self, batch: SRBatch) -> list[Tensor]:
        """A native-size batch (images in [0, 1]) -> every output in [0, 1], the last post-processed."""
        outs = [(o + 1) / 2 for o in self.super_resolve(batch.lr_up * 2 - 1, generator=self.generator(batch.hr.device),
                                                        captions=batch.caption, lr=batch.lr * 2 - 1)]
        return outs[:-1] + [self.finish(outs[-1], batch.lr)]

    @torch.no_grad()
    def super_resolve_any(self, lr: Tensor, caption: str | None = None) -> list[Tensor]:
        """One LR image (1, 3, h, w) in [0, 1], any size -> SR outputs in [0, 1] at ``scale`` x its size.
        The native size runs whole (all outputs); other sizes run as latent-space tiles (final output)."""
        s = self.inference
        h, w = lr.shape[-2:]
        H, W = h * s.scale, w * s.scale
        lr_up = upsample(lr, (H, W), s.upsample_mode)
        caps = None if caption is None else [caption]
        n, ds = self.native_size, self.tokenizer.downsample
        if (H, W) == (n, n):
            return self.super_resolve_batch(SRBatch(hr=lr_up, lr=lr, lr_up=lr_up, caption=caps))
        g = self.generator(lr.device)
        Hp, Wp = max(n, math.ceil(H / ds) * ds), max(n, math.ceil(W / ds) * ds)
        padded = F.pad(lr_up * 2 - 1, (0, Wp - W, 0, Hp - H), mode="replicate")
        side = self.quantizer.vae_schedule[-1][0]
        f_hat = tiled_fhat(lambda t: self.sample_tokens(t, generator=g, captions=None if caps is None else caps * len(t))[1], padded, side,
                           min(s.tile_overlap, side - 1), ds, s.tile_batch)
        return [self.finish((self.tokenizer.decode(f_hat)[..., :H, :W] + 1) / 2, lr)]

    # -- Lightning's predict / test ------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
        if "skipped" in batch:
            return None
        outs = self.super_resolve_any(batch["lr"][None].to(self.device), batch.get("caption"))
        return {"name": batch["name"], "outputs": [o[0] for o in outs]}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """PSNR / SSIM on Y of every output the model emits: the final one as ``test/psnr_y``, earlier
        ones (MSVAR's 1x / 2x) as ``test/psnr_y_x{m}`` against the HR resized to their size."""
        if "skipped" in batch:
            return
        if "lr" in batch and batch["lr"].ndim == 3:  # paired folders: one image of any size
            lr = batch["lr"][None].to(self.device)
            outs, hr = self.super_resolve_any(lr, batch.get("caption")), batch["hr"][None].to(self.device)
        else:  # shards: degraded on the fly at the native size
            b = SRBatch.of(batch)
            lr, hr, outs = b.lr, b.hr, self.super_resolve_batch(b)
        if outs[-1].shape != hr.shape:
            raise ValueError(f"SR {tuple(outs[-1].shape[-2:])} and HR {tuple(hr.shape[-2:])} differ: is the HR {self.inference.scale}x the LR?")
        self.log_dict(sr_metrics(outs, hr, lr, "test"), batch_size=hr.shape[0])
