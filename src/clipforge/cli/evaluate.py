"""`clipforge eval`: zero-shot, retrieval, linear probe, robustness and bias, with a Markdown report."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clipforge.cli.model_args import add_model_arguments, add_precision_argument
from clipforge.errors import ConfigError

if TYPE_CHECKING:
    from clipforge.data.images import SkippedFile
    from clipforge.evaluate.tasks import EvalContext

TASKS = ("zeroshot", "retrieval", "linear-probe", "robustness", "bias", "captioning")


def run(args: argparse.Namespace) -> None:
    """Run one task and write results.json, report.md (+ PNG plots) and the skip log into --out."""
    from clipforge.cli.model_args import command_precision, load_model, load_tokenizer
    from clipforge.data.images import skipped_by_reason, write_skip_log
    from clipforge.data.labelled import skip_counts
    from clipforge.evaluate.report import write_report
    from clipforge.evaluate.tasks import EvalContext

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, preprocess = load_model(args)
    if args.composite_white is not None:  # else the checkpoint's own rule (transformers: on white; OpenAI: drop alpha)
        preprocess.composite_white = args.composite_white
    tokenizer = load_tokenizer(args, model)
    precision = command_precision(args.precision, next(model.parameters()).device)
    ctx = EvalContext(model, tokenizer, preprocess, out, args.templates, args.batch_size, precision=precision)
    results = {"task": args.task, "model": str(args.model), "data": str(args.data), "precision": precision,
               **_run_task(args, ctx), "skipped": skip_counts(ctx.skipped)}
    report = write_report(out, f"clipforge eval: {args.task}", ctx.sections, results)
    skipped = sorted(ctx.skipped)  # in path order, as the index's skip log
    skip_log = write_skip_log(out, skipped)
    if args.json:  # results.json as written (non-finite numbers made null), plus the skipped files as index names them
        written = json.loads((out / "results.json").read_text())
        print(json.dumps({**written, "skipped_files": skipped_by_reason(skipped)}, indent=1))
        return
    _print_text(ctx, skipped, skip_log)
    print(f"\nwrote {report}, {out / 'results.json'} and {skip_log}")


def _run_task(args: argparse.Namespace, ctx: "EvalContext") -> dict[str, Any]:
    """The results of the task --task names; its report sections go to `ctx`."""
    from clipforge.evaluate.tasks import (
        RobustnessSettings,
        linear_probe_vs_zeroshot,
        load_for_eval,
        retrieval,
        robustness,
        zeroshot,
    )

    styles = [s for s in args.styles.split(",") if s]
    if args.modality != "image":
        return _bound_task(args, ctx)
    if args.task == "captioning":
        from clipforge.evaluate.captioning import captioning

        return captioning(ctx, args.data, styles or None, args.split or None, args.caption_beams,
                          args.caption_max_length)
    if args.task == "zeroshot":
        return zeroshot(ctx, load_for_eval(args.data, args.styles, args.split), confusion=args.confusion)
    if args.task == "retrieval":
        return retrieval(ctx, args.data, styles or None, args.split or None)
    if args.task == "linear-probe":
        train_styles = [s for s in args.id_styles.split(",") if s] or None
        return linear_probe_vs_zeroshot(ctx, load_for_eval(args.data, args.styles, args.split), train_styles)
    if args.task == "robustness":
        id_styles = [s for s in args.id_styles.split(",") if s]
        if not id_styles:
            raise ConfigError("--task robustness needs --id-styles (the styles the model was trained on)")
        extra = {"tuxpaint": load_for_eval(args.tuxpaint)} if args.tuxpaint else {}
        settings = RobustnessSettings(id_styles, args.supervised_steps, extra)
        return robustness(ctx, load_for_eval(args.data, args.styles, args.split), settings)
    return _bias(args, ctx, styles)


def _bound_task(args: argparse.Namespace, ctx: "EvalContext") -> dict[str, Any]:
    """--modality audio: emergent zero-shot or audio-image retrieval of a bound tower on an audio table."""
    from clipforge.evaluate.bound import audio_retrieval, audio_zeroshot, read_audio_table

    if args.task not in ("zeroshot", "retrieval"):
        raise ConfigError(f"--modality {args.modality} evaluates --task zeroshot or retrieval, not {args.task}")
    if args.modality not in getattr(ctx.model, "bound_audio", {}):
        raise ConfigError(f"{args.model} has no {args.modality!r} audio tower (bind one: clipforge bind --modality "
                          "audio); its modalities: " + ", ".join(ctx.model.modalities))
    languages = [s for s in args.languages.split(",") if s]
    table = read_audio_table(args.data, args.label_column, args.split or None, languages or None)
    if args.task == "zeroshot":
        return audio_zeroshot(ctx, table, args.modality)
    return audio_retrieval(ctx, table, args.modality)


def _bias(args: argparse.Namespace, ctx: "EvalContext", styles: list[str]) -> dict[str, Any]:
    """The gender bias probe and its report section."""
    from clipforge.evaluate.bias import bias_probe
    from clipforge.evaluate.report import Section, plot_bars

    results = bias_probe(ctx.model, ctx.tokenizer, Path(args.data), styles or ["google", "twitter"], ctx.preprocess,
                         template=args.bias_template, batch_size=args.batch_size, precision=ctx.precision)

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    text = (f"Gendered variants of one concept (man / woman / person), {results['groups']} groups, "
            f"{results['images']} images, template `{args.bias_template}`. Accuracy gap (man - woman): "
            f"{rate(results['accuracy_gap'])}; gender-neutral images preferring the 'man' caption over "
            f"'woman': {rate(results['neutral_prefers_man'])}; woman images labelled man: "
            f"{rate(results['woman_as_man'])}; man images labelled woman: {rate(results['man_as_woman'])}.")
    bars = {style: {g: v["accuracy"] for g, v in entry["by_gender"].items() if v["accuracy"] is not None}
            for style, entry in results["by_style"].items()}
    plot = plot_bars(bars, ctx.out_dir / "bias.png", "within-group accuracy by style and gender", "accuracy")
    ctx.sections.append(Section("bias probe", text, results.get("rows", []), None, [plot]))
    return results


def _print_text(ctx: "EvalContext", skipped: list["SkippedFile"], skip_log: Path, shown: int = 10) -> None:
    """The report's sections as text, then the skipped images: counts by reason and the first `shown` by name."""
    from clipforge.evaluate.report import markdown_table
    from clipforge.evaluate.tasks import skip_text

    for section in ctx.sections:
        print(f"\n## {section.title}\n{section.text}\n")
        if section.rows:
            print(markdown_table(section.rows, section.columns))
    if not skipped:
        return
    print(f"\nskipped {len(skipped)} unreadable image(s): {skip_text(skipped)}; all listed in {skip_log}")
    for skip in skipped[:shown]:
        print(f"  {skip.path} ({skip.reason})")
    if len(skipped) > shown:
        print(f"  ... and {len(skipped) - shown} more")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge eval`."""
    p = sub.add_parser("eval", help="evaluate a model: zero-shot, retrieval, linear probe, robustness, bias")
    add_model_arguments(p, device=True)
    add_precision_argument(p)
    p.add_argument("--task", choices=TASKS, required=True, help="which evaluation to run")
    p.add_argument("--data", required=True,
                   help="labels CSV, a dataset folder with labels.csv/captions.csv, or an image folder per class")
    p.add_argument("--modality", default="image",
                   help="what --data holds: 'image', or a bound tower's inputs, e.g. audio (an audio table: audio, "
                        "label[, image, language, split] columns, as `clipforge data tuxpaint --audio` writes): "
                        "emergent zero-shot against English labels, or audio-image retrieval")
    p.add_argument("--label-column", default="label", help="--modality audio: the table's class-name column")
    p.add_argument("--languages", default="", help="--modality audio: comma-separated languages to keep")
    p.add_argument("--styles", default="", help="comma-separated styles (domains) to keep")
    p.add_argument("--split", default="", help="keep one split (e.g. seen / unseen)")
    p.add_argument("--id-styles", default="", help="robustness / linear probe: the training styles")
    p.add_argument("--tuxpaint", default="", help="robustness: also zero-shot on this Tux Paint dataset")
    p.add_argument("--supervised-steps", type=int, default=0,
                   help="robustness: train a supervised baseline (same image tower, cross-entropy) this many steps")
    p.add_argument("--templates", default="openai_7",
                   help="template set: openai_80, openai_7, simple, siglip, emoji, tuxpaint")
    p.add_argument("--bias-template", default="an emoji of {}.", help="bias probe: the caption around each label")
    p.add_argument("--confusion", action="store_true", help="zero-shot: add a confusion matrix")
    p.add_argument("--caption-beams", type=int, default=3, help="captioning: beams of the search (1: greedy)")
    p.add_argument("--caption-max-length", type=int, default=30,
                   help="captioning: ids per caption, start-of-text included")
    p.add_argument("--composite-white", action=argparse.BooleanOptionalAction, default=None,
                   help="blend transparency onto white (default: as the checkpoint's library does: transformers "
                        "yes, OpenAI and open_clip no)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--out", default="runs/eval",
                   help="output folder: results.json, report.md, plots, skipped.jsonl (unreadable images by name)")
    p.add_argument("--json", action="store_true",
                   help="print results.json and skipped_files (reason -> paths) instead of the text report")
    p.set_defaults(func=run)
