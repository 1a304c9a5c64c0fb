"""Benchmark: loading a torchvision model with trained weights (a checkpoint file), as every
`vecsim index`, `vecsim query --image` and `vecsim serve` start does, against building the
model and loading the same state dict the plain way (what torchvision's pretrained builders
and a hand-written script do: the random initialisation first, then load_state_dict).

vecsim builds a model whose weights will be loaded without the random initialisation they
replace (vecsim.models.base.build_then_load) and checks that the load overwrote every tensor
whose initialisation was skipped. Both sides read the same file from the page cache and give
equal state dicts (checked). Alternated, best of --repeats each; ratio plain / vecsim.

Run with:
    PYTHONPATH=. python benchmarks/bench_model_load.py [--models vgg16,resnet50,densenet121,vit_b_16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vgg16,resnet50,densenet121,vit_b_16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import torch

    from vecsim.models import load_model
    from vecsim.models.tvimport import import_torchvision

    torchvision = import_torchvision()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.repeats}, alternated")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            source = torchvision.models.get_model(name, weights=None)
            path = Path(tmp) / f"{name}.pt"
            torch.save(source.state_dict(), path)
            params = sum(p.numel() for p in source.parameters())
            del source

            def plain():
                state = torch.load(path, map_location="cpu", weights_only=True)
                module = torchvision.models.get_model(name, weights=None)
                module.load_state_dict(state)
                return module.eval()

            def vecsim():
                return load_model(name, checkpoint=path).module

            plain(), vecsim()  # the page cache and first-call costs, on both sides
            times = {"plain": [], "vecsim": []}
            for _ in range(args.repeats):
                for label, fn in (("plain", plain), ("vecsim", vecsim)):
                    start = time.perf_counter()
                    module = fn()
                    times[label].append(time.perf_counter() - start)
                    del module
            a, b = plain().state_dict(), vecsim().state_dict()
            equal = list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
            best_plain, best_vecsim = min(times["plain"]), min(times["vecsim"])
            print(f"{name:12s} {params / 1e6:6.1f}M params  plain build+load {best_plain:6.3f} s  "
                  f"vecsim load_model {best_vecsim:6.3f} s  ratio {best_plain / best_vecsim:5.2f}x  "
                  f"state dicts equal: {equal}")


if __name__ == "__main__":
    main()
