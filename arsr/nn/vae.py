"""Convolutional VQ autoencoder of the latent-diffusion "vq-f16" family.

Module and parameter names match the official VAR VQVAE (``vae_ch160v4096z32``), which the
Switti / MSVAR RQ-VAE shares, so official state dicts load without renaming. All widths are
arguments: ``ch=160, ch_mult=(1, 1, 2, 2, 4), z_channels=32`` is the official model,
``ch=32, ch_mult=(1, 2)`` a CPU-sized one with the same code paths.
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from arsr.interfaces import Quantizer, QuantOutput


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res blocks (+ attention after each at the lowest level) and a resampler."""

    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout) for i in range(n_blocks)])
        self.attn = nn.ModuleList([AttnBlock(cout) for _ in range(n_blocks)]) if attn else nn.ModuleList()
        if resample is not None:
            setattr(self, "downsample" if resample is Downsample else "upsample", resample(cout))

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Mid(nn.Module):
    def __init__(self, ch: int, attn: bool = True):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch) if attn else nn.Identity()
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> (B, z, H/2^(L-1), W/2^(L-1))."""

    def __init__(self, ch: int = 160, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 32, in_channels: int = 3, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch if i == 0 else widths[i - 1], widths[i], num_res_blocks, using_sa and i == last,
                  Downsample if i != last else None)
            for i in range(len(ch_mult))
        )
        self.mid = Mid(widths[-1], using_mid_sa)
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """(B, z, h, w) -> (B, 3, h*2^(L-1), w*2^(L-1)); levels stored as ``up.{i}`` with encoder indices."""

    def __init__(self, ch: int = 160, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 z_channels: int = 32, out_channels: int = 3, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        last = len(ch_mult) - 1
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], using_mid_sa)
        # level i reads the width of level i+1 (or its own at the top) and upsamples unless i == 0
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, last)], widths[i], num_res_blocks + 1, using_sa and i == last,
                  Upsample if i != 0 else None)
            for i in range(len(ch_mult))
        )
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder(s).

    ``quantize`` is any :class:`arsr.interfaces.Quantizer` (multi-scale VQ, hierarchical RQ,
    BSQ). Images are in [-1, 1]. ``quant_conv_ks=0`` drops the two 1-layer convs around the
    quantizer (Infinity's BSQ-VAE has none); ``using_sa`` / ``using_mid_sa`` switch the level
    and middle attention (VAR: both on; Infinity: both off). ``weights``: a ``.safetensors`` file
    of this tokenizer, loaded at construction (written by ``tools/convert.py`` from an official
    checkpoint, or a TokenizerFinetune export, whose ``tokenizer.`` key prefix is accepted).
    """

    def __init__(self, quantizer: Quantizer, ch: int = 160, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, using_sa: bool = True, using_mid_sa: bool = True, quant_conv_ks: int = 3,
                 weights: str | None = None):
        super().__init__()
        z = quantizer.dim
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z, using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.build_decoders(quantizer, lambda: Decoder(ch, ch_mult, num_res_blocks, z, using_sa=using_sa, using_mid_sa=using_mid_sa))
        self.quantize = quantizer
        conv = lambda: nn.Conv2d(z, z, quant_conv_ks, padding=quant_conv_ks // 2) if quant_conv_ks else nn.Identity()
        self.quant_conv, self.post_quant_conv = conv(), conv()
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.weights = weights
        if weights:
            self.load(weights)

    def load(self, path: str) -> None:
        """Load this tokenizer's weights from a ``.safetensors`` file (every tensor must match)."""
        from arsr.checkpoint import load_into, load_weights

        load_into(self, load_weights(path), f"tokenizer weights={path}")

    def build_decoders(self, quantizer: Quantizer, make) -> None:
        """Create the decoder(s); ``make()`` builds one."""
        self.decoder = make()

    def encode(self, img: Tensor) -> Tensor:
        """(B, 3, H, W) -> f (B, z, H/16, W/16), before quantisation."""
        return self.quant_conv(self.encoder(img))

    def final_latent(self, f: Tensor) -> Tensor:
        """The latent the full-size output decodes from, given what :meth:`encode` returned."""
        return f

    def decode(self, f_hat: Tensor) -> Tensor:
        """f_hat (B, z, h, w) -> image (B, 3, 16h, 16w) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def forward(self, img: Tensor, **quant_kwargs) -> tuple[Tensor, QuantOutput]:
        out = self.quantize(self.encode(img), **quant_kwargs)
        return self.decode(out.f_hat), out

    def img_to_indices(self, img: Tensor) -> list[Tensor]:
        return self.quantize.f_to_indices(self.encode(img))

    def indices_to_img(self, indices: list[Tensor]) -> Tensor:
        return self.decode(self.quantize.indices_to_fhat(indices))


class HierarchicalVQVAE(VQVAE):
    """MSVAR's tokenizer: one encoder, a hierarchical RQ, and one decoder per output scale.

    ``encode`` returns one feature map per target scale, each from the image resized to that
    scale (bicubic, antialiased); ``decode`` picks the decoder matching the latent side.
    Weights of a single-decoder VQVAE (``decoder.*``, e.g. Switti's) load into every decoder.
    """

    def build_decoders(self, quantizer: Quantizer, make) -> None:
        self.target_sides = tuple(quantizer.target_sides)
        self.decoders = nn.ModuleList(make() for _ in self.target_sides)

    def encode(self, img: Tensor) -> list[Tensor]:
        feats = []
        for side in self.target_sides:
            px = side * self.downsample
            x = img if img.shape[-1] == px else F.interpolate(img, size=(px, px), mode="bicubic", antialias=True)
            feats.append(self.quant_conv(self.encoder(x)))
        return feats

    def final_latent(self, f: list[Tensor]) -> Tensor:
        return f[-1]

    def decode(self, f_hat: Tensor) -> Tensor:
        """Decoder of the scale whose latent side f_hat has; larger latents (tiled canvases) use the
        full-resolution decoder."""
        side = min(f_hat.shape[-2:])
        if side in self.target_sides:
            n = self.target_sides.index(side)
        elif side > self.target_sides[-1]:
            n = len(self.target_sides) - 1
        else:
            raise ValueError(f"no decoder for latent side {side}; target sides are {self.target_sides}")
        return self.decoders[n](self.post_quant_conv(f_hat)).clamp(-1, 1)

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Single-decoder weights -> the same decoder weights for every scale."""
        if any(k.startswith("decoders.") for k in state):
            return state
        out = {k: v for k, v in state.items() if not k.startswith("decoder.")}
        for n in range(len(self.target_sides)):
            out |= {f"decoders.{n}.{k[len('decoder.'):]}": v for k, v in state.items() if k.startswith("decoder.")}
        return out
