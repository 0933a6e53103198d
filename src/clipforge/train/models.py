"""The model and tokenizer a training run starts from (fresh, from a checkpoint, or resumed)."""
from __future__ import annotations

from pathlib import Path

from clipforge.checkpoint.io import get_tokenizer, load
from clipforge.errors import TrainingError
from clipforge.loss import LOSSES
from clipforge.model import CLIP, create_model, get_model_config, list_models
from clipforge.model.towers import tokenizer_for
from clipforge.text import CLIPTokenizer
from clipforge.text.base import Tokenizer
from clipforge.train.config import TrainConfig


def build_model_and_tokenizer(config: TrainConfig, resume_from: Path | None) -> tuple[CLIP, Tokenizer]:
    """fp32 model + its tokenizer: the resume checkpoint's weights, a checkpoint, or a fresh registry model."""
    if resume_from is not None:
        model, _ = load(resume_from)
        return model, get_tokenizer(resume_from)
    overrides = dict(config.model_overrides)
    if config.text_tower != "clip":
        overrides["text_tower"] = config.text_tower
    if config.model not in list_models():
        if config.bpe_vocab:
            raise TrainingError("bpe_vocab needs a registry model (a new text tower), not a checkpoint")
        model, _ = load(config.model, **overrides)
        _fit_to_loss(model, config.loss)
        return model, get_tokenizer(config.model, context_length=model.context_length)
    # The loss's starting point (SigLIP: temperature 10, bias -10) unless the run sets them itself.
    model = _fresh_model(config, {**LOSSES[config.loss].model_overrides, **overrides})
    if config.bpe_vocab:
        return model, CLIPTokenizer(config.bpe_vocab, context_length=model.context_length)
    return model, tokenizer_for(model.config, context_length=model.context_length)


def _fresh_model(config: TrainConfig, overrides: dict) -> CLIP:
    """A registry model; a BPE vocab of its own sets the text tower's vocabulary size."""
    if config.bpe_vocab:
        context = overrides.get("text.context_length")
        tokenizer = CLIPTokenizer(config.bpe_vocab, **({"context_length": context} if context else {}))
        overrides["text.vocab_size"] = tokenizer.vocab_size
        decoder = overrides["decoder"] if "decoder" in overrides else get_model_config(config.model).to_dict().get(
            "decoder")
        if decoder:  # a captioning decoder writes the text tower's ids
            overrides["decoder"] = {**decoder, "vocab_size": tokenizer.vocab_size}
    return create_model(config.model, seed=config.seed, **overrides)


def _fit_to_loss(model: CLIP, loss: str) -> None:
    """A checkpoint trained with another loss gets what this one needs (SigLIP's logit bias, at its start value)."""
    bias = LOSSES[loss].model_overrides.get("logit_bias_init")
    if bias is not None and model.logit_bias is None:
        model.set_logit_bias(bias)
    elif bias is None and model.logit_bias is not None:
        raise TrainingError(f"{loss} loss has no logit bias, but this checkpoint has one (SigLIP-trained): use "
                            "--loss siglip")
