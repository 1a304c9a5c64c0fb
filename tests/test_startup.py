"""What a `vecsim index` process imports before its first image: torchvision without
torch._dynamo (vecsim.models.tvimport), and a shape probe that does not import it either."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap

import pytest
import torch

from vecsim.models import layer_shapes, load_model


def run_python(code: str, tmp_path=None) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@contextlib.contextmanager
def dynamo_unimported():
    """As in a process that has not imported torch._dynamo (this one has: the meta copy is then
    the probe), for layer_shapes' choice only."""
    saved = sys.modules.pop("torch._dynamo")
    try:
        yield
    finally:
        sys.modules["torch._dynamo"] = saved


def probed(net, size, layers=None):
    """layer_shapes' answer, and the devices the probe's module outputs were on ('cpu' for the
    real forward, 'meta' for the copy), seen by a global hook the probe does not set aside."""
    devices = set()

    def seen(_module, _inputs, out):
        if isinstance(out, torch.Tensor):
            devices.add(out.device.type)

    handle = torch.nn.modules.module.register_module_forward_hook(seen)
    try:
        return layer_shapes(net, size, layers), devices
    finally:
        handle.remove()


def test_an_index_run_never_imports_torch_dynamo_and_roi_align_still_works(tmp_path):
    """A whole `vecsim index` (torchvision model, CPU) leaves torch._dynamo unimported; after it
    torchvision's roi_align (which holds the deferred function) gives what torchvision's op
    gives, the deferred function answers what the real one does, and torch._dynamo.utils is
    the real module."""
    out = run_python(f"""
        import sys
        import numpy as np
        from PIL import Image
        from pathlib import Path
        root = Path({str(tmp_path)!r}) / "images"
        root.mkdir()
        rng = np.random.default_rng(0)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"{{i}}.png")
        from vecsim.pipeline import index_stimuli
        index_stimuli(source=root, model="resnet18", weights="none", size=32, layers=["layer1", "layer3"],
                      out=root.parent / "store", progress=False)
        print("after index:", "torch._dynamo" in sys.modules, "sympy" in sys.modules)
        assert not any(type(m).__name__ == "_StandIn" for m in list(sys.modules.values()))

        import torch, torchvision
        from torchvision.ops import roi_align
        x = torch.randn(1, 2, 8, 8)
        boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]])
        got = roi_align(x, boxes, output_size=2)
        ref = torch.ops.torchvision.roi_align(x, boxes, 1.0, 2, 2, -1, False)
        print("roi_align equal:", bool(torch.equal(got, ref)))
        import torch._dynamo.utils as real
        from vecsim.models import tvimport
        print("stand-in forwards to the real function:", tvimport.is_compile_supported("cpu") == real.is_compile_supported("cpu"))
        print("real module:", type(real).__name__ == "module" and hasattr(real, "counters"))
        """, tmp_path)
    assert "after index: False False" in out
    assert "roi_align equal: True" in out
    assert "stand-in forwards to the real function: True" in out
    assert "real module: True" in out


def test_anything_else_asked_of_the_deferred_module_is_the_real_thing(tmp_path):
    """Inside the window, another name imported from torch._dynamo.utils is the real object,
    and a package import of torch._dynamo binds its real utils module, not the stand-in."""
    (tmp_path / "needs_counters.py").write_text("from torch._dynamo.utils import counters\n")
    (tmp_path / "needs_package.py").write_text("import torch._dynamo\nutils = torch._dynamo.utils\n")
    out = run_python(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        from vecsim.models.tvimport import dynamo_deferred
        with dynamo_deferred():
            import needs_counters
        import torch._dynamo.utils
        print("counters real:", needs_counters.counters is torch._dynamo.utils.counters)
        """)
    assert "counters real: True" in out
    out = run_python(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        import importlib.abc
        from vecsim.models.tvimport import dynamo_deferred
        seen = []

        class Watch(importlib.abc.MetaPathFinder):  # consulted after vecsim's finder
            def find_spec(self, name, path=None, target=None):
                if name == "torch._dynamo":
                    seen.append(type(sys.modules.get("torch._dynamo.utils")).__name__)

        with dynamo_deferred():
            sys.meta_path.insert(1, Watch())
            import needs_package
        import torch._dynamo.utils
        print("package's utils real:", needs_package.utils is sys.modules["torch._dynamo.utils"],
              type(needs_package.utils).__name__)
        print("when the package was looked up, torch._dynamo.utils was:", seen)
        """)
    assert "package's utils real: True module" in out
    assert "when the package was looked up, torch._dynamo.utils was: ['NoneType']" in out


def test_the_cpu_probe_gives_the_meta_copys_shapes_and_leaves_the_model_as_it_was():
    """In eval mode on a CPU the shapes come from one real forward of the probe batch; they equal
    the meta copy's (forced here by importing torch._dynamo, which makes the copy the cheaper
    probe), the model's own hooks do not fire and stay registered; a model in train mode is
    probed on the copy, so its batch-norm statistics do not move."""
    import torch._dynamo  # noqa: F401  (the meta copy is then the probe)

    loaded = load_model("densenet121", weights="none")
    net = loaded.module
    layers = ["features.transition1.norm", "features.denseblock2", "features.transition3.pool", "classifier"]
    meta, on = probed(net, 96, layers)
    assert on == {"meta"}
    fired = []
    handle = net.features.transition1.register_forward_hook(lambda *a: fired.append(1))
    pre = net.features.conv0.register_forward_pre_hook(lambda *a: fired.append(2))
    with dynamo_unimported():
        real, on = probed(net, 96, layers)
    assert on == {"cpu"}
    assert [(i.name, i.shape, i.calls, i.order) for i in real] == [(i.name, i.shape, i.calls, i.order) for i in meta]
    assert fired == []
    net(torch.zeros(1, 3, 32, 32))
    assert fired == [2, 1]
    handle.remove()
    pre.remove()

    net.train()
    before = net.features.norm0.running_mean.clone()
    with dynamo_unimported():
        _, on = probed(net, 32, ["features.norm0"])
    assert on == {"meta"}
    assert torch.equal(net.features.norm0.running_mean, before)


@pytest.mark.parametrize("name", ["resnet18", "vit_b_16"])
def test_the_cpu_probe_and_the_meta_copy_agree_on_other_models(name):
    import torch._dynamo  # noqa: F401

    net = load_model(name, weights="none").module
    size = 224 if name.startswith("vit") else 64
    meta, on_meta = probed(net, size)
    with dynamo_unimported():
        real, on_real = probed(net, size)
    assert (on_meta, on_real) == ({"meta"}, {"cpu"})
    assert [(i.name, i.shape, i.calls, i.batch_dim, i.select) for i in real] == \
           [(i.name, i.shape, i.calls, i.batch_dim, i.select) for i in meta]
