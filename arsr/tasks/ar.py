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
from arsr.nn.infinity import InfinityTransformer
from arsr.nn.transformer import NextScaleTransformer
from arsr.components.degradations import upsample
from arsr.postprocess import PostProcess
from arsr.visual import log_sr_grid, sr_metrics
from arsr.sampling import sample_scales
from arsr.nn.vae import VQVAE
from arsr.parallel import parallelize
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

    @property
    def native_size(self) -> int:
        """Pixel side of the images the tokenizer's schedule describes (last scale x stride)."""
        return self.quantizer.vae_schedule[-1][0] * self.tokenizer.downsample

    def setup(self, stage: str) -> None:
        """Checks the training crops against the schedule, then loads ``init_from``, which may list
        several files (e.g. converted Infinity weights and NSARM stage 1's export): their tensors
        are merged, later files winning, and loaded together."""
        crop = getattr(getattr(self._trainer, "datamodule", None), "crop_size", None) if self._trainer is not None else None
        if stage == "fit" and crop is not None and crop != self.native_size:
            h, w = self.quantizer.vae_schedule[-1]
            raise ValueError(f"data crop_size {crop} does not fit the tokenizer's schedule, which ends at a {h}x{w} latent of stride "
                             f"{self.tokenizer.downsample} = {self.native_size} px: set --data.init_args.crop_size {self.native_size} "
                             f"or change the quantizer's schedule")
        if isinstance(self.init_from, (list, tuple)) and not getattr(self, "_initialised", False):
            state = {}
            for path in self.init_from:
                state |= load_weights(path)
            self.load_initial_weights(state)
            self._initialised = True
        super().setup(stage)

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
        """-> HR and LR (at its own size) in [-1, 1]."""
        return batch["hr"] * 2 - 1, batch["lr"] * 2 - 1


class TransformAlign(_TokenizerTask):
    """NSARM stage 1: train the transformation network to predict the first scales of the HR image's
    residual pyramid (NSARM Algorithm 1) from the LR image, with MSE in latent space; the
    tokenizer is frozen and the transformer is not involved.

    Args:
        scale_predictor: the transformation network.
        tokenizer: the (BSQ) tokenizer whose pyramid is the target.
        tokenizer_from: its safetensors weights.
        target: ``residual`` (the continuous residuals r_k, arsr's default) or ``code`` (their BSQ
            codes q_k); NSARM's released helpers build both, its loss is not public.
    """

    def __init__(self, scale_predictor: ScalePredictor, tokenizer: VQVAE, tokenizer_from: str | None = None,
                 target: Literal["residual", "code"] = "residual",
                 optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 init_from: str | None = None, image_log_every: int = 500):
        super().__init__(tokenizer, tokenizer_from, optimizer, lr_scheduler, init_from, image_log_every)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.scale_predictor, self.target = bind_predictor(scale_predictor, self.tokenizer), target

    def targets(self, hr: Tensor) -> list[Tensor]:
        with torch.no_grad():
            pyramid = self.quantizer.decompose(self.tokenizer.encode(hr))
        return (pyramid.residuals if self.target == "residual" else pyramid.codes)[: self.scale_predictor.num_scales]

    def step(self, batch: dict, stage: str) -> Tensor:
        hr, lr = self.images(batch)
        pred = self.scale_predictor(lr)
        per_scale = [F.mse_loss(p.float(), t) for p, t in zip(pred, self.targets(hr))]
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


def bind_predictor(predictor: ScalePredictor, tokenizer: VQVAE) -> ScalePredictor:
    """Size a transformation network from the tokenizer: latent width, latent-space map sizes."""
    q = tokenizer.quantize
    if not q.substitutable:
        raise ValueError(f"a scale predictor (NSARM) needs a quantizer that takes substituted residuals; {type(q).__name__} does not: use MultiScaleBSQ")
    if predictor.num_scales >= len(q.vae_schedule):
        raise ValueError(f"the transformation network predicts {predictor.num_scales} scales of a {len(q.vae_schedule)}-scale schedule: "
                         "leave at least one scale to the transformer")
    predictor.bind(q.dim, q.vae_schedule[: predictor.num_scales])
    predictor.attach_tokenizer(tokenizer)
    return predictor


