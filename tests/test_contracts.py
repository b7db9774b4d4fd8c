"""Every implementation of a family, through the family's contract.

Implementations are discovered from their packages (``__all__``): a new class without a case here
fails ``test_every_implementation_is_covered``, so no component ships untested against its contract.
"""

import inspect

import pytest
import torch

import arsr.components.conditioning as conditioning
import arsr.components.degradations as degradations
import arsr.components.heads as heads
import arsr.components.posenc as posenc
import arsr.components.quantizers as quantizers
import arsr.components.refiners as refiners
from arsr.interfaces import (Conditioning, Degradation, Head, Labels, Layout, PositionalEncoding, Quantizer, Refiner, ScalePredictor,
                             SRBatch, TextConditioning)
from arsr.nn.vae import HierarchicalVQVAE, VQVAE

from conftest import SAMPLE

VAE = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)

# class -> a tokenizer holding it (the quantizer's input is what that tokenizer's encoder gives)
TOKENIZERS = {
    quantizers.MultiScaleVQ: lambda: VQVAE(quantizers.MultiScaleVQ(32, 4, (1, 2, 3, 4, 6, 8)), **VAE),
    quantizers.HierarchicalRQ: lambda: HierarchicalVQVAE(quantizers.HierarchicalRQ(32, 4, (2, 4, 6, 8), (4, 8)), **VAE),
    quantizers.MultiScaleBSQ: lambda: VQVAE(quantizers.MultiScaleBSQ(4, [(1, 1), (1, 2), (2, 4), (4, 8)]), **VAE, using_sa=False,
                                            using_mid_sa=False, quant_conv_ks=0),
}
POSENC = {posenc.AbsolutePerScale: lambda: posenc.AbsolutePerScale(), posenc.LearnedResampled: lambda: posenc.LearnedResampled(grid=8),
          posenc.SARoPE: lambda: posenc.SARoPE()}
HEADS = {heads.IndexHead: lambda: heads.IndexHead(32), heads.BitwiseHead: lambda: heads.BitwiseHead(4)}
DEGRADATIONS = {degradations.RealESRGANDegradation: lambda: degradations.RealESRGANDegradation(),
                degradations.BicubicDegradation: lambda: degradations.BicubicDegradation(4)}
CONDITIONINGS = {conditioning.PrefixTokens: lambda: conditioning.PrefixTokens((8, 16, 32), grid=4),
                 conditioning.EncoderFeatures: lambda: conditioning.EncoderFeatures(grid=4, latent_dim=4)}
PREDICTORS = {conditioning.TransformationNet: lambda: conditioning.TransformationNet(num_scales=2, width=16, downsample=1),
              conditioning.NSARMTransformationNet: lambda: conditioning.NSARMTransformationNet(
                  latent_dim=4, grid=2, sides=[1, 2], dims=[16, 16], layers=[1, 1], heads=[2, 2], stem=[8, 8])}
LABELS = {conditioning.ConstantLabel: lambda: conditioning.ConstantLabel(0), conditioning.QualityCFG: lambda: conditioning.QualityCFG(),
          conditioning.DegradationClasses: lambda: conditioning.DegradationClasses(), conditioning.ClassLabels: lambda: conditioning.ClassLabels(3)}
TEXT = {conditioning.ByteCaptionEncoder: lambda: conditioning.ByteCaptionEncoder(dim=16, depth=1, heads=2),
        conditioning.T5TextEncoder: lambda: conditioning.T5TextEncoder(str(SAMPLE / "tiny_t5"))}
REFINERS = {refiners.DiffusionRefiner: lambda: refiners.DiffusionRefiner(width=16, depth=1, sample_steps=3)}
FAMILIES = [(quantizers, Quantizer, TOKENIZERS), (posenc, PositionalEncoding, POSENC), (heads, Head, HEADS),
            (degradations, Degradation, DEGRADATIONS), (conditioning, Conditioning, CONDITIONINGS),
            (conditioning, ScalePredictor, PREDICTORS), (conditioning, Labels, LABELS), (conditioning, TextConditioning, TEXT),
            (refiners, Refiner, REFINERS)]


def implementations(package, base) -> set[type]:
    return {obj for name in package.__all__ if inspect.isclass(obj := getattr(package, name)) and issubclass(obj, base)}


@pytest.mark.parametrize("package, base, cases", FAMILIES, ids=[f[1].__name__ for f in FAMILIES])
def test_every_implementation_is_covered(package, base, cases):
    assert implementations(package, base) == set(cases)


def image_for(tok) -> torch.Tensor:
    h, w = tok.quantize.vae_schedule[-1]
    return torch.rand(2, 3, h * tok.downsample, w * tok.downsample) * 2 - 1


