"""Real clients on clipforge's exports: max differences against clipforge on the same weights and inputs.

Run:  python benchmarks/real_clients.py
Needs the test extras (transformers, onnxruntime, tokenizers) and open_clip_torch (--no-deps; its torchvision
imports are stubbed as in tests/conftest.py: create_model never calls them). Prints one row per client:
- transformers' zero-shot-image-classification pipeline on an HF export, per image mode (label probabilities;
  the pipeline converts to RGB before its processor, so clipforge is given the same RGB image);
- open_clip's create_model("local-dir:...") on the open_clip export (image and text features);
- onnxruntime + HF tokenizers on the ONNX export, without clipforge (text and image embeddings).
"""
from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipforge

LABELS = ["a cat", "a rocket", "a red square", "a dog"]


def images() -> dict[str, Image.Image]:
    """One 48x40 picture in each mode a user meets (gradient + a transparent corner where alpha exists)."""
    gen = np.random.default_rng(0)
    rgba = gen.integers(0, 256, (40, 48, 4), dtype=np.uint8)
    rgba[:10, :10, 3] = 0
    base = Image.fromarray(rgba, "RGBA")
    return {"RGB": base.convert("RGB"), "RGBA": base, "L": base.convert("L"), "LA": base.convert("LA"),
            "P": base.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)}


def pipeline_rows(model: torch.nn.Module, folder: Path) -> list[tuple[str, float]]:
    import transformers

    clipforge.save_pretrained(model, folder, format="hf")
    pipe = transformers.pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
    loaded, preprocess = clipforge.load(folder)
    tokens = clipforge.get_tokenizer(folder)([f"This is a photo of {label}." for label in LABELS])
    rows = []
    for mode, image in images().items():
        theirs = {r["label"]: r["score"] for r in pipe(image, candidate_labels=LABELS)}
        with torch.no_grad():
            logits = loaded.logit_scale.exp() * loaded.encode_image(preprocess(image.convert("RGB"))[None],
                                                                    normalize=True) @ loaded.encode_text(
                tokens, normalize=True).T
        ours = logits.softmax(-1)[0].tolist()
        rows.append((f"transformers pipeline, {mode} image: label probabilities",
                     max(abs(ours[i] - theirs[label]) for i, label in enumerate(LABELS))))
    return rows


def open_clip_rows(model: torch.nn.Module, folder: Path) -> list[tuple[str, float]]:
    import transformers  # noqa: F401  (imported before the torchvision stub below)

    class Unused(type):
        def __getattr__(cls, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return cls

    placeholder = Unused("Placeholder", (), {"__init__": lambda self, *a, **k: None})
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                 "torchvision.transforms.functional"):
        module = types.ModuleType(name)
        module.__getattr__ = lambda attr, p=placeholder: p
        sys.modules.setdefault(name, module)
    import open_clip

    clipforge.save_pretrained(model, folder, format="open_clip")
    theirs = open_clip.create_model(f"local-dir:{folder}").eval()
    pixels = torch.randn(4, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    tokens = clipforge.tokenize(["a photo of a dog.", "A rocket launching into SPACE!!", "🐱 cat", ""],
                                context_length=model.context_length)
    with torch.no_grad():
        return [("open_clip create_model('local-dir:'), image features",
                 float((theirs.encode_image(pixels) - model.encode_image(pixels)).abs().max())),
                ("open_clip create_model('local-dir:'), text features",
                 float((theirs.encode_text(tokens) - model.encode_text(tokens)).abs().max()))]


def onnx_rows(model: torch.nn.Module, folder: Path) -> list[tuple[str, float]]:
    import json

    import onnxruntime as ort
    from tokenizers import Tokenizer

    from clipforge.export.onnx import export_onnx

    export_onnx(model, folder, verify=False)
    config = json.loads((folder / "onnx_config.json").read_text())
    texts = ["a photo of a dog.", "A rocket launching into SPACE!!", "naïve café, it’s 42 — 🐱", ""]
    ids = np.array([e.ids for e in Tokenizer.from_file(str(folder / config["tokenizer"]["file"])).encode_batch(texts)])
    text = ort.InferenceSession(str(folder / config["text_encoder"]), providers=["CPUExecutionProvider"])
    image = ort.InferenceSession(str(folder / config["image_encoder"]), providers=["CPUExecutionProvider"])
    pixels = torch.randn(3, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_text = model.encode_text(clipforge.tokenize(texts, context_length=model.context_length), normalize=True)
        want_image = model.encode_image(pixels, normalize=True)
    got_text = text.run(["embeddings"], {"tokens": ids})[0]
    got_image = image.run(["embeddings"], {"pixels": pixels.numpy()})[0]
    return [("onnxruntime + tokenizer.json (no clipforge), text embeddings",
             float(np.abs(got_text - want_text.numpy()).max())),
            ("onnxruntime (no clipforge), image embeddings", float(np.abs(got_image - want_image.numpy()).max()))]


def main() -> None:
    torch.manual_seed(0)
    model = clipforge.create_model("cpu-vit-tiny-32")
    with torch.no_grad():  # trained-looking weights: every parameter away from its initial value
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += pipeline_rows(model, Path(tmp) / "hf")
        rows += open_clip_rows(model, Path(tmp) / "open_clip")
        rows += onnx_rows(model, Path(tmp) / "onnx")
    print("| client | max abs difference |\n| --- | --- |")
    for name, diff in rows:
        print(f"| {name} | {diff:.2e} |")


if __name__ == "__main__":
    main()
