"""Training configuration: one dataclass, loadable from JSON, with CLI flags generated one-to-one."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_type_hints

from clipforge.config_flags import add_dataclass_arguments
from clipforge.errors import ConfigError
from clipforge.loss import LOSSES
from clipforge.model.config import TEXT_TOWER_NAMES
from clipforge.precision import PRECISION_CHOICES

CHOICES = {"precision": PRECISION_CHOICES, "loss": tuple(LOSSES), "text_tower": TEXT_TOWER_NAMES}


@dataclass
class TrainConfig:
    """Everything a training run needs; `clipforge train --config run.json --lr 1e-3` overrides fields."""

    # model
    model: str = "cpu-vit-small-64"  # registry name or checkpoint to start from
    model_overrides: dict = field(default_factory=dict)  # e.g. {"embed_dim": 128, "vision.layers": 4}
    text_tower: str = "clip"  # "clip" (causal transformer) or "minilm" (pretrained sentence encoder)
    bpe_vocab: str = ""  # a smaller BPE vocab file (clipforge.text.train_bpe) for a from-scratch text tower
    lock_image: bool = False  # LiT: freeze the image tower (its projection still trains)
    lock_image_projection: bool = False  # with lock_image: freeze the projection too (the image space stays as it is)
    lock_text: bool = False  # freeze the text tower (a pretrained one, typically)
    # CoCa: train the captioning decoder alone; both towers, their projections and the temperature stay as they
    # were (captioning added to a CLIP whose embeddings, and any index built with them, do not change)
    decoder_only: bool = False
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    # where the model trains: cpu, cuda, cuda:N, mps, or auto (a CUDA GPU if one is visible, else cpu);
    # under torchrun each process takes cuda:LOCAL_RANK (cuda) or the CPU
    device: str = "auto"
    # data
    train_data: str = ""  # caption CSV/TSV or webdataset shard pattern ("shards/{000..009}.tar")
    val_data: str = ""  # held-out caption CSV/TSV (optional)
    image_column: str = "image"  # CSV/TSV column (or shard extension) holding the image path
    caption_column: str = "caption"  # CSV/TSV column (or shard extension) holding the caption
    key_column: str = ""  # concept key column: batches then never hold two samples with the same key
    unique_keys: bool = True  # with key_column: no key twice in a batch (false: the key only labels samples)
    caption_separator: str = ""  # split one caption cell into several captions
    composite_white: bool = False  # blend transparent images onto white
    aug_scale_min: float = 0.9  # random resized crop keeps this much of the area at least
    aug_color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength (0: off)
    aug_grayscale: float = 0.0  # probability of a grayscale training image
    val_zeroshot: str = ""  # labels CSV / dataset folder: zero-shot top-1 at each validation
    val_zeroshot_styles: str = ""  # comma-separated styles to keep from val_zeroshot
    val_zeroshot_split: str = ""  # split to keep from val_zeroshot (e.g. "seen")
    val_zeroshot_templates: str = "simple"  # template set (clipforge.evaluate.get_templates)
    workers: int = 2  # DataLoader worker processes decoding images
    decoded_cache: bool = False  # CSV only: decode images once into a memory-mapped uint8 cache, augment tensors
    decoded_cache_dir: str = ""  # where the decoded cache lives (default ~/.cache/clipforge/decoded)
    # optimisation
    batch_size: int = 64  # per process, per optimizer step
    accum_steps: int = 1  # micro-batches per step (features cached: exact large-batch gradient)
    steps: int = 0  # optimizer steps (0: use epochs)
    epochs: int = 1  # passes over the data when steps is 0
    lr: float = 5e-4  # peak learning rate (AdamW), reached after warmup, then cosine decay
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.2  # AdamW decay of weight matrices (not gains, biases, embeddings, temperature)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.98  # AdamW beta2 (CLIP's 0.98 for stability with large batches)
    eps: float = 1e-6  # AdamW epsilon
    grad_clip: float = 0.0  # max grad norm (0: off)
    # "fp32", "bf16" (bf16 weights/activations, fp32 master weights) or "auto": picked per machine (bf16 with AMX or
    # a bf16 GPU, else fp32, or a cached probe's choice); config.json records the value it resolved to
    precision: str = "fp32"
    loss: str = "contrastive"  # "contrastive" or "siglip"
    loss_chunk_size: int = 0  # >0: tiled loss that never materialises the BxB logits
    # CoCa (a model with a captioning decoder): loss = contrastive weight x the contrastive loss + caption weight x
    # the caption's token cross-entropy (open_clip's defaults 1 and 2); ignored for a contrastive-only model
    contrastive_loss_weight: float = 1.0
    caption_loss_weight: float = 2.0  # CoCa: weight of the caption's token cross-entropy (padding ignored)
    seed: int = 0  # model init, data order and augmentation
    # bookkeeping
    output_dir: str = "runs/train"  # checkpoints, metrics.jsonl and the config of the run
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk (older ones are deleted)
    # "latest" (the run's newest checkpoint), "auto" (that, or a new run when there is none) or a checkpoint
    # directory; the settings must match the run's config.json (see resume_override)
    resume: str = ""
    resume_override: str = ""  # comma-separated fields a resume may change from the run's record, e.g. "lr,steps"
    log_every: int = 1  # steps between metrics.jsonl lines
    val_every: int = 0  # steps between validation runs (0: only at the end when val_data is set)
    max_steps_this_run: int = 0  # stop after this many steps (simulates a pre-emption; 0: off)

    def validate(self) -> None:
        """Reject inconsistent settings with a message naming the field."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.train_data:
            raise ConfigError("train_data is required (a caption CSV/TSV or a shard pattern)")
        if self.batch_size < 1 or self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise ConfigError(f"batch_size {self.batch_size} must be a positive multiple of accum_steps "
                              f"{self.accum_steps}")
        if not isinstance(self.model_overrides, dict):
            raise ConfigError(f"model_overrides must be a JSON object, got {self.model_overrides!r}")
        if self.bpe_vocab and self.text_tower != "clip":
            raise ConfigError("bpe_vocab applies to the 'clip' text tower only")
        if self.lock_image and self.lock_text:
            raise ConfigError("lock_image and lock_text together leave nothing to train")
        self._validate_resume()

    def _validate_resume(self) -> None:
        """resume_override names known fields, and only with resume."""
        names = override_names(self.resume_override)
        if names and not self.resume:
            raise ConfigError("resume_override applies to a resume only: add --resume latest (or auto, or a "
                              "checkpoint directory)")
        fields = {f.name for f in dataclasses.fields(self)}
        for name in names:
            if name not in fields:
                close = difflib.get_close_matches(name, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"resume_override: {name!r} is not a TrainConfig field{hint}")

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        """Load a JSON config file; unknown keys and wrongly typed values are errors."""
        values = json.loads(Path(path).read_text())
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config file holds one JSON object")
        hints = get_type_hints(cls)
        unknown = set(values) - set(hints)
        if unknown:
            raise ConfigError(f"{path}: unknown config keys {sorted(unknown)}")
        for name, value in values.items():
            kind = hints[name]
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                values[name], ok = float(value), True
            if not ok:
                raise ConfigError(f"{path}: {name} must be {kind.__name__}, got {value!r}")
        return cls(**values)


def override_names(text: str) -> list[str]:
    """The field names of a resume_override value ("lr, steps" -> ["lr", "steps"])."""
    return [name.strip().lstrip("-").replace("-", "_") for name in text.split(",") if name.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--batch-size for batch_size), defaults left to the config."""
    add_dataclass_arguments(parser, TrainConfig, CHOICES)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from --config JSON (if any) with explicit flags applied on top."""
    config = TrainConfig.from_json(args.config) if getattr(args, "config", None) else TrainConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    return dataclasses.replace(config, **overrides)