@pytest.mark.parametrize("cls", list(TOKENIZERS), ids=lambda c: c.__name__)
def test_quantizer_contract(cls):
    """Tokens <-> latent <-> next-scale inputs agree along every path the frame uses: teacher forcing
    (one pass) = step_input per scale, the sampling walk (incremental) = step_input / indices_to_fhat,
    codes of a scale have the scale's size, tokens have the schedule's sizes."""
    torch.manual_seed(0)
    tok = TOKENIZERS[cls]().eval()
    q = tok.quantize
    with torch.no_grad():
        f = tok.encode(image_for(tok))
        tokens = q.f_to_indices(f)
        assert [t.shape[:2] for t in tokens] == [(2, h * w) for h, w in q.schedule]
        tf = q.teacher(f)
        assert all(torch.equal(a, b) for a, b in zip(tf.tokens, tokens))
        assert torch.allclose(tf.inputs, q.indices_to_teacher_input(tokens), atol=1e-5)
        assert tf.inputs.shape == (2, sum(h * w for h, w in q.schedule[1:]), q.token_dim)
        walk = q.start_walk()
        for k, t in enumerate(tokens):
            walk.add(t)
            assert torch.allclose(walk.f_hat(), q.indices_to_fhat(tokens, upto=k + 1), atol=1e-5)
            if k + 1 < len(tokens):
                assert torch.allclose(walk.next_input(), q.step_input(tokens[: k + 1]), atol=1e-5)
        for si, t in enumerate(tokens):
            assert q.codes(t, si).shape[-2:] == q.vae_schedule[si]
        assert tok.decode(q.indices_to_fhat(tokens)).shape[-2:] == image_for(tok).shape[-2:]
    layout = Layout.of(q)
    assert layout.schedule == tuple(q.schedule) and layout.latent_dim == q.token_dim and layout.vae_dim == q.dim


