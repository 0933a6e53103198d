"""Worker for tests/test_loss.py::test_distributed_*: run under torchrun (gloo, CPU), one half-batch per rank.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_loss_worker.py OUT
Rank r writes OUT/rank{r}.pt with, for each loss, its local loss and the gradients of
(a) leaf features (its rows of the global batch) and the logit scale, as this rank sees them, and
(b) the parameters of a tiny DDP-wrapped two-tower model, after DDP's gradient averaging.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clipforge.loss import ContrastiveLoss, SigLIPLoss

BATCH, DIM, IN_DIM, SEED = 16, 8, 5, 0
TILED_CHUNK = 3  # uneven against the local batch of 8 and the global batch of 16


def global_batch() -> dict[str, torch.Tensor]:
    """The fixed seeded global batch shared by the workers and the single-process reference."""
    gen = torch.Generator().manual_seed(SEED)
    return {
        "image": F.normalize(torch.randn(BATCH, DIM, generator=gen), dim=-1),
        "text": F.normalize(torch.randn(BATCH, DIM, generator=gen), dim=-1),
        "image_in": torch.randn(BATCH, IN_DIM, generator=gen),
        "text_in": torch.randn(BATCH, IN_DIM, generator=gen),
    }


class TwoTowers(nn.Module):
    """Linear image and text towers with a learned log temperature (and SigLIP bias)."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(SEED + 1)
        self.image = nn.Linear(IN_DIM, DIM)
        self.text = nn.Linear(IN_DIM, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0)) if bias else None

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(image features, text features, exp(logit_scale)[, logit_bias])."""
        out = (F.normalize(self.image(image), dim=-1), F.normalize(self.text(text), dim=-1), self.logit_scale.exp())
        return out + (self.logit_bias,) if self.logit_bias is not None else out


def make_losses() -> dict[str, nn.Module]:
    """The losses under test, by name."""
    return {
        "plain": ContrastiveLoss(),
        "tiled": ContrastiveLoss(chunk_size=TILED_CHUNK),
        "siglip": SigLIPLoss(),
    }


def feature_grads(loss_fn: nn.Module, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss and gradients wrt leaf features and log scale (and SigLIP's bias)."""
    image, text = image.clone().requires_grad_(), text.clone().requires_grad_()
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True) if isinstance(loss_fn, SigLIPLoss) else None
    loss = loss_fn(image, text, log_scale.exp(), bias)
    loss.backward()
    out = {"loss": loss.detach(), "image": image.grad, "text": text.grad, "log_scale": log_scale.grad}
    if bias is not None:
        out["bias"] = bias.grad
    return out


def model_grads(model: nn.Module, loss_fn: nn.Module, image_in: torch.Tensor, text_in: torch.Tensor) -> dict:
    """Loss and parameter gradients of one step of `model` (DDP-wrapped or not)."""
    loss = loss_fn(*model(image_in, text_in))
    loss.backward()
    params = getattr(model, "module", model).named_parameters()
    return {"loss": loss.detach(), **{name: p.grad.clone() for name, p in params}}


def main() -> None:
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = BATCH // world
    local = slice(rank * rows, (rank + 1) * rows)
    batch = global_batch()
    result = {}
    for name, loss_fn in make_losses().items():
        result[f"features/{name}"] = feature_grads(loss_fn, batch["image"][local], batch["text"][local])
        ddp = DistributedDataParallel(TwoTowers(bias=name == "siglip"))
        result[f"model/{name}"] = model_grads(ddp, loss_fn, batch["image_in"][local], batch["text_in"][local])
    torch.save(result, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
