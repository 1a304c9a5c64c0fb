"""compare --rdm: a store's layers against external RDMs, checked against rsatoolbox run directly
on RDMs of the raw activations (conftest.raw_features), in every input form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vecsim
from vecsim.compare import EXACT, STORED
from vecsim.errors import ConfigError, MissingExtraError, StimulusSetError, StoreError
from vecsim.rsa import adjust_pvalues, compare_rdms, read_targets

from conftest import cosine_matrix, make_image_set, raw_features

rsatoolbox = pytest.importorskip("rsatoolbox")
from rsatoolbox.inference import boot_noise_ceiling, eval_bootstrap, eval_bootstrap_pattern  # noqa: E402
from rsatoolbox.model import ModelFixed  # noqa: E402
from rsatoolbox.rdm import RDMs, compare  # noqa: E402

LAYERS = ["features.relu3", "features.relu4", "pool", "classifier"]
# region, the layer whose raw activations (plus noise of this many times their std) make its subjects
GENERATORS = (("V", "features.relu3", 0.8), ("IT", "classifier", 0.3))
BOOT = 60  # bootstrap samples in tests: enough to exercise the inference, small enough to be quick


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vecsim", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 30-stimulus store (dim 32 ≥ n: stored vectors are exact too), the raw activations of
    every layer, and 6 synthetic subjects per region (GENERATORS)."""
    base = tmp_path_factory.mktemp("rsa")
    src = make_image_set(base / "stimuli", per_class=10, seed=5)
    store = base / "store"
    vecsim.index_stimuli(source=str(src), model="digits-cnn", layers=LAYERS, out=str(store), dim="32",
                         batch_size=16, progress=False)
    st = vecsim.Store.open(store)
    table = st.stimuli()
    paths = table.column("path").to_pylist()  # id order
    ids = table.column("id").to_numpy()
    raw = {layer: raw_features("digits-cnn", src, paths, layer, weights="DEFAULT") for layer in LAYERS}
    rng = np.random.default_rng(11)
    subjects = {}
    for region, layer, noise in GENERATORS:
        X = raw[layer]
        scale = X.std()
        subjects[region] = np.stack([1.0 - cosine_matrix(X + rng.normal(0, noise * scale, X.shape)) for _ in range(6)])
    return {"store": store, "src": src, "paths": paths, "ids": ids, "raw": raw, "subjects": subjects, "base": base}


def _write_h5(path, world, order, regions=("V", "IT")):
    """Both regions' subject RDMs in one rsatoolbox HDF5 file, stimuli in ``order`` (positions in id order)."""
    mats, subj, reg = [], [], []
    for region in regions:
        for s, D in enumerate(world["subjects"][region]):
            mats.append(D[np.ix_(order, order)])
            subj.append(f"s{s}")
            reg.append(region)
    rdms = RDMs(np.stack(mats), dissimilarity_measure="cosine",
                rdm_descriptors={"subject": subj, "region": reg},
                pattern_descriptors={"stimulus": [world["paths"][k] for k in order]})
    rdms.save(str(path), file_type="hdf5", overwrite=True)
    return path


def _layer_rdm(world, layer, rows=None):
    X = world["raw"][layer] if rows is None else world["raw"][layer][rows]
    return 1.0 - cosine_matrix(X)


def _vec(D):
    iu = np.triu_indices(D.shape[-1], 1)
    return D[..., iu[0], iu[1]]


def _direct(world, region, method, rows=None):
    """rsatoolbox run directly: every layer's raw-activation RDM against the subjects' RDMs."""
    S = world["subjects"][region]
    if rows is not None:
        S = S[:, rows][:, :, rows]
    data = RDMs(_vec(S), rdm_descriptors={"subject": [f"s{s}" for s in range(len(S))]})
    models = [ModelFixed(layer, RDMs(_vec(_layer_rdm(world, layer, rows))[None])) for layer in LAYERS]
    values = np.array([np.mean(compare(m.rdm_obj, data, method)) for m in models])
    return data, models, values


@pytest.fixture(scope="module")
def h5_result(world):
    order = np.random.default_rng(3).permutation(len(world["paths"]))  # another order than the store's
    path = _write_h5(world["base"] / "brain.h5", world, order)
    return path, compare_rdms(world["store"], [path], comparators="corr,spearman", n_bootstraps=BOOT, seed=4)


