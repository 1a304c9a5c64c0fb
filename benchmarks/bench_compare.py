"""The shipped digits CNN vs its magnitude-pruned copies, layer by layer, with every measure;
and the speed of vecsim's linear CKA against the textbook formula.

Run with: python benchmarks/bench_compare.py

1. Prune the shipped digits CNN globally at 30/60/90% (``vecsim.compare.prune_checkpoint``),
   index ``builtin:digits`` (1,797 images) with the original and each pruned copy (same
   layers, same seeds, so the evaluation subsets hold the same 500 stimuli), then compare
   each pruned store with the original layer by layer (relu1 vs relu1, ...) with every
   measure of ``vecsim.measures.MEASURES``. Gram measures use the exact evaluation-subset
   Grams (n = 500); PWCCA uses the stored vectors of all 1,797 stimuli. The last column
   is CKA from the stored (reduced) vectors on all 1,797 stimuli, to show how close the
   stored vectors come to the exact value.
2. Linear CKA on N = 5,000 random stimuli (5,000 × 512 vs 5,000 × 256, float64):
   ``vecsim.measures.linear_cka`` (feature form) against a direct numpy implementation of
   the textbook formula (Grams K = XXᵀ, L = YYᵀ, centred as HKH and HLH with
   H = I − 11ᵀ/n, HSIC via traces), timed in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS = ["features.relu1", "features.relu2", "features.relu3", "features.relu4", "pool"]
AMOUNTS = (0.3, 0.6, 0.9)
SHORT = {"cka": "cka", "cka_debiased": "cka_deb", "rsa_spearman": "rsa_sp", "rsa_pearson": "rsa_pe",
         "rsa_kendall": "rsa_kt", "svcca": "svcca", "pwcca": "pwcca", "procrustes": "procr"}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores; python {platform.python_version()}, numpy {np.__version__}, "
            f"torch {torch.__version__} (threads {torch.get_num_threads()})")


def pruned_vs_original(work: Path) -> None:
    import vecsim
    from vecsim.compare import compare_stores, prune_checkpoint
    from vecsim.measures import MEASURES

    def index(out: Path, checkpoint: Path | None) -> float:
        t = time.perf_counter()
        vecsim.index_stimuli(source="builtin:digits", model="digits-cnn", checkpoint=None if checkpoint is None else str(checkpoint),
                             layers=LAYERS, out=str(out), dim="64", seed=0, eval_size=500, device="cpu",
                             progress=False)
        return time.perf_counter() - t

    seconds = index(work / "original", None)
    print(f"indexed builtin:digits with the original CNN in {seconds:.1f} s (layers {', '.join(LAYERS)}; dim 64; "
          "eval subset 500)")
    stores = {}
    for amount in AMOUNTS:
        ckpt = work / f"pruned_{int(amount * 100)}.pt"
        report = prune_checkpoint("digits-cnn", ckpt, amount, scope="global")
        per_layer = ", ".join(f"{k.split('.')[-1]} {v['sparsity']:.0%}" for k, v in report["layers"].items())
        seconds = index(work / f"pruned_{int(amount * 100)}", ckpt)
        stores[amount] = work / f"pruned_{int(amount * 100)}"
        print(f"pruned {amount:.0%} (global): overall sparsity {report['sparsity']:.1%} [{per_layer}]; "
              f"indexed in {seconds:.1f} s")

    names = list(MEASURES)
    header = f"{'amount':>6}  {'layer':<15}" + "".join(f"{SHORT[m]:>9}" for m in names) + f"{'cka@stored':>12}"
    print()
    print("original vs pruned, matching layers (procr = Procrustes distance, lower = more similar; all others "
          "higher = more similar)")
    print(header)
    print("-" * len(header))
    sources = set()
    t = time.perf_counter()
    for amount in AMOUNTS:
        result = compare_stores(work / "original", stores[amount], measures="all", pairs="matching")
        stored = compare_stores(work / "original", stores[amount], measures="cka", pairs="matching",
                                source="stored-vectors")
        for layer in LAYERS:
            cells = [result.cell(m, layer, layer) for m in names]
            sources |= {(c["measure"], c["source"], c["n"]) for c in cells}
            row = f"{amount:>6.0%}  {layer:<15}" + "".join(f"{c['value']:>9.4f}" for c in cells)
            sc = stored.cell("cka", layer, layer)
            sources.add(("cka@stored", sc["source"], sc["n"]))
            print(row + f"{sc['value']:>12.4f}")
    elapsed = time.perf_counter() - t
    by_source: dict[tuple[str, int], list[str]] = {}
    for measure, source, n in sorted(sources):
        by_source.setdefault((source, n), []).append(SHORT.get(measure, measure))
    print("sources: " + "; ".join(f"{s} n={n}: {', '.join(ms)}" for (s, n), ms in sorted(by_source.items())))
    print(f"matched {result.matching.matched} stimuli by sha256 (unmatched {result.matching.unmatched_a}/"
          f"{result.matching.unmatched_b}); comparisons took {elapsed:.1f} s for {len(AMOUNTS)} store pairs")


def textbook_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Kornblith et al. 2019, eqs. 3-4, written the way the paper reads."""
    n = X.shape[0]
    K, L = X @ X.T, Y @ Y.T
    H = np.eye(n) - np.ones((n, n)) / n
    Kc, Lc = H @ K @ H, H @ L @ H
    hsic = lambda A, B: np.trace(A @ B) / (n - 1) ** 2  # noqa: E731
    return float(hsic(Kc, Lc) / np.sqrt(hsic(Kc, Kc) * hsic(Lc, Lc)))


def cka_speed(n: int = 5000, p1: int = 512, p2: int = 256, repeats: int = 3) -> None:
    from vecsim.measures import linear_cka, linear_cka_gram

    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, p1))
    Y = X[:, :p2] @ rng.standard_normal((p2, p2)) * 0.5 + rng.standard_normal((n, p2))  # related, not identical

    def best(fn):
        times, value = [], None
        for _ in range(repeats):
            t = time.perf_counter()
            value = fn()
            times.append(time.perf_counter() - t)
        return min(times), value

    t_feat, v_feat = best(lambda: linear_cka(X, Y))
    t_gram, v_gram = best(lambda: linear_cka_gram(X @ X.T, Y @ Y.T))
    t = time.perf_counter()
    v_text = textbook_cka(X, Y)
    t_text = time.perf_counter() - t
    print()
    print(f"linear CKA, N = {n:,}: X {n:,}×{p1}, Y {n:,}×{p2} (float64; vecsim best of {repeats}, textbook once)")
    print(f"{'implementation':<58} {'seconds':>9} {'value':>10} {'vs textbook':>12}")
    print(f"{'textbook numpy: HKH, HLH with H = I - 11ᵀ/n, HSIC via tr()':<58} {t_text:>9.3f} {v_text:>10.6f} {'1.0x':>12}")
    print(f"{'vecsim linear_cka (feature form)':<58} {t_feat:>9.3f} {v_feat:>10.6f} {t_text / t_feat:>11.0f}x")
    print(f"{'vecsim linear_cka_gram (incl. computing XXᵀ, YYᵀ)':<58} {t_gram:>9.3f} {v_gram:>10.6f} "
          f"{t_text / t_gram:>11.1f}x")
    print(f"max |difference| to textbook: {max(abs(v_feat - v_text), abs(v_gram - v_text)):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="keep the stores and checkpoints here (default: a temporary folder)")
    parser.add_argument("--skip-stores", action="store_true", help="only time linear CKA")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vecsim-bench-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_stores:
            pruned_vs_original(work)
        cka_speed()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
