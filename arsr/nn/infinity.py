"""Infinity's text-conditioned bitwise next-scale transformer (the NSARM backbone).

Differences from the VAR backbone (:mod:`arsr.nn.transformer`): the condition is a caption's
Flan-T5 tokens, not a class. They are RMS-normalised (``text_norm``), pooled by one learned query
(``text_proj_for_sos``) into ``cond`` (B, C) -- the start token (+ ``pos_start``) and the AdaLN
condition -- and projected (``text_proj_for_ca``) into keys / values of a cross-attention in every
block. AdaLN is shared (``shared_ada_lin`` + per-block ``ada_gss``); positions are 2-D RoPE
expressed on the final map of the 1M schedule; the level embedding is added once, before the
first block. Names follow the official module tree except that blocks are ``blocks.{i}`` (the
official ``block_chunks.{c}.module.{j}`` are mapped by :mod:`arsr.convert`).

Sequence: ``[start token][scale 2 inputs] ... [scale K inputs]``; scale k's positions predict
scale k's bits. Sampling goes through :func:`arsr.sampling.sample_scales`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from torch import Tensor, nn

from arsr import schedules
from arsr.interfaces import Head, Layout, TextConditioning
from arsr.nn.attention import AttentionImpl, block_causal_mask
from arsr.nn.transformer import FFN, SelfAttention, residual_stream
from arsr.sampling import StepState, caching, cfg_pair


def infinity_rope(schedule: schedules.Schedule, head_dim: int, theta: float = 10000.0, grid: int = 128) -> Tensor:
    """(L, head_dim / 2) complex rotations of Infinity's 2-D RoPE (``rope2d_normalized_by_hw=2``).

    A token at (i, j) of an h x w map sits at (round(i * H / h), round(j * W / w)) on the final
    map (H, W) of the 1M schedule of the same aspect; pair n < head_dim / 4 rotates by
    row * f_n, pair head_dim / 4 + n by col * f_n, f_n = theta^(-2n / (head_dim / 2)).
    """
    half, cpu = head_dim // 2, torch.device("cpu")
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.int64, device=cpu).float() / half)  # (half / 2,)
    along = torch.outer(torch.arange(grid, device=cpu).float(), inv_freq)  # (grid, half / 2): angle of coordinate t
    H, W = schedules.rope_grid(schedule)
    angles = []
    for h, w in schedule:
        rows = (torch.arange(h, device=cpu) * (H / h)).round().long()
        cols = (torch.arange(w, device=cpu) * (W / w)).round().long()
        a = torch.cat([along[rows][:, None].expand(h, w, -1), along[cols][None].expand(h, w, -1)], dim=-1)
        angles.append(a.reshape(h * w, half))
    a = torch.cat(angles)
    return torch.complex(torch.cos(a), torch.sin(a))


class TextCrossAttention(nn.Module):
    """Attention from queries to caption tokens (keys / values from ``mat_kv`` with a v-only bias).

    ``pool=True``: Infinity's attentive pool: one learned query per head (``mat_q`` parameter).
    """

    def __init__(self, width: int, kv_dim: int, heads: int, pool: bool = False):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        if pool:
            self.mat_q = nn.Parameter(torch.empty(1, heads, self.head_dim))
            nn.init.trunc_normal_(self.mat_q, std=math.sqrt(1 / width / 3))
        else:
            self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_dim, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor | None, text: Tensor, mask: Tensor) -> Tensor:
        """x (B, N, C) or None (pool), text (B, T, kv_dim), mask (B, T) True = real -> (B, N, C) / (B, 1, C)."""
        kv = F.linear(text, self.mat_kv.weight, torch.cat([self.zero_k_bias, self.v_bias]))
        k, v = rearrange(kv, "b t (two h d) -> two b h t d", two=2, h=self.heads)
        if isinstance(self.mat_q, nn.Parameter):
            q = rearrange(self.mat_q, "1 h d -> 1 h 1 d").expand(text.shape[0], -1, -1, -1).to(kv.dtype)
        else:
            q = rearrange(self.mat_q(x), "b n (h d) -> b h n d", h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttnBlock(nn.Module):
    """x += g1 SA(LN(x)(1+s1)+b1); x += CA(ca_norm(x), text); x += g2 FFN(LN(x)(1+s2)+b2)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float, eps: float):
        super().__init__()
        self.sa = SelfAttention(width, heads, l2_norm=True)
        self.ca = TextCrossAttention(width, width, heads)
        self.ca_norm = nn.LayerNorm(width, eps=eps)
        self.ffn = FFN(width, hidden=round(width * mlp_ratio / 256) * 256)
        self.ln_wo_grad = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, gss: Tensor, text: tuple[Tensor, Tensor], mask: Tensor | None, rope: Tensor) -> Tensor:
        # gss (B, 1, 6, C): gamma1, gamma2, scale1, scale2, shift1, shift2
        g1, g2, s1, s2, b1, b2 = (self.ada_gss + gss).unbind(2)
        # branches join the residual in its dtype: fp32 as official, bf16 with residual_bf16
        x = x + self.drop_path(self.sa(self.ln_wo_grad(x.float()) * (1 + s1) + b1, mask, rope) * g1).to(x.dtype)
        x = x + self.ca(self.ca_norm(x), *text).to(x.dtype)
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x.float()) * (1 + s2) + b2) * g2).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """Computed in fp32, returned in the input dtype (Infinity's ``text_norm``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


class InfinityTransformer(nn.Module):
    """Infinity (text-to-image bitwise next-scale AR), as NSARM fine-tunes it.

    Args:
        head: output head (default: the bitwise classifier over ``token_dim`` bits).
        text: caption encoder (Flan-T5, :class:`arsr.components.conditioning.T5TextEncoder`); None
            when features are always passed in (tests, cached features).
        token_dim: bits per token (32 for d32 tokenizers, 56 for Infinity-8B's patchified d56);
            None: the tokenizer's, when the task binds it (the input projection and head wait till then).
        text_channels: width of the caption features (Flan-T5-XL: 2048); a multiple of 128.
        text_maxlen: rows of the learned null caption ``cfg_uncond`` (512).
        depth, width, heads, mlp_ratio: sizes (``infinity_2b``: 32, 2048, 16, 4).
        cond_drop: probability that a training caption is replaced by ``cfg_uncond`` (CFG).
        drop_path: stochastic depth rising linearly from 0 to this over the blocks.
        init_adaln, init_adaln_gamma, init_head: Infinity's ``aln``, ``alng``, ``hd0``.
        schedule: the default scale schedule; the task re-binds it to the tokenizer's.
        residual_bf16: under bf16 autocast, carry the residual stream in bf16 (Infinity keeps it fp32).
        attention: training attention kernel: ``sdpa`` (per scale chunk), ``flex`` (BlockMask), ``auto`` (flex on CUDA).
    """

    def __init__(
        self,
        head: Head | None = None,
        text: TextConditioning | None = None,
        token_dim: int | None = None,
        text_channels: int = 2048,
        text_maxlen: int = 512,
        depth: int = 32,
        width: int = 2048,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        cond_drop: float = 0.1,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        rope_theta: float = 10000.0,
        init_adaln: float = 1e-3,
        init_adaln_gamma: float = 5e-6,
        init_head: float = 0.02,
        schedule: schedules.ScheduleSpec = "1M",
        residual_bf16: bool = False,
        attention: AttentionImpl = "auto",
    ):
        super().__init__()
        self.attention, self.residual_bf16 = attention, residual_bf16
        if text_channels % 128:
            raise ValueError(f"text_channels {text_channels} must be a multiple of 128 (the text pool has text_channels / 128 heads)")
        if text is not None and text.dim != text_channels:
            raise ValueError(f"text encoder gives {text.dim}-d features but text_channels is {text_channels}")
        if width % heads or (width // heads) % 4:
            raise ValueError(f"width {width} / heads {heads} must give a head_dim divisible by 4 (2-D RoPE)")
        self.width, self.heads, self.token_dim, self.cond_drop, self.rope_theta = width, heads, token_dim, cond_drop, rope_theta
        self.text = text
        cfg_uncond = torch.empty(text_maxlen, text_channels)
        if not cfg_uncond.is_meta:  # Infinity's fixed draw (seed 0), whatever the global seed
            nn.init.trunc_normal_(cfg_uncond, std=1.2, generator=torch.Generator().manual_seed(0))
        self.cfg_uncond = nn.Parameter(cfg_uncond / text_channels**0.5)
        self.text_norm = RMSNorm(text_channels, eps=norm_eps)
        pool_head_dim = 64 if width > 4096 else 128
        self.text_proj_for_sos = nn.Module()
        self.text_proj_for_sos.ca = TextCrossAttention(width, text_channels, text_channels // pool_head_dim, pool=True)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(text_channels, width), nn.GELU(approximate="tanh"), nn.Linear(width, width))
        self.pos_start = nn.Parameter(torch.empty(1, 1, width))
        self.lvl_embed = nn.Embedding(15, width)
        if token_dim is not None:
            self.word_embed = nn.Linear(token_dim, width)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(CrossAttnBlock(width, heads, mlp_ratio, r, norm_eps) for r in rates)
        if head is None:
            from arsr.components.heads import BitwiseHead

            head = BitwiseHead(bits=token_dim)
        self.head = head
        self._init = (init_adaln, init_adaln_gamma, init_head)
        self.bind_schedule(schedules.resolve(schedule))
        if token_dim is not None:
            head.bind(self.layout)
        self.init_weights(*self._init)

    def bind_tokens(self, layout: Layout) -> None:
        """Create and initialise what the token width sizes, once the tokenizer gives it: the input
        projection and the head (as :meth:`init_weights` does at construction)."""
        self.token_dim = layout.latent_dim
        self.word_embed = nn.Linear(self.token_dim, self.width)
        self.head.bind(layout)
        for part in (self.word_embed, self.head):
            self.init_layers(part, math.sqrt(1 / (3 * self.width)))
        self.head.init_weights(self._init[2], self._init[0])

    # -- sizes ------------------------------------------------------------------------------------
    def bind_schedule(self, schedule: schedules.Schedule) -> None:
        """Use this (transformer-space) schedule: levels, block-causal mask and RoPE follow it."""
        if len(schedule) > self.lvl_embed.num_embeddings:
            raise ValueError(f"schedule has {len(schedule)} scales; Infinity's level embedding has {self.lvl_embed.num_embeddings}")
        self.schedule = tuple(schedule)
        self.layout = Layout(self.width, self.heads, self.token_dim or 0, self.schedule, token_kind="bits")  # token width 0: not bound yet
        self.bounds = [sum(h * w for h, w in schedule[:k]) for k in range(len(schedule) + 1)]
        levels = torch.cat([torch.full((h * w,), i, device="cpu") for i, (h, w) in enumerate(schedule)])
        self.register_buffer("lvl_1L", levels, persistent=False)
        self.levels = tuple(levels.tolist())  # host copy: the attention plan is built without reading the device
        self.rope = infinity_rope(self.schedule, self.width // self.heads, self.rope_theta)  # derived, never saved

    def bind(self, quantizer, stride: int | None = None) -> None:
        """Take the tokenizer's schedule (and its downsampling ``stride``) and check its token width and the head."""
        if self.token_dim is not None and quantizer.token_dim != self.token_dim:
            raise ValueError(f"InfinityTransformer token_dim {self.token_dim} != the tokenizer's {quantizer.token_dim} bits per token")
        tokens = Layout.of(quantizer, self.width, self.heads, stride=stride)
        self.head.check_tokens(tokens)
        self.bind_schedule(quantizer.schedule)
        self.layout = tokens
        if not hasattr(self, "word_embed"):
            self.bind_tokens(self.layout)

    def _apply(self, fn, recurse: bool = True):  # keep the complex RoPE table on the module's device
        moved = fn(self.rope)
        self.rope = moved if moved.is_complex() else self.rope.to(moved.device)
        return super()._apply(fn, recurse)

    @property
    def image_len(self) -> int:
        return self.bounds[-1]

    # -- initialisation (Infinity's train.py: init_weights + special_init) -------------------------
    @torch.no_grad()
    def init_weights(self, init_adaln: float, init_adaln_gamma: float, init_head: float) -> None:
        std = math.sqrt(1 / (3 * self.width))
        self.init_layers(self, std)
        nn.init.trunc_normal_(self.pos_start, std=std)
        scale = 1 / math.sqrt(2 * len(self.blocks))
        for block in self.blocks:
            for lin in (block.sa.proj, block.ca.proj, block.ffn.fc2):
                lin.weight.mul_(scale)
            block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            block.ada_gss[:, :, 2:].mul_(init_adaln)
        if self.token_dim is not None:  # else the head waits for the tokenizer (bind_tokens)
            self.head.init_weights(init_head, init_adaln)

    @staticmethod
    @torch.no_grad()
    def init_layers(module: nn.Module, std: float) -> None:
        """Infinity's init of every Linear / Embedding (truncated normal, zero bias) and LayerNorm in ``module``."""
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- condition ----------------------------------------------------------------------------------
    def encode_text(self, n: int, captions: list[str] | None = None, text: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The n captions (see :meth:`TextConditioning.captions`), or precomputed (features (n, T,
        text_channels), mask (n, T)) -> the same pair."""
        if text is not None:
            return text
        if self.text is None:
            raise ValueError("InfinityTransformer needs a text encoder (text: ...), or precomputed text features")
        feats, mask, _ = self.text(self.text.captions(captions, n))
        return feats, mask

    def uncond_text(self, feats: Tensor, mask: Tensor) -> Tensor:
        """The null caption: the first rows of ``cfg_uncond`` in place of each caption's tokens."""
        T = feats.shape[1]
        if T > self.cfg_uncond.shape[0]:
            raise ValueError(f"caption of {T} tokens is longer than cfg_uncond ({self.cfg_uncond.shape[0]} rows)")
        return torch.where(mask[..., None], self.cfg_uncond[:T].to(feats.dtype), feats)

    def condition(self, feats: Tensor, mask: Tensor, drop: Tensor | None = None) -> StepState:
        """Caption features -> pooled condition, AdaLN modulation and cross-attention keys / values.
        ``drop`` (B,) bool replaces those samples' captions by the null caption."""
        if drop is not None:
            feats = torch.where(drop[:, None, None], self.uncond_text(feats, mask), feats)
        feats = self.text_norm(feats.float())
        cond = self.text_proj_for_sos.ca(None, feats, mask)[:, 0].float()  # (B, C)
        kv = self.text_proj_for_ca(feats)
        gss = rearrange(self.shared_ada_lin(cond), "b (six c) -> b 1 six c", six=6)
        return StepState(cond=cond, extra={"gss": gss, "text": (kv, mask)})

    def start_tokens(self, state: StepState) -> Tensor:
        """(B, 1, C): the start token of scale 1."""
        return state.cond[:, None] + self.pos_start

    # -- blocks -------------------------------------------------------------------------------------
    def run_blocks(self, x: Tensor, state: StepState, start: int, mask: Tensor | None) -> Tensor:
        """x (B, N, C) at sequence positions [start, start + N) -> hidden states (B, N, C)."""
        x = x + self.lvl_embed(self.lvl_1L[start : start + x.shape[1]])
        rope = self.rope[start : start + x.shape[1]]
        x = residual_stream(x, self.residual_bf16)
        for block in self.blocks:
            x = block(x, state.extra["gss"], state.extra["text"], mask, rope)
        return x

    def embed(self, inputs: Tensor) -> Tensor:
        """Next-scale inputs (B, N, token_dim) -> (B, N, C)."""
        if self.token_dim is None:
            raise RuntimeError("InfinityTransformer has no token width yet: give token_dim, or bind it to its tokenizer "
                               "(bind(quantizer); ARFinetune does)")
        return self.word_embed(inputs.float())

    def forward(self, label: Tensor | None, inputs: Tensor, prefix_input: Tensor | None = None, return_hidden: bool = False,
                captions: list[str] | None = None, text: tuple[Tensor, Tensor] | None = None):
        """Teacher-forced logits (B, L, token_dim, 2) for inputs (B, L - 1, token_dim) of scales 2..K.
        ``label`` and ``prefix_input`` are accepted for the task's common call and unused: the
        condition is the caption (``captions`` through the encoder, or ``text`` features)."""
        feats, mask = self.encode_text(inputs.shape[0], captions, text)
        drop = None
        if self.training and self.cond_drop > 0:
            drop = torch.rand(feats.shape[0], device=feats.device) < self.cond_drop
        state = self.condition(feats, mask, drop)
        x = torch.cat([self.start_tokens(state), self.embed(inputs)], dim=1)
        h = self.run_blocks(x, state, 0, block_causal_mask(self.levels, self.attention, x.dtype, x.device))
        logits = self.head(h, state.cond)
        return (logits, h) if return_hidden else logits

    # -- sampling (arsr.sampling's backbone protocol) --------------------------------------------
    def begin(self, batch_size: int, guided: bool, captions: list[str] | None = None, text: tuple[Tensor, Tensor] | None = None,
              **_) -> StepState:
        """Condition for sampling; with guidance the batch doubles as [captions; null captions]."""
        feats, mask = self.encode_text(batch_size, captions, text)
        if guided:
            feats, mask = cfg_pair(feats, self.uncond_text(feats, mask)), cfg_pair(mask)
        return self.condition(feats, mask)

    def guidance(self, cfg: float, si: int, num_scales: int) -> float:
        """Infinity's CFG on logits: cfg * cond + (1 - cfg) * uncond, i.e. weight cfg - 1 (cfg 1 = off)."""
        return cfg - 1.0

    def step(self, x: Tensor, si: int, state: StepState) -> Tensor:
        """Hidden states of scale si's tokens: through the KV cache, or (cache off) by recomputing
        the whole sequence so far under the block-causal mask."""
        if self.blocks[0].sa.cache is not None:
            return self.run_blocks(x, state, self.bounds[si], None)
        seq = state.extra.setdefault("seq", [])
        seq.append(x)
        x_all = torch.cat(seq, dim=1)
        L = x_all.shape[1]
        return self.run_blocks(x_all, state, 0, block_causal_mask(self.levels[:L], "sdpa", x.dtype, x.device))[:, -x.shape[1]:]

    def kv_cache(self):
        return caching([block.sa for block in self.blocks], len(self.levels))
