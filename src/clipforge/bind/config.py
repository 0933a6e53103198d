"""Binding configuration: TrainConfig's fields (the trainer runs the binding) plus the modality and its tower."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from clipforge.config_flags import add_dataclass_arguments
from clipforge.errors import ConfigError
from clipforge.model.config import check_modality_name
from clipforge.train.config import CHOICES, TrainConfig

# TrainConfig fields a binding sets itself: the image tower and its projection stay frozen (the new tower must land
# in the CLIP's own space), the text tower is the new one. A config that changes one is refused.
FIXED = {"lock_image": True, "lock_image_projection": True, "lock_text": False, "text_tower": "clip",
         "bpe_vocab": "", "model_overrides": {}, "decoder_only": False}


@dataclass
class BindConfig(TrainConfig):
    """A binding run; `clipforge bind --config run.json --lr 1e-3` overrides fields."""

    model: str = ""  # the CLIP to bind to (a checkpoint or model folder): its towers never change
    modality: str = "text-ko"  # the new tower's name: "text-LANG" for a second language (audio: not built yet)
    train_data: str = ""  # pairs CSV/TSV: an image column and a text column of the new modality
    caption_column: str = "text"  # the column with the new modality's text
    vocab_size: int = 8000  # ids of the new tower's BPE, trained on train_data's texts (fewer when they run out)
    # the new text tower's shape, over the CLIP's own text config (e.g. {"layers": 4, "width": 256}); its context
    # length is the tokenizer's
    tower: dict = field(default_factory=dict)
    lr: float = 1e-3  # peak learning rate (a tower from scratch)
    warmup: int = 50  # linear warm-up steps
    output_dir: str = "runs/bind"  # student/ (the CLIP's towers + the new one), run/ (checkpoints), bound/ (result)
    lock_image: bool = True  # fixed: the image tower stays frozen
    lock_image_projection: bool = True  # fixed: and its projection

    def validate(self) -> None:
        """Reject settings that cannot bind, naming the field."""
        if not self.model:
            raise ConfigError("model is required: the CLIP to bind to (a checkpoint or model folder)")
        check_modality_name(self.modality)
        if not self.modality.startswith("text-"):
            raise ConfigError(f"modality {self.modality!r}: only text towers bind so far ('text-LANG', e.g. text-ko)")
        if self.vocab_size < 600:
            raise ConfigError(f"vocab_size must be >= 600 (512 bytes + merges + start/end), got {self.vocab_size}")
        if not isinstance(self.tower, dict):
            raise ConfigError(f"tower must be a JSON object of text config fields, got {self.tower!r}")
        for name, value in FIXED.items():
            if getattr(self, name) != value:
                raise ConfigError(f"{name} is fixed by binding ({value!r}); leave it out")
        super().validate()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per BindConfig field the user sets (--batch-size for batch_size)."""
    add_dataclass_arguments(parser, BindConfig, CHOICES, skip=tuple(FIXED))


def config_from_args(args: argparse.Namespace) -> BindConfig:
    """BindConfig from --config JSON (if any) with explicit flags applied on top."""
    config = BindConfig.from_json(args.config) if getattr(args, "config", None) else BindConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BindConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **overrides)
