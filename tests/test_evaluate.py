"""Evaluation library: zero-shot ensembling and caching, metrics vs scikit-learn, chunked retrieval,
linear probe, supervised baseline and feature extraction."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn import metrics as sklearn_metrics

import clipforge
from clipforge.evaluate import (
    OPENAI_TEMPLATES_7,
    build_classifier,
    classification_metrics,
    classify,
    clear_classifier_cache,
    confusion_matrix,
    evaluate_classifier,
    evaluate_zero_shot,
    extract_image_features,
    extract_labeled_image_features,
    extract_text_features,
    get_templates,
    imagenet_classnames,
    list_templates,
    mean_per_class_recall,
    retrieval_recall,
    topk_accuracy,
    train_supervised,
    zero_shot_predict,
)

NAME = "cpu-vit-tiny-32"


@pytest.fixture(scope="module")
def model() -> clipforge.CLIP:
    return clipforge.create_model(NAME, seed=0).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return clipforge.get_tokenizer(NAME)


# ---------------------------------------------------------------- zero-shot

def test_ensembled_classifier_matches_hand_computation(model, tokenizer):
    classnames, templates = ["dog", "cat", "space rocket"], ["a photo of a {}.", "{}", "a drawing of the big {}."]
    weights = build_classifier(model, tokenizer, classnames, templates, batch_size=4, cache=False)
    with torch.no_grad():
        expected = []
        for name in classnames:
            per_template = torch.cat([model.encode_text(tokenizer([t.format(name)])) for t in templates])
            mean = F.normalize(per_template, dim=-1).mean(dim=0)
            expected.append(mean / mean.norm())
    assert weights.shape == (model.config.embed_dim, len(classnames))
    torch.testing.assert_close(weights, torch.stack(expected).t(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        build_classifier(model, tokenizer, ["dog"], ["no placeholder"])


def test_classifier_cache_hit_and_invalidation(tokenizer):
    clear_classifier_cache()
    model = clipforge.create_model(NAME, seed=1)
    first = build_classifier(model, tokenizer, ["red", "blue"], OPENAI_TEMPLATES_7)
    assert build_classifier(model, tokenizer, ["red", "blue"], OPENAI_TEMPLATES_7) is first
    assert build_classifier(model, tokenizer, ["red", "green"], OPENAI_TEMPLATES_7) is not first
    assert build_classifier(model, tokenizer, ["red", "blue"], OPENAI_TEMPLATES_7, cache=False) is not first

    optimizer = torch.optim.SGD([model.text_tower.text_projection], lr=1.0)
    model.encode_text(tokenizer(["a red thing"])).sum().backward()
    optimizer.step()
    updated = build_classifier(model, tokenizer, ["red", "blue"], OPENAI_TEMPLATES_7)
    assert updated is not first and not torch.allclose(updated, first)
    with torch.no_grad():
        model.text_tower.ln_final.bias.add_(0.5)  # an in-place edit outside any optimizer
    assert build_classifier(model, tokenizer, ["red", "blue"], OPENAI_TEMPLATES_7) is not updated
    # A different model object never shares entries, even with identical weights.
    twin = clipforge.create_model(NAME, seed=1)
    assert build_classifier(twin, tokenizer, ["red", "blue"], OPENAI_TEMPLATES_7) is not first


def test_zero_shot_predict_and_metrics(model, tokenizer):
    classifier = build_classifier(model, tokenizer, ["a", "b", "c", "d", "e", "f"], ["a photo of {}."])
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (40,), generator=gen)
    features = classifier.t()[labels] + 0.01 * torch.randn(40, classifier.shape[0], generator=gen)
    logits = zero_shot_predict(model, features, classifier)
    expected = model.logit_scale.exp().item() * F.normalize(features, dim=-1) @ classifier
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
    metrics = evaluate_zero_shot(model, features, labels, classifier)
    assert metrics["top1"] == 1.0 and metrics["top5"] == 1.0 and metrics["mean_per_class_recall"] == 1.0
    pixels = torch.randn(3, 3, 32, 32, generator=gen)
    probs = classify(model, pixels, classifier)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))


def test_templates_and_classnames():
    assert set(list_templates()) == {"openai_80", "openai_7", "simple", "siglip", "emoji", "tuxpaint", "label"}
    openai = get_templates("openai_80")
    assert len(openai) == 80 and all(t.count("{}") == 1 for t in openai)
    assert get_templates("openai_7") == list(OPENAI_TEMPLATES_7) and set(OPENAI_TEMPLATES_7) <= set(openai)
    assert get_templates("label") == ["{}"] and get_templates("simple") == ["a photo of a {}."]
    for name in ("emoji", "tuxpaint"):
        assert len(get_templates(name)) >= 5 and all(t.count("{}") == 1 for t in get_templates(name))
    names = imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[-1] == "toilet paper"
    with pytest.raises(ValueError):
        get_templates("nope")


# ---------------------------------------------------------------- metrics

@pytest.mark.parity
def test_metrics_match_sklearn():
    gen = torch.Generator().manual_seed(0)
    n, c = 500, 12
    logits = torch.randn(n, c, generator=gen)
    labels = torch.randint(0, c - 2, (n,), generator=gen)  # classes 10 and 11 never occur
    logits[torch.arange(n), labels] += 1.0  # better than chance, so the numbers are not trivial
    preds = logits.argmax(dim=1)
    all_classes = list(range(c))
    top = topk_accuracy(logits, labels, ks=(1, 3, 5))
    assert top[1] == pytest.approx(sklearn_metrics.accuracy_score(labels, preds))
    for k in (3, 5):
        assert top[k] == pytest.approx(sklearn_metrics.top_k_accuracy_score(labels, logits, k=k, labels=all_classes))
    present = sorted(set(labels.tolist()))
    expected = sklearn_metrics.recall_score(labels, preds, average="macro", labels=present)
    assert mean_per_class_recall(preds, labels, c) == pytest.approx(expected)
    assert mean_per_class_recall(logits, labels, c) == pytest.approx(expected)
    with pytest.warns(UserWarning):  # sklearn warns that predicted classes 10, 11 are absent from y_true
        assert expected == pytest.approx(sklearn_metrics.balanced_accuracy_score(labels, preds))
    assert torch.equal(confusion_matrix(preds, labels, c),
                       torch.from_numpy(sklearn_metrics.confusion_matrix(labels, preds, labels=all_classes)))
    summary = classification_metrics(logits, labels)
    assert summary["top1"] == top[1] and summary["top5"] == top[5] and summary["samples"] == n
    with pytest.raises(ValueError):
        mean_per_class_recall(preds, labels, 5)


# ---------------------------------------------------------------- retrieval

def dense_recall(images: np.ndarray, texts: np.ndarray, text_to_image: np.ndarray, ks) -> dict[str, float]:
    sims = images @ texts.T
    out = {}
    order = np.argsort(-sims, axis=1, kind="stable")
    own = text_to_image[order] == np.arange(len(images))[:, None]
    first = np.where(own.any(axis=1), own.argmax(axis=1), np.iinfo(np.int64).max)
    for k in ks:
        out[f"image_to_text_r{k}"] = float((first < k).mean())
    rank = (np.argsort(-sims.T, axis=1, kind="stable") == text_to_image[:, None]).argmax(axis=1)
    for k in ks:
        out[f"text_to_image_r{k}"] = float((rank < k).mean())
    return out


@pytest.mark.parametrize("chunk_size", [7, 13, 64, 10_000])
def test_chunked_retrieval_equals_dense(chunk_size):
    gen = torch.Generator().manual_seed(0)
    n_images, dim = 50, 16
    captions = torch.randint(0, 5, (n_images,), generator=gen)  # 0-4 captions; caption-less images are misses
    text_to_image = torch.repeat_interleave(torch.arange(n_images), captions)
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]
    images = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    # Captions near their image (plus noise) so recall is neither 0 nor 1; continuous values: no ties.
    texts = F.normalize(images[text_to_image] + 1.2 * torch.randn(len(text_to_image), dim, generator=gen), dim=-1)
    ks = (1, 5, 10, 1000)
    got = retrieval_recall(images, texts, text_to_image, ks=ks, chunk_size=chunk_size)
    expected = dense_recall(images.double().numpy(), texts.double().numpy(), text_to_image.numpy(), ks)
    assert got == pytest.approx(expected, abs=1e-9)
    assert 0 < got["image_to_text_r1"] < got["image_to_text_r10"] < 1 and got["text_to_image_r1000"] == 1.0


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    sys.path[:0] = {paths!r}
    from clipforge.evaluate.retrieval import retrieval_recall
    torch.manual_seed(0)
    n, d = {n}, 64
    images = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    text_to_image = torch.arange(n)
    retrieval_recall(images[:200], texts[:200], text_to_image[:200], chunk_size={chunk})  # warm-up, tiny blocks
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    retrieval_recall(images, texts, text_to_image, chunk_size={chunk})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({{"extra_peak_bytes": (peak - base) * 1024}}))
""")


