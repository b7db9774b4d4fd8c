"""Infinity backbone: parity with the official code (oracle tensors), sizes of the released models,
checkpoint conversion, the Flan-T5 text path, KV-cache sampling and a short training run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from arsr import schedules
from arsr.components.quantizers import MultiScaleBSQ
from arsr.convert import PRESETS, Preset, build, convert, infinity_transformer_keys
from arsr.nn.infinity import InfinityTransformer
from arsr.sampling import sample_scales

from conftest import SAMPLE

ORACLE = Path(__file__).parent / "oracles" / "infinity_tiny"
TINY = dict(token_dim=8, text_channels=256, text_maxlen=16, depth=2, width=64, heads=4, cond_drop=0.0, schedule="0.06M")


@pytest.fixture(scope="module")
def oracle():
    """The official model's weights (arsr names) and its inputs / outputs; captions padded from the varlen pack."""
    io = load_file(ORACLE / "io.safetensors")
    m = InfinityTransformer(**TINY).eval()
    m.load_state_dict(infinity_transformer_keys(load_file(ORACLE / "weights.safetensors")), strict=True)
    lens, packed = io["text_lens"].tolist(), io["text_kv_compact"]
    feats, mask = torch.zeros(len(lens), max(lens), packed.shape[1]), torch.zeros(len(lens), max(lens), dtype=torch.bool)
    starts = [0] + torch.tensor(lens).cumsum(0).tolist()
    for i, n in enumerate(lens):
        feats[i, :n], mask[i, :n] = packed[starts[i] : starts[i] + n], True
    return m, io, (feats, mask), starts


def test_oracle_config_is_the_tiny_infinity():
    cfg = json.loads((ORACLE / "config.json").read_text())
    assert (cfg["depth"], cfg["embed_dim"], cfg["num_heads"], cfg["d_vae"], cfg["text_channels"]) == (2, 64, 4, 8, 256)
    assert [tuple(s[1:]) for s in cfg["schedule"]] == list(schedules.resolve("0.06M")) and cfg["L"] == 521


def test_rope_table_equals_official(oracle):
    m, io, _, _ = oracle
    assert torch.allclose(m.rope.real, io["rope_cos"], atol=1e-6) and torch.allclose(m.rope.imag, io["rope_sin"], atol=1e-6)


def test_teacher_forced_forward_equals_official(oracle):
    m, io, text, starts = oracle
    seen = {}
    hooks = [m.text_norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("text_normed", o)),
             m.text_proj_for_ca.register_forward_hook(lambda mod, i, o: seen.__setitem__("ca_kv", o)),
             m.word_embed.register_forward_hook(lambda mod, i, o: seen.__setitem__("word_embed", o)),
             m.blocks[0].register_forward_pre_hook(lambda mod, a: seen.__setitem__("block_in_0", a[0])),
             m.head.head_nm.register_forward_hook(lambda mod, i, o: seen.__setitem__("head_nm_out", o))]
    hooks += [b.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(f"block_out_{n}", o)) for n, b in enumerate(m.blocks)]
    with torch.no_grad():
        logits = m(None, io["x_BLC_wo_prefix"], text=text)
        state = m.condition(*text)
    for h in hooks:
        h.remove()
    mask = text[1]
    assert torch.allclose(seen["text_normed"][mask], io["tf_text_normed"], atol=1e-4)
    assert torch.allclose(seen["ca_kv"][mask], io["tf_ca_kv"], atol=1e-4)
    assert torch.allclose(state.cond, io["tf_cond_BD"], atol=1e-4)
    assert torch.allclose(m.start_tokens(state), io["tf_sos"], atol=1e-4)
    assert torch.allclose(state.extra["gss"], io["tf_gss"], atol=1e-4)
    for name in ("word_embed", "block_in_0", "block_out_0", "block_out_1", "head_nm_out"):
        assert torch.allclose(seen[name], io[f"tf_{name}"], atol=1e-4), name
    assert torch.allclose(logits.flatten(2), io["tf_logits"], atol=1e-4)


def test_kv_cache_sampling_equals_official(oracle):
    """Forced bits (gt_leak = all scales): cached logits, next-scale inputs, and the CFG-mixed logits."""
    m, io, text, _ = oracle
    q = MultiScaleBSQ(dim=8, schedule="0.06M")
    forced = [io[f"kv_bits_{i}"].long() for i in range(7)]
    out = sample_scales(m, q, 2, cfg=1.0, forced=forced, text=text)
    assert torch.allclose(torch.cat(out.logits, 1).flatten(2), io["kv_logits"], atol=1e-4)
    assert torch.allclose(q.indices_to_fhat(out.tokens), io["kv_summed_codes"], atol=1e-5)
    cfg3 = sample_scales(m, q, 2, cfg=3.0, temperature=0.5, forced=forced, text=text)
    assert torch.allclose(torch.cat(cfg3.logits, 1).flatten(2), io["cfg3_logits"], atol=1e-4)
    assert torch.allclose(cfg3.cond, io["cfg3_cond_BD"], atol=1e-4)  # [captions; null captions]


