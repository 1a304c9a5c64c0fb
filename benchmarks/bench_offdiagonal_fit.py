"""Would a projection fitted to the off-diagonal cosines only beat vecsim's (uncentred PCA,
training vectors shrunk in-sample)?

vecsim never uses a stimulus's similarity with itself (the export writes 1, a query skips
it), so a rank-k fit of the training sample's cosine matrix could leave its diagonal free
(iterated principal-axis factoring) instead of the least-squares eigen-truncation that
projecting on the top k directions gives. On the DenseNet121 transition layers of
bench_huge_layers.py's generated 400x400 images that fit is far closer on the training
pairs; the question is whether it carries over to stimuli outside the training sample
(every stimulus beyond --train-size, every `query --image`, every `vecsim add`).

Run with:
    python benchmarks/bench_offdiagonal_fit.py [--n 300] [--size 400] [--cache FILE.npz]

Computes the exact raw cosines of N generated images (bench_huge_layers.py's `exact` child:
plain hooks, raw activations held in memory, ~18 MB per image) or reads them from --cache
(written there on the first run), then, for several training-sample sizes and dims, fits
both maps on a seeded training subset from the exact cosines alone (no sketch) and reports
Spearman / max |Δcos| against the exact cosines for training-training (tt),
held-out-training (ht) and held-out-held-out (hh) pairs. Both maps are linear in the
stimulus's cosines with the training stimuli:

* PCA: y = Λ_k^{-1/2} U_kᵀ c_x, with (Λ, U) the eigenpairs of the training cosines;
* PCA (vecsim): the same, with the training stimuli's rows shrunk in-sample by
  D = (1 − δ/Λ_k)^½ (vecsim.reduce.in_sample_noise: δ fitted to the training cosines off
  the diagonal, one number per layer and dim), every other stimulus's row as it is;
* off-diagonal fit: y = Yᵀ C⁻¹ c_x, with Y (n × k) the factor of the rank-k PSD matrix that
  matches the training cosines off the diagonal (its diagonal iterated, 100 rounds).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))


def exact_cosines(n: int, size: int, cache: Path | None) -> dict[str, np.ndarray]:
    if cache is not None and cache.exists():
        with np.load(cache) as f:
            return {k: f[k] for k in f.files}
    from bench_huge_layers import LAYERS
    from bench_index import make_images

    with tempfile.TemporaryDirectory(prefix="vecsim-offdiag-") as work:
        images = Path(work) / "images"
        make_images(images, n, side=size)
        cmd = [sys.executable, str(REPO / "benchmarks" / "bench_huge_layers.py"), "--child", "exact",
               "--images", str(images), "--n", str(n), "--size", str(size), "--batch-size", "16",
               "--exact", "0", "--dim", "256", "--weights", "none"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"exact child failed:\n{result.stderr[-3000:]}")
        exact = json.loads(result.stdout.strip().splitlines()[-1])
    out = {}
    for layer in LAYERS:
        gram = np.asarray(exact[layer])
        norms = np.sqrt(np.diag(gram))
        out[layer] = gram / np.outer(norms, norms)
    if cache is not None:
        np.savez(cache, **out)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from vecsim.measures import rankdata

    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    return float(ra @ rb / np.sqrt((ra @ ra) * (rb @ rb)))


def eig_desc(M: np.ndarray):
    w, v = np.linalg.eigh(M)
    order = np.argsort(w)[::-1]
    return w[order], v[:, order]


def offdiagonal_factor(C: np.ndarray, k: int, rounds: int = 100) -> np.ndarray:
    """Y (n × k) with Y Yᵀ the rank-k PSD matrix fitted to C off its diagonal."""
    w, v = eig_desc(C)
    H = (v[:, :k] * w[:k]) @ v[:, :k].T
    for _ in range(rounds):
        M = C.copy()
        np.fill_diagonal(M, np.diag(H))
        w, v = eig_desc(M)
        w = np.clip(w[:k], 0, None)
        H = (v[:, :k] * w) @ v[:, :k].T
    return v[:, :k] * np.sqrt(w)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", type=int, default=400)
    p.add_argument("--cache", type=Path, default=None, help="npz of exact cosines: read if present, else written")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from vecsim.reduce import in_sample_shrinkage

    cosines = exact_cosines(args.n, args.size, args.cache)
    n = args.n
    settings = [(n * 2 // 3, n * 2 // 3 * 64 // 100), (n * 2 // 3, n * 2 // 3 * 9 // 10), (n * 5 // 6, n * 2 // 3),
                (n, min(256, n - 1))]  # the last: every stimulus in the training sample, as in bench_huge_layers
    print(f"exact raw cosines of {n} generated {args.size}x{args.size} images, DenseNet121 random weights; "
          "Spearman / max|dcos| against them, by pair group (tt training-training, ht held-out-training, "
          "hh held-out-held-out)")
    print(f"{'layer':<27} {'train':>5} {'dim':>4}  {'map':<13} {'tt':>14} {'ht':>14} {'hh':>14}")
    rng = np.random.default_rng(args.seed)
    for layer, C in cosines.items():
        for n_train, k in settings:
            perm = rng.permutation(n)
            train, held = perm[:n_train], perm[n_train:]
            C_tt, C_xt = C[np.ix_(train, train)], C[:, train]
            w, U = eig_desc(C_tt)
            pca = C_xt @ U[:, :k] / np.sqrt(w[:k])
            shrunk = pca.copy()  # vecsim: the training stimuli's rows shrunk in-sample, the others as they are
            _, scale = in_sample_shrinkage(pca[train], w[:k], w.sum())
            if scale is not None:
                shrunk[train] *= scale
            maps = {
                "PCA": pca,
                "PCA (vecsim)": shrunk,
                "off-diagonal": C_xt @ np.linalg.solve(C_tt, offdiagonal_factor(C_tt, k)),
            }
            for name, Y in maps.items():
                S = Y @ Y.T
                cells = []
                for A, B in ((train, train), (held, train), (held, held)):
                    if len(A) == 0 or len(B) == 0 or (A is B and len(A) < 2):
                        cells.append("-")
                        continue
                    mask = np.zeros((n, n), dtype=bool)
                    mask[np.ix_(A, B)] = True
                    mask = np.triu(mask | mask.T, 1)
                    cells.append(f"{spearman(C[mask], S[mask]):.4f}/{np.abs(C[mask] - S[mask]).max():.3f}")
                print(f"{layer:<27} {n_train:>5} {k:>4}  {name:<13} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}")


if __name__ == "__main__":
    main()
