"""The case vecsim exists for: DenseNet121 at 400x400 hooked at transition1/2/3.norm
(2,560,000 / 1,280,000 / 640,000 units per image).

Run with:
    python benchmarks/bench_huge_layers.py [--n 300] [--size 400] [--batch-size 16] [--exact M] [--dim 256]
                                           [--sketch-dim M] [--repeat 2]

Three child processes over the same N generated images (random weights unless the
torchvision cache holds DenseNet121's; same decoding, batch size and threads):

* bare:   decode + forward, no hooks, nothing kept (the baseline for speed and memory), each
          decoded batch forwarded in the slices vecsim forwards on a CPU (vecsim.pipeline.cpu_slice:
          2 images at 400 px), so the comparison is of the hooks, reduction and store; a second
          bare loop forwarding whole batches (what a loop written without slicing does) is
          reported for comparison;
* index:  `vecsim.index_stimuli` (sketch inside the hook → normalise → projection → store);
* exact:  plain hooks on a seeded subset of `--exact` images (default all N), raw activations
          copied and multiplied into an exact Gram matrix (held in memory only, never written;
          ~18 MB per image, 5.4 GB at N = 300).

Reports per layer Spearman(raw cosine, indexed cosine) and max |Δcos| over the subset's
pairs, next to the same for the chain with no sketch (the exact raw vectors projected on
their top dim directions, training vectors shrunk in-sample as vecsim stores them) and for
that projection unshrunk (the best rank-dim least-squares approximation of the raw cosine
matrix, diagonal included), peak RSS of each child, throughput ratio index/bare, and bytes stored per stimulus
against its raw float32 activation bytes (fitted transforms reported apart).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS = ["features.transition1.norm", "features.transition2.norm", "features.transition3.norm"]
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def weights_available() -> str:
    """DEFAULT when the torch hub cache already holds DenseNet121's weights, else none."""
    import torch

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return "DEFAULT" if any(cache.glob("densenet121-*.pth")) else "none"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_bare(args) -> dict:
    from bench_index import forward_slices, import_libraries

    import_libraries("densenet121")  # before the clock, as in vecsim's child

    from vecsim.extract import iter_decoded
    from vecsim.models import load_model
    from vecsim.pipeline import cpu_slice
    from vecsim.stimuli import discover

    items = [(s.id, s.path) for s in discover(args.images).stimuli]
    start = time.perf_counter()
    loaded = load_model("densenet121", args.weights, size=args.size)
    step = args.batch_size if args.child == "bare-whole" else cpu_slice(loaded.preprocessing.crop)
    forward_slices(loaded.module, iter_decoded(Path(args.images), items, loaded.preprocessing, args.batch_size), step)
    return {"seconds": time.perf_counter() - start, "images": len(items), "peak_rss_mb": peak_rss_mb()}


def child_index(args) -> dict:
    from bench_index import import_libraries

    import_libraries("densenet121")  # before the clock, as in the bare loop

    import vecsim
    from vecsim.store import Store

    start = time.perf_counter()
    summary = vecsim.index_stimuli(source=args.images, model="densenet121", weights=args.weights, size=args.size,
                                   layers=LAYERS, out=args.out, dim=str(args.dim), batch_size=args.batch_size,
                                   sketch_dim=args.sketch_dim, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": summary.indexed, "peak_rss_mb": peak_rss_mb(),
            "info": Store.open(args.out).info(), "fidelity_eval_subset": summary.fidelity}


