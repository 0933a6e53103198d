"""What `clipforge index` and `search` check and report: the index's model, the device, skipped files, counts."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

import clipforge
from clipforge.cli.main import main
from clipforge.errors import ConfigError
from clipforge.search import ImageIndex, build_index, store
from synthetic import make_caption_set

SEARCH = Path(__file__).resolve().parents[1] / "src" / "clipforge" / "search"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny seeded model saved as a checkpoint folder."""
    out = tmp_path_factory.mktemp("model") / "tiny"
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=0), out)
    return out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """24 PIL-drawn shapes in data/images and their caption CSV data/captions.csv."""
    make_caption_set(tmp_path / "data", per_concept=1, name="captions.csv")
    return tmp_path / "data"


def test_search_refuses_a_model_other_than_the_indexs(data, model_dir, tmp_path, capsys):
    out = tmp_path / "index"
    build_index(data / "images", out, model=model_dir, progress=False)
    other = tmp_path / "other"
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=1), other)  # same dim, other weights
    assert main(["search", str(out), "a red circle", "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "was built with model" in err and str(model_dir.resolve()) in err and str(other.resolve()) in err
    assert main(["search", str(out), "a red circle", "--model", "cpu-vit-tiny-32", "-k", "1"]) == 2
    capsys.readouterr()
    assert main(["search", str(out), "a red circle", "--model", str(model_dir), "-k", "1"]) == 0  # the same one


def test_search_says_the_indexs_checkpoint_moved_and_suggests_model(data, model_dir, tmp_path, capsys):
    checkpoint, moved, out = tmp_path / "ckpt", tmp_path / "moved", tmp_path / "index"
    shutil.copytree(model_dir, checkpoint)
    build_index(data / "images", out, model=checkpoint, progress=False)
    checkpoint.rename(moved)
    assert main(["search", str(out), "a red circle"]) == 2
    err = capsys.readouterr().err
    assert str(checkpoint.resolve()) in err and "manifest.json" in err and "--model" in err
    assert "known names" not in err and "cpu-vit-tiny-32" not in err
    with pytest.warns(UserWarning, match="no longer exists"):
        assert main(["search", str(out), "a red circle", "--model", str(moved), "-k", "1"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    # serve reads the index's model too: the same message, not a list of registry names
    from clipforge.errors import SearchError
    from clipforge.serve.app import ServeConfig, load_state

    with pytest.raises(SearchError, match="manifest.json") as refused:
        load_state(out, ServeConfig())
    assert "known names" not in str(refused.value) and "clipforge index" in str(refused.value)
    # ... and following that advice works: the index records the new location, and serve loads it
    with pytest.warns(UserWarning, match="checkpoint moved"):
        stats = build_index(data / "images", out, model=moved, progress=False)
    assert stats.added == stats.updated == 0
    assert json.loads((out / "manifest.json").read_text())["model"] == str(moved.resolve())
    state = load_state(out, ServeConfig())
    try:
        assert state.index.model == str(moved.resolve())
    finally:
        for batcher in state.batchers.values():
            batcher.close()


def _add_rows(csv_path: Path, rows: list[tuple[str, str]]) -> None:
    with open(csv_path, "a", newline="") as handle:
        csv.writer(handle).writerows([(image, caption, "k") for image, caption in rows])


def test_index_json_names_skipped_files_and_the_skip_log_lists_them(data, model_dir, tmp_path, capsys):
    images, out = data / "images", tmp_path / "index"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "empty.jpg").write_bytes(b"")
    _add_rows(data / "captions.csv", [("images/broken.png", "x"), ("images/empty.jpg", "y"), ("images/gone.png", "z")])
    argv = ["index", str(data / "captions.csv"), "--model", str(model_dir), "--out", str(out), "--quiet"]
    assert main([*argv, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    want = {"corrupt_image": [str(images / "broken.png")], "empty_file": [str(images / "empty.jpg")],
            "missing_file": [str(images / "gone.png")]}  # missing and corrupt files kept apart
    assert stats["skipped_files"] == want and stats["total"] == 24
    assert stats["skipped"] == {reason: 1 for reason in want}
    log = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert log == sorted(({"path": paths[0], "reason": reason} for reason, paths in want.items()),
                         key=lambda entry: entry["path"])
    (images / "broken.png").unlink()
    (images / "empty.jpg").unlink()
    assert main(argv) == 0  # the log is this build's: two files now missing, none corrupt
    assert "skipped.jsonl" in capsys.readouterr().out
    assert {entry["reason"] for entry in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())} == {
        "missing_file"}


def test_an_up_to_date_index_still_checks_the_device(data, model_dir, tmp_path, capsys):
    out = tmp_path / "index"
    build_index(data / "images", out, model=model_dir, progress=False)
    with pytest.raises(ConfigError, match="cuda:99"):  # nothing to embed: the device is checked all the same
        build_index(data / "images", out, model=model_dir, progress=False, device="cuda:99")
    assert main(["index", str(data / "images"), "--model", str(model_dir), "--out", str(out), "--quiet",
                 "--device", "cuda:99"]) == 2
    assert "cuda:99" in capsys.readouterr().err


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way catches it."""


def test_resumed_rows_are_counted_once_even_when_their_caption_changed(data, model_dir, tmp_path, monkeypatch):
    csv_path, out = data / "captions.csv", tmp_path / "index"
    real_register, calls = store.register_shard, []

    def die_on_second_shard(con, name, rows):
        calls.append(name)
        if len(calls) == 2:  # the second shard is written, never recorded: the next run adopts it
            raise Killed
        real_register(con, name, rows)

    monkeypatch.setattr(store, "register_shard", die_on_second_shard)
    with pytest.raises(Killed):
        build_index(csv_path, out, model=model_dir, progress=False, shard_size=8)
    monkeypatch.undo()
    pending = store.read_shard(store.shard_files(out)[calls[1]]).paths[0]
    lines = csv_path.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if str((data / line.split(",")[0]).absolute()) == pending)
    lines[row] = f"{lines[row].split(',')[0]},a renamed thing,k"
    csv_path.write_text("\n".join(lines) + "\n")
    stats = build_index(csv_path, out, model=model_dir, progress=False, shard_size=8)
    assert (stats.resumed, stats.added, stats.updated, stats.unchanged, stats.total) == (8, 16, 0, 8, 24)
    index = ImageIndex.open(out)
    assert {index.record(int(i))["path"]: index.record(int(i))["caption"] for i in index.ids}[pending] == \
        "a renamed thing"


def test_the_index_schema_sql_lives_in_store_only():
    found = [f"{path.name}: {match.group(0)}" for path in sorted(SEARCH.glob("*.py")) if path.name != "store.py"
             for match in re.finditer(r"\.execute(many|script)?\(|\b(SELECT|INSERT|UPDATE|DELETE)\s", path.read_text())]
    assert found == []
