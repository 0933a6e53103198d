"""int8 ONNX graphs: onnxruntime's dynamic quantisation of the exported fp32 graphs (int8 weights per output
channel, uint8 activations quantised per call: MatMulInteger / DynamicQuantizeLinear), checked against PyTorch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipforge.errors import ExportError
from clipforge.model.clip import CLIP

# Below this cosine to the fp32 model an int8 graph would change rankings; measured >= 0.999 on ViT-B-32 shapes.
INT8_MIN_COSINE = 0.99


def quantize_graphs(model: CLIP, out: Path, config: dict[str, Any], example_tokens: Any) -> dict[str, Any]:
    """Write `*.int8.onnx` beside both graphs, point `config` at them, and return the cosine check (raises below)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for key in ("image_encoder", "text_encoder"):
        source = out / config[key]
        target = source.with_name(source.name.replace(".onnx", ".int8.onnx"))
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
        config.setdefault("fp32_encoders", {})[key] = config[key]
        config[key] = target.name
    check = _cosines(model, out, config, example_tokens)
    worst = min(check.values())
    if not worst >= INT8_MIN_COSINE:
        raise ExportError(f"int8 graphs' embeddings reach cosine {worst:.4f} < {INT8_MIN_COSINE} to the fp32 model: "
                          f"{check}; export without --int8")
    return {"weights": "int8, one scale per output channel", "activations": "uint8, quantised per call",
            "min_cosine": worst, "by_check": check, "limit": INT8_MIN_COSINE}


def _cosines(model: CLIP, out: Path, config: dict[str, Any], example_tokens: Any) -> dict[str, float]:
    """Smallest cosine between int8-graph and fp32 PyTorch embeddings, per tower, on random inputs."""
    import onnxruntime as ort

    sessions = {key: ort.InferenceSession(str(out / config[key]), providers=["CPUExecutionProvider"])
                for key in ("image_encoder", "text_encoder")}
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, model.image_size, model.image_size, generator=gen)
    tokens = example_tokens(4, model.context_length, config["tokenizer"]["vocab_size"], seed=4)
    with torch.no_grad():
        want = {"image": model.encode_image(pixels, normalize=True).numpy(),
                "text": model.encode_text(tokens, normalize=True).numpy()}
    got = {"image": sessions["image_encoder"].run(["embeddings"], {"pixels": pixels.numpy()})[0],
           "text": sessions["text_encoder"].run(["embeddings"], {"tokens": tokens.numpy()})[0]}
    return {tower: float(np.min(np.sum(want[tower] * got[tower], axis=1))) for tower in want}