def child_exact(args) -> dict:
    """Exact raw Gram of a seeded subset, from plain hooks (independent of vecsim's reducers)."""
    import torch

    from vecsim.extract import iter_decoded
    from vecsim.models import load_model
    from vecsim.stimuli import discover

    stimuli = discover(args.images).stimuli
    n = min(args.exact or len(stimuli), len(stimuli))
    pick = np.sort(np.random.default_rng(11).choice(len(stimuli), size=n, replace=False))
    items = [(stimuli[i].id, stimuli[i].path) for i in pick]
    loaded = load_model("densenet121", args.weights, size=args.size)
    modules = dict(loaded.module.named_modules())
    held: dict[str, torch.Tensor] = {}
    ids: list[int] = []

    def keep(layer, output):  # copy: an in-place ReLU follows
        flat = output.detach().flatten(1)
        if layer not in held:
            held[layer] = torch.empty(n, flat.shape[1], dtype=torch.float32)
        held[layer][len(ids) : len(ids) + len(flat)] = flat

    handles = [modules[layer].register_forward_hook(lambda m, i, o, layer=layer: keep(layer, o)) for layer in LAYERS]
    with torch.inference_mode():
        for batch in iter_decoded(Path(args.images), items, loaded.preprocessing, args.batch_size):
            loaded.module(batch.images)
            ids += batch.ids
    for h in handles:
        h.remove()
    out = {"ids": ids}
    for layer in LAYERS:
        x = held.pop(layer)
        gram = torch.zeros(n, n, dtype=torch.float64)
        for start in range(0, x.shape[1], 65_536):
            block = x[:, start : start + 65_536].double()
            gram += block @ block.T
        out[layer] = gram.numpy().tolist()
        del x
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def projected_exact(cos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What vecsim's chain gives with no sketch, every stimulus in the training sample: (the
    best rank-k approximation of the cosine matrix, diagonal included — the unit raw vectors
    projected on their top k directions — and the same with the training vectors shrunk
    in-sample as vecsim stores them)."""
    from vecsim.reduce import in_sample_shrinkage

    w, v = np.linalg.eigh(cos)
    top = np.argsort(w)[::-1][:k]
    w, v = w[top], v[:, top]
    scores = v * np.sqrt(np.clip(w, 0, None))
    _, scale = in_sample_shrinkage(scores, w, np.trace(cos))
    shrunk = scores if scale is None else scores * scale
    return scores @ scores.T, shrunk @ shrunk.T


def run_child(kind: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--images", args.images, "--n", str(args.n), "--size",
           str(args.size), "--batch-size", str(args.batch_size), "--exact", str(args.exact), "--dim", str(args.dim),
           "--weights", args.weights, *(["--sketch-dim", str(args.sketch_dim)] if args.sketch_dim else []), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from vecsim.measures import rankdata

    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--exact", type=int, default=0, help="subset whose exact raw cosines are computed (0: all N)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--repeat", type=int, default=2, help="alternated bare/index runs; the best time of each is compared")
    p.add_argument("--weights", default=None)
    p.add_argument("--sketch-dim", type=int, default=None, help="count-sketch dims (default: vecsim's automatic choice)")
    p.add_argument("--child", choices=["bare", "bare-whole", "index", "exact"])
    p.add_argument("--images")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        fn = {"bare": child_bare, "bare-whole": child_bare, "index": child_index, "exact": child_exact}[args.child]
        print(json.dumps(fn(args)))
        return

    import torch

    from bench_index import make_images
    from vecsim.store import Store

    args.weights = args.weights or weights_available()
    work = Path(tempfile.mkdtemp(prefix="vecsim-bench-huge-"))
    try:
        args.images = str(work / "images")
        make_images(Path(args.images), args.n, side=args.size)
        bares, wholes, indexes = [], [], []
        for rep in range(args.repeat):  # alternated, so slow spells of a shared machine hit both
            bares.append(run_child("bare", args, []))
            wholes.append(run_child("bare-whole", args, []))
            shutil.rmtree(work / "store", ignore_errors=True)
            indexes.append(run_child("index", args, ["--out", str(work / "store")]))
        bare = min(bares, key=lambda r: r["seconds"])
        index = min(indexes, key=lambda r: r["seconds"])
        bare["peak_rss_mb"] = max(r["peak_rss_mb"] for r in bares)
        index["peak_rss_mb"] = max(r["peak_rss_mb"] for r in indexes)
        exact = run_child("exact", args, [])
        store = Store.open(work / "store")
        print(f"DenseNet121 {args.size}x{args.size} (weights {args.weights}), N={args.n}, batch {args.batch_size}, "
              f"dim {args.dim}, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
        bare_rate, index_rate = bare["images"] / bare["seconds"], index["images"] / index["seconds"]
        from vecsim.pipeline import cpu_slice

        whole = min(wholes, key=lambda r: r["seconds"])
        print(f"  bare loop     {bare_rate:7.2f} img/s  ({bare['seconds']:.1f} s)  peak RSS {bare['peak_rss_mb']:7.0f} MB"
              f"  (forward passes of {cpu_slice(args.size)} images, as vecsim's on a CPU)")
        print(f"  bare, whole batches of {args.batch_size}: {whole['images'] / whole['seconds']:.2f} img/s "
              f"({whole['seconds']:.1f} s), peak RSS {max(r['peak_rss_mb'] for r in wholes):.0f} MB; "
              f"vecsim index against it: {whole['seconds'] / index['seconds']:.3f}")
        print(f"  vecsim index  {index_rate:7.2f} img/s  ({index['seconds']:.1f} s)  peak RSS {index['peak_rss_mb']:7.0f} MB")
        if args.repeat > 1:
            times = {name: ", ".join(f"{r['seconds']:.1f}" for r in runs)
                     for name, runs in (("bare", bares), ("whole", wholes), ("index", indexes))}
            print(f"  runs (s, alternated): bare {times['bare']}; bare whole {times['whole']}; index {times['index']} "
                  "(best of each used, peak RSS the highest)")
        print(f"  throughput ratio index/bare = {index_rate / bare_rate:.3f} (target >= 0.85)")
        print(f"  peak RSS index - bare = {index['peak_rss_mb'] - bare['peak_rss_mb']:+.0f} MB (target <= +1024 MB; "
              f"the raw training sample alone would be {args.n * 4_480_000 * 4 / 2**30:.1f} GB)")
        ids = np.asarray(exact["ids"])
        iu = np.triu_indices(len(ids), 1)
        info = index["info"]
        print(f"  exact raw cosines on {len(ids)} images (plain hooks, exact child peak RSS {exact['peak_rss_mb']:.0f} MB);")
        print(f"  no sketch = the same chain on the exact raw vectors (their top {args.dim} directions, training "
              f"vectors shrunk in-sample); unshrunk = without the shrinkage (the best rank-{args.dim} least-squares "
              "approximation of the raw cosine matrix, diagonal included):")
        for layer in LAYERS:
            gram = np.asarray(exact[layer])
            norms = np.sqrt(np.diag(gram))
            raw_cos = gram / np.outer(norms, norms)
            stored_ids, vecs = store.vectors(layer)
            rows = vecs[np.searchsorted(stored_ids, ids)].astype(np.float64)
            got = rows @ rows.T
            unshrunk, no_sketch = projected_exact(raw_cos, args.dim)
            layer_info = info["layers"][layer]
            print(f"    {layer:<27} units {layer_info['units']:>9,}  sketch {layer_info['sketch_dim']}  dim {layer_info['dim']}  "
                  f"Spearman {spearman(raw_cos[iu], got[iu]):.4f}  max|dcos| {np.abs(raw_cos - got)[iu].max():.4f}  "
                  f"(no sketch {spearman(raw_cos[iu], no_sketch[iu]):.4f} / {np.abs(raw_cos - no_sketch)[iu].max():.4f}; "
                  f"unshrunk {spearman(raw_cos[iu], unshrunk[iu]):.4f} / {np.abs(raw_cos - unshrunk)[iu].max():.4f}; "
                  f"eval-subset Spearman {index['fidelity_eval_subset'].get(layer, float('nan')):.4f}; "
                  f"raw cosines {raw_cos[iu].mean():.3f} ± {raw_cos[iu].std():.3f})")
        b = info["bytes"]
        print(f"  stored per stimulus {b['data_per_stimulus']:.0f} B vs raw {b['raw_per_stimulus']:,.0f} B "
              f"= {b['ratio']:.4%} of raw (target <= 0.1%); fixed costs: transforms {b['transforms'] / 2**20:.0f} MB, "
              f"evaluation subset {b['eval_subset'] / 2**20:.0f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
