"""SigLIP in clipforge: HF transformers SiglipModel folders load into CLIP's towers with SigLIP's options."""
from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.errors import CheckpointError

transformers = pytest.importorskip("transformers")

CONFIGS = {  # odd sizes: head width not 64, MLP ratios not integers, several depths and resolutions
    "w48-h3": dict(text=dict(hidden_size=48, intermediate_size=100, num_attention_heads=3, num_hidden_layers=2,
                             vocab_size=300, max_position_embeddings=16),
                   vision=dict(hidden_size=48, intermediate_size=90, num_attention_heads=3, num_hidden_layers=2,
                               image_size=32, patch_size=8)),
    "w40-h5": dict(text=dict(hidden_size=40, intermediate_size=72, num_attention_heads=5, num_hidden_layers=3,
                             vocab_size=257, max_position_embeddings=12),
                   vision=dict(hidden_size=40, intermediate_size=64, num_attention_heads=5, num_hidden_layers=1,
                               image_size=36, patch_size=6)),
}


def _hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    sizes = CONFIGS[name]
    config = transformers.SiglipConfig(text_config=dict(sizes["text"], bos_token_id=None, eos_token_id=None,
                                                        pad_token_id=1), vision_config=sizes["vision"])
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():  # the init leaves biases, norms and the temperature at round values: move them
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_siglip_folder_loads_with_the_same_embeddings_and_logits(name, tmp_path):
    reference = _hf_model(name)
    reference.save_pretrained(tmp_path)
    model, _ = clipforge.load(tmp_path)
    sizes = CONFIGS[name]
    size, length = sizes["vision"]["image_size"], sizes["text"]["max_position_embeddings"]
    pixels = torch.randn(3, 3, size, size)
    ids = torch.randint(0, sizes["text"]["vocab_size"], (4, length))
    with torch.no_grad():
        image = _features(reference.get_image_features(pixel_values=pixels))
        text = _features(reference.get_text_features(input_ids=ids))
        logits = reference(input_ids=ids, pixel_values=pixels).logits_per_image
        torch.testing.assert_close(model.encode_image(pixels), image, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.encode_text(ids), text, rtol=1e-4, atol=1e-4)
        ours = model.logit_scale.exp() * model.encode_image(pixels, normalize=True) @ model.encode_text(
            ids, normalize=True).t() + model.logit_bias
        torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(pixels, ids)[0], logits, rtol=1e-4, atol=1e-4)
    assert model.config.vision.pool == "map" and not model.config.text.causal


def test_siglip_model_round_trips_through_clipforge_format(tmp_path):
    _hf_model("w48-h3").save_pretrained(tmp_path / "hf")
    model, _ = clipforge.load(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="open_clip"):
        clipforge.save_pretrained(model, tmp_path / "back", format="open_clip", tokenizer=object())
    assert not (tmp_path / "back").exists()
    pixels = torch.randn(2, 3, 32, 32)
    # clipforge's format keeps every option: reloaded, the same outputs (tokenizers come with a later change)
    from clipforge.checkpoint.io import write_clipforge_dir

    write_clipforge_dir(tmp_path / "cf", model.state_dict(), model.config, _NoTokenizer(), model.preprocess_config)
    again, _ = clipforge.load(tmp_path / "cf")
    with torch.no_grad():
        assert torch.equal(again.encode_image(pixels), model.encode_image(pixels))
        assert torch.equal(again.logit_bias, model.logit_bias)


