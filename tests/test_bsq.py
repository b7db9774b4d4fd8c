"""BSQ quantizer and NSARM Algorithms 1-2."""

import math

import pytest
import torch

from arsr.components.quantizers import MultiScaleBSQ, relabel_after_substitution
from arsr.nn.vae import VQVAE


def test_bsq_codes_are_signs_on_the_sphere():
    q = MultiScaleBSQ(dim=8, patch_nums=(1, 2, 4))
    z = torch.randn(3, 8, 4, 4)
    code, bits, loss = q.bsq(z)
    assert torch.allclose(code.abs(), torch.full_like(code, 1 / math.sqrt(8)))
    assert torch.allclose(code.pow(2).sum(1), torch.ones(3, 4, 4))  # unit norm per position
    assert torch.equal(torch.sign(code), torch.sign(z))
    assert bits.shape == (3, 16, 8) and set(bits.unique().tolist()) <= {0, 1}
    assert torch.allclose(q.codes_from_bits(bits, 4), code)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_straight_through_gradient_reaches_the_latent():
    q = MultiScaleBSQ(dim=4, patch_nums=(1, 2))
    f = torch.randn(2, 4, 2, 2, requires_grad=True)
    q(f).f_hat.sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_algorithm1_pyramid_round_trip():
    torch.manual_seed(0)
    q = MultiScaleBSQ(dim=6, patch_nums=(1, 2, 3, 5))
    f = torch.randn(2, 6, 5, 5)
    p = q.decompose(f)
    assert [b.shape for b in p.bits] == [(2, 1, 6), (2, 4, 6), (2, 9, 6), (2, 25, 6)]
    assert torch.allclose(q.indices_to_fhat(p.bits), p.f_hat, atol=1e-6)
    assert torch.allclose(q.indices_to_teacher_input(p.bits), p.inputs, atol=1e-6)
    assert p.inputs.shape == (2, 4 + 9 + 25, 6)
    # each residual is what the earlier scales left over, seen at this scale
    left = f - sum(torch.nn.functional.interpolate(c, size=(5, 5), mode="bilinear") if c.shape[-1] != 5 else c for c in p.codes[:2])
    assert torch.allclose(p.residuals[2], torch.nn.functional.interpolate(left, size=(3, 3), mode="area"), atol=1e-5)


def test_algorithm2_consistency():
    torch.manual_seed(1)
    q = MultiScaleBSQ(dim=6, patch_nums=(1, 2, 3, 5))
    f = torch.randn(2, 6, 5, 5)
    gt = q.decompose(f)
    # substituting the GT codes reproduces Algorithm 1 exactly
    same = relabel_after_substitution(q, f, gt.codes[:2])
    assert all(torch.equal(a, b) for a, b in zip(same.bits, gt.bits)) and torch.allclose(same.inputs, gt.inputs)
    # substituting other values changes the later labels, never the substituted scales' own inputs
    pred = [c + 0.3 * torch.randn_like(c) for c in gt.codes[:2]]
    new = relabel_after_substitution(q, f, pred)
    assert torch.equal(new.codes[0], pred[0]) and torch.equal(new.codes[1], pred[1])
    assert not torch.equal(new.bits[3], gt.bits[3])
    # the later scales are the BSQ of what the substituted scales left over
    up = lambda c: torch.nn.functional.interpolate(c, size=(5, 5), mode="bilinear") if c.shape[-1] != 5 else c
    left = f - up(pred[0]) - up(pred[1])
    z2 = torch.nn.functional.interpolate(left, size=(3, 3), mode="area")
    assert torch.allclose(new.codes[2], q.bsq(z2)[0], atol=1e-6)
    with pytest.raises(ValueError, match="substituted scale of side 3"):
        relabel_after_substitution(q, f, [gt.codes[0], gt.codes[2]])


def test_bsq_in_the_autoencoder():
    vae = VQVAE(MultiScaleBSQ(dim=8, patch_nums=(1, 2, 4)), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, out = vae(img)
    assert rec.shape == img.shape and len(out.indices) == 3
    assert vae.indices_to_img(vae.img_to_indices(img)).shape == img.shape


def _wrapped(name: str) -> str:
    """arsr key -> the name Infinity's wrapper modules give it (Conv / Normalize hold .conv / .norm)."""
    leaf = name.rsplit(".", 1)
    mod = leaf[0].rsplit(".", 1)[-1]
    if mod.startswith("norm"):
        return f"{leaf[0]}.norm.{leaf[1]}"
    if mod.startswith("conv") or mod == "nin_shortcut" or mod in ("qkv", "proj_out"):
        return f"{leaf[0]}.conv.{leaf[1]}"
    return name


@pytest.mark.parametrize("wrapped", [False, True])
def test_infinity_vae_conversion(tmp_path, wrapped):
    from safetensors.torch import load_file

    from arsr.convert import PRESETS, build, convert

    vae = build(PRESETS["infinity_vae_d32"].component)
    sd = vae.state_dict()
    assert "quant_conv.weight" not in sd and not any(".attn" in k for k in sd)  # Infinity: no quant convs, no attention
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3) and sd["decoder.conv_in.weight"].shape == (512, 32, 3, 3)
    assert len([k for k in sd if k.startswith("decoder.up.0.block.") and k.endswith("conv1.weight")]) == 3
    official = {(_wrapped(k) if wrapped else k): torch.randn_like(v) for k, v in sd.items()}
    official["quantizer.lfq.mask"] = 2 ** torch.arange(31, -1, -1)
    torch.save({"vae": official, "step": 7}, tmp_path / "infinity_vae_d32reg.pth")
    back = load_file(convert(tmp_path / "infinity_vae_d32reg.pth", "infinity_vae_d32", tmp_path / "inf"))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], official[_wrapped(k) if wrapped else k]), k
    # and it tokenises into bits and decodes
    vae.load_state_dict(back)
    img = torch.rand(1, 3, 64, 64) * 2 - 1
    vae.quantize.patch_nums = (1, 2, 4)  # a 64 px image has a 4x4 latent
    bits = vae.img_to_indices(img)
    assert [b.shape for b in bits] == [(1, 1, 32), (1, 4, 32), (1, 16, 32)] and vae.indices_to_img(bits).shape == img.shape


def test_infinity_attention_q_k_v_are_fused():
    from arsr.convert import unwrap_infinity_keys

    q, k, v = torch.randn(4, 4, 1, 1), torch.randn(4, 4, 1, 1), torch.randn(4, 4, 1, 1)
    out = unwrap_infinity_keys({"encoder.mid.attn_1.q.weight": q, "encoder.mid.attn_1.k.weight": k, "encoder.mid.attn_1.v.weight": v})
    assert torch.equal(out["encoder.mid.attn_1.qkv.weight"], torch.cat([q, k, v])) and len(out) == 1
