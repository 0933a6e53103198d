"""OpenAI-layout state dicts: clean open_clip variants, infer the architecture from shapes, read TorchScript."""
from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from clipforge.checkpoint.architecture import ArchitectureHints
from clipforge.errors import CheckpointError
from clipforge.model.config import CLIPConfig, TextConfig, VisionConfig
from clipforge.model.text_tower import OPENAI_TEXT_NAMES

# Entries OpenAI's archives carry that are not weights, and buffers rebuilt at construction.
_NON_WEIGHT_KEYS = {"input_resolution", "context_length", "vocab_size"}
_BUFFER_SUFFIXES = ("attn_mask", "position_ids", "num_batches_tracked")
_MODULE_TEXT_NAMES = tuple(f"text_tower.{name}" for name in OPENAI_TEXT_NAMES)


def clean_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Strip DDP/open_clip wrappers ("module.", "text.") and drop non-weight entries."""
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
        state_dict = state_dict["state_dict"]  # open_clip training checkpoint
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        key = key[len("_orig_mod."):] if key.startswith("_orig_mod.") else key  # torch.compile
        if key.startswith("text.") and not key.startswith("text_projection"):
            key = key[len("text."):]  # open_clip CustomTextCLIP keeps its text tower under "text."
        if key.startswith(_MODULE_TEXT_NAMES):
            key = key[len("text_tower."):]  # clipforge's module names (TorchScript of a clipforge CLIP)
        if key in _NON_WEIGHT_KEYS or key.endswith(_BUFFER_SUFFIXES) or key.endswith(".attn_mask"):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        cleaned[key] = value
    return cleaned


def _need(state_dict: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"not an OpenAI-layout CLIP state dict: missing key {key!r}")
    return state_dict[key]


def infer_shapes(state_dict: dict[str, torch.Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """Architecture from an OpenAI-layout state dict's shapes, heads as OpenAI's loader guesses them (width / 64).

    The heads and `quick_gelu` here are placeholders: `architecture.resolve_architecture` decides them.
    """
    if "visual.proj" in state_dict:
        conv = _need(state_dict, "visual.conv1.weight")
        width, patch = conv.shape[0], conv.shape[-1]
        layers = len({k.split(".")[3] for k in state_dict if k.startswith("visual.transformer.resblocks.")})
        grid = round((_need(state_dict, "visual.positional_embedding").shape[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=patch * grid, layers=layers, width=width, patch_size=patch,
                              quick_gelu=quick_gelu)
    else:
        counts = tuple(
            len({k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)
        )
        if 0 in counts:
            raise CheckpointError("not an OpenAI-layout CLIP state dict: no 'visual.proj' (ViT) nor "
                                  "visual.layer1-4 (ResNet)")
        width = _need(state_dict, "visual.layer1.0.conv1.weight").shape[0]
        grid = round((_need(state_dict, "visual.attnpool.positional_embedding").shape[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=grid * 32, layers=counts, width=width, quick_gelu=quick_gelu)
    text_width = _need(state_dict, "ln_final.weight").shape[0]
    text = TextConfig(
        context_length=_need(state_dict, "positional_embedding").shape[0],
        vocab_size=_need(state_dict, "token_embedding.weight").shape[0],
        width=text_width,
        heads=max(1, text_width // 64),
        layers=len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}),
        mlp_ratio=_need(state_dict, "transformer.resblocks.0.mlp.c_fc.weight").shape[0] / text_width,
        quick_gelu=quick_gelu,
    )
    if vision.is_resnet is False:
        vision.mlp_ratio = _need(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0] / vision.width
    return CLIPConfig(embed_dim=_need(state_dict, "text_projection").shape[1], vision=vision, text=text)


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with an error that names the file and lists missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    expected = {k: v for k, v in expected.items() if not k.endswith(_BUFFER_SUFFIXES)}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)


class _ScriptObject:
    """Stand-in for a TorchScript module object: only its attribute dict is kept."""

    def __init__(self, *args: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {}


_DTYPE_OF_STORAGE = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "BoolStorage": torch.bool, "ByteStorage": torch.uint8,
}


def _activation_in_code(archive: zipfile.ZipFile) -> bool | None:
    """QuickGELU (True) or GELU (False) as the archive's serialized code computes it; None if neither shows."""
    code = b"".join(archive.read(n) for n in archive.namelist() if "/code/" in n and n.endswith(".py"))
    if b"QuickGELU" in code or b"1.702" in code:  # x * sigmoid(1.702 * x); traced code keeps the class name
        return True
    return False if re.search(rb"\bgelu\(", code) else None


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads an archive's data.pkl allowing only tensors, plain containers and module objects' attribute dicts."""

    def __init__(self, archive: zipfile.ZipFile, data_pkl: str, path: Path) -> None:
        super().__init__(io.BytesIO(archive.read(data_pkl)))
        self.archive, self.prefix, self.path = archive, data_pkl[: -len("data.pkl")], path
        self.storages: dict[str, torch.UntypedStorage] = {}  # tensors that share a record share its storage

    def find_class(self, module: str, name: str) -> Any:
        """The few callables a weights-only archive needs; anything else is refused."""
        if module.startswith("__torch__"):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, requires_grad, hooks: data
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch.jit._pickle":
            # torch.jit.script archives wrap lists and tag types; both are plain data.
            if name == "restore_type_tag":
                return lambda value, _tag: value
            if name.startswith("build_"):
                return lambda value: value
        if module == "torch" and name in _DTYPE_OF_STORAGE:
            return name
        raise pickle.UnpicklingError(f"{self.path}: refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid: Any) -> Any:
        """A typed storage over the bytes of the archive's data/RECORD entry."""
        _, storage_type, record, _location, numel = pid
        dtype = _DTYPE_OF_STORAGE.get(storage_type)
        if dtype is None:
            raise pickle.UnpicklingError(f"{self.path}: unsupported storage type {storage_type}")
        if record not in self.storages:
            raw = bytearray(self.archive.read(f"{self.prefix}data/{record}"))
            self.storages[record] = (torch.frombuffer(raw, dtype=dtype, count=numel).untyped_storage()
                                     if numel else torch.UntypedStorage(0))
        return torch.storage.TypedStorage(wrap_storage=self.storages[record], dtype=dtype, _internal=True)


