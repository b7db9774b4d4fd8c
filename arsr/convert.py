"""Official checkpoints -> arsr: unwrap, check every key and shape, write safetensors + YAML.

Official ``.pth`` files are read with ``torch.load(weights_only=True)`` only. Parameter names
already match (arsr's modules were built to the official layouts), so conversion is an
unwrap (VARSR nests weights under ``ckpt['trainer'][...]``), a strict check against the
model the preset builds, and an atomic safetensors write. The YAML beside it is the
``class_path`` block to paste into a recipe.
"""

from __future__ import annotations

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


def _infinity_vae(bits: int = 32) -> dict:
    return {
        "class_path": "arsr.nn.vae.VQVAE",
        "init_args": {"ch": 128, "ch_mult": [1, 2, 4, 4, 4], "num_res_blocks": 2, "using_sa": False, "using_mid_sa": False,
                      "quant_conv_ks": 0,
                      "quantizer": {"class_path": "arsr.components.quantizers.MultiScaleBSQ",
                                    "init_args": {"dim": bits, "patch_nums": PN_512}}},
    }


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


# official key prefix -> arsr key prefix (first match wins); None drops derived buffers
VAR_KEYS = (("pos_1LC", "pos_enc.pos_1LC"), ("head_nm.", "head.head_nm."), ("head.", "head.head."),
            ("lvl_1L", None), ("attn_bias_for_masking", None))
VARSR_KEYS = (("con_embedding.", "conditioning.con_embedding."), ("decoder_norm.", None), ("diffloss.", None)) + VAR_KEYS


@dataclass(frozen=True)
class Preset:
    description: str
    component: dict  # class_path / init_args of the arsr module
    wrapped_keys: tuple[str, ...] = ()  # where the state dict may sit inside the file
    resizable_buffers: tuple[str, ...] = ("quantize.ema_vocab_hit_SV",)  # depend on the schedule length
    key_map: tuple[tuple[str, str | None], ...] = ()  # official prefix -> arsr prefix
    adapt: object = None  # optional function applied to the official state dict first
    refiner: dict | None = None  # a second module fed by the keys the map routes to "refiner."
    out_prefix: str = ""  # prefix of the written keys (what init_from expects)


PRESETS = {
    "var_vqvae": Preset("VAR VQVAE vae_ch160v4096z32.pth (256 px schedule)", _vqvae(PN_256)),
    "varsr_vqvae": Preset("VARSR VQVAE.pth (512 px schedule, no Phi at the last scale)",
                          _vqvae(PN_512, phi_at_last_scale=False), ("trainer.vae_local",)),
    "switti_rqvae": Preset("Switti / MSVAR RQ-VAE (VAR architecture, 512 px schedule)", _vqvae(PN_512)),
    "infinity_vae_d32": Preset(
        "Infinity BSQ-VAE infinity_vae_d32reg.pth (32 bits, 16x down, 512 px schedule)", _infinity_vae(32), ("vae",),
        resizable_buffers=(), key_map=(("quantizer.", None), ("quantize.", None)), adapt=unwrap_infinity_keys),
    "var_d16": Preset("VAR transformer var_d16.pth", _var(16, PN_256), key_map=VAR_KEYS, out_prefix="transformer."),
    "var_d20": Preset("VAR transformer var_d20.pth", _var(20, PN_256), key_map=VAR_KEYS, out_prefix="transformer."),
    "var_d24": Preset("VAR transformer var_d24.pth", _var(24, PN_256), key_map=VAR_KEYS, out_prefix="transformer."),
    "var_d30": Preset("VAR transformer var_d30.pth", _var(30, PN_256), key_map=VAR_KEYS, out_prefix="transformer."),
    "var_d36": Preset("VAR transformer var_d36.pth (512 px, shared AdaLN)", _var(36, PN_512, shared_aln=True),
                      key_map=VAR_KEYS, out_prefix="transformer."),
    "varsr": Preset(
        "VARSR.pth (d24 SR transformer + LR encoder + diffusion refiner)", _varsr(24), ("trainer.var_wo_ddp",),
        key_map=(("decoder_norm.", "refiner.decoder_norm."), ("diffloss.", "refiner.diffloss.")) + VARSR_KEYS,
        refiner={"class_path": "arsr.components.refiners.DiffusionRefiner", "init_args": {"latent_dim": 32, "cond_dim": 1536}},
        out_prefix="transformer."),
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


def read_official(path: str | Path, wrapped_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor payloads
        raise ValueError(f"{path} could not be read as a weights-only torch checkpoint ({type(e).__name__}: {e})") from None
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
            out[k] = own[k]
    return out


def convert(src: str | Path, preset: str, out: str | Path) -> Path:
    """Convert ``src`` with the named preset into ``out`` (.safetensors) and ``out``.yaml."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    state = read_official(src, p.wrapped_keys)
    state = map_keys(p.adapt(state) if p.adapt else state, p.key_map)
    refiner_state = {k[len("refiner."):]: state.pop(k) for k in list(state) if k.startswith("refiner.")}
    state = {p.out_prefix + k: v for k, v in check_against(state, build(p.component), preset, p).items()}
    if p.refiner is not None:
        state |= {"refiner." + k: v for k, v in check_against(refiner_state, build(p.refiner), preset, p).items()}
    out = Path(out).with_suffix(".safetensors")
    atomic_save_safetensors(state, out, {"arsr_preset": preset, "source": Path(src).name})
    blocks = {"transformer" if p.out_prefix else "tokenizer": p.component} | ({"refiner": p.refiner} if p.refiner else {})
    out.with_suffix(".yaml").write_text(
        f"# arsr components for {out.name} (converted from {Path(src).name}, preset {preset})\n" + yaml.safe_dump(blocks, sort_keys=False)
    )
    return out
