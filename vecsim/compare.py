"""What researchers do with one or two stores beyond queries: compare layers and models,
look at a layer's spectrum and channel redundancy, and make pruned checkpoints to compare.

* :func:`compare_stores` — the layer × layer matrix of a similarity measure
  (:data:`vecsim.measures.MEASURES`) between the layers of store A (rows) and store B
  (columns; B defaults to A). Two stores are matched by stimulus sha256; only common
  stimuli are compared.
* :func:`store_spectra` — effective rank and dims for 90/95/99% of the energy of every
  layer's stored training spectrum.
* :func:`channel_redundancy` — channel × channel cosine and CW-NNK overlap from a
  layer's evaluation-subset channel responses.
* :func:`prune_checkpoint` — magnitude-prune a model and save a state dict that
  ``vecsim index --checkpoint`` accepts.

Where each number of a comparison comes from (every cell records ``source`` and ``n``):

``exact-gram``
    Gram-based measures (CKA, RSA, SVCCA, Procrustes) on the evaluation subsets' exact
    Gram matrices of the raw activations (as pooled for the store), restricted to the
    stimuli both layers' subsets hold. Exact, not an approximation. For a store indexed
    with ``similarity="correlation"`` the Gram is that of the row-centred activations
    (``G − s sᵀ / units``), the representation that store describes.
``stored-vectors``
    The stored vectors (each the unit activation vector, projected), each row
    rescaled by its L2 norm (``raw_norm``: of the row-centred vector for a correlation
    store) to recover the projected activations. Used for PWCCA always (it needs features;
    its weights, which depend on the units' basis, are taken in the layer's units by mapping
    the stored coordinates back through the projection, and it is NaN for a sketched layer),
    and for Gram measures when the subsets are missing or share fewer than
    :data:`MIN_COMMON` stimuli. CKA/SVCCA/Procrustes use the feature forms on all
    matched stimuli; RSA, which needs all n² pairs, uses the stored cosine estimates
    (inner products of the stored vectors) on a seeded subsample of at most
    ``max_rsa_stimuli``. Approximate: the projection keeps only the top directions
    of the training sample (``energy_kept`` in ``vecsim info``); exact when it keeps them
    all. Correlation stores written before the manifest's ``stored_norm`` hold the norm
    before row-centring (their cells say so). A store indexed with ``--center`` keeps
    only directions of stimulus-centred vectors: its stored-vectors cells are NaN, with
    a note.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vecsim.errors import (
    ConfigError,
    OutputExistsError,
    StimulusSetError,
    StoreError,
    close_matches,
)
from vecsim import measures as _measures
from vecsim.evalset import held_by_budget
from vecsim._io import dumps_json, fsync_replace, json_safe, write_text_atomic
from vecsim.measures import MEASURES, linear_cka, procrustes_distance

MIN_COMMON = 10
EXACT = "exact-gram"
STORED = "stored-vectors"
SOURCES: tuple[str, ...] = ("auto", EXACT, STORED)
PAIRS: tuple[str, ...] = ("grid", "matching")
MAX_RSA_STIMULI = 2000
ENERGY_FRACTIONS: tuple[float, ...] = (0.9, 0.95, 0.99)

# Feature forms of the Gram measures: same values as fn(X Xᵀ, Y Yᵀ), O(n p²) instead of O(n²·n).
_FEATURE_FORMS = {
    "cka": lambda X, Y: linear_cka(X, Y),
    "cka_debiased": lambda X, Y: linear_cka(X, Y, debiased=True),
    "procrustes": procrustes_distance,
}  # SVCCA and PWCCA from features: _cca_with_chance
_ASYMMETRIC = {"pwcca"}  # weights come from the row (A) layer
DEGENERATE_CCA_NOTE = ("CCA directions of A and B together reach the number of stimuli: their subspaces "
                       "must share directions, whose correlations are 1 whatever the layers; compare "
                       "with the chance level (B's stimuli shuffled)")


def _cca_with_chance(measure: str, X: np.ndarray, Y: np.ndarray, shuffle: np.ndarray,
                     unit_map: np.ndarray | None = None) -> tuple[float, dict]:
    """SVCCA or PWCCA of features X, Y and its chance level: the same measure with B's rows
    (stimuli) in the order ``shuffle``. Centring commutes with a row permutation, so B's
    shuffled basis is its basis with the rows permuted: each side is decomposed once.
    ``unit_map``: for PWCCA, what maps X's columns to A's units (stored vectors: the projection)."""
    X, Y = _measures._feature_pair(X, Y, min_n=2)
    (Ux, sx), (Uy, sy) = _measures._feature_basis(X), _measures._feature_basis(Y)
    if measure == "svcca":
        res = _measures._svcca_from_bases(Ux, sx, Uy, sy, SVCCA_KEEP)
        chance = _measures._svcca_from_bases(Ux, sx, Uy[shuffle], sy, SVCCA_KEEP)["mean"]
        return res["mean"], {"chance": chance, "dims": res["dims"], "n": len(X)}
    value = _measures._pwcca_from_bases(X, Ux, Uy, unit_map)
    chance = _measures._pwcca_from_bases(X, Ux, Uy[shuffle], unit_map)
    return value, {"chance": chance, "dims": (Ux.shape[1], Uy.shape[1]), "n": len(X)}


_CCA_MEASURES = ("svcca", "pwcca")  # they also report their chance level (B's stimuli shuffled)


def _joined(note: str, more: str) -> str:
    """A cell's note with one more clause."""
    return f"{note}; {more}" if note else more


def _cca_extras(extra: dict, note: str) -> dict:
    """A cell's ``chance`` (CCA measures; None otherwise) and note, flagging a CCA whose
    directions fill the stimulus space (k_A + k_B >= n - 1)."""
    if "chance" not in extra:
        return {"chance": None, "note": note}
    if sum(extra["dims"]) >= extra["n"] - 1:
        note = _joined(note, DEGENERATE_CCA_NOTE)
    return {"chance": float(extra["chance"]), "note": note}
# Exact-Gram SVCCA/Procrustes reuse each layer's centred-Gram eigenbasis (the same steps as
# measures.svcca_gram / procrustes_distance_gram; tests check the values are identical).
_BASIS_MEASURES = {"svcca", "procrustes"}
SVCCA_KEEP = 0.99  # measures.MEASURES["svcca"] keeps 99% of the variance
BASIS_CACHE_BYTES = 1 << 30
EVAL_GRAM_EPS = float(np.finfo(np.float32).eps)  # the precision the evaluation subsets' Grams are summed in
_CORNER = "A \\ B"


# --------------------------------------------------------------------------- small helpers


