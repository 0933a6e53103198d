"""The CLIP model: image tower + causal text tower projected into one space, with a learned temperature."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.model.config import CLIPConfig, PreprocessConfig
from clipforge.model.minilm import MiniLMTextTower
from clipforge.model.outputs import TowerOutputs, image_outputs, text_outputs
from clipforge.model.resnet import ModifiedResNet
from clipforge.model.transformer import Transformer, VisionTransformer
from clipforge.errors import ConfigError


class CLIP(nn.Module):
    """CLIP with OpenAI's state-dict layout (visual.*, transformer.*, token_embedding, ...)."""

    def __init__(self, config: CLIPConfig, pretrained_text: bool = True) -> None:
        super().__init__()
        self.config = config
        self.preprocess_config = PreprocessConfig()  # set by clipforge.load from the checkpoint's origin
        v, t = config.vision, config.text
        self.visual: nn.Module = (
            ModifiedResNet(v, config.embed_dim) if v.is_resnet else VisionTransformer(v, config.embed_dim)
        )
        self.context_length = t.context_length
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        if config.text_tower == "minilm":
            # A pretrained sentence encoder replaces the causal text transformer (LiT-style).
            self.text_tower = MiniLMTextTower(config.embed_dim, pretrained=pretrained_text)
            return
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, t.quick_gelu, t.layer_norm_eps)
        self.ln_final = nn.LayerNorm(t.width, eps=t.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self._init_text()

    def _init_text(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.text.width**-0.5)
        self.transformer.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (inputs are cast to it)."""
        return next(self.visual.parameters()).dtype

    @property
    def image_size(self) -> int:
        """Input resolution of the image tower."""
        return self.config.vision.image_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer blocks in backward to save activation memory."""
        if hasattr(self, "transformer"):
            self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def compile_for_inference(self) -> "CLIP":
        """torch.compile both towers (first calls compile: tens of seconds on CPU; exact up to rounding)."""
        self.visual.compile()
        if hasattr(self, "transformer"):
            self.transformer.compile(dynamic=True)  # text length varies with the longest caption
        return self

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False, output_tokens: bool = False) -> Any:
        """Image embeddings [B, embed_dim] from normalised pixels [B, 3, H, W]; with `output_tokens`,
        (embeddings, patch tokens) as open_clip returns them (see `image_outputs` for layers and attention)."""
        if output_tokens:
            out = image_outputs(self, pixels, normalize=normalize)
            return out.embeds, out.tokens
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False, output_tokens: bool = False) -> Any:
        """Text embeddings [B, embed_dim] from token ids [B, L], pooled at the EOT (highest id) token; with
        `output_tokens`, (embeddings, token features [B, L, width]) as open_clip returns them."""
        if output_tokens:
            out = text_outputs(self, tokens, normalize=normalize)
            return out.embeds, out.tokens
        features = self.project_text(self.text_body(tokens))
        return F.normalize(features, dim=-1) if normalize else features

    def image_outputs(self, pixels: torch.Tensor, attentions: bool = False, normalize: bool = False) -> TowerOutputs:
        """Embeddings, patch tokens, every layer's hidden states and (on request) attention weights."""
        return image_outputs(self, pixels, attentions, normalize)

    def text_outputs(self, tokens: torch.Tensor, attentions: bool = False, normalize: bool = False) -> TowerOutputs:
        """Embeddings, token features, every layer's hidden states and (on request) attention weights."""
        return text_outputs(self, tokens, attentions, normalize)

    def text_body(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled text features before the projection: what a locked text tower computes (cacheable)."""
        if tokens.dim() != 2:
            raise ConfigError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.context_length:
            raise ConfigError(f"tokens have length {tokens.shape[1]} > context length {self.context_length}")
        if self.config.text_tower == "minilm":
            return self.text_tower.sentence_embedding(tokens)
        eot = tokens.argmax(dim=-1)
        # The mask is causal and pooling reads the EOT position, so positions after the longest
        # EOT never influence the output: dropping them is exact and saves most of the compute.
        length = int(eot.max()) + 1 if tokens.numel() else 0
        x = self.token_embedding(tokens[:, :length]) + self.positional_embedding[:length].to(self.dtype)
        x = self.transformer(x, causal=True)
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])

    def project_text(self, pooled: torch.Tensor) -> torch.Tensor:
        """The text projection into the shared space (trainable even when the text tower is locked)."""
        if self.config.text_tower == "minilm":
            return self.text_tower.projection(pooled)
        return pooled @ self.text_projection

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text): scaled cosine similarities, as OpenAI's CLIP returns."""
        image = self.encode_image(pixels, normalize=True)
        text = self.encode_text(tokens, normalize=True)
        logits_per_image = self.logit_scale.exp() * image @ text.t()
        return logits_per_image, logits_per_image.t()
