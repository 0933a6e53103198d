"""CLIP text tokenisation: the Tokenizer interface, OpenAI-identical BPE, MiniLM's WordPiece, SigLIP's
SentencePiece, SigLIP 2's Gemma tokenizer.json, BPE training."""

from clipforge.errors import TextTooLong
from clipforge.text.base import DEFAULT_CONTEXT_LENGTH, OPENAI_VOCAB_SIZE, Tokenizer
from clipforge.text.bpe_train import train_bpe
from clipforge.text.hf_json import GemmaTokenizer
from clipforge.text.spiece import SentencePieceTokenizer
from clipforge.text.tokenizer import (
    OPEN_CLIP_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    CLIPTokenizer,
    bytes_to_unicode,
    default_tokenizer,
    normalize,
    tokenize,
)
from clipforge.text.wordpiece import WordPieceTokenizer

TOKENIZERS = {tokenizer.kind: tokenizer
              for tokenizer in (CLIPTokenizer, WordPieceTokenizer, SentencePieceTokenizer, GemmaTokenizer)}

__all__ = [
    "CLIPTokenizer",
    "DEFAULT_CONTEXT_LENGTH",
    "GemmaTokenizer",
    "OPENAI_VOCAB_SIZE",
    "OPEN_CLIP_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "SentencePieceTokenizer",
    "TOKENIZERS",
    "TextTooLong",
    "Tokenizer",
    "WordPieceTokenizer",
    "bytes_to_unicode",
    "default_tokenizer",
    "normalize",
    "tokenize",
    "train_bpe",
]
