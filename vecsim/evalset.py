"""The evaluation subset: exact similarities of the *raw* activations, captured while indexing.

A seeded order of the stimuli is drawn once; each layer keeps the first M of it, M
shrinking per layer so that the held raw copies fit the memory budget (so any two
layers share the smaller subset). Raw vectors of the subset are held in memory only
(float32 when the budget allows, else float16 scaled per vector so nothing
overflows), never written; their Gram matrix
(inner products of the held copies, computed once when the subset is complete, in float32
products over column chunks on the device, stored float64) and per-vector sums (for
correlation) are. Computing it once, not batch by batch against everything held so far,
converts each float16 value to float32 once instead of once per later batch. For 4-D outputs, per-channel responses
pooled to a small grid are kept too (channel redundancy analyses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHANNEL_GRID = 4
CHUNK_BYTES = 64 * 2**20  # float32 working copy of the held block, per column chunk


def eval_order(ids: list[int], seed: int) -> np.ndarray:
    """The seeded order every layer's subset is a prefix of."""
    return np.random.default_rng([seed, 1]).permutation(np.asarray(ids, dtype=np.int64))


def allot(units: dict[str, int], eval_size: int, budget_bytes: int, n: int) -> dict[str, tuple[int, str]]:
    """Per-layer (subset size, held dtype): water-filling the budget, smallest layers first.

    A layer whose whole subset fits in float32 is held in float32 (no conversions, exact
    products); otherwise in scaled float16, which doubles what the budget holds.
    """
    want = min(eval_size, n)
    sizes: dict[str, tuple[int, str]] = {}
    remaining = float(budget_bytes)
    layers = sorted(units, key=lambda layer: units[layer])
    for i, layer in enumerate(layers):
        share = remaining / (len(layers) - i)
        if want * (units[layer] * 4 + 4) <= share:
            m, dtype, per_vector = want, "float32", units[layer] * 4 + 4
        else:
            per_vector = units[layer] * 2 + 4  # float16 copy + its scale
            m, dtype = int(min(want, share // per_vector)), "float16"
        sizes[layer] = (m, dtype)
        remaining -= m * per_vector
    return sizes


def _grid(shape: tuple) -> tuple[int, int, int] | None:
    """(channels, grid rows, grid cols) for per-channel responses of a (C, H, W) output."""
    if len(shape) != 3:
        return None
    return shape[0], min(CHANNEL_GRID, shape[1]), min(CHANNEL_GRID, shape[2])


def _row_sums(x):
    """Row sums accumulated in float64 (a tensor on ``x``'s device), over column chunks:
    ``sum(dtype=float64)`` of the whole block would first make a float64 copy of it (328 MB
    for 16 rows of a 2.56M-unit layer)."""
    import torch

    chunk = max(1, CHUNK_BYTES // (8 * max(1, x.shape[0])))
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[1], chunk):
        total += x[:, start : start + chunk].sum(dim=1, dtype=torch.float64)
    return total


@dataclass
class LayerEval:
    size: int  # slots = the first `size` ids of the order
    units: int
    device: str
    grid: tuple[int, int, int] | None  # (C, gh, gw) of a (C, H, W) output, else None
    dtype: str = "float16"

    def __post_init__(self):
        import torch

        # rows in arrival order (row r holds slot self.slots[r]; only rows < len(slots) are
        # ever read, so the buffer is not zero-filled), so the held block is
        # always the view held[:count] and the block products copy nothing; on the
        # model's device, so they run there without transfers. Everything a batch adds
        # stays on the device until the subset is complete (its Gram is then computed and
        # the raw rows freed, the one time the hook waits for the device) or read (finish).
        dev = self.device
        self.held = torch.empty(self.size, self.units, dtype=getattr(torch, self.dtype), device=dev)
        self.scale = torch.ones(self.size, dtype=torch.float32, device=dev)
        self.row_sums = torch.zeros(self.size, dtype=torch.float64, device=dev)
        self.finite = torch.zeros(self.size, dtype=torch.bool, device=dev)  # a non-finite row is held as zeros
        self.pooled = (  # per-channel responses, (rows, C, gh * gw)
            torch.zeros(self.size, self.grid[0], self.grid[1] * self.grid[2], dtype=torch.float32, device=dev)
            if self.grid else None
        )
        self.slots: list[int] = []
        self._gram = None  # float64 numpy Gram of the held rows, once computed

    def add(self, slots: list[int], x, output, finite=None, rows=None) -> None:
        """x: (B, units) float32 pooled raw vectors on the device; ``rows`` (a device index
        tensor, default all) picks the ones for these slots, in order; ``finite`` is the
        batch's (B,) finite mask, default all (a non-finite stimulus is held as zeros and
        left out of the subset when it is read). ``output`` is the layer's (B, ...) output, for the
        per-channel responses.

        The rows go straight into the held block (one copy, no intermediate gather).
        """
        import torch
        import torch.nn.functional as F

        count, b = len(self.slots), len(slots)
        if rows is None:
            rows = torch.arange(x.shape[0], device=x.device)
        if finite is None:
            ok = torch.ones(b, dtype=torch.bool, device=self.finite.device)
        else:
            ok = finite.index_select(0, rows.to(finite.device)).to(self.finite.device)
        dest = self.held[count : count + b]
        if self.held.dtype == torch.float32:
            torch.index_select(x, 0, rows, out=dest)
            dest.masked_fill_(~ok[:, None], 0.0)
            self.row_sums[count : count + b] = _row_sums(dest)
        else:
            xs = x.index_select(0, rows).masked_fill_(~ok[:, None], 0.0)
            self.row_sums[count : count + b] = _row_sums(xs)
            scale = xs.abs().amax(dim=1).clamp(min=1e-30)
            dest.copy_(xs.div_(scale[:, None]))
            self.scale[count : count + b] = scale
        self.finite[count : count + b] = ok
        self.slots.extend(slots)
        self._gram = None
        if self.pooled is not None and output is not None and output.ndim == 4:
            # pooled before picking the rows: no copy of the output (.float() is free for float32)
            pooled = F.adaptive_avg_pool2d(output.detach().float(), self.grid[1:]).flatten(2)
            self.pooled[count : count + b] = pooled.index_select(0, rows.to(pooled.device))
        if len(self.slots) == self.size:  # complete: its Gram now, and the raw rows (the --eval-memory budget) freed
            self.compute_gram()
            self.held = None

    def snapshot(self, since: int) -> dict[str, np.ndarray]:
        """What arrived from row ``since`` on, as host arrays, for the training pass to commit:
        the raw rows with their slots, scales, sums, finite flags (and per-channel responses);
        once the subset is complete (its raw rows freed), its Gram and every row's facts
        instead (key ``gram``). Empty when nothing arrived."""
        count = len(self.slots)
        if count <= since:
            return {}
        complete = self.held is None
        rows = slice(0 if complete else since, count)
        part = {"slots": np.asarray(self.slots[rows], dtype=np.int64),
                "scale": self.scale[rows].cpu().numpy(), "sums": self.row_sums[rows].cpu().numpy(),
                "finite": self.finite[rows].cpu().numpy()}
        if complete:
            part["gram"] = self.compute_gram()
        else:
            part["rows"] = self.held[rows].cpu().numpy()
        if self.pooled is not None:
            part["pooled"] = self.pooled[rows].cpu().numpy()
        return part

    def restore(self, part: dict[str, np.ndarray]) -> None:
        """Take back a committed :meth:`snapshot` (the next rows, or the complete subset)."""
        import torch

        def put(target, key, start):
            if target is not None and key in part:
                values = torch.from_numpy(np.ascontiguousarray(part[key]))
                target[start : start + len(values)].copy_(values)  # one copy, converted on the way

        start = 0 if "gram" in part else len(self.slots)
        if "gram" not in part and self.held is None:
            raise ValueError("evaluation rows committed after the subset was complete")
        for target, key in ((self.scale, "scale"), (self.row_sums, "sums"), (self.finite, "finite"),
                            (self.pooled, "pooled"), (self.held, "rows")):
            put(target, key, start)
        self.slots[start:] = [int(s) for s in part["slots"]]
        if "gram" in part:
            self._gram, self.held = np.asarray(part["gram"], dtype=np.float64), None
        elif len(self.slots) == self.size:
            self.compute_gram()
            self.held = None

    def compute_gram(self) -> np.ndarray:
        """The Gram matrix of the held rows, in arrival order (float64; float32 products, over
        column chunks for float16-held rows); computed once."""
        import torch

        count = len(self.slots)
        if self._gram is not None:
            return self._gram
        if count == 0:
            self._gram = np.zeros((0, 0))
            return self._gram
        from vecsim.reduce import add_gram, mirror_upper

        if self.held is None:
            raise RuntimeError("the evaluation subset's raw rows were freed before its Gram was computed")
        held = self.held[:count]
        gram = torch.zeros(count, count, dtype=torch.float32, device=held.device)
        if held.dtype == torch.float32:
            add_gram(gram, held)
            mirror_upper(gram)
            gram = gram.double()
        else:
            chunk = max(1, CHUNK_BYTES // (4 * count))
            for start in range(0, self.units, chunk):
                add_gram(gram, held[:, start : start + chunk].to(torch.float32))
            mirror_upper(gram)
            scale = self.scale[:count].double()
            gram = gram.double() * scale[:, None] * scale[None, :]
        self._gram = gram.cpu().numpy()
        return self._gram

    def result(self, order: np.ndarray) -> dict:
        """ids (in the seeded order), gram, sums, units[, channels] of the finite held stimuli."""
        gram = self.compute_gram()
        count = len(self.slots)
        finite = self.finite[:count].cpu().numpy()
        slots = np.asarray(self.slots, dtype=np.int64)[finite]
        rows = np.flatnonzero(finite)[np.argsort(slots, kind="stable")]  # held rows by slot
        out = {
            "ids": order[: self.size][np.sort(slots)],
            "gram": gram[np.ix_(rows, rows)],
            "sums": self.row_sums[:count].cpu().numpy()[rows],
            "units": np.int64(self.units),
        }
        if self.pooled is not None:
            out["channels"] = self.pooled[:count].cpu().numpy()[rows]
        return out


class EvalSubset:
    """Holds every layer's subset during a run; the pipeline tells it which stimuli a batch has."""

    def __init__(self, ids: list[int], seed: int, eval_size: int, budget_bytes: int,
                 units: dict[str, int], shapes: dict[str, tuple], device: str):
        self.order = eval_order(ids, seed)
        allotted = allot(units, eval_size, budget_bytes, len(ids))
        self.sizes = {layer: m for layer, (m, _) in allotted.items()}
        self.slot_of = {int(i): s for s, i in enumerate(self.order[: max(self.sizes.values(), default=0)])}
        self.layers = {
            layer: LayerEval(m, units[layer], device, _grid(shapes[layer]), dtype)
            for layer, (m, dtype) in allotted.items()
        }
        self.device = device
        self._batch: dict[str, tuple] = {}

    def begin_batch(self, batch_ids: list[int]) -> None:
        """Before the batch's forward pass: which of its rows each layer keeps (as a device
        index tensor, made here so the hook never copies from the host)."""
        import torch

        self._batch = {}
        for layer, ev in self.layers.items():
            pos, slots = [], []
            for p, stim_id in enumerate(batch_ids):
                slot = self.slot_of.get(int(stim_id))
                if slot is not None and slot < ev.size:
                    pos.append(p)
                    slots.append(slot)
            if pos:
                self._batch[layer] = (torch.tensor(pos, device=self.device), slots)

    def capture(self, layer: str, x, output, finite) -> None:
        """Called inside the hook with the pooled float32 raw vectors of the whole batch
        and their finite mask (a non-finite stimulus is not part of the subset). Nothing
        here waits for the device: the finite mask is applied on the device, and read
        when the subset is saved."""
        if layer not in self._batch:
            return
        idx, slots = self._batch[layer]  # once per batch: LayerCapture runs a layer's function at its last call only
        self.layers[layer].add(slots, x, output, finite, rows=idx.to(x.device))

    def marks(self) -> dict[str, int]:
        """Rows held so far per layer (what a later :meth:`LayerEval.snapshot` starts from)."""
        return {layer: len(ev.slots) for layer, ev in self.layers.items()}

    def save(self, layer: str, directory: Path, training: np.ndarray | None = None) -> dict:
        """Write ``eval.npz`` (ids, gram, sums, units[, channels]); returns the manifest entry,
        with ``in_training`` (how many subset stimuli are among the ``training`` ids) when given."""
        from vecsim._io import save_array

        result = self.layers[layer].result(self.order)
        save_array(directory / "eval.npz", **result)
        entry = {"size": int(len(result["ids"])), "requested": int(self.layers[layer].size),
                 "held_dtype": self.layers[layer].dtype, "channels": result.get("channels") is not None}
        if training is not None:
            entry["in_training"] = int(np.isin(result["ids"], training).sum())
        return entry


def held_by_budget(manifest: dict, layer: str) -> int | None:
    """How many of ``layer``'s raw vectors the ``--eval-memory`` budget held, when that is fewer
    than ``--eval-size`` asked for of the stimuli indexed (those added later are not drawn
    from); None when the budget did not cut the subset."""
    asked = (manifest.get("config") or {}).get("eval_size")
    held = (manifest["layers"][layer].get("eval") or {}).get("requested")
    if not asked or held is None:
        return None
    indexed = int((manifest.get("counts") or {}).get("stimuli", 0)) - added_later(manifest)
    return int(held) if held < min(asked, indexed) else None


def added_later(manifest: dict) -> int:
    """Stimuli added with `vecsim add` after indexing (outside every evaluation subset)."""
    return sum(int(a.get("added", 0)) for a in manifest.get("additions", []))


def load_eval(directory: Path) -> dict | None:
    path = Path(directory) / "eval.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def exact_similarity(ev: dict, metric: str = "cosine") -> np.ndarray:
    """Cosine or correlation (Pearson across units) of the raw vectors, from the Gram matrix.

    Correlation uses <x - x̄, y - ȳ> = <x, y> - sum(x) sum(y) / units. A zero vector has
    similarity 0 with everything, itself included.
    """
    gram = np.asarray(ev["gram"], dtype=np.float64)
    if metric == "correlation":
        sums = np.asarray(ev["sums"], dtype=np.float64)
        gram = gram - np.outer(sums, sums) / float(ev["units"])
    elif metric != "cosine":
        raise ValueError(f"unknown metric {metric!r}")
    from vecsim.measures import cosine_from_gram

    return cosine_from_gram(gram)
