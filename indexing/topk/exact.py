"""The exact oracle: every stored vector scored in chunks; ANN indexes are checked against it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from indexing.topk.base import TopK, TopKMeta
from indexing.topk.kernels import (
    EXACT_CHUNK_ELEMENTS,
    _check_ids,
    as_searched,
)
from pipeline.config.model import Similarity

EXACT = "exact"


EMBEDDINGS_FILE = "embeddings.npy"


class ExactTopK(TopK):
    """Brute force in torch, chunked over queries; ties go to the lower row (deterministic).

    A full stable sort per query (O(N log N)): this is the oracle and the recall baseline,
    not the serving path for large catalogues.

    Args:
        embeddings: [N, D] item vectors (normalised here for cosine).
        ids: [N] item ids.
        similarity: dot or cosine.
    """

    kind = EXACT

    def __init__(self, embeddings, ids, similarity: Similarity | str):
        similarity = Similarity(similarity)
        vectors = as_searched(embeddings, similarity, "embeddings")
        super().__init__(_check_ids(ids, len(vectors)), similarity, vectors.shape[1])
        self.vectors_t = torch.from_numpy(vectors)  # [N, D], as searched

    @classmethod
    def _from_vectors(cls, vectors: np.ndarray, ids: np.ndarray, meta: TopKMeta) -> ExactTopK:
        """Wrap stored vectors as they are: normalising again could move the last bit."""
        self = cls.__new__(cls)
        TopK.__init__(self, ids, meta.similarity, meta.dim)
        self.vectors_t = torch.from_numpy(vectors)
        return self

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = [], []
        chunk = max(1, EXACT_CHUNK_ELEMENTS // self.count)
        for q in torch.from_numpy(queries).split(chunk):
            s = q @ self.vectors_t.T  # [chunk, N]
            # a stable descending sort keeps equal scores in row order: lower row first
            best, order = torch.sort(s, dim=1, descending=True, stable=True)
            scores.append(best[:, :k])
            rows.append(order[:, :k])
        return torch.cat(scores).numpy(), torch.cat(rows).numpy().astype(np.int64)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """[R, D] stored vectors of ``rows`` (a copy)."""
        return self.vectors_t.numpy().take(rows, axis=0)

    def _all_vectors(self) -> np.ndarray:
        return self.vectors_t.numpy()

    @property
    def meta(self) -> TopKMeta:  # noqa: D102
        return TopKMeta(kind=EXACT, factory=EXACT, similarity=self.similarity, dim=self.dim,
                        count=self.count)

    def _save_index(self, directory: Path) -> None:
        np.save(directory / EMBEDDINGS_FILE, self.vectors_t.numpy(), allow_pickle=False)
