"""Index kinds: exact flat, HNSW, OPQ+IVF-PQ, factory strings; recall recorded; queries still exact-checked."""

from __future__ import annotations

import numpy as np
import pytest

from vecsim.errors import ConfigError
from vecsim.index import choose_kind, factory_string, new_index, recall_at_k
from vecsim.store import store_from_vectors


def unit(n, d, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d)).astype(np.float32)
    x = centers[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_automatic_choice_by_size():
    assert choose_kind(1_000, 256) == "flat"
    assert choose_kind(100_000, 256) == "flat"
    assert choose_kind(500_000, 256) == "hnsw"
    assert choose_kind(5_000_000, 256) == "ivf-pq"
    assert factory_string("ivf-pq", 1_000_000, 256) == "OPQ32_256,IVF4000,PQ32"


def test_pq_layout_splits_every_dim_into_short_sub_vectors():
    from vecsim.index import _pq_layout

    for dim in range(8, 2100):
        d2, m = _pq_layout(dim)
        assert d2 % m == 0 and dim - 16 <= d2 <= dim and m <= 64 and d2 // m >= 8
        if dim <= 1024:  # sub-vectors of 8-16 dims, rotating a few dims away where dim has no such split
            assert d2 // m <= 16, (dim, d2, m)
    assert _pq_layout(256) == (256, 32) and _pq_layout(100) == (100, 10) and _pq_layout(257) == (256, 32)
    assert factory_string("ivf-pq", 4_000_000, 257) == "OPQ32_256,IVF8000,PQ32"


def test_ivf_pq_of_a_prime_dim_finds_more_than_one_sub_quantizer_would(tmp_path):
    # 67 dims (prime): rotated into 66 and split into 6 sub-vectors, not one 67-dim sub-quantizer
    vecs = unit(2000, 67)
    labels = [f"c{i % 4}" for i in range(2000)]
    auto = store_from_vectors(tmp_path / "a", {"v": vecs}, labels=labels, index="ivf-pq").layer_info("v")["index"]
    nlist = auto["factory"].split(",")[1]
    single = store_from_vectors(tmp_path / "b", {"v": vecs}, labels=labels,
                                index=f"OPQ1_67,{nlist},PQ1").layer_info("v")["index"]
    assert auto["factory"].startswith("OPQ6_66,IVF") and auto["factory"].endswith(",PQ6")
    assert auto["recall_at_10"] >= single["recall_at_10"] + 0.1, (auto["recall_at_10"], single["recall_at_10"])


@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq", "IVF16,Flat"])
def test_approximate_indexes_report_recall_and_queries_work(tmp_path, kind):
    vecs = unit(2000, 32)
    store = store_from_vectors(tmp_path / "s", {"v": vecs}, labels=[f"c{i % 4}" for i in range(2000)], index=kind)
    info = store.layer_info("v")["index"]
    assert info["kind"] == kind and info["exact"] is False and info["ntotal"] == 2000
    assert 0.0 <= info["recall_at_10"] <= 1.0 and info["queries"] == 1000
    if kind != "ivf-pq":
        assert info["recall_at_10"] >= 0.95  # the search setting is raised until it gets there
    else:  # 4-byte PQ codes of 32-d vectors cap recall (about 0.5 here) even with every list probed
        assert info["recall_at_10"] >= 0.3 and info["nprobe"] > 1
    assert info["held_out"] is (kind == "hnsw")  # 2000 vectors: the IVF indexes train on all of them
    hits = store.query(id=17, layer="v", k=5)
    assert hits[0]["id"] == 17
    # the cosines are the stored inner products (candidates rescored), best first
    np.testing.assert_allclose([h["cosine"] for h in hits[1:]], vecs[[h["id"] for h in hits[1:]]] @ vecs[17], atol=1e-5)
    assert [h["cosine"] for h in hits] == sorted((h["cosine"] for h in hits), reverse=True)
    # a filtered query is exact over the matching stimuli, however selective the filter
    for where, allowed in (("label = 'c3'", np.arange(3, 2000, 4)), ("id < 40", np.arange(40))):
        filtered = store.query(id=17, layer="v", k=5, where=where, exclude_self=True)
        s = vecs[allowed] @ vecs[17]
        keep = allowed != 17
        want = allowed[keep][np.argsort(-s[keep], kind="stable")[:5]]
        assert [h["id"] for h in filtered] == want.tolist()
    # neighbors: the stored inner products too
    store.neighbors("v", 3, tmp_path / "nn.parquet", progress=False)
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "nn.parquet").to_pylist()
    got = np.array([r["cosine"] for r in rows])
    want = np.einsum("ij,ij->i", vecs[[r["id"] for r in rows]], vecs[[r["neighbor_id"] for r in rows]])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_recall_does_not_count_a_query_finding_itself():
    vecs = unit(300, 16)
    ids = np.arange(300, dtype=np.int64) * 3

    class OnlyItself:  # finds each stored query and nothing else
        def search(self, q, k):
            own = [ids[np.argmax(vecs @ row)] for row in q]
            found = np.full((len(q), k), -1, dtype=np.int64)
            found[:, 0] = own
            return np.zeros((len(q), k), np.float32), found

    result = recall_at_k(OnlyItself(), vecs, ids, queries=50)
    assert result["recall_at_10"] == 0.0 and result["k"] == 10


