"""BSQ quantizer, Infinity schedules and NSARM Algorithms 1-2, against Infinity's official behaviour."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from arsr import schedules
from arsr.components.quantizers import MultiScaleBSQ, relabel_after_substitution
from arsr.nn.vae import VQVAE

ORACLE = Path(__file__).parent / "oracles" / "infinity_tiny"


def area(x, hw):
    return x if tuple(x.shape[-2:]) == tuple(hw) else F.interpolate(x, size=hw, mode="area")


def up(x, hw):  # Infinity's trilinear upsampling with t = 1
    return x if tuple(x.shape[-2:]) == tuple(hw) else F.interpolate(x[:, :, None], size=(1, *hw), mode="trilinear")[:, :, 0]


def test_bsq_codes_are_signs_on_the_sphere():
    q = MultiScaleBSQ(dim=8, schedule=[1, 2, 4])
    z = torch.randn(3, 8, 4, 4)
    code, bits, loss = q.bsq(z)
    assert torch.allclose(code.abs(), torch.full_like(code, 1 / math.sqrt(8)))
    assert torch.allclose(code.pow(2).sum(1), torch.ones(3, 4, 4))  # unit norm per position
    assert torch.equal(torch.sign(code), torch.sign(z))
    assert bits.shape == (3, 8, 4, 4) and set(bits.unique().tolist()) <= {0, 1}
    assert torch.allclose(q.codes(q.to_tokens(bits), 2), code)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_straight_through_gradient_reaches_the_latent():
    q = MultiScaleBSQ(dim=4, schedule=[1, 2])
    f = torch.randn(2, 4, 2, 2, requires_grad=True)
    q(f).f_hat.sum().backward()
    assert f.grad is not None and f.grad.abs().sum() > 0


def test_infinity_schedules():
    sizes = {pn: schedules.tokens(schedules.infinity_schedule(pn)) for pn in schedules.INFINITY_PN}
    assert sizes == {"0.06M": 521, "0.25M": 2521, "0.60M": 6425, "1M": 10521}  # facts D
    assert schedules.resolve("0.06M") == ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16))
    tall = schedules.infinity_schedule("1M", 1.5)
    assert tall[2:5] == ((3, 2), (6, 4), (9, 6)) and tall[-1] == (78, 52)
    wide = schedules.infinity_schedule("1M", 0.66)
    assert wide[-1] == (52, 78) and schedules.nearest_template(0.66) == 0.666
    assert schedules.nearest_template(1.1) == 1.0 and len(schedules.INFINITY_TEMPLATES) == 15
    assert schedules.rope_grid(schedules.infinity_schedule("0.06M")) == (64, 64)  # positions live on the 1M grid
    q = MultiScaleBSQ(dim=8, schedule="0.25M", aspect=1.5)
    assert q.schedule == tall[:10] and q.vae_schedule == q.schedule
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.resolve("2M")


def test_algorithm1_pyramid_is_infinitys_walk():
    torch.manual_seed(0)
    q = MultiScaleBSQ(dim=6, schedule=[1, 2, 3, 5])
    f = torch.randn(2, 6, 5, 5)
    p = q.decompose(f)
    assert [b.shape for b in p.bits] == [(2, 1, 6), (2, 4, 6), (2, 9, 6), (2, 25, 6)]
    assert torch.allclose(q.indices_to_fhat(p.bits), p.f_hat, atol=1e-6)
    assert torch.allclose(q.indices_to_teacher_input(p.bits), p.inputs, atol=1e-6)
    # restate Infinity's trainer: residual area-down, codes up trilinear, next input trilinear-down
    acc, inputs = torch.zeros_like(f), []
    for si, hw in enumerate(q.vae_schedule):
        r = area(f - acc, hw)
        assert torch.allclose(p.residuals[si], r, atol=1e-6)
        code = torch.where(F.normalize(r, dim=1) > 0, 1.0, -1.0) / math.sqrt(6)
        assert torch.allclose(p.codes[si], code)
        acc = acc + up(code, (5, 5))
        if si < 3:
            nxt = q.vae_schedule[si + 1]
            inputs.append(F.interpolate(acc[:, :, None], size=(1, *nxt), mode="trilinear")[:, :, 0].flatten(2).transpose(1, 2))
    assert torch.allclose(p.inputs, torch.cat(inputs, 1), atol=1e-6)
    # NSARM's released sampler shrinks with area instead
    qa = MultiScaleBSQ(dim=6, schedule=[1, 2, 3, 5], next_input="area")
    assert torch.allclose(qa.decompose(f).inputs[:, :4], area(q.indices_to_fhat(p.bits[:1]), (2, 2)).flatten(2).transpose(1, 2), atol=1e-6)
    assert not torch.allclose(qa.decompose(f).inputs, p.inputs)


def test_oracle_next_scale_inputs_and_summed_codes():
    """Official Infinity sampling on forced bits: bilinear next-scale inputs and the summed codes."""
    io = load_file(ORACLE / "io.safetensors")
    q = MultiScaleBSQ(dim=8, schedule="0.06M")
    bits = [io[f"kv_bits_{i}"].long() for i in range(7)]
    assert torch.allclose(q.indices_to_teacher_input(bits), io["kv_inputs"], atol=1e-5)
    assert torch.allclose(q.indices_to_fhat(bits), io["kv_summed_codes"], atol=1e-5)


def test_algorithm2_quantises_the_substituted_residuals():
    torch.manual_seed(1)
    q = MultiScaleBSQ(dim=6, schedule=[1, 2, 3, 5])
    f = torch.randn(2, 6, 5, 5)
    gt = q.decompose(f)
    # substituting the GT residuals reproduces Algorithm 1 exactly
    same = relabel_after_substitution(q, f, gt.residuals[:2])
    assert all(torch.equal(a, b) for a, b in zip(same.bits, gt.bits)) and torch.allclose(same.inputs, gt.inputs)
    # other residuals: their BSQ codes (not the raw values) are accumulated and are the labels
    pred = [r + 0.5 * torch.randn_like(r) for r in gt.residuals[:2]]
    new = relabel_after_substitution(q, f, pred)
    for k in range(2):
        code = torch.where(F.normalize(pred[k], dim=1) > 0, 1.0, -1.0) / math.sqrt(6)
        assert torch.allclose(new.codes[k], code)
        assert torch.equal(new.bits[k], (pred[k] > 0).long().flatten(2).transpose(1, 2))
    left = f - up(new.codes[0], (5, 5)) - up(new.codes[1], (5, 5))
    assert torch.allclose(new.residuals[2], area(left, (3, 3)), atol=1e-6)
    assert not torch.equal(new.bits[3], gt.bits[3])
    with pytest.raises(ValueError, match="substituted scale 2 has size"):
        relabel_after_substitution(q, f, [gt.residuals[0], gt.residuals[2]])


def test_algorithm2_gradients_reach_the_substituted_residuals():
    torch.manual_seed(2)
    q = MultiScaleBSQ(dim=6, schedule=[1, 2, 3, 5])
    f = torch.randn(2, 6, 5, 5)
    subs = [r.clone().requires_grad_(True) for r in q.decompose(f).residuals[:2]]
    tf = q.teacher(f, subs)
    tf.inputs[:, 5:].pow(2).sum().backward()  # inputs of scales 3..4 only: through the accumulation
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in subs)


def test_bitwise_self_correction():
    torch.manual_seed(3)
    f = torch.randn(2, 8, 8, 8)
    clean = MultiScaleBSQ(dim=8, schedule=[1, 2, 4, 8]).decompose(f)
    q = MultiScaleBSQ(dim=8, schedule=[1, 2, 4, 8], bsc_scales=4, bsc_strength=0.3)
    assert torch.equal(torch.cat(q.teacher(f).tokens, 1), torch.cat(clean.bits, 1))  # off unless corrupt
    torch.manual_seed(0)
    flips = [q.flip(b) for b in torch.ones(200, 1, 100).long().unbind(0)]
    rates = torch.tensor([1 - x.float().mean().item() for x in flips])
    assert rates.max() <= 0.3 + 0.12 and rates.max() > 0.15 and (rates < 0.02).any()  # strength drawn from {0..0.3}
    torch.manual_seed(5)
    p = q.walk(f, corrupt=True)[0]
    assert torch.equal(p.bits[0], clean.bits[0])  # the label is the clean bits of the current residual
    assert not torch.allclose(p.inputs, clean.inputs)  # the accumulation holds flipped codes
    acc = sum(up(c, (8, 8)) for c in p.codes[:2])  # later residuals are taken against the corrupted sum
    assert torch.allclose(p.residuals[2], area(f - acc, (4, 4)), atol=1e-6)
    assert torch.equal(p.bits[2], (F.normalize(p.residuals[2], dim=1) > 0).long().flatten(2).transpose(1, 2))


def test_patchify_tokens_are_2x2_unshuffled_cells():
    q = MultiScaleBSQ(dim=14, schedule=[1, 2, 4], patchify=True)
    assert q.vae_schedule == ((2, 2), (4, 4), (8, 8)) and q.token_dim == 56
    f = torch.randn(2, 14, 8, 8)
    p = q.decompose(f)
    assert [b.shape for b in p.bits] == [(2, 1, 56), (2, 4, 56), (2, 16, 56)] and p.inputs.shape == (2, 20, 56)
    bits = (torch.rand(2, 14, 4, 4) > 0.5).long()
    assert torch.equal(q.from_tokens(q.to_tokens(bits), 1), bits)
    # official layout: token (i, j) holds channel c of cell (2i + a, 2j + b) at 4c + 2a + b
    tok = q.to_tokens(bits)
    assert tok[0, 1, 4 * 3 + 2 * 1 + 0] == bits[0, 3, 1, 2]
    assert torch.allclose(q.indices_to_fhat(p.bits), p.f_hat, atol=1e-6)


def test_bsq_in_the_autoencoder():
    vae = VQVAE(MultiScaleBSQ(dim=8, schedule=[1, 2, 4]), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
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
    vae.quantize.schedule = ((1, 1), (2, 2), (4, 4))  # a 64 px image has a 4x4 latent
    bits = vae.img_to_indices(img)
    assert [b.shape for b in bits] == [(1, 1, 32), (1, 4, 32), (1, 16, 32)] and vae.indices_to_img(bits).shape == img.shape


def test_infinity_attention_q_k_v_are_fused():
    from arsr.convert import unwrap_infinity_keys

    q, k, v = torch.randn(4, 4, 1, 1), torch.randn(4, 4, 1, 1), torch.randn(4, 4, 1, 1)
    out = unwrap_infinity_keys({"encoder.mid.attn_1.q.weight": q, "encoder.mid.attn_1.k.weight": k, "encoder.mid.attn_1.v.weight": v})
    assert torch.equal(out["encoder.mid.attn_1.qkv.weight"], torch.cat([q, k, v])) and len(out) == 1
