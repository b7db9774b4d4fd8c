"""Next-scale transformer: mask, KV cache, SA-RoPE, CFG, DPO, heads, official layout."""

import math

import pytest
import torch

from arsr.interfaces import Layout
from arsr.nn.attention import dense_block_causal

from arsr.components.conditioning import EncoderFeatures, PrefixTokens
from arsr.components.heads import BitwiseHead, IndexHead, sample_top_k_top_p
from arsr.components.posenc import AbsolutePerScale, LearnedResampled, SARoPE
from arsr.components.posenc.rope import rope_2d_table
from arsr.components.quantizers import MultiScaleVQ
from arsr.components.regularizers.dpo import dpo_loss
from arsr.nn.transformer import NextScaleTransformer, apply_rotary

PN = (1, 2, 3, 4)


def tiny(pos=None, head=None, cond=None, text=None, **kw):
    kw = dict(depth=2, width=32, heads=2, latent_dim=4, patch_nums=PN, num_classes=3, null_class=2, cond_drop=0.0, drop_path=0.0) | kw
    torch.manual_seed(0)
    m = NextScaleTransformer(pos or AbsolutePerScale(), head or IndexHead(16), cond, text, **kw)
    with torch.no_grad():  # VAR initialises the AdaLN gammas near 0: make the blocks matter in tests
        for b in m.blocks:
            (b.ada_lin[-1].weight if hasattr(b, "ada_lin") else b.ada_gss).normal_(0, 0.05)
    return m.eval()


def test_mask_no_scale_sees_a_later_one():
    m = tiny(cond=PrefixTokens((4, 8, 16), grid=2))
    lv = m.lvl_1L[0]
    mask = dense_block_causal(lv)
    assert mask.shape == (4 + 30, 4 + 30)
    visible = mask == 0
    assert torch.equal(visible, lv[:, None] >= lv[None, :])
    assert visible[:5, :5].all()  # prefix + start block is bidirectional
    assert not visible[5, 9] and visible[9, 5]  # a 2x2 token does not see 3x3, and vice versa it does


def test_changing_a_later_scale_never_changes_earlier_logits():
    m = tiny()
    label, x = torch.tensor([0, 1]), torch.randn(2, 29, 4)
    base = m(label, x)
    x2 = x.clone()
    x2[:, 4 + 9 :] += 1.0  # perturb the inputs of the 4x4 scale (sequence positions 14..29)
    out = m(label, x2)
    assert torch.allclose(out[:, :14], base[:, :14], atol=1e-5) and not torch.allclose(out[:, 14:], base[:, 14:])


