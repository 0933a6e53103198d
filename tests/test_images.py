"""One image decode policy: high bit depth scaled (not clipped, not refused), transparency by the checkpoint's
origin, bombs refused from the header — and the same outcome per file through train, index and serve."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers  # the preprocessing reference (test extra)
from PIL import Image

import clipforge
from clipforge.data.images import SampleError, decode_image, to_8bit
from clipforge.data.transforms import EvalTransform
from conftest import perturb_

GRADIENT = np.linspace(0, 1, 48 * 40).reshape(40, 48)


def _rgba() -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (61, 97, 4), dtype=np.uint8)
    pixels[:20, :, 3] = 0  # a fully transparent band, coloured underneath
    return Image.fromarray(pixels, "RGBA")


def mode_corpus() -> dict[str, Image.Image]:
    """One image per mode that real files come in: 8-bit with and without alpha, 16-bit, 32-bit int, float."""
    rgba = _rgba()
    palette = rgba.convert("RGB").convert("P")
    palette.info["transparency"] = 3
    return {
        "RGB": rgba.convert("RGB"), "RGBA": rgba, "L": rgba.convert("L"), "LA": rgba.convert("LA"), "P": palette,
        "I;16": Image.fromarray((GRADIENT * 65535).astype(np.uint16)),
        "I": Image.fromarray((GRADIENT * 4e9 - 2e9).astype(np.int32)),
        "F": Image.fromarray(GRADIENT.astype(np.float32)),
    }


def write_corpus(folder: Path) -> dict[str, Path]:
    """The mode corpus as files (PNG where the format holds the mode, else TIFF)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mode, image in mode_corpus().items():
        suffix = "tiff" if mode in ("I", "F") else "png"
        path = folder / f"{mode.replace(';', '_')}.{suffix}"
        image.save(path)
        paths[mode] = path
    return paths


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data): what a decompression bomb looks like up front."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IEND", b"")


def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    paths = write_corpus(tmp_path)
    assert Image.open(paths["I;16"]).mode == "I;16"
    for mode in ("I;16", "I", "F"):
        decoded = np.asarray(decode_image(paths[mode]))
        expected = np.rint(GRADIENT * 255)
        assert decoded.dtype == np.uint8 and np.abs(decoded - expected).max() <= 1, mode
    # Pillow alone clips: the 16-bit gradient turns almost all white.
    assert np.asarray(Image.open(paths["I;16"]).convert("L")).mean() > 240
    mid_grey = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert np.asarray(to_8bit(mid_grey)).max() == 128
    with pytest.raises(SampleError, match="unsupported_mode"):
        to_8bit(Image.new("La", (2, 2)))


def test_bomb_is_refused_from_its_header_whatever_its_size():
    for width, height in ((9000, 8000), (20000, 10000)):  # over 64 Mpx; the second trips Pillow's own check
        with pytest.raises(SampleError) as caught:
            decode_image(png_header_only(width, height))
        assert caught.value.reason == "too_many_pixels"


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA"])
@pytest.mark.parity
def test_hf_checkpoint_preprocesses_as_transformers_does(tmp_path_factory, mode):
    image = mode_corpus()[mode]
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    theirs = torch.as_tensor(processor(image, return_tensors="np").pixel_values[0])
    hf_dir = tmp_path_factory.mktemp("hf")
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32"), hf_dir, format="hf")
    _, preprocess = clipforge.load(hf_dir)
    assert preprocess.composite_white
    assert torch.equal(preprocess(image), theirs)
    if mode in ("LA", "P", "RGBA"):  # OpenAI's rule drops alpha: visibly different on these
        assert (EvalTransform(32)(image) - theirs).abs().max() > 0.5


def test_origin_rule_survives_conversion(tmp_path):
    model = clipforge.create_model("cpu-vit-tiny-32")
    clipforge.save_pretrained(model, tmp_path / "hf", format="hf")
    from_hf, _ = clipforge.load(tmp_path / "hf")
    clipforge.save_pretrained(from_hf, tmp_path / "converted")
    assert clipforge.load(tmp_path / "converted")[1].composite_white
    clipforge.save_pretrained(model, tmp_path / "native")
    assert not clipforge.load(tmp_path / "native")[1].composite_white  # OpenAI-exact for clipforge's own


