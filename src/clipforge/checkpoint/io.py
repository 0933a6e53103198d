"""`load` any CLIP checkpoint format and `save_pretrained` to clipforge or HF format."""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from clipforge.checkpoint import hf, open_clip
from clipforge.checkpoint.architecture import ArchitectureHints, heads_for_width, resolve_architecture
from clipforge.checkpoint.hf_folder import hf_preprocess, hf_weights
from clipforge.checkpoint.hf_siglip import is_siglip
from clipforge.checkpoint.open_clip import config_from_open_clip
from clipforge.checkpoint.open_clip_siglip import is_timm_layout, state_dict_from_timm_layout
from clipforge.checkpoint.openai import clean_state_dict, infer_shapes, load_into, read_torchscript
from clipforge.checkpoint.options import LoadOptions, merge_options
from clipforge.checkpoint.remote import HUB_PREFIX, hub_repo, is_remote, resolve_remote
from clipforge.checkpoint.weights import is_torchscript, read_weights
from clipforge.data.audio import AudioPreprocess
from clipforge.data.transforms import EvalTransform
from clipforge.errors import CheckpointError, ConfigError
from clipforge.io import atomic_path
from clipforge.model.clip import CLIP
from clipforge.model.config import CLIPConfig, PreprocessConfig, apply_overrides, get_model_config, list_models
from clipforge.model.towers import text_tower_class, tokenizer_for
from clipforge.text.base import OPENAI_VOCAB_SIZE, Tokenizer

CONFIG_FILE = "clipforge.json"
WEIGHTS_FILE = "model.safetensors"
MODALITY_DIR = "modalities"  # a bound tower's tokenizer files: MODALITY_DIR/NAME/


def config_from_file(path: Path) -> tuple[CLIPConfig, PreprocessConfig | None]:
    """Model config (and preprocessing, when the file has it) from a clipforge.json, open_clip or HF config file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable JSON config: {error}") from None
    if "model_cfg" in data or "vision_cfg" in data:
        return config_from_open_clip(data, str(path))
    if data.get("format") == "clipforge" and "model" in data:
        pp = data.get("preprocess")
        return CLIPConfig.from_dict(data["model"]), PreprocessConfig.from_dict(pp) if pp else None
    if "vision_config" in data or "text_config" in data or data.get("model_type") == "clip":
        return hf.config_from_hf(data), None
    raise CheckpointError(f"{path}: not a clipforge.json, open_clip_config.json or HF CLIP config.json")


def _given_config(config: str | Path | CLIPConfig) -> tuple[CLIPConfig, PreprocessConfig | None]:
    if isinstance(config, CLIPConfig):
        return config, None
    if isinstance(config, str) and config in list_models():
        return get_model_config(config), None
    return config_from_file(Path(config))


def _cleaned(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A state dict under clipforge's names: wrappers stripped, open_clip's timm-layout SigLIP towers renamed."""
    cleaned = clean_state_dict(state_dict)
    return state_dict_from_timm_layout(cleaned) if is_timm_layout(cleaned) else cleaned


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], ArchitectureHints]:
    if zipfile.is_zipfile(path) and is_torchscript(path):
        tensors, hints = read_torchscript(path)
        return clean_state_dict(tensors), hints
    return _cleaned(read_weights(path)), ArchitectureHints()


def _declared_file_config(path: Path, options: LoadOptions) -> tuple[CLIPConfig, PreprocessConfig | None] | None:
    """A weight file's config when one is declared: the caller's, else an open_clip_config.json beside it."""
    if options.config is not None:
        return _given_config(options.config)
    beside = path.parent / open_clip.CONFIG_FILE
    if beside.is_file():
        return open_clip.read_open_clip_config(beside)
    return None


def _file_config(path: Path, state_dict: dict[str, torch.Tensor], hints: ArchitectureHints,
                 options: LoadOptions) -> tuple[CLIPConfig, PreprocessConfig | None]:
    """Config for a weight file: the caller's, an open_clip_config.json beside it, else resolved from shapes."""
    declared = _declared_file_config(path, options)
    if declared is not None:
        return declared
    try:
        shapes = infer_shapes(state_dict)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return resolve_architecture(shapes, str(path), options.head_width, options.quick_gelu, hints), None


