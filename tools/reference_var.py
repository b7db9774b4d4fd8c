"""A plain PyTorch re-statement of VAR's math, the yardstick of ``tools/bench.py paired``.

Written from the facts of the official VAR code (``../shared/reference/var_varsr_facts.md``), in the
way that code computes: one module per official class, official parameter names (so the weights of
an arsr VAR-family backbone load into it unchanged, after the three key moves of
``arsr.convert.VAR_KEYS``), a dense additive block-causal mask, the residual stream in fp32, the
teacher-forcing input built by one incremental walk, KV-cache sampling that concatenates keys per
scale and doubles the batch for CFG. It is a benchmark reference, not part of arsr.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, C: int, H: int):
        super().__init__()
        self.H, self.hd = H, C // H
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(C, C)
        self.caching, self.k, self.v = False, None, None

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        B, L, C = x.shape
        qkv = F.linear(x, self.mat_qkv.weight, torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))).view(B, L, 3, self.H, self.hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(math.log(100)).exp())
        k = F.normalize(k, dim=-1)
        if self.caching:
            if self.k is not None:
                k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
            self.k, self.v = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, C: int, H: int):
        super().__init__()
        self.attn = Attention(C, H)
        self.ffn = nn.Module()
        self.ffn.fc1, self.ffn.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))

    def forward(self, x: Tensor, cond: Tensor, bias: Tensor | None) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.ada_lin(cond).view(-1, 1, 6, x.shape[-1]).unbind(2)
        x = x + self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add_(b1), bias).mul_(g1)
        h = self.ln_wo_grad(x).mul(s2.add(1)).add_(b2)
        return x + self.ffn.fc2(F.gelu(self.ffn.fc1(h), approximate="tanh")).mul(g2)


class HeadNorm(nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return self.ln_wo_grad(x.float()).mul(scale.add(1)).add_(shift)


class MultiScaleVQ(nn.Module):
    """VAR's quantizer: codebook ``embedding`` and the shared Phi convs ``quant_resi.qresi_ls``."""

    def __init__(self, V: int, Cvae: int, patch_nums: tuple[int, ...], phi_of_scale: tuple[int, ...], ratio: float = 0.5):
        super().__init__()
        self.patch_nums, self.phi_of_scale, self.ratio = patch_nums, phi_of_scale, ratio
        self.embedding = nn.Embedding(V, Cvae)
        self.quant_resi = nn.Module()
        self.quant_resi.qresi_ls = nn.ModuleList(nn.Conv2d(Cvae, Cvae, 3, padding=1) for _ in range(max(phi_of_scale) + 1))

    def phi(self, si: int, h: Tensor) -> Tensor:
        return h.mul(1 - self.ratio) + self.quant_resi.qresi_ls[self.phi_of_scale[si]](h).mul_(self.ratio)

    def up(self, idx: Tensor, pn: int) -> Tensor:
        """Codes of one scale (B, pn*pn) -> (B, Cvae, H, W) bicubic-upsampled to the last side."""
        B, H = idx.shape[0], self.patch_nums[-1]
        h = self.embedding(idx).transpose(1, 2).reshape(B, -1, pn, pn)
        return h if pn == H else F.interpolate(h, size=(H, H), mode="bicubic")

    def f_to_idx(self, f: Tensor) -> list[Tensor]:
        """VAR's f_to_idxBl_or_fhat: area-down the residual, nearest code, Phi(up(codes)) off the residual."""
        B, C, H, _ = f.shape
        rest, out = f.detach().float().clone(), []
        emb = self.embedding.weight
        for si, pn in enumerate(self.patch_nums):
            z = (rest if pn == H else F.interpolate(rest, size=(pn, pn), mode="area")).permute(0, 2, 3, 1).reshape(-1, C)
            d = z.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * z @ emb.T
            idx = d.argmin(1).view(B, pn * pn)
            rest.sub_(self.phi(si, self.up(idx, pn)))
            out.append(idx)
        return out

    def idx_to_fhat(self, idx: list[Tensor]) -> Tensor:
        return sum(self.phi(si, self.up(i, pn)) for si, (i, pn) in enumerate(zip(idx, self.patch_nums)))

    def teacher_input(self, idx: list[Tensor]) -> Tensor:
        """VAR's idxBl_to_var_input: one incremental walk, the running f_hat area-down to the next side."""
        f_hat, out = 0, []
        for si, pn in enumerate(self.patch_nums[:-1]):
            f_hat = f_hat + self.phi(si, self.up(idx[si], pn))
            nxt = self.patch_nums[si + 1]
            out.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(out, 1)


