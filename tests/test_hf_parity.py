"""Parity with HF transformers' CLIPModel, both directions (the numerical reference)."""
from __future__ import annotations

import pytest
import torch
import transformers  # the parity reference (test extra)

import clipforge
from conftest import OPENAI, perturb_, random_tokens

pytestmark = pytest.mark.parity

CONFIGS = {
    # ViT-B-32 shape (full size); odd: patch 14 at 56 px, heads != width/64, context 40, exact GELU.
    "vit-b-32": dict(text_config=dict(), vision_config=dict(), projection_dim=512),
    "odd": dict(
        text_config=dict(hidden_size=96, intermediate_size=200, num_attention_heads=3, num_hidden_layers=2,
                         max_position_embeddings=40, hidden_act="gelu"),
        vision_config=dict(hidden_size=120, intermediate_size=250, num_attention_heads=5, num_hidden_layers=3,
                           image_size=56, patch_size=14, hidden_act="gelu"),
        projection_dim=48,
    ),
}


def _hf_features(hf_model, pixels, tokens):
    out = hf_model(input_ids=tokens, pixel_values=pixels)
    return out.image_embeds, out.text_embeds, out.logits_per_image


def _compare(hf_model, model, size, context):
    pixels = torch.randn(2, 3, size, size)
    tokens = random_tokens(3, context, [3, context - 2, 10])
    with torch.no_grad():
        image = hf_model.get_image_features(pixel_values=pixels)
        text = hf_model.get_text_features(input_ids=tokens)
        image = getattr(image, "pooler_output", image)  # transformers 5 returns an output object
        text = getattr(text, "pooler_output", text)
        hf_logits = hf_model(input_ids=tokens, pixel_values=pixels).logits_per_image
        logits, _ = model(pixels, tokens)
        assert (model.encode_image(pixels) - image).abs().max() < 1e-4
        assert (model.encode_text(tokens) - text).abs().max() < 1e-4
        assert (logits - hf_logits).abs().max() < 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_checkpoint_loads_in_clipforge(tmp_path, name):
    torch.manual_seed(0)
    hf_model = perturb_(transformers.CLIPModel(transformers.CLIPConfig(**CONFIGS[name]))).eval()
    hf_model.save_pretrained(tmp_path)
    model, _ = clipforge.load(tmp_path)
    cfg = hf_model.config
    _compare(hf_model, model, cfg.vision_config.image_size, cfg.text_config.max_position_embeddings)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_clipforge_hf_export_loads_in_transformers(tmp_path, name):
    torch.manual_seed(1)
    config = clipforge.checkpoint.hf.config_from_hf(transformers.CLIPConfig(**CONFIGS[name]).to_dict())
    model = perturb_(clipforge.create_model(config)).eval()
    clipforge.save_pretrained(model, tmp_path, format="hf")
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    _compare(hf_model, model, model.image_size, model.context_length)


def test_hf_export_tokenizer_and_processor_match(tmp_path, fixtures_dir):
    from PIL import Image

    model, preprocess = clipforge.load(fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors", **OPENAI)
    clipforge.save_pretrained(model, tmp_path, format="hf")
    processor = transformers.CLIPProcessor.from_pretrained(tmp_path)
    captions = ["a photo of a dog.", "An emoji of FACE with thermometer"]
    ours = clipforge.get_tokenizer(tmp_path)(captions)
    theirs = processor.tokenizer(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours[ours != 0], theirs[ours != 0])
    image = Image.open(fixtures_dir / "openai-vit-tiny" / "image0.png").convert("RGB")
    hf_pixels = processor.image_processor(image, return_tensors="pt").pixel_values[0]
    assert (hf_pixels - preprocess(image)).abs().max() < 0.05  # HF resizes with its own bicubic filter


def test_intermediate_size_not_a_whole_ratio_loads(tmp_path):
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=704 // 8, intermediate_size=1920 // 8, num_attention_heads=2, num_hidden_layers=1),
        vision_config=dict(hidden_size=704 // 8, intermediate_size=1920 // 8, num_attention_heads=2,
                           num_hidden_layers=1, image_size=32, patch_size=16), projection_dim=16)
    hf_model = transformers.CLIPModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    model, _ = clipforge.load(tmp_path)
    _compare(hf_model, model, 32, 77)


def test_tokens_hidden_states_and_attentions_match_hf(tmp_path):
    torch.manual_seed(2)
    hf_model = perturb_(transformers.CLIPModel(transformers.CLIPConfig(**CONFIGS["odd"]))).eval()
    hf_model.save_pretrained(tmp_path)
    # Attention weights exist only in transformers' eager attention (SDPA never forms them).
    hf_model = transformers.CLIPModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model, _ = clipforge.load(tmp_path)
    pixels = torch.randn(2, 3, 56, 56)
    tokens = random_tokens(3, 40, [3, 38, 10])
    with torch.no_grad():
        hf_image = hf_model.vision_model(pixel_values=pixels, output_hidden_states=True, output_attentions=True)
        hf_text = hf_model.text_model(input_ids=tokens, output_hidden_states=True, output_attentions=True)
        image, text = model.image_outputs(pixels, attentions=True), model.text_outputs(tokens, attentions=True)
        embeds, patches = model.encode_image(pixels, output_tokens=True)
        text_embeds, token_features = model.encode_text(tokens, output_tokens=True)
        pairs = [
            *zip(image.hidden_states, hf_image.hidden_states), *zip(image.attentions, hf_image.attentions),
            *zip(text.hidden_states, hf_text.hidden_states), *zip(text.attentions, hf_text.attentions),
            # open_clip's tokens: the post layer norm on every patch (HF applies it to the class token only)
            (patches, hf_model.vision_model.post_layernorm(hf_image.last_hidden_state)[:, 1:]),
            (token_features, hf_text.last_hidden_state),
            (embeds, hf_model.visual_projection(hf_image.pooler_output)),
            (text_embeds, hf_model.text_projection(hf_text.pooler_output)),
        ]
    assert len(image.hidden_states) == 4 and len(image.attentions) == 3 and len(text.attentions) == 2
    assert image.attentions[0].shape == (2, 5, 17, 17) and text.attentions[1].shape == (3, 3, 40, 40)
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-4
    assert (embeds - model.encode_image(pixels)).abs().max() < 1e-5  # the fast path, same numbers
