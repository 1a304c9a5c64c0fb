"""What the web app shows, computed from stores with the same library calls as the CLI
(``Store.info``, ``Store.query``, ``query.allowed_ids``, ``report.fidelity``). No web
framework here: ``app.py`` turns these dicts into pages and JSON.

A :class:`ServedStore` is opened once and shared by every request; its lock serialises the
calls into the store (its caches, the model's hooks during an upload's forward pass), so
many clients at once get the same answers as one.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import numpy as np

from vecsim.errors import QueryError, StimulusSetError

K_MAX = 100  # neighbours per layer a page or an API call may ask for
PAGE_MAX = 500  # stimuli per browse page
WHERE_MAX = 1000  # characters of a --where filter
UPLOAD_MAX_PIXELS = 40_000_000  # an upload above this is refused from its header (the store's limit if lower)


class ServedStore:
    """One store opened for serving: the Store, its lock, where its images are."""

    def __init__(self, path, source: str | Path | None = None):
        from vecsim.store import Store

        self.store = Store.open(path)
        self.lock = threading.RLock()
        self.source = Path(source) if source is not None else None
        self._fidelity: dict[tuple[str, bool], dict | None] = {}
        self._matrices: dict[str, dict] = {}

    @property
    def name(self) -> str:
        return self.store.path.name

    def warm(self) -> None:
        """Read what every request needs once, before the first request (the stimulus lookup
        and each layer's index), so the first visitor does not wait for it."""
        with self.lock:
            self.store.lookup()
            for layer in self.store.layers:
                self.store.index(layer)

    def image_root(self) -> Path:
        """The stimulus folder: ``--source`` when given, else the one recorded at indexing."""
        return self.source if self.source is not None else Path(str(self.store.manifest["source"].get("root") or ""))

    def source_problem(self) -> str | None:
        """Why the images cannot be shown (the folder has moved), or None."""
        if self.store.manifest["source"].get("source") == "vectors":
            return "this store was built from vectors, without images"
        root = self.image_root()
        if not root.is_dir():
            return (f"the stimulus folder {root} does not exist (moved?); start `vecsim serve` with "
                    "--source DIR pointing at the folder that holds the images")
        return None

    def image_path(self, stim_id: int) -> Path:
        """The file of a stored stimulus, found by its id only (never a path from a request)."""
        with self.lock:
            lookup = self.store.lookup()
            lookup.check_id(stim_id)
            rel = str(lookup.paths[lookup.position(np.array([stim_id]))[0]])
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts:
            raise StimulusSetError(f"stimulus {stim_id}'s recorded path {rel!r} is not inside the stimulus folder")
        return self.image_root() / rel

    def stimulus(self, stim_id: int) -> dict:
        with self.lock:
            lookup = self.store.lookup()
            lookup.check_id(stim_id)
            pos = lookup.position(np.array([stim_id]))[0]
            twins = lookup.twins_of(stim_id)
        return {"id": int(stim_id), "path": str(lookup.paths[pos]), "label": lookup.labels[pos],
                "twins": [int(t) for t in twins if t != stim_id]}

    def fidelity(self, layer: str, every_dim: bool = True) -> dict | None:
        """The layer's fidelity report (``vecsim report``'s numbers), computed once; None
        without an evaluation subset. ``every_dim=False``: at the stored dim only (what the
        overview shows; a sixth of the work on a 256-dim layer)."""
        from vecsim.errors import StoreError
        from vecsim.report import fidelity

        with self.lock:
            dims = None if every_dim else [self.store.dim(layer)]
            key = (layer, every_dim)
            if key not in self._fidelity:
                if not every_dim and (layer, True) in self._fidelity:
                    return self._fidelity[(layer, True)]
                try:
                    self._fidelity[key] = fidelity(self.store, layer, dims)
                except StoreError:
                    self._fidelity[key] = None
            return self._fidelity[key]


async def call_locked(served: ServedStore, work, quick: bool = True):
    """``work()`` under the store's lock, from an async route. A ``quick`` call (a query by
    id: a few milliseconds) runs right here when the lock is free, saving the two thread
    switches of a worker thread (most of a loopback request's latency on a busy machine);
    otherwise, or when another request holds the lock (an upload's forward pass), it runs
    in a worker thread, never blocking the event loop."""
    if quick and served.lock.acquire(blocking=False):
        try:
            return work()
        finally:
            served.lock.release()
    from starlette.concurrency import run_in_threadpool

    def locked():
        with served.lock:
            return work()

    return await run_in_threadpool(locked)


def upload_max_pixels(store) -> int:
    """Uploads above this many pixels are refused from their header: the store's
    ``--max-pixels``, at most UPLOAD_MAX_PIXELS (a server decodes images strangers send)."""
    return min(store.manifest["config"].get("max_pixels") or UPLOAD_MAX_PIXELS, UPLOAD_MAX_PIXELS)


def check_k(k: int) -> int:
    if not 1 <= int(k) <= K_MAX:
        raise QueryError(f"k must lie in 1..{K_MAX}, got {k}")
    return int(k)


def check_where(where: str | None) -> str | None:
    where = (where or "").strip() or None
    if where is not None and len(where) > WHERE_MAX:
        raise QueryError(f"the filter is {len(where)} characters long; at most {WHERE_MAX}")
    return where


# -- overview and browse -------------------------------------------------------------------

def overview(served: ServedStore, failures_shown: int = 20) -> dict:
    """``vecsim info --json``'s fields, the layers in depth order with their fidelity
    (Spearman and recall on the evaluation subset, as ``vecsim report`` gives them), and the
    first failures."""
    with served.lock:
        info = served.store.info()
        depth = served.store.layers_by_depth()
        failures = served.store.failures().slice(0, failures_shown).to_pylist() if info["counts"]["failures"] else []
    layers = []
    for name in depth:
        fid = served.fidelity(name, every_dim=False)
        last = fid["rows"][-1] if fid else {}
        layers.append({"name": name, **info["layers"][name],
                       "spearman": last.get("spearman"), "recall_at_k": last.get("recall_at_k"),
                       "recall_k": fid["recall_k"] if fid else None, "eval_M": fid["M"] if fid else None})
    return {"info": info, "layers": layers, "failures": failures, "source_problem": served.source_problem()}


def browse(served: ServedStore, *, page: int = 1, per_page: int = 60, where: str | None = None,
           search: str | None = None) -> dict:
    """A page of stimuli in id order, filtered by a ``--where`` condition and a substring of the path."""
    from vecsim.query import allowed_ids

    if page < 1:
        raise QueryError(f"page must be at least 1, got {page}")
    if not 1 <= per_page <= PAGE_MAX:
        raise QueryError(f"per_page must lie in 1..{PAGE_MAX}, got {per_page}")
    where = check_where(where)
    with served.lock:
        lookup = served.store.lookup()
        allowed = allowed_ids(served.store, where)
    keep = np.ones(len(lookup.ids), dtype=bool) if allowed is None else np.isin(lookup.ids, allowed)
    if search:
        needle = search.lower()
        keep &= np.fromiter((needle in p.lower() for p in lookup.paths), dtype=bool, count=len(lookup.paths))
    rows = np.flatnonzero(keep)
    pages = max(1, -(-len(rows) // per_page))
    chosen = rows[(page - 1) * per_page : page * per_page]
    items = [{"id": int(lookup.ids[r]), "path": str(lookup.paths[r]), "label": lookup.labels[r]} for r in chosen]
    return {"total": int(len(rows)), "page": page, "pages": pages, "per_page": per_page, "where": where,
            "search": search or None, "items": items}


# -- neighbours ------------------------------------------------------------------------------

def neighbourhood(served: ServedStore, *, id: int | None = None, image: bytes | None = None, k: int = 10,
                  where: str | None = None, hide_twins: bool = False, device: str = "cpu") -> dict:
    """The k nearest stimuli per layer, layers in depth order, and per pair of consecutive
    layers how many neighbours the deeper one keeps.

    For a stored stimulus (``id``) the stimulus itself is left out (the page shows it as the
    query); its identical twins (the same model input) come first at cosine 1 unless
    ``hide_twins``. For an uploaded ``image`` (bytes, decoded in memory as ``query --image``)
    a stored copy of it comes first at cosine 1 unless ``hide_twins``.
    """
    k = check_k(k)
    where = check_where(where)
    store = served.store
    with served.lock:
        if image is not None:
            hits = store.query(image=image, k=k, where=where, exclude_self=hide_twins, device=device,
                               max_pixels=upload_max_pixels(store))
            query_info = None
        else:
            query_info = served.stimulus(id)
            twins = query_info["twins"] if hide_twins else []
            hits = store.query(id=id, k=k + len(twins), where=where, exclude_self=True)
            hits = [h for h in hits if h["id"] not in set(twins)]
        layers = store.layers_by_depth()
    identical = _identical_ids(hits, query_info)
    by_layer = {layer: [] for layer in layers}
    for hit in hits:
        if len(by_layer[hit["layer"]]) < k:
            by_layer[hit["layer"]].append({**hit, "rank": len(by_layer[hit["layer"]]) + 1,
                                           "twin": hit["id"] in identical})
    label = query_info["label"] if query_info else None
    for column in by_layer.values():
        for hit in column:
            hit["same_label"] = label is not None and hit["label"] == label
    return {"query": query_info, "k": k, "where": where, "hide_twins": hide_twins,
            "layers": [{"layer": layer, "hits": by_layer[layer]} for layer in layers],
            "survival": survival(by_layer, layers)}


def _identical_ids(hits: list[dict], query_info: dict | None) -> set[int]:
    """Ids among the hits identical to the query: its twins, or for an upload the stored
    stimuli with the same model input, which the query puts first at cosine exactly 1 (a
    stored cosine is the inner product of vectors of norm at most 1: below 1 otherwise)."""
    if query_info is not None:
        return set(query_info["twins"])
    return {h["id"] for h in hits if h["cosine"] == 1.0}


def survival(by_layer: dict[str, list[dict]], layers: list[str]) -> list[dict]:
    """Per consecutive pair of layers: how many of the shallower layer's neighbours are
    among the deeper one's (both lists as shown)."""
    out = []
    for a, b in zip(layers, layers[1:]):
        ids_a, ids_b = {h["id"] for h in by_layer[a]}, {h["id"] for h in by_layer[b]}
        n = max(len(ids_a), 1)
        shared = len(ids_a & ids_b)
        out.append({"from": a, "to": b, "kept": shared, "of": len(ids_a), "fraction": shared / n})
    return out


def stimulus_in(served: ServedStore, path: str) -> int:
    """The id of the stimulus with this stored path in another served store (two stores of
    the same stimuli need not number them alike)."""
    with served.lock:
        return served.store.lookup().id_of_path(path)


# -- layer: the evaluation subset's similarity matrices ------------------------------------------

def layer_matrices(served: ServedStore, layer: str) -> dict:
    """The layer's evaluation subset ordered by label (then id): exact raw similarities and
    the stored ones (as every vecsim command reports them), with the fidelity figures."""
    with served.lock:
        if layer not in served._matrices:
            served._matrices[layer] = _layer_matrices(served, layer)
        return served._matrices[layer]


def _layer_matrices(served: ServedStore, layer: str) -> dict:
    from vecsim.report import _stored_similarity, layer_subset

    data = layer_subset(served.store, layer)
    labels = data["labels"]
    keys = [("" if labels is None or labels[i] is None else str(labels[i]), int(data["ids"][i]))
            for i in range(len(data["ids"]))]
    order = np.array(sorted(range(len(keys)), key=lambda i: keys[i]), dtype=np.int64)
    exact = data["exact"][np.ix_(order, order)]
    vectors = np.asarray(data["vectors"], dtype=np.float64)
    stored = _stored_similarity(vectors, data["twins"])
    # a stimulus with itself: exactly 1, as a query reports it (an all-zero vector: 0 with everything)
    stored[np.diag_indices(len(stored))] = np.where(np.any(vectors != 0, axis=1), 1.0, 0.0)
    stored = stored[np.ix_(order, order)]
    ordered_labels = [keys[i][0] or None for i in order]
    groups = []
    for i, lab in enumerate(ordered_labels):
        if not groups or groups[-1]["label"] != lab:
            groups.append({"label": lab, "start": i, "count": 0})
        groups[-1]["count"] += 1
    return {"layer": layer, "ids": data["ids"][order].tolist(), "labels": ordered_labels, "groups": groups,
            "exact": exact, "stored": stored, "vmin": float(min(exact.min(), stored.min())),
            "fidelity": served.fidelity(layer)}


def heatmap_png(matrix: np.ndarray, groups: list[dict], vmin: float, vmax: float, side: int = 520) -> bytes:
    """A similarity matrix as a PNG (viridis, nearest-neighbour scaled to about ``side``
    pixels) with white lines between label groups."""
    from matplotlib import colormaps
    from PIL import Image

    m = len(matrix)
    span = vmax - vmin if vmax > vmin else 1.0
    rgb = (colormaps["viridis"](np.clip((matrix - vmin) / span, 0, 1))[..., :3] * 255).astype(np.uint8)
    scale = max(1, side // max(m, 1))
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    for g in groups[1:]:
        edge = g["start"] * scale
        rgb[edge, :] = 255
        rgb[:, edge] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# -- thumbnails ---------------------------------------------------------------------------------

class Thumbnails:
    """PNG thumbnails made on demand from the source images, kept in memory (least recently
    used first out, at most ``max_bytes``): nothing is written to disk."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, served: ServedStore, store_key: int, stim_id: int, size: int) -> bytes:
        key = (store_key, int(stim_id), int(size))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = make_thumbnail(served.image_path(stim_id), size, served.store.manifest["config"].get("max_pixels") or 0)
        with self._lock:
            if key not in self._cache and len(data) <= self.max_bytes:
                self._cache[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._bytes -= len(old)
        return data

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes


def make_thumbnail(path: Path, size: int, max_pixels: int = 0) -> bytes:
    """The image decoded as vecsim decodes stimuli (hostile-image protections, EXIF rotation,
    RGB), shrunk to fit ``size`` × ``size`` when larger (small images stay as they are; the
    page scales them up pixel by pixel), as PNG."""
    from vecsim.stimuli import decode_image

    return png_thumbnail(decode_image(path, max_pixels).image, size)


def upload_preview(data: bytes, store, size: int = 256) -> str:
    """An uploaded image as a ``data:`` URI thumbnail for its page (never stored)."""
    import base64

    from vecsim.stimuli import decode_bytes

    png = png_thumbnail(decode_bytes(data, upload_max_pixels(store)).image, size)
    return "data:image/png;base64," + base64.b64encode(png).decode()


def png_thumbnail(img, size: int) -> bytes:
    from PIL import Image

    if max(img.size) > size:
        img = img.copy()
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def placeholder_png(size: int = 64) -> bytes:
    """A grey square with a cross: the image of a stimulus whose file cannot be read."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(img)
    draw.line((8, 8, size - 9, size - 9), fill=(160, 160, 160), width=3)
    draw.line((8, size - 9, size - 9, 8), fill=(160, 160, 160), width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

