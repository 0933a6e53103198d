"""`clipforge bind --modality audio`: an audio tower trained against a frozen CLIP through (image, recording) pairs
only, through the real CLI: the CLIP's weights come back bit-identical, bad recordings are skipped and counted by
reason, and a binding killed with SIGKILL resumes to the uninterrupted run's losses."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import clipforge
from binding_runs import check_killed_binding_resumes, losses
from clipforge.bind import BindConfig, bind
from clipforge.cli.main import main
from conftest import perturb_
from synthetic import make_audio_pairs, make_caption_set

TOWER = {"width": 32, "heads": 2, "layers": 1, "mel_bins": 32, "clip_seconds": 0.5, "patch_size": 8,
         "patch_stride": 8}
FLAGS = ["--modality", "audio", "--batch-size", "8", "--workers", "0", "--warmup", "2", "--lr", "2e-3",
         "--tower", json.dumps(TOWER)]


@pytest.fixture(scope="module")
def audio_pairs(tmp_path_factory):
    """A CLIP checkpoint and (image, audio) pairs: two synthetic recordings of each image's concept."""
    root = tmp_path_factory.mktemp("bind_audio")
    model = perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=0), scale=0.1)
    folder = clipforge.save_pretrained(model, root / "clip")
    pairs = make_audio_pairs(root, make_caption_set(root, per_concept=2, seed=0))
    # an index of the images built with the CLIP before anything is bound to it
    assert main(["index", str(root / "images"), "--model", str(folder), "--out", str(root / "index"), "--quiet"]) == 0
    return folder, pairs


@pytest.fixture(scope="module")
def bound(audio_pairs, tmp_path_factory):
    """The binding of the pairs' audio through the real CLI (30 steps): its printed summary and output folder."""
    folder, table = audio_pairs
    out = tmp_path_factory.mktemp("bound") / "bind"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["bind", "--model", str(folder), "--train-data", str(table), "--key-column", "key", "--steps",
                     "30", "--output-dir", str(out), *FLAGS]) == 0
    printed = stdout.getvalue()
    return json.loads(printed[printed.index("{"):]), out


def test_bind_audio_trains_a_tower_and_leaves_the_clip_bit_identical(audio_pairs, bound):
    folder, table = audio_pairs
    summary, out = bound
    assert summary["skipped"] == {}
    model, _ = clipforge.load(summary["bound"])
    original, _ = clipforge.load(folder)
    assert model.modalities == ("image", "text", "audio")
    originals = original.state_dict()
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("bound_audio.")}
    assert kept.keys() == originals.keys() and all(torch.equal(v, originals[k]) for k, v in kept.items())
    preprocess = clipforge.get_preprocess(summary["bound"], "audio")
    rows = list(csv.DictReader(open(table)))
    clips = torch.stack([preprocess(table.parent / row["audio"]) for row in rows[:4]])
    with torch.no_grad():
        assert model.encode("audio", clips).shape == (4, 64)
    run = losses(out / "run")
    assert sum(run[s] for s in range(26, 31)) < sum(run[s] for s in range(1, 6))  # the tower learned


