"""The same `vecsim index` job in one process and with `--ray` (1 and 2 nodes on this machine).

Run with:
    python benchmarks/bench_ray.py [--n 96] [--side 96] [--size 64] [--model resnet18]
           [--layers layer2,layer4] [--repeats 1] [--faiss-n 50000] [--skip-index]

Every run is a fresh `python -m vecsim index` child with the same images and settings, one
after the other:

* one-process: the baseline;
* ray-local: `--ray` with no address: vecsim starts a local cluster (every core) and shuts it
  down, both inside the child's wall time;
* ray-1-node: `--ray --ray-address` of a cluster started before (one node, every core);
* ray-2-nodes: the same on a head and a second node (the cores split between them), as
  `ray.cluster_utils.Cluster` runs them on one machine.

Prints each run's wall time and the run's own "indexed in S s" clock (from model loading to the
index build; Ray connection and cluster start-up are outside it), and their ratios to the
one-process run (> 1: slower). On one machine the actors share the cores the one process
uses, so the ratios measure Ray's overhead, not a speed-up. Each store is checked against the
one-process store (same ids, vectors to 1e-5).

With ``--faiss-n N`` it also times the index build of one layer on this machine, as the driver
runs it (vecsim.index.new_index, train on vecsim's sample size, add N random unit vectors of 256
dims), per kind: flat, hnsw (HNSW32) and ivf-pq (OPQ + IVF-PQ, its lists sized for N): the
figures docs/scale.md scales to 1M and 100M stimuli.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHECKOUT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(CHECKOUT))

from bench_index import make_images  # noqa: E402  (this folder is on the path of a script run from it)


def index(args, images: Path, out: Path, *extra) -> tuple[float, float]:
    """(wall seconds of the child, the run's own seconds as it prints them)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(CHECKOUT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "vecsim", "index", str(images), "--model", args.model, "--weights", "none",
           "--layers", args.layers, "--size", str(args.size), "--dim", "32", "--train-size", str(args.n // 3),
           "--eval-size", str(args.n // 3), "--chunk-size", str(args.n // 6), "--batch-size", "8",
           "--out", str(out), "--overwrite", "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
    own = float(re.search(r" in ([0-9.]+) s \(", done.stdout).group(1))
    return wall, own


def same_store(path: Path, reference: Path) -> bool:
    from vecsim.store import Store

    a, b = Store.open(path), Store.open(reference)
    for layer in b.layers:
        ids, vecs = a.vectors(layer)
        ref_ids, ref_vecs = b.vectors(layer)
        if ids.tolist() != ref_ids.tolist() or not np.allclose(vecs, ref_vecs, atol=1e-5):
            return False
    return True


def faiss_build(n: int, dim: int = 256) -> None:
    import faiss

    from vecsim import index as vindex

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    print(f"FAISS index build, N={n:,} dim={dim}, {faiss.omp_get_max_threads()} threads")
    print(f"{'kind':<8} {'factory':<24} {'train s':>8} {'add s':>8} {'adds/s':>10} {'bytes/vector':>13}")
    for kind in ("flat", "hnsw", "ivf-pq"):
        index, spec = vindex.new_index(kind, dim, n)
        start = time.perf_counter()
        if vindex.needs_training(index):
            size = min(n, vindex.training_size(index))
            index.train(np.ascontiguousarray(vecs[rng.choice(n, size, replace=False)]))
        trained = time.perf_counter() - start
        start = time.perf_counter()
        vindex.add(index, vecs, ids)
        added = time.perf_counter() - start
        size = len(faiss.serialize_index(index)) / n
        print(f"{kind:<8} {spec:<24} {trained:8.2f} {added:8.2f} {n / added:10,.0f} {size:13,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=96)
    parser.add_argument("--side", type=int, default=96)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--layers", default="layer2,layer4")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--faiss-n", type=int, default=0, help="also time the index build on N vectors (0: no)")
    parser.add_argument("--skip-index", action="store_true", help="only the FAISS section")
    args = parser.parse_args()
    if args.faiss_n:
        faiss_build(args.faiss_n)
    if args.skip_index:
        return
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray.cluster_utils import Cluster

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="vecsim-bench-ray-"))
    try:
        images = work / "images"
        make_images(images, args.n, args.side)
        print(f"vecsim --ray benchmark: {args.n} images {args.side}px, {args.model} --size {args.size} "
              f"--layers {args.layers}, {cores} cores, python {sys.version.split()[0]}")
        results: dict[str, list[tuple[float, float]]] = {}
        small = {"object_store_memory": 128 * 2**20}
        for _ in range(args.repeats):
            results.setdefault("one-process", []).append(index(args, images, work / "one"))
            results.setdefault("ray-local", []).append(index(args, images, work / "ray-local", "--ray"))
            for name, split in (("ray-1-node", [cores]), ("ray-2-nodes", [max(1, cores // 2)] * 2)):
                cluster = Cluster(initialize_head=True,
                                  head_node_args={"num_cpus": split[0], "include_dashboard": False, **small})
                try:
                    for cpus in split[1:]:
                        cluster.add_node(num_cpus=cpus, **small)
                    cluster.wait_for_nodes()
                    results.setdefault(name, []).append(
                        index(args, images, work / name, "--ray", "--ray-address", cluster.address))
                finally:
                    cluster.shutdown()
        base_wall = min(w for w, _ in results["one-process"])
        base_own = min(o for _, o in results["one-process"])
        print(f"{'run':<12} {'wall s':>8} {'own s':>8} {'wall ratio':>11} {'own ratio':>10}  same store")
        for name, runs in results.items():
            wall, own = min(w for w, _ in runs), min(o for _, o in runs)
            same = "-" if name == "one-process" else str(same_store(work / name, work / "one"))
            print(f"{name:<12} {wall:8.1f} {own:8.1f} {wall / base_wall:11.2f} {own / base_own:10.2f}  {same}")
        print("wall: the child process from start to exit; own: the run's 'indexed in S s' clock; "
              "ratio = run / one-process (> 1: slower); best of --repeats")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
