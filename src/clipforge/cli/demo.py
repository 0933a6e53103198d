"""`clipforge demo`: the main job (see clipforge.demo.run); one flag per DemoConfig field."""
from __future__ import annotations

import argparse

from clipforge.demo.config import add_arguments, config_from_args


def run(args: argparse.Namespace) -> None:
    """Run the demo with the config the flags describe."""
    from clipforge.demo.run import run_demo

    run_demo(config_from_args(args))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `clipforge demo`."""
    p = sub.add_parser("demo", help="train CLIP on multi-style emoji and write a report of the paper's findings",
                       description="Prepares the emoji and Tux Paint data (cached), trains CLIP, LiT and a supervised "
                                   "baseline, evaluates them and writes OUT/report.md. ~10 minutes on 2 CPU cores.")
    add_arguments(p)
    p.set_defaults(func=run)
