"""Top-k by dot product in bounded memory: blocks of queries x keys, a running top-k per query.

Peak memory is O(chunk_size^2 + N x k) instead of the dense N_queries x N_keys matrix (40 GB at 100k x 100k fp32).
"""
from __future__ import annotations

import torch

from clipforge.errors import EvaluationError


def chunked_topk(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk_size: int = 4096) -> torch.Tensor:
    """Indices [N_queries, k] of each query's k most similar keys (dot product), best first."""
    if queries.shape[1] != keys.shape[1]:
        raise EvaluationError(f"feature sizes differ: {queries.shape[1]} vs {keys.shape[1]}")
    if not 1 <= k <= len(keys):
        raise EvaluationError(f"k must be in [1, {len(keys)}], got {k}")
    if chunk_size < 1:
        raise EvaluationError(f"chunk_size must be positive, got {chunk_size}")
    out = torch.empty(len(queries), k, dtype=torch.long, device=queries.device)
    for q_start in range(0, len(queries), chunk_size):
        block = queries[q_start : q_start + chunk_size]
        best_values: torch.Tensor | None = None
        best_indices: torch.Tensor | None = None
        for k_start in range(0, len(keys), chunk_size):
            sims = block @ keys[k_start : k_start + chunk_size].t()
            values, indices = sims.topk(min(k, sims.shape[1]), dim=1)
            indices += k_start
            del sims  # free the block before the merge allocates
            if best_values is not None:
                merged = torch.cat([best_values, values], dim=1)
                values, order = merged.topk(min(k, merged.shape[1]), dim=1)
                indices = torch.cat([best_indices, indices], dim=1).gather(1, order)
            best_values, best_indices = values, indices
        out[q_start : q_start + len(block)] = best_indices
    return out
