"""Next-scale AR training: NSARM stage 1 (TransformAlign) and full fine-tuning (ARFinetune)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio

from arsr.checkpoint import load_into, load_weights
from arsr.inference import Inference, SuperResolution
from arsr.interfaces import ARContext, Labels, Layout, Refiner, Regularizer, ScalePredictor, SRBatch
from arsr.nn.infinity import InfinityTransformer
from arsr.nn.transformer import NextScaleTransformer
from arsr.nn.vae import VQVAE
from arsr.parallel import parallelize
from arsr.visual import log_sr_grid, sr_metrics

from .base import ARSRTask, adamw


class _TokenizerTask(ARSRTask):
    """Shared by the AR tasks: a frozen tokenizer (its weights come with it: ``VQVAE(weights=...)``)."""

    not_saved = ("tokenizer",)  # the frozen tokenizer is an input, not a result
    init_strict: bool = True

    def __init__(self, tokenizer: VQVAE, optimizer, lr_scheduler, init_from, image_log_every):
        super().__init__(optimizer, lr_scheduler, init_from, image_log_every)
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


class TransformAlign(_TokenizerTask):
    """NSARM stage 1: train the transformation network to predict the first scales of the HR image's
    residual pyramid (NSARM Algorithm 1) from the LR image, with MSE in latent space; the
    tokenizer is frozen and the transformer is not involved.

    Args:
        scale_predictor: the transformation network.
        tokenizer: the (BSQ) tokenizer whose pyramid is the target, with its ``weights``.
        target: ``residual`` (the continuous residuals r_k, arsr's default) or ``code`` (their BSQ
            codes q_k); NSARM's released helpers build both, its loss is not public.
    """

    def __init__(self, scale_predictor: ScalePredictor, tokenizer: VQVAE, target: Literal["residual", "code"] = "residual",
                 optimizer: OptimizerCallable = adamw, lr_scheduler: LRSchedulerCallable | None = None,
                 init_from: str | None = None, image_log_every: int = 500):
        super().__init__(tokenizer, optimizer, lr_scheduler, init_from, image_log_every)
        self.record_settings()
        self.scale_predictor, self.target = bind_predictor(scale_predictor, self.tokenizer), target

    def targets(self, hr: Tensor) -> list[Tensor]:
        with torch.no_grad():
            pyramid = self.quantizer.decompose(self.tokenizer.encode(hr))
        return (pyramid.residuals if self.target == "residual" else pyramid.codes)[: self.scale_predictor.num_scales]

    def step(self, batch: SRBatch, stage: str) -> Tensor:
        pred = self.scale_predictor(batch.lr * 2 - 1)
        per_scale = [F.mse_loss(p.float(), t) for p, t in zip(pred, self.targets(batch.hr * 2 - 1))]
        loss = torch.stack(per_scale).mean()
        bs = len(batch)
        self.log_dict({f"{stage}/mse_scale{i + 1}": l for i, l in enumerate(per_scale)}, batch_size=bs)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=bs)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        b = SRBatch.of(batch)
        self.log_data_stats(b.stats)
        return self.step(b, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step(SRBatch.of(batch), "val")


def bind_predictor(predictor: ScalePredictor, tokenizer: VQVAE) -> ScalePredictor:
    """Size a transformation network from the tokenizer: latent width, latent-space map sizes."""
    q = tokenizer.quantize
    if not q.substitutable:
        raise ValueError(f"a scale predictor (NSARM) needs a quantizer that takes substituted residuals; {type(q).__name__} does not: use MultiScaleBSQ")
    if predictor.num_scales >= len(q.vae_schedule):
        raise ValueError(f"the transformation network predicts {predictor.num_scales} scales of a {len(q.vae_schedule)}-scale schedule: "
                         "leave at least one scale to the transformer")
    predictor.bind(Layout.of(q, stride=tokenizer.downsample))
    predictor.attach_tokenizer(tokenizer)
    return predictor


@dataclass(frozen=True)
class Training:
    """How ARFinetune trains (the ``training:`` block of a recipe).

    Attributes:
        scale_weighting: ``uniform`` (mean over the trained tokens) or ``sqrt_area`` (Infinity's
            reweight_loss_by_scale: the tokens of scale k weigh 1/sqrt(h_k w_k), normalised).
        ce_on_substituted: with a scale predictor, also train the backbone on the substituted scales'
            tokens (arsr default: no; they are given at inference).
        init_strict: False loads only the tensors of ``init_from`` whose names and shapes match (the
            rest is reported), e.g. MSVAR starting from var_d16.
        activation_checkpointing: recompute every block in the backward pass.
        compile: ``torch.compile`` every block.
        fsdp_bf16_params: under FSDP2, compute with bf16 parameters (fp32 gradient reduction).
        init_from: ``.safetensors`` weights to start from (the transformer, refiner, scale predictor:
            every part present in the file loads); a list merges several files, later ones winning
            (e.g. converted Infinity weights and NSARM stage 1's export). Not a resume: that is ``--ckpt_path``.
        image_log_every: log an LR | outputs | HR grid every this many training steps (0 = never).
        channels_last: keep the frozen tokenizer in channels-last memory format (NHWC): faster
            convolutions with oneDNN on CPU and tensor cores on GPU; latents equal up to float rounding.
    """

    scale_weighting: Literal["uniform", "sqrt_area"] = "uniform"
    ce_on_substituted: bool = False
    init_strict: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    fsdp_bf16_params: bool = False
    init_from: str | list[str] | None = None
    image_log_every: int = 500
    channels_last: bool = False


def _config(value, kind):
    """A dataclass setting given as itself or as a dict of its fields (direct Python construction)."""
    return kind(**value) if isinstance(value, dict) else value


class ARFinetune(SuperResolution, _TokenizerTask):
    """Teacher-forced next-scale training of a backbone on tokens of the frozen tokenizer; sampling,
    tiling, predict and test come from :class:`arsr.inference.SuperResolution`.

    Args:
        transformer: the backbone: VAR-family (:class:`NextScaleTransformer`, with its positional
            encoding, conditioning and head) or Infinity (:class:`InfinityTransformer`, captions).
        tokenizer: frozen tokenizer giving the target tokens (VQ indices or BSQ bits), with its
            ``weights``; its schedule is the schedule of everything else (the backbone and the scale
            predictor bind to it).
        labels: label policy (quality CFG, degradation classes, class labels); None: label 0 and no
            label-based guidance (Infinity / NSARM guide with the null caption).
        regularizer: optional extra loss (e.g. DPO).
        refiner: optional diffusion refiner of the last scale's residual.
        scale_predictor: NSARM: a transformation network whose predicted residuals replace the
            first scales; they are BSQ-quantised, later scales' inputs and labels are re-derived
            from them (Algorithm 2) and the loss reaches the network through those inputs.
        optimizer, lr_scheduler: as every arsr task (:class:`arsr.tasks.base.ARSRTask`).
        training: :class:`Training` settings (starting weights, loss weighting, logging, parallelism).
        inference: :class:`arsr.inference.Inference` settings (sampling, tiling, post-processing).
    """

    def __init__(
        self,
        transformer: NextScaleTransformer | InfinityTransformer,
        tokenizer: VQVAE,
        labels: Labels | None = None,
        regularizer: Regularizer | None = None,
        refiner: Refiner | None = None,
        scale_predictor: ScalePredictor | None = None,
        optimizer: OptimizerCallable = adamw,
        lr_scheduler: LRSchedulerCallable | None = None,
        training: Training = Training(),
        inference: Inference = Inference(),
    ):
        training, inference = _config(training, Training), _config(inference, Inference)
        super().__init__(tokenizer, optimizer, lr_scheduler, training.init_from, training.image_log_every)
        self.record_settings()
        transformer.bind(tokenizer.quantize, stride=tokenizer.downsample)
        if refiner is not None:
            refiner.bind(transformer.layout)
        self.transformer, self.labels, self.regularizer, self.refiner = transformer, labels, regularizer, refiner
        self.scale_predictor = None if scale_predictor is None else bind_predictor(scale_predictor, self.tokenizer)
        self.postprocess = inference.postprocess  # registered, so it moves with the task
        if getattr(transformer, "conditioning", None) is not None:
            transformer.conditioning.attach_tokenizer(self.tokenizer)
        self.training_config, self.inference = training, inference
        self.register_buffer("token_weights", self.weights_by_scale(tokenizer.quantize.schedule), persistent=False)

    @property
    def init_strict(self) -> bool:
        return self.training_config.init_strict

    def setup(self, stage: str) -> None:
        """Training checks that inference resizes the LR as the degradation does for ``lr_up``."""
        deg = getattr(getattr(self._trainer, "datamodule", None), "degradation", None) if self._trainer is not None else None
        mode = getattr(deg, "upsample_mode", None)
        if stage == "fit" and mode is not None and {"random": "bicubic"}.get(mode, mode) != self.inference.upsample_mode:
            want = {"random": "bicubic"}.get(mode, mode)
            raise ValueError(f"inference upsample_mode {self.inference.upsample_mode!r} differs from the degradation's {mode!r}: inference "
                             f"would resize the LR unlike training; set --model.init_args.inference.upsample_mode {want}")
        super().setup(stage)

    def weights_by_scale(self, schedule) -> Tensor:
        """(L,) weight of each token in the loss, summing to 1 over the trained positions."""
        bounds = [0] + torch.tensor([h * w for h, w in schedule]).cumsum(0).tolist()
        mask = torch.ones(bounds[-1], dtype=torch.bool)
        if self.scale_predictor is not None and not self.training_config.ce_on_substituted:
            mask[: bounds[self.scale_predictor.num_scales]] = False  # substituted scales are given, not predicted
        uniform = self.training_config.scale_weighting == "uniform"
        w = torch.cat([torch.full((h * w,), 1.0 if uniform else (h * w) ** -0.5) for h, w in schedule]) * mask
        return w / w.sum()

    @property
    def loss_mask(self) -> Tensor:
        return self.token_weights > 0

    def batch_labels(self, batch: SRBatch) -> Tensor:
        return self.labels(batch) if self.labels is not None else torch.zeros(len(batch), dtype=torch.long, device=self.device)

    def configure_model(self) -> None:
        """The tokenizer to channels-last if asked, then :func:`arsr.parallel.parallelize`: activation
        checkpointing and compile per block, then (under
        Lightning's ModelParallelStrategy) FSDP2 ``fully_shard`` per block and per trainable part; the
        frozen tokenizer is replicated. Runs once."""
        if getattr(self, "_parallelized", False):
            return
        t = self.training_config
        if t.channels_last:
            self.tokenizer.to(memory_format=torch.channels_last)
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        parallelize(self.transformer.blocks, (self.transformer, self.refiner, self.scale_predictor, self.regularizer),
                    None if mesh is None else mesh["data_parallel"], t.activation_checkpointing, t.compile,
                    torch.bfloat16 if mesh is not None and t.fsdp_bf16_params else None)
        self._parallelized = True

    def targets(self, batch: SRBatch) -> tuple[list[Tensor], Tensor, Tensor]:
        """-> tokens per scale, teacher-forcing inputs, latent f. With a scale predictor (NSARM
        stage 2) its residuals replace the first scales (Algorithm 2) and stay in the graph."""
        with torch.no_grad():
            f = self.tokenizer.encode(batch.hr * 2 - 1)
        substituted = self.scale_predictor(batch.lr * 2 - 1) if self.scale_predictor is not None else []
        tf = self.quantizer.teacher(f, substituted, corrupt=self.training)
        return tf.tokens, tf.inputs, f

    def token_loss(self, logits: Tensor, tokens: list[Tensor]) -> Tensor:
        """Weighted per-token loss, summed over the sequence, mean over the batch."""
        return (self.transformer.head.token_loss(logits, torch.cat(tokens, dim=1)) * self.token_weights).sum(1).mean()

    def accuracy(self, logits: Tensor, tokens: list[Tensor]) -> Tensor:
        """Mean accuracy over the trained positions (masked by multiplication: no host sync)."""
        mask = self.loss_mask
        return (self.transformer.head.accuracy(logits, torch.cat(tokens, dim=1)) * mask).sum(1).mean() / mask.sum()

    def refiner_loss(self, h: Tensor, logits: Tensor, tokens: list[Tensor], f: Tensor) -> Tensor:
        """Refine the last scale: target = what remains of f after scales 1..K-1 and the model's own last token."""
        K, n_last = len(tokens), tokens[-1].shape[1]
        with torch.no_grad():
            idx_hat = logits[:, -n_last:].argmax(-1)  # the most likely token (index, or each bit)
            rest = self.tokenizer.final_latent(f).float() - self.quantizer.indices_to_fhat(tokens, upto=K - 1)
            target = rearrange(rest - self.quantizer.codes(idx_hat, K - 1), "b d h w -> b (h w) d")
        return self.refiner.loss(h[:, -n_last:], self.code_embed(idx_hat, K - 1), target)

    def forward_batch(self, batch: SRBatch):
        """Teacher-forced pass -> (tokens per scale, logits, hidden states, latent f, labels)."""
        tokens, inputs, f = self.targets(batch)
        labels = self.batch_labels(batch)
        logits, h = self.transformer(labels, inputs, batch.lr_up * 2 - 1, return_hidden=True, captions=batch.caption)
        return tokens, logits, h, f, labels

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        b = SRBatch.of(batch)
        self.log_data_stats(b.stats)
        tokens, logits, h, f, labels = self.forward_batch(b)
        terms = {"ce": self.token_loss(logits, tokens)}
        if self.regularizer is not None:
            terms |= self.regularizer(ARContext(self.transformer, self.tokenizer, b, labels, b.lr_up * 2 - 1, tokens, logits,
                                                self.loss_mask, b.caption))
        if self.refiner is not None:
            terms["refiner"] = self.refiner_loss(h, logits, tokens, f)
        loss = sum(terms.values())
        logs = {f"train/{k}": v for k, v in terms.items()} | {"train/acc": self.accuracy(logits.detach(), tokens)}
        if self.regularizer is not None:
            logs |= {f"train/{k}": v for k, v in self.regularizer.logs.items()}
        self.log_dict(logs, batch_size=len(b))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(b))
        if self._trainer is not None and self.logger is not None and self.should_log_images(batch_idx):
            with torch.no_grad():  # LR | every emitted scale | HR of the first samples, with the inference settings
                first = b.head(2)
                log_sr_grid(self, "train/lr_outputs_hr", first.lr_up, self.super_resolve_batch(first), first.hr)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        b = SRBatch.of(batch)
        tokens, logits, _, _, _ = self.forward_batch(b)
        self.log("val/ce", self.token_loss(logits, tokens), batch_size=len(b), prog_bar=True)
        self.log("val/acc", self.accuracy(logits, tokens), batch_size=len(b))
        n = min(self.inference.val_samples, len(b))
        if batch_idx == 0 and n > 0:
            first = b.head(n)
            outs = self.super_resolve_batch(first)
            self.log_dict(sr_metrics(outs, first.hr, first.lr, "val"), batch_size=n)
            self.log("val/psnr_rgb", peak_signal_noise_ratio(outs[-1], first.hr, data_range=1.0), batch_size=n)
            log_sr_grid(self, "val/lr_outputs_hr", first.lr_up, outs, first.hr)
