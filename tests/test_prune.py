"""Tests for vecsim.prune: exact-count magnitude pruning, applied permanently."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from vecsim.errors import ConfigError
from vecsim.prune import prunable_weights, prune_model, weight_sparsity


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def _state_bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.73, 0.999])
def test_global_prune_hits_exact_count(amount: float) -> None:
    model = _model()
    total = sum(w.numel() for w in prunable_weights(model).values())
    report = prune_model(model, amount, scope="global")
    assert report["total"] == total
    assert report["zeros"] == report["pruned"] == round(amount * total)
    assert abs(report["sparsity"] - amount) <= 1.0 / total


def test_global_prune_removes_the_smallest_magnitudes() -> None:
    model = _model(1)
    before = torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])
    prune_model(model, 0.4, scope="global")
    after = torch.cat([w.detach().flatten() for w in prunable_weights(model).values()])
    pruned, kept = before[after == 0], before[after != 0]
    assert pruned.max() <= kept.min()


@pytest.mark.parametrize("amount", [0.2, 0.5, 0.9])
def test_layerwise_prune_hits_exact_count_per_layer(amount: float) -> None:
    model = _model(2)
    report = prune_model(model, amount, scope="layerwise")
    for name, w in prunable_weights(model).items():
        layer = report["layers"][name]
        assert layer["zeros"] == int((w == 0).sum()) == round(amount * w.numel())
        assert abs(layer["sparsity"] - amount) <= 1.0 / w.numel()
    assert set(report["layers"]) == {"0", "3", "5"}  # BatchNorm is not included


def test_ties_do_not_overshoot_and_are_deterministic() -> None:
    lin = nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        lin.weight.fill_(0.5)
    report = prune_model(nn.Sequential(lin), 0.35)
    assert report["zeros"] == 35
    flat = lin.weight.detach().flatten()
    assert torch.all(flat[:35] == 0) and torch.all(flat[35:] == 0.5)  # ties go in flat order


def test_amount_zero_leaves_model_bit_identical() -> None:
    model = _model(3)
    before = _state_bytes(model)
    for scope in ("global", "layerwise"):
        report = prune_model(model, 0.0, scope=scope)
        assert report["pruned"] == 0 and report["sparsity"] == 0.0
    assert _state_bytes(model) == before


@pytest.mark.parametrize("amount", [1.0, 1.5, -0.1, float("nan"), "0.5", True])
def test_bad_amount_raises(amount: object) -> None:
    with pytest.raises(ConfigError):
        prune_model(_model(), amount)  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        prune_model(_model(), amount)  # type: ignore[arg-type]


def test_bad_scope_and_empty_selection_raise() -> None:
    with pytest.raises(ConfigError):
        prune_model(_model(), 0.5, scope="per-channel")
    with pytest.raises(ConfigError):
        prune_model(nn.Sequential(nn.ReLU()), 0.5)


def test_pruning_is_permanent_and_leaves_biases() -> None:
    model = _model(4)
    names = [n for n, _ in model.named_parameters()]
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    prune_model(model, 0.6)
    assert [n for n, _ in model.named_parameters()] == names
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    assert all(not m._forward_pre_hooks for m in model.modules())
    for n, p in model.named_parameters():
        if n in biases:
            assert torch.equal(p, biases[n])
    model(torch.randn(2, 3, 8, 8))  # still runs


def test_previous_torch_prune_is_made_permanent() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    torch_prune.l1_unstructured(model[0], "weight", amount=0.25)
    assert weight_sparsity(model)["zeros"] == 16
    report = prune_model(model, 0.5)
    assert report["zeros"] == 32
    assert isinstance(model[0].weight, nn.Parameter)
    assert not hasattr(model[0], "weight_mask")


def test_shared_weight_counted_once() -> None:
    lin = nn.Linear(4, 4, bias=False)
    other = nn.Linear(4, 4, bias=False)
    other.weight = lin.weight
    report = prune_model(nn.Sequential(lin, other), 0.5)
    assert report["total"] == 16 and report["zeros"] == 8


@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_an_amount_that_rounds_to_every_weight_is_refused(scope: str) -> None:
    """Below 1 but rounding to all N weights (globally, or all of one layer) would leave a
    constant model or a silenced layer: refused, nothing changed."""
    model = nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 1000))  # 40 and 4,000 weights
    before = [p.detach().clone() for p in model.parameters()]
    amount = 1 - 0.4 / 4040 if scope == "global" else 0.99  # round(0.99 · 40) = 40
    with pytest.raises(ConfigError, match="rounds to"):
        prune_model(model, amount, scope)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    prune_model(model, 0.9, scope)  # an amount that leaves weights is fine


def test_an_unwritable_output_is_one_clear_error(tmp_path) -> None:
    from vecsim.compare import prune_checkpoint

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"output folder .*file/sub does not exist or is not a folder"):
        prune_checkpoint("digits-cnn", blocker / "sub" / "p.pt", 0.5)
    (tmp_path / "p.pt.tmp").mkdir()  # where the checkpoint is written before its rename
    with pytest.raises(ConfigError, match=r"cannot write the pruned state dict to .*p\.pt"):
        prune_checkpoint("digits-cnn", tmp_path / "p.pt", 0.5)
    assert not (tmp_path / "p.pt").exists()
