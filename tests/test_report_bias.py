"""Markdown report writer, PNG plots and the gendered-variant bias probe (tiny fake data only)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import clipforge
from clipforge.evaluate.bias import GENDERS, bias_probe, load_gendered_groups
from clipforge.evaluate.report import (
    Section,
    markdown_table,
    plot_bars,
    plot_confusion,
    plot_examples,
    plot_robustness,
    plot_training_curves,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# matplotlib is a required dependency (the plots import it lazily): a missing one fails these tests.


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as img:
        assert img.width >= 300 and img.height >= 200


# --- markdown_table / write_report -------------------------------------------------------------------


def test_markdown_table_formats_cells_and_alignment():
    rows = [{"method": "zero-shot", "top1": 0.12345, "n": 10}, {"method": "a|b", "top1": None, "n": 3, "x": "y"}]
    assert markdown_table(rows).splitlines() == [
        "| method | top1 | n | x |",
        "| --- | ---: | ---: | --- |",
        "| zero-shot | 0.123 | 10 |  |",
        "| a\\|b |  | 3 | y |",
    ]
    assert markdown_table(rows, columns=["top1"], floatfmt=".1%").splitlines()[2] == "| 12.3% |"
    assert markdown_table([{"v": torch.tensor(0.5)}]).splitlines()[2] == "| 0.500 |"
    assert markdown_table([]) == ""


def test_write_report_writes_markdown_json_and_embeds_images(tmp_path):
    out = tmp_path / "run"
    inside = plot_bars({"a": {"x": 0.2}}, out / "bars.png", "t", "y")
    outside = plot_bars({"b": {"x": 0.4}}, tmp_path / "elsewhere" / "other (1).png", "t", "y")
    sections = [Section("Summary", "Plain *text*."),
                Section("Table", rows=[{"k": "a", "v": 1.0}], images=[inside, outside])]
    report = write_report(out, "My report", sections, {"acc": 0.5, "bad": math.nan, "path": out})
    text = report.read_text()
    assert report == out / "report.md"
    assert text.startswith("# My report\n\n## Summary\n\nPlain *text*.\n\n## Table\n\n| k | v |")
    assert "![bars](bars.png)" in text and "![other (1)](other%20%281%29.png)" in text
    assert (out / "other (1).png").read_bytes() == outside.read_bytes()  # copied in: the report is self-contained
    assert json.loads((out / "results.json").read_text()) == {"acc": 0.5, "bad": None, "path": str(out)}
    assert not list(out.glob(".*.tmp"))


# --- plots ---------------------------------------------------------------------------------------------


def test_plots_write_png(tmp_path):
    points = [{"name": m, "domain": d, "id_acc": a, "ood_acc": a * f}
              for m, a in [("CLIP zero-shot", 0.6), ("linear probe", 0.8)]
              for d, f in [("twitter", 0.9), ("fluent", 0.5)]]
    assert_png(plot_robustness(points, tmp_path / "robust.png"))
    assert_png(plot_bars({"held-out colour": {"label": 0.2, "template": 0.3, "ensemble": 0.35},
                          "seen": {"label": 0.5, "ensemble": 0.6}}, tmp_path / "bars.png", "Prompts", "top-1"))
    gen = torch.Generator().manual_seed(0)
    big = torch.randint(0, 5, (40, 40), generator=gen) + 20 * torch.eye(40, dtype=torch.long)
    assert_png(plot_confusion(big, [f"class {i}" for i in range(40)], tmp_path / "conf.png", max_classes=30))
    assert_png(plot_confusion(big[:4, :4].numpy(), list("abcd"), tmp_path / "conf_small.png"))
    with pytest.raises(ValueError):
        plot_confusion(big, ["a"], tmp_path / "bad.png")


def test_plot_training_curves_reads_runs(tmp_path):
    runs = []
    for name, offset in [("run-a", 0.0), ("run-b", 0.3)]:
        run = tmp_path / name
        run.mkdir()
        lines = [json.dumps({"step": s, "loss": 4 - s / 10 + offset, "lr": 1e-3}) for s in range(1, 21)]
        lines += [json.dumps({"step": 10, "val_loss": 3.0, "val_image_to_text_r1": 0.2, "val_pairs": 64.0}),
                  json.dumps({"step": 20, "val_loss": 2.5, "val_image_to_text_r1": 0.4}),
                  json.dumps({"step": 5, "loss": 9.9}),  # a resumed run re-logs a step: the last record wins
                  '{"step": 21, "lo']  # partial line of a run still writing
        (run / "metrics.jsonl").write_text("\n".join(lines))
        runs.append(run / "metrics.jsonl")
    assert_png(plot_training_curves(runs[0], tmp_path / "one.png"))
    assert_png(plot_training_curves(runs, tmp_path / "two.png", labels=["a", "b"]))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="loss"):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "x.png")


def test_plot_examples(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGBA", (48, 48), (255, 0, 0, 128)).save(path)
    images = [path, Image.new("RGB", (48, 48), "blue"), path]
    titles = ["red heart", "blue circle", "red heart"]
    preds = [[("red heart", 0.9), ("orange heart", 0.05), ("fire", 0.01)],
             [("blue heart", 0.6), ("blue circle", 0.3)], [("fire", 0.5), ("red heart", 0.2), ("x", 0.1)]]
    assert_png(plot_examples(images, titles, preds, tmp_path / "examples.png", cols=2))
    with pytest.raises(ValueError):
        plot_examples(images, titles[:1], preds, tmp_path / "bad.png")


# --- bias probe ----------------------------------------------------------------------------------------

GROUPS = {  # base concept -> gender -> (hexcode, label)
    "person cooking": {"man": ("m1", "man cooking"), "woman": ("w1", "woman cooking"),
                       "person": ("p1", "person cooking")},
    "person: red hair": {"man": ("m2", "man: red hair"), "woman": ("w2", "woman: red hair"),
                         "person": ("p2", "person: red hair")},
}


def write_concepts(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "concepts.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["hexcode", "label", "tags", "group", "subgroup", "split", "gender", "base_concept"])
        writer.writerow(["1f600", "grinning face", "face|grin", "smileys", "smiling", "seen", "", ""])
        for base, members in GROUPS.items():
            for gender, (hexcode, label) in members.items():
                writer.writerow([hexcode, label, "", "people", "", "seen", gender, base])
        # man only, no woman: not a group
        writer.writerow(["m3", "man juggling", "", "people", "", "seen", "man", "person juggling"])


def write_images(root: Path, style: str, hexcodes: list[str], seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    (root / "images" / style).mkdir(parents=True, exist_ok=True)
    for hexcode in hexcodes:
        colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=gen)) + (255,)
        Image.new("RGBA", (40, 40), colour).save(root / "images" / style / f"{hexcode}.png")


def test_load_gendered_groups(tmp_path):
    write_concepts(tmp_path)
    groups = load_gendered_groups(tmp_path / "concepts.csv")
    assert [g.base for g in groups] == list(GROUPS)
    assert groups[1].members == GROUPS["person: red hair"]


def hand_probe(model, tokenizer, preprocess, root: Path, codes_by_style: dict[str, list[str]]) -> dict:
    """The probe's numbers recomputed one image at a time: each image against its own group's three captions.

    Returns {scope: {gender: {images, accuracy, as_man, as_woman, as_person, prefers_man}}} for "all" and each
    style, after checking that no two top scores are near a tie (so the exact comparison is meaningful).
    """
    rows = []  # (style, true gender, credit per predicted gender, man-over-woman preference)
    with torch.no_grad():
        for style, codes in codes_by_style.items():
            for members in GROUPS.values():
                captions = [f"an emoji of {members[g][1]}." for g in GENDERS]
                text = torch.nn.functional.normalize(model.encode_text(tokenizer(captions)), dim=-1)
                for gender, (code, _) in members.items():
                    if code not in codes:
                        continue
                    pixels = preprocess(root / "images" / style / f"{code}.png")[None]
                    image = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)[0]
                    scores = (text @ image).tolist()
                    ranked = sorted(scores, reverse=True)
                    assert ranked[0] - ranked[1] > 1e-4 and abs(scores[0] - scores[1]) > 1e-4, (style, code, scores)
                    winner = GENDERS[scores.index(ranked[0])]
                    rows.append((style, gender, {g: float(g == winner) for g in GENDERS}, float(scores[0] > scores[1])))
    out = {}
    for scope in ["all", *codes_by_style]:
        out[scope] = {}
        for gender in GENDERS:
            mine = [r for r in rows if r[1] == gender and scope in ("all", r[0])]
            out[scope][gender] = {"images": len(mine), **{
                key: sum(pick(r) for r in mine) / len(mine) for key, pick in [
                    ("accuracy", lambda r: r[2][r[1]]), ("as_man", lambda r: r[2]["man"]),
                    ("as_woman", lambda r: r[2]["woman"]), ("as_person", lambda r: r[2]["person"]),
                    ("prefers_man", lambda r: r[3])]}}
    return out


def test_bias_probe_tiny_model(tmp_path):
    write_concepts(tmp_path)
    all_codes = [code for members in GROUPS.values() for code, _ in members.values()]
    write_images(tmp_path, "google", all_codes, seed=0)
    write_images(tmp_path, "twitter", all_codes[:3], seed=1)  # one group only
    # Seed 4: this random model's choices differ by gender and style, so mixing them up would show.
    model = clipforge.create_model("cpu-vit-tiny-32", seed=4).eval()
    tokenizer = clipforge.get_tokenizer("cpu-vit-tiny-32")
    preprocess = clipforge.EvalTransform(32, composite_white=True)
    result = bias_probe(model, tokenizer, tmp_path, ["google", "twitter", "absent"], preprocess, batch_size=4)
    assert (result["groups"], result["images"]) == (2, 9)
    assert result["styles"] == ["google", "twitter"] and result["missing_styles"] == ["absent"]
    assert [result["by_gender"][g]["images"] for g in GENDERS] == [3, 3, 3]
    assert result["by_style"]["google"]["images"] == 6 and result["by_style"]["twitter"]["images"] == 3
    want = hand_probe(model, tokenizer, preprocess, tmp_path, {"google": all_codes, "twitter": all_codes[:3]})
    keys = ("images", "accuracy", "as_man", "as_woman", "as_person", "prefers_man")
    scopes = {"all": result, **result["by_style"]}
    for scope, stats in scopes.items():
        for g in GENDERS:
            got = stats["by_gender"][g]
            assert {k: got[k] for k in keys} == pytest.approx(want[scope][g], abs=1e-12), (scope, g)
            assert got["chance"] == pytest.approx(1 / 3)  # every group here has all three variants
        man, woman, person = (want[scope][g] for g in GENDERS)
        assert stats["accuracy_gap"] == pytest.approx(man["accuracy"] - woman["accuracy"], abs=1e-12), scope
        assert stats["neutral_prefers_man"] == pytest.approx(person["prefers_man"], abs=1e-12), scope
        assert (stats["woman_as_man"], stats["man_as_woman"]) == pytest.approx(
            (woman["as_man"], man["as_woman"]), abs=1e-12), scope
    assert [(r["style"], r["gender"]) for r in result["rows"]] == [(scope, g) for scope in scopes for g in GENDERS]
    for row in result["rows"]:
        assert {k: row[k] for k in keys} == pytest.approx(want[row["style"]][row["gender"]], abs=1e-12), row
    assert "| style | gender | images |" in markdown_table(result["rows"])
    json.dumps(result)


class StubModel(torch.nn.Module):
    """Image features = the 'pixels' the stub preprocess returns; text features = basis vector per gender."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.flatten(1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.eye(3)[tokens[:, 0] - 1]


