"""vecsim verify finds what is wrong; vecsim add grows a store without refitting."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vecsim
from vecsim.errors import StoreError
from vecsim.maintain import add, verify
from vecsim.store import Store

from conftest import make_image_set

LAYERS = ["features.relu2", "features.relu4"]


@pytest.fixture(scope="module")
def built(shared_image_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("maintain") / "store"
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=LAYERS, out=str(out), dim="8",
                         labels_from_folders=True, progress=False)
    return out


@pytest.fixture
def store_copy(built, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(built, target)
    return target


def test_a_fresh_store_verifies_clean(built):
    assert verify(Store.open(built), rehash=True) == []


def test_verify_finds_a_damaged_index_and_transform(store_copy):
    store = Store.open(store_copy)
    layer_dir = store.layer_dir(LAYERS[0])
    data = (layer_dir / "index.faiss").read_bytes()
    (layer_dir / "index.faiss").write_bytes(data[: len(data) // 2])
    with open(store.layer_dir(LAYERS[1]) / "transform.faiss", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    problems = verify(Store.open(store_copy))
    assert any(p.startswith(f"{LAYERS[0]}: cannot read FAISS index") for p in problems), problems
    assert any("transform.faiss does not have the sha256" in p for p in problems), problems


def test_verify_finds_missing_rows_and_changed_files(store_copy, shared_image_set, tmp_path):
    store = Store.open(store_copy)
    store.table(store.layer_info(LAYERS[1])["table"]).delete("id = 3")
    problems = verify(Store.open(store_copy))
    assert any("1 stimuli without a vector" in p for p in problems), problems
    table = store.table(store.layer_info(LAYERS[0])["table"])  # a vector row no stimulus row commits
    row = table.search().where("id = 5").limit(1).to_arrow().to_pylist()[0]
    table.add([{**row, "id": 999}])
    problems = verify(Store.open(store_copy))
    assert any(p.startswith(f"{LAYERS[0]}: 0 stimuli without a vector, 1 vectors without a stimulus") for p in problems), problems
    moved = tmp_path / "moved"
    shutil.copytree(shared_image_set, moved)
    manifest_path = store_copy / "vecsim.json"
    text = manifest_path.read_text().replace(str(shared_image_set.resolve()), str(moved))
    manifest_path.write_text(text)
    Image.new("RGB", (40, 40), "red").save(moved / "cat" / "img_00.png")
    problems = verify(Store.open(store_copy), rehash=True)
    assert any("1 stimulus files changed" in p for p in problems), problems


def test_add_goes_through_the_fitted_transforms_and_skips_duplicates(store_copy, shared_image_set, tmp_path):
    before = Store.open(store_copy)
    transform = (before.layer_dir(LAYERS[0]) / "transform.faiss").read_bytes()
    extra = make_image_set(tmp_path / "extra", per_class=2, classes=("newt",), seed=5)
    shutil.copy(shared_image_set / "cat" / "img_00.png", extra / "newt" / "dup.png")  # already in the store
    result = add(store_copy, [str(extra)], label="newt", progress=False)
    assert result == {**result, "added": 2, "skipped_duplicates": 1, "failed": 0, "stimuli": 20}
    store = Store.open(store_copy)
    assert (store.layer_dir(LAYERS[0]) / "transform.faiss").read_bytes() == transform  # no refit
    assert verify(store) == []
    assert store.manifest["additions"][0]["added"] == 2 and "evaluation subset" in store.manifest["additions"][0]["note"]
    added = [r for r in store.stimuli().to_pylist() if r["label"] == "newt"]
    assert [r["id"] for r in added] == [18, 19]
    for row in added:
        hits = store.query(image=row["path"], k=1, device="cpu")
        assert len(hits) == len(store.layers) and all(h["id"] == row["id"] and h["cosine"] > 0.999 for h in hits)
    again = add(store_copy, [str(extra)], progress=False)
    assert again["added"] == 0 and again["skipped_duplicates"] == 3
    # a changed file under a path the store already holds is a failure, not a second stimulus of that path
    inside = Path(store.manifest["source"]["root"]) / "cat" / "img_00.png"
    original = inside.read_bytes()
    try:
        Image.new("RGB", (40, 40), "green").save(inside)
        changed = add(store_copy, [str(inside)], progress=False)
    finally:
        inside.write_bytes(original)
    assert changed["added"] == 0 and changed["failed"] == 1 and changed["skipped_duplicates"] == 0  # counted once
    last = Store.open(store_copy).failures().to_pylist()[-1]
    assert "already in the store" in last["reason"] and last["path"] == "cat/img_00.png"  # as the stimulus rows
    # a folder's bad files are recorded relative to the store's folder too, wherever add runs from
    (inside.parent / "zz_empty.png").write_bytes(b"")
    try:
        assert add(store_copy, [str(inside.parent)], progress=False)["failed"] == 1
    finally:
        (inside.parent / "zz_empty.png").unlink()
    assert Store.open(store_copy).failures().to_pylist()[-1]["path"] == "cat/zz_empty.png"
    # stimuli from outside the store's folder are recorded by absolute path, and found by it
    for row in added:
        assert row["path"].startswith("/")
        assert store.query(path=row["path"], layer=LAYERS[0], k=1)[0]["id"] == row["id"]


def test_a_store_opened_before_an_add_follows_it(store_copy, shared_image_set, tmp_path):
    """A reader opened before `vecsim add` and used after it: a layer first searched after the
    add finds the added stimuli with their own paths and labels (its cached id lookup used to
    be the old one, so an added stimulus took the last old stimulus's path and label), and a
    byte-identical copy of an added file is that stimulus, cosine 1."""
    reader = Store.open(store_copy)
    assert reader.query(id=0, layer=LAYERS[0], k=2)[0]["id"] == 0  # caches the lookup and one index
    extra = make_image_set(tmp_path / "extra", per_class=2, classes=("newt",), seed=7)
    assert add(store_copy, [str(extra)], label="newt", progress=False)["added"] == 2
    copy = tmp_path / "copy.png"
    copy.write_bytes((extra / "newt" / "img_00.png").read_bytes())
    for layer in LAYERS:  # the layer searched before the add and the one first searched after it
        hits = reader.query(image=str(copy), layer=layer, k=3, device="cpu")
        assert hits[0]["id"] == 18 and hits[0]["cosine"] == 1.0 and hits[0]["label"] == "newt"
        assert hits[0]["path"].endswith("newt/img_00.png")
        every = reader.query(id=0, layer=layer, k=25)
        assert {h["id"] for h in every} == set(range(20))
        assert {h["path"] for h in every if h["id"] >= 18} == {str(p) for p in (extra / "newt").iterdir()}
    reader.neighbors(LAYERS[1], 19, tmp_path / "nn.parquet", progress=False)
    import pyarrow.parquet as pq

    graph = pq.read_table(tmp_path / "nn.parquet")
    assert set(graph.column("id").to_pylist()) == set(range(20)) == set(graph.column("neighbor_id").to_pylist())


def test_a_lookup_never_answers_for_an_id_it_does_not_hold(store_copy):
    from vecsim.query import StimulusLookup

    lookup = StimulusLookup(Store.open(store_copy).stimuli())
    assert lookup.position(np.array([0, 17])).tolist() == [0, 17]
    with pytest.raises(StoreError, match="stimulus 18 is in an index but not in the stimuli table"):
        lookup.position(np.array([3, 18]))


def test_readers_see_only_committed_chunks_while_a_writer_appends(store_copy):
    """A chunk's vectors are written before its stimuli rows; a reader in between sees the old version."""
    from vecsim.store import StoreWriter

    reader = Store.open(store_copy)
    before_ids, before = reader.vectors(LAYERS[0])
    writer = StoreWriter.reopen(store_copy)
    try:
        dim = before.shape[1]
        half = {LAYERS[0]: (np.array([100]), np.ones((1, dim), np.float32) / np.sqrt(dim), np.ones(1, np.float32))}
        writer.append([], half, [], 2)  # vectors written, stimuli row not yet: a half-written chunk
        fresh = Store.open(store_copy)
        ids, vecs = fresh.vectors(LAYERS[0])
        assert ids.tolist() == before_ids.tolist()
        assert fresh.query(id=0, layer=LAYERS[0], k=3)[0]["id"] == 0
        fresh.similarity(store_copy.parent / "sim.npy", layers=[LAYERS[0]])
        assert np.load(store_copy.parent / "sim.npy").shape == (18, 18)
    finally:
        writer.close()


def test_half_precision_activations_are_reduced_in_float32():
    import torch

    from vecsim.reduce import LayerReducer, ReducerConfig

    x = torch.rand(6, 4, 5, 5)
    reducer = LayerReducer("l", (4, 5, 5), ReducerConfig(dim=4, sketch_dim=0))
    reducer.fit(reducer.prepare(x)[0])
    for dtype in (torch.float16, torch.bfloat16):
        vecs, norms, finite = reducer(x.to(dtype))
        assert vecs.dtype == torch.float32 and norms.dtype == torch.float32 and bool(finite.all())
        torch.testing.assert_close(vecs, reducer(x)[0], atol=1e-2, rtol=0)


@pytest.mark.parametrize("kill_at", ["vectors-written", "add-index-saved:1"])
def test_an_add_killed_midway_is_rolled_back_by_the_next_add(store_copy, tmp_path, kill_at):
    """Killed after its vector rows (before the stimuli rows), or after one layer's index: verify
    says so, and rerunning the add removes the partial rows and index entries first, ending
    where an uninterrupted add ends."""
    import os
    import subprocess
    import sys

    reference = tmp_path / "reference"
    shutil.copytree(store_copy, reference)
    extra = make_image_set(tmp_path / "extra", per_class=3, classes=("newt",), seed=5)
    add(reference, [str(extra)], label="newt", progress=False)
    cmd = [sys.executable, "-m", "vecsim", "add", str(store_copy), str(extra), "--label", "newt", "-q"]
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "VECSIM_KILL_AT": kill_at})
    assert killed.returncode == -9
    assert any("stopped before it finished" in p for p in verify(Store.open(store_copy)))
    env = {k: v for k, v in os.environ.items() if k != "VECSIM_KILL_AT"}
    again = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    store, ref = Store.open(store_copy), Store.open(reference)
    assert verify(store) == []
    assert store.stimuli().to_pylist() == ref.stimuli().to_pylist()
    for layer in LAYERS:
        ids, vecs = store.vectors(layer)
        ref_ids, ref_vecs = ref.vectors(layer)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(vecs, ref_vecs, atol=1e-6)
        assert store.index(layer).ntotal == len(ids)
        hits = store.query(id=int(ids[-1]), layer=layer, k=1)
        assert hits[0]["id"] == int(ids[-1])


