"""The swap matrix: every meaningful tokenizer x backbone / positions x conditioning x head x
regularizer x refiner combination builds, trains one step and samples through the family
contracts; combinations that cannot work are refused at build time with one line."""

import pytest
import torch

from arsr.components.conditioning import (ByteCaptionEncoder, ConstantLabel, DegradationClasses, EncoderFeatures,
                                          NSARMTransformationNet, PrefixTokens, QualityCFG, T5TextEncoder, TransformationNet)
from arsr.components.heads import BitwiseHead, IndexHead
from arsr.components.posenc import AbsolutePerScale, LearnedResampled, SARoPE
from arsr.components.postprocess import ColorFix
from arsr.components.quantizers import HierarchicalRQ, MultiScaleBSQ, MultiScaleVQ
from arsr.components.refiners import DiffusionRefiner
from arsr.components.regularizers import DPO
from arsr.nn.infinity import InfinityTransformer
from arsr.nn.transformer import NextScaleTransformer
from arsr.nn.vae import HierarchicalVQVAE, VQVAE
from arsr.tasks.ar import ARFinetune, Inference, Training

from conftest import SAMPLE

PN = (1, 2, 4, 8)
RQ = dict(patch_nums=(2, 4, 6, 8), target_sides=(4, 8))


def tokenizer(kind: str):
    vae = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    if kind == "vq":
        return VQVAE(MultiScaleVQ(64, 8, PN), **vae)
    if kind == "rq":
        return HierarchicalVQVAE(HierarchicalRQ(64, 8, **RQ), **vae)
    return VQVAE(MultiScaleBSQ(8, PN), **vae, using_sa=False, using_mid_sa=False, quant_conv_ks=0)


def var(pn, pos, cond=None, head=None, text=None, classes=3):
    return NextScaleTransformer(pos, head or IndexHead(64), cond, text, depth=2, width=64, heads=4, latent_dim=8, patch_nums=pn,
                                num_classes=classes, null_class=classes - 1, cond_drop=0.1, init_adaln_gamma=0.1)


def infinity():
    return InfinityTransformer(text=T5TextEncoder(str(SAMPLE / "tiny_t5")), token_dim=8, text_channels=128, text_maxlen=64, depth=2,
                               width=64, heads=4)


def refiner():
    return DiffusionRefiner(latent_dim=8, cond_dim=64, width=32, depth=1)


COMBOS = {
    "var_vq_absolute": lambda: dict(transformer=var(PN, AbsolutePerScale()), tokenizer=tokenizer("vq"), labels=ConstantLabel(0)),
    "varsr_vq_sarope_prefix_cfg_refiner": lambda: dict(
        transformer=var(PN, SARoPE(), PrefixTokens((8, 16, 32), grid=8), classes=2), tokenizer=tokenizer("vq"),
        labels=QualityCFG(cfg=2.0), refiner=refiner()),
    "vq_learned_encoder_dpo": lambda: dict(transformer=var(PN, LearnedResampled(grid=8), EncoderFeatures(grid=8, latent_dim=8)),
                                           tokenizer=tokenizer("vq"), labels=DegradationClasses(), regularizer=DPO(beta=0.1)),
    "msvar_rq_learned_encoder_dpo": lambda: dict(
        transformer=var(RQ["patch_nums"], LearnedResampled(grid=8), EncoderFeatures(grid=8, latent_dim=8)), tokenizer=tokenizer("rq"),
        labels=DegradationClasses(), regularizer=DPO(beta=0.1)),
    "msvar_rq_with_diffusion_refiner": lambda: dict(transformer=var(RQ["patch_nums"], SARoPE()), tokenizer=tokenizer("rq"),
                                                    labels=ConstantLabel(0), refiner=refiner()),
    "bsq_var_bitwise_text_transformation_net": lambda: dict(
        transformer=var(PN, SARoPE(align=False), head=BitwiseHead(8), text=ByteCaptionEncoder(dim=32, depth=1, heads=2)),
        tokenizer=tokenizer("bsq"), labels=ConstantLabel(0), scale_predictor=TransformationNet(num_scales=2, width=16, downsample=1)),
    "bsq_var_prefix_bitwise_refiner": lambda: dict(transformer=var(PN, SARoPE(), PrefixTokens((8, 16, 32), grid=8), head=BitwiseHead(8)),
                                                   tokenizer=tokenizer("bsq"), labels=ConstantLabel(0), refiner=refiner()),
    "nsarm_infinity_map_net_dpo_colorfix": lambda: dict(
        transformer=infinity(), tokenizer=tokenizer("bsq"), regularizer=DPO(beta=0.1),
        scale_predictor=NSARMTransformationNet(latent_dim=8, grid=2, sides=[1, 2], dims=[32, 32], layers=[1, 1], heads=[2, 2], stem=[16, 16]),
        inference=Inference(cfg=1.0, top_k=0, top_p=0.9, val_samples=0, postprocess=ColorFix())),
    "infinity_bsq_refiner_cfg": lambda: dict(transformer=infinity(), tokenizer=tokenizer("bsq"), refiner=refiner(), inference=Inference(cfg=3.0, top_k=0, top_p=0.9, val_samples=0)),
}


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_combination_trains_a_step_and_samples(name):
    torch.manual_seed(0)
    task = ARFinetune(**(dict(inference=Inference(top_k=0, top_p=0.9, val_samples=0)) | COMBOS[name]()))
    task.log = task.log_dict = lambda *a, **k: None
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 32, 32, generator=g)
    lr = torch.nn.functional.interpolate(hr, size=(8, 8), mode="area")
    batch = {"hr": hr, "lr": lr, "lr_up": torch.nn.functional.interpolate(lr, size=(32, 32), mode="bicubic").clamp(0, 1),
             "quality": torch.tensor([0, 1]), "degraded": torch.tensor([True, False]), "caption": ["a photo of a cat", "a tree"]}
    task.train()
    loss = task.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for p in task.parameters() if p.requires_grad]
    assert sum(int(p.grad is not None and p.grad.abs().sum() > 0) for p in trained) > len(trained) // 2
    task.eval()
    outs = task.super_resolve_any(lr[:1], caption="a photo of a cat")
    assert outs[-1].shape == (1, 3, 32, 32) and torch.isfinite(outs[-1]).all()


