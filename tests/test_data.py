"""Training data: caption CSV/TSV, webdataset shards, bad-sample skipping, resumable sampler and loader."""
from __future__ import annotations

import csv
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipforge.data.captions import CaptionDataset, SampleError, Skipped, decode_image
from clipforge.data.loader import DataConfig, SkipCounter, build_from_config, build_train_loader, collate_samples
from clipforge.data.sampling import ResumableBatchSampler
from clipforge.data.shards import SHARD_STRIDE, ShardDataset
from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, TrainTransform

SIZE = 16
# 16-bit and float images are not among them: they are scaled to 8 bits (tests/test_images.py).
BAD_KINDS = {
    "missing_file": 1, "empty_file": 1, "corrupt_image": 1, "too_many_pixels": 1, "empty_caption": 1, "bad_encoding": 1,
}


def byte_tokenizer(texts: list[str]) -> torch.Tensor:
    """Stand-in tokenizer: UTF-8 bytes, zero padded, so a caption can be read back from its tokens."""
    out = torch.zeros(len(texts), 48, dtype=torch.long)
    for row, text in enumerate(texts):
        data = text.encode()[:48]
        out[row, : len(data)] = torch.tensor(list(data))
    return out


def text_of(tokens: torch.Tensor) -> str:
    return bytes(t for t in tokens.tolist() if t).decode()


