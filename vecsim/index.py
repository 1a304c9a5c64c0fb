"""FAISS indexes over the reduced vectors: build, save, load, search. Numpy in, numpy out.

Ids in every index are stimulus ids (int64), never row positions. Vectors are unit
activation vectors projected (norm at most 1) and the metric is inner product, so scores
are the stored cosine estimates.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from vecsim.errors import DimensionMismatchError, StoreError


def check_vectors(vectors: np.ndarray, dim: int | None = None, name: str = "vectors") -> np.ndarray:
    """float32, C-contiguous, 2-D, and of the expected width (copies only when needed)."""
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise DimensionMismatchError(f"{name} must be 2-D (n, dim), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DimensionMismatchError(f"{name} have {arr.shape[1]} dims, the index has {dim}")
    return arr


def check_ids(ids, n: int) -> np.ndarray:
    arr = np.ascontiguousarray(ids, dtype=np.int64)
    if arr.shape != (n,):
        raise DimensionMismatchError(f"expected {n} int64 ids, got shape {arr.shape}")
    return arr


def new_flat_index(dim: int):
    import faiss

    return faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))


def add(index, vectors: np.ndarray, ids) -> None:
    vectors = check_vectors(vectors, index.d)
    index.add_with_ids(vectors, check_ids(ids, vectors.shape[0]))


def save_index(index, path: Path) -> None:
    """Write atomically: temporary file, fsync, rename (a GPU index is copied to the CPU first)."""
    import faiss

    index = to_cpu(index)
    from vecsim._io import fsync_replace

    tmp = Path(str(path) + ".tmp")
    try:
        faiss.write_index(index, str(tmp))
        fsync_replace(tmp, path)
    finally:  # a failed write (disk full) leaves no temporary file behind
        tmp.unlink(missing_ok=True)


def load_index(path: Path):
    import faiss

    if not Path(path).is_file():
        raise StoreError(f"index file {path} is missing")
    try:
        return faiss.read_index(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StoreError(f"cannot read FAISS index {path}: {first[:200]}") from None


def search(index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None):
    """(scores, ids) of the k best per query; ``allowed_ids`` restricts the search itself.

    Missing results (fewer than k candidates) have id -1.
    """
    import faiss

    queries = check_vectors(queries, index.d, "queries")
    k = int(k)
    # exact scans of one or a few queries are memory-bound: FAISS's BLAS path uses every
    # core for them, its default per-query loop only one
    faiss.cvar.distance_compute_blas_threshold = 1
    if allowed_ids is None:
        return index.search(queries, k)
    keep_alive: list = []
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
    keep_alive.append(selector)
    return index.search(queries, k, params=_search_params(index, selector, keep_alive))


def _search_params(index, selector, keep_alive: list):
    """SearchParameters of the type the index checks for (IVF and pre-transform indexes insist)."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        params = faiss.SearchParametersPreTransform()
        inner = _search_params(index.index, selector, keep_alive)
        params.index_params = inner
    elif isinstance(index, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=index.nprobe)
    elif isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=index.hnsw.efSearch)
    else:
        params = faiss.SearchParameters(sel=selector)
    keep_alive.append(params)
    return params


# -- index kinds -------------------------------------------------------------------------

FLAT_MAX = 250_000  # exact search up to here (a single query scans N x dim floats: ~2 ms at 100k x 256)
HNSW_MAX = 2_000_000
KINDS = ("auto", "flat", "hnsw", "ivf-pq")  # --index's own names; anything else is a FAISS factory string
RECALL_QUERIES = 1_000
RECALL_K = 10


def choose_kind(n: int, dim: int) -> str:
    """The automatic index choice: exact below FLAT_MAX, HNSW up to HNSW_MAX, else OPQ+IVF-PQ."""
    if n <= FLAT_MAX:
        return "flat"
    return "hnsw" if n <= HNSW_MAX else "ivf-pq"


def factory_string(kind: str, n: int, dim: int) -> str:
    """The FAISS factory string of an index kind (a factory string itself passes through)."""
    if kind == "flat":
        return "Flat"
    if kind == "hnsw":
        return "HNSW32"
    if kind == "ivf-pq":
        d2, m = _pq_layout(dim)
        nlist = max(16, min(65_536, int(4 * np.sqrt(max(n, 1)))))
        return f"OPQ{m}_{d2},IVF{nlist},PQ{m}"
    return kind


