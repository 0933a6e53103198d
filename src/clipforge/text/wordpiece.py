"""MiniLM's WordPiece tokenizer (BERT uncased, run by Rust `tokenizers`) behind clipforge's Tokenizer interface."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer as RustTokenizer

from clipforge.errors import TextTooLong, TokenizerError
from clipforge.text.base import copy_into

TOKENIZER_FILE = "wordpiece_tokenizer.json"


class WordPieceTokenizer:
    """list[str] -> LongTensor [N, context_length]: [CLS] ids [SEP], padded with 0 (BERT's pad id)."""

    kind = "wordpiece"  # the name an ONNX export records (text.TOKENIZERS)

    def __init__(self, path: str | Path, context_length: int = 32) -> None:
        self.path = Path(path)
        self._tokenizer = RustTokenizer.from_file(str(self.path))
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self.context_length = context_length
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.eot_token_id = self._tokenizer.token_to_id("[SEP]")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.Tensor:
        """Token ids; a text longer than the row is cut keeping [SEP] last (as BERT's truncation) or refused."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        if length < 2:
            raise TokenizerError(f"context_length must be at least 2 ([CLS] and [SEP]), got {length}")
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, encoding in enumerate(self._tokenizer.encode_batch(texts)):
            ids = encoding.ids
            if len(ids) > length:
                if not truncate:
                    raise TextTooLong(f"text {texts[row][:80]!r} is {len(ids)} WordPiece tokens long, more than "
                                      f"the context length {length}: shorten it, "
                                      "or pass truncate=True (CLI: --truncate)")
                ids = ids[: length - 1] + [self.eot_token_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def save(self, directory: str | Path) -> Path:
        """Copy the tokenizer file into a model directory."""
        return copy_into(self.path, directory, TOKENIZER_FILE)

    def save_portable(self, directory: str | Path) -> dict[str, str]:
        """The file `save` wrote is already HF `tokenizers` JSON: its name and how to pad."""
        return {"file": TOKENIZER_FILE,
                "file_note": "HF tokenizers WordPiece (BERT uncased); pad with 0 to context_length"}

    @classmethod
    def from_directory(cls, directory: str | Path, context_length: int | None = None) -> "WordPieceTokenizer":
        """Load the tokenizer a model directory carries."""
        return cls(Path(directory) / TOKENIZER_FILE, context_length=context_length or 32)
