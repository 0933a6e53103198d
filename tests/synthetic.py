"""A learnable synthetic caption set: coloured shapes with their names as captions."""
from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220), "yellow": (230, 210, 20),
          "purple": (140, 40, 170), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle", "cross")


def draw(color: tuple[int, int, int], shape: str, rng: random.Random, size: int = 40) -> Image.Image:
    """One shape of random size and position on a lightly tinted background."""
    image = Image.new("RGB", (size, size), tuple(rng.randint(225, 255) for _ in range(3)))
    d = ImageDraw.Draw(image)
    r = rng.randint(size // 4, size // 2 - 2)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
    else:
        w = max(2, r // 3)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    return image


def make_caption_set(root: Path, per_concept: int, seed: int = 0, name: str = "train.csv") -> Path:
    """Write PNGs and a CSV (image, caption, key) with `per_concept` images of each colour-shape pair."""
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            for i in range(per_concept):
                path = f"images/{name[:-4]}_{color}_{shape}_{i}.png"
                draw(rgb, shape, rng).save(root / path)
                rows.append((path, f"a {color} {shape}", f"{color}-{shape}"))
    return _write_shuffled(root / name, ["image", "caption", "key"], rows, rng)


def _write_shuffled(path: Path, header: list[str], rows: list[tuple[str, ...]], rng: random.Random) -> Path:
    rng.shuffle(rows)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_labelled_set(root: Path, per_concept: int, seed: int = 0, styles: tuple[str, ...] = ("filled", "faded"),
                      name: str = "labels.csv") -> Path:
    """A labels CSV (image, label, style) of the colour-shape pairs: "filled" shapes, or "faded" (a style shift)."""
    rng = random.Random(seed)
    (root / "labelled").mkdir(parents=True, exist_ok=True)
    rows = []
    for style in styles:
        for color, rgb in COLORS.items():
            for shape in SHAPES:
                for i in range(per_concept):
                    image = draw(rgb, shape, rng)
                    if style == "faded":  # washed out, with a white ghost shape over it
                        inner = draw((255, 255, 255), shape, random.Random(0))
                        image = Image.blend(image, inner.resize(image.size), 0.35)
                    path = f"labelled/{name[:-4]}_{style}_{color}_{shape}_{i}.png"
                    image.save(root / path)
                    rows.append((path, f"{color} {shape}", style))
    return _write_shuffled(root / name, ["image", "label", "style"], rows, rng)


def write_tone(path: Path, color: str, shape: str, rng: random.Random, seconds: float = 0.6) -> None:
    """A recording that names its concept as a sound: a pitch per colour, a tremolo rate per shape, random phase,
    loudness and noise (a 16 kHz WAV)."""
    import numpy as np
    import soundfile

    rate = 16000
    t = np.arange(int(seconds * rate)) / rate
    pitch = 300.0 * 1.35 ** list(COLORS).index(color)
    tremolo = 0.6 + 0.4 * np.sin(2 * np.pi * (3 + 5 * SHAPES.index(shape)) * t + rng.uniform(0, 6.3))
    wave = rng.uniform(0.2, 0.5) * tremolo * np.sin(2 * np.pi * pitch * t + rng.uniform(0, 6.3))
    noise = np.random.default_rng(rng.randrange(2**32)).standard_normal(len(t)) * 0.01
    soundfile.write(path, (wave + noise).astype(np.float32), rate)


def make_audio_pairs(root: Path, table: Path, per_image: int = 2, seed: int = 0, name: str = "audio.csv") -> Path:
    """An (image, audio, key) table: `per_image` recordings of each caption set row's concept (see write_tone)."""
    rng = random.Random(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    pairs = []
    for row in rows:
        color, shape = row["key"].split("-")
        for i in range(per_image):
            audio = f"audio/{Path(row['image']).stem}_{i}.wav"
            write_tone(root / audio, color, shape, rng)
            pairs.append((row["image"], audio, row["key"]))
    return _write_shuffled(root / name, ["image", "audio", "key"], pairs, rng)
