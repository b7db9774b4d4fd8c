"""Next-scale AR training: NSARM stage 1 (TransformAlign) and full fine-tuning (ARFinetune)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from arsr.checkpoint import load_into, load_weights
from arsr.interfaces import ARContext, Labels, Refiner, Regularizer, ScalePredictor
from arsr.metrics import psnr, ssim
from arsr.nn.transformer import NextScaleTransformer
from arsr.nn.vae import VQVAE
from arsr.predict import tiled_fhat

from .base import ARSRTask, adamw


class _TokenizerTask(ARSRTask):
    """Shared by the AR tasks: a frozen tokenizer, optionally loaded from safetensors."""

    not_saved = ("tokenizer",)  # the frozen tokenizer is an input, not a result
    init_strict: bool = True

    def __init__(self, tokenizer: VQVAE, tokenizer_from: str | None, optimizer, lr_scheduler, init_from, image_log_every):
        super().__init__(optimizer, lr_scheduler, init_from, image_log_every)
        if tokenizer_from:  # a converted tokenizer, or a TokenizerFinetune export (keys under "tokenizer.")
            state = load_weights(tokenizer_from)
            if all(k.startswith("tokenizer.") for k in state):
                state = {k[len("tokenizer."):]: v for k, v in state.items()}
            load_into(tokenizer, state, f"tokenizer_from={tokenizer_from}")
        self.tokenizer = tokenizer.eval().requires_grad_(False)

    def train(self, mode: bool = True):  # the tokenizer stays frozen in eval mode
        super().train(mode)
        self.tokenizer.eval()
        return self

    @property
    def quantizer(self):
        return self.tokenizer.quantize

    def load_initial_weights(self, state: dict[str, Tensor]) -> None:
        """init_from loads every top-level part present in the file (transformer, refiner,
        scale_predictor, ...); each part it loads must match exactly, unless ``init_strict`` is
        False: then tensors of matching name and shape load and the rest is reported (e.g. MSVAR
        starting from var_d16, whose position table and class embedding differ)."""
        present = {k.split(".", 1)[0] for k in state}
        own_parts = {n: m for n, m in self.named_children() if n not in self.not_saved}
        parts = nn.ModuleDict({n: m for n, m in own_parts.items() if n in present})
        if not len(parts):
            raise ValueError(f"init_from={self.init_from} holds none of this task's parts {sorted(own_parts)} (found {sorted(present)[:5]})")
        if self.init_strict:
            load_into(parts, state, f"init_from={self.init_from}")
            return
        own = parts.state_dict()
        fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        parts.load_state_dict(fits, strict=False)
        left_out = sorted(set(own) - set(fits))
        print(f"arsr: init_from={self.init_from}: loaded {len(fits)} tensors; kept the initialisation of "
              f"{len(left_out)}: {left_out[:8]}{' ...' if len(left_out) > 8 else ''}")

    @staticmethod
    def images(batch: dict) -> tuple[Tensor, Tensor]:
        return batch["hr"] * 2 - 1, batch["lr_up"] * 2 - 1


class TransformAlign(_TokenizerTask):
    """NSARM stage 1: train the transformation network to predict the first scales' codes of the
    HR residual pyramid from the LR image (MSE); tokenizer (and transformer) frozen.

    Args:
        scale_predictor: the transformation network.
        tokenizer: the (BSQ) tokenizer whose pyramid is the target.
        tokenizer_from: its safetensors weights.
    """

    def __init__(self, scale_predictor: ScalePredictor, tokenizer: VQVAE, tokenizer_from: str | None = None,
                 optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 init_from: str | None = None, image_log_every: int = 500):
        super().__init__(tokenizer, tokenizer_from, optimizer, lr_scheduler, init_from, image_log_every)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        scale_predictor.bind(tokenizer.quantize.dim, tokenizer.quantize.patch_nums)
        self.scale_predictor = scale_predictor

    def targets(self, hr: Tensor) -> list[Tensor]:
        with torch.no_grad():
            tokens = self.tokenizer.img_to_indices(hr)
            return [self.quantizer.codes(tokens[i], i) for i in range(self.scale_predictor.num_scales)]

    def step(self, batch: dict, stage: str) -> Tensor:
        hr, lr_up = self.images(batch)
        pred = self.scale_predictor(lr_up)
        per_scale = [F.mse_loss(p, t) for p, t in zip(pred, self.targets(hr))]
        loss = torch.stack(per_scale).mean()
        bs = hr.shape[0]
        self.log_dict({f"{stage}/mse_scale{i + 1}": l for i, l in enumerate(per_scale)}, batch_size=bs)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.log_data_stats(batch)
        return self.step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "val")


class ARFinetune(_TokenizerTask):
    """Teacher-forced next-scale training of the transformer on tokens of the frozen tokenizer.

    Args:
        transformer: the next-scale transformer (with its positional encoding, conditioning, head).
        tokenizer: frozen tokenizer giving the target tokens (VQ indices or BSQ bits).
        labels: label policy (quality CFG, degradation classes, constant).
        regularizer: optional extra loss (e.g. DPO).
        refiner: optional diffusion refiner of the last scale's residual.
        scale_predictor: NSARM stage 2: a transformation network whose predictions replace the
            first scales; later scales' inputs and labels are re-derived from them (Algorithm 2)
            and only they are trained on.
        tokenizer_from: safetensors weights of the tokenizer.
        init_from: safetensors weights of everything else (transformer, refiner, scale predictor).
        sample_top_k, sample_top_p, sample_cfg, sample_temperature, seed: sampling settings for
            validation, ``arsr predict`` and ``arsr test`` (sample_cfg None: the label policy's cfg).
        activation_checkpointing: wrap every block under FSDP2 (ModelParallelStrategy).
        scale, upsample_mode: SR factor and how the LR image is resized to the HR size at inference.
        tile_overlap, tile_batch: latent-space tiling for inputs of any size (overlap in latent
            cells; tiles per forward).
        init_strict: False loads only the tensors of ``init_from`` whose names and shapes match.
        prompt: with a text encoder in the transformer, a fixed prompt for every image (NSARM);
            None uses each sample's caption (shards' captions; ``<name>.txt`` beside predict inputs).
    """

    def __init__(
        self,
        transformer: NextScaleTransformer,
        tokenizer: VQVAE,
        labels: Labels,
        regularizer: Regularizer | None = None,
        refiner: Refiner | None = None,
        scale_predictor: ScalePredictor | None = None,
        tokenizer_from: str | None = None,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_from: str | None = None,
        image_log_every: int = 500,
        sample_top_k: int = 1,
        sample_top_p: float = 0.0,
        val_samples: int = 4,
        activation_checkpointing: bool = False,
        scale: int = 4,
        upsample_mode: Literal["bicubic", "bilinear"] = "bicubic",
        sample_cfg: float | None = None,
        sample_temperature: float = 1.0,
        seed: int = 0,
        tile_overlap: int = 8,
        tile_batch: int = 4,
        init_strict: bool = True,
        prompt: str | None = None,
    ):
        super().__init__(tokenizer, tokenizer_from, optimizer, lr_scheduler, init_from, image_log_every)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if tuple(transformer.layout.patch_nums) != tuple(tokenizer.quantize.patch_nums):
            raise ValueError(f"transformer patch_nums {transformer.layout.patch_nums} != tokenizer's {tokenizer.quantize.patch_nums}")
        self.transformer, self.labels, self.regularizer, self.refiner = transformer, labels, regularizer, refiner
        if scale_predictor is not None:
            scale_predictor.bind(tokenizer.quantize.dim, tokenizer.quantize.patch_nums)
        self.scale_predictor = scale_predictor
        if transformer.conditioning is not None:
            transformer.conditioning.attach_tokenizer(self.tokenizer)
        self.sample_top_k, self.sample_top_p, self.val_samples = sample_top_k, sample_top_p, val_samples
        self.activation_checkpointing = activation_checkpointing
        self.init_strict, self.prompt = init_strict, prompt
        self.scale, self.upsample_mode, self.sample_cfg = scale, upsample_mode, sample_cfg
        self.sample_temperature, self.seed, self.tile_overlap, self.tile_batch = sample_temperature, seed, tile_overlap, tile_batch
        pns = tokenizer.quantize.patch_nums
        self.scale_bounds = torch.tensor([0] + [p * p for p in pns]).cumsum(0).tolist()

    def captions(self, batch: dict, n: int) -> list[str] | None:
        """The prompts a text-conditioned transformer sees: the fixed prompt, else the batch's captions."""
        if self.transformer.text is None:
            return None
        if self.prompt is not None:
            return [self.prompt] * n
        caps = batch.get("caption")
        caps = [caps] if isinstance(caps, str) else caps
        return list(caps) if caps is not None else [""] * n

    def configure_model(self) -> None:
        """FSDP2 under Lightning's ModelParallelStrategy: activation checkpointing (optional) and
        ``fully_shard`` per transformer block, then per trainable part; the frozen tokenizer is
        replicated. Other strategies (DDP, single device) leave the model as it is."""
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        from torch.distributed.fsdp import fully_shard

        dp = mesh["data_parallel"]
        blocks = self.transformer.blocks
        for i, block in enumerate(blocks):
            if self.activation_checkpointing:
                blocks[i] = block = checkpoint_wrapper(block)
            fully_shard(block, mesh=dp)
        for part in (self.transformer, self.refiner, self.scale_predictor, self.regularizer):
            if part is not None and any(p.requires_grad for p in part.parameters()):
                fully_shard(part, mesh=dp)
        self._sharded = True

    def targets(self, hr: Tensor, lr_up: Tensor) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
        """-> tokens per scale, teacher-forcing inputs, latent f, and the (L,) mask of trained positions."""
        with torch.no_grad():
            f = self.tokenizer.encode(hr)
        L = self.scale_bounds[-1]
        mask = torch.ones(L, dtype=torch.bool, device=hr.device)
        if self.scale_predictor is None:
            with torch.no_grad():
                tokens = self.quantizer.f_to_indices(f)
                inputs = self.quantizer.indices_to_teacher_input(tokens)
            return tokens, inputs, f, mask
        pred = self.scale_predictor(lr_up)  # stage 2 fine-tunes it through the teacher-forcing inputs
        tokens, inputs = self.quantizer.substitute(f, pred)
        mask[: self.scale_bounds[len(pred)]] = False  # substituted scales are given, not predicted
        return tokens, inputs, f, mask

    def refiner_loss(self, h: Tensor, logits: Tensor, tokens: list[Tensor], f: Tensor) -> Tensor:
        """Refine the last scale: target = what remains of f after scales 1..K-1 and the model's own last token."""
        K, n_last = len(tokens), tokens[-1].shape[1]
        with torch.no_grad():
            idx_hat = logits[:, -n_last:].argmax(-1)
            code = self.quantizer.codes(idx_hat, K - 1)  # (B, d, pn, pn)
            rest = f.float() - self.quantizer.indices_to_fhat(tokens, upto=K - 1)
            target = rearrange(rest - code, "b d h w -> b (h w) d")
        code_embed = self.transformer.word_embed(rearrange(code, "b d h w -> b (h w) d"))
        return self.refiner.loss(h[:, -n_last:], code_embed, target)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.log_data_stats(batch)
        hr, lr_up = self.images(batch)
        tokens, inputs, f, mask = self.targets(hr, lr_up)
        labels, captions = self.labels(batch), self.captions(batch, hr.shape[0])
        logits, h = self.transformer(labels, inputs, lr_up, return_hidden=True, captions=captions)
        flat = torch.cat(tokens, dim=1)
        ce = self.transformer.head.token_loss(logits, flat)[:, mask].mean()
        terms = {"ce": ce}
        if self.regularizer is not None:
            terms |= self.regularizer(ARContext(self.transformer, self.tokenizer, batch, labels, lr_up, tokens, logits, mask, captions))
        if self.refiner is not None:
            terms["refiner"] = self.refiner_loss(h, logits, tokens, f)
        loss = sum(terms.values())
        bs = hr.shape[0]
        acc = self.transformer.head.accuracy(logits.detach(), flat)[:, mask].mean()
        logs = {f"train/{k}": v for k, v in terms.items()} | {"train/acc": acc}
        if self.regularizer is not None:
            logs |= {f"train/{k}": v for k, v in self.regularizer.logs.items()}
        self.log_dict(logs, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    # -- super-resolution ----------------------------------------------------------------------
    @torch.no_grad()
    def sample_tokens(self, lr_up: Tensor, generator: torch.Generator | None = None, use_cache: bool = True,
                      captions: list[str] | None = None, **overrides):
        """lr_up (B, 3, H, W) in [-1, 1] at the model's native size -> (tokens, f_hat incl. the refiner's residual)."""
        B = lr_up.shape[0]
        captions = self.captions({"caption": captions} if captions is not None else {}, B)
        cfg = overrides.get("cfg", self.labels.cfg if self.sample_cfg is None else self.sample_cfg)
        forced = None
        if self.scale_predictor is not None:  # NSARM: the first scales come from the LR image
            forced = [rearrange(c > 0, "b d h w -> b (h w) d").long() for c in self.scale_predictor(lr_up)]
        tokens, h_last, _ = self.transformer.generate(
            self.quantizer, self.labels.inference(B, lr_up.device), lr_up, cfg=cfg, neg_label=self.labels.neg_label,
            top_k=overrides.get("top_k", self.sample_top_k), top_p=overrides.get("top_p", self.sample_top_p),
            temperature=overrides.get("temperature", self.sample_temperature), generator=generator, use_cache=use_cache,
            return_hidden=True, forced=forced, captions=captions)
        f_hat = self.quantizer.indices_to_fhat(tokens)
        if self.refiner is not None:
            code = self.quantizer.codes(tokens[-1], len(tokens) - 1)
            code_embed = self.transformer.word_embed(rearrange(code, "b d h w -> b (h w) d"))
            code_embed = torch.cat([code_embed, code_embed]) if cfg > 0 else code_embed
            res = self.refiner.sample(h_last, code_embed, cfg=cfg, generator=generator)
            f_hat = f_hat + rearrange(res, "b (h w) d -> b d h w", h=f_hat.shape[-2])
        return tokens, f_hat

    @torch.no_grad()
    def super_resolve(self, lr_up: Tensor, generator: torch.Generator | None = None, use_cache: bool = True,
                      captions: list[str] | None = None, **overrides) -> list[Tensor]:
        """lr_up (B, 3, H, W) in [-1, 1] at the native size -> SR images in [-1, 1], one per output
        scale of the tokenizer (one for VQ / BSQ; 1x / 2x / 4x for hierarchical RQ), refined one last."""
        tokens, f_hat = self.sample_tokens(lr_up, generator, use_cache, captions, **overrides)
        early = [self.tokenizer.decode(self.quantizer.indices_to_fhat(tokens, upto=k)) for k in self.quantizer.output_steps[:-1]]
        return early + [self.tokenizer.decode(f_hat)]

    @property
    def native_size(self) -> int:
        return self.quantizer.patch_nums[-1] * self.tokenizer.downsample

    @torch.no_grad()
    def super_resolve_any(self, lr: Tensor, caption: str | None = None) -> list[Tensor]:
        """One LR image (1, 3, h, w) in [0, 1], any size -> SR outputs in [0, 1] at scale x its size.
        The native size runs whole (all outputs); other sizes run as latent-space tiles (final output)."""
        h, w = lr.shape[-2:]
        H, W = h * self.scale, w * self.scale
        lr_up = F.interpolate(lr, size=(H, W), mode=self.upsample_mode, align_corners=False).clamp(0, 1) * 2 - 1
        g = torch.Generator(device=lr.device).manual_seed(self.seed)
        n, ds = self.native_size, self.tokenizer.downsample
        caps = None if caption is None else [caption]
        if (H, W) == (n, n):
            return [(o + 1) / 2 for o in self.super_resolve(lr_up, generator=g, captions=caps)]
        Hp, Wp = max(n, math.ceil(H / ds) * ds), max(n, math.ceil(W / ds) * ds)
        padded = F.pad(lr_up, (0, Wp - W, 0, Hp - H), mode="replicate")
        f_hat = tiled_fhat(lambda t: self.sample_tokens(t, generator=g, captions=None if caps is None else caps * len(t))[1], padded, self.quantizer.patch_nums[-1],
                           min(self.tile_overlap, self.quantizer.patch_nums[-1] - 1), ds, self.tile_batch)
        return [(self.tokenizer.decode(f_hat)[..., :H, :W] + 1) / 2]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
        if "skipped" in batch:
            return None
        outs = self.super_resolve_any(batch["lr"][None].to(self.device), batch.get("caption"))
        return {"name": batch["name"], "outputs": [o[0] for o in outs]}

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if "skipped" in batch:
            return
        if "lr" in batch and batch["lr"].ndim == 3:  # paired folders: one image of any size
            sr, hr = self.super_resolve_any(batch["lr"][None].to(self.device), batch.get("caption"))[-1], batch["hr"][None].to(self.device)
        else:  # shards: degraded on the fly at the native size
            hr = batch["hr"]
            g = torch.Generator(device=hr.device).manual_seed(self.seed)
            sr = (self.super_resolve(batch["lr_up"] * 2 - 1, generator=g, captions=batch.get("caption"))[-1] + 1) / 2
        if sr.shape != hr.shape:
            raise ValueError(f"SR {tuple(sr.shape[-2:])} and HR {tuple(hr.shape[-2:])} differ: is the HR {self.scale}x the LR?")
        bs = hr.shape[0]
        self.log("test/psnr_y", psnr(sr, hr, crop_border=self.scale).mean(), batch_size=bs)
        self.log("test/ssim_y", ssim(sr, hr, crop_border=self.scale).mean(), batch_size=bs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        hr, lr_up = self.images(batch)
        tokens, inputs, f, mask = self.targets(hr, lr_up)
        labels = self.labels(batch)
        logits = self.transformer(labels, inputs, lr_up, captions=self.captions(batch, hr.shape[0]))
        flat = torch.cat(tokens, dim=1)
        bs = hr.shape[0]
        self.log("val/ce", self.transformer.head.token_loss(logits, flat)[:, mask].mean(), batch_size=bs, prog_bar=True)
        self.log("val/acc", self.transformer.head.accuracy(logits, flat)[:, mask].mean(), batch_size=bs)
        if batch_idx == 0 and self.val_samples > 0:
            n = min(self.val_samples, bs)
            g = torch.Generator(device=hr.device).manual_seed(0)
            caps = batch.get("caption")
            sr = self.super_resolve(lr_up[:n], generator=g, captions=None if caps is None else list(caps)[:n])[-1]
            psnr = peak_signal_noise_ratio((sr + 1) / 2, (hr[:n] + 1) / 2, data_range=1.0)
            self.log("val/sample_psnr", psnr, batch_size=n)
            if self.global_rank == 0:
                self.log_images("val/lr_sr_hr", [(lr_up[:n] + 1) / 2, (sr + 1) / 2, (hr[:n] + 1) / 2])
