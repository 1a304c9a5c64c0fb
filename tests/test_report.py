"""The fidelity report: its numbers equal a direct computation, its files are complete."""

from __future__ import annotations

import json
import math

import re

import numpy as np
import pytest
from scipy.stats import spearmanr

import vecsim
from vecsim.errors import ConfigError, OutputExistsError, StoreError
from vecsim.evalset import exact_similarity
from vecsim.report import (
    NO_LABELS_LINE,
    build_report,
    d_prime,
    fidelity,
    fidelity_summary,
    layer_subset,
    roc_auc,
    similarity_stats,
)
from vecsim.store import Store

from conftest import make_image_set

LAYERS = ["features.relu3", "pool"]
IMG_TAG = '<img src="data:image/png;base64,'


def _index(source, out, labels=True, eval_size=18, layers=LAYERS, dim=16):
    vecsim.index_stimuli(source=str(source), model="digits-cnn", layers=layers, out=str(out), dim=str(dim),
                         eval_size=eval_size, labels_from_folders=labels, batch_size=8, progress=False)
    return Store.open(out)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return _index(make_image_set(root / "stimuli"), root / "store")


@pytest.fixture(scope="module")
def labelled_dim8(labelled, tmp_path_factory):
    """The same stimuli indexed at dim 8: what the report's dim-8 level must reproduce."""
    return _index(labelled.manifest["source"]["root"], tmp_path_factory.mktemp("report8") / "store", dim=8)


@pytest.fixture(scope="module")
def labelled_report(labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out") / "r"
    return out, build_report(labelled.path, out)


# -- the measures themselves ---------------------------------------------------------

def _brute_auc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_auc_of_perfectly_separated_scores_is_one_and_d_prime_positive():
    pos, neg = [0.9, 0.8, 0.95], [0.1, 0.2, 0.3, 0.25]
    assert roc_auc(pos, neg) == 1.0
    assert roc_auc(neg, pos) == 0.0
    assert d_prime(pos, neg) > 0 and math.isfinite(d_prime(pos, neg))
    assert d_prime(neg, pos) == pytest.approx(-d_prime(pos, neg))


def test_auc_counts_ties_half_and_matches_mann_whitney():
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 55).astype(float)  # many ties
    assert roc_auc(pos, neg) == pytest.approx(_brute_auc(pos, neg), abs=1e-12)


def test_d_prime_is_infinite_safe():
    with np.errstate(all="raise"):
        assert d_prime([1.0, 1.0], [0.0, 0.0]) == math.inf
        assert d_prime([0.0], [1.0]) == -math.inf
        assert d_prime([0.5, 0.5], [0.5]) == 0.0
    pos, neg = np.array([2.0, 4.0]), np.array([0.0, 1.0, 2.0])
    expected = (pos.mean() - neg.mean()) / math.sqrt((pos.var() + neg.var()) / 2)
    assert d_prime(pos, neg) == pytest.approx(expected)


@pytest.mark.parametrize("pos, neg", [([], [1.0]), ([1.0], []), ([float("nan")], [1.0])])
def test_measures_reject_empty_or_non_finite_scores(pos, neg):
    for fn in (roc_auc, d_prime):
        with pytest.raises(ConfigError):
            fn(pos, neg)


# -- report numbers vs a direct computation ----------------------------------------------

def _direct(store, layer, dim, level=None):
    """Spearman, recall@10 and AUC (exact and reduced) computed here from eval_subset + the
    vectors of ``level``, the same stimuli indexed at ``dim`` (default ``store``)."""
    ev = store.eval_subset(layer)
    exact = exact_similarity(ev, "cosine")
    ids, vecs = (level or store).vectors(layer)
    assert vecs.shape[1] == dim
    rows = np.searchsorted(ids, ev["ids"])
    head = vecs[rows].astype(np.float64)
    reduced = head @ head.T
    m = len(ev["ids"])
    iu = np.triu_indices(m, 1)
    rho = spearmanr(exact[iu], reduced[iu]).statistic
    k = min(10, m - 1)
    hits = []
    for i in range(m):
        others = [j for j in range(m) if j != i]
        top_exact = set(sorted(others, key=lambda j: -exact[i, j])[:k])
        top_reduced = set(sorted(others, key=lambda j: -reduced[i, j])[:k])
        hits.append(len(top_exact & top_reduced) / k)
    stim = store.stimuli()
    label_of = dict(zip(stim.column("id").to_pylist(), stim.column("label").to_pylist()))
    labels = np.array([label_of[int(i)] for i in ev["ids"]])
    same = labels[iu[0]] == labels[iu[1]]
    aucs = {name: _brute_auc(sim[iu][same], sim[iu][~same]) for name, sim in (("exact", exact), ("reduced", reduced))}
    return {"M": m, "spearman": rho, "recall": float(np.mean(hits)), **aucs}