def test_classify_audio_files_against_text_labels(audio_pairs, bound, capsys):
    _, table = audio_pairs
    summary, _ = bound
    files = [str(table.parent / row["audio"]) for row in list(csv.DictReader(open(table)))[:3]]
    labels = ["a red circle", "a blue square", "a green cross"]
    assert main(["classify", *files, "--model", summary["bound"], "--modality", "audio", "--labels", ",".join(labels),
                 "--template", "{}", "--json", "--top", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    model, _ = clipforge.load(summary["bound"])
    preprocess = clipforge.get_preprocess(summary["bound"], "audio")
    tokenizer = clipforge.get_tokenizer(summary["bound"])
    with torch.no_grad():  # the API's ranking: the audio tower's embeddings against the frozen text tower's
        scores = model.encode("audio", torch.stack([preprocess(f) for f in files])) @ model.encode(
            "text", tokenizer(labels)).t()
    for row, score in zip(printed, scores):
        assert row["audio"] in files and [label for label, _ in row["top"]] == [
            labels[i] for i in score.argsort(descending=True).tolist()]
    (table.parent / "noise.ogg").write_bytes(b"not a recording")
    assert main(["classify", str(table.parent / "noise.ogg"), "--model", summary["bound"], "--modality", "audio",
                 "--labels", "a"]) == 2
    assert "not_audio" in capsys.readouterr().err
    assert main(["classify", files[0], "--model", summary["bound"], "--modality", "depth", "--labels", "a"]) == 2
    assert "'depth' has no preprocess here (this model's are image, audio)" in capsys.readouterr().err


def _bad_recordings(root, table) -> dict[str, str]:
    """One more image for each kind of bad recording, paired with it alone: reason -> the audio cell."""
    image = next(csv.DictReader(open(table)))["image"]
    (root / "bad").mkdir(exist_ok=True)
    flac = io.BytesIO()
    soundfile.write(flac, np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1, 16000,
                    format="FLAC")
    ogg, silent = io.BytesIO(), io.BytesIO()
    soundfile.write(ogg, np.zeros(16000, np.float32), 16000, format="OGG")
    soundfile.write(silent, np.zeros(0, np.float32), 16000, format="WAV")
    files = {"empty_file": b"", "not_audio": b"no sound here\n" * 40, "truncated_audio": flac.getvalue()[:6000],
             "corrupt_audio": ogg.getvalue()[:200], "empty_audio": silent.getvalue()}
    cells = {}
    for reason, data in files.items():
        (root / "bad" / f"{reason}.flac").write_bytes(data)
        cells[reason] = f"bad/{reason}.flac"
    soundfile.write(root / "bad" / "long.wav", np.zeros(32000, np.float32), 16000)
    cells["too_long"], cells["missing_file"] = "bad/long.wav", "bad/absent.wav"
    for reason in cells:
        shutil.copy(table.parent / image, root / "bad" / f"{reason}.png")
    return cells


def test_bad_recordings_are_skipped_and_counted_by_reason(audio_pairs, tmp_path):
    folder, table = audio_pairs
    root = table.parent
    cells = _bad_recordings(root, table)
    with_bad = root / "with_bad.csv"
    rows = list(csv.DictReader(open(table)))
    with open(with_bad, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "audio", "key"])
        writer.writerows([r["image"], r["audio"], r["key"]] for r in rows)
        writer.writerows([f"bad/{reason}.png", cell, f"bad-{reason}"] for reason, cell in cells.items())
    summary = bind(BindConfig(model=str(folder), modality="audio", train_data=str(with_bad), key_column="key",
                              epochs=1, batch_size=8, workers=0, warmup=2, tower=TOWER, max_audio_seconds=1.5,
                              output_dir=str(tmp_path / "bad")))
    assert summary["skipped"] == {reason: 1 for reason in cells}
    assert summary["steps"] >= 5 and summary["bound"]


def test_an_audio_binding_killed_with_sigkill_resumes_to_the_uninterruptedlosses(audio_pairs, tmp_path):
    folder, table = audio_pairs
    base = dict(model=str(folder), modality="audio", train_data=str(table), key_column="key", steps=10,
                batch_size=8, workers=0, warmup=2, lr=2e-3, tower=TOWER)
    check_killed_binding_resumes(base, FLAGS, tmp_path)


def test_search_by_audio_over_an_index_built_before_the_binding(audio_pairs, bound, capsys, tmp_path):
    folder, table = audio_pairs
    summary, _ = bound
    index = table.parent / "index"
    clip = str(table.parent / list(csv.DictReader(open(table)))[0]["audio"])
    capsys.readouterr()
    assert main(["search", str(index), "--audio", clip, "--model", summary["bound"], "-k", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["query"] == {"audio": clip}
    model, preprocess = clipforge.load(summary["bound"])
    images = sorted((table.parent / "images").glob("*.png"))
    with torch.no_grad():  # the same ranking as the bound model's own audio and image embeddings
        sound = model.encode("audio", clipforge.get_preprocess(summary["bound"], "audio")(clip)[None])
        scores = (sound @ model.encode("image", torch.stack([preprocess(str(i)) for i in images])).t())[0]
    expected = [str(images[i]) for i in scores.argsort(descending=True)[:5].tolist()]
    assert [r["path"] for r in printed["results"]] == expected
    other = clipforge.save_pretrained(perturb_(clipforge.create_model("cpu-vit-tiny-32", seed=1), scale=0.1),
                                      tmp_path / "other")
    assert main(["search", str(index), "--audio", clip, "--model", str(other)]) == 2
    assert "was built with model" in capsys.readouterr().err
    assert main(["search", str(index), "--audio", clip]) == 2  # the index's own model has no audio tower
    assert "has no audio tower" in capsys.readouterr().err


def test_serve_searches_by_uploaded_recording_with_the_bound_model(audio_pairs, bound, capsys):
    from fastapi.testclient import TestClient

    from clipforge.serve import ServeConfig, create_app

    folder, table = audio_pairs
    summary, _ = bound
    index = table.parent / "index"
    clip = table.parent / list(csv.DictReader(open(table)))[0]["audio"]
    assert main(["search", str(index), "--audio", str(clip), "--model", summary["bound"], "-k", "4", "--json"]) == 0
    expected = [Path(r["path"]).name for r in json.loads(capsys.readouterr().out)["results"]]
    app = create_app(index, ServeConfig(model=summary["bound"], max_audio_seconds=1.0))
    with TestClient(app) as client:
        found = client.post("/search/audio?k=4", files={"file": ("clip.wav", clip.read_bytes(), "audio/wav")})
        assert found.status_code == 200 and [r["name"] for r in found.json()["results"]] == expected
        long = io.BytesIO()
        soundfile.write(long, np.zeros(32000, np.float32), 16000, format="WAV")
        for data, status in ((b"", 400), (b"not audio" * 50, 415), (long.getvalue(), 413)):
            answer = client.post("/search/audio", files={"file": ("x.wav", data, "audio/wav")})
            assert answer.status_code == status, answer.json()
        assert "/search/audio" in client.get("/openapi.json").json()["paths"]
        assert client.get("/search", params={"q": "a red circle", "modality": "text-ko"}).status_code == 422
        health = client.get("/healthz").json()
        assert "audio" in health["batches"] and health["limits"]["model"] == "bound"  # a name, never a server path
    with TestClient(create_app(index)) as client:  # the index's own model: no audio tower, no audio endpoint
        assert client.post("/search/audio", files={"file": ("clip.wav", clip.read_bytes())}).status_code in (404, 405)


def test_eval_audio_zeroshot_and_retrieval_through_the_cli(audio_pairs, bound, tmp_path, capsys):
    _, table = audio_pairs
    summary, _ = bound
    rows = list(csv.DictReader(open(table)))
    audio_table = table.parent / "eval-audio.csv"
    with open(audio_table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "audio", "label", "language", "split"])
        for i, row in enumerate(rows):
            writer.writerow([row["image"], row["audio"], row["key"].replace("-", " "), "xx" if i % 3 else "yy",
                             "test"])
        writer.writerow([rows[0]["image"], "bad/not_audio.flac", "red circle", "xx", "test"])
        writer.writerow([rows[0]["image"], rows[0]["audio"], "red circle", "xx", "train"])  # filtered out
    (table.parent / "bad").mkdir(exist_ok=True)
    (table.parent / "bad" / "not_audio.flac").write_bytes(b"no sound here\n" * 40)
    common = ["--model", summary["bound"], "--modality", "audio", "--data", str(audio_table), "--split", "test",
              "--templates", "simple", "--json"]
    assert main(["eval", "--task", "zeroshot", *common, "--out", str(tmp_path / "zs")]) == 0
    zs = json.loads(capsys.readouterr().out)
    assert zs["recordings"] == len(rows) and zs["classes"] == 24 and zs["chance"] == pytest.approx(1 / 24)
    assert zs["skipped"] == {"not_audio": 1} and set(zs["ensemble"]["per_language"]) == {"xx", "yy"}
    assert 0 <= zs["image_zero_shot"] <= 1
    model, _ = clipforge.load(summary["bound"])
    preprocess = clipforge.get_preprocess(summary["bound"], "audio")
    tokenizer = clipforge.get_tokenizer(summary["bound"])
    classes = sorted({row["key"].replace("-", " ") for row in rows})
    with torch.no_grad():  # the bare-label top-1 by hand: recordings against the frozen text tower's labels
        sounds = model.encode("audio", torch.stack([preprocess(table.parent / row["audio"]) for row in rows]))
        guesses = (sounds @ model.encode("text", tokenizer(classes)).t()).argmax(-1).tolist()
    truth = [classes.index(row["key"].replace("-", " ")) for row in rows]
    assert zs["label"]["top1"] == pytest.approx(sum(g == t for g, t in zip(guesses, truth)) / len(rows))
    assert main(["eval", "--task", "retrieval", *common, "--out", str(tmp_path / "ret")]) == 0
    ret = json.loads(capsys.readouterr().out)
    assert ret["images"] == len({row["image"] for row in rows}) and ret["recordings"] == len(rows)
    assert all(0 <= ret[f"{d}_r{k}"] <= ret[f"{d}_r10"] <= 1 for d in ("audio_to_image", "image_to_audio")
               for k in (1, 5))
    assert main(["eval", "--task", "linear-probe", *common, "--out", str(tmp_path / "lp")]) == 2
