"""Official checkpoints -> arsr: unwrap, check every key and shape, write safetensors + YAML.

Official ``.pth`` files are read with ``torch.load(weights_only=True)`` only. Parameter names
already match (arsr's modules were built to the official layouts), so conversion is an
unwrap (VARSR nests weights under ``ckpt['trainer'][...]``), a strict check against the
model the preset builds, and an atomic safetensors write. The YAML beside it is the
``class_path`` block to paste into a recipe.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from jsonargparse import ArgumentParser
from torch import nn

from arsr.checkpoint import atomic_save_safetensors

VAR_VAE_ARCH = {"ch": 160, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2}
PN_256 = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
PN_512 = [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]


def _vqvae(patch_nums: list[int], **quant) -> dict:
    return {
        "class_path": "arsr.nn.vae.VQVAE",
        "init_args": VAR_VAE_ARCH | {"quantizer": {"class_path": "arsr.components.quantizers.MultiScaleVQ",
                                                  "init_args": {"vocab_size": 4096, "dim": 32, "patch_nums": patch_nums} | quant}},
    }


def _var(depth: int, patch_nums: list[int], num_classes: int = 1001, null_class: int | None = 1000, **extra) -> dict:
    return {
        "class_path": "arsr.nn.transformer.NextScaleTransformer",
        "init_args": {
            "depth": depth, "patch_nums": patch_nums, "num_classes": num_classes, "null_class": null_class,
            "pos_enc": {"class_path": "arsr.components.posenc.AbsolutePerScale"},
            "head": {"class_path": "arsr.components.heads.IndexHead", "init_args": {"vocab_size": 4096}},
        } | extra,
    }


def _varsr(depth: int = 24) -> dict:
    spec = _var(depth, PN_512, num_classes=2, null_class=None, cond_drop=0.0,
                conditioning={"class_path": "arsr.components.conditioning.PrefixTokens",
                              "init_args": {"channels": [32, 128, 256, 512, 1536], "grid": 32}})
    spec["init_args"]["pos_enc"] = {"class_path": "arsr.components.posenc.SARoPE", "init_args": {"theta": 10000.0}}
    return spec


def _infinity_vae(bits: int = 32, stride8: bool = False) -> dict:
    """Infinity's BSQ-VAE: base 128, no attention, no quant convs; stride 16 (ch_mult 1-2-4-4-4) or,
    for Infinity-8B's 14-bit tokenizer, stride 8 (1-2-4-4) with 2x2 patchified 56-bit tokens."""
    quant = {"dim": bits, "schedule": "1M"} | ({"patchify": True} if stride8 else {})
    return {
        "class_path": "arsr.nn.vae.VQVAE",
        "init_args": {"ch": 128, "ch_mult": [1, 2, 4, 4] if stride8 else [1, 2, 4, 4, 4], "num_res_blocks": 2,
                      "using_sa": False, "using_mid_sa": False, "quant_conv_ks": 0,
                      "quantizer": {"class_path": "arsr.components.quantizers.MultiScaleBSQ", "init_args": quant}},
    }


# Infinity sizes (facts C.1): depth, width, heads, and the tokenizer's bits per token
INFINITY_SIZES = {
    "infinity_layer12": (12, 768, 8), "infinity_layer16": (16, 1152, 12), "infinity_layer24": (24, 1536, 16),
    "infinity_layer32": (32, 2080, 20), "infinity_layer40": (40, 2688, 24), "infinity_layer48": (48, 3360, 28),
    "infinity_2b": (32, 2048, 16), "infinity_8b": (40, 3584, 28),
}


def _infinity(size: str, token_dim: int = 32) -> dict:
    depth, width, heads = INFINITY_SIZES[size]
    return {"class_path": "arsr.nn.infinity.InfinityTransformer",
            "init_args": {"depth": depth, "width": width, "heads": heads, "token_dim": token_dim, "text_channels": 2048, "text_maxlen": 512}}


