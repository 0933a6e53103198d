"""`clipforge train`: a JSON config plus one flag per config field (torchrun-ready)."""
from __future__ import annotations

import argparse
import json
import os

from clipforge.io import json_safe
from clipforge.train.config import add_arguments, config_from_args


def run(args: argparse.Namespace) -> None:
    """Train (or resume) and print the summary as JSON."""
    from clipforge.train.trainer import train

    summary = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary (rank 0's, with every rank's counts)
        print(json.dumps(json_safe(summary), indent=1, default=str, allow_nan=False))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge train`."""
    p = sub.add_parser("train", help="contrastive pre-training (run under torchrun for several processes)",
                       description="Flags override the --config JSON one-to-one (--batch-size sets batch_size).")
    p.add_argument("--config", default=None, help="JSON file with TrainConfig fields")
    add_arguments(p)
    p.set_defaults(func=run)
