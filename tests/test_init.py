"""A freshly built transformer is initialised as VAR's init_weights (reference facts B.7): the std of
every weight family against its formula, zero biases, AdaLN and head multipliers."""

import math

import pytest
import torch

from arsr.components.conditioning import PrefixTokens
from arsr.components.heads import IndexHead
from arsr.components.posenc import AbsolutePerScale
from arsr.nn.transformer import NextScaleTransformer

C, DEPTH, ALN, ALNG, HD = 256, 4, 0.5, 1e-3, 0.02


def build(shared_aln: bool = False, cond=None) -> NextScaleTransformer:
    torch.manual_seed(0)
    return NextScaleTransformer(AbsolutePerScale(), IndexHead(512), cond, depth=DEPTH, width=C, heads=4, latent_dim=8,
                                patch_nums=(1, 2, 4), num_classes=3, null_class=2, init_adaln=ALN, init_adaln_gamma=ALNG,
                                init_head=HD, shared_aln=shared_aln)


def std_of(*tensors: torch.Tensor) -> float:
    return torch.cat([t.detach().flatten() for t in tensors]).std().item()


@pytest.mark.parametrize("shared_aln", [False, True], ids=["ada_lin", "shared_ada_lin"])
def test_transformer_init_matches_var_formulas(shared_aln):
    m = build(shared_aln)
    std = math.sqrt(1 / (3 * C))  # VAR's automatic init_std
    close = lambda got, want: got == pytest.approx(want, rel=0.05)
    assert close(std_of(m.word_embed.weight, m.class_emb.weight, m.lvl_embed.weight, m.pos_start, m.pos_enc.pos_1LC), std)
    assert close(std_of(*[b.attn.mat_qkv.weight for b in m.blocks], *[b.ffn.fc1.weight for b in m.blocks]), std)
    # residual projections divided by sqrt(2 depth)
    assert close(std_of(*[b.attn.proj.weight for b in m.blocks], *[b.ffn.fc2.weight for b in m.blocks]), std / math.sqrt(2 * DEPTH))
    # AdaLN: scale/shift rows x aln, the two gamma rows x alng
    if shared_aln:
        assert close(std_of(m.shared_ada_lin[-1].weight), std)
        gss = torch.cat([b.ada_gss for b in m.blocks])  # randn / sqrt(C), then the multipliers
        assert close(std_of(gss[:, :, 2:]), ALN / math.sqrt(C)) and close(std_of(gss[:, :, :2]), ALNG / math.sqrt(C))
    else:
        w = torch.cat([b.ada_lin[-1].weight for b in m.blocks], 1)
        assert close(std_of(w[2 * C:]), std * ALN) and close(std_of(w[: 2 * C]), std * ALNG)
    # head: weight x hd, head_nm's AdaLN x aln
    assert close(std_of(m.head.head.weight), std * HD)
    assert close(std_of(m.head.head_nm.ada_lin[-1].weight), std * ALN)
    # zeros and constants
    for n, p in m.named_parameters():
        if n.endswith("bias"):
            assert torch.count_nonzero(p) == 0, n
        if "scale_mul" in n:
            assert torch.allclose(p, torch.full_like(p, math.log(4.0))), n


def test_lr_encoder_convs_follow_var_conv_init():
    """VAR's init_weights draws every Conv truncated-normal(0.02), bias 0 (B.7): VARSR's LR encoder too."""
    m = build(cond=PrefixTokens((8, 16, 32), grid=4))
    convs = [mod for mod in m.conditioning.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert std_of(*[c.weight for c in convs]) == pytest.approx(0.02, rel=0.05)
    assert all(torch.count_nonzero(c.bias) == 0 for c in convs)
