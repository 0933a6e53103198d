"""ONNX export: the image and text towers as two graphs with a dynamic batch, checked against PyTorch.

The output folder is usable without the checkpoint: beside the graphs it holds the tokenizer files and
`onnx_config.json` (preprocessing, input/output names, dimensions), which `OnnxCLIP` reads back.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipforge.data.images import load_image
from clipforge.data.transforms import eval_geometry
from clipforge.errors import ConfigError, ExportError, MissingDependency
from clipforge.export.onnx_int8 import quantize_graphs
from clipforge.model.clip import CLIP
from clipforge.model.config import PreprocessConfig
from clipforge.model.towers import tokenizer_for
from clipforge.text import TOKENIZERS, Tokenizer

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
CONFIG_FILE = "onnx_config.json"
DEFAULT_OPSET = 18
PARITY_ATOL = 1e-4  # fp32: the graphs run the same ops, so anything larger is an export bug


class ImageEncoder(nn.Module):
    """pixels [B, 3, S, S] -> (features, L2-normalised embeddings)."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.encode_image(pixels)
        return features, F.normalize(features, dim=-1)


class TextEncoder(nn.Module):
    """tokens [B, L] -> (features, L2-normalised embeddings), without encode_text's data-dependent trim.

    encode_text cuts the sequence after the longest EOT, a shape that depends on the token values and
    so cannot be traced; running the full length is exact because the mask is causal and pooling reads
    the EOT position only.
    """

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.text_tower.untrimmed(tokens.long())
        return features, F.normalize(features, dim=-1)


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, seq_dim: bool, opset: int) -> None:
    """Export one tower with the torch.export-based exporter; batch (and sequence) dimensions stay dynamic."""
    shapes: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=65536)}
    if seq_dim:
        shapes[1] = torch.export.Dim("length", min=2, max=int(example.shape[1]))
    # The exporter prints its progress and warns about deprecations and torchvision ops: not the user's concern.
    chatter = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                          output_names=["features", "embeddings"], dynamic_shapes=(shapes,),
                          opset_version=opset, dynamo=True, verbose=False, optimize=True)


def example_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Random token rows of different lengths: SOT, ids, the highest id as EOT, zero padding."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n = int(torch.randint(1, max(2, length - 1), (1,), generator=gen))
        tokens[row, 0] = vocab - 2
        tokens[row, 1:n] = torch.randint(1, vocab - 2, (n - 1,), generator=gen)
        tokens[row, n] = vocab - 1
    return tokens


# A client that rounds the long side differently (e.g. to nearest) sees other pixels: measured 0.026 in the embedding.
RESIZE_RULE = ("bicubic (Pillow, antialiased), short side to image_size, long side int(image_size * long / short) "
               "(rounded down, as torchvision); an image whose short side is image_size is not resized")
CROP_RULE = ("center: left = round((width - image_size) / 2), top = round((height - image_size) / 2) (Python's "
             "round, halves to even); a smaller image is first padded with black, centred")
def require_onnx(verify: bool = True) -> None:
    """ImportError naming the missing packages of the onnx extra, before any work is done."""
    needed = ("onnx", "onnxscript") + (("onnxruntime",) if verify else ())  # torch's exporter imports onnxscript
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependency(f"ONNX export needs {', '.join(missing)}: pip install 'clipforge[onnx]'")