@pytest.mark.parametrize("build,message", [
    (lambda: dict(transformer=var(PN, SARoPE(), head=IndexHead(64)), tokenizer=tokenizer("bsq")), "IndexHead scores codebook indices"),
    (lambda: dict(transformer=var(PN, SARoPE(), head=BitwiseHead(8)), tokenizer=tokenizer("vq")), "BitwiseHead predicts bits"),
    (lambda: dict(transformer=var(PN, SARoPE(), head=IndexHead(32)), tokenizer=tokenizer("vq")), "vocab_size 32 != the tokenizer's codebook size 64"),
    (lambda: dict(transformer=var((1, 2, 4), SARoPE()), tokenizer=tokenizer("vq")), "patch_nums"),
    (lambda: dict(transformer=infinity(), tokenizer=tokenizer("vq")), "BitwiseHead predicts bits"),
    (lambda: dict(transformer=InfinityTransformer(token_dim=16, text_channels=128, depth=1, width=64, heads=4), tokenizer=tokenizer("bsq")),
     "16 != the tokenizer.s 8"),
    (lambda: dict(transformer=var(PN, SARoPE()), tokenizer=tokenizer("vq"), scale_predictor=TransformationNet(num_scales=2)),
     "needs a quantizer that takes substituted residuals"),
    (lambda: dict(transformer=infinity(), tokenizer=tokenizer("bsq"),
                  scale_predictor=NSARMTransformationNet(latent_dim=8, grid=2, sides=[1, 2, 8], dims=[32] * 3, layers=[1] * 3, heads=[2] * 3)),
     "built for sides"),
    (lambda: dict(transformer=var(None, SARoPE(), PrefixTokens((8, 16, 32), grid=4)), tokenizer=tokenizer("vq")),  # sized by the tokenizer
     "PrefixTokens grid 4 != the 8x8 map its 3-stage conv stack makes of the 32 px input: set grid 8"),
    (lambda: dict(transformer=var(PN, SARoPE(), EncoderFeatures(grid=4)), tokenizer=tokenizer("vq")),
     "EncoderFeatures grid 4 != the tokenizer's last latent map 8x8: set grid 8"),
    (lambda: dict(transformer=var(PN, SARoPE()), tokenizer=tokenizer("vq"), refiner=DiffusionRefiner(latent_dim=16, width=32, depth=1)),
     "DiffusionRefiner latent_dim 16 != the tokenizer's latent channels 8"),
], ids=["index_head_on_bits", "bitwise_head_on_indices", "vocab", "schedule", "infinity_on_vq", "token_bits", "predictor_on_vq",
        "predictor_sides", "prefix_grid", "encoder_grid", "refiner_channels"])
def test_impossible_combinations_are_refused_at_build(build, message):
    with pytest.raises(ValueError, match=message):
        ARFinetune(**build())


