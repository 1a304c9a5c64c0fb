"""The fidelity report: how much the reduction lost, layer by layer, with plots.

Everything is measured on each layer's evaluation subset (``vecsim index --eval-size``),
whose exact similarities of the *raw* activations the store keeps. The stored vectors'
coordinates are sorted by eigenvalue, so the reduction to any k ≤ the stored dim is the
first k coordinates (renormalised for a centred store, whose vectors are renormalised after
the projection); "fidelity vs dims" uses that. The similarity is the store's (cosine or correlation): the stored vectors already
encode it.

Per layer, over all pairs i < j of the subset: Spearman and Pearson between exact and
reduced similarities, max and mean |Δ|, and recall@10 of the reduced neighbours against
the exact ones (self excluded, k = min(10, M - 1)); energy kept vs dims from the
spectrum. With labels: same-label vs different-label similarity distributions, exact and
at each compression level, summarised by ROC AUC (Mann–Whitney) and d′.

``build_report`` writes report.html (self-contained, figures as data URIs), report.md
(figures as files under ``figures/``), the PNGs and report.json (non-finite numbers as
null). matplotlib is used through its Agg canvas only, never pyplot, so importing or
running this leaves an interactive session's backend alone.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from pathlib import Path

import numpy as np

from vecsim.errors import ConfigError, OutputExistsError, StoreError
from vecsim.evalset import added_later, held_by_budget
from vecsim.measures import _pearson, rankdata
from vecsim._io import json_safe, write_text_atomic

RECALL_K = 10
HIST_BINS = 60
FIGURES_DIR = "figures"
REPORT_FILES = ("report.html", "report.md", "report.json")
ID_CHUNK = 1000  # ids per SQL IN (...) filter when reading the subset's vectors
FEW_SUBSET = 20  # below this many subset stimuli the report says its figures rest on few pairs
NO_LABELS_LINE = "This store has no labels, so the class-separation sections are left out."


# -- class separation measures --------------------------------------------------------

def _scores(values, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ConfigError(f"{what} is empty; class separation needs at least one score on each side")
    if not np.isfinite(arr).all():
        raise ConfigError(f"{what} holds NaN or infinite scores")
    return arr


def roc_auc(pos, neg) -> float:
    """ROC AUC of ``pos`` scored above ``neg``: P(pos > neg) + ½ P(tie) (Mann–Whitney U / n₊n₋).

    1 when every positive scores above every negative, 0.5 for indistinguishable scores.
    """
    pos, neg = _scores(pos, "pos"), _scores(neg, "neg")
    ranks = rankdata(np.concatenate([pos, neg]))  # average ranks: a tie counts ½
    n_pos, n_neg = pos.size, neg.size
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (float(n_pos) * float(n_neg))


def d_prime(pos, neg) -> float:
    """d′ = (μ₊ − μ₋) / sqrt((σ₊² + σ₋²) / 2), population variances.

    With both variances zero: ±inf when the means differ, 0 when they are equal (no
    division warnings).
    """
    pos, neg = _scores(pos, "pos"), _scores(neg, "neg")
    diff = float(pos.mean() - neg.mean())
    spread = math.sqrt((float(pos.var()) + float(neg.var())) / 2.0)
    if spread > 0:
        return diff / spread
    return math.copysign(math.inf, diff) if diff != 0 else 0.0


def separation(pos, neg) -> dict:
    """AUC, d′ and the two distributions' means and standard deviations."""
    pos, neg = _scores(pos, "pos"), _scores(neg, "neg")
    return {
        "auc": roc_auc(pos, neg), "d_prime": d_prime(pos, neg),
        "mean_same": float(pos.mean()), "mean_diff": float(neg.mean()),
        "sd_same": float(pos.std()), "sd_diff": float(neg.std()),
    }


# -- similarity measures --------------------------------------------------------------

def compression_dims(stored_dim: int) -> list[int]:
    """8, 16, 32, … up to and including the stored dim (just the stored dim below 8)."""
    dims, k = [], 8
    while k < stored_dim:
        dims.append(k)
        k *= 2
    return dims + [int(stored_dim)]


def truncate(vectors: np.ndarray, k: int, renormalise: bool = False) -> np.ndarray:
    """The first k coordinates: what the same chain stores at dim k (the projection's rows are
    sorted by eigenvalue; training vectors shrunk in-sample are rescaled apart, see
    ``_in_sample_levels``). ``renormalise`` for a centred store, whose chain renormalises after
    the projection; an all-zero row stays zero."""
    head = np.array(vectors[:, :k], dtype=np.float64)  # a copy: callers rescale rows in place
    if not renormalise:
        return head
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return head / np.where(norms > 0, norms, 1.0)


def _in_sample_levels(store, layer: str, ids: np.ndarray, stored: int):
    """None, or where the layer's training vectors are shrunk (vecsim.reduce's module
    docstring), a function ``(reduced, d)`` that rescales in place the rows of ``ids`` in the
    training sample from the stored dim's shrinkage to the one the chain applies at dim d."""
    from vecsim.reduce import in_sample_scale

    noise = store.in_sample_noise(layer)
    if noise.size != stored or noise[-1] <= 0:
        return None
    evals = store.spectrum(layer)[:stored]
    rows = np.isin(ids, store.training_ids())
    stored_scale = in_sample_scale(evals, noise[-1]).astype(np.float64)

    def rescale(reduced: np.ndarray, d: int) -> None:
        if d < stored and rows.any():
            factor = np.divide(in_sample_scale(evals[:d], noise[d - 1]), stored_scale[:d],
                               out=np.zeros(d), where=stored_scale[:d] > 0)
            reduced[rows] *= factor
    return rescale


