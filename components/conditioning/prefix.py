"""LR image -> prefix tokens placed before the first scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from arsr.interfaces import Conditioning, Layout


class PrefixTokens(Conditioning):
    """VARSR's LR encoder (``con_embedding``): a strided conv stack, one token per final-scale cell.

    Args:
        channels: widths of the conv stack (VARSR: 32, 128, 256, 512, 1536); each stage but the
            first halves the resolution, so the output side is H / 2^(len(channels) - 1).
        grid: side of the token map it produces (VARSR: 32 for a 512 px input).
    """

    def __init__(self, channels: tuple[int, ...] = (32, 128, 256, 512, 1536), grid: int = 32):
        super().__init__()
        self.channels, self.grid = tuple(channels), grid
        self.prefix_grids = (grid,)

    def bind(self, layout: Layout) -> None:
        if layout.stride is not None:  # the native image is the last latent map times the stride
            h, w = (side * layout.stride // 2 ** (len(self.channels) - 1) for side in layout.vae_schedule[-1])
            if (h, w) != (self.grid, self.grid):
                px = layout.vae_schedule[-1][0] * layout.stride
                raise ValueError(f"PrefixTokens grid {self.grid} != the {h}x{w} map its {len(self.channels)}-stage conv stack makes of "
                                 f"the {px} px input: set grid {h}")
        ch = self.channels
        self.con_embedding = nn.Module()
        self.con_embedding.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        blocks = []
        for cin, cout in zip(ch[:-1], ch[1:]):
            blocks += [nn.Conv2d(cin, cin, 3, padding=1), nn.Conv2d(cin, cout, 3, padding=1, stride=2)]
        self.con_embedding.blocks = nn.ModuleList(blocks)
        self.con_embedding.conv_out = nn.Conv2d(ch[-1], layout.width, 3, padding=1)

    def forward(self, lr_up: Tensor) -> Tensor:
        e = self.con_embedding
        x = F.silu(e.conv_in(lr_up))
        for conv in e.blocks:
            x = F.silu(conv(x))
        x = e.conv_out(x)
        if x.shape[-1] != self.grid:
            raise ValueError(f"LR input of side {lr_up.shape[-1]} gives a {x.shape[-1]}^2 prefix, expected {self.grid}^2")
        return rearrange(x, "b c h w -> b (h w) c")


class EncoderFeatures(Conditioning):
    """MSVAR: the frozen tokenizer encoder's features of the (bilinearly upsampled) LR image as prefix.

    The features are the tokenizer's ``quant_conv(encoder(lr_up))`` (B, d, g, g), computed
    without gradient; only the projection to the transformer width is learned.

    Args:
        grid: side g of the feature map: the tokenizer's last latent side (checked at ``bind``).
        latent_dim: d, the tokenizer's latent channels; None: taken from the layout at ``bind``.
    """

    def __init__(self, grid: int = 32, latent_dim: int | None = None):
        super().__init__()
        self.grid, self.latent_dim = grid, latent_dim
        self.prefix_grids = (grid,)
        self._tokenizer: list[nn.Module] = []  # held outside the module tree: frozen, not saved twice

    def attach_tokenizer(self, tokenizer: nn.Module) -> None:
        self._tokenizer = [tokenizer]

    def bind(self, layout: Layout) -> None:
        if self.latent_dim is not None and self.latent_dim != layout.vae_dim:
            raise ValueError(f"EncoderFeatures latent_dim {self.latent_dim} != the tokenizer's {layout.vae_dim} latent channels: "
                             "leave latent_dim out to take it from the tokenizer")
        if layout.vae_schedule[-1] != (self.grid, self.grid):
            h, w = layout.vae_schedule[-1]
            raise ValueError(f"EncoderFeatures grid {self.grid} != the tokenizer's last latent map {h}x{w}: set grid {h}")
        self.latent_dim = layout.vae_dim
        self.proj = nn.Linear(self.latent_dim, layout.width)

    def forward(self, lr_up: Tensor) -> Tensor:
        if not self._tokenizer:
            raise RuntimeError("EncoderFeatures has no tokenizer attached; ARFinetune attaches it")
        tok = self._tokenizer[0]
        with torch.no_grad():
            f = tok.quant_conv(tok.encoder(lr_up))
        if f.shape[-1] != self.grid:
            raise ValueError(f"tokenizer features of side {f.shape[-1]}, expected {self.grid}")
        return self.proj(rearrange(f, "b c h w -> b (h w) c"))
