"""Which architecture a bare OpenAI-layout state dict holds. Shapes fix widths, depths and sizes, but not the
attention head width nor the activation: OpenAI's own loader assumes 64-wide heads and QuickGELU, which
loads open_clip's ViT-H-14 (80-wide heads), ViT-g-14 (88) and ViT-bigG-14 (104), and every GELU model,
silently wrong. So the heads and activation come from the caller, a TorchScript archive, or a unique
registry match — otherwise `load` refuses and says what to pass."""
from __future__ import annotations

from dataclasses import dataclass

from clipforge.errors import CheckpointError
from clipforge.model.config import CLIPConfig, VisionConfig, get_model_config, list_models

ACTIVATIONS = {True: "QuickGELU", False: "GELU"}


@dataclass
class ArchitectureHints:
    """What a checkpoint says beyond its shapes (a TorchScript archive keeps heads and its activation code)."""

    vision_heads: int | None = None
    text_heads: int | None = None
    quick_gelu: bool | None = None


def _hidden(width: int, ratio: float) -> int:
    return round(width * ratio)


def shape_key(config: CLIPConfig) -> tuple:
    """Everything a state dict's shapes determine (not heads, not the activation)."""
    v, t = config.vision, config.text
    return (config.embed_dim, v.image_size, v.layers, v.width, None if v.is_resnet else v.patch_size,
            None if v.is_resnet else _hidden(v.width, v.mlp_ratio), t.context_length, t.vocab_size, t.width,
            t.layers, _hidden(t.width, t.mlp_ratio), config.text_tower)


def registry_matches(config: CLIPConfig) -> dict[str, CLIPConfig]:
    """Registry architectures whose shapes equal `config`'s."""
    key = shape_key(config)
    found = {name: get_model_config(name) for name in list_models()}
    return {name: c for name, c in found.items() if shape_key(c) == key}


def heads_for_width(vision: VisionConfig, text_width: int, head_width: int) -> tuple[int, int]:
    """(vision heads, text heads) for one head width, as open_clip derives them; CheckpointError if it does not
    divide."""
    vision_width = vision.width * 32 if vision.is_resnet else vision.width  # the attention pool's width
    bad = [w for w in (vision_width, text_width) if w % head_width]
    if head_width <= 0 or bad:
        raise CheckpointError(f"head_width {head_width} does not divide the attention width(s) {bad or [head_width]}")
    return vision_width // head_width, text_width // head_width


def _describe(choices: set) -> str:
    return " or ".join(sorted(str(c) for c in choices))


def resolve_architecture(shapes: CLIPConfig, source: str, head_width: int | None = None,
                         quick_gelu: bool | None = None, hints: ArchitectureHints | None = None) -> CLIPConfig:
    """The config of a bare state dict: shapes + heads + activation, refusing when these are ambiguous."""
    hints = hints or ArchitectureHints()
    matches = registry_matches(shapes)
    heads = None
    if head_width is not None:
        heads = heads_for_width(shapes.vision, shapes.text.width, head_width)
    elif hints.vision_heads and hints.text_heads:
        heads = (hints.vision_heads, hints.text_heads)
    elif len({(c.vision.heads, c.text.heads) for c in matches.values()}) == 1:
        heads = next((c.vision.heads, c.text.heads) for c in matches.values())
    if quick_gelu is None:
        quick_gelu = hints.quick_gelu
    if quick_gelu is None and len({c.vision.quick_gelu for c in matches.values()}) == 1:
        quick_gelu = next(c.vision.quick_gelu for c in matches.values())
    if heads is None or quick_gelu is None:
        raise CheckpointError(_ambiguity_message(shapes, source, matches, heads is None, quick_gelu is None))
    config = CLIPConfig.from_dict(shapes.to_dict())
    config.vision.heads, config.text.heads = heads
    config.vision.quick_gelu = config.text.quick_gelu = quick_gelu
    return config


def _ambiguity_message(shapes: CLIPConfig, source: str, matches: dict[str, CLIPConfig], need_heads: bool,
                       need_act: bool) -> str:
    parts = []
    if need_heads:
        if matches:
            heads = {f"{c.vision.heads}/{c.text.heads} heads ({n})" for n, c in matches.items()}
            parts.append(f"the attention heads (image/text): {_describe(heads)}")
        else:
            v, t = shapes.vision, shapes.text
            vision_width = v.width * 32 if v.is_resnet else v.width  # the attention pool's width
            widths = [w for w in (128, 104, 96, 88, 80, 64, 32) if not (t.width % w or vision_width % w)]
            fits = " or ".join(str(w) for w in widths) or "several divisors"
            parts.append(f"the attention head width (image width {v.width}, text width {t.width}: {fits} all fit; "
                         f"OpenAI's releases use 64)")
    if need_act:
        named = {f"{ACTIVATIONS[c.vision.quick_gelu]} ({n})" for n, c in matches.items()}
        parts.append(f"the activation: {_describe(named) if named else 'QuickGELU (OpenAI releases) or GELU'}")
    hint = ("pass head_width=64 and quick_gelu=True (OpenAI's convention) or the values your model was trained "
            "with to clipforge.load, or config=<registry name | open_clip_config.json | clipforge.json>; on the "
            "command line convert it once: `clipforge convert SRC OUT --head-width 64 --quick-gelu` "
            "(or --gelu, or --model-config FILE) and use OUT")
    return (f"{source}: a bare state dict does not say {' nor '.join(parts)}. Loading with a guess gives "
            f"silently wrong features; {hint}")