def export_onnx(model: CLIP | str | Path, out_dir: str | Path, opset: int = DEFAULT_OPSET, verify: bool = True,
                atol: float = PARITY_ATOL, source: str | Path | None = None, int8: bool = False,
                tokenizer: Any = None) -> dict[str, Any]:
    """Write image/text ONNX graphs, tokenizer and config into out_dir; return the config (with parity results).

    `tokenizer`: the model's (as `clipforge.get_tokenizer` gives it); else `source`, where a loaded `model`
    came from, so its own tokenizer files are used, else the text tower's default. `int8`: also write
    dynamically quantised graphs (`*.int8.onnx`, what the config then names), refused below cosine 0.99 to fp32.
    The graphs are traced on the model's device and checked against it on the CPU (`_on_cpu`).
    """
    import clipforge

    require_onnx(verify)
    if not isinstance(model, nn.Module):
        source = str(model)
        model, _ = clipforge.load(model)
    if tokenizer is None:
        tokenizer = (clipforge.get_tokenizer(source, context_length=model.context_length) if source
                     else tokenizer_for(model.config, context_length=model.context_length))
    model = model.float().eval()  # fp32 graphs: half precision on CPU runtimes is slow or missing
    if getattr(model, "head", None) is not None:
        warnings.warn("ONNX export writes the two encoders; this model's classification head (a fine-tuned "
                      "classifier) is not in the graphs: apply head.weight / head.bias to the normalised image "
                      "embedding, or classify in clipforge", stacklevel=2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size, device = model.image_size, next(model.parameters()).device
    with torch.no_grad():
        _export(ImageEncoder(model), torch.randn(2, 3, size, size, device=device), out / IMAGE_FILE, "pixels", False,
                opset)
        tokens = example_tokens(2, model.context_length, tokenizer.vocab_size).to(device)
        _export(TextEncoder(model), tokens, out / TEXT_FILE, "tokens", True, opset)
    config = _export_config(model, tokenizer, out, opset)
    with _on_cpu(model):  # one move for both checks
        if verify:
            config["parity"] = verify_onnx(model, out, tokenizer.vocab_size, atol=atol)
        if int8:
            config["int8"] = quantize_graphs(model, out, config, example_tokens)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return config


def _geometry(preprocess: PreprocessConfig) -> dict[str, str]:
    """The resize (and crop) rule in words, with the mode names `OnnxCLIP.preprocess` reads."""
    if preprocess.resize == "squash":
        return {"resize_mode": "squash", "interpolation": preprocess.interpolation, "crop": "none",
                "resize": f"{preprocess.interpolation} (Pillow, antialiased) of the whole image to image_size x "
                          "image_size, aspect ratio not kept (SigLIP)"}
    return {"resize_mode": "crop", "interpolation": "bicubic", "resize": RESIZE_RULE, "crop": CROP_RULE}


def _export_config(model: CLIP, tokenizer: Tokenizer, out: Path, opset: int) -> dict[str, Any]:
    """What a runtime needs beside the graphs: inputs, preprocessing rules, the tokenizer (whose files it writes)."""
    size = model.image_size
    preprocess = getattr(model, "preprocess_config", None) or PreprocessConfig()
    tokenizer.save(out)
    return {
        "format": "clipforge-onnx",
        "image_encoder": IMAGE_FILE,
        "text_encoder": TEXT_FILE,
        "embed_dim": model.config.embed_dim,
        "logit_scale": float(model.logit_scale.detach().exp()),
        # SigLIP: probabilities are sigmoid(logit_scale * cos + logit_bias), one per label
        **({"logit_bias": float(model.logit_bias.detach())} if model.logit_bias is not None else {}),
        "inputs": {"image": {"name": "pixels", "dtype": "float32", "shape": ["batch", 3, size, size]},
                   "text": {"name": "tokens", "dtype": "int64", "shape": ["batch", "length"]}},
        "outputs": ["features", "embeddings"],
        "preprocess": {"image_size": size, **_geometry(preprocess),
                       "composite_white": preprocess.composite_white,
                       "transparency": "composite on white, then resize" if preprocess.composite_white
                       else "resize and crop in the file's mode, then drop alpha (RGB)",
                       "mean": list(preprocess.mean), "std": list(preprocess.std), "scale": 1 / 255, "layout": "NCHW"},
        "tokenizer": {"kind": tokenizer.kind, "context_length": model.context_length,
                      "vocab_size": tokenizer.vocab_size, "pooling": model.text_tower.pooling,
                      **tokenizer.save_portable(out)},
        "opset": opset,
        # torch's exporter keeps the weights beside each graph; a runtime finds them by this relative name.
        "external_data": {name: f"{name}.data" for name in (IMAGE_FILE, TEXT_FILE) if (out / f"{name}.data").is_file()},
    }


@contextlib.contextmanager
def _on_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """`model` moved to the CPU for the block, then back where it was.

    onnxruntime runs the graphs on the CPU here, and the PyTorch reference must too: on a GPU other kernels
    compute it (cuDNN convolutions may use TF32 by default), so the difference would measure the GPU, not
    the export.
    """
    device = next(model.parameters()).device
    try:
        yield model.cpu()
    finally:
        model.to(device)


def verify_onnx(model: CLIP, out_dir: str | Path, vocab: int, atol: float = PARITY_ATOL,
                batches: Sequence[int] = (1, 3)) -> dict[str, Any]:
    """Max |ONNX - PyTorch| of both towers over the given batch sizes, int32 and int64 tokens; raises above atol.

    Both run on the CPU: a model on another device is moved there for the check and back.
    """
    import onnxruntime as ort

    out = Path(out_dir)
    image = ort.InferenceSession(str(out / IMAGE_FILE), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(out / TEXT_FILE), providers=["CPUExecutionProvider"])
    diffs: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), _on_cpu(model):
        for batch in batches:
            pixels = torch.randn(batch, 3, model.image_size, model.image_size, generator=gen)
            want = model.encode_image(pixels).numpy()
            got = image.run(["features"], {"pixels": pixels.numpy()})[0]
            diffs[f"image_b{batch}"] = float(np.abs(got - want).max())
            tokens = example_tokens(batch, model.context_length, vocab, seed=batch)
            want = model.encode_text(tokens).numpy()  # the real (trimming) path: the reference
            for dtype in (np.int64, np.int32):
                got = text.run(["features"], {"tokens": as_token_array(tokens.numpy().astype(dtype))})[0]
                diffs[f"text_b{batch}_{np.dtype(dtype).name}"] = float(np.abs(got - want).max())
    worst = max(diffs.values())
    if not worst <= atol:  # `not <=` also catches NaN
        raise ExportError(f"ONNX output differs from PyTorch by {worst:.3g} > {atol:g}: {diffs}")
    return {"max_abs_diff": worst, "atol": atol, "by_check": diffs}


