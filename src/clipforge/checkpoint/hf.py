"""HF transformers CLIPModel <-> clipforge (OpenAI layout): configs and weight names."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from clipforge.errors import CheckpointError
from clipforge.io import atomic_path
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.text.base import DEFAULT_CONTEXT_LENGTH, OPENAI_VOCAB_SIZE

# transformers' CLIPTextConfig / CLIPVisionConfig defaults: its save_pretrained omits keys equal to them.
_HF_TEXT_DEFAULTS = {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                     "num_hidden_layers": 12, "max_position_embeddings": DEFAULT_CONTEXT_LENGTH,
                     "vocab_size": OPENAI_VOCAB_SIZE, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                       "num_hidden_layers": 12, "image_size": 224, "patch_size": 32,
                       "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
_LAYER_NAMES = [  # (HF suffix, OpenAI suffix) inside one encoder layer / resblock
    ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
]


def _quick_gelu(act: str, where: str) -> bool:
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"HF {where} hidden_act {act!r} is not supported (use quick_gelu or gelu)")
    return _ACTIVATIONS[act]


def config_from_hf(hf: dict[str, Any]) -> CLIPConfig:
    """clipforge config from an HF CLIPModel (or SiglipModel) config.json dict."""
    if hf.get("model_type") in ("siglip", "siglip2"):
        from clipforge.checkpoint.hf_siglip import config_from_hf_siglip  # local: it imports this module

        return config_from_hf_siglip(hf)
    if hf.get("model_type", "clip") != "clip":
        raise CheckpointError(f"HF model_type {hf.get('model_type')!r} is not 'clip', 'siglip' or 'siglip2'")
    t = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    if v["num_channels"] != 3:
        raise CheckpointError(f"HF vision num_channels {v['num_channels']} is not supported (3 only)")
    return CLIPConfig(
        embed_dim=hf.get("projection_dim", 512),
        logit_scale_init=hf.get("logit_scale_init_value", 2.6592),
        vision=VisionConfig(image_size=v["image_size"], layers=v["num_hidden_layers"], width=v["hidden_size"],
                            heads=v["num_attention_heads"], patch_size=v["patch_size"],
                            mlp_ratio=v["intermediate_size"] / v["hidden_size"],
                            quick_gelu=_quick_gelu(v["hidden_act"], "vision"), layer_norm_eps=v["layer_norm_eps"]),
        text=TextConfig(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"],
                        width=t["hidden_size"], heads=t["num_attention_heads"], layers=t["num_hidden_layers"],
                        mlp_ratio=t["intermediate_size"] / t["hidden_size"],
                        quick_gelu=_quick_gelu(t["hidden_act"], "text"), layer_norm_eps=t["layer_norm_eps"]),
    )


def refuse_unwritable(config: CLIPConfig) -> None:
    """CheckpointError for a model that HF's CLIPModel cannot hold, naming the formats that do hold it."""
    if config.vision.is_resnet:
        raise CheckpointError("HF transformers' CLIPModel has no ResNet image tower, so this ResNet model cannot be "
                              "written in HF format. These work: --format open_clip (open_clip's create_model loads "
                              "it), --format clipforge, or `clipforge export onnx` (in Python: "
                              "save_pretrained(..., format='open_clip'))")
    if config.vision.pool != "class" or not config.text.causal or config.text.pool != "eot":
        raise CheckpointError("this model mixes CLIP's and SigLIP's tower options, which neither HF CLIPModel nor "
                              "SiglipModel holds: save with format='clipforge'")
    if config.text_tower != "clip":
        raise CheckpointError(f"HF transformers' CLIPModel has no {config.text_tower!r} text tower, so this model "
                              "cannot be written in HF format. These work: --format clipforge, or `clipforge export "
                              "onnx` (in Python: save_pretrained(..., format='clipforge'))")


def hf_config(config: CLIPConfig, eot_token_id: int) -> dict[str, Any]:
    """HF CLIPModel config.json dict for a clipforge ViT config."""
    refuse_unwritable(config)
    v, t = config.vision, config.text
    act = {True: "quick_gelu", False: "gelu"}
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.logit_scale_init,
        "text_config": {"hidden_size": t.width, "intermediate_size": round(t.width * t.mlp_ratio),
                        "num_attention_heads": t.heads, "num_hidden_layers": t.layers,
                        "max_position_embeddings": t.context_length, "vocab_size": t.vocab_size,
                        "hidden_act": act[t.quick_gelu], "layer_norm_eps": t.layer_norm_eps,
                        "projection_dim": config.embed_dim, "bos_token_id": eot_token_id - 1,
                        "eos_token_id": eot_token_id, "pad_token_id": 0},
        "vision_config": {"hidden_size": v.width, "intermediate_size": round(v.width * v.mlp_ratio),
                          "num_attention_heads": v.heads, "num_hidden_layers": v.layers,
                          "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3,
                          "hidden_act": act[v.quick_gelu], "layer_norm_eps": v.layer_norm_eps,
                          "projection_dim": config.embed_dim},
    }