def test_recall_of_an_exact_index_is_one():
    import faiss

    vecs = unit(500, 16)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(16))
    index.add_with_ids(vecs, np.arange(500, dtype=np.int64))
    assert recall_at_k(index, vecs, np.arange(500))["recall_at_10"] == 1.0


def test_bad_factory_string_and_untrainable_sets_are_clear_errors(tmp_path):
    from vecsim.index import check_index_spec

    with pytest.raises(ConfigError, match="cannot index 16-dim vectors: could not parse index string IVFxx,Flat"):
        new_index("IVFxx,Flat", 16, 100)
    with pytest.raises(ConfigError, match=r"cannot train .*: Number of training points \(50\) should be at least"):
        store_from_vectors(tmp_path / "s", {"v": unit(50, 32)}, index="IVF256,PQ8")
    # checked before any work: a width it cannot take, a string it cannot parse, IDMap (vecsim's own)
    with pytest.raises(ConfigError, match="cannot index 250-dim vectors: .*multiple of the number of subquantizers"):
        check_index_spec("PQ16", [256, 250])
    with pytest.raises(ConfigError, match="could not parse"):
        check_index_spec("Foo", [None])
    check_index_spec("PQ16", [None])  # builds for some width: the fitted one is checked after the fit
    with pytest.raises(ConfigError, match="leave IDMap out"):
        check_index_spec("IDMap,Flat", [64])


def test_a_bad_index_is_refused_before_any_image_is_read(shared_image_set, tmp_path):
    import vecsim

    with pytest.raises(ConfigError, match="could not parse index string Foo"):
        vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu4"],
                             out=str(tmp_path / "s"), index="Foo", progress=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("spec", ["L2norm,Flat", "PCA16,Flat", "SQ8", "HNSW16,SQ8", "PQ8"])
def test_lossy_or_transformed_indexes_are_not_exact_and_report_stored_cosines(tmp_path, spec):
    """Only a flat index (in ID maps) holds the stored vectors; a transform or a code changes
    the scores, so such an index proposes candidates and the stored vectors score them, and the
    query vector is the stored one, not the index's compressed copy."""
    from vecsim.index import is_exact

    vecs = unit(3000, 32, seed=2)
    store = store_from_vectors(tmp_path / "s", {"v": vecs}, index=spec)
    assert not is_exact(store.index("v")) and store.layer_info("v")["index"]["exact"] is False
    np.testing.assert_array_equal(store.vector_of("v", 11)[0], vecs[11])
    hits = store.query(id=11, layer="v", k=10)
    np.testing.assert_allclose([h["cosine"] for h in hits[1:]], vecs[[h["id"] for h in hits[1:]]] @ vecs[11], atol=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "IVF16,Flat"])
def test_k_beyond_what_an_approximate_search_returns_still_gives_k_hits(tmp_path, kind):
    vecs = unit(600, 16, seed=3)
    store = store_from_vectors(tmp_path / "s", {"v": vecs}, index=kind)
    hits = store.query(id=5, layer="v", k=599)
    assert len(hits) == 599 and len({h["id"] for h in hits}) == 599
    order = np.argsort(-(vecs @ vecs[5]), kind="stable")
    assert [h["id"] for h in hits[1:]] == [i for i in order if i != 5][:598]
    assert len(store.query(id=5, layer="v", k=10**9)) == 600  # capped at the stimuli, no giant allocation


