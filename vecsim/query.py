"""What users open vecsim for: nearest stimuli per layer, the all-vs-all k-NN graph, and
full similarity matrices, all from a store."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from vecsim._io import fsync_replace
from vecsim.errors import (ConfigError, ImageDecodeError, OutputExistsError, QueryError, UnknownStimulusError,
                           close_matches)


# -- stimulus lookups ------------------------------------------------------------------

class StimulusLookup:
    """id ↔ path/label for a store, held as sorted arrays (one read of the stimuli table)."""

    def __init__(self, table):
        self.ids = table.column("id").to_numpy().astype(np.int64)
        self.paths = np.array(table.column("path").to_pylist(), dtype=object)
        self.labels = np.array(table.column("label").to_pylist(), dtype=object)
        self.sha256 = np.array(table.column("sha256").to_pylist(), dtype=object)
        # what makes two stimuli identical: the same model input (input_sha256), or in a store
        # written before that column, or for rows without it, the same file bytes
        inputs = (table.column("input_sha256").to_pylist() if "input_sha256" in table.column_names
                  else [None] * len(self.ids))
        self.identity = np.array([f"input:{d}" if d else f"file:{s}" for d, s in zip(inputs, self.sha256.tolist())],
                                 dtype=object)
        self._by_path = {p: int(i) for p, i in zip(self.paths, self.ids)}
        self._by_identity: dict[str, list[int]] | None = None
        self._by_nfc: dict[str, list[int]] | None = None

    def position(self, ids: np.ndarray) -> np.ndarray:
        """Rows of these ids; an id that is not in the table is an error (never another row)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, max(0, len(self.ids) - 1))
        missing = (self.ids[pos] != ids) if len(self.ids) else np.ones(len(ids), bool)
        if missing.any():
            from vecsim.errors import StoreError

            raise StoreError(f"stimulus {int(ids[missing][0])} is in an index but not in the stimuli table: the store "
                             "changed while this ran (run it again) or is damaged (run `vecsim verify`)")
        return pos

    def _identity_groups(self) -> dict[str, list[int]]:
        if self._by_identity is None:
            self._by_identity = {}
            for stim_id, key in zip(self.ids.tolist(), self.identity.tolist()):
                self._by_identity.setdefault(key, []).append(stim_id)  # ids are sorted, so each list is too
        return self._by_identity

    def same_input(self, file_sha256: str, input_sha256: str | None = None) -> np.ndarray:
        """Ids of the stimuli identical to an image with this file sha256 and model-input digest
        (:meth:`vecsim.models.Preprocessing.prepare`): the same model input, or for stimuli
        stored without a digest the same file bytes; sorted."""
        groups = self._identity_groups()
        found = set(groups.get(f"file:{file_sha256}", []))
        if input_sha256:
            found.update(groups.get(f"input:{input_sha256}", []))
        return np.array(sorted(found), dtype=np.int64)

    def twins_of(self, stim_id: int) -> np.ndarray:
        """Ids of the stimuli identical to this stored one (itself included), sorted."""
        return np.array(self._identity_groups()[self.identity[self.position(np.array([stim_id]))[0]]], dtype=np.int64)

    def identical_groups(self) -> list[np.ndarray]:
        """Sorted id arrays of the stimuli that give the model the same input as another (rare:
        copies of a file, or the same picture saved in another format or with other metadata)."""
        return [np.array(g, dtype=np.int64) for g in self._identity_groups().values() if len(g) > 1]

    def check_id(self, stim_id: int) -> None:
        pos = np.searchsorted(self.ids, stim_id)
        if pos >= len(self.ids) or self.ids[pos] != stim_id:
            lo, hi = (int(self.ids[0]), int(self.ids[-1])) if len(self.ids) else (0, -1)
            raise UnknownStimulusError(f"no stimulus with id {stim_id} in this store (ids run from {lo} to {hi})")

    def id_of_path(self, path: str) -> int:
        from vecsim.stimuli import path_key

        key = path_key(path)
        if key in self._by_path:
            return self._by_path[key]
        # the same name in another Unicode normal form (macOS writes decomposed names: an
        # 'é' typed as one code point is two there), when that matches exactly one stimulus
        import unicodedata

        if self._by_nfc is None:
            self._by_nfc = {}
            for p, i in self._by_path.items():
                self._by_nfc.setdefault(unicodedata.normalize("NFC", p), []).append(i)
        same = self._by_nfc.get(unicodedata.normalize("NFC", key), [])
        if len(same) == 1:
            return same[0]
        raise UnknownStimulusError(
            f"no stimulus with path {path!r} in this store{close_matches(key, list(self._by_path))}"
        )


