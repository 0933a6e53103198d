"""Contrastive losses for CLIP training: InfoNCE (plain or tiled, all-gathered) and SigLIP's sigmoid loss."""
from clipforge.loss.distributed import all_gather_with_grad, gather_features, world_info
from clipforge.loss.losses import (
    DEFAULT_CHUNK_SIZE,
    ContrastiveLoss,
    SigLIPLoss,
    clamp_logit_scale_,
    contrastive_loss,
)
from clipforge.loss.tiled import tiled_contrastive_loss

LOSSES = {"contrastive": ContrastiveLoss, "siglip": SigLIPLoss}  # TrainConfig.loss names

__all__ = [
    "DEFAULT_CHUNK_SIZE", "LOSSES", "ContrastiveLoss", "SigLIPLoss", "all_gather_with_grad", "clamp_logit_scale_",
    "contrastive_loss", "gather_features", "tiled_contrastive_loss", "world_info",
]
