"""The next-scale autoregressive transformer (VAR / VARSR / MSVAR / NSARM backbone).

GPT-2-style pre-norm blocks whose LayerNorms are modulated by the condition vector
(AdaLN: six values per block), attention with L2-normalised q/k and a learned per-head
temperature, a block-causal mask by scale, and a KV cache for sampling. Module and parameter
names follow the official VAR code (``blocks.{i}.attn.mat_qkv``, ``ada_lin.1``, ``class_emb``,
``lvl_embed``, ``pos_start``, ``word_embed``), so official checkpoints convert by moving a
handful of keys into the components that own them (see :mod:`arsr.convert`).

Sequence: ``[prefix][scale 1 start tokens][scale 2 inputs] ... [scale K inputs]``; the
positions of scale k's tokens predict scale k (the start tokens predict scale 1).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath
from torch import Tensor, nn

from arsr.interfaces import Conditioning, Head, Layout, PositionalEncoding, Quantizer, TextConditioning
from arsr.nn.attention import AttentionImpl, attend, block_causal_mask
from arsr.sampling import KVCache, StepState, caching, cfg_pair, sample_scales


def apply_rotary(x: Tensor, freqs: Tensor) -> Tensor:
    """x (B, H, N, d), freqs (N, d/2) complex: rotate adjacent channel pairs (2n, 2n+1)."""
    xc = torch.view_as_complex(rearrange(x.float(), "... (n two) -> ... n two", two=2).contiguous())
    return rearrange(torch.view_as_real(xc * freqs), "... n two -> ... (n two)").type_as(x)


def residual_stream(x: Tensor, bf16: bool) -> Tensor:
    """The residual stream's dtype: under bf16 autocast, bf16 when asked (less activation memory);
    otherwise as it comes (fp32 under autocast, as VAR and Infinity keep it)."""
    dev = x.device.type
    if bf16 and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
        return x.to(torch.bfloat16)
    return x


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, l2_norm: bool = True):
        super().__init__()
        self.heads, self.head_dim, self.l2_norm = heads, width // heads, l2_norm
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)
        self.cache: KVCache | None = None  # set while sampling with a KV cache

    def forward(self, x: Tensor, mask: Tensor | None, rope: Tensor | None) -> Tensor:
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        q, k, v = rearrange(F.linear(x, self.mat_qkv.weight, bias), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if self.l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp(max=math.log(100.0)).exp()
            k, scale = F.normalize(k, dim=-1), 1.0
        else:
            scale = 0.25 / math.sqrt(self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if self.cache is not None:  # sampling: attend to every earlier scale through the cache
            k, v = self.cache.extend(k, v)
        out = attend(q, k, v, mask, scale)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys / values from text features (Infinity's ``ca``)."""

    def __init__(self, width: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(kv_dim, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, feats: Tensor, key_mask: Tensor) -> Tensor:
        q = rearrange(self.mat_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.mat_kv(feats.to(x.dtype)), "b t (two h d) -> two b h t d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class FFN(nn.Module):
    def __init__(self, width: int, ratio: float = 4.0, hidden: int | None = None):
        super().__init__()
        hidden = hidden or round(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNBlock(nn.Module):
    """x += gamma1 * Attn(LN(x)(1 + scale1) + shift1); x += gamma2 * FFN(LN(x)(1 + scale2) + shift2)."""

    def __init__(self, width: int, cond_dim: int, heads: int, drop_path: float = 0.0, l2_norm: bool = True,
                 text_dim: int | None = None, shared_aln: bool = False):
        super().__init__()
        self.attn = SelfAttention(width, heads, l2_norm)
        if text_dim is not None:  # Infinity: text cross-attention between self-attention and FFN
            self.ca_norm = nn.LayerNorm(width, eps=1e-6)
            self.ca = CrossAttention(width, text_dim, heads)
        self.ffn = FFN(width)
        self.ln_wo_grad = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        if shared_aln:  # VAR-d36: the transformer's shared_ada_lin output + this per-block offset
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def modulation(self, cond: Tensor) -> tuple[Tensor, ...]:
        """The AdaLN values of a condition, each (B, 1, C): gamma1, gamma2, 1 + scale1, 1 + scale2,
        shift1, shift2 (VAR's order, scales offset by one once here rather than at every call).
        With shared AdaLN ``cond`` is already the shared modulation (B, 1, 6, C)."""
        ada = cond + self.ada_gss if hasattr(self, "ada_gss") else rearrange(self.ada_lin(cond), "b (six c) -> b 1 six c", six=6)
        g1, g2, s1, s2, b1, b2 = rearrange(ada, "b 1 six c -> six b 1 c")
        return g1, g2, 1 + s1, 1 + s2, b1, b2

    def forward(self, x: Tensor, ada: tuple[Tensor, ...], mask: Tensor | None, rope: Tensor | None,
                text: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, N, C); ada: this block's :meth:`modulation`."""
        g1, g2, scale1, scale2, b1, b2 = ada
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x) * scale1 + b1, mask, rope) * g1)
        if text is not None:
            x = x + self.ca(self.ca_norm(x), *text)
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x) * scale2 + b2) * g2)


