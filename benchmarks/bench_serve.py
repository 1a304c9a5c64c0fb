"""`vecsim serve`'s JSON API against the in-process query it wraps, in the same run.

Run with:
    python benchmarks/bench_serve.py [--n 100000] [--dim 256] [--requests 400] [--clients 1,32]

A store of N random unit vectors of dim 256 (one layer, written through vecsim's
StoreWriter: the real FAISS index and id → metadata lookup; see bench_query_export.py) is
served by `python -m vecsim serve` in a child process on 127.0.0.1. Clients (threads, one
keep-alive httpx connection each) send `GET /api/stores/0/query?id=..&layer=..&k=10` for
random ids, a bounded number of requests per setting, after a warm-up. Every answer is
checked against `Store.query` in this process: an error is a non-200 status, a failed
connection or a different answer. The baseline is `Store.query(id=.., layer=.., k=10)` in
process, timed per call over the same ids. Prints p50/p99 latency and requests/s per
setting and the ratios to the baseline.

Target: p50 at 1 client <= 2 x the in-process p50 + 2 ms; no error at 32 clients.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_query_export import synthetic_store  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int) -> tuple[subprocess.Popen, float]:
    """`vecsim serve` in a child process; returns it once it prints its URL (and how long that took)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vecsim", "serve", str(store), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = proc.stdout.readline()
    if "http://127.0.0.1" not in line:
        proc.kill()
        raise RuntimeError(f"vecsim serve did not start: {line}{proc.stdout.read()}")
    return proc, time.perf_counter() - t0


def run_clients(url: str, layer: str, ids: np.ndarray, clients: int, expected: dict) -> dict:
    """``clients`` threads, each with its own keep-alive connection (opened and used once
    before the clock starts), share the ids; latencies (ms), errors, wall time."""
    import httpx

    errors: list[str] = []
    lat = np.zeros(len(ids))
    conns = [httpx.Client(base_url=url, timeout=60) for _ in range(clients)]
    for c in conns:
        c.get("/api/stores")
    go = threading.Barrier(clients + 1)

    def worker(w: int) -> None:
        go.wait()
        for j in range(w, len(ids), clients):
            stim_id = int(ids[j])
            t = time.perf_counter()
            try:
                answer = conns[w].get("/api/stores/0/query", params={"id": stim_id, "layer": layer, "k": 10})
                lat[j] = (time.perf_counter() - t) * 1e3
                if answer.status_code != 200:
                    errors.append(f"{answer.status_code}: {answer.text[:100]}")
                elif [(h["id"], round(h["cosine"], 5)) for h in answer.json()] != expected[stim_id]:
                    errors.append(f"id {stim_id}: another answer than Store.query")
            except httpx.HTTPError as exc:
                lat[j] = (time.perf_counter() - t) * 1e3
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for c in conns:
        c.close()
    return {"lat": lat, "errors": errors, "wall": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--requests", type=int, default=400, help="requests per client setting")
    p.add_argument("--clients", default="1,32")
    args = p.parse_args()
    settings = [int(c) for c in args.clients.split(",")]

    work = Path(tempfile.mkdtemp(prefix="vecsim-bench-serve-"))
    proc = None
    try:
        t0 = time.perf_counter()
        store, layer, _ = synthetic_store(work / "store", args.n, args.dim)
        built = time.perf_counter() - t0
        rng = np.random.default_rng(2)
        ids = rng.integers(0, args.n, args.requests)
        for i in ids[:20]:  # warm-up
            store.query(id=int(i), layer=layer, k=10)
        expected, t_in = {}, []
        for i in ids:
            t = time.perf_counter()
            hits = store.query(id=int(i), layer=layer, k=10)
            t_in.append((time.perf_counter() - t) * 1e3)
            expected[int(i)] = [(h["id"], round(h["cosine"], 5)) for h in hits]
        t_in = np.array(t_in)

        port = free_port()
        proc, ready = start_server(work / "store", port)
        url = f"http://127.0.0.1:{port}"
        run_clients(url, layer, ids[:40], 1, expected)  # warm-up: connections, the first requests
        results = {c: run_clients(url, layer, ids, c, expected) for c in settings}

        index = store.layer_info(layer)["index"]
        print(f"vecsim serve /api query by id: N={args.n:,} dim={args.dim} k=10, index {index['factory']}, "
              f"{args.requests} requests per setting (store built in {built:.1f} s, server ready in {ready:.1f} s)")
        p50_in = np.percentile(t_in, 50)
        print(f"  in-process Store.query      p50 {p50_in:7.3f} ms   p99 {np.percentile(t_in, 99):7.3f} ms   "
              f"{1e3 / t_in.mean():8.1f} req/s (one after another)")
        for c, r in results.items():
            lat = r["lat"]
            print(f"  HTTP {c:>2} client{'s' if c > 1 else ' '}             p50 {np.percentile(lat, 50):7.3f} ms   "
                  f"p99 {np.percentile(lat, 99):7.3f} ms   {len(lat) / r['wall']:8.1f} req/s   errors {len(r['errors'])}"
                  f"   (p50 {np.percentile(lat, 50) / p50_in:.2f}x in-process)")
            for e in r["errors"][:3]:
                print(f"    {e}")
        if 1 in results:
            p50_1 = np.percentile(results[1]["lat"], 50)
            bound = 2 * p50_in + 2
            print(f"  target: p50 at 1 client <= 2 x in-process + 2 ms = {bound:.3f} ms: "
                  f"{'met' if p50_1 <= bound else 'NOT met'} ({p50_1:.3f} ms)")
        if 32 in results:
            print(f"  target: no error at 32 clients: {'met' if not results[32]['errors'] else 'NOT met'}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
