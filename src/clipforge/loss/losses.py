"""CLIP's symmetric InfoNCE loss (plain or tiled), SigLIP's pairwise sigmoid loss and the temperature clamp.

Distributed convention (both losses): features are all-gathered with gradients and each rank computes
the loss of its own rows against the whole global batch ("local loss"), averaged over its local rows.
The mean of the per-rank losses is then the single-process loss of the global batch, and because the
gather's backward sums every rank's contribution, DDP's gradient averaging yields exactly the
single-process gradient of the global batch. (The feature gradient seen on one rank is world_size times
the full-batch gradient of those rows; DDP's division by world_size cancels it.)
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipforge.errors import ConfigError
from clipforge.loss.distributed import all_gather_with_grad, gather_features, world_info
from clipforge.loss.tiled import tiled_contrastive_loss

# Chosen with benchmarks/loss_memory.py on 2 shared CPU cores: on an idle machine 512-2048 ran about
# as fast as the plain loss or faster (4096 was up to 2x slower: its blocks fall out of cache across
# the passes made over them), and when other processes compete for the cores 1024 fell behind (each
# small op waits on a descheduled thread) while 2048 kept pace. A 2048 block is 16 MiB.
DEFAULT_CHUNK_SIZE = 2048


def _as_tensor(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return value if torch.is_tensor(value) else torch.tensor(float(value), dtype=like.dtype, device=like.device)


def _check_pair(image: torch.Tensor, text: torch.Tensor) -> None:
    if image.dim() != 2 or image.shape != text.shape:
        shapes = f"{tuple(image.shape)} and {tuple(text.shape)}"
        raise ConfigError(f"image and text features must both be [B, D], got {shapes}")


def contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int = 0,
    rows: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of rows [offset, offset+rows) of full-batch features (all rows by default)."""
    _check_pair(image, text)
    rows = image.shape[0] - offset if rows is None else rows
    scale = _as_tensor(logit_scale, image)
    if chunk_size is not None:
        return tiled_contrastive_loss(image, text, scale, chunk_size, offset, rows)
    local = slice(offset, offset + rows)
    labels = torch.arange(offset, offset + rows, device=image.device)
    logits_per_image = scale * image[local] @ text.t()
    if rows == image.shape[0]:
        logits_per_text = logits_per_image.t()  # one matmul when this process owns the whole batch
    else:
        logits_per_text = scale * text[local] @ image.t()
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric cross-entropy over scaled cosine similarities, optionally tiled and all-gathered."""

    model_overrides: dict = {}  # CLIP's own initial temperature, no logit bias

    def __init__(
        self, chunk_size: int | None = None, gather: bool = True, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ConfigError(f"chunk_size must be None or >= 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.gather = gather
        self.group = group

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Scalar loss of L2-normalised features [B, D] with the exponentiated logit scale."""
        _check_pair(image_features, text_features)
        if logit_bias is not None:  # a softmax over a row is unchanged by a shared bias: a SigLIP model by mistake
            raise ConfigError("CLIP's contrastive loss has no logit bias; "
                              "this model has one (SigLIP): use loss='siglip'")
        world, rank = world_info(self.group) if self.gather else (1, 0)
        rows = image_features.shape[0]
        if world > 1:
            image_features, text_features = gather_features(image_features, text_features, self.group)
        return contrastive_loss(image_features, text_features, logit_scale, rank * rows, rows, self.chunk_size)

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, gather={self.gather}"


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023): -sum(logsigmoid(z_ij * (s * I_i.T_j + b))) / B.

    The bias b is the model's `logit_bias` parameter (so DDP averages its gradient with the others'), passed
    to forward like the temperature. `model_overrides` is how a model for this loss starts: SigLIP's log
    logit scale log(10) and bias -10.
    """

    SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
    model_overrides = {"logit_scale_init": SIGLIP_INIT_LOGIT_SCALE, "logit_bias_init": -10.0}

    def __init__(
        self, chunk_size: int | None = None, gather: bool = True, group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        if chunk_size is not None:  # every loss takes the same arguments, so a trainer never asks which it has
            raise ConfigError("SigLIP's loss has no tiled form here: leave loss_chunk_size at 0")
        self.gather = gather
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Scalar loss of this rank's images against every rank's texts, normalised by the local batch."""
        _check_pair(image_features, text_features)
        if logit_bias is None:
            raise ConfigError("SigLIP's loss needs a logit bias: create the model with logit_bias_init=-10 "
                              "(CLIP.set_logit_bias), or pass one")
        world, rank = world_info(self.group) if self.gather else (1, 0)
        rows = image_features.shape[0]
        if world > 1:
            text_features = all_gather_with_grad(text_features, self.group)
        logits = _as_tensor(logit_scale, image_features) * image_features @ text_features.t() + logit_bias
        signs = torch.full_like(logits, -1.0)
        index = torch.arange(rows, device=logits.device)
        signs[index, index + rank * rows] = 1.0
        return -F.logsigmoid(signs * logits).sum() / rows

    def extra_repr(self) -> str:
        return f"gather={self.gather}"


@torch.no_grad()
def clamp_logit_scale_(model_or_param: nn.Module | torch.Tensor, max_value: float = 100.0) -> torch.Tensor:
    """Clamp a log logit scale (a model's `logit_scale`, DDP-wrapped or not) in place to log(max_value)."""
    param = model_or_param
    if isinstance(param, nn.Module):
        module = getattr(param, "module", param)  # DistributedDataParallel / DataParallel wrap the model
        param = getattr(module, "logit_scale", None)
        if not torch.is_tensor(param):
            raise ConfigError(f"{type(module).__name__} has no logit_scale tensor to clamp")
    return param.clamp_(max=math.log(max_value))
