"""`clipforge demo` end to end on a small subset: the real pipeline (fetch, train x3, evaluate, report)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

SECTIONS = ("## Summary", "## Training", "## Zero-shot top-1 by style", "## Prompt engineering and ensembling",
            "## Effective robustness", "## Retrieval (CLIP", "## Bias probe", "## Real photos and held-out examples",
            "## Fine-tuning and WiSE-FT", "## CLIP vs SigLIP at equal compute",
            "## Why a contrastive objective (the paper's Figure 2)", "## Captioning (CoCa)",
            "## Binding audio and Korean to the CLIP (ImageBind)", "## Timings")
PLOTS = ("training-curves.png", "prompt-ablation.png", "robustness.png", "effective-robustness.png", "photos-clip.png",
         "examples-clip.png", "examples-lit.png", "objectives.png", "captions.png", "binding/binding.png")


def _check_siglip_row(results: dict, out) -> None:
    """--siglip 1: the same steps with SigLIP's loss and text tower, in every table and on the trend; not an
    ablation row of the summary."""
    import clipforge

    siglip = results["siglip"]["models"]["SigLIP"]
    assert 0 <= siglip["held_out_mean"] <= 1 and "siglip-zero-shot" in results["effective_robustness"]["models"]
    assert "SigLIP" in results["zero_shot"] and "held_out_mean" in results["siglip"]["siglip_minus_clip"]
    assert not any("SigLIP" in row["claim"] for row in results["summary"] if "ablation" in row["claim"])
    model = clipforge.load(out / "siglip" / "step-00000060")[0]
    assert model.logit_bias is not None and not model.config.text.causal and model.config.text.pool == "last"


def _check_binding(results: dict, claim_ids: set) -> None:
    """--binding 1: audio and Korean bound to the CLIP (its weights untouched), each beside chance and a supervised
    reference, and their claims."""
    import clipforge

    found = results["binding"]
    for name in ("audio", "text-ko"):
        assert 0 < found[name]["chance"] < 1 and 0 <= found[name]["emergent_top1"] <= 1
        assert 0 <= found[name]["reference_top1"] <= 1
    assert found["audio"]["recordings"]["test"] > 0 and 0 <= found["audio"]["hub_image_top1"] <= 1
    assert found["text-ko"]["held_out_concepts"] > 0 and found["text-ko"]["zero_shot_images"] > 0
    clip = clipforge.load(results["checkpoints"]["CLIP"])[0].state_dict()
    for key, modality in (("bind-audio", "audio"), ("bind-text-ko", "text-ko")):
        bound = clipforge.load(results["checkpoints"][key])[0]
        assert bound.modalities == ("image", "text", modality)
        state = bound.state_dict()
        assert all(torch.equal(state[k], v) for k, v in clip.items())
    assert sum(i.startswith("binding-") for i in claim_ids) == 5


def _check_predictive_sections(results: dict, claim_ids: set) -> None:
    """--objectives 1: three curves over the same images seen, a factor per predictive model and its claim;
    --captioning 1: CoCa's captions and the retrieval baseline scored on the same held-out images."""
    curves = results["objectives"]["curves"]
    assert set(curves) == {"contrastive", "bag_of_words", "caption_lm"}
    assert [c["images"] for c in curves["contrastive"]] == [c["images"] for c in curves["caption_lm"]]
    assert len(curves["bag_of_words"]) >= 8 and curves["bag_of_words"][-1]["images"] == 60 * 64
    assert all(0 <= c["top1"] <= 1 for curve in curves.values() for c in curve)
    assert set(results["objectives"]["factors"]) == {"bag_of_words", "caption_lm"}
    assert sum(i.startswith("contrastive-needs-fewer-images") for i in claim_ids) == 2
    captions = results["captioning"]
    assert captions["images"] > 0 and captions["steps"] == 60 and len(captions["examples"]) == 12
    assert all(0 <= s["cider_d"] and 0 <= s["bleu4"] <= 1 for s in captions["scores"].values())


