#!/usr/bin/env python3
"""Cut the in-repo golden fixture (tests/fixtures/golden/) out of the shared reference fixtures.

The shared fixtures (../shared/fixtures beside the repository, see their README.md) hold two tiny random
CLIP models made with the reference implementation (open_clip 3.3.0) in OpenAI's state-dict layout, with
input PNGs, captions and the reference outputs. They are 64 MB and live outside the repository, so a fresh
clone cannot run the tests that compare against them. This script copies the smaller one, ViT-tiny, into
the repository in about 3.6 MB, keeping every value exactly as the reference wrote it:

- `expected.safetensors`, `meta.json` and the input PNGs: byte-for-byte copies.
- the weights: every tensor of `openai_state_dict.safetensors` unchanged, except `token_embedding.weight`
  (49408 x 128 floats, 25 of the 28.7 MB), of which only the rows of the token ids that occur in the
  reference `tokens` are kept (`token_embedding.ids`, `token_embedding.rows`). Those are the only rows the
  reference outputs read, so a state dict rebuilt with any values in the other rows reproduces them exactly.
  tests/golden.py rebuilds the full OpenAI-layout file (other rows: a fixed seeded filler) for the tests.

RN-tiny is left out: its weights other than the token embedding are 5.7 MB on their own (the attention
pool), over the budget for the repository; the tests still run it as an extra case when the shared
fixtures are present.

Usage (from the repository root):

    python scripts/make_golden_fixture.py                 # write tests/fixtures/golden/
    python scripts/make_golden_fixture.py --check         # verify the committed files against the source

Only numpy and safetensors are needed; nothing is computed with clipforge.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "fixtures"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "golden"
MODELS = ["openai-vit-tiny"]
COPIED = ["expected.safetensors", "meta.json", "image0.png", "image1.png", "image2.png", "image3.png"]
WEIGHTS = "openai_state_dict.safetensors"
COMPACT = "openai_state_dict.compact.safetensors"
EMBEDDING = "token_embedding.weight"
METADATA_KEY = "clipforge_golden"
BUDGET = 5 * 2**20  # bytes: what the repository is willing to carry


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compact_weights(source: Path, expected: Path, out: Path) -> dict:
    """Write `out`: the source state dict with the token embedding cut to the rows the reference tokens use."""
    state = load_file(str(source))
    tokens = load_file(str(expected))["tokens"]
    embedding = state.pop(EMBEDDING)
    ids = np.unique(tokens).astype(np.int64)  # padding id 0 included: the reference embedded it too
    state["token_embedding.ids"] = ids
    state["token_embedding.rows"] = np.ascontiguousarray(embedding[ids])
    about = {
        "format": "clipforge golden fixture: OpenAI-layout CLIP state dict with a partial token embedding",
        "token_embedding_shape": list(embedding.shape),
        "token_embedding_dtype": str(embedding.dtype),
        "token_embedding": "token_embedding.weight[token_embedding.ids] == token_embedding.rows; other rows were "
                           "dropped (no reference output reads them)",
        "source": f"shared/fixtures/{source.parent.name}/{source.name}",
        "source_sha256": sha256(source),
    }
    # One metadata entry: safetensors writes several in a hash map's order, which changes from run to run.
    metadata = {METADATA_KEY: json.dumps(about, sort_keys=True)}
    save_file(state, str(out), metadata=metadata)
    return {"ids": len(ids), "vocab": int(embedding.shape[0]), "width": int(embedding.shape[1])}


def verify_compact(source: Path, compact: Path) -> None:
    """Every tensor equal to the source's (bit for bit), the kept embedding rows included."""
    original, cut = load_file(str(source)), load_file(str(compact))
    ids, rows = cut.pop("token_embedding.ids"), cut.pop("token_embedding.rows")
    full = original.pop(EMBEDDING)
    assert set(cut) == set(original), sorted(set(cut) ^ set(original))
    for key, value in original.items():
        same = cut[key].dtype == value.dtype and cut[key].shape == value.shape
        assert same and cut[key].tobytes() == value.tobytes(), key
    assert rows.dtype == full.dtype and rows.tobytes() == full[ids].tobytes()
    with safe_open(str(compact), "np") as handle:
        assert json.loads(handle.metadata()[METADATA_KEY])["token_embedding_shape"] == list(full.shape)


