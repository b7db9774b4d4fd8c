"""VARSR's diffusion refiner: the t = 0 likelihood term, CFG 1.0, initialisation."""

import math

import pytest
import torch

from arsr.components.refiners import DiffusionRefiner
from arsr.components.refiners.diffusion import GaussianDiffusion, cosine_betas, discretized_gaussian_log_likelihood

# log P(x | mean, std) of the +-1/255-binned Gaussian with the tanh CDF, worked out with math.tanh
# (x, mean, std, value): an interior bin, a sharp bin at 0, the lower and upper edge bins, a far tail
HAND = [
    (0.2, 0.1, 0.05, -4.76076878866201),
    (0.0, 0.0, 0.01, -1.1873711714852089),
    (-1.0, -0.9, 0.1, -1.7809687221053923),  # x < -0.999: log CDF(x + 1/255)
    (1.0, 0.95, 0.02, -4.559669972229093),  # x > 0.999: log (1 - CDF(x - 1/255))
    (0.5, -0.5, 0.01, math.log(1e-12)),  # floored
]


@pytest.mark.parametrize("x, mean, std, value", HAND)
def test_discretized_log_likelihood_hand_values(x, mean, std, value):
    got = discretized_gaussian_log_likelihood(torch.tensor([x], dtype=torch.float64), torch.tensor([mean], dtype=torch.float64),
                                              torch.tensor([math.log(std)], dtype=torch.float64))
    assert got.item() == pytest.approx(value, rel=1e-9, abs=1e-9)


class FixedNet(torch.nn.Module):
    """Predicts the same (eps, v) for every input."""

    def __init__(self, eps: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.out = torch.cat([eps, v], -1)

    def forward(self, x, t, cond):
        return self.out.expand(x.shape[0], -1)


def test_training_loss_at_t0_uses_the_discretized_term():
    d = GaussianDiffusion(cosine_betas(1000))
    x0, noise = torch.tensor([[0.2, -1.0]]), torch.tensor([[0.3, -0.4]])
    eps, v = torch.tensor([[0.1, -0.2]]), torch.tensor([[0.5, -0.5]])
    t = torch.zeros(1, dtype=torch.long)
    loss = d.training_loss(FixedNet(eps, v), x0, None, t=t, noise=noise)
    # the same quantities by hand: x_t, the model's posterior mean and log-variance at t = 0
    b, acp = d.betas[0].item(), d.acp[0].item()
    xt = math.sqrt(acp) * x0 + math.sqrt(1 - acp) * noise
    pred_x0 = math.sqrt(1 / acp) * xt - math.sqrt(1 / acp - 1) * eps
    mean = d.post_c0[0].item() * pred_x0 + d.post_ct[0].item() * xt
    log_var = (v + 1) / 2 * math.log(b) + (1 - v) / 2 * d.post_log_var[0].item()
    F = lambda z: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    nll = []
    for i in range(2):
        s, xi, mi = math.exp(0.5 * log_var[0, i].item()), x0[0, i].item(), mean[0, i].item()
        p = F((xi - mi + 1 / 255) / s) if xi < -0.999 else F((xi - mi + 1 / 255) / s) - F((xi - mi - 1 / 255) / s)
        nll.append(-math.log(max(p, 1e-12)))
    mse = (eps - noise).pow(2).mean().item()
    assert loss.item() == pytest.approx(mse + sum(nll) / 2 / math.log(2), rel=1e-5)


def test_cfg_one_samples_the_positive_half_without_guidance():
    torch.manual_seed(0)
    r = DiffusionRefiner(latent_dim=4, cond_dim=8, width=16, depth=1, sample_steps=4, init="mar")
    with torch.no_grad():  # open the zero-initialised output so eps depends on the condition
        for p in r.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    h, code = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    g = lambda: torch.Generator().manual_seed(5)
    halves = r.sample(torch.cat([h, -h]), torch.cat([code, code]), cfg=1.0, generator=g())
    plain = r.sample(h, code, cfg=0.0, generator=g())
    assert halves.shape == plain.shape == (2, 3, 4)
    assert torch.equal(halves, plain)
    guided = r.sample(torch.cat([h, -h]), torch.cat([code, code]), cfg=1.5, generator=g())
    assert not torch.allclose(guided, plain)


def test_varsr_init_is_the_transformer_init_over_the_refiner():
    torch.manual_seed(0)
    C = 96
    r = DiffusionRefiner(latent_dim=8, cond_dim=C, width=128, depth=2)
    linears = [m for m in r.modules() if isinstance(m, torch.nn.Linear)]
    w = torch.cat([m.weight.flatten() for m in linears])
    assert w.std().item() == pytest.approx(math.sqrt(1 / (3 * C)), rel=0.03)
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    mar = DiffusionRefiner(latent_dim=8, cond_dim=C, width=128, depth=2, init="mar")
    assert torch.count_nonzero(mar.diffloss.net.final_layer.linear.weight) == 0
    assert torch.count_nonzero(mar.diffloss.net.res_blocks[0].adaLN_modulation[-1].weight) == 0


def test_sizes_come_from_the_layout_or_are_checked_against_it():
    from arsr.interfaces import Layout

    layout = Layout(width=24, heads=2, latent_dim=8, schedule=((1, 1), (2, 2)), vae_dim=6)
    r = DiffusionRefiner(width=16, depth=1)
    r.bind(layout)
    assert (r.latent_dim, r.cond_dim) == (6, 24) and r.decoder_norm.normalized_shape == (24,)
    assert r.diffloss.net.input_proj.in_features == 6
    with pytest.raises(ValueError, match="DiffusionRefiner cond_dim 32 != the transformer width 24: leave cond_dim out"):
        DiffusionRefiner(latent_dim=6, cond_dim=32, width=16, depth=1).bind(layout)
