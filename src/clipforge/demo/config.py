"""DemoConfig: what `clipforge demo` trains and evaluates; CLI flags map onto its fields one-to-one."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from clipforge.config_flags import add_dataclass_arguments
from clipforge.errors import ConfigError
from clipforge.precision import PRECISION_CHOICES

CHOICES = {"icon_query": ("labels", "any"), "icons_unseen": ("keep", "remove"), "lit_data": ("emoji", "clip"),
           "data_path": ("decoded", "pil"), "precision": PRECISION_CHOICES, "ablation": (0, 1),
           "finetune": (0, 1), "siglip": (0, 1), "objectives": (0, 1), "captioning": (0, 1),
           "binding": (0, 1)}


@dataclass
class DemoConfig:
    """The demo run. Step counts of 0 are derived from `minutes` (see `budget`) so one flag scales the run."""

    out: str = "runs/demo"  # output folder: report.md, results.json, plots, the runs' checkpoints
    data_root: str = ""  # where the datasets are built ("": ~/.cache/clipforge/data)
    cache: str = ""  # downloaded npm/apt archives ("": $CLIPFORGE_DATA_CACHE or ~/.cache/clipforge/datasets)
    minutes: float = 10.0  # wall-time target on 2 CPU cores (training steps scale with it)
    seed: int = 0  # every random choice of the run (init, data order, held-out images)
    model: str = "demo-rn-32"  # image tower + from-scratch text tower (registry name)
    train_styles: str = "google,openmoji-color,fluent-flat,fluent-3d"  # emoji styles trained on (comma-separated)
    held_out_styles: str = "twitter,openmoji-black"  # one colour style and the line-art style
    eval_styles: str = "fluent-high-contrast,noto-v1,emojione,emojione-monotone"  # new art, evaluation only
    prompt_validation_style: str = "emojione"  # the prompt template is chosen here, scored on the other styles
    clip_steps: int = 0  # CLIP optimizer steps (0: from minutes)
    lit_steps: int = 0  # LiT optimizer steps (0: from minutes)
    supervised_steps: int = 0  # supervised baseline steps (0: from minutes)
    batch_size: int = 256  # pairs per step (every run)
    lr: float = 1e-3  # peak learning rate (every run)
    warmup: int = 30  # warm-up steps (at most a quarter of a run's steps)
    # "auto": bf16 where this machine runs it faster (AMX, a bf16 GPU, or a probe cached per machine), else fp32;
    # the config line and config.json record what it resolved to, so --config repeats the run exactly
    precision: str = "auto"
    templates: str = "emoji"  # zero-shot prompt ensemble (clipforge.evaluate.get_templates)
    limit: int = 0  # >0: only the first N concepts (a fast smoke run: tests, CI)
    workers: int = 1  # image-decoding workers of the "pil" data path
    # Iconify icons mixed into CLIP/LiT pre-training (the "web"): at most this many (0: none).
    icons: int = 100_000
    # "labels": only icons named like an emoji concept (seen or unseen), the way CLIP's corpus was collected by
    # searching for a query list; "any": drawn from the whole collection. Measured below (README).
    icon_query: str = "labels"
    icons_per_concept: int = 0  # >0: at most this many icons of one concept key
    emoji_repeat: int = 2  # each emoji training image is listed this many times (its share next to the icons)
    icons_unseen: str = "keep"  # "keep" or "remove" icons named like an unseen emoji concept
    # "emoji": LiT trains on the emoji rows only; "clip": on CLIP's table, icons included. Measured (318 steps):
    # the matched icons cut LiT's held-out Twitter top-1 from 0.35 to 0.11 and left unseen concepts at 0.115.
    lit_data: str = "emoji"
    # 1: also train CLIP, same steps, on the two data settings this run does not use, out of emoji only / emoji +
    # icons with unseen-named icons kept / removed (the data ablation; needs icons > 0)
    ablation: int = 0
    data_path: str = "decoded"  # "decoded": images decoded once, tensor augmentation; "pil": per-sample PIL
    # 1: also fine-tune the CLIP on the training styles (cross-entropy, FLYP) and sweep WiSE-FT (the paper's "adapt
    # to ImageNet"); outside the 10-minute budget (README: fine-tuning)
    finetune: int = 0
    finetune_steps: int = 150  # optimizer steps of each fine-tuning method (--finetune 1)
    finetune_lr: float = 1e-3  # peak learning rate of the fine-tuning runs (--finetune 1; 1e-4 measured: no change)
    # 1: also train a SigLIP (sigmoid loss, SigLIP's text-tower options) on CLIP's data at CLIP's steps: the
    # "CLIP vs SigLIP at equal compute" row; outside the 10-minute budget (README: SigLIP)
    siglip: int = 0
    # 1: also train a bag-of-n-grams predictor and a caption language model on CLIP's data at CLIP's steps (CLIP keeps
    # 8 checkpoints): zero-shot accuracy against images seen, the paper's Figure 2; outside the 10-minute budget
    # (README: objectives)
    objectives: int = 0
    # 1: also train a CoCa on CLIP's data at CLIP's steps: captions of held-out-style images (BLEU-4, CIDEr-D) next to a
    # retrieval baseline (README: captioning); outside the 10-minute budget
    captioning: int = 0
    # 1: also bind audio (Tux Paint's recordings) and Korean (CLDR names) to the CLIP through images only and measure
    # emergent zero-shot against chance and supervised references (README: binding); outside the 10-minute budget
    binding: int = 0
    binding_steps: int = 300  # optimizer steps of each binding and of each supervised reference (--binding 1)
    # pairs per step of the audio binding and its reference (distinct concepts per batch: 138 have recordings); the
    # Korean binding and its reference take batch_size
    binding_batch_size: int = 64

    def validate(self) -> None:
        """Reject settings that cannot run, naming the field."""
        if self.minutes <= 0:
            raise ConfigError(f"minutes must be > 0, got {self.minutes}")
        if self.prompt_validation_style not in self.styles("held_out") or len(self.styles("held_out")) < 2:
            raise ConfigError("prompt_validation_style must be one of two or more held-out/eval styles")
        if set(self.styles("train")) & set(self.styles("held_out")):
            raise ConfigError("train_styles and held_out_styles overlap")
        if not self.styles("train") or not self.styles("held_out"):
            raise ConfigError("train_styles and held_out_styles must each name at least one style")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2 (a contrastive batch needs negatives)")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.finetune_steps < 1 or self.finetune_lr <= 0:
            raise ConfigError(f"finetune_steps must be >= 1 and finetune_lr > 0, got {self.finetune_steps}, "
                              f"{self.finetune_lr}")
        if self.ablation and not self.icons:
            raise ConfigError("ablation needs icons > 0 (the icon count of its runs)")
        if self.icons < 0 or self.icons_per_concept < 0 or self.emoji_repeat < 1:
            raise ConfigError(f"icons and icons_per_concept must be >= 0 and emoji_repeat >= 1, got {self.icons}, "
                             f"{self.icons_per_concept}, {self.emoji_repeat}")

    def styles(self, which: str) -> list[str]:
        """The "train", "held_out" (never trained on: held_out_styles then eval_styles) or "built" styles."""
        names = {"train": self.train_styles, "held_out": f"{self.held_out_styles},{self.eval_styles}",
                 "built": f"{self.train_styles},{self.held_out_styles},{self.eval_styles}"}[which]
        return list(dict.fromkeys(s.strip() for s in names.split(",") if s.strip()))

    def data_dir(self) -> Path:
        """Folder holding emoji/ and tuxpaint/."""
        return Path(self.data_root).expanduser() if self.data_root else Path.home() / ".cache" / "clipforge" / "data"

    def cache_dir(self) -> Path:
        """Folder of the downloaded archives (shared by every data root, and by the tests)."""
        default = os.environ.get("CLIPFORGE_DATA_CACHE", str(Path.home() / ".cache" / "clipforge" / "datasets"))
        return Path(self.cache or default).expanduser()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per DemoConfig field (--clip-steps for clip_steps), help from the field comments."""
    add_dataclass_arguments(parser, DemoConfig, CHOICES)
    parser.add_argument("--config", default=None, help="JSON file with DemoConfig fields (flags override it)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """DemoConfig from --config JSON (if any) with explicit flags on top."""
    values = {}
    if getattr(args, "config", None):
        values = json.loads(Path(args.config).read_text())
        unknown = set(values) - {f.name for f in dataclasses.fields(DemoConfig)}
        if not isinstance(values, dict) or unknown:
            raise ConfigError(f"{args.config}: not a DemoConfig JSON object (unknown keys: {sorted(unknown)})")
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)
                   if getattr(args, f.name, None) is not None})
    config = DemoConfig(**values)
    config.validate()
    return config