def _renormalised(store, layer: str) -> bool:
    """Whether the layer's chain renormalises after the projection (centred PCA)."""
    from vecsim.reduce import ReducerConfig

    return ReducerConfig(**store.layer_info(layer)["reducer"]["config"]).renormalises


def energy_curve(spectrum: np.ndarray) -> np.ndarray:
    """Fraction of the second-moment energy kept by the first 1, 2, … directions."""
    spec = np.clip(np.asarray(spectrum, dtype=np.float64), 0, None)
    total = spec.sum()
    return np.cumsum(spec) / total if total > 0 else np.ones_like(spec)


def neighbours(sim: np.ndarray, k: int) -> np.ndarray:
    """Each row's k most similar other rows (self excluded), most similar first, ties by index."""
    masked = np.array(sim, dtype=np.float64, copy=True)
    np.fill_diagonal(masked, -np.inf)
    return np.argsort(-masked, axis=1, kind="stable")[:, :k]


def recall_at_k(exact: np.ndarray, approx: np.ndarray, k: int, truth: np.ndarray | None = None) -> float:
    """Mean over rows of |exact top-k ∩ approx top-k| / k (``truth``: ``neighbours(exact, k)``
    when the caller already has it)."""
    if k < 1:
        raise ConfigError("recall@k needs k ≥ 1 (an evaluation subset of at least 2 stimuli)")
    truth = neighbours(exact, k) if truth is None else truth
    found = neighbours(approx, k)
    hits = [len(np.intersect1d(t, f, assume_unique=True)) for t, f in zip(truth, found)]
    return float(np.mean(hits)) / k


def _correlation(a: np.ndarray, b: np.ndarray, rank: bool) -> float | None:
    """Spearman (rank=True) or Pearson; None when undefined (fewer than 2 pairs, a constant side)."""
    if a.size < 2:
        return None
    rho = _pearson(rankdata(a), rankdata(b)) if rank else _pearson(a, b)
    return None if math.isnan(rho) else rho


def _kept_correlation(exact: np.ndarray, approx: np.ndarray, rank: bool) -> float | None:
    """:func:`_correlation` of exact and reduced similarities, 0.0 when the reduction made every
    similarity equal while the exact ones differ (nothing of the ranking is kept); None only
    when the exact side itself gives nothing to compare."""
    rho = _correlation(exact, approx, rank)
    if rho is None and exact.size >= 2 and np.ptp(exact) > 0:
        return 0.0
    return rho


def similarity_stats(exact_pairs: np.ndarray, approx_pairs: np.ndarray) -> dict:
    delta = np.abs(approx_pairs - exact_pairs)
    return {
        "spearman": _kept_correlation(exact_pairs, approx_pairs, rank=True),
        "pearson": _kept_correlation(exact_pairs, approx_pairs, rank=False),
        "max_abs_delta": float(delta.max()) if delta.size else None,
        "mean_abs_delta": float(delta.mean()) if delta.size else None,
    }


# -- reading a layer's subset ---------------------------------------------------------

def _open(store):
    from vecsim.store import Store

    return store if isinstance(store, Store) else Store.open(store)


def _metric(store, layer: str) -> str:
    return store.layer_info(layer)["reducer"]["config"].get("similarity", "cosine")


def _no_subset_error(store, layer: str, why: str) -> StoreError:
    if not store.complete:
        return StoreError(
            f"store {store.path} is not complete (status {store.manifest.get('status')!r}); "
            "finish indexing it (rerun the same `vecsim index`) before asking for a report"
        )
    return StoreError(
        f"layer {layer} of {store.path} {why}, so there is nothing to measure the reduction against; "
        "re-index with --eval-size N (e.g. --eval-size 500, and enough --eval-memory)"
    )


def _rows_for_ids(table, ids: np.ndarray, columns: list[str]):
    """The rows of ``table`` whose id is in ``ids`` (filtered reads, never the whole table)."""
    import pyarrow as pa

    parts = []
    for start in range(0, len(ids), ID_CHUNK):
        where = "id IN (" + ",".join(str(int(i)) for i in ids[start : start + ID_CHUNK]) + ")"
        parts.append(table.search().where(where).select(columns).limit(None).to_arrow())
    return pa.concat_tables(parts) if parts else None


