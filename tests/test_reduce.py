from __future__ import annotations

import numpy as np
import pytest
import torch

from vecsim.errors import ConfigError, UnknownLayerError
from vecsim.reduce import CountSketch, LayerReducer, ReducerConfig, parse_dims

from conftest import cosine_matrix


def _data(n=40, d=300, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.normal(size=(n, 12)) @ rng.normal(size=(12, d))
    return torch.tensor(np.abs(low + 0.1 * rng.normal(size=(n, d))), dtype=torch.float32)


def _fit(x, **cfg):
    reducer = LayerReducer("l", (x.shape[1],), ReducerConfig(**{"sketch_dim": 0, **cfg}))
    z, norms, _, _ = reducer.prepare(x)
    reducer.fit(z)
    return reducer


def test_uncentred_projection_is_exact_when_dim_covers_the_training_sample():
    x = _data()
    reducer = _fit(x, dim=64)
    assert reducer.report.exact and reducer.dim == 40
    y = reducer(x)[0].numpy()
    np.testing.assert_allclose(y @ y.T, cosine_matrix(x.double().numpy()), atol=1e-5)


def test_a_new_vector_against_training_vectors_is_exact_when_the_projection_is():
    """Normalised before the projection, not after: once the training sample is spanned,
    P x̂ · P ŷ = cos(x, y) for any x and training y, though ‖P x̂‖ < 1 for a new x."""
    x = _data(n=30)
    reducer = _fit(x[:20], dim=64)
    assert reducer.report.exact
    y_train, y_new = reducer(x[:20])[0].numpy(), reducer(x[20:])[0].numpy()
    np.testing.assert_allclose(np.linalg.norm(y_train, axis=1), 1, atol=1e-5)
    assert np.linalg.norm(y_new, axis=1).max() < 0.999  # the new vectors stick out of the span
    np.testing.assert_allclose(y_new @ y_train.T, cosine_matrix(x.double().numpy())[20:, :20], atol=1e-5)


def test_truncated_projection_estimates_cosines_better_than_renormalising():
    """At dim < rank the stored inner products beat the same vectors renormalised (the
    per-stimulus 1/‖P x̂‖ factor inflates whoever the projection keeps least of)."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)  # a common direction, shared structure, unique parts of varying size
    common, shared = rng.normal(size=300), rng.normal(size=(8, 300))
    unique = rng.normal(size=(120, 300)) * rng.uniform(0.5, 2.0, size=(120, 1))
    x = torch.tensor(4 * common + rng.normal(size=(120, 8)) @ shared + unique, dtype=torch.float32)
    reducer = _fit(x, dim=24)
    y = reducer(x)[0].numpy().astype(np.float64)
    iu = np.triu_indices(len(x), 1)
    exact = cosine_matrix(x.double().numpy())[iu]
    renormed = y / np.linalg.norm(y, axis=1, keepdims=True)
    stored, other = (y @ y.T)[iu], (renormed @ renormed.T)[iu]
    assert np.abs(stored - exact).max() < 0.5 * np.abs(other - exact).max()
    assert spearmanr(exact, stored).statistic > spearmanr(exact, other).statistic


def test_uncentred_keeps_raw_cosines_better_than_centred_pca():
    from scipy.stats import spearmanr

    x = _data(n=200, d=300) + 3.0  # a large common mean: the case where centring hurts
    exact = cosine_matrix(x.double().numpy())[np.triu_indices(200, 1)]
    scores = {}
    for center in (False, True):
        y = _fit(x, dim=8, center=center)(x)[0].numpy()
        scores[center] = spearmanr(exact, (y @ y.T)[np.triu_indices(200, 1)])[0]
    assert scores[False] > scores[True] + 0.1, scores


def test_correlation_subtracts_each_vectors_own_mean():
    x = _data()
    y = _fit(x, dim=64, similarity="correlation")(x)[0].numpy()
    np.testing.assert_allclose(y @ y.T, np.corrcoef(x.double().numpy()), atol=1e-5)


def test_auto_dim_keeps_the_requested_energy():
    x = _data(n=100, d=50)
    reducer = _fit(x, dim=None, energy=0.9)
    spectrum = np.sort(np.linalg.svd(x.double().numpy(), compute_uv=False) ** 2)[::-1]
    cum = np.cumsum(spectrum) / spectrum.sum()
    assert reducer.dim == int(np.searchsorted(cum, 0.9) + 1)
    assert reducer.report.energy_kept >= 0.9


def test_zero_and_non_finite_rows():
    x = _data()
    reducer = _fit(x, dim=16)
    bad = x[:3].clone()
    bad[0] = 0
    bad[1, 5] = float("nan")
    vecs, norms, finite = reducer(bad)
    assert finite.tolist() == [True, False, True]
    assert torch.count_nonzero(vecs[0]) == 0 and norms[0] == 0
    assert torch.isfinite(vecs).all()


def test_save_and_load_give_the_same_vectors(tmp_path):
    x = _data()
    reducer = _fit(x, dim=10, center=True)
    reducer.save(tmp_path)
    again = LayerReducer.load("l", reducer.describe(), tmp_path)
    torch.testing.assert_close(again(x)[0], reducer(x)[0])


def test_count_sketch_is_unbiased_with_bounded_error():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(2, 20_000)), dtype=torch.float32)
    exact = float(x[0] @ x[1])
    estimates = []
    for seed in range(200):
        s = CountSketch(20_000, 512, seed)(x)
        estimates.append(float(s[0] @ s[1]))
    estimates = np.array(estimates)
    bound = np.sqrt(2 / 512) * float(x[0].norm() * x[1].norm())  # std bound of one estimate
    assert abs(estimates.mean() - exact) < 4 * bound / np.sqrt(len(estimates))
    assert estimates.std() <= bound


def test_reducer_config_and_dim_parsing_errors():
    assert parse_dims("a=8,16", ["a", "b"]) == {"a": 8, "b": 16}
    assert parse_dims("auto", ["a"]) == {"a": None}
    with pytest.raises(UnknownLayerError):
        parse_dims("c=8", ["a", "b"])
    with pytest.raises(ConfigError):
        parse_dims("many", ["a"])
    with pytest.raises(ConfigError):
        ReducerConfig(pooling="median").validate()


@pytest.mark.parametrize("cfg", [dict(similarity="correlation"), dict(sketch_dim=64), dict(drop_zero_units=True), {}])
def test_the_chain_never_writes_into_the_layer_output(cfg):
    """pool() may hand back a view of the model's tensor; nothing downstream may change it
    (the forward pass continues from it), not even zeroing a non-finite row."""
    out = torch.tensor(np.random.default_rng(1).normal(size=(5, 4, 6, 6)), dtype=torch.float32)
    out[2, 0, 0, 0] = float("nan")
    reducer = LayerReducer("l", (4, 6, 6), ReducerConfig(**{"sketch_dim": 0, "dim": 3, **cfg}))
    before = out.clone()
    x = reducer.pool(out)
    norms, finite = reducer.measure(x)
    z, _ = reducer.reduce_pooled(x, finite)
    assert not bool(finite[2]) and bool(torch.all(z[2] == 0))
    torch.testing.assert_close(out, before, equal_nan=True)


@pytest.mark.parametrize("n", [5, 128, 129, 300])
def test_add_gram_then_mirror_equals_the_full_product_and_is_symmetric(n):
    from vecsim.reduce import add_gram, mirror_upper

    gen = torch.Generator().manual_seed(n)
    z = torch.randn(n, 70, generator=gen, dtype=torch.float64)
    out = torch.full((n, n), 0.25, dtype=torch.float64)
    add_gram(out, z[:, :30])  # accumulated over column blocks, as the callers do
    add_gram(out, z[:, 30:])
    mirror_upper(out)
    torch.testing.assert_close(out, z @ z.T + 0.25, rtol=0, atol=1e-12)
    assert torch.equal(out, out.T)
    cols = torch.randn(70, n, generator=gen, dtype=torch.float64).T  # a transposed view, as for the d x d Gram
    out = torch.zeros(n, n, dtype=torch.float64)
    add_gram(out, cols)
    mirror_upper(out)
    torch.testing.assert_close(out, cols @ cols.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("on_device", [False, True])
def test_zero_rows_never_writes_its_input_and_copies_on_the_cpu_only_when_needed(on_device):
    from vecsim.reduce import zero_rows

    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    x[1, 2] = float("nan")
    keep = torch.tensor([True, False, True])
    before = x.clone()
    out, fresh = zero_rows(x, keep, on_device)
    assert fresh and out.data_ptr() != x.data_ptr()
    assert torch.equal(out[1], torch.zeros(4)) and torch.equal(out[[0, 2]], before[[0, 2]])
    assert torch.equal(torch.nan_to_num(x, nan=-1), torch.nan_to_num(before, nan=-1))  # input untouched
    out, fresh = zero_rows(x[[0, 2]], torch.tensor([True, True]), on_device)
    assert fresh == on_device  # the sync-free device path always copies; the CPU path not for a clean batch


@pytest.mark.parametrize("sketch_dim,center", [(0, False), (0, True), (64, False)])
def test_drop_zero_units_normalises_a_later_stimulus_by_its_whole_norm(sketch_dim, center):
    """Units zero for every training stimulus are dropped; a later stimulus with energy there
    is still normalised by its whole norm (as the training stimuli are), so its cosine with
    a training stimulus stays the raw one when the projection is exact (it was inflated by
    ‖y‖/‖y_kept‖ when the kept part alone was normalised)."""
    x = _data(n=30, d=300)
    x[:20, 250:] = 0.0  # zero in the training sample
    x[20:, 250:] *= 5.0  # much of the later stimuli's energy is there
    reducer = LayerReducer("l", (300,), ReducerConfig(sketch_dim=sketch_dim, drop_zero_units=True, dim=64,
                                                      center=center))
    z, _, _, share = reducer.prepare(x[:20])
    assert share is None
    reducer.fit(z)
    assert reducer.drop_zero_units() == 50
    train, later = reducer(x[:20])[0].double().numpy(), reducer(x[20:])[0].double().numpy()
    if center:  # centred PCA renormalises: the cosine of the later stimulus's centred unit vector,
        # projected on the centred training sample's span, with the training stimuli's
        unit = x.double().numpy() / np.linalg.norm(x.double().numpy(), axis=1, keepdims=True)
        c = unit[:, :250] - unit[:20, :250].mean(axis=0)
        basis = np.linalg.svd(c[:20], full_matrices=False)[2][:19]  # 20 centred vectors span 19 dims
        projected = c[20:] @ basis.T @ basis
        want = cosine_matrix(np.vstack([projected, c[:20]]))[:10, 10:]
        np.testing.assert_allclose(later @ train.T, want, atol=1e-5)
        return
    raw = cosine_matrix(x.double().numpy())[20:, :20]
    if sketch_dim:  # the sketch estimates; the whole-norm scaling is what the kept-part one missed
        got = later @ train.T
        assert np.abs(got - raw).mean() < 0.05
        kept_only = got / np.linalg.norm(x[20:, :250].double().numpy(), axis=1)[:, None] \
            * np.linalg.norm(x[20:].double().numpy(), axis=1)[:, None]
        assert np.abs(got - raw).mean() < 0.5 * np.abs(kept_only - raw).mean()
    else:
        np.testing.assert_allclose(later @ train.T, raw, atol=1e-5)


def test_row_norms_stay_accurate_on_millions_of_units():
    from vecsim.reduce import normalise_rows, row_norms

    x = torch.rand(2, 2_560_000, generator=torch.Generator().manual_seed(0))
    want = np.linalg.norm(x.double().numpy(), axis=1)
    np.testing.assert_allclose(row_norms(x).double().numpy(), want, rtol=5e-7)
    np.testing.assert_allclose(np.linalg.norm(normalise_rows(x).double().numpy(), axis=1), 1.0, rtol=5e-7)
    short = torch.rand(3, 100)
    np.testing.assert_allclose(row_norms(short).numpy(), np.linalg.norm(short.numpy(), axis=1), rtol=1e-6)
    gen = torch.Generator().manual_seed(1)
    for strided in (torch.rand(4, 600_000, generator=gen)[:, ::2], torch.rand(300_000, 4, generator=gen).T,
                    torch.rand(4, 600_000, generator=gen)[:, 1:300_001]):
        want = np.linalg.norm(strided.double().numpy(), axis=1)
        np.testing.assert_allclose(row_norms(strided).double().numpy(), want, rtol=5e-7)
    bad = x[:, :20000].clone()
    bad[1, 17000] = float("nan")
    assert torch.isfinite(row_norms(bad)).tolist() == [True, False]


def _spiked(n=150, d=4000, seed=5):
    """A common direction, 40 shared directions of falling weight, and a large part unique to
    each stimulus (in 4,000 dims nearly orthogonal to the others'): the shape of a wide CNN
    layer's activations on one stimulus set."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, 40)) * np.linspace(2.0, 0.3, 40) @ rng.normal(size=(40, d))
    x = 6 * rng.normal(size=d) + shared + 1.5 * rng.normal(size=(n, d)) * np.sqrt(d / 40)
    return torch.tensor(x / np.sqrt(d), dtype=torch.float32)


def test_in_sample_noise_is_the_off_diagonal_least_squares_delta():
    """δ_d from per-stimulus terms equals the minimiser of Σ_{i≠j} (T − δΠ)ᵢⱼ² computed on the
    n×n matrices, at every d; 0 once d reaches the sample's rank."""
    from vecsim.reduce import in_sample_noise

    x = _spiked(n=60, d=800)
    cos = cosine_matrix(x.double().numpy())
    evals, vecs = np.linalg.eigh(cos)
    evals, vecs = evals[::-1], vecs[:, ::-1]
    by_dim = in_sample_noise(vecs * np.sqrt(np.clip(evals, 0, None)), evals, evals.sum())
    off = ~np.eye(60, dtype=bool)
    for d in (1, 5, 30, 59):
        u = vecs[:, :d]
        t, pi = cos - (u * evals[:d]) @ u.T, np.eye(60) - u @ u.T
        want = (t[off] @ pi[off]) / (pi[off] @ pi[off])
        assert by_dim[d - 1] == pytest.approx(min(max(want, 0), evals[d - 1]), rel=1e-9, abs=1e-12)
    assert by_dim[-1] == 0


def test_training_vectors_shrunk_in_sample_keep_the_training_cosines_better():
    """When dim < the training sample's rank, the training stimuli's projections carry their
    own unique part inside the kept directions; shrinking them (``project_training``) brings
    the stored training cosines closer to the raw ones off the diagonal, in least squares (by
    construction) and in rank order. Other stimuli go through ``project`` unchanged."""
    from scipy.stats import spearmanr

    x = _spiked()
    reducer = _fit(x[:120], dim=64)
    assert not reducer.report.exact and reducer.report.in_sample_noise > 0
    z = reducer.prepare(x)[0]
    plain, shrunk = reducer.project(z[:120]).double().numpy(), reducer.project_training(z[:120]).double().numpy()
    scale = shrunk / np.where(plain == 0, 1, plain)
    np.testing.assert_allclose(scale, np.broadcast_to(reducer.in_sample.double().numpy(), scale.shape), rtol=1e-5)
    assert np.all(np.diff(reducer.in_sample.numpy()) <= 1e-7)  # the smaller a kept direction, the more it shrinks
    exact = cosine_matrix(x.double().numpy())
    iu = np.triu_indices(120, 1)
    err_plain, err_shrunk = (plain @ plain.T - exact[:120, :120])[iu], (shrunk @ shrunk.T - exact[:120, :120])[iu]
    assert np.sqrt(np.mean(err_shrunk**2)) < 0.5 * np.sqrt(np.mean(err_plain**2))
    rho = {name: spearmanr(exact[:120, :120][iu], (v @ v.T)[iu]).statistic for name, v in (("plain", plain), ("shrunk", shrunk))}
    assert rho["shrunk"] > rho["plain"] + 0.01
    # a new stimulus is projected as before: the training-side scale is the only change
    np.testing.assert_array_equal(reducer(x[120:])[0].numpy(), reducer.project(z[120:]).numpy())


def test_exact_and_centred_fits_do_not_shrink():
    x = _spiked(n=40, d=500)
    exact = _fit(x, dim=64)
    centred = _fit(x, dim=8, center=True)
    for reducer in (exact, centred):
        assert reducer.in_sample is None and reducer.report.in_sample_noise == 0
        z = reducer.prepare(x)[0]
        np.testing.assert_array_equal(reducer.project_training(z).numpy(), reducer.project(z).numpy())


def test_a_float16_unit_row_sample_fits_as_its_float32_original():
    """The pipeline holds a sketched layer's training sample as float16 unit rows (half the
    memory); the fit reads it block by block and gives the same projection to float16's
    rounding, far below the sketch's own error (about 1/√m = 0.044 here)."""
    from vecsim.reduce import held_dtype, normalise_rows

    x = _spiked(n=150, d=6000)
    config = ReducerConfig(dim=48, sketch_dim=512)
    full, half = LayerReducer("l", (6000,), config), LayerReducer("l", (6000,), config)
    assert held_dtype(full) == torch.float16 and held_dtype(_fit(x[:10], dim=4)) == torch.float32
    z = full.prepare(x)[0]
    full.fit(z[:120].clone())
    half.fit(normalise_rows(z[:120]).to(torch.float16))
    assert half.report.in_sample_noise == pytest.approx(full.report.in_sample_noise, rel=1e-3)
    for project in ("project", "project_training"):
        a, b = getattr(full, project)(z).double().numpy(), getattr(half, project)(z).double().numpy()
        assert np.abs(a @ a.T - b @ b.T).max() < 5e-4  # 1.5e-4 here
