"""One optimizer step's compute: exact gradient accumulation, bf16 with fp32 master weights, grad sync."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.distributed import DistInfo, average_gradients
from clipforge.loss import clamp_logit_scale_
from clipforge.model.bag_of_words import bag_of_words_loss


class LockedTextCache:
    """Pooled features of a locked text tower by caption: each distinct caption is encoded once.

    A locked tower is a fixed function, so its output for a token row never changes; with a
    pretrained 22M-parameter text tower this removes most of the step's compute (the projection
    on top stays trainable and runs every step).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.features: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        return row[row != 0].cpu().numpy().tobytes()

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, width] pooled features for token rows [B, L]."""
        keys = [self._key(row) for row in tokens]
        first_row: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self.features:
                first_row.setdefault(key, i)  # one row per distinct caption
        missing = list(first_row.values())
        if missing:
            pooled = self.model.text_tower.pooled(tokens[missing])
            for i, feature in zip(missing, pooled):
                self.features[keys[i]] = feature.clone()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self.features[k] for k in keys])


class TrainStep:
    """Forward + backward of one (possibly accumulated) batch; grads land on `optim_params()`.

    Accumulation embeds every micro-batch without grad, takes the loss and its feature
    gradients on the whole batch, then recomputes one micro-batch at a time with grad and
    back-propagates its slice: the gradient equals the large-batch gradient (plain
    accumulation would change the contrastive objective).
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, precision: str, accum_steps: int,
                 grad_clip: float, dist_info: DistInfo, modality: str = "text") -> None:
        """`modality`: the tower the images are matched with ("text"; a bound tower's name when binding one)."""
        self.model, self.loss_fn, self.modality = model, loss_fn, modality
        self.accum_steps, self.grad_clip, self.dist = accum_steps, grad_clip, dist_info
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.master: list[torch.Tensor] | None = None
        self.text_cache = LockedTextCache(model) if "text" in model.locked and modality == "text" else None
        # oneDNN convolutions run ~25% faster on NHWC tensors on CPU (measured, ResNet tower fwd+bwd).
        self.channels_last = bool(getattr(model.config.vision, "is_resnet", False))
        if self.channels_last:
            model.visual.to(memory_format=torch.channels_last)
        self.frozen: dict[int, torch.Tensor] = {}  # bf16 mode: fp32 values of the weights that do not train
        if precision == "bf16":
            # A frozen weight (a locked tower, a fine-tuning's text tower) has no master: checkpoints keep its fp32
            # value, so what does not train is saved as it was loaded, not rounded to bf16.
            self.frozen = {id(p): p.detach().clone() for p in model.parameters() if not p.requires_grad}
            # Measured on this CPU: bf16 weights run 2x faster than fp32 while CPU autocast is
            # slower than fp32; the fp32 master copies keep small updates from rounding away.
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.trainable]
            logit_params = [p for p in (model.logit_scale, model.logit_bias) if p is not None]
            kept = [p.data.clone() for p in logit_params]
            model.to(torch.bfloat16)
            for param, value in zip(logit_params, kept):
                param.data = value  # temperature and bias stay fp32, unrounded (exact resume)

    def optim_params(self) -> list[torch.Tensor]:
        """What the optimizer updates: fp32 master weights in bf16 mode, the parameters otherwise."""
        return self.master if self.master is not None else self.trainable

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """The model's weight-decay groups over what the optimizer updates (the fp32 masters in bf16 mode)."""
        target = {id(p): m for p, m in zip(self.trainable, self.optim_params())}
        return [{**group, "params": [target[id(p)] for p in group["params"]]}
                for group in self.model.param_groups(weight_decay)]

    def clamp_logit_scale(self, max_value: float = 100.0) -> None:
        """Clamp the temperature at `max_value` (paper), in the master copy too so checkpoints honour it."""
        clamp_logit_scale_(self.model.logit_scale, max_value)
        if self.master is not None:
            for param, master in zip(self.trainable, self.master):
                if param is self.model.logit_scale:
                    clamp_logit_scale_(master, max_value)

    def fp32_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict for saving: fp32 master values of the weights in bf16 mode, CPU tensors."""
        masters = {id(p): m for p, m in zip(self.trainable, self.master or [])}
        out = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            if name.endswith("num_batches_tracked"):  # BatchNorm's counter: unused with momentum, never saved
                continue
            tensor = masters.get(id(value), self.frozen.get(id(value), value)).detach()
            out[name] = (tensor.float() if isinstance(value, nn.Parameter) else tensor).cpu().contiguous()
        return out

    def sync_model(self) -> None:
        """Copy updated master weights back into the bf16 model."""
        if self.master is not None:
            with torch.no_grad():
                for param, master in zip(self.trainable, self.master):
                    param.copy_(master)

    def _features(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        image = self.model.encode_image(pixels, normalize=True).float()
        if self.modality != "text":  # a bound tower being trained (clipforge bind)
            return image, self.model.encode(self.modality, tokens, normalize=True).float()
        if self.text_cache is None:
            return image, self.model.encode_text(tokens, normalize=True).float()
        text = self.model.text_tower.project(self.text_cache(tokens).to(self.model.dtype))
        return image, F.normalize(text, dim=-1).float()

    def __call__(self, pixels: torch.Tensor, tokens: torch.Tensor) -> float:
        """Accumulate gradients for one optimizer step; returns the loss value."""
        for p in self.trainable:
            p.grad = None
        scale, bias = self.model.logit_scale.exp(), self.model.logit_bias
        if self.accum_steps == 1:
            loss = self.loss_fn(*self._features(pixels, tokens), scale, bias)
            loss.backward()
            value = loss.item()
        else:
            micro = list(zip(pixels.chunk(self.accum_steps), tokens.chunk(self.accum_steps)))
            with torch.no_grad():
                cached = [self._features(p, t) for p, t in micro]
            # Loss once on detached full-batch features: exact grads for temperature/bias and
            # for every feature; then each micro-batch is recomputed and back-propagated.
            images = torch.cat([c[0] for c in cached]).requires_grad_(True)
            texts = torch.cat([c[1] for c in cached]).requires_grad_(True)
            loss = self.loss_fn(images, texts, scale, bias)
            loss.backward()
            value = loss.item()
            start = 0
            for p, t in micro:
                image, text = self._features(p, t)
                rows = slice(start, start + len(p))
                torch.autograd.backward([image, text], [images.grad[rows], texts.grad[rows]])
                start += len(p)
        self._finish_grads()
        return value

    def _finish_grads(self) -> None:
        if self.master is not None:
            for param, master in zip(self.trainable, self.master):
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None  # free the bf16 copy at once: lowers peak memory
        params = self.optim_params()
        average_gradients(params, self.dist.world_size)
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)


class ImageLossStep(TrainStep):
    """A loss summed over samples from the images alone (`summed_loss`), divided by the batch size: accumulating
    micro-batches gives exactly the large-batch gradient; bf16 masters, grad sync and clipping are TrainStep's."""

    def summed_loss(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss of a micro-batch, summed over its samples."""
        raise NotImplementedError

    def __call__(self, pixels: torch.Tensor, targets: torch.Tensor) -> float:
        """Accumulate gradients for one optimizer step on (pixels, targets); returns the loss value."""
        for p in self.trainable:
            p.grad = None
        value = 0.0
        for chunk, rows in zip(pixels.chunk(self.accum_steps), targets.chunk(self.accum_steps)):
            if self.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            loss = self.summed_loss(chunk, rows) / len(pixels)
            loss.backward()
            value += loss.item()
        self._finish_grads()
        return value


class ClassifierStep(ImageLossStep):
    """Cross-entropy of the model's classification head (`CLIP.classify`) on class indices, for fine-tuning."""

    def summed_loss(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the head's logits."""
        return F.cross_entropy(self.model.classify(pixels).float(), targets, reduction="sum")


class BagOfWordsStep(ImageLossStep):
    """The paper's bag-of-words baseline: the image embedding predicts the caption's hashed n-grams (soft-target
    cross-entropy, clipforge.model.bag_of_words); the text tower takes no part."""

    def summed_loss(self, pixels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the predicted n-gram distribution against each caption's (token ids)."""
        logits = self.model.bag_of_words_logits(pixels)
        return bag_of_words_loss(logits, targets.to(logits.device), self.model.config.bag_of_words)


class CaptionStep(TrainStep):
    """CoCa: the contrastive loss of the embeddings plus the captioning decoder's token cross-entropy (padding id 0
    ignored), weighted. Accumulation stays exact: the contrastive part as TrainStep's (full-batch loss on cached
    features, then each micro-batch recomputed), the caption part a token sum divided by the batch's token count."""

    def __init__(self, *args: Any, contrastive_weight: float = 1.0, caption_weight: float = 2.0) -> None:
        super().__init__(*args)
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight

    def _outputs(self, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised image embeddings, normalised text embeddings, the caption's summed token cross-entropy)."""
        image, text, states = self.model.caption_outputs(pixels, tokens, project=False)
        targets = tokens[:, 1:].to(states.device)
        scored = targets != 0  # padding is never a target: project only the scored positions (the vocabulary
        logits = states[scored] @ self.model.text_decoder.text_projection  # projection dominates a small decoder)
        caption = F.cross_entropy(logits.float(), targets[scored], reduction="sum")
        return F.normalize(image, dim=-1).float(), F.normalize(text, dim=-1).float(), caption

    def __call__(self, pixels: torch.Tensor, tokens: torch.Tensor) -> float:
        """Accumulate gradients for one optimizer step; returns the weighted loss value."""
        for p in self.trainable:
            p.grad = None
        scale, bias = self.model.logit_scale.exp(), self.model.logit_bias
        targets = max(int((tokens[:, 1:] != 0).sum()), 1)  # the batch's caption tokens (padding excluded)
        micro = list(zip(pixels.chunk(self.accum_steps), tokens.chunk(self.accum_steps)))
        if self.accum_steps == 1:
            image, text, caption = self._outputs(pixels, tokens)
            loss = (self.contrastive_weight * self.loss_fn(image, text, scale, bias)
                    + self.caption_weight * caption / targets)
            loss.backward()
            value = loss.item()
        else:
            with torch.no_grad():
                cached = [self._outputs(p, t) for p, t in micro]
            images = torch.cat([c[0] for c in cached]).requires_grad_(True)
            texts = torch.cat([c[1] for c in cached]).requires_grad_(True)
            contrastive = self.contrastive_weight * self.loss_fn(images, texts, scale, bias)
            contrastive.backward()
            value = contrastive.item() + self.caption_weight * sum(float(c[2]) for c in cached) / targets
            start = 0
            for p, t in micro:
                image, text, caption = self._outputs(p, t)
                rows = slice(start, start + len(p))
                pairs = [(image, images.grad[rows]), (text, texts.grad[rows]),
                         (self.caption_weight * caption / targets, None)]
                pairs = [(out, grad) for out, grad in pairs if out.requires_grad]  # frozen towers: the decoder's
                torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
                start += len(p)
        self._finish_grads()
        return value