def test_seeded_sampling_reproduces_official_bits(oracle):
    """cfg 3, tau 0.5, top-p 0.97, generator seeded 7: the same bits as the official sampler."""
    m, io, text, _ = oracle
    g = torch.Generator().manual_seed(7)
    out = sample_scales(m, MultiScaleBSQ(dim=8, schedule="0.06M"), 2, cfg=3.0, temperature=0.5, top_p=0.97, generator=g, text=text)
    assert all(torch.equal(out.tokens[i], io[f"samp_bits_{i}"].long()) for i in range(7))


def test_kv_cache_logits_equal_teacher_forced_with_cfg(oracle):
    m, io, text, _ = oracle
    q = MultiScaleBSQ(dim=8, schedule="0.06M")
    g = lambda: torch.Generator().manual_seed(3)
    cached = sample_scales(m, q, 2, cfg=2.5, top_p=0.9, generator=g(), text=text)
    full = sample_scales(m, q, 2, cfg=2.5, top_p=0.9, generator=g(), text=text, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(cached.tokens, full.tokens))
    assert torch.allclose(torch.cat(cached.logits, 1), torch.cat(full.logits, 1), atol=1e-4)
    # and the conditional rows are the teacher-forced logits on the sampled bits' inputs
    inputs = q.indices_to_teacher_input(cached.tokens)
    with torch.no_grad():
        feats, mask = text
        tf_c = m(None, inputs, text=text).flatten(2)
        tf_u = m(None, inputs, text=(m.uncond_text(feats, mask), mask)).flatten(2)
    assert torch.allclose(torch.cat(cached.logits, 1).flatten(2), 2.5 * tf_c - 1.5 * tf_u, atol=1e-4)


@pytest.mark.parametrize("name,params,entries", [("infinity_2b", 2_204_564_032, 694), ("infinity_8b", 8_375_791_824, 862)])
def test_released_transformer_sizes_on_meta(name, params, entries):
    with torch.device("meta"):
        m = build(PRESETS[name].component)
    assert sum(p.numel() for p in m.parameters()) == params  # facts E.5
    sd = m.state_dict()
    assert len(sd) == entries and sum(k.endswith("zero_k_bias") for k in sd) == 2 * len(m.blocks) + 1


@pytest.mark.parametrize("name,params", [("infinity_vae_d32", 110_118_051), ("infinity_vae_d56", 81_624_209)])
def test_released_vae_sizes_on_meta(name, params):
    with torch.device("meta"):
        m = build(PRESETS[name].component)
    assert sum(p.numel() for p in m.parameters()) == params  # facts A.3


def test_nsarm_preset_sizes_on_meta():
    p = PRESETS["nsarm"]
    with torch.device("meta"):
        tr, net = build(p.component), build(dict(p.parts)["scale_predictor."])
    assert sum(x.numel() for x in tr.parameters()) + sum(x.numel() for x in net.parameters()) == 8_760_895_424  # facts E.5
    assert len(tr.state_dict()) + len(net.state_dict()) == 1812


def _official(model: InfinityTransformer, chunks: int) -> dict:
    """arsr's tiny model -> a random state dict in the official layout (block_chunks, head_nm, head)."""
    per = len(model.blocks) // chunks
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            k = f"block_chunks.{int(i) // per}.module.{int(i) % per}.{rest}"
        elif k.startswith("head."):
            k = k[len("head."):]
        out[k] = torch.zeros_like(v) if k.endswith("zero_k_bias") else torch.randn_like(v)
    return out


