"""The "faiss-ivf" backend: IVF-PQ fast-scan candidates, re-ranked on 8-bit codes, the final k scored exactly.

Three stages, each reading less and knowing more:
1. FAISS `IVF{nlist},PQ{d/4}x4fs` scans nprobe lists of 4-bit codes (64 bytes a vector at d=512) and
   returns k x k_factor candidates;
2. FAISS `IndexRefine` re-ranks them on 8-bit scalar-quantised codes (d bytes a vector, one per
   dimension over its trained range) down to k x RESCORE;
3. those few rows are read from the exact float32 vectors (in memory, or a file read by row) and scored
   exactly, so every returned score is exact and only the candidate list is approximate.
Memory is what stages 1-2 hold: 64 + 8 (list ids) + 512 bytes a vector at d=512, where keeping float32
vectors for re-ranking costs 2 KiB; 10M vectors fit in ~6 GB. Building reads the vectors once, in
chunks, so the float32 matrix never has to be in memory. FAISS's `add` grows the 8-bit codes by
doubling their buffer (twice the final size while it copies), so the codes are sized once up front and
filled in place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clipforge.errors import SearchError
from clipforge.search.vectors import Vectors

RESCORE = 2  # stage 2 hands k x RESCORE candidates to the exact stage
SQ_MARGIN = 0.05  # widen each dimension's trained range by this fraction a side: rows beyond it are clipped
TRAIN_PER_LIST = 40  # above FAISS's own warning threshold (39) and keeps k-means short


def ivf_lists(n: int) -> int:
    """~sqrt(n) inverted lists, each with at least 39 training points (FAISS warns below that)."""
    return int(max(1, min(round(np.sqrt(n)), n // 39, 65536)))


class IvfSq8:
    """IVF-PQ candidates, SQ8 re-ranking and exact final scores over `exact` (see the module docstring)."""

    def __init__(self, index: Any, exact: Vectors) -> None:
        if index.ntotal != exact.n:
            raise SearchError(f"the IVF index holds {index.ntotal} vectors, the exact vectors {exact.n}: "
                              "rebuild the index")
        self.index, self.exact = index, exact

    @classmethod
    def build(cls, faiss: Any, vectors: Vectors, rng: np.random.Generator) -> tuple["IvfSq8", dict[str, Any]]:
        """Train on a sample, then add every row chunk by chunk; returns the index and its parameters."""
        n, dim = vectors.n, vectors.dim
        nlist = ivf_lists(n)
        # 4 dimensions per 4-bit sub-quantiser (16 centroids each): 64 bytes a vector at d=512.
        pq_m = next(dim // per for per in (4, 2, 1) if dim % per == 0)
        factory = f"IVF{nlist},PQ{pq_m}x4fs"
        base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        # 16 centroids per sub-space train fine on fewer than FAISS's advised 39 x 16 points (the tuner
        # measures the result anyway); this only silences its warning on small collections.
        faiss.downcast_index(base).pq.cp.min_points_per_centroid = 1
        train = vectors.rows(np.sort(rng.choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False)))
        base.train(train)
        refine = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        refine.sq.rangestat_arg = SQ_MARGIN
        refine.train(train)
        refine.codes.resize(n * refine.code_size)
        codes = faiss.rev_swig_ptr(refine.codes.data(), n * refine.code_size).reshape(n, refine.code_size)
        for start, block in vectors.chunks():
            base.add(block)
            codes[start : start + len(block)] = refine.sq.compute_codes(block)
        refine.ntotal = n
        params = {"factory": f"{factory},RSQ8,exact", "nlist": nlist, "pq_m": pq_m, "train_size": len(train)}
        return cls(_refined(faiss, base, refine), vectors), params

    @property
    def n(self) -> int:
        """Number of vectors."""
        return int(self.index.ntotal)

    def search(self, faiss: Any, queries: np.ndarray, k: int, nprobe: int,
               k_factor: float) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) [q, k], best first; position -1 (score -inf) where fewer than k were found."""
        shortlist = min(self.n, k * RESCORE)
        params = faiss.IndexRefineSearchParameters(  # stage 1 still returns k x k_factor candidates
            k_factor=max(1.0, k * k_factor / shortlist), base_index_params=faiss.SearchParametersIVF(nprobe=nprobe))
        positions = self.index.search(queries, shortlist, params=params)[1]
        return self._exact_top(queries, positions, k)

    def _exact_top(self, queries: np.ndarray, shortlist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        valid = shortlist >= 0  # FAISS pads with -1 when it found fewer: read row 0 there, then mask it
        rows = self.exact.rows(np.maximum(shortlist, 0)).reshape(*shortlist.shape, -1)
        scores = np.where(valid, np.matmul(rows, queries[:, :, None])[..., 0], -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        positions = np.take_along_axis(shortlist, order, axis=1)
        top = np.take_along_axis(scores, order, axis=1)
        return top, np.where(np.isfinite(top), positions, -1)

    @classmethod
    def load(cls, faiss: Any, path: Path, exact: Vectors) -> "IvfSq8":
        """Read the `IndexRefine` that `save_backend` wrote; `exact` holds the same rows in the same order."""
        index = faiss.read_index(str(path))  # already of its own class; it owns both stages it read
        if not isinstance(index, faiss.IndexRefine):
            raise SearchError(f"{path}: not a faiss-ivf structure of this clipforge; rebuild the index")
        return cls(index, exact)


def _refined(faiss: Any, base: Any, refine: Any) -> Any:
    """`IndexRefine(base, refine)` that keeps both alive (the C++ object does not own what it was given)."""
    index = faiss.IndexRefine(base, refine)
    index.referenced_objects = [base, refine]
    return index