def test_registry_siglip_shapes_and_a_cpu_preset_that_trains(tmp_path):
    from clipforge.model import get_model_config
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import train
    from synthetic import make_caption_set

    so400m = get_model_config("ViT-SO400M-14-SigLIP-384")
    assert (so400m.vision.width, so400m.vision.layers, round(so400m.vision.width * so400m.vision.mlp_ratio)) == (
        1152, 27, 4304) and (so400m.text.context_length, so400m.text.vocab_size) == (64, 32000)
    assert get_model_config("ViT-B-16-SigLIP2").text.vocab_size == 256000
    model = clipforge.create_model("cpu-siglip-tiny-32")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = model.image_outputs(pixels)
        assert outputs.tokens.shape == (2, 16, 64)  # every token is a patch: no class token
        torch.testing.assert_close(outputs.embeds, model.encode_image(pixels))
    data = make_caption_set(tmp_path / "data", per_concept=2)
    summary = train(TrainConfig(model="cpu-siglip-tiny-32", loss="siglip", train_data=str(data), batch_size=16,
                                workers=0, steps=3, output_dir=str(tmp_path / "run")))
    trained, _ = clipforge.load(summary["checkpoint"])
    assert trained.config.text.pool == "last" and trained.logit_bias is not None


class _NoTokenizer:
    """Tokenizer files for a SigLIP folder come with a later change; the weights and configs are what is tested."""

    def save(self, directory):
        return None


def test_siglip_preprocessing_matches_transformers_image_processor(tmp_path):
    from PIL import Image

    from clipforge.checkpoint.io import write_clipforge_dir

    _hf_model("w48-h3").save_pretrained(tmp_path)
    processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    model, preprocess = clipforge.load(tmp_path)
    rng = torch.Generator().manual_seed(0)
    for size in ((50, 20), (17, 64), (32, 32)):  # wide, tall and square: squashed, never cropped
        image = Image.fromarray(torch.randint(0, 256, (*size[::-1], 3), generator=rng, dtype=torch.uint8).numpy())
        expected = processor(images=image, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(preprocess(image), expected, rtol=0, atol=1e-5)
    write_clipforge_dir(tmp_path / "cf", model.state_dict(), model.config, _NoTokenizer(), model.preprocess_config)
    assert clipforge.load(tmp_path / "cf")[0].preprocess_config.resize == "squash"  # recorded in the model folder
    (tmp_path / "preprocessor_config.json").unlink()  # no processor file: SigLIP's own rule, not CLIP's crop
    assert clipforge.load(tmp_path)[0].preprocess_config.mean == (0.5, 0.5, 0.5)


def test_zero_shot_probabilities_are_sigmoids_for_a_model_with_a_logit_bias():
    from clipforge.inference.zeroshot import build_classifier, classify
    from clipforge.model.towers import tokenizer_for

    model = clipforge.create_model("cpu-siglip-tiny-32").eval()
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)
    tokenizer = tokenizer_for(model.config)
    classifier = build_classifier(model, tokenizer, ["cat", "dog", "owl"], cache=False)
    pixels = torch.randn(2, 3, 32, 32)
    probs = classify(model, pixels, classifier)
    with torch.no_grad():
        cosine = model.encode_image(pixels, normalize=True) @ classifier
        expected = torch.sigmoid(model.logit_scale.exp() * cosine + model.logit_bias)
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs.sum(-1), torch.ones(2))  # each label its own probability
    torch.testing.assert_close(classify(model, pixels, classifier, softmax=True).sum(-1), torch.ones(2))


CORPUS = ["A photo of a Cat.", "Café  crème, brûlée!", "고양이 얼굴 🐱", "", "  leading and trailing spaces  ",
          "don't STOP — ünïcödé 'quotes' and \"more\"", "a " * 40 + "long caption that is cut", "▁underline▁",
          "tabs\tand\nnewlines", "ÅNGSTRÖM 123-456 #tag @user"]


