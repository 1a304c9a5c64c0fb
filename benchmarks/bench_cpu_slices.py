"""Design check: on a CPU, is a forward pass in vecsim's slices (vecsim.pipeline.cpu_slice:
8 images at 224 px, 2 at 400 px) as fast per image as one over a whole batch?

For each case (model, input size), the bare model (random init, torch.inference_mode, the
machine's torch threads) runs on random inputs in the slice's batch size and in whole batches
of --batch-size, alternated, each for --seconds after one warm-up pass; the best per-image
time of --repeats rounds is kept per side. Prints ms per image of both and whole ÷ slice
(above 1: the slices are faster). Nothing of vecsim runs but cpu_slice.

Run with:
    PYTHONPATH=. python benchmarks/bench_cpu_slices.py [--batch-size 32] [--seconds 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [("resnet18", 224), ("resnet50", 224), ("densenet121", 224), ("densenet121", 400)]


def per_image(model, batch: int, size: int, seconds: float) -> float:
    """Seconds per image of forward passes of ``batch`` random images of ``size``² px."""
    import torch

    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)  # warm-up: the kernels' set-up for this shape
        start, images = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model(x)
            images += batch
        return (time.perf_counter() - start) / images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    import torch
    import torchvision

    from vecsim.pipeline import cpu_slice

    torch.manual_seed(0)
    print(f"forward passes on the CPU: torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"whole batches of {args.batch_size}, best of {args.repeats} rounds of {args.seconds:.0f} s per side")
    for name, size in CASES:
        model = getattr(torchvision.models, name)().eval()
        step = cpu_slice(size)
        sliced, whole = [], []
        for _ in range(args.repeats):  # alternated, so drift in machine speed hits both
            sliced.append(per_image(model, step, size, args.seconds))
            whole.append(per_image(model, args.batch_size, size, args.seconds))
        s, w = min(sliced), min(whole)
        print(f"  {name:<12} {size} px  slices of {step}: {s * 1000:6.1f} ms/img   batches of {args.batch_size}: "
              f"{w * 1000:6.1f} ms/img   whole/slice {w / s:.2f}")


if __name__ == "__main__":
    main()