@dataclass(frozen=True)
class CheckpointFolder:
    """What a checkpoint folder holds, as `read_folder` (the one folder detector) finds it."""

    kind: Literal["clipforge", "open_clip", "hf"]
    config: CLIPConfig
    preprocess: PreprocessConfig | None
    weights: Path  # the weight file; for "hf", the folder (weights under transformers' names, maybe sharded)


def read_folder(directory: Path) -> CheckpointFolder:
    """The checkpoint in a clipforge, open_clip (hub layout) or HF transformers folder; `load` and
    `get_tokenizer` both read folders through it, so they agree on every folder."""
    if (directory / CONFIG_FILE).is_file():
        config, preprocess = config_from_file(directory / CONFIG_FILE)
        return CheckpointFolder("clipforge", config, preprocess, directory / WEIGHTS_FILE)
    steps = sorted(directory.glob(f"step-*/{CONFIG_FILE}"))
    if steps:  # a `clipforge train` output folder: its config.json is the run's, not a model's
        latest = directory / "latest"
        newest = directory / latest.read_text().strip() if latest.is_file() else steps[-1].parent
        raise CheckpointError(f"{directory}: a training run folder, not a model: pass one of its checkpoints "
                              f"(the latest is {newest})")
    weights = open_clip.open_clip_weights(directory)
    if (directory / open_clip.CONFIG_FILE).is_file() and weights is not None:
        return CheckpointFolder("open_clip", *open_clip.read_open_clip_config(directory / open_clip.CONFIG_FILE),
                                weights)
    if (directory / "config.json").is_file():
        config = hf.config_from_hf(json.loads((directory / "config.json").read_text()))
        preprocess = hf_preprocess(directory, config.vision)
        return CheckpointFolder("hf", config, preprocess, directory)
    raise CheckpointError(f"{directory}: no {CONFIG_FILE} (clipforge), {open_clip.CONFIG_FILE} with open_clip "
                          "weights, or config.json (HF) in this directory")


def _apply_choice(config: CLIPConfig, options: LoadOptions, overrides: dict[str, Any]) -> CLIPConfig:
    # Idempotent on a config `resolve_architecture` built from the same choice, so it applies everywhere.
    overrides = dict(overrides)
    if options.quick_gelu is not None:
        overrides["quick_gelu"] = options.quick_gelu
    if options.head_width is not None:
        overrides["vision.heads"], overrides["text.heads"] = heads_for_width(
            config.vision, config.text.width, options.head_width)
    return apply_overrides(config, overrides) if overrides else config


def _load_path(path: Path, options: LoadOptions, overrides: dict[str, Any]) -> CLIP:
    if path.is_dir():
        folder = read_folder(path)
        weights_path, config, preprocess = folder.weights, folder.config, folder.preprocess
        if options.config is not None:
            config = _given_config(options.config)[0]  # the folder's preprocessing stays
        if folder.kind == "hf":
            state_dict = hf.state_dict_from_hf(hf_weights(weights_path), config)
        else:
            state_dict = _cleaned(read_weights(weights_path))
    else:
        weights_path = path
        state_dict, hints = _read_file(path)
        config, preprocess = _file_config(path, state_dict, hints, options)
    added_decoder = config.decoder is None and overrides.get("decoder") is not None
    config = _apply_choice(config, options, overrides)
    model = CLIP(config, pretrained_text=False)  # the file holds every weight
    if added_decoder:  # a captioning decoder added to a contrastive checkpoint starts from its initialisation
        state_dict = {**state_dict, **{k: v for k, v in model.state_dict().items() if k.startswith("text_decoder.")}}
    load_into(model, state_dict, str(weights_path))
    model.preprocess_config = preprocess or PreprocessConfig()
    return model


def refuse_random_weights(name: str | Path, allowed: bool, pretrained: str | None = None) -> None:
    """CheckpointError when `name` is a registry architecture (no weights) and random weights were not asked for."""
    if str(name) in list_models() and not Path(name).exists() and not allowed and pretrained is None:
        raise CheckpointError(f"{name!r} is a registry architecture without weights: its answers would be random. "
                              "Pass a checkpoint, --pretrained TAG (`clipforge models --pretrained` lists them), or "
                              "--random-weights to run with randomly initialised weights")