def _encoder_from_hf(sd: dict[str, torch.Tensor], hf_prefix: str, out_prefix: str, layers: int,
                     out: dict[str, torch.Tensor]) -> None:
    for i in range(layers):
        src, dst = f"{hf_prefix}.encoder.layers.{i}.", f"{out_prefix}.resblocks.{i}."
        for hf_name, oa_name in _LAYER_NAMES:
            for p in ("weight", "bias"):
                out[f"{dst}{oa_name}.{p}"] = sd.pop(f"{src}{hf_name}.{p}")
        for p in ("weight", "bias"):
            fused = next((sd.pop(f"{src}self_attn.{n}.{p}") for n in ("qkv", "qkv_proj", "in_proj")
                          if f"{src}self_attn.{n}.{p}" in sd), None)
            if fused is None:
                fused = torch.cat([sd.pop(f"{src}self_attn.{n}_proj.{p}") for n in ("q", "k", "v")])
            out[f"{dst}attn.in_proj_{p}"] = fused


def state_dict_from_hf(sd: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """OpenAI-layout weights from HF CLIPModel (or SiglipModel) weights (split or fused q/k/v; projections
    transposed)."""
    if config.vision.pool == "map":
        from clipforge.checkpoint.hf_siglip import state_dict_from_hf_siglip

        return state_dict_from_hf_siglip(sd, config)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    try:
        _encoder_from_hf(sd, "text_model", "transformer", config.text.layers, out)
        _encoder_from_hf(sd, "vision_model", "visual.transformer", config.vision.layers, out)
        renames = {
            "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
            "text_model.final_layer_norm.weight": "ln_final.weight",
            "text_model.final_layer_norm.bias": "ln_final.bias",
            "vision_model.embeddings.class_embedding": "visual.class_embedding",
            "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
            "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
            "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
            "vision_model.post_layernorm.weight": "visual.ln_post.weight",
            "vision_model.post_layernorm.bias": "visual.ln_post.bias",
            "logit_scale": "logit_scale",
        }
        for hf_name, oa_name in renames.items():
            out[oa_name] = sd.pop(hf_name)
        out["positional_embedding"] = sd.pop("text_model.embeddings.position_embedding.weight")
        out["visual.positional_embedding"] = sd.pop("vision_model.embeddings.position_embedding.weight")
        out["text_projection"] = sd.pop("text_projection.weight").t().contiguous()
        out["visual.proj"] = sd.pop("visual_projection.weight").t().contiguous()
    except KeyError as error:
        raise CheckpointError(f"not an HF CLIPModel state dict: missing key {error.args[0]!r}") from None
    if sd:
        raise CheckpointError(f"unexpected keys in HF CLIPModel weights: {sorted(sd)[:8]}")
    return out


def encoders_to_hf(sd: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """Both transformers' encoder layers under HF's names (q/k/v split), from OpenAI-layout weights."""
    out: dict[str, torch.Tensor] = {}
    for hf_prefix, oa_prefix, layers in (("text_model", "transformer", config.text.layers),
                                         ("vision_model", "visual.transformer", config.vision.layers)):
        for i in range(layers):
            src, dst = f"{oa_prefix}.resblocks.{i}.", f"{hf_prefix}.encoder.layers.{i}."
            for hf_name, oa_name in _LAYER_NAMES:
                for p in ("weight", "bias"):
                    out[f"{dst}{hf_name}.{p}"] = sd[f"{src}{oa_name}.{p}"]
            for p in ("weight", "bias"):
                for name, part in zip("qkv", sd[f"{src}attn.in_proj_{p}"].chunk(3)):
                    out[f"{dst}self_attn.{name}_proj.{p}"] = part
    return out


def state_dict_to_hf(sd: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """HF CLIPModel weights from OpenAI-layout weights (inverse of `state_dict_from_hf`)."""
    refuse_unwritable(config)
    out = encoders_to_hf(sd, config)
    out.update({
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
        "text_projection.weight": sd["text_projection"].t(), "visual_projection.weight": sd["visual.proj"].t(),
        "logit_scale": sd["logit_scale"],
    })
    return {k: v.contiguous() for k, v in out.items()}


def hf_preprocessor_config(config: CLIPConfig, mean: tuple, std: tuple) -> dict[str, Any]:
    """preprocessor_config.json so HF's CLIPImageProcessor preprocesses like clipforge."""
    size = config.vision.image_size
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
            "image_std": list(std), "do_convert_rgb": True}


def write_hf_dir(out: Path, state_dict: dict[str, torch.Tensor], config: CLIPConfig, tokenizer: Any,
                 preprocess: Any) -> None:
    """Write an HF transformers folder: CLIPModel, or SiglipModel for a SigLIP architecture (weights, configs,
    the image processor's settings and the tokenizer's files)."""
    from clipforge.checkpoint import hf_siglip

    if hf_siglip.is_siglip(config):
        weights = hf_siglip.state_dict_to_hf_siglip(state_dict, config)
        settings = hf_siglip.hf_siglip_config(config, tokenizer.eot_token_id)
        processor = hf_siglip.hf_siglip_preprocessor_config(config, preprocess.mean, preprocess.std,
                                                            preprocess.interpolation)
    else:
        weights, settings = state_dict_to_hf(state_dict, config), hf_config(config, tokenizer.eot_token_id)
        processor = hf_preprocessor_config(config, preprocess.mean, preprocess.std)
    with atomic_path(out / "model.safetensors") as tmp:  # safetensors alone writes 0600 files
        save_file(weights, str(tmp), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(settings, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    tokenizer.save_hf(out)
