"""The demo's zero-shot classifiers: each prompt encoded once across styles, equal to a direct build."""
from __future__ import annotations

import torch

import clipforge
from clipforge.data.labelled import LabelledImages
from clipforge.demo.evaluation import Evaluated
from clipforge.inference.zeroshot import build_classifier
from clipforge.model.towers import tokenizer_for

TEMPLATES = ["an emoji of {}.", "a drawing of {}."]


def _evaluated() -> tuple[Evaluated, list[int]]:
    model = clipforge.create_model("cpu-vit-tiny-32", seed=0).eval()
    tokenizer = tokenizer_for(model.config)
    encoded = []

    def counting(texts):
        encoded.append(len(texts))
        return tokenizer(texts)

    images = LabelledImages([], torch.zeros(0, dtype=torch.long), [], [], [], None, [])
    return Evaluated("CLIP", model, counting, None, images, torch.zeros(0, model.config.embed_dim)), encoded


def test_the_classifier_equals_a_direct_build_for_single_templates_and_the_ensemble():
    ev, _ = _evaluated()
    names = ["cat face", "red apple", "rocket"]
    for templates in ([TEMPLATES[0]], TEMPLATES):
        direct = build_classifier(ev.model, ev.tokenizer, names, templates, cache=False)
        assert torch.allclose(ev.classifier(names, templates), direct, atol=1e-6)


def test_a_class_set_of_another_style_encodes_only_its_new_names():
    ev, encoded = _evaluated()
    ev.classifier(["cat face", "red apple", "rocket"], TEMPLATES)
    before = sum(encoded)
    weights = ev.classifier(["rocket", "cat face", "snowman"], TEMPLATES)
    assert sum(encoded) - before == len(TEMPLATES)  # "snowman", once per template
    alone = ev.classifier(["rocket"], TEMPLATES)
    assert weights.shape == (ev.model.config.embed_dim, 3) and torch.allclose(weights[:, 0], alone[:, 0])
