"""Benchmark: tiled export of a full similarity matrix to .npy (vecsim.similarity).

Exports the float16 (N, N) cosine-similarity matrix of N random unit vectors of
dimension 256 and compares its write rate with a plain sequential write of the
same number of bytes to the same folder (zero-filled 8 MiB chunks, fsync at the
end; the export fsyncs its file too before the clock stops; both start after an
os.sync(), so neither pays for writeback left over from before). Each side runs in
a fresh child process that makes the same set-up (imports, vectors) before its
clock, and is timed in steady state: the child first does one untimed run of its
own job (an export, or a plain write) and deletes the file, then the timed run.
On this virtual machine a large write is several times slower when its page-cache
pages come from memory not used for a while than when it reuses the pages a deleted
file just freed, and which of the two a child's first run gets depends on what ran
before it (a child's imports take up recently freed pages), so first runs compare
luck rather than code; they are printed too. Children alternate (export, plain,
plain into a preallocated file), best of --repeat each. For reference the plain
write into a file preallocated with fallocate (as the export's .npy writer does) is
timed the same way; the target's ratio is against the plain write without it.
Peak RSS is measured in the child processes (os.wait4 rusage of each child, cross-checked
with RUSAGE_CHILDREN): one child only imports numpy/vecsim and allocates the
vectors (baseline), another also runs the export, so the export's own memory
cost is the difference. With --check-flat (default) everything is repeated at
2N to show the export's peak RSS stays flat when N doubles.

Run with: python benchmarks/bench_export.py [--n 20000]

After each export the child also times the same upper-triangle matrix products alone
(no conversion, no writes): the floor of the export on this machine, printed as a ratio
against the plain write.

All children import torch before the clock, as ``Store.similarity`` and ``vecsim similarity``
do (they ask torch whether there is a GPU before computing anything), and the CPU product
library (oneDNN through torch, or numpy's BLAS) is picked there; the set-up time is printed.

Options: --dim 256, --dtype float16, --memory-limit-mb 256, --repeat 3 (alternated
export / plain-write children, best timed run of each), --dir DIR (a temporary folder is made
inside it and removed afterwards), --no-check-flat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # vecsim from this checkout, in the parent and in every child
CHUNK = 8 * 2**20


def _make_vectors(n: int, dim: int):
    import numpy as np

    rng = np.random.default_rng(0)
    V = rng.standard_normal((n, dim), dtype=np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    return V


def child_main(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter: baseline (imports + vectors), the export, or the plain
    write (after the same imports and vectors, so both timed sides start from the same state),
    each of the last two once untimed and once timed."""
    import numpy as np

    t0 = time.perf_counter()
    import torch  # noqa: F401  (Store.similarity and the CLI import it first, to look for a GPU)

    from vecsim import similarity  # imported in both modes, like for like

    engine = similarity.cpu_engine()  # picked (and self-checked) once per process
    setup_s = time.perf_counter() - t0
    V = _make_vectors(args.n, args.dim)
    result = {"mode": args.child, "n": args.n, "engine": engine, "setup_s": setup_s}
    if args.child == "plain":
        # the first write is the untimed warm-up (see the module docstring), the second is timed
        result["first_seconds"] = plain_write(Path(args.out), args.bytes, preallocated=args.preallocated)
        result["seconds"] = plain_write(Path(args.out), args.bytes, preallocated=args.preallocated)
    if args.child == "export":
        out = Path(args.out)
        times = []
        for _ in range(2):  # the first export is the untimed warm-up, the second is timed
            for p in (out, Path(str(out) + ".json")):
                p.unlink(missing_ok=True)
            os.sync()  # start from a clean page cache, as the plain write does
            t0 = time.perf_counter()
            summary = similarity.export_similarity(
                {"layer": V},
                out,
                ids=np.arange(args.n, dtype=np.int64),
                paths=[f"stim_{i:06d}.png" for i in range(args.n)],
                labels=[None] * args.n,
                metadata={"benchmark": "bench_export"},
                dtype=args.dtype,
                memory_limit_bytes=args.memory_limit_mb * 2**20,
            )  # fsyncs the file before returning
            times.append(time.perf_counter() - t0)
        result["first_seconds"], result["seconds"] = times
        result["bytes"] = Path(summary["path"]).stat().st_size
        result["tile_rows"] = summary["tile_rows"]
        # the export's floor on this machine: the same upper-triangle products, nothing else,
        # with the library the export used, and with numpy's BLAS for reference
        result["product_seconds"] = _products_alone(V, engine)
        result["numpy_product_seconds"] = _products_alone(V, "numpy")
    result["self_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps(result), flush=True)


def _products_alone(V, engine: str) -> float:
    """Seconds for the export's upper-triangle products in its own blocks
    (similarity._product_blocks, rows from each block's first row on), with ``engine``'s
    library, without finishing, converting or writing anything."""
    from vecsim import similarity

    previous = similarity._CPU_ENGINE
    similarity._CPU_ENGINE = engine
    try:
        n = V.shape[0]
        t0 = time.perf_counter()
        for _ in similarity._product_blocks(V, 0, n, 0, n, upper=True):
            pass
        return time.perf_counter() - t0
    finally:
        similarity._CPU_ENGINE = previous


def run_child(mode: str, n: int, args: argparse.Namespace, out: Path | None = None, nbytes: int = 0,
              preallocated: bool = False) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", mode, "--n", str(n),
        "--dim", str(args.dim), "--dtype", args.dtype, "--memory-limit-mb", str(args.memory_limit_mb),
        "--bytes", str(nbytes),
    ]
    if out is not None:
        cmd += ["--out", str(out)]
    if preallocated:
        cmd += ["--preallocated"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout = proc.stdout.read()
    proc.stdout.close()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN is a max over all children so far)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} (n={n}) failed with exit code {proc.returncode}:\n{stdout}")
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["maxrss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["children_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return result


def plain_write(path: Path, nbytes: int, preallocated: bool = False) -> float:
    """Seconds to write nbytes of zeros in 8 MiB chunks and fsync (with ``preallocated``,
    the file's blocks are reserved first with fallocate, as the export does, inside the clock)."""
    from vecsim._io import preallocate

    chunk = bytes(CHUNK)
    os.sync()  # no writeback left over from the export (or anything before) in the timed window
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        if preallocated and not preallocate(fh.fileno(), nbytes):
            fh.close()
            path.unlink()
            return float("nan")
        left = nbytes
        while left > 0:
            k = min(CHUNK, left)
            fh.write(chunk[:k] if k < CHUNK else chunk)
            left -= k
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def bench_n(n: int, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / f"sim_{n}.npy"
    base = run_child("baseline", n, args)
    exports, plains, pre = [], [], []
    plain_out = workdir / f"plain_{n}.bin"
    for _ in range(args.repeat):  # alternated, so a slow spell of a shared machine hits both
        exp = run_child("export", n, args, out)
        for p in (out, Path(str(out) + ".json")):
            p.unlink(missing_ok=True)
        exports.append(exp)
        plains.append(run_child("plain", n, args, plain_out, exp["bytes"]))
        pre.append(run_child("plain", n, args, plain_out, exp["bytes"], preallocated=True))
    exp = min(exports, key=lambda e: e["seconds"])
    exp["maxrss_mib"] = max(e["maxrss_mib"] for e in exports)
    nbytes, plain_s = exp["bytes"], min(p["seconds"] for p in plains)

    def times(runs, key="seconds"):
        return ", ".join(f"{r[key]:.2f}" for r in runs)

    return {
        "product_s": exp["product_seconds"],
        "numpy_product_s": exp["numpy_product_seconds"],
        "engine": exp["engine"],
        "setup_s": exp["setup_s"],
        "runs": f"export {times(exports)} s; plain {times(plains)} s",
        "first_runs": f"export {times(exports, 'first_seconds')} s; plain {times(plains, 'first_seconds')} s",
        "n": n,
        "bytes": nbytes,
        "tile_rows": exp["tile_rows"],
        "export_s": exp["seconds"],
        "export_mbs": nbytes / 1e6 / exp["seconds"],
        "plain_s": plain_s,
        "plain_mbs": nbytes / 1e6 / plain_s,
        "ratio": (nbytes / exp["seconds"]) / (nbytes / plain_s),
        "rss_export_mib": exp["maxrss_mib"],
        "rss_base_mib": base["maxrss_mib"],
        "rss_own_mib": exp["maxrss_mib"] - base["maxrss_mib"],
        "rss_children_mib": exp["children_maxrss_mib"],
        "pre_s": min(p["seconds"] for p in pre),
        "pre_runs": times(pre),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--memory-limit-mb", type=int, default=256)
    ap.add_argument("--dir", default=None, help="folder to write in (default: the system temp folder)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="alternated export / plain-write runs per N; the best time of each is compared")
    ap.add_argument("--check-flat", action=argparse.BooleanOptionalAction, default=True,
                    help="repeat at 2N to show peak RSS stays flat (default: on)")
    ap.add_argument("--child", choices=["baseline", "export", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--bytes", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--preallocated", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="vecsim-bench-", dir=args.dir))
    print(f"vecsim export benchmark: dim={args.dim} dtype={args.dtype} "
          f"memory_limit={args.memory_limit_mb} MiB, cpus={os.cpu_count()}, "
          f"python {platform.python_version()}, folder {workdir}")
    ns = [args.n, 2 * args.n] if args.check_flat else [args.n]
    rows = []
    try:
        for n in ns:
            free = shutil.disk_usage(workdir).free
            itemsize = 2 if args.dtype == "float16" else 4
            if n * n * itemsize * 1.1 > free:
                print(f"skipping N={n}: needs {n * n * itemsize / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
                continue
            rows.append(bench_n(n, args, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    head = (f"{'N':>7} {'file MB':>9} {'tile rows':>9} {'export s':>9} {'export MB/s':>11} "
            f"{'plain MB/s':>10} {'ratio':>6} {'RSS export':>10} {'RSS base':>9} {'RSS own':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['n']:>7} {r['bytes'] / 1e6:>9.1f} {r['tile_rows']:>9} {r['export_s']:>9.2f} "
              f"{r['export_mbs']:>11.1f} {r['plain_mbs']:>10.1f} {r['ratio']:>6.2f} "
              f"{r['rss_export_mib']:>7.1f} MiB {r['rss_base_mib']:>5.1f} MiB {r['rss_own_mib']:>4.1f} MiB")
    for r in rows:
        print(f"runs at N={r['n']} (best of each used; RSS the highest): {r['runs']}")
    for r in rows:
        print(f"N={r['n']}: the upper-triangle matrix products alone (same blocks, nothing converted or written) "
              f"took {r['product_s']:.2f} s with {r['engine']} in the best export's process (numpy's BLAS: "
              f"{r['numpy_product_s']:.2f} s); an export doing only them would be "
              f"{r['plain_s'] / r['product_s']:.2f} x the plain write rate")
        print(f"N={r['n']}: set-up before the clock (import torch and vecsim.similarity, pick the product "
              f"library): {r['setup_s']:.2f} s, in both children")
    for r in rows:
        print(f"N={r['n']}: each child's first (untimed, warm-up) run: {r['first_runs']}")
        if r["pre_s"] == r["pre_s"]:  # not NaN: this file system preallocates
            print(f"N={r['n']}: for reference, the plain write into a file preallocated first (fallocate, "
                  f"as the export's .npy writer does): {r['pre_s']:.2f} s (runs {r['pre_runs']} s); the export "
                  f"is {r['pre_s'] / r['export_s']:.2f} x that rate")
        else:
            print(f"N={r['n']}: this file system does not preallocate (fallocate unsupported); the export wrote "
                  f"without it")
    print("ratio = export MB/s / plain sequential write MB/s (target >= 0.5); RSS = peak RSS of the child "
          "(export: imports + vectors + export; base: imports + vectors; own = export - base)")
    print(f"cross-check: RUSAGE_CHILDREN ru_maxrss (largest child so far) = "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.1f} MiB")
    if len(rows) == 2:
        a, b = rows
        growth = b["rss_own_mib"] - a["rss_own_mib"]
        print(f"flat check: N {a['n']} -> {b['n']}: export's own peak RSS {a['rss_own_mib']:.1f} -> "
              f"{b['rss_own_mib']:.1f} MiB ({growth:+.1f} MiB) while the file grew "
              f"{a['bytes'] / 1e6:.0f} -> {b['bytes'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
