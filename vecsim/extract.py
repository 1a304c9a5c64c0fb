"""Batched forward passes with scoped hooks.

Every requested layer is captured in the same forward pass. A hook hands the layer's
output to that layer's function *inside the hook*, because a later in-place operation
(DenseNet's ``norm → ReLU(inplace=True)``) would otherwise rewrite the tensor we kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from vecsim.errors import DeviceError, ImageDecodeError
from vecsim.models import Preprocessing, check_layers
from vecsim.models.layers import select, split_layer, tensor_parts
from vecsim.stimuli import DEFAULT_MAX_PIXELS, Failure, decode_image


def resolve_device(device: str = "auto") -> str:
    """'auto' picks CUDA when present; an explicit CUDA request without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"--device {device} was requested but torch sees no CUDA GPU; use --device cpu or auto")
    if device.startswith("cuda:"):
        count = torch.cuda.device_count()
        if not device[5:].isdigit() or int(device[5:]) >= count:
            raise DeviceError(f"--device {device}: torch sees {count} CUDA GPU(s), numbered cuda:0 to cuda:{count - 1}")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda[:N]")
    return device


def copy_flat(output) -> Any:
    """The default per-layer function: a float32 copy, flattened per stimulus."""
    import torch

    return output.detach().flatten(1).to(torch.float32, copy=True)


class _StopForward(Exception):
    """Raised from the last hook of a pass: nothing after the deepest hooked layer is needed."""