@pytest.mark.slow
@pytest.mark.integration
def test_demo_on_a_subset_writes_the_report_and_beats_chance(tmp_path):
    out = tmp_path / "demo"
    # Archives come from the shared cache the full demo filled (fetched here when absent).
    args = ["--out", str(out), "--data-root", str(tmp_path / "data"), "--limit", "200",
            "--clip-steps", "60", "--lit-steps", "40", "--supervised-steps", "40", "--batch-size", "64",
            "--warmup", "5", "--icons", "300", "--ablation", "1", "--finetune", "1", "--finetune-steps", "4",
            "--siglip", "1", "--objectives", "1", "--captioning", "1", "--binding", "1", "--binding-steps", "12"]
    result = subprocess.run([sys.executable, "-m", "clipforge.cli.main", "demo", *args], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    for heading in SECTIONS:
        assert heading in report, heading
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 1000, plot
        assert plot in report
    results = json.loads((out / "results.json").read_text())
    assert "claim" in result.stdout and "wrote" in result.stdout  # the summary table is printed
    seen = results["zero_shot"]["CLIP"]["seen"]
    chance = 1 / seen["twitter"]["classes"]
    # Every number comes from this run: accuracies beat chance on trained and held-out styles.
    trained = results["config"]["train_styles"].split(",")
    assert sum(seen[s]["top1"] for s in trained) / len(trained) > 3 * chance
    assert seen["twitter"]["top5"] > 5 * chance
    losses = [json.loads(line)["loss"] for line in (out / "supervised" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5])  # the supervised baseline trained
    assert set(results["timings"]) >= {"train CLIP", "train LiT", "train supervised (family)", "total"}
    speed = results["throughput"]  # CLIP's training FLOP rate against the best matmul rate of its precision
    # share is rounded from the unrounded rates, the two rates are rounded on their own: one rounding step apart
    assert speed["gflop_per_step"] > 0 and abs(speed["share"] - speed["achieved_gflops"] / speed[
        "best_matmul_gflops"]) < 1.5e-3 and 0 < speed["share"] < 2
    assert any(c["id"].startswith("clip-training-speed") for c in results["claims"])
    assert results["training_icons"] > 0  # the "web" part of pre-training
    # The data ablation: the same steps on the two other data settings, each in the tables and the trend.
    ablation = {"CLIP (emoji only)", "CLIP (icons, unseen removed)"}
    assert results["data_setting"] == "icons, unseen kept" and ablation < set(results["zero_shot"])
    assert {"clip-emoji-only-zero-shot", "clip-icons-unseen-removed-zero-shot"} < set(
        results["effective_robustness"]["models"])  # keyed by method id
    train_rows = (out / "train.csv").read_text().splitlines()
    assert not any(",icons" in r and "icon:" in r for r in train_rows)  # "labels" query: icons carry emoji keys
    ids = {c["id"] for c in results["claims"]}
    extra = 1 + ("data-build-time" in ids)  # the wall-time claims
    assert len(ids) == len(results["claims"]) == len(results["summary"]) + extra  # every summary row, once
    findings = [c for c in results["claims"] if c["target"] is None]
    assert any(c["id"].startswith("data-ablation") for c in findings) and all(c["met"] is None for c in findings)
    assert {"wall-time"} < ids and all({"id", "claim", "value", "target", "met"} <= set(c) for c in results["claims"])
    assert any("effective-robustness" in i for i in ids)
    trends = results["effective_robustness"]["trends"]
    assert {"twitter", "openmoji-black"} <= set(trends) and len(trends["twitter"]["points"]) == 8
    assert results["prompt_ablation"]["validation_style"] == "emojione"
    assert "emojione" not in results["prompt_ablation"]["CLIP"]["per_style"]  # chosen there, never scored there
    assert "fluent-high-contrast" in seen  # the evaluation-only styles are measured
    for name, folder in results["checkpoints"].items():  # every run's weights load with clipforge.load
        import clipforge

        assert clipforge.load(folder)[0].config.embed_dim == 256, name
    # --finetune 1: ce and FLYP from the demo's CLIP, WiSE-FT between zero-shot and ce, each on the trend
    tuned = results["finetune"]
    assert tuned["steps"] == 4 and [p["alpha"] for p in tuned["wise"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert tuned["wise"][0]["in_distribution"] == results["robustness"]["domains"]["clip-zero-shot"]["in_distribution"]
    assert {"finetune-ce", "finetune-flyp", "wise-0.5"} < set(results["effective_robustness"]["models"])
    assert sum(i.startswith(("fine-tuned-cross-entropy", "wise-ft")) for i in ids) == 3
    assert clipforge.load(out / "finetune" / "ce" / "step-00000004")[0].classnames
    _check_siglip_row(results, out)
    _check_predictive_sections(results, ids)
    _check_binding(results, ids)
    config = json.loads((out / "config.json").read_text())
    assert config["seed"] == 0 and config["limit"] == 200
    assert config["precision"] in ("fp32", "bf16")  # "auto" is recorded as what it resolved to
