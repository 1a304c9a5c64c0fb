"""Tests for vecsim.structure: effective rank, channel cosine, NNK and CW-NNK overlap."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from vecsim import structure as s
from vecsim.errors import ConfigError, DimensionMismatchError

# --------------------------------------------------------------------------- effective rank


@pytest.mark.parametrize("k", [1, 3, 17])
def test_effective_rank_of_k_equal_eigenvalues_is_k(k: int) -> None:
    lam = np.r_[np.full(k, 2.5), np.zeros(5), -1e-15]  # padding zeros and round-off negative
    np.random.default_rng(k).shuffle(lam)
    out = s.effective_rank(lam)
    assert out["participation_ratio"] == pytest.approx(k, rel=1e-12)
    assert out["entropy_rank"] == pytest.approx(k, rel=1e-12)
    assert out["n_positive"] == k and out["n"] == k + 6


def test_effective_rank_hand_values_and_degenerate_input() -> None:
    out = s.effective_rank([3.0, 1.0])
    assert out["participation_ratio"] == pytest.approx(16.0 / 10.0)
    p = np.array([0.75, 0.25])
    assert out["entropy_rank"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert s.effective_rank([0.0, -1e-17])["participation_ratio"] == 0.0
    with pytest.raises(DimensionMismatchError):
        s.effective_rank(np.ones((2, 2)))
    with pytest.raises(DimensionMismatchError):
        s.effective_rank([])


def test_dims_for_energy_exact_cases() -> None:
    lam = [2.0, 4.0, 1.0, 3.0, -1e-16]  # unsorted, total 10
    assert s.dims_for_energy(lam) == {0.9: 3, 0.95: 4, 0.99: 4}
    assert s.dims_for_energy(lam, fractions=(0.4, 0.7, 1.0)) == {0.4: 1, 0.7: 2, 1.0: 4}
    assert s.dims_for_energy(np.ones(10)) == {0.9: 9, 0.95: 10, 0.99: 10}
    assert s.dims_for_energy(np.zeros(3)) == {0.9: 0, 0.95: 0, 0.99: 0}
    with pytest.raises(ConfigError):
        s.dims_for_energy(lam, fractions=(0.0,))
    with pytest.raises(ConfigError):
        s.dims_for_energy(lam, fractions=(1.2,))


# --------------------------------------------------------------------------- channel cosine


def test_channel_similarity_hand_computed_with_dead_channel() -> None:
    # (2 stimuli, 3 channels, 2 cells); flattened: c0=[1,0,0,2], c1=[1,1,0,0], c2=0
    R = np.zeros((2, 3, 2))
    R[0, 0] = [1.0, 0.0]
    R[1, 0] = [0.0, 2.0]
    R[0, 1] = [1.0, 1.0]
    S = s.channel_similarity(R)
    expected = np.array(
        [
            [1.0, 1.0 / math.sqrt(10.0), 0.0],
            [1.0 / math.sqrt(10.0), 1.0, 0.0],
            [0.0, 0.0, 0.0],
        ]
    )
    assert np.allclose(S, expected, atol=1e-15)
    assert np.isfinite(S).all()
    assert s.dead_channels(R).tolist() == [False, False, True]


def test_channel_similarity_rejects_bad_shapes() -> None:
    with pytest.raises(DimensionMismatchError):
        s.channel_similarity(np.zeros((2, 3, 4, 5)))
    with pytest.raises(DimensionMismatchError):
        s.channel_similarity(np.zeros((0, 3, 4)))


# --------------------------------------------------------------------------- NNK


def _brute_force_nnk(F: np.ndarray, k: int) -> list[set[int]]:
    """Cosine-kernel NNK by enumerating every support set of the QP (exact for small k)."""
    U = F / np.linalg.norm(F, axis=1, keepdims=True)
    K = 0.5 + 0.5 * (U @ U.T)
    out = []
    for i in range(F.shape[0]):
        sim = K[i].copy()
        sim[i] = -np.inf
        cand = np.argsort(-sim, kind="stable")[:k]
        best, best_obj = (), 0.0
        for r in range(1, k + 1):
            for sub in itertools.combinations(cand, r):
                A, b = K[np.ix_(sub, sub)], K[list(sub), i]
                theta = np.linalg.solve(A, b)
                if np.all(theta > 0):
                    obj = 0.5 * theta @ A @ theta - b @ theta
                    if obj < best_obj - 1e-12:
                        best, best_obj = sub, obj
        out.append({int(j) for j in best})
    return out


def test_nnk_matches_brute_force_qp() -> None:
    F = np.abs(np.random.default_rng(0).normal(size=(40, 5)))
    got = s.nnk_neighbors(F, k=6)
    want = _brute_force_nnk(F, 6)
    assert [set(g.tolist()) for g in got] == want


def test_nnk_on_a_line_keeps_only_adjacent_points() -> None:
    x = np.arange(10.0)[:, None]
    got = s.nnk_neighbors(x, k=9, kernel="gaussian")
    assert [g.tolist() for g in got] == [[1]] + [[i - 1, i + 1] for i in range(1, 9)] + [[8]]


def test_nnk_zero_points_and_duplicates() -> None:
    F = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    got = s.nnk_neighbors(F, k=4)
    assert got[1].size == 0  # a zero vector has no cosine neighbours
    assert all(1 not in g for g in got)
    assert got[0].tolist() == [2] and got[2].tolist() == [0]  # exact copies link to each other only
    with pytest.raises(ConfigError):
        s.nnk_neighbors(F, k=0)
    with pytest.raises(ConfigError):
        s.nnk_neighbors(F, kernel="laplace")


# --------------------------------------------------------------------------- CW-NNK overlap


def _responses(seed: int = 0, n: int = 60, c: int = 6, g: int = 4) -> np.ndarray:
    return np.maximum(np.random.default_rng(seed).normal(size=(n, c, g)), 0.0)


@pytest.mark.parametrize("kernel", s.KERNELS)
def test_channel_overlap_identical_and_duplicate_channels(kernel: str) -> None:
    R = _responses()
    R[:, 3] = R[:, 1]  # duplicate channel
    O = s.channel_overlap(R, k=8, kernel=kernel)
    assert O.shape == (6, 6)
    assert np.allclose(np.diag(O), 1.0)
    assert O[1, 3] == pytest.approx(1.0) and O[3, 1] == pytest.approx(1.0)
    assert np.allclose(O, O.T)
    off = O[~np.eye(6, dtype=bool)]
    assert np.all((off >= 0.0) & (off <= 1.0))
    assert O[0, 2] < 0.5  # independent channels share few NNK neighbours


def test_channel_overlap_matches_per_channel_jaccard() -> None:
    R = _responses(seed=1, n=30, c=3, g=3)
    sets = [[set(a.tolist()) for a in s.nnk_neighbors(R[:, c], k=5)] for c in range(3)]
    O = s.channel_overlap(R, k=5)
    for a, b in itertools.combinations(range(3), 2):
        js = [len(x & y) / len(x | y) for x, y in zip(sets[a], sets[b]) if x | y]
        assert O[a, b] == pytest.approx(np.mean(js), abs=1e-12)


def test_dead_channel_has_zero_overlap_and_is_counted() -> None:
    R = _responses(seed=2)
    R[:, 4] = 0.0
    R[:, 5] = R[:, 0] * 3.0  # scaled copy: cosine 1, same NNK graph
    O = s.channel_overlap(R, k=8)
    assert np.all(O[4] == 0.0) and np.all(O[:, 4] == 0.0)
    summary = s.redundancy_summary(R, k=8)
    assert summary["n_dead"] == 1 and summary["dead_channels"] == [4]
    assert summary["n_pairs"] == 10  # pairs among the 5 live channels
    assert summary["frac_pairs_cosine_above"] == pytest.approx(0.1)
    assert 0.0 < summary["overlap_mean"] < 1.0 and 0.0 < summary["cosine_median"] < 1.0
    again = s.redundancy_summary(R, k=8, similarity=s.channel_similarity(R), overlap=O)
    assert again == summary


def test_redundancy_summary_with_one_live_channel() -> None:
    R = np.zeros((10, 2, 2))
    R[:, 0] = np.random.default_rng(3).random((10, 2))
    out = s.redundancy_summary(R, k=3)
    assert out["n_pairs"] == 0 and out["cosine_mean"] is None and out["overlap_mean"] is None



# 11 channel responses (one query, its 10 candidates) where the NNK pruning drops a candidate
# whose exact weight is 6.4e-5 and whose gradient then is only -7e-7
_NEAR_THRESHOLD = np.array([
    [0.527607, 0.026386, 0.086431, 0.724833, 0.435798, 0.091071, 0.455176, 0.343408, 0.710027, 0.136304, 0.305959, 0.266836, 0.73798, 0.315738, 0.031256, 0.477755],
    [0.646297, 0.075871, 0.123454, 0.736001, 0.352655, 0.180376, 0.467614, 0.272643, 0.731771, 0.095688, 0.296553, 0.135408, 0.731029, 0.263208, 0.007016, 0.344273],
    [0.615376, 0.023501, 0.099949, 0.742597, 0.496359, 0.07485, 0.216137, 0.331834, 0.687366, 0.11011, 0.302995, 0.197442, 0.738352, 0.279036, 0.009249, 0.414995],
    [0.655483, 0.094003, 0.097302, 0.742681, 0.381294, 0.104078, 0.431042, 0.297439, 0.705855, 0.117293, 0.317588, 0.122691, 0.741869, 0.376243, 0.000512, 0.278675],
    [0.611429, 0.071919, 0.088229, 0.715907, 0.356707, 0.013483, 0.28522, 0.236709, 0.570419, 0.096096, 0.213218, 0.115642, 0.760778, 0.246385, 0.011758, 0.367527],
    [0.453367, 0.025382, 0.121011, 0.654028, 0.388971, 0.20107, 0.582349, 0.233285, 0.601731, 0.206246, 0.376293, 0.139434, 0.709533, 0.19397, 0.009583, 0.354594],
    [0.667905, 0.028002, 0.087445, 0.628177, 0.319995, 0.138085, 0.618725, 0.300748, 0.613473, 0.085935, 0.272117, 0.298264, 0.734352, 0.162044, 0.104511, 0.512253],
    [0.564002, 0.038195, 0.045768, 0.531873, 0.342419, 0.253032, 0.325711, 0.210542, 0.616818, 0.14688, 0.295287, 0.300122, 0.733444, 0.202219, 0.082293, 0.526497],
    [0.701622, 0.059759, 0.17806, 0.76418, 0.40501, 0.238046, 0.458181, 0.248978, 0.559583, 0.13667, 0.360216, 0.151632, 0.749806, 0.23847, 0.004469, 0.385818],
    [0.725898, 0.006787, 0.034774, 0.650049, 0.534173, 0.079861, 0.322876, 0.271737, 0.607011, 0.110007, 0.226243, 0.332991, 0.696888, 0.140348, 0.065621, 0.502525],
    [0.554924, 0.037397, 0.115544, 0.726338, 0.336577, 0.170928, 0.465825, 0.247937, 0.434679, 0.106815, 0.303638, 0.146085, 0.718103, 0.125672, 0.001624, 0.38871]])


def test_nnk_keeps_an_edge_the_pruning_drops_near_the_threshold():
    from scipy.linalg import cholesky, solve_triangular
    from scipy.optimize import nnls

    F = _NEAR_THRESHOLD
    U = F / np.linalg.norm(F, axis=1, keepdims=True)
    K = 0.5 + 0.5 * np.clip(U @ U.T, -1, 1)
    A, b = K[1:, 1:] + 1e-8 * np.eye(10), K[0, 1:]
    R = cholesky(A, lower=False)
    theta = nnls(R, solve_triangular(R, b, trans="T"))[0]
    exact = sorted(int(j) + 1 for j in np.flatnonzero(theta > 1e-6))
    assert exact == [2, 3, 5, 6] and 1e-5 < theta[2] < 1e-4  # candidate 3: small but 60x the edge threshold
    assert s.nnk_neighbors(F, 10, "cosine")[0].tolist() == exact


def test_tied_candidates_are_the_lowest_indexed_whatever_else_the_row_holds():
    from vecsim.structure import _top_candidates

    rng = np.random.default_rng(0)

    def square(row0):  # row 0 under test; the other rows random, each with its own -inf diagonal
        M = rng.uniform(-1, 1, (len(row0), len(row0)))
        np.fill_diagonal(M, -np.inf)
        M[0] = row0
        return M

    row = np.array([-np.inf, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 7.0])
    idx, valid = _top_candidates(square(row), 4)
    assert idx[0].tolist() == [11, 1, 2, 3] and valid[0].all()
    for _ in range(50):  # the values above and below the tie do not change which tied ones are picked
        other = np.where(row == 1.0, 1.0, rng.uniform(-5, 0.5, row.shape))
        other[[1, 11]] = rng.uniform(2, 9, 2)
        other[0] = -np.inf
        assert sorted(_top_candidates(square(other), 4)[0][0].tolist()) == [1, 2, 3, 11]
    few = np.array([[-np.inf, 2.0, -np.inf, -np.inf], [1.0, -np.inf, -np.inf, -np.inf],
                    [3.0, 3.0, -np.inf, 3.0], [0.5, 0.5, 0.5, -np.inf]])
    idx, valid = _top_candidates(few, 2)
    assert idx.tolist() == [[1, 0], [0, 1], [0, 1], [0, 1]]  # padded with the lowest-indexed -inf
    assert valid.tolist() == [[True, False], [True, False], [True, True], [True, True]]