class LayerCapture:
    """Context manager that hooks ``layers`` and always removes the hooks on exit.

    ``functions[layer]`` runs inside the hook on the layer's output and its result is
    what :meth:`run` returns. A module called several times in one forward pass
    (torchvision's ResNet blocks reuse one ReLU) is captured at its last call only: its
    function does not run on the earlier calls, whose outputs may have another shape.
    ``calls`` gives the calls per pass of each layer (:func:`vecsim.models.layer_shapes`);
    without it they are counted on a meta-device copy of the model before the first pass.
    A layer whose module returns a tuple, list, dict or dataclass is its selected tensor
    (``blocks.3[0]``, or the first one: :mod:`vecsim.models.layers`), and a sequence-first
    output is transposed to batch first, both before the layer's function sees it; ``layouts``
    gives them per layer (:attr:`vecsim.models.LayerInfo.layout`), else the probe finds them.
    With ``stop_early``, the first pass counts the calls of each hooked module and later
    passes stop right after the last of them, so the layers after the deepest hooked one
    are not computed.
    """

    def __init__(self, model, layers: list[str], functions: dict[str, Callable] | None = None,
                 stop_early: bool = True, calls: dict[str, int] | None = None,
                 layouts: dict[str, tuple[tuple, int]] | None = None):
        check_layers(model, layers)
        self.model = model
        self.layers = list(layers)
        self.functions = functions or {}
        self.stop_early = stop_early
        self._handles: list[Any] = []
        self._results: dict[str, Any] = {}
        self._calls: dict[str, int] = {}
        self._expected: dict[str, int] | None = None
        self._last = None if calls is None else {layer: int(calls.get(layer, 1)) for layer in self.layers}
        # per layer: (selector keys of the captured part of a non-tensor output, batch dim); without
        # them, from the shape probe or (with ``calls``) the selector in the name and batch first
        self._layouts = dict(layouts or {})

    def __enter__(self) -> "LayerCapture":
        modules = dict(self.model.named_modules())
        try:
            for layer in self.layers:
                self._handles.append(modules[split_layer(layer, modules)[0]].register_forward_hook(self._hook(layer)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: str):
        import torch

        function = self.functions.get(layer, copy_flat)

        def hook(_module, _inputs, output):
            if self._last is None:  # the call-counting probe (its model copy carries this hook too)
                return
            count = self._calls.get(layer, 0) + 1
            self._calls[layer] = count
            if count >= self._last.get(layer, 1):  # the module's last call in the pass
                self._results[layer] = function(self._tensor(layer, output))
            if self._expected is not None and self._calls == self._expected:
                raise _StopForward

        return hook

    def _tensor(self, layer: str, output):
        """The layer's tensor in a module output (the selected part; batch first), a view, no copy."""
        import torch

        if layer not in self._layouts:  # calls given without layouts: the name's selector, else the first tensor
            keys = split_layer(layer, dict(self.model.named_modules()))[1]
            if not keys and not isinstance(output, torch.Tensor):
                found = tensor_parts(output)
                keys = found[0][0] if found else ()
            self._layouts[layer] = (keys, 0)
        keys, batch_dim = self._layouts[layer]
        if keys:
            output = select(output, keys, layer)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {layer!r} gives {type(output).__name__}, not a tensor; hook a submodule")
        return output.transpose(0, 1) if batch_dim else output

    def run(self, batch) -> dict[str, Any]:
        """One forward pass under inference mode; the per-layer results of this batch."""
        import torch

        if self._last is None:
            from vecsim.models import layer_shapes

            infos = layer_shapes(self.model, 0, self.layers, input_shape=tuple(batch.shape[1:]))
            self._last = {info.name: info.calls for info in infos}
            self._layouts = {info.name: info.layout for info in infos}
        self._results, self._calls = {}, {}
        try:
            with torch.inference_mode():
                self.model(batch)
        except _StopForward:
            pass
        if self.stop_early and self._expected is None:
            self._expected = dict(self._calls)
        missing = [layer for layer in self.layers if layer not in self._results]
        if missing:
            raise RuntimeError(f"layer(s) {', '.join(missing)} were not called in the forward pass")
        results, self._results = self._results, {}
        return results


@dataclass
class DecodedBatch:
    ids: list[int]
    images: Any  # float tensor (B, 3, H, W), or None when every image failed
    sha256: list[str]
    sizes: list[tuple[int, int]]
    failures: list[Failure] = field(default_factory=list)
    input_sha256: list[str] = field(default_factory=list)  # Preprocessing.prepare's digest per image


class _DecodeDataset:
    """Map-style dataset: (id, relative path) → preprocessed tensor or a failure."""

    def __init__(self, root: Path, items: list[tuple[int, str]], preprocessing: Preprocessing, max_pixels: int):
        self.root, self.items, self.preprocessing, self.max_pixels = root, items, preprocessing, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        stim_id, rel = self.items[index]
        try:
            decoded = decode_image(self.root / rel, self.max_pixels)
            tensor, input_digest = self.preprocessing.prepare(decoded.image)
        except ImageDecodeError as exc:
            return stim_id, rel, None, str(exc)
        except Exception as exc:  # a transform failing on odd data must not end a long job
            return stim_id, rel, None, f"{type(exc).__name__}: {exc}"
        return stim_id, rel, tensor, (decoded.sha256, decoded.width, decoded.height, input_digest)


def _collate(samples) -> DecodedBatch:
    import torch

    ids, tensors, shas, sizes, failures, inputs = [], [], [], [], [], []
    for stim_id, rel, tensor, info in samples:
        if tensor is None:
            failures.append(Failure(stim_id, rel, "decode", info))
            continue
        ids.append(stim_id)
        tensors.append(tensor)
        shas.append(info[0])
        sizes.append((info[1], info[2]))
        inputs.append(info[3])
    images = torch.stack(tensors) if tensors else None
    return DecodedBatch(ids, images, shas, sizes, failures, inputs)


def default_workers() -> int:
    """Decoding threads: as many as the cores, at most 8 (they wait on I/O and overlap the forward pass)."""
    return max(1, min(8, os.cpu_count() or 2))


def iter_decoded(
    root: Path,
    items: list[tuple[int, str]],
    preprocessing: Preprocessing,
    batch_size: int = 32,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    boundaries: Iterable[int] = (),
    first_batch: int | None = None,
) -> Iterator[DecodedBatch]:
    """Decode and preprocess ``items`` in a pool of decoding threads, in order. With threads,
    decoding starts when this is called, not at the first ``next``.

    No batch straddles a position in ``boundaries`` (the pipeline's two passes share
    one loader, so its workers start once and keep decoding across the switch).
    ``first_batch`` makes the first batch that small (the first forward pass of a run
    waits for the first batch's images only).
    """
    workers = default_workers() if workers is None else workers
    if not items:
        return iter(())
    cuts = sorted({0, len(items), *(b for b in boundaries if 0 < b < len(items))})
    if first_batch is not None and 0 < first_batch < min(batch_size, cuts[1]):
        cuts = sorted({*cuts, first_batch})
    batches = [
        list(range(start, min(start + batch_size, stop)))
        for lo, stop in zip(cuts, cuts[1:])
        for start in range(lo, stop, batch_size)
    ]
    dataset = _DecodeDataset(root, items, preprocessing, max_pixels)
    if workers == 0:
        return (_collate([dataset[i] for i in batch]) for batch in batches)
    return _ThreadedBatches(dataset, batches, workers)


class _ThreadedBatches:
    """Decode in a thread pool, a few batches ahead, in order; an iterator of DecodedBatch.

    Threads rather than worker processes: PIL decoding and resizing and torch's tensor
    ops release the GIL, nothing has to be pickled, nothing starts slowly, and no process
    is forked from one that already runs lancedb's (or torch's) threads. The first batches
    are submitted at construction, so decoding overlaps whatever the caller does before it
    asks for them; the pool is shut down (queued images cancelled) when the batches run out,
    when taking one fails, on :meth:`close`, or when the iterator is dropped.
    """

    def __init__(self, dataset: "_DecodeDataset", batches: list[list[int]], workers: int):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.dataset, self.batches = dataset, batches
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vecsim-decode")
        self.pending: deque = deque()
        self.submitted = 0
        for _ in range(min(max(2, workers * 2), len(batches))):
            self._submit()

    def _submit(self) -> None:
        self.pending.append([self.pool.submit(self.dataset.__getitem__, i) for i in self.batches[self.submitted]])
        self.submitted += 1

    def __iter__(self) -> "_ThreadedBatches":
        return self

    def __next__(self) -> DecodedBatch:
        if not self.pending:
            self.close()
            raise StopIteration
        futures = self.pending.popleft()
        if self.submitted < len(self.batches):
            self._submit()
        try:
            return _collate([f.result() for f in futures])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