class ARFinetune(_TokenizerTask):
    """Teacher-forced next-scale training of a backbone on tokens of the frozen tokenizer.

    Args:
        transformer: the backbone: VAR-family (:class:`NextScaleTransformer`, with its positional
            encoding, conditioning and head) or Infinity (:class:`InfinityTransformer`, captions).
        tokenizer: frozen tokenizer giving the target tokens (VQ indices or BSQ bits); its schedule
            is the schedule of everything else.
        labels: label policy (quality CFG, degradation classes, constant); None: label 0 and no
            label-based guidance (Infinity / NSARM guide with the null caption).
        regularizer: optional extra loss (e.g. DPO).
        refiner: optional diffusion refiner of the last scale's residual.
        scale_predictor: NSARM: a transformation network whose predicted residuals replace the
            first scales; they are BSQ-quantised, later scales' inputs and labels are re-derived
            from them (Algorithm 2) and the loss reaches the network through those inputs.
        postprocess: applied to every SR output at inference (e.g. NSARM's colour fix).
        tokenizer_from: safetensors weights of the tokenizer.
        init_from: safetensors weights of everything else (transformer, refiner, scale predictor).
        scale_weighting: ``uniform`` (mean over trained tokens) or ``sqrt_area`` (Infinity's
            reweight_loss_by_scale: the tokens of scale k weigh 1/sqrt(h_k w_k), normalised).
        ce_on_substituted: also train the backbone on the substituted scales' bits (arsr default:
            no; they are given at inference).
        sample_top_k, sample_top_p, sample_cfg, sample_temperature, seed: sampling settings for
            validation, ``arsr predict`` and ``arsr test`` (sample_cfg None: the label policy's
            cfg, or no guidance without labels). The meaning of cfg is the backbone's: VAR's
            strength rising over scales (0 = off), Infinity's cfg * cond + (1 - cfg) * uncond (1 = off).
        activation_checkpointing: recompute every block in the backward pass.
        compile: ``torch.compile`` every block.
        fsdp_bf16_params: under FSDP2, compute with bf16 parameters (fp32 gradient reduction).
        scale, upsample_mode: SR factor and how the LR image is resized to the HR size at inference
            (:func:`arsr.components.degradations.upsample`); training checks it equals the
            degradation's (a ``random`` degradation resizes with bicubic at inference).
        tile_overlap, tile_batch: latent-space tiling for inputs of any size (overlap in latent
            cells; tiles per forward).
        init_strict: False loads only the tensors of ``init_from`` whose names and shapes match.
        prompt: with a text encoder in the transformer, a fixed prompt for every image (NSARM's
            "Fixed" ablation); None uses each sample's caption (shards' captions; ``<name>.txt``
            beside predict inputs).
    """

    def __init__(
        self,
        transformer: NextScaleTransformer | InfinityTransformer,
        tokenizer: VQVAE,
        labels: Labels | None = None,
        regularizer: Regularizer | None = None,
        refiner: Refiner | None = None,
        scale_predictor: ScalePredictor | None = None,
        postprocess: PostProcess | None = None,
        tokenizer_from: str | None = None,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_from: str | list[str] | None = None,
        image_log_every: int = 500,
        scale_weighting: Literal["uniform", "sqrt_area"] = "uniform",
        ce_on_substituted: bool = False,
        sample_top_k: int = 1,
        sample_top_p: float = 0.0,
        val_samples: int = 4,
        activation_checkpointing: bool = False,
        compile: bool = False,
        fsdp_bf16_params: bool = False,
        scale: int = 4,
        upsample_mode: Literal["bicubic", "bilinear", "area"] = "bicubic",
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
        transformer.bind(tokenizer.quantize)
        self.transformer, self.labels, self.regularizer, self.refiner = transformer, labels, regularizer, refiner
        self.scale_predictor = None if scale_predictor is None else bind_predictor(scale_predictor, self.tokenizer)
        self.postprocess = postprocess
        if getattr(transformer, "conditioning", None) is not None:
            transformer.conditioning.attach_tokenizer(self.tokenizer)
        self.scale_weighting, self.ce_on_substituted = scale_weighting, ce_on_substituted
        self.sample_top_k, self.sample_top_p, self.val_samples = sample_top_k, sample_top_p, val_samples
        self.activation_checkpointing, self.compile_blocks, self.fsdp_bf16_params = activation_checkpointing, compile, fsdp_bf16_params
        self.init_strict, self.prompt = init_strict, prompt
        self.scale, self.upsample_mode, self.sample_cfg = scale, upsample_mode, sample_cfg
        self.sample_temperature, self.seed, self.tile_overlap, self.tile_batch = sample_temperature, seed, tile_overlap, tile_batch
        sched = tokenizer.quantize.schedule
        self.scale_bounds = [0] + torch.tensor([h * w for h, w in sched]).cumsum(0).tolist()
        self.register_buffer("token_weights", self.weights_by_scale(sched), persistent=False)

    def setup(self, stage: str) -> None:
        """Training checks that inference resizes the LR as the degradation does for ``lr_up``."""
        deg = getattr(getattr(self._trainer, "datamodule", None), "degradation", None) if self._trainer is not None else None
        mode = getattr(deg, "upsample_mode", None)
        if stage == "fit" and mode is not None and {"random": "bicubic"}.get(mode, mode) != self.upsample_mode:
            raise ValueError(f"model upsample_mode {self.upsample_mode!r} differs from the degradation's {mode!r}: inference would resize "
                             f"the LR unlike training; set --model.init_args.upsample_mode {({'random': 'bicubic'}).get(mode, mode)}")
        super().setup(stage)

    def weights_by_scale(self, schedule) -> Tensor:
        """(L,) weight of each token in the loss, summing to 1 over the trained positions."""
        mask = torch.ones(self.scale_bounds[-1], dtype=torch.bool)
        if self.scale_predictor is not None and not self.ce_on_substituted:
            mask[: self.scale_bounds[self.scale_predictor.num_scales]] = False  # substituted scales are given, not predicted
        per_scale = [torch.full((h * w,), 1.0 if self.scale_weighting == "uniform" else (h * w) ** -0.5) for h, w in schedule]
        w = torch.cat(per_scale) * mask
        return w / w.sum()

    @property
    def loss_mask(self) -> Tensor:
        return self.token_weights > 0

    def captions(self, batch: dict, n: int) -> list[str] | None:
        """The prompts a text-conditioned transformer sees: the fixed prompt, else the batch's captions."""
        if getattr(self.transformer, "text", None) is None:
            return None
        if self.prompt is not None:
            return [self.prompt] * n
        caps = batch.get("caption")
        caps = [caps] if isinstance(caps, str) else caps
        return list(caps) if caps is not None else [""] * n

    def batch_labels(self, batch: dict, n: int) -> Tensor:
        return self.labels(batch) if self.labels is not None else torch.zeros(n, dtype=torch.long, device=self.device)

    def configure_model(self) -> None:
        """:func:`arsr.parallel.parallelize`: activation checkpointing and compile per block, then (under
        Lightning's ModelParallelStrategy) FSDP2 ``fully_shard`` per block and per trainable part; the
        frozen tokenizer is replicated. Runs once."""
        if getattr(self, "_parallelized", False):
            return
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        parallelize(self.transformer.blocks, (self.transformer, self.refiner, self.scale_predictor, self.regularizer),
                    None if mesh is None else mesh["data_parallel"], self.activation_checkpointing, self.compile_blocks,
                    torch.bfloat16 if mesh is not None and self.fsdp_bf16_params else None)
        self._parallelized = True

    def targets(self, hr: Tensor, lr: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """-> tokens per scale, teacher-forcing inputs, latent f. With a scale predictor (NSARM
        stage 2) its residuals replace the first scales (Algorithm 2) and stay in the graph."""
        with torch.no_grad():
            f = self.tokenizer.encode(hr)
        substituted = self.scale_predictor(lr) if self.scale_predictor is not None else []
        tf = self.quantizer.teacher(f, substituted, corrupt=self.training)
        return tf.tokens, tf.inputs, f

    def token_loss(self, logits: Tensor, tokens: list[Tensor]) -> Tensor:
        """Weighted per-token loss, summed over the sequence, mean over the batch."""
        return (self.transformer.head.token_loss(logits, torch.cat(tokens, dim=1)) * self.token_weights).sum(1).mean()

    def refiner_loss(self, h: Tensor, logits: Tensor, tokens: list[Tensor], f: Tensor) -> Tensor:
        """Refine the last scale: target = what remains of f after scales 1..K-1 and the model's own last token."""
        K, n_last = len(tokens), tokens[-1].shape[1]
        with torch.no_grad():
            idx_hat = logits[:, -n_last:].argmax(-1)
            code = self.quantizer.codes(idx_hat, K - 1)  # (B, d, pn, pn)
            rest = self.tokenizer.final_latent(f).float() - self.quantizer.indices_to_fhat(tokens, upto=K - 1)
            target = rearrange(rest - code, "b d h w -> b (h w) d")
        code_embed = self.transformer.word_embed(rearrange(code, "b d h w -> b (h w) d"))
        return self.refiner.loss(h[:, -n_last:], code_embed, target)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self.log_data_stats(batch)
        hr, lr = self.images(batch)
        lr_up = batch["lr_up"] * 2 - 1
        tokens, inputs, f = self.targets(hr, lr)
        labels, captions = self.batch_labels(batch, hr.shape[0]), self.captions(batch, hr.shape[0])
        logits, h = self.transformer(labels, inputs, lr_up, return_hidden=True, captions=captions)
        terms = {"ce": self.token_loss(logits, tokens)}
        mask = self.loss_mask
        if self.regularizer is not None:
            terms |= self.regularizer(ARContext(self.transformer, self.tokenizer, batch, labels, lr_up, tokens, logits, mask, captions))
        if self.refiner is not None:
            terms["refiner"] = self.refiner_loss(h, logits, tokens, f)
        loss = sum(terms.values())
        bs = hr.shape[0]
        acc = self.transformer.head.accuracy(logits.detach(), torch.cat(tokens, dim=1))[:, mask].mean()
        logs = {f"train/{k}": v for k, v in terms.items()} | {"train/acc": acc}
        if self.regularizer is not None:
            logs |= {f"train/{k}": v for k, v in self.regularizer.logs.items()}
        self.log_dict(logs, batch_size=bs)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if self._trainer is not None and self.logger is not None and self.should_log_images(batch_idx):
            self.log_train_grid(batch)
        return loss

    @torch.no_grad()
    def log_train_grid(self, batch: dict, n: int = 2) -> None:
        """LR | every emitted scale | HR of the first training samples, sampled with the inference settings."""
        g = torch.Generator(device=batch["hr"].device).manual_seed(self.seed)
        caps = batch.get("caption")
        outs = self.super_resolve(batch["lr_up"][:n] * 2 - 1, generator=g, captions=None if caps is None else list(caps)[:n],
                                  lr=batch["lr"][:n] * 2 - 1)
        log_sr_grid(self, "train/lr_outputs_hr", batch["lr_up"][:n], [(o + 1) / 2 for o in outs], batch["hr"][:n])

    # -- super-resolution ----------------------------------------------------------------------
    def default_cfg(self) -> float | None:
        if self.sample_cfg is not None:
            return self.sample_cfg
        return self.labels.cfg if self.labels is not None else None

    @torch.no_grad()
    def sample_tokens(self, lr_up: Tensor, generator: torch.Generator | None = None, use_cache: bool = True,
                      captions: list[str] | None = None, lr: Tensor | None = None, **overrides):
        """lr_up (B, 3, H, W) in [-1, 1] at the model's native size (and the LR itself, for a scale
        predictor; default: lr_up area-downsampled by ``scale``) -> (tokens, f_hat incl. the refiner's residual)."""
        B = lr_up.shape[0]
        captions = self.captions({"caption": captions} if captions is not None else {}, B)
        cfg = overrides.get("cfg", self.default_cfg())
        forced = None
        if self.scale_predictor is not None:  # NSARM: the first scales come from the LR image
            lr = F.interpolate(lr_up, scale_factor=1 / self.scale, mode="area") if lr is None else lr
            forced = [self.quantizer.residual_to_tokens(r, si) for si, r in enumerate(self.scale_predictor(lr))]
        out = sample_scales(
            self.transformer, self.quantizer, B, cfg=cfg, top_k=overrides.get("top_k", self.sample_top_k),
            top_p=overrides.get("top_p", self.sample_top_p), temperature=overrides.get("temperature", self.sample_temperature),
            generator=generator, forced=forced, use_cache=use_cache, label=self.labels.inference(B, lr_up.device) if self.labels else
            torch.zeros(B, dtype=torch.long, device=lr_up.device), prefix_input=lr_up,
            neg_label=self.labels.neg_label if self.labels else None, captions=captions)
        tokens = out.tokens
        f_hat = self.quantizer.indices_to_fhat(tokens)
        if self.refiner is not None:
            guided = out.hidden.shape[0] > B
            code = self.quantizer.codes(tokens[-1], len(tokens) - 1)
            code_embed = self.transformer.word_embed(rearrange(code, "b d h w -> b (h w) d"))
            code_embed = torch.cat([code_embed, code_embed]) if guided else code_embed
            res = self.refiner.sample(out.hidden, code_embed, cfg=cfg if guided else 0.0, generator=generator)
            f_hat = f_hat + rearrange(res, "b (h w) d -> b d h w", h=f_hat.shape[-2])
        return tokens, f_hat

    @torch.no_grad()
    def super_resolve(self, lr_up: Tensor, generator: torch.Generator | None = None, use_cache: bool = True,
                      captions: list[str] | None = None, lr: Tensor | None = None, **overrides) -> list[Tensor]:
        """lr_up (B, 3, H, W) in [-1, 1] at the native size -> SR images in [-1, 1], one per output
        scale of the tokenizer (one for VQ / BSQ; 1x / 2x / 4x for hierarchical RQ), refined one last."""
        tokens, f_hat = self.sample_tokens(lr_up, generator, use_cache, captions, lr, **overrides)
        early = [self.tokenizer.decode(self.quantizer.indices_to_fhat(tokens, upto=k)) for k in self.quantizer.output_steps[:-1]]
        return early + [self.tokenizer.decode(f_hat)]

    @property
    def latent_side(self) -> int:
        return self.quantizer.vae_schedule[-1][0]

    def finish(self, sr: Tensor, lr: Tensor) -> Tensor:
        """SR (B, 3, H, W) in [0, 1] -> post-processed (colour fix) against the LR in [0, 1]."""
        return sr if self.postprocess is None else self.postprocess(sr, lr)

    @torch.no_grad()
    def super_resolve_any(self, lr: Tensor, caption: str | None = None) -> list[Tensor]:
        """One LR image (1, 3, h, w) in [0, 1], any size -> SR outputs in [0, 1] at scale x its size.
        The native size runs whole (all outputs); other sizes run as latent-space tiles (final output)."""
        h, w = lr.shape[-2:]
        H, W = h * self.scale, w * self.scale
        lr_up = upsample(lr, (H, W), self.upsample_mode) * 2 - 1
        g = torch.Generator(device=lr.device).manual_seed(self.seed)
        n, ds = self.native_size, self.tokenizer.downsample
        caps = None if caption is None else [caption]
        if (H, W) == (n, n):
            outs = [(o + 1) / 2 for o in self.super_resolve(lr_up, generator=g, captions=caps, lr=lr * 2 - 1)]
            return outs[:-1] + [self.finish(outs[-1], lr)]
        Hp, Wp = max(n, math.ceil(H / ds) * ds), max(n, math.ceil(W / ds) * ds)
        padded = F.pad(lr_up, (0, Wp - W, 0, Hp - H), mode="replicate")
        side = self.latent_side
        f_hat = tiled_fhat(lambda t: self.sample_tokens(t, generator=g, captions=None if caps is None else caps * len(t))[1], padded, side,
                           min(self.tile_overlap, side - 1), ds, self.tile_batch)
        return [self.finish((self.tokenizer.decode(f_hat)[..., :H, :W] + 1) / 2, lr)]

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
            lr, hr = batch["lr"], batch["hr"]
            g = torch.Generator(device=hr.device).manual_seed(self.seed)
            outs = [(o + 1) / 2 for o in self.super_resolve(batch["lr_up"] * 2 - 1, generator=g, captions=batch.get("caption"), lr=lr * 2 - 1)]
            outs[-1] = self.finish(outs[-1], lr)
        if outs[-1].shape != hr.shape:
            raise ValueError(f"SR {tuple(outs[-1].shape[-2:])} and HR {tuple(hr.shape[-2:])} differ: is the HR {self.scale}x the LR?")
        self.log_dict(sr_metrics(outs, hr, lr, "test"), batch_size=hr.shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        hr, lr = self.images(batch)
        lr_up = batch["lr_up"] * 2 - 1
        tokens, inputs, f = self.targets(hr, lr)
        labels = self.batch_labels(batch, hr.shape[0])
        logits = self.transformer(labels, inputs, lr_up, captions=self.captions(batch, hr.shape[0]))
        bs = hr.shape[0]
        self.log("val/ce", self.token_loss(logits, tokens), batch_size=bs, prog_bar=True)
        self.log("val/acc", self.transformer.head.accuracy(logits, torch.cat(tokens, dim=1))[:, self.loss_mask].mean(), batch_size=bs)
        if batch_idx == 0 and self.val_samples > 0:
            n = min(self.val_samples, bs)
            g = torch.Generator(device=hr.device).manual_seed(0)
            caps = batch.get("caption")
            outs = [(o + 1) / 2 for o in self.super_resolve(lr_up[:n], generator=g, captions=None if caps is None else list(caps)[:n], lr=lr[:n])]
            outs[-1] = self.finish(outs[-1], batch["lr"][:n])
            self.log_dict(sr_metrics(outs, batch["hr"][:n], batch["lr"][:n], "val"), batch_size=n)
            self.log("val/psnr_rgb", peak_signal_noise_ratio(outs[-1], batch["hr"][:n], data_range=1.0), batch_size=n)
            log_sr_grid(self, "val/lr_outputs_hr", batch["lr_up"][:n], outs, batch["hr"][:n])