"""Fine-tuning configuration: TrainConfig's fields plus labelled data and a method, flags generated one-to-one."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from clipforge.config_flags import add_dataclass_arguments
from clipforge.errors import ConfigError
from clipforge.model.config import list_models
from clipforge.train.config import CHOICES, TrainConfig

METHODS = ("ce", "flyp", "lp-ft")
# Fields a fine-tuning run sets itself from `data` (the training table it writes); a config's values for them (a
# run's record) are replaced, so a record reused with another --output-dir or --data stays consistent.
DERIVED = ("train_data", "image_column", "caption_column", "key_column", "caption_separator", "unique_keys")
# TrainConfig fields that do not apply to fine-tuning (what they choose comes from `model` and `method`, or
# `val_data` replaces them): no flag, and a config that sets one is refused.
NOT_APPLICABLE = {"lock_image": "method", "lock_text": "method", "text_tower": "model", "bpe_vocab": "model",
                  "model_overrides": "model", "val_zeroshot": "val-data", "val_zeroshot_styles": "val-styles",
                  "val_zeroshot_split": "val-split", "val_zeroshot_templates": "templates"}


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
    random_weights: bool = False  # allow a registry architecture as `model` (random weights: tests, smoke runs)
    lr: float = 1e-5  # peak learning rate (AdamW), reached after warmup, then cosine decay
    warmup: int = 10  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW decay of weight matrices (not gains, biases, embeddings, temperature)
    output_dir: str = "runs/finetune"  # checkpoints, metrics.jsonl, the run's config and its training table

    def validate_finetune(self) -> None:
        """Reject inconsistent fine-tuning settings with a message naming the field (before anything is written)."""
        if not self.model:
            raise ConfigError("model is required: the CLIP to fine-tune (a checkpoint, folder or pretrained name)")
        if not self.data:
            raise ConfigError("data is required: labelled images (labels CSV, dataset folder or class folders)")
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.probe_c <= 0:
            raise ConfigError(f"probe_c must be positive, got {self.probe_c}")
        if self.model in list_models() and not self.random_weights:
            raise ConfigError(f"model {self.model!r} is a registry architecture: fine-tuning it starts from random "
                              "weights; give a checkpoint, or add --random-weights (tests, smoke runs)")
        defaults = FinetuneConfig()
        for name, source in NOT_APPLICABLE.items():
            if getattr(self, name) != getattr(defaults, name):
                raise ConfigError(f"{name} does not apply to finetune (it follows --{source}); leave it out")

    def validate(self) -> None:
        """Reject inconsistent settings with a message naming the field."""
        self.validate_finetune()
        super().validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per FinetuneConfig field the user sets (--batch-size for batch_size)."""
    add_dataclass_arguments(parser, FinetuneConfig, {**CHOICES, "method": METHODS}, skip=(*DERIVED, *NOT_APPLICABLE))


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """FinetuneConfig from --config JSON (if any) with explicit flags applied on top."""
    config = FinetuneConfig.from_json(args.config) if getattr(args, "config", None) else FinetuneConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **overrides)
