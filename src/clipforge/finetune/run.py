"""`clipforge finetune`: a CLIP fine-tuned as a classifier of labelled images by cross-entropy, FLYP or LP-FT.

The run is a `TrainingRun` (resume, torchrun, accumulation, bf16 masters, metrics and checkpoints hold as in
`clipforge train`) over a table written from the labelled data: one row per image with its class prompts and
class name. What differs is the model (a head started as the zero-shot classifier), which weights train, the
step (cross-entropy on the head, or FLYP's contrastive loss on the prompts) and the validation (head top-1).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import time
from pathlib import Path
from typing import Any, Callable

import torch

from clipforge.data.labelled import LabelledImages, load_labelled_images
from clipforge.data.transforms import EvalTransform
from clipforge.errors import ConfigError, TrainingError
from clipforge.evaluate.linear_probe import fit_logistic_regression
from clipforge.finetune.config import FinetuneConfig
from clipforge.finetune.wise import head_labels, head_top1
from clipforge.inference.features import labelled_image_features
from clipforge.inference.templates import get_templates
from clipforge.inference.zeroshot import zero_shot_head
from clipforge.io import write_atomic
from clipforge.model import CLIP
from clipforge.text.base import Tokenizer
from clipforge.train.models import build_model_and_tokenizer
from clipforge.train.step import ClassifierStep, TrainStep
from clipforge.train.trainer import TrainingRun

TABLE_FILE = "finetune_data.csv"
SEPARATOR = "\x1f"  # between a class's prompts in one caption cell: a character no class name holds


def _styles(text: str) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] or None


def write_training_table(config: FinetuneConfig) -> tuple[dict[str, Any], list[str]]:
    """OUTPUT_DIR/finetune_data.csv from the labelled data, the config fields it sets, and the class names.

    A resume finds the table its run trained on: labelled data that changed since is refused, not re-read."""
    images = load_labelled_images(config.data, _styles(config.styles), config.split or None)
    _refuse_padded_names(images.classnames)
    templates = get_templates(config.templates)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "caption", "class"])
    for path, label in zip(images.paths, images.labels.tolist()):
        name = images.classnames[label]
        writer.writerow([str(Path(path).resolve()), SEPARATOR.join(t.replace("{}", name) for t in templates), name])
    table = Path(config.output_dir) / TABLE_FILE
    if config.resume and table.is_file() and table.read_bytes() != buffer.getvalue().encode("utf-8"):
        raise TrainingError(f"--resume: the labelled data ({config.data}, styles {config.styles or 'all'}, split "
                            f"{config.split or 'all'}) differs from what the run trained on ({table}); a resume "
                            "continues on the same images and prompts")
    table.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(table, buffer.getvalue())
    # unique_keys off: cross-entropy needs no constraint, and FLYP (as its paper) keeps a class's second image
    # in a batch as a negative rather than make the batching depend on the class and process counts.
    derived = {"train_data": str(table), "image_column": "image", "caption_column": "caption", "key_column": "class",
               "caption_separator": SEPARATOR, "unique_keys": False}
    return derived, images.classnames


def _refuse_padded_names(classnames: list[str]) -> None:
    """Class names travel through a caption table, which strips cells: refuse names it would change."""
    padded = [name for name in classnames if name != name.strip()]
    if padded:
        raise ConfigError(f"class names with leading or trailing spaces: {padded[:3]}; strip them in the labels")


class HeadTop1:
    """Top-1 of the model's head on a labelled image set (decoded once), by the class names the head knows."""

    def __init__(self, config: FinetuneConfig, preprocess: Callable, classnames: list[str]) -> None:
        images = load_labelled_images(config.val_data, _styles(config.val_styles), config.val_split or None)
        head_labels(images, classnames)  # refuses a class the head cannot name before training starts
        self.pixels, self.images = images.decode(preprocess)
        if not len(self.pixels):
            raise TrainingError(f"val_data {config.val_data}: no readable images")

    def __call__(self, model: CLIP, device: torch.device) -> dict[str, float]:
        """{"top1_<style>", "top1_mean"} with the model as it is now."""
        return head_top1(model, self.pixels, self.images)