@pytest.mark.parametrize("pos", [AbsolutePerScale, SARoPE, lambda: LearnedResampled(grid=8)])
@pytest.mark.parametrize("cond", [None, lambda: PrefixTokens((4, 8, 16), grid=2)])
def test_kv_cache_sampling_equals_full_forward(pos, cond):
    m = tiny(pos(), cond=cond() if cond else None)
    q = MultiScaleVQ(16, 4, PN)
    lr = torch.rand(2, 3, 8, 8) * 2 - 1
    label = torch.tensor([0, 1])
    g = lambda: torch.Generator().manual_seed(3)
    a = m.generate(q, label, lr, cfg=1.5, neg_label=2, top_k=5, top_p=0.9, generator=g(), use_cache=True)
    b = m.generate(q, label, lr, cfg=1.5, neg_label=2, top_k=5, top_p=0.9, generator=g(), use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # and the teacher-forced forward on the sampled tokens gives the same greedy choices
    greedy = m.generate(q, label, lr, top_k=1)
    logits = m(label, q.indices_to_teacher_input(greedy), lr)
    assert torch.equal(logits.argmax(-1), torch.cat(greedy, 1))


def test_sa_rope_invariants():
    t = rope_2d_table((4, 1, 2, 4), head_dim=8, theta=10000.0, align_to=4)
    assert t.shape == (16 + 1 + 4 + 16, 4) and torch.allclose(t.abs(), torch.ones_like(t.real))
    prefix, start, s2, s4 = t[:16], t[16], t[17:21], t[21:]
    assert torch.allclose(prefix, s4)  # LR prefix tokens share the final scale's coordinates
    assert torch.allclose(start, torch.ones_like(start))  # the 1x1 token sits at (0, 0)
    assert torch.allclose(s2[3], s4[2 * 4 + 2])  # 2x2 token (1, 1) is at (2, 2) of the 4x4 grid
    # relative: q.k after rotation depends only on the coordinate difference
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dot = lambda i, j: (apply_rotary(q, t[i : i + 1]) * apply_rotary(k, t[j : j + 1])).sum()
    assert torch.allclose(dot(21 + 1, 21 + 0), dot(21 + 5, 21 + 4), atol=1e-5)
    assert not torch.allclose(dot(21 + 1, 21 + 0), dot(21 + 2, 21 + 0))
    plain = rope_2d_table((2,), head_dim=8, theta=10000.0, align_to=None)
    assert torch.allclose(plain[3], rope_2d_table((4,), 8, 10000.0, None)[5])  # (1, 1) on its own grid


def test_cfg_formula():
    m = tiny()
    q = MultiScaleVQ(16, 4, PN)
    label, cfg = torch.tensor([0]), 3.0
    seen = []
    orig = m.head.sample
    m.head.sample = lambda logits, *a: seen.append(logits) or orig(logits, 1, 0.0, 1.0, None)
    toks = m.generate(q, label, cfg=cfg, neg_label=2)
    m.head.sample = orig
    # recompute the conditional and unconditional logits teacher-forced on the same tokens
    inputs = q.indices_to_teacher_input(toks)
    pos = m(torch.tensor([0]), inputs)
    neg = m(torch.tensor([2]), inputs)
    b = torch.tensor([0, 1, 5, 14, 30])
    for si in range(4):
        t = cfg * si / 3
        expected = (1 + t) * pos[:, b[si] : b[si + 1]] - t * neg[:, b[si] : b[si + 1]]
        assert torch.allclose(seen[si], expected, atol=1e-4), si


def test_dpo_hand_computed():
    lw, ll = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -2.0])
    beta = 0.5
    expected = (math.log(1 + math.exp(-0.5 * 2.0)) + math.log(1 + math.exp(-0.5 * -1.0))) / 2
    assert dpo_loss(lw, ll, beta).item() == pytest.approx(expected, rel=1e-6)
    assert dpo_loss(lw, lw, beta).item() == pytest.approx(math.log(2))


def test_top_k_top_p_sampling():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_top_k_top_p(logits, 2, 0.0, 1.0, g)) for _ in range(50)}
    assert draws == {2, 3}
    assert int(sample_top_k_top_p(logits, 1, 0.0, 1.0, None)) == 3
    # top_p keeps the smallest set reaching the mass: p = softmax -> [.032, .087, .237, .644]
    draws = {int(sample_top_k_top_p(logits, 0, 0.6, 1.0, g)) for _ in range(50)}
    assert draws == {3}


def test_bitwise_head_logprob_is_sum_over_bits():
    h = BitwiseHead(bits=3)
    h.bind(Layout(8, 1, 3, ((1, 1),)))
    logits = torch.randn(2, 5, 3, 2)
    bits = torch.randint(0, 2, (2, 5, 3))
    lp = h.log_prob(logits, bits)
    manual = sum(logits[..., i, :].log_softmax(-1).gather(-1, bits[..., i : i + 1])[..., 0] for i in range(3))
    assert torch.allclose(lp, manual)
    assert h(torch.randn(2, 5, 8), torch.randn(2, 8)).shape == (2, 5, 3, 2)