def _out_dir(out: str | os.PathLike, names: list[str], overwrite: bool, command: str,
             stale: tuple[str, ...] = ()) -> Path:
    """The --out folder (created if missing), once no file of ``names`` (what this run writes)
    or ``stale`` (what an earlier run of the same command may have left that this one does
    not write) is there, unless ``overwrite``; then the ``stale`` ones are removed, so the
    folder holds one run's results. Other files in the folder are never touched."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"--out {path} is a file; give a folder to write the results into")
    clash = [name for name in (*names, *stale) if (path / name).exists()]
    if clash and not overwrite:
        more = f" (and {len(clash) - 1} more of its files)" if len(clash) > 1 else ""
        raise OutputExistsError(f"{path} already holds {clash[0]}{more} from an earlier `vecsim {command}`; "
                                "pass --overwrite to replace them or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (path / name).unlink(missing_ok=True)
    return path


def write_long_table(folder: Path, name: str, rows: list[dict], schema, meta: dict) -> list[Path]:
    """``<name>.parquet`` (``schema``, ``meta`` as JSON under the schema metadata key ``vecsim``)
    and ``<name>.csv`` (the same columns; None and non-finite numbers as empty cells), each
    written whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = schema.names
    table = pa.Table.from_pylist([{k: r[k] for k in columns} for r in rows], schema=schema)
    table = table.replace_schema_metadata({b"vecsim": json.dumps(json_safe(meta)).encode()})
    parquet = folder / f"{name}.parquet"
    pq.write_table(table, str(parquet) + ".tmp", compression="zstd")
    fsync_replace(Path(str(parquet) + ".tmp"), parquet)
    path = folder / f"{name}.csv"
    with open(str(path) + ".tmp", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for r in rows:
            writer.writerow(["" if r[k] is None or (isinstance(r[k], float) and not math.isfinite(r[k])) else r[k]
                             for k in columns])
    fsync_replace(Path(str(path) + ".tmp"), path)
    return [parquet, path]


def eval_gram_basis(K: np.ndarray, units: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Centred basis (:func:`vecsim.measures._gram_basis`) of an evaluation subset's Gram.

    Those Grams are summed in float32 (vecsim.evalset), and their rounding must not add
    directions: those beyond the rank the raw vectors can have (``units``, after pooling) go,
    and so do eigenvalues below the rounding's spectral size. An entry K_ij carries an error
    of a few eps32·√(K_ii K_jj), so the error matrix's norm is about 4·√n·eps32·mean(K_ii):
    the floor. (The demo's relu1 has real centred eigenvalues down to 3.9, resolved to 4e-8
    relative, against a floor of 0.08; a cut at n·eps32·λ_max, 9.4 there, dropped 72 of them.)
    """
    n = K.shape[0]
    G = _measures._gram(K, "K")
    floor = 4.0 * math.sqrt(max(n, 1)) * EVAL_GRAM_EPS * float(np.trace(G)) / max(n, 1)
    return _measures._gram_basis(G, max_rank=None if units is None else int(units), floor=floor)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None:  # not computed / not defined (JSON: null)
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


def _open(store):
    from vecsim.store import Store

    return store if isinstance(store, Store) else Store.open(store)


def _figure(width: float, height: float):
    # No pyplot: a bare Figure on the Agg canvas touches no global backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _heatmap(path: Path, M: np.ndarray, rows: list[str], cols: list[str], title: str,
             cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
             row_label: str = "", col_label: str = "", annotate: bool = True) -> None:
    h, w = M.shape
    # Labelled cells grow the figure; past 40 rows/columns there are no labels, so a fixed size.
    fig = _figure(min(3.0 + 0.55 * w, 24.0) if w <= 40 else 8.0, min(2.5 + 0.45 * h, 24.0) if h <= 40 else 7.0)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if w <= 40:
        ax.set_xticks(range(w), cols, rotation=60, ha="right", fontsize=7)
    if h <= 40:
        ax.set_yticks(range(h), rows, fontsize=7)
    if annotate and h * w <= 400:
        lo, hi = (vmin, vmax) if vmin is not None and vmax is not None else (np.nanmin(M), np.nanmax(M))
        mid = (lo + hi) / 2
        for i in range(h):
            for j in range(w):
                if np.isfinite(M[i, j]):
                    ax.text(j, i, f"{M[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if M[i, j] > mid else "white")
    ax.set_xlabel(col_label, fontsize=8)
    ax.set_ylabel(row_label, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


# --------------------------------------------------------------------------- stimulus matching


@dataclass
class Matching:
    """Which stimuli two stores share (by sha256), in store A's id order."""

    n_a: int
    n_b: int
    ids_a: np.ndarray  # matched ids in A (int64, ascending)
    ids_b: np.ndarray  # their partners in B
    unmatched_a: int  # stimuli of A whose image is not in B
    unmatched_b: int
    duplicates_a: int = 0  # rows of A whose bytes another row of A already has (not used)
    duplicates_b: int = 0
    same_store: bool = False

    @property
    def matched(self) -> int:
        return int(len(self.ids_a))

    def to_dict(self) -> dict:
        return {"by": "identity" if self.same_store else "sha256", "n_a": self.n_a, "n_b": self.n_b,
                "matched": self.matched, "unmatched_a": self.unmatched_a, "unmatched_b": self.unmatched_b,
                "duplicates_a": self.duplicates_a, "duplicates_b": self.duplicates_b}

    def describe(self) -> str:
        if self.same_store:
            return f"one store: all {self.matched:,} stimuli compared (unmatched: 0)"
        dup = ""
        if self.duplicates_a or self.duplicates_b:
            dup = f"; duplicate images skipped: {self.duplicates_a} in A, {self.duplicates_b} in B"
        return (f"matched {self.matched:,} stimuli by sha256 (A has {self.n_a:,}, B has {self.n_b:,}; "
                f"unmatched: {self.unmatched_a:,} in A, {self.unmatched_b:,} in B{dup})")


def _id_sha(store) -> tuple[np.ndarray, list[str]]:
    table = store.stimuli()
    return table.column("id").to_numpy().astype(np.int64), table.column("sha256").to_pylist()


def _first_by_sha(ids: np.ndarray, shas: list[str]) -> dict[str, int]:
    first: dict[str, int] = {}
    for i, s in zip(ids.tolist(), shas):
        first.setdefault(s, i)
    return first


def match_stimuli(a, b=None, min_common: int = MIN_COMMON) -> Matching:
    """Stimuli common to stores ``a`` and ``b`` by sha256 (``b=None``: ``a`` with itself).

    Raises :class:`StimulusSetError` naming the unmatched counts when fewer than
    ``min_common`` stimuli are shared.
    """
    a = _open(a)
    ids_a, sha_a = _id_sha(a)
    if b is None or Path(_open(b).path).resolve() == Path(a.path).resolve():
        if len(ids_a) < min_common:
            raise StimulusSetError(f"store {a.path} holds {len(ids_a)} stimuli; comparing needs at least {min_common}")
        return Matching(len(ids_a), len(ids_a), ids_a, ids_a.copy(), 0, 0, same_store=True)
    b = _open(b)
    ids_b, sha_b = _id_sha(b)
    first_a, first_b = _first_by_sha(ids_a, sha_a), _first_by_sha(ids_b, sha_b)
    common = sorted((first_a[s], first_b[s]) for s in first_a if s in first_b)
    unmatched_a = sum(1 for s in sha_a if s not in first_b)
    unmatched_b = sum(1 for s in sha_b if s not in first_a)
    if len(common) < min_common:
        raise StimulusSetError(
            f"stores share {len(common)} stimuli by sha256 ({unmatched_a} of A's {len(ids_a)} and "
            f"{unmatched_b} of B's {len(ids_b)} do not match); comparing needs at least {min_common} "
            "common stimuli: index both stores from the same images"
        )
    pairs = np.asarray(common, dtype=np.int64).reshape(-1, 2)
    return Matching(len(ids_a), len(ids_b), pairs[:, 0].copy(), pairs[:, 1].copy(), unmatched_a, unmatched_b,
                    len(ids_a) - len(first_a), len(ids_b) - len(first_b))


# --------------------------------------------------------------------------- per-layer data


class _LayerData:
    """One layer of one store, loaded lazily: rescaled stored vectors and the exact subset Gram."""

    def __init__(self, store, layer: str):
        self.store, self.layer = store, layer
        self.info = store.layer_info(layer)  # raises UnknownLayerError with close matches
        self.similarity = self.info["reducer"]["config"].get("similarity", "cosine")
        self.centred = bool(self.info["reducer"]["config"].get("center"))
        # stores written before the key held the norm before row-centring, also for correlation
        self.stored_norm = self.info["reducer"].get("stored_norm", "raw")
        self._features: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # ids, features, raw norms
        self._stored_grams: dict[bytes, np.ndarray] = {}
        self._eval: dict | None | bool = False
        self._unit_map: tuple[bool, np.ndarray | None] | None = None

    def unit_map(self) -> tuple[bool, np.ndarray | None]:
        """(whether the layer's units can be recovered, the projection (dim × units it reads,
        float32) or None when the stored coordinates are the units): features · projection =
        the projected activations in the layer's unit coordinates (after pooling and dropped
        units). Not recoverable for a sketched layer, whose projection reads count-sketch
        buckets; a store made from vectors (no transform) holds its units as they are."""
        if self._unit_map is None:
            if self.info["reducer"].get("sketch"):
                self._unit_map = (False, None)
            elif (self.store.manifest.get("model") or {}).get("name") == "none":  # imported vectors
                self._unit_map = (True, None)
            else:
                # float32 as stored (dim × units can be large); _pwcca_from_bases multiplies by blocks
                self._unit_map = (True, self.store.reducer(self.layer).matrix.cpu().numpy())
        return self._unit_map

    def features(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors × raw norm (float64) = the projected activations, one row per id in ``ids``."""
        pos = self.positions(ids)  # loads the features first
        return self._features[1][pos]

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in the loaded features; StoreError when a stimulus has no stored vector."""
        if self._features is None:
            vec_ids, vecs = self.store.vectors(self.layer)
            norm_ids, norms = self.store.raw_norms(self.layer)
            if not np.array_equal(vec_ids, norm_ids):
                raise StoreError(f"{self.store.path}: vectors and raw norms of {self.layer} disagree; run `vecsim verify`")
            norms = norms.astype(np.float64)
            self._features = (vec_ids, vecs.astype(np.float64) * norms[:, None], norms)
        vec_ids = self._features[0]
        ok = _in_sorted(vec_ids, ids)
        if not np.all(ok):
            raise StoreError(
                f"{self.store.path}: layer {self.layer} has no stored vector for {int((~ok).sum())} indexed "
                "stimuli; the store is damaged: run `vecsim verify`"
            )
        return np.searchsorted(vec_ids, ids)

    def stored_gram(self, ids: np.ndarray) -> np.ndarray:
        """Gram matrix of the projected activations with the raw squared norms on the diagonal.

        Off the diagonal ``⟨y_i, y_j⟩ ‖x_i‖ ‖x_j‖``; normalising it by its diagonal gives the
        stored cosine estimates ⟨y_i, y_j⟩, not ⟨y_i, y_j⟩ / (‖y_i‖ ‖y_j‖), which would undo
        what the normalise-then-project chain keeps. Identical stimuli (the same model input) have identical
        activations: their pairs get ``‖x_i‖ ‖x_j‖`` (cosine exactly 1, like the diagonal),
        as in query, neighbors and the similarity export.
        """
        key = np.asarray(ids, dtype=np.int64).tobytes()
        if key not in self._stored_grams:  # the same seeded rows for every RSA cell of a run
            pos = self.positions(ids)
            X = self._features[1][pos]
            norms = self._features[2][pos]
            G = X @ X.T
            np.fill_diagonal(G, norms**2)
            from vecsim.query import _identical_rows

            for rows in _identical_rows(self.store, ids):
                G[np.ix_(rows, rows)] = np.outer(norms[rows], norms[rows])
            self._stored_grams[key] = G
        return self._stored_grams[key]

    @property
    def eval(self) -> dict | None:
        if self._eval is False:
            ev = self.store.eval_subset(self.layer)
            if ev is not None and len(ev["ids"]) == 0:
                ev = None
            if ev is not None:
                gram = np.asarray(ev["gram"], dtype=np.float64)
                if self.similarity == "correlation":
                    sums = np.asarray(ev["sums"], dtype=np.float64)
                    gram = gram - np.outer(sums, sums) / float(ev["units"])
                order = np.argsort(ev["ids"], kind="stable")
                ev = {"ids": np.asarray(ev["ids"], dtype=np.int64)[order], "gram": gram[np.ix_(order, order)]}
            self._eval = ev
        return self._eval

    def gram(self, ids: np.ndarray) -> np.ndarray:
        ev = self.eval
        pos = np.searchsorted(ev["ids"], ids)
        return ev["gram"][np.ix_(pos, pos)]


def _in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return sorted_ids[pos] == ids


# --------------------------------------------------------------------------- comparison


@dataclass
class Comparison:
    """The result of :func:`compare_stores`: one cell per (measure, layer_a, layer_b)."""

    store_a: str
    store_b: str
    model_a: dict
    model_b: dict
    layers_a: list[str]
    layers_b: list[str]
    measures: list[str]
    pairs: str
    source: str
    matching: Matching
    cells: list[dict] = field(default_factory=list)

    def value(self, measure: str, layer_a: str, layer_b: str) -> float:
        return self.cell(measure, layer_a, layer_b)["value"]

    def cell(self, measure: str, layer_a: str, layer_b: str) -> dict:
        for c in self.cells:
            if c["measure"] == measure and c["layer_a"] == layer_a and c["layer_b"] == layer_b:
                return c
        raise KeyError(f"no cell {measure} {layer_a} × {layer_b}")

    def matrix(self, measure: str) -> np.ndarray:
        """(len(layers_a), len(layers_b)) values; NaN where undefined or not computed."""
        M = np.full((len(self.layers_a), len(self.layers_b)), np.nan)
        for c in self.cells:
            if c["measure"] == measure:
                M[c["row"], c["col"]] = c["value"]
        return M

    def rows(self) -> list[dict]:
        """Long form: one dict per cell (measure, layer_a, layer_b, row, col, value, source, n, ...)."""
        return [dict(c) for c in self.cells]

    def to_dict(self) -> dict:
        return json_safe({
            "store_a": self.store_a, "store_b": self.store_b, "model_a": self.model_a, "model_b": self.model_b,
            "layers_a": self.layers_a, "layers_b": self.layers_b, "measures": self.measures,
            "measure_descriptions": {m: MEASURES[m].description for m in self.measures},
            "pairs": self.pairs, "source": self.source, "matching": self.matching.to_dict(),
            "cells": self.rows(),
        })

    # -- files -----------------------------------------------------------------
    def save(self, out: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """Write comparison.parquet/.csv (long), comparison.json, and per measure
        ``<measure>_matrix.csv`` (wide) and ``<measure>.png`` (heatmap). Returns the paths.
        An earlier comparison's files in ``out`` are refused unless ``overwrite``, which also
        removes those of measures this one does not have."""
        import pyarrow as pa

        def files(measures) -> list[str]:
            return [name for m in measures for name in (f"{m}_matrix.csv", f"{m}.png")]

        folder = _out_dir(out, ["comparison.parquet", "comparison.csv", "comparison.json", *files(self.measures)],
                          overwrite, "compare", stale=tuple(files(m for m in MEASURES if m not in self.measures)))
        written = []
        rows = self.rows()
        schema = pa.schema([
            ("measure", pa.string()), ("layer_a", pa.string()), ("layer_b", pa.string()),
            ("row", pa.int32()), ("col", pa.int32()), ("value", pa.float64()), ("chance", pa.float64()),
            ("source", pa.string()),
            ("n", pa.int64()), ("higher_is_more_similar", pa.bool_()), ("note", pa.string()),
        ])
        meta = {k: v for k, v in self.to_dict().items() if k != "cells"}
        written += write_long_table(folder, "comparison", rows, schema, meta)

        path = folder / "comparison.json"
        write_text_atomic(path, dumps_json(self.to_dict()) + "\n")
        written.append(path)

        for measure in self.measures:
            M = self.matrix(measure)
            path = folder / f"{measure}_matrix.csv"
            with open(str(path) + ".tmp", "w", newline="", encoding="utf-8") as fh:
                writer = csv.writer(fh)
                writer.writerow(["layer_a \\ layer_b", *self.layers_b])
                for la, values in zip(self.layers_a, M):
                    writer.writerow([la, *["" if not np.isfinite(v) else repr(float(v)) for v in values]])
            fsync_replace(Path(str(path) + ".tmp"), path)
            written.append(path)
            path = folder / f"{measure}.png"
            self._plot(measure, path)
            written.append(path)
        return written

    def _plot(self, measure: str, path: Path) -> None:
        M = self.matrix(measure)
        higher = MEASURES[measure].higher_is_more_similar
        finite = M[np.isfinite(M)]
        if not higher:  # a distance (procrustes, in [0, 2]): reversed colours, so similar looks alike
            vmin, vmax, cmap = 0.0, float(max(finite.max(), 1e-9)) if finite.size else 1.0, "viridis_r"
        else:
            lo = float(finite.min()) if finite.size else 0.0
            vmin, vmax, cmap = min(0.0, lo), 1.0, "viridis"
        sources = self._source_summary(measure)
        title = f"{measure} ({'higher' if higher else 'lower'} = more similar)\n{sources}"
        name_a = f"A: {Path(self.store_a).name} ({self.model_a.get('name')})"
        name_b = f"B: {Path(self.store_b).name} ({self.model_b.get('name')})"
        _heatmap(path, M, self.layers_a, self.layers_b, title, cmap=cmap, vmin=vmin, vmax=vmax,
                 row_label=name_a, col_label=name_b)

    def _source_summary(self, measure: str) -> str:
        groups: dict[tuple[str, int], int] = {}
        for c in self.cells:
            if c["measure"] == measure:
                key = (c["source"], c["n"])
                groups[key] = groups.get(key, 0) + 1
        return "; ".join(f"{s} n={n}" + ("" if len(groups) == 1 else f" ({k} cells)")
                         for (s, n), k in sorted(groups.items()))

    # -- text ------------------------------------------------------------------
    def format(self) -> str:
        """The printed table: per measure the matrix (grid) or pair list (matching), with source and n."""
        lines = [
            f"A: {self.store_a} ({self.model_a.get('name')}" + _ckpt(self.model_a) + ")",
            f"B: {self.store_b} ({self.model_b.get('name')}" + _ckpt(self.model_b) + ")",
            self.matching.describe(),
        ]
        for measure in self.measures:
            m = MEASURES[measure]
            lines += ["", f"{measure}: {m.description}; {'higher' if m.higher_is_more_similar else 'lower'} = more similar"]
            lines += self._format_pairs(measure) if self.pairs == "matching" else self._format_grid(measure)
        return "\n".join(lines)

    def _format_grid(self, measure: str) -> list[str]:
        M = self.matrix(measure)
        width = max(8, *(len(x) for x in self.layers_b))
        head = max(9, *(len(x) for x in self.layers_a))
        out = [f"{_CORNER:<{head}}  " + "  ".join(f"{b:>{width}}" for b in self.layers_b)]
        for la, values in zip(self.layers_a, M):
            out.append(f"{la:<{head}}  " + "  ".join(f"{_fmt(v):>{width}}" for v in values))
        cells = [c for c in self.cells if c["measure"] == measure]
        if any(c.get("chance") is not None for c in cells):
            chance = np.full(M.shape, np.nan)
            for c in cells:
                chance[c["row"], c["col"]] = np.nan if c.get("chance") is None else c["chance"]
            out.append("chance level (the same measure with B's stimuli shuffled):")
            for la, values in zip(self.layers_a, chance):
                out.append(f"{la:<{head}}  " + "  ".join(f"{_fmt(v):>{width}}" for v in values))
        if len({(c["source"], c["n"]) for c in cells}) <= 1:
            c = cells[0]
            out.append(f"source: {c['source']}, n={c['n']} (every cell)" + (f"; {c['note']}" if c["note"] else ""))
            return out
        out.append("source of each cell (E = exact-gram, S = stored-vectors; number = n stimuli):")
        codes = {(c["row"], c["col"]): f"{'E' if c['source'] == EXACT else 'S'}{c['n']}" for c in cells}
        out.append(f"{_CORNER:<{head}}  " + "  ".join(f"{b:>{width}}" for b in self.layers_b))
        for i, la in enumerate(self.layers_a):
            out.append(f"{la:<{head}}  " + "  ".join(f"{codes.get((i, j), '-'):>{width}}"
                                                    for j in range(len(self.layers_b))))
        notes = sorted({c["note"] for c in cells if c["note"]})
        out += [f"note: {n}" for n in notes]
        return out

    def _format_pairs(self, measure: str) -> list[str]:
        cells = [c for c in self.cells if c["measure"] == measure]
        wa = max(7, *(len(c["layer_a"]) for c in cells))
        wb = max(7, *(len(c["layer_b"]) for c in cells))
        out = [f"{'layer_a':<{wa}}  {'layer_b':<{wb}}  {'value':>8}  {'chance':>8}  {'source':<14}  {'n':>6}"]
        for c in cells:
            chance = _fmt(np.nan if c.get("chance") is None else c["chance"])
            out.append(f"{c['layer_a']:<{wa}}  {c['layer_b']:<{wb}}  {_fmt(c['value']):>8}  {chance:>8}  "
                       f"{c['source']:<14}  {c['n']:>6}" + (f"  ({c['note']})" if c["note"] else ""))
        return out


def _ckpt(model: dict) -> str:
    if model.get("checkpoint"):
        return f", checkpoint {Path(model['checkpoint']).name}"
    return f", weights {model.get('weights') or 'none, random init'}"


def parse_names(given: str | Iterable[str], registry: Iterable[str], what: str) -> list[str]:
    """'a', 'a,b', 'all' or a list of names → names of ``registry``, in the order given, each once;
    an unknown one (named ``what`` in the error) lists the close matches."""
    known = list(registry)
    items = [m.strip() for m in (given.split(",") if isinstance(given, str) else given)]
    items = [m for m in items if m]
    if not items:
        raise ConfigError(f"no {what} given; choose from {', '.join(known)} or all")
    names: list[str] = []
    for m in items:
        if m == "all":
            names += [x for x in known if x not in names]
            continue
        if m not in known:
            raise ConfigError(f"unknown {what} {m!r}{close_matches(m, known)}; choose from "
                              f"{', '.join(known)} or all")
        if m not in names:
            names.append(m)
    return names


def parse_measures(measures: str | Iterable[str]) -> list[str]:
    """'cka', 'cka,pwcca', 'all' or a list of names → registered measure names, in order."""
    return parse_names(measures, MEASURES, "measure")


def _layers(store, layers: Sequence[str] | str | None) -> list[str]:
    if layers is None:
        return store.layers
    names = [x.strip() for x in layers.split(",")] if isinstance(layers, str) else list(layers)
    names = [x for x in names if x]
    for name in names:
        store.layer_info(name)  # UnknownLayerError with close matches
    if not names:
        raise ConfigError("an empty layer list was given; name at least one layer")
    return names


def compare_stores(
    a,
    b=None,
    measures: str | Iterable[str] = ("cka",),
    layers_a: Sequence[str] | str | None = None,
    layers_b: Sequence[str] | str | None = None,
    *,
    pairs: str = "grid",
    source: str = "auto",
    min_common: int = MIN_COMMON,
    max_rsa_stimuli: int = MAX_RSA_STIMULI,
    seed: int = 0,
) -> Comparison:
    """Compare every layer of store ``a`` (rows) with every layer of ``b`` (columns).

    ``a``/``b``: store paths or opened :class:`~vecsim.store.Store` s; ``b=None``
    compares ``a`` with itself. ``measures``: names of
    :data:`vecsim.measures.MEASURES`, a comma-separated string, or ``"all"``.
    ``pairs="matching"`` compares ``layers_a[i]`` with ``layers_b[i]`` only
    (``layers_b`` defaults to ``layers_a``). ``source``: ``"auto"`` (exact
    evaluation-subset Grams when both layers have ≥ ``min_common`` common subset
    stimuli, else stored vectors), ``"exact-gram"`` (error if not possible) or
    ``"stored-vectors"``. See the module docstring for what each source computes.

    Stimuli are matched by sha256 (:func:`match_stimuli`); fewer than ``min_common``
    common stimuli raise :class:`StimulusSetError`. Every cell records ``value``
    (NaN when undefined, e.g. a constant layer), ``source``, ``n`` and a ``note``.
    """
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if pairs not in PAIRS:
        raise ConfigError(f"unknown pairs {pairs!r}; choose grid (every layer of A × every layer of B) or matching")
    if isinstance(min_common, bool) or int(min_common) < 2:
        raise ConfigError(f"min_common must be an integer ≥ 2, got {min_common!r}")
    names = parse_measures(measures)
    store_a = _open(a)
    store_b = store_a if b is None else _open(b)
    match = match_stimuli(store_a, store_b, min_common)
    if match.same_store:
        store_b = store_a
    rows = _layers(store_a, layers_a)
    if pairs == "matching":
        cols = _layers(store_b, layers_b if layers_b is not None else rows)
        if len(cols) != len(rows):
            raise ConfigError(f"--pairs matching needs as many B layers as A layers ({len(cols)} vs {len(rows)})")
        todo = [(i, i) for i in range(len(rows))]
    else:
        cols = _layers(store_b, layers_b)
        todo = [(i, j) for i in range(len(rows)) for j in range(len(cols))]
    data_a = {la: _LayerData(store_a, la) for la in rows}
    data_b = data_a if store_b is store_a else {}
    for lb in cols:
        if lb not in data_b:
            data_b[lb] = _LayerData(store_b, lb)
    calc = _Calculator(match, source, int(min_common), int(max_rsa_stimuli), seed)
    cells = []
    for measure in names:
        done: dict[tuple[str, str], dict] = {}
        for i, j in todo:
            la, lb = rows[i], cols[j]
            key = (la, lb)
            mirror = (lb, la)
            if match.same_store and measure not in _ASYMMETRIC and mirror in done:
                result = done[mirror]
            else:
                result = calc.cell(measure, data_a[la], data_b[lb])
                done[key] = result
            cells.append({"measure": measure, "layer_a": la, "layer_b": lb, "row": i, "col": j, **result,
                          "higher_is_more_similar": MEASURES[measure].higher_is_more_similar})
    return Comparison(
        store_a=str(store_a.path), store_b=str(store_b.path),
        model_a=store_a.manifest.get("model", {}), model_b=store_b.manifest.get("model", {}),
        layers_a=rows, layers_b=cols, measures=names, pairs=pairs, source=source, matching=match, cells=cells,
    )


class _Calculator:
    def __init__(self, match: Matching, source: str, min_common: int, max_rsa: int, seed: int):
        self.match, self.source, self.min_common, self.max_rsa = match, source, min_common, max_rsa
        self.partner = dict(zip(match.ids_a.tolist(), match.ids_b.tolist()))
        n = match.matched
        if n > max_rsa:
            keep = np.sort(np.random.default_rng([seed, 2]).permutation(n)[:max_rsa])
        else:
            keep = np.arange(n)
        self.rsa_rows = keep
        self.seed = seed
        self._bases: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._bases_bytes = 0

    def cell(self, measure: str, da: _LayerData, db: _LayerData) -> dict:
        m = MEASURES[measure]
        if m.kind == "gram" and self.source != STORED:
            ids, why = self._exact_ids(da, db)
            if ids is not None:
                ids_b = np.array([self.partner[i] for i in ids.tolist()], dtype=np.int64)
                value, extra = self._exact(measure, da, ids, db, ids_b)
                return {"value": float(value), "source": EXACT, "n": int(len(ids)), **_cca_extras(extra, "")}
            if self.source == EXACT:
                raise StoreError(f"{measure} of {da.layer} × {db.layer} cannot use exact Grams: {why}; "
                                 "use source auto or stored-vectors")
            note = why
        elif m.kind == "gram" or self.source != EXACT:
            note = ""
        else:
            note = f"{measure} needs features; Grams do not keep individual units"
        return self._stored(measure, da, db, note)

    def _shuffle(self, n: int) -> np.ndarray:
        """The seeded stimulus order of B for the CCA measures' chance level."""
        return np.random.default_rng([self.seed, 3]).permutation(n)

    def _exact(self, measure: str, da: _LayerData, ids_a: np.ndarray, db: _LayerData,
               ids_b: np.ndarray) -> tuple[float, dict]:
        K, L = da.gram(ids_a), db.gram(ids_b)
        if measure not in _BASIS_MEASURES:
            return MEASURES[measure].fn(K, L), {}
        # SVCCA and Procrustes start from an eigendecomposition of each centred Gram: do it
        # once per layer and stimulus set, not once per cell (2·L² → L per measure grid).
        Ux, sx = self._basis(da, ids_a, K)
        Uy, sy = self._basis(db, ids_b, L)
        if measure == "svcca":
            res = _measures._svcca_from_bases(Ux, sx, Uy, sy, SVCCA_KEEP)
            # B's rows (stimuli) shuffled: the same directions, no correspondence
            chance = _measures._svcca_from_bases(Ux, sx, Uy[self._shuffle(len(ids_b))], sy, SVCCA_KEEP)["mean"]
            return res["mean"], {"chance": chance, "dims": res["dims"], "n": len(ids_a)}
        return _measures._nuclear_procrustes(Ux * sx, Uy * sy, K, L), {}

    def _basis(self, data: _LayerData, ids: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = (str(data.store.path), data.layer, ids.tobytes())
        if key not in self._bases:
            units = data.eval.get("units") if data.eval is not None else None
            U, s = eval_gram_basis(K, units)
            self._bases[key] = (U, s)
            self._bases_bytes += U.nbytes
            while self._bases_bytes > BASIS_CACHE_BYTES and len(self._bases) > 1:
                oldest = next(iter(self._bases))
                self._bases_bytes -= self._bases.pop(oldest)[0].nbytes
        return self._bases[key]

    def _exact_ids(self, da: _LayerData, db: _LayerData) -> tuple[np.ndarray | None, str]:
        ea, eb = da.eval, db.eval
        if ea is None or eb is None:
            which = " and ".join(x for x, e in (("A", ea), ("B", eb)) if e is None)
            return None, f"no evaluation subset for this layer in {which}"
        ids_a = self.match.ids_a[_in_sorted(ea["ids"], self.match.ids_a)]
        partners = np.array([self.partner[i] for i in ids_a.tolist()], dtype=np.int64)
        ids = ids_a[_in_sorted(eb["ids"], partners)]
        if len(ids) < self.min_common:
            return None, f"only {len(ids)} stimuli common to both evaluation subsets (< {self.min_common})"
        return ids, ""

    def _stored(self, measure: str, da: _LayerData, db: _LayerData, note: str) -> dict:
        matched = len(self.match.ids_a)
        extra: dict = {}
        centred = [f"{d.layer} ({d.store.path.name})" for d in (da, db) if d.centred]
        if centred:  # renormalised directions of centred vectors: neither the activations nor their cosines
            why = (f"{' and '.join(centred)} indexed with --center: its stored vectors are directions of "
                   "stimulus-centred vectors, from which neither the activations nor their raw cosines can be "
                   "recovered; keep an evaluation subset (--eval-size) for exact Grams")
            return {"value": float("nan"), "source": STORED, "n": 0, **_cca_extras({}, _joined(note, why))}
        old_norm = [f"{d.layer} ({d.store.path.name})" for d in (da, db)
                    if d.similarity == "correlation" and d.stored_norm != "row-centred"]
        if old_norm and (measure in _CCA_MEASURES or measure in _FEATURE_FORMS):
            why = (f"approximate: {' and '.join(old_norm)} was indexed before vecsim recorded row-centred norms, "
                   "so its vectors are rescaled by the norm before row-centring")
            note = _joined(note, why)
        if measure == "pwcca" and not da.unit_map()[0]:
            why = (f"{da.layer} ({da.store.path.name}) is stored through a count sketch, whose buckets mix its "
                   "units; PWCCA weighs canonical directions by the units, so it cannot be computed from the "
                   "stored vectors (SVCCA and CKA can)")
            return {"value": float("nan"), "source": STORED, "n": 0, **_cca_extras({}, _joined(note, why))}
        if measure in _CCA_MEASURES:
            X, Y = da.features(self.match.ids_a), db.features(self.match.ids_b)
            # PWCCA's weights are per unit: the stored coordinates are projection directions,
            # mapped back to the units by the projection (exact for a lossless layer)
            value, extra = _cca_with_chance(measure, X, Y, self._shuffle(matched),
                                            da.unit_map()[1] if measure == "pwcca" else None)
            n = matched
        elif measure in _FEATURE_FORMS:
            X, Y = da.features(self.match.ids_a), db.features(self.match.ids_b)
            value, n = _FEATURE_FORMS[measure](X, Y), matched
        else:  # Gram-only measures (RSA): all pairs, so a seeded subsample caps the cost
            da.positions(self.match.ids_a), db.positions(self.match.ids_b)  # every matched stimulus has a vector
            rows = self.rsa_rows
            Ga, Gb = da.stored_gram(self.match.ids_a[rows]), db.stored_gram(self.match.ids_b[rows])
            value, n = MEASURES[measure].fn(Ga, Gb), len(rows)
            if n < matched:
                note = _joined(note, f"seeded subsample of {n} of {matched} matched stimuli")
        return {"value": float(value), "source": STORED, "n": int(n), **_cca_extras(extra, note)}


# --------------------------------------------------------------------------- spectra


def describe_spectrum_matrix(info: dict) -> dict:
    """Which matrix a layer's stored spectrum is of, from its manifest entry."""
    red = info["reducer"]
    cfg, fit, sketch = red.get("config", {}), red.get("fit") or {}, red.get("sketch")
    units = int(red.get("units") or np.prod(red.get("shape", [0])))
    pooling = cfg.get("pooling", "flatten")
    n_train = fit.get("n_train")
    if sketch:
        of = f"{sketch['dim']:,}-bucket count sketch (seed {sketch.get('seed', 0)}) of the"
        kind = "sketched"
    else:
        of, kind = "the", "raw"
    rows = "row-centred (correlation) " if cfg.get("similarity") == "correlation" else ""
    centred = bool(cfg.get("center"))
    moment = "centred covariance (× n)" if centred else "uncentred second moment"
    text = (f"eigenvalues of ZᵀZ, the {moment} of Z = {of} {rows}{pooling}-pooled raw activations "
            f"of the n_train={n_train} training stimuli, each row scaled to unit length")
    return {"matrix": f"{kind} {'centred covariance' if centred else 'second moment'}", "sketched": bool(sketch),
            "sketch_dim": sketch["dim"] if sketch else None, "centred": centred,
            "similarity": cfg.get("similarity", "cosine"), "pooling": pooling, "units": units,
            "dim_in": red.get("dim_in"), "n_train": n_train, "description": text}


@dataclass
class SpectrumReport:
    """Per-layer effective dimensionality of the stored training spectra, in the model's
    forward-pass order (recorded at indexing; older stores: the order the layers were listed)."""

    store: str
    layers: list[dict]
    spectra: dict[str, np.ndarray]

    def to_dict(self) -> dict:
        return json_safe({"store": self.store, "energy_fractions": list(ENERGY_FRACTIONS), "layers": self.layers})

    def format(self) -> str:
        head = max(5, *(len(r["layer"]) for r in self.layers))
        order = ("in the model's forward-pass order" if all(r.get("depth_recorded") for r in self.layers)
                 else "in the order they were listed at indexing (this store did not record the forward-pass order)")
        lines = [f"store {self.store}: spectra of each layer's training sample, {order} "
                 "(PR = participation ratio, eRank = entropy effective rank)",
                 f"{'layer':<{head}}  {'matrix':<24} {'units':>9} {'n_train':>7} {'eigs':>6} {'PR':>8} {'eRank':>8} "
                 f"{'d90%':>6} {'d95%':>6} {'d99%':>6} {'kept dim':>8} {'PR cov':>8} {'eRank cov':>9}"]
        for r in self.layers:
            if r["n_eigenvalues"] == 0:
                lines.append(f"{r['layer']:<{head}}  (no spectrum stored)")
                continue
            d = r["dims_for_energy"]
            lines.append(
                f"{r['layer']:<{head}}  {r['matrix']:<24} {r['units']:>9,} {r['n_train'] or '-':>7} {r['n_eigenvalues']:>6} "
                f"{r['participation_ratio']:>8.2f} {r['entropy_rank']:>8.2f} {d['0.9']:>6} {d['0.95']:>6} "
                f"{d['0.99']:>6} {r['reduced_dim'] or '-':>8} {_fmt(r['participation_ratio_centred'], 2):>8} "
                f"{_fmt(r['entropy_rank_centred'], 2):>9}")
        described = {r["description"] for r in self.layers}
        lines.append("")
        lines += [f"{r['layer']}: {r['description']}" for r in self.layers] if len(described) > 1 else \
            [f"every layer: {next(iter(described))}"]
        lines.append("PR cov / eRank cov: the same measures on the covariance of those rows (centred), the "
                     "matrix Gao et al.'s participation ratio is defined on; '-' where the store did not record it")
        return "\n".join(lines)

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """spectrum.json, spectrum.csv (the numbers) and spectrum.png (normalised spectra by depth);
        an earlier run's are refused unless ``overwrite``."""
        folder = _out_dir(out, ["spectrum.json", "spectrum.csv", "spectrum.png"], overwrite, "spectrum")
        path_json = folder / "spectrum.json"
        payload = self.to_dict()
        payload["normalised_spectra"] = {k: (v / v.sum() if v.sum() > 0 else v) for k, v in self.spectra.items()}
        write_text_atomic(path_json, dumps_json(payload) + "\n")
        path_csv = folder / "spectrum.csv"
        cols = ["layer", "depth", "matrix", "n_train", "n_eigenvalues", "participation_ratio", "entropy_rank",
                "n_positive", "dims_90", "dims_95", "dims_99", "reduced_dim", "energy_kept",
                "participation_ratio_centred", "entropy_rank_centred"]
        with open(str(path_csv) + ".tmp", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(cols)
            for r in self.layers:
                d = r["dims_for_energy"]
                w.writerow([r["layer"], r["depth"], r["matrix"], r["n_train"], r["n_eigenvalues"],
                            _csv(r["participation_ratio"]), _csv(r["entropy_rank"]), r["n_positive"],
                            d.get("0.9"), d.get("0.95"), d.get("0.99"), r["reduced_dim"], _csv(r["energy_kept"]),
                            _csv(r["participation_ratio_centred"]), _csv(r["entropy_rank_centred"])])
        fsync_replace(Path(str(path_csv) + ".tmp"), path_csv)
        path_png = folder / "spectrum.png"
        self._plot(path_png)
        return [path_json, path_csv, path_png]

    def _plot(self, path: Path) -> None:
        from matplotlib import cm

        fig = _figure(7.5, 4.8)
        ax = fig.add_subplot(1, 1, 1)
        layers = [r["layer"] for r in self.layers]
        colours = cm.viridis(np.linspace(0, 0.95, max(len(layers), 1)))
        for colour, layer in zip(colours, layers):
            lam = np.clip(self.spectra[layer], 0, None)
            if lam.size == 0 or lam.sum() <= 0:
                continue
            p = lam / lam.sum()
            k = np.arange(1, p.size + 1)
            pos = p > 0
            ax.plot(k[pos], p[pos], color=colour, lw=1.4, label=layer)
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("component (descending)")
        ax.set_ylabel("eigenvalue / total")
        kinds = sorted({f"{r['matrix']}, n_train={r['n_train']}" for r in self.layers})
        ax.set_title(f"normalised spectra by depth — {Path(self.store).name}\n{'; '.join(kinds)}", fontsize=9)
        ax.legend(fontsize=7, title="layer (light = deep)", title_fontsize=7)
        ax.grid(True, which="both", alpha=0.2)
        fig.tight_layout()
        fig.savefig(path)


def _csv(v):
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def layers_by_depth(store, names: Sequence[str]) -> tuple[list[str], dict[str, int], bool]:
    """``names`` in the model's forward-pass order (recorded at indexing), each layer's depth,
    and whether the store recorded it. An older store did not: ``names`` stay in their order
    and a layer's depth is its position in the list the store was indexed with."""
    depth = {layer: store.layer_info(layer).get("depth") for layer in store.layers}
    recorded = all(d is not None for d in depth.values())
    if recorded:
        return sorted(names, key=lambda layer: depth[layer]), depth, True
    return list(names), {layer: store.layers.index(layer) for layer in store.layers}, False


def store_spectra(store, layers: Sequence[str] | str | None = None,
                  fractions: Sequence[float] = ENERGY_FRACTIONS) -> SpectrumReport:
    """Effective rank (participation ratio, entropy) and dims for each energy fraction, per layer.

    From ``store.spectrum(layer)``: the eigenvalues of the training sample's second-moment
    matrix the projection was fitted on (see :func:`describe_spectrum_matrix`; sketched
    when the layer was sketched). A layer without a stored spectrum gets zeros/None.
    """
    from vecsim.structure import dims_for_energy, effective_rank

    st = _open(store)
    names, depth, recorded = layers_by_depth(st, _layers(st, layers))
    rows, spectra = [], {}
    for layer in names:
        info = st.layer_info(layer)
        lam = np.asarray(st.spectrum(layer), dtype=np.float64)
        spectra[layer] = lam
        row = {"layer": layer, "depth": depth[layer], "depth_recorded": recorded, **describe_spectrum_matrix(info),
               "n_eigenvalues": int(lam.size)}
        fit = info["reducer"].get("fit") or {}
        row["reduced_dim"], row["energy_kept"] = fit.get("dim"), fit.get("energy_kept")
        if lam.size:
            er = effective_rank(lam)
            dims = dims_for_energy(lam, fractions)
            row.update(participation_ratio=er["participation_ratio"], entropy_rank=er["entropy_rank"],
                       n_positive=er["n_positive"], dims_for_energy={str(f): k for f, k in dims.items()})
        else:
            row.update(participation_ratio=None, entropy_rank=None, n_positive=0,
                       dims_for_energy={str(float(f)): None for f in fractions})
        centred = np.asarray(st.spectrum(layer, centred=True), dtype=np.float64)
        if centred.size:  # the covariance spectrum (Gao et al.'s PR is defined on it)
            er = effective_rank(centred)
            row.update(participation_ratio_centred=er["participation_ratio"], entropy_rank_centred=er["entropy_rank"])
        else:  # indexed before vecsim recorded it
            row.update(participation_ratio_centred=None, entropy_rank_centred=None)
        rows.append(row)
    return SpectrumReport(str(st.path), rows, spectra)


# --------------------------------------------------------------------------- channels


@dataclass
class ChannelReport:
    """Channel redundancy of one layer from its evaluation-subset channel responses."""

    store: str
    layer: str
    n_stimuli: int
    n_channels: int
    grid_cells: int
    similarity: np.ndarray
    overlap: np.ndarray
    summary: dict
    top_pairs: list[dict]

    def to_dict(self) -> dict:
        return json_safe({"store": self.store, "layer": self.layer, "n_stimuli": self.n_stimuli,
                          "n_channels": self.n_channels, "grid_cells": self.grid_cells,
                          "summary": self.summary, "top_pairs": self.top_pairs})

    def format(self) -> str:
        s = self.summary
        lines = [
            f"{self.layer} of {self.store}: {self.n_channels} channels, responses of {self.n_stimuli} "
            f"evaluation-subset stimuli pooled to {self.grid_cells} grid cell{'s' if self.grid_cells != 1 else ''}",
            f"dead channels          {s['n_dead']}" + (f" ({', '.join(map(str, s['dead_channels'][:20]))}"
                                                      f"{', …' if len(s['dead_channels']) > 20 else ''})"
                                                      if s["n_dead"] else ""),
            f"live channel pairs     {s['n_pairs']:,}",
            f"cosine   mean/median   {_fmt(s['cosine_mean'], 3)} / {_fmt(s['cosine_median'], 3)}",
            f"pairs with cosine > {s['cosine_threshold']:g}  "
            + ("-" if s["frac_pairs_cosine_above"] is None else f"{s['frac_pairs_cosine_above']:.1%}"),
            f"CW-NNK overlap mean/median  {_fmt(s['overlap_mean'], 3)} / {_fmt(s['overlap_median'], 3)} "
            f"(k={s['k']}, {s['kernel']} kernel)",
        ]
        if self.top_pairs:
            lines.append("most redundant pairs (by overlap):")
            lines += [f"  {p['a']:>4} – {p['b']:<4} overlap {p['overlap']:.3f}  cosine {p['cosine']:.3f}"
                      for p in self.top_pairs]
        return "\n".join(lines)

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """similarity.npy, overlap.npy, their heatmaps and summary.json (file names prefixed by the
        layer, so several layers can share a folder); this layer's earlier files are refused
        unless ``overwrite``."""
        from vecsim.store import layer_slug

        slug = layer_slug(self.layer)
        matrices = (("similarity", self.similarity, "RdBu_r", -1.0), ("overlap", self.overlap, "viridis", 0.0))
        names = [f"{slug}_{m[0]}.{ext}" for m in matrices for ext in ("npy", "png")] + [f"{slug}_summary.json"]
        folder = _out_dir(out, names, overwrite, "channels")
        written = []
        for name, M, cmap, vmin in matrices:
            path = folder / f"{slug}_{name}.npy"
            tmp = folder / f"{slug}_{name}.tmp.npy"
            np.save(tmp, M)
            fsync_replace(tmp, path)
            written.append(path)
            png = folder / f"{slug}_{name}.png"
            label = "cosine similarity" if name == "similarity" else f"CW-NNK overlap (k={self.summary['k']})"
            ticks = [str(i) for i in range(self.n_channels)]
            _heatmap(png, M, ticks, ticks, f"{self.layer}: channel {label}, n={self.n_stimuli}", cmap=cmap,
                     vmin=vmin, vmax=1.0, row_label="channel", col_label="channel", annotate=False)
            written.append(png)
        path = folder / f"{slug}_summary.json"
        write_text_atomic(path, dumps_json(self.to_dict()) + "\n")
        written.append(path)
        return written


def channel_redundancy(store, layer: str, k: int = 10, kernel: str = "auto", top: int = 5) -> ChannelReport:
    """Channel × channel cosine and CW-NNK overlap (:mod:`vecsim.structure`) of one layer.

    Uses the per-channel responses (pooled to ≤ 4×4) the evaluation subset keeps for
    layers with a (C, H, W) output. ``kernel="auto"`` is the NNK cosine kernel, except
    for a 1×1 map (one response per channel), where the cosine kernel only sees signs
    and the Gaussian kernel is used instead. ``top_pairs``: the ``top`` live channel
    pairs with the highest overlap. Raises :class:`ConfigError` for a layer without
    channel responses (not a feature map) and :class:`StoreError` for a store without
    an evaluation subset.
    """
    from vecsim.structure import KERNELS, channel_overlap, channel_similarity, redundancy_summary

    st = _open(store)
    info = st.layer_info(layer)
    shape = info["reducer"].get("shape", [])
    if len(shape) != 3:
        maps = [name for name in st.layers if len(st.layer_info(name)["reducer"].get("shape", [])) == 3]
        raise ConfigError(
            f"layer {layer} has output shape {'x'.join(map(str, shape))}, not a (C, H, W) feature map, so it has no "
            f"channel responses; choose one of: {', '.join(maps) or '(this store has no feature-map layer)'}"
        )
    ev = st.eval_subset(layer)
    held = held_by_budget(st.manifest, layer)
    config = st.manifest.get("config") or {}
    why = (f"the --eval-memory budget ({config.get('eval_memory')} MB) held {held} of this layer's raw vectors "
           f"(--eval-size {config.get('eval_size')}); re-index with a larger --eval-memory"
           if held is not None else "re-index with --eval-size > 0 to get channel responses")
    if ev is None or len(ev["ids"]) == 0:
        raise StoreError(f"{st.path} has no evaluation subset for {layer}: {why}")
    if "channels" not in ev:
        raise StoreError(f"the evaluation subset of {layer} in {st.path} holds no channel responses; re-index it")
    R = np.asarray(ev["channels"], dtype=np.float64)
    if R.shape[0] < 3:
        raise StoreError(f"the evaluation subset of {layer} holds {R.shape[0]} stimuli and channel overlap needs "
                         f"at least 3: {why}")
    if kernel not in ("auto", *KERNELS):
        raise ConfigError(f"unknown NNK kernel {kernel!r}; choose auto, {', '.join(KERNELS)}")
    if kernel == "auto":
        kernel = "gaussian" if R.shape[2] == 1 else "cosine"
    S = channel_similarity(R)
    O = channel_overlap(R, k, kernel)
    summary = redundancy_summary(R, k, kernel, similarity=S, overlap=O)
    live = np.flatnonzero(~np.isin(np.arange(R.shape[1]), summary["dead_channels"]))
    iu = np.triu_indices(len(live), k=1)
    pairs = []
    if iu[0].size:
        a, b = live[iu[0]], live[iu[1]]
        vals = O[a, b]
        order = np.lexsort((-S[a, b], -vals))[:top]
        pairs = [{"a": int(a[t]), "b": int(b[t]), "overlap": float(O[a[t], b[t]]), "cosine": float(S[a[t], b[t]])}
                 for t in order]
    return ChannelReport(str(st.path), layer, int(R.shape[0]), int(R.shape[1]), int(R.shape[2]), S, O, summary, pairs)


# --------------------------------------------------------------------------- pruning


def prune_checkpoint(
    model: str,
    out: str | os.PathLike,
    amount: float,
    scope: str = "global",
    weights: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict:
    """Load ``model`` (:func:`vecsim.models.load_model`), magnitude-prune it
    (:func:`vecsim.prune.prune_model`) and save its state dict to ``out``.

    The file is what ``vecsim index --model MODEL --checkpoint OUT`` loads. An existing
    ``out`` is refused unless ``overwrite``. Returns the pruning report (overall and
    per-layer sparsity) plus ``out``, ``bytes`` and the source ``model`` description.
    """
    from vecsim.models import load_model
    from vecsim.prune import check_prune_args, prune_model

    out = Path(out)
    amount = check_prune_args(amount, scope)
    if out.is_dir():
        raise OutputExistsError(f"--out {out} is a folder; give a file name such as pruned.pt")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {out.parent} does not exist or is not a folder; create it first")
    import torch

    loaded = load_model(model, weights=weights, checkpoint=None if checkpoint is None else str(checkpoint))
    report = prune_model(loaded.module, amount, scope)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:  # an OSError names the path (torch.save's own errors do not)
            torch.save(loaded.module.state_dict(), fh)
        fsync_replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ConfigError(f"cannot write the pruned state dict to {out}: {exc.strerror or exc}") from None
    return {**report, "model": loaded.describe(), "out": str(out), "bytes": out.stat().st_size}


def format_prune(report: dict) -> str:
    src = report["model"]
    origin = f"checkpoint {src['checkpoint']}" if src.get("checkpoint") else f"weights {src.get('weights')}"
    width = max(5, *(len(n) for n in report["layers"]))
    lines = [f"pruned {src['name']} ({origin}): {report['scope']} magnitude pruning, amount {report['amount']:g}",
             f"{'layer':<{width}}  {'weights':>10}  {'zeros':>10}  {'sparsity':>8}"]
    for name, r in report["layers"].items():
        lines.append(f"{name:<{width}}  {r['numel']:>10,}  {r['zeros']:>10,}  {r['sparsity']:>8.2%}")
    lines.append(f"{'overall':<{width}}  {report['total']:>10,}  {report['zeros']:>10,}  {report['sparsity']:>8.2%}")
    lines.append(f"saved the state dict to {report['out']} ({report['bytes']:,} bytes); "
                 f"index with: vecsim index SOURCE --model {src['name']} --checkpoint {report['out']} ...")
    return "\n".join(lines)