def test_chunked_retrieval_memory_is_bounded():
    """16k x 16k: the dense fp32 matrix alone is 1 GiB; the chunked pass must stay far below it."""
    n, chunk = 16_000, 2048
    script = MEMORY_SCRIPT.format(paths=list(sys.path), n=n, chunk=chunk)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    extra = json.loads(result.stdout.strip().splitlines()[-1])["extra_peak_bytes"]
    dense = n * n * 4
    assert extra < dense / 8, f"extra peak {extra / 2**20:.0f} MiB vs dense {dense / 2**20:.0f} MiB"


# ---------------------------------------------------------------- linear probe

def test_linear_probe_picks_sensible_c():
    from clipforge.evaluate import evaluate_linear_probe

    gen = torch.Generator().manual_seed(0)
    n_classes, dim = 5, 32
    centers = torch.randn(n_classes, dim, generator=gen)
    # Imbalanced classes: heavy regularisation collapses onto the majority class, so small C must lose.
    counts = torch.tensor([200, 60, 40, 30, 20])

    def sample(scale: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.repeat_interleave(torch.arange(n_classes), counts * scale // 2)
        return centers[labels] + 0.6 * torch.randn(len(labels), dim, generator=gen), labels

    (x_train, y_train), (x_test, y_test) = sample(2), sample(1)
    result = evaluate_linear_probe(x_train, y_train, x_test, y_test, max_iter=500)
    accuracies = result["val_accuracy"]
    assert sorted(accuracies) == pytest.approx([1e-3, 1e-2, 1e-1, 1, 10, 100, 1000])
    assert accuracies[result["best_C"]] == max(accuracies.values())
    assert result["best_C"] >= 0.1 and accuracies[1e-3] < accuracies[result["best_C"]] - 0.2
    assert result["test_top1"] > 0.95 and result["test_mean_per_class_recall"] > 0.9
    assert result["train_samples"] + result["val_samples"] == len(y_train)
    again = evaluate_linear_probe(x_train, y_train, x_test, y_test, max_iter=500)
    assert again == result  # deterministic


@pytest.mark.parity
def test_torch_logistic_regression_matches_sklearn():
    """The fast torch L-BFGS probe minimises sklearn's objective: same predictions, close probabilities."""
    from clipforge.evaluate.linear_probe import fit_logistic_regression

    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(7, 16, generator=gen)
    labels = torch.arange(7).repeat(30)
    x = (centers[labels] + 0.9 * torch.randn(len(labels), 16, generator=gen)).numpy()
    y = labels.numpy() * 3 + 2  # class labels need not be 0..K-1
    for C in (0.01, 1.0, 100.0):
        fast, fast_ok = fit_logistic_regression(x, y, C, max_iter=2000)
        ref, ref_ok = fit_logistic_regression(x, y, C, max_iter=2000, backend="sklearn")
        assert fast_ok and ref_ok
        assert (fast.classes_ == ref.classes_).all()
        def objective(model, C=C) -> float:  # sklearn's: C x summed cross-entropy + 0.5 ||W||^2
            rows = np.searchsorted(model.classes_, y)
            nll = -np.log(model.predict_proba(x)[np.arange(len(y)), rows]).sum()
            return C * nll + 0.5 * (model.coef_.astype(np.float64) ** 2).sum()

        assert objective(fast) <= objective(ref) * (1 + 1e-5), C  # at least as good a minimum (sklearn stops at tol)
        assert abs(fast.predict_proba(x) - ref.predict_proba(x)).max() < 1e-2, C
        assert (fast.predict(x) == ref.predict(x)).mean() > 0.99
    with pytest.raises(ValueError, match="backend"):
        fit_logistic_regression(x, y, 1.0, backend="numpy")


# ---------------------------------------------------------------- supervised baseline

COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.15, 0.2, 0.9], [0.9, 0.85, 0.1]])


