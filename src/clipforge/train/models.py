"""The model and tokenizer a training run starts from (fresh, from a checkpoint, or resumed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.checkpoint.io import get_tokenizer, load
from clipforge.model import CLIP, create_model, list_models
from clipforge.model.minilm import WordPieceTokenizer
from clipforge.text import CLIPTokenizer
from clipforge.train.config import TrainConfig
from clipforge.errors import TrainingError


def build_model_and_tokenizer(config: TrainConfig, resume_from: Path | None) -> tuple[CLIP, Any]:
    """fp32 model + its tokenizer: the resume checkpoint's weights, a checkpoint, or a fresh registry model."""
    overrides = dict(config.model_overrides)
    if config.text_tower != "clip":
        overrides["text_tower"] = config.text_tower
    if resume_from is not None:
        model, _ = load(resume_from)
        return model, get_tokenizer(resume_from)
    if config.bpe_vocab:
        context = overrides.get("text.context_length")
        tokenizer = CLIPTokenizer(config.bpe_vocab, **({"context_length": context} if context else {}))
        overrides["text.vocab_size"] = tokenizer.vocab_size
        if config.model not in list_models():
            raise TrainingError("bpe_vocab needs a registry model (a new text tower), not a checkpoint")
        model = create_model(config.model, seed=config.seed, **overrides)
        tokenizer = CLIPTokenizer(config.bpe_vocab, context_length=model.context_length)
        return model, tokenizer
    if config.model in list_models():
        model = create_model(config.model, seed=config.seed, **overrides)
    else:
        model, _ = load(config.model, **overrides)
    if model.config.text_tower == "minilm":
        return model, WordPieceTokenizer(context_length=model.context_length)
    return model, get_tokenizer(config.model if config.model not in list_models() else None,
                                context_length=model.context_length)
