"""compare / prune / spectrum / channels: library results checked against direct computations, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import vecsim
from vecsim.compare import EXACT, STORED, channel_redundancy, compare_stores, prune_checkpoint, store_spectra
from vecsim.errors import ConfigError, OutputExistsError, StimulusSetError, StoreError
from vecsim.measures import MEASURES, linear_cka, rsa
from vecsim.store import Store
from vecsim.structure import dims_for_energy, effective_rank

from conftest import cosine_matrix, make_image_set, raw_features

LAYERS = ["features.relu3", "features.relu4", "pool", "classifier"]
SIMILAR_IS_ONE = ["cka", "cka_debiased", "rsa_spearman", "rsa_pearson", "rsa_kendall", "svcca", "pwcca"]


def _index(source, out, layers=LAYERS, **kw):
    kw.setdefault("dim", "16")
    vecsim.index_stimuli(source=str(source), model="digits-cnn", layers=layers, out=str(out),
                         batch_size=8, progress=False, **kw)
    return out


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vecsim", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def _no_nan_json(text: str):
    def refuse(name):
        raise AssertionError(f"JSON holds {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def stores(shared_image_set, tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    full = _index(shared_image_set, base / "full")
    no_eval = _index(shared_image_set, base / "no_eval", layers=["features.relu4", "pool"], eval_size=0)
    # 15 of the 18 images plus 2 new ones, in another folder: other paths and ids, same bytes for 15
    partial_src = base / "partial_src"
    files = sorted(p.relative_to(shared_image_set) for p in shared_image_set.rglob("*") if p.is_file())
    for rel in files[3:]:
        (partial_src / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_image_set / rel, partial_src / rel)
    make_image_set(partial_src / "new", per_class=1, classes=("fox", "emu"), seed=7)
    partial = _index(partial_src, base / "partial", layers=["features.relu4", "pool"])
    other = _index(make_image_set(base / "other_src", seed=3), base / "other", layers=["pool"])
    return {"full": full, "no_eval": no_eval, "partial": partial, "other": other, "source": shared_image_set}


# -- compare -----------------------------------------------------------------------------

def test_store_with_itself_has_identity_diagonal_and_records_sources(stores):
    result = compare_stores(stores["full"], measures="all")
    assert result.measures == list(MEASURES)
    assert result.matching.matched == 18 and result.matching.unmatched_a == 0 == result.matching.unmatched_b
    for measure in result.measures:
        M = result.matrix(measure)
        assert M.shape == (4, 4)
        expected = 0.0 if measure == "procrustes" else 1.0
        np.testing.assert_allclose(np.diag(M), expected, atol=1e-6, err_msg=measure)
        if measure != "pwcca":
            np.testing.assert_allclose(M, M.T, atol=1e-12, err_msg=measure)
    for cell in result.cells:
        assert cell["n"] == 18
        assert cell["source"] == (STORED if cell["measure"] == "pwcca" else EXACT)
    text = result.format()
    assert "exact-gram, n=18" in text and "stored-vectors, n=18" in text and "unmatched: 0" in text


def test_exact_gram_cka_and_rsa_equal_those_of_raw_activations(stores):
    store = Store.open(stores["full"])
    result = compare_stores(store, measures=["cka", "rsa_pearson"], layers_a=["features.relu3"], layers_b=["pool"])
    paths = dict(zip(store.stimuli().column("id").to_pylist(), store.stimuli().column("path").to_pylist()))
    ids = np.sort(store.eval_subset("features.relu3")["ids"])
    rel = [paths[i] for i in ids]
    raw3 = raw_features("digits-cnn", stores["source"], rel, "features.relu3", weights="DEFAULT")
    for layer in ("pool",):
        raw = raw_features("digits-cnn", stores["source"], rel, layer, weights="DEFAULT")
        cell = result.cell("cka", "features.relu3", layer)
        assert cell["source"] == EXACT and cell["n"] == len(ids) == 18
        assert cell["value"] == pytest.approx(linear_cka(raw3, raw), abs=2e-3)
        rdm3, rdm = 1 - cosine_matrix(raw3), 1 - cosine_matrix(raw)
        assert result.value("rsa_pearson", "features.relu3", layer) == pytest.approx(rsa(rdm3, rdm, "pearson"), abs=2e-3)


def test_grid_values_equal_the_registered_measures_on_the_subset_grams(stores):
    store = Store.open(stores["full"])
    names = ["cka_debiased", "rsa_kendall", "svcca", "procrustes"]
    result = compare_stores(store, measures=names, layers_a=["features.relu3", "pool"], layers_b=["features.relu4"])
    grams = {}
    for layer in ("features.relu3", "features.relu4", "pool"):
        ev = store.eval_subset(layer)
        order = np.argsort(ev["ids"])
        grams[layer] = ev["gram"][np.ix_(order, order)]
    for measure in names:
        for layer in ("features.relu3", "pool"):
            expected = MEASURES[measure].fn(grams[layer], grams["features.relu4"])
            assert result.value(measure, layer, "features.relu4") == pytest.approx(expected, abs=1e-12), measure
    stored = compare_stores(store, measures="cka", source="stored-vectors")
    assert {c["source"] for c in stored.cells} == {STORED}


def test_without_eval_subset_gram_measures_use_rescaled_stored_vectors(stores):
    store = Store.open(stores["no_eval"])
    result = compare_stores(store, measures=["cka", "rsa_spearman", "procrustes"])
    assert {c["source"] for c in result.cells} == {STORED}
    feats = {}
    for layer in store.layers:
        _, vecs = store.vectors(layer)
        _, norms = store.raw_norms(layer)
        feats[layer] = vecs.astype(np.float64) * norms[:, None]
    assert result.value("cka", "features.relu4", "pool") == pytest.approx(
        linear_cka(feats["features.relu4"], feats["pool"]), abs=1e-12)
    # RSA on the stored cosine estimates (inner products of the stored vectors), not on the
    # stored vectors renormalised
    rdms = {}
    for layer in ("features.relu4", "pool"):
        _, vecs = store.vectors(layer)
        cos = vecs.astype(np.float64) @ vecs.T.astype(np.float64)
        rdms[layer] = (1 - cos)[np.triu_indices(len(cos), 1)]
    from scipy.stats import spearmanr

    assert result.value("rsa_spearman", "features.relu4", "pool") == pytest.approx(
        spearmanr(rdms["features.relu4"], rdms["pool"]).statistic, abs=1e-9)
    with pytest.raises(StoreError, match="no evaluation subset"):
        compare_stores(store, measures="cka", source="exact-gram")
    # the same store with exact Grams: stored vectors approximate them
    exact = compare_stores(stores["full"], measures="cka", layers_a=["features.relu4"], layers_b=["pool"])
    assert result.value("cka", "features.relu4", "pool") == pytest.approx(
        exact.value("cka", "features.relu4", "pool"), abs=0.05)


def test_mixed_sources_are_shown_per_cell(stores, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stores["full"], copy)
    store = Store.open(copy)
    (store.layer_dir("pool") / "eval.npz").unlink()  # this layer falls back to its stored vectors
    result = compare_stores(copy, measures="cka", layers_a=["features.relu4", "pool"], layers_b=["features.relu4", "pool"])
    assert result.cell("cka", "features.relu4", "features.relu4")["source"] == EXACT
    cell = result.cell("cka", "features.relu4", "pool")
    assert cell["source"] == STORED and "no evaluation subset" in cell["note"]
    text = result.format()
    assert "E = exact-gram, S = stored-vectors" in text and "E18" in text and "S18" in text


def test_two_stores_are_matched_by_sha256_and_unmatched_counts_reported(stores):
    result = compare_stores(stores["full"], stores["partial"], measures=["cka", "pwcca"], pairs="matching",
                            layers_a=["features.relu4", "pool"])
    m = result.matching
    assert (m.matched, m.unmatched_a, m.unmatched_b, m.n_a, m.n_b) == (15, 3, 2, 18, 17)
    for layer in ("features.relu4", "pool"):
        cell = result.cell("cka", layer, layer)
        assert cell["source"] == EXACT and cell["n"] == 15
        assert cell["value"] == pytest.approx(1.0, abs=1e-3)  # same model, same images: aligned rows
        assert result.cell("pwcca", layer, layer)["n"] == 15
    assert "unmatched: 3 in A, 2 in B" in result.format()


def test_no_common_stimuli_is_an_error_naming_the_unmatched(stores):
    with pytest.raises(StimulusSetError, match=r"share 0 stimuli.*18 of A's 18 and 18 of B's 18"):
        compare_stores(stores["full"], stores["other"])
    with pytest.raises(ConfigError, match="did you mean"):
        compare_stores(stores["full"], measures="ckaa")


def test_compare_cli_writes_tables_and_heatmaps(stores, tmp_path):
    out = tmp_path / "cmp"
    result = run_cli("compare", stores["full"], "--measure", "cka,pwcca", "--layers-a", "features.relu4,pool",
                     "--out", out)
    assert result.returncode == 0, result.stderr
    assert "exact-gram" in result.stdout and "stored-vectors" in result.stdout
    for name in ("comparison.parquet", "comparison.csv", "comparison.json", "cka_matrix.csv", "cka.png", "pwcca.png"):
        assert (out / name).is_file(), name
    table = pq.read_table(out / "comparison.parquet")
    assert {"layer_a", "layer_b", "value", "source", "n"} <= set(table.column_names)
    assert table.num_rows == 2 * 2 * 4
    as_json = run_cli("compare", stores["full"], stores["partial"], "--measure", "all", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = _no_nan_json(as_json.stdout)
    assert data["matching"]["unmatched_a"] == 3 and data["matching"]["unmatched_b"] == 2
    bad = run_cli("compare", stores["full"], stores["other"])
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "do not match" in bad.stderr
    # an earlier comparison's folder is refused, or with --overwrite left holding this run's files only
    (out / "notes.txt").write_text("mine")
    again = run_cli("compare", stores["full"], "--measure", "cka", "--out", out)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    assert (out / "pwcca.png").is_file()
    again = run_cli("compare", stores["full"], "--measure", "cka", "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert not (out / "pwcca.png").exists() and not (out / "pwcca_matrix.csv").exists()
    assert (out / "cka.png").is_file() and (out / "notes.txt").read_text() == "mine"
    assert set(pq.read_table(out / "comparison.parquet").column("measure").to_pylist()) == {"cka"}


# -- prune -----------------------------------------------------------------------------------

def test_prune_cli_reaches_the_sparsity_and_its_checkpoint_indexes(stores, tmp_path):
    ckpt = tmp_path / "pruned.pt"
    result = run_cli("prune", "--model", "digits-cnn", "--amount", "0.5", "--out", ckpt)
    assert result.returncode == 0, result.stderr
    assert "overall" in result.stdout and "50.00%" in result.stdout
    state = torch.load(ckpt, weights_only=True)
    weights = [v for k, v in state.items() if k.endswith(".weight") and v.ndim in (2, 4)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.5 * sum(w.numel() for w in weights))
    again = run_cli("prune", "--model", "digits-cnn", "--amount", "0.5", "--out", ckpt)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    missing = run_cli("prune", "--model", "digits-cnn", "--amount", "0.5", "--out", tmp_path / "no" / "p.pt")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and not (tmp_path / "no").exists()
    out = tmp_path / "store"
    index = run_cli("index", stores["source"], "--model", "digits-cnn", "--checkpoint", ckpt,
                    "--layers", "features.relu4", "--out", out, "--dim", "8", "-q")
    assert index.returncode == 0, index.stderr
    store = Store.open(out)
    assert store.manifest["model"]["checkpoint"] == str(ckpt) and len(store.stimuli()) == 18


def test_prune_amount_zero_leaves_weights_unchanged_and_layerwise_prunes_each_layer(tmp_path):
    from vecsim.models import load_model

    original = load_model("digits-cnn").module.state_dict()
    report = prune_checkpoint("digits-cnn", tmp_path / "same.pt", 0.0)
    saved = torch.load(tmp_path / "same.pt", weights_only=True)
    assert report["pruned"] == 0 and saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in original)
    report = prune_checkpoint("digits-cnn", tmp_path / "lw.pt", 0.3, scope="layerwise")
    assert all(abs(r["sparsity"] - 0.3) < 0.01 for r in report["layers"].values())
    with pytest.raises(OutputExistsError):
        prune_checkpoint("digits-cnn", tmp_path / "lw.pt", 0.3)
    with pytest.raises(ConfigError):
        prune_checkpoint("digits-cnn", tmp_path / "x.pt", 1.5)
    with pytest.raises(ConfigError, match="scope"):
        prune_checkpoint("digits-cnn", tmp_path / "x.pt", 0.3, scope="rows")
    assert not (tmp_path / "x.pt").exists()
    # the same amounts as prune_model: a numpy scalar (from a sweep) is a number too
    report = prune_checkpoint("digits-cnn", tmp_path / "np.pt", np.float32(0.25))
    assert report["amount"] == pytest.approx(0.25) and abs(report["sparsity"] - 0.25) < 0.01


# -- spectrum --------------------------------------------------------------------------------

def test_spectrum_numbers_are_those_of_the_stored_spectrum(stores, tmp_path):
    store = Store.open(stores["full"])
    report = store_spectra(store)
    assert [r["layer"] for r in report.layers] == LAYERS
    for row in report.layers:
        lam = store.spectrum(row["layer"])
        er = effective_rank(lam)
        assert row["participation_ratio"] == pytest.approx(er["participation_ratio"])
        assert row["entropy_rank"] == pytest.approx(er["entropy_rank"])
        assert row["dims_for_energy"] == {str(f): k for f, k in dims_for_energy(lam).items()}
        assert row["matrix"] == "raw second moment" and row["n_train"] == 18
        centred = effective_rank(store.spectrum(row["layer"], centred=True))
        assert row["participation_ratio_centred"] == pytest.approx(centred["participation_ratio"])
        assert row["entropy_rank_centred"] == pytest.approx(centred["entropy_rank"])
    out = tmp_path / "spec"
    result = run_cli("spectrum", stores["full"], "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    data = _no_nan_json(result.stdout)
    assert data["layers"][0]["layer"] == "features.relu3"
    assert all((out / n).is_file() for n in ("spectrum.png", "spectrum.json", "spectrum.csv"))
    again = run_cli("spectrum", stores["full"], "--out", out)
    assert again.returncode == 2 and "already holds spectrum" in again.stderr
    assert run_cli("spectrum", stores["full"], "--out", out, "--overwrite").returncode == 0
    text = run_cli("spectrum", stores["full"]).stdout
    assert "second moment" in text and "n_train=18" in text and "forward-pass order" in text
    assert "PR cov" in text


def test_centred_spectrum_is_the_covariance_of_the_unit_rows():
    """An uncentred fit records the covariance spectrum beside its own, from the same Gram
    (n < d) or second moment (n > d): equal to numpy's eigenvalues of the centred rows."""
    from vecsim.reduce import LayerReducer, ReducerConfig

    rng = np.random.default_rng(0)
    for n, d in ((30, 50), (80, 12)):
        X = rng.standard_normal((n, d)).astype(np.float32) + 2.0  # a common direction, as after a ReLU
        reducer = LayerReducer("l", (d,), ReducerConfig(dim=4), device="cpu")
        report = reducer.fit(X.copy())
        Z = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
        Zc = Z - Z.mean(axis=0)
        want = np.sort(np.linalg.eigvalsh(Zc.T @ Zc))[::-1]
        got = np.asarray(report.spectrum_centred)
        k = min(n, d) - 1  # the centred rows span at most n - 1 directions
        np.testing.assert_allclose(got[:k], want[:k], rtol=1e-6, atol=1e-9)
        assert effective_rank(got)["participation_ratio"] > 3 * effective_rank(report.spectrum)["participation_ratio"]


