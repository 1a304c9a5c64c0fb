"""``index_stimuli``: stimuli → model → extract → reduce → index → store.

Two streaming passes, each image decoded and forwarded once:

1. the seeded training sample; its prepared (pooled, sketched) vectors are held in
   memory and committed as they come to the store's scratch area (a killed run reads them
   back and forwards only the rest), the projection of every layer is fitted on them and
   saved, then they are projected and committed, and the scratch is deleted;
2. every other stimulus, reduced inside the hooks and committed in chunks.

The FAISS indexes are built from the committed vectors at the end. Running the same
command on a complete store with the same settings does nothing.
"""

from __future__ import annotations

import json
import os
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
    forwarded: int = 0  # images this run passed through the model
    up_to_date: bool = False  # the store was already complete with these settings: nothing was done

    @property
    def images_per_second(self) -> float:
        """Stimuli this run indexed per second (a resumed run's earlier stimuli not counted)."""
        return (self.indexed - self.resumed_from) / self.seconds if self.seconds > 0 else 0.0

    def work_line(self) -> str | None:
        """A line on how the work was shared out, when it was (a Ray run), else None."""
        return None


def index_stimuli(config: IndexConfig | None = None, *, config_file: str | None = None, progress: bool = True,
                  **options: Any) -> IndexSummary:
    """Index a stimulus set into a new store. Mirrors ``vecsim index``.

    Pass an :class:`IndexConfig`, or its fields as keywords (``source``, ``model``,
    ``layers``, ``out``, ``dim``...), optionally over a config file.

    ``model`` may also be a torch ``nn.Module`` (in a notebook), with ``preprocessing`` a
    :class:`vecsim.models.Preprocessing` or a dict (``size``, ``mean``, ``std``,
    ``interpolation``); the store records it as ``python:ClassName``, which ``query --image``
    and ``add`` cannot load again (they say so).
    """
    given = None
    module = config.model if config is not None else options.get("model")
    preprocessing = options.pop("preprocessing", None)
    if module is not None and not isinstance(module, str):
        from vecsim.models import wrap_module

        given = wrap_module(module, preprocessing)
        if config is None:
            options["model"] = given.name
        else:
            config.model = given.name
    elif preprocessing is not None:
        raise ConfigError("preprocessing= goes with model=<nn.Module>; a model spec brings its own "
                          "(override it with size, mean, std)")
    if config is None:
        config = resolve(options, config_file)
    else:
        config.validate()
    return _Indexer(config, progress, given).run()


def resume_options(store: str | Path) -> dict:
    """The recorded settings of an unfinished store, to run it again (``vecsim index --resume``)."""
    from vecsim.errors import StoreError
    from vecsim.store import read_manifest

    manifest = read_manifest(Path(store))  # a complete store's settings too: indexing it again is a no-op
    if not isinstance(manifest.get("config"), dict) or not manifest["config"].get("source"):
        raise StoreError(f"{store} records no index settings to run again")
    options = dict(manifest.get("config", {}))
    options["out"] = str(store)
    options["overwrite"] = False  # a store started with --overwrite is resumed, not started again
    return options


def config_differences(previous: dict, config: IndexConfig) -> list[str]:
    """'name: old → new' for every setting that defines a store's content."""
    current = config.to_dict()
    return [f"{name}: {previous.get(name)!r} → {current.get(name)!r}"
            for name in IndexConfig.IDENTITY_FIELDS if previous.get(name) != current.get(name)]


SCRATCH_SECONDS = 0.25  # the training pass commits its progress at least this often (and every --chunk-size)
CPU_SLICE = 8  # on a CPU a decoded batch is forwarded in slices of at most this many images (see _slices)
CPU_SLICE_PIXELS = 8 * 224 * 224  # ... and of about this many input pixels: 8 images at 224 px, 2 at 400 px