def allowed_ids(store, where: str | None) -> np.ndarray | None:
    """Stimulus ids matching a SQL filter over the stimuli table (e.g. ``label = 'cat'``)."""
    if not where:
        return None
    if ";" in re.sub(r"'(?:[^']|'')*'", "", where):  # outside quoted text
        raise QueryError(f"--where {where!r} must be one SQL condition (no ';')")
    try:
        table = store.table("stimuli").search().where(where).select(["id"]).limit(None).to_arrow()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QueryError(f"--where {where!r} is not a valid filter on the stimuli table ({first[:160]})") from None
    return np.sort(table.column("id").to_numpy().astype(np.int64))


# -- query -------------------------------------------------------------------------------

def image_vectors(store, image: str | os.PathLike | bytes, layers: list[str], device: str = "auto",
                  known=None, max_pixels: int | None = None) -> tuple[dict[str, np.ndarray], str, str]:
    """A new image (a file, or its bytes in memory: nothing is written anywhere) through the
    store's model, preprocessing and fitted reducers: one vector per
    layer (as stored: norm at most 1), the file's sha256 (hashed while decoding) and the model
    input's digest (:meth:`vecsim.models.Preprocessing.prepare`).

    With ``known`` (the store's :class:`StimulusLookup`), an image whose model input is a
    stored stimulus's gets that stimulus's stored vectors, without a forward pass (a training
    stimulus's are shrunk in-sample, so they differ from a forward pass's); the model and the
    fitted reducers are still loaded first, which checks the checkpoint is the one the store
    was built with and that the transform files are sound. ``max_pixels``: images above it are
    rejected from their header (default: the store's ``--max-pixels``)."""
    from vecsim.extract import LayerCapture, resolve_device
    from vecsim.stimuli import decode_bytes, decode_image

    device = resolve_device(device)
    if max_pixels is None:
        max_pixels = store.manifest["config"].get("max_pixels") or 0
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise ImageDecodeError("empty file (0 bytes)")
        decoded = decode_bytes(bytes(image), max_pixels)
    else:
        decoded = decode_image(Path(image), max_pixels)
    model, preprocessing = store.load_model(device)
    tensor, input_digest = preprocessing.prepare(decoded.image)
    reducers = {layer: store.reducer(layer, device) for layer in layers}
    selves = known.same_input(decoded.sha256, input_digest) if known is not None else ()
    if len(selves):
        return {layer: store.vector_of(layer, int(selves[0])) for layer in layers}, decoded.sha256, input_digest
    batch = tensor.unsqueeze(0).to(device)
    with LayerCapture(model, layers, reducers) as capture:
        results = capture.run(batch)
    out = {}
    for layer, (vecs, _norms, finite) in results.items():
        if not bool(finite.all()):
            raise QueryError(f"the image's activations at {layer} contain NaN or Inf")
        out[layer] = vecs.cpu().numpy().astype(np.float32)
    return out, decoded.sha256, input_digest


