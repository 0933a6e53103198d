"""SigLIP 2 NaFlex: transformers' Siglip2Model folders load into SigLIP's towers; patch input with a padding mask
at each image's own aspect ratio gives transformers' embeddings and logits; the model writes back as Siglip2Model."""
from __future__ import annotations

import json

import pytest
import torch

import clipforge

transformers = pytest.importorskip("transformers")
PATCH, GRID = 4, 4  # a 4x4 grid of position embeddings: the native square is 16 px


def _hf_siglip2(seed: int = 0):
    torch.manual_seed(seed)
    text = dict(hidden_size=48, intermediate_size=100, num_attention_heads=3, num_hidden_layers=2, vocab_size=400,
                max_position_embeddings=16, bos_token_id=None, eos_token_id=None, pad_token_id=1)
    vision = dict(hidden_size=48, intermediate_size=90, num_attention_heads=3, num_hidden_layers=2,
                  num_patches=GRID * GRID, patch_size=PATCH)
    model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # move the init's round values (zero biases, unit norms)
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def naflex_batch(shapes: list[tuple[int, int]], rows: int, seed: int = 1):
    """Patch rows for images of these grids, zero-padded to `rows`, with the mask of real patches."""
    generator = torch.Generator().manual_seed(seed)
    patches = torch.zeros(len(shapes), rows, 3 * PATCH * PATCH)
    mask = torch.zeros(len(shapes), rows, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        patches[i, : h * w] = torch.randn(h * w, 3 * PATCH * PATCH, generator=generator)
        mask[i, : h * w] = 1
    return patches, mask, torch.tensor(shapes)


def patchify(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, grid cells, p*p*3] in Siglip2ImageProcessor's order (row-major cells, channels last)."""
    b, c, h, w = pixels.shape
    cells = pixels.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1)
    return cells.reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def test_siglip2_folder_with_masked_patches_at_any_aspect_ratio_matches_transformers(tmp_path):
    reference = _hf_siglip2()
    reference.save_pretrained(tmp_path)
    model, transform = clipforge.load(tmp_path)
    assert model.config.vision.naflex and model.image_size == GRID * PATCH
    patches, mask, shapes = naflex_batch([(2, 5), (4, 4), (3, 3), (1, 7), (6, 2)], rows=16)
    ids = torch.randint(0, 300, (3, 16))
    with torch.no_grad():
        expected = _features(reference.get_image_features(pixel_values=patches, pixel_attention_mask=mask,
                                                          spatial_shapes=shapes))
        torch.testing.assert_close(model.encode_image_patches(patches, mask, shapes), expected, rtol=1e-4, atol=1e-4)
        logits = reference(input_ids=ids, pixel_values=patches, pixel_attention_mask=mask,
                           spatial_shapes=shapes).logits_per_image
        ours = model.logit_scale.exp() * model.encode_image_patches(patches, mask, shapes, normalize=True) @ \
            model.encode_text(ids, normalize=True).t() + model.logit_bias
        torch.testing.assert_close(ours, logits, rtol=1e-4, atol=1e-4)
        padded = patches.clone()
        padded[mask == 0] = 5.0  # what sits in the padding never reaches a real patch or the pooled output
        torch.testing.assert_close(model.encode_image_patches(padded, mask, shapes), expected, rtol=1e-5, atol=1e-5)
        # a native-size square image through the fixed-size path equals its patches at the native grid
        pixels = torch.randn(2, 3, GRID * PATCH, GRID * PATCH)
        native = _features(reference.get_image_features(pixel_values=patchify(pixels),
                                                        pixel_attention_mask=torch.ones(2, GRID * GRID),
                                                        spatial_shapes=torch.tensor([[GRID, GRID]] * 2)))
        torch.testing.assert_close(model.encode_image(pixels), native, rtol=1e-4, atol=1e-4)
    assert (transform.resize, transform.interpolation) == ("squash", "bilinear")  # Siglip2ImageProcessor's filter


