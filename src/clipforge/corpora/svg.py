"""Rendering many standalone SVG icons: a process pool over resvg, an ink measure for blank renders, and a
drawing hash that finds the same drawing published twice."""
from __future__ import annotations

import hashlib
import re
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

from PIL import Image
from tqdm import tqdm

from clipforge.corpora.emoji import render_emoji

BLANK_INK = 0.005  # share of non-white pixels below which a render is empty (animated or clipped drawings)


def drawing_hash(svg: str) -> str:
    """Hash of standalone SVG markup with whitespace normalised: equal for identical drawings."""
    return hashlib.sha1(re.sub(r"\s+", " ", re.sub(r">\s+<", "><", svg)).strip().encode()).hexdigest()


def ink_fraction(image: Image.Image) -> float:
    """Share of pixels darker than near-white (a histogram count: no per-pixel Python)."""
    histogram = image.convert("L").histogram()
    return sum(histogram[:250]) / (image.width * image.height)


def render_one(job: tuple[str, str, int]) -> float:
    """Render SVG markup at size on white and save it to path unless blank; its ink, or -1 if resvg fails."""
    svg, path, size = job
    try:
        image = render_emoji(svg, size)
    except Exception:  # resvg-py raises plain Exceptions on a few malformed third-party drawings: counted
        return -1.0
    ink = ink_fraction(image)
    if ink >= BLANK_INK:
        image.save(path)
    return ink


def render_many(jobs: Sequence[tuple[str, str, int]], workers: int, progress: bool = True) -> list[float]:
    """render_one over (svg, path, size) jobs in a pool of workers (inline for one); ink per job, in order."""
    for parent in {Path(path).parent for _, path, _ in jobs}:
        parent.mkdir(parents=True, exist_ok=True)
    bar = {"total": len(jobs), "desc": "render", "disable": not progress or None}
    if workers <= 1 or len(jobs) < 256:  # a pool costs ~1 s to start: not worth it for a handful
        return [render_one(job) for job in tqdm(jobs, **bar)]
    with get_context("spawn").Pool(workers) as pool:  # spawn: no forked copy of a caller's threads or torch
        return list(tqdm(pool.imap(render_one, jobs, chunksize=64), **bar))