def test_spectrum_follows_the_forward_pass_not_the_order_the_layers_were_listed(shared_image_set, tmp_path):
    listed = ["pool", "features.relu4", "features.relu1"]
    store = Store.open(_index(shared_image_set, tmp_path / "s", layers=listed, eval_size=0))
    assert [store.layer_info(layer)["depth"] for layer in listed] == [2, 1, 0]
    report = store_spectra(store)
    assert [(r["layer"], r["depth"]) for r in report.layers] == [("features.relu1", 0), ("features.relu4", 1),
                                                                   ("pool", 2)]
    # a store written before the depth was recorded: the listed order, and it says so
    manifest = json.loads((store.path / "vecsim.json").read_text())
    for entry in manifest["layers"].values():
        del entry["depth"]
    (store.path / "vecsim.json").write_text(json.dumps(manifest))
    old = store_spectra(Store.open(store.path))
    assert [r["layer"] for r in old.layers] == listed and "listed at indexing" in old.format()


# -- channels --------------------------------------------------------------------------------

def test_channel_matrices_and_summary(stores, tmp_path):
    report = channel_redundancy(stores["full"], "features.relu4", k=5)
    assert report.similarity.shape == (64, 64) == report.overlap.shape
    assert report.n_stimuli == 18 and report.grid_cells == 16
    assert report.summary["n_channels"] == 64 and report.summary["k"] == 5
    np.testing.assert_allclose(report.similarity, report.similarity.T)
    assert channel_redundancy(stores["full"], "pool").summary["kernel"] == "gaussian"  # 1×1 map: signs only
    with pytest.raises(ConfigError, match="not a .C, H, W. feature map"):
        channel_redundancy(stores["full"], "classifier")
    with pytest.raises(StoreError, match="no evaluation subset.*--eval-size > 0"):
        channel_redundancy(stores["no_eval"], "features.relu4")
    big_k = channel_redundancy(stores["full"], "features.relu4", k=100).summary
    assert big_k["k"] == 17 and big_k["k_requested"] == 100  # the 18 stimuli give 17 candidates each
    out = tmp_path / "ch"
    result = run_cli("channels", stores["full"], "--layer", "features.relu3", "--k", "5", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "CW-NNK overlap" in result.stdout
    for name in ("similarity.npy", "overlap.npy", "similarity.png", "overlap.png", "summary.json"):
        assert (out / f"features_relu3_{name}").is_file(), name
    assert np.load(out / "features_relu3_overlap.npy").shape == (64, 64)
    _no_nan_json((out / "features_relu3_summary.json").read_text())
    other = run_cli("channels", stores["full"], "--layer", "features.relu4", "--k", "5", "--out", out)
    assert other.returncode == 0, other.stderr  # another layer's files share the folder
    again = run_cli("channels", stores["full"], "--layer", "features.relu3", "--k", "5", "--out", out)
    assert again.returncode == 2 and "already holds features_relu3_" in again.stderr
    again = run_cli("channels", stores["full"], "--layer", "features.relu3", "--k", "5", "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr


def test_cca_measures_report_their_chance_level_and_flag_directions_that_fill_the_stimuli(tmp_path):
    """SVCCA/PWCCA with as many directions as stimuli are 1 by construction: the cell says so
    and its chance level (B's stimuli shuffled) shows it; with few directions, related layers
    score far above chance."""
    from vecsim.compare import DEGENERATE_CCA_NOTE
    from vecsim.store import store_from_vectors

    rng = np.random.default_rng(0)
    for n, dim, degenerate in ((300, 8, False), (30, 20, True)):
        a = rng.standard_normal((n, dim)).astype(np.float32)
        b = a @ np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)  # same space, rotated
        b += 0.05 * rng.standard_normal((n, dim)).astype(np.float32)
        unit = {k: v / np.linalg.norm(v, axis=1, keepdims=True) for k, v in (("a", a), ("b", b))}
        store = store_from_vectors(tmp_path / f"s{n}", unit)
        result = compare_stores(store, measures=["svcca", "pwcca"], layers_a=["a"], layers_b=["b"],
                                source="stored-vectors")
        for measure in ("svcca", "pwcca"):
            cell = result.cell(measure, "a", "b")
            assert cell["value"] > 0.95
            if degenerate:
                assert DEGENERATE_CCA_NOTE in cell["note"] and cell["chance"] > 0.5  # 11+ of 20 correlations are 1
            else:
                assert DEGENERATE_CCA_NOTE not in cell["note"] and cell["chance"] < 0.4
        assert "chance level" in result.format()
        result.save(tmp_path / f"out{n}")
        table = pq.read_table(tmp_path / f"out{n}" / "comparison.parquet").to_pylist()
        assert all((r["chance"] is None) == (r["measure"] not in ("svcca", "pwcca")) for r in table)


def test_exact_gram_procrustes_with_a_layer_of_fewer_units_than_stimuli_equals_the_raw_one(stores):
    """classifier has 10 units for 18 stimuli: its centred Gram has rank 9, and the float32
    rounding of the subset Gram must not add directions (it used to: off by ~5e-4)."""
    from vecsim.measures import procrustes_distance

    store = Store.open(stores["full"])
    result = compare_stores(store, measures="procrustes", layers_a=["features.relu3"], layers_b=["classifier"])
    cell = result.cell("procrustes", "features.relu3", "classifier")
    assert cell["source"] == EXACT and cell["n"] == 18
    paths = dict(zip(store.stimuli().column("id").to_pylist(), store.stimuli().column("path").to_pylist()))
    rel = [paths[i] for i in np.sort(store.eval_subset("classifier")["ids"])]
    raw = {layer: raw_features("digits-cnn", stores["source"], rel, layer, weights="DEFAULT")
           for layer in ("features.relu3", "classifier")}
    assert cell["value"] == pytest.approx(procrustes_distance(raw["features.relu3"], raw["classifier"]), abs=2e-5)


def test_stored_vectors_of_an_exact_correlation_store_give_the_row_centred_cka(shared_image_set, tmp_path):
    """A correlation store's raw_norm is the row-centred norm, so vector × norm is the
    row-centred activation, projected: exact here (dim 32 >= 18 stimuli)."""
    out = _index(shared_image_set, tmp_path / "corr", layers=["features.relu3", "classifier"], eval_size=0,
                 similarity="correlation", dim="32")
    store = Store.open(out)
    assert store.layer_info("classifier")["reducer"]["stored_norm"] == "row-centred"
    result = compare_stores(store, measures=["cka", "procrustes"], layers_a=["features.relu3"], layers_b=["classifier"])
    rel = store.stimuli().sort_by("id").column("path").to_pylist()
    raw = {}
    for layer in ("features.relu3", "classifier"):
        x = raw_features("digits-cnn", shared_image_set, rel, layer, weights="DEFAULT")
        raw[layer] = x - x.mean(axis=1, keepdims=True)
        _, norms = store.raw_norms(layer)
        np.testing.assert_allclose(norms, np.linalg.norm(raw[layer], axis=1), rtol=1e-5)
    from vecsim.measures import procrustes_distance

    cka = result.cell("cka", "features.relu3", "classifier")
    assert cka["source"] == STORED and "approximate" not in cka["note"]
    assert cka["value"] == pytest.approx(linear_cka(raw["features.relu3"], raw["classifier"]), abs=1e-5)
    assert result.value("procrustes", "features.relu3", "classifier") == pytest.approx(
        procrustes_distance(raw["features.relu3"], raw["classifier"]), abs=1e-5)


def test_stored_vectors_of_a_centred_store_are_not_passed_off_as_activations(shared_image_set, tmp_path):
    out = _index(shared_image_set, tmp_path / "ctr", layers=["features.relu3", "pool"], eval_size=0, center=True)
    result = compare_stores(out, measures=["cka", "rsa_spearman", "pwcca"])
    off = [c for c in result.cells if c["layer_a"] != c["layer_b"] or c["measure"] == "pwcca"]
    assert off and all(np.isnan(c["value"]) and "--center" in c["note"] for c in off)
    # a centred fit's spectrum is the covariance's: not written twice, read back as both
    store = Store.open(out)
    assert not (store.layer_dir("pool") / "spectrum_centred.npy").exists()
    np.testing.assert_array_equal(store.spectrum("pool", centred=True), store.spectrum("pool"))


def test_rsa_of_a_constant_rdm_is_nan_for_every_method():
    flat, other = np.ones((5, 5)) - np.eye(5), np.random.default_rng(0).random((5, 5))
    other = other + other.T
    np.fill_diagonal(other, 0)
    for method in ("spearman", "pearson", "kendall_tau_a"):
        assert np.isnan(rsa(flat, other, method)) and np.isnan(rsa(other, flat, method))
    assert rsa(other, other, "kendall_tau_a") == pytest.approx(1.0)


def test_a_subset_cut_by_the_memory_budget_is_named_as_the_reason(shared_image_set, tmp_path):
    store = _index(shared_image_set, tmp_path / "small", layers=["features.relu1"], eval_size=40, eval_memory=0.02)
    with pytest.raises(StoreError, match=r"the --eval-memory budget \(0.02 MB\) held \d+ of this layer's raw "
                                         r"vectors \(--eval-size 40\); re-index with a larger --eval-memory"):
        channel_redundancy(store, "features.relu1")


def test_exact_gram_bases_keep_small_real_directions_of_a_float32_gram():
    """A wide layer's centred Gram, summed in float32 like the evaluation subsets', with real
    eigenvalues down to 1e-5·λ_max: every one of them is kept (a cut at n·eps32·λ_max dropped
    those below 3.6e-5 and moved Procrustes by several percent), and Procrustes and SVCCA
    equal the float64 values; a layer with fewer units than stimuli keeps only its rank."""
    from vecsim.compare import eval_gram_basis
    from vecsim.measures import _nuclear_procrustes, _svcca_from_bases, procrustes_distance, svcca

    rng = np.random.default_rng(0)
    n, units = 300, 2000
    decay = np.logspace(0, -2.5, n)  # singular values: eigenvalues from 1 to 1e-5 of the largest
    basis = np.linalg.qr(rng.standard_normal((units, n)))[0]
    X = (np.linalg.qr(rng.standard_normal((n, n)))[0] * decay) @ basis.T  # singular values exactly decay
    Y = X @ np.linalg.qr(rng.standard_normal((units, units)))[0][:, :units] + 0.01 * rng.standard_normal((n, units))
    grams = [(Z.astype(np.float32) @ Z.astype(np.float32).T).astype(np.float64) for Z in (X, Y)]
    (Ux, sx), (Uy, sy) = (eval_gram_basis(G, units) for G in grams)
    assert Ux.shape[1] == n - 1  # every centred direction of X is real
    got = _nuclear_procrustes(Ux * sx, Uy * sy, *grams)
    assert got == pytest.approx(procrustes_distance(X, Y), rel=1e-3)
    narrow = rng.standard_normal((n, 10)) @ rng.standard_normal((10, 10))
    G = (narrow.astype(np.float32) @ narrow.astype(np.float32).T).astype(np.float64)
    assert eval_gram_basis(G, 10)[0].shape[1] == 10
    got_svcca = _svcca_from_bases(Ux, sx, Uy, sy, 0.99)["mean"]  # the bases compare uses
    assert got_svcca == pytest.approx(svcca(X, Y)["mean"], abs=1e-6)


def test_pwcca_of_stored_coordinates_is_taken_in_the_layers_units():
    """PWCCA weighs canonical directions by the units, so rotating X's columns changes it;
    mapped back through the rotation (what a projection's matrix does for stored vectors),
    it is the PWCCA of the units again."""
    from vecsim.measures import _feature_basis, _pwcca_from_bases, pwcca

    rng = np.random.default_rng(0)
    n = 200
    X = rng.standard_normal((n, 12)) * np.linspace(3, 0.2, 12)
    Y = X[:, :8] @ rng.standard_normal((8, 9)) + 0.5 * rng.standard_normal((n, 9))
    R = np.linalg.qr(rng.standard_normal((12, 12)))[0]  # stored coordinates = units rotated
    (Qx, _), (Qy, _) = _feature_basis(X @ R), _feature_basis(Y)
    truth = pwcca(X, Y)
    assert abs(_pwcca_from_bases(X @ R, Qx, Qy) - truth) > 1e-3  # the rotated basis gives another value
    assert _pwcca_from_bases(X @ R, Qx, Qy, unit_map=R.T) == pytest.approx(truth, abs=1e-10)


def test_a_lossless_layers_projection_maps_its_stored_vectors_back_to_its_units(stores):
    """The map compare uses for PWCCA: stored vector × raw norm × projection = the activations
    (classifier: 10 units, stored at dim 16, every stimulus in the training sample)."""
    from vecsim.compare import _LayerData

    store = Store.open(stores["full"])
    data = _LayerData(store, "classifier")
    ok, P = data.unit_map()
    assert ok and P.shape == (store.dim("classifier"), 10)
    ids = store.lookup().ids
    rel = store.stimuli().sort_by("id").column("path").to_pylist()
    raw = raw_features("digits-cnn", stores["source"], rel, "classifier", weights="DEFAULT")
    np.testing.assert_allclose(data.features(np.sort(ids)) @ P, raw, atol=1e-4 * np.abs(raw).max())
