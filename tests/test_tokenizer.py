"""CLIPTokenizer: id parity with open_clip/OpenAI, padding rules, save/load, HF interop, BPE training."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import random
from pathlib import Path
from types import ModuleType

import ftfy
import pytest
import regex
import torch

from clipforge.text import (
    OPEN_CLIP_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    CLIPTokenizer,
    default_tokenizer,
    tokenize,
    train_bpe,
)
from clipforge.text import tokenizer as tokmod

# ---------------------------------------------------------------------------------------------
# Reference tokenizers


def _load_open_clip_tokenizer_module() -> ModuleType:
    # Importing open_clip itself would pull in timm and more; its tokenizer.py stands alone.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed: no reference tokenizer to compare against")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    if not path.is_file():
        pytest.skip(f"open_clip is installed but has no {path}")
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    mod_spec = importlib.util.spec_from_file_location("_open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    # The module turns Rust parallelism off for the whole process at import; undo that.
    if parallel is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = parallel
    return module


@pytest.fixture(scope="module")
def open_clip_reference():
    """open_clip 3.x SimpleTokenizer (special strings <start_of_text>/<end_of_text>)."""
    return _load_open_clip_tokenizer_module().SimpleTokenizer()


@pytest.fixture(scope="module")
def openai_reference():
    """OpenAI's original simple_tokenizer: open_clip's, with OpenAI's special strings and regex."""
    ref = _load_open_clip_tokenizer_module().SimpleTokenizer()
    for old, new in zip(OPEN_CLIP_SPECIAL_TOKENS, SPECIAL_TOKENS):
        i = ref.encoder.pop(old)
        ref.encoder[new] = i
        ref.decoder[i] = new
        del ref.cache[old]
        ref.cache[new] = new
    ref.pat = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    return ref


# ---------------------------------------------------------------------------------------------
# Deterministic varied corpus

WORDS = "a photo of the dog cat Rocket launching into SPACE running quick brown fox jumps".split()
SCRIPTS = [
    "東京タワーの夜景", "北京欢迎你", "서울특별시", "Привет, мир", "Ελληνικά γράμματα", "مرحبا بالعالم",
    "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Ñandú pingüino", "Straße", "İstanbul", "ǅemal", "ﬁne ﬂow",
    "ＦＵＬＬ　ＷＩＤＴＨ", "ｶﾀｶﾅ", "e\u0301te\u0301", "Å", "ﬀ", "x²³", "½ ¾", "Ⅻ", "٣٤٥", "௧௨", "ſ", "'ſ",
]
EMOJI = [
    "🐱", "🐶🐕", "👍🏽", "👩🏿‍🚀", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵🇫🇷", "1️⃣", "❤️", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "🤷‍♀️", "😀😃😄",
]
HTML = [
    "&amp;", "&lt;b&gt;", "&#39;", "&nbsp;", "&amp;amp;", "&amp;lt;", "&quot;hi&quot;", "&#x1F600;",
    "&hellip;", "AT&T", "&copy 2020", "&EACUTE;", "&#0;", "&#128;", "&lt;|endoftext|&gt;", "&",
]
URLS = [
    "https://example.com/a/b?c=1&d=2#frag", "www.Example.org", "mailto:someone@example.com",
    "http://xn--bcher-kva.example/ö", "ftp://files.example.net/file_v2.tar.gz",
]
MOJIBAKE = [
    "cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "donâ€™t", "ÐŸÑ€Ð¸Ð²ÐµÑ‚", "Ã\xa0 la", "Ã©Ã¨", "â€¦", "Ãƒ©",
    "\x93smart\x94", "voilÃ le",
]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2028", "\u2029", "\u3000", "\u200b", "\x0b",
          "\x0c", "\x85", "\x1c", "\x1f", "\u2009", "\ufeff"]
SPECIALS = [
    "<|startoftext|>", "<|endoftext|>", "<start_of_text>", "<end_of_text>", "<|ENDOFTEXT|>",
    "<End_Of_Text>", "!<|endoftext|>", "<<|startoftext|>>", "x<|endoftext|>y", "<|endoftext|><|endoftext|>",
]
PUNCT = list(".,!?;:'\"()[]{}<>-_/\\|@#$%^*~`+=") + ["...", "--", "'s", "'T", "'ll", "'RE", "’", "“", "”"]
CONTRACTIONS = ["don't", "it's", "I'm", "we've", "they'd", "you'll", "can’t", "O'Neil", "rock'n'roll"]