class FinetuneRun(TrainingRun):
    """A TrainingRun whose model carries a classification head over the training classes."""

    def __init__(self, config: FinetuneConfig, classnames: list[str]) -> None:
        self.classnames = classnames
        self.class_index = {name: i for i, name in enumerate(classnames)}  # a batch's keys -> labels, every step
        self.templates = get_templates(config.templates)
        self.head_fp32: torch.Tensor | None = None  # FLYP: the head rebuilt from the text tower, unrounded
        super().__init__(config)

    def _build_model(self, resume_from: Path | None) -> tuple[CLIP, Tokenizer]:
        model, tokenizer = build_model_and_tokenizer(self.config, resume_from)
        if resume_from is not None:
            if model.classnames != self.classnames:
                raise TrainingError(f"--resume: {resume_from} classifies other classes than the data now holds")
            return model, tokenizer
        if model.head is not None:
            raise TrainingError(f"{self.config.model} already has a classification head: fine-tune the model it "
                                "was made from, or continue its run with --resume")
        model.set_head(zero_shot_head(model, tokenizer, self.classnames, self.templates), self.classnames,
                       templates=self.templates)
        if self.config.method == "lp-ft":
            self._probe_head(model)
        return model, tokenizer

    def _probe_head(self, model: CLIP) -> None:
        """LP-FT's first stage: the head becomes a logistic regression fitted on the frozen image features."""
        config = self.config
        images: LabelledImages = load_labelled_images(config.data, _styles(config.styles), config.split or None)
        preprocess = EvalTransform(model.image_size, composite_white=config.composite_white)
        features, kept = labelled_image_features(model, images, preprocess)
        probe, _ = fit_logistic_regression(features.numpy(), kept.labels.numpy(), config.probe_c)
        weight = torch.zeros(len(self.classnames), model.config.embed_dim)
        bias = torch.full((len(self.classnames),), -1e4)  # a class without a readable image is never predicted
        rows = [self.classnames.index(kept.classnames[c]) for c in probe.classes_]
        weight[rows], bias[rows] = torch.as_tensor(probe.coef_).float(), torch.as_tensor(probe.intercept_).float()
        model.set_head(weight, self.classnames, bias, self.templates)

    def _prepare_model(self) -> None:
        super()._prepare_model()
        contrastive = self.config.method == "flyp"
        frozen = [self.model.head] if contrastive else [self.model.text_tower]
        for module in frozen:
            module.requires_grad_(False)
        if not contrastive:  # the temperature only scales the contrastive loss; the head carries its own scale
            for param in (self.model.logit_scale, self.model.logit_bias):
                if param is not None:
                    param.requires_grad_(False)

    def _build_step(self) -> TrainStep:
        if self.config.method == "flyp":
            return super()._build_step()
        config = self.config
        return ClassifierStep(self.model, self.loss_fn, config.precision, config.accum_steps, config.grad_clip,
                              self.info)

    def _targets(self, batch: dict[str, Any]) -> torch.Tensor:
        if self.config.method == "flyp":
            return batch["tokens"]
        return torch.tensor([self.class_index[key] for key in batch["keys"]])

    def _validation(self, eval_transform: EvalTransform) -> Callable | None:
        if not self.config.val_data:
            return None
        if not self.info.is_main:
            return lambda model, device: {}  # rank 0 validates; the others keep the call schedule
        return HeadTop1(self.config, eval_transform, self.classnames)

    def _refresh_head(self) -> None:
        """FLYP classifies with its own text tower: the head is the zero-shot classifier of the model as it is."""
        if self.config.method != "flyp":
            return
        model = self.model
        if self.step_fn.master is not None:  # bf16 weights: the head of the fp32 masters the checkpoint holds
            model = CLIP(copy.deepcopy(self.model.config), pretrained_text=False).to(self.info.device)
            model.load_state_dict(self.step_fn.fp32_state_dict())
        self.head_fp32 = zero_shot_head(model, self.tokenizer, self.classnames, self.templates)
        with torch.no_grad():
            self.model.head.weight.copy_(self.head_fp32)

    def _validate(self) -> dict[str, float]:
        self._refresh_head()
        return super()._validate()

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        self._refresh_head()
        weights = super()._weights_to_save()
        if self.head_fp32 is not None:
            weights["head.weight"] = self.head_fp32.cpu().contiguous()
        return weights


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the training summary with the class names and method."""
    config.validate_finetune()
    derived, classnames = write_training_table(config)
    config = dataclasses.replace(config, **derived)
    config.validate()
    run = FinetuneRun(config, classnames)
    started = time.perf_counter()
    run.loop()
    return {**run.finish(started), "method": config.method, "classes": len(classnames)}