def as_token_array(tokens: Any) -> np.ndarray:
    """Token ids as the graph's int64 [B, L] (int32 from other tokenizers or runtimes is widened)."""
    array = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise ConfigError(f"tokens must be an integer [batch, length] array, got {array.dtype} {array.shape}")
    return array.astype(np.int64, copy=False)


class OnnxCLIP:
    """Run an exported folder with onnxruntime alone: preprocess, tokenize, encode (numpy in and out)."""

    def __init__(self, directory: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        if not (self.directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{self.directory} has no {CONFIG_FILE}: not a clipforge ONNX export")
        self.config = json.loads((self.directory / CONFIG_FILE).read_text())
        self.image_session = ort.InferenceSession(str(self.directory / self.config["image_encoder"]),
                                                  providers=list(providers))
        self.text_session = ort.InferenceSession(str(self.directory / self.config["text_encoder"]),
                                                 providers=list(providers))
        tok = self.config["tokenizer"]
        self.tokenizer = TOKENIZERS[tok["kind"]].from_directory(self.directory, context_length=tok["context_length"])

    def preprocess(self, image: Image.Image | str | Path) -> np.ndarray:
        """[3, S, S] float32 pixels, the same steps as clipforge's EvalTransform."""
        pp = self.config["preprocess"]
        size = pp["image_size"]
        image = eval_geometry(load_image(image), size, pp.get("composite_white", False), pp.get("resize_mode", "crop"),
                              pp.get("interpolation", "bicubic"))
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
        mean = np.asarray(pp["mean"], dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(pp["std"], dtype=np.float32).reshape(3, 1, 1)
        return (array - mean) / std

    def encode_image(self, pixels: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Embeddings [B, D] of preprocessed pixels [B, 3, S, S]."""
        name = "embeddings" if normalize else "features"
        return self.image_session.run([name], {"pixels": np.asarray(pixels, dtype=np.float32)})[0]

    def encode_text(self, tokens: Any, normalize: bool = True) -> np.ndarray:
        """Embeddings [B, D] of token ids [B, L] (int32 or int64)."""
        name = "embeddings" if normalize else "features"
        return self.text_session.run([name], {"tokens": as_token_array(tokens)})[0]

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Normalised embeddings of raw strings."""
        return self.encode_text(self.tokenizer(list(texts), truncate=True))

    def embed_images(self, images: Sequence[Image.Image | str | Path]) -> np.ndarray:
        """Normalised embeddings of images or image paths."""
        return self.encode_image(np.stack([self.preprocess(image) for image in images]))


__all__ = ["OnnxCLIP", "TextEncoder", "ImageEncoder", "export_onnx", "verify_onnx"]
