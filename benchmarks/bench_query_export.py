"""Query latency and similarity-export throughput, each against a baseline in the same run.

Run with:
    python benchmarks/bench_query_export.py [--n-query 100000] [--dim 256] [--queries 300] [--n-export 20000]

1. Query: a store holding N random unit vectors of dim 256 (written through vecsim's
   StoreWriter, so the query runs the real path: FAISS index, id → metadata lookup).
   `Store.query(id=..., layer=..., k=10)` is timed per call after a warm-up; the
   baseline is a numpy brute-force search over the same matrix (matrix-vector product,
   argpartition, sort) for the same query ids. Prints p50/p99 of both and the ratios.
2. Export: runs benchmarks/bench_export.py (N × N float16 .npy against a plain
   sequential write of the same bytes on the same disk, peak RSS in child processes,
   and again at 2N to show the RSS stays flat).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def synthetic_store(path: Path, n: int, dim: int, seed: int = 0):
    """A complete store of one layer holding n random unit vectors (no model involved)."""
    from vecsim.store import FORMAT_VERSION, Store, StoreWriter, now, package_versions, stimuli_schema

    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    layer = "synthetic"
    manifest = {
        "format_version": FORMAT_VERSION, "status": "indexing", "created": now(),
        "source": {"source": "synthetic", "root": str(path), "manifest": None, "extra_columns": [],
                   "candidates": n, "ignored_files": 0},
        "model": {"name": "none", "weights": None, "checkpoint": None, "checkpoint_sha256": None,
                  "num_classes": None, "init_seed": None},
        "preprocessing": {"resize": 1, "crop": 1, "mean": [0, 0, 0], "std": [1, 1, 1], "interpolation": "bilinear"},
        "device": "cpu", "config": {}, "seeds": {},
        "layers": {layer: {"slug": layer, "table": f"vectors_{layer}", "reducer": {
            "shape": [dim], "units": dim, "dim_in": dim, "sketch": None,
            "config": {"similarity": "cosine", "center": False, "dim": dim, "max_dim": dim, "energy": 1.0,
                       "sketch_dim": 0, "sketch_seed": 0, "pooling": "flatten"},
            "fit": {"n_train": n, "dim_in": dim, "dim": dim, "rank": dim, "energy_kept": 1.0, "exact": True,
                    "lossless": True}}}},
        "counts": {"stimuli": n, "failures": 0}, "versions": package_versions(),
    }
    writer = StoreWriter.create(path, manifest, stimuli_schema())
    writer.create_vector_table(layer, dim)
    ids = np.arange(n, dtype=np.int64)
    for lo in range(0, n, 20_000):
        hi = min(lo + 20_000, n)
        rows = [{"id": int(i), "path": f"img/{i:07d}.png", "sha256": f"{i:064x}", "label": f"c{i % 10}",
                 "width": 1, "height": 1} for i in range(lo, hi)]
        writer.append(rows, {layer: (ids[lo:hi], vecs[lo:hi], np.ones(hi - lo, np.float32))}, [], 1)
    writer.build_index(layer, dim)
    writer.save_manifest(status="complete")
    writer.close()
    return Store.open(path), layer, vecs


def bench_query(n: int, dim: int, queries: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="vecsim-bench-query-"))
    try:
        t0 = time.perf_counter()
        store, layer, vecs = synthetic_store(work / "store", n, dim)
        built = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        qids = rng.integers(0, n, queries)
        for i in qids[:10]:  # warm-up: index load, metadata lookup, caches
            store.query(id=int(i), layer=layer, k=10)
        t_vecsim = []
        for i in qids:
            t = time.perf_counter()
            hits = store.query(id=int(i), layer=layer, k=10)
            t_vecsim.append(time.perf_counter() - t)
        t_numpy = []
        for i in qids:
            t = time.perf_counter()
            scores = vecs @ vecs[i]
            top = np.argpartition(-scores, 10)[:10]
            top = top[np.argsort(-scores[top])]
            t_numpy.append(time.perf_counter() - t)
        assert hits[0]["id"] == int(qids[-1]) and top[0] == qids[-1]
        v, b = np.array(t_vecsim) * 1e3, np.array(t_numpy) * 1e3
        print(f"query by id: N={n:,} dim={dim} k=10, {queries} queries (store built in {built:.1f} s)")
        print(f"  vecsim Store.query   p50 {np.percentile(v, 50):7.3f} ms   p99 {np.percentile(v, 99):7.3f} ms   (target p50 <= 5 ms)")
        print(f"  numpy brute force    p50 {np.percentile(b, 50):7.3f} ms   p99 {np.percentile(b, 99):7.3f} ms")
        print(f"  ratio numpy/vecsim   p50 {np.percentile(b, 50) / np.percentile(v, 50):.2f}x   "
              f"p99 {np.percentile(b, 99) / np.percentile(v, 99):.2f}x   (> 1: vecsim faster)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-query", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=300)
    p.add_argument("--n-export", type=int, default=20_000)
    p.add_argument("--skip-export", action="store_true")
    args = p.parse_args()
    bench_query(args.n_query, args.dim, args.queries)
    if not args.skip_export:
        print()
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_export.py"), "--n", str(args.n_export)], check=True)


if __name__ == "__main__":
    main()