NSARM_MAP = {"class_path": "arsr.components.conditioning.NSARMTransformationNet",
             "init_args": {"latent_dim": 14, "grid": 32, "sides": [2, 4, 8, 12, 16, 24, 32], "dims": [64, 128, 256, 384, 512, 768, 1024],
                           "layers": [4, 6, 8, 10, 12, 14, 16], "heads": [4, 4, 8, 8, 8, 12, 16], "stem": [64, 128]}}


def unwrap_infinity_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Infinity's BSQ-VAE files hold either plain names or its wrapper modules' names
    (``conv_in.conv.weight``, ``norm1.norm.weight``, attention as separate q / k / v convs):
    bring both to arsr's names, fusing q, k, v into one ``qkv`` conv."""
    wrapped = any(k.endswith(".norm.weight") for k in state)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if wrapped:
            k = k.replace(".norm.weight", ".weight").replace(".norm.bias", ".bias")
            k = k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
        out[k] = v
    for q in [k for k in out if k.endswith(".q.weight") or k.endswith(".q.bias")]:
        base, leaf = q.rsplit(".q.", 1)
        parts = [out.pop(f"{base}.{n}.{leaf}") for n in ("q", "k", "v")]
        out[f"{base}.qkv.{leaf}"] = torch.cat(parts)
    return out


