"""Text towers behind one interface: token ids -> pooled features -> projection into the shared space.

A tower names its tokenizer (`tokenizer`), which of its parameters stay trainable when it is locked (its
projection), and computes pooled features that a locked tower can cache (`pooled`). CLIP dispatches to
the tower and never asks which kind it is.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.config import TextConfig
from clipforge.model.outputs import TowerOutputs
from clipforge.model.transformer import Transformer
from clipforge.text.base import OPENAI_VOCAB_SIZE, Tokenizer

# The causal tower's parameters live at the top level of OpenAI's checkpoints; this tower keeps that layout.
OPENAI_TEXT_NAMES = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
                     "cls_emb")


class TextTower(nn.Module):
    """Interface of a text tower; subclasses set `kind` (CLIPConfig.text_tower) and `projection_names`."""

    kind: str = ""
    projection_names: tuple[str, ...] = ()  # parameter names (relative) that stay trainable when locked
    checkpoint_names: tuple[str, ...] = ()  # children saved at the model's top level instead of under text_tower.
    pooling: str = ""  # how token features become one vector (recorded by the ONNX export)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pooled features before the projection: what a locked tower computes (cacheable per caption)."""
        raise NotImplementedError

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The projection into the shared space."""
        raise NotImplementedError

    def untrimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Projected features over the full row length (no value-dependent shapes: traceable for export)."""
        raise NotImplementedError

    def outputs(self, tokens: torch.Tensor, attentions: bool = False) -> TowerOutputs:
        """Projected features with per-token outputs (see TowerOutputs); towers without them refuse."""
        raise ConfigError(f"per-token outputs are implemented for CLIP's causal text tower, not {self.kind!r}")

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.project(self.pooled(tokens))

    @classmethod
    def tokenizer(cls, config: TextConfig, directory: Path | None = None,
                  context_length: int | None = None) -> Tokenizer:
        """This tower's tokenizer: the files in `directory` when it has them, else the packaged default."""
        raise NotImplementedError