def _module_tensors(root: Any) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every tensor under its dotted name, and num_heads under its module's prefix."""
    tensors: dict[str, torch.Tensor] = {}
    heads: dict[str, int] = {}  # MultiheadAttention / AttentionPool2d keep num_heads as a module attribute

    def walk(obj: Any, prefix_name: str) -> None:
        state = obj.state if isinstance(obj, _ScriptObject) else obj
        for key, value in state.items():
            name = f"{prefix_name}{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            elif isinstance(value, (_ScriptObject, dict)):
                walk(value, name + ".")
            elif key == "num_heads" and isinstance(value, int):
                heads[prefix_name] = value

    walk(root, "")
    return tensors, heads


def read_torchscript(path: Path) -> tuple[dict[str, torch.Tensor], ArchitectureHints]:
    """Tensors of a TorchScript archive and its heads/activation, read without running any of its code."""
    with zipfile.ZipFile(path) as archive:
        quick_gelu = _activation_in_code(archive)
        data_pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
        if data_pkl is None:
            raise CheckpointError(f"{path}: a zip archive without data.pkl is not a TorchScript or torch.save file")
        root = _TorchScriptUnpickler(archive, data_pkl, path).load()
    tensors, heads = _module_tensors(root)
    hints = ArchitectureHints(
        vision_heads=next((h for p, h in heads.items() if p.startswith("visual.")), None),
        text_heads=next((h for p, h in heads.items() if p.startswith("transformer.")), None),
        quick_gelu=quick_gelu,
    )
    # TorchScript nests parameters one level deeper in "_parameters"/"_buffers" dicts on some exporters.
    return {re.sub(r"(^|\.)_(parameters|buffers)\.", r"\1", k): v for k, v in tensors.items()}, hints
