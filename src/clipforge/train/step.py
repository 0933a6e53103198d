"""One optimizer step's compute: exact gradient accumulation, bf16 with fp32 master weights, grad sync."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.distributed import DistInfo, average_gradients

PROJECTIONS = ("visual.proj", "visual.attnpool.c_proj", "text_projection", "text_tower.projection")


def lock_tower(model: nn.Module, tower: str) -> int:
    """Freeze the image or text tower's body (its projection into the shared space stays trainable)."""
    frozen = 0
    for name, param in model.named_parameters():
        in_image = name.startswith("visual.")
        if name == "logit_scale" or name.startswith(PROJECTIONS) or in_image != (tower == "image"):
            continue
        param.requires_grad_(False)
        frozen += param.numel()
    return frozen


def train_mode(model: nn.Module, locked: tuple[str, ...] = ()) -> None:
    """model.train(), but a locked tower's BatchNorm keeps its statistics frozen (eval mode)."""
    model.train()
    for tower in locked:
        root = model.visual if tower == "image" else model
        for name, module in root.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (tower == "image" or not name.startswith("visual")):
                module.eval()


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
            pooled = self.model.text_body(tokens[missing])
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
                 grad_clip: float, dist_info: DistInfo) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.accum_steps, self.grad_clip, self.dist = accum_steps, grad_clip, dist_info
        self.trainable = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
        self.master: list[torch.Tensor] | None = None
        text_params = [p for n, p in model.named_parameters()
                       if not n.startswith(("visual.", "logit_scale")) and not n.startswith(PROJECTIONS)]
        locked_text = bool(text_params) and not any(p.requires_grad for p in text_params)
        self.text_cache = LockedTextCache(model) if locked_text else None
        # oneDNN convolutions run ~25% faster on NHWC tensors on CPU (measured, ResNet tower fwd+bwd).
        self.channels_last = bool(getattr(model.config.vision, "is_resnet", False))
        if self.channels_last:
            model.visual.to(memory_format=torch.channels_last)
        if precision == "bf16":
            # Measured on this CPU: bf16 weights run 2x faster than fp32 while CPU autocast is
            # slower than fp32; the fp32 master copies keep small updates from rounding away.
            self.master = [p.detach().float().clone().requires_grad_(True) for p in self.trainable]
            temperature = model.logit_scale.data.clone()
            model.to(torch.bfloat16)
            model.logit_scale.data = temperature  # the temperature stays fp32, unrounded (exact resume)

    def optim_params(self) -> list[torch.Tensor]:
        """What the optimizer updates: fp32 master weights in bf16 mode, the parameters otherwise."""
        return self.master if self.master is not None else self.trainable

    def clamp_logit_scale(self, max_value: float = 100.0) -> None:
        """Clamp the temperature at `max_value` (paper), in the master copy too so checkpoints honour it."""
        limit = math.log(max_value)
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=limit)
            if self.master is not None:
                for param, master in zip(self.trainable, self.master):
                    if param is self.model.logit_scale:
                        master.clamp_(max=limit)

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
        if self.text_cache is None:
            return image, self.model.encode_text(tokens, normalize=True).float()
        text = self.model.project_text(self.text_cache(tokens).to(self.model.dtype))
        return image, F.normalize(text, dim=-1).float()

    def __call__(self, pixels: torch.Tensor, tokens: torch.Tensor) -> float:
        """Accumulate gradients for one optimizer step; returns the loss value."""
        for p in self.trainable:
            p.grad = None
        scale = self.model.logit_scale.exp()
        if self.accum_steps == 1:
            loss = self.loss_fn(*self._features(pixels, tokens), scale)
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
            loss = self.loss_fn(images, texts, scale)
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