def load(name_or_path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
         options: LoadOptions | None = None, pretrained: str | None = None,
         config: str | Path | CLIPConfig | None = None, head_width: int | None = None,
         quick_gelu: bool | None = None, **overrides: Any) -> tuple[CLIP, EvalTransform]:
    """(model in eval mode, its eval transform) from a registry name or any OpenAI/open_clip/HF/clipforge checkpoint.

    Downloads (verified, cached; clipforge.pretrained): `load("ViT-B-32", pretrained="openai")` for a tag of
    `list_pretrained()` (or pretrained=a weights file), and `load("hf-hub:ORG/NAME")` for an open_clip or
    transformers CLIP repo.

    The architecture comes from a config whenever one exists (`config=`, an open_clip_config.json
    beside the weights, a folder's clipforge.json / config.json). A bare OpenAI-layout state dict
    does not record its head width nor its activation: pass `head_width` and `quick_gelu` (OpenAI's
    releases: 64 and True) unless a TorchScript archive or a unique registry match says them; an
    ambiguous one is refused, never guessed. The transform follows the checkpoint's library
    (transformers composites transparency on white, OpenAI and open_clip do not).

    `options=LoadOptions(...)` carries the same choice as one value (the CLI builds one from its flags);
    give it or the keywords pretrained / config / head_width / quick_gelu, not both. Other keywords
    override config fields, as create_model's (`vision__width=...`).
    """
    options = merge_options(options, pretrained, config, head_width, quick_gelu)
    path = Path(name_or_path)
    overrides = {k.replace("__", "."): v for k, v in overrides.items()}  # create_model's vision__width style
    if is_remote(name_or_path, options.pretrained):
        local, found = resolve_remote(str(name_or_path), options.pretrained)
        if options.config is None:
            options = replace(options, config=found.get("config"))
        model = _load_path(local, options, overrides)
        if "mean" in found:  # the tag's own preprocessing (some open_clip weights use 0.5 / 0.5; SigLIP squashes)
            model.preprocess_config = PreprocessConfig(mean=tuple(found["mean"]), std=tuple(found["std"]),
                                                       resize=found["resize"])
    elif isinstance(name_or_path, str) and name_or_path in list_models() and not path.exists():
        if options.config is not None:  # never silently dropped: the name already is the architecture
            raise ConfigError(f"config= (--model-config) describes a checkpoint file or folder; {name_or_path!r} "
                              "is a registry name, which is its own architecture: drop the config")
        model = CLIP(_apply_choice(get_model_config(name_or_path), options, overrides))
    elif path.exists():
        model = _load_path(path, options, overrides)
    else:
        raise CheckpointError(f"{name_or_path!r} is neither a known model name nor an existing path; "
                              f"known names: {', '.join(list_models())}")
    model = model.to(device=device, dtype=dtype).eval()
    return model, EvalTransform.for_model(model)


def _check_writable(model: CLIP, format: str) -> None:
    """CheckpointError, before anything is written, for what `format` has no place for."""
    if format not in ("clipforge", "hf", "open_clip"):
        raise CheckpointError(f"unknown format {format!r}: use 'clipforge', 'hf' or 'open_clip'")
    if format == "hf" and not is_siglip(model.config):  # refused before anything is written
        hf.refuse_unwritable(model.config)
    if getattr(model, "quantized", None):
        raise CheckpointError("a quantised model is for inference only: save the model it was made from, and "
                              "quantise again after loading")
    if format != "clipforge" and model.logit_bias is not None and not (format == "hf" and is_siglip(model.config)):
        raise CheckpointError(f"{format} has no place for this model's logit_bias (a SigLIP-trained CLIP): save with "
                              "format='clipforge'")
    coca = model.config.vision.pool == "attentional" and model.config.text.pool == "cls"
    if format != "clipforge" and (model.bag_of_words is not None or (model.text_decoder is not None and not coca)):
        raise CheckpointError(f"{format} has no place for this model's bag-of-words head or a decoder on plain CLIP "
                              "towers (open_clip's CoCa has its attentional pool and class token): save with "
                              "format='clipforge'")
    if format != "clipforge" and model.head is not None:
        raise CheckpointError(f"{format} has no place for this model's classification head (a fine-tuned "
                              "classifier): save with format='clipforge'")
    bound = [*model.bound_text, *model.bound_audio]
    if format != "clipforge" and bound:
        raise CheckpointError(f"{format} has no place for this model's bound towers ({', '.join(bound)}): "
                              "save with format='clipforge'")


