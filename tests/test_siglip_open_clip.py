"""open_clip's SigLIP layout (a timm image tower, open_clip's text tower): state dicts made here from transformers'
SiglipModel weights, renamed independently of clipforge's converter, load to transformers' outputs."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import clipforge
from clipforge.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def _hf_siglip(text: dict, vision: dict, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.SiglipConfig(text_config=dict(text, bos_token_id=None, eos_token_id=None, pad_token_id=1),
                                       vision_config=vision)
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # move the init's round values (zero biases, unit norms)
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def _block(sd: dict, hf: str, ours: str, timm: bool) -> dict:
    """One encoder layer of HF's names in timm's (image) or open_clip's OpenAI-style (text) names."""
    attn = f"{hf}.self_attn"
    names = ({"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj", "mlp.fc1": "mlp.fc1",
              "mlp.fc2": "mlp.fc2"} if timm else
             {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"})
    out = {f"{ours}.{o}.{kind}": sd[f"{hf}.{h}.{kind}"] for o, h in names.items() for kind in ("weight", "bias")}
    for kind in ("weight", "bias"):
        fused = torch.cat([sd[f"{attn}.{p}_proj.{kind}"] for p in "qkv"])
        out[f"{ours}.attn.qkv.{kind}" if timm else f"{ours}.attn.in_proj_{kind}"] = fused
    return out


def open_clip_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """transformers SiglipModel weights under open_clip's SigLIP names (timm's VisionTransformer under visual.trunk)."""
    sd = hf_model.state_dict()
    v, t = hf_model.config.vision_config, hf_model.config.text_config
    width = v.hidden_size
    out = {"visual.trunk.patch_embed.proj.weight": sd["vision_model.embeddings.patch_embedding.weight"],
           "visual.trunk.patch_embed.proj.bias": sd["vision_model.embeddings.patch_embedding.bias"],
           "visual.trunk.pos_embed": sd["vision_model.embeddings.position_embedding.weight"][None],
           "visual.trunk.attn_pool.latent": sd["vision_model.head.probe"],
           "text.token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "text.positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "logit_scale": sd["logit_scale"].reshape(()), "logit_bias": sd["logit_bias"].reshape(())}
    for kind in ("weight", "bias"):
        fused = sd[f"vision_model.head.attention.in_proj_{kind}"]
        out[f"visual.trunk.attn_pool.q.{kind}"], out[f"visual.trunk.attn_pool.kv.{kind}"] = fused[:width], fused[width:]
        pairs = {"visual.trunk.norm": "vision_model.post_layernorm", "text.ln_final": "text_model.final_layer_norm",
                 "visual.trunk.attn_pool.proj": "vision_model.head.attention.out_proj",
                 "visual.trunk.attn_pool.norm": "vision_model.head.layernorm",
                 "visual.trunk.attn_pool.mlp.fc1": "vision_model.head.mlp.fc1",
                 "visual.trunk.attn_pool.mlp.fc2": "vision_model.head.mlp.fc2",
                 "text.text_projection": "text_model.head"}
        out.update({f"{o}.{kind}": sd[f"{h}.{kind}"] for o, h in pairs.items()})
    for i in range(v.num_hidden_layers):
        out.update(_block(sd, f"vision_model.encoder.layers.{i}", f"visual.trunk.blocks.{i}", timm=True))
    for i in range(t.num_hidden_layers):
        out.update(_block(sd, f"text_model.encoder.layers.{i}", f"text.transformer.resblocks.{i}", timm=False))
    return {k: v.clone().contiguous() for k, v in out.items()}


def _assert_same_outputs(model, reference, size: int, length: int, vocab: int) -> None:
    pixels, ids = torch.randn(2, 3, size, size), torch.randint(0, vocab, (3, length))
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=pixels)
        text = reference.get_text_features(input_ids=ids)
        image, text = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (image, text))
        logits = reference(input_ids=ids, pixel_values=pixels).logits_per_image
        torch.testing.assert_close(model.encode_image(pixels), image, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.encode_text(ids), text, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(pixels, ids)[0], logits, rtol=1e-4, atol=1e-4)


def test_open_clip_siglip_state_dict_with_an_odd_config_loads_to_transformers_outputs(tmp_path):
    # open_clip's text GELU is exact unless its config has act_kwargs
    text = dict(hidden_size=40, intermediate_size=72, num_attention_heads=5, num_hidden_layers=2, vocab_size=257,
                max_position_embeddings=12, hidden_act="gelu", projection_size=48)
    vision = dict(hidden_size=48, intermediate_size=90, num_attention_heads=3, num_hidden_layers=2, image_size=36,
                  patch_size=6, hidden_act="gelu")  # timm's SigLIP B/16 uses exact GELU too
    reference = _hf_siglip(text, vision)
    (tmp_path / "hf").mkdir()
    reference.save_pretrained(tmp_path / "hf")  # clipforge reads the architecture from here; weights from open_clip's
    config = clipforge.load(tmp_path / "hf")[0].config
    save_file(open_clip_state_dict(reference), str(tmp_path / "open_clip.safetensors"))
    model, _ = clipforge.load(tmp_path / "open_clip.safetensors", config=config)
    _assert_same_outputs(model, reference, 36, 12, 257)
    sd = open_clip_state_dict(reference)
    sd["visual.trunk.blocks.0.ls1.gamma"] = torch.ones(48)  # a layer scale SigLIP has not
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="ls1.gamma"):
        clipforge.load(tmp_path / "bad.safetensors", config=config)


