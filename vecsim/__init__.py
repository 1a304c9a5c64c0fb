"""vecsim: per-layer CNN activations reduced on the fly, indexed in FAISS, described in LanceDB.

The heavy parts (torch, faiss, lancedb) load on first use, so ``import vecsim`` is cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["index_stimuli", "Store", "IndexConfig", "__version__"]


def __getattr__(name: str):
    if name == "index_stimuli":
        from vecsim.pipeline import index_stimuli

        return index_stimuli
    if name == "Store":
        from vecsim.store import Store

        return Store
    if name == "IndexConfig":
        from vecsim.config import IndexConfig

        return IndexConfig
    raise AttributeError(f"module 'vecsim' has no attribute {name!r}")