@pytest.mark.parametrize("layer", LAYERS)
def test_fidelity_equals_a_direct_computation(labelled, labelled_dim8, layer):
    """Each compression level is what a store indexed at that dim holds (a prefix of the stored
    coordinates, the training vectors' in-sample shrinkage redone for that dim)."""
    fid = fidelity(labelled, layer)
    assert fid["M"] == 18 and fid["dim"] == 16 and fid["dims"] == [8, 16] and fid["recall_k"] == 10
    cs = fid["class_separation"]
    assert cs["n_same"] == 3 * 15 and cs["n_diff"] == 153 - 45
    assert len(cs["levels"]) == len(fid["rows"]) == 2
    for row, level in zip(fid["rows"], cs["levels"]):
        want = _direct(labelled, layer, row["dim"], labelled_dim8 if row["dim"] == 8 else None)
        # the dim-8 store's vectors and the report's rescaled prefix differ in float32 rounding (6e-7 here)
        tol = 1e-6 if row["dim"] == 16 else 2e-5
        assert row["spearman"] == pytest.approx(want["spearman"], abs=tol)
        assert row["recall_at_k"] == pytest.approx(want["recall"], abs=1e-9)
        assert level["auc"] == pytest.approx(want["reduced"], abs=tol)
        assert cs["exact"]["auc"] == pytest.approx(want["exact"], abs=1e-9)
        assert 0 <= row["max_abs_delta"] and row["mean_abs_delta"] <= row["max_abs_delta"]


def test_fidelity_summary_is_spearman_at_the_stored_dim(labelled):
    summary = fidelity_summary(labelled)
    assert set(summary) == set(LAYERS)
    for layer in LAYERS:
        assert summary[layer] == pytest.approx(fidelity(labelled, layer)["rows"][-1]["spearman"], abs=1e-12)


def test_fidelity_dims_outside_the_stored_dim_are_refused(labelled):
    assert [r["dim"] for r in fidelity(labelled, "pool", dims=[2, 4])["rows"]] == [2, 4]
    with pytest.raises(ConfigError, match="1..16"):
        fidelity(labelled, "pool", dims=[32])


# -- the written report --------------------------------------------------------------

