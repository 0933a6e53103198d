"""The CLIP model: image tower + causal text tower projected into one space, with a learned temperature."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ConfigError
from clipforge.model.audio import AudioTower
from clipforge.model.compiled import compile_tower, use_compile_cache
from clipforge.model.config import (
    BUILT_IN_MODALITIES,
    AudioConfig,
    CLIPConfig,
    PreprocessConfig,
    TextConfig,
    check_modality_name,
)
from clipforge.model.decoder import MultimodalDecoder
from clipforge.model.outputs import TowerOutputs, image_outputs
from clipforge.model.param_groups import weight_decay_groups
from clipforge.model.resnet import ModifiedResNet
from clipforge.model.text_tower import TextTower
from clipforge.model.towers import text_tower_class
from clipforge.model.transformer import Transformer, VisionTransformer


class CLIP(nn.Module):
    """CLIP with OpenAI's state-dict layout (visual.*, transformer.*, token_embedding, ...)."""

    def __init__(self, config: CLIPConfig, pretrained_text: bool = True) -> None:
        super().__init__()
        self.config = config
        self.preprocess_config = PreprocessConfig()  # set by clipforge.load from the checkpoint's origin
        v = config.vision
        self.visual: nn.Module = (
            ModifiedResNet(v, config.embed_dim) if v.is_resnet else VisionTransformer(v, config.embed_dim)
        )
        self.context_length = config.text.context_length
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        bias = config.logit_bias_init  # SigLIP's learned bias; CLIP's softmax loss has none
        self.register_parameter("logit_bias", None if bias is None else nn.Parameter(torch.tensor(float(bias))))
        self.text_tower: TextTower = text_tower_class(config.text_tower)(config.text, config.embed_dim, pretrained_text)
        # Fine-tuned classifiers: logits = head(normalised image embedding); starts as the zero-shot classifier.
        self.head: nn.Linear | None = nn.Linear(config.embed_dim, len(config.classnames)) if config.classnames else None
        # CoCa: a captioning decoder over the text tower's token states and the image tokens
        self.text_decoder = MultimodalDecoder(config.decoder) if config.decoder is not None else None
        # The paper's bag-of-words baseline: n-gram classes predicted from the image embedding (model.bag_of_words)
        words = config.bag_of_words
        self.bag_of_words: nn.Linear | None = nn.Linear(config.embed_dim, words.buckets) if words else None
        # ImageBind: towers of other modalities bound to this space (model.modalities, model.encode)
        self.bound_text = nn.ModuleDict({name: text_tower_class("clip")(c, config.embed_dim, pretrained_text)
                                         for name, c in config.bound_text.items()})
        self.bound_audio = nn.ModuleDict({name: AudioTower(c, config.embed_dim)
                                          for name, c in config.bound_audio.items()})
        self.locked: set[str] = set()
        self.register_state_dict_post_hook(_text_keys_to_checkpoint)
        self.register_load_state_dict_pre_hook(_text_keys_from_checkpoint)

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
        for module in self.modules():
            if isinstance(module, Transformer):
                module.grad_checkpointing = enable

    def compile_for_inference(self, cache_dir: str | Path | None = None) -> "CLIP":
        """torch.compile both towers for inference; the first call of each shape compiles (a minute or more on
        a CPU) unless the on-disk cache (`model/compiled.py`) already holds it. Exact up to rounding."""
        use_compile_cache(cache_dir)
        compile_tower(self.visual)
        for module in self.text_tower.modules():
            if isinstance(module, Transformer):
                compile_tower(module, dynamic=True)  # text length varies with the longest caption
        return self

    def lock_image_tower(self, projection: bool = True) -> int:
        """Freeze the image tower but its projection (LiT locks it this way; `projection=False`: that too, as binding
        a new modality needs); returns how many weights froze."""
        return self._lock("image", self.visual, self.visual.projection_names if projection else ())

    def lock_text_tower(self) -> int:
        """Freeze the text tower but its projection (a pretrained one, typically); returns how many weights froze."""
        return self._lock("text", self.text_tower, self.text_tower.projection_names)

    def lock_all_but_decoder(self) -> int:
        """CoCa: freeze both towers, their projections and the temperature (BatchNorm statistics too), so only
        the captioning decoder trains; returns how many weights froze."""
        frozen = 0
        for name, param in self.named_parameters():
            if not name.startswith("text_decoder."):
                param.requires_grad_(False)
                frozen += param.numel()
        self.locked.update({"image", "text"})
        return frozen

    def _lock(self, name: str, tower: nn.Module, keep: tuple[str, ...]) -> int:
        frozen = 0
        for param_name, param in tower.named_parameters():
            if not param_name.startswith(keep):
                param.requires_grad_(False)
                frozen += param.numel()
        self.locked.add(name)
        return frozen

    def train(self, mode: bool = True) -> "CLIP":
        """nn.Module.train, but a locked tower's BatchNorm layers keep their statistics (they stay in eval mode)."""
        super().train(mode)
        for name in self.locked:
            for module in (self.visual if name == "image" else self.text_tower).modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups of the trainable weights (clipforge's one weight-decay rule)."""
        return weight_decay_groups(self.named_parameters(), weight_decay)

    def set_logit_bias(self, value: float) -> None:
        """Give the model a learned logit bias (SigLIP's loss needs one) starting at `value`."""
        self.config.logit_bias_init = value
        self.logit_bias = nn.Parameter(torch.tensor(float(value), device=self.logit_scale.device))

    @property
    def classnames(self) -> list[str]:
        """The classes of the classification head (empty for a model without one)."""
        return list(self.config.classnames)

    def set_head(self, weight: torch.Tensor, classnames: list[str], bias: torch.Tensor | None = None,
                 templates: list[str] | None = None) -> None:
        """Give the model a classification head: logits = weight @ normalised image embedding + bias."""
        if weight.shape != (len(classnames), self.config.embed_dim):
            raise ConfigError(f"head weight must be [{len(classnames)} classes, {self.config.embed_dim}], got "
                              f"{tuple(weight.shape)}")
        # Checked on a copy first (the same checks as a loaded config): a refused head leaves the model as it was.
        self.config = dataclasses.replace(self.config, classnames=list(classnames),
                                          head_templates=list(templates or []))
        head = nn.Linear(self.config.embed_dim, len(classnames), device=self.logit_scale.device, dtype=self.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(torch.zeros(len(classnames)) if bias is None else bias)
        self.head = head

    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits [B, classes] of the classification head (a fine-tuned model; see `clipforge finetune`)."""
        if self.head is None:
            raise ConfigError("this model has no classification head: fine-tune it (clipforge finetune) or "
                              "build a zero-shot classifier (clipforge.inference.build_classifier)")
        return self.head(self.encode_image(pixels, normalize=True).to(self.head.weight.dtype))

    @overload
    def encode_image(self, pixels: torch.Tensor, normalize: bool = False,
                     output_tokens: Literal[False] = False) -> torch.Tensor: ...

    @overload
    def encode_image(self, pixels: torch.Tensor, normalize: bool = False, *,
                     output_tokens: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False,
                     output_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Image embeddings [B, embed_dim] from normalised pixels [B, 3, H, W].

        `output_tokens=True` returns (embeddings, patch tokens) as open_clip's encode_image does, kept for code
        written against open_clip; new code reads `image_outputs`, one typed result with tokens, layers and
        attention.
        """
        if output_tokens:
            out = image_outputs(self, pixels, normalize=normalize)
            return out.embeds, out.tokens
        features = self.visual(pixels)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image_patches(self, patches: torch.Tensor, patch_mask: torch.Tensor, spatial_shapes: torch.Tensor,
                             normalize: bool = False) -> torch.Tensor:
        """Image embeddings from NaFlex input (SigLIP 2, transformers' Siglip2 `pixel_values`,
        `pixel_attention_mask`, `spatial_shapes`): patch rows [B, N, p*p*3], a [B, N] mask, grids [B, 2]."""
        features = self.visual.forward_patches(patches, patch_mask, spatial_shapes)
        return F.normalize(features, dim=-1) if normalize else features

    @overload
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False,
                    output_tokens: Literal[False] = False) -> torch.Tensor: ...

    @overload
    def encode_text(self, tokens: torch.Tensor, normalize: bool = False, *,
                    output_tokens: Literal[True]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False,
                    output_tokens: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings [B, embed_dim] from token ids [B, L], pooled at the EOT (highest id) token.

        `output_tokens=True` returns (embeddings, token features [B, L, width]) as open_clip's encode_text does,
        kept for code written against open_clip; new code reads `text_outputs`, one typed result.
        """
        if output_tokens:
            out = self.text_outputs(tokens, normalize=normalize)
            return out.embeds, out.tokens
        self._check_tokens(tokens)
        features = self.text_tower(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def image_outputs(self, pixels: torch.Tensor, attentions: bool = False, normalize: bool = False) -> TowerOutputs:
        """Embeddings, patch tokens, every layer's hidden states and (on request) attention weights."""
        return image_outputs(self, pixels, attentions, normalize)

    def text_outputs(self, tokens: torch.Tensor, attentions: bool = False, normalize: bool = False) -> TowerOutputs:
        """Embeddings, token features, every layer's hidden states and (on request) attention weights."""
        self._check_tokens(tokens)
        outputs = self.text_tower.outputs(tokens, attentions)
        if normalize:
            outputs.embeds = F.normalize(outputs.embeds, dim=-1)
        return outputs

    def _check_tokens(self, tokens: torch.Tensor, context_length: int | None = None) -> None:
        context_length = context_length or self.context_length
        if tokens.dim() != 2:
            raise ConfigError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > context_length:
            raise ConfigError(f"tokens have length {tokens.shape[1]} > context length {context_length}")

    def caption_logits(self, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """CoCa's teacher-forced next-token logits [B, L - 1, vocab]: position i scores tokens[:, i + 1]."""
        return self.caption_outputs(pixels, tokens)[2]

    def caption_outputs(self, pixels: torch.Tensor, tokens: torch.Tensor,
                        project: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CoCa in one pass: (image embeddings, text embeddings, teacher-forced next-token logits), unnormalised;
        `project=False`: the decoder's final states instead of logits (`text_decoder.text_projection` maps them)."""
        self._check_decoder()
        self._check_tokens(tokens)
        device = self.logit_scale.device
        image, image_tokens = self.visual.forward_tokens(pixels.to(device, self.dtype))
        text, states = self.text_tower.embed_and_tokens(tokens.to(device))
        return image, text, self.text_decoder(image_tokens, states[:, :-1], project=project)

    @property
    def modalities(self) -> tuple[str, ...]:
        """What this model embeds: "image", "text", then its bound text towers (e.g. "text-ko"), then its audio
        towers, each kind in the order bound."""
        return (*BUILT_IN_MODALITIES, *self.bound_text, *self.bound_audio)

    def encode(self, modality: str, batch: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embeddings [B, embed_dim] of a batch of one modality: pixels for "image", token ids for "text" and a
        bound text tower (its own tokenizer: clipforge.get_tokenizer(path, modality=...)), log-mel spectrograms for
        an audio tower (clipforge.get_preprocess(path, modality))."""
        if modality == "image":
            return self.encode_image(batch, normalize=normalize)
        if modality == "text":
            return self.encode_text(batch, normalize=normalize)
        if modality in self.bound_audio:
            features = self.bound_audio[modality](batch.to(self.logit_scale.device))
            return F.normalize(features, dim=-1) if normalize else features
        if modality not in self.bound_text:
            raise ConfigError(f"this model has no {modality!r} tower; it embeds {', '.join(self.modalities)}")
        self._check_tokens(batch, self.config.bound_text[modality].context_length)
        features = self.bound_text[modality](batch.to(self.logit_scale.device))
        return F.normalize(features, dim=-1) if normalize else features

    def bind_text_tower(self, modality: str, config: TextConfig) -> nn.Module:
        """Add a fresh text tower for `modality` (a second language, ...) to train against this space; returns it."""
        self._check_new_modality(modality)
        tower = text_tower_class("clip")(config, self.config.embed_dim, False).to(self.logit_scale.device)
        self.config.bound_text[modality] = config
        self.bound_text[modality] = tower
        return tower

    def bind_audio_tower(self, modality: str, config: AudioConfig) -> AudioTower:
        """Add a fresh audio tower for `modality` (e.g. "audio") to train against this space; returns it."""
        self._check_new_modality(modality)
        tower = AudioTower(config, self.config.embed_dim).to(self.logit_scale.device)
        self.config.bound_audio[modality] = config
        self.bound_audio[modality] = tower
        return tower

    def _check_new_modality(self, modality: str) -> None:
        check_modality_name(modality)
        if modality in self.modalities:
            raise ConfigError(f"this model already has a {modality!r} tower")

    def bag_of_words_logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, buckets] logits of the caption's hashed n-grams (clipforge.model.bag_of_words) from the images."""
        if self.bag_of_words is None:
            raise ConfigError("this model has no bag-of-words head (model option bag_of_words, e.g. "
                              "--model-overrides '{\"bag_of_words\": {\"buckets\": 16384, \"ngram\": 2}}')")
        device = self.logit_scale.device
        return self.bag_of_words(self.visual(pixels.to(device, self.dtype)))

    def generate(self, images: torch.Tensor, strategy: str = "greedy", max_length: int = 30, **settings: Any
                 ) -> torch.Tensor:
        """Caption token ids [B, <= max_length] (rows start with start-of-text; padding after end-of-text).

        strategy "greedy", "beam" (`num_beams`, `length_penalty`) or "sample" (`temperature`, `top_k`, `top_p`,
        `seed`); `min_length`, `repetition_penalty`; `sot_token_id`, `eos_token_id`, `pad_token_id` default to
        CLIP's tokenizer's. `clipforge.decode` (or the tokenizer's decode) turns ids into text.
        """
        from clipforge.model.generation import generate_ids

        self._check_decoder()
        return generate_ids(self, images, strategy=strategy, max_length=max_length, **settings)

    def _check_decoder(self) -> None:
        if self.text_decoder is None:
            raise ConfigError("this model has no captioning decoder (a CoCa model has one: e.g. "
                              "clipforge.load('coca_ViT-B-32', pretrained=...))")

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text): scaled cosine similarities (plus the logit bias), as OpenAI's CLIP."""
        image = self.encode_image(pixels, normalize=True)
        text = self.encode_text(tokens, normalize=True)
        logits_per_image = self.logit_scale.exp() * image @ text.t()
        if self.logit_bias is not None:  # SigLIP's logits: sigmoid(scale * cosine + bias) is the match probability
            logits_per_image = logits_per_image + self.logit_bias
        return logits_per_image, logits_per_image.t()


def _text_keys_to_checkpoint(module: CLIP, state_dict: dict[str, Any], prefix: str, metadata: Any) -> None:
    """`text_tower.transformer.*` -> `transformer.*` for a tower saved at the top level (OpenAI's layout)."""
    _move_keys(state_dict, prefix + "text_tower.", prefix, module.text_tower.checkpoint_names)


def _text_keys_from_checkpoint(module: CLIP, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """The inverse on load, before nn.Module matches keys to parameters."""
    _move_keys(state_dict, prefix, prefix + "text_tower.", module.text_tower.checkpoint_names)


def _move_keys(state_dict: dict[str, Any], old: str, new: str, names: tuple[str, ...]) -> None:
    for key in [k for k in state_dict if k.startswith(tuple(old + name for name in names))]:
        state_dict[new + key[len(old):]] = state_dict.pop(key)
