"""NSARM's transformation network as released: LR latent features -> the first residual scales.

Input is the frozen VAE encoder's raw (unquantised) feature map of the LR image at its native
size, (B, d, g, g). A shared conv stem, then per output scale k: a conv transform to width D_k,
average pooling to the scale's side, a post-norm ``nn.TransformerEncoder`` over the pooled
positions (row-major, no positional embedding) and an MLP head back to d channels.

Layout quirk kept for weight compatibility: the head emits tokens (B, h*w, d) and NSARM turns
them into a latent map with a plain memory reshape to (B, d, h, w), not a transpose. Token t,
channel c of the head is therefore element (t * d + c) of the channel-major map, not spatial
position t; the released weights learned exactly that flattening, so it is reproduced here.

State-dict keys equal the official ``map_transformer.*`` keys with that prefix removed:
``feature_extractor.{0,1,3,4,6,7}``, ``feature_transforms.k.{0,1,3,4}``,
``transformers.k.layers.j.*`` and ``output_projs.k.{0,1,3}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from arsr.interfaces import Layout, ScalePredictor

# Released NSARM (Infinity-8B, d56 VAE at stride 8 with 14 latent channels, LR 256 -> 32x32 latent;
# the 7 sides are the first scales of the 1M schedule in VAE space). 385,103,600 parameters.
NSARM_8B = dict(
    latent_dim=14,
    grid=32,
    sides=(2, 4, 8, 12, 16, 24, 32),
    dims=(64, 128, 256, 384, 512, 768, 1024),
    layers=(4, 6, 8, 10, 12, 14, 16),
    heads=(4, 4, 8, 8, 8, 12, 16),
    stem=(64, 128),
)


def _pair(side: int | Sequence[int]) -> tuple[int, int]:
    return (side, side) if isinstance(side, int) else (int(side[0]), int(side[1]))


def _conv_ln_gelu(cin: int, cout: int, grid: tuple[int, int]) -> list[nn.Module]:
    """3x3 conv, LayerNorm over (C, H, W) (per-position affine: ties the net to one grid), GELU."""
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.LayerNorm([cout, *grid]), nn.GELU()]


class NSARMTransformationNet(ScalePredictor):
    """NSARM's transformation network (official ``Map_Transformer_residual_for8B`` design, own code).

    The defaults are arsr's choice for the Infinity-2B d32 tokenizer (stride 16, 32 channels):
    LR 256 gives a 16x16 latent and the first 7 scales of the 1M schedule are 1,2,4,6,8,12,16.
    NSARM's 2B variant is not released; these widths keep the 8B design (same stem, 7 per-scale
    transformers, widths 64..384 instead of 64..1024, 2..6 layers) at 21.4M parameters, 1/18 of it.
    The released 8B network is ``NSARMTransformationNet.nsarm_8b()`` (kwargs: ``NSARM_8B``).

    Args:
        latent_dim: d, channels of the VAE latent (input and output); None: the tokenizer's.
        grid: side of the LR latent (int or (h, w)); the stem's LayerNorms are sized for it.
        sides: output side per scale (int or (h, w)) in VAE space, one per entry of ``dims``; None:
            the tokenizer's first ``len(dims)`` scales.
        dims: transformer width per scale (even, divisible by its head count).
        layers: encoder layers per scale.
        heads: attention heads per scale.
        stem: widths of the shared conv stem before it returns to d channels.
        mlp_ratio: feed-forward width / model width in every encoder layer.
        dropout: dropout inside the encoder layers (torch's default placement).

    Sizes left out are taken from the layout at ``bind`` (the network is built there); sizes given
    are checked against it.
    """

    def __init__(self, latent_dim: int | None = None, grid: int | tuple[int, int] = 16,
                 sides: Sequence[int | tuple[int, int]] | None = None,
                 dims: Sequence[int] = (64, 64, 128, 128, 256, 256, 384),
                 layers: Sequence[int] = (2, 2, 3, 3, 4, 4, 6),
                 heads: Sequence[int] = (4, 4, 4, 4, 8, 8, 8),
                 stem: Sequence[int] = (64, 128), mlp_ratio: float = 4.0, dropout: float = 0.1):
        super().__init__()
        n = len(dims)
        if not (len(layers) == len(heads) == n) or (sides is not None and len(sides) != n):
            raise ValueError(f"sides, dims, layers and heads need one entry per scale; got "
                             f"{n if sides is None else len(sides)}, {len(dims)}, {len(layers)}, {len(heads)}")
        for dim, h in zip(dims, heads):
            if dim % 2 or dim % h:
                raise ValueError(f"width {dim} must be even and divisible by its {h} heads")
        self.latent_dim, self.grid = latent_dim, _pair(grid)
        self.sides = None if sides is None else tuple(_pair(s) for s in sides)
        self.num_scales = n
        self.sizes = dict(dims=tuple(dims), layers=tuple(layers), heads=tuple(heads), stem=tuple(stem), mlp_ratio=mlp_ratio, dropout=dropout)
        self._tokenizer: list[nn.Module] = []  # held outside the module tree: frozen, saved by its owner
        if latent_dim is not None:
            self.build()

    def build(self) -> None:
        d, z = self.sizes, self.latent_dim
        widths = [z, *d["stem"], z]
        self.feature_extractor = nn.Sequential(*[m for a, b in pairwise(widths) for m in _conv_ln_gelu(a, b, self.grid)])
        self.feature_transforms = nn.ModuleList(
            nn.Sequential(*_conv_ln_gelu(z, dim // 2, self.grid), *_conv_ln_gelu(dim // 2, dim, self.grid)) for dim in d["dims"])
        self.transformers = nn.ModuleList(
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(dim, h, int(dim * d["mlp_ratio"]), d["dropout"], batch_first=True),
                depth, enable_nested_tensor=False)
            for dim, depth, h in zip(d["dims"], d["layers"], d["heads"]))
        self.output_projs = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim // 2), nn.LayerNorm(dim // 2), nn.GELU(), nn.Linear(dim // 2, z)) for dim in d["dims"])

    @classmethod
    def nsarm_8b(cls) -> NSARMTransformationNet:
        """The released NSARM network (Infinity-8B, d56 VAE, LR 256)."""
        return cls(**NSARM_8B)

    def bind(self, layout: Layout) -> None:
        latent_dim, sides = layout.vae_dim, layout.vae_schedule[: self.num_scales]
        if len(sides) < self.num_scales:
            raise ValueError(f"NSARMTransformationNet predicts {self.num_scales} scales; the schedule has {len(sides)}")
        if self.latent_dim is not None and latent_dim != self.latent_dim:
            raise ValueError(f"NSARMTransformationNet was built for latent_dim {self.latent_dim}, the tokenizer has {latent_dim}")
        if self.sides is not None and sides != self.sides:
            raise ValueError(f"NSARMTransformationNet was built for sides {self.sides}, the schedule's first {len(sides)} scales are {sides}")
        self.sides = sides
        if self.latent_dim is None:
            self.latent_dim = latent_dim
            self.build()

    def attach_tokenizer(self, tokenizer: nn.Module) -> None:
        self._tokenizer = [tokenizer]

    def forward(self, lr: Tensor) -> list[Tensor]:
        """lr (B, 3, h, w) in [-1, 1] at its native size -> per scale (B, d, h_k, w_k)."""
        if not self._tokenizer:
            raise RuntimeError("NSARMTransformationNet has no tokenizer attached (attach_tokenizer)")
        with torch.no_grad():
            feats = self._tokenizer[0].encode(lr)
        return self.predict_from_features(feats)

    def predict_from_features(self, feats: Tensor) -> list[Tensor]:
        """feats (B, d, g, g), raw encoder features -> per scale (B, d, h_k, w_k)."""
        if feats.dim() != 4 or tuple(feats.shape[1:]) != (self.latent_dim, *self.grid):
            raise ValueError(f"NSARMTransformationNet expects LR features (B, {self.latent_dim}, {self.grid[0]}, {self.grid[1]}), "
                             f"got {tuple(feats.shape)}: the LR size or tokenizer differs from the one it was sized for")
        x = self.feature_extractor(feats)
        out = []
        for (h, w), transform, encoder, proj in zip(self.sides, self.feature_transforms, self.transformers, self.output_projs):
            pooled = F.adaptive_avg_pool2d(transform(x), (h, w))  # (B, D, h, w)
            tokens = proj(encoder(rearrange(pooled, "b c h w -> b (h w) c")))  # (B, h*w, d)
            out.append(tokens.reshape(tokens.shape[0], self.latent_dim, h, w))  # raw reshape, no transpose (quirk)
        return out
