"""`bind`: train a tower for a new modality against a frozen CLIP's image embeddings (ImageBind's recipe), with the
library trainer, then add it to the CLIP as a bound tower.

The run trains a *student*: the CLIP's image tower and projection, frozen, beside a fresh text tower with a BPE of
its own (trained on the pairs' texts); the trainer brings resume, DDP, accumulation, the tiled loss and metrics.
The result, OUTPUT/bound, is the original CLIP (every weight as it was, so an index built with it stays valid)
with the trained tower under `bound_text[modality]` and its tokenizer under modalities/MODALITY.

    OUTPUT/student/   the starting point (written once; a resumed run finds it)
    OUTPUT/run/       the trainer's checkpoints, metrics.jsonl and config.json
    OUTPUT/bound/     the CLIP with its bound towers: clipforge.load, model.encode(modality, ...)
"""
from __future__ import annotations

import csv
import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

from clipforge.bind.audio import AudioBindingRun, write_audio_student
from clipforge.bind.config import BindConfig
from clipforge.checkpoint.io import CONFIG_FILE, get_tokenizer, load, save_pretrained
from clipforge.errors import ConfigError
from clipforge.model.clip import CLIP
from clipforge.model.config import TextConfig
from clipforge.text.bpe_train import train_bpe
from clipforge.text.tokenizer import CLIPTokenizer
from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train


def bind(config: BindConfig) -> dict[str, Any]:
    """Train (or resume) the binding and write OUTPUT/bound; returns the trainer's summary with "bound"."""
    config.validate()
    out = Path(config.output_dir)
    original, _ = load(config.model)
    if config.modality in original.modalities:
        raise ConfigError(f"{config.model} already has a {config.modality!r} tower")
    tokenizer = None if config.is_audio else _tokenizer(config, out, original.context_length)
    student = out / "student"
    if not (student / CONFIG_FILE).is_file():
        if config.is_audio:
            write_audio_student(config, original, get_tokenizer(config.model), student)
        else:
            _write_student(config, original, tokenizer, student)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
    run_config = TrainConfig(**{**fields, "model": str(student), "output_dir": str(out / "run"),
                                "caption_column": config.pair_column})
    run_class = (functools.partial(AudioBindingRun, modality=config.modality, max_seconds=config.max_audio_seconds)
                 if config.is_audio else None)
    summary = train(run_config, run_class)
    if summary.get("checkpoint") is None:  # a rank other than 0, or a run stopped early (max_steps_this_run)
        return summary
    return {**summary, "bound": str(_assemble(config, Path(summary["checkpoint"]), tokenizer, out / "bound"))}


def _texts(config: BindConfig) -> list[str]:
    """Every text of the pairs table (each candidate, when `caption_separator` splits a cell)."""
    path = Path(config.train_data)
    if path.suffix.lower() not in (".csv", ".tsv") or not path.is_file():
        raise ConfigError(f"train_data {path}: binding trains its tokenizer on a pairs CSV/TSV (image,text columns)")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        if config.pair_column not in (rows.fieldnames or []):
            raise ConfigError(f"{path}: no {config.pair_column!r} column (columns: {rows.fieldnames})")
        cells = [row[config.pair_column] or "" for row in rows]
    texts = [t for cell in cells for t in (cell.split(config.caption_separator) if config.caption_separator
                                           else [cell]) if t.strip()]
    if not texts:
        raise ConfigError(f"{path}: the {config.pair_column!r} column holds no text")
    return texts


def _tokenizer(config: BindConfig, out: Path, clip_context: int) -> CLIPTokenizer:
    """The new tower's BPE: trained on the pairs' texts once (OUTPUT/bpe.txt.gz), read back on a resume; its
    context length is `tower`'s, else the CLIP's text tower's."""
    path = out / "bpe.txt.gz"
    context = int(config.tower.get("context_length", clip_context))
    if path.is_file():
        return CLIPTokenizer(str(path), context_length=context)
    out.mkdir(parents=True, exist_ok=True)
    return train_bpe(_texts(config), config.vocab_size, path, context_length=context)


def _write_student(config: BindConfig, original: CLIP, tokenizer: CLIPTokenizer, folder: Path) -> None:
    """The CLIP's image tower, projection and temperature with a fresh text tower of `config.tower`'s shape."""
    base = dataclasses.asdict(original.config.text) if original.config.text_tower == "clip" else {}
    text = TextConfig(**{**base, "causal": True, "pool": "eot", "projection_bias": False, **config.tower,
                         "vocab_size": tokenizer.vocab_size, "context_length": tokenizer.context_length})
    student_config = dataclasses.replace(original.config, text=text, text_tower="clip", decoder=None,
                                         bag_of_words=None, bound_text={}, classnames=[], head_templates=[],
                                         logit_bias_init=None)
    torch.manual_seed(config.seed)
    student = CLIP(student_config, pretrained_text=False)
    student.visual.load_state_dict(original.visual.state_dict())
    with torch.no_grad():
        student.logit_scale.copy_(original.logit_scale)
    student.preprocess_config = original.preprocess_config
    save_pretrained(student, folder, tokenizer=tokenizer)


def _assemble(config: BindConfig, checkpoint: Path, tokenizer: CLIPTokenizer | None, folder: Path) -> Path:
    """The original CLIP (reloaded: untouched) plus the trained tower, with every tokenizer, saved in `folder`."""
    model, _ = load(config.model)
    trained, _ = load(checkpoint)
    towers = ("visual", "text_tower") if config.is_audio else ("visual",)  # what the binding kept frozen
    for tower in towers:
        ours, theirs = getattr(model, tower).state_dict(), getattr(trained, tower).state_dict()
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
            raise ConfigError(f"{checkpoint}: its {tower} differs from {config.model}'s: not a binding of it")
    tokenizers = {name: get_tokenizer(config.model, modality=name) for name in model.bound_text}
    if config.is_audio:
        tower = model.bind_audio_tower(config.modality, trained.config.bound_audio[config.modality])
        tower.load_state_dict(trained.bound_audio[config.modality].state_dict())
    else:
        model.bind_text_tower(config.modality, trained.config.text).load_state_dict(trained.text_tower.state_dict())
        tokenizers[config.modality] = tokenizer
    return save_pretrained(model, folder, tokenizer=get_tokenizer(config.model), modality_tokenizers=tokenizers)
