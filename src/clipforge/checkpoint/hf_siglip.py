"""HF transformers SiglipModel -> clipforge: the config (CLIP's towers with SigLIP's options) and weight names."""
from __future__ import annotations

import math
from typing import Any

import torch

from clipforge.errors import CheckpointError
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig

# transformers' SiglipTextConfig / SiglipVisionConfig defaults: its save_pretrained omits keys equal to them.
_TEXT_DEFAULTS = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                  "layer_norm_eps": 1e-6, "projection_size": None}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
                    "layer_norm_eps": 1e-6, "vision_use_head": True}
_ACTIVATIONS = {"gelu_pytorch_tanh": dict(quick_gelu=False, gelu_tanh=True), "gelu": dict(quick_gelu=False),
                "quick_gelu": dict(quick_gelu=True)}


def _activation(act: str, where: str) -> dict[str, bool]:
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"HF SigLIP {where} hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
    return _ACTIVATIONS[act]


def config_from_hf_siglip(hf: dict[str, Any]) -> CLIPConfig:
    """clipforge config from an HF SiglipModel or Siglip2Model (NaFlex) config.json dict; refuses what the towers
    cannot hold."""
    naflex = hf.get("model_type") == "siglip2"
    t = {**_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
    v = {**_VISION_DEFAULTS, **({"num_patches": 256} if naflex else {}), **(hf.get("vision_config") or {})}
    if naflex:  # a square grid of position embeddings, resized to each image's grid
        side = math.isqrt(v["num_patches"])
        if side * side != v["num_patches"]:
            raise CheckpointError(f"HF Siglip2 num_patches {v['num_patches']} is not a square grid")
        v["image_size"] = side * v["patch_size"]
    if v["num_channels"] != 3 or not v["vision_use_head"]:
        raise CheckpointError("HF SigLIP vision towers need num_channels 3 and the attention-pooling head "
                              f"(vision_use_head), got {v['num_channels']} and {v['vision_use_head']}")
    projection = t["projection_size"] or t["hidden_size"]
    if projection != v["hidden_size"]:
        raise CheckpointError(f"HF SigLIP: the text projection_size {projection} must equal the vision "
                              f"hidden_size {v['hidden_size']} (the image side has no projection)")
    return CLIPConfig(
        embed_dim=v["hidden_size"], logit_scale_init=math.log(10.0), logit_bias_init=-10.0,
        vision=VisionConfig(image_size=v["image_size"], layers=v["num_hidden_layers"], width=v["hidden_size"],
                            heads=v["num_attention_heads"], patch_size=v["patch_size"],
                            mlp_ratio=v["intermediate_size"] / v["hidden_size"], layer_norm_eps=v["layer_norm_eps"],
                            pool="map", projection=False, naflex=naflex, **_activation(v["hidden_act"], "vision")),
        text=TextConfig(context_length=t["max_position_embeddings"], vocab_size=t["vocab_size"],
                        width=t["hidden_size"], heads=t["num_attention_heads"], layers=t["num_hidden_layers"],
                        mlp_ratio=t["intermediate_size"] / t["hidden_size"], layer_norm_eps=t["layer_norm_eps"],
                        causal=False, pool="last", projection_bias=True, **_activation(t["hidden_act"], "text")),
    )


_RENAMES = {  # HF name -> clipforge name (OpenAI's layout, plus SigLIP's attention pool)
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_model.head.bias": "text_projection_bias",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.patch_embedding.bias": "visual.conv1.bias",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "vision_model.head.probe": "visual.attn_pool.probe",
    "vision_model.head.attention.in_proj_weight": "visual.attn_pool.attn.in_proj_weight",
    "vision_model.head.attention.in_proj_bias": "visual.attn_pool.attn.in_proj_bias",
    "vision_model.head.attention.out_proj.weight": "visual.attn_pool.attn.out_proj.weight",
    "vision_model.head.attention.out_proj.bias": "visual.attn_pool.attn.out_proj.bias",
    "vision_model.head.layernorm.weight": "visual.attn_pool.ln.weight",
    "vision_model.head.layernorm.bias": "visual.attn_pool.ln.bias",
    "vision_model.head.mlp.fc1.weight": "visual.attn_pool.mlp.c_fc.weight",
    "vision_model.head.mlp.fc1.bias": "visual.attn_pool.mlp.c_fc.bias",
    "vision_model.head.mlp.fc2.weight": "visual.attn_pool.mlp.c_proj.weight",
    "vision_model.head.mlp.fc2.bias": "visual.attn_pool.mlp.c_proj.bias",
}


def state_dict_from_hf_siglip(sd: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """clipforge weights from HF SiglipModel weights (q/k/v fused, the text head transposed, scalars unwrapped)."""
    from clipforge.checkpoint.hf import _encoder_from_hf  # local: hf.py dispatches SigLIP folders here

    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    try:
        _encoder_from_hf(sd, "text_model", "transformer", config.text.layers, out)
        _encoder_from_hf(sd, "vision_model", "visual.transformer", config.vision.layers, out)
        out.update({ours: sd.pop(theirs) for theirs, ours in _RENAMES.items()})
        out["text_projection"] = sd.pop("text_model.head.weight").t().contiguous()
        out["logit_scale"] = sd.pop("logit_scale").reshape(())
        out["logit_bias"] = sd.pop("logit_bias").reshape(())
        if config.vision.naflex:  # Siglip2's Linear over patch rows (channels last) -> the equivalent convolution
            weight, patch = out["visual.conv1.weight"], config.vision.patch_size
            out["visual.conv1.weight"] = weight.reshape(len(weight), patch, patch, 3).permute(0, 3, 1, 2).contiguous()
    except KeyError as error:
        raise CheckpointError(f"not an HF SiglipModel state dict: missing key {error.args[0]!r}") from None
    if sd:
        raise CheckpointError(f"unexpected keys in HF SiglipModel weights: {sorted(sd)[:8]}")
    return out


def is_siglip(config: CLIPConfig) -> bool:
    """Whether transformers' SiglipModel holds this architecture exactly."""
    v, t = config.vision, config.text
    return (v.pool == "map" and not v.projection and not t.causal and t.pool == "last" and t.projection_bias
            and not v.is_resnet and config.text_tower == "clip" and not v.quick_gelu and not t.quick_gelu
            and config.logit_bias_init is not None)


def hf_siglip_config(config: CLIPConfig, eos_token_id: int) -> dict[str, Any]:
    """HF SiglipModel config.json dict for a SigLIP-architecture clipforge config (SigLIP pads with EOS)."""
    v, t = config.vision, config.text

    def act(tower: TextConfig | VisionConfig) -> str:  # each tower its own: open_clip's SigLIP 2 mixes them
        return "gelu_pytorch_tanh" if tower.gelu_tanh else "gelu"

    settings = {
        "architectures": ["SiglipModel"], "model_type": "siglip",
        "text_config": {"hidden_size": t.width, "intermediate_size": round(t.width * t.mlp_ratio),
                        "num_attention_heads": t.heads, "num_hidden_layers": t.layers,
                        "max_position_embeddings": t.context_length, "vocab_size": t.vocab_size, "hidden_act": act(t),
                        "layer_norm_eps": t.layer_norm_eps, "projection_size": config.embed_dim,
                        "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id},
        "vision_config": {"hidden_size": v.width, "intermediate_size": round(v.width * v.mlp_ratio),
                          "num_attention_heads": v.heads, "num_hidden_layers": v.layers, "image_size": v.image_size,
                          "patch_size": v.patch_size, "num_channels": 3, "hidden_act": act(v),
                          "layer_norm_eps": v.layer_norm_eps, "vision_use_head": True},
    }
    if v.naflex:  # Siglip2Model: a patch count instead of an image size
        settings.update(architectures=["Siglip2Model"], model_type="siglip2")
        del settings["vision_config"]["image_size"]
        settings["vision_config"]["num_patches"] = (v.image_size // v.patch_size) ** 2
    return settings


def state_dict_to_hf_siglip(sd: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """HF SiglipModel weights from clipforge's (the inverse of `state_dict_from_hf_siglip`)."""
    from clipforge.checkpoint.hf import encoders_to_hf

    out = {**encoders_to_hf(sd, config), **{theirs: sd[ours] for theirs, ours in _RENAMES.items()}}
    out["text_model.head.weight"] = sd["text_projection"].t()
    out["logit_scale"], out["logit_bias"] = sd["logit_scale"].reshape(1), sd["logit_bias"].reshape(1)
    if config.vision.naflex:
        weight = out["vision_model.embeddings.patch_embedding.weight"]
        out["vision_model.embeddings.patch_embedding.weight"] = weight.permute(0, 2, 3, 1).reshape(len(weight), -1)
    return {k: v.contiguous() for k, v in out.items()}


def hf_siglip_preprocessor_config(config: CLIPConfig, mean: tuple, std: tuple,
                                  interpolation: str = "bicubic") -> dict[str, Any]:
    """preprocessor_config.json so transformers' SiglipImageProcessor preprocesses like clipforge."""
    size, v = config.vision.image_size, config.vision
    if v.naflex:
        return {"image_processor_type": "Siglip2ImageProcessor", "do_resize": True, "patch_size": v.patch_size,
                "max_num_patches": (size // v.patch_size) ** 2, "resample": 2 if interpolation == "bilinear" else 3,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean),
                "image_std": list(std)}
    return {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
            "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}
