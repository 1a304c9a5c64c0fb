"""Tests for vecsim.measures: CKA, RSA, SVCCA/PWCCA, Procrustes and the registry."""

from __future__ import annotations

import importlib
import itertools
import math

import numpy as np
import pytest
from scipy import stats
from scipy.linalg import orthogonal_procrustes
from scipy.spatial.distance import pdist, squareform

from vecsim import measures as m
from vecsim.errors import ConfigError, DimensionMismatchError


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _orthogonal(p: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(p, p)))
    return q * np.sign(np.diag(r))


def _related(n: int, p1: int, p2: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed)
    X = rng.normal(size=(n, p1))
    Y = np.tanh(X @ rng.normal(size=(p1, p2))) + 0.5 * rng.normal(size=(n, p2))
    return X, Y


def _song_hsic(K: np.ndarray, L: np.ndarray) -> float:
    """Unbiased HSIC of Song et al. 2012, eq. (5), written out literally."""
    n = K.shape[0]
    Kt, Lt = K.copy(), L.copy()
    np.fill_diagonal(Kt, 0.0)
    np.fill_diagonal(Lt, 0.0)
    one = np.ones(n)
    return (
        np.trace(Kt @ Lt)
        + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
        - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)
    ) / (n * (n - 3))


# --------------------------------------------------------------------------- CKA


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_self_is_one(debiased: bool) -> None:
    X = _rng().normal(size=(60, 12))
    assert m.linear_cka(X, X, debiased) == pytest.approx(1.0, abs=1e-12)
    assert m.linear_cka_gram(X @ X.T, X @ X.T, debiased) == pytest.approx(1.0, abs=1e-12)


def test_biased_cka_matches_hsic_trace_definition() -> None:
    X, Y = _related(50, 7, 9)
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H)  # noqa: E731
    expected = hsic(K, L) / math.sqrt(hsic(K, K) * hsic(L, L))
    assert m.linear_cka_gram(K, L) == pytest.approx(expected, rel=1e-12)


def test_debiased_cka_matches_song_estimator() -> None:
    X, Y = _related(40, 6, 8, seed=1)
    K, L = X @ X.T, Y @ Y.T
    expected = _song_hsic(K, L) / math.sqrt(_song_hsic(K, K) * _song_hsic(L, L))
    assert m.linear_cka_gram(K, L, debiased=True) == pytest.approx(expected, rel=1e-10)
    assert m.linear_cka(X, Y, debiased=True) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("p", [5, 80])  # feature route (p1+p2 < n) and Gram route
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_invariances_and_forms_agree(p: int, debiased: bool) -> None:
    rng = _rng(2)
    X, Y = _related(70, p, p + 3, seed=3)
    Y2 = 3.7 * Y @ _orthogonal(Y.shape[1], rng) + 11.0  # rotate, scale, shift
    X2 = 0.02 * X @ _orthogonal(X.shape[1], rng)
    ref = m.linear_cka(X, Y, debiased)
    assert 0.0 < abs(ref) < 1.0
    for A, B in [(X, Y2), (X2, Y), (X2, Y2)]:
        assert m.linear_cka(A, B, debiased) == pytest.approx(ref, abs=1e-10)
        assert m.linear_cka_gram(A @ A.T, B @ B.T, debiased) == pytest.approx(ref, abs=1e-9)


def test_debiased_cka_near_zero_for_independent_wide_data() -> None:
    rng = _rng(4)
    X, Y = rng.normal(size=(200, 500)), rng.normal(size=(200, 500))
    assert abs(m.linear_cka(X, Y, debiased=True)) < 0.05
    assert m.linear_cka(X, Y) > 0.2
    assert abs(m.linear_cka_gram(X @ X.T, Y @ Y.T, debiased=True)) < 0.05


def test_cka_input_errors_and_degenerate_cases() -> None:
    X = _rng().normal(size=(10, 3))
    with pytest.raises(DimensionMismatchError):
        m.linear_cka(X, X[:9])
    with pytest.raises(DimensionMismatchError):
        m.linear_cka_gram(X @ X.T, np.eye(9))
    with pytest.raises(DimensionMismatchError):
        m.linear_cka_gram(np.ones((3, 4)), np.ones((3, 4)))
    with pytest.raises(DimensionMismatchError):
        m.linear_cka(X[:3], X[:3], debiased=True)
    const = np.ones((10, 3))
    assert math.isnan(m.linear_cka(X, const))
    assert math.isnan(m.linear_cka_gram(X @ X.T, const @ const.T, debiased=True))


# --------------------------------------------------------------------------- RSA