def query(store, *, id: int | None = None, path: str | None = None, image: str | os.PathLike | bytes | None = None,
          layer: str | None = None, k: int = 10, where: str | None = None, exclude_self: bool = False,
          device: str = "auto", max_pixels: int | None = None) -> list[dict]:
    """Nearest stimuli to one stimulus (``id``/``path``) or a new image (a file path, or the
    file's bytes), in one or all layers.

    Returns one dict per hit: layer, rank (1-based), id, path, label, cosine. ``where``
    filters inside the search, so k results come back whenever k stimuli match.
    """
    given = [x is not None for x in (id, path, image)]
    if sum(given) != 1:
        raise QueryError("give exactly one of --id, --path or --image")
    if k < 1:
        raise QueryError("-k must be at least 1")
    layers = [layer] if layer else store.layers
    for name in layers:
        store.layer_info(name)
    lookup = store.lookup()
    allowed = allowed_ids(store, where)
    # selves: the stored stimuli identical to the query (same model input), query stimulus first;
    # their cosine with it is exactly 1. --exclude-self leaves out the query stimulus (for an
    # --image, every stored copy of that file); other copies stay, first, at 1.0.
    if image is not None:
        # the model input of a stored stimulus comes back as its stored vectors
        queries, digest, input_digest = image_vectors(store, image, layers, device, known=lookup, max_pixels=max_pixels)
        selves = lookup.same_input(digest, input_digest)
        excluded = selves if exclude_self else selves[:0]
    else:
        self_id = int(id) if id is not None else lookup.id_of_path(path)
        lookup.check_id(self_id)
        queries = {name: store.vector_of(name, self_id) for name in layers}
        twins = lookup.twins_of(self_id)
        selves = np.concatenate([[self_id], twins[twins != self_id]]).astype(np.int64)
        excluded = selves[:1] if exclude_self else selves[:0]
    first = selves[~np.isin(selves, excluded)]
    if allowed is not None:
        first = first[np.isin(first, allowed)]
        allowed = np.setdiff1d(allowed, excluded)
    hits = []
    extra = len(selves)  # the copies the search must see past (they are dropped, then put first)
    for name in layers:
        scores, found = search_index(store.index(name), queries[name], k + extra, allowed, store, name)
        nonzero = bool(np.any(queries[name]))  # an all-zero vector has cosine 0 with everything, itself too
        ranked = _rank_with_twins(scores[0], found[0], drop=selves if nonzero else excluded,
                                  first=first if nonzero else (), k=k)
        positions = lookup.position(np.array([stim_id for _, stim_id in ranked], dtype=np.int64)).tolist()
        for rank, ((score, stim_id), pos) in enumerate(zip(ranked, positions), start=1):
            hits.append({"layer": name, "rank": rank, "id": stim_id, "path": str(lookup.paths[pos]),
                         "label": lookup.labels[pos], "cosine": score})
    return hits


def _rank_with_twins(scores, found, drop, first, k: int) -> list[tuple[float, int]]:
    """(cosine, id) hits: the search results without the ids in ``drop``, after the ids in
    ``first`` with cosine exactly 1.0, k at most; equal cosines in id order.

    A stimulus and any file with the same bytes have cosine exactly 1; the stored vectors
    estimate it as the share of the activation the projection keeps, which is less. So the
    caller drops them from the search results and, unless excluded, puts them first.
    """
    drop = {int(i) for i in drop}
    ranked = [(min(1.0, max(-1.0, score)), stim_id)
              for score, stim_id in zip(np.asarray(scores, dtype=np.float64).tolist(), np.asarray(found).tolist())
              if stim_id >= 0 and stim_id not in drop]
    ranked.sort(key=lambda hit: (-hit[0], hit[1]))  # equal cosines by id, whichever search found them
    return ([(1.0, int(i)) for i in first] + ranked)[:k]


FILTER_EXACT_MAX = 200_000  # a filtered query on an approximate index scans up to this many matches exactly
REFINE = 4  # an approximate index returns REFINE × k candidates, rescored exactly on the stored vectors


