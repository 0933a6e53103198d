"""CLIP's byte-level BPE tokenizer: OpenAI-identical ids, with the BPE itself run in Rust."""

from __future__ import annotations

import gzip
import html
import json
import os
import re
import unicodedata
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Iterable, Sequence, Union

import ftfy
import numpy as np
import regex
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from clipforge.errors import TextTooLong, TokenizerError
from clipforge.text.base import DEFAULT_CONTEXT_LENGTH

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
MAX_MERGES = 49152 - 256 - 2  # OpenAI reads lines[1:49152-256-2+1] of the vocab file
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # OpenAI CLIP and Hugging Face
OPEN_CLIP_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")  # open_clip's spelling, same ids
VOCAB_FILE = "bpe_vocab.txt.gz"
# Not "tokenizer.json": transformers would take a file of that name for its own fast-tokenizer format.
CONFIG_FILE = "clipforge_tokenizer.json"
_HEADER = "#version: 0.2"

# Word cache size: OpenAI's is unbounded; past this many words we start a fresh one.
_CACHE_LIMIT = 200_000

# ftfy.fix_text is the slow part of tokenising, so it is skipped where it provably returns its
# input (tests/test_tokenizer.py also checks this on random strings). For ASCII every ftfy step
# needs a control character, '\r' (line breaks: whitespace, collapsed anyway) or an HTML entity,
# and neither ftfy nor html.unescape reads an entity from '&' followed by a space.
_ASCII_CONTROL = re.compile(r"[^\t\n\r\x20-\x7e]")


def _is_plain(text: str) -> bool:
    """True where OpenAI's normalisation of `text` reduces to whitespace collapsing and lower()."""
    if not text.isascii() or ("&" in text and "&" in text.replace("& ", "")):
        return False
    return text.isprintable() or not _ASCII_CONTROL.search(text)


def _ftfy_triggers() -> tuple[re.Pattern, re.Pattern] | None:
    # Other text: each step of ftfy 6.3's fix_text changes only text that holds one of the
    # characters below, has mojibake by its own badness regex, or is not NFC. Other ftfy versions
    # get no shortcut, since their steps were not checked.
    if not ftfy.__version__.startswith("6.3."):
        return None
    try:
        from ftfy import chardata
        from ftfy.badness import BADNESS_RE
    except ImportError:
        return None
    codes = set(chardata.CONTROL_CHARS) | set(chardata.LIGATURES) | set(chardata.WIDTH_MAP)
    codes |= set(range(0x80, 0xA0))  # C1 controls (and U+0085, a line break)
    codes |= set(range(0xD800, 0xE000))  # surrogates
    codes |= set(range(0x2018, 0x2020)) | {0x02BC}  # curly quotes
    codes |= {ord("&"), ord("\r"), 0x2028, 0x2029}  # HTML entities, line breaks
    trigger = re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(codes)) + "]")
    return trigger, BADNESS_RE


_FTFY_TRIGGERS = _ftfy_triggers()


def _ftfy_is_identity(text: str) -> bool:
    """True where ftfy.fix_text(text) == text and html.unescape has nothing to do."""
    if _FTFY_TRIGGERS is None:
        return False
    trigger, bad = _FTFY_TRIGGERS
    return not trigger.search(text) and unicodedata.is_normalized("NFC", text) and not bad.search(text)


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def basic_clean(text: str) -> str:
    """ftfy fix, double HTML unescape and strip, as OpenAI's tokenizer does."""
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    """Collapse whitespace runs to one space and strip."""
    # str.split differs from regex \s only on U+001C..U+001F, which ftfy always removes.
    return " ".join(text.split())


def normalize(text: str) -> str:
    """OpenAI's text normalisation: whitespace_clean(basic_clean(text)).lower()."""
    if not (_is_plain(text) or _ftfy_is_identity(text)):
        text = basic_clean(text)
    return whitespace_clean(text).lower()


