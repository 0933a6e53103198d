"""SigLIP's SentencePiece tokenizer (a repository's `spiece.model`), with transformers' SiglipTokenizer's ids.

The text is canonicalised as SigLIP was trained: lower case, ASCII punctuation removed, whitespace runs made one
space; SentencePiece encodes it without its dummy prefix after a leading "▁" (transformers' order); rows end
with EOS and are padded with the pad id (EOS as well, in SigLIP's files) to the context length.
"""
from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Sequence

import torch

from clipforge.errors import MissingDependency, TextTooLong, TokenizerError
from clipforge.text.base import copy_into, open_clip_clean, record_clean

MODEL_FILE = "spiece.model"
UNDERLINE = "\u2581"  # SentencePiece's word-start mark
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize(text: str, underscores_as_spaces: bool = False) -> str:
    """SigLIP's text canonicalisation: lower case, no ASCII punctuation, single spaces, no outer spaces;
    open_clip's (`underscores_as_spaces`) makes underscores spaces first instead of dropping them."""
    if underscores_as_spaces:
        text = text.replace("_", " ")
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCTUATION)).strip()


def _processor(path: Path):
    """A SentencePieceProcessor of `path` with the dummy prefix turned off (as transformers loads it)."""
    try:
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as error:  # protobuf comes with it; both are needed to edit the normaliser
        raise MissingDependency(f"SigLIP's tokenizer needs sentencepiece and protobuf: pip install sentencepiece "
                                f"protobuf ({error})") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return processor


class SentencePieceTokenizer:
    """list[str] -> LongTensor [N, context_length]: ids, EOS, then the pad id (SigLIP's layout)."""

    kind = "sentencepiece"  # the name an ONNX export records (text.TOKENIZERS)

    def __init__(self, path: str | Path, context_length: int = 64, clean: str = "") -> None:
        self.path = Path(path)
        self.clean = clean  # "canonicalize": open_clip's cleaning first (underscores become spaces)
        self._sp = _processor(self.path)
        self.context_length = context_length
        self.vocab_size = self._sp.get_piece_size()
        self.eot_token_id = self._sp.piece_to_id("</s>")
        self.pad_token_id = self.eot_token_id  # SigLIP pads with EOS
        self._unk = "<unk>"
        self._unk_pieces = len(self._sp.encode(self._unk, out_type=str))

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without EOS (transformers' SiglipTokenizer.tokenize, step by step)."""
        if self.clean == "canonicalize":
            text = text.replace("_", " ")
        text = canonicalize(UNDERLINE + text.replace(UNDERLINE, " "))
        # Encoding "<unk>" + text and dropping its pieces keeps SentencePiece from stripping the leading "▁".
        pieces = self._sp.encode(self._unk + text, out_type=str)[self._unk_pieces:]
        if len(pieces) > 1 and pieces[0] == UNDERLINE and pieces[1] in ("</s>", "<unk>"):
            pieces = pieces[1:]
        return [self._sp.piece_to_id(piece) for piece in pieces]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.Tensor:
        """Token ids; a text longer than the row is cut keeping EOS last (as SigLIP's truncation) or refused."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        if length < 1:
            raise TokenizerError(f"context_length must be at least 1 (EOS), got {length}")
        out = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) + 1 > length:
                if not truncate:
                    raise TextTooLong(f"text {text[:80]!r} is {len(ids) + 1} SentencePiece tokens long with EOS, "
                                      f"more than the context length {length}: shorten it, or pass truncate=True "
                                      "(CLI: --truncate)")
                ids = ids[: length - 1]
            out[row, : len(ids) + 1] = torch.tensor([*ids, self.eot_token_id])
        return out

    def save(self, directory: str | Path) -> Path:
        """Copy spiece.model into a model directory (with open_clip's text cleaning, when it applies)."""
        record_clean(directory, self.clean)
        return copy_into(self.path, directory, MODEL_FILE)

    def save_portable(self, directory: str | Path) -> dict[str, str]:
        """spiece.model is SentencePiece's own portable file (no HF tokenizers JSON is written)."""
        self.save(directory)
        return {"file": MODEL_FILE, "file_note": "SentencePiece model; canonicalise (lower case, no ASCII "
                "punctuation, single spaces), encode without the dummy prefix after a leading U+2581, append EOS, "
                "pad with EOS to context_length"}

    def save_hf(self, directory: str | Path) -> Path:
        """spiece.model and the tokenizer_config.json that transformers' SiglipTokenizer loads."""
        self.save(directory)
        config = {"tokenizer_class": "SiglipTokenizer", "model_max_length": self.context_length,
                  "do_lower_case": True, "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        return Path(directory)

    @classmethod
    def from_directory(cls, directory: str | Path, context_length: int | None = None) -> "SentencePieceTokenizer":
        """Load the tokenizer a model directory carries."""
        return cls(Path(directory) / MODEL_FILE, context_length=context_length or 64,
                   clean=open_clip_clean(Path(directory)))