def search_index(index, queries: np.ndarray, k: int, allowed: np.ndarray | None, store=None, layer=None):
    """(scores, ids) of the k best stimuli for one query; -1 ids pad missing results.

    An exact index answers directly. On an approximate index (HNSW, IVF...) a filtered
    query scans the matching stimuli's stored vectors exactly (up to FILTER_EXACT_MAX of
    them: a filtered graph or list search loses recall as the filter narrows); otherwise
    the index proposes REFINE × k candidates whose stored vectors rescore them, so the
    cosines reported are the stored inner products and the order is theirs.
    """
    from vecsim.index import exact_search_one, filters_inside, is_exact, search

    k = max(1, min(int(k), int(index.ntotal)))  # never more columns than stimuli
    if allowed is None and len(queries) == 1:
        fast = exact_search_one(index, queries, k)
        if fast is not None:
            return fast
    if is_exact(index) or store is None:
        return search(index, queries, k, allowed)
    if allowed is not None and (len(allowed) <= FILTER_EXACT_MAX or not filters_inside(index)):
        return _exact_over(store, layer, queries[0], allowed, k)
    _, found = search(index, queries, REFINE * k, allowed)
    cand = found[0][found[0] >= 0]
    if allowed is not None and len(cand) < min(k, len(allowed)):  # the filtered search came back short
        return _exact_over(store, layer, queries[0], allowed, k)
    if allowed is None and len(cand) < k:  # a graph or list search finds fewer than k: scan them all
        return _exact_over(store, layer, queries[0], None, k)
    return _exact_over(store, layer, queries[0], cand, k)


def _exact_over(store, layer: str, query: np.ndarray, ids: np.ndarray | None, k: int):
    """The k best of ``ids`` (None: every stimulus) by exact inner product with their stored
    vectors, (1, k) arrays; beyond FILTER_EXACT_MAX ids every stored vector is scanned, the
    others masked out."""
    if ids is None or len(ids) > FILTER_EXACT_MAX:
        all_ids, vecs = store.vectors(layer)
        scores = (vecs @ query).astype(np.float32)
        if ids is not None:
            scores[~np.isin(all_ids, ids)] = -np.inf
        top = np.argsort(-scores, kind="stable")[:k]
        top_ids = np.where(np.isfinite(scores[top]), all_ids[top], -1)
        return scores[top][None, :], top_ids[None, :]
    ids, vecs = store.vectors_for(layer, ids)
    return _rescore(query[None, :], ids[None, :], ids, vecs, k)


# -- neighbors -----------------------------------------------------------------------------

def _rescore(q: np.ndarray, found: np.ndarray, ids: np.ndarray, vecs: np.ndarray, k: int, block: int = 256):
    """Per query row, the k best of the candidate ids ``found`` (-1 = none) by exact inner
    product with their stored vectors (``vecs`` rows, ids ``ids`` sorted): (scores, ids),
    k columns, padded with -inf / -1."""
    if found.shape[1] < k:
        found = np.pad(found, ((0, 0), (0, k - found.shape[1])), constant_values=-1)
    if len(ids) == 0:
        return np.full(found.shape, -np.inf, np.float32)[:, :k], np.full(found.shape, -1, np.int64)[:, :k]
    valid = found >= 0
    rows = np.searchsorted(ids, np.where(valid, found, ids[0]))
    scores = np.empty(found.shape, np.float32)
    for lo in range(0, len(q), block):  # (block, candidates, dim) at a time
        hi = min(len(q), lo + block)
        scores[lo:hi] = np.einsum("bcd,bd->bc", vecs[rows[lo:hi]], q[lo:hi])
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.where(np.isfinite(top_scores), np.take_along_axis(found, order, axis=1), -1)
    return top_scores, top_ids


