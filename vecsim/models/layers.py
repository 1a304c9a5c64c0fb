"""The hookable layers of a model: their names, output shapes and calls per forward pass,
and which tensor of a module's output is captured.

A layer is a module name (``layer3.1``, ``blocks.5``), optionally followed by a selector
of one part of a module output that is not a tensor: ``blocks.3[0]`` (a tuple's or list's
first element), ``encoder[last_hidden_state]`` (a dict key, a dataclass or namedtuple field), chained
for nested outputs (``attn[0][1]``). A name that is itself a module is always the module,
so a selector never hides one. Without a selector, a tuple, list, dict or dataclass output
is captured by its first tensor (depth first), and ``vecsim layers`` says which.

Token outputs whose first dimension is not the batch (sequence first: tokens, batch,
channels, as ``nn.MultiheadAttention`` without ``batch_first`` returns) are recognised on
the shape probe, which runs at batch size 2: a module whose output has 2 in its second
dimension and not in its first is read batch second and transposed in the hook (a view,
no copy); an output with no dimension of the batch size is refused.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vecsim.errors import UnknownLayerError, close_matches

PROBE_BATCH = 2  # batch size of the shape probe: tells a (batch, tokens, C) output from a (tokens, batch, C) one
_SELECTORS = re.compile(r"(?:\[[^\[\]]+\])+$")
_KEY = re.compile(r"\[([^\[\]]+)\]")


def split_layer(layer: str, modules=None) -> tuple[str, tuple]:
    """``'blocks.3[0]'`` → ``('blocks.3', (0,))``; ``'enc[out][1]'`` → ``('enc', ('out', 1))``.

    With ``modules`` (the model's module names), a name that is a module is returned whole."""
    if modules is not None and layer in modules:
        return layer, ()
    match = _SELECTORS.search(layer)
    if not match or match.start() == 0:
        return layer, ()
    return layer[: match.start()], parse_selector(match.group(0))


def parse_selector(text: str) -> tuple:
    """``'[out][1]'`` → ``('out', 1)``."""
    return tuple(int(k) if re.fullmatch(r"-?\d+", k.strip()) else k.strip() for k in _KEY.findall(text))


def selector_text(keys: tuple) -> str:
    return "".join(f"[{k}]" for k in keys)


def parts(output) -> list[tuple[Any, Any]]:
    """(key, value) of each part of a tuple, list, dict or dataclass output; [] otherwise."""
    if isinstance(output, (tuple, list)):
        return list(enumerate(output))
    if isinstance(output, Mapping):
        return list(output.items())
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    return []


def output_kind(output) -> str:
    """'tuple of 2', 'dict with keys a, b', 'Output (dataclass) with fields x, y', or the type's name."""
    if isinstance(output, (tuple, list)):
        return f"{type(output).__name__} of {len(output)}"
    found = parts(output)
    if found:
        what = "keys" if isinstance(output, Mapping) else "fields"
        return f"{type(output).__name__} with {what} {', '.join(str(k) for k, _ in found)}"
    return type(output).__name__


def select(output, keys: tuple, layer: str):
    """The part of ``output`` the selector ``keys`` names (UnknownLayerError naming the parts when none)."""
    for depth, key in enumerate(keys):
        found = dict(parts(output))
        if isinstance(output, (tuple, list)) and isinstance(key, int) and -len(output) <= key < 0:
            key += len(output)
        if key not in found and str(key) in found:  # a dict key that looks like a number
            key = str(key)
        if isinstance(key, str) and key in getattr(output, "_fields", ()):  # a namedtuple's field
            key = output._fields.index(key)
        if key not in found:
            where = split_layer(layer)[0] + selector_text(keys[:depth])
            choices = ", ".join(f"[{k}]" for k in found) or "none: it is not a tuple, list, dict or dataclass"
            raise UnknownLayerError(f"layer {layer!r}: {where} returns {output_kind(output)}, which has no part "
                                    f"[{key}]; its parts: {choices}")
        output = found[key]
    return output


def tensor_parts(output, keys: tuple = (), depth: int = 0) -> list[tuple[tuple, Any]]:
    """(selector keys, tensor) of every tensor in ``output``, depth first (nested up to 3 levels)."""
    import torch

    if isinstance(output, torch.Tensor):
        return [(keys, output)]
    if depth >= 3:
        return []
    found = []
    for key, value in parts(output):
        found += tensor_parts(value, (*keys, key), depth + 1)
    return found


def check_layers(module, layers: list[str]) -> None:
    """Raise UnknownLayerError naming close matches for any layer whose module the model lacks."""
    names = [n for n, _ in module.named_modules() if n]
    known = set(names)
    for layer in layers:
        name, _ = split_layer(layer, known)
        if name not in known:
            raise UnknownLayerError(
                f"unknown layer {layer!r}{close_matches(name, names)} "
                "(`vecsim layers MODEL` lists them)"
            )


@dataclass(frozen=True)
class LayerInfo:
    name: str  # as the store names it: the module name, with a selector where one was asked for
    kind: str
    shape: tuple[int, ...]  # per stimulus, without the batch dimension (of the module's last call)
    calls: int = 1  # times the module runs in one forward pass (torchvision's ResNet blocks reuse one ReLU)
    order: int = 0  # when its (last) call ends among the hooked modules' calls in the pass: depth order
    output: str = ""  # what the module returns when it is not a tensor ('tuple of 2'); '' for a tensor
    select: str = ""  # the part of that output captured ('[0]'), chosen or the first tensor
    batch_dim: int = 0  # 1: the output is sequence first (tokens, batch, ...), transposed in the hook

    @property
    def units(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def layout(self) -> tuple[tuple, int]:
        """(selector keys, batch dim): what the hook does to the module's output before the layer's function."""
        return parse_selector(self.select), self.batch_dim


def batch_dim_of(shape: tuple[int, ...], batch: int) -> int | None:
    """0 for a batch-first output of a ``batch``-sized probe, 1 for a sequence-first one, None for neither."""
    if len(shape) >= 1 and shape[0] == batch:
        return 0
    if len(shape) >= 2 and shape[1] == batch:
        return 1
    return None


def layer_shapes(module, size: int, names: list[str] | None = None,
                 input_shape: tuple[int, ...] | None = None, strict: bool | list[str] = False) -> list[LayerInfo]:
    """Output shape (of the last call) and calls per forward pass of every (or the named)
    layer, for ``size``×``size`` RGB input (or input of ``input_shape``, without the batch).

    Every module is listed; one whose output is a tuple, list, dict or dataclass under its
    name with its first tensor, and its other tensors as ``name[key]`` entries. Modules that
    do not run in the forward pass (in eval mode) or return no tensor are left out; with
    ``strict`` (and ``names``) such a named layer is an UnknownLayerError saying which (with a
    list, only the layers in it: the others are probed for context, e.g. token lengths).
    """
    import torch

    known = {n for n, _ in module.named_modules() if n}
    wanted: dict[str, list[str]] | None = None  # module name → the entries asked for it
    if names is not None:
        wanted = {}
        for layer in names:
            wanted.setdefault(split_layer(layer, known)[0], []).append(layer)
    seen: dict[str, LayerInfo] = {}
    problems: dict[str, str] = {}  # entry → why it cannot be captured
    calls: dict[str, int] = {}
    entries: dict[str, list[str]] = {}  # module name → its entries, in the order they were found
    handles = []
    shape = tuple(input_shape) if input_shape is not None else (3, size, size)
    fired = [0]  # hooked calls so far in the pass

    def record(entry: str, kind: str, count: int, out, keys: tuple, explicit: bool) -> None:
        try:
            tensor = select(out, keys, entry) if explicit else out
        except UnknownLayerError as exc:
            problems[entry] = str(exc)
            return
        if not isinstance(tensor, torch.Tensor):
            found = tensor_parts(tensor)
            if not found:
                problems[entry] = (f"layer {entry!r} returns {output_kind(tensor)}, with no tensor in it; hook one of "
                                   "its submodules (`vecsim layers MODEL` lists them)")
                return
            keys, tensor = keys + found[0][0], found[0][1]
        dim = batch_dim_of(tuple(tensor.shape), PROBE_BATCH)
        if dim is None:
            problems[entry] = (f"layer {entry!r} gives a {tuple(tensor.shape)} output for a batch of {PROBE_BATCH}: "
                               "neither its first nor its second dimension is the batch; hook another module")
            return
        per_stimulus = tuple(s for i, s in enumerate(tensor.shape) if i != dim)
        problems.pop(entry, None)
        if entry not in seen:
            entries.setdefault(split_layer(entry, known)[0], []).append(entry)
        seen[entry] = LayerInfo(entry, kind, per_stimulus, count, fired[0],
                                "" if isinstance(out, torch.Tensor) else output_kind(out), selector_text(keys), dim)

    def make_hook(name, kind):
        def hook(_mod, _inp, out):
            fired[0] += 1
            calls[name] = calls.get(name, 0) + 1
            if wanted is not None:
                for entry in wanted[name]:
                    entry_keys = split_layer(entry, known)[1]
                    record(entry, kind, calls[name], out, entry_keys, bool(entry_keys))
                return
            record(name, kind, calls[name], out, (), False)
            if not isinstance(out, torch.Tensor):  # the output's other tensors, as entries of their own
                for keys, _ in tensor_parts(out)[1:]:
                    record(name + selector_text(keys), kind, calls[name], out, keys, True)

        return hook

    def run(net, device) -> None:
        modules = [(n, m) for n, m in net.named_modules() if n and (wanted is None or n in wanted)]
        try:
            for n, m in modules:
                handles.append(m.register_forward_hook(make_hook(n, type(m).__name__)))
            with torch.inference_mode():
                net(torch.zeros(PROBE_BATCH, *shape, device=device, dtype=dtype))
        finally:
            for h in handles:
                h.remove()
            handles.clear()

    param = next(module.parameters(), None)
    # a float16/bfloat16 model takes input of its own dtype
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    on_cpu = param is None or param.device.type == "cpu"
    if on_cpu and not any(m.training for m in module.modules()) and "torch._dynamo" not in sys.modules:
        # one real forward of the probe batch: on a CPU it costs what two stimuli cost the job
        # and warms the kernels the first batch then uses, while the meta copy's
        # decompositions would import torch._dynamo, which vecsim's imports leave out
        # (vecsim.models.tvimport; the costs in docs/internals.md, "Starting and stopping").
        # Eval mode only: in train mode a forward would change batch-norm statistics. The
        # model's own hooks are set aside, as they are in the copy.
        from collections import OrderedDict

        own = [(m, m._forward_hooks, m._forward_pre_hooks) for m in module.modules()]
        try:
            for m, _, _ in own:
                m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
            run(module, torch.device("cpu"))
        finally:
            for m, hooks, pre_hooks in own:
                m._forward_hooks, m._forward_pre_hooks = hooks, pre_hooks
    else:
        try:  # shapes only: a copy on the meta device computes no activations (and warms nothing up)
            import copy

            if param is not None and param.device.type != "cpu":
                raise RuntimeError("a deep copy would first duplicate the weights on the device")
            shadow = copy.deepcopy(module).to("meta")
            for m in shadow.modules():  # the copy would carry the model's own hooks (and a capture's)
                m._forward_hooks.clear()
                m._forward_pre_hooks.clear()
            run(shadow, "meta")
        except Exception:  # a model on a GPU, or an operation without a meta kernel: one real forward
            seen.clear()
            problems.clear()
            calls.clear()
            entries.clear()
            fired[0] = 0
            run(module, param.device if param is not None else torch.device("cpu"))
    if strict and names is not None:
        for name in (names if strict is True else strict):
            if name in seen:
                continue
            if name in problems:
                raise UnknownLayerError(problems[name])
            raise UnknownLayerError(f"layer {name!r} does not run in the model's forward pass (in eval mode, as "
                                    "vecsim runs it); choose another (`vecsim layers MODEL` lists the hookable ones)")
    order = [n for n, _ in module.named_modules() if n and (wanted is None or n in wanted)]
    listed = []
    for n in order:
        listed += [seen[e] for e in (wanted[n] if wanted is not None else entries.get(n, [])) if e in seen]
    return listed
