"""VARSR's diffusion refiner: a per-token MLP denoiser that adds the continuous residual the
last scale's discrete token could not represent (after MAR's DiffLoss).

Training: z = LN(h_last + word_embed(code)) conditions an AdaLN MLP that predicts the noise
(and an interpolated variance) of ``(f_rest_before_last - code) / latent_scale`` under a cosine
schedule of 1000 steps; loss = MSE(eps) + variational bound (at t = 0 the discretised Gaussian
log-likelihood, bins of +-1/255). Sampling: 10 respaced ancestral steps from pure noise, x0
clipped to [-1, 1], CFG on eps (none at cfg 1.0, as VARSR).
Parameter names follow VARSR (``decoder_norm``, ``diffloss.net.*``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from arsr.interfaces import Layout, Refiner
from arsr.sampling import cfg_mix, cfg_pair


def cosine_betas(T: int, max_beta: float = 0.999) -> Tensor:
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=torch.float64)


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of the standard normal CDF."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) for N(mean, exp(log_scale)^2) discretised into bins of +-1/255 around x; below
    -0.999 the bin extends to -inf and above 0.999 to +inf (log-probabilities floored at log 1e-12)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = approx_standard_normal_cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_bin = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


def respaced_steps(T: int, n: int) -> list[int]:
    """n timesteps evenly covering 0..T-1, first and last included (iDDPM's section counts)."""
    stride = (T - 1) / (n - 1) if n > 1 else 0
    return [round(i * stride) for i in range(n)]


class GaussianDiffusion:
    """Epsilon-prediction DDPM with learned-range variance over a given set of timesteps."""

    def __init__(self, betas: Tensor, timestep_map: list[int] | None = None):
        self.betas = betas
        self.T = len(betas)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(self.T))
        acp = torch.cumprod(1 - betas, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
        self.acp, self.acp_prev = acp, acp_prev
        self.post_var = betas * (1 - acp_prev) / (1 - acp)
        self.post_log_var = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]]))
        self.post_c0 = betas * acp_prev.sqrt() / (1 - acp)
        self.post_ct = (1 - acp_prev) * (1 - betas).sqrt() / (1 - acp)

    @classmethod
    def respaced(cls, base_betas: Tensor, steps: list[int]) -> "GaussianDiffusion":
        acp = torch.cumprod(1 - base_betas, 0)
        last, betas = 1.0, []
        for t in steps:
            betas.append(1 - acp[t] / last)
            last = acp[t]
        return cls(torch.stack(betas), steps)

    def _at(self, arr: Tensor, t: Tensor, like: Tensor) -> Tensor:
        return arr.to(like.device)[t].float().view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self._at(self.acp.sqrt(), t, x0) * x0 + self._at((1 - self.acp).sqrt(), t, x0) * noise

    def p_mean_var(self, eps: Tensor, v: Tensor, x: Tensor, t: Tensor, clip: bool) -> tuple[Tensor, Tensor, Tensor]:
        """-> mean, log variance of p(x_{t-1} | x_t), and predicted x0."""
        frac = (v + 1) / 2
        log_var = frac * self._at(torch.log(self.betas), t, x) + (1 - frac) * self._at(self.post_log_var, t, x)
        x0 = self._at((1 / self.acp).sqrt(), t, x) * x - self._at((1 / self.acp - 1).sqrt(), t, x) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = self._at(self.post_c0, t, x) * x0 + self._at(self.post_ct, t, x) * x
        return mean, log_var, x0

    def training_loss(self, net, x0: Tensor, cond: Tensor, t: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        """Mean over tokens of MSE(eps) + the variational bound in bits (t, noise: drawn when None)."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        eps, v = net(xt, self.timestep_map.to(x0.device)[t], cond).chunk(2, dim=-1)
        mse = (eps - noise).pow(2).mean(-1)
        # variational bound with the mean frozen: trains only the variance interpolation
        mean, log_var, _ = self.p_mean_var(eps.detach(), v, xt, t, clip=False)
        true_mean = self._at(self.post_c0, t, x0) * x0 + self._at(self.post_ct, t, x0) * xt
        true_log_var = self._at(self.post_log_var, t, x0)
        kl = 0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var) + (true_mean - mean) ** 2 * torch.exp(-log_var))
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)  # t == 0: the decoder term
        vb = torch.where(t[:, None] == 0, nll, kl).mean(-1) / math.log(2.0)
        return (mse + vb).mean()

    @torch.no_grad()
    def sample(self, net, cond: Tensor, dim: int, cfg: float = 0.0, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """cond (N, C) -> x0 (N, dim); with cfg > 0, cond holds [positive; negative] halves and N/2
        samples come back. At cfg exactly 1.0 the positive half is sampled without guidance (VARSR)."""
        if cfg == 1.0:
            cond, cfg = cond[: cond.shape[0] // 2], 0.0
        n = cond.shape[0] // 2 if cfg > 0 else cond.shape[0]
        x = torch.randn(n, dim, generator=generator, device=cond.device)
        for i in reversed(range(self.T)):
            t = torch.full((n,), i, device=cond.device, dtype=torch.long)
            tt = self.timestep_map.to(cond.device)[t]
            eps, v = net(cfg_pair(x) if cfg > 0 else x, cfg_pair(tt) if cfg > 0 else tt, cond).chunk(2, dim=-1)
            if cfg > 0:
                eps, v = cfg_mix(eps, cfg), v[:n]
            mean, log_var, _ = self.p_mean_var(eps, v, x, t, clip=True)
            noise = torch.randn(x.shape, generator=generator, device=x.device) * temperature
            x = mean + (torch.exp(0.5 * log_var) * noise if i > 0 else 0)
        return x


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """Per-token denoiser: (x_t (N, d), t (N,), cond (N, C)) -> (eps, v) (N, 2d)."""

    def __init__(self, in_channels: int, width: int, depth: int, cond_dim: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * in_channels)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        y = self.time_embed(t) + self.cond_embed(cond)
        x = self.input_proj(x)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffLoss(nn.Module):
    def __init__(self, in_channels: int, width: int, depth: int, cond_dim: int):
        super().__init__()
        self.net = SimpleMLPAdaLN(in_channels, width, depth, cond_dim)


class DiffusionRefiner(Refiner):
    """Args:
        latent_dim: channels of the tokenizer latent (VARSR: 32); None: the tokenizer's, at ``bind``.
        cond_dim: transformer width C (VARSR: 1536); None: the backbone's, at ``bind``.
        width, depth: MLP width and residual blocks (VARSR: 1024, 6).
        train_steps, sample_steps: diffusion steps (1000) and respaced sampling steps (10).
        latent_scale: the residual is divided by this before diffusion (VARSR: 0.6).
        batch_mul: timesteps drawn per token and step (VARSR: 4).
        weight: lambda, the refiner loss weight in the total loss (VARSR: 2.0).
        init: ``varsr``: as a VARSR model built from scratch, whose transformer init also covers the
            refiner (every Linear truncated-normal std sqrt(1 / (3 cond_dim)), bias 0; LayerNorm 1, 0);
            ``mar``: MAR's own DiffLoss init (xavier-uniform, N(0, 0.02) time MLP, zero AdaLN and
            output layers). Irrelevant when weights are loaded.

    Given both sizes it is built at once (official layouts, conversion); ``bind`` then checks them.
    """

    def __init__(self, latent_dim: int | None = None, cond_dim: int | None = None, width: int = 1024, depth: int = 6,
                 train_steps: int = 1000, sample_steps: int = 10, latent_scale: float = 0.6, batch_mul: int = 4,
                 weight: float = 2.0, init: Literal["varsr", "mar"] = "varsr"):
        super().__init__()
        self.latent_dim, self.cond_dim, self.width, self.depth, self.init = latent_dim, cond_dim, width, depth, init
        self.latent_scale, self.batch_mul, self.weight = latent_scale, batch_mul, weight
        betas = cosine_betas(train_steps)
        self.train_diffusion = GaussianDiffusion(betas)
        self.sample_diffusion = GaussianDiffusion.respaced(betas, respaced_steps(train_steps, sample_steps))
        if latent_dim is not None and cond_dim is not None:
            self.build()

    def build(self) -> None:
        self.decoder_norm = nn.LayerNorm(self.cond_dim, eps=1e-6)
        self.diffloss = DiffLoss(self.latent_dim, self.width, self.depth, self.cond_dim)
        self.init_weights(self.init, self.cond_dim)

    def bind(self, layout: Layout) -> None:
        """Take the latent channels (``vae_dim``) and the backbone width from the layout, or check them."""
        for name, want, whose in (("latent_dim", layout.vae_dim, "the tokenizer's latent channels"), ("cond_dim", layout.width, "the transformer width")):
            have = getattr(self, name)
            if have is not None and have != want:
                raise ValueError(f"DiffusionRefiner {name} {have} != {whose} {want}: leave {name} out to take it from them")
        if not hasattr(self, "diffloss"):
            self.latent_dim, self.cond_dim = layout.vae_dim, layout.width
            self.build()

    @torch.no_grad()
    def init_weights(self, init: Literal["varsr", "mar"], cond_dim: int) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if init == "varsr":
                    nn.init.trunc_normal_(m.weight, std=math.sqrt(1 / (3 * cond_dim)))
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if init == "mar":
            net = self.diffloss.net
            for lin in (net.time_embed.mlp[0], net.time_embed.mlp[2]):
                nn.init.normal_(lin.weight, std=0.02)
            for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1], net.final_layer.linear]:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def condition(self, h_last: Tensor, code_embed: Tensor) -> Tensor:
        """h_last, code_embed (B, N, C) -> per-token conditions (B*N, C)."""
        return rearrange(self.decoder_norm(h_last + code_embed), "b n c -> (b n) c")

    def loss(self, h_last: Tensor, code_embed: Tensor, target: Tensor) -> Tensor:
        """target (B, N, d): continuous residual after the last scale's code -> weighted loss."""
        cond = repeat(self.condition(h_last, code_embed), "n c -> (m n) c", m=self.batch_mul)
        x0 = repeat(rearrange(target, "b n d -> (b n) d") / self.latent_scale, "n d -> (m n) d", m=self.batch_mul)
        return self.weight * self.train_diffusion.training_loss(self.diffloss.net, x0.float(), cond.float())

    @torch.no_grad()
    def sample(self, h_last: Tensor, code_embed: Tensor, cfg: float = 0.0, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """-> residual (B', N, d) to add to f_hat (B' = B, or B / 2 with CFG halves)."""
        cond = self.condition(h_last, code_embed).float()
        x = self.sample_diffusion.sample(self.diffloss.net, cond, self.latent_dim, cfg, temperature, generator)
        return rearrange(x * self.latent_scale, "(b n) d -> b n d", n=h_last.shape[1])
