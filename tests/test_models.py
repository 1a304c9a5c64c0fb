from __future__ import annotations

import pytest
import torch

from vecsim.errors import CheckpointError, UnknownLayerError, UnknownModelError, UnknownWeightsError
from vecsim.models import check_layers, layer_shapes, load_model


def test_torchvision_model_without_weights_and_its_preprocessing():
    loaded = load_model("resnet18", weights="none")
    assert not loaded.module.training
    assert (loaded.preprocessing.resize, loaded.preprocessing.crop) == (256, 224)
    sized = load_model("resnet18", weights="none", size=96, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert (sized.preprocessing.resize, sized.preprocessing.crop) == (96, 96)
    assert sized.preprocessing.mean == (0.5, 0.5, 0.5) and sized.preprocessing.std == (0.2, 0.2, 0.2)


def test_weight_enums_resolve_and_give_their_transforms(monkeypatch):
    import torchvision

    seen = {}

    def fake_builder(weights=None, **kw):  # no download here: the enum and its transforms are real
        seen["weights"] = weights
        return torchvision.models.resnet18(weights=None)

    monkeypatch.setattr("torchvision.models.get_model_builder", lambda name: fake_builder)
    loaded = load_model("resnet18", weights="IMAGENET1K_V1")
    assert str(seen["weights"]) == "ResNet18_Weights.IMAGENET1K_V1"
    assert (loaded.preprocessing.resize, loaded.preprocessing.crop) == (256, 224)
    assert loaded.weights == "ResNet18_Weights.IMAGENET1K_V1"
    load_model("resnet18", weights="ResNet18_Weights.DEFAULT")
    assert str(seen["weights"]) == "ResNet18_Weights.IMAGENET1K_V1"


def test_unknown_model_and_weights_name_the_choices():
    with pytest.raises(UnknownModelError, match="resnet18"):
        load_model("resnet19", weights="none")
    with pytest.raises(UnknownWeightsError, match="IMAGENET1K_V1"):
        load_model("resnet18", weights="IMAGENET9K")


def test_checkpoint_with_a_fine_tuned_head_is_read_from_the_state_dict(tmp_path):
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=7)
    path = tmp_path / "ft.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = load_model("resnet18", checkpoint=path)
    assert loaded.num_classes == 7
    assert loaded.checkpoint_sha256 and len(loaded.checkpoint_sha256) == 64
    for (k, a), b in zip(model.state_dict().items(), loaded.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_is_loaded_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model("resnet18", checkpoint=path)
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(2)}, wrong)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model("resnet18", checkpoint=wrong)


def test_digits_cnn_checkpoint_round_trip(tmp_path):
    shipped = load_model("digits-cnn")
    path = tmp_path / "d.pt"
    torch.save(shipped.module.state_dict(), path)
    again = load_model("digits-cnn", checkpoint=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(shipped.module(x), again.module(x))


def test_layer_shapes_and_unknown_layer_close_matches():
    loaded = load_model("densenet121", weights="none")
    shapes = {i.name: i for i in layer_shapes(loaded.module, 400, ["features.transition1.norm"])}
    assert shapes["features.transition1.norm"].shape == (256, 100, 100)
    assert shapes["features.transition1.norm"].units == 2_560_000
    with pytest.raises(UnknownLayerError, match="features.transition1.norm"):
        check_layers(loaded.module, ["features.transition1.nrom"])


def test_layer_shapes_falls_back_to_a_real_forward_when_an_op_has_no_meta_kernel():
    import torch

    from vecsim.models import layer_shapes

    class NumpyInside(torch.nn.Module):  # .numpy() cannot run on the meta device
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * float(y.mean().cpu().numpy() * 0 + 1)

    infos = layer_shapes(NumpyInside(), 10)
    assert [(i.name, i.shape) for i in infos] == [("conv", (4, 8, 8))]


def test_checkpoint_forms_researchers_save(tmp_path):
    """A whole pickled model is refused with the fix; torch.nn.utils.prune's weight_orig /
    weight_mask pairs are folded into the pruned weights; a SqueezeNet (1x1-convolution head)
    and a googlenet fine-tuned from torchvision's pretrained build (no auxiliary heads) load
    with their class counts."""
    import torch.nn.utils.prune as prune
    import torchvision

    from vecsim import digits

    whole = tmp_path / "whole.pt"
    torch.save(digits.DigitsCNN(), whole)
    with pytest.raises(CheckpointError, match=r"pickled Python objects .*torch.save\(model.state_dict\(\), path\)"):
        load_model("digits-cnn", checkpoint=whole)
    for name, data in (("text.pt", b"not a checkpoint"), ("junk.pt", b"\x00\x01junk" * 10),
                       ("cut.pt", whole.read_bytes()[:300])):  # another file, noise, a truncated checkpoint
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="is not a readable torch checkpoint"):
            load_model("digits-cnn", checkpoint=tmp_path / name)

    pruned = load_model("digits-cnn").module
    prune.l1_unstructured(pruned.features.conv1, "weight", amount=0.5)
    assert "features.conv1.weight_orig" in pruned.state_dict()
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    again = load_model("digits-cnn", checkpoint=tmp_path / "pruned.pt").module
    assert torch.equal(again.features.conv1.weight, pruned.features.conv1.weight)
    assert (again.features.conv1.weight == 0).float().mean() >= 0.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), pruned(x))

    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=10).state_dict(), tmp_path / "sq.pt")
    assert load_model("squeezenet1_1", checkpoint=tmp_path / "sq.pt").num_classes == 10

    tuned = torchvision.models.googlenet(weights=None, aux_logits=False, transform_input=True, init_weights=False,
                                         num_classes=5)
    torch.save(tuned.state_dict(), tmp_path / "g.pt")
    loaded = load_model("googlenet", checkpoint=tmp_path / "g.pt")
    assert loaded.num_classes == 5 and loaded.module.transform_input and loaded.module.aux1 is None
    assert "transform_input=True" in loaded.notes[0]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # the same function as the fine-tuned model
        assert torch.equal(loaded.module(x), tuned.eval()(x))


