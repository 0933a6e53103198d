"""Model construction, the registry, EOT trimming, bf16 and gradient checkpointing."""
from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.model.config import CLIPConfig
from conftest import perturb_, random_tokens

OPENAI_NAMES = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


def test_registry_has_openai_models_and_cpu_presets():
    names = clipforge.list_models()
    assert set(OPENAI_NAMES) <= set(names)
    assert any(n.startswith("cpu-") for n in names)
    for name in names:
        config = clipforge.get_model_config(name)
        assert CLIPConfig.from_dict(config.to_dict()) == config


def test_openai_registry_heads_follow_width_over_64():
    assert clipforge.get_model_config("ViT-L-14").vision.heads == 16
    assert clipforge.get_model_config("RN50").vision.heads == 32
    assert clipforge.get_model_config("RN50x4").text.heads == 10


def test_vit_b32_parameter_count_matches_openai():
    model = clipforge.create_model("ViT-B-32")
    assert sum(p.numel() for p in model.parameters()) == 151_277_313  # OpenAI ViT-B/32


def test_cpu_small_preset_is_about_20m_params():
    model = clipforge.create_model("cpu-vit-small-64")
    assert 18e6 < sum(p.numel() for p in model.parameters()) < 26e6


def test_unknown_model_name_lists_known():
    with pytest.raises(ValueError, match="ViT-B-32"):
        clipforge.create_model("ViT-Z-99")


def test_overrides_and_bad_override():
    model = clipforge.create_model("cpu-vit-tiny-32", embed_dim=40, vision__width=32, text__layers=1)
    assert model.text_tower.text_projection.shape[1] == 40 and model.visual.conv1.out_channels == 32
    assert len(model.text_tower.transformer.resblocks) == 1
    with pytest.raises(ValueError, match="unknown"):
        clipforge.create_model("cpu-vit-tiny-32", vision__nonsense=3)


@pytest.mark.parametrize("name", ["cpu-vit-tiny-32", "cpu-rn-tiny-64"])
def test_forward_shapes_and_logits(name):
    model = perturb_(clipforge.create_model(name, seed=0)).eval()
    size = model.image_size
    pixels = torch.randn(3, 3, size, size)
    tokens = random_tokens(5, model.context_length, [3, 7, 1, 0, 12])
    logits_per_image, logits_per_text = model(pixels, tokens)
    assert logits_per_image.shape == (3, 5) and torch.equal(logits_per_text, logits_per_image.t())
    image = model.encode_image(pixels, normalize=True)
    text = model.encode_text(tokens, normalize=True)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(logits_per_image, model.logit_scale.exp() * image @ text.t(), atol=1e-5)


def _untrimmed_text(model: clipforge.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """Reference encode_text over the full context with an explicit causal mask (no trimming)."""
    n = tokens.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    tower = model.text_tower
    x = tower.token_embedding(tokens) + tower.positional_embedding[:n]
    for block in tower.transformer.resblocks:
        h = block.ln_1(x)
        attn = block.attn
        q, k, v = torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t, attn=attn: t.view(t.shape[0], n, attn.heads, -1).transpose(1, 2)  # noqa: E731
        scores = split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // attn.heads) ** 0.5 + mask
        out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)
        x = x + attn.out_proj(out)
        x = x + block.mlp(block.ln_2(x))
    x = tower.ln_final(x)[torch.arange(tokens.shape[0]), tokens.argmax(-1)]
    return x @ tower.text_projection


def test_trimmed_text_equals_untrimmed():
    model = perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=1)).eval()
    tokens = random_tokens(4, model.context_length, [2, 9, 5, 14])
    with torch.no_grad():
        trimmed = model.encode_text(tokens)
        full = _untrimmed_text(model, tokens)
        alone = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(4)])
    assert torch.allclose(trimmed, full, atol=1e-5)
    assert torch.allclose(trimmed, alone, atol=1e-5)  # batch composition must not change a row


def test_too_long_tokens_rejected():
    model = clipforge.create_model("cpu-vit-tiny-32")
    with pytest.raises(ValueError, match="context length"):
        model.encode_text(torch.zeros(1, model.context_length + 1, dtype=torch.long))


def test_wrong_image_size_rejected():
    model = clipforge.create_model("cpu-vit-tiny-32")
    with pytest.raises(ValueError, match="32x32"):
        model.encode_image(torch.zeros(1, 3, 48, 48))