def cpu_slice(crop: int) -> int:
    """Images per forward pass on a CPU for inputs of ``crop``² pixels (both passes slice each decoded batch)."""
    return max(1, min(CPU_SLICE, CPU_SLICE_PIXELS // max(1, crop * crop)))


# the stream pass commits at least this often (and every --chunk-size kept stimuli). Each commit
# appends a fragment to every table of the store, so the bound is loose: on a GPU, or at a
# CPU's speed on small inputs, --chunk-size comes first
STREAM_SECONDS = 60.0


def _commit_seconds(variable: str, default: float) -> float:
    """Seconds of work between a pass's commits at most: ``default``, or the environment
    ``variable`` (0 commits after every forward pass: the crash tests' exact points)."""
    value = os.environ.get(variable)
    return float(value) if value else default


def scratch_seconds() -> float:
    """Between the training pass's scratch commits: ``SCRATCH_SECONDS`` or ``VECSIM_SCRATCH_SECONDS``."""
    return _commit_seconds("VECSIM_SCRATCH_SECONDS", SCRATCH_SECONDS)


def stream_seconds() -> float:
    """Between the stream pass's commits: ``STREAM_SECONDS`` or ``VECSIM_STREAM_SECONDS``."""
    return _commit_seconds("VECSIM_STREAM_SECONDS", STREAM_SECONDS)


def index_disk_bytes(reducers: dict, training: list[int], stimuli: int, dims: dict[str, int | None], max_dim: int,
                     evalset=None) -> tuple[int, int]:
    """(bytes indexing may need at its peak, of which the training pass's scratch) for the
    training stimuli ``training`` (ids) still to forward and ``stimuli`` stimuli still to
    commit. The scratch holds per training stimulus its prepared vectors as held, raw norms
    and decoded facts, and the evaluation subset's raw rows of those in it (then the subset's
    Gram); it is on disk together with the committed training vectors until the fit is
    committed. The store holds per stimulus its vectors twice (table and an exact index)
    and its row, and per layer the fitted transform. An upper bound."""
    from vecsim.reduce import held_dtype

    scratch = len(training) * 1024  # ids, paths, digests, sizes; chunk overheads
    store = stimuli * 1024  # the stimulus row and table overheads
    for layer, reducer in reducers.items():
        itemsize = 2 if "float16" in str(held_dtype(reducer)) else 4
        scratch += len(training) * (reducer.dim_in * itemsize + 4)
        if reducer.config.drop_zero_units:
            scratch += 8 * reducer.units  # each unit's index once, in the chunk that first saw it non-zero
        if evalset is not None:
            ev = evalset.layers[layer]
            rows = sum(1 for i in training if evalset.slot_of.get(int(i), ev.size) < ev.size)
            facts = 32 + (int(np.prod(ev.pooled.shape[1:])) * 4 if ev.pooled is not None else 0)
            row = ev.units * (2 if ev.dtype == "float16" else 4) + facts
            scratch += rows * row + (ev.size * (ev.size * 8 + facts) if rows else 0)  # rows, then the complete subset
        dim = min(dims.get(layer) or max_dim, reducer.dim_in)
        store += stimuli * (2 * 4 * dim + 16) + 4 * dim * reducer.dim_in
    return scratch + store, scratch


def check_free_disk(out: Path, needed: int, scratch: int) -> None:
    """Refuse (before anything is written) a run whose store cannot fit on its disk."""
    import shutil

    from vecsim._io import human_bytes
    from vecsim.errors import DiskSpaceError

    folder = Path(out).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise DiskSpaceError(
            f"not enough free disk space for {out}: indexing needs up to {human_bytes(needed)} "
            f"({human_bytes(scratch)} of it the training pass's scratch, deleted after the fit) but only "
            f"{human_bytes(free)} are free in {folder}; free some space or choose another --out"
        )



def _import_lancedb_in_background() -> None:
    """Import lancedb on a thread while the main thread runs forward passes (or reads a
    scratch back). The import is pure Python and holds the GIL; a short switch interval
    while it runs hands the GIL back to the forward pass quickly."""
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


def _check_token_layers(loaded, shapes: dict, poolings: dict, lengths: list[int]) -> None:
    """``cls`` and ``mean`` read the model's class/register tokens at the front of its token
    sequence (the longest of the token ``lengths`` its modules give); a token output of another
    length (a ViT's patch embedding, before the class token is prepended) does not have them
    there, and is refused rather than read wrongly."""
    asked = [layer for layer, p in poolings.items() if p in ("cls", "mean") and len(shapes[layer]) == 2]
    if not asked or not loaded.prefix_tokens:
        return
    sequence = max(lengths, default=0)
    for layer in asked:
        if shapes[layer][0] != sequence:
            raise ConfigError(
                f"--pooling {poolings[layer]} on {layer}: {layer} gives {shapes[layer][0]} tokens, the model's sequence "
                f"has {sequence} (with its {loaded.prefix_tokens} class/register token(s) first), so its first tokens "
                "are not those; use tokens pooling there, or hook a layer of the whole sequence")


def _token_layout(loaded, pooling: str) -> tuple[int, bool]:
    """(prefix tokens, class token) of the model for a token pooling that needs them; else the defaults."""
    from vecsim.reduce import TOKEN_POOLINGS

    return (loaded.prefix_tokens, loaded.class_token) if pooling in TOKEN_POOLINGS else (0, False)


def _capture_record(info) -> dict:
    """What the manifest says about the captured output where it is not the module's plain
    batch-first tensor: the part of a tuple/dict output, a sequence-first output."""
    record = {}
    if info.output:
        record.update(output=info.output, select=info.select)
    if info.batch_dim:
        record["batch_dim"] = info.batch_dim
    return record


def _utc(seconds: float) -> str:
    """A ``time.time()`` as the runs table writes it (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(seconds))


class _Indexer:
    def __init__(self, config: IndexConfig, progress: bool, given=None):
        self.config = config
        self.progress = progress
        self.given = given  # a LoadedModel of a module handed over in Python (index_stimuli(model=...))
        self.run_id = 1

    @classmethod
    def forwarding(cls, config: IndexConfig, loaded, device: str, calls: dict, layouts: dict,
                   reducers: dict) -> "_Indexer":
        """An indexer that only forwards stimuli through given reducers (a Ray actor's): the
        model moved to ``device``, each layer's capture calls and layouts as :meth:`run`
        found them, no evaluation subset. Every field the forward passes read is set here;
        the caller sets the stimuli (``by_id``, ``loader``) and, for the stream pass, ``writer``."""
        ix = cls(config, progress=False)
        ix.loaded, ix.model, ix.device = loaded, loaded.module.to(device), device
        ix.calls, ix.layouts, ix.reducers = calls, layouts, reducers
        ix.evalset, ix.eval_only, ix.forwarded = None, set(), 0
        ix.failed, ix.unsaved_failures, ix.by_id = [], [], {}
        return ix

    # -- setup -------------------------------------------------------------------
    def run(self) -> IndexSummary:
        cfg = self.config
        started = self.started = time.time()
        out = Path(cfg.out)
        previous, mode = self._previous_run(out)
        if mode == "complete":  # before any heavy import: a requeued job that already finished exits at once
            return self._up_to_date(out, previous)

        import torch

        from vecsim.extract import resolve_device
        from vecsim.models import check_layers, layer_shapes, load_model, override_preprocessing
        from vecsim.index import check_index_spec
        from vecsim.reduce import LayerReducer, ReducerConfig, parse_dims, per_layer
        from vecsim.stimuli import discover
        from vecsim.store import StoreWriter

        device = resolve_device(cfg.device)
        stim_set = discover(cfg.source, cfg.manifest, cfg.labels_from_folders)
        # resuming: the checkpoint and a factory's file must still be those the store was started with
        recorded = (previous or {}).get("model", {})
        if self.given is not None:
            loaded = self.given
            loaded.preprocessing = override_preprocessing(loaded.preprocessing, cfg.size, cfg.mean, cfg.std)
        else:
            loaded = load_model(cfg.model, cfg.weights, cfg.checkpoint, cfg.size, cfg.mean, cfg.std,
                                checkpoint_sha256=recorded.get("checkpoint_sha256"),
                                file_sha256=recorded.get("file_sha256"))
        check_layers(loaded.module, cfg.layers)
        if len(set(cfg.layers)) != len(cfg.layers):
            raise ConfigError("--layers lists a layer twice")
        # shapes from the model while it is still on the CPU: their meta-device copy then
        # never doubles the weights on a GPU. cls/mean pooling also needs the model's token
        # sequence length: every module is probed in the same pass then
        poolings = None if mode == "indexing" else per_layer(cfg.pooling, cfg.layers, "pooling", str, "flatten")
        context = ([n for n, _ in loaded.module.named_modules() if n and n not in cfg.layers]
                   if poolings and loaded.prefix_tokens and {"cls", "mean"} & set(poolings.values()) else [])
        probed = layer_shapes(loaded.module, loaded.preprocessing.crop, [*cfg.layers, *context], strict=cfg.layers)
        infos = [i for i in probed if i.name in set(cfg.layers)]
        shapes = {i.name: i.shape for i in infos}
        self.calls = {i.name: i.calls for i in infos}  # a module run several times is captured at its last call
        self.infos = {i.name: i for i in infos}  # what each captures of a tuple/dict output, batch first or not
        self.layouts = {i.name: i.layout for i in infos}  # what the hooks do to each output (LayerCapture)
        by_order = sorted(infos, key=lambda i: i.order)
        self.depth = {i.name: d for d, i in enumerate(by_order)}  # 0 = the first hooked output of a forward pass
        model = loaded.module.to(device)
        if device != "cpu":
            # the forward passes leave the CPU to this import (about a second, first needed at
            # the fit); on a CPU it waits for the fit (_fit_held): why, in docs/internals.md
            _import_lancedb_in_background()
        self.model, self.loaded, self.stim_set, self.device = model, loaded, stim_set, device
        self.dims = parse_dims(cfg.dim, cfg.layers)
        if mode == "indexing":
            self.writer = StoreWriter.reopen(out)
            self.reducers = {layer: LayerReducer.load(layer, self.writer.manifest["layers"][layer]["reducer"],
                                                      self.writer.layer_dir(layer), device) for layer in cfg.layers}
        else:
            dims = self.dims
            # a factory string FAISS cannot build is refused now, not after every stimulus is reduced
            check_index_spec(cfg.index, [dims[layer] for layer in cfg.layers])
            for layer in cfg.layers:
                _check_grid(layer, shapes[layer], poolings[layer], cfg.pooling)
            _check_token_layers(loaded, shapes, poolings, [i.shape[0] for i in probed if len(i.shape) == 2])
            self.reducers = {
                layer: LayerReducer(
                    layer, shapes[layer],
                    ReducerConfig(cfg.similarity, cfg.center, dims[layer], cfg.max_dim, cfg.energy,
                                  cfg.sketch_dim, cfg.sketch_seed, poolings[layer], cfg.drop_zero_units,
                                  *_token_layout(loaded, poolings[layer])),
                    device,
                )
                for layer in cfg.layers
            }
        self.evalset = self._eval_subset(shapes)
        committed: set[int] = set()
        self.restored: list[dict] = []  # the training pass's committed chunks (resuming it)
        self.evals_saved: set[str] = set()  # layers whose evaluation subset is written
        self.forwarded = 0
        self.failed = list(self.stim_set.failures)
        self.unsaved_failures = list(self.failed)  # written with the next commit
        try:
            if mode == "indexing":
                committed = self._prepare_resume()
                self._plan(committed)
                self._check_disk(out, len(self.rest_items))
            elif mode == "training":
                self.writer = StoreWriter.reopen(out, self._stimuli_schema())
                self._plan(skip_training=self._read_training_scratch())
                self._check_disk(out, len(self.stim_set))
                self._number_after_stopped_training_runs()
            else:
                self._plan()
                self._check_disk(out, len(self.stim_set))
                self.writer = StoreWriter.create(out, self._manifest(), self._stimuli_schema(), overwrite=mode == "replace")
            torch.manual_seed(cfg.seed)
            if mode == "indexing":
                indexed, failed = self._resume_all(committed)
            else:
                indexed, failed = self._index_all()
            seconds = time.time() - started
            resumed_from = len(committed) + self.restored_stimuli
            self._finish(indexed, failed, started, seconds, resumed_from=resumed_from)
        finally:
            close = getattr(getattr(self, "loader", None), "close", None)
            if close is not None:  # images queued for decoding are cancelled
                close()
            if getattr(self, "writer", None) is not None:
                self.writer.close()
        described = {layer: r.describe() for layer, r in self.reducers.items()}
        layers = {layer: {**described[layer]["fit"], "dropped_zero_units": described[layer]["dropped_zero_units"],
                          "calls": self.calls.get(layer, 1), "center": bool(r.config.center),
                          "output": self.infos[layer].output, "select": self.infos[layer].select,
                          "batch_dim": self.infos[layer].batch_dim,
                          "units": r.units, "sketched": r.sketch is not None,
                          "index": self.writer.manifest["layers"][layer].get("index", {})}
                  for layer, r in self.reducers.items()}
        from vecsim.report import fidelity_summary

        return IndexSummary(out, indexed, failed, seconds, layers, fidelity_summary(out), resumed_from=resumed_from,
                            forwarded=self.forwarded)

    def _up_to_date(self, out: Path, manifest: dict) -> IndexSummary:
        """The summary of a complete store this command would write again: nothing is touched."""
        counts = manifest.get("counts") or {}
        return IndexSummary(out, int(counts.get("stimuli", 0)), int(counts.get("failures", 0)), 0.0,
                            up_to_date=True)

    # -- resuming ------------------------------------------------------------------
    def _previous_run(self, out: Path) -> tuple[dict | None, str]:
        """(the manifest at ``out`` or None, what this run does): ``new`` (nothing there, or
        what is there is left to StoreWriter.create, which refuses a folder that is not
        empty), ``replace`` (--overwrite, or a run stopped while fitting before it committed
        anything), ``training`` (resume the training pass from its scratch), ``indexing``
        (resume after the fit) or ``complete`` (the store is complete with these settings:
        nothing to do).

        A store with other settings is refused naming each difference, unless --overwrite.
        """
        from vecsim.errors import StoreExistsError
        from vecsim.store import TrainingScratch, read_manifest

        if not (out / "vecsim.json").is_file() or self.config.overwrite:
            return None, "replace" if self.config.overwrite else "new"
        manifest = read_manifest(out)
        status = manifest.get("status")
        differences = config_differences(manifest.get("config", {}), self.config)
        if differences:
            what = "a complete store" if status == "complete" else "an unfinished store"
            how = ("pass --overwrite to replace it or choose another --out" if status == "complete" else
                   "run the same command to resume it, or pass --overwrite to start again")
            raise StoreExistsError(f"{what} at {out} was started with other settings ({'; '.join(differences)}); {how}")
        if status == "complete":
            return manifest, "complete"
        if status == "indexing":
            return manifest, "indexing"
        if TrainingScratch(out).chunk_files():
            return manifest, "training"
        return None, "replace"  # stopped before the training pass committed anything: start again

    def _prepare_resume(self) -> set[int]:
        """Drop what an interrupted chunk left half-written; the committed stimulus ids."""
        from vecsim.store import TrainingScratch

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
        self.evals_saved = {layer for layer, entry in self.writer.manifest["layers"].items()
                            if "eval" in entry and (self.writer.layer_dir(layer) / "eval.npz").is_file()}
        self.writer.drop_uncommitted(committed)
        TrainingScratch(self.writer.path).delete()  # left by a run stopped right after its fit was committed
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

    def _read_training_scratch(self) -> int:
        """Read back the training pass's committed chunks (checked against the training
        items: the stimulus set must be the one the stopped run forwarded); the training
        items they cover."""
        from vecsim.store import TrainingScratch

        self.train_items = self._training_items()
        by_position = self.train_items

        def check(chunk: dict, start: int) -> None:
            stop = int(chunk["stop"])
            expected = by_position[start:stop]
            if (int(chunk["planned"]) != len(by_position) or stop > len(by_position)
                    or chunk["items"].tolist() != [i for i, _ in expected]
                    or chunk["paths"].tolist() != [p for _, p in expected]):
                from vecsim.errors import StimulusSetError

                raise StimulusSetError("the stimulus set changed since the interrupted run (its training sample now "
                                       "names other files); restore it or pass --overwrite to start again")

        self.restored = TrainingScratch(self.writer.path).read(check)
        return int(self.restored[-1]["stop"]) if self.restored else 0

    def _number_after_stopped_training_runs(self) -> None:
        """Record the stopped run in the manifest's ``stopped_runs`` (its runs-table row
        comes with the fit) and number this run after every stopped one."""
        manifest = self.writer.manifest
        stopped = manifest.get("index_run") or {"run": 1, "started": manifest.get("created", "")}
        runs = list(manifest.get("stopped_runs", []))
        if all(r["run"] != stopped["run"] for r in runs):
            runs.append(stopped)
        self.run_id = max(r["run"] for r in runs) + 1
        self.writer.save_manifest(stopped_runs=runs, index_run={"run": self.run_id, "started": _utc(self.started)})

    def _record_stopped_training_runs(self) -> None:
        """The runs-table rows of the runs stopped inside the training pass this run resumed
        (finished empty): the training stimuli each committed to the scratch and the failures
        it met there. Written when the fit creates the tables."""
        manifest = self.writer.manifest
        for stopped in manifest.get("stopped_runs", []):
            mine = [c for c in self.restored if int(c["run"]) == stopped["run"]]
            self.writer.add_run({
                "run": stopped["run"], "command": "index", "started": stopped["started"], "finished": None,
                "indexed": sum(len(c["ids"]) for c in mine),
                "failed": sum(len(json.loads(str(c["failures"]))) for c in mine), "seconds": None,
                "config": json.dumps(manifest.get("config", {})), "versions": json.dumps(manifest.get("versions", {})),
            })

    def _check_disk(self, out: Path, stimuli: int) -> None:
        """Refuse the run before it writes anything when its disk cannot hold what it will write."""
        training = [i for i, _ in self.train_items[self.train_done:]]
        needed, scratch = index_disk_bytes(self.reducers, training, stimuli, self.dims, self.config.max_dim,
                                           self.evalset)
        check_free_disk(out, needed, scratch)

    def _resume_all(self, committed: set[int]) -> tuple[int, int]:
        from tqdm import tqdm

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
                        **_capture_record(self.infos[layer]), "reducer": r.describe()}
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

    def _training_items(self) -> list[tuple[int, str]]:
        """(id, path) of the training sample, in id order: the training pass's order."""
        train_ids = self._training_ids()
        return [(s.id, s.path) for s in self.stim_set.stimuli if s.id in train_ids]

    def _plan(self, committed: set[int] | None = None, skip_training: int = 0) -> None:
        """Training items first, then the rest, both in id order, through one loader (decoding starts now).

        Resuming the training pass, its first ``skip_training`` items (read back from the
        scratch) are skipped. Resuming after the fit, there is no training pass; the rest is
        what was not committed, plus the committed stimuli of the evaluation subsets not
        written at the fit (complete only later), forwarded again only to rebuild them
        (their raw vectors were never written).
        """
        from vecsim.extract import iter_decoded

        cfg = self.config
        self.by_id = {s.id: s for s in self.stim_set.stimuli}
        self.eval_only: set[int] = set()
        self.train_done = skip_training
        if committed is None:
            self.train_items = self._training_items()
            train_ids = {i for i, _ in self.train_items}
            self.rest_items = [(s.id, s.path) for s in self.stim_set.stimuli if s.id not in train_ids]
        else:
            if self.evalset is not None:  # of the layers whose subset is not written yet
                size = max((ev.size for layer, ev in self.evalset.layers.items() if layer not in self.evals_saved),
                           default=0)
                self.eval_only = {i for i, slot in self.evalset.slot_of.items() if slot < size} & committed
            self.train_items = []
            self.rest_items = [(s.id, s.path) for s in self.stim_set.stimuli
                               if s.id not in committed or s.id in self.eval_only]
        remaining = self.train_items[skip_training:]
        # on a CPU the first forward pass is one slice: it waits for that many decoded images only
        first = cpu_slice(self.loaded.preprocessing.crop) if self.device == "cpu" else None
        self.loader = iter_decoded(
            self.stim_set.root, remaining + self.rest_items, self.loaded.preprocessing,
            cfg.batch_size, cfg.workers, cfg.max_pixels, boundaries=(len(remaining),), first_batch=first,
        )

    def _index_all(self) -> tuple[int, int]:
        from tqdm import tqdm

        bar = tqdm(total=len(self.stim_set), initial=self.train_done, unit="img",
                   desc="resuming" if self.train_done else "indexing", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        try:
            indexed = self._fit_pass(self.train_items[self.train_done:], bar)
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
        self.forwarded += len(batch.ids)
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
        width, height = batch.sizes[pos]
        return self._row(batch.ids[pos], batch.sha256[pos], width, height, batch.input_sha256[pos])

    def _row(self, stim_id: int, sha256: str, width: int, height: int, input_sha256: str | None) -> dict:
        """A stimuli-table row: what decoding found, with the set's path, label and metadata."""
        stim = self.by_id[stim_id]
        return {"id": stim.id, "path": stim.path, "sha256": sha256, "label": stim.label,
                "width": width, "height": height, "input_sha256": input_sha256, **stim.extra}

    @property
    def restored_stimuli(self) -> int:
        """Training stimuli read back from the scratch (forwarded by a stopped run)."""
        return sum(len(chunk["ids"]) for chunk in self.restored)

    def _training_pass(self, items, bar):
        """The whole training sample as the fit needs it, (held prepared vectors, raw norms)
        per layer and the stimulus rows: first what the scratch gave back, then ``items``
        forwarded, each new stretch committed to the scratch (:class:`_ScratchCommits`)."""
        held, norms, rows = self._restored_training()
        with _ScratchCommits(self, held, norms, rows) as commits:
            self._forward_training(items, bar, held, norms, rows, commits.forwarded)
        return held, norms, rows

    def _restored_training(self, n: int | None = None, chunks: list[dict] | None = None) -> tuple[dict, dict, list[dict]]:
        """Room for ``n`` training stimuli (default: the whole training sample), per layer
        (prepared vectors, raw norms), and the stimulus rows, holding what the scratch gave
        back (``chunks``, default those read at the start). A restored chunk keeps only its
        facts (items, ids, run, failures): its arrays are held here now."""
        import torch

        from vecsim.reduce import held_dtype

        n = len(self.train_items) if n is None else n
        held = {layer: torch.empty(n, r.dim_in, dtype=held_dtype(r)) for layer, r in self.reducers.items()}
        norms = {layer: torch.empty(n, dtype=torch.float32) for layer in self.reducers}
        rows: list[dict] = []
        for chunk in self.restored if chunks is None else chunks:
            self._restore_chunk(chunk, held, norms, rows)
            for key in [key for key in chunk if key.startswith(("held.", "norms.", "eval."))]:
                del chunk[key]
        return held, norms, rows

    def _hold_training(self, items, bar) -> tuple[dict, dict, list[dict]]:
        """Forward training ``items`` alone (no scratch): (per layer the prepared vectors (n,
        dim_in) as :func:`~vecsim.reduce.held_rows` gives them, per layer the raw norms (n,),
        the stimulus rows), the first ``len(rows)`` rows of each filled, in the order of
        ``items``. What a Ray actor returns for its share of the training pass."""
        held, norms, rows = self._restored_training(len(items), chunks=[])
        self._forward_training(items, bar, held, norms, rows)
        return held, norms, rows

    def _forward_training(self, items, bar, held: dict, norms: dict, rows: list[dict], forwarded=None) -> None:
        """Forward ``items``: their prepared vectors and norms go into ``held`` and ``norms``
        from row ``len(rows)`` on and their stimulus rows are appended; ``forwarded(n)`` after
        each slice of n items."""
        import torch

        from vecsim.extract import LayerCapture
        from vecsim.reduce import held_rows

        functions = {layer: self._layer_function(r, project=False) for layer, r in self.reducers.items()}
        with LayerCapture(self.model, self.config.layers, functions, calls=self.calls,
                          layouts=self.layouts) as capture:
            for part in (part for batch in self._batches(items) for part in self._slices(batch)):
                keep, results = self._forward(capture, part, bar)
                if keep:
                    at, idx = len(rows), torch.tensor(keep)
                    for layer, (z, raw_norm, _) in results.items():
                        rows_at = idx.to(z.device)
                        held[layer][at : at + len(keep)] = held_rows(self.reducers[layer], z[rows_at]).cpu()
                        norms[layer][at : at + len(keep)] = raw_norm[rows_at].cpu()
                    rows.extend(self._stimulus_row(part, pos) for pos in keep)
                if forwarded is not None:
                    forwarded(len(part.ids) + len(part.failures))

    def _slices(self, batch):
        """A decoded batch as both passes forward it: on a CPU, where a forward pass of a few
        images costs per image what a whole batch does or less (benchmarks/bench_cpu_slices.py,
        recorded in benchmarks/RESULTS.md), in slices of :func:`cpu_slice` images, which also
        lets a scratch commit follow every fraction of a second to a second or two of the
        training pass (a kill loses at most that);
        elsewhere, or when the batch met a decoding failure (whose position among the batch's
        items is not kept), whole. The slice depends on the input size only, so a run's
        batches, and its floating-point results, do not depend on timing."""
        from dataclasses import replace

        size = cpu_slice(self.loaded.preprocessing.crop)
        if self.device != "cpu" or batch.failures or batch.images is None or len(batch.ids) <= size:
            yield batch
            return
        for lo in range(0, len(batch.ids), size):
            hi = lo + size
            yield replace(batch, ids=batch.ids[lo:hi], images=batch.images[lo:hi], sha256=batch.sha256[lo:hi],
                          sizes=batch.sizes[lo:hi], input_sha256=batch.input_sha256[lo:hi])

    def _restore_chunk(self, chunk: dict, held, norms, rows: list[dict]) -> None:
        """Put one committed scratch chunk back where the training pass holds it."""
        import torch

        from vecsim.errors import StoreError
        from vecsim.stimuli import Failure

        at, count = len(rows), len(chunk["ids"])
        for layer, reducer in self.reducers.items():
            slug = self.writer.manifest["layers"][layer]["slug"]
            block = torch.from_numpy(np.ascontiguousarray(chunk[f"held.{slug}"]))
            if tuple(block.shape) != (count, reducer.dim_in) or block.dtype != held[layer].dtype:
                raise StoreError(f"{self.writer.path}: a scratch chunk of {layer} holds {tuple(block.shape)} "
                                 f"{block.dtype} vectors, not ({count}, {reducer.dim_in}); pass --overwrite to start again")
            held[layer][at : at + count] = block
            norms[layer][at : at + count] = torch.from_numpy(np.ascontiguousarray(chunk[f"norms.{slug}"]))
            if f"nonzero.{slug}" in chunk:
                if reducer.nonzero is None:
                    reducer.nonzero = torch.zeros(reducer.units, dtype=torch.bool, device=reducer.device)
                reducer.nonzero[torch.from_numpy(chunk[f"nonzero.{slug}"]).to(reducer.device)] = True
            prefix = f"eval.{slug}."
            part = {key[len(prefix):]: value for key, value in chunk.items() if key.startswith(prefix)}
            if part and self.evalset is not None:
                self.evalset.layers[layer].restore(part)
        rows.extend(self._row(int(i), sha.decode(), int(w), int(h), inp.decode() or None)
                    for i, sha, w, h, inp in zip(chunk["ids"], chunk["sha256"], chunk["width"], chunk["height"],
                                                 chunk["input_sha256"]))
        failures = [Failure(**f) for f in json.loads(str(chunk["failures"]))]
        self.failed.extend(failures)
        self.unsaved_failures.extend(failures)

    def _fit_pass(self, items, bar) -> int:
        return self._fit_held(*self._training_pass(items, bar))

    def _fit_held(self, held: dict, norms: dict, rows: list[dict]) -> int:
        """Fit every layer's projection on the held training sample, save the transforms,
        commit the projected training vectors; the number of training stimuli."""
        import torch

        from vecsim.index import check_index_spec
        from vecsim.store import TrainingScratch

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
        # lancedb, first needed for the vector tables after the last fit, is imported on a
        # thread meanwhile (the fits' products release the GIL)
        _import_lancedb_in_background()
        with ThreadPoolExecutor(max_workers=1) as writer_thread:
            written, projected = {}, {}
            for layer, reducer in self.reducers.items():
                report = reducer.fit(held[layer][:count])
                kill_point("layer-fitted")
                check_index_spec(self.config.index, [reducer.dim])  # the fitted width (a rank can lower it)
                reducer.drop_zero_units()
                spectra = (np.asarray(report.spectrum, dtype=np.float64),
                           np.asarray(report.spectrum_centred, dtype=np.float64))
                written[layer] = writer_thread.submit(save, reducer, spectra, self.writer.layer_dir(layer))
                self.writer.manifest["layers"][layer]["reducer"] = reducer.describe()
                # the layer's training vectors now (count × dim, small), so its sample is freed before the next fit
                projected[layer] = np.concatenate([
                    reducer.project_training(reducer.restrict_prepared(
                        held[layer][start : start + self.config.chunk_size].to(self.device, torch.float32))).cpu().numpy()
                    for start in range(0, count, self.config.chunk_size)])
                del held[layer]
            for layer, reducer in self.reducers.items():
                self.writer.create_vector_table(layer, reducer.dim)
            if self.writer.manifest.get("stopped_runs"):
                self._record_stopped_training_runs()
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
        self._save_evals(complete_only=True)
        self.writer.save_manifest(status="indexing")
        TrainingScratch(self.writer.path).delete()  # the committed store now holds all it had
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
        count, interval, last = 0, stream_seconds(), time.monotonic()
        with LayerCapture(self.model, self.config.layers, functions, calls=self.calls,
                          layouts=self.layouts) as capture:
            for batch in (part for batch in self._batches(items) for part in self._slices(batch)):
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
                if len(pending_rows) >= self.config.chunk_size or time.monotonic() - last >= interval:
                    count += self._commit(pending_rows, pending)
                    last = time.monotonic()
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

    def _save_evals(self, complete_only: bool) -> None:
        """Write each layer's evaluation subset (``eval.npz``, named in the manifest): when the
        fit is committed, those already complete (all of them when the whole set is in the
        training sample), so a run resumed after the fit need not forward their stimuli
        again; at the end, the others."""
        if self.evalset is None:
            return
        # the report says how many subset stimuli the projection was fitted on (their pairs are kept better)
        training = np.fromiter(self._training_ids(), np.int64)
        for layer, ev in self.evalset.layers.items():
            if layer in self.evals_saved or (complete_only and len(ev.slots) < ev.size):
                continue
            self.writer.manifest["layers"][layer]["eval"] = self.evalset.save(layer, self.writer.layer_dir(layer), training)
            self.evals_saved.add(layer)

    def _finish(self, indexed: int, failed: int, started: float, seconds: float, resumed_from: int = 0) -> None:
        """Indexes, evaluation subsets, this run's row in the runs table (the stimuli it indexed
        itself: a resumed run leaves out those the stopped run committed) and the manifest."""
        from vecsim._io import package_versions
        from vecsim.store import now

        if self.unsaved_failures:
            self.writer.add_failures(self._take_failures(), self.run_id)
        for layer, reducer in self.reducers.items():
            self.writer.build_index(layer, reducer.dim, self.config.index, self.device, self.config.seed)
        self._save_evals(complete_only=False)
        self.writer.add_run({
            "run": self.run_id, "command": "index", "started": _utc(started),
            "finished": now(), "indexed": indexed - resumed_from, "failed": failed, "seconds": seconds,
            "config": json.dumps(self.config.to_dict()), "versions": json.dumps(package_versions()),
        })
        self.writer.save_manifest(status="complete", counts={"stimuli": indexed, "failures": failed})
        kill_point("store-complete")  # complete on disk, the process not yet exited: a rerun is a no-op


class _ScratchCommits:
    """The training pass's commits to its scratch (:class:`vecsim.store.TrainingScratch`):
    every ``--chunk-size`` kept stimuli or :func:`scratch_seconds`, whichever comes first,
    after a batch, what arrived since the last commit becomes the next chunk: the training
    items it covers (by position in the pass), the held rows and norms, the decoded facts
    of each kept stimulus, the failures met, the units first seen non-zero (for
    --drop-zero-units) and the evaluation subset's new rows.

    Chunks are written on one thread, in order, while the pass forwards the next images
    (writing and fsync release the GIL): what a chunk holds is fixed when it is handed over
    (views of rows the pass never writes again, and copies of the rest), and a chunk is
    handed over only once the one before it is on disk, so a write error stops the pass at
    the next commit. Used as a context manager: leaving it commits what is left and waits
    until every chunk is on disk; leaving it with an error waits only for the chunk being
    written."""

    def __init__(self, indexer: _Indexer, held: dict, norms: dict, rows: list[dict]):
        from concurrent.futures import ThreadPoolExecutor

        from vecsim.store import TrainingScratch

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vecsim-scratch")
        self.writing = None  # the future of the chunk being written
        self.indexer, self.held, self.norms, self.rows = indexer, held, norms, rows
        self.scratch = TrainingScratch(indexer.writer.path)
        self.number = len(indexer.restored)
        self.start = self.stop = indexer.train_done  # training items committed, and forwarded
        self.rows_at = len(rows)
        self.failures_at = len(indexer.failed)
        self.eval_at = indexer.evalset.marks() if indexer.evalset is not None else {}
        self.seen = {layer: None if r.nonzero is None else r.nonzero.clone() for layer, r in indexer.reducers.items()}
        self.interval = scratch_seconds()
        self.last = time.monotonic()

    def forwarded(self, items: int) -> None:
        """``items`` more training items went through (kept or failed); commit when due."""
        self.stop += items
        if len(self.rows) - self.rows_at >= self.indexer.config.chunk_size or time.monotonic() - self.last >= self.interval:
            self.commit()

    def __enter__(self) -> "_ScratchCommits":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.commit()
                self._wait()
        finally:
            self.pool.shutdown(wait=True)

    def _wait(self) -> None:
        """Until the chunk being written is on disk; its error, if it failed."""
        if self.writing is not None:
            writing, self.writing = self.writing, None
            writing.result()

    def commit(self) -> None:
        if self.stop == self.start:
            return
        ix = self.indexer
        arrays = self._arrays()
        self._wait()
        self.writing = self.pool.submit(self.scratch.commit, self.number, arrays)
        self.number += 1
        self.start, self.rows_at, self.failures_at = self.stop, len(self.rows), len(ix.failed)
        if ix.evalset is not None:
            self.eval_at = ix.evalset.marks()
        self.last = time.monotonic()

    def _arrays(self) -> dict[str, np.ndarray]:
        ix = self.indexer
        new_rows = self.rows[self.rows_at:]
        items = ix.train_items[self.start : self.stop]
        failures = [{"id": f.id, "path": f.path, "stage": f.stage, "reason": f.reason, "layer": f.layer}
                    for f in ix.failed[self.failures_at:]]
        arrays = {
            "start": np.int64(self.start), "stop": np.int64(self.stop), "planned": np.int64(len(ix.train_items)),
            "run": np.int64(ix.run_id),
            "items": np.array([i for i, _ in items], dtype=np.int64), "paths": np.array([p for _, p in items], dtype=str),
            "ids": np.array([r["id"] for r in new_rows], dtype=np.int64),
            "sha256": np.array([r["sha256"] for r in new_rows], dtype="S64"),  # hex digests: ASCII
            "width": np.array([r["width"] for r in new_rows], dtype=np.int32),
            "height": np.array([r["height"] for r in new_rows], dtype=np.int32),
            "input_sha256": np.array([r["input_sha256"] or "" for r in new_rows], dtype="S64"),
            "failures": np.array(json.dumps(failures)),
        }
        for layer, reducer in ix.reducers.items():
            slug = ix.writer.manifest["layers"][layer]["slug"]
            arrays[f"held.{slug}"] = self.held[layer][self.rows_at : len(self.rows)].numpy()
            arrays[f"norms.{slug}"] = self.norms[layer][self.rows_at : len(self.rows)].numpy()
            if reducer.nonzero is not None:
                before = self.seen[layer]
                fresh = reducer.nonzero if before is None else reducer.nonzero & ~before
                arrays[f"nonzero.{slug}"] = fresh.nonzero().flatten().cpu().numpy().astype(np.int64)
                self.seen[layer] = reducer.nonzero.clone()
            if ix.evalset is not None:
                part = ix.evalset.layers[layer].snapshot(self.eval_at.get(layer, 0))
                arrays.update({f"eval.{slug}.{key}": value for key, value in part.items()})
        return arrays
