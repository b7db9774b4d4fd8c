"""Converting official VAR / VARSR transformer checkpoints (tiny stand-ins with the official key layout)."""

import pytest
import torch
from safetensors.torch import load_file

from arsr import convert as conv
from arsr.convert import PN_256, Preset, _var, build


def official_from(arsr_state: dict, L: int) -> dict:
    """Rename arsr keys back to the official VAR names and add the derived buffers VAR saves."""
    out = {}
    for k, v in arsr_state.items():
        k = k.replace("pos_enc.pos_1LC", "pos_1LC").replace("head.head_nm.", "head_nm.").replace("head.head.", "head.")
        k = k.replace("conditioning.con_embedding.", "con_embedding.")
        out[k] = v.clone()
    out["lvl_1L"] = torch.zeros(1, L, dtype=torch.long)
    out["attn_bias_for_masking"] = torch.zeros(1, 1, L, L)
    return out


def test_var_transformer_round_trip(tmp_path, monkeypatch):
    spec = _var(2, PN_256)
    monkeypatch.setitem(conv.PRESETS, "tiny_var", Preset("tiny VAR", spec, key_map=conv.VAR_KEYS, out_prefix="transformer."))
    model = build(spec)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    off = official_from(sd, 680)
    assert "pos_1LC" in off and "head_nm.ada_lin.1.weight" in off and "head.weight" in off
    torch.save(off, tmp_path / "var.pth")
    out = conv.convert(tmp_path / "var.pth", "tiny_var", tmp_path / "var")
    back = load_file(out)
    assert set(back) == {f"transformer.{k}" for k in sd}
    assert all(torch.equal(back[f"transformer.{k}"], v) for k, v in sd.items())
    # the same model, rebuilt and loaded, computes the same logits as the source weights
    fresh = build(spec)
    fresh.load_state_dict({k[len("transformer."):]: v for k, v in back.items()})
    model.load_state_dict(sd)
    x, label = torch.randn(1, 679, 32), torch.tensor([3])
    assert torch.allclose(fresh.eval()(label, x), model.eval()(label, x))
    del off["blocks.1.ffn.fc2.weight"]
    torch.save(off, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"tiny VAR.*missing 1: \['blocks.1.ffn.fc2.weight'\]"):
        conv.convert(tmp_path / "bad.pth", "tiny_var", tmp_path / "bad")


def test_varsr_layout_routes_refiner_and_lr_encoder(tmp_path, monkeypatch):
    spec = _var(2, [1, 2, 4], num_classes=2, null_class=None, cond_drop=0.0,
                conditioning={"class_path": "arsr.components.conditioning.PrefixTokens", "init_args": {"channels": [8, 16], "grid": 4}})
    spec["init_args"]["pos_enc"] = {"class_path": "arsr.components.posenc.SARoPE"}
    ref = {"class_path": "arsr.components.refiners.DiffusionRefiner", "init_args": {"latent_dim": 32, "cond_dim": 128, "width": 16, "depth": 1}}
    p = conv.PRESETS["varsr"]
    monkeypatch.setitem(conv.PRESETS, "tiny_varsr", Preset("tiny VARSR", spec, p.wrapped_keys, key_map=p.key_map, parts=(("refiner.", ref),), out_prefix="transformer."))
    model, refiner = build(spec), build(ref)
    assert "pos_enc.pos_1LC" not in model.state_dict()  # SA-RoPE has no table
    off = official_from(model.state_dict(), 21 + 16) | {k: v.clone() for k, v in refiner.state_dict().items()}
    assert "con_embedding.blocks.1.weight" in off and "diffloss.net.final_layer.linear.weight" in off and "decoder_norm.weight" in off
    torch.save({"trainer": {"var_wo_ddp": off}, "epoch": 1}, tmp_path / "VARSR.pth")
    back = load_file(conv.convert(tmp_path / "VARSR.pth", "tiny_varsr", tmp_path / "varsr"))
    assert torch.equal(back["refiner.decoder_norm.weight"], refiner.state_dict()["decoder_norm.weight"])
    assert torch.equal(back["transformer.conditioning.con_embedding.conv_out.weight"], model.state_dict()["conditioning.con_embedding.conv_out.weight"])
    assert (tmp_path / "varsr.yaml").read_text().count("class_path: arsr.components.refiners.DiffusionRefiner") == 1


def test_partial_init_from_var_weights(tmp_path, capsys):
    """MSVAR-style start from VAR weights: matching tensors load, the rest keeps its initialisation."""
    from safetensors.torch import save_file

    from arsr.components.conditioning import DegradationClasses, EncoderFeatures
    from arsr.components.heads import IndexHead
    from arsr.components.posenc import AbsolutePerScale, LearnedResampled
    from arsr.components.quantizers import MultiScaleVQ
    from arsr.nn.transformer import NextScaleTransformer
    from arsr.nn.vae import VQVAE
    from arsr.tasks.ar import ARFinetune, Inference, Training

    pn = (1, 2, 4)
    kw = dict(depth=1, width=32, heads=2, latent_dim=8, patch_nums=pn)
    var = NextScaleTransformer(AbsolutePerScale(), IndexHead(32), None, num_classes=11, null_class=10, **kw)
    save_file({f"transformer.{k}": v.contiguous() for k, v in var.state_dict().items()}, tmp_path / "var.safetensors")
    tok = VQVAE(MultiScaleVQ(32, 8, pn), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
    msvar = NextScaleTransformer(LearnedResampled(grid=8), IndexHead(32), EncoderFeatures(grid=4, latent_dim=8), num_classes=3, null_class=2, **kw)
    task = ARFinetune(msvar, tok, DegradationClasses(), training=Training(init_from=str(tmp_path / "var.safetensors"), init_strict=False))
    before = msvar.class_emb.weight.clone()
    task.setup("fit")
    assert torch.equal(msvar.blocks[0].attn.mat_qkv.weight, var.blocks[0].attn.mat_qkv.weight)
    assert torch.equal(msvar.head.head.weight, var.head.head.weight)
    assert torch.equal(msvar.class_emb.weight, before)  # (3, C) vs (11, C): kept
    out = capsys.readouterr().out
    assert "class_emb.weight" in out and "pos_enc.pos_grid" in out
    strict = ARFinetune(msvar, tok, DegradationClasses(), training={"init_from": str(tmp_path / "var.safetensors")})
    with pytest.raises(ValueError, match="shape mismatch.*class_emb"):
        strict.setup("fit")