def test_sentencepiece_ids_equal_transformers_siglip_tokenizer(spiece_model):
    from clipforge.text import SentencePieceTokenizer

    reference = transformers.SiglipTokenizer(str(spiece_model), model_max_length=16)
    ours = SentencePieceTokenizer(spiece_model, context_length=16)
    expected = reference(CORPUS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(ours(CORPUS, truncate=True), expected["input_ids"])
    from clipforge.errors import TextTooLong

    with pytest.raises(TextTooLong, match="truncate=True"):
        ours(CORPUS[6])


def test_siglip_folder_carries_its_tokenizer(spiece_model, tmp_path):
    import shutil

    reference = _hf_model("w48-h3")
    reference.save_pretrained(tmp_path)
    shutil.copyfile(spiece_model, tmp_path / "spiece.model")
    model, _ = clipforge.load(tmp_path)
    tokenizer = clipforge.get_tokenizer(tmp_path)
    assert tokenizer.kind == "sentencepiece" and tokenizer.context_length == 16
    ids = tokenizer(["a photo of a cat", "a dog"])
    with torch.no_grad():
        expected = _features(reference.get_text_features(input_ids=ids))
        torch.testing.assert_close(model.encode_text(ids), expected, rtol=1e-4, atol=1e-4)
    clipforge.save_pretrained(model, tmp_path / "cf", tokenizer=tokenizer)  # clipforge's format keeps spiece.model
    assert clipforge.get_tokenizer(tmp_path / "cf").kind == "sentencepiece"


def test_hf_to_clipforge_to_hf_loads_in_transformers_with_the_same_outputs(spiece_model, tmp_path):
    import shutil

    reference = _hf_model("w40-h5")
    reference.save_pretrained(tmp_path / "hf")
    shutil.copyfile(spiece_model, tmp_path / "hf" / "spiece.model")
    model, _ = clipforge.load(tmp_path / "hf")
    clipforge.save_pretrained(model, tmp_path / "cf", tokenizer=clipforge.get_tokenizer(tmp_path / "hf"))
    again, _ = clipforge.load(tmp_path / "cf")
    clipforge.save_pretrained(again, tmp_path / "back", format="hf", tokenizer=clipforge.get_tokenizer(tmp_path / "cf"))
    back = transformers.SiglipModel.from_pretrained(tmp_path / "back").eval()
    pixels, ids = torch.randn(2, 3, 36, 36), torch.randint(0, 257, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=pixels).logits_per_image,
                                   reference(input_ids=ids, pixel_values=pixels).logits_per_image, rtol=1e-5, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert tokenizer("a photo of a cat", padding="max_length", max_length=12)["input_ids"] == clipforge.get_tokenizer(
        tmp_path / "cf")("a photo of a cat")[0].tolist()
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "back")
    assert type(processor).__name__.startswith("Siglip") and processor.size == {"height": 36, "width": 36}


@pytest.mark.integration
def test_eval_index_and_serve_run_on_an_hf_siglip_folder(spiece_model, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from clipforge.search import build_index
    from clipforge.serve import create_app
    from synthetic import make_labelled_set

    folder = tmp_path / "siglip"
    _hf_model("w48-h3").save_pretrained(folder)
    shutil.copyfile(spiece_model, folder / "spiece.model")
    labels = make_labelled_set(tmp_path / "data", per_concept=1, styles=("filled",))
    run = subprocess.run([sys.executable, "-m", "clipforge.cli.main", "eval", "--task", "zeroshot", "--model",
                          str(folder), "--data", str(labels), "--templates", "label", "--out", str(tmp_path / "eval"),
                          "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["images"] == 24 and results["classes"] == 24 and 0 <= results["ensemble"]["top1"] <= 1
    build_index(tmp_path / "data" / "labelled", tmp_path / "index", model=str(folder), batch_size=8, progress=False)
    model, preprocess = clipforge.load(folder)
    tokenizer = clipforge.get_tokenizer(folder)
    with TestClient(create_app(tmp_path / "index")) as client:
        body = client.get("/search", params={"q": "a red square", "k": 3}).json()
    assert len(body["results"]) == 3
    top = body["results"][0]
    from PIL import Image

    with torch.no_grad():
        image = model.encode_image(preprocess(Image.open(tmp_path / "data" / "labelled" / top["name"]))[None],
                                   normalize=True)
        text = model.encode_text(tokenizer(["a red square"]), normalize=True)
    assert top["score"] == pytest.approx((image @ text.t()).item(), abs=1e-4)  # SigLIP's own preprocessing
