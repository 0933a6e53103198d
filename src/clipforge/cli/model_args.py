"""The model flags every command that loads a model shares: which checkpoint, how to read a bare state dict,
and the explicit opt-in that a registry name (random weights) needs."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint.options import LoadOptions
from clipforge.device import DEVICE_HELP, resolve_device
from clipforge.precision import PRECISION_CHOICES, PRECISION_HELP, resolve_precision


def add_model_arguments(p: argparse.ArgumentParser, flag: str | None = "--model", random_weights: bool = True,
                        device: bool = False) -> None:
    """Add --model (unless the command takes it positionally), --model-config, --head-width, --quick-gelu/--gelu
    (and --device for commands that run the model)."""
    if flag:
        p.add_argument(flag, required=True, help="checkpoint (file or folder in any format clipforge.load reads)"
                                                 + ", hf-hub:ORG/NAME, or a registry name with --pretrained TAG"
                                                 + (" or --random-weights" if random_weights else ""))
    p.add_argument("--pretrained", default=None,
                   help="weights for a registry architecture: a tag (`clipforge models --pretrained`), downloaded "
                        "into the verified cache, or a weights file")
    p.add_argument("--model-config", default=None,
                   help="architecture of the weights: open_clip_config.json, clipforge.json, HF config.json or a "
                        "registry name (default: the config beside the weights)")
    p.add_argument("--head-width", type=int, default=None,
                   help="attention head width of a bare OpenAI-layout state dict (OpenAI's releases: 64)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--quick-gelu", dest="quick_gelu", action="store_const", const=True, default=None,
                     help="a bare state dict was trained with QuickGELU (every OpenAI release)")
    act.add_argument("--gelu", dest="quick_gelu", action="store_const", const=False,
                     help="a bare state dict was trained with exact GELU (most open_clip LAION models)")
    if device:
        p.add_argument("--device", default="auto", help=DEVICE_HELP)
    if random_weights:
        p.add_argument("--random-weights", action="store_true",
                       help="allow a registry name without weights: randomly initialised, for smoke tests only")


def add_precision_argument(p: argparse.ArgumentParser) -> None:
    """Add --precision (fp32, bf16 or auto; default fp32) for a command that embeds images or texts."""
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32",
                   help=PRECISION_HELP + "; bf16 embeddings differ slightly from fp32")


def command_precision(precision: str, device: torch.device | str) -> str:
    """The precision a command runs at on `device`; an automatic choice is printed once on stderr (rank 0)."""
    choice = resolve_precision(precision, device)
    if choice.asked == "auto" and int(os.environ.get("RANK", "0")) == 0:
        print(choice.describe(), file=sys.stderr)
    return choice.precision


def load_options(args: argparse.Namespace) -> LoadOptions:
    """The caller's choice that the model flags state, for clipforge.load and clipforge.get_tokenizer alike."""
    return LoadOptions(pretrained=args.pretrained, config=args.model_config, head_width=args.head_width,
                       quick_gelu=args.quick_gelu)


def load_tokenizer(args: argparse.Namespace, model: Any, name: str | Path | None = None,
                   modality: str = "text") -> Any:
    """The tokenizer of the checkpoint `load_model` read, found the same way (same folder detection and flags);
    `modality`: a bound text tower's own."""
    import clipforge

    name = args.model if name is None else name
    if modality != "text":
        return clipforge.get_tokenizer(name, options=load_options(args), modality=modality)
    return clipforge.get_tokenizer(name, context_length=model.context_length, options=load_options(args))


def load_model(args: argparse.Namespace, name: str | Path | None = None) -> tuple[Any, Any]:
    """(model, eval transform) for the command's model flags; refuses random weights unless --random-weights."""
    import clipforge
    from clipforge.checkpoint.io import refuse_random_weights

    name = args.model if name is None else name
    refuse_random_weights(name, getattr(args, "random_weights", False), args.pretrained)
    device = resolve_device(getattr(args, "device", "cpu"))
    return clipforge.load(name, device, options=load_options(args))