@pytest.mark.parametrize("layout", ["plain", "training_checkpoint", "sharded"])
def test_conversion_round_trip(tmp_path, monkeypatch, layout):
    spec = {"class_path": "arsr.nn.infinity.InfinityTransformer", "init_args": {k: v for k, v in TINY.items() if k != "cond_drop"}}
    model = build(spec)
    official = _official(model, chunks=2) | {"lvl_1L": torch.zeros(1, 521), "attn_bias_for_masking": torch.zeros(1, 1, 521, 521)}
    if layout == "plain":
        src = tmp_path / "infinity_tiny.pth"
        torch.save(official, src)
    elif layout == "training_checkpoint":  # ar-ckpt-*.pth / NSARM.pth: under ['trainer']['gpt_fsdp']
        src = tmp_path / "ar-ckpt.pth"
        torch.save({"trainer": {"gpt_fsdp": official}, "args": {"lr": 1.0}}, src)
    else:  # Infinity-8B's HF-style folder of shards with an index
        src = tmp_path / "infinity_weights"
        src.mkdir()
        keys = sorted(official)
        halves = {"model-00001.safetensors": keys[: len(keys) // 2], "model-00002.safetensors": keys[len(keys) // 2 :]}
        for shard, ks in halves.items():
            save_file({k: official[k].contiguous() for k in ks}, src / shard)
        (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: s for s, ks in halves.items() for k in ks}}))
    monkeypatch.setitem(PRESETS, "tiny_inf", Preset("tiny Infinity", spec, **{k: getattr(PRESETS["infinity_2b"], k) for k in
                                                                               ("adapt", "out_prefix", "wrapped_keys")}))
    back = load_file(convert(src, "tiny_inf", tmp_path / "out"))
    own = model.state_dict()
    assert set(back) == {"transformer." + k for k in own}
    for k in own:
        if not k.endswith("zero_k_bias"):
            name = k.replace("head.", "", 1) if k.startswith("head.") else k
            if k.startswith("blocks."):
                i, rest = k[len("blocks."):].split(".", 1)
                name = f"block_chunks.{int(i)}.module.0.{rest}"
            assert torch.equal(back["transformer." + k], official[name]), k
    build(spec).load_state_dict({k[len("transformer."):]: v for k, v in back.items()})  # strict: nothing missing


def test_conversion_refuses_a_wrong_file(tmp_path):
    torch.save({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="not a Infinity transformer infinity_2b"):
        convert(tmp_path / "vae.pth", "infinity_2b", tmp_path / "x")


def test_nsarm_conversion_routes_the_transformation_network(tmp_path, monkeypatch):
    spec = {"class_path": "arsr.nn.infinity.InfinityTransformer", "init_args": {k: v for k, v in TINY.items() if k != "cond_drop"}}
    net_spec = {"class_path": "arsr.components.conditioning.NSARMTransformationNet",
                "init_args": {"latent_dim": 8, "grid": 4, "sides": [1, 2, 4], "dims": [32, 32, 32], "layers": [1, 1, 1],
                              "heads": [2, 2, 2], "stem": [16, 16]}}
    official = _official(build(spec), chunks=1)
    official |= {f"map_transformer.{k}": torch.randn_like(v) for k, v in build(net_spec).state_dict().items()}
    torch.save({"trainer": {"gpt_fsdp": official}}, tmp_path / "NSARM.pth")
    p = PRESETS["nsarm"]
    monkeypatch.setitem(PRESETS, "tiny_nsarm", Preset("tiny NSARM", spec, key_map=p.key_map, parts=(("scale_predictor.", net_spec),),
                                                      **{k: getattr(p, k) for k in ("adapt", "out_prefix", "wrapped_keys")}))
    back = load_file(convert(tmp_path / "NSARM.pth", "tiny_nsarm", tmp_path / "nsarm"))
    net = {k: v for k, v in back.items() if k.startswith("scale_predictor.")}
    assert len(net) == len(build(net_spec).state_dict())
    assert all(torch.equal(v, official["map_transformer." + k[len("scale_predictor."):]]) for k, v in net.items())
    yaml_text = (tmp_path / "nsarm.yaml").read_text()
    assert "InfinityTransformer" in yaml_text and "NSARMTransformationNet" in yaml_text


# -- the Flan-T5 text path ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def t5():
    from arsr.components.conditioning import T5TextEncoder

    return T5TextEncoder(str(SAMPLE / "tiny_t5"))


def test_t5_encoder_is_frozen_unsaved_and_caches(t5, tmp_path):
    from transformers import AutoTokenizer, T5EncoderModel

    from arsr.components.conditioning import T5TextEncoder

    caps = ["a photo of a cat", "", "a red car on the road with a dog"]
    feats, mask, _ = t5(caps)
    tok = AutoTokenizer.from_pretrained(SAMPLE / "tiny_t5")
    ref = T5EncoderModel.from_pretrained(SAMPLE / "tiny_t5")
    ids = tok(caps[2], return_tensors="pt")
    with torch.no_grad():
        want = ref(**ids).last_hidden_state[0]
    assert mask.sum(1).tolist() == [6, 1, 10] and torch.allclose(feats[2, :10], want, atol=1e-5)
    assert t5.state_dict() == {} and not any(p.requires_grad for p in t5.parameters())
    cached = T5TextEncoder(str(SAMPLE / "tiny_t5"), cache_dir=str(tmp_path / "cache"))
    first = cached(caps)[0]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3
    cached.encoder.shared.weight.data.zero_()  # a cache hit never runs the encoder again
    assert torch.equal(cached(caps)[0], first)


def test_t5_missing_folder_is_a_clear_error(tmp_path):
    from arsr.components.conditioning import T5TextEncoder

    with pytest.raises(FileNotFoundError, match="download a Flan-T5 checkpoint"):
        T5TextEncoder(str(tmp_path / "flan-t5-xl"))


def test_tiny_infinity_trains_on_captioned_shards_and_samples(t5):
    """A few dozen steps on the sample shards with captions: the bitwise CE falls; sampling runs
    with the KV cache and CFG on the null caption."""
    import lightning as L

    from arsr.components.degradations import RealESRGANDegradation
    from arsr.data import ShardDataModule
    from arsr.nn.vae import VQVAE
    from arsr.optim import AdamW
    from arsr.tasks.ar import ARFinetune, Inference, Training

    L.seed_everything(0)
    tok = VQVAE(MultiScaleBSQ(dim=8, schedule=[1, 2, 4, 8]), ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, using_sa=False,
                using_mid_sa=False, quant_conv_ks=0)
    tr = InfinityTransformer(text=t5, token_dim=8, text_channels=128, text_maxlen=64, depth=2, width=64, heads=4, cond_drop=0.1)
    task = ARFinetune(tr, tok, optimizer=lambda p: AdamW(p, lr=3e-3), inference=Inference(cfg=3.0, top_k=0, temperature=0.5, top_p=0.97, val_samples=0))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    dm = ShardDataModule(str(SAMPLE / "train-{000000..000001}.tar"), crop_size=32, batch_size=4, num_workers=0,
                         degradation=RealESRGANDegradation(scale=4))
    L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              callbacks=[Record()], enable_model_summary=False).fit(task, dm)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses
    lr_up = torch.rand(2, 3, 32, 32) * 2 - 1
    tokens, f_hat = task.sample_tokens(lr_up, generator=torch.Generator().manual_seed(0), captions=["a photo of a cat", "a tree"])
    assert [t.shape for t in tokens] == [(2, 1, 8), (2, 4, 8), (2, 16, 8), (2, 64, 8)] and f_hat.shape == (2, 8, 8, 8)


