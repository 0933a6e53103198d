"""The paper's predictive baselines: a bag-of-n-grams head (hashed n-grams, soft-target cross-entropy, zero-shot by
mean n-gram log-probability) and a captioning decoder on the demo's ResNet tower (a caption language model)."""
from __future__ import annotations

import copy

import torch

import clipforge
from clipforge.distributed import DistInfo
from clipforge.loss import ContrastiveLoss
from clipforge.model.bag_of_words import bag_log_likelihood, bag_targets, ngram_buckets
from clipforge.model.config import BagOfWordsConfig
from clipforge.text.bpe_train import train_bpe
from clipforge.train.config import TrainConfig
from clipforge.train.step import BagOfWordsStep
from clipforge.train.trainer import train
from synthetic import make_caption_set

WORDS = BagOfWordsConfig(buckets=4096, ngram=2)
RESNET_DECODER = {"embed_dim": 128, "text.pool": "cls",
                  "decoder": {"width": 128, "layers": 1, "heads": 2, "context_length": 32}}


def _tokens(texts: list[str]) -> torch.Tensor:
    return clipforge.get_tokenizer("demo-rn-32")(texts)


def test_ngrams_cover_the_content_tokens_only_and_ignore_order_within_unigrams():
    tokens = _tokens(["red square", "square red", "red"])
    ids, valid = ngram_buckets(tokens, WORDS)
    assert valid.sum(dim=1).tolist() == [3, 3, 1]  # 2 words + 1 bigram; start, end and padding never count
    first, second = (set(ids[i][valid[i]].tolist()) for i in (0, 1))
    unigram = set(ids[2][valid[2]].tolist())
    assert unigram <= first and unigram <= second and first != second  # same words, the bigram differs by order
    targets = bag_targets(tokens, WORDS)
    assert torch.allclose(targets.sum(dim=1), torch.ones(3)) and (targets[2] > 0).sum() == 1
    assert bag_targets(_tokens([""]), WORDS).sum() == 0  # a caption without words asks nothing


def test_zero_shot_score_is_the_mean_log_probability_of_the_prompts_ngrams():
    model = clipforge.create_model("demo-rn-32", seed=0, bag_of_words={"buckets": 4096, "ngram": 2}).eval()
    pixels, prompts = torch.randn(3, 3, 32, 32), _tokens(["a red square", "blue", ""])
    scores = bag_log_likelihood(model, pixels, prompts)
    assert torch.isinf(scores[:, 2]).all() and (scores[:, 2] < 0).all()  # no n-gram: never the best prompt
    logprobs = model.bag_of_words_logits(pixels).log_softmax(dim=-1)
    ids, valid = ngram_buckets(prompts, WORDS)
    for p in range(2):
        expected = logprobs[:, ids[p][valid[p]]].mean(dim=1)
        assert torch.allclose(scores[:, p], expected, atol=1e-5)


def test_bag_of_words_step_is_exact_under_accumulation():
    # eval mode: BatchNorm's batch statistics differ per micro-batch (inherent to BN, not to the step)
    base = clipforge.create_model("demo-rn-32", seed=0, bag_of_words={"buckets": 512, "ngram": 2}).double().eval()
    pixels = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    tokens = _tokens([f"a {c} square" for c in "red green blue gray pink teal gold navy".split()])
    grads, values = [], []
    for accum in (1, 4):
        model = copy.deepcopy(base)
        values.append(BagOfWordsStep(model, ContrastiveLoss(), "fp32", accum, 0.0, DistInfo())(pixels, tokens))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        assert all(p.grad is None for p in model.text_tower.parameters())  # the text tower takes no part
    assert (grads[0] - grads[1]).abs().max() < 1e-10 and abs(values[0] - values[1]) < 1e-6


def test_a_bag_of_words_run_learns_and_its_checkpoint_keeps_the_head(tmp_path):
    make_caption_set(tmp_path, per_concept=2, seed=0)
    overrides = {"bag_of_words": {"buckets": 1024, "ngram": 2}}
    summary = train(TrainConfig(model="demo-rn-32", model_overrides=overrides, train_data=str(tmp_path / "train.csv"),
                                batch_size=8, workers=0, warmup=2, lr=2e-3, steps=30, output_dir=str(tmp_path / "r")))
    model, _ = clipforge.load(summary["checkpoint"])
    assert model.config.bag_of_words == BagOfWordsConfig(buckets=1024, ngram=2)
    losses = [float(line.split('"loss": ')[1].split(",")[0]) for line in
              (tmp_path / "r" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3  # it fits the captions' words


def test_a_resnet_tower_feeds_a_captioning_decoder(tmp_path):
    model = clipforge.create_model("demo-rn-32", seed=0, **RESNET_DECODER).eval()
    pixels = torch.randn(2, 3, 32, 32)
    embedding, tokens = model.visual.forward_tokens(pixels)
    assert tokens.shape == (2, 2, 128)  # the pooled position and the 1x1 grid's
    assert torch.allclose(embedding, model.encode_image(pixels), atol=1e-5)
    assert model.generate(pixels, max_length=6).shape[0] == 2
    make_caption_set(tmp_path, per_concept=1, seed=0)
    # a caption language model with a vocabulary of its own: the decoder writes the BPE's ids
    vocab = tmp_path / "bpe.txt.gz"
    train_bpe([f"a {c} {s}" for c in ("red", "green", "blue") for s in ("square", "circle")] * 5, 530, vocab)
    summary = train(TrainConfig(model="demo-rn-32", model_overrides=RESNET_DECODER, contrastive_loss_weight=0.0,
                                bpe_vocab=str(vocab), train_data=str(tmp_path / "train.csv"), batch_size=8, workers=0,
                                warmup=2, steps=3, output_dir=str(tmp_path / "lm")))
    loaded, _ = clipforge.load(summary["checkpoint"])
    assert loaded.text_decoder is not None and loaded.config.vision.is_resnet
    tokenizer = clipforge.get_tokenizer(summary["checkpoint"])
    assert loaded.config.decoder.vocab_size == loaded.config.text.vocab_size == tokenizer.vocab_size < 600
