"""Regenerate src/clipforge/pretrained/tags.json from an installed open_clip_torch (its pretrained table).

    .venv/bin/python scripts/gen_pretrained_tags.py     # open_clip_torch 3.3.0 made the committed file

Only open_clip's table of names is read (no model code runs). For every architecture clipforge's registry
has, each tag records where the weights live (a Hugging Face hub repo; OpenAI's nine checkpoints also by
their published URL, whose path holds the file's sha256), the activation the weights were trained with
(open_clip marks QuickGELU weights; clipforge then loads the "-quickgelu" architecture instead of
warning) and the preprocessing. A tag whose preprocessing clipforge does not implement is kept with the
reason, so asking for it says why instead of "unknown tag".
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import clipforge

OUT = Path(__file__).resolve().parents[1] / "src" / "clipforge" / "pretrained" / "tags.json"
OPENAI_URL = re.compile(r"^https://openaipublic\.azureedge\.net/clip/models/([0-9a-f]{64})/[^/]+\.pt$")


def open_clip_table() -> tuple[str, dict]:
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        sys.exit("open_clip_torch is not installed (pip install --no-deps open_clip_torch)")
    package = types.ModuleType("open_clip")  # skip its __init__ (it imports torchvision)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_clip"] = package
    version = importlib.import_module("open_clip.version").__version__
    return version, importlib.import_module("open_clip.pretrained")._PRETRAINED


def entry(name: str, tag: str, cfg: dict) -> dict:
    architecture = name if name.endswith("-quickgelu") or not cfg.get("quick_gelu") else f"{name}-quickgelu"
    record = {"name": name, "tag": tag, "architecture": architecture, "hf_hub": cfg["hf_hub"].rstrip("/"),
              "mean": list(cfg["mean"]), "std": list(cfg["std"])}
    found = OPENAI_URL.match(cfg.get("url", ""))
    if found:
        record.update(url=cfg["url"], sha256=found.group(1))
    resize = {"shortest": "crop", "squash": "squash"}.get(cfg.get("resize_mode", "shortest"))
    if resize == "squash":  # SigLIP's: the whole image resized to the square input, no crop
        record["resize"] = resize
    if cfg.get("interpolation", "bicubic") != "bicubic" or resize is None:
        record["unsupported"] = (f"preprocessing {cfg.get('interpolation')} / resize_mode {cfg.get('resize_mode')!r} "
                                 "(clipforge implements bicubic with the shortest side + crop, or squash)")
    return record


def main() -> None:
    version, table = open_clip_table()
    ours = set(clipforge.list_models())
    tags = [entry(name, tag, cfg) for name, cfgs in table.items() if name in ours for tag, cfg in cfgs.items()]
    OUT.write_text(json.dumps({"source": f"open_clip_torch {version} pretrained table", "tags": tags}, indent=1) + "\n")
    print(f"wrote {len(tags)} tags to {OUT}")


if __name__ == "__main__":
    main()
