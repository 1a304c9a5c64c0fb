"""`vecsim serve`'s JSON API against the in-process query it wraps, in the same run.

Run with:
    python benchmarks/bench_serve.py [--n 100000] [--dim 256] [--requests 400] [--clients 1,32]

A store of N random unit vectors of dim 256 (one layer, written through vecsim's
StoreWriter: the real FAISS index and id → metadata lookup; see bench_query_export.py) is
served by `python -m vecsim serve` in a child process on 127.0.0.1. Clients (threads, one
keep-alive http.client connection each) send `GET /api/stores/0/query?id=..&layer=..&k=10` for
random ids, a bounded number of requests per setting, after a warm-up. Every answer is
checked against `Store.query` in this process: an error is a non-200 status, a failed
connection or a different answer. The baseline is `Store.query(id=.., layer=.., k=10)` in
process, timed per call over the same ids, each call right before the 1-client request
for the same id (paired, so both see the same load on a shared machine). Prints p50/p99 latency and requests/s per
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


def run_clients(port: int, layer: str, ids: np.ndarray, clients: int, expected: dict, baseline=None) -> dict:
    """``clients`` threads, each with its own keep-alive connection (the standard library's
    http.client: the lightest Python client, so the figures are the server's; opened and used
    once before the clock starts), share the ids; latencies (ms), errors, wall time. With
    ``baseline(id)`` (one client), each request is preceded by the in-process query of the
    same id, timed too: both see the same load on a shared machine."""
    import http.client
    import json

    errors: list[str] = []
    lat, lat_in = np.zeros(len(ids)), np.zeros(len(ids))
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(clients)]

    def get(conn, path: str) -> tuple[int, bytes]:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read()

    for c in conns:
        get(c, "/api/stores")
    go = threading.Barrier(clients + 1)

    def worker(w: int) -> None:
        go.wait()
        for j in range(w, len(ids), clients):
            stim_id = int(ids[j])
            if baseline is not None:
                t = time.perf_counter()
                baseline(stim_id)
                lat_in[j] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            try:
                status, body = get(conns[w], f"/api/stores/0/query?id={stim_id}&layer={layer}&k=10")
                lat[j] = (time.perf_counter() - t) * 1e3
                if status != 200:
                    errors.append(f"{status}: {body[:100]!r}")
                elif [(h["id"], round(h["cosine"], 5)) for h in json.loads(body)] != expected[stim_id]:
                    errors.append(f"id {stim_id}: another answer than Store.query")
            except (OSError, http.client.HTTPException) as exc:
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
    return {"lat": lat, "lat_in": lat_in, "errors": errors, "wall": wall}


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1e3


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
        expected = {int(i): [(h["id"], round(h["cosine"], 5)) for h in store.query(id=int(i), layer=layer, k=10)]
                    for i in ids}

        port = free_port()
        proc, ready = start_server(work / "store", port)
        run_clients(port, layer, ids[:40], 1, expected)  # warm-up: the first requests

        def in_process(stim_id: int) -> None:
            store.query(id=stim_id, layer=layer, k=10)

        results = {c: run_clients(port, layer, ids, c, expected, in_process if c == 1 else None) for c in settings}
        t_in = results[1]["lat_in"] if 1 in results else np.array(
            [_timed(in_process, int(i)) for i in ids])

        index = store.layer_info(layer)["index"]
        print(f"vecsim serve /api query by id: N={args.n:,} dim={args.dim} k=10, index {index['factory']}, "
              f"{args.requests} requests per setting (store built in {built:.1f} s, server ready in {ready:.1f} s)")
        p50_in = np.percentile(t_in, 50)
        print(f"  in-process Store.query      p50 {p50_in:7.3f} ms   p99 {np.percentile(t_in, 99):7.3f} ms   "
              f"{1e3 / t_in.mean():8.1f} req/s (one after another, each just before the 1-client request)")
        for c, r in results.items():
            lat = r["lat"]
            rate = len(lat) / r["wall"] if c > 1 else 1e3 / lat.mean()  # one client: its requests alone
            print(f"  HTTP {c:>2} client{'s' if c > 1 else ' '}             p50 {np.percentile(lat, 50):7.3f} ms   "
                  f"p99 {np.percentile(lat, 99):7.3f} ms   {rate:8.1f} req/s   errors {len(r['errors'])}"
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
