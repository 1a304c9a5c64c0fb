"""Benchmark: class separation by depth and by compression level on the built-in digits.

Reproduces the write-up in ``seeds/001_…`` (same-class vs different-class cosine
similarity of CNN activations, by layer and by PCA compression level) with the shipped
digits CNN (``digits-cnn``, default weights) on ``builtin:digits`` (1,797 8x8 digits, 10
classes).

What it does:

1. Indexes the digits at increasing depth (features.relu1 … relu4, and pool, 64-d) with
   an evaluation subset of all 1,797 digits (the per-layer M is printed: smaller only if
   --eval-memory cannot hold them), a stored dim of 256 and a training sample of all
   1,797 digits, so the stored projection and the PCA below are fitted on the same
   stimuli (in-sample, as in the write-up, whose PCA was fitted on the training data it
   plotted).
2. Per layer, over all pairs of the subset, same-class vs different-class cosine
   similarity, summarised by ROC AUC (Mann–Whitney) and d′ (vecsim.report.roc_auc and
   d_prime), for:
   * ``raw``: the exact cosine of the raw activations (from the store's exact Gram);
   * ``uncentred`` at dims 2, 4, … 256 (as available): vecsim's stored projection, its
     first k coordinates renormalised;
   * ``PCA`` at the same dims: the write-up's variant, classic centred PCA. It is fitted
     here from the exact Gram G of the raw activations, with no need to recompute them:
     the centred Gram is Kc = H G H (H = I − 11ᵀ/M), Kc = V Λ Vᵀ, and the PCA scores of
     the stimuli on the top k components are V_k Λ_k^½ (what sklearn's
     ``PCA(k).fit_transform`` returns, up to signs); their cosine is compared. ``full``
     is PCA with every component, i.e. the cosine of the centred activations.
   Spearman of each compressed cosine against the raw cosine is printed too.
3. States, computed from the numbers: (a) same-class > different-class similarity at
   every layer; (b) the gap grows with depth; (c) it survives compression down to ~32
   dims and collapses below. "Survives at k" = keeps ≥ 90 % of the raw AUC's margin above
   chance (AUC_k − 0.5 ≥ 0.9 (AUC_raw − 0.5)); "collapses" = keeps < 50 % of it.

Run with: python benchmarks/bench_fidelity.py [--store DIR] [--eval-memory 512]

Options: --store DIR reuses (or creates) the store there instead of a temporary one;
--eval-memory MB is the budget for the subset's raw copies while indexing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("LANCEDB_LOG", "error")

LAYERS = ["features.relu1", "features.relu2", "features.relu3", "features.relu4", "pool"]
DIMS = [2, 4, 8, 16, 32, 64, 128, 256]
N_DIGITS = 1797
SURVIVE, COLLAPSE = 0.9, 0.5  # fractions of the raw AUC margin above 0.5


def build_store(path: Path, eval_memory: float) -> float:
    import vecsim

    t0 = time.perf_counter()
    vecsim.index_stimuli(source="builtin:digits", model="digits-cnn", layers=LAYERS, out=str(path), dim="256",
                         train_size=N_DIGITS, eval_size=N_DIGITS, eval_memory=eval_memory, device="cpu",
                         progress=False)
    return time.perf_counter() - t0


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    denom = np.outer(norms, norms)
    return np.where(denom > 0, gram / np.where(denom > 0, denom, 1.0), 0.0)


def pca_scores(gram: np.ndarray) -> np.ndarray:
    """Centred-PCA scores of the stimuli, components by decreasing variance (from the raw Gram)."""
    row = gram.mean(axis=0)
    centred = gram - row[None, :] - row[:, None] + row.mean()
    evals, evecs = np.linalg.eigh((centred + centred.T) / 2)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    rank = int((evals > evals[0] * 1e-10).sum())
    return evecs[:, :rank] * np.sqrt(evals[:rank])[None, :], rank


def prefix_cosine(vectors: np.ndarray, k: int, renormalise: bool = True) -> np.ndarray:
    """Inner products of the first k coordinates; renormalised for centred-PCA scores, as they
    are for vecsim's stored vectors (the chain at dim k is their first k coordinates)."""
    head = np.asarray(vectors[:, :k], dtype=np.float64)
    if renormalise:
        norms = np.linalg.norm(head, axis=1, keepdims=True)
        head = head / np.where(norms > 0, norms, 1.0)
    return head @ head.T


