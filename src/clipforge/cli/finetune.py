"""`clipforge finetune` (a CLIP fine-tuned as a classifier) and `clipforge wise` (WiSE-FT weight interpolation)."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from clipforge.errors import ConfigError
from clipforge.io import json_safe, write_atomic

SWEEP_FILE = "wise_sweep.json"


def run_finetune(args: argparse.Namespace) -> None:
    """Fine-tune (or resume) and print the summary as JSON."""
    from clipforge.finetune.config import config_from_args
    from clipforge.finetune.run import finetune

    summary = finetune(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(json_safe(summary), indent=1, default=str, allow_nan=False))


def parse_alphas(text: str) -> list[float]:
    """"0:1:0.1" -> [0.0, 0.1, ..., 1.0] (start:stop:step, both ends kept), or "0,0.5,1" -> [0.0, 0.5, 1.0]."""
    try:
        if ":" not in text:
            alphas = [float(a) for a in text.split(",") if a.strip()]
        else:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            alphas = [round(start + i * step, 10) for i in range(int(round((stop - start) / step)) + 1)]
    except ValueError:
        raise ConfigError(f"--alphas {text!r}: give start:stop:step (0:1:0.1) or a comma-separated list") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ConfigError(f"--alphas {text!r}: every alpha must lie in [0, 1]")
    return alphas


def _evaluation_images(args: argparse.Namespace, preprocess: Any) -> tuple[Any, Any] | None:
    from clipforge.data.labelled import load_labelled_images

    if not args.eval:
        return None
    styles = [s.strip() for s in args.styles.split(",") if s.strip()] or None
    images = load_labelled_images(args.eval, styles, args.split or None)
    pixels, kept = images.decode(preprocess)
    if not len(pixels):
        raise ConfigError(f"--eval {args.eval}: none of its images could be read")
    return pixels, kept


def _refuse_inputs(args: argparse.Namespace) -> None:
    """Registry names (random weights) as either model, and an --out that would overwrite one of them."""
    from clipforge.model import list_models

    for name in (args.zero_shot, args.finetuned):
        if name in list_models() and not Path(name).exists():
            raise ConfigError(f"{name!r} is a registry architecture without weights: give a checkpoint or model "
                              "folder (its mixture would be random)")
    if args.out and Path(args.out).resolve() in {Path(args.zero_shot).resolve(), Path(args.finetuned).resolve()}:
        raise ConfigError(f"--out {args.out} is one of the two input models: write the mixture elsewhere")


def run_wise(args: argparse.Namespace) -> None:
    """Interpolate ZERO_SHOT and FINETUNED: one model written to --out, or a sweep of --alphas evaluated."""
    import clipforge
    from clipforge.finetune.wise import head_top1, interpolate, refuse_mismatch, zero_shot_end

    if (args.alpha is None) == (args.alphas is None):
        raise ConfigError("give --alpha A (one model, written to --out) or --alphas 0:1:0.1 with --eval (a sweep)")
    if args.alpha is not None and not args.out:
        raise ConfigError("--alpha writes a model: give --out DIR")
    if args.alphas is not None and not args.eval:
        raise ConfigError("--alphas evaluates each mixture: give --eval DATA (labels CSV, dataset or class folders)")
    alphas = [args.alpha] if args.alpha is not None else parse_alphas(args.alphas)
    _refuse_inputs(args)
    finetuned, preprocess = clipforge.load(args.finetuned, args.device)
    zero_shot, _ = clipforge.load(args.zero_shot, args.device)
    refuse_mismatch(zero_shot, finetuned)
    start = zero_shot_end(zero_shot, finetuned, clipforge.get_tokenizer(args.zero_shot,
                                                                        context_length=zero_shot.context_length))
    evaluation = _evaluation_images(args, preprocess)
    rows = []
    for alpha in alphas:
        model = interpolate(start, finetuned, alpha)
        row: dict[str, Any] = {"alpha": alpha}
        if evaluation is not None:
            row.update(head_top1(model, *evaluation))
        if args.alpha is not None:
            tokenizer = clipforge.get_tokenizer(args.finetuned, context_length=model.context_length)
            row["out"] = str(clipforge.save_pretrained(model, args.out, tokenizer=tokenizer))
        rows.append(row)
    if args.alphas is not None and args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_atomic(Path(args.out) / SWEEP_FILE, json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows[0] if args.alpha is not None else rows, indent=1))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge finetune` and `clipforge wise`."""
    from clipforge.finetune.config import add_arguments

    p = sub.add_parser("finetune", help="fine-tune a CLIP as a classifier of labelled images (ce, flyp, lp-ft)",
                       description="Flags override the --config JSON one-to-one (--batch-size sets batch_size). The "
                                   "result (the run's last checkpoint) loads with clipforge.load as a model with "
                                   ".classnames and .classify(pixels).")
    p.add_argument("--config", default=None, help="JSON file with FinetuneConfig fields")
    add_arguments(p)
    p.set_defaults(func=run_finetune)

    p = sub.add_parser("wise", help="WiSE-FT: interpolate the weights of a zero-shot and a fine-tuned CLIP",
                       description="alpha 0 is the zero-shot classifier (the fine-tuned model's classes, its "
                                   "templates), alpha 1 the fine-tuned model.")
    p.add_argument("zero_shot", help="the CLIP the fine-tuning started from (a checkpoint or model folder)")
    p.add_argument("finetuned", help="the fine-tuned model (a clipforge finetune checkpoint)")
    p.add_argument("--alpha", type=float, default=None, help="weight of the fine-tuned model, in [0, 1]")
    p.add_argument("--alphas", default=None, help="a sweep, start:stop:step or a list (0:1:0.1); needs --eval; "
                                                   "writes OUT/wise_sweep.json when --out is given, no models")
    p.add_argument("--out", default=None, help="where --alpha writes the model (a clipforge folder)")
    p.add_argument("--eval", default=None, help="labelled images to report head top-1 on, per style and mean")
    p.add_argument("--styles", default="", help="comma-separated styles of --eval (default: all)")
    p.add_argument("--split", default="", help="the split of --eval (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.set_defaults(func=run_wise)
