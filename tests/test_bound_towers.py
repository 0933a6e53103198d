"""Towers of other modalities bound to a CLIP's space (ImageBind's layout): `model.modalities`, `model.encode`,
a bound text tower with a tokenizer of its own, saved and loaded with the model; the CLIP's own outputs stay
bit-identical, and formats without a place for bound towers refuse them."""
from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.errors import CheckpointError, ConfigError
from clipforge.model.config import AudioConfig, TextConfig
from clipforge.text.bpe_train import train_bpe
from conftest import perturb_

KOREAN = ["고양이 얼굴", "빨간색 하트", "달리는 사람", "강아지 얼굴", "빨간 사과", "활짝 웃는 얼굴"] * 4
JAPANESE = ["猫の顔", "赤いハート", "走る人", "犬の顔"] * 4
TINY_AUDIO = AudioConfig(clip_seconds=0.5, mel_bins=32, width=32, layers=1, heads=2, patch_size=8, patch_stride=8)


def _bound_model(tmp_path):
    """cpu-vit-tiny-32 with Korean and Japanese text towers, each with a BPE of its own, and an audio tower."""
    model = perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=0), scale=0.1).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizers = {}
    for name, texts, size in (("text-ko", KOREAN, 530), ("text-ja", JAPANESE, 525)):
        tokenizer = train_bpe(texts, size, tmp_path / f"{name}.txt.gz", context_length=16)
        tower = model.bind_text_tower(name, TextConfig(context_length=16, vocab_size=tokenizer.vocab_size, width=32,
                                                       heads=2, layers=1, quick_gelu=False))
        perturb_(tower, seed=len(name), scale=0.1)
        tokenizers[name] = tokenizer
    perturb_(model.bind_audio_tower("audio", TINY_AUDIO), seed=3, scale=0.1)
    return model.eval(), original, tokenizers


def test_bound_towers_leave_the_clip_bit_identical_and_embed_their_modality(tmp_path):
    model, original, tokenizers = _bound_model(tmp_path)
    reference = clipforge.create_model("cpu-vit-tiny-32", seed=0)
    reference.load_state_dict(original)
    reference.eval()
    assert model.modalities == ("image", "text", "text-ko", "text-ja", "audio")
    pixels, tokens = torch.randn(2, 3, 32, 32), clipforge.get_tokenizer("cpu-vit-tiny-32")(["a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(model.encode("image", pixels), reference.encode_image(pixels, normalize=True))
        assert torch.equal(model.encode("text", tokens), reference.encode_text(tokens, normalize=True))
        korean = model.encode("text-ko", tokenizers["text-ko"](["고양이 얼굴", "빨간색 하트"]))
        sound = model.encode("audio", torch.randn(2, 1, 32, TINY_AUDIO.frames))
    for embedded in (korean, sound):
        assert embedded.shape == (2, 64) and torch.allclose(embedded.norm(dim=-1), torch.ones(2))
    with pytest.raises(ConfigError, match="takes \\(1, 32, 48\\)"):
        model.encode("audio", torch.randn(2, 1, 32, 40))
    with pytest.raises(ConfigError, match="no 'depth' tower"):
        model.encode("depth", tokens)
    with pytest.raises(ConfigError, match="bad modality name"):
        model.bind_text_tower("Text KO", TextConfig())
    with pytest.raises(ConfigError, match="already has"):
        model.bind_text_tower("text-ko", TextConfig())
    with pytest.raises(ConfigError, match="already has"):
        model.bind_audio_tower("text-ko", TINY_AUDIO)


def test_a_model_with_two_bound_towers_round_trips_with_their_tokenizers(tmp_path):
    model, _, tokenizers = _bound_model(tmp_path)
    with pytest.raises(CheckpointError, match="no tokenizer for the bound tower"):
        clipforge.save_pretrained(model, tmp_path / "incomplete")
    folder = clipforge.save_pretrained(model, tmp_path / "bound", modality_tokenizers=tokenizers)
    loaded, preprocess = clipforge.load(folder)
    assert loaded.modalities == model.modalities
    for name, texts in (("text-ko", KOREAN[:3]), ("text-ja", JAPANESE[:3])):
        tokenizer = clipforge.get_tokenizer(folder, modality=name)
        assert torch.equal(tokenizer(texts), tokenizers[name](texts))
        with torch.no_grad():
            assert torch.equal(loaded.encode(name, tokenizer(texts)), model.encode(name, tokenizers[name](texts)))
    audio = clipforge.get_preprocess(folder, "audio")
    assert audio.config == TINY_AUDIO and audio.augment is None
    sound = torch.randn(3, 1, 32, TINY_AUDIO.frames)
    with torch.no_grad():
        assert torch.equal(loaded.encode("audio", sound), model.encode("audio", sound))
    with pytest.raises(CheckpointError, match="text modalities are text, text-ko, text-ja"):
        clipforge.get_tokenizer(folder, modality="text-fr")
    image = clipforge.get_preprocess(folder, "image")
    assert image == preprocess and image.image_size == 32
    with pytest.raises(CheckpointError, match="this model's are image, audio.*take clipforge.get_tokenizer"):
        clipforge.get_preprocess(folder, "text-ko")
    for format in ("hf", "open_clip"):
        with pytest.raises(CheckpointError, match="bound towers"):
            clipforge.save_pretrained(model, tmp_path / format, format=format, modality_tokenizers=tokenizers)