def _open_clip_config(act_kwargs: dict | None) -> dict:
    text = {"context_length": 16, "vocab_size": 300, "width": 96, "heads": 3, "layers": 1, "no_causal_mask": True,
            "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6},
            "hf_tokenizer_name": "timm/ViT-B-32-SigLIP2-256", "tokenizer_kwargs": {"clean": "canonicalize"}}
    if act_kwargs is not None:
        text["act_kwargs"] = act_kwargs
    return {"model_cfg": {"embed_dim": 768, "init_logit_bias": -10, "custom_text": True,
                          "vision_cfg": {"image_size": 256, "timm_model_name": "vit_base_patch32_siglip_256",
                                         "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
                          "text_cfg": text},
            "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                               "resize_mode": "squash"}}


def test_open_clip_siglip_hub_folder_with_a_timm_tower_loads_to_transformers_outputs(tmp_path):
    # timm's vit_base_patch32_siglip_256: 768 wide, 12 layers, 12 heads, GELU tanh; the text tower is small
    text = dict(hidden_size=96, intermediate_size=384, num_attention_heads=3, num_hidden_layers=1, vocab_size=300,
                max_position_embeddings=16, hidden_act="gelu_pytorch_tanh", projection_size=768)
    vision = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  image_size=256, patch_size=32, hidden_act="gelu_pytorch_tanh")
    reference = _hf_siglip(text, vision)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(_open_clip_config({"approximate": "tanh"})))
    save_file(open_clip_state_dict(reference), str(tmp_path / "open_clip_model.safetensors"))
    model, transform = clipforge.load(tmp_path)
    _assert_same_outputs(model, reference, 256, 16, 300)
    assert model.preprocess_config.resize == "squash" and model.preprocess_config.mean == (0.5, 0.5, 0.5)
    assert model.logit_bias is not None and model.config.vision.gelu_tanh and model.config.text.gelu_tanh


def test_open_clip_siglip_configs_map_exactly_or_are_refused():
    from clipforge.checkpoint.open_clip import config_from_open_clip

    config, _ = config_from_open_clip(_open_clip_config(None))
    assert not config.text.gelu_tanh and config.vision.gelu_tanh  # text GELU exact without act_kwargs
    so400m = _open_clip_config(None)
    so400m["model_cfg"]["embed_dim"] = 1152
    so400m["model_cfg"]["vision_cfg"].update(timm_model_name="vit_so400m_patch14_siglip_384", image_size=384)
    config, _ = config_from_open_clip(so400m)
    assert (config.vision.width, config.vision.layers, config.vision.heads, config.vision.patch_size) == (
        1152, 27, 16, 14)
    assert round(config.vision.width * config.vision.mlp_ratio) == 4304 and not config.vision.gelu_tanh
    for change, match in [({"timm_model_name": "vit_base_patch16_siglip_gap_224"}, "attention pooling"),
                          ({"timm_model_name": "eva02_base_patch16_clip_224"}, "not one of timm's SigLIP"),
                          ({"timm_pool": "avg"}, "'map' pool"), ({"timm_proj": "linear"}, "'map' pool")]:
        bad = _open_clip_config(None)
        bad["model_cfg"]["vision_cfg"].update(change)
        with pytest.raises(CheckpointError, match=match):
            config_from_open_clip(bad)
    causal = _open_clip_config(None)
    del causal["model_cfg"]["text_cfg"]["no_causal_mask"]  # open_clip's default: a causal text tower
    with pytest.raises(CheckpointError, match="no_causal_mask"):
        config_from_open_clip(causal)


def test_registry_siglip_architectures_are_open_clips_own_configs():
    import importlib.util
    from pathlib import Path

    from clipforge.checkpoint.open_clip import config_from_open_clip
    from clipforge.model.config import get_model_config

    spec = importlib.util.find_spec("open_clip")  # its model configs only (importing it needs torchvision)
    if spec is None:
        pytest.skip("open_clip_torch is not installed")
    configs = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    names = [name for name in clipforge.list_models() if (configs / f"{name}.json").is_file() and "SigLIP" in name]
    assert len(names) >= 20
    for name in names:
        theirs, preprocess = config_from_open_clip(json.loads((configs / f"{name}.json").read_text()), name)
        assert get_model_config(name) == theirs, name
        assert preprocess.resize == "crop"  # a bare model config: open_clip's defaults (its tags bring squash)
