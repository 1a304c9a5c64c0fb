"""Indexing throughput of `vecsim index` against a bare decode + forward loop, in the same run.

Run with:
    python benchmarks/bench_index.py [--n 256] [--size 224] [--model resnet18]
           [--layers layer1,layer2,layer3] [--batch-size 32] [--repeats 2] [--eval-size 500]
    python benchmarks/bench_index.py --case vit [--n 128]   # timm's vit_tiny_patch16_224, random init

``--case vit`` is timm:vit_tiny_patch16_224 (weights none) with layers blocks.3,blocks.7,blocks.11
pooled tokens, mean and cls (unless --model/--layers/--pooling say otherwise); it needs the
timm extra, imported outside both clocks like torch.

Both sides run in fresh child processes, one after the other, with the same images,
decoding (vecsim's DataLoader and workers), model, batch size and torch thread count.
The bare loop does decode + forward only: no hooks, nothing kept, nothing written. On a CPU
vecsim forwards each decoded batch in slices (vecsim.pipeline.cpu_slice: 8 images at 224 px),
which this machine runs faster than whole batches of 32; the bare loop forwards the same
slices, so the ratio is what the hooks, reduction and store cost. A second bare loop forwards
whole batches (what a loop written without slicing does), reported for comparison.
Each side is timed from before the model is built to the end of its work, so vecsim's
discovery, fitting, store writes and index build all count against it. Library imports
are outside both clocks (torch and torchvision on both sides, and lancedb, which only
vecsim needs: another child runs vecsim index without it imported, so vecsim imports it
during the run, and a second ratio reports that). Prints images/s
of both, the ratio, peak RSS of each child, and the store size against the raw float32
activations it replaces (fitted transforms and the evaluation subset reported apart,
as fixed costs).
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


def make_images(root: Path, n: int, side: int = 256, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for i in range(n):
        folder = root / f"class_{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(1, 12, 3)
        img = np.stack([np.sin(2 * np.pi * (f[c] * xx + f[(c + 1) % 3] * yy) + rng.uniform(0, 6)) for c in range(3)], -1)
        img = np.clip(127 + 100 * img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:05d}.jpg", quality=90)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CASES = {
    "resnet18": {"model": "resnet18", "layers": "layer1,layer2,layer3", "pooling": "flatten"},
    "vit": {"model": "timm:vit_tiny_patch16_224", "layers": "blocks.3,blocks.7,blocks.11",
            "pooling": "blocks.3=tokens,blocks.7=mean,blocks.11=cls"},
}


def import_libraries(model: str) -> None:
    """torch, torchvision (as vecsim imports it, without torch._dynamo) and the model's own
    library: imported before either clock starts."""
    import torch  # noqa: F401

    from vecsim.models.tvimport import import_torchvision

    import_torchvision()

    if model.startswith("timm:"):
        import timm  # noqa: F401


def forward_slices(module, batches, step: int) -> int:
    """The bare loop: each decoded batch forwarded in slices of ``step`` images, nothing kept;
    the number of images forwarded."""
    import torch

    count = 0
    with torch.inference_mode():
        for batch in batches:
            for lo in range(0, len(batch.ids), step):
                module(batch.images[lo : lo + step])
            count += len(batch.ids)
    return count


def child_bare(args) -> dict:
    import_libraries(args.model)

    from vecsim.extract import iter_decoded
    from vecsim.models import load_model
    from vecsim.stimuli import discover

    items = [(s.id, s.path) for s in discover(args.images).stimuli]
    start = time.perf_counter()
    loaded = load_model(args.model, "none", size=args.size)
    from vecsim.pipeline import cpu_slice

    step = args.batch_size if args.child == "bare-whole" else cpu_slice(loaded.preprocessing.crop)
    count = forward_slices(loaded.module, iter_decoded(Path(args.images), items, loaded.preprocessing,
                                                       args.batch_size, args.workers), step)
    seconds = time.perf_counter() - start
    return {"images": count, "seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def child_index(args) -> dict:
    import_libraries(args.model)  # before the clock, as in the bare loop

    import vecsim
    from vecsim.store import Store, _lancedb

    imported = time.perf_counter()
    if args.child == "index":  # "index-cold" leaves it to vecsim, which imports it at the fit
        _lancedb()  # a library import, outside the clock like torch's (timed and reported apart)
    start = time.perf_counter()
    summary = vecsim.index_stimuli(
        source=args.images, model=args.model, weights="none", size=args.size, layers=args.layers.split(","),
        out=args.out, dim=str(args.dim), batch_size=args.batch_size, workers=args.workers, progress=False,
        overwrite=True, eval_size=args.eval_size, pooling=args.pooling,
    )
    seconds = time.perf_counter() - start
    info = Store.open(args.out).info()
    return {"images": summary.indexed, "seconds": seconds, "import_lancedb_seconds": start - imported,
            "peak_rss_mb": peak_rss_mb(), "info": info}


def run_child(kind: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--images", args.images, "--n", str(args.n), "--size",
           str(args.size), "--model", args.model, "--layers", args.layers, "--pooling", args.pooling,
           "--batch-size", str(args.batch_size),
           "--dim", str(args.dim), "--eval-size", str(args.eval_size), *extra]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--case", choices=sorted(CASES), default="resnet18",
                   help="model, layers and pooling preset (the flags below override it)")
    p.add_argument("--model")
    p.add_argument("--layers")
    p.add_argument("--pooling")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eval-size", type=int, default=500,
                   help="vecsim's evaluation subset (exact raw Gram for the fidelity report); 0 = off")
    p.add_argument("--child", choices=["bare", "bare-whole", "index", "index-cold"])
    p.add_argument("--images")
    p.add_argument("--out")
    args = p.parse_args()
    for key, value in CASES[args.case].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child:
        result = child_bare(args) if args.child.startswith("bare") else child_index(args)
        print(json.dumps(result))
        return

    import torch

    work = Path(tempfile.mkdtemp(prefix="vecsim-bench-index-"))
    try:
        args.images = str(work / "images")
        make_images(Path(args.images), args.n)
        bare, whole, index, cold = [], [], [], []
        for r in range(args.repeats):  # alternate, so drift in machine speed hits every side
            bare.append(run_child("bare", args, []))
            whole.append(run_child("bare-whole", args, []))
            index.append(run_child("index", args, ["--out", str(work / f"store{r}")]))
            cold.append(run_child("index-cold", args, ["--out", str(work / f"cold{r}")]))
        best_bare = min(bare, key=lambda d: d["seconds"])
        best_index = min(index, key=lambda d: d["seconds"])
        bare_rate = best_bare["images"] / best_bare["seconds"]
        index_rate = best_index["images"] / best_index["seconds"]
        info = best_index["info"]
        b = info["bytes"]
        print(f"vecsim index vs bare decode+forward: {args.model} {args.size}px, {args.n} images, layers {args.layers}, "
              f"pooling {args.pooling}, "
              f"dim {args.dim}, eval subset {min(args.eval_size, args.n)}, batch {args.batch_size}, "
              f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
        from vecsim.pipeline import cpu_slice

        best_whole = min(whole, key=lambda d: d["seconds"])
        print(f"  bare loop     {bare_rate:8.2f} img/s   ({best_bare['seconds']:.2f} s, peak RSS {best_bare['peak_rss_mb']:.0f} MB; "
              f"forward passes of {cpu_slice(args.size)} images, as vecsim's on a CPU)")
        print(f"  bare, whole batches of {args.batch_size}: {best_whole['images'] / best_whole['seconds']:.2f} img/s "
              f"({best_whole['seconds']:.2f} s); vecsim index against it: {best_whole['seconds'] / best_index['seconds']:.3f}")
        print(f"  vecsim index  {index_rate:8.2f} img/s   ({best_index['seconds']:.2f} s, peak RSS {best_index['peak_rss_mb']:.0f} MB)")
        print(f"  ratio index/bare = {index_rate / bare_rate:.3f}   (target >= 0.85; best of {args.repeats} each)")
        lance_s = best_index["import_lancedb_seconds"]
        best_cold = min(cold, key=lambda d: d["seconds"])
        print(f"  library imports are outside both clocks (torch, torchvision; lancedb, which only vecsim needs, "
              f"took {lance_s:.2f} s)")
        print(f"  vecsim index with lancedb not yet imported (vecsim imports it when it needs it): "
              f"{best_cold['images'] / best_cold['seconds']:.2f} img/s ({best_cold['seconds']:.2f} s), "
              f"ratio {best_bare['seconds'] / best_cold['seconds']:.3f}")
        print(f"  all runs (s): bare {[round(d['seconds'], 2) for d in bare]}, bare whole {[round(d['seconds'], 2) for d in whole]}, "
              f"index {[round(d['seconds'], 2) for d in index]}, "
              f"index with the lancedb import {[round(d['seconds'], 2) for d in cold]}")
        print("  storage per layer (per stimulus: vectors table + FAISS index share, vs raw float32):")
        n = info["counts"]["stimuli"]
        per_layer_data = b["data"] / n / len(info["layers"])
        for name, layer in info["layers"].items():
            raw = layer["units"] * 4
            print(f"    {name:<10} units {layer['units']:>9,}  raw {raw / 1024:9.1f} KB/stimulus  "
                  f"dim {layer['dim']}  sketch {layer['sketch_dim'] or '-'}  transform {layer['transform_bytes'] / 2**20:.1f} MB")
        print(f"  stored data per stimulus {b['data_per_stimulus']:.0f} B (all layers) vs raw {b['raw_per_stimulus']:.0f} B "
              f"-> {b['ratio']:.4%} of raw (target <= 1% for layers >= 100k units)")
        print(f"  about {per_layer_data:.0f} B per stimulus per layer; fixed costs: transforms {b['transforms'] / 2**20:.1f} MB, "
              f"evaluation subset {b['eval_subset'] / 2**20:.1f} MB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