def test_sizes_come_from_the_tokenizer():
    """Recipes state the schedule, latent width and vocabulary once, on the tokenizer."""
    tok = tokenizer("vq")
    task = ARFinetune(NextScaleTransformer(SARoPE(), IndexHead(), depth=2, width=64, heads=4, num_classes=2, null_class=1), tok)
    assert task.transformer.layout.patch_nums == PN and task.transformer.word_embed.in_features == 8
    assert task.transformer.head.head.out_features == 64
    bits = ARFinetune(NextScaleTransformer(SARoPE(), BitwiseHead(), depth=2, width=64, heads=4, num_classes=2, null_class=1), tokenizer("bsq"))
    assert bits.transformer.head.head.out_features == 16


@pytest.mark.parametrize("name", ["varsr_vq_sarope_prefix_cfg_refiner", "msvar_rq_learned_encoder_dpo", "nsarm_infinity_map_net_dpo_colorfix",
                                  "bsq_var_bitwise_text_transformation_net"])
def test_training_step_and_sampling_never_wait_for_the_device(name):
    """GPU hot paths without host syncs: the batch is wrapped as a stand-in device tensor
    (:func:`arsr.testing.on_device`) that raises on ``.item()``, ``.tolist()``, ``if t:``,
    boolean-mask indexing and the like; a training step (Bitwise Self-Correction on for BSQ),
    its backward and KV-cache sampling with CFG run through without one."""
    from arsr.testing import on_device

    torch.manual_seed(0)
    parts = COMBOS[name]()
    if isinstance(parts["tokenizer"].quantize, MultiScaleBSQ):
        parts["tokenizer"].quantize.bsc_scales = 2
    task = ARFinetune(**(dict(inference=Inference(top_k=0, top_p=0.9, val_samples=0)) | parts))
    task.log = task.log_dict = lambda *a, **k: None
    hr = torch.rand(2, 3, 32, 32)
    lr = torch.nn.functional.interpolate(hr, size=(8, 8), mode="area")
    batch = on_device({"hr": hr, "lr": lr, "lr_up": torch.nn.functional.interpolate(lr, size=(32, 32), mode="bicubic").clamp(0, 1),
                       "quality": torch.tensor([0, 1]), "degraded": torch.tensor([True, False])}) | {"caption": ["a cat", "a tree"]}
    task.train()
    loss = task.training_step(batch, 0)
    loss.backward()
    assert type(loss).__name__ == "DeviceTensor"  # the check really followed the batch through the step
    task.eval()
    tokens, f_hat = task.sample_tokens(batch["lr_up"] * 2 - 1, generator=torch.Generator().manual_seed(0), lr=batch["lr"] * 2 - 1,
                                       captions=["a cat", "a tree"], cfg=2.0)
    assert f_hat.shape[0] == 2 and type(f_hat).__name__ == "DeviceTensor"


@pytest.mark.parametrize("pos", [AbsolutePerScale, lambda: LearnedResampled(grid=8)], ids=["absolute", "learned_resampled"])
def test_var_backbone_on_a_non_square_schedule(pos):
    """The Layout holds (h, w) per scale: a VAR-family backbone trains and samples on Infinity-style
    rectangular token maps (here 1x1, 1x2, 2x4, 4x8 for a 16 x 32 image)."""
    torch.manual_seed(0)
    sched = [(1, 1), (1, 2), (2, 4), (4, 8)]
    tok = VQVAE(MultiScaleBSQ(8, sched), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False, using_mid_sa=False, quant_conv_ks=0)
    tr = NextScaleTransformer(pos(), BitwiseHead(), None, depth=2, width=64, heads=4, num_classes=1, null_class=None, cond_drop=0.0)
    task = ARFinetune(tr, tok, inference=Inference(top_k=0, top_p=0.9, val_samples=0))
    task.log = task.log_dict = lambda *a, **k: None
    assert tr.layout.schedule == tuple(sched) and tr.layout.total_len == 1 + 2 + 8 + 32
    hr = torch.rand(2, 3, 16, 32)
    lr = torch.nn.functional.interpolate(hr, scale_factor=0.25, mode="area")
    loss = task.training_step({"hr": hr, "lr": lr, "lr_up": torch.nn.functional.interpolate(lr, size=(16, 32), mode="bicubic")}, 0)
    loss.backward()
    tokens, f_hat = task.sample_tokens(hr * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert [t.shape[1] for t in tokens] == [h * w for h, w in sched] and f_hat.shape == (2, 8, 4, 8) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="not square"):
        NextScaleTransformer(SARoPE(), BitwiseHead(), None, depth=1, width=32, heads=2, num_classes=1, null_class=None).bind(tok.quantize)