def test_cache_text_tool_fills_the_cache_once(tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("cache_text", ROOT / "tools" / "cache_text.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    shards = str(SAMPLE / "train-{000000..000001}.tar")
    n = tool.cache_text(str(SAMPLE / "tiny_t5"), str(tmp_path / "c"), shards=shards, device="cpu")
    assert n == len(tool.captions_of(shards)) >= 2 and len(list((tmp_path / "c").glob("*.safetensors"))) == n
    assert tool.cache_text(str(SAMPLE / "tiny_t5"), str(tmp_path / "c"), shards=shards, device="cpu") == 0


def test_model_sized_from_an_official_state_dict(oracle):
    from arsr.convert import infinity_from_state_dict

    m, io, text, _ = oracle
    rebuilt = infinity_from_state_dict(load_file(ORACLE / "weights.safetensors"), schedule="0.06M").eval()
    assert (len(rebuilt.blocks), rebuilt.width, rebuilt.heads, rebuilt.token_dim) == (2, 64, 4, 8)
    with torch.no_grad():
        assert torch.allclose(rebuilt(None, io["x_BLC_wo_prefix"], text=text).flatten(2), io["tf_logits"], atol=1e-4)


def test_token_width_comes_from_the_tokenizer():
    """token_dim left out: the input projection and the bitwise head are sized by the tokenizer when bound."""
    from arsr.components.quantizers import MultiScaleBSQ

    m = InfinityTransformer(**(TINY | {"token_dim": None}))
    assert not hasattr(m, "word_embed")
    q = MultiScaleBSQ(dim=6, schedule="0.06M")
    m.bind(q)
    assert m.word_embed.in_features == 6 and m.head.bits == 6 and m.layout.latent_dim == 6
    text = (torch.randn(1, 3, 256), torch.ones(1, 3, dtype=torch.bool))
    assert m.eval()(None, torch.randn(1, m.image_len - 1, 6), text=text).shape == (1, m.image_len, 6, 2)
    with pytest.raises(ValueError, match="InfinityTransformer token_dim 8 != the tokenizer's 6 bits per token"):
        InfinityTransformer(**TINY).bind(q)


def test_an_unbound_token_width_is_named():
    m = InfinityTransformer(**(TINY | {"token_dim": None})).eval()
    with pytest.raises(RuntimeError, match="no token width yet: give token_dim, or bind it to its tokenizer"):
        m(None, torch.randn(1, m.image_len - 1, 6), text=(torch.randn(1, 3, 256), torch.ones(1, 3, dtype=torch.bool)))
