"""A model whose weights are loaded is built without the random initialisation they replace
(vecsim.models.base.build_then_load), and the result is the same model: checked against the
source model, with the skipped initialisation observed, and with the cases where skipping
would leave memory uninitialised (which must be built again with their initialisation)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

from vecsim.errors import CheckpointError
from vecsim.models import load_model
from vecsim.models import base


@pytest.fixture
def init_calls(monkeypatch):
    """The calls that reach five of torch.nn.init's functions (spies put in before vecsim's skips)."""
    calls = []
    for name in ("kaiming_normal_", "normal_", "constant_", "kaiming_uniform_", "uniform_"):
        real = getattr(nn.init, name)

        def spy(tensor, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(nn.init, name, spy)
    return calls


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name,classes", [("resnet18", 10), ("densenet121", 1000), ("vgg11", 3), ("vit_b_16", 5),
                                          ("mnasnet0_5", 1000)])
def test_a_torchvision_checkpoint_is_the_source_model_built_without_its_random_init(tmp_path, init_calls, name,
                                                                                    classes):
    import torchvision

    source = torchvision.models.get_model(name, weights=None, num_classes=classes).eval()
    torch.save(source.state_dict(), tmp_path / "m.pt")
    init_calls.clear()
    loaded = load_model(name, checkpoint=tmp_path / "m.pt")
    assert init_calls == []  # every initialisation was skipped (the spies sit behind the skips)
    assert loaded.num_classes == classes
    _same_state(source, loaded.module)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), source(x))
    init_calls.clear()
    torchvision.models.resnet18(weights=None)  # outside a build for loading, torch.nn.init is itself again
    assert init_calls


def test_pretrained_torchvision_weights_are_loaded_over_a_model_built_without_its_random_init(monkeypatch,
                                                                                            init_calls):
    """The pretrained path (torchvision's builder loads the enum's state dict); no download:
    the enum's state dict is that of a seeded model."""
    import torchvision
    from torchvision.models import ResNet18_Weights

    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None).eval()
    state = source.state_dict()
    monkeypatch.setattr(ResNet18_Weights, "get_state_dict", lambda self, *a, **k: state)
    init_calls.clear()
    loaded = load_model("resnet18", weights="IMAGENET1K_V1")
    assert init_calls == [] and loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
    _same_state(source, loaded.module)


class _Tail(nn.Module):
    """A Linear layer plus what no state dict carries, filled by torch.nn.init."""

    def __init__(self, kind: str):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        if kind == "non-persistent buffer":
            self.register_buffer("table", nn.init.constant_(torch.empty(64), 3.0), persistent=False)
        elif kind == "attribute":
            self.table = nn.init.constant_(torch.empty(64), 3.0)
        elif kind == "temporary":
            nn.init.constant_(torch.empty(64), 3.0)
            self.table = torch.full((64,), 3.0)


@pytest.mark.parametrize("kind,builds", [("non-persistent buffer", 2), ("attribute", 2), ("temporary", 1)])
def test_what_the_load_does_not_overwrite_is_built_again_with_its_initialisation(kind, builds):
    source = _Tail(kind)
    state = source.state_dict()
    count = []

    def build():
        count.append(1)
        return _Tail(kind)

    module = base.build_then_load(build, lambda m: base.load_state(m, state, "t.pt"))
    assert len(count) == builds
    assert torch.equal(module.table, torch.full((64,), 3.0))
    _same_state(source, module)


def test_only_the_building_thread_skips_initialisation():
    inside, release = threading.Event(), threading.Event()
    other = {}

    def build():
        inside.set()
        release.wait(10)
        return nn.Linear(4, 3)

    def elsewhere():
        inside.wait(10)
        other["tensor"] = nn.init.constant_(torch.zeros(8), 2.0)  # while the build is skipping
        release.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    state = nn.Linear(4, 3).state_dict()
    module = base.build_then_load(build, lambda m: base.load_state(m, state, "t.pt"))
    thread.join()
    assert torch.equal(other["tensor"], torch.full((8,), 2.0))
    assert torch.equal(module.weight, state["weight"])
    from torch.nn.modules import activation

    # removed once no build is skipping, also where torch bound them by name
    assert not hasattr(nn.init.constant_, "__wrapped__") and not hasattr(activation.xavier_uniform_, "__wrapped__")


def test_a_checkpoint_keeps_its_modules_versions_and_a_module_s_own_refusal_is_one_line(tmp_path):
    """MNASNet's loading reads the state dict's per-module versions (its _metadata), also
    through DataParallel's ``module.`` prefix; a state dict without them is refused by
    MNASNet itself, which vecsim reports as a CheckpointError, not a traceback."""
    import torchvision

    source = torchvision.models.mnasnet0_5(weights=None).eval()
    torch.save(nn.DataParallel(source).state_dict(), tmp_path / "dp.pt")
    _same_state(source, load_model("mnasnet0_5", checkpoint=tmp_path / "dp.pt").module)
    torch.save(dict(source.state_dict()), tmp_path / "plain.pt")  # a plain dict: no versions
    with pytest.raises(CheckpointError, match=r"does not fit MNASNet: version should be set to 1 or 2"):
        load_model("mnasnet0_5", checkpoint=tmp_path / "plain.pt")


def test_a_checkpoint_with_the_architectures_own_class_count_is_built_once(tmp_path, monkeypatch):
    import torchvision

    from vecsim.models import torchvision_zoo

    real, builds = torchvision_zoo._builder, []

    def counting(name):
        builder = real(name)
        return lambda **kw: builds.append(kw.get("num_classes")) or builder(**kw)

    monkeypatch.setattr(torchvision_zoo, "_builder", counting)
    for classes, expected in ((1000, [None]), (7, [None, 7])):  # a fine-tuned head: built again with its size
        torch.save(torchvision.models.resnet18(weights=None, num_classes=classes).state_dict(), tmp_path / "r.pt")
        builds.clear()
        assert load_model("resnet18", checkpoint=tmp_path / "r.pt").num_classes == classes
        assert builds == expected


@pytest.mark.parametrize("arch,classes,builds", [("resnet18", 1000, 1), ("vit_tiny_patch16_224", 7, 2)])
def test_a_timm_checkpoint_is_the_source_model_built_without_what_torch_nn_init_would_do(tmp_path, monkeypatch,
                                                                                        init_calls, arch, classes,
                                                                                        builds):
    timm = pytest.importorskip("timm")
    source = timm.create_model(arch, pretrained=False, num_classes=classes).eval()
    torch.save(source.state_dict(), tmp_path / "m.pt")
    real, made = timm.create_model, []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: made.append(k.get("num_classes")) or real(*a, **k))
    init_calls.clear()
    loaded = load_model(f"timm:{arch}", checkpoint=tmp_path / "m.pt")
    assert init_calls == [] and len(made) == builds  # a head of the architecture's own size: one build
    assert loaded.num_classes == classes
    _same_state(source, loaded.module)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), source(x))
