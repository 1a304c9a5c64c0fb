"""Why the chain normalises *before* the projection: both orders against exact raw cosines.

Run with:
    python benchmarks/bench_chain.py [--model densenet121] [--size 224] [--n 300] [--train 200]
                                     [--dims 32,128,256] [--layers A,B,...]

N generated images go through the model once with plain hooks; their raw activations are
held in memory (float32) for the exact cosines, which is the naive computation vecsim
exists to avoid (about 1.7 GB for DenseNet121's three transitions at 224 px, N = 300). For
each layer and dim, a seeded training sample of ``--train`` images is used to fit:

* ``vecsim``: vecsim's own reducer (``LayerReducer``: sketch above 65,536 units → L2
  normalise → projection fitted on the unit vectors), scored by the inner products of its
  outputs, as the store does;
* ``renormalised``: the order vecsim used before store format 2: projection fitted on the
  unnormalised (sketched) vectors, applied, then the result L2-normalised.

Both use the same count sketch. Spearman and max |Δcos| against the exact raw cosines are
printed separately for pairs of training stimuli, pairs of held-out stimuli and
held-out × training pairs (a new image against the indexed ones), so the effect on
stimuli outside the training sample (N > --train-size, --image queries, vecsim add) shows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

DEFAULT_LAYERS = {
    "densenet121": "features.transition1.norm,features.transition2.norm,features.transition3.norm",
    "resnet18": "layer1,layer2,layer3",
}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from vecsim.measures import rankdata

    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))


def raw_activations(images: Path, model: str, size: int, layers: list[str], batch: int):
    import torch

    from vecsim.extract import iter_decoded
    from vecsim.models import load_model
    from vecsim.stimuli import discover

    items = [(s.id, s.path) for s in discover(images).stimuli]
    loaded = load_model(model, "none", size=size)
    modules = dict(loaded.module.named_modules())
    held: dict[str, list] = {layer: [] for layer in layers}
    hooks = [modules[layer].register_forward_hook(
        lambda m, i, o, layer=layer: held[layer].append(o.detach().flatten(1).clone()))  # copy: in-place ops follow
        for layer in layers]
    with torch.inference_mode():
        for b in iter_decoded(images, items, loaded.preprocessing, batch):
            loaded.module(b.images)
    for h in hooks:
        h.remove()
    return {layer: torch.cat(held.pop(layer)) for layer in layers}


def exact_cosines(x) -> np.ndarray:
    import torch

    gram = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    for start in range(0, x.shape[1], 65_536):
        block = x[:, start : start + 65_536].double()
        gram += block @ block.T
    norms = gram.diagonal().sqrt()
    return (gram / torch.outer(norms, norms)).numpy()


def both_orders(x, train: np.ndarray, dim: int, layer: str):
    """(vecsim's inner products, renormalised-order cosines), each N×N."""
    from vecsim.reduce import LayerReducer, ReducerConfig, _top_directions

    reducer = LayerReducer(layer, (x.shape[1],), ReducerConfig(dim=dim))
    z, _, _, _ = reducer.prepare(x)
    reducer.fit(z[train].clone())
    y = reducer.project(z)
    y[train] = reducer.project_training(z[train])  # as stored: the training vectors shrunk in-sample
    y = y.double()
    ours = (y @ y.T).numpy()
    evals, directions, _, _ = _top_directions(z[train].clone())  # unnormalised rows: the old order
    k = reducer.dim
    old = z @ directions(k).T
    old = old / old.norm(dim=1, keepdim=True).clamp(min=1e-30)
    old = old.double()
    return ours, (old @ old.T).numpy(), reducer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet121")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--dims", default="32,128,256")
    p.add_argument("--layers", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    import torch

    from bench_index import make_images

    layers = (args.layers or DEFAULT_LAYERS.get(args.model, "")).split(",")
    work = Path(tempfile.mkdtemp(prefix="vecsim-bench-chain-"))
    make_images(work / "images", args.n, side=args.size)
    start = time.perf_counter()
    raw = raw_activations(work / "images", args.model, args.size, layers, args.batch_size)
    rng = np.random.default_rng(0)
    order = rng.permutation(args.n)
    train, held_out = np.sort(order[: args.train]), np.sort(order[args.train :])
    print(f"{args.model} {args.size}px (random weights), N={args.n} generated images, training sample {len(train)}, "
          f"held out {len(held_out)}; torch threads {torch.get_num_threads()}")
    groups = {
        "train-train": (train, train),
        "heldout-heldout": (held_out, held_out),
        "heldout-train": (held_out, train),
    }
    print(f"{'layer':<27} {'units':>9} {'dim':>4}  {'pairs':<16} {'vecsim Spearman':>15} {'max|dcos|':>9}  "
          f"{'renormalised Spearman':>21} {'max|dcos|':>9}")
    for layer in layers:
        x = raw.pop(layer)
        exact = exact_cosines(x)
        for dim in [int(d) for d in args.dims.split(",")]:
            ours, old, reducer = both_orders(x, train, dim, layer)
            for name, (rows, cols) in groups.items():
                if rows is cols:
                    iu = np.triu_indices(len(rows), 1)
                    pick = lambda m: m[np.ix_(rows, rows)][iu]  # noqa: E731
                else:
                    pick = lambda m: m[np.ix_(rows, cols)].ravel()  # noqa: E731
                e, a, b = pick(exact), pick(ours), pick(old)
                print(f"{layer:<27} {x.shape[1]:>9,} {reducer.dim:>4}  {name:<16} {spearman(e, a):>15.4f} "
                      f"{np.abs(e - a).max():>9.4f}  {spearman(e, b):>21.4f} {np.abs(e - b).max():>9.4f}")
        del x
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
