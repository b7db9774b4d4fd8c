"""The contracts each component family implements.

A component is any subclass of one of these bases; recipes pick one by ``class_path``.
The frame only ever talks to these interfaces, so a new component needs no change here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor, nn


@dataclass
class DegradedBatch:
    """Output of a :class:`Degradation`.

    hr:       (B, 3, H, W) target in [0, 1] (USM-sharpened when the degradation says so)
    lr:       (B, 3, H/s, W/s) low-resolution input in [0, 1], 8-bit quantised
    lr_up:    (B, 3, H, W) ``lr`` resized back to the HR size (for models that want it)
    degraded: (B,) bool, False for samples that took a clean (bilinear-only) branch
    params:   per-sample random parameters that were drawn, for logging and replay
    """

    hr: Tensor
    lr: Tensor
    lr_up: Tensor
    degraded: Tensor
    params: dict[str, Tensor] = field(default_factory=dict)


class Degradation(nn.Module, ABC):
    """Synthesises LR inputs from a batch of HR crops, on whatever device the batch is on."""

    scale: int

    @abstractmethod
    def forward(self, hr: Tensor, generator: torch.Generator | None = None, seeds: Sequence[int] | None = None) -> DegradedBatch:
        """hr: (B, 3, H, W) in [0, 1]; H and W divisible by ``scale``. ``seeds``: one per sample (the data
        module's), so a sample degrades the same in any batch; without them draws come from ``generator``."""


@dataclass
class SRBatch:
    """A batch of SR pairs as the tasks see it (the data module's dict, typed); images in [0, 1].

    hr:       (B, 3, H, W) target
    lr:       (B, 3, H/s, W/s) input
    lr_up:    (B, 3, H, W) ``lr`` resized to the HR size
    caption:  one per sample (captioned shards, ``<name>.txt`` beside predict inputs), or None
    quality:  (B,) 1 positive / 0 negative / -1 unlabelled (VARSR's quality labels)
    degraded: (B,) bool, False for the clean branch of the degradation (MSVAR's classes)
    label:    (B,) class labels (class-to-image shards), -1 unlabelled
    key:      sample names; stats: data-cleaning counts of this batch, for logging
    """

    hr: Tensor
    lr: Tensor | None = None
    lr_up: Tensor | None = None
    caption: list[str] | None = None
    quality: Tensor | None = None
    degraded: Tensor | None = None
    label: Tensor | None = None
    key: list[str] | None = None
    stats: dict = field(default_factory=dict)

    @classmethod
    def of(cls, batch: dict | SRBatch) -> SRBatch:
        """The typed view of a loader's dict (keys the tasks do not read are left out)."""
        if isinstance(batch, SRBatch):
            return batch
        names = {f.name for f in fields(cls)}
        b = cls(**{k: v for k, v in batch.items() if k in names and v is not None})
        if isinstance(b.caption, str):
            b.caption = [b.caption]
        elif b.caption is not None:
            b.caption = list(b.caption)
        return b

    def __len__(self) -> int:
        return self.hr.shape[0]

    def need(self, name: str, why: str) -> Tensor:
        """The field ``name``, or a one-line error saying who needs it and how to provide it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the batch has no {name!r}: {why}")
        return value

    def head(self, n: int) -> SRBatch:
        """The first n samples (the batch's stats stay whole)."""
        cut = {f.name: getattr(self, f.name)[:n] for f in fields(self) if f.name != "stats" and getattr(self, f.name) is not None}
        return replace(self, **cut)


@dataclass
class QuantOutput:
    """Output of a quantizer's training forward.

    f_hats:   decodable quantised latents with a straight-through gradient, one per output
              scale (one for a single-output quantizer; 1x/2x/4x for hierarchical RQ)
    features: the continuous latents each of ``f_hats`` approximates (quantisation bypass)
    loss:     scalar quantizer loss (commitment / codebook / entropy terms)
    indices:  per-scale token maps, each (B, h_k * w_k) (or (B, h_k * w_k, bits) for bitwise)
    logs:     extra scalars to log (codebook usage, per-term losses)
    """

    f_hats: list[Tensor]
    features: list[Tensor]
    loss: Tensor
    indices: list[Tensor]
    logs: dict[str, Tensor] = field(default_factory=dict)

    @property
    def f_hat(self) -> Tensor:
        """The largest output's quantised latent."""
        return self.f_hats[-1]


@dataclass
class TeacherForcing:
    """Targets of a teacher-forced step.

    tokens:    per scale, the labels (B, h_k * w_k) indices or (B, h_k * w_k, bits)
    inputs:    teacher-forcing inputs of scales 2..K, (B, L - first, token_dim)
    residuals: per scale, the continuous residuals the labels quantise (when the quantizer has them)
    """

    tokens: list[Tensor]
    inputs: Tensor
    residuals: list[Tensor] = field(default_factory=list)


class ScaleWalk:
    """The tokens of a sampling run so far, and what follows from them: the next scale's input and
    the accumulated latent. This default recomputes both from the token list; quantizers whose sum
    can grow one scale at a time override it (:meth:`Quantizer.start_walk`)."""

    def __init__(self, quantizer: Quantizer):
        self.quantizer, self.tokens = quantizer, []

    def add(self, tokens: Tensor) -> None:
        """Append the tokens of the next scale (B, h_k * w_k, ...)."""
        self.tokens.append(tokens)

    def next_input(self) -> Tensor:
        """Input of scale len(tokens): (B, h * w, token_dim)."""
        return self.quantizer.step_input(self.tokens)

    def f_hat(self) -> Tensor:
        """The latent of every scale added so far (B, C, h, w)."""
        return self.quantizer.indices_to_fhat(self.tokens)


class RunningSum(ScaleWalk):
    """The walk of a quantizer whose latent is a sum of one term per scale (VAR's, Infinity's): each
    added scale costs one term, and the next input is read off the running sum. The quantizer gives
    ``scale_term(tokens, si)`` and ``input_from(f_hat, k)``."""

    def __init__(self, quantizer: Quantizer):
        super().__init__(quantizer)
        self.acc = 0

    def add(self, tokens: Tensor) -> None:
        self.acc = self.acc + self.quantizer.scale_term(tokens, len(self.tokens))
        super().add(tokens)

    def next_input(self) -> Tensor:
        return self.quantizer.input_from(self.acc, len(self.tokens))

    def f_hat(self) -> Tensor:
        return self.acc


class Quantizer(nn.Module, ABC):
    """A next-scale (multi-scale residual) quantizer of a continuous latent ``f``.

    Attributes:
        dim: latent channels C.
        schedule: (h, w) of the token map at each scale, smallest first (transformer space).
    Derived (overridable): ``patch_nums`` (sides of square schedules), ``vae_schedule`` (map sizes in
    the latent, equal to ``schedule`` unless tokens are patchified), ``token_dim`` (width of a token's
    code / teacher input, ``dim`` unless patchified).
    """

    dim: int
    token_kind: str = "index"  # "index": codebook indices (vocab_size); "bits": token_dim binary labels
    substitutable: bool = False  # supports NSARM's substituted residuals (teacher(substituted), residual_to_tokens)

    @property
    def schedule(self) -> tuple[tuple[int, int], ...]:
        sched = self.__dict__.get("_schedule")
        if sched is None:
            raise AttributeError(f"{type(self).__name__} has no schedule")
        return sched

    @schedule.setter
    def schedule(self, value) -> None:
        self.__dict__["_schedule"] = tuple(value)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        sched = self.schedule
        if any(h != w for h, w in sched):
            raise ValueError(f"schedule {sched} is not square; this path needs square token maps")
        return tuple(h for h, _ in sched)

    @patch_nums.setter
    def patch_nums(self, value) -> None:
        self.__dict__["_schedule"] = tuple((p, p) for p in value)

    @property
    def vae_schedule(self) -> tuple[tuple[int, int], ...]:
        return self.schedule

    @property
    def token_dim(self) -> int:
        return self.dim

    @property
    def output_steps(self) -> tuple[int, ...]:
        """Number of leading scales that decode to each output image (one output by default)."""
        return (len(self.schedule),)

    @abstractmethod
    def forward(self, f: Tensor) -> QuantOutput:
        """Training forward: f (B, C, h, w) -> :class:`QuantOutput`."""

    @abstractmethod
    def f_to_indices(self, f: Tensor) -> list[Tensor]:
        """Tokenise: f (B, C, h, w) -> one index tensor per scale."""

    @abstractmethod
    def indices_to_fhat(self, indices: list[Tensor], upto: int | None = None) -> Tensor:
        """Accumulate the first ``upto`` scales (all by default) back into f_hat (B, C, h, w)."""

    @abstractmethod
    def codes(self, tokens: Tensor, si: int) -> Tensor:
        """Tokens of scale si -> their code vectors (B, C, h_si, w_si) in latent space."""

    @abstractmethod
    def step_input(self, tokens: list[Tensor]) -> Tensor:
        """Input of scale k = len(tokens) given the tokens of scales 1..k: (B, h_k * w_k, token_dim)."""

    def start_walk(self) -> ScaleWalk:
        """A :class:`ScaleWalk` for one sampling run (the sampler adds each scale's tokens to it)."""
        return ScaleWalk(self)

    def residual_to_tokens(self, residual: Tensor, si: int) -> Tensor:
        """Quantise a continuous residual (B, C, h_si, w_si) into scale si's tokens (NSARM's forced scales)."""
        raise ValueError(f"{type(self).__name__} cannot quantise substituted residuals (NSARM); use MultiScaleBSQ")

    def indices_to_teacher_input(self, indices: list[Tensor]) -> Tensor:
        """Teacher-forcing inputs of scales 2..K: (B, L - first, C), from the tokens of scales 1..K-1
        (one pass of the sampling walk: incremental where the quantizer's walk is)."""
        walk, inputs = self.start_walk(), []
        for tokens in indices[: len(self.schedule) - 1]:
            walk.add(tokens)
            inputs.append(walk.next_input())
        return torch.cat(inputs, dim=1)

    def teacher(self, f: Tensor, substituted: list[Tensor] = (), corrupt: bool = False) -> TeacherForcing:
        """Labels and teacher-forcing inputs of the latent f. ``substituted``: residuals of the first
        scales from elsewhere (NSARM Algorithm 2); ``corrupt``: apply the training-time corruption
        the quantizer is configured with (bitwise self-correction), none by default."""
        if len(substituted):
            raise ValueError(f"{type(self).__name__} does not support substituted scales (NSARM); use MultiScaleBSQ")
        with torch.no_grad():
            tokens = self.f_to_indices(f)
            return TeacherForcing(tokens, self.indices_to_teacher_input(tokens))


@dataclass(frozen=True)
class Layout:
    """The sizes every component binds to (``bind(layout)``), derived once from the tokenizer
    (:meth:`of`) plus the backbone's width and heads and the conditioning's prefix maps.

    The sequence is ``[prefix tokens][scale 1][scale 2]...[scale K]``. The prefix (LR tokens, ...)
    comes from the conditioning; its last ``h_1 * w_1`` positions double as the start tokens that
    predict scale 1 when the conditioning has no start of its own.

    width, heads: the backbone's (0 and 1 where no backbone is involved: a transformation network).
    latent_dim: width of a token's code, the backbone's input (the quantizer's ``token_dim``).
    schedule: (h, w) of the token map at each scale, smallest first.
    prefix_grids: the square maps the prefix is made of (for 2-D positions).
    vae_dim, vae_schedule: the tokenizer latent's channels and per-scale map sizes (None: equal to
        latent_dim and schedule; they differ when tokens are patchified, Infinity-8B).
    token_kind, vocab_size: what the backbone predicts: ``index`` tokens of a ``vocab_size``
        codebook, or ``bits`` (``latent_dim`` binary labels per token); a backbone built before it
        meets its tokenizer has ``token_kind`` None.
    stride: pixels per latent cell (the tokenizer encoder's downsampling), so that the native image
        side is ``vae_schedule[-1] * stride``; None where no tokenizer was given.
    """

    width: int
    heads: int
    latent_dim: int
    schedule: tuple[tuple[int, int], ...]
    prefix_grids: tuple[int, ...] = ()
    vae_dim: int | None = None
    vae_schedule: tuple[tuple[int, int], ...] | None = None
    token_kind: str | None = None
    vocab_size: int | None = None
    stride: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", tuple((int(h), int(w)) for h, w in self.schedule))
        object.__setattr__(self, "vae_dim", self.latent_dim if self.vae_dim is None else self.vae_dim)
        vs = self.schedule if self.vae_schedule is None else self.vae_schedule
        object.__setattr__(self, "vae_schedule", tuple((int(h), int(w)) for h, w in vs))

    @classmethod
    def of(cls, quantizer: Quantizer, width: int = 0, heads: int = 1, prefix_grids: tuple[int, ...] = (),
           stride: int | None = None) -> Layout:
        """The layout of a quantizer's tokens (for a backbone of this width / heads; ``stride``: the
        tokenizer's downsampling, when known)."""
        vocab = getattr(quantizer, "vocab_size", None) if quantizer.token_kind == "index" else None
        return cls(width, heads, quantizer.token_dim, quantizer.schedule, tuple(prefix_grids), quantizer.dim, quantizer.vae_schedule,
                   quantizer.token_kind, vocab, stride)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        """Sides of a square schedule (VAR's patch_nums); raises for non-square token maps."""
        if any(h != w for h, w in self.schedule):
            raise ValueError(f"schedule {self.schedule} is not square; this component needs square token maps")
        return tuple(h for h, _ in self.schedule)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def prefix_len(self) -> int:
        return sum(g * g for g in self.prefix_grids)

    @property
    def first_len(self) -> int:  # prefix + the first scale's start tokens
        h, w = self.schedule[0]
        return self.prefix_len + h * w

    @property
    def image_len(self) -> int:
        return sum(h * w for h, w in self.schedule)

    @property
    def total_len(self) -> int:
        return self.prefix_len + self.image_len

    def scale_start(self, si: int) -> int:
        """Sequence position of scale si's first input token (scale 1: the start of the prefix)."""
        return 0 if si == 0 else self.first_len + sum(h * w for h, w in self.schedule[1:si])

    def levels(self) -> Tensor:
        """(total_len,) scale index of each position; the prefix and scale 1 share level 0."""
        cpu = dict(dtype=torch.long, device="cpu")  # a table of ints, also under a meta-device build
        lv = [torch.zeros(self.first_len, **cpu)]
        lv += [torch.full((h * w,), i, **cpu) for i, (h, w) in enumerate(self.schedule) if i > 0]
        return torch.cat(lv)

    def grids(self) -> tuple[int, ...]:
        """Side of the square map each position belongs to, in order: prefix maps, then scales."""
        return self.prefix_grids + self.patch_nums


class PositionalEncoding(nn.Module, ABC):
    """Adds absolute embeddings and/or rotates q, k. ``bind`` creates parameters for a layout."""

    @abstractmethod
    def bind(self, layout: Layout) -> None: ...

    def additive(self, start: int, end: int) -> Tensor | None:
        """(end - start, C) embedding for image positions [start, end) (0 = first scale), or None."""
        return None

    def rotary(self, start: int, end: int) -> Tensor | None:
        """(end - start, head_dim / 2) complex rotations for sequence positions [start, end), or None."""
        return None


class Conditioning(nn.Module, ABC):
    """Turns the LR image into prefix tokens placed before the first scale."""

    prefix_grids: tuple[int, ...] = ()

    @abstractmethod
    def bind(self, layout: Layout) -> None: ...

    @abstractmethod
    def forward(self, lr_up: Tensor) -> Tensor | None:
        """lr_up (B, 3, H, W) in [-1, 1] -> (B, prefix_len, C) or None when there is no prefix."""

    def attach_tokenizer(self, tokenizer: nn.Module) -> None:
        """Called by the task with its frozen tokenizer, for conditionings built on its encoder."""


class Head(nn.Module, ABC):
    """Maps hidden states to token logits and scores / samples tokens. ``bind(layout)`` creates its
    parameters for the backbone's width (the condition vector has the same width) and, where the
    layout knows the tokens (``token_kind``), checks and takes their size."""

    @abstractmethod
    def bind(self, layout: Layout) -> None: ...

    def check_tokens(self, layout: Layout) -> None:
        """Raise a one-line error when this head cannot score the layout's tokens (``token_kind`` /
        ``vocab_size`` / ``latent_dim``); take their size where the head was built without one."""

    def init_weights(self, init_head: float, init_adaln: float) -> None:
        """Called after the transformer's own initialisation."""

    @abstractmethod
    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        """h (B, N, C), cond (B, C) -> logits (B, N, V) or (B, N, d, 2)."""

    @abstractmethod
    def log_prob(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Per-token log-probability (B, N) of ``tokens`` ((B, N) indices or (B, N, d) bits)."""

    @abstractmethod
    def sample(self, logits: Tensor, top_k: int, top_p: float, temperature: float, generator: torch.Generator | None) -> Tensor: ...

    def token_loss(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Per-token training loss (B, N); cross-entropy by default."""
        return -self.log_prob(logits, tokens)

    def accuracy(self, logits: Tensor, tokens: Tensor) -> Tensor:
        """Per-token 0/1 correctness of the most likely token (B, N)."""
        return (logits.argmax(-1) == tokens).float()


class ScalePredictor(nn.Module, ABC):
    """Predicts the first scales of the residual pyramid from the LR image (NSARM's transformation network).

    ``bind(layout)`` gives the tokenizer's sizes (it predicts ``layout.vae_dim`` channels at the
    latent sizes ``layout.vae_schedule[:num_scales]``); ``attach_tokenizer`` the frozen tokenizer
    (for networks that read its encoder's features).
    """

    num_scales: int

    @abstractmethod
    def bind(self, layout: Layout) -> None: ...

    def attach_tokenizer(self, tokenizer: nn.Module) -> None:
        """Called by the task with its frozen tokenizer."""

    @abstractmethod
    def forward(self, lr: Tensor) -> list[Tensor]:
        """lr (B, 3, h, w) in [-1, 1] at the LR size -> continuous residuals of scales 1..num_scales,
        each (B, d, h_k, w_k) in latent space."""


class Labels(ABC):
    """Class labels of a batch for the AdaLN / start-token condition, and how to guide with them.

    Attributes:
        cfg: guidance strength at the last scale at inference (0 disables CFG).
        neg_label: the label of the guidance's negative branch.
    """

    cfg: float = 0.0
    neg_label: int | None = None

    @abstractmethod
    def __call__(self, batch: SRBatch) -> Tensor:
        """batch -> (B,) long labels."""

    def inference(self, batch_size: int, device) -> Tensor:
        """The label every image is generated with."""
        return torch.zeros(batch_size, dtype=torch.long, device=device)


@dataclass
class ARContext:
    """What a regularizer sees of one teacher-forced training step."""

    model: nn.Module  # the backbone
    tokenizer: nn.Module
    batch: SRBatch
    labels: Tensor
    prefix_input: Tensor | None
    tokens: list[Tensor]  # HR tokens per scale
    logits: Tensor  # (B, L, ...)
    loss_mask: Tensor  # (L,) bool: positions that are trained on
    captions: list[str] | None = None  # prompts of a text-conditioned transformer


class Regularizer(nn.Module, ABC):
    """An extra training loss on top of teacher-forced cross-entropy (DPO, ...).

    ``logs`` holds extra scalars of the last call, for logging.
    """

    def __init__(self):
        super().__init__()
        self.logs: dict[str, Tensor] = {}

    @abstractmethod
    def forward(self, ctx: ARContext) -> dict[str, Tensor]:
        """-> named loss terms (already weighted); their sum is added to the loss."""


class Refiner(nn.Module, ABC):
    """Adds a continuous correction to the last scale's quantised latent (VARSR's diffusion refiner).

    Attribute ``latent_dim``: channels of the latent it refines.
    """

    latent_dim: int

    def bind(self, layout: Layout) -> None:
        """Size from the layout (latent channels ``vae_dim``, backbone ``width``), or check the sizes given."""

    @abstractmethod
    def loss(self, h_last: Tensor, code_embed: Tensor, target: Tensor) -> Tensor:
        """h_last, code_embed (B, N, C); target (B, N, d) residual after the last code -> weighted loss."""

    @abstractmethod
    def sample(self, h_last: Tensor, code_embed: Tensor, cfg: float = 0.0, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """-> residual (B, N, d); with cfg > 0 the inputs hold [conditional; unconditional] halves."""


class TextConditioning(nn.Module, ABC):
    """Encodes captions / prompts for cross-attention (Infinity / NSARM).

    Attributes: ``dim``, width of the features it returns; ``prompt``, a fixed prompt that replaces
    every caption (NSARM's "Fixed" ablation), or None.
    """

    dim: int
    prompt: str | None = None

    def captions(self, captions: list[str] | None, n: int) -> list[str]:
        """The n prompts a batch is conditioned on: the fixed prompt, else the captions, else empty prompts."""
        if self.prompt is not None:
            return [self.prompt] * n
        if captions is None:
            return [""] * n
        if len(captions) != n:
            raise ValueError(f"{len(captions)} captions for a batch of {n} images")
        return list(captions)

    @abstractmethod
    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor, Tensor]:
        """captions -> features (B, T, dim), key mask (B, T) bool (True = real token), pooled (B, dim)."""