def _pattern(special_tokens: Sequence[str]) -> regex.Pattern:
    """OpenAI's pre-tokenisation regex (the `regex` module, for its Unicode classes)."""
    specials = "|".join(regex.escape(t) for t in special_tokens)
    return regex.compile(
        specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
    )


def _ascii_pattern(special_tokens: Sequence[str]) -> re.Pattern:
    # The same regex for ASCII text: there \p{L} is [a-z] (after lower()) and \p{N} is [0-9], and the
    # standard library's engine runs it about three times faster.
    specials = "|".join(re.escape(t) for t in special_tokens)
    return re.compile(specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""", re.IGNORECASE)


def read_merges(path: PathLike, num_merges: int | None = None) -> list[tuple[str, str]]:
    """Read merges from a gzip vocab file (header line, then one "a b" merge per line)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    limit = MAX_MERGES if num_merges is None else num_merges
    merges = [tuple(line.split()) for line in lines[1 : limit + 1] if line.strip()]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise TokenizerError(f"{path}: merge lines must hold two symbols, got {bad[0]!r}")
    if num_merges is not None and len(merges) < num_merges:
        raise TokenizerError(f"{path}: holds {len(merges)} merges, {num_merges} requested")
    return merges  # type: ignore[return-value]


def write_merges(path: PathLike, merges: Iterable[tuple[str, str]]) -> None:
    """Write merges in the standard gzip vocab-file format."""
    body = "\n".join([_HEADER] + [f"{a} {b}" for a, b in merges]) + "\n"
    # mtime=0 so that saving the same vocab twice gives identical bytes.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(body.encode("utf-8"))


def standard_vocab(merges: Sequence[tuple[str, str]], special_tokens: Sequence[str]) -> list[str]:
    """OpenAI's id order: bytes, bytes + "</w>", merge results, special tokens."""
    base = list(bytes_to_unicode().values())
    return base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + list(special_tokens)


class CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer (same ids as OpenAI and open_clip), BPE done by `tokenizers`."""

    kind = "clip"  # the name an ONNX export records (text.TOKENIZERS)

    def __init__(
        self,
        vocab_path: PathLike | None = None,
        num_merges: int | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        special_tokens: Sequence[str] = SPECIAL_TOKENS,
    ) -> None:
        """Load a gzip vocab file (default: OpenAI's), reading all merges up to OpenAI's limit."""
        merges = read_merges(vocab_path or DEFAULT_VOCAB_PATH, num_merges)
        vocab = standard_vocab(merges, special_tokens)
        if len(set(vocab)) != len(vocab):
            raise TokenizerError("vocab file has merges with duplicate results; ids would be ambiguous")
        self._setup(dict(zip(vocab, range(len(vocab)))), merges, special_tokens, context_length)

    def _setup(self, encoder: dict[str, int], merges: list, special_tokens: Sequence[str], ctx: int) -> None:
        self.encoder = encoder
        self.decoder = {i: t for t, i in encoder.items()}
        self.merges = merges
        self.special_tokens = tuple(special_tokens)
        self._special_ids = {t: encoder[t] for t in self.special_tokens}
        self._context_length = ctx
        self._pat = _pattern(self.special_tokens)
        self._ascii_pat = _ascii_pattern(self.special_tokens)
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._new_cache()
        bpe = models.BPE(
            encoder, merges, end_of_word_suffix="</w>", continuing_subword_prefix="", fuse_unk=False,
            ignore_merges=False,  # OpenAI always applies merges, even to words present in the vocab
        )
        self._rust = Tokenizer(bpe)
        self._rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included."""
        return len(self.encoder)

    @property
    def sot_token_id(self) -> int:
        """Start-of-text id (49406 for OpenAI's vocab)."""
        return self._special_ids[self.special_tokens[0]]

    @property
    def eot_token_id(self) -> int:
        """End-of-text id (49407 for OpenAI's vocab); CLIP pools the text at its position."""
        return self._special_ids[self.special_tokens[1]]

    @property
    def context_length(self) -> int:
        """Default row length of `__call__`."""
        return self._context_length

    def _new_cache(self) -> None:
        # Seeded like OpenAI's BPE cache, which is what maps a special string in the text to its id.
        self._cache: dict[str, list[int]] = {t: [i] for t, i in self._special_ids.items()}

    def words(self, text: str) -> list[str]:
        """Normalise and pre-tokenise one text as OpenAI does."""
        if _is_plain(text):
            # Whitespace never lies inside a match, so collapsing it cannot change the words.
            return self._ascii_pat.findall(text.lower())
        if _ftfy_is_identity(text):
            return self._pat.findall(text.lower())
        return self._pat.findall(normalize(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, without SOT/EOT."""
        word_lists = [self.words(t) for t in texts]
        # Captions repeat words heavily, so ids are cached per word and only unseen words go to
        # Rust, in one batch; a cache swap by another thread leaves this call's dict intact.
        cache = self._cache
        missing = list({w: None for words in word_lists for w in words if w not in cache})
        if missing:
            # encode_batch_fast skips offset tracking, which ids do not need.
            encode = getattr(self._rust, "encode_batch_fast", self._rust.encode_batch)
            encodings = encode([[w] for w in missing], is_pretokenized=True, add_special_tokens=False)
            cache.update(zip(missing, (e.ids for e in encodings)))
        lookup = cache.__getitem__
        out = [list(chain.from_iterable(map(lookup, words))) for words in word_lists]
        if len(cache) > _CACHE_LIMIT:
            self._new_cache()
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without SOT/EOT."""
        return self.encode_batch([text])[0]

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ids as OpenAI decodes it ("</w>" -> " "); optionally drop SOT/EOT and padding."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            if self.eot_token_id in ids:
                ids = ids[: ids.index(self.eot_token_id)]  # padding (id 0) follows EOT
            ids = [i for i in ids if i not in (self.sot_token_id, self.eot_token_id)]
        text = "".join(self.decoder[i] for i in ids)
        data = bytearray(self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = False
    ) -> torch.LongTensor:
        """Tokenise to a [N, context_length] LongTensor: SOT, ids, EOT, then zero padding."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self._context_length
        if ctx < 2:
            raise TokenizerError(f"context_length must be at least 2 (SOT and EOT), got {ctx}")
        rows = self.encode_batch(texts)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        for i in np.flatnonzero(lengths > ctx - 2).tolist():
            if not truncate:
                text = texts[i]
                shown = text if len(text) <= 80 else text[:80] + "..."
                raise TextTooLong(
                    f"text {shown!r} is {len(rows[i]) + 2} tokens long with SOT/EOT, more than the "
                    f"context length {ctx}: shorten it, or cut it with truncate=True (CLI: --truncate)"
                )
            rows[i] = rows[i][: ctx - 2]  # open_clip keeps SOT and puts EOT in the last slot
        lengths = np.minimum(lengths, ctx - 2)
        # Scatter all ids at once: row-by-row tensor writes cost more than the tokenising.
        n, total = len(rows), int(lengths.sum())
        out = np.zeros((n, ctx), dtype=np.int64)
        out[:, 0] = self.sot_token_id
        out[np.arange(n), lengths + 1] = self.eot_token_id
        starts = np.cumsum(lengths) - lengths
        cols = np.arange(total) - np.repeat(starts, lengths) + 1
        out[np.repeat(np.arange(n), lengths), cols] = np.fromiter(
            chain.from_iterable(rows), dtype=np.int64, count=total
        )
        return torch.from_numpy(out)

    def save(self, directory: PathLike) -> Path:
        """Write bpe_vocab.txt.gz and a small config so a model directory can carry the tokenizer."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.encoder != dict(zip(standard_vocab(self.merges, self.special_tokens), range(self.vocab_size))):
            raise TokenizerError("this vocab's ids do not follow the standard order; use save_hf instead")
        write_merges(d / VOCAB_FILE, self.merges)
        config = {"tokenizer_class": "CLIPTokenizer", "vocab_file": VOCAB_FILE, "num_merges": len(self.merges),
                  "context_length": self._context_length, "special_tokens": list(self.special_tokens),
                  "vocab_size": self.vocab_size}
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return d

    def save_portable(self, directory: PathLike) -> dict[str, str]:
        """Write tokenizer.json (one HF `tokenizers` pipeline, for runtimes without clipforge); its name and caveats."""
        from clipforge.text.fast import PORTABLE_NOTE, TOKENIZER_JSON, save_tokenizer_json

        save_tokenizer_json(self, Path(directory))
        return {"file": TOKENIZER_JSON, "file_note": PORTABLE_NOTE}

    @classmethod
    def from_directory(cls, directory: PathLike, context_length: int | None = None) -> "CLIPTokenizer":
        """Load a tokenizer written by `save` (with its saved context length unless one is given)."""
        d = Path(directory)
        config = json.loads((d / CONFIG_FILE).read_text(encoding="utf-8"))
        return cls(
            d / config.get("vocab_file", VOCAB_FILE),
            num_merges=config.get("num_merges"),
            context_length=context_length or config.get("context_length", DEFAULT_CONTEXT_LENGTH),
            special_tokens=tuple(config.get("special_tokens", SPECIAL_TOKENS)),
        )

    @classmethod
    def from_model_directory(
        cls, directory: PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> "CLIPTokenizer | None":
        """The tokenizer files a model folder carries (clipforge's own, or HF's vocab.json + merges.txt), if any."""
        d = Path(directory)
        if (d / CONFIG_FILE).is_file():
            return cls.from_directory(d)  # its own context length, saved with it
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return cls.from_hf_files(d / "vocab.json", d / "merges.txt", context_length=context_length)
        return None

    @classmethod
    def from_hf_files(
        cls, vocab_json: PathLike, merges_txt: PathLike, context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> "CLIPTokenizer":
        """Build from a Hugging Face CLIPTokenizer's vocab.json and merges.txt, keeping its ids."""
        encoder = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise TokenizerError(f"{merges_txt}: merge lines must hold two symbols")
        missing = [t for t in SPECIAL_TOKENS if t not in encoder]
        if missing:
            raise TokenizerError(f"{vocab_json} lacks special tokens {missing}")
        # The ids are taken from vocab.json as they stand; when they follow OpenAI's order (they
        # do for OpenAI's checkpoints) this is the same tokenizer as the packaged one.
        self = cls.__new__(cls)
        self._setup(encoder, merges, SPECIAL_TOKENS, context_length)  # type: ignore[arg-type]
        return self

    def save_hf(self, directory: PathLike) -> Path:
        """Write vocab.json, merges.txt and configs that transformers.CLIPTokenizer loads."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        sot, eot = self.special_tokens
        if (sot, eot) != SPECIAL_TOKENS:
            raise TokenizerError(f"Hugging Face's CLIPTokenizer expects special tokens {SPECIAL_TOKENS}")
        vocab = dict(sorted(self.encoder.items(), key=lambda kv: kv[1]))
        (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join([_HEADER] + [f"{a} {b}" for a, b in self.merges]) + "\n"
        (d / "merges.txt").write_text(merges, encoding="utf-8")
        specials = {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": self._context_length,
                  "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **specials}
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (d / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
        return d


@lru_cache(maxsize=1)
def default_tokenizer() -> CLIPTokenizer:
    """The packaged OpenAI tokenizer, built once on first use."""
    return CLIPTokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> torch.LongTensor:
    """Tokenise with the default OpenAI tokenizer to a [N, context_length] LongTensor."""
    return default_tokenizer()(texts, context_length=context_length, truncate=truncate)
