"""``vecsim index --ray`` and ``vecsim neighbors --ray``: the same stages on a Ray cluster, one ordinary store as the result.

The driver is :class:`vecsim.pipeline._Indexer` with its forward passes handed to Ray actors:

* pass 1: actors forward the training sample and return its prepared vectors; the driver
  fits every projection exactly as one process does, saves the transforms in the store and
  commits the projected training vectors;
* pass 2: actors load the model and the fitted transforms from the store path (never through
  Ray's object store), forward and reduce a chunk of stimuli each with the pipeline's own code,
  and write its rows as Lance fragments into the store's tables; the driver, the one committer
  of every table, commits each chunk (vectors tables first, the stimuli table, the commit
  record, last) and records its failures, so a killed driver resumes from the committed chunks;
* the evaluation subset (at most ``--eval-size`` stimuli) is forwarded by the driver itself:
  its raw activations never cross the network, and its Gram is the one-process Gram;
* the FAISS indexes are built by the driver from the committed vectors, as one process does,
  except that a trained IVF index is filled by parallel tasks and merged (:func:`fill_in_parallel`).

Actors are plain Ray actors (one per GPU, else one per CPU, or ``--ray-workers``) that Ray
restarts when they die (``max_restarts=-1``), and whose unfinished calls it runs again
(``max_task_retries=-1``): a killed actor's chunks are redone, and the fragments it had
written are never committed. The store, the stimuli and any checkpoint must be on a file
system every node sees; every actor checks that before it works.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vecsim.errors import ConfigError, StoreError, VecsimError
from vecsim.pipeline import IndexSummary, _Indexer

RAY_REQUIREMENT = "ray>=2.51,<2.64"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # a local cluster's object store: chunks of vectors, never images
IN_FLIGHT_PER_ACTOR = 2  # calls queued on an actor: one running, one ready to start
PROBE_PREFIX = ".vecsim-ray-probe-"
# vectors per parallel fill task: below twice this an IVF index is filled by the driver alone
FILL_MIN_PER_TASK = int(os.environ.get("VECSIM_RAY_FILL_MIN", 50_000))
# what a driver's environment must not hand to the workers of a local cluster (they inherit it)
DRIVER_ONLY_ENV = ("VECSIM_KILL_AT",)


@dataclass
class RayIndexSummary(IndexSummary):
    """:class:`IndexSummary` plus the stimuli each Ray node forwarded (node id → stimuli)."""

    nodes: dict[str, int] = field(default_factory=dict)
    fill_tasks: list[int] = field(default_factory=list)  # per IVF index built: the tasks that filled it

    def work_line(self) -> str | None:
        filled = max(self.fill_tasks, default=1)
        return (f"ray: {len(self.nodes)} node(s) forwarded {sum(self.nodes.values())} stimuli "
                f"({', '.join(f'{node[:8]}: {n}' for node, n in self.nodes.items())})"
                + (f"; IVF indexes filled by {filled} parallel tasks" if filled > 1 else ""))


def _ray():
    try:
        import lance  # noqa: F401  (pylance: the workers write Lance fragments, the driver commits them)
        import ray
    except ImportError as missing:
        raise ConfigError(f"--ray needs Ray and pylance ({missing.name} is missing): pip install 'vecsim[ray]'") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str | None = None, workers: int | None = None):
    """Connected to the Ray cluster at ``address`` (else ``RAY_ADDRESS``), or to a local one
    started here (``workers`` CPUs, default every core) and shut down on exit, leaving no Ray
    process behind. A caller already connected (``ray.init`` done) keeps its connection."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    import logging

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file to share between the nodes
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    try:
        if address:
            ray.init(address=address, **common)
        else:
            saved = {name: os.environ.pop(name) for name in DRIVER_ONLY_ENV if name in os.environ}
            try:
                # "local": a new cluster, not one `ray start` left running on this machine
                ray.init(address="local", num_cpus=workers or os.cpu_count() or 1,
                         object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
            finally:
                os.environ.update(saved)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise ConfigError(f"cannot connect to {where}: {first}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def actor_options(ray, workers: int | None) -> tuple[int, dict]:
    """(how many actors, their Ray options): one per GPU of the cluster with a GPU each, else
    one per CPU with a CPU each, or ``workers`` of them."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    options: dict[str, Any] = {"max_restarts": -1, "max_task_retries": -1}
    if gpus:
        options["num_gpus"] = 1
        count = gpus
    else:
        options["num_cpus"] = 1
        count = max(1, int(resources.get("CPU", 1)))
    if workers is not None:
        if workers < 1:
            raise ConfigError("--ray-workers must be at least 1")
        count = workers
    return count, options


class ActorPool:
    """Ray actors of one class, each given work as it finishes the last (at most
    ``IN_FLIGHT_PER_ACTOR`` calls queued on it), all of them checked to see ``shared`` folders."""

    def __init__(self, ray, cls, args: tuple, workers: int | None, shared: list[Path]):
        self.ray = ray
        count, options = actor_options(ray, workers)
        remote = ray.remote(**options)(cls)
        self.actors = [remote.remote(*args) for _ in range(count)]
        try:
            self._check_shared(shared)
        except BaseException:
            self.close()
            raise

    def _check_shared(self, folders: list[Path]) -> None:
        token = secrets.token_hex(8)
        probes = []
        for folder in folders:
            probe = Path(folder) / f"{PROBE_PREFIX}{token}"
            probe.write_text(token)
            probes.append(str(probe.resolve()))
        try:
            answers = self.ray.get([actor.sees.remote(probes, token) for actor in self.actors])
        finally:
            for probe in probes:
                Path(probe).unlink(missing_ok=True)
        for node, missing in answers:
            if missing is not None:
                raise StoreError(f"a Ray worker on node {node[:12]} cannot see {folders[missing]}: the store, the "
                                 "stimuli and any checkpoint must be on a file system every node mounts at the same "
                                 "path (see docs/scale.md)")

    def run(self, method: str, units: list, on_result: Callable[[int, Any], None]) -> None:
        """Call ``method(unit)`` on the actors for every unit; ``on_result(position, result)``
        as each finishes, in the order they finish. An error raised in an actor is raised
        here as itself (a vecsim error stays one line)."""
        ray = self.ray
        queue = deque(enumerate(units))
        free = [a for a in self.actors for _ in range(IN_FLIGHT_PER_ACTOR)]
        pending: dict[Any, tuple[int, Any]] = {}
        while queue or pending:
            while queue and free:
                actor = free.pop(0)
                position, unit = queue.popleft()
                pending[getattr(actor, method).remote(unit)] = (position, actor)
            (done,), _ = ray.wait(list(pending), num_returns=1)
            position, actor = pending.pop(done)
            free.append(actor)
            on_result(position, _get(ray, done))

    def close(self) -> None:
        for actor in self.actors:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
        self.actors = []


def _get(ray, ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, VecsimError):
            raise cause from None
        raise


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class _Actor:
    """What every vecsim actor can answer."""

    def sees(self, probes: list[str], token: str) -> tuple[str, int | None]:
        """(this node, the position of the first probe file it cannot read back, or None)."""
        for position, probe in enumerate(probes):
            try:
                if Path(probe).read_text() == token:
                    continue
            except OSError:
                pass
            return _node_id(), position
        return _node_id(), None


# -- index ---------------------------------------------------------------------------------

def index_stimuli(config=None, *, config_file: str | None = None, progress: bool = True,
                  ray_address: str | None = None, ray_workers: int | None = None, **options: Any) -> RayIndexSummary:
    """:func:`vecsim.index_stimuli` with the forward passes on a Ray cluster (``ray_address``, else
    ``RAY_ADDRESS``, else a local cluster started for this call); ``ray_workers``: how many actors
    (default: one per GPU, else one per CPU of the cluster). The store is the one a single
    process writes for the same settings, and either can resume the other's unfinished store."""
    from vecsim.config import resolve

    if config is None:
        config = resolve(options, config_file)
    else:
        config.validate()
    with ray_cluster(ray_address, ray_workers) as ray:
        indexer = _RayIndexer(config, progress, ray, ray_workers)
        summary = indexer.run()
    return RayIndexSummary(**vars(summary), nodes=dict(indexer.node_work), fill_tasks=indexer.fill_tasks)


class _RayIndexer(_Indexer):
    """The pipeline's driver, with the stimuli forwarded by actors (module docstring)."""

    def __init__(self, config, progress: bool, ray, workers: int | None):
        super().__init__(config, progress)
        self.ray, self.workers = ray, workers
        self.pool: ActorPool | None = None
        self.node_work: Counter = Counter()
        self.fill_tasks: list[int] = []

    def run(self) -> IndexSummary:
        try:
            return super().run()
        finally:
            if self.pool is not None:
                self.pool.close()

    def _plan(self, committed: set[int] | None = None, skip_training: int = 0) -> None:
        super()._plan(committed, skip_training)
        self.loader = None  # the actors decode; the driver decodes only the evaluation subset

    def _actors(self) -> ActorPool:
        if self.pool is None:
            shared = [self.writer.path, self.stim_set.root.resolve()]
            if self.config.checkpoint:
                shared.append(Path(self.config.checkpoint).resolve().parent)
            if self.loaded.file:  # a factory's source file (file.py:fn)
                shared.append(Path(self.loaded.file).resolve().parent)
            spec = {"config": self.config.to_dict(), "root": str(self.stim_set.root.resolve()),
                    "store": str(self.writer.path.resolve()),
                    "checkpoint_sha256": self.loaded.checkpoint_sha256, "file_sha256": self.loaded.file_sha256,
                    "calls": self.calls, "layouts": self.layouts,
                    "reducers": {layer: r.describe() for layer, r in self.reducers.items()},
                    "env": {k: v for k, v in os.environ.items() if k.startswith("VECSIM_RAY_")}}
            self.pool = ActorPool(self.ray, IndexActor, (spec,), self.workers, shared)
        return self.pool

    def _units(self, items) -> list[list]:
        stimuli = [self.by_id[i] for i, _ in items]
        size = self.config.chunk_size
        return [stimuli[lo : lo + size] for lo in range(0, len(stimuli), size)]

    def _record(self, result: dict, bar) -> None:
        self.failed.extend(result["failures"])
        self.unsaved_failures.extend(result["failures"])
        self.node_work[result["node"]] += result["count"]
        bar.update(result["forwarded"])

    def _training_pass(self, items, bar):
        """The training pass with ``items`` forwarded by the actors: their results are taken
        in the order of ``items`` (as one process holds them) and committed to the scratch as
        they line up, so a stopped driver resumes from what arrived in order."""
        import torch

        from vecsim.pipeline import _ScratchCommits

        held, norms, rows = self._restored_training()
        arrived: dict[int, dict] = {}
        taken = 0

        def keep(position: int, result: dict) -> None:
            nonlocal taken
            arrived[position] = result
            while taken in arrived:  # the next unit in order: held, committed when due
                result = arrived.pop(taken)
                taken += 1
                self._record(result, bar)
                at, count = len(rows), len(result["rows"])
                for layer in self.reducers:
                    held[layer][at : at + count] = torch.from_numpy(result["held"][layer])
                    norms[layer][at : at + count] = torch.from_numpy(result["norms"][layer])
                rows.extend(result["rows"])
                for layer, seen in result["nonzero"].items():  # --drop-zero-units: units any actor saw non-zero
                    reducer, seen = self.reducers[layer], torch.from_numpy(seen).to(self.device)
                    reducer.nonzero = seen if reducer.nonzero is None else reducer.nonzero | seen
                commits.forwarded(result["forwarded"])

        with _ScratchCommits(self, held, norms, rows) as commits:
            self._actors().run("prepare", self._units(items), keep)
        return held, norms, rows

    def _stream_pass(self, items, bar) -> int:
        from concurrent.futures import ThreadPoolExecutor

        from vecsim._faults import kill_point

        items = [item for item in items if item[0] not in self.eval_only]  # committed; forwarded for the subset only
        count = 0

        def commit(_position: int, result: dict) -> None:
            nonlocal count
            self._record(result, bar)
            self.writer.commit_fragments(result["fragments"])
            if self.unsaved_failures:
                self.writer.add_failures(self._take_failures(), self.run_id)
            kill_point("chunk")
            count += result["count"]

        # the driver forwards the evaluation subset meanwhile (its device would idle otherwise)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vecsim-eval") as driver:
            subset = driver.submit(self._forward_eval_subset)
            units = self._units(items)
            if units:
                self._actors().run("reduce", units, commit)
            subset.result()
        return count

    def _finish(self, *args, **kwargs) -> None:
        if self.pool is not None:  # their CPUs or GPUs go to the tasks that fill the indexes
            self.pool.close()
            self.pool = None
        self.writer.fill_index = self._fill_index
        super()._finish(*args, **kwargs)

    def _forward_eval_subset(self) -> None:
        """The evaluation subset's raw activations, forwarded here (they stay on this machine)."""
        from vecsim.extract import LayerCapture, iter_decoded

        if self.evalset is None:
            return
        cfg = self.config
        items = [(s.id, s.path) for s in self.stim_set.stimuli if s.id in self.evalset.slot_of]
        functions = {layer: functools.partial(_tap_raw, reducer, self.evalset) for layer, reducer in self.reducers.items()}
        batches = iter_decoded(self.stim_set.root, items, self.loaded.preprocessing, cfg.batch_size, cfg.workers,
                               cfg.max_pixels)
        with LayerCapture(self.model, cfg.layers, functions, calls=self.calls) as capture:
            for batch in batches:
                if batch.images is not None:
                    self.evalset.begin_batch(batch.ids)
                    capture.run(batch.images.to(self.device, non_blocking=True))


    def _fill_index(self, index, vecs, ids) -> None:
        self.fill_tasks.append(fill_in_parallel(self.ray, self.workers, index, vecs, ids))


def fill_in_parallel(ray, workers: int | None, index, vecs, ids) -> int:
    """Fill a trained, empty IVF ``index`` with ``vecs`` under ``ids``: copies of it are filled
    with consecutive slices in parallel Ray tasks and merged in slice order, so every inverted list
    holds its entries in the order one ``add`` gives (the same index). An index without
    inverted lists is filled here. Returns the number of tasks (1: filled here)."""
    import faiss
    import numpy as np

    from vecsim import index as vindex

    ivf = faiss.try_extract_index_ivf(index)
    count, options = actor_options(ray, workers)
    if ivf is None or count < 2 or len(ids) < 2 * FILL_MIN_PER_TASK:
        vindex.add(index, vecs, ids)
        return 1
    parts = min(count, len(ids) // FILL_MIN_PER_TASK)
    empty = ray.put(faiss.serialize_index(index))
    bounds = np.linspace(0, len(ids), parts + 1).astype(int)
    task = ray.remote(**{k: v for k, v in options.items() if k.startswith("num_")}, max_retries=-1)(_fill_part)
    filled = [task.remote(empty, vecs[lo:hi], ids[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
    for ref in filled:  # in slice order
        part = faiss.deserialize_index(_get(ray, ref))
        ivf.merge_from(faiss.extract_index_ivf(part), 0)
    index.ntotal = ivf.ntotal
    return parts


def _fill_part(empty, vecs, ids):
    """A Ray task: a copy of the trained, empty index filled with one slice, serialised."""
    import faiss

    from vecsim import index as vindex

    part = faiss.deserialize_index(empty)
    vindex.add(part, vecs, ids)
    return faiss.serialize_index(part)


def _tap_raw(reducer, evalset, output) -> None:
    """Inside the hook: hand the layer's pooled raw vectors to the evaluation subset."""
    x = reducer.pool(output)
    _, finite = reducer.measure(x)
    evalset.capture(reducer.layer, x, output, finite)


class IndexActor(_Actor):
    """Forwards chunks of stimuli with the pipeline's own code (a worker-side :class:`_Indexer`)."""

    def __init__(self, spec: dict):
        for name in DRIVER_ONLY_ENV:
            os.environ.pop(name, None)
        os.environ.update(spec["env"])
        self.spec = spec
        self.indexer: _Indexer | None = None
        self.fitted = False

    def _setup(self, fitted: bool) -> _Indexer:
        import torch

        from vecsim.config import IndexConfig
        from vecsim.extract import resolve_device
        from vecsim.models import load_model
        from vecsim.reduce import LayerReducer, ReducerConfig

        spec = self.spec
        if self.indexer is None:
            cfg = IndexConfig(**spec["config"])
            device = "cpu" if cfg.device == "cpu" else resolve_device("auto")
            loaded = load_model(cfg.model, cfg.weights, cfg.checkpoint, cfg.size, cfg.mean, cfg.std,
                                checkpoint_sha256=spec["checkpoint_sha256"], file_sha256=spec["file_sha256"])
            reducers = {layer: LayerReducer(layer, tuple(d["shape"]), ReducerConfig(**d["config"]), device)
                        for layer, d in spec["reducers"].items()}
            ix = _Indexer.forwarding(cfg, loaded, device, spec["calls"], spec["layouts"], reducers)
            torch.manual_seed(cfg.seed)
            self.indexer = ix
        ix = self.indexer
        if fitted and not self.fitted:  # the fitted transforms, from the store path
            from vecsim.store import FragmentWriter, read_manifest

            store = Path(spec["store"])
            manifest = read_manifest(store)
            ix.reducers = {layer: LayerReducer.load(layer, manifest["layers"][layer]["reducer"],
                                                    store / "layers" / manifest["layers"][layer]["slug"], ix.device)
                           for layer in ix.config.layers}
            ix.writer = FragmentWriter(store, manifest)
            self.fitted = True
        return ix

    def _begin(self, stimuli: list, fitted: bool):
        from tqdm import tqdm

        from vecsim.extract import iter_decoded

        ix = self._setup(fitted)
        items = [(s.id, s.path) for s in stimuli]
        ix.by_id = {s.id: s for s in stimuli}
        ix.failed, ix.unsaved_failures = [], []
        ix.loader = iter_decoded(Path(self.spec["root"]), items, ix.loaded.preprocessing, ix.config.batch_size,
                                 ix.config.workers, ix.config.max_pixels)
        return ix, items, tqdm(disable=True)

    def prepare(self, stimuli: list) -> dict:
        """Pass 1: the chunk's prepared training vectors, raw norms, stimulus rows and failures."""
        from vecsim._faults import kill_once

        ix, items, bar = self._begin(stimuli, fitted=False)
        held, norms, rows = ix._hold_training(items, bar)
        kill_once("ray-prepare")
        count = len(rows)
        nonzero = {}
        for layer, reducer in ix.reducers.items():
            if reducer.nonzero is not None:
                nonzero[layer], reducer.nonzero = reducer.nonzero.cpu().numpy(), None
        return {"held": {layer: h[:count].numpy() for layer, h in held.items()},
                "norms": {layer: n[:count].numpy() for layer, n in norms.items()},
                "rows": rows, "nonzero": nonzero, **self._done(ix, count, len(stimuli))}

    def reduce(self, stimuli: list) -> dict:
        """Pass 2: the chunk's rows written as Lance fragments (not committed) and its failures."""
        from vecsim._faults import kill_once

        ix, items, bar = self._begin(stimuli, fitted=True)
        count = ix._stream_pass(items, bar)
        kill_once("ray-reduce")  # its fragments are written, never to be committed
        return {"fragments": ix.writer.take(), **self._done(ix, count, len(stimuli))}

    @staticmethod
    def _done(ix: _Indexer, count: int, forwarded: int) -> dict:
        return {"failures": list(ix.failed), "count": count, "forwarded": forwarded, "node": _node_id()}


# -- neighbors -------------------------------------------------------------------------------

def neighbors(store, layer: str, k: int, out: str | os.PathLike, *, batch_size: int = 4096, overwrite: bool = False,
              progress: bool = True, device: str = "auto", ray_address: str | None = None,
              ray_workers: int | None = None) -> dict:
    """:func:`vecsim.query.neighbors` with the query blocks spread over Ray actors that each
    load the index once; their Parquet parts (in a folder beside ``out``, on the shared file
    system) are assembled into the file one process writes. ``store``: a path or a Store."""
    import shutil

    import pyarrow.parquet as pq
    from tqdm import tqdm

    from vecsim._io import fsync_replace
    from vecsim.errors import QueryError
    from vecsim.query import _check_output, neighbors_schema
    from vecsim.store import Store

    store = store if isinstance(store, Store) else Store.open(store)
    out = Path(out)
    if k < 1:
        raise QueryError("-k must be at least 1")
    if batch_size < 1:
        raise QueryError("--batch-size must be at least 1")
    _check_output(out, overwrite, (".parquet",))
    store.layer_info(layer)
    parts = out.with_name(out.name + ".parts")
    tmp = out.with_name(out.name + ".tmp")
    start = time.time()
    found: dict[int, str] = {}
    nodes: Counter = Counter()
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    # Ray's processes are started before lancedb's runtime exists here (it is not fork-safe)
    try:
        with ray_cluster(ray_address, ray_workers) as ray:
            ids, _ = store.vectors(layer)
            schema = neighbors_schema(store, layer, ids)
            blocks = [(lo, min(lo + batch_size, len(ids))) for lo in range(0, len(ids), batch_size)]
            pool = ActorPool(ray, NeighborActor, (str(store.path), layer, k, device, str(parts), schema),
                             ray_workers, [store.path, parts])
            bar = tqdm(total=len(ids), unit="q", desc=f"neighbors {layer} (ray)", disable=not progress)
            try:
                def keep(position: int, result: dict) -> None:
                    found[position] = result["part"]
                    nodes[result["node"]] += result["queries"]
                    bar.update(result["queries"])

                pool.run("block", blocks, keep)
            finally:
                bar.close()
                pool.close()
        written = 0
        with pq.ParquetWriter(tmp, schema) as writer:
            for position in range(len(blocks)):
                table = pq.read_table(found[position]).replace_schema_metadata(schema.metadata)
                writer.write_table(table)
                written += table.num_rows
        fsync_replace(tmp, out)
    finally:  # a failed run leaves no parts or temporary file behind
        shutil.rmtree(parts, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "rows": written, "stimuli": int(len(ids)), "k": k,
            "k_effective": min(k, max(len(ids) - 1, 0)), "seconds": time.time() - start, "nodes": dict(nodes)}


class NeighborActor(_Actor):
    """Loads the store's index and vectors of one layer once; answers blocks of queries."""

    def __init__(self, store: str, layer: str, k: int, device: str, parts: str, schema):
        self.args = (store, layer, k, device)
        self.parts, self.schema = Path(parts), schema
        self.state = None
        self._stack = contextlib.ExitStack()

    def _load(self):
        from vecsim.extract import resolve_device
        from vecsim.index import is_exact
        from vecsim.query import _exact_searcher, identical_twins
        from vecsim.store import Store

        if self.state is None:
            path, layer, k, device = self.args
            store = Store.open(path)
            index = store.index(layer)
            exact = is_exact(index)
            ids, vecs = store.vectors(layer)
            device = resolve_device(device)  # auto: this node's GPU when it has one
            search = self._stack.enter_context(_exact_searcher(index, exact, ids, vecs, device))
            self.state = (search, exact, ids, vecs, identical_twins(store), k)
        return self.state

    def block(self, bounds: tuple[int, int]) -> dict:
        import pyarrow.parquet as pq

        from vecsim._faults import kill_once
        from vecsim.query import neighbor_block

        search, exact, ids, vecs, twins, k = self._load()
        lo, hi = bounds
        table = neighbor_block(search, exact, lo, hi, ids, vecs, twins, k, self.schema)
        part = self.parts / f"part-{lo:012d}.parquet"
        tmp = part.with_name(part.name + f".{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, part)  # a retried block replaces the part whole
        kill_once("ray-neighbors")
        return {"part": str(part), "queries": hi - lo, "node": _node_id()}
