"""Unstructured magnitude pruning of a torch model's weights, applied in place.

Magnitude pruning as in Han, Pool, Tran & Dally 2015 ("Learning both Weights and
Connections for Efficient Neural Networks", NeurIPS); the global variant ranks all
included weights together (Frankle & Carbin 2019, "The Lottery Ticket Hypothesis",
ICLR, global pruning for deep nets; Blalock et al. 2020, "What is the State of
Neural Network Pruning?").  Unlike ``torch.nn.utils.prune`` nothing is
reparametrised: the chosen weights are simply set to zero.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from vecsim.errors import ConfigError

SCOPES: tuple[str, ...] = ("global", "layerwise")
DEFAULT_INCLUDE: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def check_prune_args(amount: float, scope: str) -> float:
    """The amount as a float after checking it and the scope (ConfigError otherwise)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise ConfigError(f"prune amount must be a number in [0, 1), the fraction of weights to zero; got {amount!r}")
    value = float(amount)
    if not (0.0 <= value < 1.0):  # also rejects nan
        raise ConfigError(f"prune amount must be in [0, 1), the fraction of weights to zero; got {amount!r}")
    if scope not in SCOPES:
        raise ConfigError(f"unknown prune scope {scope!r}; choose one of {', '.join(SCOPES)}")
    return value


def _make_permanent(module: nn.Module) -> None:
    # A module already under torch.nn.utils.prune holds weight_orig + weight_mask
    # and recomputes .weight on every forward; writing zeros into .weight would be lost.
    if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
        torch_prune.remove(module, "weight")


def prunable_weights(
    model: nn.Module, include: tuple[type[nn.Module], ...] = DEFAULT_INCLUDE
) -> dict[str, torch.Tensor]:
    """The ``weight`` tensors of every module that is an instance of ``include``, by module name.

    A weight shared by several modules is listed once, under its first name.
    Biases are never included.  For a module under ``torch.nn.utils.prune`` this is
    the masked weight it computes (not a Parameter); :func:`prune_model` makes
    such modules permanent first.
    """
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, include):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ConfigError(
                f"layer {name or '<root>'} has uninitialised (lazy) weights; "
                "run one forward pass first"
            )
        seen.add(id(weight))
        found[name or "<root>"] = weight
    return found


def _smallest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of exactly ``count`` entries of the 1-D ``scores`` with the smallest values.

    Everything strictly below the count-th smallest value is taken, then ties at
    that value are taken in flat-index order, so the count is exact and the choice
    deterministic (torch.topk's tie order is not specified).
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if count <= 0:
        return mask
    threshold = torch.kthvalue(scores, count).values
    mask = scores < threshold
    missing = count - int(mask.sum())
    ties = torch.nonzero(scores == threshold, as_tuple=False).flatten()
    mask[ties[:missing]] = True
    return mask


def _scores(weights: list[torch.Tensor]) -> torch.Tensor:
    # One common exact dtype on CPU so |w| from fp16/bf16/fp32/fp64 layers compare correctly.
    dtype = torch.float32
    for w in weights:
        dtype = torch.promote_types(dtype, w.dtype)
    return torch.cat([w.detach().abs().flatten().to("cpu", dtype) for w in weights])


def _apply(weight: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.no_grad():
        weight.masked_fill_(mask.view(weight.shape).to(weight.device), 0)


def _report(weights: dict[str, torch.Tensor], amount: float, scope: str, pruned: int) -> dict:
    layers = {}
    total = zeros = 0
    for name, w in weights.items():
        n, z = w.numel(), int((w.detach() == 0).sum())
        layers[name] = {"numel": n, "zeros": z, "sparsity": z / n if n else 0.0}
        total, zeros = total + n, zeros + z
    return {
        "amount": amount,
        "scope": scope,
        "pruned": pruned,
        "total": total,
        "zeros": zeros,
        "sparsity": zeros / total if total else 0.0,
        "layers": layers,
    }


def prune_model(
    model: nn.Module,
    amount: float,
    scope: str = "global",
    include: tuple[type[nn.Module], ...] = DEFAULT_INCLUDE,
) -> dict:
    """Zero the ``round(amount · N)`` smallest-magnitude weights in place; report sparsity.

    ``round`` is Python's (halves to even).

    ``scope="global"``: one ranking of |w| over all N included weights (so layers
    end up with different sparsities); ``scope="layerwise"``: each layer prunes
    ``round(amount · N_layer)`` of its own weights.  Only ``weight`` parameters of
    modules that are instances of ``include`` are touched (no biases, no norm
    layers).  Exactly that many weights are selected: ties at the threshold are
    broken by position, first come first pruned.  Weights that are already zero
    rank lowest and count towards the total, so a model with more zeros than
    requested keeps them all.  ``amount=0`` writes nothing (bit-identical model).
    Modules pruned earlier with ``torch.nn.utils.prune`` are first made permanent.
    NaN weights give undefined rankings.

    Returns ``{"amount", "scope", "pruned" (weights selected), "total", "zeros",
    "sparsity" (zeros/total after pruning), "layers": {name: {"numel", "zeros",
    "sparsity"}}}``.  Raises :class:`ConfigError` for amount outside [0, 1), an
    unknown scope or a model without any included layer.
    """
    amount = check_prune_args(amount, scope)
    include = tuple(include)
    for module in model.modules():
        if isinstance(module, include):
            _make_permanent(module)
    weights = prunable_weights(model, include)
    if not weights:
        kinds = ", ".join(t.__name__ for t in include)
        raise ConfigError(f"model has no layer of the included types ({kinds}) to prune")
    params = list(weights.values())
    if amount == 0.0:
        return _report(weights, amount, scope, 0)
    if scope == "global":
        scores = _scores(params)
        count = round(amount * scores.numel())
        if count >= scores.numel():
            raise ConfigError(f"amount {amount!r} rounds to all {scores.numel():,} weights (round(amount · N)), which "
                              f"leaves a constant model; use an amount below {1 - 0.5 / scores.numel():.10g}")
        mask = _smallest_mask(scores, count)
        offset = 0
        for w in params:
            _apply(w, mask[offset : offset + w.numel()])
            offset += w.numel()
        return _report(weights, amount, scope, count)
    everything = [name for name, w in weights.items() if w.numel() and round(amount * w.numel()) >= w.numel()]
    if everything:
        raise ConfigError(f"amount {amount!r} rounds to every weight of {', '.join(everything[:5])}"
                          f"{', …' if len(everything) > 5 else ''} (round(amount · N) per layer), which would "
                          "silence it; use a smaller amount")
    pruned = 0
    for w in params:
        count = round(amount * w.numel())
        _apply(w, _smallest_mask(_scores([w]), count))
        pruned += count
    return _report(weights, amount, scope, pruned)


def weight_sparsity(
    model: nn.Module, include: tuple[type[nn.Module], ...] = DEFAULT_INCLUDE
) -> dict:
    """Current fraction of exactly-zero weights, overall and per included layer.

    Same layout as :func:`prune_model`'s report, without amount/scope/pruned.
    """
    weights = prunable_weights(model, tuple(include))
    report = _report(weights, 0.0, "none", 0)
    for key in ("amount", "scope", "pruned"):
        report.pop(key)
    return report

