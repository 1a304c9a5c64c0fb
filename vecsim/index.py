"""FAISS indexes over the reduced vectors: build, save, load, search. Numpy in, numpy out.

Ids in every index are stimulus ids (int64), never row positions. Vectors are unit
norm and the metric is inner product, so scores are cosines.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vecsim.errors import DimensionMismatchError, StoreError


def check_vectors(vectors: np.ndarray, dim: int | None = None, name: str = "vectors") -> np.ndarray:
    """float32, C-contiguous, 2-D, and of the expected width (copies only when needed)."""
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise DimensionMismatchError(f"{name} must be 2-D (n, dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DimensionMismatchError(f"{name} have {arr.shape[1]} dims, the index has {dim}")
    return arr


def check_ids(ids, n: int) -> np.ndarray:
    arr = np.ascontiguousarray(ids, dtype=np.int64)
    if arr.shape != (n,):
        raise DimensionMismatchError(f"expected {n} int64 ids, got shape {arr.shape}")
    return arr


def new_flat_index(dim: int):
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))


def add(index, vectors: np.ndarray, ids) -> None:
    vectors = check_vectors(vectors, index.d)
    index.add_with_ids(vectors, check_ids(ids, vectors.shape[0]))


def save_index(index, path: Path) -> None:
    """Write atomically: temporary file, fsync, rename (a GPU index is copied to the CPU first)."""
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    tmp = Path(str(path) + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_index(path: Path):
    import faiss

    if not Path(path).is_file():
        raise StoreError(f"index file {path} is missing")
    try:
        return faiss.read_index(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot read FAISS index {path}: {first[:200]}") from None


def search(index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
    """(scores, ids) of the k best per query; ``allowed_ids`` restricts the search itself.

    Missing results (fewer than k candidates) have id -1.
    """
    import faiss

    queries = check_vectors(queries, index.d, "queries")
    k = int(k)
    if allowed_ids is None:
        return index.search(queries, k)
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
    params = faiss.SearchParameters(sel=selector)
    return index.search(queries, k, params=params)
