"""CLIP text tokenisation: OpenAI-identical BPE tokenizer and BPE training."""

from clipforge.text.bpe_train import train_bpe
from clipforge.text.tokenizer import (
    DEFAULT_CONTEXT_LENGTH,
    OPEN_CLIP_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    CLIPTokenizer,
    TextTooLong,
    bytes_to_unicode,
    default_tokenizer,
    normalize,
    tokenize,
)

__all__ = [
    "CLIPTokenizer",
    "TextTooLong",
    "DEFAULT_CONTEXT_LENGTH",
    "OPEN_CLIP_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "bytes_to_unicode",
    "default_tokenizer",
    "normalize",
    "tokenize",
    "train_bpe",
]