@pytest.mark.parametrize("cls", list(POSENC), ids=lambda c: c.__name__)
def test_positional_encoding_contract(cls):
    """bind(layout) then additive (image positions, width) and / or rotary (sequence positions, head_dim / 2)."""
    layout = Layout(32, 2, 4, ((1, 1), (2, 2), (4, 4)), prefix_grids=(2,))
    pe = POSENC[cls]()
    pe.bind(layout)
    add, rot = pe.additive(0, layout.image_len), pe.rotary(0, layout.total_len)
    assert add is not None or rot is not None
    assert add is None or add.shape == (layout.image_len, layout.width)
    assert rot is None or (rot.shape == (layout.total_len, layout.head_dim // 2) and rot.is_complex())
    assert add is None or torch.equal(pe.additive(5, 9), add[5:9])


@pytest.mark.parametrize("cls", list(HEADS), ids=lambda c: c.__name__)
def test_head_contract(cls):
    """bind(layout); logits score tokens: log_prob of the argmax tokens is the best, the loss is
    finite and -log_prob (up to the head's normalisation), sampling with top_k 1 is greedy."""
    torch.manual_seed(0)
    head = HEADS[cls]()
    head.bind(Layout(16, 2, 4, ((1, 1), (2, 2))))
    logits = head(torch.randn(2, 5, 16), torch.randn(2, 16))
    greedy = head.sample(logits, 1, 0.0, 1.0, None)
    drawn = head.sample(logits, 0, 0.9, 1.0, torch.Generator().manual_seed(0))
    assert greedy.shape == drawn.shape == logits.shape[:-1 if cls is heads.IndexHead else -1][: greedy.dim()]
    assert (head.log_prob(logits, greedy) >= head.log_prob(logits, drawn) - 1e-6).all()
    assert torch.isfinite(head.token_loss(logits, drawn)).all() and head.accuracy(logits, greedy).eq(1).all()


@pytest.mark.parametrize("cls", list(DEGRADATIONS), ids=lambda c: c.__name__)
def test_degradation_contract(cls):
    """forward(hr, generator, seeds): LR at 1/scale, lr_up at the HR size, 8-bit values in [0, 1];
    a sample degrades the same whatever batch it is in (per-sample seeds)."""
    d = DEGRADATIONS[cls]()
    hr = torch.rand(3, 3, 32, 32)
    out = d(hr, seeds=[1, 2, 3])
    assert out.lr.shape == (3, 3, 32 // d.scale, 32 // d.scale) and out.lr_up.shape == hr.shape and out.degraded.shape == (3,)
    assert out.lr.min() >= 0 and out.lr.max() <= 1 and torch.equal((out.lr * 255).round() / 255, out.lr)
    alone = d(hr[1:2], seeds=[2])
    assert torch.allclose(alone.lr[0], out.lr[1], atol=1e-6)


def bsq_tokenizer():
    return VQVAE(quantizers.MultiScaleBSQ(4, (1, 2, 4)), **VAE, using_sa=False, using_mid_sa=False, quant_conv_ks=0).eval()


@pytest.mark.parametrize("cls", list(CONDITIONINGS), ids=lambda c: c.__name__)
def test_conditioning_contract(cls):
    """attach_tokenizer, bind(layout) -> forward(lr_up) gives the prefix the layout counts: (B, prefix_len, width)."""
    cond = CONDITIONINGS[cls]()
    cond.attach_tokenizer(bsq_tokenizer())
    layout = Layout(32, 2, 4, ((1, 1), (2, 2), (4, 4)), prefix_grids=tuple(cond.prefix_grids))
    cond.bind(layout)
    out = cond(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out.shape == (2, layout.prefix_len, layout.width) and torch.isfinite(out).all()


@pytest.mark.parametrize("cls", list(PREDICTORS), ids=lambda c: c.__name__)
def test_scale_predictor_contract(cls):
    """bind(Layout.of(quantizer)) + attach_tokenizer -> one continuous residual per predicted scale at
    the latent's sizes, with gradients."""
    tok = bsq_tokenizer()
    net = PREDICTORS[cls]()
    net.bind(Layout.of(tok.quantize))
    net.attach_tokenizer(tok)
    out = net(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert [tuple(r.shape) for r in out] == [(2, 4, h, w) for h, w in tok.quantize.vae_schedule[: net.num_scales]]
    sum(r.sum() for r in out).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("cls", list(REFINERS), ids=lambda c: c.__name__)
def test_refiner_contract(cls):
    """bind(layout) sizes it from the latent channels and the backbone width -> a finite loss with
    gradients, and a residual (B, N, d) per sample, guided ([conditional; unconditional] halves) or not."""
    layout = Layout.of(bsq_tokenizer().quantize, width=32, heads=2)
    ref = REFINERS[cls]()
    ref.bind(layout)
    h, code, target = torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(2, 8, layout.vae_dim)
    loss = ref.loss(h, code, target)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and any(p.grad is not None for p in ref.parameters())
    g = torch.Generator().manual_seed(0)
    assert ref.sample(h, code, generator=g).shape == (2, 8, layout.vae_dim)
    assert ref.sample(h, code, cfg=1.5, generator=g).shape == (1, 8, layout.vae_dim)


@pytest.mark.parametrize("cls", list(LABELS), ids=lambda c: c.__name__)
def test_labels_contract(cls):
    """__call__(SRBatch) -> (B,) long labels; inference(B) -> (B,) long; cfg and neg_label are set."""
    labels = LABELS[cls]()
    batch = SRBatch(hr=torch.rand(3, 3, 8, 8), quality=torch.tensor([1, 0, -1]), degraded=torch.tensor([True, False, True]),
                    label=torch.tensor([0, 2, -1]))
    out, inf = labels(batch), labels.inference(3, "cpu")
    assert out.shape == inf.shape == (3,) and out.dtype == inf.dtype == torch.long
    assert isinstance(labels.cfg, float) and (labels.neg_label is None or isinstance(labels.neg_label, int))


@pytest.mark.parametrize("cls", list(TEXT), ids=lambda c: c.__name__)
def test_text_conditioning_contract(cls):
    """forward(captions) -> features (B, T, dim), key mask (B, T) marking real tokens, pooled (B, dim);
    a caption's features do not depend on the other captions of the batch; a fixed prompt replaces them."""
    enc = TEXT[cls]().eval()
    with torch.no_grad():
        feats, mask, pooled = enc(["a cat", "a photo of a tree in the snow"])
        alone = enc(["a cat"])
    assert feats.shape[:2] == mask.shape and feats.shape[-1] == pooled.shape[-1] == enc.dim and mask.dtype == torch.bool
    n = int(alone[1][0].sum())
    assert torch.allclose(feats[0, :n], alone[0][0, :n], atol=1e-5) and mask[0].sum() == n
    enc.prompt = "fixed"
    assert enc.captions(["x", "y"], 2) == ["fixed", "fixed"]


def test_arfinetune_constructor_is_components_plus_settings_groups():
    """The task takes its six components, the optimiser pair and two settings groups, nothing else."""
    import inspect

    from arsr.tasks.ar import ARFinetune

    params = list(inspect.signature(ARFinetune).parameters)
    assert params == ["transformer", "tokenizer", "labels", "regularizer", "refiner", "scale_predictor",
                      "optimizer", "lr_scheduler", "training", "inference"]
