"""Query, k-NN graph and similarity export against brute force over the stored vectors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

import vecsim
from vecsim.errors import (ConfigError, ImageDecodeError, OutputExistsError, QueryError, UnknownLayerError,
                           UnknownStimulusError)
from vecsim.store import Store

LAYERS = ["features.relu2", "features.relu4"]


@pytest.fixture(scope="module")
def store(shared_image_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "store"
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=LAYERS, out=str(out), dim="8",
                         train_size=10, labels_from_folders=True, progress=False)
    return Store.open(out)


def brute(store, layer, query_vec, k, allowed=None, selves=()):
    """Inner products with the stored vectors, with the documented exception: the query
    stimulus itself (``selves``) has cosine exactly 1."""
    ids, vecs = store.vectors(layer)
    scores = (vecs @ query_vec).astype(np.float64)
    scores[np.isin(ids, list(selves))] = 1.0
    if allowed is not None:
        scores = np.where(np.isin(ids, allowed), scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order], scores[order]


def test_query_by_id_equals_brute_force_in_every_layer(store):
    hits = store.query(id=4, k=5)
    assert [h["layer"] for h in hits] == [LAYERS[0]] * 5 + [LAYERS[1]] * 5
    for layer in LAYERS:
        ids, vecs = store.vectors(layer)
        assert np.linalg.norm(vecs, axis=1).min() < 0.99  # dim 8 < 10 training stimuli: not exact
        want_ids, want_scores = brute(store, layer, vecs[list(ids).index(4)], 5, selves=[4])
        got = [h for h in hits if h["layer"] == layer]
        assert [h["rank"] for h in got] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([h["cosine"] for h in got], want_scores, atol=1e-5)
        assert [h["id"] for h in got] == want_ids.tolist()
        assert got[0]["id"] == 4 and got[0]["cosine"] == 1.0


def test_the_query_stimulus_and_identical_files_have_cosine_exactly_one(store, shared_image_set, tmp_path):
    """The stored vectors estimate a stimulus's cosine with itself as the share the projection
    keeps (< 1 here); the query reports the exact value, 1, for it and for byte-identical
    files, and the estimate for every other stimulus."""
    copy = tmp_path / "copy.jpg"
    copy.write_bytes((shared_image_set / "owl" / "img_03.jpg").read_bytes())
    owl = store.lookup().id_of_path("owl/img_03.jpg")
    for layer in LAYERS:
        ids, vecs = store.vectors(layer)
        own = vecs[list(ids).index(owl)]
        hits = store.query(image=str(copy), layer=layer, k=4, device="cpu")
        assert hits[0]["id"] == owl and hits[0]["cosine"] == 1.0
        want_ids, want_scores = brute(store, layer, own, 4, selves=[owl])
        assert [h["id"] for h in hits] == want_ids.tolist()
        np.testing.assert_allclose([h["cosine"] for h in hits], want_scores, atol=1e-4)
        excluded = store.query(image=str(copy), layer=layer, k=3, exclude_self=True, device="cpu")
        assert owl not in [h["id"] for h in excluded] and len(excluded) == 3


def test_where_filters_inside_the_search_and_exclude_self(store):
    hits = store.query(path="cat/img_00.png", layer=LAYERS[1], k=4, where="label = 'dog'")
    assert len(hits) == 4 and all(h["label"] == "dog" for h in hits)
    stim = store.stimuli().to_pylist()
    dog_ids = [r["id"] for r in stim if r["label"] == "dog"]
    ids, vecs = store.vectors(LAYERS[1])
    cat0 = next(r["id"] for r in stim if r["path"] == "cat/img_00.png")
    want_ids, _ = brute(store, LAYERS[1], vecs[list(ids).index(cat0)], 4, allowed=dog_ids)
    assert [h["id"] for h in hits] == want_ids.tolist()
    mine = store.query(id=cat0, layer=LAYERS[1], k=3, exclude_self=True)
    assert cat0 not in [h["id"] for h in mine] and len(mine) == 3
    mine_where = store.query(id=cat0, layer=LAYERS[1], k=3, exclude_self=True, where="label = 'cat'")
    assert len(mine_where) == 3 and cat0 not in [h["id"] for h in mine_where]
    assert all(h["label"] == "cat" for h in mine_where)


def test_query_by_a_stimulus_file_finds_that_stimulus_first(store, shared_image_set):
    hits = store.query(image=str(shared_image_set / "owl" / "img_03.jpg"), k=2, device="cpu")
    for layer in LAYERS:
        first = [h for h in hits if h["layer"] == layer][0]
        assert first["path"] == "owl/img_03.jpg" and first["cosine"] >= 0.999


def test_a_query_by_the_file_of_a_training_stimulus_equals_the_query_by_its_id(store, shared_image_set):
    """The store was fitted on 10 stimuli at dim 8, so their vectors are shrunk in-sample; the
    same model input as a stored stimulus is that stimulus: its stored vector is the query."""
    stim = store.stimuli()
    training = store.training_ids()
    assert len(training) == 10 and all(store.in_sample_noise(layer)[-1] > 0 for layer in LAYERS)
    path = dict(zip(stim.column("id").to_pylist(), stim.column("path").to_pylist()))[int(training[3])]
    by_image = store.query(image=str(shared_image_set / path), k=6, device="cpu")
    by_id = store.query(id=int(training[3]), k=6)
    assert [(h["layer"], h["id"]) for h in by_image] == [(h["layer"], h["id"]) for h in by_id]
    assert [h["cosine"] for h in by_image] == pytest.approx([h["cosine"] for h in by_id], abs=1e-6)


def test_training_vectors_are_stored_shrunk_in_sample_and_the_rest_as_projected(store, shared_image_set):
    """Against the raw activations of a plain hook: a training stimulus is stored as
    D · P x̂ (D from the recorded δ and spectrum), every other one as P x̂, what a new image gets."""
    import torch

    from conftest import raw_features
    from vecsim.reduce import in_sample_scale

    training = store.training_ids()
    for layer in LAYERS:
        ids, vecs = store.vectors(layer)
        paths = dict(zip(store.stimuli().column("id").to_pylist(), store.stimuli().column("path").to_pylist()))
        raw = raw_features("digits-cnn", shared_image_set, [paths[int(i)] for i in ids], layer, weights="DEFAULT")
        projected = store.reducer(layer).project(torch.tensor(raw, dtype=torch.float32)).numpy()
        scale = in_sample_scale(store.spectrum(layer)[: store.dim(layer)], store.in_sample_noise(layer)[-1])
        assert scale.min() < 0.99
        in_training = np.isin(ids, training)
        assert 0 < in_training.sum() < len(ids)
        np.testing.assert_allclose(vecs[in_training], projected[in_training] * scale, atol=2e-5)
        np.testing.assert_allclose(vecs[~in_training], projected[~in_training], atol=2e-5)


def test_an_image_goes_through_the_chain_a_stored_stimulus_went_through(store, shared_image_set):
    """image_vectors (the forward pass behind `query --image`) of a stimulus's own file gives
    its stored vector when it was outside the training sample, and its stored vector without
    the in-sample shrinkage (÷ D) when it was in it."""
    from vecsim.query import image_vectors
    from vecsim.reduce import in_sample_scale

    training = store.training_ids()
    paths = dict(zip(store.stimuli().column("id").to_pylist(), store.stimuli().column("path").to_pylist()))
    outside = next(i for i in sorted(paths) if i not in set(training.tolist()))
    for stim_id in (outside, int(training[0])):
        got, _, _ = image_vectors(store, shared_image_set / paths[stim_id], LAYERS, device="cpu")
        for layer in LAYERS:
            want = store.vector_of(layer, stim_id)
            if stim_id != outside:
                want = want / in_sample_scale(store.spectrum(layer)[: store.dim(layer)], store.in_sample_noise(layer)[-1])
            np.testing.assert_allclose(got[layer], want, atol=2e-5)


def test_a_stored_stimulus_image_needs_no_forward_pass(store, shared_image_set, monkeypatch, tmp_path):
    # query --image of a stimulus's own file answers from its stored vectors: the model and
    # the transforms are loaded (the checkpoint and file checks) but never run; a new image runs
    from vecsim import extract

    calls = []
    real = extract.LayerCapture.run
    monkeypatch.setattr(extract.LayerCapture, "run", lambda self, batch: calls.append(len(batch)) or real(self, batch))
    loads = []
    real_load = type(store).load_model
    monkeypatch.setattr(type(store), "load_model", lambda self, device: loads.append(device) or real_load(self, device))
    paths = dict(zip(store.stimuli().column("id").to_pylist(), store.stimuli().column("path").to_pylist()))
    stim_id = sorted(paths)[3]
    by_image = store.query(image=str(shared_image_set / paths[stim_id]), layer=LAYERS[0], k=4, device="cpu")
    assert calls == [] and len(loads) == 1
    assert [h["id"] for h in by_image] == [h["id"] for h in store.query(id=stim_id, layer=LAYERS[0], k=4)]
    from PIL import Image

    new = tmp_path / "new.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(new)
    store.query(image=str(new), layer=LAYERS[0], k=2, device="cpu")
    assert calls == [1]


def test_a_where_is_one_condition(store):
    with pytest.raises(QueryError, match="one SQL condition"):
        store.query(id=0, layer=LAYERS[0], k=2, where="label = 'cat'; DROP TABLE stimuli")
    hits = store.query(id=0, layer=LAYERS[0], k=2, where="label != 'a;b'")  # inside quotes it is text
    assert len(hits) == 2


def test_query_errors(store, tmp_path):
    with pytest.raises(UnknownStimulusError, match="no stimulus with id 999"):
        store.query(id=999)
    with pytest.raises(UnknownStimulusError, match="cat/img_00.png"):
        store.query(path="cat/img_0.png")
    with pytest.raises(UnknownLayerError, match="features.relu4"):
        store.query(id=1, layer="features.relu5")
    with pytest.raises(QueryError, match="not a valid filter"):
        store.query(id=1, where="label === 'x' AND")
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageDecodeError):
        store.query(image=str(bad))
    with pytest.raises(QueryError, match="exactly one"):
        store.query(id=1, path="x")


def test_neighbors_graph_equals_brute_force(store, tmp_path):
    out = tmp_path / "nn.parquet"
    store.neighbors(LAYERS[0], 3, out, progress=False)
    table = pq.read_table(out).to_pylist()
    ids, vecs = store.vectors(LAYERS[0])
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    for row in table:
        i = list(ids).index(row["id"])
        expected = np.sort(sims[i])[::-1][row["rank"] - 1]
        assert abs(row["cosine"] - expected) < 1e-5
    assert len(table) == len(ids) * 3
    with pytest.raises(OutputExistsError):
        store.neighbors(LAYERS[0], 3, out, progress=False)
    # k beyond the store: every other stimulus, and the count returned is the rows written
    result = store.neighbors(LAYERS[0], len(ids) + 5, tmp_path / "all.parquet", progress=False)
    assert result["rows"] == pq.read_metadata(tmp_path / "all.parquet").num_rows == len(ids) * (len(ids) - 1)
    assert result["k_effective"] == len(ids) - 1 and result["k"] == len(ids) + 5
    import subprocess
    import sys

    said = subprocess.run([sys.executable, "-m", "vecsim", "neighbors", str(store.path), "--layer", LAYERS[0], "-k",
                           str(len(ids) + 5), "--out", str(tmp_path / "cli.parquet"), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert said.returncode == 0 and f"k={len(ids) - 1}: every other stimulus, fewer than the {len(ids) + 5}" in said.stdout


def test_torch_exact_search_equals_the_flat_index():
    """The GPU search of `neighbors` (torch products + top-k), on torch's CPU device, in
    query chunks smaller than the batch: the FAISS flat scan's ids and scores, -1 padding
    when k exceeds the stimuli."""
    import faiss

    from vecsim import query

    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((57, 12)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs[5] = 0.0
    ids = rng.permutation(1000)[:57].astype(np.int64)
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(12))
    flat.add_with_ids(vecs, ids)
    old = query.TORCH_SCORES_BYTES
    query.TORCH_SCORES_BYTES = 4 * 57 * 7  # 7 queries per product
    try:
        with query._torch_search(ids, vecs, "cpu") as search:
            for k in (1, 10, 57, 60):
                got_s, got_i = search(vecs[:30], k)
                want_s, want_i = flat.search(vecs[:30], k)
                assert got_i.shape == want_i.shape == (30, k)
                tied = np.arange(30) == 5  # the zero vector: every score 0, any order is right
                np.testing.assert_array_equal(got_i[~tied], want_i[~tied])
                assert (got_s[tied][got_i[tied] >= 0] == 0).all() and ((got_i[tied] >= 0).sum() == min(k, 57))
                np.testing.assert_allclose(got_s[got_i >= 0], want_s[want_i >= 0], atol=1e-6)
    finally:
        query.TORCH_SCORES_BYTES = old


def test_neighbors_through_the_torch_search_equal_the_faiss_ones(store, tmp_path, monkeypatch):
    """`neighbors --device cuda`'s path (torch search of the exact index, forced here onto
    torch's CPU device) writes the same graph as the FAISS path."""
    from contextlib import nullcontext

    from vecsim import query

    store.neighbors(LAYERS[1], 4, tmp_path / "faiss.parquet", progress=False, device="cpu")
    used = []

    def torch_on_cpu(index, exact, ids, vecs, device):
        used.append(exact)
        return query._torch_search(ids, vecs, "cpu") if exact else nullcontext(index.search)

    monkeypatch.setattr(query, "_exact_searcher", torch_on_cpu)
    store.neighbors(LAYERS[1], 4, tmp_path / "torch.parquet", progress=False, device="cpu")
    assert used == [True]
    a, b = (pq.read_table(tmp_path / f"{name}.parquet") for name in ("faiss", "torch"))
    for column in ("id", "rank", "neighbor_id"):
        assert a[column].equals(b[column])
    np.testing.assert_allclose(a["cosine"].to_numpy(), b["cosine"].to_numpy(), atol=1e-6)


