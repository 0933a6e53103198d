"""Bag-of-n-grams prediction, the CLIP paper's predictive baseline (its Figure 2; Visual N-Grams' objective): from
the image embedding, predict which token n-grams the caption holds, without their order. N-grams are hashed into a
fixed number of classes, so the head needs no vocabulary built from data; zero-shot scores a prompt by the mean
log-probability of its n-grams."""
from __future__ import annotations

import torch

from clipforge.model.config import BagOfWordsConfig

_MODULUS = 2**31  # keeps every intermediate product inside int64
_STEP, _MIX = 1_000_003, 2_654_435_761  # polynomial step, then Knuth's multiplicative mix


def ngram_buckets(tokens: torch.Tensor, config: BagOfWordsConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(bucket ids [B, M], validity [B, M]) of every 1..ngram window of each row's content tokens: what lies
    between start-of-text (position 0) and end-of-text (the highest id, as CLIP's text tower pools)."""
    tokens = tokens.long()
    length = tokens.shape[1]
    ends = tokens.argmax(dim=1, keepdim=True)  # end-of-text's position
    positions = torch.arange(length, device=tokens.device)[None]
    content = (positions >= 1) & (positions < ends)
    ids, valid = [], []
    for n in range(1, config.ngram + 1):
        if n > length:
            break
        windows, inside = tokens.unfold(1, n, 1), content.unfold(1, n, 1).all(dim=-1)
        h = torch.full_like(windows[..., 0], n)
        for i in range(n):
            h = (h * _STEP + windows[..., i]) % _MODULUS
        ids.append((h * _MIX) % (2**32) % config.buckets)
        valid.append(inside)
    return torch.cat(ids, dim=1), torch.cat(valid, dim=1)


def bag_targets(tokens: torch.Tensor, config: BagOfWordsConfig) -> torch.Tensor:
    """[B, buckets] each row's n-gram counts over buckets, normalised to sum 1 (all zero for a row without any)."""
    ids, valid = ngram_buckets(tokens, config)
    counts = torch.zeros(len(tokens), config.buckets, device=tokens.device)
    counts.scatter_add_(1, ids, valid.float())
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)


def bag_of_words_loss(logits: torch.Tensor, tokens: torch.Tensor, config: BagOfWordsConfig) -> torch.Tensor:
    """Summed (over the batch) cross-entropy of the predicted n-gram distribution against each caption's own."""
    return -(bag_targets(tokens, config) * logits.float().log_softmax(dim=-1)).sum()


@torch.no_grad()
def bag_log_likelihood(model: torch.nn.Module, pixels: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """[images, prompts] the mean log-probability of each prompt's n-grams given each image (zero-shot scores); a
    prompt without any n-gram scores -inf (it says nothing the model could predict)."""
    logprobs = model.bag_of_words_logits(pixels).float().log_softmax(dim=-1)
    targets = bag_targets(prompts.to(logprobs.device), model.config.bag_of_words)
    scores = logprobs @ targets.t()
    return scores.masked_fill(targets.sum(dim=1) == 0, float("-inf")).cpu()
