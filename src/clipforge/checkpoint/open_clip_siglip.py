"""open_clip's SigLIP checkpoints -> clipforge: a timm image tower (`visual.trunk.*`) and a custom text tower.

open_clip builds SigLIP's image side with timm (`timm_model_name`, e.g. "vit_base_patch16_siglip_224", pooled by
timm's attention pool "map", no projection) and its text side as its own TextTransformer, bidirectional, pooled at
the last token, with a biased Linear projection. Both map onto CLIP's towers with SigLIP's options; the names and
the fused q / kv layout are converted here, so nothing is loaded approximately.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from clipforge.errors import CheckpointError
from clipforge.model.config import CLIPConfig, PreprocessConfig, TextConfig, VisionConfig

# timm's SigLIP ViTs with the attention-pool head: name -> (width, depth, heads, mlp_ratio); every one uses
# LayerNorm eps 1e-6 and no class token. The activation is exact GELU except in the registrations listed below
# (timm 1.0's vision_transformer.py, act_layer='gelu_tanh').
_TIMM_NAME = re.compile(r"vit_(base|large|so400m|giantopt)_patch(\d+)_siglip_(\d+)")
_TIMM_SIZES = {"base": (768, 12, 12, 4.0), "large": (1024, 24, 16, 4.0), "so400m": (1152, 27, 16, 3.7362),
               "giantopt": (1536, 40, 16, 4.0)}
_TIMM_GELU_TANH = re.compile(r"vit_base_patch32_siglip_256|vit_large_patch16_siglip_512|vit_so400m_patch16_.*|"
                             r"vit_giantopt_.*")
_VISION_KEYS = {"image_size", "timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "timm_drop",
                "timm_drop_path", "timm_proj_bias", "patch_dropout"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "no_causal_mask", "proj_bias",
              "pool_type", "norm_kwargs", "act_kwargs", "hf_tokenizer_name", "tokenizer_kwargs", "pad_id",
              "embed_cls", "final_ln_after_pool", "proj_type", "ls_init_value", "output_tokens"}
# SigLIP's text tower in open_clip's terms, and open_clip's defaults for the keys a config may leave out.
_TEXT_EXACT = {"no_causal_mask": True, "proj_bias": True, "pool_type": "last", "embed_cls": False,
               "final_ln_after_pool": False, "proj_type": "linear", "ls_init_value": None}
_OPEN_CLIP_TEXT_DEFAULTS = {"no_causal_mask": False, "proj_bias": False, "pool_type": "argmax"}


def is_open_clip_siglip(model_cfg: dict[str, Any]) -> bool:
    """Whether an open_clip model config builds its image tower with timm (SigLIP's layout)."""
    return bool((model_cfg.get("vision_cfg") or {}).get("timm_model_name"))


def _refuse(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: open_clip {what}; clipforge cannot load this model exactly")


def _vision(v: dict[str, Any], source: str) -> VisionConfig:
    unknown = sorted(set(v) - _VISION_KEYS)
    if unknown:
        raise _refuse(source, f"vision_cfg keys {unknown} are not supported")
    name = v["timm_model_name"]
    match = _TIMM_NAME.fullmatch(name)
    if match is None:
        raise _refuse(source, f"timm image tower {name!r} is not one of timm's SigLIP ViTs with attention pooling "
                              "(vit_{base,large,so400m,giantopt}_patch*_siglip_*)")
    # open_clip's defaults for absent keys: pool "avg", projection "linear" (neither is SigLIP's)
    if (v.get("timm_pool", "avg"), v.get("timm_proj", "linear"), v.get("timm_proj_bias", False)) != ("map", "none",
                                                                                                     False):
        raise _refuse(source, f"timm tower pool {v.get('timm_pool')!r} / projection {v.get('timm_proj')!r} "
                              "(only SigLIP's 'map' pool without a projection)")
    width, depth, heads, mlp_ratio = _TIMM_SIZES[match[1]]
    hidden = int(width * mlp_ratio)  # timm floors the MLP width; clipforge rounds, so give it the exact ratio
    gelu = dict(quick_gelu=False, gelu_tanh=bool(_TIMM_GELU_TANH.fullmatch(name)))
    return VisionConfig(image_size=int(v.get("image_size", match[3])), layers=depth, width=width, heads=heads,
                        patch_size=int(match[2]), mlp_ratio=hidden / width, layer_norm_eps=1e-6, pool="map",
                        projection=False, **gelu)


def _text(t: dict[str, Any], source: str) -> TextConfig:
    unknown = sorted(set(t) - _TEXT_KEYS)
    if unknown:
        raise _refuse(source, f"text_cfg keys {unknown} are not supported")
    for key, value in _TEXT_EXACT.items():
        if t.get(key, _OPEN_CLIP_TEXT_DEFAULTS.get(key, value)) != value:
            raise _refuse(source, f"text_cfg {key}={t.get(key)!r} is not SigLIP's text tower ({value!r})")
    act = t.get("act_kwargs") or {}
    if set(act) - {"approximate"} or act.get("approximate", "none") not in ("none", "tanh"):
        raise _refuse(source, f"text_cfg act_kwargs {act} are not supported (GELU, exact or approximate='tanh')")
    if (t.get("tokenizer_kwargs") or {}) not in ({}, {"clean": "canonicalize"}):
        raise _refuse(source, f"text_cfg tokenizer_kwargs {t['tokenizer_kwargs']} are not supported (clean: "
                              "canonicalize)")
    norm = t.get("norm_kwargs") or {}
    if set(norm) - {"eps"}:
        raise _refuse(source, f"text_cfg norm_kwargs {norm} are not supported (eps only)")
    width = t["width"]
    hidden = int(width * t.get("mlp_ratio", 4.0))
    return TextConfig(context_length=t["context_length"], vocab_size=t["vocab_size"], width=width,
                      heads=t["heads"], layers=t["layers"], mlp_ratio=hidden / width,
                      layer_norm_eps=float(norm.get("eps", 1e-5)), quick_gelu=False,
                      gelu_tanh=act.get("approximate") == "tanh", causal=False, pool="last", projection_bias=True)


def config_from_open_clip_siglip(d: dict[str, Any], source: str) -> tuple[CLIPConfig, PreprocessConfig]:
    """(model config, preprocessing) of an open_clip SigLIP config (`open_clip_config.json` or a model config)."""
    model_cfg = d.get("model_cfg", d)
    unknown = sorted(set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "init_logit_scale", "init_logit_bias",
                                       "custom_text", "quick_gelu"})
    if unknown:
        raise _refuse(source, f"model keys {unknown} are not supported")
    if model_cfg.get("quick_gelu"):
        raise _refuse(source, "quick_gelu with a timm SigLIP tower is not supported")
    vision, text = _vision(model_cfg["vision_cfg"], source), _text(model_cfg["text_cfg"], source)
    if model_cfg["embed_dim"] != vision.width:
        raise _refuse(source, f"embed_dim {model_cfg['embed_dim']} differs from the timm tower's width "
                              f"{vision.width} (SigLIP's image side has no projection)")
    config = CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text,
                        logit_scale_init=float(model_cfg.get("init_logit_scale", math.log(10.0))),
                        logit_bias_init=float(model_cfg.get("init_logit_bias", -10.0)))
    return config, _preprocess(d.get("preprocess_cfg"), source)


