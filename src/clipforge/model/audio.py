"""The bound audio tower (ImageBind's): a ViT over the log-mel spectrogram (`data.audio.AudioPreprocess`).

ImageBind's shape: one input channel, 16x16 patches every 10 mel bins / frames (overlapping, so a short clip still
gives a usable grid), a class token, pre-norm blocks, the class token normed and projected without bias.
"""
from __future__ import annotations

import torch
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.config import AudioConfig
from clipforge.model.transformer import Transformer


class AudioTower(nn.Module):
    """Spectrograms [B, 1, mel_bins, frames] -> embeddings [B, output_dim] (not normalised)."""

    def __init__(self, config: AudioConfig, output_dim: int) -> None:
        super().__init__()
        self.config = config
        width = config.width
        rows, cols = config.grid
        self.conv1 = nn.Conv2d(1, width, kernel_size=config.patch_size, stride=config.patch_stride, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(0.02 * torch.randn(rows * cols + 1, width))
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_ratio, False,
                                       config.layer_norm_eps)
        self.ln_post = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_weights()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """What one preprocessed clip is: (1, mel_bins, frames)."""
        return 1, self.config.mel_bins, self.config.frames

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """The class token's projection for a batch of normalised log-mel spectrograms."""
        if tuple(mel.shape[1:]) != self.input_shape:
            raise ConfigError(f"audio input of shape {tuple(mel.shape[1:])}; this tower takes {self.input_shape} "
                              f"(clipforge.get_preprocess(path, modality) makes it)")
        x = self.conv1(mel.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.transformer(x + self.positional_embedding.to(x.dtype), first_token_only=True)
        return self.ln_post(x[:, 0]) @ self.proj