def infinity_transformer_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Infinity transformer names -> arsr's: ``block_chunks.{c}.module.{j}`` -> ``blocks.{i}``
    (i = c * blocks per chunk + j), the head under ``head.``; derived buffers dropped."""
    chunk = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.*)$")
    per_chunk = 1 + max((int(m.group(2)) for k in state if (m := chunk.match(k))), default=0)
    out = {}
    for k, v in state.items():
        if (m := chunk.match(k)) is not None:
            k = f"blocks.{int(m.group(1)) * per_chunk + int(m.group(2))}.{m.group(3)}"
        elif k.startswith("head_nm.") or k.startswith("head."):
            k = "head." + k
        elif k in ("lvl_1L", "attn_bias_for_masking") or k.startswith("rope2d_freqs_grid"):
            continue
        out[k] = v
    return out


def infinity_from_state_dict(state: dict[str, torch.Tensor], schedule: str = "1M", **kwargs) -> nn.Module:
    """An :class:`~arsr.nn.infinity.InfinityTransformer` sized from an official state dict (any size:
    depth, width, heads, bits, text width and null-caption length are read off the tensors) with the
    weights loaded strictly. ``kwargs`` go to the constructor (e.g. a ``text`` encoder)."""
    from arsr.nn.infinity import InfinityTransformer

    sd = infinity_transformer_keys(state)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    width, heads = sd["pos_start"].shape[-1], sd["blocks.0.sa.scale_mul_1H11"].shape[1]
    ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
    text_maxlen, text_channels = sd["cfg_uncond"].shape
    model = InfinityTransformer(token_dim=sd["word_embed.weight"].shape[1], text_channels=text_channels, text_maxlen=text_maxlen,
                                depth=depth, width=width, heads=heads, mlp_ratio=ffn / width, schedule=schedule, **kwargs)
    model.load_state_dict(sd, strict=True)
    return model


# official key prefix -> arsr key prefix (first match wins); None drops derived buffers
VAR_KEYS = (("pos_1LC", "pos_enc.pos_1LC"), ("head_nm.", "head.head_nm."), ("head.", "head.head."),
            ("lvl_1L", None), ("attn_bias_for_masking", None))
VARSR_KEYS = (("con_embedding.", "conditioning.con_embedding."), ("decoder_norm.", "refiner.decoder_norm."),
              ("diffloss.", "refiner.diffloss.")) + VAR_KEYS  # the refiner's keys go to its part (see Preset.parts)


@dataclass(frozen=True)
class Preset:
    description: str
    component: dict  # class_path / init_args of the arsr module
    wrapped_keys: tuple[str, ...] = ()  # where the state dict may sit inside the file
    resizable_buffers: tuple[str, ...] = ("quantize.ema_vocab_hit_SV",)  # depend on the schedule length
    key_map: tuple[tuple[str, str | None], ...] = ()  # official prefix -> arsr prefix
    adapt: object = None  # optional function applied to the official state dict first
    out_prefix: str = ""  # prefix of the written keys (what init_from expects)
    parts: tuple[tuple[str, dict], ...] = ()  # further modules: (prefix the key map routes to, component)


_VAE = dict(resizable_buffers=(), key_map=(("quantizer.", None), ("quantize.", None)), adapt=unwrap_infinity_keys, wrapped_keys=("vae",))
_INF = dict(adapt=infinity_transformer_keys, out_prefix="transformer.", wrapped_keys=("trainer.gpt_fsdp", "gpt_fsdp", "state_dict"))

PRESETS = {
    "var_vqvae": Preset("VAR VQVAE vae_ch160v4096z32.pth (256 px schedule)", _vqvae(PN_256)),
    "varsr_vqvae": Preset("VARSR VQVAE.pth (512 px schedule, no Phi at the last scale)",
                          _vqvae(PN_512, phi_at_last_scale=False), ("trainer.vae_local",)),
    "switti_rqvae": Preset("Switti / MSVAR RQ-VAE (VAR architecture, 512 px schedule)", _vqvae(PN_512)),
    **{f"infinity_vae_d{b}": Preset(f"Infinity BSQ-VAE infinity_vae_d{b}{'reg' if b == 32 else ''}.pth ({b} bits, 16x down)", _infinity_vae(b), **_VAE)
       for b in (16, 24, 32, 64)},
    "infinity_vae_d56": Preset("Infinity-8B BSQ-VAE infinity_vae_d56_f8_14_patchify.pth (14 bits, 8x down, 2x2 patchify: 56-bit tokens)",
                               _infinity_vae(14, stride8=True), **_VAE),
    "var_d16": Preset("VAR transformer var_d16.pth", _var(16, PN_256), key_map=VAR_KEYS, out_prefix="transformer."),
    "var_d20": Preset("VAR transformer var_d20.pth", _var(20, PN_256), key_map=VAR_KEYS, out_prefix="transformer."),
    "var_d24": Preset("VAR transformer var_d24.pth", _var(24, PN_256), key_map=VAR_KEYS, out_prefix="transformer."),
    "var_d30": Preset("VAR transformer var_d30.pth", _var(30, PN_256), key_map=VAR_KEYS, out_prefix="transformer."),
    "var_d36": Preset("VAR transformer var_d36.pth (512 px, shared AdaLN)", _var(36, PN_512, shared_aln=True),
                      key_map=VAR_KEYS, out_prefix="transformer."),
    "varsr": Preset(
        "VARSR.pth (d24 SR transformer + LR encoder + diffusion refiner)", _varsr(24), ("trainer.var_wo_ddp",),
        key_map=VARSR_KEYS,
        parts=(("refiner.", {"class_path": "arsr.components.refiners.DiffusionRefiner", "init_args": {"latent_dim": 32, "cond_dim": 1536}}),),
        out_prefix="transformer."),
    **{name: Preset(f"Infinity transformer {name} ({'infinity_2b_reg.pth' if name == 'infinity_2b' else 'official layout'}, d32 tokens)",
                    _infinity(name), **_INF) for name in INFINITY_SIZES if name != "infinity_8b"},
    "infinity_8b": Preset("Infinity-8B transformer (infinity_8b_weights/ sharded folder, 56-bit tokens)", _infinity("infinity_8b", 56), **_INF),
    "nsarm": Preset("NSARM.pth (Infinity-8B fine-tuned + map_transformer transformation network)", _infinity("infinity_8b", 56),
                    key_map=(("map_transformer.", "scale_predictor."),), parts=(("scale_predictor.", NSARM_MAP),), **_INF),
}


def map_keys(state: dict[str, torch.Tensor], key_map) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for src, dst in key_map:
            if k.startswith(src):
                if dst is not None:
                    out[dst + k[len(src):]] = v
                break
        else:
            out[k] = v
    return out


def build(component: dict) -> nn.Module:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--module", type=nn.Module)
    return parser.instantiate_classes(parser.parse_object({"module": component})).module


def _load_one(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor payloads
        raise ValueError(f"{path} could not be read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None


def read_official(path: str | Path, wrapped_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A flat state dict from an official file, or from a sharded folder (``*.index.json`` naming
    the shard of every key, as Infinity-8B's ``infinity_8b_weights/``)."""
    path = Path(path)
    if path.is_dir():
        index = sorted(path.glob("*.index.json"))
        if not index:
            raise FileNotFoundError(f"{path} is a folder without a *.index.json (a sharded checkpoint names its shards there)")
        shards = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        obj = {}
        for shard in shards:
            obj |= _load_one(path / shard)
    elif path.is_file():
        obj = _load_one(path)
    else:
        raise FileNotFoundError(f"checkpoint {path} not found")
    for dotted in wrapped_keys:
        node = obj
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            obj = node
            break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} holds no flat state dict (top-level keys: {list(obj)[:5] if isinstance(obj, dict) else type(obj)})")
    return obj


