"""`clipforge bind`: a Korean-like text tower trained against a frozen CLIP through image pairs only, through the
real CLI. The bound model's CLIP outputs are bit-identical to the original's, the new tower has its own tokenizer,
the binding resumes after kill -9 to the uninterrupted run's losses, and bad settings are refused first."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import clipforge
from binding_runs import check_killed_binding_resumes, losses
from clipforge.bind import BindConfig, bind
from clipforge.cli.main import main
from clipforge.errors import ConfigError
from conftest import perturb_
from synthetic import make_caption_set

WORDS = {"red": "빨간", "green": "초록", "blue": "파란", "yellow": "노란", "purple": "보라", "black": "검은",
         "circle": "원", "square": "사각형", "triangle": "삼각형", "cross": "십자"}
FLAGS = ["--batch-size", "8", "--workers", "0", "--warmup", "2", "--lr", "2e-3", "--vocab-size", "600",
         "--tower", '{"width": 32, "heads": 2, "layers": 1, "context_length": 16}']


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A CLIP checkpoint and (image, text) pairs in another language: the text never in English."""
    root = tmp_path_factory.mktemp("bind")
    model = perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=0), scale=0.1)
    folder = clipforge.save_pretrained(model, root / "clip")
    table = make_caption_set(root, per_concept=2, seed=0)
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text", "key"])
        for row in rows:
            color, shape = row["caption"].split()[1:]
            writer.writerow([str(root / row["image"]), f"{WORDS[color]} {WORDS[shape]}", row["key"]])
    return folder, root / "pairs.csv"


def test_bind_trains_a_tower_and_leaves_the_clip_bit_identical(pairs, tmp_path, capsys):
    folder, table = pairs
    out = tmp_path / "bind"
    assert main(["bind", "--model", str(folder), "--modality", "text-ko", "--train-data", str(table),
                 "--key-column", "key", "--steps", "30", "--output-dir", str(out), *FLAGS]) == 0
    printed = capsys.readouterr().out  # the trainer's closing line, then the summary
    summary = json.loads(printed[printed.index("{"):])
    bound, _ = clipforge.load(summary["bound"])
    original, _ = clipforge.load(folder)
    assert bound.modalities == ("image", "text", "text-ko")
    pixels, tokens = torch.randn(3, 3, 32, 32), clipforge.get_tokenizer(folder)(["a red circle", "x", "a b"])
    with torch.no_grad():
        assert torch.equal(bound.encode_image(pixels), original.encode_image(pixels))
        assert torch.equal(bound.encode_text(tokens), original.encode_text(tokens))
    originals = original.state_dict()
    assert all(torch.equal(v, originals[k]) for k, v in bound.state_dict().items() if not k.startswith("bound_text"))
    korean = clipforge.get_tokenizer(summary["bound"], modality="text-ko")
    assert korean.vocab_size < 1000 and korean.context_length == 16
    with torch.no_grad():
        assert bound.encode("text-ko", korean(["빨간 원", "파란 사각형"])).shape == (2, 64)
    run = losses(out / "run")
    assert sum(run[s] for s in range(26, 31)) < sum(run[s] for s in range(1, 6))  # the tower learned


def test_a_binding_killed_with_sigkill_resumes_to_the_uninterruptedlosses(pairs, tmp_path):
    folder, table = pairs
    base = dict(model=str(folder), modality="text-ko", train_data=str(table), key_column="key", steps=10,
                batch_size=8, workers=0, warmup=2, lr=2e-3, vocab_size=600,
                tower={"width": 32, "heads": 2, "layers": 1, "context_length": 16})
    check_killed_binding_resumes(base, FLAGS, tmp_path)


def test_bad_binding_settings_are_refused_before_anything_is_written(pairs, tmp_path):
    folder, table = pairs
    for settings, message in (({"modality": "depth"}, "a text tower .* or an audio tower"),
                              ({"modality": "text"}, "bad modality"),
                              ({"modality": "audio", "audio_tower": "huge"}, "unknown audio tower"),
                              ({"modality": "audio", "tower": {"depth": 2}}, "unknown audio tower cpu-small config"),
                              ({"modality": "audio", "decoded_cache": True}, "not available when binding audio"),
                              ({"vocab_size": 100}, "vocab_size must be"), ({"lock_text": True}, "fixed by binding"),
                              ({"model": ""}, "model is required")):
        config = BindConfig(**{"model": str(folder), "train_data": str(table), "output_dir": str(tmp_path / "x"),
                               **settings})
        with pytest.raises(ConfigError, match=message):
            bind(config)
    assert not (tmp_path / "x").exists()


def test_classify_reads_labels_through_a_bound_tower(pairs, tmp_path, capsys):
    folder, table = pairs
    out = tmp_path / "bind"
    assert main(["bind", "--model", str(folder), "--modality", "text-ko", "--train-data", str(table),
                 "--key-column", "key", "--steps", "4", "--output-dir", str(out), *FLAGS]) == 0
    capsys.readouterr()
    image = next(iter(csv.DictReader(open(table, encoding="utf-8"))))["image"]
    labels = ["빨간 원", "파란 사각형", "노란 십자"]
    assert main(["classify", image, "--model", str(out / "bound"), "--label-modality", "text-ko", "--labels",
                 ",".join(labels), "--json", "--top", "3"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    model, preprocess = clipforge.load(out / "bound")
    korean = clipforge.get_tokenizer(out / "bound", modality="text-ko")
    with torch.no_grad():  # the same ranking from the API: the bound tower's embeddings of the bare labels
        scores = model.encode("image", preprocess(image)[None]) @ model.encode("text-ko", korean(labels)).t()
    assert [label for label, _ in top] == [labels[i] for i in scores[0].argsort(descending=True).tolist()]
    assert main(["classify", image, "--model", str(out / "bound"), "--label-modality", "text-fr", "--labels",
                 "chat"]) == 2
    assert "text-fr" in capsys.readouterr().err
    # an index built with the CLIP alone answers Korean queries through the bound model's tower
    images = sorted({row["image"] for row in csv.DictReader(open(table, encoding="utf-8"))})
    assert main(["index", str(table.parent / "images"), "--model", str(folder), "--out", str(tmp_path / "index"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["search", str(tmp_path / "index"), "빨간 원", "--label-modality", "text-ko", "--model",
                 str(out / "bound"), "-k", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["query"] == {"text": "빨간 원", "modality": "text-ko"}
    with torch.no_grad():
        scores = model.encode("text-ko", korean(["빨간 원"])) @ model.encode(
            "image", torch.stack([preprocess(i) for i in images])).t()
    assert [r["path"] for r in printed["results"]] == [images[i] for i in scores[0].argsort(descending=True)[:3]]
    from fastapi.testclient import TestClient

    from clipforge.serve import ServeConfig, create_app

    with TestClient(create_app(tmp_path / "index", ServeConfig(model=str(out / "bound")))) as client:
        answer = client.get("/search", params={"q": "빨간 원", "k": 3, "modality": "text-ko"}).json()
        assert [r["name"] for r in answer["results"]] == [Path(r["path"]).name for r in printed["results"]]
        assert client.get("/search", params={"q": "x", "modality": "text-fr"}).status_code == 422
