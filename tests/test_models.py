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
