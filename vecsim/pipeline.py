"""``index_stimuli``: stimuli → model → extract → reduce → index → store.

Two streaming passes, each image decoded and forwarded once:

1. the seeded training sample; its prepared (pooled, sketched) vectors are held in
   memory, the projection of every layer is fitted on them and saved, then they are
   projected and committed;
2. every other stimulus, reduced inside the hooks and committed in chunks.

The FAISS indexes are built from the committed vectors at the end.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vecsim._faults import kill_point
from vecsim.config import IndexConfig, resolve
from vecsim.errors import ConfigError
from vecsim.stimuli import Failure


@dataclass
class IndexSummary:
    store: Path
    indexed: int
    failed: int
    seconds: float
    layers: dict[str, dict] = field(default_factory=dict)

    fidelity: dict[str, float] = field(default_factory=dict)  # Spearman(raw, stored) on the evaluation subset
    resumed_from: int = 0  # stimuli an interrupted earlier run had committed (this run resumed it)

    @property
    def images_per_second(self) -> float:
        """Stimuli this run indexed per second (a resumed run's earlier stimuli not counted)."""
        return (self.indexed - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0


def index_stimuli(config: IndexConfig | None = None, *, config_file: str | None = None, progress: bool = True,
                  **options: Any) -> IndexSummary:
    """Index a stimulus set into a new store. Mirrors ``vecsim index``.

    Pass an :class:`IndexConfig`, or its fields as keywords (``source``, ``model``,
    ``layers``, ``out``, ``dim``...), optionally over a config file.
    """
    if config is None:
        config = resolve(options, config_file)
    else:
        config.validate()
    return _Indexer(config, progress).run()


def resume_options(store: str | Path) -> dict:
    """The recorded settings of an unfinished store, to run it again (``vecsim index --resume``)."""
    from vecsim.errors import StoreError
    from vecsim.store import read_manifest

    manifest = read_manifest(Path(store))
    if manifest.get("status") == "complete":
        raise StoreError(f"{store} is complete; nothing to resume")
    options = dict(manifest.get("config", {}))
    options["out"] = str(store)
    return options


def config_differences(previous: dict, config: IndexConfig) -> list[str]:
    """'name: old → new' for every setting that defines a store's content."""
    current = config.to_dict()
    return [f"{name}: {previous.get(name)!r} → {current.get(name)!r}"
            for name in IndexConfig.IDENTITY_FIELDS if previous.get(name) != current.get(name)]




def _import_lancedb_in_background() -> None:
    """Import lancedb on a thread while the main thread builds the model and runs the first
    batches. The import is pure Python and holds the GIL; a short switch interval while it
    runs hands the GIL back to the forward pass quickly."""
    import threading

    from vecsim.store import _lancedb

    if "lancedb" in sys.modules:
        return
    interval = sys.getswitchinterval()

    def run() -> None:
        try:
            _lancedb()
        finally:
            sys.setswitchinterval(interval)

    sys.setswitchinterval(min(interval, 0.0005))
    # not a daemon: a run that fails early (a missing folder) must not exit while the import is
    # inside lancedb's native initialisation, which aborts the process ("FATAL: exception not
    # rethrown", exit status 134) instead of returning the error's status; exit waits for it
    threading.Thread(target=run, daemon=False, name="vecsim-import-lancedb").start()


def _check_grid(layer: str, shape: tuple[int, ...], pooling: str, spec: str) -> None:
    """grid:K needs maps of at least K×K: on smaller ones adaptive pooling repeats input cells,
    unevenly when K is not a multiple of the side, which reweights the cosine. The error
    names the --pooling value ``spec`` with this layer's entry set to the largest grid that fits."""
    from vecsim.reduce import pooling_grid

    grid = pooling_grid(pooling)
    if grid and len(shape) == 3 and (grid > shape[1] or grid > shape[2]):
        side = min(shape[1], shape[2])
        rest = [part for part in str(spec).split(",") if part.strip() and not part.strip().startswith(f"{layer}=")]
        fixed = ",".join([f"{layer}=grid:{side}", *rest])
        raise ConfigError(f"--pooling grid:{grid} on {layer}: its maps are {shape[1]}x{shape[2]}, smaller than "
                          f"{grid}x{grid} (cells would be repeated); give it its own pooling, e.g. --pooling {fixed}")


def _utc(seconds: float) -> str:
    """A ``time.time()`` as the runs table writes it (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(seconds))


class _Indexer:
    def __init__(self, config: IndexConfig, progress: bool):
        self.config = config
        self.progress = progress
        self.run_id = 1

    # -- setup -------------------------------------------------------------------
    def run(self) -> IndexSummary:
        import torch

        from vecsim.extract import resolve_device
        from vecsim.models import check_layers, layer_shapes, load_model
        from vecsim.index import check_index_spec
        from vecsim.reduce import LayerReducer, ReducerConfig, parse_dims, per_layer
        from vecsim.stimuli import discover
        from vecsim.store import StoreWriter

        cfg = self.config
        started = self.started = time.time()
        _import_lancedb_in_background()  # about a second of imports, overlapped with model loading and decoding
        out = Path(cfg.out)
        previous, replace = self._previous_run(out)
        device = resolve_device(cfg.device)
        stim_set = discover(cfg.source, cfg.manifest, cfg.labels_from_folders)
        # resuming: the checkpoint must still be the file the store was started with
        started_sha = (previous or {}).get("model", {}).get("checkpoint_sha256")
        loaded = load_model(cfg.model, cfg.weights, cfg.checkpoint, cfg.size, cfg.mean, cfg.std,
                            checkpoint_sha256=started_sha)
        check_layers(loaded.module, cfg.layers)
        if len(set(cfg.layers)) != len(cfg.layers):
            raise ConfigError("--layers lists a layer twice")
        # shapes from the model while it is still on the CPU: their meta-device copy then
        # never doubles the weights on a GPU
        infos = layer_shapes(loaded.module, loaded.preprocessing.crop, cfg.layers, strict=True)
        shapes = {i.name: i.shape for i in infos}
        self.calls = {i.name: i.calls for i in infos}  # a module run several times is captured at its last call
        by_order = sorted(infos, key=lambda i: i.order)
        self.depth = {i.name: d for d, i in enumerate(by_order)}  # 0 = the first hooked output of a forward pass
        model = loaded.module.to(device)
        self.model, self.loaded, self.stim_set, self.device = model, loaded, stim_set, device
        if previous is not None:
            self.writer = StoreWriter.reopen(out)
            self.reducers = {layer: LayerReducer.load(layer, self.writer.manifest["layers"][layer]["reducer"],
                                                      self.writer.layer_dir(layer), device) for layer in cfg.layers}
        else:
            dims = parse_dims(cfg.dim, cfg.layers)
            # a factory string FAISS cannot build is refused now, not after every stimulus is reduced
            check_index_spec(cfg.index, [dims[layer] for layer in cfg.layers])
            poolings = per_layer(cfg.pooling, cfg.layers, "pooling", str, "flatten")
            for layer in cfg.layers:
                _check_grid(layer, shapes[layer], poolings[layer], cfg.pooling)
            self.reducers = {
                layer: LayerReducer(
                    layer, shapes[layer],
                    ReducerConfig(cfg.similarity, cfg.center, dims[layer], cfg.max_dim, cfg.energy,
                                  cfg.sketch_dim, cfg.sketch_seed, poolings[layer], cfg.drop_zero_units),
                    device,
                )
                for layer in cfg.layers
            }
        self.evalset = self._eval_subset(shapes)
        committed: set[int] = set()
        try:
            if previous is not None:
                committed = self._prepare_resume()
                self._plan(committed)
            else:
                self._plan()
                self.writer = StoreWriter.create(out, self._manifest(), self._stimuli_schema(), overwrite=replace)
            torch.manual_seed(cfg.seed)
            if previous is not None:
                indexed, failed = self._resume_all(committed)
            else:
                indexed, failed = self._index_all()
            seconds = time.time() - started
            self._finish(indexed, failed, started, seconds, resumed_from=len(committed))
        finally:
            if getattr(self, "writer", None) is not None:
                self.writer.close()
        described = {layer: r.describe() for layer, r in self.reducers.items()}
        layers = {layer: {**described[layer]["fit"], "dropped_zero_units": described[layer]["dropped_zero_units"],
                          "calls": self.calls.get(layer, 1), "center": bool(r.config.center),
                          "units": r.units, "sketched": r.sketch is not None,
                          "index": self.writer.manifest["layers"][layer].get("index", {})}
                  for layer, r in self.reducers.items()}
        from vecsim.report import fidelity_summary

        return IndexSummary(out, indexed, failed, seconds, layers, fidelity_summary(out), resumed_from=len(committed))

    # -- resuming ------------------------------------------------------------------
    def _previous_run(self, out: Path) -> tuple[dict | None, bool]:
        """(the manifest of an interrupted run this one resumes, or None to start afresh;
        whether a fresh start may replace what is at ``out``).

        A complete store is refused without --overwrite; an unfinished one with another
        configuration is refused naming the difference; one killed before its transforms
        were saved (status 'fitting') is replaced. Anything else at ``out`` that is not a
        store is left to StoreWriter.create, which refuses a folder that is not empty.
        """
        from vecsim.errors import StoreExistsError
        from vecsim.store import read_manifest

        if not (out / "vecsim.json").is_file() or self.config.overwrite:
            return None, self.config.overwrite
        manifest = read_manifest(out)
        if manifest.get("status") == "complete":
            raise StoreExistsError(f"a complete store already exists at {out}; pass --overwrite to replace it")
        differences = config_differences(manifest.get("config", {}), self.config)
        if differences:
            raise StoreExistsError(
                f"an unfinished store at {out} was started with another configuration ({'; '.join(differences)}); "
                "run the same command to resume it, or pass --overwrite to start again"
            )
        if manifest.get("status") != "indexing":
            return None, True  # nothing was committed before the transforms: start again
        return manifest, False

    def _prepare_resume(self) -> set[int]:
        """Drop what an interrupted chunk left half-written; the committed stimulus ids."""
        by_id = {s.id: s.path for s in self.stim_set.stimuli}
        known = self.writer.committed_paths()
        committed = set(known)
        moved = [i for i, path in known.items() if by_id.get(i) != path]
        if moved:
            from vecsim.errors import StimulusSetError

            raise StimulusSetError(
                f"the stimulus set changed since the interrupted run ({len(moved)} ids now name other files); "
                "restore it or pass --overwrite to start again"
            )
        self._record_stopped_run(len(committed))
        self.writer.drop_uncommitted(committed)
        self.run_id = self.writer.next_run_id()
        self.writer.save_manifest(index_run={"run": self.run_id, "started": _utc(self.started)})
        return committed

    def _record_stopped_run(self, committed: int) -> None:
        """The runs-table row of the index run this one resumes: ``finished`` empty, the
        stimuli it committed, the failures it had met (this run meets them again). Written
        once: a resumption stopped before it saved its own run number finds the row there."""
        manifest = self.writer.manifest
        stopped = manifest.get("index_run") or {"run": 1, "started": manifest.get("created", "")}
        rows = self.writer.runs_rows()
        if any(r["run"] == stopped["run"] for r in rows):
            return
        earlier = sum(r["indexed"] for r in rows if r["command"] == "index")  # runs stopped before it
        self.writer.add_run({
            "run": stopped["run"], "command": "index", "started": stopped["started"], "finished": None,
            "indexed": committed - earlier, "failed": self.writer.failures_of_run(stopped["run"]), "seconds": None,
            "config": json.dumps(manifest.get("config", {})), "versions": json.dumps(manifest.get("versions", {})),
        })
        kill_point("stopped-run-recorded")

    def _resume_all(self, committed: set[int]) -> tuple[int, int]:
        from tqdm import tqdm

        self.failed = list(self.stim_set.failures)
        self.unsaved_failures = list(self.failed)
        bar = tqdm(total=len(self.stim_set) + len(self.eval_only), initial=len(committed), unit="img", desc="resuming",
                   disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        try:
            indexed = len(committed) + self._stream_pass(self.rest_items, bar)
        finally:
            bar.close()
        return indexed, len(self.failed)

    def _eval_subset(self, shapes):
        from vecsim.evalset import EvalSubset

        cfg = self.config
        if cfg.eval_size == 0:
            return None
        units = {layer: r.units for layer, r in self.reducers.items()}
        return EvalSubset([s.id for s in self.stim_set.stimuli], cfg.seed, cfg.eval_size,
                          int(cfg.eval_memory * 2**20), units, shapes, self.device)

    def _layer_function(self, reducer, project: bool):
        """What runs inside the hook: the reducer's chain, with the evaluation subset tapping
        the pooled raw vectors on the way."""
        import functools

        evalset, layer = self.evalset, reducer.layer
        tap = None if evalset is None else (lambda x, output, finite: evalset.capture(layer, x, output, finite))
        return functools.partial(reducer, tap=tap, project=project)

    def _stimuli_schema(self):
        from vecsim.store import stimuli_schema

        return stimuli_schema(self.stim_set.extra_schema, self.stim_set.extra_columns)

    def _manifest(self) -> dict:
        from vecsim._io import package_versions
        from vecsim.store import FORMAT_VERSION, layer_slugs, now

        slugs = layer_slugs(self.config.layers)
        return {
            "format_version": FORMAT_VERSION,
            "status": "fitting",
            "created": now(),
            "source": {
                "source": self.config.source,
                "root": str(self.stim_set.root.resolve()),
                "manifest": self.stim_set.manifest,
                "extra_columns": self.stim_set.extra_columns,
                "candidates": len(self.stim_set) + len(self.stim_set.failures),
                "ignored_files": self.stim_set.ignored_files,
            },
            "model": self.loaded.describe(),
            "preprocessing": self.loaded.preprocessing.to_dict(),
            "device": self.device,
            "config": self.config.to_dict(),
            "seeds": {"training_sample": self.config.seed, "eval_subset": self.config.seed,
                      "sketch": self.config.sketch_seed, "model_init": self.loaded.describe()["init_seed"] or 0},
            "layers": {
                layer: {"slug": slugs[layer], "table": f"vectors_{slugs[layer]}", "depth": self.depth[layer],
                        "reducer": r.describe()}
                for layer, r in self.reducers.items()
            },
            "counts": {"stimuli": 0, "failures": 0},
            "versions": package_versions(),
            "index_run": {"run": self.run_id, "started": _utc(self.started)},
        }

    # -- the two passes ------------------------------------------------------------
    def _training_ids(self) -> set[int]:
        ids = np.array([s.id for s in self.stim_set.stimuli], dtype=np.int64)
        rng = np.random.default_rng(self.config.seed)
        take = min(self.config.train_size, len(ids))
        return set(rng.permutation(ids)[:take].tolist())

    def _plan(self, committed: set[int] | None = None) -> None:
        """Training items first, then the rest, both in id order, through one loader (decoding starts now).

        When resuming, there is no training pass; the rest is what was not committed, plus
        the committed stimuli of the evaluation subset, forwarded again only to rebuild it
        (its raw vectors were never written).
        """
        from vecsim.extract import iter_decoded

        cfg = self.config
        self.by_id = {s.id: s for s in self.stim_set.stimuli}
        self.eval_only: set[int] = set()
        if committed is None:
            train_ids = self._training_ids()
            self.train_items = [(s.id, s.path) for s in self.stim_set.stimuli if s.id in train_ids]
            self.rest_items = [(s.id, s.path) for s in self.stim_set.stimuli if s.id not in train_ids]
        else:
            if self.evalset is not None:
                self.eval_only = set(self.evalset.slot_of) & committed
            self.train_items = []
            self.rest_items = [(s.id, s.path) for s in self.stim_set.stimuli
                               if s.id not in committed or s.id in self.eval_only]
        self.loader = iter_decoded(
            self.stim_set.root, self.train_items + self.rest_items, self.loaded.preprocessing,
            cfg.batch_size, cfg.workers, cfg.max_pixels, boundaries=(len(self.train_items),),
        )

    def _index_all(self) -> tuple[int, int]:
        from tqdm import tqdm

        self.failed = list(self.stim_set.failures)
        self.unsaved_failures = list(self.failed)  # written with the next commit
        bar = tqdm(total=len(self.stim_set), unit="img", desc="indexing", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            indexed = self._fit_pass(self.train_items, bar)
            indexed += self._stream_pass(self.rest_items, bar)
        finally:
            bar.close()
        return indexed, len(self.failed)

    def _batches(self, items):
        """The loader's batches covering exactly ``items`` (the next pass)."""
        remaining = len(items)
        while remaining > 0:
            batch = next(self.loader)
            remaining -= len(batch.ids) + len(batch.failures)
            yield batch

    def _forward(self, capture, batch, bar):
        """Forward one decoded batch; returns (kept positions, per-layer results) and records failures."""
        import torch

        decode_failures = batch.failures
        self.failed.extend(decode_failures)
        self.unsaved_failures.extend(decode_failures)
        if batch.images is None:
            bar.update(len(decode_failures))
            return [], {}
        images = batch.images.to(self.device, non_blocking=True)
        if self.evalset is not None:
            self.evalset.begin_batch(batch.ids)
        results = capture.run(images)
        finite = torch.ones(len(batch.ids), dtype=torch.bool, device=self.device)
        layer_failures = []
        for layer, (_, _, ok) in results.items():
            for pos in torch.nonzero(~ok).flatten().tolist():
                layer_failures.append(Failure(batch.ids[pos], self.by_id[batch.ids[pos]].path, "activation",
                                              "activations contain NaN or Inf", layer))
            finite &= ok
        self.failed.extend(layer_failures)
        self.unsaved_failures.extend(layer_failures)
        keep = torch.nonzero(finite).flatten().cpu().tolist()
        bar.update(len(batch.ids) + len(decode_failures))
        return keep, results

    def _stimulus_row(self, batch, pos: int) -> dict:
        stim = self.by_id[batch.ids[pos]]
        width, height = batch.sizes[pos]
        return {"id": stim.id, "path": stim.path, "sha256": batch.sha256[pos], "label": stim.label,
                "width": width, "height": height, "input_sha256": batch.input_sha256[pos], **stim.extra}

    def _fit_pass(self, items, bar) -> int:
        return self._fit_held(*self._hold_training(items, bar))

    def _hold_training(self, items, bar) -> tuple[dict, dict, list[dict]]:
        """Forward the training sample: (per layer its prepared vectors (n, dim_in) as
        :func:`~vecsim.reduce.held_rows` gives them, per layer the raw norms (n,), the
        stimulus rows), the first ``len(rows)`` rows of each filled, in the order of ``items``."""
        import torch

        from vecsim.extract import LayerCapture
        from vecsim.reduce import held_dtype, held_rows

        n = len(items)
        held = {layer: torch.empty(n, r.dim_in, dtype=held_dtype(r)) for layer, r in self.reducers.items()}
        norms = {layer: torch.empty(n, dtype=torch.float32) for layer in self.reducers}
        rows: list[dict] = []
        functions = {layer: self._layer_function(r, project=False) for layer, r in self.reducers.items()}
        with LayerCapture(self.model, self.config.layers, functions, calls=self.calls) as capture:
            for batch in self._batches(items):
                keep, results = self._forward(capture, batch, bar)
                if not keep:
                    continue
                at, idx = len(rows), torch.tensor(keep)
                for layer, (z, raw_norm, _) in results.items():
                    rows_at = idx.to(z.device)
                    held[layer][at : at + len(keep)] = held_rows(self.reducers[layer], z[rows_at]).cpu()
                    norms[layer][at : at + len(keep)] = raw_norm[rows_at].cpu()
                rows.extend(self._stimulus_row(batch, pos) for pos in keep)
        return held, norms, rows

    def _fit_held(self, held: dict, norms: dict, rows: list[dict]) -> int:
        """Fit every layer's projection on the held training sample, save the transforms,
        commit the projected training vectors; the number of training stimuli."""
        import torch

        from vecsim.index import check_index_spec

        count = len(rows)
        kill_point("fit-pass")
        if count == 0:
            from vecsim.errors import StimulusSetError

            raise StimulusSetError("no stimulus of the training sample could be decoded; see the failures table")
        from concurrent.futures import ThreadPoolExecutor

        from vecsim.stimuli import file_sha256
        from vecsim.store import TRAINING_IDS
        from vecsim._io import save_array

        def save(reducer, spectra, layer_dir: Path) -> str:
            reducer.save(layer_dir)
            save_array(layer_dir / "spectrum.npy", spectra[0])
            if spectra[1].size:  # a centred fit's spectrum is already the covariance's (Store.spectrum)
                save_array(layer_dir / "spectrum_centred.npy", spectra[1])
            return file_sha256(layer_dir / "transform.faiss")

        # each layer's files are written (fsync included) on a thread while the next layer is
        # fitted and the training sample is projected and committed; the manifest names them
        # (status 'indexing': from then on a killed run resumes, no refit) once they are on disk.
        # Killed before that, the run starts again (status 'fitting'), committed rows or not.
        with ThreadPoolExecutor(max_workers=1) as writer_thread:
            written, projected = {}, {}
            for layer, reducer in self.reducers.items():
                report = reducer.fit(held[layer][:count])
                check_index_spec(self.config.index, [reducer.dim])  # the fitted width (a rank can lower it)
                reducer.drop_zero_units()
                spectra = (np.asarray(report.spectrum, dtype=np.float64),
                           np.asarray(report.spectrum_centred, dtype=np.float64))
                written[layer] = writer_thread.submit(save, reducer, spectra, self.writer.layer_dir(layer))
                self.writer.manifest["layers"][layer]["reducer"] = reducer.describe()
                self.writer.create_vector_table(layer, reducer.dim)
                # the layer's training vectors now (count × dim, small), so its sample is freed before the next fit
                projected[layer] = np.concatenate([
                    reducer.project_training(reducer.restrict_prepared(
                        held[layer][start : start + self.config.chunk_size].to(self.device, torch.float32))).cpu().numpy()
                    for start in range(0, count, self.config.chunk_size)])
                del held[layer]
            ids = np.array([r["id"] for r in rows], dtype=np.int64)
            # which stored vectors are in-sample (the fidelity report rescales them per compression level)
            save_array(self.writer.path / TRAINING_IDS, ids)
            for start in range(0, count, self.config.chunk_size):
                stop = min(start + self.config.chunk_size, count)
                pending = {layer: [(ids[start:stop], projected[layer][start:stop], norms[layer][start:stop].numpy())]
                           for layer in self.reducers}
                self._commit(rows[start:stop], pending)
            for layer, done in written.items():
                self.writer.manifest["layers"][layer]["transform_sha256"] = done.result()
        self.writer.save_manifest(status="indexing")
        kill_point("transforms-saved")
        return count

    def _stream_pass(self, items, bar) -> int:
        import torch

        from vecsim.extract import LayerCapture

        if not items:
            return 0
        functions = {layer: self._layer_function(r, project=True) for layer, r in self.reducers.items()}
        pending_rows: list[dict] = []
        pending: dict[str, list] = {layer: [] for layer in self.reducers}
        count = 0
        with LayerCapture(self.model, self.config.layers, functions, calls=self.calls) as capture:
            for batch in self._batches(items):
                keep, results = self._forward(capture, batch, bar)
                keep = [p for p in keep if batch.ids[p] not in self.eval_only]
                if not keep:
                    continue
                idx = torch.tensor(keep)
                ids = np.array([batch.ids[p] for p in keep], dtype=np.int64)
                for layer, (vecs, raw_norm, _) in results.items():
                    sel = idx.to(vecs.device)
                    pending[layer].append((ids, vecs[sel].cpu().numpy(), raw_norm[sel].cpu().numpy()))
                pending_rows.extend(self._stimulus_row(batch, pos) for pos in keep)
                if len(pending_rows) >= self.config.chunk_size:
                    count += self._commit(pending_rows, pending)
        count += self._commit(pending_rows, pending)
        return count

    def _take_failures(self) -> list:
        taken, self.unsaved_failures = self.unsaved_failures, []
        return taken

    def _commit(self, rows: list[dict], pending: dict[str, list]) -> int:
        if not rows:
            return 0
        vectors = {  # one part (a fit-pass chunk) is passed as it is: concatenate would copy it
            layer: tuple(parts[0][i] if len(parts) == 1 else np.concatenate([part[i] for part in parts])
                         for i in range(3))
            for layer, parts in pending.items()
        }
        self.writer.append(rows, vectors, self._take_failures(), self.run_id)
        kill_point("chunk")
        count = len(rows)
        rows.clear()
        for parts in pending.values():
            parts.clear()
        return count

    def _finish(self, indexed: int, failed: int, started: float, seconds: float, resumed_from: int = 0) -> None:
        """Indexes, evaluation subsets, this run's row in the runs table (the stimuli it indexed
        itself: a resumed run leaves out those the stopped run committed) and the manifest."""
        from vecsim._io import package_versions
        from vecsim.store import now

        if self.unsaved_failures:
            self.writer.add_failures(self._take_failures(), self.run_id)
        # the report says how many subset stimuli the projection was fitted on (their pairs are kept better)
        training = np.fromiter(self._training_ids(), np.int64) if self.evalset is not None else None
        for layer, reducer in self.reducers.items():
            self.writer.build_index(layer, reducer.dim, self.config.index, self.device, self.config.seed)
            if self.evalset is not None:
                entry = self.writer.manifest["layers"][layer]
                entry["eval"] = self.evalset.save(layer, self.writer.layer_dir(layer), training)
        self.writer.add_run({
            "run": self.run_id, "command": "index", "started": _utc(started),
            "finished": now(), "indexed": indexed - resumed_from, "failed": failed, "seconds": seconds,
            "config": json.dumps(self.config.to_dict()), "versions": json.dumps(package_versions()),
        })
        self.writer.save_manifest(status="complete", counts={"stimuli": indexed, "failures": failed})
