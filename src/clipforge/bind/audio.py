"""Binding an audio tower: the student (the CLIP, frozen, with a fresh audio tower beside its towers) and the
training run that feeds it (image, audio file) pairs: the library trainer with the audio column as the pair input.

The pairs table's rows group by image, as captions do: each image is one sample per epoch, paired with one of its
recordings drawn by the sample's seed (a random 2 s crop with SpecAugment masks), so a resumed run repeats its
batches. A recording that cannot be decoded is skipped and counted by reason (data.audio.AUDIO_ERROR_REASONS),
as a bad image is.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from clipforge.bind.config import BindConfig
from clipforge.checkpoint.io import save_pretrained
from clipforge.data.audio import AudioColumn, AudioPreprocess, SpecAugment
from clipforge.model.clip import CLIP
from clipforge.model.config import get_audio_config
from clipforge.text.base import Tokenizer
from clipforge.train.config import TrainConfig
from clipforge.train.step import TrainStep
from clipforge.train.trainer import TrainingRun


def write_audio_student(config: BindConfig, original: CLIP, tokenizer: Tokenizer, folder: Path) -> None:
    """The CLIP's image and text towers and temperature, as they are, with a fresh audio tower (seeded)."""
    student_config = dataclasses.replace(original.config, decoder=None, bag_of_words=None, bound_text={},
                                         bound_audio={}, classnames=[], head_templates=[], logit_bias_init=None)
    student = CLIP(student_config, pretrained_text=False)
    kept = {k: v for k, v in original.state_dict().items() if k in student.state_dict()}
    student.load_state_dict(kept)
    torch.manual_seed(config.seed)
    student.bind_audio_tower(config.modality, get_audio_config(config.audio_tower, **config.tower))
    student.preprocess_config = original.preprocess_config
    save_pretrained(student, folder, tokenizer=tokenizer)


class AudioBindingRun(TrainingRun):
    """A training run of a student's audio tower against its frozen image embeddings."""

    def __init__(self, config: TrainConfig, modality: str, max_seconds: float) -> None:
        """`modality`: the student's audio tower (the one the run trains); longer recordings than `max_seconds`
        are skipped."""
        self.modality, self.max_seconds = modality, max_seconds
        super().__init__(config)

    def _prepare_model(self) -> None:
        """As a run prepares its model, and the CLIP's text tower frozen too (the bound model takes it back)."""
        super()._prepare_model()
        self.model.lock_text_tower()

    def _pair_encoder(self) -> AudioColumn:
        """The audio column: files relative to the table's folder -> augmented log-mel clips."""
        preprocess = AudioPreprocess(self.model.config.bound_audio[self.modality], augment=SpecAugment(),
                                     max_seconds=self.max_seconds)
        return AudioColumn(preprocess, Path(self.config.train_data).parent)

    def _build_step(self) -> TrainStep:
        """The contrastive step between the frozen image embeddings and the audio tower's."""
        config = self.config
        return TrainStep(self.model, self.loss_fn, config.precision, config.accum_steps, config.grad_clip, self.info,
                         modality=self.modality)