def _preprocess(p: dict[str, Any] | None, source: str) -> PreprocessConfig:
    # What open_clip itself does: a hub folder's preprocess_cfg (SigLIP's squash, 0.5 / 0.5), else its defaults
    # (CLIP's mean and std, shortest side + crop); a pretrained tag brings its own (pretrained/tags.json).
    default = PreprocessConfig()
    p = {"mean": default.mean, "std": default.std, "resize_mode": "shortest", **(p or {})}
    if p.get("interpolation", "bicubic") != "bicubic" or p["resize_mode"] not in ("squash", "shortest"):
        raise _refuse(source, f"preprocess_cfg interpolation {p.get('interpolation')!r} / resize_mode "
                              f"{p['resize_mode']!r} is not implemented (bicubic; squash or shortest)")
    return PreprocessConfig(mean=tuple(p["mean"]), std=tuple(p["std"]),
                            resize="squash" if p["resize_mode"] == "squash" else "crop")


_BLOCK = re.compile(r"visual\.trunk\.blocks\.(\d+)\.(.+)")
_BLOCK_NAMES = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TRUNK_NAMES = {"patch_embed.proj": "conv1", "norm": "ln_post", "attn_pool.proj": "attn_pool.attn.out_proj",
                "attn_pool.norm": "attn_pool.ln", "attn_pool.mlp.fc1": "attn_pool.mlp.c_fc",
                "attn_pool.mlp.fc2": "attn_pool.mlp.c_proj"}


def is_timm_layout(sd: dict[str, torch.Tensor]) -> bool:
    """Whether a (cleaned) state dict keeps its image tower in timm's layout, as open_clip's SigLIP does."""
    return "visual.trunk.patch_embed.proj.weight" in sd


def _renamed(name: str, table: dict[str, str]) -> str | None:
    for theirs, ours in table.items():
        if name == theirs or name.startswith(theirs + "."):
            return ours + name[len(theirs):]
    return None


def state_dict_from_timm_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clipforge names for an open_clip SigLIP state dict (already cleaned of its "text." prefix)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}
    try:
        out["visual.positional_embedding"] = sd.pop("visual.trunk.pos_embed").reshape(
            -1, sd["visual.trunk.patch_embed.proj.weight"].shape[0])
        out["visual.attn_pool.probe"] = sd.pop("visual.trunk.attn_pool.latent")
        for kind in ("weight", "bias"):  # timm: q and a fused kv; torch's MultiheadAttention: one [q; k; v]
            out[f"visual.attn_pool.attn.in_proj_{kind}"] = torch.cat(
                [sd.pop(f"visual.trunk.attn_pool.q.{kind}"), sd.pop(f"visual.trunk.attn_pool.kv.{kind}")])
        out["text_projection"] = sd.pop("text_projection.weight").t().contiguous()
        out["text_projection_bias"] = sd.pop("text_projection.bias")
    except KeyError as error:
        raise CheckpointError(f"not an open_clip SigLIP state dict: missing key {error.args[0]!r}") from None
    for key in [k for k in sd if k.startswith("visual.trunk.")]:
        block = _BLOCK.fullmatch(key)
        name = (f"visual.transformer.resblocks.{block[1]}.{_renamed(block[2], _BLOCK_NAMES)}"
                if block and _renamed(block[2], _BLOCK_NAMES) else None)
        if block is None:
            trunk = _renamed(key[len("visual.trunk."):], _TRUNK_NAMES)
            name = f"visual.{trunk}" if trunk else None
        if name is None:
            raise CheckpointError(f"open_clip SigLIP weights: timm entry {key!r} has no place in clipforge's "
                                  "SigLIP tower (a different timm model?)")
        out[name] = sd.pop(key)
    return {**sd, **out}  # the text tower already uses OpenAI's names, as clipforge