def test_cosine_rdm_from_gram_matches_pdist_and_handles_zero_rows() -> None:
    X = _rng(5).normal(size=(8, 4))
    assert np.allclose(m.cosine_rdm_from_gram(X @ X.T), squareform(pdist(X, "cosine")), atol=1e-12)
    X[3] = 0.0
    rdm = m.cosine_rdm_from_gram(X @ X.T)
    assert np.isfinite(rdm).all()
    assert np.all(np.diag(rdm) == 0.0)
    others = np.delete(np.arange(8), 3)
    assert np.all(rdm[3, others] == 1.0) and np.all(rdm[others, 3] == 1.0)


def test_euclidean_rdm_from_gram_matches_pdist() -> None:
    X = _rng(6).normal(size=(9, 5))
    assert np.allclose(m.euclidean_rdm_from_gram(X @ X.T), squareform(pdist(X)), atol=1e-10)


@pytest.mark.parametrize("method", m.RSA_METHODS)
def test_rsa_identical_rdms_is_one(method: str) -> None:
    X = _rng(7).normal(size=(30, 6))
    rdm = m.cosine_rdm_from_gram(X @ X.T)
    assert m.rsa(rdm, rdm, method) == pytest.approx(1.0, abs=1e-12)
    assert m.rsa_gram(X @ X.T, X @ X.T, method) == pytest.approx(1.0, abs=1e-12)


def test_rsa_pearson_spearman_match_scipy() -> None:
    X, Y = _related(25, 5, 6, seed=8)
    a = m.rdm_upper(m.cosine_rdm_from_gram(X @ X.T))
    b = m.rdm_upper(m.cosine_rdm_from_gram(Y @ Y.T))
    assert a.size == 25 * 24 // 2
    assert m.rsa(a, b, "pearson") == pytest.approx(stats.pearsonr(a, b).statistic, abs=1e-12)
    assert m.rsa(a, b, "spearman") == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def _tau_a_brute(a: np.ndarray, b: np.ndarray) -> float:
    pairs = itertools.combinations(range(a.size), 2)
    s = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(s) / (a.size * (a.size - 1) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kendall_tau_a_matches_brute_force_with_ties(seed: int) -> None:
    rng = _rng(seed)
    a = rng.integers(0, 6, size=70).astype(float)  # many ties in both
    b = a + rng.integers(-3, 4, size=70)
    assert m.kendall_tau_a(a, b) == pytest.approx(_tau_a_brute(a, b), abs=1e-12)
    c = rng.normal(size=70)
    assert m.kendall_tau_a(c, -c) == pytest.approx(-1.0, abs=1e-12)
    assert m.kendall_tau_a(np.ones(10), c[:10]) == 0.0


def test_rsa_matches_rsatoolbox() -> None:
    rsa_rdm = pytest.importorskip("rsatoolbox.rdm")
    compare = importlib.import_module("rsatoolbox.rdm.compare")
    rng = _rng(3)
    a = rng.integers(0, 7, size=300).astype(float)
    b = a + rng.integers(-4, 5, size=300)
    ra, rb = rsa_rdm.RDMs(a[None]), rsa_rdm.RDMs(b[None])
    tau = float(compare.compare_kendall_tau_a(ra, rb)[0, 0])
    assert m.rsa(a, b, "kendall_tau_a") == pytest.approx(tau, abs=1e-12)
    rho = float(compare.compare_spearman(ra, rb)[0, 0])
    r = float(compare.compare_correlation(ra, rb)[0, 0])
    assert m.rsa(a, b, "spearman") == pytest.approx(rho, abs=1e-10)
    assert m.rsa(a, b, "pearson") == pytest.approx(r, abs=1e-10)


def test_rsa_errors() -> None:
    rdm = np.zeros((4, 4))
    with pytest.raises(ConfigError):
        m.rsa(rdm, rdm, "cosine")
    with pytest.raises(DimensionMismatchError):
        m.rsa(rdm, np.zeros((5, 5)))
    with pytest.raises(DimensionMismatchError):
        m.rsa(np.zeros((4, 3)), np.zeros((4, 3)))


# --------------------------------------------------------------------------- CCA family


def test_svcca_pwcca_invariant_to_invertible_transform() -> None:
    rng = _rng(9)
    X = rng.normal(size=(200, 20))
    A = rng.normal(size=(20, 20)) + 3.0 * np.eye(20)
    assert abs(np.linalg.det(A)) > 1e-3
    res = m.svcca(X, X @ A, keep_variance=1.0)
    assert res["mean"] == pytest.approx(1.0, abs=1e-6)
    assert res["dims"] == (20, 20)
    assert m.pwcca(X, X @ A) == pytest.approx(1.0, abs=1e-6)
    assert m.pwcca(X @ A, X) == pytest.approx(1.0, abs=1e-6)


def test_svcca_default_truncation_invariant_to_rotation_and_scale() -> None:
    rng = _rng(10)
    X = rng.normal(size=(150, 12)) * np.linspace(3.0, 0.01, 12)  # some directions dropped at 99%
    Y = 5.0 * X @ _orthogonal(12, rng)
    res = m.svcca(X, Y)
    assert res["dims"][0] < 12 and res["dims"][0] == res["dims"][1]
    assert res["mean"] == pytest.approx(1.0, abs=1e-6)


def test_cca_family_below_one_for_independent_data() -> None:
    rng = _rng(11)
    X, Y = rng.normal(size=(300, 10)), rng.normal(size=(300, 15))
    res = m.svcca(X, Y)
    assert 0.0 < res["mean"] < 0.5
    assert np.all(np.diff(res["correlations"]) <= 1e-12)
    assert 0.0 < m.pwcca(X, Y) < 0.5


def test_svcca_gram_matches_features() -> None:
    X, Y = _related(80, 9, 14, seed=12)
    for keep in (0.9, 0.99, 1.0):
        a, b = m.svcca(X, Y, keep), m.svcca_gram(X @ X.T, Y @ Y.T, keep)
        assert a["dims"] == b["dims"]
        assert np.allclose(a["correlations"], b["correlations"], atol=1e-8)


def test_cca_rank_handling_when_n_below_p() -> None:
    rng = _rng(13)
    X, Y = rng.normal(size=(20, 50)), rng.normal(size=(20, 3))
    rho = m.cca(X, Y)
    assert rho.size == 3 and np.isfinite(rho).all()
    # Centred X spans all 19 centred directions, so it contains Y's span.
    assert np.allclose(rho, 1.0, atol=1e-8)
    low = rng.normal(size=(20, 4)) @ rng.normal(size=(4, 50))  # rank 4
    assert m.cca(low, rng.normal(size=(20, 30))).size == 4
    assert np.isfinite(m.pwcca(low, Y)) and np.isfinite(m.svcca(X, low)["mean"])


def test_svcca_rejects_bad_keep_variance() -> None:
    X = _rng().normal(size=(10, 3))
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError):
            m.svcca(X, X, bad)