def _pq_layout(dim: int) -> tuple[int, int]:
    """(dims out of the OPQ rotation, PQ sub-quantizers): sub-vectors of 8 to 16 dims (up to
    64 of them; above 1,024 dims up to twice dim / 64), short enough codes to be worth it, long enough
    sub-vectors for k-means to train quickly. A dim with no such split (a prime, say) is
    rotated into the nearest dim below it that has one (at most 16 fewer): the rotation drops
    a few of its trained directions, which costs far less recall than sub-vectors of the
    whole dim (one sub-quantizer for a prime). Candidates are rescored with the stored
    vectors, so the cosines returned are exact either way."""
    for d in range(dim, max(7, dim - 17), -1):
        widest = 16 if d <= 1024 else 2 * -(-d // 64)
        m = next((m for m in range(min(64, d // 8), 0, -1) if d % m == 0 and d // m <= widest), None)
        if m is not None:
            return d, m
    return dim, next((m for m in range(min(64, dim // 8), 0, -1) if dim % m == 0), 1)


def faiss_reason(exc: BaseException) -> str:
    """The readable part of a FAISS error ("Error in <C++ signature> at <file>:<line>: <reason>")."""
    import re

    text = " ".join(str(exc).split()) or type(exc).__name__
    match = re.search(r" at \S+:\d+: (.*)$", text)
    reason = match.group(1) if match else text
    return re.sub(r"^Error: '.*?' failed: ", "", reason)[:200]


def check_index_spec(kind: str, dims) -> None:
    """Refuse an --index that FAISS cannot build for vectors of these widths (None: a width
    not known yet, where the string only has to build for some width), in one line; the
    automatic kinds always build."""
    from vecsim.errors import ConfigError

    if kind in KINDS:
        return
    if "IDMap" in kind:
        raise ConfigError(f"--index {kind!r}: leave IDMap out of the factory string (vecsim maps stimulus ids itself)")
    dims = list(dims)
    for dim in sorted({int(d) for d in dims if d is not None}):
        new_index(kind, dim, FLAT_MAX)
    if None in dims:
        errors = []
        for dim in (256, 240, 192, 128, 96, 64, 32):
            try:
                new_index(kind, dim, FLAT_MAX)
                return
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]


def new_index(kind: str, dim: int, n: int):
    """An empty index of ``kind`` (flat, hnsw, ivf-pq, or any FAISS factory string), inner product."""
    import faiss

    from vecsim.errors import ConfigError

    spec = factory_string(kind, n, dim)
    try:
        base = faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except Exception as exc:
        raise ConfigError(f"--index {kind!r} cannot index {dim}-dim vectors: {faiss_reason(exc)}") from None
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efConstruction = 80
        base.hnsw.efSearch = 128
    if _supports_ids(base):
        return base, spec
    return faiss.IndexIDMap2(base), spec


def _chain(index):
    """The index and the ones it wraps (ID map, pre-transform, a refine's base), outermost
    first, each downcast."""
    import faiss

    inner = faiss.downcast_index(index)
    yield inner
    while True:
        wrapped = getattr(inner, "index", None) or getattr(inner, "base_index", None)
        if wrapped is None:
            return
        inner = faiss.downcast_index(wrapped)
        yield inner


def _first(index, kinds):
    """The outermost index of the chain that is one of ``kinds``, or None."""
    return next((inner for inner in _chain(index) if isinstance(inner, kinds)), None)


def _supports_ids(index) -> bool:
    import faiss

    inner = next((i for i in _chain(index) if not isinstance(i, faiss.IndexPreTransform)), None)
    return isinstance(inner, faiss.IndexIVF)


def needs_training(index) -> bool:
    return not index.is_trained


def training_size(index) -> int:
    """Vectors to train an index on: ~50 per IVF list (and enough for PQ codebooks)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    return max(50 * ivf.nlist, 10_000) if ivf is not None else 10_000


def set_search_params(index, nprobe: int = 32) -> None:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)


RECALL_TARGET = 0.95


def _knob(index):
    """(object, attribute, candidate values) of the index's speed/recall setting, or None."""
    import faiss

    inner = _first(index, (faiss.IndexHNSW, faiss.IndexIVF))
    if isinstance(inner, faiss.IndexHNSW):
        return inner.hnsw, "efSearch", [64, 128, 256, 512, 1024, 2048]
    if isinstance(inner, faiss.IndexIVF):  # doubling up to every list (an exhaustive scan of the lists)
        return inner, "nprobe", [n for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if n < inner.nlist] \
            + [inner.nlist]
    return None


def tune_for_recall(index, vectors: np.ndarray, ids: np.ndarray, exclude: np.ndarray | None = None,
                    target: float = RECALL_TARGET, seed: int = 0) -> dict:
    """Raise efSearch (HNSW) or nprobe (IVF) until recall@10 on held-out queries reaches
    ``target`` (or the largest setting); returns the recall measured and the setting kept."""
    knob = _knob(index)
    result = recall_at_k(index, vectors, ids, seed=seed, exclude=exclude)
    if knob is None:  # nothing to raise: the recall is what it is, judged against the same target
        return {**result, "recall_target": target}
    holder, name, values = knob
    for value in values:
        setattr(holder, name, value)
        result = {**recall_at_k(index, vectors, ids, seed=seed, exclude=exclude), name: value}
        if result["recall_at_10"] >= target:
            break
    return {**result, "recall_target": target}


def filters_inside(index) -> bool:
    """Whether a filtered search can go through the index (FAISS cannot hand an ID map's
    translated filter to the base of a refine wrapper)."""
    import faiss

    return _first(index, faiss.IndexRefine) is None


def is_exact(index) -> bool:
    """Whether the index is an exact scan of the stored vectors: a flat index, in ID maps only
    (a transform in front of it, such as PCA or normalisation, changes the scores)."""
    import faiss

    for inner in _chain(index):
        if isinstance(inner, faiss.IndexFlat):
            return True
        if not isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return False
    return False


def to_cpu(index):
    """The index with every GPU part copied back to the CPU (``index_cpu_to_gpu`` keeps CPU
    wrappers such as IDMap or PreTransform around a GPU index, so look down the chain)."""
    import faiss

    if hasattr(faiss, "index_gpu_to_cpu") and any("Gpu" in type(part).__name__ for part in _chain(index)):
        return faiss.index_gpu_to_cpu(index)
    return index


def to_gpu(index, device: str):
    """The index on the GPU when faiss has GPU support and ``device`` is CUDA; else unchanged."""
    import faiss

    if not device.startswith("cuda") or not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return index
    gpu_id = int(device.split(":", 1)[1]) if ":" in device else 0
    try:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu_id, index)
    except Exception:  # some index types have no GPU version: stay on the CPU
        return index


def recall_at_k(index, vectors: np.ndarray, ids: np.ndarray, queries: int = RECALL_QUERIES, k: int = RECALL_K,
                seed: int = 0, exclude: np.ndarray | None = None) -> dict:
    """recall@k of ``index`` against exact search over ``vectors`` on held-out queries.

    Queries are stored vectors not used to train the index (``exclude``), or training
    vectors when there are no others (``held_out`` says which); exact neighbours come
    from a brute-force scan in blocks. Each query's own id is left out of both lists (k
    other stimuli each), as for a query that is not in the index: finding itself would
    count as a hit either way.
    """
    rng = np.random.default_rng([seed, 7])
    candidates = np.arange(len(ids)) if exclude is None else np.flatnonzero(~np.isin(ids, exclude))
    held_out = len(candidates) > 0
    if not held_out:  # the index was trained on every vector: its training vectors are the queries
        candidates = np.arange(len(ids))
    pick = rng.choice(candidates, size=min(queries, len(candidates)), replace=False)
    q = np.ascontiguousarray(vectors[pick])
    own = ids[pick]
    k = min(k, len(ids) - 1)
    if k < 1:  # a single stimulus: no other to find
        return {"recall_at_10": 1.0, "queries": int(len(q)), "k": 0, "held_out": held_out}
    best_scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_ids = np.full((len(q), k), -1, dtype=np.int64)
    for lo in range(0, len(ids), 65_536):
        block_ids = ids[lo : lo + 65_536]
        scores = q @ vectors[lo : lo + 65_536].T
        scores[own[:, None] == block_ids[None, :]] = -np.inf  # not itself
        cand_scores = np.concatenate([best_scores, scores], axis=1)
        cand_ids = np.concatenate([best_ids, np.broadcast_to(block_ids, scores.shape)], axis=1)
        top = np.argpartition(-cand_scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(cand_scores, top, axis=1)
        best_ids = np.take_along_axis(cand_ids, top, axis=1)
    _, found = index.search(q, k + 1)
    hits = 0
    for me, exact_row, found_row in zip(own.tolist(), best_ids, found):
        others = [i for i in found_row.tolist() if i != me and i >= 0][:k]
        hits += len(set(exact_row.tolist()) & set(others))
    return {"recall_at_10": hits / float(len(q) * k), "queries": int(len(q)), "k": int(k), "held_out": held_out}


# -- exact single queries, faster than a float32 scan ------------------------------------

SCAN_COPY_MIN = 20_000  # below this a float32 scan is already fast
SCAN_CANDIDATES = 256
SCAN_SHARD_MIN = 10_000  # rows per scan shard at least (one shard per core, up to 8)
INT8_SCAN_MAX_DIM = 1024  # int8 x int8 sums stay below 2^24, exact in float32, up to this width
SCAN_COPIES_KEPT = 8  # indexes whose copies are kept (one per layer of a store), least recently used goes
_scan_copies: "OrderedDict[int, dict]" = OrderedDict()


class _ScanCopy:
    """A compact copy of a flat IDMap index's vectors, split into shards searched in parallel.

    ``kind`` is ``"int8"`` (a quarter of float32's memory traffic: per-dimension scaled
    codes, scored exactly in integers against an integer-coded query) or ``"float16"``
    (half; a tighter error bound). ``shards`` is a threaded FAISS ``IndexShards`` of
    scalar-quantizer indexes whose results are row positions; ``xb`` the float32 rows
    (the index's own memory) and ``ids`` their ids (one array for both kinds). ``search``
    returns candidates with copy scores and a bound on how far any row's copy score is from
    its exact score.
    """

    def __init__(self, index, kind: str, ids: np.ndarray):
        import faiss

        flat = faiss.downcast_index(index.index)
        n, d = flat.ntotal, flat.d
        self.kind, self.d = kind, d
        self.index = index  # held, so the id() that keys the cache stays this index's
        self.xb = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
        self.ids = ids  # shared by the index's int8 and float16 copies
        chunk = 16_384  # every pass below goes by chunks of rows: no full-size temporary
        if kind == "int8":
            amax = np.zeros(d, dtype=np.float32)
            for a in range(0, n, chunk):
                np.maximum(amax, np.abs(self.xb[a : a + chunk]).max(axis=0), out=amax)
            self.scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            qtype = faiss.ScalarQuantizer.QT_8bit_direct_signed
        else:
            qtype = faiss.ScalarQuantizer.QT_fp16
        # residual: largest |x - decoded(x)|; norm: largest |x|; code_norm: largest |codes| (int8)
        self.residual = self.norm = self.code_norm = 0.0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        parts = max(1, min(cores, 8, n // SCAN_SHARD_MIN))
        self.parts = []  # the shards are owned here: IndexShards holds plain pointers
        self.shards = faiss.IndexShards(d, True, True)  # threaded; successive ids = row positions
        for p in range(parts):
            part = faiss.IndexScalarQuantizer(d, qtype, faiss.METRIC_INNER_PRODUCT)
            for a in range(n * p // parts, n * (p + 1) // parts, chunk):
                block = self.xb[a : min(a + chunk, n * (p + 1) // parts)]
                if kind == "int8":
                    codes = np.rint(block / self.scale)  # in [-127, 127]: integer-valued float32
                    decoded = codes * self.scale
                    self.code_norm = max(self.code_norm, _max_row_norm(codes))
                else:
                    codes = block
                    decoded = block.astype(np.float16).astype(np.float32)
                part.add(codes)
                self.residual = max(self.residual, _max_row_norm(block - decoded))
                self.norm = max(self.norm, _max_row_norm(block))
            self.parts.append(part)
            self.shards.add_shard(part)

    def search(self, q: np.ndarray, count: int):
        """``(scores, positions, bound)``: the ``count`` best rows by copy score, and a bound
        on ``|copy score - exact score|`` that holds for every row; None for a zero query."""
        qn = float(np.linalg.norm(q))
        # the float32 rescoring's own rounding (d terms), doubled for safety
        rounding = 2.0 * self.d * 2.0**-24 * qn * (self.norm + self.residual)
        if self.kind == "float16":
            scores, found = self.shards.search(q.reshape(1, -1), count)
            # q.x - q.decoded(x) = q.(x - decoded(x)); faiss sums the float16 side in float32
            return scores[0].astype(np.float64), found[0], qn * self.residual + 2 * rounding
        qs = q.astype(np.float64) * self.scale  # q.x = qs.codes + q.(x - decoded(x))
        top = float(np.abs(qs).max())
        if top == 0.0:
            return None
        step = top / 127.0
        qcodes = np.rint(qs / step)  # qs = step * qcodes + qerr
        qerr = float(np.linalg.norm(qs - step * qcodes))
        scores, found = self.shards.search(qcodes.astype(np.float32).reshape(1, -1), count)  # exact integers
        # |q.x - step * qcodes.codes| <= |qerr| |codes| + |q| |x - decoded(x)|
        return scores[0].astype(np.float64) * step, found[0], qerr * self.code_norm + qn * self.residual + rounding


def _max_row_norm(block: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64).max())) if len(block) else 0.0


def _scan_copy(index, kind: str) -> _ScanCopy:
    """The ``kind`` copy of ``index`` (built once, kept for the last few indexes used, so a
    query across a store's layers does not rebuild each layer's copy on every call)."""
    key = id(index)
    if key not in _scan_copies or _scan_copies[key]["n"] != index.ntotal:  # new, or vectors added since
        _scan_copies[key] = {"n": index.ntotal}
    _scan_copies.move_to_end(key)
    while len(_scan_copies) > SCAN_COPIES_KEPT:
        _scan_copies.popitem(last=False)
    entry = _scan_copies[key]
    if kind not in entry:
        import faiss

        if "ids" not in entry:
            entry["ids"] = faiss.vector_to_array(index.id_map).astype(np.int64)
        entry[kind] = _ScanCopy(index, kind, entry["ids"])
    return entry[kind]


def exact_search_one(index, query: np.ndarray, k: int):
    """Exact top-k of one query over a large flat index, or None when not applicable.

    A compact copy of the vectors (int8, then float16 when int8's bound is too loose to
    decide), scanned one shard per core, picks candidates; their exact float32 scores
    decide, and the result is returned only when provably exact: the k-th exact score
    beats every non-candidate's largest possible score (its copy score plus the bound
    on that copy's error). Otherwise None, and the caller scans in float32.
    """
    import faiss

    if not isinstance(index, faiss.IndexIDMap2) or not isinstance(faiss.downcast_index(index.index), faiss.IndexFlatIP):
        return None
    if index.ntotal < max(SCAN_COPY_MIN, 4 * SCAN_CANDIDATES) or k > SCAN_CANDIDATES // 2:
        return None
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
    kinds = ("int8", "float16") if index.d <= INT8_SCAN_MAX_DIM else ("float16",)
    for kind in kinds:
        copy = _scan_copy(index, kind)
        found = copy.search(q, SCAN_CANDIDATES)
        if found is None:
            return None
        approx, cand, bound = found
        if cand[-1] < 0:  # fewer rows than candidates (not reached above SCAN_COPY_MIN)
            return None
        exact = copy.xb[cand] @ q
        order = np.lexsort((copy.ids[cand], -exact))[:k]  # equal scores by id, as a scan in id order keeps them
        if exact[order[-1]] > approx[-1] + bound:  # beats the best any non-candidate could really score
            return exact[order].reshape(1, -1).astype(np.float32), copy.ids[cand[order]].reshape(1, -1)
    return None