def test_generating_layer_ranks_first_and_values_equal_rsatoolbox_on_raw_rdms(world, h5_result):
    _path, result = h5_result
    assert result.layers == LAYERS  # depth order
    assert [t["name"] for t in result.targets] == ["brain:V", "brain:IT"]
    for region, layer, _noise in GENERATORS:
        for method in ("corr", "spearman"):
            data, _models, values = _direct(world, region, method)
            got = np.array([result.value(lay, f"brain:{region}", method) for lay in LAYERS])
            np.testing.assert_allclose(got, values, atol=1e-6, err_msg=f"{region} {method}")
            assert result.best(f"brain:{region}", method) == layer
            assert LAYERS[int(np.argmax(values))] == layer
            low, high = boot_noise_ceiling(data, method=method, rdm_descriptor="subject")
            cell = result.cell(layer, f"brain:{region}", method)
            assert cell["noise_lower"] == pytest.approx(low, abs=1e-9)
            assert cell["noise_upper"] == pytest.approx(high, abs=1e-9)
            assert cell["source"] == EXACT and cell["n"] == 30 and cell["n_subjects"] == 6
    # the synthetic subjects share one layer's geometry: the others sit measurably lower
    corr = result.matrix("corr")
    assert corr[0, 0] - corr[1:, 0].max() > 0.05 and corr[3, 1] - corr[:3, 1].max() > 0.005


def test_intervals_and_tests_are_rsatoolbox_evaluation_with_the_recorded_seed(world, h5_result):
    _path, result = h5_result
    data, models, values = _direct(world, "V", "corr")
    np.random.seed(4)
    direct = eval_bootstrap(models, data, method="corr", N=BOOT, rdm_descriptor="subject", boot_noise_ceil=False)
    low, high = direct.get_ci(0.95, test_type="t-test")
    pairwise = direct.test_pairwise(test_type="t-test")
    best = int(np.argmax(values))
    others = [k for k in range(len(LAYERS)) if k != best]
    corrected = adjust_pvalues(pairwise[best, others], "fdr")
    for k, layer in enumerate(LAYERS):
        cell = result.cell(layer, "brain:V", "corr")
        assert cell["bootstrap"] == "both" and cell["n_bootstraps"] == BOOT and cell["seed"] == 4
        assert cell["ci_low"] == pytest.approx(low[k], abs=1e-6) and cell["ci_high"] == pytest.approx(high[k], abs=1e-6)
        if k != best:
            # the store's Grams are summed in float32: layer RDMs agree to ~1e-7, p-values to a few 1e-6
            assert cell["p_best"] == pytest.approx(pairwise[best, k], rel=1e-5, abs=1e-9)
            assert cell["p_best_corrected"] == pytest.approx(corrected[others.index(k)], rel=1e-5, abs=1e-9)
            assert cell["differs_from_best"] == (cell["p_best_corrected"] < 0.05)