class VAR(nn.Module):
    def __init__(self, V: int, Cvae: int, patch_nums: tuple[int, ...], depth: int, C: int, H: int, num_classes: int):
        super().__init__()
        self.patch_nums, self.num_classes, self.C = patch_nums, num_classes, C
        L = sum(p * p for p in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.word_embed = nn.Linear(Cvae, C)
        self.class_emb = nn.Embedding(num_classes, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.lvl_embed = nn.Embedding(len(patch_nums), C)
        self.blocks = nn.ModuleList(Block(C, H) for _ in range(depth))
        self.head_nm = HeadNorm(C)
        self.head = nn.Linear(C, V)
        lvl = torch.cat([torch.full((p * p,), i) for i, p in enumerate(patch_nums)])
        self.register_buffer("lvl_1L", lvl[None], persistent=False)
        self.register_buffer("attn_bias", torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)[None, None], persistent=False)

    def forward(self, label: Tensor, x_wo_first: Tensor) -> Tensor:
        """Teacher-forced logits (B, L, V)."""
        B = label.shape[0]
        cond = self.class_emb(label)
        sos = cond[:, None].expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1)
        x = torch.cat((sos, self.word_embed(x_wo_first.float())), dim=1)
        x = x + self.lvl_embed(self.lvl_1L.expand(B, -1)) + self.pos_1LC
        bias = self.attn_bias.to(x.dtype)
        for b in self.blocks:
            x = b(x, cond, bias)
        return self.head(self.head_nm(x.float(), cond).float()).float()

    @torch.no_grad()
    def sample(self, vq: MultiScaleVQ, label: Tensor, cfg: float, top_k: int, top_p: float, g: torch.Generator) -> list[Tensor]:
        """VAR's autoregressive_infer_cfg: CFG batch doubling with the null class, a KV cache, strength
        rising linearly over the scales, incremental f_hat; returns the tokens of every scale."""
        B, K, H = label.shape[0], len(self.patch_nums), self.patch_nums[-1]
        cond = self.class_emb(torch.cat((label, torch.full_like(label, self.num_classes - 1))))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x = cond[:, None].expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, -1, -1) + lvl_pos[:, : self.first_l]
        f_hat, cur, out = 0, 0, []
        for b in self.blocks:
            b.attn.caching, b.attn.k, b.attn.v = True, None, None
        for si, pn in enumerate(self.patch_nums):
            cur += pn * pn
            for b in self.blocks:
                x = b(x, cond, None)
            logits = self.head(self.head_nm(x.float(), cond).float()).float()
            t = cfg * si / (K - 1)
            logits = (1 + t) * logits[:B] - t * logits[B:]
            if top_k > 0:
                logits.masked_fill_(logits < logits.topk(top_k, dim=-1)[0].amin(-1, keepdim=True), -torch.inf)
            if top_p > 0:
                srt, order = logits.sort(dim=-1)
                drop = srt.softmax(-1).cumsum_(-1) <= 1 - top_p
                drop[..., -1:] = False
                logits.masked_fill_(drop.scatter(-1, order, drop), -torch.inf)
            idx = torch.multinomial(logits.softmax(-1).view(-1, logits.shape[-1]), 1, generator=g).view(B, -1)
            out.append(idx)
            f_hat = f_hat + vq.phi(si, vq.up(idx, pn))
            if si + 1 < K:
                nxt = self.patch_nums[si + 1]
                x = self.word_embed(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
                x = (x + lvl_pos[:, cur : cur + nxt * nxt]).repeat(2, 1, 1)
        for b in self.blocks:
            b.attn.caching, b.attn.k, b.attn.v = False, None, None
        return out


def from_arsr(transformer: nn.Module, quantizer: nn.Module) -> tuple[VAR, MultiScaleVQ]:
    """A reference model and quantizer holding the weights of an arsr VAR backbone (absolute positions,
    index head, no prefix) and its MultiScaleVQ."""
    from arsr.convert import VAR_KEYS

    L = transformer.layout
    ref = VAR(transformer.head.vocab_size, L.latent_dim, L.patch_nums, len(transformer.blocks), L.width, L.heads, transformer.num_classes)
    inverse = [(new, old) for old, new in VAR_KEYS if new is not None]
    state = {}
    for k, v in transformer.state_dict().items():
        for new, old in inverse:
            if k.startswith(new):
                k = old + k[len(new):]
                break
        state[k] = v
    ref.load_state_dict(state, strict=True)
    if not quantizer.phi_at_last_scale:
        raise ValueError("the reference restates VAR's quantizer (Phi at every scale)")
    vq = MultiScaleVQ(quantizer.vocab_size, quantizer.dim, L.patch_nums, quantizer.phi_table, quantizer.quant_resi.qresi_ls[0].ratio)
    vq.load_state_dict({k: v for k, v in quantizer.state_dict().items() if k.startswith(("embedding", "quant_resi"))}, strict=True)
    return ref, vq