def _subset_vectors(store, layer: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids found, their stored vectors) for the given ids."""
    dim = store.dim(layer)
    arrow = _rows_for_ids(store.table(store.layer_info(layer)["table"]), ids, ["id", "vector"])
    if arrow is None or arrow.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    got = arrow.column("id").to_numpy().astype(np.int64, copy=False)
    flat = arrow.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False)
    return got, np.asarray(flat, dtype=np.float32).reshape(len(got), dim)


def layer_subset(store, layer: str) -> dict:
    """The layer's subset, aligned: ids, exact similarity matrix, stored vectors, labels (None when unlabelled).

    Subset stimuli without a stored vector (they should not exist) are dropped and counted.
    """
    from vecsim.evalset import exact_similarity

    store.layer_info(layer)  # UnknownLayerError with close matches
    ev = store.eval_subset(layer)
    if ev is None:
        raise _no_subset_error(store, layer, "has no evaluation subset (the store was indexed with --eval-size 0)")
    sub_ids = np.asarray(ev["ids"], dtype=np.int64)
    if len(sub_ids) < 2:
        raise _no_subset_error(
            store, layer, f"has an evaluation subset of {len(sub_ids)} stimulus(es) (the --eval-memory budget held no more)"
        )
    found_ids, found_vecs = _subset_vectors(store, layer, sub_ids)
    row_of = {int(i): r for r, i in enumerate(found_ids)}
    keep = np.array([int(i) in row_of for i in sub_ids], dtype=bool)
    exact = exact_similarity(ev, _metric(store, layer))[np.ix_(keep, keep)]
    ids = sub_ids[keep]
    vectors = found_vecs[[row_of[int(i)] for i in ids]] if len(ids) else found_vecs[:0]
    if len(ids) < 2:
        raise StoreError(f"layer {layer} of {store.path}: the evaluation subset's stimuli have no stored vectors; run `vecsim verify`")
    return {"ids": ids, "exact": exact, "vectors": vectors, "missing": int((~keep).sum()),
            "labels": _labels(store, ids), "twins": _twin_pairs(store, ids, vectors)}


def _twin_pairs(store, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray | None:
    """(m, m) mask of the subset's pairs of identical stimuli (the same model input; not all-zero), whose stored
    similarity is exactly 1 wherever vecsim reports one (query, neighbors, similarity, RSA);
    None when there are none."""
    from vecsim.query import _identical_rows

    mask = np.zeros((len(ids), len(ids)), dtype=bool)
    for rows in _identical_rows(store, ids):
        mask[np.ix_(rows, rows)] = True
    np.fill_diagonal(mask, False)
    nonzero = np.any(vectors != 0, axis=1)
    mask &= nonzero[:, None] & nonzero[None, :]
    return mask if mask.any() else None


def _stored_similarity(reduced: np.ndarray, twins: np.ndarray | None) -> np.ndarray:
    """The stored similarity matrix as vecsim reports it: inner products clipped to [-1, 1],
    identical pairs exactly 1."""
    approx = np.clip(reduced @ reduced.T, -1.0, 1.0)
    if twins is not None:
        approx[twins] = 1.0
    return approx


def _labels(store, ids: np.ndarray) -> np.ndarray | None:
    arrow = _rows_for_ids(store.table("stimuli"), ids, ["id", "label"])
    label_of = dict(zip(arrow.column("id").to_pylist(), arrow.column("label").to_pylist()))
    labels = np.array([label_of.get(int(i)) for i in ids], dtype=object)
    return labels if any(lab is not None for lab in labels) else None


def _store_has_labels(store) -> bool:
    from vecsim.store import read_table

    labels = read_table(store.table("stimuli"), ["label"]).column("label")
    return labels.null_count < len(labels)


# -- per-layer fidelity ---------------------------------------------------------------

def _check_dims(dims, stored: int, layer: str) -> list[int]:
    if dims is None:
        return compression_dims(stored)
    out = sorted({int(k) for k in dims})
    bad = [k for k in out if not 1 <= k <= stored]
    if not out or bad:
        raise ConfigError(f"dims for layer {layer} must lie in 1..{stored} (its stored dim); got {bad or 'none'}")
    return out


def _class_pairs(labels: np.ndarray | None, iu) -> tuple[np.ndarray, np.ndarray] | None:
    """Boolean masks over the i<j pairs: same label, different label (unlabelled pairs in neither)."""
    if labels is None:
        return None
    codes = {lab: c for c, lab in enumerate(sorted({lab for lab in labels if lab is not None}))}
    code = np.array([codes[lab] if lab is not None else -1 for lab in labels])
    a, b = code[iu[0]], code[iu[1]]
    both = (a >= 0) & (b >= 0)
    same, diff = both & (a == b), both & (a != b)
    if not same.any() or not diff.any():
        return None
    return same, diff


def fidelity(store, layer: str, dims=None) -> dict:
    """How well the stored vectors of ``layer`` keep the exact similarities, on its evaluation subset.

    ``dims`` (default 8, 16, … up to the stored dim) are prefixes of the stored coordinates.
    Returns M, the per-dims rows (spearman, pearson, max/mean |Δ|, recall_at_k with k =
    ``recall_k`` = min(10, M − 1), None when k = M − 1, energy_kept),
    the energy curve, and, when the subset has labels on both sides, ``class_separation``
    (exact and per dims: AUC, d′, means, SDs, and histogram counts on shared bins).
    """
    store = _open(store)
    data = layer_subset(store, layer)
    info = store.layer_info(layer)
    stored = store.dim(layer)
    dims = _check_dims(dims, stored, layer)
    exact, vectors, m = data["exact"], data["vectors"], len(data["ids"])
    k = min(RECALL_K, m - 1)
    # with k = M - 1 every other stimulus is among the k nearest: recall is 1 whatever the
    # reduction does, so it is not reported
    informative = k < m - 1
    iu = np.triu_indices(m, 1)
    exact_pairs = exact[iu]
    curve = energy_curve(store.spectrum(layer))

    rows, level_pairs = [], {}
    renormalise, truth = _renormalised(store, layer), neighbours(exact, max(k, 0))
    in_sample = _in_sample_levels(store, layer, data["ids"], stored)
    for d in dims:
        reduced = truncate(vectors, d, renormalise)
        if in_sample is not None:
            in_sample(reduced, d)
        approx = _stored_similarity(reduced, data["twins"])
        level_pairs[d] = approx[iu]
        rows.append({
            "dim": d, **similarity_stats(exact_pairs, level_pairs[d]),
            "recall_at_k": recall_at_k(exact, approx, k, truth) if informative else None,
            "energy_kept": float(curve[min(d, len(curve)) - 1]) if len(curve) else None,
        })

    ev_info = info.get("eval", {})
    config = store.manifest.get("config", {})
    result = {
        "layer": layer,
        "metric": _metric(store, layer),
        "M": m,
        "eval_size": config.get("eval_size"),  # what the run asked for (--eval-size)
        "allotted": int(ev_info.get("requested", m)),  # what the --eval-memory budget held for this layer
        "budget_cut": held_by_budget(store.manifest, layer) is not None,
        "held_dtype": ev_info.get("held_dtype"),
        "in_training": ev_info.get("in_training"),  # None for stores indexed before it was recorded
        "missing": data["missing"],
        "dim": stored,
        "recall_k": k,
        "recall_note": None if informative else (
            f"recall@{k} is not reported: with M = {m} every other stimulus is among the {k} nearest, "
            "so it would be 1 whatever the reduction does"),
        "dims": dims,
        "rows": rows,
        "energy_curve": [float(v) for v in curve],
        "energy_at_stored_dim": float(curve[min(stored, len(curve)) - 1]) if len(curve) else None,
        "class_separation": None,
        "class_note": None,
    }
    masks = _class_pairs(data["labels"], iu)
    if masks is None:
        result["class_note"] = ("no labels" if data["labels"] is None
                                else "the subset's labels give no same-label or no different-label pair")
    else:
        result["class_separation"] = _class_separation(exact_pairs, level_pairs, *masks)
    return result


def _class_separation(exact_pairs, level_pairs: dict, same, diff) -> dict:
    levels = {"exact": exact_pairs, **{d: p for d, p in level_pairs.items()}}
    lo = min(float(p[same | diff].min()) for p in levels.values())
    hi = max(float(p[same | diff].max()) for p in levels.values())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, HIST_BINS + 1)

    def one(pairs):
        pos, neg = pairs[same], pairs[diff]
        return {**separation(pos, neg),
                "hist_same": np.histogram(pos, edges)[0].tolist(), "hist_diff": np.histogram(neg, edges)[0].tolist()}

    return {
        "n_same": int(same.sum()), "n_diff": int(diff.sum()),
        "edges": edges.tolist(),
        "exact": one(exact_pairs),
        "levels": [{"dim": d, **one(p)} for d, p in level_pairs.items()],
    }


def fidelity_summary(store) -> dict[str, float]:
    """Spearman (exact vs stored similarities, subset pairs) at the stored dim, per layer.

    Layers without a usable evaluation subset (or with an undefined Spearman) are left out.
    """
    store = _open(store)
    out = {}
    for layer in store.layers:
        try:
            data = layer_subset(store, layer)
        except StoreError:
            continue
        iu = np.triu_indices(len(data["ids"]), 1)
        reduced = np.asarray(data["vectors"], dtype=np.float64)
        exact, kept = data["exact"][iu], _stored_similarity(reduced, data["twins"])[iu]
        rho = _kept_correlation(exact, kept, rank=True)
        if rho is not None:
            out[layer] = rho
    return out


# -- figures --------------------------------------------------------------------------

def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png")
    return path


def plot_energy(fid: dict, path: Path) -> Path:
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    curve = fid["energy_curve"]
    if curve:
        ax.plot(np.arange(1, len(curve) + 1), curve, color="C0")
        stored = fid["dim"]
        ax.axvline(stored, color="C3", ls="--", lw=1)
        kept = fid["energy_at_stored_dim"]
        ax.annotate(f"stored dim {stored}: {kept:.1%}", (stored, kept), xytext=(6, -14),
                    textcoords="offset points", color="C3", fontsize=9)
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no spectrum stored", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of dims")
    ax.set_ylabel("energy kept (training sample)")
    ax.set_title(f"{fid['layer']}: energy kept vs dims")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_fidelity(fid: dict, path: Path) -> Path:
    fig = _figure(9, 3.6)
    left, right = fig.subplots(1, 2)
    dims = [r["dim"] for r in fid["rows"]]
    for key, label in (("spearman", "Spearman"), ("pearson", "Pearson"), ("recall_at_k", f"recall@{fid['recall_k']}")):
        left.plot(dims, [_nan(r[key]) for r in fid["rows"]], marker="o", label=label)
    lowest = [_nan(r[key], 0.0) for r in fid["rows"] for key in ("spearman", "pearson", "recall_at_k")]
    left.set_ylim(min(0.0, *lowest), 1.02)
    left.set_title(f"{fid['layer']}: fidelity vs dims (M={fid['M']})")
    for key, label in (("max_abs_delta", "max |Δ|"), ("mean_abs_delta", "mean |Δ|")):
        right.plot(dims, [_nan(r[key]) for r in fid["rows"]], marker="o", label=label)
    right.set_title(f"|Δ {fid['metric']}| vs dims")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_xlabel("dims")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_class_histograms(fid: dict, path: Path) -> Path:
    cs = fid["class_separation"]
    panels = [("exact", cs["exact"])] + [(f"{lvl['dim']} dims", lvl) for lvl in cs["levels"]]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(3.2 * ncols, 2.6 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharex=True, squeeze=False)).ravel()
    edges = np.asarray(cs["edges"])
    width = np.diff(edges)
    for ax, (name, level) in zip(axes, panels):
        for key, color, label in (("hist_diff", "0.55", "different label"), ("hist_same", "C3", "same label")):
            counts = np.asarray(level[key], dtype=np.float64)
            density = counts / max(counts.sum(), 1) / width
            ax.stairs(density, edges, fill=True, alpha=0.5, color=color, label=label)
        ax.set_title(f"{name}: AUC {_fmt(level['auc'], 3)}, d′ {_fmt(level['d_prime'], 2)}", fontsize=9)
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{fid['layer']}: same- vs different-label {fid['metric']} (M={fid['M']})", fontsize=11)
    return _save(fig, path)


def _depth_figure(fids: list[dict]):
    """Two side-by-side panels with one x position per layer, in depth order."""
    fig = _figure(10, 3.8)
    left, right = fig.subplots(1, 2)
    layers = [f["layer"] for f in fids]
    return fig, left, right, layers, np.arange(len(layers))


def plot_depth_separation(fids: list[dict], path: Path) -> Path:
    fig, left, right, layers, x = _depth_figure(fids)
    for key, ax, name in (("auc", left, "ROC AUC"), ("d_prime", right, "d′")):
        ax.plot(x, [_nan(f["class_separation"]["exact"][key]) for f in fids], marker="o", color="k", label="exact")
        ax.plot(x, [_nan(f["class_separation"]["levels"][-1][key]) for f in fids], marker="s", color="C3",
                label="stored dim")
        smallest = [f["class_separation"]["levels"][0] for f in fids]
        if any(lvl["dim"] != f["dim"] for lvl, f in zip(smallest, fids)):
            ax.plot(x, [_nan(lvl[key]) for lvl in smallest], marker="^", color="C0", ls=":",
                    label="smallest dims (" + ", ".join(sorted({str(lvl["dim"]) for lvl in smallest})) + ")")
        ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"class separation by depth: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.axhline(0.5, color="0.6", lw=1, ls="--")
    return _save(fig, path)


def plot_depth_fidelity(fids: list[dict], path: Path) -> Path:
    fig, left, right, layers, x = _depth_figure(fids)
    ks = sorted({f["recall_k"] for f in fids})
    recall = f"recall@{ks[0]}" if len(ks) == 1 else "recall@k (k = min(10, M − 1))"
    for key, label in (("spearman", "Spearman"), ("pearson", "Pearson"), ("recall_at_k", recall)):
        left.plot(x, [_nan(f["rows"][-1][key]) for f in fids], marker="o", label=label)
    lowest = [_nan(f["rows"][-1][key], 0.0) for f in fids for key in ("spearman", "pearson", "recall_at_k")]
    left.set_ylim(min(0.0, *lowest), 1.02)
    for key, label in (("max_abs_delta", "max |Δ|"), ("mean_abs_delta", "mean |Δ|")):
        right.plot(x, [_nan(f["rows"][-1][key]) for f in fids], marker="o", label=label)
    left.set_title("fidelity at the stored dim, by depth")
    right.set_title("|Δ similarity| at the stored dim, by depth")
    for ax in (left, right):
        ax.set_xticks(x, [f"{lay}\n({f['dim']} d)" for lay, f in zip(layers, fids)], rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


# -- the report -----------------------------------------------------------------------

def build_report(store_path, out_dir, overwrite: bool = False, targets=None) -> dict:
    """Write report.html, report.md, report.json and figures/*.png into ``out_dir``; return the report.

    ``targets``: the ``--out`` folder of a ``vecsim compare STORE --rdm FILE`` of this store,
    whose tables and figures (layers against external RDMs) the report then includes.
    The returned dict is report.json's content plus ``files`` (the paths written).
    """
    store = _open(store_path)
    out = Path(out_dir)
    rsa = None if targets is None else _targets_result(store, targets)
    _prepare_out(out, store, overwrite)
    labelled = _store_has_labels(store)
    notes: list[str] = []
    fids: list[dict] = []
    for layer in store.layers:
        try:
            fids.append(fidelity(store, layer))
        except StoreError as exc:
            if not store.complete:
                raise
            notes.append(f"{layer}: left out: {exc}")
    if not fids:
        n = store.manifest.get("counts", {}).get("stimuli", 0)
        if n < 2:
            raise StoreError(f"store {store.path} holds {n} stimulus(es); a fidelity report needs at least 2")
        raise StoreError(f"no layer of {store.path} has a usable evaluation subset ({notes[0] if notes else 'none'})")
    if not labelled:
        notes.insert(0, NO_LABELS_LINE)
    added = added_later(store.manifest)
    if added:
        notes.append(f"{added:,} of the {int(store.manifest.get('counts', {}).get('stimuli', 0)):,} stimuli were "
                     "added with `vecsim add` after indexing; the evaluation subsets were drawn at indexing and do "
                     "not include them")
    for fid in fids:
        if labelled and fid["class_separation"] is None:
            notes.append(f"{fid['layer']}: no class separation: {fid['class_note']}")

    figures = _write_figures(fids, out / FIGURES_DIR)
    report = {
        "store": str(store.path.resolve()),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": store.manifest.get("model"),
        "stimuli": int(store.manifest.get("counts", {}).get("stimuli", 0)),
        "labels": labelled,
        "notes": notes,
        "layers": {f["layer"]: _layer_entry(store, f, figures.get(f["layer"], {}), out) for f in fids},
        "depth_figures": {k: str(p.relative_to(out)) for k, p in figures.get("", {}).items()},
        "summary": [_summary_row(f) for f in fids],
    }
    if rsa is not None:
        report["targets"] = _copy_target_figures(rsa, Path(targets), out / FIGURES_DIR, out)
    payload = json_safe(report)
    # each file whole or not at all (temporary file, flush, rename); report.json last: a
    # folder without it holds an unfinished report, which the next run replaces
    # the text from the report itself, where an infinite d′ is still ∞ (JSON can only say null)
    write_text_atomic(out / "report.md", _markdown(report))
    write_text_atomic(out / "report.html", _html(report, out))
    write_text_atomic(out / "report.json", json.dumps(payload, indent=2, allow_nan=False) + "\n")
    pngs = sorted((out / FIGURES_DIR).glob("*.png"))
    payload["files"] = {"html": str(out / "report.html"), "markdown": str(out / "report.md"),
                        "json": str(out / "report.json"), "figures": [str(p) for p in pngs]}
    return payload


def _prepare_out(out: Path, store, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    if (out / "vecsim.json").exists() or out.resolve() == store.path.resolve():
        raise OutputExistsError(f"{out} is a vecsim store; write the report to another --out")
    if out.is_dir() and any(out.iterdir()):
        own = set(REPORT_FILES) | {FIGURES_DIR} | {name + ".tmp" for name in REPORT_FILES}
        unfinished = not (out / "report.json").exists() and all(p.name in own for p in out.iterdir()) and all(
            p.suffix == ".png" for p in (out / FIGURES_DIR).glob("*"))
        if not overwrite and not unfinished:
            raise OutputExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
        # only what a report writes is removed, so a mistaken --out loses nothing else
        for name in REPORT_FILES:
            (out / name).unlink(missing_ok=True)
            (out / (name + ".tmp")).unlink(missing_ok=True)
        for png in (out / FIGURES_DIR).glob("*.png"):
            png.unlink()
    (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)


def _write_figures(fids: list[dict], folder: Path) -> dict[str, dict[str, Path]]:
    from vecsim.store import layer_slug

    figures: dict[str, dict[str, Path]] = {}
    for i, fid in enumerate(fids):
        slug = f"{i:02d}_{layer_slug(fid['layer'])}"
        figs = {"energy": plot_energy(fid, folder / f"{slug}_energy.png"),
                "fidelity": plot_fidelity(fid, folder / f"{slug}_fidelity.png")}
        if fid["class_separation"] is not None:
            figs["classes"] = plot_class_histograms(fid, folder / f"{slug}_classes.png")
        figures[fid["layer"]] = figs
    depth = {}
    with_classes = [f for f in fids if f["class_separation"] is not None]
    if with_classes:
        depth["separation"] = plot_depth_separation(with_classes, folder / "depth_separation.png")
    depth["fidelity"] = plot_depth_fidelity(fids, folder / "depth_fidelity.png")
    figures[""] = depth
    return figures


def _layer_entry(store, fid: dict, figs: dict[str, Path], out: Path) -> dict:
    red = store.layer_info(fid["layer"])["reducer"]
    fit = red.get("fit") or {}
    index = store.layer_info(fid["layer"]).get("index", {})
    return {
        **fid,
        "shape": red.get("shape"),
        "units": red.get("units"),
        "pooling": red["config"].get("pooling"),
        "projection": "centred PCA" if red["config"].get("center") else "uncentred",
        "sketch_dim": (red.get("sketch") or {}).get("dim"),
        "dim_in": fit.get("dim_in"),
        "n_train": fit.get("n_train"),
        "exact_on_training_sample": fit.get("exact"),
        "index": {"kind": index.get("kind"), "recall_at_10": index.get("recall_at_10")},
        "figures": {k: str(p.relative_to(out)) for k, p in figs.items()},
    }


def _summary_row(fid: dict) -> dict:
    last = fid["rows"][-1]
    cs = fid["class_separation"]
    return {
        "layer": fid["layer"], "M": fid["M"], "dim": fid["dim"],
        "spearman": last["spearman"], "recall_at_k": last["recall_at_k"], "recall_k": fid["recall_k"],
        "auc_exact": cs["exact"]["auc"] if cs else None,
        "auc": cs["levels"][-1]["auc"] if cs else None,
    }


def _nan(value, default=float("nan")) -> float:
    return default if value is None else float(value)


def recall_header(summary: list[dict]) -> str:
    """"recall@k" with the k of every row, or with k = min(10, M − 1) when the rows differ."""
    ks = {r["recall_k"] for r in summary}
    return f"recall@{ks.pop()}" if len(ks) == 1 else "recall@k"


def recall_cell(row: dict) -> str:
    ks = row["recall_k"]
    return _fmt(row["recall_at_k"], 3) + ("" if ks == RECALL_K else f" (k={ks})")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "−∞"
    return f"{value:.{digits}f}"


# -- text of the report ----------------------------------------------------------------

def _layer_facts(name: str, lay: dict) -> list[str]:
    sketch = f", count sketch to {lay['sketch_dim']:,} dims" if lay["sketch_dim"] else ""
    idx = lay["index"]
    if idx.get("recall_at_10") is not None:
        index_line = f"index: {idx['kind']} (approximate), its recall@10 vs exact search {idx['recall_at_10']:.3f}"
    elif idx.get("kind") in (None, "flat"):
        index_line = "index: flat (exact search over the stored vectors)"
    else:
        index_line = f"index: {idx['kind']} (approximate; no recall@10 recorded)"
    missing = f"; {lay['missing']} subset stimuli had no stored vector and were dropped" if lay["missing"] else ""
    asked = lay.get("eval_size")
    if lay.get("budget_cut"):
        size = (f"--eval-size {asked:,}; the --eval-memory budget held {lay['allotted']:,} raw vectors of "
                f"this layer")
    else:
        size = f"--eval-size {asked:,}" if asked is not None else f"{lay['allotted']:,} held"
    held = ("; the raw vectors were held in float16 scaled per vector (the --eval-memory budget), so the "
            "exact similarities carry about 2⁻¹¹ relative rounding" if lay.get("held_dtype") == "float16" else "")
    few = (f"; only {lay['M'] * (lay['M'] - 1) // 2:,} pairs: these figures rest on few pairs"
           if lay["M"] < FEW_SUBSET else "")
    trained = ""
    if lay.get("in_training"):
        trained = (f"; {lay['in_training']:,} of them were in the projection's training sample "
                   f"(n_train {lay['n_train']:,}), whose pairs it keeps better than those of new stimuli "
                   "(exactly when it keeps every training direction)")
    facts = [
        f"evaluation subset: M = {lay['M']:,} stimuli ({size}){missing}{held}{few}{trained}",
        f"raw: {lay['units']:,} units ({'x'.join(map(str, lay['shape'] or []))}, pooling {lay['pooling']}){sketch}; "
        f"stored: {lay['dim']} dims, {lay['projection']} projection fitted on {lay['n_train']} stimuli, "
        f"{lay['metric']} similarity",
        f"energy kept at the stored dim: {_fmt(lay['energy_at_stored_dim'], 4)}"
        + (" (of the sketched training vectors)" if lay["sketch_dim"] else ""),
        index_line,
    ]
    if lay.get("recall_note"):
        facts.append(lay["recall_note"])
    if lay.get("projection") == "centred PCA":
        facts.append("stored with --center: the stored cosine is that of the centred activations, which is not "
                     "the raw cosine these figures compare it with, so lower agreement is expected")
    return facts


def _fidelity_table(lay: dict) -> list[list[str]]:
    head = ["dims", "energy kept", "Spearman", "Pearson", "max |Δ|", "mean |Δ|", f"recall@{lay['recall_k']}"]
    rows = [[str(r["dim"]), _fmt(r["energy_kept"], 4), _fmt(r["spearman"], 4), _fmt(r["pearson"], 4),
             _fmt(r["max_abs_delta"], 4), _fmt(r["mean_abs_delta"], 4), _fmt(r["recall_at_k"], 3)] for r in lay["rows"]]
    return [head] + rows


def _class_table(lay: dict) -> list[list[str]]:
    cs = lay["class_separation"]
    head = ["similarity", "AUC", "d′", "mean same", "mean diff", "sd same", "sd diff"]
    levels = [("exact", cs["exact"])] + [(f"{lvl['dim']} dims", lvl) for lvl in cs["levels"]]
    return [head] + [[name, _fmt(v["auc"], 4), _fmt(v["d_prime"], 3), _fmt(v["mean_same"], 4), _fmt(v["mean_diff"], 4),
                      _fmt(v["sd_same"], 4), _fmt(v["sd_diff"], 4)] for name, v in levels]


def _summary_table(report: dict) -> list[list[str]]:
    head = ["layer", "M", "dim", "Spearman", recall_header(report["summary"])]
    head += ["AUC exact", "AUC stored"] if report["labels"] else []
    rows = []
    for r in report["summary"]:
        row = [r["layer"], f"{r['M']:,}", str(r["dim"]), _fmt(r["spearman"], 4), recall_cell(r)]
        if report["labels"]:
            row += [_fmt(r["auc_exact"], 4), _fmt(r["auc"], 4)]
        rows.append(row)
    return [head] + rows


def _intro(report: dict) -> list[str]:
    model = report.get("model") or {}
    return [
        f"Store `{report['store']}`: model {model.get('name')} (weights {model.get('weights') or 'none, random init'}), "
        f"{report['stimuli']:,} stimuli, {len(report['layers'])} layer(s). Created {report['created']}.",
        "Every number compares the stored (reduced) similarities with the exact similarities of the raw "
        "activations, over all pairs of each layer's evaluation subset (M stimuli). Fewer dims = the first "
        "k stored coordinates (what the same chain stores at dim k).",
    ]


def _md_table(rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(rows[0]), "|" + "---|" * len(rows[0])] + [line(r) for r in rows[1:]]
    return "\n".join(lines)


def _markdown(report: dict) -> str:
    parts = ["# vecsim fidelity report", "", *_intro(report), ""]
    parts += [f"- {n}" for n in report["notes"]] + ([""] if report["notes"] else [])
    parts += ["## Summary (at the stored dim)", "", _md_table(_summary_table(report)), ""]
    depth = report["depth_figures"]
    parts += ["## Across layers", ""]
    if "separation" in depth:
        parts += [f"![class separation by depth]({depth['separation']})", ""]
    parts += [f"![fidelity at the stored dim by depth]({depth['fidelity']})", ""]
    if "targets" in report:
        t = report["targets"]
        parts += ["## Layers against external RDMs", "", *_targets_intro(t), ""]
        for comparator in t["comparators"]:
            parts += [f"### {comparator}", "", _md_table(_targets_table(t, comparator)), ""]
            parts += [f"![{alt}]({rel})" + "\n" for rel, alt in _target_figures(t, comparator)]
    for name, lay in report["layers"].items():
        parts += [f"## {name}", ""] + [f"- {line}" for line in _layer_facts(name, lay)] + [""]
        parts += [_md_table(_fidelity_table(lay)), ""]
        parts += [f"![energy kept vs dims]({lay['figures']['energy']})", "",
                  f"![fidelity vs dims]({lay['figures']['fidelity']})", ""]
        if lay["class_separation"] is not None:
            cs = lay["class_separation"]
            parts += [f"Class separation ({cs['n_same']:,} same-label, {cs['n_diff']:,} different-label pairs):", "",
                      _md_table(_class_table(lay)), "", f"![same vs different label]({lay['figures']['classes']})", ""]
    return "\n".join(parts)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(out: Path, rel: str, alt: str) -> str:
    data = base64.b64encode((out / rel).read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"></figure>'


_CSS = (
    "body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:.6em 0 1.2em}th,td{border:1px solid #ccc;padding:.25em .6em;"
    "text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
    "figure{margin:.5em 0}code{background:#f3f3f3;padding:0 .2em}.note{color:#7a4a00}"
)


def _html(report: dict, out: Path) -> str:
    p = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>vecsim fidelity report</title>"
         f"<style>{_CSS}</style></head><body><h1>vecsim fidelity report</h1>"]
    p += [f"<p>{html.escape(line).replace('`', '')}</p>" for line in _intro(report)]
    p += [f"<p class=\"note\">{html.escape(n)}</p>" for n in report["notes"]]
    p += ["<h2>Summary (at the stored dim)</h2>", _html_table(_summary_table(report)), "<h2>Across layers</h2>"]
    depth = report["depth_figures"]
    if "separation" in depth:
        p.append(_img(out, depth["separation"], "class separation by depth"))
    p.append(_img(out, depth["fidelity"], "fidelity at the stored dim by depth"))
    if "targets" in report:
        t = report["targets"]
        p += ["<h2>Layers against external RDMs</h2>"] + [f"<p>{html.escape(x)}</p>" for x in _targets_intro(t)]
        for comparator in t["comparators"]:
            p += [f"<h3>{html.escape(comparator)}</h3>", _html_table(_targets_table(t, comparator))]
            p += [_img(out, rel, alt) for rel, alt in _target_figures(t, comparator)]
    for name, lay in report["layers"].items():
        p.append(f"<h2>{html.escape(name)}</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in _layer_facts(name, lay)) + "</ul>")
        p += [_html_table(_fidelity_table(lay)), _img(out, lay["figures"]["energy"], f"{name}: energy kept vs dims"),
              _img(out, lay["figures"]["fidelity"], f"{name}: fidelity vs dims")]
        if lay["class_separation"] is not None:
            cs = lay["class_separation"]
            p += [f"<h3>Class separation</h3><p>{cs['n_same']:,} same-label and {cs['n_diff']:,} different-label pairs.</p>",
                  _html_table(_class_table(lay)), _img(out, lay["figures"]["classes"], f"{name}: same vs different label")]
    p.append("</body></html>\n")
    return "\n".join(p)


# -- layers against external RDMs (vecsim compare --rdm) ----------------------------------

def _targets_result(store, folder) -> dict:
    """The rsa.json of ``folder``, refused when it was computed for another store."""
    from vecsim.rsa import load_result

    result = load_result(folder)
    if Path(result.get("store", "")).resolve() != store.path.resolve():
        raise ConfigError(f"--targets {folder} holds a comparison of {result.get('store')}, not of {store.path}; "
                          "run `vecsim compare STORE --rdm FILE --out DIR` on this store")
    return result


def _copy_target_figures(result: dict, folder: Path, figures: Path, out: Path) -> dict:
    """The comparison's numbers, its PNGs copied into ``figures`` as rsa_<name>."""
    import shutil

    from vecsim.store import layer_slug

    copied = {}
    for comparator in result["comparators"]:
        names = [f"{layer_slug(t['name'])}_{comparator}.png" for t in result["targets"]] + [f"heatmap_{comparator}.png"]
        for name in names:
            if not (folder / name).is_file():
                raise ConfigError(f"--targets {folder} lacks {name}; rerun `vecsim compare STORE --rdm FILE --out DIR`")
            shutil.copyfile(folder / name, figures / f"rsa_{name}")
            copied[name] = str((figures / f"rsa_{name}").relative_to(out))
    return {**{k: result[k] for k in ("targets", "comparators", "settings", "layers", "rows")}, "figures": copied}


def _targets_intro(t: dict) -> list[str]:
    s = t["settings"]
    kinds = sorted({r["bootstrap"] for r in t["rows"]})
    boot = ("no bootstrap" if kinds == ["none"] else
            f"{s['n_bootstraps']} bootstrap samples over {' or '.join(k for k in kinds if k != 'none')}, seed "
            f"{s['seed']}; (best) marks the best layer, * a layer that differs from it ({s['test']}, "
            f"{s['correction']}-corrected, p < {s['alpha']:g})")
    return [f"Each layer's RDM ({s['layer_rdm']}) against each target's, by rsatoolbox (version "
            f"{s.get('rsatoolbox')}): value [{int(s['ci'] * 100)}% CI]; {boot}. Targets: "
            + "; ".join(x["describe"] for x in t["targets"]) + "."]


def _targets_table(t: dict, comparator: str) -> list[list[str]]:
    names = [x["name"] for x in t["targets"]]
    cells = {(r["layer"], r["target"]): r for r in t["rows"] if r["comparator"] == comparator}
    head = ["layer"] + names
    rows = []
    for layer in t["layers"]:
        row = [layer]
        for name in names:
            r = cells[(layer, name)]
            ci = "" if r["ci_low"] is None else f" [{_fmt(r['ci_low'], 3)}, {_fmt(r['ci_high'], 3)}]"
            mark = " (best)" if r["best"] else (" *" if r["differs_from_best"] else "")
            row.append(f"{_fmt(r['value'], 3)}{ci}{mark}")
        rows.append(row)
    ceiling = ["noise ceiling"]
    for name in names:
        r = cells[(t["layers"][0], name)]
        ceiling.append("–" if r["noise_lower"] is None else f"{_fmt(r['noise_lower'], 3)} – {_fmt(r['noise_upper'], 3)}")
    return [head] + rows + [ceiling]


def _target_figures(t: dict, comparator: str) -> list[tuple[str, str]]:
    from vecsim.store import layer_slug

    figs = [(t["figures"][f"{layer_slug(x['name'])}_{comparator}.png"], f"{x['name']}: {comparator} by layer")
            for x in t["targets"]]
    return figs + [(t["figures"][f"heatmap_{comparator}.png"], f"{comparator}: layer × target")]