def test_fdr_and_bonferroni_against_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    np.testing.assert_allclose(adjust_pvalues(p, "bonferroni"), [0.04, 0.16, 0.12, 1.0])
    # Benjamini-Hochberg: sorted 0.01, 0.03, 0.04, 0.5 -> 0.04, 0.0533, 0.0533, 0.5
    np.testing.assert_allclose(adjust_pvalues(p, "fdr"), [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    np.testing.assert_allclose(adjust_pvalues(p, "none"), p)


def test_caller_random_state_is_left_alone(world, h5_result):
    path, _ = h5_result
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    compare_rdms(world["store"], [path], n_bootstraps=10, bootstrap="stimuli")
    assert np.random.random() == expected


def test_npy_csv_and_parquet_forms_give_the_same_values(world, h5_result, tmp_path):
    _path, result = h5_result
    S = world["subjects"]["V"]
    order = np.random.default_rng(8).permutation(30)
    names = [world["paths"][k] for k in order]
    shuffled = S[:, order][:, :, order]
    # (subjects, n, n) .npy with a stimulus list beside it
    np.save(tmp_path / "v_stack.npy", shuffled)
    (tmp_path / "v_stack.stimuli.txt").write_text("\n".join(names) + "\n")
    # one subject as a similarity CSV with a header row and row names
    sim = 1.0 - shuffled[0]
    with open(tmp_path / "v_one.csv", "w") as fh:
        fh.write("," + ",".join(names) + "\n")
        for name, row in zip(names, sim):
            fh.write(name + "," + ",".join(repr(float(x)) for x in row) + "\n")
    # Parquet long form, by store id, upper triangle, a subject column
    iu = np.triu_indices(30, 1)
    ids = world["ids"][order]
    rows = {"subject": [], "id_i": [], "id_j": [], "distance": []}
    for s in range(len(S)):
        rows["subject"] += [f"s{s}"] * len(iu[0])
        rows["id_i"] += ids[iu[0]].tolist()
        rows["id_j"] += ids[iu[1]].tolist()
        rows["distance"] += shuffled[s][iu].tolist()
    pq.write_table(pa.table(rows), tmp_path / "v_long.parquet")

    got = compare_rdms(world["store"], [tmp_path / "v_stack.npy", tmp_path / "v_long.parquet"],
                       bootstrap="none")
    assert {t["name"]: t["matched_by"] for t in got.targets} == {"v_stack": "path", "v_long": "id"}
    one = compare_rdms(world["store"], [tmp_path / "v_one.csv"], similarities=True, bootstrap="stimuli",
                       n_bootstraps=20)
    _data, _models, direct = _direct(world, "V", "corr")
    for k, layer in enumerate(LAYERS):
        expected = result.value(layer, "brain:V", "corr")
        assert got.value(layer, "v_stack", "corr") == pytest.approx(expected, abs=1e-9)
        assert got.value(layer, "v_long", "corr") == pytest.approx(expected, abs=1e-9)
        single = compare(RDMs(_vec(_layer_rdm(world, layer))[None]), RDMs(_vec(S[0])[None]), "corr")[0, 0]
        assert one.value(layer, "v_one", "corr") == pytest.approx(single, abs=1e-6)
    cell = one.cell("features.relu4", "v_one", "corr")
    assert np.isnan(cell["noise_lower"]) and cell["n_subjects"] == 1 and cell["bootstrap"] == "stimuli"
    assert cell["ci_low"] <= cell["value"] <= cell["ci_high"]


def test_vecsims_own_exports_are_targets_per_layer(world, tmp_path):
    """The store's similarity export (Parquet long form and rsatoolbox HDF5) read back as targets:
    each layer matches itself (dim >= n: the stored vectors are exact)."""
    st = vecsim.Store.open(world["store"])
    st.similarity(tmp_path / "self.parquet", layers=["pool", "classifier"], triangle="upper")
    st.similarity(tmp_path / "self.h5", layers=["features.relu4"])
    got = compare_rdms(world["store"], [tmp_path / "self.parquet", tmp_path / "self.h5"], bootstrap="none")
    assert [t["name"] for t in got.targets] == ["self:pool", "self:classifier", "self:features.relu4"]
    for layer in ("pool", "classifier", "features.relu4"):
        assert got.value(layer, f"self:{layer}", "corr") == pytest.approx(1.0, abs=1e-5)
        assert got.best(f"self:{layer}", "corr") == layer


def test_partial_overlap_uses_the_matched_stimuli_and_names_the_missing(world, tmp_path):
    keep = np.arange(4, 30)  # 4 store stimuli absent
    S = world["subjects"]["IT"][:, keep][:, :, keep]
    extra = 3  # and 3 stimuli the store does not have
    n = len(keep) + extra
    D = np.zeros((len(S), n, n))
    D[:, :len(keep), :len(keep)] = S
    rng = np.random.default_rng(1)
    for s in range(len(S)):
        noise = rng.random((n, n))
        block = (noise + noise.T) / 2
        D[s, len(keep):, :] = block[len(keep):, :]
        D[s, :, len(keep):] = block[:, len(keep):]
        np.fill_diagonal(D[s], 0)
    np.save(tmp_path / "part.npy", D)
    names = [world["paths"][k] for k in keep] + ["elsewhere/a.png", "elsewhere/b.png", "elsewhere/c.png"]
    (tmp_path / "part.txt").write_text("\n".join(names))
    got = compare_rdms(world["store"], [tmp_path / "part.npy"], bootstrap="none")
    t = got.targets[0]
    assert t["matched"] == len(keep) and t["n_given"] == n
    assert t["missing"] == ["elsewhere/a.png", "elsewhere/b.png", "elsewhere/c.png"]
    assert "matched 26 of 29" in t["describe"]
    sub = {"subjects": {"IT": world["subjects"]["IT"]}, "raw": world["raw"]}
    _data, _models, values = _direct(sub, "IT", "corr", rows=keep)
    np.testing.assert_allclose([got.value(layer, "part", "corr") for layer in LAYERS], values, atol=1e-6)


def test_stored_vectors_source_and_sha256_matching(world, tmp_path):
    import hashlib

    order = np.arange(30)[::-1]
    names = [hashlib.sha256((world["src"] / world["paths"][k]).read_bytes()).hexdigest() for k in order]
    np.save(tmp_path / "sha.npy", world["subjects"]["V"][:, order][:, :, order])
    (tmp_path / "sha.stimuli.txt").write_text("\n".join(names))
    got = compare_rdms(world["store"], [tmp_path / "sha.npy"], bootstrap="none", source="stored-vectors")
    assert got.targets[0]["matched_by"] == "sha256"
    _data, _models, values = _direct(world, "V", "corr")
    for k, layer in enumerate(LAYERS):
        cell = got.cell(layer, "sha", "corr")
        assert cell["source"] == STORED
        assert cell["value"] == pytest.approx(values[k], abs=1e-4)  # float32 stored vectors, every direction kept


def test_stored_vectors_when_the_evaluation_subset_lacks_stimuli(world, tmp_path):
    store = tmp_path / "small_eval"
    vecsim.index_stimuli(source=str(world["src"]), model="digits-cnn", layers=["pool"], out=str(store), dim="32",
                         batch_size=16, progress=False, eval_size=10)
    np.save(tmp_path / "it.npy", world["subjects"]["IT"])
    (tmp_path / "it.txt").write_text("\n".join(world["paths"]))
    got = compare_rdms(store, [tmp_path / "it.npy"], bootstrap="none")
    assert got.cell("pool", "it", "corr")["source"] == STORED
    with pytest.raises(StoreError, match="holds 10 of the 30"):
        compare_rdms(store, [tmp_path / "it.npy"], bootstrap="none", source="exact-gram")


def _expect(exc, match, world, files, **kw):
    with pytest.raises(exc, match=match):
        compare_rdms(world["store"], files, bootstrap="none", **kw)


def test_errors_are_one_line_and_name_the_problem(world, tmp_path):
    names = world["paths"]
    good = world["subjects"]["V"][0]
    (tmp_path / "m.txt").write_text("\n".join(names))
    np.save(tmp_path / "rect.npy", np.zeros((30, 29)))
    _expect(ConfigError, "square matrix", world, [tmp_path / "rect.npy"], stimuli=tmp_path / "m.txt")
    asym = good.copy()
    asym[0, 1] += 0.5
    np.save(tmp_path / "asym.npy", asym)
    _expect(ConfigError, "not symmetric", world, [tmp_path / "asym.npy"], stimuli=tmp_path / "m.txt")
    nan = good.copy()
    nan[2, 3] = nan[3, 2] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    _expect(ConfigError, "NaN", world, [tmp_path / "nan.npy"], stimuli=tmp_path / "m.txt")
    np.save(tmp_path / "bare.npy", good)
    _expect(ConfigError, "bare matrix", world, [tmp_path / "bare.npy"])
    (tmp_path / "short.txt").write_text("\n".join(names[:5]))
    _expect(ConfigError, "30 rows but", world, [tmp_path / "bare.npy"], stimuli=tmp_path / "short.txt")
    (tmp_path / "few.txt").write_text("\n".join(names[:2] + [f"nope/{k}.png" for k in range(28)]))
    _expect(StimulusSetError, "only 2 of its 30", world, [tmp_path / "bare.npy"], stimuli=tmp_path / "few.txt")
    (tmp_path / "twice.txt").write_text("\n".join([names[0]] + names[:29]))
    _expect(StimulusSetError, "listed twice", world, [tmp_path / "bare.npy"], stimuli=tmp_path / "twice.txt")
    twin = world["src"] / "twin.png"  # the same bytes as a store stimulus, by another name
    twin.write_bytes((world["src"] / names[0]).read_bytes())
    try:
        (tmp_path / "twin.txt").write_text("\n".join([str(twin)] + [str(world["src"] / n) for n in names[:29]]))
        _expect(StimulusSetError, "both match store stimulus", world, [tmp_path / "bare.npy"],
                stimuli=tmp_path / "twin.txt", match_by="sha256")
    finally:
        twin.unlink()
    _expect(ConfigError, "unknown comparator", world, [tmp_path / "bare.npy"], stimuli=tmp_path / "m.txt",
            comparators="pearson")
    _expect(ConfigError, "does not exist", world, [tmp_path / "absent.h5"])
    _expect(ConfigError, "cannot tell the RDM format", world, [tmp_path / "m.txt"])
    with pytest.raises(ConfigError, match="needs at least 3"):
        compare_rdms(world["store"], [tmp_path / "bare.npy"], stimuli=tmp_path / "m.txt", bootstrap="subjects")
    rdms = RDMs(_vec(good)[None], rdm_descriptors={"subject": ["a"]})
    rdms.save(str(tmp_path / "nodesc.h5"), file_type="hdf5", overwrite=True)
    _expect(ConfigError, "no pattern descriptor naming stimuli", world, [tmp_path / "nodesc.h5"])
    _expect(ConfigError, "no RDM descriptor 'roi'", world, [tmp_path / "bare.npy"], stimuli=tmp_path / "m.txt",
            target_by="roi")


def test_missing_rsatoolbox_names_the_extra(world, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "rsatoolbox", None)
    monkeypatch.setitem(sys.modules, "rsatoolbox.inference", None)
    np.save(tmp_path / "a.npy", world["subjects"]["V"][0])
    (tmp_path / "a.txt").write_text("\n".join(world["paths"]))
    with pytest.raises(MissingExtraError, match=r"vecsim\[rsa\]"):
        compare_rdms(world["store"], [tmp_path / "a.npy"])


def test_targets_split_by_descriptors(world, tmp_path):
    path = _write_h5(tmp_path / "two.h5", world, np.arange(30))
    targets = read_targets(world["store"], [path])
    assert [(t.name, t.n_subjects, t.vectors.shape) for t in targets] == \
        [("two:V", 6, (6, 435)), ("two:IT", 6, (6, 435))]
    np.testing.assert_allclose(targets[0].vectors, _vec(world["subjects"]["V"]), atol=1e-12)
    one = read_targets(world["store"], [path], target_by="subject", subject_by="region")
    assert [t.name for t in one] == [f"two:s{s}" for s in range(6)] and one[0].n_subjects == 2


@pytest.mark.slow
def test_cli_writes_tables_figures_and_the_report_shows_them(world, h5_result, tmp_path):
    path, _ = h5_result
    out = tmp_path / "rsa"
    res = run_cli("compare", world["store"], "--rdm", path, "--out", out, "--bootstraps", 20, "--seed", 4,
                  "--comparator", "corr")
    assert res.returncode == 0, res.stderr
    assert "brain:V" in res.stdout and "best" in res.stdout and "noise ceiling [" in res.stdout
    for name in ("rsa.parquet", "rsa.csv", "rsa.json", "brain_V_corr.png", "brain_IT_corr.png", "heatmap_corr.png"):
        assert (out / name).is_file(), name
    table = pq.read_table(out / "rsa.parquet")
    assert table.num_rows == len(LAYERS) * 2
    assert {"value", "ci_low", "ci_high", "noise_lower", "noise_upper", "p_best_corrected"} <= set(table.column_names)
    before = (out / "rsa.json").read_bytes()
    again = run_cli("compare", world["store"], "--rdm", path, "--out", out, "--bootstraps", 20, "--seed", 5)
    assert again.returncode != 0 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (out / "rsa.json").read_bytes() == before
    quiet = run_cli("compare", world["store"], "--rdm", path, "--out", out, "--bootstraps", 20, "--overwrite", "-q",
                    "--json")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert json.loads(quiet.stdout)["settings"]["n_bootstraps"] == 20
    bad = run_cli("compare", world["store"], world["store"], "--rdm", path)
    assert bad.returncode != 0 and "give no second store" in bad.stderr
    report = tmp_path / "report"
    res = run_cli("report", world["store"], "--out", report, "--targets", out)
    assert res.returncode == 0, res.stderr
    md = (report / "report.md").read_text()
    assert "brain:V" in md and "figures/rsa_brain_V_corr.png" in md
    assert (report / "figures" / "rsa_heatmap_corr.png").is_file()
    assert json.loads((report / "report.json").read_text())["targets"]["rows"]


def test_rsatoolbox_is_imported_only_when_comparing():
    code = ("import sys\nimport vecsim.rsa\nfrom vecsim.cli import main\nsys.argv=['vecsim','compare','--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('rsatoolbox', 'torch', 'lancedb') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out and "--rdm" in out and "--comparator" in out


def test_every_comparator_is_rsatoolbox_compare_on_the_raw_rdms(world, h5_result):
    path, _ = h5_result
    got = compare_rdms(world["store"], [path], comparators="all", bootstrap="none")
    assert got.comparators == ["corr", "spearman", "rho-a", "tau-a", "cosine", "corr_cov", "cosine_cov"]
    for method in got.comparators:
        data, _models, values = _direct(world, "IT", method)
        np.testing.assert_allclose([got.value(layer, "brain:IT", method) for layer in LAYERS], values, atol=1e-6,
                                   err_msg=method)
        low, high = boot_noise_ceiling(data, method=method, rdm_descriptor="subject")
        cell = got.cell("classifier", "brain:IT", method)
        assert (cell["noise_lower"], cell["noise_upper"]) == pytest.approx((low, high), abs=1e-9)


def test_correlation_store_uses_one_minus_pearson_and_the_stimulus_bootstrap_is_rsatoolboxs(world, tmp_path):
    """A store indexed with --similarity correlation: its layer RDM is rsatoolbox's
    'correlation' RDM (1 − Pearson across units) of the raw activations."""
    store = tmp_path / "corr_store"
    vecsim.index_stimuli(source=str(world["src"]), model="digits-cnn", layers=["features.relu3", "classifier"],
                         out=str(store), dim="32", batch_size=16, progress=False, similarity="correlation")
    S = world["subjects"]["V"][:3]  # 3 subjects: auto bootstraps stimuli only
    np.save(tmp_path / "three.npy", S)
    (tmp_path / "three.txt").write_text("\n".join(world["paths"]))
    got = compare_rdms(store, [tmp_path / "three.npy"], n_bootstraps=BOOT, seed=9)
    data = RDMs(_vec(S), rdm_descriptors={"subject": ["0", "1", "2"]})
    models = [ModelFixed(layer, RDMs(_vec(1.0 - np.corrcoef(world["raw"][layer]))[None]))
              for layer in ("features.relu3", "classifier")]
    np.random.seed(9)
    direct = eval_bootstrap_pattern(models, data, method="corr", N=BOOT, rdm_descriptor="subject",
                                    boot_noise_ceil=False)
    low, high = direct.get_ci(0.95, test_type="t-test")
    for k, model in enumerate(models):
        cell = got.cell(model.name, "three", "corr")
        assert cell["bootstrap"] == "stimuli" and cell["n_subjects"] == 3 and cell["source"] == EXACT
        expected = np.mean(compare(model.rdm_obj, data, "corr"))
        assert cell["value"] == pytest.approx(expected, abs=1e-6)
        assert (cell["ci_low"], cell["ci_high"]) == pytest.approx((low[k], high[k]), abs=1e-6)
    cosine_rdm = compare(RDMs(_vec(_layer_rdm(world, "features.relu3"))[None]), data, "corr").mean()
    assert abs(got.value("features.relu3", "three", "corr") - cosine_rdm) > 1e-4  # not the cosine RDM


def test_subject_bootstrap_is_rsatoolboxs_eval_bootstrap_rdm(world, h5_result):
    from rsatoolbox.inference import eval_bootstrap_rdm

    path, _ = h5_result
    got = compare_rdms(world["store"], [path], bootstrap="subjects", n_bootstraps=BOOT, seed=2, correction="bonferroni")
    data, models, values = _direct(world, "IT", "corr")
    np.random.seed(2)
    direct = eval_bootstrap_rdm(models, data, method="corr", N=BOOT, rdm_descriptor="subject", boot_noise_ceil=False)
    low, high = direct.get_ci(0.95, test_type="t-test")
    pairwise = direct.test_pairwise(test_type="t-test")
    for k, layer in enumerate(LAYERS):
        cell = got.cell(layer, "brain:IT", "corr")
        assert cell["bootstrap"] == "subjects" and cell["correction"] == "bonferroni"
        assert (cell["ci_low"], cell["ci_high"]) == pytest.approx((low[k], high[k]), abs=1e-6)
        if layer != "classifier":
            assert cell["p_best_corrected"] == pytest.approx(min(1.0, 3 * pairwise[3, k]), rel=1e-5, abs=1e-9)