def image_bytes(mode: str = "RGB", size: tuple[int, int] = (24, 20), color=None, fmt: str = "PNG") -> bytes:
    color = color if color is not None else {"RGB": (200, 30, 90), "CMYK": (0, 255, 0, 0)}.get(mode, 0)
    image = Image.new(mode, size, color)
    if mode == "RGB":  # some texture, so that truncation really cuts pixel data
        image.putdata([((x * 37) % 256, (x * 11) % 256, (x * 7) % 256) for x in range(size[0] * size[1])])
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def bad_images() -> dict[str, bytes]:
    """One file per image problem (name -> bytes), plus good ones."""
    big, medium = image_bytes(size=(64, 64)), image_bytes(size=(30, 30))
    return {
        "ok.png": image_bytes(), "ok2.jpg": image_bytes(fmt="JPEG"), "cmyk.jpg": image_bytes("CMYK", fmt="JPEG"),
        "zero.png": b"", "truncated.png": medium[: len(medium) // 2], "bomb.png": big,
        "i16.png": image_bytes("I;16"), "float.tiff": image_bytes("F", fmt="TIFF"),
    }


def write_csv(path: Path, header: list[str], rows: list[list[str]], delimiter: str = ",", extra: bytes = b"") -> Path:
    text = io.StringIO()
    writer = csv.writer(text, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(text.getvalue().encode() + extra)
    return path


def image_folder(tmp_path: Path, count: int) -> list[str]:
    (tmp_path / "img").mkdir(exist_ok=True)
    names = []
    for i in range(count):
        Image.new("RGB", (20 + i % 5, 18), (i * 9 % 256, 50, 100)).save(tmp_path / "img" / f"{i}.png")
        names.append(f"img/{i}.png")
    return names


def dataset(path: Path, **kwargs) -> CaptionDataset:
    return CaptionDataset(path, TrainTransform(SIZE), byte_tokenizer, **kwargs)


def batches_of(loader) -> list[tuple[list[int], torch.Tensor, torch.Tensor, Counter]]:
    return [(b["indices"].tolist(), b["pixels"], b["tokens"], b["skipped"]) for b in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) and x[3] == y[3] for x, y in zip(a, b)
    )


# Caption CSV / TSV


def test_csv_columns_grouped_captions_and_keys(tmp_path):
    names = image_folder(tmp_path, 3)
    rows = [[names[0], "a red dog", "dog"], [names[1], "x|y|", "cat"], [names[0], '"quoted" dog', "dog"],
            [names[2], "plain", ""]]
    path = write_csv(tmp_path / "data.tsv", ["file", "text", "concept"], rows, delimiter="\t")
    ds = dataset(path, image_column="file", caption_column="text", key_column="concept", caption_separator="|")
    assert len(ds) == 3 and ds.keys == ["dog", "cat", None]
    assert ds.captions == [["a red dog", '"quoted" dog'], ["x", "y"], ["plain"]]
    assert ds.dropped_captions == Counter(empty_caption=1)  # the trailing "|" left an empty piece
    sample = ds[0]
    assert sample["pixels"].shape == (3, SIZE, SIZE) and sample["tokens"].dtype == torch.long
    assert sample["key"] == "dog" and sample["index"] == 0 and text_of(sample["tokens"]) in ds.captions[0]
    raw = tmp_path / "raw.tsv"  # a raw dump: quotes are text, not CSV quoting
    raw.write_text(f'image\tcaption\n{names[0]}\t"hi" there\n{names[1]}\tsays "ok\n')
    assert dataset(raw, quoting=False).captions == [['"hi" there'], ['says "ok']]


def test_caption_choice_is_per_epoch_and_reproducible(tmp_path):
    names = image_folder(tmp_path, 12)
    rows = [[n, f"caption {i}-{j}"] for i, n in enumerate(names) for j in range(4)]
    path = write_csv(tmp_path / "data.csv", ["image", "caption"], rows)
    ds, again = dataset(path, seed=5), dataset(path, seed=5)
    epoch0 = [ds[(0, i)]["caption"] for i in range(12)]
    epoch1 = [ds[(1, i)]["caption"] for i in range(12)]
    assert epoch0 != epoch1 and all(c.startswith(f"caption {i}-") for i, c in enumerate(epoch1))
    assert epoch1 == [again[(1, i)]["caption"] for i in range(12)]
    assert torch.equal(ds[(1, 3)]["pixels"], again[(1, 3)]["pixels"])  # the crop is reproduced too
    again.set_epoch(1)
    assert again[3]["caption"] == epoch1[3]
    assert epoch0 != [dataset(path, seed=6)[(0, i)]["caption"] for i in range(12)]


def test_csv_bad_samples_are_skipped_and_counted(tmp_path):
    for name, data in bad_images().items():
        (tmp_path / name).write_bytes(data)
    rows = [["ok.png", "fine"], ["ok2.jpg", "fine too"], ["cmyk.jpg", "cmyk converts"], ["gone.png", "missing"],
            ["zero.png", "empty file"], ["truncated.png", "cut"], ["bomb.png", "big"], ["i16.png", "16 bit"],
            ["float.tiff", "float"], ["ok.png", "  "]]
    # A caption that is not UTF-8 (Latin-1 bytes) and an empty caption on its own image.
    path = write_csv(tmp_path / "data.csv", ["image", "caption"], rows,
                     extra=b"ok2.jpg,caf\xe9\n./ok.png,x\nempty.png, \n")
    (tmp_path / "empty.png").write_bytes(image_bytes())
    ds = dataset(path, max_pixels=1000)
    assert len(ds) == 10  # ok.png rows grouped (also via ./ok.png); the bad-byte caption joins ok2.jpg
    assert ds.dropped_captions == Counter(empty_caption=1, bad_encoding=1)
    sampler = ResumableBatchSampler(len(ds), 2, seed=1)
    counter = SkipCounter()
    for batch in build_train_loader(ds, sampler):
        counter.update(batch)
        assert batch["pixels"].shape[0] == len(batch["indices"]) == batch["tokens"].shape[0]
    assert counter.total == Counter({k: v for k, v in BAD_KINDS.items() if k != "bad_encoding"})
    assert counter.seen_total == 10 and "too_many_pixels=1" in counter.report()
    latin = write_csv(tmp_path / "latin.csv", ["image", "caption"], [], extra=b"ok.png,caf\xe9\n")
    item = dataset(latin)[0]
    assert isinstance(item, Skipped) and item.reason == "bad_encoding" and "ok.png" in item.detail


def test_decode_image_honours_pillow_bomb_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)
    for size in ((15, 15), (40, 40)):  # Pillow's warning range and its error range
        with pytest.raises(SampleError) as error:
            decode_image(image_bytes(size=size))
        assert error.value.reason == "too_many_pixels"


def test_composite_white_passes_through(tmp_path):
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "emoji.png")
    path = write_csv(tmp_path / "d.csv", ["image", "caption"], [["emoji.png", "smile"]])
    pixels = dataset(path, composite_white=True)[0]["pixels"]
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[:, 0, 0], white, atol=1e-5)
    assert not torch.allclose(dataset(path)[0]["pixels"][:, 0, 0], white, atol=1e-2)


