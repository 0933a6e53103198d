"""`clipforge eval`: zero-shot, retrieval, linear probe, robustness and bias, with a Markdown report."""
from __future__ import annotations

import argparse
from pathlib import Path

from clipforge.cli.model_args import add_model_arguments
from clipforge.errors import ConfigError

TASKS = ("zeroshot", "retrieval", "linear-probe", "robustness", "bias")


def run(args: argparse.Namespace) -> None:
    """Run one task and write results.json + report.md (+ PNG plots) into --out."""
    import clipforge
    from clipforge.cli.model_args import load_model
    from clipforge.evaluate.report import Section, markdown_table, write_report
    from clipforge.evaluate.tasks import (EvalContext, RobustnessSettings, linear_probe_vs_zeroshot, load_for_eval,
                                          retrieval, robustness, zeroshot)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, preprocess = load_model(args)
    if args.composite_white is not None:  # else the checkpoint's own rule (transformers: on white; OpenAI: drop alpha)
        preprocess.composite_white = args.composite_white
    tokenizer = clipforge.get_tokenizer(args.model, context_length=model.context_length)
    ctx = EvalContext(model, tokenizer, preprocess, out, args.templates, args.batch_size)
    styles = [s for s in args.styles.split(",") if s]
    if args.task == "zeroshot":
        results = zeroshot(ctx, load_for_eval(args.data, args.styles, args.split), confusion=args.confusion)
    elif args.task == "retrieval":
        results = retrieval(ctx, args.data, styles or None, args.split or None)
    elif args.task == "linear-probe":
        train_styles = [s for s in args.id_styles.split(",") if s] or None
        results = linear_probe_vs_zeroshot(ctx, load_for_eval(args.data, args.styles, args.split), train_styles)
    elif args.task == "robustness":
        id_styles = [s for s in args.id_styles.split(",") if s]
        if not id_styles:
            raise ConfigError("--task robustness needs --id-styles (the styles the model was trained on)")
        extra = {"tuxpaint": load_for_eval(args.tuxpaint)} if args.tuxpaint else {}
        settings = RobustnessSettings(id_styles, args.supervised_steps, extra)
        results = robustness(ctx, load_for_eval(args.data, args.styles, args.split), settings)
    else:
        from clipforge.evaluate.bias import bias_probe

        results = bias_probe(model, tokenizer, Path(args.data), styles or ["google", "twitter"], preprocess,
                             template=args.bias_template, batch_size=args.batch_size)
        from clipforge.evaluate.report import plot_bars

        def rate(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.3f}"

        text = (f"Gendered variants of one concept (man / woman / person), {results['groups']} groups, "
                f"{results['images']} images, template `{args.bias_template}`. Accuracy gap (man - woman): "
                f"{rate(results['accuracy_gap'])}; gender-neutral images preferring the 'man' caption over "
                f"'woman': {rate(results['neutral_prefers_man'])}; woman images labelled man: "
                f"{rate(results['woman_as_man'])}; man images labelled woman: {rate(results['man_as_woman'])}.")
        bars = {style: {g: v["accuracy"] for g, v in entry["by_gender"].items() if v["accuracy"] is not None}
                for style, entry in results["by_style"].items()}
        plot = plot_bars(bars, out / "bias.png", "within-group accuracy by style and gender", "accuracy")
        ctx.sections.append(Section("bias probe", text, results.get("rows", []), None, [plot]))
    report = write_report(out, f"clipforge eval: {args.task}", ctx.sections,
                          {"task": args.task, "model": str(args.model), "data": str(args.data), **results})
    for section in ctx.sections:
        print(f"\n## {section.title}\n{section.text}\n")
        if section.rows:
            print(markdown_table(section.rows, section.columns))
    print(f"\nwrote {report} and {out / 'results.json'}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge eval`."""
    p = sub.add_parser("eval", help="evaluate a model: zero-shot, retrieval, linear probe, robustness, bias")
    add_model_arguments(p, device=True)
    p.add_argument("--task", choices=TASKS, required=True, help="which evaluation to run")
    p.add_argument("--data", required=True,
                   help="labels CSV, a dataset folder with labels.csv/captions.csv, or an image folder per class")
    p.add_argument("--styles", default="", help="comma-separated styles (domains) to keep")
    p.add_argument("--split", default="", help="keep one split (e.g. seen / unseen)")
    p.add_argument("--id-styles", default="", help="robustness / linear probe: the training styles")
    p.add_argument("--tuxpaint", default="", help="robustness: also zero-shot on this Tux Paint dataset")
    p.add_argument("--supervised-steps", type=int, default=0,
                   help="robustness: train a supervised baseline (same image tower, cross-entropy) this many steps")
    p.add_argument("--templates", default="openai_7", help="template set: openai_80, openai_7, simple, emoji, tuxpaint")
    p.add_argument("--bias-template", default="an emoji of {}.", help="bias probe: the caption around each label")
    p.add_argument("--confusion", action="store_true", help="zero-shot: add a confusion matrix")
    p.add_argument("--composite-white", action=argparse.BooleanOptionalAction, default=None,
                   help="blend transparency onto white (default: as the checkpoint's library does: transformers "
                        "yes, OpenAI and open_clip no)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward pass")
    p.add_argument("--out", default="runs/eval", help="output folder: results.json, report.md, plots")
    p.set_defaults(func=run)
