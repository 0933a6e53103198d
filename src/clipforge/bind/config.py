"""Binding configuration: TrainConfig's fields (the trainer runs the binding) plus the modality and its tower."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from clipforge.config_flags import add_dataclass_arguments
from clipforge.errors import ConfigError
from clipforge.model.config import check_modality_name, get_audio_config
from clipforge.train.config import CHOICES, TrainConfig

# TrainConfig fields a binding sets itself: the image tower and its projection stay frozen (the new tower must land
# in the CLIP's own space), the text tower is the new one. A config that changes one is refused.
FIXED = {"lock_image": True, "lock_image_projection": True, "lock_text": False, "text_tower": "clip",
         "bpe_vocab": "", "model_overrides": {}, "decoder_only": False}


@dataclass
class BindConfig(TrainConfig):
    """A binding run; `clipforge bind --config run.json --lr 1e-3` overrides fields."""

    model: str = ""  # the CLIP to bind to (a checkpoint or model folder): its towers never change
    modality: str = "text-ko"  # the new tower's name: "text-LANG" for a second language, "audio" (or "audio-NAME")
    train_data: str = ""  # pairs CSV/TSV: an image column and a column of the new modality (text, or audio files)
    caption_column: str = ""  # the new modality's column ("": "text" for a text tower, "audio" for an audio tower)
    vocab_size: int = 8000  # text: ids of the new tower's BPE, trained on train_data's texts (fewer when they run out)
    audio_tower: str = "cpu-small"  # audio: the tower's registry shape ("imagebind": ImageBind's; "cpu-small")
    max_audio_seconds: float = 600.0  # audio: longer recordings are skipped (reason too_long) before decoding
    # the new tower's shape over its base (a text tower: the CLIP's own text config, e.g. {"layers": 4, "width":
    # 256}, its context length the tokenizer's; an audio tower: audio_tower's, e.g. {"layers": 2, "mel_bins": 64})
    tower: dict = field(default_factory=dict)
    lr: float = 1e-3  # peak learning rate (a tower from scratch)
    warmup: int = 50  # linear warm-up steps
    output_dir: str = "runs/bind"  # student/ (the CLIP's towers + the new one), run/ (checkpoints), bound/ (result)
    lock_image: bool = True  # fixed: the image tower stays frozen
    lock_image_projection: bool = True  # fixed: and its projection

    @property
    def is_audio(self) -> bool:
        """Whether the new tower reads audio ("audio", "audio-...") rather than text ("text-...")."""
        return self.modality == "audio" or self.modality.startswith("audio-")

    @property
    def pair_column(self) -> str:
        """The table column of the new modality."""
        return self.caption_column or ("audio" if self.is_audio else "text")

    def validate(self) -> None:
        """Reject settings that cannot bind, naming the field."""
        if not self.model:
            raise ConfigError("model is required: the CLIP to bind to (a checkpoint or model folder)")
        check_modality_name(self.modality)
        if not (self.modality.startswith("text-") or self.is_audio):
            raise ConfigError(f"modality {self.modality!r}: a text tower ('text-LANG', e.g. text-ko) or an audio tower "
                              "('audio' or 'audio-NAME') binds")
        if self.vocab_size < 600:
            raise ConfigError(f"vocab_size must be >= 600 (512 bytes + merges + start/end), got {self.vocab_size}")
        if not isinstance(self.tower, dict):
            raise ConfigError(f"tower must be a JSON object of the tower's config fields, got {self.tower!r}")
        for name, value in FIXED.items():
            if getattr(self, name) != value:
                raise ConfigError(f"{name} is fixed by binding ({value!r}); leave it out")
        if self.is_audio:
            self._check_audio()
        super().validate()

    def _check_audio(self) -> None:
        get_audio_config(self.audio_tower, **self.tower)  # an unknown shape or field is refused here
        if ".tar" in self.train_data:
            raise ConfigError("an audio binding reads a pairs CSV/TSV (image,audio columns), not webdataset shards")
        for name in ("val_data", "val_zeroshot", "decoded_cache"):
            if getattr(self, name):
                raise ConfigError(f"{name} is not available when binding audio; evaluate the bound model with "
                                  "clipforge eval --modality instead")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per BindConfig field the user sets (--batch-size for batch_size)."""
    add_dataclass_arguments(parser, BindConfig, CHOICES, skip=tuple(FIXED))


def config_from_args(args: argparse.Namespace) -> BindConfig:
    """BindConfig from --config JSON (if any) with explicit flags applied on top."""
    config = BindConfig.from_json(args.config) if getattr(args, "config", None) else BindConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BindConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **overrides)