def test_siglip2_round_trip_writes_a_folder_transformers_loads_as_siglip2(spiece_model, tmp_path):
    from clipforge.text import SentencePieceTokenizer

    reference = _hf_siglip2(seed=3)
    reference.save_pretrained(tmp_path / "hf")
    model, _ = clipforge.load(tmp_path / "hf")
    clipforge.save_pretrained(model, tmp_path / "cf", tokenizer=SentencePieceTokenizer(spiece_model, 16))
    again, _ = clipforge.load(tmp_path / "cf")  # clipforge's format keeps the NaFlex option
    clipforge.save_pretrained(again, tmp_path / "back", format="hf", tokenizer=SentencePieceTokenizer(spiece_model, 16))
    back = transformers.Siglip2Model.from_pretrained(tmp_path / "back").eval()
    patches, mask, shapes = naflex_batch([(3, 5), (4, 4)], rows=16, seed=2)
    kwargs = {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}
    with torch.no_grad():
        torch.testing.assert_close(_features(back.get_image_features(**kwargs)),
                                   _features(reference.get_image_features(**kwargs)), rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "siglip2"


def test_patch_input_is_refused_by_a_class_token_tower():
    from clipforge.errors import ConfigError

    model = clipforge.create_model("cpu-vit-tiny-32")
    patches, mask, shapes = naflex_batch([(2, 2)], rows=4)
    with pytest.raises(ConfigError, match="NaFlex image tower.*class token"):
        model.encode_image_patches(patches, mask, shapes)
    siglip = clipforge.create_model("cpu-siglip-tiny-32")  # SigLIP 1: trained on its fixed grid only
    with pytest.raises(ConfigError, match="fixed grid"):
        siglip.encode_image_patches(*naflex_batch([(2, 2)], rows=4))
    from clipforge import NaFlexTransform

    with pytest.raises(ConfigError, match="NaFlex image tower"):
        NaFlexTransform.for_model(siglip)


CORPUS = ["A photo of a Cat.", "Café  crème, brûlée!", "고양이 얼굴 🐱", "", "  leading and trailing spaces  ",
          "x" * 40, "ÅNGSTRÖM 123-456 #tag @user", "tabs\tand\nnewlines"]


def _gemma_folder(directory, cls: str, **settings):
    """transformers' own tokenizer of class `cls` on a byte-fallback BPE trained here, saved as its hub files are."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus = ["a photo of a cat", "a dog on the grass", "café crème brûlée", "고양이 얼굴 귀여운 고양이", "🐱 🐶 emoji",
              "an astronaut riding a horse", "the quick brown fox jumps over the lazy dog", "ångström"] * 40
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "\u2581")])
    bpe.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge) for merge in model["merges"]]
    getattr(transformers, cls)(vocab=model["vocab"], merges=merges, **settings).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("cls, settings", [
    ("Siglip2Tokenizer", dict(add_bos_token=False, add_eos_token=True, padding_side="right")),  # SigLIP 2's hub files
    ("Siglip2Tokenizer", {}),  # the specials from the file's post-processor, transformers' left padding
    ("GemmaTokenizer", dict(add_bos_token=True, add_eos_token=False)),  # no lower case, BOS first
])
def test_gemma_tokenizer_json_ids_equal_transformers(cls, settings, tmp_path):
    from clipforge.errors import TextTooLong
    from clipforge.text import GemmaTokenizer

    folder = _gemma_folder(tmp_path, cls, **settings)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    expected = reference(CORPUS, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ours = GemmaTokenizer(folder, context_length=16)
    assert torch.equal(ours(CORPUS, truncate=True), expected["input_ids"])
    with pytest.raises(TextTooLong, match="truncate=True"):
        ours(CORPUS[5])


def test_siglip2_folder_carries_its_gemma_tokenizer_through_every_format(tmp_path):
    reference = _hf_siglip2(seed=5)
    reference.save_pretrained(tmp_path / "hf")
    _gemma_folder(tmp_path / "hf", "Siglip2Tokenizer", add_bos_token=False, add_eos_token=True, padding_side="right")
    model, _ = clipforge.load(tmp_path / "hf")
    tokenizer = clipforge.get_tokenizer(tmp_path / "hf")
    assert tokenizer.kind == "gemma" and tokenizer.context_length == 16
    ids = tokenizer(["a photo of a cat", "A Dog!"])
    with torch.no_grad():
        expected = _features(reference.get_text_features(input_ids=ids))
        torch.testing.assert_close(model.encode_text(ids), expected, rtol=1e-4, atol=1e-4)
    clipforge.save_pretrained(model, tmp_path / "cf", tokenizer=tokenizer)
    assert torch.equal(clipforge.get_tokenizer(tmp_path / "cf")(["a photo of a cat", "A Dog!"]), ids)
    clipforge.save_pretrained(model, tmp_path / "back", format="hf", tokenizer=tokenizer)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert torch.equal(again(["a photo of a cat", "A Dog!"], padding="max_length", max_length=16,
                             return_tensors="pt")["input_ids"], ids)


def test_naflex_transform_matches_transformers_siglip2_image_processor(tmp_path):
    import numpy as np
    from PIL import Image

    from clipforge import NaFlexTransform

    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=GRID * GRID)
    rng = np.random.default_rng(0)
    sizes = [(30, 50), (64, 9), (7, 7), (200, 100), (16, 16), (13, 97)]  # (height, width): wide, tall, tiny, native
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    expected = processor(images=images, return_tensors="pt")
    reference = _hf_siglip2(seed=7)
    reference.save_pretrained(tmp_path)
    model, _ = clipforge.load(tmp_path)
    patches, mask, grids = NaFlexTransform.for_model(model).batch(images)
    assert torch.equal(grids, expected["spatial_shapes"]) and torch.equal(mask, expected["pixel_attention_mask"])
    torch.testing.assert_close(patches, expected["pixel_values"], rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image_patches(patches, mask, grids),
                                   _features(reference.get_image_features(**expected)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gemma", "sentencepiece"])
def test_open_clip_siglip_folders_clean_text_as_open_clips_tokenizer(kind, open_clip_package, spiece_model,
                                                                    tmp_path):
    """open_clip's SigLIP configs say tokenizer_kwargs clean=canonicalize: its HFTokenizer lower-cases, drops
    punctuation and makes underscores spaces before the folder's HF tokenizer runs; clipforge does the same."""
    import shutil

    if kind == "gemma":
        _gemma_folder(tmp_path, "GemmaTokenizer", add_bos_token=False, add_eos_token=True, padding_side="right")
    else:
        shutil.copyfile(spiece_model, tmp_path / "spiece.model")
        transformers.SiglipTokenizer(str(spiece_model), model_max_length=16).save_pretrained(tmp_path)
    text_cfg = {"context_length": 16, "tokenizer_kwargs": {"clean": "canonicalize"}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": text_cfg}}))
    texts = [*CORPUS, "snake_case_words and A_B", "Hello, World!"]
    expected = open_clip_package.tokenizer.HFTokenizer(str(tmp_path), context_length=16, clean="canonicalize")(texts)
    from clipforge.text import GemmaTokenizer, SentencePieceTokenizer

    cls = GemmaTokenizer if kind == "gemma" else SentencePieceTokenizer
    ours = cls.from_directory(tmp_path, context_length=16)
    assert ours.clean == "canonicalize" and torch.equal(ours(texts, truncate=True), expected)
    (tmp_path / "copy").mkdir()
    ours.save(tmp_path / "copy")
    assert cls.from_directory(tmp_path / "copy", context_length=16).clean == "canonicalize"  # kept by a save