def neighbors(store, layer: str, k: int, out: str | os.PathLike, *, batch_size: int = 4096,
              overwrite: bool = False, progress: bool = True, device: str = "auto") -> dict:
    """The all-vs-all k-NN graph of one layer (self excluded) as Parquet: id, rank, neighbor_id, cosine.

    Identical stimuli (the same model input, StimulusLookup) are each other's first neighbours with cosine 1.0.
    ``device``: ``auto`` (the GPU when torch sees one), ``cpu`` or ``cuda[:N]``. On a GPU an
    exact index is searched by torch matrix products and top-k there (the same neighbours
    as the FAISS scan, up to ties); an approximate index is searched by FAISS as on the CPU."""
    from vecsim.extract import resolve_device
    from vecsim.index import is_exact

    out = Path(out)
    if k < 1:
        raise QueryError("-k must be at least 1")
    _check_output(out, overwrite, (".parquet",))
    device = resolve_device(device)

    index = store.index(layer)
    exact = is_exact(index)
    ids, vecs = store.vectors(layer)
    # identical stimuli (the same model input) have cosine exactly 1 with each other, as in query()
    twins = identical_twins(store)
    schema = neighbors_schema(store, layer, ids)
    tmp = out.with_name(out.name + ".tmp")
    start = time.time()
    try:
        with _exact_searcher(index, exact, ids, vecs, device) as search:
            written = _write_neighbors(tmp, schema, search, exact, ids, vecs, twins, k, batch_size, progress, layer)
        fsync_replace(tmp, out)
    finally:  # a failed run (disk full, an error) leaves no temporary file behind
        tmp.unlink(missing_ok=True)
    # fewer than k per stimulus when the store holds k or fewer other stimuli
    return {"path": str(out), "rows": written, "stimuli": int(len(ids)), "k": k,
            "k_effective": min(k, max(len(ids) - 1, 0)), "seconds": time.time() - start,
            "device": device if exact else "cpu"}


TORCH_SCORES_BYTES = 1 << 30  # a torch search scores at most this many bytes of queries × stimuli at once


@contextlib.contextmanager
def _exact_searcher(index, exact: bool, ids: np.ndarray, vecs: np.ndarray, device: str):
    """``search(queries, k) -> (scores, ids)``: the FAISS index's own search, or, for an exact
    index on a torch device other than the CPU, torch matrix products over the stored vectors
    (copied to the device once) and a top-k there, in full float32 (no TF32). Missing results
    (k above the stimulus count) are padded with id -1 as FAISS does."""
    if not exact or device == "cpu":
        yield index.search
        return
    with _torch_search(ids, vecs, device) as search:
        yield search


