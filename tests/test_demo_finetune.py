"""The demo's fine-tuning section: its training table, the head's class order, and the verdicts it reports."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

import clipforge
from clipforge.demo.finetune import FinetunedPredictors, _SeenOrder, finetune_findings, finetune_table
from clipforge.demo.summary import _finetune_rows


def test_finetune_table_keeps_seen_training_images_but_the_in_distribution_tests(tmp_path):
    emoji = tmp_path / "emoji"
    emoji.mkdir()
    rows = [("images/google/a.png", "cat", "google", "seen"), ("images/google/b.png", "dog", "google", "seen"),
            ("images/twitter/a.png", "cat", "twitter", "seen"), ("images/google/c.png", "owl", "google", "unseen")]
    with open(emoji / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("image", "label", "style", "split"), *rows])
    table = finetune_table(emoji, ["google"], {("b", "google")}, tmp_path / "ft" / "train.csv")
    kept = list(csv.DictReader(open(table)))
    assert [(Path(r["image"]).name, r["label"], r["style"]) for r in kept] == [("a.png", "cat", "google")]
    assert Path(kept[0]["image"]).is_absolute()


def test_seen_order_reorders_head_columns_and_a_missing_class_never_wins():
    model = clipforge.create_model("cpu-vit-tiny-32")
    model.set_head(torch.randn(2, model.config.embed_dim), ["b", "a"])
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        logits = model.classify(pixels)
        ordered = _SeenOrder(model, ["a", "c", "b"])(pixels)
    assert torch.equal(ordered[:, 0], logits[:, 1]) and torch.equal(ordered[:, 2], logits[:, 0])
    assert torch.isinf(ordered[:, 1]).all() and (ordered[:, 1] < 0).all()


def _results(ids: dict[str, float], held: dict[str, float], ers: dict[str, float]) -> dict:
    domains = {m: {"in_distribution": ids[m], "per_domain": {"twitter": held[m], "noto": held[m]}} for m in ids}
    return {"robustness": {"domains": domains},
            "effective_robustness": {"models": {m: {"mean": e} for m, e in ers.items()}}}


def test_findings_and_claims_follow_the_numbers():
    ids = {"clip-zero-shot": 0.4, "clip-linear-probe": 0.5, "finetune-ce": 0.6, "finetune-flyp": 0.55,
           "wise-0.25": 0.45, "wise-0.5": 0.5, "wise-0.75": 0.55}
    held = {"clip-zero-shot": 0.2, "clip-linear-probe": 0.2, "finetune-ce": 0.18, "finetune-flyp": 0.2,
            "wise-0.25": 0.22, "wise-0.5": 0.25, "wise-0.75": 0.21}
    ers = {"clip-zero-shot": 0.1, "finetune-ce": -0.05}
    tuned = FinetunedPredictors({}, {}, {"steps": 5, "lr": 1e-3, "seconds": {}})
    found = finetune_findings(_results(ids, held, ers), tuned, ["twitter", "noto"], [])
    assert found["best_alpha"] == 0.5 and found["wise_above_both_ends"] is True
    assert [p["alpha"] for p in found["wise"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    rows = _finetune_rows({"finetune": found})
    assert [r["verdict"] for r in rows] == ["met", "met", "met"]
    held["wise-0.5"] = held["wise-0.25"] = held["wise-0.75"] = 0.19
    ers["finetune-ce"] = 0.2
    found = finetune_findings(_results(ids, held, ers), tuned, ["twitter", "noto"], [])
    assert [r["verdict"] for r in _finetune_rows({"finetune": found})] == ["met", "not met", "not met"]
    assert _finetune_rows({}) == []
