"""`clipforge index --captions`: a CoCa model writes captions for indexed images without one, through the real CLI;
a source caption wins, a changed file is captioned again, a contrastive model is refused before anything is written,
and search results (CLI, server, web page data) carry the caption marked generated."""
from __future__ import annotations

import csv
import json
import sqlite3

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.model.generation import caption_texts
from clipforge.search import ImageIndex, store
from clipforge.serve import create_app
from conftest import perturb_
from test_serve import make_images


@pytest.fixture(scope="module")
def coca_folder(tmp_path_factory):
    model = perturb_(clipforge.create_model("cpu-coca-tiny-32", seed=0), scale=0.2).eval()
    return clipforge.save_pretrained(model, tmp_path_factory.mktemp("coca") / "model")


def _index(source, out, model, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["index", str(source), "--model", str(model), "--out", str(out), "--quiet", "--json",
                 "--captions", "--caption-beams", "2", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _expected(folder, path) -> str:
    model, preprocess = clipforge.load(folder)
    tokenizer = clipforge.get_tokenizer(folder)
    with torch.no_grad():
        return caption_texts(model, preprocess(Image.open(path))[None], tokenizer, strategy="beam", num_beams=2,
                             max_length=30)[0]


def test_index_captions_writes_each_uncaptioned_image_once(tmp_path, coca_folder, capsys):
    paths = make_images(tmp_path / "images")
    table = tmp_path / "table.csv"
    with open(table, "w", newline="") as handle:  # one row with its own caption, the others without
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows([[str(p), "a caption of the source" if i == 0 else ""] for i, p in enumerate(paths)])
    out = tmp_path / "index"
    assert _index(table, out, coca_folder, capsys)["captions"] == {"written": len(paths) - 1, "skipped": {}}
    index = ImageIndex.open(out)
    records = {r["path"]: r for r in (index.record(i) for i in index.ids.tolist())}
    assert records[str(paths[0])]["caption"] == "a caption of the source"
    assert not records[str(paths[0])]["caption_generated"]
    assert records[str(paths[3])] | {"caption": _expected(coca_folder, paths[3]), "caption_generated": True} == \
        records[str(paths[3])]
    assert _index(table, out, coca_folder, capsys)["captions"]["written"] == 0  # already captioned: nothing to do
    Image.new("RGB", (40, 40), (250, 250, 20)).save(paths[3])  # new content: the old caption no longer describes it
    again = _index(table, out, coca_folder, capsys)
    assert again["updated"] == 1 and again["captions"]["written"] == 1
    record = ImageIndex.open(out).record(records[str(paths[3])]["id"])
    assert record["caption"] == _expected(coca_folder, paths[3]) and record["caption_generated"]


def test_generated_captions_reach_search_results_and_the_server(tmp_path, coca_folder, capsys):
    make_images(tmp_path / "images")
    out = tmp_path / "index"
    _index(tmp_path / "images", out, coca_folder, capsys)
    assert main(["search", str(out), "a red square", "--json", "-k", "3"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 3 and all(r["caption"] and r["caption_generated"] for r in results)
    with TestClient(create_app(out)) as client:
        hits = client.get("/search", params={"q": "a red square", "k": 3}).json()["results"]
    assert [h["caption"] for h in hits] == [r["caption"] for r in results] and all(h["caption_generated"] for h in hits)


def test_a_contrastive_model_is_refused_before_anything_is_embedded(tmp_path, capsys):
    make_images(tmp_path / "images")
    folder = clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=0), tmp_path / "clip")
    assert main(["index", str(tmp_path / "images"), "--model", str(folder), "--out", str(tmp_path / "index"),
                 "--quiet", "--captions"]) == 2
    assert "needs a model with a captioning decoder" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()


def test_an_index_from_before_generated_captions_still_reads(tmp_path, coca_folder, capsys):
    make_images(tmp_path / "images")
    out = tmp_path / "index"
    assert main(["index", str(tmp_path / "images"), "--model", str(coca_folder), "--out", str(out), "--quiet"]) == 0
    with sqlite3.connect(out / store.DATABASE) as con:
        con.execute("DROP TABLE generated_captions")  # as an index written by an earlier version has it
    index = ImageIndex.open(out)
    assert index.record(int(index.ids[0]))["caption_generated"] is False