def test_csv_startup_errors(tmp_path):
    with pytest.raises(ValueError, match="not found.*nope.csv"):
        dataset(tmp_path / "nope.csv")
    path = write_csv(tmp_path / "d.csv", ["filepath", "title"], [["a.png", "x"]])
    with pytest.raises(ValueError, match=r"d\.csv.*missing column.*'image'.*found.*'filepath', 'title'"):
        dataset(path)
    with pytest.raises(ValueError, match="empty dataset"):
        dataset(write_csv(tmp_path / "e.csv", ["image", "caption"], []))
    (tmp_path / "blank.csv").write_bytes(b"")
    with pytest.raises(ValueError, match="blank.csv"):
        dataset(tmp_path / "blank.csv")
    with pytest.raises(ValueError, match="delimiter"):
        dataset(write_csv(tmp_path / "d.txt", ["image", "caption"], [["a", "b"]]))


# Shards


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_shard_bad_samples_and_bad_shards_are_skipped_and_counted(tmp_path):
    images = bad_images()
    members = [
        ("000.png", images["ok.png"]), ("000.txt", b"fine"),
        ("001.jpg", images["ok2.jpg"]), ("001.json", json.dumps({"caption": ["one", "two"], "id": 7}).encode()),
        ("002.txt", b"no image"), ("003.png", b""), ("003.txt", b"zero"),
        ("004.png", images["truncated.png"]), ("004.txt", b"cut"), ("005.png", images["bomb.png"]), ("005.txt", b"big"),
        ("006.png", images["i16.png"]), ("006.txt", b"16 bit"), ("007.jpg", images["cmyk.jpg"]), ("007.txt", b"cmyk"),
        ("008.png", images["ok.png"]), ("008.txt", b"   "), ("009.png", images["ok.png"]), ("009.txt", b"caf\xe9"),
        ("010.png", images["ok.png"]), ("010.json", b"{not json"),
        ("011.webp", image_bytes(fmt="WEBP")), ("011.json", json.dumps({"text": "webp", "id": 3}).encode()),
    ]
    write_tar(tmp_path / "s-0.tar", members)
    good = write_tar(tmp_path / "full.tar",
                     [m for i in range(4) for m in ((f"{i}.png", images["ok.png"]), (f"{i}.txt", b"t"))])
    with tarfile.open(good) as tar:
        cut = tar.getmember("2.png").offset_data + 10
    (tmp_path / "s-1.tar").write_bytes(good.read_bytes()[:cut])  # truncated inside a member
    (tmp_path / "s-2.tar").write_bytes(b"this is not a tar file\n" * 100)
    ds = ShardDataset(str(tmp_path / "s-{0..2}.tar"), TrainTransform(SIZE), byte_tokenizer, max_pixels=1000,
                      key_field="id", rank=0, world_size=1)
    items = list(ds)
    kept = [s for s in items if not isinstance(s, Skipped)]
    skipped = Counter(s.reason for s in items if isinstance(s, Skipped))
    assert skipped.pop("bad_shard") == 2  # one per shard with read errors
    bad = dict(BAD_KINDS, bad_encoding=2)
    assert skipped == Counter(bad)
    from_first = sorted(s["index"] for s in kept if s["index"] < SHARD_STRIDE)
    assert from_first == [0, 1, 6, 7, 11]  # 6: the 16-bit PNG, scaled to 8 bits
    assert {s["key"] for s in kept if s["index"] in (1, 11)} == {"7", "3"}
    assert sorted(s["index"] - SHARD_STRIDE for s in kept if s["index"] >= SHARD_STRIDE) == [0, 1]  # before the cut
    assert all(s["pixels"].shape == (3, SIZE, SIZE) for s in kept)
    loader = build_train_loader(ds, None, 0, batch_size=4)
    counter = SkipCounter()
    for batch in loader:
        counter.update(batch)
    assert counter.seen_total == len(items) and counter.total["empty_file"] == 1


def shard_set(tmp_path: Path, shards: int = 4, per_shard: int = 5) -> str:
    png = image_bytes()
    for s in range(shards):
        members = []
        for i in range(per_shard):
            members += [(f"{s}-{i:03d}.png", png), (f"{s}-{i:03d}.txt", f"shard {s} sample {i}".encode())]
        write_tar(tmp_path / f"part-{s:03d}.tar", members)
    return str(tmp_path / f"part-{{000..{shards - 1:03d}}}.tar")


def shard_dataset(pattern, **kwargs) -> ShardDataset:
    return ShardDataset(pattern, TrainTransform(SIZE), byte_tokenizer, seed=3, **kwargs)


