"""SigLIP 2's Gemma tokenizer: a repository's HF `tokenizers` file (tokenizer.json), with transformers' ids.

transformers' Siglip2Tokenizer (and the GemmaTokenizerFast SigLIP 2 was converted with) rebuilds its pipeline
around the file's vocabulary and merges: lower case (Siglip2Tokenizer, or do_lower_case), spaces as "▁",
byte-fallback BPE, then the special tokens its tokenizer_config.json asks for (SigLIP 2: EOS appended, no BOS),
padded with the pad id to the context length on the configured side (SigLIP 2: right).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from clipforge.errors import TextTooLong, TokenizerError
from clipforge.text.base import open_clip_clean, record_clean
from clipforge.text.spiece import canonicalize

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# tokenizer classes whose pipeline this reproduces; others keep their own rules (CLIP's files are read elsewhere)
GEMMA_CLASSES = ("Siglip2Tokenizer", "GemmaTokenizer", "GemmaTokenizerFast")


def is_gemma_folder(directory: Path) -> bool:
    """Whether a folder carries a Gemma-family tokenizer.json (SigLIP 2's) with its tokenizer_config.json."""
    config = directory / CONFIG_FILE
    if not (directory / TOKENIZER_FILE).is_file() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("tokenizer_class") in GEMMA_CLASSES
    except json.JSONDecodeError:
        return False


def _pipeline(path: Path, lowercase: bool):
    """The `tokenizers` Tokenizer of `path`, normalised as transformers' class does, without its post-processor."""
    from tokenizers import Tokenizer, normalizers

    tokenizer = Tokenizer.from_file(str(path))
    steps = [normalizers.Lowercase()] if lowercase else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    tokenizer.post_processor = None  # the special tokens are added here, from the config's flags
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class GemmaTokenizer:
    """list[str] -> LongTensor [N, context_length]: (BOS,) ids, (EOS,) then the pad id, as transformers pads."""

    kind = "gemma"  # the name an ONNX export records (text.TOKENIZERS)

    def __init__(self, directory: str | Path, context_length: int = 64, clean: str | None = None) -> None:
        """Read DIRECTORY/tokenizer.json and DIRECTORY/tokenizer_config.json; `clean` "canonicalize" applies
        open_clip's cleaning first (default: what the folder's open_clip config says)."""
        self.directory = Path(directory)
        self.clean = open_clip_clean(self.directory) if clean is None else clean
        settings: dict[str, Any] = json.loads((self.directory / CONFIG_FILE).read_text())
        self.settings = settings
        lowercase = settings.get("tokenizer_class") == "Siglip2Tokenizer" or bool(settings.get("do_lower_case"))
        self._tokenizer = _pipeline(self.directory / TOKENIZER_FILE, lowercase)
        self.context_length = context_length
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.pad_token_id = self._id(settings.get("pad_token", "<pad>"))
        self.eot_token_id = self._id(settings.get("eos_token", "<eos>"))
        self.prefix, self.suffix = self._special_tokens(settings)
        self.pad_left = settings.get("padding_side", "left") == "left"  # transformers' class default: left

    def _special_tokens(self, settings: dict[str, Any]) -> tuple[list[int], list[int]]:
        """(ids before, ids after) a text: the config's add_bos_token / add_eos_token when it has them, else what
        the file's own post-processor adds (transformers reads it the same way)."""
        if "add_bos_token" in settings or "add_eos_token" in settings:
            bos = [self._id(settings.get("bos_token", "<bos>"))] if settings.get("add_bos_token") else []
            return bos, [self.eot_token_id] if settings.get("add_eos_token") else []
        processor = json.loads((self.directory / TOKENIZER_FILE).read_text()).get("post_processor") or {}
        if processor.get("type") != "TemplateProcessing":
            if processor:
                raise TokenizerError(f"{self.directory / TOKENIZER_FILE}: post-processor {processor.get('type')!r} is "
                                     "not supported (TemplateProcessing)")
            return [], []
        template = [next(iter(piece.items())) for piece in processor["single"]]
        split = next(i for i, (kind, _) in enumerate(template) if kind == "Sequence")
        ids = [self._id(value["id"]) if kind == "SpecialToken" else None for kind, value in template]
        return ids[:split], ids[split + 1:]

    def _id(self, token: Any) -> int:
        text = token["content"] if isinstance(token, dict) else str(token)
        found = self._tokenizer.token_to_id(text)
        if found is None:
            raise TokenizerError(f"{self.directory / TOKENIZER_FILE}: special token {text!r} is not in the vocabulary")
        return found

    def encode(self, text: str) -> list[int]:
        """The ids of one text, without special tokens."""
        if self.clean == "canonicalize":  # open_clip's SigLIP 2: lower case, punctuation dropped
            text = canonicalize(text, underscores_as_spaces=True)
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None,
                 truncate: bool = False) -> torch.Tensor:
        """Token ids; a text longer than the row is cut before its special tokens (as transformers) or refused."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        room = length - len(self.prefix) - len(self.suffix)
        if room < 0:
            raise TokenizerError(f"context_length {length} leaves no room for the special tokens")
        out = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > room:
                if not truncate:
                    raise TextTooLong(f"text {text[:80]!r} is {len(ids) + length - room} tokens long with its special "
                                      f"tokens, more than the context length {length}: shorten it, or pass "
                                      "truncate=True (CLI: --truncate)")
                ids = ids[:room]
            ids = torch.tensor([*self.prefix, *ids, *self.suffix], dtype=torch.long)
            if self.pad_left:
                out[row, length - len(ids):] = ids
            else:
                out[row, : len(ids)] = ids
        return out

    def save(self, directory: str | Path) -> Path:
        """Copy tokenizer.json and tokenizer_config.json into a model directory (and open_clip's cleaning)."""
        record_clean(directory, self.clean)
        for name in (TOKENIZER_FILE, CONFIG_FILE):
            target = Path(directory) / name
            if (self.directory / name).resolve() != target.resolve():
                shutil.copyfile(self.directory / name, target)
        return Path(directory)

    def save_portable(self, directory: str | Path) -> dict[str, str]:
        """tokenizer.json is already HF `tokenizers`' own file; the config says which specials and padding."""
        self.save(directory)
        return {"file": TOKENIZER_FILE, "file_note": f"HF tokenizers file; lower-case when {CONFIG_FILE} names "
                "Siglip2Tokenizer or do_lower_case, add BOS/EOS as its add_bos_token/add_eos_token say, pad with "
                "its pad_token to context_length on its padding_side"}

    def save_hf(self, directory: str | Path) -> Path:
        """The same two files are what transformers' Siglip2Tokenizer loads."""
        return self.save(directory)

    @classmethod
    def from_directory(cls, directory: str | Path, context_length: int | None = None) -> "GemmaTokenizer":
        """Load the tokenizer a model directory carries."""
        return cls(directory, context_length=context_length or 64)