def measure(sim, iu, same, ranked_raw):
    from scipy.stats import rankdata

    from vecsim.report import d_prime, roc_auc

    pairs = sim[iu]
    r = rankdata(pairs)
    r -= r.mean()
    rho = float(r @ ranked_raw) / np.sqrt(float(r @ r) * float(ranked_raw @ ranked_raw))
    return {"auc": roc_auc(pairs[same], pairs[~same]), "d": d_prime(pairs[same], pairs[~same]), "rho": rho}


def analyse(store, layer: str) -> dict:
    from scipy.stats import rankdata

    ev = store.eval_subset(layer)
    ids = ev["ids"]
    m = len(ids)
    gram = np.asarray(ev["gram"], dtype=np.float64)
    stim = store.stimuli()
    label_of = dict(zip(stim.column("id").to_pylist(), stim.column("label").to_pylist()))
    labels = np.array([label_of[int(i)] for i in ids])
    iu = np.triu_indices(m, 1)
    same = labels[iu[0]] == labels[iu[1]]
    raw = cosine_from_gram(gram)
    ranked_raw = rankdata(raw[iu])
    ranked_raw -= ranked_raw.mean()

    all_ids, vecs = store.vectors(layer)
    stored = vecs[np.searchsorted(all_ids, ids)]
    scores, rank = pca_scores(gram)
    out = {"M": m, "stored_dim": stored.shape[1], "pca_rank": rank, "n_same": int(same.sum()),
           "n_diff": int((~same).sum()), "raw": measure(raw, iu, same, ranked_raw),
           "uncentred": {}, "pca": {}}
    for k in DIMS:
        if k <= stored.shape[1]:
            out["uncentred"][k] = measure(prefix_cosine(stored, k, renormalise=False), iu, same, ranked_raw)
        if k <= rank:
            out["pca"][k] = measure(prefix_cosine(scores, k), iu, same, ranked_raw)
    out["pca"]["full"] = measure(prefix_cosine(scores, rank), iu, same, ranked_raw)
    return out


# -- printing ------------------------------------------------------------------------

def table(results: dict, method: str, key: str, digits: int) -> list[str]:
    cols = DIMS + (["full"] if method == "pca" else [])
    head = f"{'layer':<16}{'M':>6} {'raw':>7}" + "".join(f"{str(c):>7}" for c in cols)
    lines = [head]
    for layer, res in results.items():
        cells = "".join(f"{res[method][c][key]:>7.{digits}f}" if c in res[method] else f"{'—':>7}" for c in cols)
        lines.append(f"{layer:<16}{res['M']:>6} {res['raw'][key]:>7.{digits}f}{cells}")
    return lines


def retained(res: dict, method: str, k) -> float:
    margin = res["raw"]["auc"] - 0.5
    return (res[method][k]["auc"] - 0.5) / margin if margin > 0 else float("nan")


