"""Fine-tuning configuration: TrainConfig's fields plus labelled data and a method, flags generated one-to-one."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from clipforge.config_flags import add_dataclass_arguments
from clipforge.errors import ConfigError
from clipforge.train.config import CHOICES, TrainConfig

METHODS = ("ce", "flyp", "lp-ft")
# Fields a fine-tuning run sets itself from `data` and `method`; a value given for one of them is refused.
DERIVED = {"train_data": "data", "image_column": "data", "caption_column": "data", "key_column": "data",
           "caption_separator": "templates", "unique_keys": "method", "lock_image": "method",
           "lock_text": "method", "text_tower": "model", "bpe_vocab": "model", "model_overrides": "model",
           **{name: "val-data" for name in ("val_zeroshot", "val_zeroshot_styles", "val_zeroshot_split",
                                            "val_zeroshot_templates")}}


@dataclass
class FinetuneConfig(TrainConfig):
    """A fine-tuning run; `clipforge finetune --config run.json --lr 1e-5` overrides fields."""

    model: str = ""  # the CLIP to fine-tune: a checkpoint, model folder, or pretrained name
    data: str = ""  # labelled images: a labels CSV, a dataset folder holding labels.csv, or one folder per class
    styles: str = ""  # comma-separated styles of `data` to train on (empty: all)
    split: str = ""  # the split of `data` to train on (empty: all)
    # labelled images (same forms as `data`) whose top-1 under the model's head each validation reports
    val_data: str = ""
    val_styles: str = ""  # comma-separated styles of `val_data` to validate on (empty: all)
    val_split: str = ""  # the split of `val_data` to validate on (empty: all)
    # "ce": image tower and a head (started as the zero-shot classifier) by cross-entropy; "flyp": both towers by
    # the contrastive loss on class prompts, the head rebuilt from the text tower; "lp-ft": a linear probe, then ce
    method: str = "ce"
    templates: str = "simple"  # prompt template set of the zero-shot head and of FLYP's class prompts
    probe_c: float = 1.0  # lp-ft: inverse L2 strength of the linear probe that starts the head
    lr: float = 1e-5  # peak learning rate (AdamW), reached after warmup, then cosine decay
    warmup: int = 10  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW decay of weight matrices (not gains, biases, embeddings, temperature)
    output_dir: str = "runs/finetune"  # checkpoints, metrics.jsonl, the run's config and its training table

    def validate(self) -> None:
        """Reject inconsistent settings with a message naming the field."""
        if not self.model:
            raise ConfigError("model is required: the CLIP to fine-tune (a checkpoint, folder or pretrained name)")
        if not self.data:
            raise ConfigError("data is required: labelled images (labels CSV, dataset folder or class folders)")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.probe_c <= 0:
            raise ConfigError(f"probe_c must be positive, got {self.probe_c}")
        super().validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per FinetuneConfig field the user sets (--batch-size for batch_size)."""
    add_dataclass_arguments(parser, FinetuneConfig, {**CHOICES, "method": METHODS}, skip=tuple(DERIVED))


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """FinetuneConfig from --config JSON (if any) with explicit flags applied on top."""
    config = FinetuneConfig.from_json(args.config) if getattr(args, "config", None) else FinetuneConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **overrides)


def check_user_values(config: FinetuneConfig, derived: dict) -> None:
    """Refuse a config whose derived fields differ from what `data` and `method` give (a hand-edited record)."""
    given = {name: getattr(config, name) for name in DERIVED}
    defaults = FinetuneConfig()
    for name, value in given.items():
        if value != getattr(defaults, name) and value != derived.get(name, getattr(defaults, name)):
            raise ConfigError(f"{name} is set by finetune from --{DERIVED[name].replace('_', '-')}; got {value!r}")
