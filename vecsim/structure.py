"""Structure inside one layer: effective dimensionality and channel redundancy.

Pure numpy/scipy.  ``responses`` arrays have shape (n_stimuli, n_channels, g):
each channel's response to each stimulus pooled to a small grid of g cells
(a 2-D (n_stimuli, n_channels) array is read as g = 1).  Shape problems raise
:class:`~vecsim.errors.DimensionMismatchError`, bad parameters
:class:`~vecsim.errors.ConfigError`.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import numpy.typing as npt
from scipy.linalg import cholesky, solve_triangular
from scipy.optimize import nnls

from vecsim.errors import ConfigError, DimensionMismatchError

_EPS = np.finfo(np.float64).eps

KERNELS: tuple[str, ...] = ("cosine", "gaussian")

# NNK numerics (kernel values are in [0, 1] with unit diagonal, so these are absolute).
_RIDGE = 1e-8  # keeps K_SS invertible when candidates coincide; shifts θ by ~1e-8
_THETA_TOL = 1e-6  # θ at or below this is no edge (NNK reference code's default threshold)
_KKT_TOL = 1e-10  # a dropped candidate's gradient below −this: the pruning missed the optimum
_DUPLICATE = 1e-12  # kernel value ≥ 1 − this: the candidate coincides with the query


# --------------------------------------------------------------------------- effective rank


def _eigenvalues(eigenvalues: npt.ArrayLike) -> np.ndarray:
    lam = np.asarray(eigenvalues, dtype=np.float64)
    if lam.ndim != 1 or lam.size == 0:
        raise DimensionMismatchError(
            f"eigenvalues must be a non-empty 1-D array, got shape {lam.shape}"
        )
    if not np.isfinite(lam).all():
        raise ConfigError(f"eigenvalues hold {int((~np.isfinite(lam)).sum())} NaN or infinite value(s)")
    # Covariance spectra from eigh carry tiny negative round-off; they mean 0.
    return np.clip(lam, 0.0, None)


def effective_rank(eigenvalues: npt.ArrayLike) -> dict:
    """Two effective dimensionalities of a spectrum λ (e.g. covariance eigenvalues).

    * ``participation_ratio`` = (Σλ)² / Σλ² (Gao, Trautmann, Yu et al. 2017, "A theory
      of multineuronal dimensionality, dynamics and measurement", bioRxiv 214262);
    * ``entropy_rank`` = exp(H(p)), p = λ/Σλ, H the Shannon entropy with 0·log 0 = 0
      (Roy & Vetterli 2007, "The effective rank: a measure of effective
      dimensionality", EUSIPCO; applied here to the given values, so passing
      covariance eigenvalues gives the effective rank of the covariance matrix).

    Both equal k for k equal non-zero values.  Order does not matter and negatives
    are clipped to 0.  ``n_positive`` counts values above n·eps·λ_max.  An all-zero
    spectrum gives 0 for everything.
    """
    lam = _eigenvalues(eigenvalues)
    total = float(lam.sum())
    if total <= 0.0:
        zero = {"participation_ratio": 0.0, "entropy_rank": 0.0, "n_positive": 0}
        return {**zero, "n": int(lam.size)}
    p = lam[lam > 0] / total
    entropy = float(-(p * np.log(p)).sum())
    return {
        "participation_ratio": total**2 / float((lam**2).sum()),
        "entropy_rank": float(np.exp(entropy)),
        "n_positive": int(np.sum(lam > lam.max() * lam.size * _EPS)),
        "n": int(lam.size),
    }


def dims_for_energy(
    eigenvalues: npt.ArrayLike, fractions: Iterable[float] = (0.9, 0.95, 0.99)
) -> dict[float, int]:
    """For each fraction f, the fewest leading (largest) eigenvalues whose sum reaches f·Σλ.

    The "number of principal components explaining f of the variance" (Jolliffe
    2002, "Principal Component Analysis", §6.1.1).  Values are sorted descending
    and negatives clipped first; a relative slack of 1e-12 absorbs round-off so
    e.g. [4, 3, 2, 1] needs exactly 3 dims for 0.9.  An all-zero spectrum needs 0.
    Fractions must lie in (0, 1].
    """
    lam = np.sort(_eigenvalues(eigenvalues))[::-1]
    total = float(lam.sum())
    cum = np.cumsum(lam)
    out: dict[float, int] = {}
    for f in fractions:
        f = float(f)
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"energy fractions must be in (0, 1], got {f!r}")
        if total <= 0.0:
            out[f] = 0
            continue
        k = int(np.searchsorted(cum, f * total * (1.0 - 1e-12))) + 1
        out[f] = min(k, int(lam.size))
    return out


# --------------------------------------------------------------------------- channel cosine


def _responses(responses: npt.ArrayLike) -> np.ndarray:
    R = np.asarray(responses, dtype=np.float64)
    if R.ndim == 2:
        R = R[:, :, None]
    if R.ndim != 3 or 0 in R.shape:
        raise DimensionMismatchError(
            "responses must have shape (n_stimuli, n_channels, g) with no empty axis, "
            f"got {R.shape}"
        )
    if not np.isfinite(R).all():
        raise ConfigError(f"responses hold {int((~np.isfinite(R)).sum())} NaN or infinite value(s)")
    return R


def dead_channels(responses: npt.ArrayLike) -> np.ndarray:
    """Boolean mask over channels whose response is exactly zero for every stimulus and cell."""
    R = _responses(responses)
    return ~np.any(R != 0, axis=(0, 2))


def channel_similarity(responses: npt.ArrayLike) -> np.ndarray:
    """Channel × channel cosine similarity of the flattened (n_stimuli·g) responses.

    S_cd = ⟨r_c, r_d⟩ / (‖r_c‖‖r_d‖), the filter-response redundancy measure used
    e.g. by Bonet et al. 2022 ("Channel redundancy and overlap in convolutional
    neural networks with channel-wise NNK graphs", ICASSP, arXiv 2110.11400) as the
    baseline to CW-NNK overlap.  A dead (all-zero) channel has similarity 0 with
    every channel, itself included; live channels have exactly 1 on the diagonal.
    """
    R = _responses(responses)
    n, c, g = R.shape
    V = R.transpose(1, 0, 2).reshape(c, n * g)
    from vecsim.measures import cosine_from_gram

    S = cosine_from_gram(V @ V.T)
    np.fill_diagonal(S, np.any(V != 0, axis=1).astype(np.float64))  # exactly 1 for live channels
    return S


# --------------------------------------------------------------------------- NNK


def _check_nnk_args(k: int, kernel: str) -> None:
    if kernel not in KERNELS:
        raise ConfigError(f"unknown NNK kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, got {k!r}")


def _top_candidates(score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k highest-scoring columns (−inf = not allowed), best first.

    Returns (idx, valid); rows with fewer than k allowed columns are padded with
    valid = False.  Equal scores are ordered by column index for determinism.
    """
    n = score.shape[0]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.intp), np.zeros((n, 0), dtype=bool)
    # the k-th highest score per row; every column above it is in, and of the columns equal
    # to it the lowest-indexed fill the rest (argpartition alone picks among ties arbitrarily,
    # depending on unrelated values in the row)
    kth = np.take_along_axis(score, np.argpartition(-score, k - 1, axis=1)[:, k - 1 : k], axis=1)
    above = score > kth
    tied = score == kth
    take = above | (tied & (np.cumsum(tied, axis=1) <= (k - above.sum(axis=1))[:, None]))
    idx = np.nonzero(take)[1].reshape(n, k)
    vals = np.take_along_axis(score, idx, axis=1)
    order = np.lexsort((idx, -vals), axis=-1)
    idx = np.take_along_axis(idx, order, axis=1)
    return idx, np.isfinite(np.take_along_axis(score, idx, axis=1))


def _cosine_problem(F: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Candidates and kernel blocks for the NNK reference cosine kernel (1 + cos)/2."""
    norms = np.linalg.norm(F, axis=1)
    live = norms > 0
    U = np.divide(F, norms[:, None], out=np.zeros_like(F), where=live[:, None])
    cos = np.clip(U @ U.T, -1.0, 1.0)
    score = cos.copy()
    # A zero response has no direction: it neither has nor is a neighbour.
    score[:, ~live] = -np.inf
    score[~live, :] = -np.inf
    np.fill_diagonal(score, -np.inf)
    idx, valid = _top_candidates(score, k)
    A = 0.5 + 0.5 * cos[idx[:, :, None], idx[:, None, :]]
    b = 0.5 + 0.5 * np.take_along_axis(cos, idx, axis=1)
    return idx, valid, A, b


def _gaussian_problem(F: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Candidates and kernel blocks for exp(−d²/2σ_i²), σ_i = (distance to k-th candidate)/3.

    The NNK reference code (Shekkizhar & Ortega's PyNNK demo) uses one global σ, a mean
    k-th-neighbour distance divided by 3; this is its per-point form, so each stimulus's
    kernel is scaled to its own neighbourhood (a channel's responses are often dense in one
    region and sparse in another). Results differ from a global σ where the density varies.
    """
    sq = np.einsum("ij,ij->i", F, F)
    score = -(sq[:, None] + sq[None, :] - 2.0 * F @ F.T)
    np.fill_diagonal(score, -np.inf)
    idx, valid = _top_candidates(score, k)
    # Exact distances for the chosen few: the expansion above cancels badly near 0.
    cand = F[idx]
    d_query = np.sum((cand - F[:, None, :]) ** 2, axis=2)
    d_pair = np.sum((cand[:, :, None, :] - cand[:, None, :, :]) ** 2, axis=3)
    far = np.sqrt(np.where(valid, d_query, 0.0).max(axis=1, initial=0.0)) / 3.0
    two_s2 = 2.0 * np.where(far > 0, far, 1.0) ** 2
    A = np.exp(-d_pair / two_s2[:, None, None])
    b = np.exp(-d_query / two_s2[:, None])
    return idx, valid, A, b


def _masked_solve(A: np.ndarray, b: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Solve A_SS θ_S = b_S on each row's active set S (θ = 0 elsewhere), batched."""
    both = active[:, :, None] & active[:, None, :]
    M = np.where(both, A, 0.0)
    diag = np.einsum("mii->mi", M)  # writable view
    diag += ~active  # identity rows for inactive entries keep M invertible
    rhs = np.where(active, b, 0.0)
    return np.linalg.solve(M, rhs[..., None])[..., 0]


def _exact_nnk(A: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """min_{θ≥0} ½θᵀAθ − bᵀθ exactly.

    With A = RᵀR (Cholesky) it is the NNLS problem ‖Rθ − R⁻ᵀb‖², solved by scipy's
    Lawson & Hanson active-set method.
    """
    theta = np.zeros_like(b)
    if not valid.any():
        return theta
    sub = A[np.ix_(valid, valid)]
    R = cholesky(sub, lower=False)
    d = solve_triangular(R, b[valid], trans="T")
    theta[valid] = nnls(R, d)[0]
    return theta


def _nnk_solve(A: np.ndarray, b: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Batched NNK weights θ = argmin_{θ≥0} ½θᵀAθ − bᵀθ over each row's candidates.

    First the NNK reference solver's pruning iteration (solve on the active set,
    drop θ ≤ tol, repeat), vectorised over all queries; rows whose result breaks
    the KKT conditions (a dropped θ_j with negative gradient) are re-solved
    exactly with scipy's NNLS, so the result is the true optimum either way.
    """
    m, k = b.shape
    A = A + _RIDGE * np.eye(k)
    active = valid.copy()
    theta = np.zeros_like(b)
    for _ in range(k + 1):
        theta = _masked_solve(A, b, active)
        drop = active & (theta <= _THETA_TOL)
        if not drop.any():
            break
        active &= ~drop
    theta = np.where(active, theta, 0.0)
    grad = np.einsum("mij,mj->mi", A, theta) - b
    # any clearly negative gradient of a dropped candidate breaks optimality (a dropped θ of
    # 6e-5 shows a gradient of only -7e-7): re-solved exactly; rounding is ~1e-15 here
    for i in np.flatnonzero((valid & ~active & (grad < -_KKT_TOL)).any(axis=1)):
        theta[i] = _exact_nnk(A[i], b[i], valid[i])
    return np.where(theta > _THETA_TOL, theta, 0.0)


def _nnk_padded(F: np.ndarray, k: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """NNK neighbours of every row of F as (candidate idx (n×k'), is-neighbour mask (n×k'))."""
    problem = _cosine_problem if kernel == "cosine" else _gaussian_problem
    idx, valid, A, b = problem(F, k)
    if idx.shape[1] == 0:
        return idx, valid
    duplicate = valid & (b >= 1.0 - _DUPLICATE)
    has_dup = duplicate.any(axis=1)
    keep = np.zeros_like(valid)
    # A candidate identical to the query reconstructs it exactly, so the NNK
    # optimum is not unique there; like the reference code, link to all copies.
    keep[has_dup] = duplicate[has_dup]
    rest = ~has_dup & valid.any(axis=1)
    if rest.any():
        keep[rest] = _nnk_solve(A[rest], b[rest], valid[rest]) > 0
    return idx, keep


def nnk_neighbors(features: npt.ArrayLike, k: int = 10, kernel: str = "cosine") -> list[np.ndarray]:
    """NNK neighbourhood of every point: sorted neighbour indices, one array per row.

    Non-negative kernel regression graph (Shekkizhar & Ortega 2020, "Graph
    construction from data by non-negative kernel regression", ICASSP): for point
    i take the k candidates S with the highest kernel value (the k nearest), solve
    ``θ = argmin_{θ≥0} ½θᵀK_SSθ − K_Siᵀθ`` and keep the candidates with θ > 1e-6.
    Kernels, as in the authors' code: ``"cosine"`` = (1 + cos)/2 (an all-zero
    point has no direction, so it gets no neighbours and is nobody's neighbour)
    and ``"gaussian"`` = exp(−d²/2σ_i²) with σ_i = (distance to the k-th
    candidate)/3.  A candidate identical to the point (kernel value 1) makes the
    optimum non-unique; then the neighbours are exactly the identical candidates.
    A 1e-8 ridge on K_SS keeps duplicates among candidates solvable.  With a
    single feature (g = 1) the cosine kernel only sees signs; use ``"gaussian"``.
    """
    _check_nnk_args(k, kernel)
    F = np.asarray(features, dtype=np.float64)
    if F.ndim == 1:
        F = F[:, None]
    if F.ndim != 2 or F.shape[0] == 0:
        raise DimensionMismatchError(
            f"features must be (n_points, n_features), got shape {F.shape}"
        )
    idx, keep = _nnk_padded(F, int(k), kernel)
    return [np.sort(idx[i][keep[i]]) for i in range(F.shape[0])]


def _channel_sets(R: np.ndarray, k: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    """Padded NNK neighbour indices (C, n, k') and membership mask for every channel."""
    n, c, _ = R.shape
    dead = dead_channels(R)
    kk = min(k, n - 1)
    idx = np.zeros((c, n, kk), dtype=np.intp)
    keep = np.zeros((c, n, kk), dtype=bool)
    for ch in np.flatnonzero(~dead):  # a dead channel carries no neighbourhoods at all
        idx[ch], keep[ch] = _nnk_padded(R[:, ch, :], kk, kernel)
    return idx, keep


def channel_overlap(responses: npt.ArrayLike, k: int = 10, kernel: str = "cosine") -> np.ndarray:
    """Channel-wise NNK (CW-NNK) overlap: mean over stimuli of the Jaccard index of NNK sets.

    Bonet, Ortega, Ruiz-Hidalgo & Shekkizhar 2022 ("Channel redundancy and overlap
    in convolutional neural networks with channel-wise NNK graphs", ICASSP, arXiv
    2110.11400): build one NNK graph of the stimuli per channel from that
    channel's (n_stimuli × g) responses (:func:`nnk_neighbors`), then
    ``O_cd = mean_i |N_c(i) ∩ N_d(i)| / |N_c(i) ∪ N_d(i)|``.

    Stimuli where both neighbourhoods are empty (e.g. neither channel responds
    under the cosine kernel) are left out of the mean; a pair with no such stimulus
    left, and every pair involving a dead (all-zero) channel, scores 0.  Identical
    channels score 1.  Returns a symmetric C×C matrix.
    """
    _check_nnk_args(k, kernel)
    R = _responses(responses)
    n, c, _ = R.shape
    idx, keep = _channel_sets(R, int(k), kernel)
    sizes = keep.sum(axis=2).T.astype(np.float64)  # (n, C)
    total = np.zeros((c, c))
    count = np.zeros((c, c))
    chunk = max(1, (1 << 25) // (4 * c * n))  # one-hot block of ≤ 32 MiB
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        onehot = np.zeros((stop - start, c, n), dtype=np.float32)
        ch, i, j = np.nonzero(keep[:, start:stop])
        onehot[i, ch, idx[ch, i + start, j]] = 1.0
        # float32 sums of 0/1 are exact; divide in float64 so Jaccards are not rounded.
        inter = (onehot @ onehot.transpose(0, 2, 1)).astype(np.float64)
        sz = sizes[start:stop]
        union = sz[:, :, None] + sz[:, None, :] - inter
        seen = union > 0
        total += np.divide(inter, union, out=np.zeros_like(inter), where=seen).sum(axis=0)
        count += seen.sum(axis=0)
    return np.divide(total, count, out=np.zeros((c, c)), where=count > 0)


def _pair_stats(M: np.ndarray, live: np.ndarray) -> tuple[float | None, float | None, np.ndarray]:
    sub = M[np.ix_(live, live)]
    vals = sub[np.triu_indices(sub.shape[0], k=1)]
    if vals.size == 0:
        return None, None, vals
    return float(vals.mean()), float(np.median(vals)), vals


def _square(M: npt.ArrayLike | None, c: int, name: str) -> np.ndarray | None:
    if M is None:
        return None
    A = np.asarray(M, dtype=np.float64)
    if A.shape != (c, c):
        raise DimensionMismatchError(
            f"{name} must be {c}×{c} for {c} channels, got shape {A.shape}"
        )
    return A


def redundancy_summary(
    responses: npt.ArrayLike,
    k: int = 10,
    kernel: str = "cosine",
    *,
    cosine_threshold: float = 0.9,
    similarity: npt.ArrayLike | None = None,
    overlap: npt.ArrayLike | None = None,
) -> dict:
    """Scalar summary of channel redundancy in one layer.

    Pairwise statistics run over unordered pairs of *live* channels (dead, all-zero
    channels are counted in ``n_dead`` instead, since they would otherwise read as
    perfectly dissimilar): mean/median cosine similarity (:func:`channel_similarity`),
    mean/median CW-NNK overlap (:func:`channel_overlap`, Bonet et al. 2022, arXiv
    2110.11400) and the fraction of pairs with cosine > ``cosine_threshold``.  Pair
    statistics are ``None`` with fewer than two live channels.  Pass ``similarity``
    / ``overlap`` when already computed to skip recomputing them.
    """
    R = _responses(responses)
    c = R.shape[1]
    dead = dead_channels(R)
    live = ~dead
    S = _square(similarity, c, "similarity")
    O = _square(overlap, c, "overlap")
    S = channel_similarity(R) if S is None else S
    O = channel_overlap(R, k, kernel) if O is None else O
    cos_mean, cos_median, cos_vals = _pair_stats(S, live)
    ov_mean, ov_median, _ = _pair_stats(O, live)
    frac = float(np.mean(cos_vals > cosine_threshold)) if cos_vals.size else None
    return {
        "n_channels": int(c),
        "n_dead": int(dead.sum()),
        "dead_channels": [int(i) for i in np.flatnonzero(dead)],
        "n_pairs": int(cos_vals.size),
        "cosine_mean": cos_mean,
        "cosine_median": cos_median,
        "cosine_threshold": float(cosine_threshold),
        "frac_pairs_cosine_above": frac,
        "overlap_mean": ov_mean,
        "overlap_median": ov_median,
        "k": int(min(k, max(R.shape[0] - 1, 0))),  # the candidates each NNK graph used
        "k_requested": int(k),
        "kernel": kernel,
    }