@pytest.mark.parametrize("copy", ["bytes", "pixels"])
def test_identical_stimuli_have_cosine_one_in_neighbours_and_matrices(shared_image_set, tmp_path, copy):
    """The same file twice, or the same pixels in another format (other bytes, the same model
    input): raw activations identical, so cosine exactly 1, whatever the reduction keeps."""
    import shutil

    from PIL import Image

    from vecsim.stimuli import decode_image

    images = tmp_path / "images"
    shutil.copytree(shared_image_set, images)
    twin_name = "owl/img_03_copy.jpg" if copy == "bytes" else "owl/img_03_copy.png"
    if copy == "bytes":
        shutil.copy(images / "owl" / "img_03.jpg", images / twin_name)
    else:
        decode_image(images / "owl" / "img_03.jpg").image.save(images / twin_name)
        assert (images / twin_name).read_bytes() != (images / "owl" / "img_03.jpg").read_bytes()
    vecsim.index_stimuli(source=str(images), model="digits-cnn", layers=[LAYERS[1]], out=str(tmp_path / "s"), dim="8",
                         train_size=10, labels_from_folders=True, progress=False)
    store = Store.open(tmp_path / "s")
    a, b = store.lookup().id_of_path("owl/img_03.jpg"), store.lookup().id_of_path(twin_name)
    # a new file with those pixels (a third format) finds both first, at 1.0
    third = tmp_path / "third.bmp"
    Image.open(images / twin_name if copy == "pixels" else images / "owl" / "img_03.jpg").convert("RGB").save(third)
    hits = store.query(image=str(third), layer=LAYERS[1], k=3)
    assert [(h["id"], h["cosine"]) for h in hits[:2]] == [(a, 1.0), (b, 1.0)] and hits[2]["cosine"] < 1.0
    store.neighbors(LAYERS[1], 3, tmp_path / "nn.parquet", progress=False)
    table = pq.read_table(tmp_path / "nn.parquet").to_pylist()
    first = {r["id"]: r for r in table if r["rank"] == 1}
    assert (first[a]["neighbor_id"], first[a]["cosine"]) == (b, 1.0)
    assert (first[b]["neighbor_id"], first[b]["cosine"]) == (a, 1.0)
    assert len(table) == 3 * len(store.lookup().ids)
    # query: the query stimulus first, then its copy, both 1.0; --exclude-self leaves out only itself
    for me, twin in ((a, b), (b, a)):
        hits = store.query(id=me, layer=LAYERS[1], k=3)
        assert [(h["id"], h["cosine"]) for h in hits[:2]] == [(me, 1.0), (twin, 1.0)] and hits[2]["cosine"] < 1.0
        hits = store.query(id=me, layer=LAYERS[1], k=3, exclude_self=True)
        assert (hits[0]["id"], hits[0]["cosine"]) == (twin, 1.0) and me not in [h["id"] for h in hits]
        assert len(hits) == 3
    ids, vecs = store.vectors(LAYERS[1])
    others = [r for r in table if r["id"] not in (a, b)]
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -np.inf)
    for row in others:  # everyone else: the stored estimates, as before
        i = list(ids).index(row["id"])
        assert abs(row["cosine"] - np.sort(sims[i])[::-1][row["rank"] - 1]) < 1e-5
    # the similarity matrices agree: 1 for the pair (0 as a distance), estimates elsewhere
    pa_, pb_ = list(ids).index(a), list(ids).index(b)
    matrix, order = store.similarity(layers=[LAYERS[1]])
    assert order.tolist() == ids.tolist() and matrix[pa_, pb_] == matrix[pb_, pa_] == 1.0
    expected = np.clip(vecs @ vecs.T, -1, 1)
    np.fill_diagonal(expected, 1.0)
    expected[pa_, pb_] = expected[pb_, pa_] = 1.0
    np.testing.assert_allclose(matrix, expected, atol=1e-5)
    store.similarity(tmp_path / "d.npy", layers=[LAYERS[1]], distance=True)
    dist = np.load(tmp_path / "d.npy")
    assert dist[pa_, pb_] == dist[pb_, pa_] == 0.0
    side = json.loads((tmp_path / "d.npy.json").read_text())
    assert side["identical_rows"] == [sorted([pa_, pb_])]
    # and RSA's stored cosine estimates (compare) follow the same rule
    from vecsim.compare import _LayerData

    gram = _LayerData(store, LAYERS[1]).stored_gram(ids)
    cos = gram / np.sqrt(np.outer(np.diag(gram), np.diag(gram)))
    assert abs(cos[pa_, pb_] - 1.0) < 1e-12
    np.testing.assert_allclose(np.delete(np.delete(cos, [pa_, pb_], 0), [pa_, pb_], 1),
                               np.delete(np.delete(expected, [pa_, pb_], 0), [pa_, pb_], 1), atol=1e-5)