class NextScaleTransformer(nn.Module):
    """VAR-family transformer.

    Args:
        depth: number of blocks; width defaults to 64 * depth and heads to depth (VAR's rule).
        latent_dim: channels of the tokenizer latent (word_embed input); None: the tokenizer's (VAR's 32
            when ``patch_nums`` is given).
        patch_nums: token-map sides per scale; None: the tokenizer's (recipes state the schedule once,
            on the quantizer). Given, they are checked against the tokenizer.
        num_classes: rows of ``class_emb`` (VAR 1001 with the null class 1000; VARSR 2 quality
            classes; MSVAR 3: degraded / non-degraded / class-free).
        cond_drop: probability that a training label is replaced by ``null_class`` (CFG).
        null_class: the label that means "no condition" (None: no label dropout).
        pos_enc: positional encoding component (absolute per scale, learned resampled, SA-RoPE, ...).
        conditioning: LR conditioning component producing prefix tokens (None: no prefix).
        text: caption / prompt encoder; adds cross-attention to every block and its pooled
            feature to the condition vector (Infinity-style). Dropped to the empty prompt with
            the labels (cond_drop) and used as the negative branch of CFG.
        head: output head component (index classifier or bitwise classifier).
        drop_path: stochastic depth at the last block (None: VAR's 0.1 * depth / 24).
        init_adaln_gamma: scale of the AdaLN gamma rows at init (VAR's --alng).
        shared_aln: one AdaLN projection shared by all blocks plus a learned per-block offset
            (VAR-d36's ``shared_ada_lin`` / ``ada_gss``).
        residual_bf16: under bf16 autocast, carry the residual stream between blocks in bf16 instead
            of fp32 (less activation memory and traffic; VAR keeps it fp32, the default).
        attention: training attention kernel: ``sdpa`` (SDPA per scale chunk), ``flex``
            (FlexAttention BlockMask), ``auto`` (flex on CUDA).
    """

    def __init__(
        self,
        pos_enc: PositionalEncoding,
        head: Head,
        conditioning: Conditioning | None = None,
        text: TextConditioning | None = None,
        depth: int = 16,
        width: int | None = None,
        heads: int | None = None,
        latent_dim: int | None = None,
        patch_nums: tuple[int, ...] | None = None,
        num_classes: int = 1001,
        cond_drop: float = 0.1,
        null_class: int | None = 1000,
        drop_path: float | None = None,
        attn_l2_norm: bool = True,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        shared_aln: bool = False,
        residual_bf16: bool = False,
        attention: AttentionImpl = "auto",
    ):
        super().__init__()
        self.attention, self.residual_bf16 = attention, residual_bf16
        width = width or 64 * depth
        heads = heads or depth
        self.width, self.heads = width, heads
        if null_class is not None and not 0 <= null_class < num_classes:
            raise ValueError(f"null_class {null_class} is not a row of class_emb (num_classes={num_classes})")
        self.cond_drop, self.null_class, self.num_classes = cond_drop, null_class, num_classes
        self.class_emb = nn.Embedding(num_classes, width)
        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.conditioning = conditioning
        self.pos_enc = pos_enc
        dp = 0.1 * depth / 24 if drop_path is None else drop_path
        self.text = text
        if text is not None:
            self.text_proj = nn.Linear(text.dim, width)
        text_dim = text.dim if text is not None else None
        self.blocks = nn.ModuleList(AdaLNBlock(width, width, heads, r, attn_l2_norm, text_dim, shared_aln)
                                    for r in (dp * i / max(depth - 1, 1) for i in range(depth)))  # linearly rising drop-path
        self.head = head
        self._init = (init_adaln, init_adaln_gamma, init_head)
        if patch_nums is not None:  # built now (official layouts, conversion); checked against the tokenizer later
            self.build(Layout(self.width, self.heads, 32 if latent_dim is None else latent_dim, tuple((p, p) for p in patch_nums)))

    def build(self, sizes: Layout) -> None:
        """Create the schedule-dependent parts (start tokens, level table, input projection, and the
        components' own, each through ``bind(layout)``) for these token sizes, then initialise every weight."""
        prefix = self.conditioning.prefix_grids if self.conditioning else ()
        L = self.layout = dataclasses.replace(sizes, width=self.width, heads=self.heads, prefix_grids=tuple(prefix))
        self.pos_start = nn.Parameter(torch.empty(1, L.first_len, self.width))
        self.word_embed = nn.Linear(L.latent_dim, self.width)
        self.lvl_embed = nn.Embedding(len(L.schedule), self.width)
        levels = L.levels()
        self.register_buffer("lvl_1L", levels[None], persistent=False)
        self.levels = tuple(levels.tolist())  # host copy: the attention plan is built without reading the device
        for component in (self.pos_enc, self.conditioning):
            if component is not None:
                component.bind(L)
        self.head.bind(L)
        self.init_weights(*self._init)

    def bind(self, quantizer: Quantizer, stride: int | None = None) -> None:
        """Take the tokenizer's schedule, latent width and tokens (the head its vocabulary or bits),
        or check them against those this transformer was built with; ``stride``: the tokenizer's
        downsampling (components that read pixels, like an LR encoder, check their sizes with it)."""
        tokens = Layout.of(quantizer, stride=stride)
        if not hasattr(self, "layout"):
            return self.build(tokens)
        if self.layout.schedule != tokens.schedule:
            raise ValueError(f"transformer patch_nums {self.layout.patch_nums} != tokenizer's {quantizer.patch_nums}"
                             if all(h == w for h, w in tokens.schedule) else
                             f"transformer schedule {self.layout.schedule} != tokenizer's {tokens.schedule}")
        if self.layout.latent_dim != tokens.latent_dim:
            raise ValueError(f"transformer latent_dim {self.layout.latent_dim} != the tokenizer's {tokens.latent_dim}")
        self.head.check_tokens(tokens)
        self.layout = dataclasses.replace(self.layout, token_kind=tokens.token_kind, vocab_size=tokens.vocab_size,
                                          vae_dim=tokens.vae_dim, vae_schedule=tokens.vae_schedule, stride=stride)

    # -- initialisation (VAR's recipe) ------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_adaln: float, init_adaln_gamma: float, init_head: float) -> None:
        std = math.sqrt(1 / (3 * self.layout.width))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
            elif isinstance(m, nn.Conv2d):  # VAR's conv_std_or_gain 0.02 (VARSR's LR encoder)
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_start, std=std)
        depth, width = len(self.blocks), self.layout.width
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if hasattr(block, "ada_gss"):
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                w = block.ada_lin[-1].weight
                w[2 * width :].mul_(init_adaln)
                w[: 2 * width].mul_(init_adaln_gamma)
        self.head.init_weights(init_head, init_adaln)

    # -- sequence assembly ------------------------------------------------------------------
    def condition(self, label: Tensor, captions: list[str] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Labels (B,) [+ captions] -> cond (B, C) and text features for cross-attention. In training,
        with prob cond_drop a sample's label drops to ``null_class`` and its caption to ''."""
        if self.training and self.cond_drop > 0:
            drop = torch.rand(label.shape, device=label.device) < self.cond_drop
            if self.null_class is not None:
                label = torch.where(drop, torch.full_like(label, self.null_class), label)
            if captions is not None:
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        cond = self.class_emb(label)
        if self.text is None:
            return cond, None
        feats, mask, pooled = self.text(captions)
        return cond + self.text_proj(pooled), (feats, mask)

    def first_block(self, cond: Tensor, prefix: Tensor | None) -> Tensor:
        """(B, first_len, C): prefix tokens + start tokens (the class embedding) + pos_start."""
        h, w = self.layout.schedule[0]
        start = cond[:, None].expand(-1, h * w, -1)
        x = start if prefix is None else torch.cat([prefix, start], dim=1)
        return x + self.pos_start

    def _add_position(self, x: Tensor, start: int) -> Tensor:
        """Level and absolute embeddings for sequence positions [start, start + N)."""
        end = start + x.shape[1]
        x = x + self.lvl_embed(self.lvl_1L[0, start:end])
        p0 = self.layout.prefix_len  # additive embeddings cover image positions only
        add = self.pos_enc.additive(max(start, p0) - p0, end - p0) if end > p0 else None
        if add is not None:
            x = torch.cat([x[:, : max(p0 - start, 0)], x[:, max(p0 - start, 0) :] + add], dim=1)
        return x

    def modulations(self, cond: Tensor) -> list[tuple[Tensor, ...]]:
        """Every block's AdaLN modulation of the condition (B, D): once per forward, and once per
        sampling run, since the condition is the same at every scale."""
        if hasattr(self, "shared_ada_lin"):
            cond = rearrange(self.shared_ada_lin(cond), "b (six c) -> b 1 six c", six=6)
        return [block.modulation(cond) for block in self.blocks]

    def run_blocks(self, x: Tensor, ada: list[tuple[Tensor, ...]], start: int, mask, text=None) -> Tensor:
        rope = self.pos_enc.rotary(start, start + x.shape[1])
        x = residual_stream(x, self.residual_bf16)
        for block, a in zip(self.blocks, ada):
            x = block(x, a, mask, rope, text)
        return x

    # -- teacher-forced forward -------------------------------------------------------------
    def forward(self, label: Tensor, inputs: Tensor, prefix_input: Tensor | None = None, return_hidden: bool = False,
                captions: list[str] | None = None):
        """label (B,), inputs (B, L - pn1^2, latent_dim) teacher-forcing inputs, prefix_input: LR for
        the conditioning, captions for the text encoder -> logits for every image position (B, L, ...)
        (and hidden states (B, L, C))."""
        cond, text = self.condition(label, None if self.text is None else self.text.captions(captions, label.shape[0]))
        prefix = self.conditioning(prefix_input) if self.conditioning is not None else None
        x = torch.cat([self.first_block(cond, prefix), self.word_embed(inputs.to(self.word_embed.weight.dtype))], dim=1)
        x = self._add_position(x, 0)
        mask = block_causal_mask(self.levels, self.attention, x.dtype, x.device)
        h = self.run_blocks(x, self.modulations(cond), 0, mask, text)[:, self.layout.prefix_len :]
        logits = self.head(h, cond)
        return (logits, h) if return_hidden else logits

    # -- sampling (arsr.sampling's backbone protocol) -------------------------------------------
    def begin(self, batch_size: int, guided: bool, label: Tensor, prefix_input: Tensor | None = None,
              neg_label: int | None = None, captions: list[str] | None = None) -> StepState:
        """Condition of a sampling run; guidance doubles the batch with ``neg_label`` (default the
        null class), the same LR prefix and the empty prompt."""
        B = batch_size
        if guided:
            neg = self.null_class if neg_label is None else neg_label
            label = cfg_pair(label, torch.full_like(label, neg if neg is not None else 0))
            prefix_input = None if prefix_input is None else cfg_pair(prefix_input)
        if self.text is not None:
            captions = self.text.captions(captions, B) + ([""] * B if guided else [])
        cond, text = self.condition(label, captions)
        prefix = self.conditioning(prefix_input) if self.conditioning is not None else None
        return StepState(cond=cond, extra={"text": text, "first": self.first_block(cond, prefix), "seq": [], "ada": self.modulations(cond)})

    def start_tokens(self, state: StepState) -> Tensor:
        return state.extra["first"]

    def embed(self, inputs: Tensor) -> Tensor:
        return self.word_embed(inputs.to(self.word_embed.weight.dtype))

    def guidance(self, cfg: float, si: int, num_scales: int) -> float:
        """VAR's CFG: (1 + t) cond - t uncond with t rising linearly from 0 (scale 1) to cfg (last)."""
        return cfg * si / max(num_scales - 1, 1)

    def step(self, x: Tensor, si: int, state: StepState) -> Tensor:
        """Hidden states of scale si: through the KV cache, or (cache off) by recomputing the whole
        sequence so far under the block-causal mask."""
        pos = self.layout.scale_start(si)
        x = self._add_position(x, pos)
        h, w = self.layout.schedule[si]
        n = h * w
        if self.blocks[0].attn.cache is not None:
            return self.run_blocks(x, state.extra["ada"], pos, None, state.extra["text"])[:, -n:]
        state.extra["seq"].append(x)
        x_all = torch.cat(state.extra["seq"], dim=1)
        L = x_all.shape[1]
        return self.run_blocks(x_all, state.extra["ada"], 0, block_causal_mask(self.levels[:L], "sdpa", x.dtype, x.device),
                               state.extra["text"])[:, -n:]

    def kv_cache(self):
        return caching([block.attn for block in self.blocks], len(self.levels))

    @torch.no_grad()
    def generate(
        self,
        quantizer: Quantizer,
        label: Tensor,
        prefix_input: Tensor | None = None,
        cfg: float = 0.0,
        neg_label: int | None = None,
        top_k: int | list[int] = 0,
        top_p: float | list[float] = 0.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        return_hidden: bool = False,
        forced: list[Tensor] | None = None,
        captions: list[str] | None = None,
    ):
        """Sample every scale's tokens (see :func:`arsr.sampling.sample_scales`). CFG (cfg > 0) uses
        guided = (1 + t) cond - t uncond with t rising linearly from 0 at scale 1 to cfg at scale K;
        ``forced`` gives the tokens of the first scales instead of sampling them."""
        out = sample_scales(self, quantizer, label.shape[0], cfg=cfg, top_k=top_k, top_p=top_p, temperature=temperature,
                            generator=generator, forced=forced, use_cache=use_cache, label=label, prefix_input=prefix_input,
                            neg_label=neg_label, captions=captions)
        return (out.tokens, out.hidden, out.cond) if return_hidden else out.tokens
