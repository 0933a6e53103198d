"""CoCa's captioning decoder (open_clip's MultimodalTransformer, its parameter names): per layer, causal
self-attention over the text tower's token states, then cross-attention to the image tokens; a final norm and a
projection to the vocabulary. Decoding steps reuse cached keys and values (`step`)."""
from __future__ import annotations

import torch
from torch import nn

from clipforge.model.config import DecoderConfig
from clipforge.model.transformer import MLP, Attention, ResidualAttentionBlock

KeysValues = tuple[torch.Tensor, torch.Tensor]  # [B, heads, L, head width] each


def block_step(block: ResidualAttentionBlock, x: torch.Tensor, past: KeysValues | None,
               key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KeysValues]:
    """One causal self-attention block on new positions x [B, 1, width] given the earlier positions' keys and
    values; returns its output and the keys and values so far. `key_mask` [B, positions so far]: keys to keep."""
    h = block.ln_1(x)
    keys, values = block.attn.keys_values(h)
    if past is not None:
        keys, values = torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)
    x = x + block.attn.attend(h, keys, values, key_mask)
    return x + block.mlp(block.ln_2(x)), (keys, values)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (queries: the text; keys and values: the layer-normed image tokens), then the MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_1_kv = nn.LayerNorm(width, eps=eps)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, round(width * mlp_ratio), quick_gelu)

    def context(self, image_tokens: torch.Tensor) -> KeysValues:
        """The image tokens' keys and values (computed once per image, reused at every decoding step)."""
        return self.attn.keys_values(self.ln_1_kv(image_tokens))

    def forward(self, x: torch.Tensor, context: KeysValues) -> torch.Tensor:
        x = x + self.attn.attend(self.ln_1(x), *context)
        return x + self.mlp(self.ln_2(x))


class MultimodalDecoder(nn.Module):
    """Text token states + image tokens -> next-token logits [B, L, vocab]."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        width, eps = config.width, config.layer_norm_eps
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, config.heads, config.mlp_ratio, config.quick_gelu, eps)
            for _ in range(config.layers))
        self.cross_attn = nn.ModuleList(
            CrossAttentionBlock(width, config.heads, config.mlp_ratio, config.quick_gelu, eps)
            for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Parameter(torch.empty(width, config.vocab_size))
        self._init_weights(width)

    def _init_weights(self, width: int) -> None:
        """open_clip's initialisation: attention at width^-0.5, residual outputs scaled down by depth."""
        attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * len(self.resblocks)) ** -0.5, (2 * width) ** -0.5
        for block in [*self.resblocks, *self.cross_attn]:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def contexts(self, image_tokens: torch.Tensor) -> list[KeysValues]:
        """Every cross-attention layer's keys and values of the image tokens."""
        return [block.context(image_tokens) for block in self.cross_attn]

    def forward(self, image_tokens: torch.Tensor | None, text_states: torch.Tensor,
                contexts: list[KeysValues] | None = None, project: bool = True) -> torch.Tensor:
        """Logits [B, L, vocab] of the token after each position (teacher forcing); `contexts` (the image tokens'
        keys and values, `contexts()`) instead of the image tokens when they are already computed. `project=False`:
        the final states [B, L, width] instead, for a loss that projects only the positions it scores."""
        x = text_states
        for block, cross, context in zip(self.resblocks, self.cross_attn, contexts or self.contexts(image_tokens)):
            x = cross(block(x, causal=True), context)
        x = self.ln_final(x)
        return x @ self.text_projection if project else x

    def step(self, x: torch.Tensor, contexts: list[KeysValues],
             cache: list[KeysValues | None]) -> torch.Tensor:
        """Logits [B, vocab] after one new position x [B, 1, width]; `cache` (one entry per layer) is updated."""
        for i, (block, cross) in enumerate(zip(self.resblocks, self.cross_attn)):
            x, cache[i] = block_step(block, x, cache[i])
            x = cross(x, contexts[i])
        return (self.ln_final(x) @ self.text_projection)[:, 0]
