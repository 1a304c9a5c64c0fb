"""Similarity measures between two representations of the same stimuli.

Two input conventions are used throughout:

* feature matrices ``X`` (n × p1) and ``Y`` (n × p2) whose row i is stimulus i
  in both;
* Gram matrices ``K = X Xᵀ`` and ``L = Y Yᵀ`` (n × n) of *raw, uncentred*
  activations.  Every Gram-based measure centres them itself, so passing the
  Gram of already centred features gives the same result.

Everything is computed in float64.  A measure that is undefined because one
representation has no variance across stimuli (a constant layer) returns
``nan``; shape problems raise :class:`~vecsim.errors.DimensionMismatchError`
and bad parameters :class:`~vecsim.errors.ConfigError`.

Precision note: centring a Gram matrix subtracts large numbers when the
activations have a big common offset, so the Gram forms lose about
``log10(‖K‖/‖HKH‖)`` digits; the feature forms centre the features and do not.

:data:`MEASURES` lists the measures under the names the CLI uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import numpy.typing as npt

from vecsim.errors import ConfigError, DimensionMismatchError

_EPS = np.finfo(np.float64).eps

RSA_METHODS: tuple[str, ...] = ("spearman", "pearson", "kendall_tau_a")


# --------------------------------------------------------------------------- input checks


def _matrix(a: npt.ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise DimensionMismatchError(f"{name} must be a 2-D matrix, got shape {arr.shape}")
    return arr


def _gram(g: npt.ArrayLike, name: str) -> np.ndarray:
    G = _matrix(g, name)
    if G.shape[0] != G.shape[1]:
        raise DimensionMismatchError(
            f"{name} must be a square n×n Gram matrix, got shape {G.shape}"
        )
    # Grams summed in float32 or in blocks are asymmetric by round-off; every
    # formula below (e.g. tr(AB) = Σ A∘B) assumes exact symmetry.
    return (G + G.T) / 2.0


def _gram_pair(k: npt.ArrayLike, l: npt.ArrayLike, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    K, L = _gram(k, "K"), _gram(l, "L")
    if K.shape != L.shape:
        raise DimensionMismatchError(
            f"K and L must describe the same stimuli: shapes {K.shape} and {L.shape}"
        )
    if K.shape[0] < min_n:
        raise DimensionMismatchError(f"need at least {min_n} stimuli, got {K.shape[0]}")
    return K, L


def _feature_pair(x: npt.ArrayLike, y: npt.ArrayLike, min_n: int) -> tuple[np.ndarray, np.ndarray]:
    X, Y = _matrix(x, "X"), _matrix(y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise DimensionMismatchError(
            f"X and Y must have one row per stimulus, same count: {X.shape[0]} vs {Y.shape[0]}"
        )
    if X.shape[0] < min_n:
        raise DimensionMismatchError(f"need at least {min_n} stimuli, got {X.shape[0]}")
    return X, Y


def _is_zero(part: np.ndarray, whole: np.ndarray) -> bool:
    """True when ``part`` (a centred matrix) is round-off relative to ``whole``."""
    n = max(whole.shape[0], 1)
    return float(np.linalg.norm(part)) <= 64.0 * n * _EPS * float(np.linalg.norm(whole))


def _center_columns(X: np.ndarray) -> np.ndarray:
    return X - X.mean(axis=0, keepdims=True)


# --------------------------------------------------------------------------- CKA


def center_gram(K: npt.ArrayLike) -> np.ndarray:
    """Double-centred Gram matrix ``H K H`` with ``H = I − 11ᵀ/n``.

    Equals ``Xc Xcᵀ`` for column-centred features ``Xc`` (Kornblith et al.
    2019, "Similarity of Neural Network Representations Revisited", eq. 3).
    """
    G = _gram(K, "K")
    means = G.mean(axis=0)  # row means = column means for a symmetric matrix
    return G - means[None, :] - means[:, None] + means.mean()


def _u_center_gram(K: np.ndarray) -> np.ndarray:
    """U-centred Gram (Székely & Rizzo 2014): ⟨U(K), U(L)⟩ = n(n−3)·HSIC₁(K, L).

    HSIC₁ is the unbiased estimator of Song et al. 2012 ("Feature Selection via
    Dependence Maximization", JMLR 13, eq. 5); this matrix form is the one used
    by Kornblith et al.'s reference code and Nguyen, Raghu & Kornblith 2021.
    """
    n = K.shape[0]
    U = K.copy()
    np.fill_diagonal(U, 0.0)
    means = U.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    U -= means[:, None]
    U -= means[None, :]
    np.fill_diagonal(U, 0.0)
    return U


def _cosine_of_centred(Kc: np.ndarray, Lc: np.ndarray, K: np.ndarray, L: np.ndarray) -> float:
    if _is_zero(Kc, K) or _is_zero(Lc, L):
        return float("nan")
    num = float(np.sum(Kc * Lc))
    value = num / (float(np.linalg.norm(Kc)) * float(np.linalg.norm(Lc)))
    return min(1.0, max(-1.0, value))  # Cauchy-Schwarz bound, exceeded only by round-off


def linear_cka_gram(K: npt.ArrayLike, L: npt.ArrayLike, debiased: bool = False) -> float:
    """Linear CKA from Gram matrices ``K = X Xᵀ`` and ``L = Y Yᵀ``.

    Biased (Kornblith et al. 2019, "Similarity of Neural Network Representations
    Revisited", ICML, eqs. 3-4)::

        CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)),  HSIC(K, L) ∝ tr(K H L H)

    Debiased (Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the
    Same Things?", ICLR): every HSIC is replaced by the unbiased estimator HSIC₁ of
    Song et al. 2012 ("Feature Selection via Dependence Maximization", JMLR), computed
    via U-centring.  Debiased CKA is ≈ 0 for independent representations even when
    p ≫ n, and can be slightly negative.  It needs n ≥ 4.

    ``K`` and ``L`` may be Grams of raw (uncentred) activations.  Returns ``nan``
    when either representation is constant across stimuli.  Cost O(n²).
    """
    K, L = _gram_pair(K, L, min_n=4 if debiased else 2)
    if debiased:
        return _cosine_of_centred(_u_center_gram(K), _u_center_gram(L), K, L)
    return _cosine_of_centred(center_gram(K), center_gram(L), K, L)


def _debiased_dot(xty: float, dx: np.ndarray, dy: np.ndarray, n: int) -> float:
    """n(n−3)·HSIC₁ from feature-space terms, valid for column-centred features.

    With ``Xc`` centred, ``1ᵀK = 0`` so Song et al.'s estimator only needs
    tr(KL) = ‖YcᵀXc‖²_F and the diagonals dx = diag(K), dy = diag(L).
    """
    return xty - n / (n - 2) * float(dx @ dy) + float(dx.sum() * dy.sum()) / ((n - 1) * (n - 2))


def linear_cka(X: npt.ArrayLike, Y: npt.ArrayLike, debiased: bool = False) -> float:
    """Linear CKA from feature matrices X (n×p1), Y (n×p2); same value as the Gram form.

    After column-centring, biased linear CKA is (Kornblith et al. 2019,
    "Similarity of Neural Network Representations Revisited", eq. 5)::

        ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F)

    and the debiased version substitutes Song et al. 2012's unbiased HSIC₁ (as in
    Nguyen, Raghu & Kornblith 2021).  The feature form costs O(n(p1+p2)²) and is
    used when p1 + p2 < n; otherwise the O(n²(p1+p2)) Gram route of
    :func:`linear_cka_gram` is cheaper and is used instead (on centred features,
    so no precision is lost to Gram centring).
    """
    X, Y = _feature_pair(X, Y, min_n=4 if debiased else 2)
    n = X.shape[0]
    Xc, Yc = _center_columns(X), _center_columns(Y)
    if _is_zero(Xc, X) or _is_zero(Yc, Y):
        return float("nan")
    if X.shape[1] + Y.shape[1] >= n:
        return linear_cka_gram(Xc @ Xc.T, Yc @ Yc.T, debiased=debiased)
    xty = float(np.linalg.norm(Yc.T @ Xc) ** 2)
    xx = float(np.linalg.norm(Xc.T @ Xc) ** 2)
    yy = float(np.linalg.norm(Yc.T @ Yc) ** 2)
    if debiased:
        dx = np.einsum("ij,ij->i", Xc, Xc)
        dy = np.einsum("ij,ij->i", Yc, Yc)
        xty = _debiased_dot(xty, dx, dy, n)
        xx = _debiased_dot(xx, dx, dx, n)
        yy = _debiased_dot(yy, dy, dy, n)
        if xx <= 0.0 or yy <= 0.0:
            return float("nan")
    return min(1.0, max(-1.0, xty / float(np.sqrt(xx * yy))))


# --------------------------------------------------------------------------- RSA


def cosine_rdm_from_gram(G: npt.ArrayLike) -> np.ndarray:
    """Cosine-distance RDM ``D_ij = 1 − G_ij / sqrt(G_ii G_jj)`` from a raw Gram ``G = X Xᵀ``.

    Representational dissimilarity matrix as in Kriegeskorte, Mur & Bandettini 2008
    ("Representational similarity analysis", Front. Syst. Neurosci.), with the
    cosine distance.  The diagonal is 0; a stimulus with an all-zero response has
    cosine 0 (distance 1) to every other stimulus, never NaN.  (The correlation
    distance needs the per-stimulus feature means, which a Gram does not hold.)
    """
    rdm = 1.0 - cosine_from_gram(_gram(G, "G"))
    np.fill_diagonal(rdm, 0.0)
    return rdm


def cosine_from_gram(G: np.ndarray) -> np.ndarray:
    """``G_ij / sqrt(G_ii G_jj)`` clipped to [-1, 1] (float64); a row whose ``G_ii`` is 0 (an
    all-zero vector) is 0 everywhere, its own entry included, never NaN."""
    K = np.asarray(G, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(K), 0.0, None))
    denom = np.outer(norms, norms)
    cos = np.divide(K, denom, out=np.zeros(K.shape), where=denom > 0)
    return np.clip(cos, -1.0, 1.0, out=cos)


def euclidean_rdm_from_gram(G: npt.ArrayLike) -> np.ndarray:
    """Euclidean-distance RDM ``D_ij = sqrt(G_ii + G_jj − 2 G_ij)`` from a Gram ``G = X Xᵀ``.

    See Kriegeskorte et al. 2008 ("Representational similarity analysis").
    Round-off negatives are clipped to 0 before the square root; diagonal is 0.
    """
    K = _gram(G, "G")
    d = np.diag(K)
    sq = np.clip(d[:, None] + d[None, :] - 2.0 * K, 0.0, None)
    rdm = np.sqrt(sq)
    np.fill_diagonal(rdm, 0.0)
    return rdm


def rdm_upper(rdm: npt.ArrayLike) -> np.ndarray:
    """The strict upper triangle (k=1) of a square RDM, row-major; a 1-D input is returned as is."""
    a = np.asarray(rdm, dtype=np.float64)
    if a.ndim == 1:
        return a
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise DimensionMismatchError(f"an RDM must be square or a 1-D vector, got shape {a.shape}")
    return a[np.triu_indices(a.shape[0], k=1)]


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks from 1 with ties averaged (scipy.stats.rankdata's default), in numpy alone:
    importing scipy.stats costs more than ranking a subset's pairs."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(sorted_x[1:] != sorted_x[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ac, bc = a - a.mean(), b - b.mean()
    den = float(np.linalg.norm(ac) * np.linalg.norm(bc))
    return float(ac @ bc) / den if den > 0 else float("nan")


def _tie_pairs(v: np.ndarray) -> int:
    counts = np.unique(v, return_counts=True)[1].astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def kendall_tau_a(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Kendall's τ-a: (concordant − discordant pairs) / (m(m−1)/2), ties count as neither.

    The variant recommended for comparing RDMs by Nili et al. 2014 ("A toolbox for
    representational similarity analysis", PLoS Comput. Biol.) and implemented in
    rsatoolbox.  O(m log m): scipy's τ-b = S / sqrt((n0−n1)(n0−n2)) gives the exact
    integer S = C − D (rounded), and τ-a = S / n0.  ``nan`` for fewer than 2 values
    or non-finite input.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise DimensionMismatchError(f"kendall_tau_a needs equal lengths: {x.size} vs {y.size}")
    m = x.size
    if m < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    n0 = m * (m - 1) // 2
    free_x, free_y = n0 - _tie_pairs(x), n0 - _tie_pairs(y)
    if free_x == 0 or free_y == 0:
        return 0.0  # one vector is constant: every pair is tied
    from scipy import stats  # only here: importing scipy.stats costs most of a second

    tau_b = float(stats.kendalltau(x, y, variant="b").statistic)
    s = round(tau_b * np.sqrt(float(free_x) * float(free_y)))
    return s / n0


def rsa(rdm_a: npt.ArrayLike, rdm_b: npt.ArrayLike, method: str = "spearman") -> float:
    """Representational similarity analysis: correlate two RDMs' upper triangles (k=1).

    Kriegeskorte, Mur & Bandettini 2008 ("Representational similarity analysis");
    methods as in Nili et al. 2014 ("A toolbox for representational similarity
    analysis"): ``"spearman"`` (average ranks for ties), ``"pearson"`` and
    ``"kendall_tau_a"`` (:func:`kendall_tau_a`).  RDMs are square n×n matrices or
    their condensed upper-triangle vectors.  Returns ``nan`` when an RDM is
    constant (correlation undefined) or has non-finite entries.
    """
    if method not in RSA_METHODS:
        raise ConfigError(f"unknown RSA method {method!r}; choose one of {', '.join(RSA_METHODS)}")
    a, b = rdm_upper(rdm_a), rdm_upper(rdm_b)
    if a.shape != b.shape:
        raise DimensionMismatchError(f"RDMs cover different stimulus pairs: {a.size} vs {b.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    if a.size and (a.min() == a.max() or b.min() == b.max()):  # every method: undefined, not 0
        return float("nan")
    if method == "pearson":
        return _pearson(a, b)
    if method == "spearman":
        return _pearson(rankdata(a), rankdata(b))
    return kendall_tau_a(a, b)


def rsa_gram(K: npt.ArrayLike, L: npt.ArrayLike, method: str = "spearman") -> float:
    """RSA between two representations given as raw Grams, using cosine-distance RDMs.

    ``rsa(cosine_rdm_from_gram(K), cosine_rdm_from_gram(L), method)``; see :func:`rsa`
    (Kriegeskorte et al. 2008; Nili et al. 2014).
    """
    K, L = _gram_pair(K, L, min_n=3)
    return rsa(cosine_rdm_from_gram(K), cosine_rdm_from_gram(L), method)


# --------------------------------------------------------------------------- CCA family


def _empty_basis(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 0)), np.zeros(0)


def _feature_basis(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis U (n×r) of the centred column space of X, and its singular values.

    r is the numerical rank (threshold of numpy.linalg.matrix_rank: s > max(n, p)·eps·s_max);
    a constant X gives r = 0.  For p > n the basis comes from the n×n Gram instead
    (faster, same subspace), which treats σ below ~sqrt(n·eps)·σ_max as zero.
    """
    Xc = _center_columns(X)
    n, p = Xc.shape
    if _is_zero(Xc, X):
        return _empty_basis(n)
    if p > n:
        return _gram_basis(Xc @ Xc.T)
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    r = int(np.sum(s > s[0] * max(n, p) * _EPS))
    return U[:, :r], s[:r]


def _gram_basis(K: np.ndarray, max_rank: int | None = None, floor: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_feature_basis` from a raw Gram: eigenvectors of H K H, σ = sqrt(λ).

    Eigenvalues below n·eps·λ_max, or at or below ``floor`` (the size of the Gram's own
    rounding, for a Gram summed in a lower precision), are treated as zero, and at most
    ``max_rank`` directions are kept (the features' dimension, when known).
    """
    Kc = center_gram(K)
    if _is_zero(Kc, K):
        return _empty_basis(K.shape[0])
    lam, V = np.linalg.eigh(Kc)
    lam, V = lam[::-1], V[:, ::-1]
    r = int(np.sum((lam > lam[0] * K.shape[0] * _EPS) & (lam > floor)))
    if max_rank is not None:
        r = min(r, max(int(max_rank), 0))
    return V[:, :r], np.sqrt(lam[:r])


def _keep_variance(U: np.ndarray, s: np.ndarray, keep: float) -> np.ndarray:
    """Leading columns of U whose variance (s²) reaches the fraction ``keep``."""
    var = s**2
    if var.size == 0:
        return U
    frac = np.cumsum(var) / var.sum()
    k = int(np.searchsorted(frac, keep * (1.0 - 1e-12))) + 1
    return U[:, : min(k, var.size)]


def _cca(Qx: np.ndarray, Qy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical correlations (descending) and X-side rotation for orthonormal bases.

    With Qx, Qy orthonormal bases of the centred column spaces, the canonical
    correlations are the singular values of QxᵀQy (Björck & Golub 1973, "Numerical
    methods for computing angles between linear subspaces"), and the X canonical
    variates are Qx·Ux.
    """
    if Qx.shape[1] == 0 or Qy.shape[1] == 0:
        return np.zeros(0), np.zeros((Qx.shape[1], 0))
    Ux, rho, _ = np.linalg.svd(Qx.T @ Qy, full_matrices=False)
    return np.clip(rho, 0.0, 1.0), Ux


def cca(X: npt.ArrayLike, Y: npt.ArrayLike) -> np.ndarray:
    """Canonical correlations between X (n×p1) and Y (n×p2), descending, min(r1, r2) of them.

    Hotelling 1936 ("Relations between two sets of variates"), computed stably as
    the cosines of the principal angles between the centred column spaces
    (Björck & Golub 1973).  Each side is truncated to its numerical rank r, so
    rank-deficient inputs (e.g. n < p, where centring leaves rank ≤ n−1) are
    handled; note that when r1 + r2 > n − 1 the two subspaces must intersect and
    some correlations are trivially 1.
    """
    X, Y = _feature_pair(X, Y, min_n=2)
    return _cca(_feature_basis(X)[0], _feature_basis(Y)[0])[0]


def _check_keep(keep_variance: float) -> float:
    keep = float(keep_variance)
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep_variance must be in (0, 1], got {keep_variance!r}")
    return keep


def _svcca_from_bases(
    Ux: np.ndarray, sx: np.ndarray, Uy: np.ndarray, sy: np.ndarray, keep: float
) -> dict:
    Qx, Qy = _keep_variance(Ux, sx, keep), _keep_variance(Uy, sy, keep)
    rho, _ = _cca(Qx, Qy)
    mean = float(rho.mean()) if rho.size else float("nan")
    return {"mean": mean, "correlations": rho, "dims": (Qx.shape[1], Qy.shape[1])}


def svcca(X: npt.ArrayLike, Y: npt.ArrayLike, keep_variance: float = 0.99) -> dict:
    """SVCCA (Raghu, Gilmer, Yosinski & Sohl-Dickstein 2017, "SVCCA: Singular Vector
    Canonical Correlation Analysis for Deep Learning Dynamics and Interpretability").

    Centre each feature matrix, take its SVD, keep the fewest leading singular
    directions whose variance (σ²) reaches ``keep_variance`` of the total, then run
    CCA (:func:`cca`) between the two reduced sets.  Returns ``{"mean": mean
    canonical correlation, "correlations": descending array, "dims": (k1, k2)}``;
    ``mean`` is ``nan`` for a constant representation.

    Invariant to orthogonal transforms and isotropic scaling; invariant to any
    invertible linear transform only with ``keep_variance=1`` (the truncation
    step depends on the spectrum), cf. Kornblith et al. 2019.
    """
    keep = _check_keep(keep_variance)
    X, Y = _feature_pair(X, Y, min_n=2)
    Ux, sx = _feature_basis(X)
    Uy, sy = _feature_basis(Y)
    return _svcca_from_bases(Ux, sx, Uy, sy, keep)


def svcca_gram(K: npt.ArrayLike, L: npt.ArrayLike, keep_variance: float = 0.99) -> dict:
    """SVCCA (Raghu et al. 2017) from raw Grams K = X Xᵀ, L = Y Yᵀ; same as :func:`svcca`.

    Exact because the left singular vectors and σ² of the centred features are
    the eigenvectors and eigenvalues of H K H; eigenvalues below n·eps·λ_max are
    treated as zero.
    """
    keep = _check_keep(keep_variance)
    K, L = _gram_pair(K, L, min_n=2)
    Ux, sx = _gram_basis(K)
    Uy, sy = _gram_basis(L)
    return _svcca_from_bases(Ux, sx, Uy, sy, keep)


def pwcca(X: npt.ArrayLike, Y: npt.ArrayLike) -> float:
    """Projection-weighted CCA (Morcos, Raghu & Bengio 2018, "Insights on representational
    similarity in neural networks with canonical correlation", NeurIPS, eq. 3-4).

    ``ρ̄ = Σ_i α_i ρ_i / Σ_i α_i`` with ``α_i = Σ_j |⟨h_i, x_j⟩|``: h_i is the i-th
    canonical variate of X (unit norm, over stimuli) and x_j the j-th centred
    column (neuron) of X.  Asymmetric: weights come from X, so swap the arguments
    to weight by Y (the authors' code uses the layer with fewer neurons).  CCA is
    computed on numerical-rank orthonormal bases (see :func:`cca`).  Needs
    features: the weights depend on individual neurons, which a Gram does not keep.
    """
    X, Y = _feature_pair(X, Y, min_n=2)
    return _pwcca_from_bases(X, _feature_basis(X)[0], _feature_basis(Y)[0])


def _pwcca_from_bases(X: np.ndarray, Qx: np.ndarray, Qy: np.ndarray, unit_map: np.ndarray | None = None) -> float:
    """:func:`pwcca` from X and the orthonormal bases of both centred column spaces.

    PWCCA weighs each canonical direction by its summed |correlation| with X's *units*, so
    it changes when X's columns are rotated. ``unit_map`` (k × units) maps X's columns back
    to the units they combine (X·unit_map are the unit activations); without it X's own
    columns are the units.
    """
    rho, Ux = _cca(Qx, Qy)
    if rho.size == 0:
        return float("nan")
    H = Qx @ Ux  # n × m canonical variates of X, orthonormal
    C = H.T @ _center_columns(X)  # m × k
    if unit_map is None:
        alpha = np.abs(C).sum(axis=1)
    else:
        alpha = np.zeros(C.shape[0])
        step = max(1, (1 << 24) // max(1, C.shape[0]))  # ≤ 128 MiB of float64 per block of units
        for start in range(0, unit_map.shape[1], step):
            alpha += np.abs(C @ unit_map[:, start : start + step]).sum(axis=1)
    return float(alpha @ rho / alpha.sum())


# --------------------------------------------------------------------------- Procrustes


def _nuclear_procrustes(Fx: np.ndarray, Fy: np.ndarray, X: np.ndarray, Y: np.ndarray) -> float:
    if _is_zero(Fx, X) or _is_zero(Fy, Y):
        return float("nan")
    nx, ny = float(np.linalg.norm(Fx)), float(np.linalg.norm(Fy))
    nuc = float(np.linalg.svd(Fx.T @ Fy, compute_uv=False).sum()) / (nx * ny)
    return max(0.0, 2.0 - 2.0 * nuc)


def _compress(Xc: np.ndarray) -> np.ndarray:
    """An n×min(n,p) matrix with the same Gram as Xc (orthogonal change of features)."""
    n, p = Xc.shape
    if p <= n:
        return Xc
    U, s, _ = np.linalg.svd(Xc, full_matrices=False)
    return U * s


def procrustes_distance(X: npt.ArrayLike, Y: npt.ArrayLike) -> float:
    """Orthogonal Procrustes distance (Ding, Denain & Steinhardt 2021, "Grounding
    Representation Similarity with Statistical Testing", NeurIPS; Williams et al. 2021).

    Centre the columns, scale each matrix to unit Frobenius norm, then::

        d = min_Q ‖X − Y Q‖²_F = 2 − 2 ‖XᵀY‖_*   (Q orthogonal, ‖·‖_* nuclear norm)

    ``d`` ∈ [0, 2], 0 iff Y is a rotated/reflected (and scaled) copy of X; lower
    means more similar; symmetric.  p1 ≠ p2 is fine (equivalent to zero-padding the
    narrower matrix).  ``nan`` for a constant representation.
    """
    X, Y = _feature_pair(X, Y, min_n=2)
    Xc, Yc = _center_columns(X), _center_columns(Y)
    return _nuclear_procrustes(_compress(Xc), _compress(Yc), X, Y)


def _features_from_gram(K: np.ndarray) -> np.ndarray:
    # Dropping eigenvalues below the numerical rank keeps their round-off
    # (each ~sqrt(eps)·σ_max after the square root) out of the nuclear norm.
    U, s = _gram_basis(K)
    return U * s


def procrustes_distance_gram(K: npt.ArrayLike, L: npt.ArrayLike) -> float:
    """Orthogonal Procrustes distance (Ding et al. 2021) from raw Grams K = X Xᵀ, L = Y Yᵀ.

    ‖XᵀY‖_* is invariant to orthogonal changes of features, so features with the
    same centred Gram, F = V·Λ^{1/2} from H K H = V Λ Vᵀ (numerical rank), give the exact
    value; this
    is the Bures/fidelity form ‖XᵀY‖_* = tr((K^{1/2} L K^{1/2})^{1/2}) of Harvey,
    Larsen & Williams 2023 ("Duality of Bures and Shape Distances with Implications
    for Comparing Neural Representations").  Directions with σ below ~sqrt(n·eps)·σ_max
    are lost to the eigendecomposition; otherwise it agrees with
    :func:`procrustes_distance` to ~1e-10.  Cost O(n³).
    """
    K, L = _gram_pair(K, L, min_n=2)
    return _nuclear_procrustes(_features_from_gram(K), _features_from_gram(L), K, L)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Measure:
    """A registered similarity measure.

    ``kind`` says what ``fn`` takes: ``"gram"`` → ``fn(K, L)`` with raw n×n Grams,
    ``"features"`` → ``fn(X, Y)`` with n×p matrices.  A Gram measure can be applied
    to features as ``fn(X @ X.T, Y @ Y.T)``.
    """

    name: str
    kind: Literal["gram", "features"]
    higher_is_more_similar: bool
    fn: Callable[[np.ndarray, np.ndarray], float]
    description: str

    @property
    def gram_based(self) -> bool:
        return self.kind == "gram"


def _rsa_measure(method: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def fn(K: np.ndarray, L: np.ndarray) -> float:
        return rsa_gram(K, L, method)

    return fn


MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure("cka", "gram", True, lambda K, L: linear_cka_gram(K, L),
                "linear CKA, biased HSIC (Kornblith et al. 2019); 1 = same up to rotation/scale"),
        Measure("cka_debiased", "gram", True, lambda K, L: linear_cka_gram(K, L, debiased=True),
                "linear CKA, unbiased HSIC (Song et al. 2012; Nguyen et al. 2021); ~0 if unrelated"),
        Measure("rsa_spearman", "gram", True, _rsa_measure("spearman"),
                "Spearman correlation of cosine-distance RDMs (Kriegeskorte et al. 2008)"),
        Measure("rsa_pearson", "gram", True, _rsa_measure("pearson"),
                "Pearson correlation of cosine-distance RDMs (Kriegeskorte et al. 2008)"),
        Measure("rsa_kendall", "gram", True, _rsa_measure("kendall_tau_a"),
                "Kendall tau-a of cosine-distance RDMs (Nili et al. 2014)"),
        Measure("svcca", "gram", True, lambda K, L: svcca_gram(K, L)["mean"],
                "mean canonical correlation after keeping 99% variance (Raghu et al. 2017)"),
        Measure("pwcca", "features", True, pwcca,
                "projection-weighted mean canonical correlation, X weights (Morcos et al. 2018)"),
        Measure("procrustes", "gram", False, procrustes_distance_gram,
                "orthogonal Procrustes distance 2-2||X^T Y||_*, in [0, 2] (Ding et al. 2021)"),
    )
}
