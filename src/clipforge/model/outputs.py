"""Per-token outputs of the towers: patch / token features (open_clip's `output_tokens`), every layer's hidden
states and attention weights (HF's `output_hidden_states` / `output_attentions`), for dense features and maps."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clipforge.errors import ConfigError


@dataclass
class TowerOutputs:
    """What one tower computed for a batch.

    embeds: [B, embed_dim] projected embeddings (normalised when asked), as encode_image / encode_text.
    tokens: the last layer's per-token features after the final layer norm, not projected: ViT patch tokens
        [B, grid*grid, width] (class token excluded), text tokens [B, L, width] (every position, padding
        included), ResNet [B, H/32 * W/32, width*32] (the map the attention pool reads).
    hidden_states: transformer towers: the first block's input, then each block's output (layers + 1 tensors,
        HF's order; the last is before the final layer norm).
    attentions: transformer towers, on request: each block's softmax weights [B, heads, L, L].
    """

    embeds: torch.Tensor
    tokens: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] = ()
    attentions: tuple[torch.Tensor, ...] = field(default=())


def image_outputs(model: torch.nn.Module, pixels: torch.Tensor, attentions: bool = False,
                  normalize: bool = False) -> TowerOutputs:
    """The image tower's TowerOutputs (ViT or ResNet; a ResNet has no per-layer tokens to give)."""
    visual = model.visual
    if hasattr(visual, "attnpool"):
        if attentions:
            raise ConfigError("a ResNet image tower has no attention layers to return: attentions=False")
        feature_map = visual.feature_map(pixels)
        embeds = visual.attnpool(feature_map)
        return TowerOutputs(_norm(embeds, normalize), feature_map.flatten(2).transpose(1, 2))
    states, weights = visual.transformer.forward_states(visual.embed(pixels), attentions=attentions)
    if visual.pool == "attentional":  # CoCa: the pooler's queries are the tokens (what its decoder reads)
        queries = visual.ln_post(visual.attn_pool(states[-1]))
        return TowerOutputs(_norm(visual.project(queries[:, 0]), normalize), queries[:, 1:], tuple(states),
                            tuple(weights))
    final = visual.ln_post(states[-1])
    if visual.attn_pool is not None:  # SigLIP: every token is a patch, pooled by the attention head
        return TowerOutputs(_norm(visual.project(visual.attn_pool(final)), normalize), final, tuple(states),
                            tuple(weights))
    return TowerOutputs(_norm(visual.project(final[:, 0]), normalize), final[:, 1:], tuple(states), tuple(weights))


def _norm(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=-1) if normalize else x
