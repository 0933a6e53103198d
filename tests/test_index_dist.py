"""`clipforge index` under torchrun (2 CPU processes, gloo): the merged index equals the single-process one."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipforge
from clipforge.search import ImageIndex, store
from synthetic import make_caption_set

SRC = Path(__file__).resolve().parents[1] / "src"


def contents(out: Path) -> tuple[list[tuple], np.ndarray]:
    """(id, path, size, mtime_ns, caption) rows and the id-ordered vectors of an index."""
    con = sqlite3.connect(out / store.DATABASE)
    rows = con.execute("SELECT id, path, size, mtime_ns, caption FROM images ORDER BY id").fetchall()
    vectors = store.load_vectors(out, con, ImageIndex.open(out).dim)[1]
    return rows, vectors


@pytest.mark.slow
@pytest.mark.integration
def test_two_processes_build_the_same_index(tmp_path):
    data = make_caption_set(tmp_path / "data", per_concept=2, name="captions.csv")
    model = tmp_path / "model"
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=0), model)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    common = ["index", str(data), "--model", str(model), "--quiet", "--shard-size", "8"]
    one = subprocess.run([sys.executable, "-m", "clipforge.cli.main", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "clipforge.cli.main", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("48 images; added 48") == 1  # rank 0 reports for both
    rows_one, vectors_one = contents(tmp_path / "one")
    rows_two, vectors_two = contents(tmp_path / "two")
    assert rows_one == rows_two and len(rows_one) == 48  # same ids for the same paths
    np.testing.assert_allclose(vectors_one, vectors_two, atol=1e-6)
    names = store.shard_files(tmp_path / "two")
    assert {n.split("-")[1] for n in names} == {"r0", "r1"}  # each rank wrote its own shards
    queries = vectors_one[:5]
    a, b = ImageIndex.open(tmp_path / "one").search(queries, 10), ImageIndex.open(tmp_path / "two").search(queries, 10)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