def readme(out: Path, manifest: dict) -> str:
    sizes = "\n".join(f"| `{name}/{f}` | {info['bytes']:,} | {info['what']} |"
                      for name, files in manifest["models"].items() for f, info in files["files"].items())
    return f"""# Golden fixture (in-repo cut of the shared reference fixtures)

Reference outputs recorded from the reference implementation ({manifest['reference']}), so the
`golden` tests run on a fresh clone. Made by

    python scripts/make_golden_fixture.py --source ../shared/fixtures

from `../shared/fixtures` (see its README.md and the docstring of `scripts/make_golden_fixture.py`);
`python scripts/make_golden_fixture.py --check` verifies these files against that source.
Nothing here was computed with clipforge: the copied files are byte-identical to the source
(`manifest.json` lists both checksums), and the compact weights hold the source's tensors unchanged.

| file | bytes | what |
|---|---:|---|
{sizes}
| `manifest.json` | | source and output sha256 of every file, the kept token ids |

`tests/golden.py` rebuilds, in a temporary folder, the model folder in the shared layout
(`openai_state_dict.safetensors`, plus the same tensors as a `torch.save` pickle
`openai_state_dict.pt`); the token-embedding rows that no reference output reads are a fixed seeded
filler there, so only the recorded inputs reproduce the recorded outputs. The tests run against this
fixture always, and in addition against every model of the shared fixtures when they are found
(`CLIPFORGE_SHARED_FIXTURES=<dir>`, default `../shared/fixtures`; `CLIPFORGE_SHARED_FIXTURES=none`
hides them): `python -m pytest -m golden`.

Total: {manifest['total_bytes']:,} bytes.
"""


WHAT = {
    "expected.safetensors": "reference outputs: `pixels` (eval transform of the PNGs), `tokens` (CLIP BPE of the "
                            "captions), unnormalised `image_features` / `text_features`, exponentiated `logit_scale`",
    "meta.json": "the captions, image names, model config and notes of the reference run",
    COMPACT: "the weights: OpenAI-layout state dict, token embedding cut to the rows of the ids in `tokens`",
}


def build(source_root: Path, out_root: Path) -> dict:
    manifest: dict = {"source": "shared/fixtures", "models": {}}  # relative: the same on every machine
    for name in MODELS:
        src, dst = source_root / name, out_root / name
        dst.mkdir(parents=True, exist_ok=True)
        meta = json.loads((src / "meta.json").read_text())
        manifest["reference"] = meta["reference"]
        files = {}
        for file in COPIED:
            shutil.copyfile(src / file, dst / file)
            files[file] = {"source_sha256": sha256(src / file)}
        stats = compact_weights(src / WEIGHTS, src / "expected.safetensors", dst / COMPACT)
        verify_compact(src / WEIGHTS, dst / COMPACT)
        files[COMPACT] = {"source": WEIGHTS, "source_sha256": sha256(src / WEIGHTS)}
        for file, info in files.items():
            info["sha256"] = sha256(dst / file)
            info["bytes"] = (dst / file).stat().st_size
            info["what"] = WHAT.get(file, "input image ({})".format(
                {"image0.png": "RGB 97x61", "image1.png": "RGBA 40x120", "image2.png": "L 300x300",
                 "image3.png": "P 128x77"}.get(file, "")))
        manifest["models"][name] = {"files": files, "token_embedding": stats,
                                    "kept_token_ids": load_file(str(dst / COMPACT))["token_embedding.ids"].tolist()}
    total = sum(info["bytes"] for m in manifest["models"].values() for info in m["files"].values())
    manifest["total_bytes"] = total
    (out_root / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out_root / "README.md").write_text(readme(out_root, manifest))
    if total > BUDGET:
        raise SystemExit(f"the fixture is {total / 2**20:.1f} MB, over the {BUDGET / 2**20:.0f} MB budget")
    return manifest


def check(source_root: Path, out_root: Path) -> int:
    """Rebuild into a temporary folder and compare with the committed files, byte for byte."""
    with tempfile.TemporaryDirectory() as tmp:
        build(source_root, Path(tmp))
        fresh = sorted(p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file())
        committed = sorted(p.relative_to(out_root) for p in out_root.rglob("*") if p.is_file())
        problems = [f"{p}: missing" for p in fresh if p not in committed]
        problems += [f"{p}: not made by this script" for p in committed if p not in fresh]
        problems += [f"{p}: differs" for p in fresh if p in committed
                     and (Path(tmp) / p).read_bytes() != (out_root / p).read_bytes()]
    for line in problems:
        print(line, file=sys.stderr)
    print("golden fixture " + ("differs from its source" if problems else f"matches {source_root}"))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the shared fixtures folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the golden fixture")
    parser.add_argument("--check", action="store_true", help="verify --out against --source; write nothing")
    args = parser.parse_args(argv)
    if not (args.source / MODELS[0] / WEIGHTS).is_file():
        parser.error(f"no reference fixtures at {args.source}")
    if args.check:
        return check(args.source, args.out)
    manifest = build(args.source, args.out)
    print(f"wrote {args.out} ({manifest['total_bytes']:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