def stub_tokenizer(texts: list[str]) -> torch.Tensor:
    def gender(text: str) -> int:
        word = text.removeprefix("an emoji of ").split()[0].rstrip(":")
        return GENDERS.index(word)
    return torch.tensor([[gender(t) + 1] for t in texts])


# (style, hexcode) -> image feature in the (man, woman, person) caption basis
FEATURES = {
    ("s1", "m1"): (1, 0, 0), ("s1", "w1"): (0.9, 0.1, 0), ("s1", "p1"): (0.2, 0.1, 1),
    ("s1", "m2"): (0, 1, 0), ("s1", "w2"): (0, 1, 0), ("s1", "p2"): (0.5, 0.5, 0),  # p2: man/woman tie
    ("s2", "m1"): (0.1, 0.2, 1), ("s2", "w1"): (0, 1, 0), ("s2", "p1"): (0, 1, 0.5),  # s2 lacks group 2
}


def test_bias_probe_arithmetic_with_stub_model(tmp_path):
    write_concepts(tmp_path)
    for style in ("s1", "s2"):
        write_images(tmp_path, style, [code for s, code in FEATURES if s == style])

    def preprocess(path: Path) -> torch.Tensor:
        return torch.tensor(FEATURES[(path.parent.name, path.stem)], dtype=torch.float32)

    result = bias_probe(StubModel(), stub_tokenizer, tmp_path, ["s1", "s2"], preprocess, batch_size=4)
    assert (result["groups"], result["images"]) == (2, 9)
    expected = {  # accuracy, as_man, as_woman, as_person, prefers_man (man vs woman caption score)
        "man": (1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3),
        "woman": (2 / 3, 1 / 3, 2 / 3, 0, 1 / 3),
        "person": (1 / 3, 1 / 6, 1 / 2, 1 / 3, 1 / 2),  # the tie counts half man, half woman
    }
    keys = ("accuracy", "as_man", "as_woman", "as_person", "prefers_man")
    for gender, values in expected.items():
        assert tuple(result["by_gender"][gender][k] for k in keys) == pytest.approx(values), gender
    assert result["accuracy_gap"] == pytest.approx(-1 / 3)
    assert result["neutral_prefers_man"] == pytest.approx(0.5)
    assert (result["woman_as_man"], result["man_as_woman"]) == pytest.approx((1 / 3, 1 / 3))
    s1, s2 = result["by_style"]["s1"], result["by_style"]["s2"]
    assert [s1["by_gender"][g]["accuracy"] for g in GENDERS] == pytest.approx([0.5, 0.5, 0.5])
    assert (s1["accuracy_gap"], s1["neutral_prefers_man"]) == pytest.approx((0, 0.75))
    assert [s2["by_gender"][g]["accuracy"] for g in GENDERS] == pytest.approx([0, 1, 0])
    assert (s2["accuracy_gap"], s2["neutral_prefers_man"], s2["images"]) == pytest.approx((-1, 0, 3))
    row = next(r for r in result["rows"] if r["style"] == "s2" and r["gender"] == "woman")
    assert (row["images"], row["accuracy"], row["as_man"]) == (1, 1.0, 0.0)
