"""`clipforge bind`: train a tower for a new modality (a second language) against a frozen CLIP (ImageBind)."""
from __future__ import annotations

import argparse
import json
import os

from clipforge.io import json_safe


def run_bind(args: argparse.Namespace) -> None:
    """Bind (or resume) and print the summary as JSON; the bound model is OUTPUT/bound."""
    from clipforge.bind import bind
    from clipforge.bind.config import config_from_args

    summary = bind(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(json_safe(summary), indent=1, default=str, allow_nan=False))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge bind`."""
    from clipforge.bind.config import add_arguments

    p = sub.add_parser("bind", help="bind a new modality's tower to a frozen CLIP through image pairs (ImageBind)",
                       description="Trains a text tower for --modality (e.g. text-ko) on --train-data pairs "
                                   "(image,text columns) against the CLIP's frozen image embeddings, then writes "
                                   "OUTPUT/bound: the CLIP, unchanged, with the new tower (model.encode(modality, "
                                   "tokens); clipforge.get_tokenizer(OUTPUT/bound, modality=...)). Flags override "
                                   "the --config JSON one-to-one.")
    p.add_argument("--config", default=None, help="JSON file with BindConfig fields")
    add_arguments(p)
    p.set_defaults(func=run_bind)