def test_exports_equal_brute_force_cosine_in_recorded_order(store, tmp_path):
    ids, vecs = store.vectors(LAYERS[1])
    exact = np.clip(vecs.astype(np.float64) @ vecs.T.astype(np.float64), -1, 1)
    np.fill_diagonal(exact, 1.0)
    store.similarity(tmp_path / "s.npy", layers=[LAYERS[1]])
    npy = np.load(tmp_path / "s.npy")
    np.testing.assert_allclose(npy, exact, atol=1e-5)
    assert np.array_equal(npy, npy.T) and np.all(np.diag(npy) == 1)
    side = json.loads((tmp_path / "s.npy.json").read_text())
    assert side["ids"] == ids.tolist() and side["metadata"]["model"]["name"] == "digits-cnn"
    store.similarity(tmp_path / "h.npy", layers=[LAYERS[1]], dtype="float16")
    np.testing.assert_allclose(np.load(tmp_path / "h.npy").astype(np.float64), exact, atol=2e-3)
    store.similarity(tmp_path / "d.parquet", layers=[LAYERS[1]], distance=True)
    long = pq.read_table(tmp_path / "d.parquet")
    dense = np.zeros_like(exact)
    dense[long.column("i").to_numpy(), long.column("j").to_numpy()] = long.column("distance").to_numpy()
    np.testing.assert_allclose(dense, 1 - npy, atol=1e-6)