def cls_key_mask(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """[B, L + 1] keys a CoCa text row may attend: open_clip's mask for its CoCa weights puts the class token's
    slot first, so key j is kept when token j - 1 is not padding (key 0 always)."""
    return torch.cat([torch.ones_like(tokens[:, :1], dtype=torch.bool), tokens != pad_id], dim=1)


class CausalTextTower(TextTower):
    """CLIP's causal Transformer pooled at the EOT (highest id) token, with OpenAI's parameter names.

    SigLIP's text tower is this one with options: bidirectional attention (`causal=False`), pooled at the last
    position (`pool="last"`), a biased projection (`projection_bias=True`). CoCa's appends a learned class
    embedding and pools it (`pool="cls"`); its per-token features feed the captioning decoder.
    """

    kind = "clip"
    projection_names = ("text_projection",)
    checkpoint_names = OPENAI_TEXT_NAMES
    pooling = "EOT (highest id)"

    def __init__(self, config: TextConfig, embed_dim: int, pretrained: bool = True) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.pool_cls = config.pool == "cls"
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length + self.pool_cls, config.width))
        self.cls_emb = nn.Parameter(torch.empty(config.width)) if self.pool_cls else None
        self.transformer = Transformer(config.width, config.layers, config.heads, config.mlp_ratio, config.quick_gelu,
                                       config.layer_norm_eps, config.gelu_tanh)
        self.ln_final = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.width, embed_dim))
        self.text_projection_bias = nn.Parameter(torch.zeros(embed_dim)) if config.projection_bias else None
        self.causal, self.pool_last = config.causal, config.pool == "last"
        if self.pool_last or not self.causal:
            self.pooling = "last position" if self.pool_last else "EOT (highest id), bidirectional"
        if self.pool_cls:
            self.pooling = "appended class embedding (CoCa)"
            nn.init.normal_(self.cls_emb, std=0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=config.width**-0.5)
        self.transformer.init_weights()

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_cls:  # the class embedding sits after the whole row: nothing to trim
            return self.ln_final(self.cls_states(tokens)[:, -1])
        if not self.causal or self.pool_last:  # every position can reach the pooled one: nothing to trim
            return self._at_pool(self.transformer(self._embed(tokens), causal=self.causal), tokens)
        # The mask is causal and pooling reads the EOT position, so positions after the longest
        # EOT never influence the output: dropping them is exact and saves most of the compute.
        length = int(tokens.argmax(dim=-1).max()) + 1 if tokens.numel() else 0
        return self._at_pool(self.transformer(self._embed(tokens[:, :length]), causal=True), tokens)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        projected = pooled @ self.text_projection
        return projected if self.text_projection_bias is None else projected + self.text_projection_bias

    def untrimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_cls:
            return self.project(self.pooled(tokens))
        return self.project(self._at_pool(self.transformer(self._embed(tokens), causal=self.causal), tokens))

    def cls_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """CoCa: the last layer's states [B, L + 1, width] of the row with the class embedding appended. Padding
        (id 0) keys are masked with open_clip's offset for CoCa weights (key j kept when token j - 1 is not
        padding; key 0 always), and attention is causal, so a token's state never depends on what follows."""
        x = torch.cat([self.token_embedding(tokens), self.cls_emb.to(self.token_embedding.weight.dtype).expand(
            tokens.shape[0], 1, -1)], dim=1)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        return self.transformer(x, causal=True, key_mask=cls_key_mask(tokens))

    def embed_and_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CoCa: the projected embedding and the per-token states [B, L, width] the decoder reads (the last layer's,
        before the final norm); a plain CLIP tower under an added decoder gives its EOT-pooled embedding."""
        if self.pool_cls:
            states = self.cls_states(tokens)
            return self.project(self.ln_final(states[:, -1])), states[:, :-1]
        states = self.transformer(self._embed(tokens), causal=True)
        return self.project(self._at_pool(states, tokens)), states

    def outputs(self, tokens: torch.Tensor, attentions: bool = False) -> TowerOutputs:
        if self.pool_cls:
            raise ConfigError("per-token outputs are not implemented for CoCa's text tower: use "
                              "text_tower.embed_and_tokens")
        states, weights = self.transformer.forward_states(self._embed(tokens), causal=self.causal,
                                                          attentions=attentions)
        final = self.ln_final(states[-1])
        pooled = final[torch.arange(final.shape[0], device=final.device), self._positions(tokens)]
        return TowerOutputs(self.project(pooled), final, tuple(states), tuple(weights))

    def _positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each row's pooled position: its EOT (highest id), or the last one."""
        if self.pool_last:
            return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        return tokens.argmax(dim=-1)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = self.positional_embedding[: tokens.shape[1]].to(self.token_embedding.weight.dtype)
        return self.token_embedding(tokens) + positions

    def _at_pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The final layer norm of each row's features at its pooled position (EOT, or the last)."""
        return self.ln_final(x[torch.arange(x.shape[0], device=x.device), self._positions(tokens)])

    @classmethod
    def tokenizer(cls, config: TextConfig, directory: Path | None = None,
                  context_length: int | None = None) -> Tokenizer:
        from clipforge.text.tokenizer import CLIPTokenizer  # local: ftfy and regex start-up cost

        length = context_length or config.context_length
        if directory is not None and (directory / "spiece.model").is_file():  # SigLIP's SentencePiece vocabulary
            from clipforge.text.spiece import SentencePieceTokenizer

            return SentencePieceTokenizer.from_directory(directory, length)
        from clipforge.text.hf_json import GemmaTokenizer, is_gemma_folder

        if directory is not None and is_gemma_folder(directory):  # SigLIP 2's Gemma tokenizer.json
            return GemmaTokenizer.from_directory(directory, length)
        found = CLIPTokenizer.from_model_directory(directory, length) if directory is not None else None
        if found is not None:
            return found
        if config.vocab_size != OPENAI_VOCAB_SIZE:
            raise ConfigError(f"this text tower has a {config.vocab_size}-token vocabulary, not OpenAI's: "
                              "pass its tokenizer (the BPE vocab file it was trained with)")
        return CLIPTokenizer(context_length=length)