def test_a_checkpoint_is_recorded_by_absolute_path_and_its_sha256_checked(tmp_path, monkeypatch):
    from vecsim import digits

    (tmp_path / "ck").mkdir()
    torch.save(digits.DigitsCNN().state_dict(), tmp_path / "ck" / "d.pt")
    monkeypatch.chdir(tmp_path)
    loaded = load_model("digits-cnn", checkpoint="ck/d.pt")
    assert loaded.checkpoint == str(tmp_path / "ck" / "d.pt")
    monkeypatch.chdir("/")
    again = load_model("digits-cnn", checkpoint=loaded.checkpoint, checkpoint_sha256=loaded.checkpoint_sha256)
    assert again.checkpoint_sha256 == loaded.checkpoint_sha256
    torch.save(digits.DigitsCNN(num_classes=10).state_dict() | {"classifier.bias": torch.ones(10)},
               tmp_path / "ck" / "d.pt")
    with pytest.raises(CheckpointError, match="changed since the store was built"):
        load_model("digits-cnn", checkpoint=loaded.checkpoint, checkpoint_sha256=loaded.checkpoint_sha256)


def test_weights_of_another_model_are_refused():
    from vecsim.models import _weights_enum

    with pytest.raises(UnknownWeightsError, match="not resnet18's"):
        _weights_enum("resnet18", "VGG11_Weights.IMAGENET1K_V1")
    with pytest.raises(UnknownWeightsError, match="not resnet34's"):
        _weights_enum("resnet34", "ResNet18_Weights.IMAGENET1K_V1")
    assert _weights_enum("resnet18", "ResNet18_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"


def test_layers_that_do_not_run_or_return_no_tensor_are_named():
    import torch.nn as nn

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Shapes(nn.Module):  # returns no tensor at all
        def forward(self, x):
            return {"shape": tuple(x.shape)}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.pair = Pair()
            self.shapes = Shapes()
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            self.shapes(x)
            return self.pair(self.conv(x))[0]

    net = Net().eval()
    infos = layer_shapes(net, 16, ["conv", "pair", "shapes", "unused"])
    assert [(i.name, i.select) for i in infos] == [("conv", ""), ("pair", "[0]")]  # a tuple: its first tensor
    with pytest.raises(UnknownLayerError, match="'shapes' returns dict with keys shape, with no tensor in it"):
        layer_shapes(net, 16, ["conv", "shapes"], strict=True)
    with pytest.raises(UnknownLayerError, match="'unused' does not run in the model's forward pass"):
        layer_shapes(net, 16, ["unused"], strict=True)