# --------------------------------------------------------------------------- Procrustes


def test_procrustes_zero_for_rotated_scaled_copy() -> None:
    rng = _rng(14)
    X = rng.normal(size=(50, 8))
    Y = 2.5 * X @ _orthogonal(8, rng) - 4.0
    assert m.procrustes_distance(X, Y) == pytest.approx(0.0, abs=1e-10)
    assert m.procrustes_distance_gram(X @ X.T, Y @ Y.T) == pytest.approx(0.0, abs=1e-8)


def test_procrustes_matches_explicit_minimisation_and_is_symmetric() -> None:
    X, Y = _related(60, 7, 7, seed=15)
    Xn = X - X.mean(0)
    Yn = Y - Y.mean(0)
    Xn, Yn = Xn / np.linalg.norm(Xn), Yn / np.linalg.norm(Yn)
    R, _ = orthogonal_procrustes(Yn, Xn)
    expected = np.linalg.norm(Xn - Yn @ R) ** 2
    d = m.procrustes_distance(X, Y)
    assert d == pytest.approx(expected, abs=1e-10)
    assert 0.0 < d < 2.0
    assert m.procrustes_distance(Y, X) == pytest.approx(d, abs=1e-12)


def test_procrustes_unequal_widths_and_gram_form() -> None:
    X, Y = _related(40, 5, 60, seed=16)  # p2 > n exercises the compression path
    d = m.procrustes_distance(X, Y)
    padded = np.hstack([X, np.zeros((40, 55))])
    assert d == pytest.approx(m.procrustes_distance(padded, Y), abs=1e-10)
    assert m.procrustes_distance_gram(X @ X.T, Y @ Y.T) == pytest.approx(d, abs=1e-8)
    assert m.procrustes_distance(X, _rng(1).normal(size=(40, 5))) > 0.1


# --------------------------------------------------------------------------- registry


def test_registry_entries_are_callable_and_consistent() -> None:
    expected = {
        "cka", "cka_debiased", "rsa_spearman", "rsa_pearson",
        "rsa_kendall", "svcca", "pwcca", "procrustes",
    }
    assert set(m.MEASURES) == expected
    X, Y = _related(40, 6, 9, seed=17)
    for name, meas in m.MEASURES.items():
        assert meas.name == name and meas.kind in ("gram", "features") and meas.description
        args = (X @ X.T, Y @ Y.T) if meas.gram_based else (X, Y)
        value = meas.fn(*args)
        assert isinstance(value, float) and math.isfinite(value)
        self_args = (args[0], args[0])
        best = 1.0 if meas.higher_is_more_similar else 0.0
        assert meas.fn(*self_args) == pytest.approx(best, abs=1e-8)
    assert m.MEASURES["procrustes"].higher_is_more_similar is False
    assert m.MEASURES["cka"].fn(X @ X.T, Y @ Y.T) == pytest.approx(m.linear_cka(X, Y), abs=1e-12)
