"""open_clip configs (`open_clip_config.json`, or a bare model config) -> clipforge configs, refusing what
clipforge's towers cannot reproduce instead of loading it approximately."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipforge.checkpoint.open_clip_siglip import config_from_open_clip_siglip, is_open_clip_siglip
from clipforge.errors import CheckpointError
from clipforge.model.config import CLIPConfig, DecoderConfig, PreprocessConfig, TextConfig, VisionConfig
from clipforge.text.base import DEFAULT_CONTEXT_LENGTH, OPENAI_VOCAB_SIZE

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Keys clipforge maps, with the values its towers implement when a key is absent or set to them.
_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                    "image_size": 224, "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False,
                    "no_ln_pre": False, "pos_embed_type": "learnable", "final_ln_after_pool": False,
                    "pool_type": "tok", "output_tokens": False, "timm_model_name": None, "act_kwargs": None,
                    "norm_kwargs": None, "attn_pooler_heads": 8,
                    "attn_pooler_queries": 256}
_TEXT_DEFAULTS = {"context_length": DEFAULT_CONTEXT_LENGTH, "vocab_size": OPENAI_VOCAB_SIZE, "width": 512,
                  "heads": 8, "layers": 12, "mlp_ratio": 4.0, "ls_init_value": None, "embed_cls": False, "pad_id": 0,
                  "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax",
                  "proj_bias": False, "proj_type": "linear", "output_tokens": False, "hf_model_name": None,
                  "hf_tokenizer_name": None, "tokenizer_kwargs": None, "act_kwargs": None, "norm_kwargs": None,
                  "correct_cls_mask": False}
_TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "cast_dtype", "init_logit_scale",
              "init_logit_bias", "custom_text", "multimodal_cfg"}
# CoCa's decoder (open_clip's MultimodalCfg): the keys clipforge maps, and those it accepts at their defaults
_DECODER_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio", "attn_pooler_heads",
                 "n_queries", "dim_head", "ls_init_value"}
# Values that mean the same as the default (open_clip writes some of them explicitly).
_SAME_AS_DEFAULT = {"pool_type": {"tok", "argmax", None}, "proj_type": {"linear", None},
                    "patch_dropout": {0, None}}


def _checked(cfg: dict[str, Any], defaults: dict[str, Any], where: str, source: str) -> dict[str, Any]:
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise CheckpointError(f"{source}: open_clip {where} keys {unknown} are not supported by clipforge's towers")
    merged = {**defaults, **cfg}
    mapped = {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "context_length",
              "vocab_size", "heads", "output_tokens", "patch_dropout", "tokenizer_kwargs", "hf_tokenizer_name",
              "attentional_pool", "attn_pooler_heads", "attn_pooler_queries", "embed_cls"}
    for key, value in merged.items():
        if key in mapped or value == defaults[key] or value in _SAME_AS_DEFAULT.get(key, ()):
            continue
        raise CheckpointError(f"{source}: open_clip {where} {key}={value!r} is not supported by clipforge's towers "
                         f"(only {defaults[key]!r}); this model cannot be loaded exactly")
    if merged.get("hf_tokenizer_name") or merged.get("tokenizer_kwargs"):
        raise CheckpointError(f"{source}: open_clip text tokenizer {merged['hf_tokenizer_name']!r} "
                         f"{merged['tokenizer_kwargs'] or ''} is not CLIP's BPE; clipforge cannot tokenise for it")
    return merged


def config_from_open_clip(d: dict[str, Any], source: str = "open_clip config") -> tuple[CLIPConfig, PreprocessConfig]:
    """(model config, preprocessing) from an `open_clip_config.json` dict or an open_clip model config dict."""
    model_cfg = d.get("model_cfg", d)
    if "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise CheckpointError(f"{source}: not an open_clip config (no vision_cfg / text_cfg)")
    if is_open_clip_siglip(model_cfg):
        return config_from_open_clip_siglip(d, source)
    unknown = sorted(set(model_cfg) - _TOP_LEVEL)
    if unknown:
        raise CheckpointError(f"{source}: open_clip model keys {unknown} are not supported by clipforge")
    v = _checked(model_cfg["vision_cfg"], _VISION_DEFAULTS, "vision_cfg", source)
    t = _checked(model_cfg["text_cfg"], _TEXT_DEFAULTS, "text_cfg", source)
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    resnet = isinstance(v["layers"], (list, tuple))
    heads = v["width"] * 32 // v["head_width"] if resnet else v["width"] // v["head_width"]
    coca = {"pool": "attentional", "attn_pooler_heads": v["attn_pooler_heads"],
            "attn_pooler_queries": v["attn_pooler_queries"]} if v["attentional_pool"] else {}
    if v["attentional_pool"] not in (True, False):
        raise CheckpointError(f"{source}: open_clip attentional_pool={v['attentional_pool']!r} (open_clip's "
                              "work-in-progress poolers) is not supported; only CoCa's original (true)")
    vision = VisionConfig(image_size=v["image_size"], layers=tuple(v["layers"]) if resnet else v["layers"],
                          width=v["width"], heads=heads,
                          patch_size=32 if resnet else v["patch_size"],  # a ResNet's stride
                          mlp_ratio=v["mlp_ratio"], quick_gelu=quick_gelu, **coca)
    text = TextConfig(context_length=t["context_length"], vocab_size=t["vocab_size"], width=t["width"],
                      heads=t["heads"], layers=t["layers"], mlp_ratio=t["mlp_ratio"], quick_gelu=quick_gelu,
                      **({"pool": "cls"} if t["embed_cls"] else {}))
    logit_scale = model_cfg.get("init_logit_scale")
    decoder = _decoder(model_cfg.get("multimodal_cfg"), quick_gelu, source)
    config = CLIPConfig(embed_dim=model_cfg["embed_dim"], vision=vision, text=text, decoder=decoder,
                        **({"logit_scale_init": float(logit_scale)} if logit_scale is not None else {}))
    return config, _preprocess_from_open_clip(d.get("preprocess_cfg") or {}, source)


def _decoder(m: dict[str, Any] | None, quick_gelu: bool, source: str) -> DecoderConfig | None:
    """CoCa's decoder from open_clip's multimodal_cfg (None for a contrastive model)."""
    if m is None:
        return None
    unknown = sorted(set(m) - _DECODER_KEYS)
    if unknown or m.get("ls_init_value") is not None:
        raise CheckpointError(f"{source}: open_clip multimodal_cfg keys {unknown or ['ls_init_value']} are not "
                              "supported by clipforge's decoder")
    return DecoderConfig(width=m.get("width", 512), layers=m.get("layers", 12), heads=m.get("heads", 8),
                         context_length=m.get("context_length", 77), vocab_size=m.get("vocab_size", OPENAI_VOCAB_SIZE),
                         mlp_ratio=float(m.get("mlp_ratio", 4)), quick_gelu=quick_gelu)


def _preprocess_from_open_clip(p: dict[str, Any], source: str) -> PreprocessConfig:
    exact = {"interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    for key, value in exact.items():
        if p.get(key, value) != value:
            raise CheckpointError(f"{source}: preprocess_cfg {key}={p[key]!r} is not implemented "
                                  f"(clipforge: {value!r})")
    config = PreprocessConfig()
    return PreprocessConfig(mean=tuple(p.get("mean", config.mean)), std=tuple(p.get("std", config.std)))


def read_open_clip_config(path: Path) -> tuple[CLIPConfig, PreprocessConfig]:
    """Parse an `open_clip_config.json` (or model config) file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable open_clip config: {error}") from None
    return config_from_open_clip(data, str(path))


