"""OpenAI's ModifiedResNet image tower: 3-conv stem, anti-aliased downsampling, attention pooling."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.config import VisionConfig


class Bottleneck(nn.Module):
    """ResNet bottleneck whose stride is an average pool before the last conv (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # Keys "-1", "0", "1" reproduce OpenAI's state-dict names (downsample.0.weight, ...).
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Pool a feature map with one attention query: the mean token attends to all positions."""

    def __init__(self, spatial: int, embed_dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """[B, output_dim] pooled features; `all_positions`: [B, 1 + HW, output_dim], every position queried
        (the pooled one first), the image tokens a captioning decoder attends to."""
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        batch, length, dim = x.shape
        head_dim, queries = dim // self.heads, length if all_positions else 1
        q = self.q_proj(x[:, :queries]).view(batch, queries, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.heads, head_dim).transpose(1, 2)
        out = self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, queries, dim))
        return out if all_positions else out[:, 0]


class ModifiedResNet(nn.Module):
    """OpenAI's CLIP ResNet image tower."""

    projection_names = ("attnpool.c_proj",)  # what stays trainable when the tower is locked

    def __init__(self, config: VisionConfig, output_dim: int) -> None:
        super().__init__()
        width, layers = config.width, config.layers
        self.image_size = config.image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        embed_dim = width * 32
        if config.image_size % 32:
            raise ConfigError(f"ResNet image_size must be a multiple of 32, got {config.image_size}")
        self.attnpool = AttentionPool2d(config.image_size // 32, embed_dim, config.heads, output_dim)
        self.init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        """OpenAI's initialisation: attention pool projections by fan-in, last BN of each block at zero."""
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.feature_map(pixels))

    def forward_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A captioning decoder's input: the embedding [B, output_dim] and the attention pool's output at every
        position [B, 1 + HW, output_dim] (the pooled one first: at 32 px the grid is a single position)."""
        tokens = self.attnpool(self.feature_map(pixels), all_positions=True)
        return tokens[:, 0], tokens

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last stage's features [B, width * 32, H / 32, W / 32], what the attention pool reads."""
        x = pixels.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        expected = self.attnpool.positional_embedding.shape[0] - 1
        if x.shape[-1] * x.shape[-2] != expected:
            raise ConfigError(
                f"image of {pixels.shape[-2]}x{pixels.shape[-1]} px does not fit this model "
                f"({self.image_size}x{self.image_size} px)"
            )
        return x
