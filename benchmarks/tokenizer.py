"""Throughput of clipforge's CLIPTokenizer against open_clip's SimpleTokenizer on varied captions.

Run: PYTHONPATH=src python benchmarks/tokenizer.py [--n 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import statistics
import time
from pathlib import Path
from types import ModuleType

import torch

from clipforge.text.tokenizer import OPEN_CLIP_SPECIAL_TOKENS, CLIPTokenizer

SUBJECTS = "dog cat man woman child bird car bicycle house tree mountain beach city street table pizza".split()
ADJECTIVES = "red small large old young happy wooden bright dark fluffy vintage modern snowy empty".split()
VERBS = "sitting standing running lying walking jumping sleeping parked flying eating".split()
PLACES = "on a bench|in the park|next to a river|at night|under a blue sky|in a kitchen|on the road".split("|")
EXTRAS = [
    "café au lait", "crème brûlée", "naïve façade", "東京の夜景", "北京 天安门", "서울 거리", "Москва зимой",
    "Αθήνα", "القاهرة", "ירושלים", "नई दिल्ली", "กรุงเทพ", "🐱 cat", "👍🏽 thumbs up", "👨‍👩‍👧 family",
    "Tom &amp; Jerry", "5 &lt; 6", "it&#39;s", "rock&nbsp;band", "cafÃ© mojibake", "â€œquotedâ€\x9d",
]


def captions(n: int, seed: int = 0, unicode_share: float = 0.15) -> list[str]:
    """Deterministic captions: mostly ASCII English, a share with Unicode, emoji or HTML entities."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(["a", "the", "two", "A", "The"]), rng.choice(ADJECTIVES), rng.choice(SUBJECTS)]
        words += [rng.choice(VERBS), rng.choice(PLACES)]
        if rng.random() < 0.3:
            words += ["with", str(rng.randint(1, 2024)), rng.choice(SUBJECTS) + "s"]
        if rng.random() < 0.2:
            words += [f"photo #{rng.randint(1, 9999)}", "- stock image,", "HD!"]
        if rng.random() < unicode_share:
            words.insert(rng.randrange(len(words)), rng.choice(EXTRAS))
        text = " ".join(words) + rng.choice([".", "", "!", " ", "..."])
        out.append(text.upper() if rng.random() < 0.05 else text)
    return out


def load_reference() -> ModuleType:
    """open_clip/tokenizer.py loaded by path: importing open_clip would pull in its other deps."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip_torch is not installed; nothing to compare against")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def rates(makers: list, texts: list[str], repeats: int, cold: bool) -> list[float]:
    """Median texts/s of each tokenizer; cold: a new tokenizer (empty caches) for every call."""
    toks = [make() for make in makers]
    for tok in toks:
        tok(texts)  # warm: caches filled, as in a long-running data loader
    times: list[list[float]] = [[] for _ in makers]
    for _ in range(repeats):
        # Interleaved, so that load from other processes hits both tokenizers alike.
        for k, make in enumerate(makers):
            if cold:
                toks[k] = make()  # built outside the timed region
            gc.collect()
            t0 = time.perf_counter()
            toks[k](texts)
            times[k].append(time.perf_counter() - t0)
    return [len(texts) / statistics.median(t) for t in times]


def main() -> None:
    """Print a throughput table for both tokenizers on the same captions."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    ref = load_reference()
    # open_clip's module switches Rust parallelism off at import; keep whatever the user had.
    if parallel is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = parallel

    texts = captions(args.n)
    make_ref = lambda: ref.SimpleTokenizer(context_length=77)  # noqa: E731 (truncates by default)
    make_ours = lambda: CLIPTokenizer(special_tokens=OPEN_CLIP_SPECIAL_TOKENS)  # noqa: E731
    if not torch.equal(make_ref()(texts), make_ours()(texts, truncate=True)):
        raise SystemExit("ids differ from open_clip's; refusing to report a speed")
    ascii_plain = [t for t in texts if t.isascii() and "&" not in t]
    rest = [t for t in texts if not (t.isascii() and "&" not in t)]
    rows = [("all, warm caches", texts, False), ("all, cold caches", texts, True),
            ("ascii only, warm", ascii_plain, False), ("non-ascii or &, warm", rest, False)]
    print(f"{args.n} captions ({len(rest)} with non-ASCII or '&'), median of {args.repeats} runs, "
          f"{os.cpu_count()} CPUs, TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', 'unset')}")
    print(f"| {'subset':<21}| {'texts':>6} | {'open_clip texts/s':>17} | {'clipforge texts/s':>17} | {'ratio':>6} |")
    print(f"|{'-' * 22}|{'-' * 8}|{'-' * 19}|{'-' * 19}|{'-' * 8}|")
    for name, subset, cold in rows:
        r_ref, r_ours = rates([make_ref, lambda: _Truncating(make_ours())], subset, args.repeats, cold)
        print(f"| {name:<21}| {len(subset):>6} | {r_ref:>17,.0f} | {r_ours:>17,.0f} | {r_ours / r_ref:>5.1f}x |")


class _Truncating:
    """Calls CLIPTokenizer with truncate=True, matching open_clip's default."""

    def __init__(self, tok: CLIPTokenizer) -> None:
        self.tok = tok

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tok(texts, truncate=True)

if __name__ == "__main__":
    main()