def verdicts(results: dict) -> list[str]:
    lines = []
    layers = list(results)
    # (a)
    worst = min(layers, key=lambda lay: results[lay]["raw"]["auc"])
    a = all(results[lay]["raw"]["auc"] > 0.5 and results[lay]["raw"]["d"] > 0 for lay in layers)
    lines.append(
        f"(a) same-class > different-class cosine at every layer: {'YES' if a else 'NO'} "
        f"(lowest raw AUC {results[worst]['raw']['auc']:.3f} at {worst}; raw d′ "
        + ", ".join(f"{results[lay]['raw']['d']:.2f}" for lay in layers) + ")"
    )
    # (b)
    for key, name in (("auc", "AUC"), ("d", "d′")):
        seq = [results[lay]["raw"][key] for lay in layers]
        drops = [f"{layers[i]}→{layers[i + 1]} ({seq[i]:.3f}→{seq[i + 1]:.3f})"
                 for i in range(len(seq) - 1) if seq[i + 1] < seq[i]]
        grows = "YES, at every step" if not drops else (
            f"{'MOSTLY' if seq[-1] > seq[0] else 'NO'}: {seq[0]:.3f} at {layers[0]} → {seq[-1]:.3f} at {layers[-1]}, "
            f"but it falls at " + ", ".join(drops))
        lines.append(f"(b) the gap (raw {name}) grows with depth: {grows}")
    # (c)
    for method, name in (("uncentred", "vecsim uncentred projection"), ("pca", "centred PCA (write-up)")):
        survive_32 = {lay: retained(results[lay], method, 32) for lay in layers if 32 in results[lay][method]}
        ok_32 = all(r >= SURVIVE for r in survive_32.values())
        below = {lay: {k: retained(results[lay], method, k) for k in results[lay][method] if k != "full" and k < 32}
                 for lay in layers}
        collapsed = [f"{lay} at {k} dims ({r:.0%})" for lay, ks in below.items() for k, r in ks.items() if r < COLLAPSE]
        lowest = {lay: min(ks.items(), key=lambda kv: kv[1]) for lay, ks in below.items() if ks}
        smallest_ok = {
            lay: min((k for k in results[lay][method] if k != "full"
                      and all(retained(results[lay], method, j) >= SURVIVE for j in results[lay][method]
                              if j != "full" and j >= k)), default=None)
            for lay in layers
        }
        lines.append(
            f"(c) {name}: survives at 32 dims (≥{SURVIVE:.0%} of the raw AUC margin) at every layer: "
            f"{'YES' if ok_32 else 'NO'} (" + ", ".join(f"{lay} {r:.0%}" for lay, r in survive_32.items()) + ")"
        )
        if collapsed:
            lines.append(f"    collapses (<{COLLAPSE:.0%} of the margin) below 32 dims: YES, at " + ", ".join(collapsed))
        else:
            lines.append(
                f"    collapses (<{COLLAPSE:.0%} of the margin) below 32 dims: NO; lowest kept: "
                + ", ".join(f"{lay} {r:.0%} at {k} dims" for lay, (k, r) in lowest.items())
            )
        lines.append("    fewest dims from which every larger level survives: "
                     + ", ".join(f"{lay} {k}" for lay, k in smallest_ok.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="store folder to reuse or create (default: a temporary one)")
    parser.add_argument("--eval-memory", type=float, default=512.0, help="MB for the subset's raw copies")
    args = parser.parse_args()

    import torch

    from vecsim.store import Store

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vecsim-bench-fidelity-") as tmp:
        path = Path(args.store) if args.store else Path(tmp) / "digits"
        built = None
        if not (path / "vecsim.json").is_file():
            built = build_store(path, args.eval_memory)
        store = Store.open(path)
        results = {layer: analyse(store, layer) for layer in LAYERS}
    seconds = time.perf_counter() - t0

    print(f"bench_fidelity: builtin:digits ({N_DIGITS} digits, 10 classes), digits-cnn default weights, cosine")
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"python {platform.python_version()}, torch {torch.__version__}, CPU")
    print(f"store: {'indexed in %.1f s' % built if built is not None else 'reused ' + str(path)}; "
          f"stored dim 256 (pool: {results['pool']['stored_dim']}), projection fitted on all {N_DIGITS} digits")
    print("pairs per layer: " + ", ".join(f"{lay} M={r['M']} ({r['n_same']:,} same / {r['n_diff']:,} diff)"
                                          for lay, r in results.items()))
    print("raw = exact cosine of the raw activations; uncentred = vecsim's stored projection, first k dims;")
    print("PCA = centred PCA scores on the top k components (fitted on the subset); full = all components.")
    for method, title in (("uncentred", "vecsim uncentred projection"), ("pca", "centred PCA (write-up's variant)")):
        for key, name, digits in (("auc", "ROC AUC same vs different class", 3),
                                  ("d", "d′ same vs different class", 2),
                                  ("rho", "Spearman vs raw cosine", 3)):
            print(f"\n{name} — {title}, by dims")
            print("\n".join(table(results, method, key, digits)))
    print("\nVerdicts (computed from the tables above):")
    print("\n".join(verdicts(results)))
    print(f"\ntotal {seconds:.1f} s")


if __name__ == "__main__":
    main()