def test_every_approximate_index_is_judged_against_the_recall_target(tmp_path, monkeypatch):
    """An index with no search setting to raise (PQ), or one inside a refine wrapper, still
    carries the target its recall is judged by; nprobe may go up to every list."""
    from vecsim.index import _knob

    vecs = unit(3000, 32, seed=4)
    store = store_from_vectors(tmp_path / "s", {"v": vecs}, index="PQ4")
    info = store.layer_info("v")["index"]
    assert info["recall_target"] == 0.95 and info["recall_at_10"] < 0.95
    store = store_from_vectors(tmp_path / "r", {"v": vecs}, index="IVF24,PQ4,RFlat")
    holder, name, values = _knob(store.index("v"))
    assert name == "nprobe" and values[-1] == 24 and "recall_target" in store.layer_info("v")["index"]
    from vecsim import query as query_module

    # a filtered search too broad for the exact path goes around a refine wrapper, which FAISS
    # cannot filter through an ID map (pretend 3000 stimuli are many)
    monkeypatch.setattr(query_module, "FILTER_EXACT_MAX", 100)
    hits = store.query(id=3, layer="v", k=5, where="id % 2 = 1", exclude_self=True)
    s = vecs[1::2] @ vecs[3]
    want = np.arange(1, 3000, 2)[np.argsort(-s, kind="stable")]
    assert [h["id"] for h in hits] == [i for i in want if i != 3][:5]


def _flat(vecs):
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    index.add_with_ids(vecs, np.arange(len(vecs), dtype=np.int64) * 7 + 5)
    return index


def test_the_two_scan_copies_of_an_index_share_its_ids():
    from vecsim.index import _scan_copy

    index = _flat(unit(21_000, 16, seed=2))
    a, b = _scan_copy(index, "int8"), _scan_copy(index, "float16")
    assert a.ids is b.ids and len(a.ids) == index.ntotal


@pytest.mark.parametrize("kind", ["int8", "float16"])
def test_scan_copy_error_bound_holds_for_every_row(kind):
    """The bound the exactness proof relies on: |copy score - exact score| <= bound, all rows."""
    from vecsim.index import _scan_copy

    rng = np.random.default_rng(5)
    vecs = unit(21_000, 48, seed=5)
    vecs[:, 0] += 3.0  # one dominant direction, as the uncentred projection gives
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs *= rng.uniform(0.7, 1.0, size=(len(vecs), 1)).astype(np.float32)  # stored norms <= 1
    copy = _scan_copy(_flat(vecs), kind)
    assert len(copy.parts) >= 1
    for q in (vecs[17], 3.0 * rng.standard_normal(48).astype(np.float32)):  # a stored row; a long query
        scores, positions, bound = copy.search(q, len(vecs))  # every row, best first
        exact = vecs[positions].astype(np.float64) @ q.astype(np.float64)
        assert sorted(positions.tolist()) == list(range(len(vecs)))
        assert np.abs(scores - exact).max() <= bound
        assert bound < (0.05 if kind == "int8" else 0.005) * np.linalg.norm(q)  # tight enough to decide


@pytest.mark.parametrize("shrink", [False, True])
def test_compact_scan_returns_exactly_the_float32_result(shrink):
    """Unit vectors, and vectors of norm <= 1 as vecsim stores them (projected unit vectors)."""
    from vecsim.index import exact_search_one

    vecs = unit(30_000, 64, seed=3)
    if shrink:
        vecs *= np.random.default_rng(4).uniform(0.8, 1.0, size=(30_000, 1)).astype(np.float32)
    index = _flat(vecs)
    answered = 0
    for i in range(0, 30_000, 600):
        for q in (vecs[i : i + 1], 2.5 * vecs[i : i + 1]):
            want_scores, want_ids = index.search(q, 10)
            got = exact_search_one(index, q, 10)
            if got is None:  # not provably exact: the caller falls back to the float32 scan
                continue
            answered += 1
            assert got[1].tolist() == want_ids.tolist()
            np.testing.assert_allclose(got[0], want_scores, rtol=1e-5, atol=1e-5)
    assert answered > 0


@pytest.mark.parametrize("n", [500, 30_000])  # the float32 FAISS scan; the compact scan copy
def test_equal_cosines_come_in_id_order_up_to_k(tmp_path, n):
    # six stimuli with the same stored vector: a query among them, and the k-NN graph, list
    # the others in id order, cutting at k where a scan in id order would
    vecs = unit(n, 32, seed=11)
    same = [10, 3, 40, 77, 120, 300]
    vecs[same] = vecs[10]
    store = store_from_vectors(tmp_path / "s", {"v": vecs})
    scores = vecs @ vecs[10]
    want = [int(i) for i in np.argsort(-scores, kind="stable") if i != 10][:4]
    assert want == [3, 40, 77, 120]
    hits = store.query(id=10, layer="v", k=4, exclude_self=True)
    assert [h["id"] for h in hits] == want and all(h["cosine"] == hits[0]["cosine"] for h in hits)
    assert [h["id"] for h in store.query(id=300, layer="v", k=3, exclude_self=True)] == [3, 10, 40]
    store.neighbors("v", 4, tmp_path / "nn.parquet", progress=False)
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(tmp_path / "nn.parquet").to_pylist() if r["id"] == 10]
    assert [r["neighbor_id"] for r in rows] == want


