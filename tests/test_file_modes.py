"""Files clipforge writes get the mode the umask gives (0644 under 022), so a second account can read them.

The atomic writer kept mkstemp's 0600: checkpoints, eval reports and indexes were readable by their owner only.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from clipforge.io import atomic_path, write_atomic
from synthetic import make_caption_set


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge.cli.main", *args], capture_output=True, text=True,
                          timeout=600, umask=0o022)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hidden_from_others(root: Path) -> list[str]:
    """Files that others cannot read and folders they cannot list and enter, under `root`."""
    found = []
    for path in [root, *root.rglob("*")]:
        need = 0o055 if path.is_dir() else 0o044
        if mode(path) & need != need:
            found.append(f"{path.relative_to(root)} {stat.filemode(path.stat().st_mode)}")
    return found


def test_the_atomic_writer_gives_new_files_the_umasks_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "shared.json", "{}")
        with atomic_path(tmp_path / "shared.bin") as tmp:
            tmp.write_bytes(b"\0")
        with atomic_path(tmp_path / "replaced.bin") as tmp:  # a writer renaming its own 0600 file over it (safetensors)
            handle, own = tempfile.mkstemp(dir=tmp_path)
            os.close(handle)
            os.replace(own, tmp)
        os.umask(0o077)  # the umask is honoured, not overridden: a private umask keeps files private
        write_atomic(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert [mode(tmp_path / name) for name in ("shared.json", "shared.bin", "replaced.bin")] == [0o644] * 3
    assert mode(tmp_path / "private.json") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.json", "replaced.bin", "shared.bin",
                                                          "shared.json"]  # no temporary file left behind


@pytest.mark.integration
def test_train_eval_and_index_write_files_others_can_read(tmp_path):
    data = tmp_path / "data"
    make_caption_set(data, per_concept=2)  # 48 images: FAISS backends need 40 vectors at least
    (data / "images" / "broken.png").write_bytes(b"not a png")  # so eval and index write their skip records too
    lines = (data / "train.csv").read_text().splitlines()[1:]
    (data / "labels.csv").write_text("image,label\nimages/broken.png,red circle\n"
                                     + "".join(f"{row.split(',')[0]},{row.split(',')[1][2:]}\n" for row in lines))
    result = run_cli("train", "--model", "cpu-vit-tiny-32", "--train-data", str(data / "train.csv"), "--workers", "0",
                     "--steps", "2", "--batch-size", "8", "--warmup", "1", "--save-every", "1",
                     "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "run" / "step-00000002"
    result = run_cli("eval", "--model", str(checkpoint), "--task", "zeroshot", "--templates", "simple",
                     "--data", str(data / "labels.csv"), "--out", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("index", str(data / "images"), "--model", str(checkpoint), "--out", str(tmp_path / "index"),
                     "--backend", "faiss-hnsw", "--workers", "0", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    for folder in ("run", "eval", "index"):
        assert not hidden_from_others(tmp_path / folder), hidden_from_others(tmp_path / folder)
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    expected = {"run/latest", "run/config.json", "run/metrics.jsonl", "run/step-00000002/model.safetensors",
                "run/step-00000002/clipforge.json", "run/step-00000002/train_state.pt", "eval/results.json",
                "eval/report.md", "eval/skipped.jsonl", "index/manifest.json", "index/vectors.npy",
                "index/metadata.sqlite", "index/backend.faiss", "index/skipped.jsonl"}
    assert expected <= written, expected - written  # each kind of file is there to be checked
