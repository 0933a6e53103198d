"""`load` any CLIP checkpoint format and `save_pretrained` to clipforge or HF format."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from clipforge.checkpoint import hf
from clipforge.checkpoint.openai import clean_state_dict, infer_config, load_into, read_torchscript_state_dict
from clipforge.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, apply_overrides, list_models
from clipforge.model.factory import create_model

CONFIG_FILE = "clipforge.json"
WEIGHTS_FILE = "model.safetensors"


def read_weights(path: Path) -> dict[str, Any]:
    """Tensors from a .safetensors file, a torch.save pickle (weights_only) or a TorchScript archive."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_script = any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())
        if is_script:
            return read_torchscript_state_dict(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad pickles; all mean "unreadable"
        raise ValueError(f"{path}: cannot read checkpoint (truncated, corrupt or unsafe pickle): {error}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a state dict, found a {type(loaded).__name__}")
    return loaded


def _hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_weights(directory / shard).items()}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_weights(directory / name)
    raise ValueError(f"{directory}: HF directory has config.json but no model.safetensors or pytorch_model.bin")


def _load_directory(directory: Path, overrides: dict[str, Any]) -> tuple[CLIP, dict[str, Any]]:
    if (directory / CONFIG_FILE).is_file():
        config = CLIPConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text())["model"])
        weights_path = directory / WEIGHTS_FILE
        state_dict = read_weights(weights_path)
        preprocess = json.loads((directory / CONFIG_FILE).read_text()).get("preprocess", {})
    elif (directory / "config.json").is_file():
        hf_cfg = json.loads((directory / "config.json").read_text())
        config = hf.config_from_hf(hf_cfg)
        weights_path = directory
        state_dict = hf.state_dict_from_hf(_hf_weights(directory), config)
        preprocess = {}
        pp = directory / "preprocessor_config.json"
        if pp.is_file():
            pp_cfg = json.loads(pp.read_text())
            preprocess = {k: tuple(pp_cfg[f"image_{k}"]) for k in ("mean", "std") if f"image_{k}" in pp_cfg}
    else:
        raise ValueError(f"{directory}: no {CONFIG_FILE} (clipforge) or config.json (HF) with weights in this directory")
    if overrides:
        config = apply_overrides(config, overrides)
    model = CLIP(config, pretrained_text=False)  # the file holds every weight
    load_into(model, state_dict, str(weights_path))
    return model, preprocess


def load(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         **overrides: Any) -> tuple[CLIP, EvalTransform]:
    """(model in eval mode, eval transform) from a registry name or any OpenAI/open_clip/HF/clipforge checkpoint.

    OpenAI-layout weights carry no activation choice: QuickGELU is assumed, as in OpenAI's
    releases; pass `quick_gelu=False` for open_clip models trained with GELU.
    """
    preprocess: dict[str, Any] = {}
    path = Path(name_or_path)
    if isinstance(name_or_path, str) and name_or_path in list_models():
        model = create_model(name_or_path, **overrides)
    elif path.is_dir():
        model, preprocess = _load_directory(path, overrides)
    elif path.exists():
        state_dict = clean_state_dict(read_weights(path))
        try:
            config = infer_config(state_dict)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if overrides:
            config = apply_overrides(config, overrides)
        model = CLIP(config)
        load_into(model, state_dict, str(path))
    else:
        raise ValueError(f"{name_or_path!r} is neither a known model name nor an existing path; "
                         f"known names: {', '.join(list_models())}")
    model = model.to(device=device, dtype=dtype).eval()
    return model, EvalTransform(model.image_size, **preprocess)


def save_pretrained(model: CLIP, out_dir: str | Path, format: str = "clipforge", tokenizer: Any = None) -> Path:
    """Write `model` (and its tokenizer) as a clipforge directory or an HF transformers CLIPModel directory."""
    from clipforge.text import CLIPTokenizer  # local: keeps model loading free of tokenizer start-up cost

    out = Path(out_dir)
    if format not in ("clipforge", "hf"):
        raise ValueError(f"unknown format {format!r}: use 'clipforge' or 'hf'")
    if format == "hf" and model.config.vision.is_resnet:
        raise ValueError("HF transformers has no CLIP ResNet image tower: save ResNet models with format='clipforge'")
    if format == "hf" and model.config.text_tower != "clip":
        raise ValueError(f"HF CLIPModel has no {model.config.text_tower!r} text tower: save with format='clipforge'")
    if tokenizer is None and model.config.text_tower == "minilm":
        from clipforge.model.minilm import WordPieceTokenizer

        tokenizer = WordPieceTokenizer(context_length=model.context_length)
    if tokenizer is None:
        if model.config.text.vocab_size != 49408:
            raise ValueError(f"model has a {model.config.text.vocab_size}-token vocabulary: pass its tokenizer")
        tokenizer = CLIPTokenizer(context_length=model.context_length)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    if format == "clipforge":
        write_clipforge_dir(out, state_dict, model.config, tokenizer)
    else:
        save_file(hf.state_dict_to_hf(state_dict, model.config), str(out / "model.safetensors"), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(hf.hf_config(model.config, tokenizer.eot_token_id), indent=1))
        (out / "preprocessor_config.json").write_text(
            json.dumps(hf.hf_preprocessor_config(model.config, CLIP_MEAN, CLIP_STD), indent=1))
        tokenizer.save_hf(out)
    return out


def write_clipforge_dir(out: Path, state_dict: dict[str, torch.Tensor], config: CLIPConfig, tokenizer: Any) -> None:
    """Write a clipforge model directory: safetensors weights, config JSON and the tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"format": "clipforge", "model": config.to_dict()}, indent=1))
    tokenizer.save(out)


def get_tokenizer(name_or_path: str | Path | None = None, context_length: int | None = None) -> Any:
    """Tokenizer for a registry name or checkpoint: its own vocab file if it ships one, else CLIP's BPE."""
    from clipforge.text import CLIPTokenizer

    path = Path(name_or_path) if name_or_path is not None else None
    if path is not None and path.is_dir():
        if (path / CONFIG_FILE).is_file():
            model_config = json.loads((path / CONFIG_FILE).read_text())["model"]
            if model_config.get("text_tower", "clip") == "minilm":
                from clipforge.model.minilm import TOKENIZER_FILE, WordPieceTokenizer

                length = context_length or model_config["text"].get("context_length", 32)
                return WordPieceTokenizer(path / TOKENIZER_FILE, context_length=length)
            return CLIPTokenizer.from_directory(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            hf_cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
            length = context_length or (hf_cfg.get("text_config") or {}).get("max_position_embeddings", 77)
            return CLIPTokenizer.from_hf_files(path / "vocab.json", path / "merges.txt", context_length=length)
    if isinstance(name_or_path, str) and name_or_path in list_models():
        from clipforge.model.config import get_model_config

        config = get_model_config(name_or_path)
        if config.text_tower == "minilm":
            from clipforge.model.minilm import WordPieceTokenizer

            return WordPieceTokenizer(context_length=context_length or config.text.context_length)
        context_length = context_length or config.text.context_length
    return CLIPTokenizer(context_length=context_length or 77)