def test_compact_scan_falls_back_to_float16_then_declines(monkeypatch):
    """Near-ties too close for int8's bound go to the float16 copy; ties no copy can
    separate give None (the caller's float32 scan answers)."""
    import vecsim.index as index_module

    rng = np.random.default_rng(8)
    base = unit(1, 64, seed=8)[0]
    close = base + 1e-2 * rng.standard_normal((400, 64)).astype(np.float32)  # 400 cosines within ~3e-3
    vecs = np.vstack([unit(30_000, 64, seed=9), close / np.linalg.norm(close, axis=1, keepdims=True)])
    index = _flat(vecs)
    kinds = []
    search = index_module._ScanCopy.search
    monkeypatch.setattr(index_module._ScanCopy, "search", lambda self, q, c: kinds.append(self.kind) or search(self, q, c))
    q = base[None, :]
    want_scores, want_ids = index.search(q, 10)
    got = index_module.exact_search_one(index, q, 10)
    assert kinds == ["int8", "float16"]
    assert got is not None and got[1].tolist() == want_ids.tolist()
    # 300 copies of the query itself: the 256 candidates cannot show that no other copy beats them
    twins = np.vstack([unit(30_000, 64, seed=9), np.repeat(base[None, :], 300, axis=0)])
    kinds.clear()
    assert index_module.exact_search_one(_flat(twins), q, 10) is None
    assert kinds == ["int8", "float16"]
    # wider than int8's exact range: float16 only
    monkeypatch.setattr(index_module, "INT8_SCAN_MAX_DIM", 32)
    kinds.clear()
    index_module.exact_search_one(_flat(vecs[:25_000]), vecs[:1], 10)
    assert kinds == ["float16"]


def test_layers_whose_names_share_a_slug_keep_their_own_vectors(tmp_path):
    # "a.b" and "a_b" both sanitise to "a_b": each must still get its own folder, table and index
    rng = np.random.default_rng(3)
    first, second = unit(40, 8), unit(40, 16)
    store = store_from_vectors(tmp_path / "s", {"a.b": first, "a_b": second})
    slugs = {layer: store.layer_info(layer)["slug"] for layer in ("a.b", "a_b")}
    assert len(set(slugs.values())) == 2
    for layer, vecs in (("a.b", first), ("a_b", second)):
        ids, got = store.vectors(layer)
        np.testing.assert_array_equal(got, vecs)
        hits = store.query(id=int(rng.integers(40)), layer=layer, k=3)
        assert len(hits) == 3


def test_vectors_for_reads_just_the_given_stimuli(tmp_path, monkeypatch):
    import vecsim.store as store_module

    vecs = unit(300, 8)
    store = store_from_vectors(tmp_path / "s", {"v": vecs})
    wanted = np.array([250, 3, 77, 3, 999])  # unsorted, repeated, one unknown
    for limit in (20_000, 2):  # a filtered read, and the masked full read for long lists
        monkeypatch.setattr(store_module, "VECTORS_FOR_FILTER_MAX", limit)
        ids, got = store.vectors_for("v", wanted)
        np.testing.assert_array_equal(ids, [3, 77, 250])
        np.testing.assert_array_equal(got, vecs[[3, 77, 250]])
    ids, got = store.vectors_for("v", [999])
    assert ids.shape == (0,) and got.shape == (0, 8)


def test_filtered_search_on_an_approximate_index_falls_back_to_the_allowed_vectors(tmp_path):
    from vecsim.query import search_index

    vecs = unit(2000, 32)
    store = store_from_vectors(tmp_path / "s", {"v": vecs}, index="IVF16,Flat")
    index = store.index("v")
    index.nprobe = 1  # one list: the few allowed stimuli are mostly elsewhere
    allowed = np.arange(0, 2000, 97)
    q = vecs[5:6]
    from vecsim.index import search

    assert (search(index, q, 10, allowed)[1][0] >= 0).sum() < 10  # the filtered probe alone falls short
    scores, found = search_index(index, q, 10, allowed, store, "v")
    s = vecs[allowed] @ q[0]
    top = allowed[np.argsort(-s, kind="stable")[:10]]
    np.testing.assert_array_equal(found[0], top)
    np.testing.assert_allclose(scores[0], np.sort(s)[::-1][:10], rtol=1e-5)