def colour_squares(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised 32px images: a square of one of 4 colours at a random place on a light noisy background."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    pixels = 0.8 + 0.2 * torch.rand(n, 3, 32, 32, generator=gen)
    for i in range(n):
        size = int(torch.randint(10, 20, (1,), generator=gen))
        y, x = torch.randint(0, 32 - size, (2,), generator=gen).tolist()
        pixels[i, :, y : y + size, x : x + size] = COLOURS[labels[i]][:, None, None]
    pixels += 0.05 * torch.randn(pixels.shape, generator=gen)
    return (pixels - 0.5) / 0.25, labels


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_supervised_baseline_learns(precision):
    visual = clipforge.create_model(NAME, seed=2).visual
    train, test = colour_squares(192, seed=0), colour_squares(96, seed=1)
    losses = []
    classifier = train_supervised(visual, 64, train, num_classes=4, epochs=8, lr=2e-3, weight_decay=0.05,
                                  warmup_steps=5, batch_size=32, precision=precision,
                                  on_step=lambda step, loss, lr: losses.append(loss))
    assert len(losses) == 8 * 6 and not classifier.training
    metrics = evaluate_classifier(classifier, test, num_classes=4, precision=precision)
    assert metrics["top1"] > 0.9, metrics  # chance is 0.25
    assert np.mean(losses[-6:]) < 0.5 * np.mean(losses[:6])
    # The same data as an iterable of batches gives the same evaluation.
    batches = [(test[0][i : i + 40], test[1][i : i + 40]) for i in range(0, 96, 40)]
    assert evaluate_classifier(classifier, batches, precision=precision)["top1"] == metrics["top1"]


# ---------------------------------------------------------------- features

def test_image_features_from_paths_pil_and_datasets(model, tmp_path):
    gen = torch.Generator().manual_seed(0)
    arrays = [(torch.rand(40, 48, 3, generator=gen) * 255).byte().numpy() for _ in range(5)]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(array).save(paths[-1])
    preprocess = clipforge.image_transform(model.image_size)
    pixels = torch.stack([preprocess(p) for p in paths])
    with torch.no_grad():
        expected = model.encode_image(pixels, normalize=True)
    from_paths = extract_image_features(model, paths, preprocess, batch_size=2)
    torch.testing.assert_close(from_paths, expected, atol=1e-5, rtol=0)
    pil = [Image.open(p) for p in paths]
    torch.testing.assert_close(extract_image_features(model, pil, preprocess, batch_size=3), expected,
                               atol=1e-5, rtol=0)
    dataset = [(pixels[i], i % 2) for i in range(5)]
    features, labels = extract_labeled_image_features(model, dataset, batch_size=2)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    assert labels.tolist() == [0, 1, 0, 1, 0]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    features, labels = extract_labeled_image_features(model, loader)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    raw = extract_image_features(model, pixels, normalize=False, precision="bf16")
    torch.testing.assert_close(F.normalize(raw, dim=-1), expected, atol=3e-2, rtol=0)


def test_text_features_keep_input_order(model, tokenizer):
    texts = ["a dog", "a very long caption about a small red house on a hill", "x", "two cats", "a b c d e f g"]
    got = extract_text_features(model, tokenizer, texts, batch_size=2)
    with torch.no_grad():
        expected = torch.cat([model.encode_text(tokenizer([t]), normalize=True) for t in texts])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
