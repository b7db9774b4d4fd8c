"""Multi-scale VQ tokenizer: official layout, decomposition identities, conversion, fine-tuning."""

import pytest
import torch
from safetensors.torch import load_file

from arsr.components.quantizers import MultiScaleVQ
from arsr.components.quantizers.multiscale_vq import phi_index_table
from arsr.convert import PRESETS, build, convert
from arsr.nn.vae import VQVAE


def tiny_vae(**quant):
    return VQVAE(MultiScaleVQ(64, 8, (1, 2, 3, 4), **quant), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


@pytest.fixture(scope="module")
def var_vae():
    return build(PRESETS["var_vqvae"].component)


def test_official_var_vqvae_layout(var_vae):
    """Keys, shapes and parameter counts of vae_ch160v4096z32 (reference facts A.1, A.6)."""
    sd = var_vae.state_dict()
    assert len(sd) == 324
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert n(var_vae) == 108_948_355 and n(var_vae.encoder) == 44_107_872 and n(var_vae.decoder) == 64_653_923
    assert n(var_vae.quantize) == 168_064
    expected = {
        "encoder.conv_in.weight": (160, 3, 3, 3),
        "encoder.down.0.downsample.conv.weight": (160, 160, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
        "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
        "encoder.mid.attn_1.proj_out.weight": (640, 640, 1, 1),
        "encoder.conv_out.weight": (32, 640, 3, 3),
        "decoder.conv_in.weight": (640, 32, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
        "decoder.up.3.block.0.conv1.weight": (320, 640, 3, 3),
        "decoder.up.4.attn.2.norm.weight": (640,),
        "decoder.up.4.upsample.conv.weight": (640, 640, 3, 3),
        "decoder.conv_out.weight": (3, 160, 3, 3),
        "quantize.ema_vocab_hit_SV": (10, 4096),
        "quantize.quant_resi.qresi_ls.3.weight": (32, 32, 3, 3),
        "quantize.embedding.weight": (4096, 32),
        "quant_conv.weight": (32, 32, 3, 3),
        "post_quant_conv.bias": (32,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert sum(1 for k in sd if k.startswith("encoder.down.4.attn.")) == 12  # 2 attn blocks x 6 tensors


def test_phi_tables():
    assert phi_index_table(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)
    assert phi_index_table(12, 4) == (0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3)
    assert phi_index_table(14, 4) == (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3)


class IdentityLookupVQ(MultiScaleVQ):
    """Quantizer whose 'codes' are the inputs themselves: isolates the residual bookkeeping."""

    def _walk(self, f, num_scales=None):
        H, rest = f.shape[-1], f.clone()
        for si, pn in enumerate(self.patch_nums[:num_scales]):
            z = torch.nn.functional.interpolate(rest, size=(pn, pn), mode="area") if pn != H else rest
            h = self.phi(si, torch.nn.functional.interpolate(z, size=(H, H), mode="bicubic") if pn != H else z)
            rest = rest - h
            yield si, z, h


@pytest.mark.parametrize("variant", [dict(phi_at_last_scale=False), dict(phi_ratio=0.0)])
def test_identity_quantizer_residuals_sum_to_f(variant):
    q = IdentityLookupVQ(16, 4, (1, 2, 3, 5, 8), **variant)
    f = torch.randn(2, 4, 8, 8)
    total = sum(h for _, _, h in q._walk(f))
    assert torch.allclose(total, f, atol=1e-5)


def test_indices_round_trip_and_teacher_input():
    torch.manual_seed(0)
    q = MultiScaleVQ(32, 4, (1, 2, 3, 4))
    f = torch.randn(2, 4, 4, 4)
    idx = q.f_to_indices(f)
    assert [i.shape for i in idx] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    # f_hat from indices equals the quantised training forward, and the residual shrinks with scales
    out = q.eval()(f)
    assert torch.allclose(q.indices_to_fhat(idx), out.f_hat, atol=1e-5)
    errs = [(f - q.indices_to_fhat(idx, upto=k)).pow(2).mean() for k in range(1, 5)]
    assert errs[-1] < errs[0]
    x = q.indices_to_teacher_input(idx)
    assert x.shape == (2, 4 + 9 + 16, 4)
    # VAR's running update (f_hat += Phi(up(codes)), next input = area_down(f_hat)) equals step_input
    f_hat = torch.zeros(2, 4, 4, 4)
    for si, pn in enumerate(q.patch_nums[:-1]):
        f_hat = f_hat + q.phi(si, torch.nn.functional.interpolate(q.embed(idx[si], pn), size=(4, 4), mode="bicubic"))
        nxt = torch.nn.functional.interpolate(f_hat, size=(q.patch_nums[si + 1],) * 2, mode="area").flatten(2).transpose(1, 2)
        assert torch.allclose(q.step_input(idx[: si + 1]), nxt, atol=1e-5)


def test_varsr_last_scale_variant_adds_raw_codes():
    q = MultiScaleVQ(32, 4, (1, 2, 4), phi_at_last_scale=False)
    idx = q.f_to_indices(torch.randn(1, 4, 4, 4))
    diff = q.indices_to_fhat(idx) - q.indices_to_fhat(idx, upto=2)
    assert torch.allclose(diff, q.embed(idx[2], 4))


def test_scale_dropout_keeps_a_prefix():
    torch.manual_seed(1)
    q = MultiScaleVQ(32, 4, (1, 2, 3, 4), scale_dropout=1.0).train()
    kept = {len(q(torch.randn(1, 4, 4, 4)).indices) for _ in range(20)}
    assert kept <= {1, 2, 3} and len(kept) > 1
    assert len(q.eval()(torch.randn(1, 4, 4, 4)).indices) == 4


def test_per_scale_decode_shapes():
    vae = tiny_vae()
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    idx = vae.img_to_indices(img)
    assert len(idx) == 4 and vae.indices_to_img(idx).shape == (2, 3, 16, 16)


def test_convert_round_trip_and_refusal(tmp_path, var_vae):
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in var_vae.state_dict().items()}
    torch.save({"trainer": {"vae_local": sd, "config": {"patch_nums": 1}}, "epoch": 3}, tmp_path / "VQVAE.pth")
    out = convert(tmp_path / "VQVAE.pth", "varsr_vqvae", tmp_path / "varsr_vqvae")
    back = load_file(out)
    for k, v in sd.items():
        if k != "quantize.ema_vocab_hit_SV" or v.shape == back[k].shape:
            assert torch.equal(back[k], v), k
    assert "phi_at_last_scale: false" in out.with_suffix(".yaml").read_text() and "tokenizer:" in out.with_suffix(".yaml").read_text()
    # a wrong file is refused with the expected model and the first differing keys
    bad = dict(sd)
    bad.pop("decoder.conv_out.weight")
    bad["decoder.conv_in.weight"] = torch.zeros(640, 16, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"not a VAR VQVAE.*missing 1: \['decoder.conv_out.weight'\].*decoder.conv_in.weight"):
        convert(tmp_path / "bad.pth", "var_vqvae", tmp_path / "bad")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights-only"):
        convert(tmp_path / "junk.pth", "var_vqvae", tmp_path / "junk")


def test_finetune_loss_falls():
    from arsr.tasks.tokenizer import TokenizerFinetune

    torch.manual_seed(0)
    task = TokenizerFinetune(tiny_vae(), l2_weight=1.0)
    opt = torch.optim.AdamW(task.parameters(), lr=2e-3)
    img = torch.rand(4, 3, 1, 1).expand(4, 3, 16, 16).contiguous()  # smooth images: learnable fast
    task.log = lambda *a, **k: None
    task.log_dict = lambda *a, **k: None
    losses = []
    for step in range(40):
        loss = task.training_step({"hr": img}, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5


def test_trainable_prefixes_freeze_the_rest():
    from arsr.tasks.tokenizer import TokenizerFinetune

    task = TokenizerFinetune(tiny_vae(), trainable=["quantize"])
    train = {n for n, p in task.tokenizer.named_parameters() if p.requires_grad}
    assert train and all(n.startswith("quantize.") for n in train)
    with pytest.raises(ValueError, match="matches no tokenizer parameter"):
        TokenizerFinetune(tiny_vae(), trainable=["decoders"])


def test_hierarchical_step_mapping_and_token_count():
    from arsr.components.quantizers import HierarchicalRQ

    q = HierarchicalRQ()
    assert q.last_step == (3, 6, 10)
    assert sum(pn * pn for pn in q.patch_nums) == 3452
    assert [sum(pn * pn for pn in q.patch_nums[a:b]) for a, b in ((0, 3), (3, 6), (6, 10))] == [116, 552, 2784]
    assert [q.scale_of_step(k) for k in range(1, 11)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]


def _tiny_hier():
    from arsr.components.quantizers import HierarchicalRQ
    from arsr.nn.vae import HierarchicalVQVAE

    return HierarchicalVQVAE(HierarchicalRQ(64, 8, (1, 2, 4, 6, 8), (2, 4, 8)), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


def test_hierarchical_reuses_lower_scale_tokens_and_decodes_each_scale():
    torch.manual_seed(0)
    vae = _tiny_hier()
    q = vae.quantize
    assert q.last_step == (2, 3, 5)
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    fs = vae.encode(img)
    assert [f.shape[-1] for f in fs] == [2, 4, 8]
    idx = q.f_to_indices(fs)
    assert [i.shape[1] for i in idx] == [1, 4, 16, 36, 64]
    # lower-scale tokens are never re-quantised: steps 1-2 depend on the 1x features alone
    other = q.f_to_indices([fs[0], torch.randn_like(fs[1]) * 3, torch.randn_like(fs[2]) * 3])
    assert torch.equal(other[0], idx[0]) and torch.equal(other[1], idx[1])
    assert not torch.equal(other[2], idx[2]) and not torch.equal(other[4], idx[4])
    # per-scale decodes: steps 1-2 -> 8 px, 1-3 -> 16 px, 1-5 -> 32 px
    assert [vae.decode(q.indices_to_fhat(idx, upto=k)).shape[-1] for k in (2, 3, 5)] == [8, 16, 32]
    out = q(fs)
    assert [f.shape[-1] for f in out.f_hats] == [2, 4, 8]
    assert torch.allclose(out.f_hats[1], q.indices_to_fhat(idx, upto=3), atol=1e-5)
    assert q.indices_to_teacher_input(idx).shape == (2, 4 + 16 + 36 + 64, 8)


def test_hierarchical_identity_codes_recover_each_scale():
    """With codes equal to the residual (identity lookup, Phi = identity), every scale reconstructs its features."""
    from arsr.components.quantizers import HierarchicalRQ

    q = HierarchicalRQ(16, 4, (1, 2, 4, 8), (2, 8), phi_ratio=0.0)
    q.nearest = lambda z: z  # codes are the residual itself
    q.embed = lambda z, pn: z
    fs = [torch.randn(1, 4, 2, 2), torch.randn(1, 4, 8, 8)]
    _, _, f_hats, _ = q._hierarchical(fs, False)
    assert torch.allclose(f_hats[1], fs[1], atol=1e-5) and torch.allclose(f_hats[0], fs[0], atol=1e-5)


def test_single_decoder_weights_load_into_every_scale_decoder():
    from arsr.checkpoint import load_into

    vae = _tiny_hier()
    single = {k.replace("decoders.0.", "decoder."): torch.randn_like(v) for k, v in vae.state_dict().items()
              if not k.startswith(("decoders.1.", "decoders.2."))}
    load_into(vae, single, "test")
    for n in range(3):
        assert torch.equal(vae.decoders[n].conv_out.weight, single["decoder.conv_out.weight"])


def test_hierarchical_finetune_step_trains_vocab_and_decoders():
    from arsr.tasks.tokenizer import TokenizerFinetune

    task = TokenizerFinetune(_tiny_hier(), trainable=["quantize.embedding", "decoders"], bypass_prob=0.0, l2_weight=1.0)
    task.log = task.log_dict = lambda *a, **k: None
    loss = task.training_step({"hr": torch.rand(2, 3, 32, 32)}, 0)
    loss.backward()
    grads = {n for n, p in task.tokenizer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "quantize.embedding.weight" in grads and any(n.startswith("decoders.0.") for n in grads)
    assert any(n.startswith("decoders.2.") for n in grads) and not any(n.startswith("encoder.") for n in grads)