def check_against(state: dict[str, torch.Tensor], model: nn.Module, preset_name: str, preset: Preset) -> dict[str, torch.Tensor]:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape and k not in preset.resizable_buffers]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part for part in (
                f"missing {len(missing)}: {missing[:3]}" if missing else "",
                f"unexpected {len(unexpected)}: {unexpected[:3]}" if unexpected else "",
                f"shape mismatch: {shapes[:3]}" if shapes else "",
            ) if part
        )
        raise ValueError(f"checkpoint is not a {preset.description} (preset {preset_name!r}, {len(own)} keys expected): {detail}")
    out = {k: state[k].to(own[k].dtype) for k in own}
    for k in preset.resizable_buffers:  # as the official loaders do: keep our own when the schedule differs
        if k in out and out[k].shape != own[k].shape:
            out[k] = torch.zeros(own[k].shape, dtype=own[k].dtype, device="cpu")  # a statistic restarted for the new schedule
    return out


def convert(src: str | Path, preset: str, out: str | Path) -> Path:
    """Convert ``src`` with the named preset into ``out`` (.safetensors) and ``out``.yaml."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    state = read_official(src, p.wrapped_keys)
    state = map_keys(p.adapt(state) if p.adapt else state, p.key_map)
    routed = {prefix: {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)} for prefix, _ in p.parts}
    with torch.device("meta"):  # names, shapes and dtypes only: a 8B model costs nothing to check against
        written = {p.out_prefix + k: v for k, v in check_against(state, build(p.component), preset, p).items()}
        for prefix, component in p.parts:
            written |= {prefix + k: v for k, v in check_against(routed[prefix], build(component), preset, p).items()}
    out = Path(out).with_suffix(".safetensors")
    atomic_save_safetensors(written, out, {"arsr_preset": preset, "source": Path(src).name})
    if p.out_prefix:  # a transformer (and its parts) for ARFinetune, which starts from the file
        model = {"transformer": p.component} | {prefix.rstrip("."): c for prefix, c in p.parts} | {"training": {"init_from": str(out)}}
    else:  # a tokenizer carries its weights: the same block serves ARFinetune, TransformAlign and TokenizerFinetune
        model = {"tokenizer": {**p.component, "init_args": {**p.component.get("init_args", {}), "weights": str(out)}}}
    out.with_suffix(".yaml").write_text(
        f"# arsr config for {out.name} (converted from {Path(src).name}, preset {preset}); add it after a recipe:\n"
        f"#   arsr fit --config recipes/<recipe>.yaml --config {out.with_suffix('.yaml')}\n"
        + yaml.safe_dump({"model": {"init_args": model}}, sort_keys=False)
    )
    return out
