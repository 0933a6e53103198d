"""The binding section's pairs (`clipforge demo --binding 1`): chosen so that the hub can carry the signal.

The demo's CLIP recognises emoji (its training styles) but not Tux Paint's photo stamps (its Tux Paint zero-shot is
near chance), so a recording is paired with the *emoji* pictures of its stamp's concept, not with the stamp: a stamp
joins an emoji concept when its English sentence ("A cow.") or its file name names the concept's label exactly.
Held-out samples: a quarter, rounded down, of each concept's recordings (none of a concept with fewer than
four), by a hash of the file.

Korean names (CLDR, `clipforge data emoji --languages ko`) pair with the training styles' images of the seen
concepts; a fifth of those concepts (by a hash of the key) are held out of the binding for the emergent
Korean -> English retrieval; the held-out styles' images are never trained on.
"""
from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import soundfile

from clipforge.data.audio import decode_audio
from clipforge.errors import DataError, SampleError
from clipforge.evaluate.bound import AudioTable
from clipforge.io import atomic_path

HELD_OUT_RECORDINGS = 0.25
HELD_OUT_CONCEPTS = 0.2


def _share(text: str) -> float:
    """A stable number in [0, 1) for `text` (the held-out draws)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def stamp_concepts(tuxpaint: Path, concepts: Sequence[dict[str, str]]) -> dict[str, str]:
    """Stamp key -> emoji hexcode, for stamps whose sentence or file name is exactly a concept's label."""
    by_label = {c["label"].lower(): c["hexcode"] for c in concepts}
    with open(tuxpaint / "captions.csv", newline="", encoding="utf-8") as handle:
        sentences = {r["key"]: r["caption"] for r in csv.DictReader(handle)}
    found = {}
    for key, sentence in sentences.items():
        noun = re.sub(r"^(a|an|the|some)\s+", "", sentence.lower().strip()).rstrip(" .!?")
        name = re.sub(r"\d+$", "", re.sub(r"[_\-]+", " ", key.lower())).strip()
        for candidate in (noun, name):
            if candidate in by_label:
                found[key] = by_label[candidate]
                break
    return found


@dataclass
class AudioPairs:
    """The audio binding's training pairs file and its held-out and training recordings as audio tables."""

    train_csv: Path
    train: AudioTable
    test: AudioTable
    concepts: int


def resampled(sources: Sequence[str], folder: Path, sample_rate: int) -> dict[str, str]:
    """Each recording decoded once to mono `sample_rate` 16-bit WAV in `folder` (training then reads them without
    resampling: the Ogg files cost a decode and a polyphase filter per draw); source -> WAV, unreadable ones left
    out."""
    folder.mkdir(parents=True, exist_ok=True)
    done = {}
    for source in sources:
        target = folder / f"{hashlib.sha256(str(Path(source).resolve()).encode('utf-8')).hexdigest()[:16]}.wav"
        if not target.is_file():
            try:
                signal = decode_audio(source, sample_rate)
            except SampleError:
                continue
            with atomic_path(target) as tmp:  # a killed build leaves no half-written recording to reuse
                soundfile.write(tmp, signal, sample_rate, subtype="PCM_16", format="WAV")
        done[source] = str(target.resolve())  # absolute: the pairs file may live anywhere
    return done


def audio_pairs(tuxpaint: Path, emoji: Path, concepts: Sequence[dict[str, str]], styles: Sequence[str],
                out: Path, sample_rate: int = 16000) -> AudioPairs:
    """Write OUT/audio-pairs.csv (image, audio, key: each training recording with each training-style picture of
    its concept) and return it with the held-out recordings (labels: the concepts' English labels); the recordings
    are resampled once into OUT/recordings/."""
    mapped = stamp_concepts(tuxpaint, concepts)
    labels = {c["hexcode"]: c["label"] for c in concepts}
    with open(tuxpaint / "audio.csv", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["key"] in mapped]
    by_concept: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_concept.setdefault(mapped[row["key"]], []).append(row)
    train, test = [], []
    for hexcode, recordings in sorted(by_concept.items()):
        recordings.sort(key=lambda r: _share(r["audio"]))
        held = int(len(recordings) * HELD_OUT_RECORDINGS) if len(recordings) > 1 else 0
        test += [(hexcode, r) for r in recordings[:held]]
        train += [(hexcode, r) for r in recordings[held:]]
    if not test:
        raise DataError(f"{tuxpaint}: no recording of an emoji concept to hold out")
    wav = resampled([str(tuxpaint / r["audio"]) for _, r in train + test], out / "recordings", sample_rate)
    train, test = ([(h, r) for h, r in pairs if str(tuxpaint / r["audio"]) in wav] for pairs in (train, test))
    train_csv = out / "audio-pairs.csv"
    pictures = {h: [str(p.resolve()) for s in styles if (p := emoji / "images" / s / f"{h}.png").is_file()]
                for h in by_concept}
    with open(train_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "audio", "key"])
        writer.writerows([image, wav[str(tuxpaint / r["audio"])], h] for h, r in train for image in pictures[h])

    def table(pairs: list) -> AudioTable:
        return AudioTable([wav[str(tuxpaint / r["audio"])] for _, r in pairs], [labels[h] for h, _ in pairs],
                          [pictures[h][0] if pictures[h] else None for h, _ in pairs],
                          [r["language"] or r["kind"] for _, r in pairs])

    return AudioPairs(train_csv, table(train), table(test), len(by_concept))


@dataclass
class KoreanPairs:
    """The Korean binding's training pairs file, every concept's Korean name, and the concepts held out of it."""

    train_csv: Path
    names: dict[str, str]  # hexcode -> Korean name
    trained: list[str]  # hexcodes of the seen concepts the binding trains on
    held_out: list[str]  # hexcodes of the seen concepts it never sees
    candidates: dict[str, list[str]]  # hexcode -> its Korean caption candidates (what the binding draws from)


def korean_pairs(emoji: Path, styles: Sequence[str], exclude: set[tuple[str, str]], out: Path) -> KoreanPairs:
    """Write OUT/ko-pairs.csv (image, text, key: Korean caption candidates, '|'-separated) for the training styles'
    seen images outside `exclude` ((key, style) pairs: the demo's in-distribution test images)."""
    names_file, captions_file = emoji / "concepts-ko.csv", emoji / "captions-ko.csv"
    if not names_file.is_file():
        raise DataError(f"{emoji} has no Korean names: build it with languages ['ko'] (clipforge data emoji "
                        "--languages ko)")
    with open(names_file, newline="", encoding="utf-8") as handle:
        names = {r["hexcode"]: r["name"] for r in csv.DictReader(handle)}
    with open(captions_file, newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["style"] in styles and r["split"] == "seen"
                and (r["key"], r["style"]) not in exclude]
    keys = sorted({r["key"] for r in rows})
    held_out = [k for k in keys if _share(f"ko:{k}") < HELD_OUT_CONCEPTS]
    trained = [k for k in keys if k not in set(held_out)]
    out.mkdir(parents=True, exist_ok=True)
    train_csv = out / "ko-pairs.csv"
    with open(train_csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text", "key"])
        writer.writerows([str((emoji / r["image"]).resolve()), r["caption"], r["key"]] for r in rows
                         if r["key"] not in set(held_out))
    candidates = {r["key"]: r["caption"].split("|") for r in rows}
    return KoreanPairs(train_csv, names, trained, held_out, candidates)