def _random_codepoints(rng: random.Random) -> str:
    blocks = [(0x20, 0x7F), (0x80, 0x250), (0x370, 0x530), (0x590, 0x700), (0x900, 0xE80),
              (0x2000, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x4F00), (0xAC00, 0xAD00), (0xFB00, 0xFB50),
              (0xFE00, 0xFFFF), (0x1F300, 0x1FAFF), (0xE0000, 0xE0080), (0x1D400, 0x1D7FF)]
    out = []
    for _ in range(rng.randint(1, 12)):
        lo, hi = rng.choice(blocks)
        out.append(chr(rng.randrange(lo, hi)))
    return "".join(out)


def _fragment(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.30:
        w = rng.choice(WORDS)
        return rng.choice([w, w.upper(), w.capitalize(), w.swapcase()])
    pools = [SCRIPTS, EMOJI, HTML, URLS, MOJIBAKE, SPECIALS, PUNCT, CONTRACTIONS]
    if kind < 0.85:
        return rng.choice(rng.choice(pools))
    if kind < 0.93:
        return str(rng.choice([rng.randint(0, 10**9), rng.random() * 1e4, -rng.randint(0, 99)]))
    return _random_codepoints(rng)


def make_corpus(n: int = 10_000, seed: int = 1234) -> list[str]:
    """n varied strings, always the same ones."""
    rng = random.Random(seed)
    out = ["", " ", "\n\t ", "a", "A photo of a dog.", "<|startoftext|>", "<|endoftext|>", "&amp;amp;"]
    while len(out) < n:
        parts = [_fragment(rng) for _ in range(rng.choice([1, 2, 3, 5, 8, 13]))]
        text = parts[0]
        for p in parts[1:]:
            text += (rng.choice(SPACES) if rng.random() < 0.3 else " ") + p if rng.random() < 0.85 else p
        if rng.random() < 0.1:
            text = rng.choice(SPACES) + text + rng.choice(SPACES)
        out.append(text)
    # Over-long texts: the truncation path (and the error path) needs them.
    for i in range(40):
        rng2 = random.Random(i)
        out.append(" ".join(_fragment(rng2) for _ in range(40 + 10 * i)))
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return default_tokenizer()


# ---------------------------------------------------------------------------------------------
# (a) parity with the reference tokenizers


def test_vocab_layout(tok: CLIPTokenizer) -> None:
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (49406, 49407)
    assert tok.context_length == 77
    assert tok.eot_token_id == max(tok.encoder.values())


@pytest.mark.parity
def test_parity_openai(tok: CLIPTokenizer, openai_reference, corpus: list[str]) -> None:
    ours = tok.encode_batch(corpus)
    for text, ids in zip(corpus, ours):
        assert ids == openai_reference.encode(text), repr(text)


@pytest.mark.parity
def test_parity_open_clip(open_clip_reference, corpus: list[str]) -> None:
    tok = CLIPTokenizer(special_tokens=OPEN_CLIP_SPECIAL_TOKENS)
    # open_clip's __call__ truncates over-long texts by default (EOT in the last slot).
    expected = open_clip_reference(corpus, context_length=77)
    assert torch.equal(tok(corpus, truncate=True), expected)
    short = [t for t in corpus if len(t) < 60][:500]
    assert torch.equal(tok(short, context_length=16, truncate=True), open_clip_reference(short, 16))


@pytest.mark.parity
def test_decode_matches_reference(tok: CLIPTokenizer, openai_reference, corpus: list[str]) -> None:
    for text in corpus[:2000]:
        ids = tok.encode(text)
        assert tok.decode(ids) == openai_reference.decode(ids), repr(text)


def test_special_strings_map_to_special_ids(tok: CLIPTokenizer) -> None:
    assert tok.encode("a <|endoftext|> b") == tok.encode("a") + [49407] + tok.encode("b")
    assert tok.encode("<|STARTOFTEXT|>") == [49406]
    assert 49407 not in tok.encode("!<|endoftext|>")  # the punctuation run swallows the "<|"


# ---------------------------------------------------------------------------------------------
# ftfy shortcut


def _slow_normalize(text: str) -> str:
    return tokmod.whitespace_clean(tokmod.basic_clean(text)).lower()


def test_ftfy_shortcut_is_exact() -> None:
    rng = random.Random(7)
    ascii_alphabet = [chr(c) for c in range(0x20, 0x7F)] + ["\t", "\n", "\r", "\r\n", "\x0b", "\x1b"]
    tricky = ["'", '"', "<", ">", ";", "#", "\\", "[0m", "Ã", "...", "& ", "&amp;", "&lt", "&#39;", "amp;"]
    plain = 0
    for _ in range(20_000):
        text = "".join(rng.choice(ascii_alphabet + tricky) for _ in range(rng.randint(0, 40)))
        if tokmod._is_plain(text):
            plain += 1
            if "\r" not in text:
                assert ftfy.fix_text(text) == text, repr(text)
        assert tokmod.normalize(text) == _slow_normalize(text), repr(text)
    assert plain > 1000
    pools = SCRIPTS + EMOJI + MOJIBAKE + SPACES + PUNCT + WORDS + ["é", "ü", "Ø", "×", "°", "€", "µ", "»"]
    skipped = 0
    for _ in range(20_000):
        parts = [rng.choice(pools) if rng.random() < 0.8 else _random_codepoints(rng) for _ in range(rng.randint(1, 6))]
        text = "".join(parts)
        if tokmod._ftfy_is_identity(text):
            skipped += 1
            assert ftfy.fix_text(text) == text, repr(text)
        assert tokmod.normalize(text) == _slow_normalize(text), repr(text)
    if tokmod._FTFY_TRIGGERS is not None:
        assert skipped > 1000  # the shortcut does get used


# ---------------------------------------------------------------------------------------------
# (b), (c) context length


def test_too_long_raises(tok: CLIPTokenizer) -> None:
    text = "dog " * 100
    with pytest.raises(ValueError) as info:
        tok(["short", text])
    message = str(info.value)
    assert "102" in message and "77" in message and "dog dog" in message
    assert len(message) < 300  # the text is shortened
    with pytest.raises(ValueError, match="102"):
        tokenize(text)


def test_truncate_puts_eot_last(tok: CLIPTokenizer) -> None:
    out = tok(["dog " * 100, "cat"], truncate=True)
    assert out.shape == (2, 77) and out.dtype == torch.long
    assert out[0, 0] == 49406 and out[0, -1] == 49407
    assert (out[0, 1:-1] == tok.encode("dog")[0]).all()
    assert out[1, :3].tolist() == [49406, tok.encode("cat")[0], 49407] and (out[1, 3:] == 0).all()
    exact = "dog " * 75  # exactly fills 77 with SOT/EOT: no error
    assert tok(exact)[0, -1] == 49407


def test_call_ids_and_shapes(tok: CLIPTokenizer) -> None:
    # OpenAI's ids: a 320, photo 1125, of 539, dog 1929, "." 269; start 49406, end 49407, then zero padding.
    photo = tokenize("a photo of a dog.")
    assert photo.shape == (1, 77) and photo.dtype == torch.long
    assert photo[0, :8].tolist() == [49406, 320, 1125, 539, 320, 1929, 269, 49407] and not photo[0, 8:].any()
    assert tok(["a", "b", "c"], context_length=8).tolist() == [[49406, 320 + i, 49407, 0, 0, 0, 0, 0] for i in range(3)]
    assert tok([]).shape == (0, 77)
    assert tok("").tolist() == [[49406, 49407] + [0] * 75]
    assert default_tokenizer() is default_tokenizer()  # built once
    assert torch.equal(tokenize(["a photo of a dog.", "b"]), default_tokenizer()(["a photo of a dog.", "b"]))


def test_decode_skip_special(tok: CLIPTokenizer) -> None:
    row = tok("A photo of a dog!")[0]
    assert tok.decode(row, skip_special_tokens=True) == "a photo of a dog ! "
    assert tok.decode(row).startswith("<|startoftext|>a photo")


# ---------------------------------------------------------------------------------------------
# (d) fixtures


@pytest.mark.golden
def test_fixture_tokens(tok: CLIPTokenizer, reference) -> None:
    expected = reference.expected()["tokens"]
    assert torch.equal(tok(reference.captions, context_length=expected.shape[1]), expected)


# ---------------------------------------------------------------------------------------------
# save / load, Hugging Face files

ORDINARY = ["a photo of a dog.", "A Rocket launching into SPACE!!", "it's 42 degrees, isn't it?",
            "café crème brûlée", "東京の夜景", "🐱 cat", "multiple   spaces\tand\nlines", ""]


def test_save_and_from_directory(tok: CLIPTokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    assert (tmp_path / "bpe_vocab.txt.gz").is_file()
    loaded = CLIPTokenizer.from_directory(tmp_path)
    assert loaded.encoder == tok.encoder and loaded.merges == tok.merges
    assert torch.equal(loaded(ORDINARY), tok(ORDINARY))
    with gzip.open(tmp_path / "bpe_vocab.txt.gz", "rt", encoding="utf-8") as f:
        assert len(f.read().strip().split("\n")) == 1 + 48894


def test_short_context_config_round_trip(tmp_path: Path) -> None:
    CLIPTokenizer(context_length=32).save(tmp_path)
    assert CLIPTokenizer.from_directory(tmp_path)("dog").shape == (1, 32)


@pytest.mark.parity
def test_save_hf_loads_in_transformers(tok: CLIPTokenizer, tmp_path: Path) -> None:
    import transformers  # the test extra: when it is missing this test fails (imported here: slow to import)

    tok.save_hf(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    for text in ORDINARY:
        assert hf(text)["input_ids"] == [49406] + tok.encode(text) + [49407], repr(text)
    back = CLIPTokenizer.from_hf_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert back.encoder == tok.encoder and back.merges == tok.merges


def test_from_hf_files_keeps_vocab_ids(tok: CLIPTokenizer, tmp_path: Path) -> None:
    tok.save_hf(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    dog, cat = vocab["dog</w>"], vocab["cat</w>"]
    vocab["dog</w>"], vocab["cat</w>"] = cat, dog
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    swapped = CLIPTokenizer.from_hf_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert swapped.encode("dog cat") == [cat, dog]
    assert swapped.decode([cat, dog]) == "dog cat "


# ---------------------------------------------------------------------------------------------
# (f) BPE training


def _synthetic_corpus(n: int = 3000) -> list[str]:
    # Pseudo-words from random syllables with Zipf-like frequencies: enough distinct material for
    # several hundred merges, with some words frequent enough to become single tokens.
    rng = random.Random(3)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["sh", "th", "ng", "x"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    lexicon[:4] = ["the", "happy", "dog", "a"]
    weights = [1 / (i + 1) for i in range(len(lexicon))]
    texts = []
    for _ in range(n):
        words = rng.choices(lexicon, weights, k=rng.randint(3, 12))
        words = [w.capitalize() if rng.random() < 0.1 else w for w in words]
        texts.append(" ".join(words) + rng.choice([".", "!", "", f" {rng.randint(0, 99)}"]))
    return texts


def test_train_bpe(tmp_path: Path) -> None:
    texts = _synthetic_corpus()
    out = tmp_path / "small_vocab.txt.gz"
    trained = train_bpe(texts, vocab_size=1000, out_path=out)
    reloaded = CLIPTokenizer(out)
    assert reloaded.vocab_size == trained.vocab_size == 1000
    assert reloaded.eot_token_id == 999 == max(reloaded.encoder.values())
    assert reloaded.sot_token_id == 998
    # Every merge's parts exist before it applies, and results are new tokens.
    known = set(list(reloaded.encoder)[:512])
    for a, b in reloaded.merges:
        assert a in known and b in known and a + b not in known
        known.add(a + b)
    for text in texts[:200] + ["a happy dog near the river.", "naïve café 🐱 ΑΒΓ", ""]:
        ids = reloaded.encode(text)
        assert reloaded.decode(ids) == "".join(w + " " for w in reloaded.words(text)), repr(text)
    assert reloaded.encode("dog <|endoftext|>")[-1] == 999
    assert len(reloaded.encode("the happy dog")) == 3  # frequent words became single tokens
    rows = reloaded(texts[:4])
    assert rows.shape == (4, 77) and int(rows.max()) == 999


def test_a_text_over_the_context_is_refused_with_the_way_to_cut_it():
    from clipforge.text import TextTooLong

    with pytest.raises(TextTooLong, match=r"is 12 tokens long.*context length 10.*truncate=True \(CLI: --truncate\)"):
        tokenize(["a " * 10], context_length=10)
    assert tokenize(["a " * 10], context_length=10, truncate=True).shape == (1, 10)


def _random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces = ["dog", "Cat", "photo", "a", "the", "don't", "it’s", "“quoted”", "naïve", "café", "東京", "😀", "🐱",
              "42", "3.14", "x2", "!!", "...", "—", "-", "(", ")", "#tag", "@user", "e\u0301", "Ω", "ß", "I'M"]
    spaces = [" ", "  ", "\t", "\n", ""]
    return ["".join(rng.choice(pieces) + rng.choice(spaces) for _ in range(rng.randint(0, 30))) for _ in range(count)]


@pytest.mark.parametrize("vocab", ["openai", "trained"])
@pytest.mark.parity
def test_tokenizer_json_gives_clipforge_ids_for_clean_text(vocab, tmp_path):
    from tokenizers import Tokenizer

    from clipforge.text.fast import save_tokenizer_json

    texts = _random_texts(1500, seed=1) + ["", "   ", "a " * 100, "<|endoftext|> marks", "Hello, World! It's 2024."]
    if vocab == "openai":
        tok = CLIPTokenizer(context_length=40)
    else:
        tok = train_bpe(texts * 3, 700, tmp_path / "small.txt.gz")
        assert tok.vocab_size <= 700
    fast = Tokenizer.from_file(str(save_tokenizer_json(tok, tmp_path)))
    assert [e.ids for e in fast.encode_batch(texts)] == tok(texts, truncate=True).tolist()
