"""`clipforge caption IMAGE... --model M`: captions from a CoCa model (greedy, beam search or sampling)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clipforge.cli.model_args import add_model_arguments, load_model, load_tokenizer
from clipforge.errors import ConfigError

BATCH = 16  # images encoded and decoded together


def captions(model, tokenizer, pixels, args: argparse.Namespace) -> list[str]:
    """Decoded captions of preprocessed pixels [N, 3, S, S] with the command's decoding settings."""
    from clipforge.model.generation import caption_texts

    if args.beam and args.strategy == "sample":
        raise ConfigError("--beam is beam search: it cannot go with --strategy sample")
    strategy = "beam" if args.beam else args.strategy
    settings = dict(strategy=strategy, num_beams=args.beam or 3,
                    max_length=min(args.max_length, model.context_length), min_length=args.min_length,
                    top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                    repetition_penalty=args.repetition_penalty, seed=args.seed)
    return caption_texts(model, pixels, tokenizer, **settings)


def run_caption(args: argparse.Namespace) -> None:
    """Caption every image; print one line per image, or JSON."""
    import torch

    from clipforge.data.images import load_image

    model, preprocess = load_model(args)
    if model.text_decoder is None:
        raise ConfigError(f"{args.model} has no captioning decoder: caption with a CoCa model (clipforge models "
                          "lists coca_* architectures; --pretrained tags with `clipforge models --pretrained`)")
    tokenizer = load_tokenizer(args, model)
    results = []
    for start in range(0, len(args.images), BATCH):
        paths = args.images[start : start + BATCH]
        pixels = torch.stack([preprocess(load_image(path)) for path in paths])
        with torch.no_grad():
            results += [{"image": str(path), "caption": text}
                        for path, text in zip(paths, captions(model, tokenizer, pixels, args))]
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    else:
        for row in results:
            print(f"{row['image']}: {row['caption']}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge caption`."""
    p = sub.add_parser("caption", help="write captions for images with a CoCa model")
    p.add_argument("images", nargs="+", type=Path, help="image files")
    add_model_arguments(p, device=True)
    p.add_argument("--strategy", choices=["greedy", "beam", "sample"], default="greedy", help="decoding")
    p.add_argument("--beam", type=int, default=0,
                   help="beam search with this many beams (sets --strategy beam; --strategy beam alone: 3)")
    p.add_argument("--max-length", type=int, default=30, help="ids per caption, start-of-text included")
    p.add_argument("--min-length", type=int, default=5, help="no end-of-text before this many ids")
    p.add_argument("--top-k", type=int, default=0, help="sampling: keep the k best tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampling: keep the tokens covering this probability")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="divide the logits of repeated tokens")
    p.add_argument("--seed", type=int, default=None, help="sampling: the same seed gives the same captions")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_caption)