def test_var_d16_layout():
    """Parameter count and key shapes of the official var_d16 (reference facts B.1, B.10)."""
    m = NextScaleTransformer(AbsolutePerScale(), IndexHead(4096), None, depth=16, latent_dim=32, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    assert sum(p.numel() for p in m.parameters()) == 310_283_520
    sd = m.state_dict()
    shapes = {"pos_start": (1, 1, 1024), "pos_enc.pos_1LC": (1, 680, 1024), "word_embed.weight": (1024, 32),
              "class_emb.weight": (1001, 1024), "lvl_embed.weight": (10, 1024), "blocks.15.attn.scale_mul_1H11": (1, 16, 1, 1),
              "blocks.0.attn.mat_qkv.weight": (3072, 1024), "blocks.0.attn.zero_k_bias": (1024,),
              "blocks.3.ffn.fc1.weight": (4096, 1024), "blocks.3.ada_lin.1.weight": (6144, 1024),
              "head.head_nm.ada_lin.1.weight": (2048, 1024), "head.head.weight": (4096, 1024)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert len(sd) == 220 - 2  # lvl_1L and the mask are derived, not stored
    assert m.blocks[-1].drop_path.drop_prob == pytest.approx(0.1 * 16 / 24)


def test_encoder_features_need_a_tokenizer():
    from arsr.nn.vae import VQVAE

    cond = EncoderFeatures(grid=4)  # the last latent side; the channels come from the layout
    m = tiny(cond=cond)
    with pytest.raises(RuntimeError, match="no tokenizer"):
        m(torch.tensor([0]), torch.randn(1, 29, 4), torch.rand(1, 3, 16, 16))
    tok = VQVAE(MultiScaleVQ(16, 4, PN), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    cond.attach_tokenizer(tok)
    assert m(torch.tensor([0]), torch.randn(1, 29, 4), torch.rand(1, 3, 16, 16)).shape == (1, 30, 16)
    with pytest.raises(ValueError, match="EncoderFeatures grid 2 != the tokenizer's last latent map 4x4: set grid 4"):
        tiny(cond=EncoderFeatures(grid=2))
    with pytest.raises(ValueError, match="EncoderFeatures latent_dim 8 != the tokenizer's 4 latent channels"):
        tiny(cond=EncoderFeatures(grid=4, latent_dim=8))


def test_text_cross_attention_cache_cfg_and_dropout():
    from arsr.components.conditioning import ByteCaptionEncoder

    torch.manual_seed(0)
    m = tiny(SARoPE(align=False), BitwiseHead(bits=4), text=ByteCaptionEncoder(dim=16, depth=1, heads=2, max_len=16))
    assert "blocks.0.ca.mat_kv.weight" in m.state_dict() and "text_proj.weight" in m.state_dict()
    from arsr.components.quantizers import MultiScaleBSQ

    q = MultiScaleBSQ(4, PN)
    label, caps = torch.tensor([0, 0]), ["a red cup", "galaxies"]
    x = torch.randn(2, 29, 4)
    assert torch.allclose(m(label, x), m(label, x, captions=["", ""]))  # no captions: the empty prompt
    m.text.prompt = "a red cup"  # NSARM's fixed prompt replaces every caption
    assert torch.allclose(m(label, x, captions=["x", "y"]), m(label, x, captions=["a red cup"] * 2))
    m.text.prompt = None
    with pytest.raises(ValueError, match="3 captions for a batch of 2"):
        m(label, x, captions=["a", "b", "c"])
    a, b = m(label, x, captions=caps), m(label, x, captions=["a red cup", "a cat"])
    assert torch.allclose(a[0], b[0], atol=1e-6) and not torch.allclose(a[1], b[1])  # each sample sees its own caption
    g = lambda: torch.Generator().manual_seed(1)
    t1 = m.generate(q, label, cfg=2.0, top_k=2, generator=g(), captions=caps, use_cache=True)
    t2 = m.generate(q, label, cfg=2.0, top_k=2, generator=g(), captions=caps, use_cache=False)
    assert all(torch.equal(u, v) for u, v in zip(t1, t2))
    m.train()
    m.cond_drop = 1.0  # every caption dropped to the empty prompt
    dropped = m(label, x, captions=caps)
    m.eval()
    assert torch.allclose(dropped, m(torch.tensor([2, 2]), x, captions=["", ""]), atol=1e-5)  # null class + empty prompt


@pytest.mark.parametrize("depth, shared, params, entries", [(20, False, 600_917_136, 272), (24, False, 1_033_399_360, 324),
                                                           (30, False, 2_010_020_356, 402), (36, True, 2_353_893_904, 446)])
def test_var_family_sizes(depth, shared, params, entries):
    """Parameter counts and state-dict sizes of var_d20..d36 (reference facts B.1, B.10), built on the meta device."""
    pn = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32) if shared else (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    with torch.device("meta"):
        m = NextScaleTransformer(AbsolutePerScale(), IndexHead(4096), None, depth=depth, patch_nums=pn, shared_aln=shared)
    assert sum(p.numel() for p in m.parameters()) == params
    assert len(m.state_dict()) == entries - 2  # without the derived lvl_1L and mask
    if shared:
        sd = m.state_dict()
        assert sd["shared_ada_lin.1.weight"].shape == (6 * 2304, 2304) and sd["blocks.35.ada_gss"].shape == (1, 1, 6, 2304)
        assert "blocks.0.ada_lin.1.weight" not in sd


def test_shared_adaln_runs_and_caches():
    m = tiny(shared_aln=True)
    q = MultiScaleVQ(16, 4, PN)
    g = lambda: torch.Generator().manual_seed(0)
    a = m.generate(q, torch.tensor([0, 1]), cfg=1.0, top_k=3, generator=g())
    b = m.generate(q, torch.tensor([0, 1]), cfg=1.0, top_k=3, generator=g(), use_cache=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_kv_cache_writes_each_position_once_and_refuses_overflow():
    from arsr.sampling import KVCache

    cache, ks, vs = KVCache(6), [torch.randn(2, 3, n, 4) for n in (1, 2, 3)], [torch.randn(2, 3, n, 4) for n in (1, 2, 3)]
    for i in range(3):
        k, v = cache.extend(ks[i], vs[i])
        assert torch.equal(k, torch.cat(ks[: i + 1], 2)) and torch.equal(v, torch.cat(vs[: i + 1], 2))
    with pytest.raises(ValueError, match="cannot take 7"):
        cache.extend(ks[0], vs[0])


def test_sampling_computes_each_blocks_modulation_once():
    """The condition is the same at every scale: AdaLN projections run once per sampling run, not per scale."""
    m, q = tiny(), MultiScaleVQ(16, 4, PN)
    calls = []
    for b in m.blocks:
        b.ada_lin.register_forward_hook(lambda *a: calls.append(1))
    m.generate(q, torch.tensor([0, 1]), cfg=1.5, top_k=5, generator=torch.Generator().manual_seed(0))
    assert len(calls) == len(m.blocks)


def test_layout_carries_the_tokens_and_heads_size_from_it():
    from arsr.components.quantizers import MultiScaleBSQ

    vq = Layout.of(MultiScaleVQ(16, 4, PN), width=32, heads=2)
    assert (vq.token_kind, vq.vocab_size, vq.latent_dim) == ("index", 16, 4)
    bits = Layout.of(MultiScaleBSQ(dim=6, schedule=[(1, 1), (2, 2)]), width=32, heads=2)
    assert (bits.token_kind, bits.vocab_size, bits.latent_dim) == ("bits", None, 6)
    head = IndexHead()  # no size of its own: takes the codebook's
    head.bind(vq)
    assert head.head.out_features == 16
    bitwise = BitwiseHead()
    bitwise.bind(bits)
    assert bitwise.head.out_features == 12
    with pytest.raises(ValueError, match="IndexHead scores codebook indices but the tokenizer gives bits tokens: use BitwiseHead"):
        IndexHead(16).bind(bits)


def test_top_k_and_top_p_per_scale():
    """A list gives each scale its own filtering: greedy scales equal greedy sampling there."""
    m, q = tiny(), MultiScaleVQ(16, 4, PN)
    label, g = torch.tensor([0, 1]), lambda: torch.Generator().manual_seed(5)
    greedy = m.generate(q, label, top_k=1)
    mixed = m.generate(q, label, top_k=[1, 1, 0, 0], top_p=[0.0, 0.0, 0.9, 0.5], generator=g())
    assert all(torch.equal(a, b) for a, b in zip(greedy[:2], mixed[:2]))
    assert all(torch.equal(a, b) for a, b in zip(mixed, m.generate(q, label, top_k=[1, 1, 0, 0], top_p=[0.0, 0.0, 0.9, 0.5], generator=g())))
    with pytest.raises(ValueError, match="top_k has 3 values for 4 scales: give one value, or one per scale"):
        m.generate(q, label, top_k=[1, 1, 0])