def test_export_subset_and_hdf5_for_rsatoolbox(store, tmp_path):
    rsatoolbox = pytest.importorskip("rsatoolbox")
    out = tmp_path / "rdm.h5"
    store.similarity(out, layers=LAYERS, where="label != 'owl'")
    rdms = rsatoolbox.rdm.load_rdm(str(out), file_type="hdf5")
    assert rdms.n_rdm == 2 and rdms.n_cond == 12
    assert list(rdms.rdm_descriptors["layer"]) == LAYERS
    kept = [r for r in store.stimuli().to_pylist() if r["label"] != "owl"]
    assert [int(i) for i in rdms.pattern_descriptors["id"]] == [r["id"] for r in kept]
    m, ids = store.similarity(layers=[LAYERS[0]], where="label != 'owl'")
    np.testing.assert_allclose(rdms.get_matrices()[0], 1 - m, atol=1e-5)


def test_export_errors(store, tmp_path):
    with pytest.raises(ConfigError, match="--similarity correlation"):
        store.similarity(tmp_path / "c.npy", metric="correlation")
    (tmp_path / "exists.npy").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        store.similarity(tmp_path / "exists.npy")
    with pytest.raises(QueryError, match="no stimulus matches"):
        store.similarity(tmp_path / "none.npy", where="label = 'zebra'")


