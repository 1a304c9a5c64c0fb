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
    """A complete store of one layer holding n random unit vectors (index chosen automatically)."""
    from vecsim.store import store_from_vectors

    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, dim), dtype=np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = store_from_vectors(path, {"synthetic": vecs}, labels=[f"c{i % 10}" for i in range(n)])
    return store, "synthetic", vecs


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
        index_info = store.layer_info(layer)["index"]
        print(f"query by id: N={n:,} dim={dim} k=10, {queries} queries (store built in {built:.1f} s)")
        quality = ("exact search" if index_info.get("exact") else
                   f"recall@10 vs exact {index_info['recall_at_10']:.3f} on {index_info['queries']} held-out queries")
        print(f"  index: {index_info['factory']} (automatic choice; {quality})")
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