def test_a_damaged_table_file_is_a_problem_line_not_a_raw_lance_error(store_copy):
    data = sorted((store_copy / "lance" / "stimuli.lance" / "data").glob("*.lance"))
    assert data
    for f in data:
        f.write_bytes(f.read_bytes()[: 40])
    problems = verify(Store.open(store_copy))
    assert any("table 'stimuli' cannot be read" in p for p in problems), problems
    with pytest.raises(StoreError, match="table 'stimuli' cannot be read"):
        Store.open(store_copy).stimuli()


def test_a_store_finds_its_checkpoint_from_anywhere_and_notices_when_it_changed(shared_image_set, tmp_path,
                                                                                 monkeypatch):
    import torch

    from vecsim import digits
    from vecsim.errors import CheckpointError

    (tmp_path / "ck").mkdir()
    torch.save(digits.load_digits_cnn(pretrained=True).state_dict(), tmp_path / "ck" / "d.pt")
    monkeypatch.chdir(tmp_path)
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", checkpoint="ck/d.pt",
                         layers=["features.relu4"], out="s", dim="8", progress=False)
    monkeypatch.chdir("/")
    store = Store.open(tmp_path / "s")
    assert store.manifest["model"]["checkpoint"] == str(tmp_path / "ck" / "d.pt")
    image = str(shared_image_set / "cat" / "img_00.png")
    assert store.query(image=image, k=1, device="cpu")[0]["cosine"] == 1.0
    assert verify(store, rehash=True) == []
    torch.save(digits.DigitsCNN().state_dict(), tmp_path / "ck" / "d.pt")  # other weights, same path
    with pytest.raises(CheckpointError, match="changed since the store was built"):
        store.query(image=image, k=1, device="cpu")
    assert any("checkpoint" in p and "changed since the store was built" in p for p in verify(store, rehash=True))


def test_add_measures_an_approximate_index_recall_again(shared_image_set, tmp_path):
    """The recall recorded at indexing no longer describes an index that grew: add tunes and
    measures it again (on stored queries when fewer than 100 were added) and says so."""
    from vecsim.cli import format_index

    out = tmp_path / "h"
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu4"], out=str(out),
                         dim="8", index="hnsw", progress=False)
    first = Store.open(out).layer_info("features.relu4")["index"]
    assert "recall_at_10" in first and not first.get("measured_after_add")
    extra = make_image_set(tmp_path / "extra", per_class=2, classes=("newt",), seed=5)
    add(out, [str(extra)], progress=False)
    after = Store.open(out).layer_info("features.relu4")["index"]
    assert after["measured_after_add"] is True and after["held_out"] is False and after["ntotal"] == 20
    assert after["queries"] == 20 and 0.0 <= after["recall_at_10"] <= 1.0 and "efSearch" in after
    assert "on 20 stored queries" in format_index(after) and "measured again after vecsim add" in format_index(after)