def test_shards_split_over_ranks_and_shuffle_per_epoch(tmp_path):
    pattern = shard_set(tmp_path)
    ranks = [shard_dataset(pattern, rank=r, world_size=2) for r in range(2)]
    seen = [[s["index"] for s in ds] for ds in ranks]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 20
    orders = set()
    for epoch in range(4):
        ranks[0].set_epoch(epoch)
        orders.add(tuple(n for n, _ in ranks[0].shards_for(epoch)))
    assert len(orders) > 1
    ranks[0].set_epoch(0)
    assert [s["index"] for s in ranks[0]] == seen[0]


def test_shard_startup_errors(tmp_path):
    pattern = shard_set(tmp_path, shards=2)
    with pytest.raises(ValueError, match="no shard files match"):
        shard_dataset(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(ValueError, match=r"1 of 3 shards not found.*part-002\.tar"):
        shard_dataset(str(tmp_path / "part-{000..002}.tar"))
    with pytest.raises(ValueError, match="missing.tar"):
        shard_dataset([str(tmp_path / "part-000.tar"), str(tmp_path / "missing.tar")])
    with pytest.raises(ValueError, match="2 shards cannot be split over 3 ranks"):
        shard_dataset(pattern, rank=0, world_size=3)


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_loader_resumes_exactly(tmp_path, workers):
    pattern = shard_set(tmp_path)
    loader = build_train_loader(shard_dataset(pattern, shuffle_buffer=3), None, workers, batch_size=2)
    loader.set_epoch(1)
    full, state = [], None
    for step, batch in enumerate(loader):
        full.append((batch["indices"].tolist(), batch["pixels"]))
        if step == 2:
            state = loader.state_dict()
    assert state["epoch"] == 1 and state["batches"] == 3 and state["samples"] == 6
    assert sorted(i for b in full for i in b[0]) == sorted(s * SHARD_STRIDE + i for s in range(4) for i in range(5))
    resumed = build_train_loader(shard_dataset(pattern, shuffle_buffer=3), None, workers, batch_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # the same epoch keeps the resume point
    rest = [(b["indices"].tolist(), b["pixels"]) for b in resumed]
    assert [r[0] for r in rest] == [f[0] for f in full[3:]]
    assert all(torch.equal(r[1], f[1]) for r, f in zip(rest, full[3:]))
    resumed.set_epoch(2)
    assert sum(len(b["indices"]) for b in resumed) == 20  # the next epoch starts from the beginning


# Sampler


def test_sampler_ranks_partition_each_global_batch():
    ranks = [ResumableBatchSampler(50, 3, world_size=4, rank=r, seed=7) for r in range(4)]
    plans = [list(s) for s in ranks]
    assert all(len(p) == len(s) == 4 for p, s in zip(plans, ranks))  # 50 // 12, the rest dropped
    for step in range(4):
        shares = [plans[r][step] for r in range(4)]
        assert all(len(s) == 3 for s in shares)
        assert sum(shares, []) == ranks[0].global_batches()[step].tolist()
    flat = [i for p in plans for b in p for i in b]
    assert len(flat) == len(set(flat)) == 48
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != plans[0]
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ResumableBatchSampler(10, 3, world_size=4)


def test_sampler_resumes_with_identical_batches():
    sampler = ResumableBatchSampler(40, 4, world_size=2, rank=1, seed=2)
    sampler.set_epoch(3)
    batches, it = [], iter(sampler)
    for _ in range(2):
        batches.append(next(it))
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["batches"] == 2
    rest = list(it)
    fresh = ResumableBatchSampler(40, 4, world_size=2, rank=1, seed=2)
    fresh.load_state_dict(state)
    fresh.set_epoch(3)
    assert fresh.resume_point() == 2 and list(fresh) == rest
    assert list(fresh) == batches + rest  # the resume point applies to one pass only
    with pytest.raises(ValueError, match="global_batch_size"):
        ResumableBatchSampler(40, 2, world_size=2, seed=2).load_state_dict(state)
    elastic = ResumableBatchSampler(40, 8, world_size=1, seed=2)  # same global batch on one rank
    elastic.load_state_dict(state)
    assert [b[4:] for b in elastic] == rest


def test_sampler_concept_key_constraint():
    keys = [f"k{i % 6}" if i < 60 else (None if i % 2 else f"u{i}") for i in range(120)]
    sampler = ResumableBatchSampler(120, 4, world_size=2, seed=1, keys=keys)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        plan = sampler.global_batches()
        for batch in plan.tolist():
            named = [keys[i] for i in batch if keys[i] is not None]
            assert len(named) == len(set(named))
        assert len(set(plan.ravel().tolist())) == plan.size >= 0.9 * 120
        assert len(sampler) == len(plan)
    again = ResumableBatchSampler(120, 4, world_size=2, seed=1, keys=keys)
    again.set_epoch(2)
    assert (again.global_batches() == plan).all()
    with pytest.raises(ValueError, match="distinct keys"):
        ResumableBatchSampler(8, 4, world_size=2, keys=["a", "b"] * 4)


# Loader


def test_loader_workers_match_and_resume(tmp_path):
    names = image_folder(tmp_path, 14)
    rows = [[n, f"caption {i} {j}"] for i, n in enumerate(names) for j in range(2)] + [["img/gone.png", "gone"]]
    path = write_csv(tmp_path / "data.csv", ["image", "caption"], rows)
    runs = {}
    for workers in (0, 2):
        loader = build_train_loader(dataset(path, seed=4), ResumableBatchSampler(15, 3, seed=4), workers)
        runs[workers] = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            runs[workers].append(batches_of(loader))
        if workers:
            loader.set_epoch(1)
            for step, _ in enumerate(loader):
                if step == 1:
                    state = loader.state_dict()
    assert same_batches(runs[0][0], runs[2][0]) and same_batches(runs[0][1], runs[2][1])
    assert not same_batches(runs[0][0], runs[0][1])
    assert sum(sum(b[3].values()) for b in runs[0][0]) == 1  # the missing image, once per epoch
    assert state == {"epoch": 1, "batches": 2, "seed": 4, "global_batch_size": 3}
    resumed = build_train_loader(dataset(path, seed=4), ResumableBatchSampler(15, 3, seed=4), 2)
    resumed.load_state_dict(state)
    assert same_batches(batches_of(resumed), runs[0][1][2:])


def test_collate_and_skip_counter():
    sample = {"pixels": torch.zeros(3, 4, 4), "tokens": torch.ones(5, dtype=torch.long), "key": "k", "index": 3}
    batch = collate_samples([sample, Skipped("missing_file", 1, "a.png"), Skipped("missing_file", 2, "b.png")])
    assert batch["pixels"].shape == (1, 3, 4, 4) and batch["indices"].tolist() == [3] and batch["keys"] == ["k"]
    assert batch["skipped"] == Counter(missing_file=2)
    empty = collate_samples([Skipped("empty_caption", 0)])
    assert empty["pixels"].numel() == 0 and len(empty["indices"]) == 0
    counter = SkipCounter()
    counter.update(batch)
    counter.update(empty)
    assert counter.report() == (
        "skipped this epoch 3/4 (75.00%) [missing_file=2, empty_caption=1]; in total 3/4 (75.00%) [missing_file=2, "
        "empty_caption=1]"
    )
    assert counter.epoch_total() == 3 and counter.totals() == {"missing_file": 2, "empty_caption": 1}
    assert counter.report_epoch() == "3/4 (75.00%) [missing_file=2, empty_caption=1]"
    assert SkipCounter().report_total() == ""
    counter.new_epoch()
    counter.update(collate_samples([sample]))
    assert counter.report().startswith("skipped this epoch 0/1 (0.00%); in total 3/5")
    restored = SkipCounter()
    restored.load_state_dict(counter.state_dict())
    assert restored.report() == counter.report() and len(counter.examples) == 0


def test_build_from_config_with_clip_tokenizer(tmp_path):
    from clipforge.text.tokenizer import default_tokenizer

    names = image_folder(tmp_path, 4)
    rows = [[n, "word " * 100, f"c{i % 2}"] for i, n in enumerate(names)]  # over 77 tokens: truncated
    write_csv(tmp_path / "d.csv", ["image", "caption", "concept"], rows)
    config = DataConfig(str(tmp_path / "d.csv"), key_column="concept", unique_keys=True, batch_size=2,
                        workers=0, image_size=SIZE)
    batches = list(build_from_config(config, default_tokenizer()))
    assert len(batches) == 2 and all(len(set(b["keys"])) == 2 for b in batches)
    assert batches[0]["tokens"].shape == (2, 77) and batches[0]["pixels"].shape == (2, 3, SIZE, SIZE)