def save_pretrained(model: CLIP, out_dir: str | Path, format: str = "clipforge", tokenizer: Tokenizer | None = None,
                    modality_tokenizers: dict[str, Tokenizer] | None = None) -> Path:
    """Write `model` (and its tokenizer) as a clipforge, HF transformers (CLIPModel or SiglipModel) or open_clip (hub)
    directory; `modality_tokenizers`: the tokenizer of each bound text tower (clipforge format, under modalities/)."""
    out = Path(out_dir)
    _check_writable(model, format)
    tokenizer = tokenizer or tokenizer_for(model.config, context_length=model.context_length)
    preprocess = getattr(model, "preprocess_config", None) or PreprocessConfig()
    settings = _open_clip_settings(model.config, tokenizer, preprocess) if format == "open_clip" else None
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
                  if not k.endswith("num_batches_tracked")}
    if format == "clipforge":
        write_clipforge_dir(out, state_dict, model.config, tokenizer, preprocess, modality_tokenizers)
    elif format == "open_clip":  # open_clip's hub layout; its CLIP uses OpenAI's parameter names, as clipforge
        if model.config.decoder is not None:  # CoCa is open_clip's CustomTextCLIP kind: its text tower under "text."
            names = model.text_tower.checkpoint_names
            state_dict = {f"text.{k}" if k.startswith(names) else k: v for k, v in state_dict.items()}
        with atomic_path(out / open_clip.WEIGHT_FILES[0]) as tmp:  # safetensors alone writes 0600 files
            save_file(state_dict, str(tmp))
        (out / open_clip.CONFIG_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    else:
        hf.write_hf_dir(out, state_dict, model.config, tokenizer, preprocess)
        tokenizer.save_hf(out)
    return out


def _open_clip_settings(config: CLIPConfig, tokenizer: Tokenizer, preprocess: PreprocessConfig) -> dict[str, Any]:
    """open_clip_config.json contents, refusing a model open_clip would run or tokenise differently."""
    from clipforge.text.tokenizer import SPECIAL_TOKENS

    settings = open_clip.open_clip_config(config, preprocess)
    if (tokenizer.vocab_size, getattr(tokenizer, "special_tokens", None)) != (OPENAI_VOCAB_SIZE, SPECIAL_TOKENS):
        raise CheckpointError("open_clip tokenises with OpenAI's BPE; this model has another vocabulary: use "
                              "format='clipforge'")
    return settings


def write_clipforge_dir(out: Path, state_dict: dict[str, torch.Tensor], config: CLIPConfig, tokenizer: Tokenizer,
                        preprocess: PreprocessConfig | None = None,
                        modality_tokenizers: dict[str, Tokenizer] | None = None) -> None:
    """Write a clipforge model directory: safetensors weights, config JSON (model + preprocessing), tokenizer files
    (a bound text tower's under modalities/NAME/; each one is required)."""
    missing = sorted(set(config.bound_text) - set(modality_tokenizers or {}))
    if missing:
        raise CheckpointError(f"no tokenizer for the bound tower(s) {missing}: pass modality_tokenizers")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:  # safetensors alone writes 0600 files, unreadable to others
        save_file(state_dict, str(tmp))
    meta = {"format": "clipforge", "model": config.to_dict(),
            "preprocess": (preprocess or PreprocessConfig()).to_dict()}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    tokenizer.save(out)
    for name, bound in (modality_tokenizers or {}).items():
        bound.save(out / MODALITY_DIR / name)


def get_tokenizer(name_or_path: str | Path | None = None, context_length: int | None = None,
                  options: LoadOptions | None = None, modality: str = "text") -> Tokenizer:
    """Tokenizer for a registry name or checkpoint: the files it ships, else its text tower's default (CLIP's BPE);
    `modality`: a bound text tower's own (e.g. "text-ko"), from the folder's modalities/NAME/.

    The architecture is read as `load` reads it with the same `options` (the caller's config, a folder's
    config through `read_folder`, an open_clip_config.json beside a weights file), so the two agree.
    """
    options = options or LoadOptions()
    if isinstance(name_or_path, str) and name_or_path.startswith(HUB_PREFIX):
        from clipforge.pretrained import hub_folder

        name_or_path = hub_folder(*hub_repo(name_or_path))  # cached by the load before it
    path = Path(name_or_path) if name_or_path is not None else None
    folder = path if path is not None and path.is_dir() else None
    if options.config is not None:
        config = _given_config(options.config)[0]
    elif folder is not None:
        config = read_folder(folder).config
    elif path is not None and path.is_file():
        declared = _declared_file_config(path, options)
        config = declared[0] if declared is not None else CLIPConfig()  # a bare state dict: CLIP's tokenizer
    elif isinstance(name_or_path, str) and options.pretrained is not None and not Path(options.pretrained).is_file():
        config, folder = _tag_tokenizer_source(name_or_path, options.pretrained)
    elif isinstance(name_or_path, str) and name_or_path in list_models():
        config = get_model_config(name_or_path)
    else:
        config = CLIPConfig()
    if modality != "text":
        return _modality_tokenizer(config, folder, modality, context_length)
    return tokenizer_for(config, folder, context_length)


def _modality_tokenizer(config: CLIPConfig, folder: Path | None, modality: str,
                        context_length: int | None) -> Tokenizer:
    """A bound text tower's tokenizer; its files must be there (a default vocabulary would give wrong ids)."""
    if modality not in config.bound_text:
        kinds = ", ".join(["text", *config.bound_text])
        raise CheckpointError(f"no {modality!r} text tower to tokenise for: this model's text modalities are {kinds}"
                              + (" (images take clipforge.get_preprocess)" if modality == "image" else ""))
    files = folder / MODALITY_DIR / modality if folder is not None else None
    if files is None or not files.is_dir():
        raise CheckpointError(f"the {modality!r} tokenizer files are missing (expected in {files or 'the folder'})")
    text = config.bound_text[modality]
    return text_tower_class("clip").tokenizer(text, files, context_length or text.context_length)


def get_preprocess(name_or_path: str | Path, modality: str = "image",
                   options: LoadOptions | None = None) -> EvalTransform | AudioPreprocess:
    """The transform that turns one raw input of `modality` into a fixed-shape tensor (a batch is their stack): the
    checkpoint's image preprocessing, or a bound audio tower's log-mel front end (an audio file's path or bytes ->
    [1, mel_bins, frames]). Text modalities take a tokenizer (get_tokenizer(..., modality=))."""
    path = Path(name_or_path)
    if modality != "image":
        return bound_preprocess(read_folder(path).config if path.is_dir() else load(name_or_path, options=options)[0]
                                .config, modality)
    if path.is_dir():
        folder = read_folder(path)
        config = _given_config(options.config)[0] if options and options.config is not None else folder.config
        preprocess = folder.preprocess or PreprocessConfig()
        return EvalTransform(config.vision.image_size, preprocess.composite_white, preprocess.mean, preprocess.std,
                             preprocess.resize, preprocess.interpolation)
    return load(name_or_path, options=options)[1]  # a file or a tag: its preprocessing is known once it is read


def bound_preprocess(config: CLIPConfig, modality: str) -> AudioPreprocess:
    """The evaluation preprocess of a bound audio tower of a model with this config (a file -> its log-mel)."""
    if modality in config.bound_audio:
        return AudioPreprocess(config.bound_audio[modality])
    kinds = ", ".join(["image", *config.bound_audio])
    raise CheckpointError(f"{modality!r} has no preprocess here (this model's are {kinds}): text modalities "
                          f"take clipforge.get_tokenizer(path, modality={modality!r})")


def _tag_tokenizer_source(name: str, tag: str) -> tuple[CLIPConfig, Path | None]:
    """A pretrained tag's architecture and, unless it uses CLIP's packaged BPE, the hub folder of its tokenizer
    files (SigLIP's spiece.model, SigLIP 2's tokenizer.json), fetched alone: never the weights."""
    from clipforge.pretrained import get_pretrained
    from clipforge.pretrained.hub import hub_tokenizer_folder

    entry = get_pretrained(name, tag)
    config = _given_config(entry.architecture)[0]
    if entry.url or config.text.vocab_size == OPENAI_VOCAB_SIZE:
        return config, None
    return config, hub_tokenizer_folder(entry.hf_hub)
