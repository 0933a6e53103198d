"""A captioning decoder added to a plain (contrastive) CLIP checkpoint: the towers load bit-identical, the decoder
starts fresh, reads the ViT's projected patch tokens and the text tower's states, decodes consistently with its
teacher-forced logits, and `--decoder-only` trains it while every CLIP weight stays as it was."""
from __future__ import annotations

import pytest
import torch

import clipforge
from clipforge.errors import CheckpointError, ConfigError
from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train
from conftest import perturb_
from synthetic import make_caption_set

DECODER = {"decoder": {"width": 64, "layers": 1, "heads": 2, "context_length": 32}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    model = perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=0), scale=0.1).eval()
    return model, clipforge.save_pretrained(model, tmp_path_factory.mktemp("plain") / "clip")


def test_a_decoder_added_to_a_clip_checkpoint_leaves_its_embeddings_bit_identical(plain):
    original, folder = plain
    model, _ = clipforge.load(folder, **DECODER)
    pixels, tokens = torch.randn(3, 3, 32, 32), clipforge.get_tokenizer(folder)(["a red square", "x", "a b c d"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), original.encode_image(pixels))
        assert torch.equal(model.encode_text(tokens), original.encode_text(tokens))
        image, text, logits = model.caption_outputs(pixels, tokens)
    # the one-pass path runs every position to the end (encode_image stops at the class token): rounding apart
    torch.testing.assert_close(image, original.encode_image(pixels), rtol=0, atol=1e-5)
    torch.testing.assert_close(text, original.encode_text(tokens), rtol=0, atol=1e-5)
    assert logits.shape == (3, 31, 49408)
    with pytest.raises(Exception, match="missing keys"):  # without the override the file still loads strictly
        clipforge.load(folder, config=model.config)


def test_greedy_decoding_follows_the_teacher_forced_logits(plain):
    _, folder = plain
    model, _ = clipforge.load(folder, **DECODER)
    perturb_(model.text_decoder, seed=3, scale=0.5)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ids = model.generate(pixels, strategy="greedy", max_length=8)
        for row in range(2):
            length = int((ids[row] != 0).sum())
            logits = model.caption_logits(pixels[row : row + 1], ids[row : row + 1, :length])
            assert torch.equal(logits[0].argmax(dim=-1), ids[row, 1:length])


def test_decoder_only_training_from_a_clip_checkpoint_changes_only_the_decoder(plain, tmp_path):
    original, folder = plain
    make_caption_set(tmp_path, per_concept=1, seed=0)
    summary = train(TrainConfig(model=str(folder), model_overrides=DECODER, decoder_only=True,
                                train_data=str(tmp_path / "train.csv"), batch_size=8, workers=0, warmup=1, lr=1e-3,
                                steps=4, save_every=2, keep_last=0, output_dir=str(tmp_path / "run")))
    trained, _ = clipforge.load(summary["checkpoint"])
    before, after = original.state_dict(), trained.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every CLIP weight, the temperature included
    halfway = clipforge.load(tmp_path / "run" / "step-00000002")[0].text_decoder.state_dict()
    assert any(not torch.equal(v, trained.text_decoder.state_dict()[k]) for k, v in halfway.items())  # it trains


def test_formats_without_a_place_for_the_added_decoder_are_refused(plain, tmp_path):
    model, _ = clipforge.load(plain[1], **DECODER)
    for format in ("hf", "open_clip"):  # open_clip's CoCa needs its attentional pool and class token
        with pytest.raises(CheckpointError, match="decoder on plain CLIP towers"):
            clipforge.save_pretrained(model, tmp_path / format, format=format)
        assert not (tmp_path / format).exists()
    bag = clipforge.create_model("cpu-vit-tiny-32", bag_of_words={"buckets": 64, "ngram": 1})
    with pytest.raises(CheckpointError, match="bag-of-words head"):
        clipforge.save_pretrained(bag, tmp_path / "bag", format="open_clip")
    assert clipforge.load(clipforge.save_pretrained(model, tmp_path / "ours"))[0].text_decoder is not None


def test_a_bidirectional_text_tower_cannot_feed_a_decoder():
    with pytest.raises(ConfigError, match="causal text tower"):
        clipforge.create_model("cpu-vit-tiny-32", **{"text.causal": False, "text.pool": "last"}, **DECODER)