def open_clip_weights(directory: Path) -> Path | None:
    """The open_clip weight file of a directory (hub layout), or None."""
    return next((directory / n for n in WEIGHT_FILES if (directory / n).is_file()), None)


def open_clip_config(config: CLIPConfig, preprocess: PreprocessConfig) -> dict[str, Any]:
    """The `open_clip_config.json` of a clipforge model; a model open_clip's towers cannot express is refused."""
    if config.text_tower != "clip":
        raise CheckpointError(f"open_clip has no {config.text_tower!r} text tower: save with format='clipforge'")
    if config.vision.pool == "map" or not config.text.causal:
        raise CheckpointError("open_clip keeps SigLIP's image tower in timm's layout, which clipforge does not write "
                              "yet: save with format='hf' (transformers' SiglipModel) or 'clipforge'")
    if config.vision.quick_gelu != config.text.quick_gelu:
        raise CheckpointError("open_clip uses one activation for both towers; this model mixes QuickGELU and GELU")
    if {config.vision.layer_norm_eps, config.text.layer_norm_eps} != {1e-5}:
        raise CheckpointError("open_clip's layer norms use eps 1e-5; this model's differ")
    v = config.vision
    vision: dict[str, Any] = {"image_size": v.image_size, "width": v.width}
    if v.is_resnet:  # open_clip: heads = width * 32 // head_width
        vision.update(layers=list(v.layers), head_width=v.width * 32 // v.heads, patch_size=None)
    else:
        vision.update(layers=v.layers, head_width=v.width // v.heads, patch_size=v.patch_size, mlp_ratio=v.mlp_ratio)
    t = config.text
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    model_cfg = {"embed_dim": config.embed_dim, "quick_gelu": v.quick_gelu, "vision_cfg": vision, "text_cfg": text}
    if config.decoder is not None:  # CoCa: its pooler, the appended class token, the decoder; text under "text."
        d = config.decoder
        vision.update(attentional_pool=True, attn_pooler_heads=v.attn_pooler_heads,
                      attn_pooler_queries=v.attn_pooler_queries, output_tokens=True)
        text.update(embed_cls=True, output_tokens=True)
        model_cfg.update(custom_text=True, multimodal_cfg={
            "context_length": d.context_length, "vocab_size": d.vocab_size, "width": d.width, "heads": d.heads,
            "layers": d.layers, "mlp_ratio": d.mlp_ratio})
    elif v.pool != "class" or t.pool != "eot":
        raise CheckpointError(f"open_clip has no {v.pool!r} image pool / {t.pool!r} text pool without CoCa's "
                              "decoder: save with format='clipforge'")
    preprocess_cfg = {"size": v.image_size, "mode": "RGB", "mean": list(preprocess.mean), "std": list(preprocess.std),
                      "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