def test_a_failed_neighbors_run_leaves_no_temporary_file(store, tmp_path, monkeypatch):
    import vecsim.query as query_module

    def fail(tmp, *args):
        tmp.write_bytes(b"half a graph")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(query_module, "_write_neighbors", fail)
    with pytest.raises(OSError):
        store.neighbors(LAYERS[0], 3, tmp_path / "nn.parquet", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_path_typed_in_another_unicode_form_finds_its_stimulus():
    """macOS stores 'é' decomposed (e + combining accent); typed on Linux it is one code point."""
    import pyarrow as pa
    import unicodedata

    from vecsim.query import StimulusLookup

    nfd = unicodedata.normalize("NFD", "cats/éclair.png")
    table = pa.table({"id": [0, 1], "path": [nfd, "cats/plain.png"], "label": ["a", "b"], "sha256": ["x", "y"]})
    lookup = StimulusLookup(table)
    assert lookup.id_of_path(unicodedata.normalize("NFC", "cats/éclair.png")) == 0
    assert lookup.id_of_path(nfd) == 0 and lookup.id_of_path("cats/plain.png") == 1
    with pytest.raises(UnknownStimulusError):
        lookup.id_of_path("cats/eclair.png")


def test_identity_is_the_model_input_and_falls_back_to_file_bytes_in_older_stores():
    import pyarrow as pa
    import torch
    from PIL import Image

    from vecsim.models import Preprocessing
    from vecsim.query import StimulusLookup

    pre = Preprocessing(resize=16, crop=16)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    base = Image.fromarray(pixels)
    border = pixels.copy()
    border[:, :4] = 0  # outside the centre crop of the 16x24 image
    touched = pixels.copy()
    touched[8, 12, 0] ^= 1
    t0, d0 = pre.prepare(base)
    t1, d1 = pre.prepare(Image.fromarray(border))
    t2, d2 = pre.prepare(Image.fromarray(touched))
    assert d0 == d1 and torch.equal(t0, t1)  # the same input: the same digest
    assert d0 != d2 and not torch.equal(t0, t2)
    rows = {"id": [1, 2, 3, 4], "path": ["a", "b", "c", "d"], "sha256": ["x", "y", "x", "z"],
            "label": [None] * 4}
    new = StimulusLookup(pa.table({**rows, "input_sha256": ["p", "p", "p", None]}))
    assert [g.tolist() for g in new.identical_groups()] == [[1, 2, 3]]
    assert new.twins_of(2).tolist() == [1, 2, 3] and new.twins_of(4).tolist() == [4]
    assert new.same_input("z", "q").tolist() == [4] and new.same_input("w", "p").tolist() == [1, 2, 3]
    old = StimulusLookup(pa.table(rows))  # a store written before input_sha256: file bytes decide
    assert [g.tolist() for g in old.identical_groups()] == [[1, 3]]
    assert old.same_input("x", "p").tolist() == [1, 3]
