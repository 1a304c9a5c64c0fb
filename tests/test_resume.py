"""A killed `vecsim index` (SIGKILL at several points) resumes to exactly the store of an uninterrupted run,
forwarding only what the stopped run had not committed; the same command on a complete store is a no-op."""

from __future__ import annotations

import json
import os
import re
import shutil
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


def run(cmd, kill_at=None, scratch_seconds="0"):
    """``cmd`` in a fresh process; ``kill_at`` a kill point (vecsim._faults). The training pass
    commits its scratch after every batch (``scratch_seconds`` 0), so the points are exact."""
    env = {**os.environ, "VECSIM_SCRATCH_SECONDS": scratch_seconds}
    env.pop("VECSIM_KILL_AT", None)
    if kill_at:
        env["VECSIM_KILL_AT"] = kill_at
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def eval_ids(reference: Store) -> set[int]:
    """Stimuli of the evaluation subset (of any layer): a run resumed after the fit forwards the
    committed ones again to rebuild it."""
    return {int(i) for layer in reference.layers for i in reference.eval_subset(layer)["ids"]}


def forwarded(stdout: str) -> int:
    return int(re.search(r"(\d+) images forwarded", stdout).group(1))


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


# 42 stimuli, 16 in the training sample, batches of 4: the training pass commits 4 scratch chunks
# (scratch-chunk:N, scratch-writing:N inside the N-th), then the fit (layer-fitted:N per layer)
# commits the 16 in chunks of 8 (chunk:1-2, vectors-written:1-2) while still 'fitting'; the
# stream pass commits the other 26 (chunk:3-6, vectors-written:3-6) under 'indexing'.
KILL_POINTS = ["manifest-written:1", "scratch-writing:1", "scratch-chunk:1", "scratch-writing:3", "fit-pass",
               "layer-fitted:1", "layer-fitted:2", "vectors-written:1", "chunk:2", "transforms-saved",
               "vectors-written:3", "manifest-written:2"]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILL_POINTS)
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
        assert "progress" in info.stdout and "the same `vecsim index` command resumes it" in info.stdout
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
    total = len(reference.lookup().ids)
    # what the stopped run committed: stimuli after the fit, training stimuli in the scratch before it
    stopped = Store.open(out).info() if (out / "vecsim.json").exists() else None
    if stopped is not None and stopped["status"] == "indexing":
        before = stopped["counts"]["stimuli"]
        again = len(eval_ids(reference) & set(Store.open(out).lookup().ids.tolist()))  # the subset's raw rows
        assert not (out / "scratch").exists()  # deleted once the fit was committed
    else:
        before = (stopped or {}).get("progress", {}).get("training_pass", {}).get("kept", 0)
        again = 0
    expected_before = {"scratch-writing:1": 0, "scratch-chunk:1": 4, "scratch-writing:3": 8}.get(kill_at)
    if expected_before is not None:
        assert before == expected_before
    elif kill_at not in ("manifest-written:1",):
        assert before >= 16  # the whole training sample was committed, to the scratch or the store
    resumed = run(index_cmd(images, out, "--chunk-size", "8"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(Store.open(out), reference)
    assert not (out / "scratch").exists()
    if before:  # its rate and its runs-table row count what this run did, not what the stopped one had committed
        assert f"resumed: {before} were committed before, {total - before} this run" in resumed.stdout, resumed.stdout
        # only what was not committed went through the model again (and the evaluation subset's committed stimuli
        # after the fit, whose raw rows are not kept)
        assert forwarded(resumed.stdout) == total - before + again, resumed.stdout
    else:
        assert "resumed:" not in resumed.stdout
    # the stopped run has its own row (finished empty, what it committed), the resumption the rest
    runs = [(r["run"], r["indexed"], r["finished"] is None, r["seconds"] is None)
            for r in Store.open(out).runs().to_pylist()]
    if before:
        assert runs == [(1, before, True, True), (2, total - before, False, False)]
    else:  # started again from scratch: one run
        assert runs == [(1, total, False, False)]


def test_a_torn_last_scratch_chunk_is_dropped_and_forwarded_again(images, reference, tmp_path):
    out = tmp_path / "store"
    assert run(index_cmd(images, out, "--chunk-size", "8"), kill_at="scratch-chunk:3").returncode == -signal.SIGKILL
    chunks = sorted((out / "scratch" / "training").glob("chunk_*.chunk"))
    assert len(chunks) == 3
    chunks[-1].write_bytes(chunks[-1].read_bytes()[: chunks[-1].stat().st_size // 2])  # a crash mid-write
    (out / "scratch" / "training" / "chunk_000003.tmp.chunk").write_bytes(b"PK")  # and a temporary file
    resumed = run(index_cmd(images, out, "--chunk-size", "8"))
    assert resumed.returncode == 0, resumed.stderr
    total = len(reference.lookup().ids)
    assert f"resumed: 8 were committed before, {total - 8} this run, {total - 8} images forwarded" in resumed.stdout
    assert_same_store(Store.open(out), reference)


def test_scratch_commits_every_chunk_size_stimuli(images, reference, tmp_path):
    # without the crash tests' every-batch commits, a chunk is --chunk-size kept stimuli (or a second of work)
    out = tmp_path / "store"
    killed = run(index_cmd(images, out, "--chunk-size", "8"), kill_at="scratch-chunk:1", scratch_seconds="600")
    assert killed.returncode == -signal.SIGKILL
    progress = Store.open(out).info()["progress"]["training_pass"]
    assert (progress["kept"], progress["forwarded"], progress["planned"], progress["chunks"]) == (8, 8, 16, 1)
    assert progress["scratch_bytes"] > 0
    resumed = run(index_cmd(images, out, "--chunk-size", "8"), scratch_seconds="600")
    assert resumed.returncode == 0 and forwarded(resumed.stdout) == len(reference.lookup().ids) - 8, resumed.stdout
    assert_same_store(Store.open(out), reference)


def test_the_stream_pass_commits_once_its_time_bound_has_passed(images, reference, tmp_path):
    """With --chunk-size larger than the set the stream pass still commits once its time bound
    has passed (0 s here: after every forward pass), so a stop loses at most that much work."""
    out = tmp_path / "store"
    cmd = index_cmd(images, out, "--chunk-size", "1000")
    env = {**os.environ, "VECSIM_STREAM_SECONDS": "0", "VECSIM_KILL_AT": "chunk:3"}  # the fit's chunk, then 2
    assert subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300).returncode == -signal.SIGKILL
    stopped = Store.open(out)
    before = len(stopped.lookup().ids)
    assert stopped.manifest["status"] == "indexing" and 16 < before <= 16 + 2 * 4  # two batches of 4 at most
    again = len(eval_ids(reference) & set(stopped.lookup().ids.tolist()))  # the subset's raw rows, not kept
    resumed = run(cmd)
    assert resumed.returncode == 0, resumed.stderr
    assert forwarded(resumed.stdout) == len(reference.lookup().ids) - before + again, resumed.stdout
    assert_same_store(Store.open(out), reference)


def test_a_cpu_batch_is_forwarded_and_committed_in_slices(images, reference, tmp_path):
    # batches of 16 on the CPU: the training pass forwards (and may commit) 8 images at a time
    out = tmp_path / "store"
    cmd = index_cmd(images, out, "--chunk-size", "8", "--batch-size", "16")
    assert run(cmd, kill_at="scratch-chunk:1").returncode == -signal.SIGKILL
    progress = Store.open(out).info()["progress"]["training_pass"]
    assert (progress["kept"], progress["forwarded"], progress["chunks"]) == (8, 8, 1)
    resumed = run(cmd)
    assert resumed.returncode == 0 and forwarded(resumed.stdout) == len(reference.lookup().ids) - 8, resumed.stdout
    assert_same_store(Store.open(out), reference)  # (the reference forwarded batches of 4)


@pytest.mark.slow
def test_a_set_inside_the_training_sample_resumed_after_its_fit_forwards_nothing(images, tmp_path):
    # every stimulus in the training sample: the evaluation subsets are complete when the fit is
    # committed and written then, so a run stopped later (building the indexes) resumes without
    # forwarding any image again
    whole, out = tmp_path / "whole", tmp_path / "store"
    assert run(index_cmd(images, whole, "--train-size", "64")).returncode == 0
    assert run(index_cmd(images, out, "--train-size", "64"), kill_at="transforms-saved").returncode == -signal.SIGKILL
    assert Store.open(out).manifest["status"] == "indexing"
    resumed = run(index_cmd(images, out, "--train-size", "64"))
    assert resumed.returncode == 0 and "resumed: 42 were committed before, 0 this run, 0 images forwarded" in resumed.stdout, \
        resumed.stdout
    assert_same_store(Store.open(out), Store.open(whole))


@pytest.mark.slow
def test_resume_inside_the_training_pass_keeps_the_units_seen_non_zero(images, tmp_path):
    # --drop-zero-units gathers which units the training sample ever had non-zero: the scratch keeps it
    uninterrupted, out = tmp_path / "whole", tmp_path / "store"
    extra = ("--chunk-size", "8", "--drop-zero-units")
    assert run(index_cmd(images, uninterrupted, *extra)).returncode == 0
    assert run(index_cmd(images, out, *extra), kill_at="scratch-chunk:2").returncode == -signal.SIGKILL
    resumed = run(index_cmd(images, out, *extra))
    assert resumed.returncode == 0 and "resumed: 8 were committed before" in resumed.stdout, resumed.stdout
    reference = Store.open(uninterrupted)
    assert any(reference.layer_info(layer)["reducer"]["dropped_zero_units"] for layer in reference.layers)
    for layer in reference.layers:
        assert (Store.open(out).layer_info(layer)["reducer"]["dropped_zero_units"]
                == reference.layer_info(layer)["reducer"]["dropped_zero_units"])
    assert_same_store(Store.open(out), reference)


@pytest.mark.slow
def test_rerunning_a_finished_job_is_a_no_op(images, reference, tmp_path):
    out = tmp_path / "store"
    # killed after the store was marked complete, before the process exited (a requeued job)
    assert run(index_cmd(images, out), kill_at="store-complete").returncode == -signal.SIGKILL
    assert Store.open(out).complete

    def snapshot():
        return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}

    before = snapshot()
    for cmd in (index_cmd(images, out), [sys.executable, "-m", "vecsim", "index", "--resume", str(out), "-q"]):
        again = run(cmd)
        assert again.returncode == 0, again.stderr
        assert f"{out} is complete and up to date (42 stimuli, 0 failed, the same settings); nothing to do" in again.stdout
        assert snapshot() == before  # not touched
    assert_same_store(Store.open(out), reference)
    # other settings are refused, naming each difference; --overwrite still replaces
    other = run(index_cmd(images, out, "--dim", "4", "--seed", "3"))
    assert other.returncode == 2 and other.stderr.count("\n") == 1, other.stderr
    assert "a complete store" in other.stderr and "dim: '8' → '4'" in other.stderr and "seed: 0 → 3" in other.stderr
    assert snapshot() == before
    replaced = run(index_cmd(images, out, "--dim", "4", "--overwrite"))
    assert replaced.returncode == 0 and "indexed 42 stimuli" in replaced.stdout
    assert Store.open(out).dim(reference.layers[0]) == 4
    # --resume runs the recorded settings but never a recorded --overwrite: still a no-op
    before = snapshot()
    again = run([sys.executable, "-m", "vecsim", "index", "--resume", str(out), "-q"])
    assert again.returncode == 0 and "complete and up to date" in again.stdout, again.stdout + again.stderr
    assert snapshot() == before


def test_resume_by_store_path_and_a_different_configuration_is_refused(images, reference, tmp_path):
    out = tmp_path / "store"
    assert run(index_cmd(images, out, "--chunk-size", "8"), kill_at="chunk:1").returncode == -signal.SIGKILL
    other = run(index_cmd(images, out, "--chunk-size", "8", "--seed", "3"))
    assert other.returncode == 2 and "seed: 0 → 3" in other.stderr
    resumed = run([sys.executable, "-m", "vecsim", "index", "--resume", str(out), "-q"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_store(Store.open(out), reference)
    # stopped while the fit committed the training sample: the training pass came back from the scratch
    runs = [(r["run"], r["indexed"], r["finished"] is None) for r in Store.open(out).runs().to_pylist()]
    assert runs == [(1, 16, True), (2, len(reference.lookup().ids) - 16, False)]


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


def test_the_free_disk_check_counts_the_scratch(images, tmp_path, monkeypatch):
    import shutil as shutil_module

    import vecsim
    from vecsim import pipeline
    from vecsim.errors import DiskSpaceError

    options = dict(source=str(images), model="digits-cnn", layers=LAYERS.split(","), dim="8", train_size=16,
                   eval_size=20, batch_size=4, labels_from_folders=True, progress=False)
    # the scratch a run stopped right before its fit leaves, against the run's estimate of it
    out = tmp_path / "store"
    assert run(index_cmd(images, out, "--chunk-size", "8"), kill_at="fit-pass").returncode == -signal.SIGKILL
    actual = Store.open(out).info()["progress"]["training_pass"]["scratch_bytes"]
    estimates = []

    def record(out, needed, scratch):
        estimates.append((needed, scratch))
        raise DiskSpaceError("recorded")

    monkeypatch.setattr(pipeline, "check_free_disk", record)
    with pytest.raises(DiskSpaceError):
        vecsim.index_stimuli(out=str(tmp_path / "other"), **options)
    needed, scratch = estimates[0]
    assert actual <= scratch <= 2 * actual and needed > scratch
    assert not (tmp_path / "other").exists()  # refused before anything was written
    # a resumed run counts only what is left of the training pass
    with pytest.raises(DiskSpaceError):
        vecsim.index_stimuli(out=str(out), **options)
    assert estimates[1][1] < scratch / 4
    monkeypatch.undo()

    # too little free space: one line naming the scratch, nothing written
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage._replace(free=needed - 1))
    with pytest.raises(DiskSpaceError, match=r"not enough free disk space .* of it the training pass's scratch"):
        vecsim.index_stimuli(out=str(tmp_path / "third"), **options)
    assert not (tmp_path / "third").exists()
