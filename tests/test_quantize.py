"""clipforge.quantize: int8 linear layers give the fp32 model's embeddings and rankings on tiny models."""
from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.model.quantize import Int8Attention
from conftest import perturb_

CAPTIONS = ["a red circle", "a photo of a dog", "two cats on a sofa", "an emoji of a rocket", "tea", "a blue car"]


# SigLIP's random-init temperature is 10, not CLIP's 100: fewer caption pairs stand clear of the int8 error, so
# the share of clear pairs that keeps the order check from being vacuous is lower.
@pytest.mark.parametrize("name, clear_share", [("cpu-vit-tiny-32", 0.5), ("cpu-rn-tiny-64", 0.5),
                                               ("cpu-siglip-tiny-32", 0.2)])
def test_int8_embeddings_match_fp32(name, clear_share):
    model = perturb_(clipforge.create_model(name, seed=0)).eval()
    quantized = clipforge.quantize(model, "int8")
    pixels = torch.randn(8, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    tokens = clipforge.tokenize(CAPTIONS, context_length=model.context_length)
    with torch.no_grad():
        image = (model.encode_image(pixels, normalize=True), quantized.encode_image(pixels, normalize=True))
        text = (model.encode_text(tokens, normalize=True), quantized.encode_text(tokens, normalize=True))
        logits = (model(pixels, tokens)[0], quantized(pixels, tokens)[0])
    assert (image[0] * image[1]).sum(-1).min() > 0.99 and (text[0] * text[1]).sum(-1).min() > 0.99
    assert not torch.equal(image[0], image[1])  # the int8 path really ran
    # Any two captions that fp32 orders by more than twice the largest logit error keep their order.
    error = (logits[0] - logits[1]).abs().max()
    gaps = [scores[:, :, None] - scores[:, None, :] for scores in logits]
    clear = gaps[0].abs() > 2 * error
    assert clear.float().mean() > clear_share and torch.equal(gaps[0][clear] > 0, gaps[1][clear] > 0)
    attention = sum(type(m).__name__ == "Attention" for m in model.modules())
    assert sum(isinstance(m, Int8Attention) for m in quantized.modules()) == attention > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the original is untouched


def test_quantize_refuses_what_it_cannot_do(tmp_path):
    model = clipforge.create_model("cpu-vit-tiny-32", seed=0)
    with pytest.raises(ValueError, match="unknown quantisation mode 'int4'"):
        clipforge.quantize(model, "int4")
    with pytest.raises(ValueError, match="inference only"):
        clipforge.save_pretrained(clipforge.quantize(model), tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="towers must name"):
        clipforge.quantize(model, towers=("audio",))


def test_quantize_one_tower_leaves_the_other_exact():
    model = clipforge.create_model("cpu-vit-tiny-32", seed=0).eval()
    image_only = clipforge.quantize(model, towers=("image",))
    pixels, tokens = torch.randn(3, 3, 32, 32), clipforge.tokenize(["a cat", "a dog"], context_length=32)
    with torch.inference_mode():
        assert torch.equal(image_only.encode_text(tokens), model.encode_text(tokens))
        int8_image, fp32_image = image_only.encode_image(pixels), model.encode_image(pixels)
    assert not torch.equal(int8_image, fp32_image)
    assert torch.nn.functional.cosine_similarity(int8_image, fp32_image).min() > 0.99
    assert not any(isinstance(m, Int8Attention) for m in image_only.text_tower.modules())
