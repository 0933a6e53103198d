"""Train a smaller CLIP-style byte-level BPE vocab, written in OpenAI's vocab-file format."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from clipforge.errors import TokenizerError
from clipforge.text.tokenizer import (
    DEFAULT_CONTEXT_LENGTH,
    SPECIAL_TOKENS,
    CLIPTokenizer,
    PathLike,
    _pattern,
    bytes_to_unicode,
    normalize,
    write_merges,
)

# 256 byte symbols, the same with "</w>", and SOT/EOT are in every vocab besides the merges.
FIXED_TOKENS = 2 * 256 + len(SPECIAL_TOKENS)


def _byte_words(texts: Iterable[str]) -> Iterator[str]:
    # Pre-tokenise in Python exactly as CLIPTokenizer does, map bytes to their symbols, and join
    # with spaces: no byte symbol is whitespace, so the trainer's whitespace split recovers the words.
    pat = _pattern(SPECIAL_TOKENS)
    table = bytes_to_unicode()
    specials = set(SPECIAL_TOKENS)
    for text in texts:
        words = [w for w in pat.findall(normalize(text)) if w not in specials]
        yield " ".join("".join(table[b] for b in w.encode("utf-8")) for w in words)


def consistent_merges(merges: Iterable[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """First `limit` merges whose parts are known when they apply and whose result is new."""
    base = list(bytes_to_unicode().values())
    known = set(base) | {b + "</w>" for b in base}
    kept: list[tuple[str, str]] = []
    for a, b in merges:
        if len(kept) == limit:
            break
        # A merge rebuilding an existing token (e.g. "ab"+"c" after "a"+"bc") would give two ids
        # one string; dropping it keeps ids unique and EOT the highest id.
        if a in known and b in known and a + b not in known:
            kept.append((a, b))
            known.add(a + b)
    return kept


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    out_path: PathLike,
    min_frequency: int = 2,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
) -> CLIPTokenizer:
    """Train a BPE of at most `vocab_size` ids (512 bytes + merges + SOT/EOT), write it, load it."""
    num_merges = vocab_size - FIXED_TOKENS
    if num_merges < 0:
        raise TokenizerError(f"vocab_size must be at least {FIXED_TOKENS} (bytes, bytes</w>, SOT, EOT)")
    trainer = trainers.BpeTrainer(
        # The trainer counts the alphabet and the "x</w>" symbols it meets in its size; leave room
        # so that it learns at least `num_merges` merges when the corpus allows.
        vocab_size=vocab_size + 256,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        special_tokens=[],
    )
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(_byte_words(texts), trainer=trainer)
    # Merges come back as ["a", "b"] pairs (or "a b" strings from older `tokenizers`).
    raw = json.loads(tok.to_str())["model"]["merges"]
    learned = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw]
    merges = consistent_merges(learned, num_merges)  # type: ignore[arg-type]
    if len(merges) < num_merges:
        warnings.warn(
            f"the corpus gave only {len(merges)} of {num_merges} merges; vocab has "
            f"{FIXED_TOKENS + len(merges)} ids, not {vocab_size}",
            stacklevel=2,
        )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_merges(out, merges)
    return CLIPTokenizer(out, context_length=context_length)