@pytest.mark.parametrize("name", ["cpu-vit-tiny-32", "cpu-rn-tiny-64"])
def test_bf16_runs_close_to_fp32(name):
    model = perturb_(clipforge.create_model(name, seed=0)).eval()
    pixels = torch.randn(2, 3, model.image_size, model.image_size)
    tokens = random_tokens(2, model.context_length, [4, 8])
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(pixels, True), model.encode_text(tokens, True)
        model = model.to(torch.bfloat16)
        out_i, out_t = model.encode_image(pixels.bfloat16(), True), model.encode_text(tokens, True)
    assert out_i.dtype == torch.bfloat16
    assert (out_i.float() * ref_i).sum(-1).min() > 0.98  # cosine to the fp32 embedding
    assert (out_t.float() * ref_t).sum(-1).min() > 0.98


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = random_tokens(2, 32, [4, 8])
    grads = []
    for checkpointing in (False, True):
        model = clipforge.create_model("cpu-vit-tiny-32", seed=3)
        model.set_grad_checkpointing(checkpointing)
        logits, _ = model(pixels, tokens)
        logits.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_compiled_towers_match_eager():
    # Inductor reorders float sums and fuses kernels, so "exact up to rounding": 1e-4 on features of size ~1
    # (measured: at most 2e-6); a text block computing anything else is off by ~0.9 at either length.
    tolerance = 1e-4
    model = perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=0)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    texts = [random_tokens(2, 32, lengths) for lengths in ([3, 9], [5, 20])]  # the second: a new trimmed length
    with torch.inference_mode():
        eager_image, eager_texts = model.encode_image(pixels), [model.encode_text(tokens) for tokens in texts]
        model.compile_for_inference()
        assert (model.encode_image(pixels) - eager_image).abs().max() < tolerance
        for tokens, eager in zip(texts, eager_texts):
            compiled = model.encode_text(tokens)
            assert compiled.shape == eager.shape == (2, 64)
            assert (compiled - eager).abs().max() < tolerance, tokens.ne(0).sum(1)


def test_resnet_tokens_are_the_map_its_attention_pool_reads():
    model = clipforge.create_model("cpu-rn-tiny-64", seed=0).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds, tokens = model.encode_image(pixels, output_tokens=True)
        grid = model.visual.feature_map(pixels)
        assert torch.equal(embeds, model.encode_image(pixels)) and tokens.shape == (2, 4, 512)
        assert torch.equal(tokens[:, 1], grid[:, :, 0, 1])  # row-major: position 1 is row 0, column 1
    with pytest.raises(ValueError, match="no attention layers"):
        model.image_outputs(pixels, attentions=True)


@pytest.mark.parametrize("method", ["encode_image", "encode_text"])
def test_encode_has_one_return_type_per_output_tokens_value(method):
    import typing

    # open_clip's output_tokens flag stays; each value of it has its own overload, so a type checker gives a
    # call one return type instead of `Any`.
    returns = {typing.get_type_hints(o)["output_tokens"]: typing.get_type_hints(o)["return"]
               for o in typing.get_overloads(getattr(clipforge.CLIP, method))}
    assert returns == {typing.Literal[False]: torch.Tensor, typing.Literal[True]: tuple[torch.Tensor, torch.Tensor]}
    model = clipforge.create_model("cpu-vit-tiny-32", seed=0).eval()
    inputs = torch.randn(1, 3, 32, 32) if method == "encode_image" else random_tokens(1, 32, [4])
    with torch.no_grad():
        assert isinstance(getattr(model, method)(inputs), torch.Tensor)
        embeds, tokens = getattr(model, method)(inputs, output_tokens=True)
        # the per-layer path (output_tokens) and the fused one round differently
        assert torch.allclose(embeds, getattr(model, method)(inputs), atol=1e-5) and tokens.dim() == 3


def test_every_text_tower_name_has_a_class_and_tokenizer():
    from clipforge.model.config import TEXT_TOWER_NAMES
    from clipforge.model.towers import TEXT_TOWERS

    assert tuple(TEXT_TOWERS) == TEXT_TOWER_NAMES  # CLIPConfig validates names against the tuple
    assert {tower.kind for tower in TEXT_TOWERS.values()} == set(TEXT_TOWER_NAMES)