@contextlib.contextmanager
def _torch_search(ids: np.ndarray, vecs: np.ndarray, device: str):
    """Exact inner-product top-k with torch on ``device`` (see :func:`_exact_searcher`); runs on
    torch's CPU device too, which is how the tests check it without a GPU."""
    import torch

    from vecsim.similarity import torch_float32

    n = len(vecs)
    step = max(1, TORCH_SCORES_BYTES // (4 * max(1, n)))

    def search(queries: np.ndarray, k: int):
        queries = np.array(queries, dtype=np.float32, copy=True)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        found = np.full((len(queries), k), -1, dtype=np.int64)
        kk = min(k, n)
        for lo in range(0, len(queries), step):
            q = torch.from_numpy(queries[lo : lo + step]).to(device)
            top = torch.topk(q @ V.T, kk, dim=1)  # sorted, best first
            scores[lo : lo + len(q), :kk] = top.values.cpu().numpy()
            found[lo : lo + len(q), :kk] = ids[top.indices.cpu().numpy()]
        return scores, found

    with torch_float32(device):
        V = torch.from_numpy(np.array(vecs, dtype=np.float32, copy=True)).to(device)  # store arrays are read-only
        try:
            yield search
        finally:
            V = None  # released before torch_float32 empties the cache


def _write_neighbors(tmp, schema, search, exact, ids, vecs, twins, k, batch_size, progress, layer) -> int:
    import pyarrow.parquet as pq
    from tqdm import tqdm

    written = 0
    with pq.ParquetWriter(tmp, schema) as writer, tqdm(total=len(ids), unit="q", desc=f"neighbors {layer}",
                                                     disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, len(ids), batch_size):
            block = neighbor_block(search, exact, lo, lo + batch_size, ids, vecs, twins, k, schema)
            writer.write_table(block)
            written += block.num_rows
            bar.update(min(batch_size, len(ids) - lo))
    return written


def neighbors_schema(store, layer: str, ids: np.ndarray):
    """The Parquet schema of a k-NN graph file, with the store's provenance as metadata."""
    import pyarrow as pa

    schema = pa.schema([("id", pa.int64()), ("rank", pa.int32()), ("neighbor_id", pa.int64()), ("cosine", pa.float32())])
    return schema.with_metadata({b"vecsim": _provenance(store, [layer], ids).encode()})


def identical_twins(store) -> dict:
    """Per stimulus with identical ones (the same model input), the ids of the others."""
    return {int(i): g[g != i] for g in store.lookup().identical_groups() for i in g}


def neighbor_block(search, exact: bool, lo: int, hi: int, ids, vecs, twins: dict, k: int, schema):
    """The k-NN graph rows of the stored stimuli at positions ``lo:hi`` (one row group of the file)."""
    import pyarrow as pa

    q_ids, q = ids[lo:hi], vecs[lo:hi]
    # deeper only as far as this batch's twins need (they are dropped from the results)
    extra = max((len(twins[i]) for i in q_ids.tolist() if i in twins), default=0)
    if exact:
        scores, found = search(q, k + 1 + extra)
    else:  # candidates from the approximate index, rescored on the stored vectors
        scores, found = _rescore(q, search(q, REFINE * (k + 1 + extra))[1], ids, vecs, k + 1 + extra)
    rows_id, rows_rank, rows_nb, rows_cos = [], [], [], []
    for qi, (srow, frow) in enumerate(zip(scores, found)):
        same = twins.get(int(q_ids[qi]), ()) if np.any(q[qi]) else ()
        keep = _rank_with_twins(srow, frow, drop=[q_ids[qi], *same], first=same, k=k)
        rows_id += [q_ids[qi]] * len(keep)
        rows_rank += list(range(1, len(keep) + 1))
        rows_nb += [f for _, f in keep]
        rows_cos += [s for s, _ in keep]
    return pa.table([
        pa.array(rows_id, pa.int64()), pa.array(rows_rank, pa.int32()), pa.array(rows_nb, pa.int64()),
        pa.array(np.clip(np.asarray(rows_cos, np.float32), -1, 1), pa.float32()),
    ], schema=schema)


# -- similarity -----------------------------------------------------------------------------

def _select(store, layers: list[str], where: str | None):
    allowed = allowed_ids(store, where)
    lookup = store.lookup()
    loaded = {}
    ids = None
    for layer in layers:
        layer_ids, vecs = store.vectors(layer) if allowed is None else store.vectors_for(layer, allowed)
        if ids is not None and not np.array_equal(ids, layer_ids):
            raise QueryError(f"layer {layer} holds other stimuli than {layers[0]}; run `vecsim verify`")
        ids = layer_ids
        loaded[layer] = vecs
    if ids is None or len(ids) == 0:
        raise QueryError(f"no stimulus matches --where {where!r}" if where else "the store holds no stimuli")
    pos = lookup.position(ids)
    return ids, loaded, [str(p) for p in lookup.paths[pos]], list(lookup.labels[pos])


def _check_metric(store, layers: list[str], metric: str) -> None:
    if metric not in ("cosine", "correlation"):
        raise ConfigError(f"unknown metric {metric!r}; choose cosine or correlation")
    for layer in layers:
        built = store.layer_info(layer)["reducer"]["config"]["similarity"]
        if built != metric:
            raise ConfigError(
                f"layer {layer} was indexed for {built} similarity; --metric {metric} needs a store built with "
                f"`vecsim index --similarity {metric}`"
            )


def similarity(store, out: str | os.PathLike | None = None, *, layers: list[str] | None = None,
               metric: str | None = None, distance: bool = False, dtype: str = "float32", where: str | None = None,
               triangle: str = "full", overwrite: bool = False, device: str = "auto",
               memory_limit_bytes: int | None = None, progress: Callable | None = None):
    """Pairwise similarity (or 1 − s) matrices of the stored vectors, tile by tile.

    With ``out`` (.npy, .parquet, .h5) writes the file and returns a summary; without it,
    returns the (N, N) array of one layer (or (L, N, N)) when it fits in memory.
    ``device``: where the tiles are computed, ``auto`` (the GPU when torch sees one), ``cpu``
    or ``cuda[:N]``; the values are the same to float32 rounding.
    """
    from vecsim import similarity as sim
    from vecsim.extract import resolve_device

    device = resolve_device(device)
    layers = layers or store.layers
    for layer in layers:
        store.layer_info(layer)
    metric = metric or store.layer_info(layers[0])["reducer"]["config"]["similarity"]
    _check_metric(store, layers, metric)
    ids, loaded, paths, labels = _select(store, layers, where)
    identical = _identical_rows(store, ids)
    if out is None:
        n = len(ids)
        need = len(layers) * n * n * (4 if dtype == "float32" else 2)
        if need > 4 * 2**30:
            raise QueryError(f"the matrix needs {need / 2**30:.1f} GB; write it to a file with --out instead")
        mats = [sim.similarity_matrix(loaded[layer], dtype=dtype, distance=distance, identical=identical,
                                      device=device) for layer in layers]
        return (mats[0] if len(mats) == 1 else np.stack(mats)), ids
    extra = {"memory_limit_bytes": memory_limit_bytes} if memory_limit_bytes else {}
    return sim.export_similarity(
        loaded, out, ids=ids, paths=paths, labels=labels, metadata=_provenance_dict(store, layers, where),
        metric=metric, distance=distance, dtype=dtype, triangle=triangle, overwrite=overwrite, device=device,
        progress=progress, identical=identical, **extra,
    )


def _identical_rows(store, ids: np.ndarray) -> list[list[int]]:
    """Groups of row positions (in ``ids`` order, which need not be sorted) of identical
    stimuli (the same model input, StimulusLookup): their similarity is exactly 1, like a
    stimulus's with itself."""
    ids = np.asarray(ids, dtype=np.int64)
    groups = store.lookup().identical_groups()
    if not groups or not len(ids):
        return []
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    out = []
    for group in groups:
        pos = np.searchsorted(ordered, group)
        hit = (pos < len(ids)) & (ordered[np.minimum(pos, len(ids) - 1)] == group)
        if hit.sum() > 1:
            out.append(np.sort(order[pos[hit]]).tolist())
    return out


def _provenance_dict(store, layers: list[str], where: str | None = None) -> dict:
    m = store.manifest
    return {
        "store": str(store.path.resolve()),
        "model": m["model"],
        "preprocessing": m["preprocessing"],
        "layers": {layer: m["layers"][layer]["reducer"] for layer in layers},
        "where": where,
        "store_status": m.get("status"),  # not "complete": the stimuli committed so far
        "seeds": m.get("seeds"),
        "versions": m.get("versions"),
        "source": m.get("source"),
    }


def _provenance(store, layers: list[str], ids: np.ndarray) -> str:
    import json

    return json.dumps({**_provenance_dict(store, layers), "rows": "id order", "n": int(len(ids))})


def _check_output(out: Path, overwrite: bool, suffixes: tuple[str, ...]) -> None:
    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"{out} must end in {' or '.join(suffixes)}")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise ConfigError(f"folder {out.parent} does not exist")
