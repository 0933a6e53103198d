"""Transformer blocks and the ViT image tower; parameter names follow OpenAI's CLIP layout."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipforge.errors import ConfigError
from clipforge.model.config import VisionConfig


class QuickGELU(nn.Module):
    """OpenAI's sigmoid approximation of GELU, which their released weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(quick_gelu: bool, gelu_tanh: bool = False) -> nn.Module:
    """QuickGELU, GELU's tanh approximation (SigLIP) or exact GELU."""
    return QuickGELU() if quick_gelu else nn.GELU(approximate="tanh" if gelu_tanh else "none")


def attention_weights(q: torch.Tensor, k: torch.Tensor, causal: bool = False,
                      key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention weights [B, H, L, L] (what HF returns with output_attentions); `key_mask` [B, L]: False
    for keys no query may attend to (NaFlex's padding patches)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    if causal:
        length = q.shape[-2]
        future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on [B, H, L, D]; plain matmuls for bf16 on CPU.

    Measured here (2-core AMD, torch 2.13): for CLIP's short sequences (17-197 tokens) the CPU
    flash kernel is 2-5x slower in bf16 than two matmuls and a softmax, forward and backward.
    """
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        return attention_weights(q, k, causal, key_mask) @ v
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    mask = key_mask[:, None, None, :]
    if causal:  # SDPA takes a mask or is_causal, not both: one boolean mask of the two
        mask = mask & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection (nn.MultiheadAttention's names)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, weights: list | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention; with a `weights` list, the softmax weights are computed explicitly and appended."""
        batch, length, width = x.shape
        qkv = self.project(x, slice(None))
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if weights is None:
            out = attention(q, k, v, causal, key_mask)
        else:
            weights.append(attention_weights(q, k, causal, key_mask))
            out = weights[-1] @ v
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))

    def project(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """x through the fused projection's `rows` (q: [:width], k and v: [width:]); quantize() replaces it."""
        return F.linear(x, self.in_proj_weight[rows], self.in_proj_bias[rows])

    def heads_of(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, width] -> [B, heads, L, head width]."""
        return x.view(x.shape[0], x.shape[1], self.heads, -1).transpose(1, 2)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, L, head width] of `context` (what a decoding step caches)."""
        width = self.out_proj.in_features
        k, v = self.project(context, slice(width, None)).split(width, dim=-1)
        return self.heads_of(k), self.heads_of(v)

    def attend(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries from x [B, Lq, width] over given keys and values (cross-attention, or a cached decoding step:
        every key may be attended, but for `key_mask`)."""
        q = self.heads_of(self.project(x, slice(None, self.out_proj.in_features)))
        out = attention(q, keys, values, key_mask=key_mask)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class MLP(nn.Module):
    """Two-layer feed-forward block."""

    def __init__(self, width: int, hidden: int, quick_gelu: bool, gelu_tanh: bool = False) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = activation(quick_gelu, gelu_tanh)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm attention + MLP block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, eps: float,
                 gelu_tanh: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        # round: mlp ratios from HF sizes are inexact
        self.mlp = MLP(width, round(width * mlp_ratio), quick_gelu, gelu_tanh)

    def forward(self, x: torch.Tensor, causal: bool = False, weights: list | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, weights=weights, key_mask=key_mask)
        return x + self.mlp(self.ln_2(x))

    def forward_first_token(self, x: torch.Tensor) -> torch.Tensor:
        """Output at position 0 only: every token still serves as key/value, but queries, the
        output projection and the MLP run for one token (exact; the ViT reads only its class token)."""
        h = self.ln_1(x)
        attn = self.attn
        batch, length, width = x.shape
        head = width // attn.heads
        q = attn.project(h[:, :1], slice(None, width))
        kv = attn.project(h, slice(width, None))
        k, v = kv.view(batch, length, 2, attn.heads, head).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q.view(batch, 1, attn.heads, head).transpose(1, 2), k, v)
        y = x[:, :1] + attn.out_proj(out.transpose(1, 2).reshape(batch, 1, width))
        return y + self.mlp(self.ln_2(y))


class Transformer(nn.Module):
    """A stack of residual blocks on batch-first [B, L, D] tensors."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool, eps: float,
                 gelu_tanh: bool = False) -> None:
        super().__init__()
        self.width = width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu, eps, gelu_tanh) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, causal: bool = False, first_token_only: bool = False,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        last = len(self.resblocks) - 1
        for i, block in enumerate(self.resblocks):
            if first_token_only and i == last:
                return block.forward_first_token(x)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, None, key_mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, key_mask=key_mask)
        return x

    def forward_states(self, x: torch.Tensor, causal: bool = False,
                       attentions: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every block's input and the last output (layers + 1 tensors), and each block's attention weights."""
        states, weights = [x], [] if attentions else None
        for block in self.resblocks:
            states.append(block(states[-1], causal=causal, weights=weights))
        return states, weights or []

    def init_weights(self) -> None:
        """OpenAI's initialisation: residual output projections scaled down by depth."""
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * len(self.resblocks)) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias, block.mlp.c_proj.bias):
                nn.init.zeros_(bias)