def test_report_files_are_complete_and_self_contained(labelled_report):
    out, report = labelled_report
    pngs = sorted((out / "figures").glob("*.png"))
    page = (out / "report.html").read_text(encoding="utf-8")
    # per layer: energy, fidelity, class histograms; across layers: separation and fidelity
    assert len(pngs) == 3 * len(LAYERS) + 2
    assert page.count(IMG_TAG) == len(pngs)
    assert "http://" not in page and "https://" not in page
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for png in pngs:
        assert f"(figures/{png.name})" in markdown
    data = json.loads((out / "report.json").read_text(encoding="utf-8"),
                      parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    assert data["labels"] is True and set(data["layers"]) == set(LAYERS)
    for layer in LAYERS:
        assert data["layers"][layer]["M"] == 18
        assert "M = 18" in page and "M = 18" in markdown
        assert data["layers"][layer]["in_training"] == 18  # 18 stimuli, all in the default 1,000-image sample
        assert data["layers"][layer]["class_separation"]["exact"]["auc"] > 0.5
    assert "18 of them were in the projection's training sample" in markdown
    assert report["files"]["figures"] == [str(p) for p in pngs]
    assert "Class separation" in page


def test_existing_output_needs_overwrite(labelled, labelled_report):
    out, _ = labelled_report
    with pytest.raises(OutputExistsError, match="--overwrite"):
        build_report(labelled.path, out)
    (out / "keep.txt").write_text("mine")
    build_report(labelled.path, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"  # only the report's own files are replaced
    with pytest.raises(OutputExistsError, match="vecsim store"):
        build_report(labelled.path, labelled.path, overwrite=True)


def test_a_report_stopped_midway_is_replaced_by_the_next_run(labelled, tmp_path):
    """Figures written, report.json (written last) missing: the folder holds an unfinished
    report of ours, which a rerun replaces without --overwrite; anything else still needs it."""
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "00_x_energy.png").write_bytes(b"partial")
    (out / "report.html.tmp").write_text("<html>half")
    report = build_report(labelled.path, out)
    assert (out / "report.json").is_file() and not (out / "report.html.tmp").exists()
    assert not (out / "figures" / "00_x_energy.png").exists() and report["files"]["figures"]
    (out / "report.json").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        build_report(labelled.path, out)


def test_unlabelled_store_gets_a_report_without_class_sections(tmp_path):
    store = _index(make_image_set(tmp_path / "stimuli"), tmp_path / "store", labels=False, layers=["pool"])
    report = build_report(store.path, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    markdown = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert report["labels"] is False and report["layers"]["pool"]["class_separation"] is None
    assert NO_LABELS_LINE in page and NO_LABELS_LINE in markdown
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)  # base64 can spell anything
    assert "Class separation" not in text and "AUC" not in text and "AUC" not in markdown
    pngs = list((tmp_path / "out" / "figures").glob("*.png"))
    assert len(pngs) == 3 and page.count(IMG_TAG) == 3  # energy, fidelity, depth fidelity


def test_store_without_evaluation_subset_is_a_clear_error(tmp_path):
    store = _index(make_image_set(tmp_path / "stimuli"), tmp_path / "store", eval_size=0, layers=["pool"])
    with pytest.raises(StoreError, match="--eval-size"):
        build_report(store.path, tmp_path / "out")
    with pytest.raises(StoreError, match="--eval-size"):
        fidelity(store, "pool")
    assert fidelity_summary(store) == {}


def test_cli_report_prints_where_and_a_summary_table(labelled, tmp_path):
    import os
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "vecsim", *args], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ))

    out = tmp_path / "out"
    result = run("report", str(labelled.path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert str(out / "report.html") in result.stdout
    table = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in ([lay] for lay in LAYERS)]
    assert [row[:3] for row in table] == [[lay, "18", "16"] for lay in LAYERS]
    assert "AUC raw" in result.stdout
    again = run("report", str(labelled.path), "--out", str(out))
    assert again.returncode == 2 and again.stderr.strip().count("\n") == 0 and "--overwrite" in again.stderr
    as_json = run("report", str(labelled.path), "--out", str(out), "--overwrite", "--json")
    assert json.loads(as_json.stdout)["layers"]["pool"]["M"] == 18


def test_rankdata_matches_scipy_with_ties():
    from scipy.stats import rankdata as scipy_rankdata

    from vecsim.measures import rankdata

    x = np.random.default_rng(0).integers(0, 20, 500).astype(float)
    np.testing.assert_array_equal(rankdata(x), scipy_rankdata(x))


def test_a_reduction_that_flattens_every_similarity_keeps_nothing_of_the_ranking():
    exact = np.array([0.1, 0.5, 0.9, 0.3])
    flat = np.full(4, 0.7)
    stats = similarity_stats(exact, flat)
    assert stats["spearman"] == 0.0 and stats["pearson"] == 0.0  # shown as 0.000, as fidelity_summary gives
    assert stats["max_abs_delta"] == pytest.approx(0.6)
    # when the exact similarities are all equal there is no ranking to keep: undefined, shown as "–"
    assert similarity_stats(flat, exact)["spearman"] is None
    assert similarity_stats(exact, exact)["spearman"] == pytest.approx(1.0)


def test_byte_identical_stimuli_count_as_similarity_one_in_the_fidelity(tmp_path):
    """A copy of a file outside the training sample: its stored inner product with the
    original is below 1 (the projection keeps part of it), but vecsim reports 1 for the pair
    everywhere else (query, neighbors, similarity); the fidelity measures that."""
    import shutil

    src = make_image_set(tmp_path / "stimuli")
    shutil.copy(src / "cat" / "img_00.png", src / "cat" / "zz_copy.png")
    vecsim.index_stimuli(source=str(src), model="digits-cnn", layers=["features.relu3"], out=str(tmp_path / "s"),
                         dim="3", train_size=4, eval_size=19, labels_from_folders=True, batch_size=8, progress=False)
    store = Store.open(tmp_path / "s")
    data = layer_subset(store, "features.relu3")
    assert len(data["ids"]) == 19 and store.layer_info("features.relu3")["eval"]["in_training"] == 4  # train_size 4
    pair = [list(data["ids"]).index(store.lookup().id_of_path(p)) for p in ("cat/img_00.png", "cat/zz_copy.png")]
    v = data["vectors"].astype(np.float64)
    assert v[pair[0]] @ v[pair[1]] < 0.99  # stored estimate; the exact cosine is 1
    assert data["twins"][pair[0], pair[1]] and data["twins"].sum() == 2
    approx = np.clip(v @ v.T, -1, 1)
    approx[pair[0], pair[1]] = approx[pair[1], pair[0]] = 1.0
    iu = np.triu_indices(len(v), 1)
    row = fidelity(store, "features.relu3")["rows"][-1]
    assert row["max_abs_delta"] == pytest.approx(float(np.abs(approx[iu] - data["exact"][iu]).max()), abs=1e-12)
    assert row["spearman"] == pytest.approx(spearmanr(data["exact"][iu], approx[iu]).statistic, abs=1e-9)


def test_a_small_subset_reports_no_trivial_recall_and_says_what_limited_it(tmp_path):
    """With M ≤ 11, recall@(M − 1) is 1 whatever the reduction does: not reported, and said.
    A subset cut by --eval-memory is reported with what was asked for and what the budget held,
    and a float16-held subset says so."""
    src = make_image_set(tmp_path / "stimuli")
    vecsim.index_stimuli(source=str(src), model="digits-cnn", layers=["features.relu3", "pool"], out=str(tmp_path / "s"),
                         dim="4", eval_size=40, eval_memory=0.25, labels_from_folders=True, batch_size=8,
                         progress=False)
    store = Store.open(tmp_path / "s")
    fids = {layer: fidelity(store, layer) for layer in store.layers}
    small = fids["features.relu3"]  # 4,096 units: the 0.25 MB budget holds few of them
    assert small["in_training"] == small["M"]  # every stimulus is in the (default 1,000) training sample
    assert small["M"] <= 11 and small["recall_k"] == small["M"] - 1
    assert all(r["recall_at_k"] is None for r in small["rows"]) and "not reported" in small["recall_note"]
    assert small["eval_size"] == 40 and small["allotted"] < 40
    out = tmp_path / "out"
    report = build_report(store.path, out)
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert f"M = {small['M']} stimuli (--eval-size 40; the --eval-memory budget held {small['allotted']} raw " \
        "vectors of this layer)" in markdown
    assert small["recall_note"] in markdown and "rest on few pairs" in markdown
    if small["held_dtype"] == "float16":
        assert "held in float16" in markdown
    row = {r["layer"]: r for r in report["summary"]}["features.relu3"]
    assert row["recall_at_k"] is None and row["recall_k"] == small["M"] - 1
    head = [line for line in markdown.splitlines() if line.startswith("| layer")][0]
    assert "recall@10" not in head  # the rows have different k: the header says recall@k


def test_an_infinite_d_prime_is_shown_as_infinite(tmp_path):
    """Two byte-identical images of one label and one of another: every similarity in each
    group is constant, the means differ, d′ = +∞ (JSON: null; the text shows ∞, not "–")."""
    import shutil

    src = make_image_set(tmp_path / "all")
    root = tmp_path / "stimuli"
    (root / "x").mkdir(parents=True)
    (root / "y").mkdir()
    first = sorted((src / "cat").glob("*.png"))[0]
    shutil.copy(first, root / "x" / "a.png")
    shutil.copy(first, root / "x" / "a2.png")
    shutil.copy(sorted((src / "dog").glob("*.png"))[0], root / "y" / "b.png")
    vecsim.index_stimuli(source=str(root), model="digits-cnn", layers=["pool"], out=str(tmp_path / "s"), dim="2",
                         labels_from_folders=True, batch_size=8, progress=False)
    assert fidelity(tmp_path / "s", "pool")["class_separation"]["exact"]["d_prime"] == math.inf
    build_report(tmp_path / "s", tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert data["layers"]["pool"]["class_separation"]["exact"]["d_prime"] is None
    exact_row = [line for line in (tmp_path / "out" / "report.md").read_text(encoding="utf-8").splitlines()
                 if line.startswith("| exact |")][0]
    assert exact_row.split("|")[3].strip() == "∞"


def test_stimuli_added_after_indexing_are_said_to_be_outside_the_subsets(tmp_path):
    from vecsim.maintain import add

    store = _index(make_image_set(tmp_path / "stimuli"), tmp_path / "store", layers=["pool"])
    extra = make_image_set(tmp_path / "more", per_class=2, classes=("fox",), seed=5)
    add(store.path, [str(extra)], device="cpu")
    report = build_report(store.path, tmp_path / "out")
    note = [n for n in report["notes"] if "vecsim add" in n]
    assert note == ["2 of the 20 stimuli were added with `vecsim add` after indexing; the evaluation subsets were "
                    "drawn at indexing and do not include them"]
    assert report["layers"]["pool"]["M"] == 18
