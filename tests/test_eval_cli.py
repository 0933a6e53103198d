"""`clipforge eval` end to end on small data, including bad input."""
from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OPENAI_FLAGS
from synthetic import COLORS, SHAPES, draw, make_caption_set

TINY = ("--model", "cpu-vit-tiny-32", "--random-weights")  # a registry name, randomly initialised


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge.cli.main", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An image folder per class (ImageNet layout) with one undecodable file."""
    root = tmp_path_factory.mktemp("folder")
    rng = random.Random(0)
    for shape in SHAPES:
        (root / f"{shape}_shape").mkdir()
        for i, rgb in enumerate(COLORS.values()):
            draw(rgb, shape, rng).save(root / f"{shape}_shape" / f"{i}.png")
    (root / "circle_shape" / "broken.png").write_bytes(b"not a png at all")
    return root


@pytest.fixture(scope="module")
def styled(tmp_path_factory) -> Path:
    """A labels CSV with two 'styles' (plain and inverted colours) and captions."""
    root = tmp_path_factory.mktemp("styled")
    make_caption_set(root, per_concept=4, seed=3)
    from PIL import Image, ImageOps

    rows = []
    for line in list(csv.DictReader(open(root / "train.csv"))):
        key = line["key"]
        color, shape = key.split("-")
        rows.append({"image": line["image"], "label": f"{color} {shape}", "style": "plain", "split": "seen"})
        inverted = line["image"].replace(".png", "_inv.png")
        ImageOps.invert(Image.open(root / line["image"]).convert("RGB")).save(root / inverted)
        rows.append({"image": inverted, "label": f"{color} {shape}", "style": "inverted", "split": "seen"})
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "label", "style", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.mark.integration
def test_zeroshot_on_fixture_model_and_image_folder(fixtures_dir, folder, tmp_path):
    model = fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors"
    result = run_cli("eval", "--model", str(model), "--task", "zeroshot", "--data", str(folder), "--confusion",
                     "--out", str(tmp_path), *OPENAI_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["images"] == 24 and results["classes"] == 4
    assert results["skipped"] == {"corrupt_image": 1}  # counted by reason, not silently dropped
    assert {"label", "template", "ensemble"} <= set(results) and len(results["confusion_matrix"]) == 4
    report = (tmp_path / "report.md").read_text()
    assert "ensemble" in report and ".png" in report
    import re

    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert embedded and all((tmp_path / p).stat().st_size > 0 for p in embedded)


@pytest.mark.integration
def test_retrieval_linear_probe_and_robustness(styled, tmp_path):
    out = tmp_path / "r"
    result = run_cli("eval", *TINY, "--task", "retrieval", "--data", str(styled / "train.csv"),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 96 and 0 <= results["image_to_text_r1"] <= results["image_to_text_r10"] <= 1
    result = run_cli("eval", *TINY, "--task", "linear-probe", "--data", str(styled),
                     "--styles", "plain", "--out", str(tmp_path / "lp"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert results["test_images"] > 0 and "best_C" in results["linear_probe"]
    result = run_cli("eval", *TINY, "--task", "robustness", "--data", str(styled),
                     "--id-styles", "plain", "--supervised-steps", "30", "--out", str(tmp_path / "rb"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "rb" / "results.json").read_text())
    assert set(results["domains"]) == {"clip-zero-shot", "clip-linear-probe", "supervised"}  # method ids
    assert results["domains"]["supervised"]["in_distribution"] > 0.2  # it learned the training style
    assert (tmp_path / "rb" / "robustness.png").stat().st_size > 0


@pytest.mark.integration
def test_bad_inputs_are_clear(folder, tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,name\na.png,cat\n")
    result = run_cli("eval", *TINY, "--task", "zeroshot", "--data", str(bad_csv), "--out", str(tmp_path))
    assert result.returncode == 2 and "unknown class file format" in result.stderr
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    (tmp_path / "classes" / "dog").mkdir()
    draw((0, 0, 0), "circle", random.Random(0)).save(tmp_path / "classes" / "cat" / "a.png")
    result = run_cli("eval", *TINY, "--task", "zeroshot", "--data", str(tmp_path / "classes"),
                     "--out", str(tmp_path))
    assert result.returncode == 2 and "empty class" in result.stderr and "dog" in result.stderr
    result = run_cli("eval", *TINY, "--task", "robustness", "--data", str(folder), "--out", str(tmp_path))
    assert result.returncode == 2 and "--id-styles" in result.stderr


@pytest.mark.integration
def test_skips_are_kept_apart_by_reason_and_named(folder, tmp_path):
    """A missing and a corrupt file stay apart (as train and index count them), named in --json and skipped.jsonl."""
    broken, gone = folder / "circle_shape" / "broken.png", tmp_path / "gone.png"
    rows = [f"{p},{p.parent.name}" for p in sorted(folder.glob("*_shape/[0-9].png"))]
    (tmp_path / "labels.csv").write_text("\n".join(["image,label", *rows, f"{broken},circle_shape",
                                                     f"{gone},square_shape"]) + "\n")
    common = ("eval", *TINY, "--task", "zeroshot", "--templates", "simple",
              "--data", str(tmp_path / "labels.csv"))
    result = run_cli(*common, "--out", str(tmp_path / "json"), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    assert printed["skipped"] == {"corrupt_image": 1, "missing_file": 1} and printed["images"] == 24
    assert printed["skipped_files"] == {"corrupt_image": [str(broken)], "missing_file": [str(gone)]}  # as index's
    assert json.loads((tmp_path / "json" / "results.json").read_text())["skipped"] == printed["skipped"]
    log = (tmp_path / "json" / "skipped.jsonl").read_text().splitlines()
    by_path = sorted([{"path": str(broken), "reason": "corrupt_image"}, {"path": str(gone), "reason": "missing_file"}],
                     key=lambda row: row["path"])
    assert [json.loads(line) for line in log] == by_path
    result = run_cli(*common, "--out", str(tmp_path / "text"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped: corrupt_image 1, missing_file 1." in result.stdout and "{" not in result.stdout  # no dict repr
    assert f"{gone} (missing_file)" in result.stdout and str(tmp_path / "text" / "skipped.jsonl") in result.stdout


@pytest.mark.integration
def test_retrieval_from_webdataset_shards(styled, tmp_path):
    import tarfile

    rows = list(csv.DictReader(open(styled / "train.csv")))[:12]
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for i, row in enumerate(rows):
            tar.add(styled / row["image"], arcname=f"s{i:03d}.png")
            (tmp_path / "c.txt").write_text(row["caption"])
            tar.add(tmp_path / "c.txt", arcname=f"s{i:03d}.txt")
        tar.add(tmp_path / "c.txt", arcname="bad.txt")
        (tmp_path / "bad.png").write_bytes(b"not a png")
        tar.add(tmp_path / "bad.png", arcname="bad.png")
    out = tmp_path / "out"
    result = run_cli("eval", *TINY, "--task", "retrieval", "--data",
                     str(tmp_path / "shard-{000..000}.tar"), "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 12 and results["captions"] == 12 and results["skipped"] == {"corrupt_image": 1}
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"path": f"{tmp_path / 'shard-000.tar'}/bad.png", "reason": "corrupt_image"}]  # member named


def test_labels_csv_with_bom_and_short_rows(tmp_path, folder):
    from clipforge.data.labelled import load_labelled_images

    image = next(folder.glob("square_shape/*.png"))
    (tmp_path / "labels.csv").write_text(f"image,label\n{image},square\n", encoding="utf-8-sig")
    assert load_labelled_images(tmp_path / "labels.csv").classnames == ["square"]
    (tmp_path / "short.csv").write_text(f"image,label,class_index\n{image},square\n{image}\n")
    with pytest.raises(ValueError, match="line 3"):
        load_labelled_images(tmp_path / "short.csv")
