from __future__ import annotations

import pytest
import torch
from torch import nn

from vecsim.extract import LayerCapture
from vecsim.models import load_model


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_hooks_are_removed_even_when_the_forward_pass_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(RuntimeError):
        with LayerCapture(model, ["0", "1"]) as capture:
            assert _hook_count(model) == 2
            capture.run(torch.zeros(2, 5))  # wrong width: the forward pass raises
    assert _hook_count(model) == 0


def test_transition_norm_yields_its_own_output_not_the_inplace_relu_result():
    """DenseNet's transition is norm -> ReLU(inplace=True): a kept reference would be post-ReLU."""
    model = load_model("densenet121", weights="none").module
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    layer = "features.transition1.norm"
    # the naive way: keep a reference to the output
    kept = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: kept.setdefault("o", o))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert (kept["o"] >= 0).all(), "the in-place ReLU rewrote the kept tensor"
    # what the norm really produced: run it on its input
    norm_input = {}
    handle = dict(model.named_modules())[layer].register_forward_pre_hook(lambda m, i: norm_input.setdefault("i", i[0].clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    with torch.no_grad():
        expected = dict(model.named_modules())[layer](norm_input["i"]).flatten(1)
    with LayerCapture(model, [layer]) as capture:
        got = capture.run(x)[layer]
    assert (got < 0).any()
    torch.testing.assert_close(got, expected)
    assert _hook_count(model) == 0


def test_forward_stops_after_the_deepest_hooked_layer_with_the_same_results():
    model = load_model("resnet18", weights="none").module
    x = torch.randn(2, 3, 64, 64)
    calls = []
    handle = model.fc.register_forward_hook(lambda m, i, o: calls.append(1))
    with LayerCapture(model, ["layer1", "layer2.0.relu"], stop_early=False) as full:
        expected = full.run(x)
    assert len(calls) == 1
    with LayerCapture(model, ["layer1", "layer2.0.relu"]) as capture:
        first = capture.run(x)   # counts the calls (layer2.0.relu runs twice per pass)
        second = capture.run(x)
    handle.remove()
    assert len(calls) == 2  # only the counting pass reached the head
    for layer in expected:
        torch.testing.assert_close(first[layer], expected[layer])
        torch.testing.assert_close(second[layer], expected[layer])


class _Reuse(nn.Module):
    """One ReLU module called three times per pass, on outputs of different widths (like a
    torchvision Bottleneck's relu)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu = nn.Linear(4, 3), nn.Linear(3, 5), nn.ReLU()

    def forward(self, x):
        return self.relu(self.b(self.relu(self.relu(self.a(x)))))


@pytest.mark.parametrize("given", [True, False])
def test_a_module_called_several_times_is_captured_at_its_last_call_only(given):
    from vecsim.models import layer_shapes

    model = _Reuse()
    x = torch.randn(6, 4)
    info = {i.name: i for i in layer_shapes(model, 0, ["relu"], input_shape=(4,))}["relu"]
    assert (info.calls, info.shape) == (3, (5,))
    seen = []

    def function(output):  # must never see the earlier, 3-wide calls
        seen.append(tuple(output.shape))
        return output.clone()

    with LayerCapture(model, ["relu"], {"relu": function}, calls={"relu": 3} if given else None) as capture:
        for _ in range(2):
            got = capture.run(x)["relu"]
    assert seen == [(6, 5), (6, 5)]
    with torch.no_grad():
        torch.testing.assert_close(got, model(x))


def test_a_low_precision_model_is_probed_in_its_own_dtype():
    """Counting a module's calls runs the model once on zeros: in the model's dtype, or a
    bfloat16 model whose convolutions have biases would reject float32 input."""
    model = load_model("digits-cnn", weights="none").module.to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    with LayerCapture(model, ["features.relu4"]) as capture:
        got = capture.run(x)["features.relu4"]
    assert got.shape == (2, 64 * 8 * 8)


def test_fit_accepts_a_sample_made_under_inference_mode():
    from vecsim.reduce import LayerReducer, ReducerConfig

    with torch.inference_mode():
        sample = torch.randn(20, 12)
    before = sample.clone()
    reducer = LayerReducer("l", (12,), ReducerConfig(sketch_dim=0, dim=4))
    report = reducer.fit(sample)
    assert report.dim == 4 and torch.equal(sample, before)


def test_a_cuda_device_number_beyond_the_gpus_is_a_device_error(monkeypatch):
    from vecsim.errors import DeviceError
    from vecsim.extract import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == "cuda:0"
    for bad in ("cuda:1", "cuda:x"):
        with pytest.raises(DeviceError, match="numbered cuda:0 to cuda:0"):
            resolve_device(bad)


def _decode_items(tmp_path):
    from conftest import make_image_set

    root = make_image_set(tmp_path / "set", per_class=10)  # 30 images
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return root, list(enumerate(paths))


def test_decoding_starts_when_the_loader_is_made_and_the_first_batch_can_be_small(tmp_path, monkeypatch):
    import threading
    import time

    from vecsim import extract
    from vecsim.models.base import Preprocessing

    root, items = _decode_items(tmp_path)
    decoded, lock = [], threading.Lock()
    real = extract._DecodeDataset.__getitem__

    def counting(self, i):
        with lock:
            decoded.append(i)
        return real(self, i)

    monkeypatch.setattr(extract._DecodeDataset, "__getitem__", counting)
    loader = extract.iter_decoded(root, items, Preprocessing(32, 32), batch_size=8, workers=2,
                                  boundaries=(20,), first_batch=3)
    deadline = time.monotonic() + 10
    while len(decoded) < 3 and time.monotonic() < deadline:  # before any next(): the pool is already at work
        time.sleep(0.01)
    assert len(decoded) >= 3
    sizes = [len(batch.ids) for batch in loader]
    assert sizes == [3, 8, 8, 1, 8, 2]  # the first batch small, none straddling position 20
    assert sorted(decoded) == list(range(30))  # each image decoded once


def test_a_closed_loader_cancels_what_it_had_queued(tmp_path, monkeypatch):
    import time

    from vecsim import extract
    from vecsim.models.base import Preprocessing

    root, items = _decode_items(tmp_path)
    decoded = []
    real = extract._DecodeDataset.__getitem__

    def slow(self, i):
        time.sleep(0.05)
        decoded.append(i)
        return real(self, i)

    monkeypatch.setattr(extract._DecodeDataset, "__getitem__", slow)
    loader = extract.iter_decoded(root, items, Preprocessing(32, 32), batch_size=4, workers=1)
    assert len(next(loader).ids) == 4  # three batches of 4 were queued by then
    loader.close()
    time.sleep(0.8)  # long enough for the 8 other queued images, had they not been cancelled
    assert len(decoded) <= 5  # the first batch and at most the one image being decoded at close
    assert loader.pool._shutdown
