"""`clipforge demo`: train CLIP (and LiT, and a supervised baseline) on multi-style emoji, then reproduce the
paper's findings in one report. Reproducible from the printed seed and config.

    clipforge demo                      # ~10 minutes on 2 CPU cores (datasets cached after the first run)
    clipforge demo --minutes 30         # longer training, same pipeline
    clipforge demo --limit 120 --minutes 1 --out /tmp/smoke   # a quick smoke run
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.demo.ablation import ablation_models, main_setting
from clipforge.demo.config import DemoConfig
from clipforge.demo.data import clip_table, prepare_datasets, read_concepts, training_captions
from clipforge.demo.evaluation import (embed_all, few_shot_vs_zero_shot, logits_for, photos_and_examples,
                                       prompt_ablation, zero_shot_by_style)
from clipforge.demo.summary import claims, summary_rows
from clipforge.demo.baselines import effective_robustness, supervised_family
from clipforge.demo.training import read_training_rows, run_contrastive, train_config
from clipforge.evaluate.bias import bias_probe
from clipforge.data.labelled import load_labelled_images
from clipforge.evaluate.report import Section, markdown_table, plot_training_curves, write_report
from clipforge.evaluate.tasks import EvalContext, retrieval, robustness
from clipforge.inference.templates import get_templates

# Seconds per optimizer step of each run at the default model and batch, measured on the 2-core
# reference machine (AMD EPYC, fp32, decoded-image cache), and each run's share of the training time. The budget is
# deterministic (no timing at run time), so a seed and --minutes always give the same steps.
SECONDS_PER_STEP = {"clip": 0.33, "lit": 0.33, "supervised": 0.45}  # supervised: the whole family (baselines.py)
SHARE = {"clip": 0.55, "lit": 0.25, "supervised": 0.20}
OVERHEAD_SECONDS = 180  # start-up, embedding, evaluation (10 styles) and the report: not scaled by --minutes


def budget(cfg: DemoConfig) -> dict[str, int]:
    """Steps per run: explicit counts win; otherwise the training time left in `minutes`, split by SHARE."""
    training = max(60.0, cfg.minutes * 60 - OVERHEAD_SECONDS)
    explicit = {"clip": cfg.clip_steps, "lit": cfg.lit_steps, "supervised": cfg.supervised_steps}
    return {k: v or max(10, round(training * SHARE[k] / SECONDS_PER_STEP[k])) for k, v in explicit.items()}


def choose_id_test(concepts: list[dict[str, str]], styles: list[str], seed: int, every: int = 5) -> set[tuple[str, str]]:
    """(concept key, style) pairs held out of all training: one image of every `every`-th seen concept.

    They measure in-distribution accuracy on images no model saw (the paper's ImageNet validation
    set), at the cost of 1/(every x styles) of the training images.
    """
    rng = random.Random(seed)
    seen = [c["hexcode"] for c in concepts if c["split"] == "seen"]
    rng.shuffle(seen)
    return {(key, rng.choice(styles)) for key in seen[::every]}


@dataclass
class TrainingTables:
    """The demo's training CSVs: CLIP's (emoji + icons) and the emoji-only one (supervised, and LiT by default)."""

    clip: Path
    emoji: Path
    emoji_rows: int
    icons: int
    icons_excluded: int


def training_tables(cfg: DemoConfig, data: Any, concepts: list[dict[str, str]], id_test: set, out: Path) -> TrainingTables:
    """Write OUT/train.csv (CLIP) and, when icons join it, OUT/train-emoji.csv (emoji rows only, each once)."""
    styles, clip_csv = cfg.styles("train"), out / "train.csv"
    pairs, icons, excluded = clip_table(cfg, data.emoji, data.icons, concepts, id_test, clip_csv, cfg.icons,
                                        cfg.icons_unseen)
    emoji_csv = out / "train-emoji.csv" if icons else clip_csv
    if icons:
        training_captions(data.emoji, styles, "seen", emoji_csv, cfg.seed, exclude=id_test)
    print(f"training pairs: {pairs} emoji ({len(styles)} styles x seen concepts, {len(id_test)} held out for "
          f"in-distribution tests), each listed {cfg.emoji_repeat if icons else 1}x for CLIP, + {icons} icons "
          f"({cfg.icon_query} query; {excluded} named like unseen concepts removed)")
    return TrainingTables(clip_csv, emoji_csv, pairs, icons, excluded)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """The whole demo; writes OUT/report.md, OUT/results.json and the plots; returns the results."""
    cfg.validate()
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    steps = budget(cfg)
    print(f"clipforge demo: seed {cfg.seed}, steps {steps}, output {out}\nconfig: {json.dumps(dataclasses.asdict(cfg))}")
    timings: dict[str, float] = {}

    data = prepare_datasets(cfg.data_dir(), limit=cfg.limit or None, cache=cfg.cache_dir(),
                            icons=cfg.icons > 0, styles=cfg.styles("built"))
    timings["data (fetch + build)" if data.fetched else "data (cached)"] = data.seconds
    train_styles, held_out = cfg.styles("train"), cfg.styles("held_out")
    concepts = read_concepts(data.emoji)
    id_test = choose_id_test(concepts, train_styles, cfg.seed)
    tables = training_tables(cfg, data, concepts, id_test, out)
    lit_csv = tables.emoji if cfg.lit_data == "emoji" else tables.clip

    clip = run_contrastive("CLIP", train_config(cfg, tables.clip, out / "clip", steps["clip"]))
    timings["train CLIP"] = clip.seconds
    lit = run_contrastive("LiT", train_config(cfg, lit_csv, out / "lit", steps["lit"], text_tower="minilm"))
    timings["train LiT"] = lit.seconds

    tick = time.perf_counter()
    everything = load_labelled_images(data.emoji)
    models = [embed_all(m.name, m.model, m.tokenizer, m.preprocess, everything) for m in (clip, lit)]
    ablation_seconds = 0.0
    if cfg.ablation:  # the data ablation: same steps, the other data settings
        ablation, seconds = ablation_models(cfg, data.emoji, data.icons, concepts, id_test, everything, out,
                                            steps["clip"])
        models += ablation
        timings.update({f"train {name}": s for name, s in seconds.items()})
        ablation_seconds = sum(seconds.values())
    seen = models[0].images.subset([s == "seen" for s in models[0].images.splits])
    key_to_label = {c["hexcode"]: c["label"] for c in concepts}
    paths, labels = read_training_rows(tables.emoji, seen.classnames, key_to_label)
    timings["embed images"] = time.perf_counter() - tick - ablation_seconds  # the ablation's training is its own row
    supervised, family, supervised_info = supervised_family(cfg, paths, labels, seen.classnames, steps["supervised"],
                                                            out, clip.model.image_size)
    timings["train supervised (family)"] = supervised_info["family_seconds"]

    tick = time.perf_counter()
    sections: list[Section] = []
    styles = [s for s in sorted(set(everything.domains), key=lambda s: (s not in train_styles, s))]
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "steps": steps, "training_pairs": tables.emoji_rows,
                               "training_icons": tables.icons, "icons_excluded": tables.icons_excluded,
                               "data_setting": main_setting(cfg)}
    results["zero_shot"] = zero_shot_by_style(models, styles, held_out, cfg.templates, sections)
    results["prompt_ablation"] = prompt_ablation(models, held_out, cfg.templates, out, sections,
                                                 cfg.prompt_validation_style)
    shot_styles = [s for s in held_out if s not in (held_out[0], cfg.prompt_validation_style)]
    results["few_shot"] = few_shot_vs_zero_shot(models[0], held_out[0], shot_styles, cfg.prompt_validation_style,
                                                cfg.templates, sections, seed=cfg.seed)
    timings["zero-shot tables"] = time.perf_counter() - tick
    tick = time.perf_counter()
    ctx = EvalContext(clip.model, clip.tokenizer, clip.preprocess, out, cfg.templates, 256, sections)
    id_mask = [(Path(p).stem, d) in id_test for p, d in zip(seen.paths, seen.domains)]
    tux = load_labelled_images(data.tuxpaint)
    ensemble = get_templates(cfg.templates)
    seen_rows = torch.tensor([s == "seen" for s in models[0].images.splits])
    # The paper's C sweep is 1e-3..1e3; at 1,282 classes the weakly regularised end needs hundreds of
    # L-BFGS iterations and never wins on these features, so the demo sweeps 0.1..100.
    results["robustness"] = robustness(ctx, seen, train_styles, extra_zero_shot={"tuxpaint": tux}, id_test=id_mask,
                                       predictors={"LiT zero-shot": logits_for(models[1], ensemble), **family,
                                                   **{f"{m.name} zero-shot": logits_for(m, ensemble) for m in models[2:]}},
                                       name="Robustness", probe_cs=(0.1, 1.0, 10.0, 100.0),
                                       features=models[0].features[seen_rows])
    results["effective_robustness"] = effective_robustness(results["robustness"]["domains"], list(family), held_out,
                                                           out, sections, [f"{m.name} zero-shot" for m in models[2:]])
    timings["robustness"] = time.perf_counter() - tick
    tick = time.perf_counter()
    results["retrieval"] = {}
    for model, ev in ((clip, models[0]), (lit, models[1])):
        mctx = EvalContext(model.model, model.tokenizer, model.preprocess, out, cfg.templates, 256, sections)
        results["retrieval"][model.name] = retrieval(mctx, data.emoji / "captions.csv", [held_out[0]], "seen",
                                                     name=f"Retrieval ({model.name}, {held_out[0]}, seen concepts)")
    timings["retrieval"] = time.perf_counter() - tick
    tick = time.perf_counter()
    results["bias"] = _bias(clip, data.emoji, sections)
    results["photos"] = photos_and_examples(models[:2], held_out[0], cfg.templates, out, sections, seed=cfg.seed)
    curves = plot_training_curves([clip.metrics, lit.metrics, Path(supervised_info["metrics"])], out / "training-curves.png",
                                  ["CLIP", "LiT", "supervised"])
    sections.insert(0, Section("Training", _training_text(cfg, steps, tables, clip, lit, supervised_info), None, None,
                               [curves]))
    timings["bias, photos, plots"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started
    summary = summary_rows(results, held_out, train_styles)
    sections.insert(0, Section("Summary", f"Seed {cfg.seed}; wall time {timings['total'] / 60:.1f} min "
                               f"(timings below). Reproduce: `clipforge demo --config {out / 'config.json'}`.", summary))
    sections.append(Section("Timings", "", [{"phase": k, "seconds": round(v, 1)} for k, v in timings.items()]))
    results["timings"], results["summary"] = timings, summary
    data_seconds = timings.get("data (fetch + build)", 0.0)  # the first run's build has its own target
    results["claims"] = claims(summary, results, (timings["total"] - data_seconds) / 60, data_seconds / 60)
    results["checkpoints"] = {m.name: str(Path(m.checkpoint).resolve()) for m in (clip, lit)}
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    report = write_report(out, "clipforge demo: CLIP on multi-style emoji", sections, results)
    print("\n" + markdown_table(summary) + f"\n\nwrote {report} ({timings['total'] / 60:.1f} min)")
    return results


def _bias(model: Any, emoji: Path, sections: list[Section]) -> dict[str, Any]:
    """The gender bias probe on the CLIP model (skipped with a note when the subset has no gendered groups)."""
    try:
        result = bias_probe(model.model, model.tokenizer, emoji, ["google", "twitter"], model.preprocess)
    except ValueError as error:  # e.g. a --limit subset without man/woman variants
        sections.append(Section("Bias probe", f"skipped: {error}"))
        return {"skipped": str(error)}
    rate = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    sections.append(Section("Bias probe", (
        f"{result['groups']} man/woman/person groups, {result['images']} images (google + twitter). Accuracy gap "
        f"(man - woman): {rate(result['accuracy_gap'])}; gender-neutral images preferring the 'man' caption: "
        f"{rate(result['neutral_prefers_man'])}; woman images labelled man: {rate(result['woman_as_man'])}; man images "
        f"labelled woman: {rate(result['man_as_woman'])}."), result.get("rows", [])))
    return {k: v for k, v in result.items() if k != "rows"}


def _training_text(cfg: DemoConfig, steps: dict[str, int], tables: TrainingTables, clip: Any, lit: Any,
                   supervised: dict) -> str:
    return (f"Model `{cfg.model}` (image tower shared by all three runs), batch {cfg.batch_size} with one image per "
            f"concept per batch, lr {cfg.lr}, {cfg.precision}, {tables.emoji_rows} emoji training images. CLIP: "
            f"{steps['clip']} steps in {clip.seconds:.0f} s, on the emoji (each listed {cfg.emoji_repeat if tables.icons else 1}x) "
            f"+ {tables.icons} Iconify icons ({cfg.icon_query} query, unseen-named icons {cfg.icons_unseen}); LiT on "
            f"{'the emoji only' if cfg.lit_data == 'emoji' else 'the same table'} (pretrained MiniLM-L6 text tower, locked; its features cached per caption): "
            f"{steps['lit']} steps in {lit.seconds:.0f} s; supervised (same image tower + linear head, cross-entropy, "
            f"same images and augmentation): {steps['supervised']} steps in {supervised['seconds']:.0f} s.")
