"""`clipforge` command line: one sub-command per job; flags map onto library arguments one-to-one."""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import sys
from pathlib import Path
from typing import Any

from clipforge.cli import bind as bind_cmd
from clipforge.cli import caption as caption_cmd
from clipforge.cli import data as data_cmd
from clipforge.cli import demo as demo_cmd
from clipforge.cli import evaluate as eval_cmd
from clipforge.cli import export as export_cmd
from clipforge.cli import finetune as finetune_cmd
from clipforge.cli import search as search_cmd
from clipforge.cli import serve as serve_cmd
from clipforge.cli import train as train_cmd
from clipforge.cli.model_args import (
    add_model_arguments,
    add_precision_argument,
    command_precision,
    load_model,
    load_tokenizer,
)
from clipforge.errors import ClipforgeError
from clipforge.inference.templates import get_templates


def _models(args: argparse.Namespace) -> None:
    import clipforge

    if args.pretrained:
        for name, tag in clipforge.list_pretrained():
            print(f"{name}\t{tag}")
        return
    for name in clipforge.list_models():
        print(name)


def _convert(args: argparse.Namespace) -> None:
    import clipforge

    model, _ = load_model(args, args.src)
    tokenizer = load_tokenizer(args, model, args.src)
    out = clipforge.save_pretrained(model, args.out, format=args.format, tokenizer=tokenizer)
    print(f"wrote {args.format} checkpoint to {out}")


def _classify(args: argparse.Namespace) -> None:
    import torch

    from clipforge.checkpoint.io import bound_preprocess
    from clipforge.inference.zeroshot import OPENAI_TEMPLATES_7, build_classifier, classify

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    model, preprocess = load_model(args)
    if args.modality != "image":  # a bound tower's inputs (audio files): its own preprocess
        preprocess = bound_preprocess(model.config, args.modality)
    precision = command_precision(args.precision, next(model.parameters()).device)
    modality = args.label_modality
    tokenizer = load_tokenizer(args, model, modality=modality)
    tokenizer = functools.partial(tokenizer, truncate=args.truncate)
    default = get_templates("simple")[0] if modality == "text" else "{}"  # English sentences suit the CLIP's tower
    templates = OPENAI_TEMPLATES_7 if args.ensemble else (args.template or default,)
    classifier = build_classifier(model, tokenizer, labels, templates, precision=precision, modality=modality)
    inputs = torch.stack([preprocess(p) for p in args.images])
    probs = classify(model, inputs, classifier, precision, args.softmax, modality=args.modality)
    results = []
    for path, row in zip(args.images, probs):
        top = row.topk(min(args.top, len(labels)))
        best = zip(top.values.tolist(), top.indices.tolist())
        results.append({args.modality: str(path), "top": [[labels[i], round(p, 4)] for p, i in best]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r[args.modality]}: " + ", ".join(f"{label} {p:.3f}" for label, p in r["top"]))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clipforge")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless the help already states it (config-field flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: it refuses unknown arguments itself, naming the sub-command, its usage and a close flag.

    argparse otherwise hands a sub-command's leftovers up to the top-level parser, whose error shows
    `usage: clipforge [-h] ...` and no hint; sub-parsers of sub-parsers (`export onnx`) inherit this class.
    """

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + " ".join(self._with_hint(arg) for arg in extras))
        return parsed, extras

    def _with_hint(self, arg: str) -> str:
        """`arg`, followed by the closest option of this parser when it looks like a mistyped flag."""
        if not arg.startswith("-"):
            return arg
        options = [option for action in self._actions for option in action.option_strings]
        match = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1)
        return f"{arg} (did you mean {match[0]}?)" if match else arg


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _all_parsers(child)
    return found


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for all sub-commands."""
    parser = argparse.ArgumentParser(prog="clipforge", description="CLIP models: load, convert, classify, demo")
    parser.add_argument("--version", action="version", version=f"clipforge {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user-facing error too")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    p = sub.add_parser("models", help="list registry architectures (or, with --pretrained, downloadable weights)")
    p.add_argument("--pretrained", action="store_true", help="list (architecture, tag) pairs for --pretrained")
    p.set_defaults(func=_models)

    p = sub.add_parser("convert", help="convert a checkpoint (OpenAI/open_clip/HF/clipforge) to clipforge, hf or "
                                       "open_clip format")
    p.add_argument("src", help="checkpoint file or directory, or a registry name")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--format", choices=["clipforge", "hf", "open_clip"], default="clipforge",
                   help="open_clip: open_clip_config.json + open_clip_model.safetensors, for open_clip's "
                        "create_model(..., pretrained=DIR/open_clip_model.safetensors) or 'local-dir:DIR'")
    add_model_arguments(p, flag=None)
    p.set_defaults(func=_convert)

    p = sub.add_parser("classify", help="zero-shot classify images (or audio) against comma-separated labels")
    p.add_argument("images", nargs="+", type=Path, help="image files (audio files with --modality audio)")
    p.add_argument("--modality", default="image",
                   help="what the files are: 'image', or a bound tower's inputs, e.g. audio (`clipforge bind`)")
    add_model_arguments(p, device=True)
    add_precision_argument(p)
    p.add_argument("--labels", required=True, help="comma-separated class names")
    p.add_argument("--template", default=None, help="prompt template (without --ensemble; default "
                   f"{get_templates('simple')[0]!r}, or '{{}}' for a bound tower's --label-modality)")
    p.add_argument("--ensemble", action="store_true", help="average OpenAI's 7 ImageNet templates")
    p.add_argument("--top", type=int, default=3, help="labels printed per image")
    p.add_argument("--label-modality", default="text",
                   help="the text tower that reads --labels: 'text' (the CLIP's own) or a bound one, e.g. text-ko "
                        "(`clipforge bind`)")
    p.add_argument("--truncate", action="store_true",
                   help="cut a prompt longer than the model's context (default: refuse)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--softmax", action="store_true", help="a model with a logit bias (SigLIP): softmax over the "
                   "labels instead of each label's sigmoid match probability (CLIP: always the softmax)")
    p.set_defaults(func=_classify)

    caption_cmd.add_parser(sub)
    data_cmd.add_parser(sub)
    train_cmd.add_parser(sub)
    finetune_cmd.add_parser(sub)
    bind_cmd.add_parser(sub)
    eval_cmd.add_parser(sub)
    demo_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    serve_cmd.add_parser(sub)
    search_cmd.add_parser(sub)
    for each in _all_parsers(parser):
        each.formatter_class = _DefaultsFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `clipforge` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ClipforgeError, OSError) as error:  # what the user can fix, and the file system's own refusals
        if args.debug:
            raise
        print(f"clipforge {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