class AttentionPool(nn.Module):
    """SigLIP's pooling head: a learned probe attends over every token, then a pre-norm MLP on the result."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        width = config.width
        self.probe = nn.Parameter(width**-0.5 * torch.randn(1, 1, width))
        self.attn = nn.MultiheadAttention(width, config.heads, batch_first=True)
        self.ln = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = MLP(width, round(width * config.mlp_ratio), config.quick_gelu, config.gelu_tanh)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, width] tokens -> [B, width]; `key_mask` [B, L]: False for tokens to ignore (NaFlex padding)."""
        padding = None if key_mask is None else ~key_mask
        probe = self.probe.to(x.dtype).expand(x.shape[0], -1, -1)
        pooled = self.attn(probe, x, x, key_padding_mask=padding, need_weights=False)[0]
        return (pooled + self.mlp(self.ln(pooled)))[:, 0]


class AttentionalPooler(nn.Module):
    """open_clip's CoCa pooler: learned queries (layer-normed) attend over the layer-normed tokens of the tower."""

    def __init__(self, config: VisionConfig, output_dim: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(config.attn_pooler_queries, output_dim))
        self.attn = nn.MultiheadAttention(output_dim, config.attn_pooler_heads, kdim=config.width, vdim=config.width,
                                          batch_first=True)
        self.ln_q = nn.LayerNorm(output_dim, eps=config.layer_norm_eps)
        self.ln_k = nn.LayerNorm(config.width, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, width] tokens -> [B, queries, output_dim]."""
        keys = self.ln_k(x)
        queries = self.ln_q(self.query).to(x.dtype).expand(x.shape[0], -1, -1)
        return self.attn(queries, keys, keys, need_weights=False)[0]


class VisionTransformer(nn.Module):
    """ViT image tower: patchify, class token, pre-norm, transformer, post-norm on the class token, project.

    With `pool="map"` (SigLIP): patches with a biased patch embedding and no class token or pre-norm, post-norm
    on every token, the attention-pooling head, and (with `projection=False`) no projection.
    """

    projection_names = ("proj",)  # what stays trainable when the tower is locked

    def __init__(self, config: VisionConfig, output_dim: int) -> None:
        super().__init__()
        width, grid = config.width, config.image_size // config.patch_size
        self.image_size, self.pool, self.naflex = config.image_size, config.pool, config.naflex
        map_pool = config.pool == "map"
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=map_pool)
        scale = width**-0.5
        self.class_embedding = None if map_pool else nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + (not map_pool), width))
        self.ln_pre = nn.Identity() if map_pool else nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_ratio, config.quick_gelu,
                                       config.layer_norm_eps, config.gelu_tanh)
        pooled = output_dim if config.pool == "attentional" else width  # CoCa's pooler outputs embed_dim already
        self.ln_post = nn.LayerNorm(pooled, eps=config.layer_norm_eps)
        pools = {"map": AttentionPool, "attentional": lambda c: AttentionalPooler(c, output_dim)}
        self.attn_pool = pools[config.pool](config) if config.pool in pools else None
        if not config.projection and width != output_dim:
            raise ConfigError(f"an image tower without projection needs width == embed_dim, got {width} and "
                              f"{output_dim}")
        self.proj = nn.Parameter(scale * torch.randn(pooled, output_dim)) if config.projection else None
        self.transformer.init_weights()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.attn_pool is None:
            return self.project(self.ln_post(self.transformer(self.embed(pixels), first_token_only=True)[:, 0]))
        if self.pool == "attentional":
            return self.forward_tokens(pixels)[0]
        return self.project(self.attn_pool(self.ln_post(self.transformer(self.embed(pixels)))))

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCa (pool "attentional"): the embedding [B, embed_dim] and the image tokens [B, queries - 1, embed_dim]
        a captioning decoder attends to; pool "class": the embedding and the projected patch tokens."""
        if self.pool == "class":  # a plain CLIP under an added decoder: the patch tokens, normed and projected
            x = self.ln_post(self.transformer(self.embed(pixels)))
            return self.project(x[:, 0]), self.project(x[:, 1:])
        if self.pool != "attentional":
            raise ConfigError("image tokens for a decoder come from CoCa's attentional pool (vision pool "
                              "'attentional') or a class-token tower's patches")
        queries = self.ln_post(self.attn_pool(self.transformer(self.embed(pixels))))
        return self.project(queries[:, 0]), queries[:, 1:]

    def forward_patches(self, patches: torch.Tensor, patch_mask: torch.Tensor,
                        spatial_shapes: torch.Tensor) -> torch.Tensor:
        """NaFlex input (SigLIP 2): patch rows [B, N, p*p*3] (channels last within a patch, row-major over the
        image's grid), a [B, N] mask of real patches, each image's grid (rows, cols) [B, 2] -> [B, embed_dim]."""
        if not self.naflex:
            raise ConfigError("patch input needs a NaFlex image tower (SigLIP 2's, vision.naflex): this one was "
                              "trained on its fixed grid only" + ("" if self.pool == "map" else " and reads a class "
                                                                 "token"))
        weight = self.conv1.weight
        width, patch = weight.shape[0], weight.shape[-1]
        if patches.shape[-1] != 3 * patch * patch:
            raise ConfigError(f"patch rows of {patches.shape[-1]} values; this model's patches have 3*{patch}*{patch}")
        x = F.linear(patches.to(weight.dtype), weight.permute(0, 2, 3, 1).reshape(width, -1), self.conv1.bias)
        x = x + self.resized_positions(spatial_shapes, x.shape[1]).to(x.dtype)
        mask = patch_mask.bool()
        return self.project(self.attn_pool(self.ln_post(self.transformer(x, key_mask=mask)), key_mask=mask))

    def resized_positions(self, spatial_shapes: torch.Tensor, length: int) -> torch.Tensor:
        """[B, length, width] position embeddings: the square grid resized (bilinear, antialiased) to each image's
        grid, row-major, zero after its patches (their outputs are masked)."""
        side = math.isqrt(self.positional_embedding.shape[0])
        grid = self.positional_embedding.float().reshape(side, side, -1).permute(2, 0, 1)[None]
        out = grid.new_zeros(len(spatial_shapes), length, grid.shape[1])
        for i, (rows, cols) in enumerate(spatial_shapes.tolist()):
            if rows * cols > length or rows < 1 or cols < 1:
                raise ConfigError(f"image {i}: a {rows}x{cols} patch grid does not fit {length} patch rows")
            resized = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False, antialias=True)
            out[i, : rows * cols] = resized[0].flatten(1).t()
        return out

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The pooled features in the shared space (unchanged without a projection)."""
        return pooled if self.proj is None else pooled @ self.proj

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """The transformer's input [B, tokens, width]: (class token +) patches + positions (layer-normed)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        extra = 0 if self.class_embedding is None else 1
        if x.shape[1] + extra != self.positional_embedding.shape[0]:
            side = int(math.isqrt(x.shape[1]))
            raise ConfigError(
                f"image of {pixels.shape[-2]}x{pixels.shape[-1]} px gives a {side}x{side} patch grid, "
                f"but this model takes {self.image_size}x{self.image_size} px"
            )
        if extra:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        return self.ln_pre(x + self.positional_embedding.to(x.dtype))
