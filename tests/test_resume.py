"""A killed `vecsim index` (SIGKILL at several points) resumes to exactly the store of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from vecsim.store import Store

from conftest import make_image_set

LAYERS = "features.relu2,features.relu4"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_set(tmp_path_factory.mktemp("resume") / "stimuli", per_class=14)  # 42 images


def index_cmd(images, out, *extra):
    return [sys.executable, "-m", "vecsim", "index", str(images), "--model", "digits-cnn", "--layers", LAYERS,
            "--out", str(out), "--dim", "8", "--train-size", "16", "--eval-size", "20", "--batch-size", "4",
            "--labels-from-folders", "-q", *extra]


def run(cmd, kill_at=None):
    env = {**os.environ}
    env.pop("VECSIM_KILL_AT", None)
    if kill_at:
        env["VECSIM_KILL_AT"] = kill_at
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "store"
    result = run(index_cmd(images, out))
    assert result.returncode == 0, result.stderr
    return Store.open(out)


def assert_same_store(store: Store, reference: Store):
    assert store.complete
    assert store.stimuli().column("id").to_pylist() == reference.stimuli().column("id").to_pylist()
    assert store.stimuli().column("sha256").to_pylist() == reference.stimuli().column("sha256").to_pylist()
    for layer in reference.layers:
        ids, vecs = store.vectors(layer)
        ref_ids, ref_vecs = reference.vectors(layer)
        assert ids.tolist() == ref_ids.tolist()  # exactly one row per stimulus
        np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
        assert store.index(layer).ntotal == len(ids)
        ev, ref_ev = store.eval_subset(layer), reference.eval_subset(layer)
        assert ev["ids"].tolist() == ref_ev["ids"].tolist()
        np.testing.assert_allclose(ev["gram"], ref_ev["gram"], rtol=1e-4)
    assert store.failures().num_rows == reference.failures().num_rows


@pytest.mark.parametrize("kill_at", ["manifest-written:1", "fit-pass", "transforms-saved", "vectors-written:3",
                                     "chunk:2", "manifest-written:2"])
def test_kill_then_resume_equals_an_uninterrupted_run(images, reference, tmp_path, kill_at):
    out = tmp_path / "store"
    killed = run(index_cmd(images, out, "--chunk-size", "8"), kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if kill_at == "manifest-written:1":  # before the store's first manifest: no store yet, a folder to reuse
        assert not (out / "vecsim.json").exists() and (out / "vecsim.json.tmp").exists()
    else:
        assert Store.open(out).manifest["status"] != "complete"
        info = run([sys.executable, "-m", "vecsim", "info", str(out)])  # an unfinished store is described
        assert info.returncode == 0, info.stderr
        checked = run([sys.executable, "-m", "vecsim", "verify", str(out)])
        assert checked.returncode != 0 and "not complete" in checked.stdout + checked.stderr
    if kill_at == "fit-pass":  # nothing committed: a query says how to finish the store, in one line
        asked = run([sys.executable, "-m", "vecsim", "query", str(out), "--id", "0"])
        assert asked.returncode == 2 and asked.stderr.count("\n") == 1, asked.stderr
        assert "no committed stimuli yet" in asked.stderr and f"vecsim index --resume {out}" in asked.stderr
    if kill_at in ("chunk:2", "vectors-written:3"):  # an export from it covers the stimuli committed so far
        partial = Store.open(out)
        committed, status = len(partial.lookup().ids), partial.manifest["status"]
        assert 0 < committed < len(reference.lookup().ids)
        npy = tmp_path / "partial.npy"
        layer = reference.layers[0]
        exported = run([sys.executable, "-m", "vecsim", "similarity", str(out), "--layer", layer, "--out", str(npy)])
        assert exported.returncode == 0, exported.stderr
        assert f"is not complete (status {status!r}): the results cover the {committed} stimuli" in exported.stderr
        assert np.load(npy).shape == (committed, committed)
        assert json.loads((tmp_path / "partial.npy.json").read_text())["metadata"]["store_status"] == status
        # query and neighbors answer too (the FAISS index is written at the run's end: an exact
        # scan of the committed vectors stands in), with the same warning
        first = int(partial.lookup().ids[0])
        hits = run([sys.executable, "-m", "vecsim", "query", str(out), "--id", str(first), "--layer", layer,
                    "-k", "3", "--json"])
        assert hits.returncode == 0 and "is not complete" in hits.stderr, hits.stderr
        found = json.loads(hits.stdout)
        assert found[0]["id"] == first and {h["id"] for h in found} <= set(partial.lookup().ids.tolist())
        graph = run([sys.executable, "-m", "vecsim", "neighbors", str(out), "--layer", layer, "-k", "2", "--out",
                     str(tmp_path / "nb.parquet"), "-q"])
        assert graph.returncode == 0 and "is not complete" in graph.stderr, graph.stderr
        import pyarrow.parquet as pq

        assert pq.read_metadata(tmp_path / "nb.parquet").num_rows == 2 * committed
    stopped = Store.open(out) if (out / "vecsim.json").exists() else None
    # only a run stopped after its transforms were saved is resumed; an earlier one starts again
    before = len(stopped.lookup().ids) if stopped is not None and stopped.manifest["status"] == "indexing" else 0
    resumed = run(index_cmd(images, out, "--chunk-size", "8"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(Store.open(out), reference)
    total = len(reference.lookup().ids)
    if before:  # its rate and its runs-table row count what this run did, not what the stopped one had committed
        assert f"resumed: {before} were committed before, {total - before} this run" in resumed.stdout, resumed.stdout
    else:
        assert "resumed:" not in resumed.stdout
    # the stopped run has its own row (finished empty, what it committed), the resumption the rest
    runs = [(r["run"], r["indexed"], r["finished"] is None, r["seconds"] is None)
            for r in Store.open(out).runs().to_pylist()]
    if stopped is not None and stopped.manifest["status"] == "indexing":
        assert runs == [(1, before, True, True), (2, total - before, False, False)]
    else:  # started again from scratch: one run
        assert runs == [(1, total, False, False)]


def test_resume_by_store_path_and_a_different_configuration_is_refused(images, reference, tmp_path):
    out = tmp_path / "store"
    assert run(index_cmd(images, out, "--chunk-size", "8"), kill_at="chunk:1").returncode == -signal.SIGKILL
    other = run(index_cmd(images, out, "--chunk-size", "8", "--seed", "3"))
    assert other.returncode == 2 and "seed: 0 → 3" in other.stderr
    resumed = run([sys.executable, "-m", "vecsim", "index", "--resume", str(out), "-q"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(Store.open(out), reference)
    assert Store.open(out).runs().num_rows == 1  # stopped while fitting: started again, one run


def test_every_stopped_run_keeps_its_row(images, reference, tmp_path):
    # stopped after the fit, resumed and stopped again (once right after recording the first
    # stop), then finished: one row per run, in order, the indexed counts adding up to the store
    out = tmp_path / "store"
    assert run(index_cmd(images, out, "--chunk-size", "8"), kill_at="chunk:3").returncode == -signal.SIGKILL
    assert Store.open(out).manifest["status"] == "indexing"  # (chunks 1-2 are the fit's: a stop there restarts)
    first = len(Store.open(out).lookup().ids)
    again = run(index_cmd(images, out, "--chunk-size", "8"), kill_at="stopped-run-recorded")
    assert again.returncode == -signal.SIGKILL
    assert run(index_cmd(images, out, "--chunk-size", "8"), kill_at="chunk:1").returncode == -signal.SIGKILL
    second = len(Store.open(out).lookup().ids) - first
    finished = run(index_cmd(images, out, "--chunk-size", "8"))
    assert finished.returncode == 0, finished.stderr
    assert_same_store(Store.open(out), reference)
    total = len(reference.lookup().ids)
    runs = Store.open(out).runs().to_pylist()
    assert [(r["run"], r["command"], r["indexed"], r["finished"] is None) for r in runs] == [
        (1, "index", first, True), (2, "index", second, True), (3, "index", total - first - second, False)]
    assert first > 0 and second > 0
    info = run([sys.executable, "-m", "vecsim", "info", str(out)])
    assert info.returncode == 0 and info.stdout.count("stopped before finishing") == 2, info.stdout


def test_a_second_writer_is_refused_while_one_holds_the_lock(reference, tmp_path):
    from vecsim.errors import StoreLockedError
    from vecsim.store import StoreWriter

    first = StoreWriter.reopen(reference.path)
    try:
        with pytest.raises(StoreLockedError, match="another vecsim process"):
            StoreWriter.reopen(reference.path)
        from vecsim.maintain import add

        first.save_manifest(status="indexing")  # as a run still writing it: busy, not unfinished
        try:
            with pytest.raises(StoreLockedError, match="another vecsim process"):
                add(reference.path, [str(reference.path)], progress=False)
        finally:
            first.save_manifest(status="complete")
    finally:
        first.close()