@pytest.mark.parity
def test_hf_export_agrees_with_the_transformers_pipeline(tmp_path):
    # The pipeline opens images with transformers' `load_image`, which calls convert("RGB") before the
    # processor: transparency is dropped there, while CLIPImageProcessor alone composites on white. So the
    # pipeline is compared on what its processor receives; the processor itself is checked pixel-exact above.
    torch.manual_seed(0)
    model = perturb_(clipforge.create_model("cpu-vit-tiny-32")).eval()
    clipforge.save_pretrained(model, tmp_path, format="hf")
    labels = ["a cat", "a rocket", "a red square", "a dog"]
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(tmp_path), device="cpu")
    loaded, preprocess = clipforge.load(tmp_path)
    tokens = clipforge.get_tokenizer(tmp_path)([f"This is a photo of {label}." for label in labels])
    for mode in ("RGB", "L", "LA", "P", "RGBA"):
        image = mode_corpus()[mode]
        theirs = {row["label"]: row["score"] for row in pipe(image, candidate_labels=labels)}
        image = image.convert("RGB")
        with torch.no_grad():
            logits = loaded.logit_scale.exp() * loaded.encode_image(preprocess(image)[None], normalize=True) \
                @ loaded.encode_text(tokens, normalize=True).T
        ours = logits.softmax(-1)[0].tolist()
        assert max(abs(ours[i] - theirs[label]) for i, label in enumerate(labels)) < 1e-5, mode


def test_every_file_has_one_outcome_in_train_index_and_serve(tmp_path):
    from fastapi.testclient import TestClient

    from clipforge.data.captions import CaptionDataset
    from clipforge.search import ImageIndex, build_index
    from clipforge.serve import create_app

    paths = write_corpus(tmp_path / "images")
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    (tmp_path / "images" / "bomb.png").write_bytes(png_header_only(20000, 10000))
    model_dir = clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=0), tmp_path / "model")
    model, preprocess = clipforge.load(model_dir)
    rows = "".join(f"images/{p.name},a picture\n" for p in sorted((tmp_path / "images").iterdir()))
    (tmp_path / "captions.csv").write_text("image,caption\n" + rows)
    dataset = CaptionDataset(tmp_path / "captions.csv", preprocess, clipforge.get_tokenizer(model_dir))
    trained = {Path(dataset.paths[i]).name: dataset[i] for i in range(len(dataset))}
    stats = build_index(tmp_path / "images", tmp_path / "index", model=model_dir, progress=False)
    assert stats.skipped == {"empty_file": 1, "too_many_pixels": 1}
    index = ImageIndex.open(tmp_path / "index")
    with TestClient(create_app(tmp_path / "index")) as client:
        for mode, path in paths.items():
            sample = trained[path.name]
            assert isinstance(sample, dict), f"{mode}: training skipped it: {sample}"
            assert torch.equal(sample["pixels"], preprocess(path)), mode
            response = client.post("/embed/image", files={"file": (path.name, path.read_bytes())})
            assert response.status_code == 200, (mode, response.text)
            served = np.asarray(response.json()["embedding"], np.float32)
            with torch.no_grad():
                expected = model.encode_image(preprocess(path)[None], normalize=True)[0].numpy()
            assert np.abs(served - expected).max() < 1e-5, mode
            scores, ids = index.search(expected[None], len(index))  # unit vectors: a score of 1 means equal
            own = {Path(index.record(int(i))["path"]).name: float(s) for s, i in zip(scores[0], ids[0])}
            assert abs(own[path.name] - 1) < 1e-5, mode
        assert trained["empty.png"].reason == "empty_file" and trained["bomb.png"].reason == "too_many_pixels"
        assert client.post("/embed/image", files={"file": ("e.png", b"")}).status_code == 400
        assert client.post("/embed/image", files={"file": ("b.png", png_header_only(20000, 10000))}).status_code == 413
        assert client.post("/embed/image", files={"file": ("b.png", png_header_only(9000, 8000))}).status_code == 413
        assert client.post("/embed/image", files={"file": ("t.png", b"not an image")}).status_code == 415


def test_png_bytes_roundtrip_of_16_bit_through_serve_decode():
    from clipforge.serve.app import decode_upload

    buffer = io.BytesIO()
    mode_corpus()["I;16"].save(buffer, format="PNG")
    decoded = decode_upload(buffer.getvalue(), 50_000_000)
    assert decoded.mode == "L" and abs(np.asarray(decoded).mean() - 127.5) < 1
