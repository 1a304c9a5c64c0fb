"""The store: manifest, LanceDB tables, FAISS and transform files. The only module that imports lancedb.

Layout::

    STORE/
      vecsim.json            manifest (format version, status, model, layers, reducers, versions)
      lance/                 stimuli, vectors_<layer>, failures, runs
      training_ids.npy       ids of the training sample the projections were fitted on
      scratch/training/      while the training pass runs: its prepared vectors in committed
                             chunks (TrainingScratch, write_chunk), deleted once the fit is committed
      layers/<layer>/        transform.faiss, index.faiss, spectrum.npy, spectrum_centred.npy,
                             in_sample_noise.npy (when the training vectors are shrunk)

The stimuli table is the commit record: a stimulus counts as indexed when its row is
there, and its vectors are always written before it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from vecsim._faults import kill_point
from vecsim._io import package_versions, write_json_atomic
from vecsim.errors import StoreError, StoreExistsError, StoreLockedError, UnknownLayerError, close_matches

NORM_SLACK = 1e-3  # a stored vector's norm is at most 1; float32 rounding may add this much
VECTORS_FOR_FILTER_MAX = 20_000  # Store.vectors_for: up to this many ids, a filtered read
FORMAT_VERSION = 2  # 2: vectors normalised before the projection (norm ≤ 1), not renormalised after
MANIFEST_NAME = "vecsim.json"
TRAINING_IDS = "training_ids.npy"
STATUSES = ("fitting", "indexing", "complete")
SCRATCH = "scratch"


def _lancedb():
    os.environ.setdefault("LANCEDB_LOG", "error")  # silence "No existing dataset ... will be created"
    import lancedb

    return lancedb


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def layer_slug(layer: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", layer).strip("_") or "layer"


def layer_slugs(layers) -> dict[str, str]:
    """A distinct folder/table name per layer, in order (``a.b`` and ``a_b`` would share one)."""
    slugs: dict[str, str] = {}
    taken: set[str] = set()
    for layer in layers:
        slug = layer_slug(layer)
        while slug in taken:
            slug += "_"
        slugs[layer] = slug
        taken.add(slug)
    return slugs


def _manifest_stamp(path: Path) -> tuple | None:
    """What changes when the manifest is rewritten (written atomically: a new file each time)."""
    try:
        st = (Path(path) / MANIFEST_NAME).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / MANIFEST_NAME
    if not Path(path).exists():
        raise StoreError(f"no store at {path}")
    if not manifest_path.is_file():
        raise StoreError(f"{path} is not a vecsim store (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{manifest_path} is damaged ({exc.__class__.__name__}: {exc}); it is not valid JSON") from None
    except OSError as exc:
        raise StoreError(f"cannot read {manifest_path} ({exc.strerror or type(exc).__name__})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise StoreError(f"{manifest_path} is not a vecsim manifest (no format_version)")
    version = manifest["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreError(f"{manifest_path} is damaged: format_version {version!r} is not a store format number")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by a newer vecsim (store format {version}, this vecsim reads up to "
            f"{FORMAT_VERSION}); upgrade vecsim to open it"
        )
    if version < FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by an older vecsim (store format {version}, whose vectors were renormalised "
            "after the projection, so new queries would not be comparable); index the stimuli again"
        )
    _check_manifest_shape(manifest_path, manifest)
    return manifest


def _check_manifest_shape(manifest_path: Path, manifest: dict) -> None:
    """The keys every reader indexes directly, with their types: a damaged or hand-edited
    manifest is one StoreError here, not a KeyError deep inside a command. Layer folder
    names must be plain names, so a manifest cannot point vecsim at files outside the store."""
    for key, kind in (("status", str), ("model", dict), ("source", dict), ("layers", dict)):
        if not isinstance(manifest.get(key), kind):
            raise StoreError(f"{manifest_path} is damaged: {key!r} is missing or not a{'n object' if kind is dict else ' string'}")
    for layer, entry in manifest["layers"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("reducer"), dict) or not isinstance(entry.get("table"), str):
            raise StoreError(f"{manifest_path} is damaged: layer {layer!r} has no reducer or table")
        slug = entry.get("slug")
        if not isinstance(slug, str) or not re.fullmatch(r"[A-Za-z0-9_]+", slug):
            raise StoreError(f"{manifest_path} is damaged: layer {layer!r} has an invalid folder name {slug!r}")


# -- schemas ---------------------------------------------------------------------

def stimuli_schema(extra=None, extra_columns: Iterable[str] = ()):
    import pyarrow as pa

    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        # sha256 of the model input's pixels (models.Preprocessing.prepare): equal for files that
        # differ in bytes but give the model the same input; null in stores written before it
        pa.field("input_sha256", pa.string()),
    ]
    for name in extra_columns:
        kind = extra.field(name).type if extra is not None else pa.string()
        if pa.types.is_null(kind):
            kind = pa.string()
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def vectors_schema(dim: int):
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.int64(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), int(dim)), nullable=False),
        pa.field("raw_norm", pa.float32(), nullable=False),
    ])


def failures_schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.int64()),
        pa.field("path", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("layer", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("run", pa.int64(), nullable=False),
    ])


def runs_schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("run", pa.int64(), nullable=False),
        pa.field("command", pa.string(), nullable=False),
        pa.field("started", pa.string(), nullable=False),
        pa.field("finished", pa.string()),
        pa.field("indexed", pa.int64(), nullable=False),
        pa.field("failed", pa.int64(), nullable=False),
        pa.field("seconds", pa.float64()),
        pa.field("config", pa.string(), nullable=False),
        pa.field("versions", pa.string(), nullable=False),
    ])


# -- reading ---------------------------------------------------------------------

class Store:
    """A vecsim store opened for reading. ``Store.open(path)``."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._db = None
        self._indexes: dict[str, Any] = {}
        self._reducers: dict[tuple[str, str], Any] = {}
        self._lookup = None
        self._model = None  # (key, module): load_model's last model
        self._stamp = _manifest_stamp(self.path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        return cls(Path(path), read_manifest(Path(path)))

    def _fresh(self) -> None:
        """Follow a writer: when the manifest was rewritten since it was read (``vecsim add``
        committed, a resumed or new index run), read it again and drop every cache (FAISS
        indexes, the id ↔ path lookup, reducers), so the indexes and the stimulus table read
        next belong together. One ``stat`` per call."""
        stamp = _manifest_stamp(self.path)
        if stamp != self._stamp:
            self.manifest = read_manifest(self.path)
            self._indexes.clear()
            self._reducers.clear()
            self._lookup = None
            self._model = None
            self._stamp = stamp

    # basic facts
    @property
    def layers(self) -> list[str]:
        return list(self.manifest.get("layers", {}))

    def layers_by_depth(self) -> list[str]:
        """The layers in the model's forward-pass order (recorded at indexing); in a store
        indexed before it was recorded, the order they were listed in."""
        depth = {layer: self.layer_info(layer).get("depth") for layer in self.layers}
        if any(d is None for d in depth.values()):
            return self.layers
        return sorted(self.layers, key=lambda layer: depth[layer])

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    def layer_info(self, layer: str) -> dict:
        try:
            return self.manifest["layers"][layer]
        except KeyError:
            raise UnknownLayerError(
                f"store has no layer {layer!r}{close_matches(layer, self.layers)}; its layers: {', '.join(self.layers)}"
            ) from None

    def layer_dir(self, layer: str) -> Path:
        return self.path / "layers" / self.layer_info(layer)["slug"]

    def dim(self, layer: str) -> int:
        fit = self.layer_info(layer)["reducer"].get("fit")
        if fit:
            return int(fit["dim"])
        # a run stopped while fitting (its manifest names no fit yet) may have committed
        # vectors: their width is the vectors table's
        field = self.table(self.layer_info(layer)["table"]).schema.field("vector")
        return int(field.type.list_size)

    # tables
    @property
    def db(self):
        if self._db is None:
            lance_dir = self.path / "lance"
            if not lance_dir.is_dir():
                raise StoreError(f"{self.path} has no lance/ folder; the store is damaged or was never written")
            self._db = _lancedb().connect(str(lance_dir))
        return self._db

    def table(self, name: str):
        try:
            return self.db.open_table(name)
        except Exception as exc:
            if self.manifest.get("status") == "fitting":  # stopped (or still running) before its first commit
                raise StoreError(f"{self.path} has no committed stimuli yet: its index run stopped (or is still running) "
                                 f"while fitting; finish it with `vecsim index --resume {self.path}`") from None
            raise StoreError(f"{self.path}: table {name!r} cannot be opened ({type(exc).__name__}); run `vecsim verify`") from None

    def _read(self, name: str, columns: list[str] | None = None):
        table = self.table(name)
        try:
            return read_table(table, columns)
        except Exception as exc:  # damaged data files: name the table, one line
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise StoreError(f"{self.path}: table {name!r} cannot be read ({type(exc).__name__}: {first}); "
                             "run `vecsim verify`") from None

    def stimuli(self):
        """All indexed stimuli as an Arrow table, in id order."""
        table = self._read("stimuli")
        return table.sort_by("id")

    def failures(self):
        return self._read("failures")

    def runs(self):
        """The runs table (Arrow), by run number: one row per index or add run, a stopped
        index run's with ``finished`` and ``seconds`` empty."""
        return self._read("runs").sort_by("run")

    def vectors(self, layer: str, as_arrow: bool = False, committed_only: bool = True):
        """(ids int64, vectors float32 (n, dim)) in id order, or the Arrow table with ``as_arrow``.

        Only rows of committed stimuli, unless ``committed_only=False`` (``vecsim verify``, which
        must see stray rows too).
        """
        info = self.layer_info(layer)
        table = self._read(info["table"]).sort_by("id")
        # only committed stimuli: a writer appending right now writes a chunk's vectors
        # before its stimuli rows, and a reader must not see the half-written chunk
        if committed_only:
            committed = self.lookup().ids
            if table.num_rows != len(committed) or not np.array_equal(table.column("id").to_numpy(), committed):
                import pyarrow as pa
                import pyarrow.compute as pc

                table = table.filter(pc.is_in(table.column("id"), value_set=pa.array(committed)))
        if as_arrow:
            return table
        return table.column("id").to_numpy().astype(np.int64, copy=False), vector_matrix(table.column("vector"))

    def vectors_for(self, layer: str, ids) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of the given stimuli that are in the store, in id order.

        A short list is read with a filter on the table (a few rows of a large store); a long
        one is masked out of :meth:`vectors`.
        """
        wanted = np.unique(np.asarray(ids, dtype=np.int64))
        if len(wanted) > VECTORS_FOR_FILTER_MAX:
            all_ids, vecs = self.vectors(layer)
            mask = np.isin(all_ids, wanted)
            return all_ids[mask], vecs[mask]
        wanted = wanted[np.isin(wanted, self.lookup().ids)]  # committed stimuli only, as vectors() gives
        info = self.layer_info(layer)
        if len(wanted) == 0:
            return wanted, np.zeros((0, self.dim(layer)), dtype=np.float32)
        where = f"id IN ({', '.join(str(int(i)) for i in wanted)})"
        table = self.table(info["table"]).search().where(where).select(["id", "vector"]).limit(None).to_arrow()
        table = table.sort_by("id")
        return table.column("id").to_numpy(), vector_matrix(table.column("vector"))

    def vector_of(self, layer: str, stim_id: int) -> np.ndarray:
        """The stored vector of one stimulus, shape (1, dim)."""
        import faiss

        from vecsim.index import is_exact

        index = self.index(layer)
        # an exact index holds the stored vectors themselves (others may compress them)
        if is_exact(index) and isinstance(faiss.downcast_index(index), faiss.IndexIDMap2):
            try:
                return index.reconstruct(int(stim_id)).reshape(1, -1)
            except RuntimeError:  # faiss: "key N not found"
                raise StoreError(
                    f"stimulus {stim_id} is not in the FAISS index of {layer}; the index does not match the store "
                    "(run `vecsim verify`)"
                ) from None
        table = self.table(self.layer_info(layer)["table"])
        found = table.search().where(f"id = {int(stim_id)}").select(["vector"]).limit(1).to_arrow()
        if found.num_rows == 0:
            from vecsim.errors import UnknownStimulusError

            raise UnknownStimulusError(f"no vector for stimulus {stim_id} in layer {layer}")
        return vector_matrix(found.column("vector"))

    def raw_norms(self, layer: str):
        table = self._read(self.layer_info(layer)["table"], ["id", "raw_norm"]).sort_by("id")
        return table.column("id").to_numpy(), table.column("raw_norm").to_numpy()

    def index(self, layer: str):
        self._fresh()
        if layer not in self._indexes:
            import faiss

            from vecsim.index import _supports_ids, load_index

            path = self.layer_dir(layer) / "index.faiss"
            if not path.is_file() and not self.complete:
                # an index run still going or stopped writes the FAISS index at its end: answer
                # from the committed stimuli's vectors, scanned exactly
                from vecsim.index import add as index_add, new_flat_index

                ids, vecs = self.vectors(layer)
                index = new_flat_index(self.dim(layer))
                if len(ids):
                    index_add(index, vecs, ids)
                self._indexes[layer] = index
                return index
            index = load_index(path)
            dim = self.dim(layer)
            if index.d != dim:
                raise StoreError(f"{path} holds {index.d}-dim vectors, layer {layer} has {dim}; "
                                 "it is not this store's index (run `vecsim verify`)")
            if not isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) and not _supports_ids(index):
                raise StoreError(f"{path} is a {type(index).__name__} without stimulus ids; it is not this store's index")
            self._indexes[layer] = index
        return self._indexes[layer]

    def reducer(self, layer: str, device: str = "cpu"):
        key = (layer, device)
        if key not in self._reducers:
            from vecsim.reduce import LayerReducer

            info = self.layer_info(layer)
            self._reducers[key] = LayerReducer.load(layer, info["reducer"], self.layer_dir(layer), device)
        return self._reducers[key]

    def training_ids(self) -> np.ndarray:
        """Sorted ids (int64) of the training sample the projections were fitted on (empty for a
        store indexed before they were recorded)."""
        path = self.path / TRAINING_IDS
        return np.sort(np.load(path, allow_pickle=False)).astype(np.int64) if path.is_file() else np.zeros(0, np.int64)

    def in_sample_noise(self, layer: str) -> np.ndarray:
        """δ_d per kept dim d = 1..k of the training vectors' in-sample shrinkage
        (:func:`vecsim.reduce.in_sample_noise`); empty when they are not shrunk."""
        path = self.layer_dir(layer) / "in_sample_noise.npy"
        return np.load(path, allow_pickle=False) if path.is_file() else np.zeros(0)

    def eval_subset(self, layer: str) -> dict | None:
        """The layer's evaluation subset: ids, exact raw Gram, sums, units[, channels]; None if absent."""
        from vecsim.evalset import load_eval

        return load_eval(self.layer_dir(layer))

    def lookup(self):
        """id ↔ path/label arrays of the indexed stimuli (read once, cached until a writer
        commits a change)."""
        self._fresh()
        if self._lookup is None:
            from vecsim.query import StimulusLookup

            self._lookup = StimulusLookup(self.stimuli())
        return self._lookup

    # what users do with a store (vecsim.query)
    def query(self, **kwargs) -> list[dict]:
        """Nearest stimuli: ``query(id=3)``, ``query(path="cat/a.png", layer=..., k=5, where="label = 'cat'")``,
        ``query(image="new.jpg")``. See :func:`vecsim.query.query`."""
        from vecsim.query import query

        return query(self, **kwargs)

    def neighbors(self, layer: str, k: int, out, **kwargs) -> dict:
        """All-vs-all k-NN graph of a layer to Parquet. See :func:`vecsim.query.neighbors`."""
        from vecsim.query import neighbors

        return neighbors(self, layer, k, out, **kwargs)

    def similarity(self, out=None, **kwargs):
        """Pairwise similarity matrices, to a file or (when it fits) an array. See :func:`vecsim.query.similarity`."""
        from vecsim.query import similarity

        return similarity(self, out, **kwargs)

    def load_model(self, device: str = "cpu"):
        """The store's model on ``device`` and its recorded preprocessing, for new images.

        The model is kept for the next call on the same device while its checkpoint and
        factory files keep their size and modification time (a changed file is loaded again
        and its digest checked against the store's, as the first load did), so `vecsim serve`
        does not load it again for every upload. Like the store's other caches, the kept
        model is for one caller at a time (`vecsim serve` serialises each store's calls)."""
        from vecsim.models import Preprocessing, reload_model

        record = self.manifest["model"]
        key = (device, *(_file_stamp(record.get(name)) for name in ("checkpoint", "file")))
        if self._model is None or self._model[0] != key:
            self._model = None
            self._model = (key, reload_model(record).module.to(device))
        return self._model[1], Preprocessing.from_dict(self.manifest["preprocessing"])

    def spectrum(self, layer: str, centred: bool = False) -> np.ndarray:
        """Eigenvalues (descending) of the layer's training sample (rows unit length): of its
        second moment, the spectrum the projection was fitted on (centred for a ``--center``
        store), or with ``centred`` of its covariance (for a ``--center`` store the same file).
        Empty when not stored (``centred`` on a store indexed before it was recorded)."""
        name = "spectrum_centred.npy" if centred else "spectrum.npy"
        path = self.layer_dir(layer) / name
        if not path.is_file() and centred and self.layer_info(layer)["reducer"]["config"].get("center"):
            path = self.layer_dir(layer) / "spectrum.npy"
        return np.load(path, allow_pickle=False) if path.is_file() else np.zeros(0)

    # sizes
    def info(self) -> dict:
        """What ``vecsim info`` prints: manifest facts, counts, sizes on disk vs raw."""
        def unless_unfinished(read, empty):
            """``read()``, or ``empty`` where an unfinished store has no tables yet (it creates
            them with its first chunk)."""
            try:
                return read()
            except StoreError:
                if self.complete:
                    raise
                return empty

        def rows(table: str) -> int:
            return unless_unfinished(lambda: self.table(table).count_rows(), 0)

        counts = {"stimuli": rows("stimuli"), "failures": rows("failures")}
        layers = {}
        raw_total = 0
        for layer in self.layers:
            entry = self.layer_info(layer)
            red = entry["reducer"]
            units = int(np.prod(red["shape"]))
            raw_bytes = units * 4 * counts["stimuli"]
            raw_total += raw_bytes
            layer_dir = self.layer_dir(layer)
            # fixed costs of the fit: the transform and the training sample's spectra
            transform_bytes = sum(_size(layer_dir / name) for name in ("transform.faiss", "spectrum.npy",
                                                                      "spectrum_centred.npy")
                                  if (layer_dir / name).exists())
            eval_bytes = _size(layer_dir / "eval.npz") if (layer_dir / "eval.npz").exists() else 0
            vectors = rows(entry["table"])
            layers[layer] = {
                "shape": red["shape"],
                "units": units,
                "pooling": red["config"]["pooling"],
                "sketch_dim": red["sketch"]["dim"] if red.get("sketch") else None,
                "dim": red["fit"]["dim"] if red.get("fit") else None,
                "similarity": red["config"]["similarity"],
                "projection": "centred PCA" if red["config"]["center"] else "uncentred",
                "exact": red["fit"]["exact"] if red.get("fit") else None,
                "exact_pairs": exact_pairs(red.get("fit"), vectors, bool(red.get("sketch")),
                                           bool(red.get("config", {}).get("center"))),
                "energy_kept": red["fit"]["energy_kept"] if red.get("fit") else None,
                "n_train": red["fit"]["n_train"] if red.get("fit") else None,
                "vectors": vectors,
                "raw_bytes": raw_bytes,
                "transform_bytes": transform_bytes,
                "eval_bytes": eval_bytes,
                "eval_size": entry.get("eval", {}).get("size", 0),
                "index": entry.get("index", {}),
            }
        columns = ["run", "command", "started", "finished", "indexed", "failed", "seconds"]
        runs = unless_unfinished(lambda: self.runs().select(columns).to_pylist(), [])
        total = _size(self.path)
        transforms = sum(v["transform_bytes"] for v in layers.values())
        evals = sum(v["eval_bytes"] for v in layers.values())
        scratch = TrainingScratch(self.path).progress() if not self.complete else None
        data_bytes = total - transforms - evals - (scratch["bytes"] if scratch else 0)
        return {
            "path": str(self.path),
            "format_version": self.manifest["format_version"],
            "status": self.manifest["status"],
            "model": self.manifest["model"],
            "source": self.manifest["source"],
            "counts": counts,
            "runs": runs,
            "progress": None if self.complete else self._progress(scratch, counts["stimuli"]),
            "layers": layers,
            "bytes": {
                "store": total,
                "transforms": transforms,
                "eval_subset": evals,
                "scratch": scratch["bytes"] if scratch else 0,
                "data": data_bytes,
                "raw_activations": raw_total,
                "data_per_stimulus": data_bytes / counts["stimuli"] if counts["stimuli"] else 0.0,
                "raw_per_stimulus": raw_total / counts["stimuli"] if counts["stimuli"] else 0.0,
                "ratio": data_bytes / raw_total if raw_total else 0.0,
            },
        }


    def _progress(self, scratch: dict | None, committed: int) -> dict:
        """How far each pass of an unfinished index run got: the training pass's items in its
        scratch (of those planned) until the fit is committed, then the stimuli committed."""
        fitted = self.manifest["status"] == "indexing"
        training = {"fitted": fitted}
        if scratch is not None and not fitted:
            training.update(forwarded=scratch["items"], planned=scratch["planned"], kept=scratch["stimuli"],
                            chunks=scratch["chunks"], scratch_bytes=scratch["bytes"])
        return {"training_pass": training, "committed": committed}


def _creation_leftovers(path: Path) -> bool:
    """Whether ``path`` holds only what a run killed while creating its store leaves (the lock,
    an empty layers/ folder, the manifest's temporary file): safe to start afresh in."""
    for entry in path.iterdir():
        if entry.name in (".lock", MANIFEST_NAME + ".tmp"):
            continue
        if entry.name == "layers" and entry.is_dir() and not any(entry.iterdir()):
            continue
        return False
    return True


def exact_pairs(fit: dict | None, vectors: int, sketched: bool = False, centred: bool = False) -> str:
    """Which stored cosines equal the raw ones: ``all`` (the projection keeps the whole input
    space, or every stored stimulus was in the training sample it keeps exactly), ``training``
    (pairs with at least one training stimulus: the sample's span is kept, the rest is
    projected onto it) or ``none`` (an approximation; see the fidelity report). A count
    sketch before the projection estimates the raw cosines, so a sketched layer is ``none``;
    a ``--center`` store holds cosines of stimulus-centred vectors, never the raw ones: ``none``."""
    if not fit or sketched or centred:
        return "none"
    if fit.get("lossless") or (fit.get("exact") and fit.get("n_train", 0) >= vectors):
        return "all"
    return "training" if fit.get("exact") else "none"


def _file_stamp(path: str | None) -> tuple | None:
    """(path, size, modification time) of a file a model record names; None for none."""
    if not path:
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return (path, None, None)  # gone: the load that follows says so
    return (path, stat.st_size, stat.st_mtime_ns)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += (Path(root) / name).stat().st_size
    return total


def vector_batch(ids, vecs: np.ndarray, norms) -> Any:
    """One chunk of a vectors table (id, vector, raw_norm) as an Arrow table."""
    import pyarrow as pa

    dim = vecs.shape[1]
    flat = pa.array(np.ascontiguousarray(vecs, dtype=np.float32).ravel())
    return pa.table(
        {
            "id": pa.array(np.asarray(ids, dtype=np.int64)),
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "raw_norm": pa.array(np.asarray(norms, dtype=np.float32)),
        },
        schema=vectors_schema(dim),
    )


def vector_matrix(column) -> np.ndarray:
    """An Arrow fixed-size-list ``vector`` column as a C-contiguous float32 (rows, dim) matrix."""
    if hasattr(column, "combine_chunks"):  # a table's ChunkedArray (a batch's column is one Array)
        column = column.combine_chunks()
    flat = column.values.to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(len(column), column.type.list_size)


def read_table(table, columns: list[str] | None = None):
    """All rows of an open LanceDB table (only ``columns`` when given) as an Arrow table."""
    query = table.search()
    if columns is not None:
        query = query.select(columns)
    return query.limit(None).to_arrow()


# -- writing ---------------------------------------------------------------------

class StoreWriter:
    """Creates a store and appends to it in chunks. Holds the store's writer lock."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._lock_fh = None
        self._db = None
        self._stim_schema = None
        self._tables_ready = False
        # fills a trained approximate index with (vectors, ids) (vecsim.distributed: in parallel tasks)
        self.fill_index = None

    # lifecycle
    @classmethod
    def create(cls, path: Path, manifest: dict, stim_schema, overwrite: bool = False) -> "StoreWriter":
        """Lock the folder and write the manifest; the tables are created on first use, so
        lancedb's import (seconds) can overlap with the first forward passes."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not _creation_leftovers(path):
            if (path / MANIFEST_NAME).is_file():
                if not overwrite:  # a damaged manifest must not stop --overwrite from replacing the store
                    status = read_manifest(path).get("status")
                    hint = "" if status == "complete" else " (an unfinished run; resume is not possible with a different configuration)"
                    raise StoreExistsError(f"a store already exists at {path}{hint}; pass --overwrite to replace it")
            elif not overwrite:
                raise StoreExistsError(f"{path} exists and is not an empty folder; choose another --out or pass --overwrite")
            writer = cls(path, manifest)
            writer.lock()
            _clear_folder(path)
        else:
            path.mkdir(parents=True, exist_ok=True)
            writer = cls(path, manifest)
            writer.lock()
        (path / "layers").mkdir(exist_ok=True)
        writer._stim_schema = stim_schema
        writer.save_manifest()
        return writer

    @classmethod
    def reopen(cls, path: Path, stim_schema=None) -> "StoreWriter":
        """An unfinished store, locked for resuming. With ``stim_schema`` (resuming the
        training pass: nothing of the tables counts yet), its tables are made anew on first use."""
        writer = cls(Path(path), read_manifest(Path(path)))
        writer.lock()
        writer._stim_schema = stim_schema
        writer._tables_ready = stim_schema is None
        return writer

    def _column(self, table: str, column: str) -> list:
        return read_table(self.db.open_table(table), [column]).column(column).to_pylist()

    def committed_paths(self) -> dict[int, str]:
        table = read_table(self.db.open_table("stimuli"), ["id", "path"])
        return dict(zip(table.column("id").to_pylist(), table.column("path").to_pylist()))

    def drop_uncommitted(self, committed: set[int]) -> None:
        """Delete vector rows of a half-written chunk and the failures the rerun will find again."""
        for layer, entry in self.manifest["layers"].items():
            table = self.db.open_table(entry["table"])
            ids = read_table(table, ["id"]).column("id").to_pylist()
            stray = sorted(set(ids) - committed)
            for lo in range(0, len(stray), 10_000):
                table.delete(f"id IN ({','.join(map(str, stray[lo:lo + 10_000]))})")
        self.db.open_table("failures").delete("true")

    def next_stimulus_id(self) -> int:
        """One past every id used so far (stimuli and failures), so ids are never reused."""
        ids, failed = self._column("stimuli", "id"), self._column("failures", "id")
        candidates = self.manifest.get("source", {}).get("candidates", 0)
        return max([candidates - 1, *ids, *(i for i in failed if i is not None)]) + 1

    def count_stimuli(self) -> int:
        return self.db.open_table("stimuli").count_rows()

    def runs_rows(self) -> list[dict]:
        return read_table(self.db.open_table("runs")).to_pylist()

    def failures_of_run(self, run: int) -> int:
        return sum(1 for r in self._column("failures", "run") if r == run)

    def next_run_id(self) -> int:
        runs, failures = self._column("runs", "run"), self._column("failures", "run")
        return max([0, *runs, *failures]) + 1

    def _ensure_tables(self) -> None:
        if self._tables_ready:
            return
        db = self.db
        db.create_table("stimuli", schema=self._stim_schema, mode="overwrite")
        db.create_table("failures", schema=failures_schema(), mode="overwrite")
        db.create_table("runs", schema=runs_schema(), mode="overwrite")
        self._tables_ready = True

    def lock(self) -> None:
        import fcntl

        fh = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StoreLockedError(f"another vecsim process is writing to {self.path}; wait for it to finish") from None
        self._lock_fh = fh

    def close(self) -> None:
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    @property
    def db(self):
        if self._db is None:
            self._db = _lancedb().connect(str(self.path / "lance"))
        return self._db

    def save_manifest(self, **updates) -> None:
        self.manifest.update(updates)
        self.manifest["updated"] = now()
        write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    def layer_dir(self, layer: str) -> Path:
        d = self.path / "layers" / self.manifest["layers"][layer]["slug"]
        d.mkdir(parents=True, exist_ok=True)
        return d

    def create_vector_table(self, layer: str, dim: int) -> None:
        self._ensure_tables()
        self.db.create_table(self.manifest["layers"][layer]["table"], schema=vectors_schema(dim), mode="overwrite")

    # appends
    def append(self, stimuli_rows: list[dict], vectors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
               failures: list, run: int) -> None:
        """Commit one chunk: vectors of every layer first, then the stimuli rows, then failures."""
        import pyarrow as pa

        self._ensure_tables()
        for layer, (ids, vecs, norms) in vectors.items():
            if len(ids) == 0:
                continue
            self.db.open_table(self.manifest["layers"][layer]["table"]).add(vector_batch(ids, vecs, norms))
        kill_point("vectors-written")
        if stimuli_rows:
            table = self.db.open_table("stimuli")
            table.add(pa.Table.from_pylist(stimuli_rows, schema=table.schema))
        if failures:
            self.add_failures(failures, run)

    def add_failures(self, failures: list, run: int) -> None:
        import pyarrow as pa

        self._ensure_tables()
        rows = [
            {"id": f.id, "path": f.path, "stage": f.stage, "layer": f.layer, "reason": f.reason, "run": run}
            for f in failures
        ]
        self.db.open_table("failures").add(pa.Table.from_pylist(rows, schema=failures_schema()))

    def add_run(self, row: dict) -> None:
        import pyarrow as pa

        self._ensure_tables()
        self.db.open_table("runs").add(pa.Table.from_pylist([row], schema=runs_schema()))

    def commit_fragments(self, fragments: dict[str, list]) -> None:
        """Commit Lance fragments a :class:`FragmentWriter` wrote elsewhere (a worker of
        :mod:`vecsim.distributed`): one atomic append per table, the vectors tables first and
        the stimuli table last, as :meth:`append` writes them. Files of a worker that died
        before returning its fragments are never referenced."""
        import lance

        self._ensure_tables()
        tables = sorted((t for t in fragments if t != "stimuli"), key=str) + ["stimuli"]
        for name in tables:
            if name == "stimuli":
                kill_point("vectors-written")
            parts = fragments.get(name) or []
            if parts:
                dataset = lance.dataset(_table_uri(self.path, name))
                lance.LanceDataset.commit(dataset.uri, lance.LanceOperation.Append(parts), read_version=dataset.version)

    def _vector_batches(self, layer: str, batch_rows: int = 65_536):
        query = self.db.open_table(self.manifest["layers"][layer]["table"]).search().select(["id", "vector"]).limit(None)
        for batch in query.to_batches(batch_size=batch_rows):
            ids = batch.column("id").to_numpy()
            yield ids, vector_matrix(batch.column("vector"))

    def all_vectors(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, (n, dim) float32 vectors) of every row of the layer's vectors table, table order."""
        parts = list(self._vector_batches(layer))
        if not parts:
            dim = int(self.db.open_table(self.manifest["layers"][layer]["table"]).schema.field("vector").type.list_size)
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def build_index(self, layer: str, dim: int, kind: str = "auto", device: str = "cpu", seed: int = 0) -> dict:
        """Build the layer's FAISS index from its vectors table and save it atomically.

        ``kind``: auto, flat, hnsw, ivf-pq (OPQ + IVF-PQ) or a FAISS factory string. An
        approximate index is trained on a seeded sample where it needs training, and its
        recall@10 against exact search on held-out queries is recorded.
        """
        from vecsim import index as vindex

        entry = self.manifest["layers"][layer]
        n = self.db.open_table(entry["table"]).count_rows()  # sizes the automatic choice and IVF lists
        resolved = vindex.choose_kind(n, dim) if kind == "auto" else kind
        index, spec = vindex.new_index(resolved, dim, n)
        exact = vindex.is_exact(index)
        ids = vecs = train_ids = None
        if not exact:
            ids, vecs = self.all_vectors(layer)
            if np.any(np.diff(ids) < 0):  # id order: the training sample must not depend on the order chunks were committed in
                order = np.argsort(ids, kind="stable")
                ids, vecs = ids[order], vecs[order]
        if vindex.needs_training(index):
            size = min(len(ids), vindex.training_size(index))
            pick = np.sort(np.random.default_rng([seed, 3]).choice(len(ids), size=size, replace=False))
            try:
                index.train(np.ascontiguousarray(vecs[pick]))
            except RuntimeError as exc:
                from vecsim.errors import ConfigError

                raise ConfigError(f"cannot train index {spec!r} on {size} vectors of {layer}: {vindex.faiss_reason(exc)}; "
                                  "use --index flat or hnsw for a set this small") from None
            train_ids = ids[pick]
        index = vindex.to_gpu(index, device)
        if exact:
            for batch_ids, batch_vecs in self._vector_batches(layer):
                vindex.add(index, batch_vecs, batch_ids)
        elif self.fill_index is not None and train_ids is not None and device == "cpu":
            self.fill_index(index, vecs, ids)
        else:
            vindex.add(index, vecs, ids)
        index = vindex.to_cpu(index)  # trained and filled on a GPU where there is one; tuned and saved on the CPU
        vindex.set_search_params(index)
        description = {"kind": resolved, "factory": spec, "metric": "inner_product", "ntotal": int(index.ntotal),
                       "exact": exact}
        if not exact and len(ids):
            description.update(vindex.tune_for_recall(index, vecs, ids, exclude=train_ids, seed=seed))
        vindex.save_index(index, self.layer_dir(layer) / "index.faiss")
        entry["index"] = description
        return description


def _table_uri(store: Path, table: str) -> str:
    """Where LanceDB keeps a table of the store (``lance/<table>.lance``)."""
    return str(Path(store) / "lance" / f"{table}.lance")


class FragmentWriter:
    """Writes chunks of a store's rows as Lance fragments without committing them, on a
    machine other than the committer's (:mod:`vecsim.distributed`). Same ``append`` as
    :class:`StoreWriter`; :meth:`take` hands the fragments to :meth:`StoreWriter.commit_fragments`.
    Failures are left to the committer, who records them with the chunk."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._fragments: dict[str, list] = {}
        self._datasets: dict[str, Any] = {}

    def _dataset(self, table: str):
        import lance

        if table not in self._datasets:
            self._datasets[table] = lance.dataset(_table_uri(self.path, table))
        return self._datasets[table]

    def _write(self, table: str, data) -> None:
        import lance

        dataset = self._dataset(table)
        written = lance.fragment.write_fragments(data, dataset.uri, schema=dataset.schema,
                                                 data_storage_version=dataset.data_storage_version)
        self._fragments.setdefault(table, []).extend(written)

    def append(self, stimuli_rows: list[dict], vectors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
               failures: list, run: int) -> None:
        import pyarrow as pa

        for layer, (ids, vecs, norms) in vectors.items():
            if len(ids):
                self._write(self.manifest["layers"][layer]["table"], vector_batch(ids, vecs, norms))
        if stimuli_rows:
            self._write("stimuli", pa.Table.from_pylist(stimuli_rows, schema=self._dataset("stimuli").schema))

    def take(self) -> dict[str, list]:
        taken, self._fragments = self._fragments, {}
        return taken


class TrainingScratch:
    """The training pass's committed progress: ``STORE/scratch/training/chunk_NNNNNN.chunk``.

    Each chunk holds what the pass keeps in memory for a run of consecutive training items
    (the prepared vectors as held, their raw norms, the decoded facts of each kept stimulus,
    the failures met, the evaluation subset's rows) and is written to a temporary file that
    is flushed and renamed: a chunk is there whole or not at all. Reading drops a temporary
    file, a chunk that does not load (torn by a crash of the machine) and every chunk after a
    gap, so what is read back is always a prefix of the training items. A chunk is data,
    never code: plain arrays in :func:`write_chunk`'s layout (no pickles, no object arrays).
    """

    def __init__(self, store: Path):
        self.path = Path(store) / SCRATCH / "training"

    def exists(self) -> bool:
        return self.path.is_dir()

    def chunk_files(self) -> list[Path]:
        return sorted(p for p in self.path.glob("chunk_*.chunk") if ".tmp" not in p.name) if self.exists() else []

    def commit(self, number: int, arrays: dict[str, np.ndarray]) -> None:
        """Write chunk ``number`` (0, 1, ...) durably and atomically."""
        from vecsim._io import fsync_replace

        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / f"chunk_{number:06d}.chunk"
        tmp = self.path / f"chunk_{number:06d}.tmp.chunk"
        with open(tmp, "wb") as fh:
            write_chunk(fh, arrays)
            kill_point("scratch-writing")  # a chunk half on disk, not yet renamed
        fsync_replace(tmp, target)
        kill_point("scratch-chunk")

    def read(self, check=None) -> list[dict[str, np.ndarray]]:
        """The committed chunks, in order, as dicts of arrays. What cannot be read back is
        deleted: temporary files, a torn chunk and everything after it. ``check(chunk,
        start)`` may raise for a chunk that does not continue the pass at ``start``."""
        chunks: list[dict[str, np.ndarray]] = []
        if not self.exists():
            return chunks
        for tmp in self.path.glob("*.tmp.chunk"):
            tmp.unlink()
        files = self.chunk_files()
        for i, path in enumerate(files):
            chunk = read_chunk(path) if path.name == f"chunk_{i:06d}.chunk" else None
            start = int(chunks[-1]["stop"]) if chunks else 0
            if chunk is None or int(chunk.get("start", -1)) != start:
                for later in files[i:]:
                    later.unlink()
                break
            if check is not None:
                check(chunk, start)
            chunks.append(chunk)
        # a layer's evaluation rows committed before a chunk that holds its complete subset
        # (its Gram: the pass's last chunk, when the subset lies in the training sample) are
        # superseded by it: dropped unread (memory-mapped, their bytes were never touched)
        for i, chunk in enumerate(chunks):
            for name in [n for n in chunk if n.startswith("eval.") and n.endswith(".gram")]:
                prefix = name[: -len("gram")]
                for earlier in chunks[:i]:
                    for key in [k for k in earlier if k.startswith(prefix)]:
                        del earlier[key]
        return chunks

    def progress(self) -> dict | None:
        """What ``vecsim info`` shows of an unfinished training pass (None without a scratch):
        chunks, training items done of those planned, kept stimuli, bytes. Reads only the
        chunks' small arrays."""
        if not self.exists():
            return None
        files = self.chunk_files()
        done = kept = planned = 0
        for path in files:
            data = read_chunk(path, lambda name: name in ("stop", "planned", "ids"))
            if data is None:  # a torn chunk: the run that resumes drops it
                break
            done, planned = int(data["stop"]), int(data["planned"])
            kept += len(data["ids"])
        return {"chunks": len(files), "items": done, "planned": planned, "stimuli": kept, "bytes": _size(self.path)}

    def delete(self) -> None:
        if self.path.parent.is_dir():
            shutil.rmtree(self.path.parent)


CHUNK_MAGIC = b"\x93VECSIM-CHUNK-1\n"
CHUNK_ALIGN = 64


def _aligned(offset: int) -> int:
    return -(-offset // CHUNK_ALIGN) * CHUNK_ALIGN


def write_chunk(fh, arrays: dict[str, Any]) -> None:
    """Named arrays as one file: :data:`CHUNK_MAGIC`, the header's length (uint64,
    little-endian), a JSON header (per array: name, dtype, shape, offset and length of its
    bytes after the header; the data's length), then each array's bytes, 64-byte aligned,
    written straight from its memory. Unlike an .npz, no zip and no CRC: a scratch chunk
    (hundreds of MB with the evaluation subset's raw rows) is written and read back at the
    speed of the disk; a torn file is told by its length."""
    import struct

    layout, parts, offset = [], [], 0
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"scratch chunk array {name!r} holds Python objects")
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        offset = _aligned(offset)
        layout.append([name, array.dtype.str, list(array.shape), offset, int(array.nbytes)])
        parts.append((offset, array))
        offset += array.nbytes
    header = json.dumps({"arrays": layout, "data_bytes": offset}).encode()
    head = CHUNK_MAGIC + struct.pack("<Q", len(header)) + header
    fh.write(head + bytes(_aligned(len(head)) - len(head)))
    at = 0
    for offset, array in parts:
        fh.write(bytes(offset - at))
        fh.write(array.reshape(-1).view(np.uint8).data)  # no copy
        at = offset + array.nbytes


def _chunk_header(fh) -> tuple[dict, int] | None:
    """(header, offset of the data) of an open chunk file; None when it is not a whole chunk."""
    import struct

    head = fh.read(len(CHUNK_MAGIC) + 8)
    if len(head) != len(CHUNK_MAGIC) + 8 or not head.startswith(CHUNK_MAGIC):
        return None
    (length,) = struct.unpack("<Q", head[len(CHUNK_MAGIC):])
    if length > os.fstat(fh.fileno()).st_size:
        return None
    header = json.loads(fh.read(length))
    base = _aligned(len(CHUNK_MAGIC) + 8 + length)
    if base + int(header["data_bytes"]) != os.fstat(fh.fileno()).st_size:
        return None  # torn: shorter (or longer) than its header says
    return header, base


CHUNK_MAP_BYTES = 2**20  # arrays from this size on are memory-mapped when a chunk is read


def read_chunk(path: Path, keep=None) -> dict[str, np.ndarray] | None:
    """The arrays of a chunk :func:`write_chunk` wrote (those whose name ``keep`` accepts,
    default all); None when the file is not a whole chunk (torn, damaged, or not a chunk).
    Small arrays are read into their own memory; large ones (the held vectors and evaluation
    rows) are memory-mapped copy-on-write, so their bytes are read once, when the training
    pass copies them into its buffers, and never held twice."""
    try:
        with open(path, "rb") as fh:
            found = _chunk_header(fh)
            if found is None:
                return None
            header, base = found
            arrays = {}
            for name, dtype, shape, offset, nbytes in header["arrays"]:
                if keep is not None and not keep(name):
                    continue
                dtype = np.dtype(dtype)
                shape = tuple(int(n) for n in shape)
                if dtype.hasobject or int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes:
                    return None
                if nbytes >= CHUNK_MAP_BYTES:
                    arrays[name] = np.memmap(fh, dtype=dtype, mode="c", offset=base + offset, shape=shape)
                    continue
                array = np.empty(shape, dtype=dtype)
                fh.seek(base + offset)
                if nbytes and fh.readinto(array.reshape(-1).view(np.uint8).data) != nbytes:
                    return None
                arrays[name] = array
            return arrays
    except (OSError, ValueError, TypeError, KeyError):  # unreadable, bad JSON or dtype: not committed
        return None


def store_from_vectors(path: Path, layers: dict[str, np.ndarray], *, paths: list[str] | None = None,
                       labels: list | None = None, index: str = "auto", overwrite: bool = False) -> Store:
    """A complete store from vectors computed elsewhere (unit, or norm at most 1) (no model): one layer per entry,
    rows = stimuli in id order. Used for synthetic benchmarks and for importing vectors."""
    first = next(iter(layers.values()))
    n = len(first)
    paths = paths or [f"stimulus_{i:07d}" for i in range(n)]
    labels = labels or [None] * n
    manifest = {
        "format_version": FORMAT_VERSION, "status": "indexing", "created": now(),
        "source": {"source": "vectors", "root": str(path), "manifest": None, "extra_columns": [],
                   "candidates": n, "ignored_files": 0},
        "model": {"name": "none", "weights": None, "checkpoint": None, "checkpoint_sha256": None,
                  "num_classes": None, "init_seed": None},
        "preprocessing": {"resize": 1, "crop": 1, "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bilinear"},
        "device": "cpu", "config": {"index": index}, "seeds": {}, "layers": {},
        "counts": {"stimuli": n, "failures": 0}, "versions": package_versions(),
    }
    slugs = layer_slugs(layers)
    for layer, vecs in layers.items():
        dim = vecs.shape[1]
        manifest["layers"][layer] = {"slug": slugs[layer], "table": f"vectors_{slugs[layer]}", "reducer": {
            "shape": [dim], "units": dim, "dim_in": dim, "sketch": None,
            "config": {"similarity": "cosine", "center": False, "dim": dim, "max_dim": dim, "energy": 1.0,
                       "sketch_dim": 0, "sketch_seed": 0, "pooling": "flatten"}, "dropped_zero_units": 0,
            "fit": {"n_train": n, "dim_in": dim, "dim": dim, "rank": dim, "energy_kept": 1.0, "exact": True,
                    "lossless": True}}}
    writer = StoreWriter.create(Path(path), manifest, stimuli_schema(), overwrite=overwrite)
    try:
        for layer, vecs in layers.items():
            writer.create_vector_table(layer, vecs.shape[1])
        ids = np.arange(n, dtype=np.int64)
        for lo in range(0, n, 50_000):
            hi = min(lo + 50_000, n)
            rows = [{"id": i, "path": paths[i], "sha256": hashlib.sha256(paths[i].encode()).hexdigest(),
                     "label": labels[i], "width": 0, "height": 0} for i in range(lo, hi)]
            chunk = {layer: (ids[lo:hi], vecs[lo:hi], np.ones(hi - lo, np.float32)) for layer, vecs in layers.items()}
            writer.append(rows, chunk, [], 1)
        for layer, vecs in layers.items():
            writer.build_index(layer, vecs.shape[1], index)
        writer.save_manifest(status="complete")
    finally:
        writer.close()
    return Store.open(path)


def _clear_folder(path: Path) -> None:
    for child in path.iterdir():
        if child.name == ".lock":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
