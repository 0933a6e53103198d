"""The CLIP tokenizer as one `tokenizers` pipeline (a tokenizer.json any runtime with HF tokenizers can load).

Same ids as `CLIPTokenizer` for text that ftfy and HTML unescaping leave alone: the pipeline has no step for
ftfy's mojibake repair nor for "&amp;"-style entities, so a client should pass clean text (or run ftfy first).
Rows are padded with id 0 to the context length and cut, keeping SOT and EOT, like `truncate=True`.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from clipforge.text.tokenizer import CLIPTokenizer

TOKENIZER_JSON = "tokenizer.json"
PORTABLE_NOTE = ("HF tokenizers pipeline, same ids as clipforge for clean text: no ftfy (mojibake repair, "
                 "fullwidth forms, Latin ligatures) and no HTML unescaping; rows padded with 0 to context_length "
                 "and cut keeping SOT and EOT")
# OpenAI's pre-tokenisation regex without its special-token branch (added tokens are matched before it).
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def fast_tokenizer(tokenizer: CLIPTokenizer) -> Tokenizer:
    """A `tokenizers.Tokenizer` giving `tokenizer`'s padded [context_length] rows (SOT, ids, EOT, zeros)."""
    fast = Tokenizer(models.BPE(tokenizer.encoder, tokenizer.merges, end_of_word_suffix="</w>",
                                continuing_subword_prefix="", fuse_unk=False, ignore_merges=False))
    # What ftfy does to clean text (NFC, curly quotes made straight), whitespace runs made one space, lower case.
    fast.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(Regex("[\u2018\u2019\u201a\u201b]"), "'"),
        normalizers.Replace(Regex("[\u201c\u201d\u201e\u201f]"), '"'), normalizers.Replace(Regex(r"\s+"), " "),
        normalizers.Strip(), normalizers.Lowercase()])
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),  # keep matches, drop the rest
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    fast.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    sot, eot = tokenizer.special_tokens
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (sot, eot)])
    fast.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, tokenizer.sot_token_id), (eot, tokenizer.eot_token_id)])
    length = tokenizer.context_length
    fast.enable_truncation(max_length=length)  # room for SOT and EOT is kept by the post-processor
    fast.enable_padding(length=length, pad_id=0, pad_token=tokenizer.decoder[0])
    return fast


def save_tokenizer_json(tokenizer: CLIPTokenizer, directory: str | Path) -> Path:
    """Write DIRECTORY/tokenizer.json; returns its path."""
    path = Path(directory) / TOKENIZER_JSON
    fast_tokenizer(tokenizer).save(str(path))
    return path
