"""Model sources beyond torchvision: timm, OpenCLIP image towers, the researcher's own factory
and a module handed over in Python; layers of any output form; token poolings.

Every store is checked against raw activations taken by the test's own hook (dim >= the
number of stimuli, so the stored cosines must equal the raw ones)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vecsim
from vecsim.errors import (
    CheckpointError, ConfigError, MissingExtraError, UnknownLayerError, UnknownModelError, UnknownWeightsError,
    VecsimError,
)
from vecsim.models import layer_shapes, load_model
from vecsim.store import Store

from conftest import cosine_matrix

ROOT = Path(__file__).resolve().parent.parent


def _raw(loaded, root: Path, paths: list[str], module_name: str, pick=lambda out: out) -> np.ndarray:
    """``pick(output)`` of one module per stimulus, flattened, float64: a plain hook on the loaded model."""
    from vecsim.stimuli import decode_image

    grabbed = []
    module = dict(loaded.module.named_modules())[module_name]
    handle = module.register_forward_hook(lambda m, i, o: grabbed.append(pick(o).detach().clone()))
    try:
        with torch.no_grad():
            for rel in paths:
                loaded.module(loaded.preprocessing(decode_image(root / rel).image).unsqueeze(0))
    finally:
        handle.remove()
    return torch.cat([g.flatten(1) for g in grabbed]).double().numpy()


def _index(root, out, **options):
    return vecsim.index_stimuli(source=str(root), out=str(out), dim="32", batch_size=5, chunk_size=7,
                                progress=False, **options)


def _check_cosines(store_path, layer: str, raw: np.ndarray) -> None:
    _, vecs = Store.open(store_path).vectors(layer)
    np.testing.assert_allclose(vecs @ vecs.T, cosine_matrix(raw), atol=1e-4)


def _paths(store_path) -> list[str]:
    return Store.open(store_path).stimuli().column("path").to_pylist()


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vecsim", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


# -- timm ------------------------------------------------------------------------------------

def test_timm_preprocessing_comes_from_its_data_config():
    vit = load_model("timm:vit_tiny_patch16_224", "none")
    pre = vit.preprocessing  # crop_pct 0.9, bicubic, mean/std 0.5
    assert (pre.resize, pre.crop, pre.interpolation, pre.mean, pre.std) == (248, 224, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert (vit.prefix_tokens, vit.class_token, vit.source) == (1, True, "timm")
    cnn = load_model("timm:convnext_atto", "none", size=40, mean=(0.1, 0.2, 0.3))
    assert (cnn.preprocessing.resize, cnn.preprocessing.crop, cnn.preprocessing.mean) == (40, 40, (0.1, 0.2, 0.3))
    assert cnn.preprocessing.std == pytest.approx((0.229, 0.224, 0.225))
    again = load_model("timm:convnext_atto", "none")
    assert all(torch.equal(a, b) for a, b in zip(cnn.module.state_dict().values(), again.module.state_dict().values()))
    assert cnn.describe()["library_versions"]["timm"]


@pytest.mark.slow
def test_timm_cnn_end_to_end_with_a_checkpoint(shared_image_set, tmp_path):
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(3)
        trained = timm.create_model("convnext_atto", pretrained=False, num_classes=7)
    checkpoint = tmp_path / "atto.pt"
    torch.save(trained.state_dict(), checkpoint)
    out = tmp_path / "store"
    layers = ["stages.1", "stages.2.blocks.0.conv_dw"]
    _index(shared_image_set, out, model="timm:convnext_atto", checkpoint=str(checkpoint), size=40, layers=layers)
    store = Store.open(out)
    record = store.manifest["model"]
    assert (record["source"], record["num_classes"], record["size"]) == ("timm", 7, 40)
    assert len(record["checkpoint_sha256"]) == 64
    loaded = load_model("timm:convnext_atto", checkpoint=checkpoint, size=40)
    for (key, a), b in zip(trained.state_dict().items(), loaded.module.state_dict().values()):
        assert torch.equal(a, b), key
    for layer in layers:
        _check_cosines(out, layer, _raw(loaded, shared_image_set, _paths(out), layer))


@pytest.mark.slow
def test_timm_vit_end_to_end_with_token_poolings(shared_image_set, tmp_path):
    out = tmp_path / "vit"
    summary = _index(shared_image_set, out, model="timm:vit_tiny_patch16_224", weights="none", size=32,
                     layers=["blocks.1", "blocks.5", "blocks.11", "blocks.3.attn.qkv"],
                     pooling="blocks.5=cls,blocks.11=mean,tokens")
    assert summary.layers["blocks.5"]["units"] == 192 and summary.layers["blocks.1"]["units"] == 5 * 192
    loaded = load_model("timm:vit_tiny_patch16_224", "none", size=32)
    paths = _paths(out)
    _check_cosines(out, "blocks.1", _raw(loaded, shared_image_set, paths, "blocks.1"))
    _check_cosines(out, "blocks.3.attn.qkv", _raw(loaded, shared_image_set, paths, "blocks.3.attn.qkv"))
    # cls: the first token; mean: the patch tokens, after the class token
    _check_cosines(out, "blocks.5", _raw(loaded, shared_image_set, paths, "blocks.5", lambda o: o[:, 0]))
    _check_cosines(out, "blocks.11", _raw(loaded, shared_image_set, paths, "blocks.11", lambda o: o[:, 1:].mean(1)))
    config = Store.open(out).layer_info("blocks.11")["reducer"]["config"]
    assert (config["pooling"], config["prefix_tokens"], config["class_token"]) == ("mean", 1, True)


def test_layers_lists_a_vit_with_its_token_shapes():
    result = _cli("layers", "timm:vit_tiny_patch16_224", "--size", "32")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("timm:vit_tiny_patch16_224 at 32x32:") and "1 class/register token" in lines[0]
    rows = {line.split()[0]: line.split()[1:4] for line in lines[2:]}
    assert rows["patch_embed.proj"] == ["Conv2d", "192x2x2", "768"]
    assert rows["blocks.11"] == ["Block", "5x192", "960"]  # 4 patches + the class token


def test_prune_takes_a_timm_spec_and_its_checkpoint_loads_back(tmp_path):
    from vecsim.compare import prune_checkpoint

    report = prune_checkpoint("timm:convnext_atto", tmp_path / "pruned.pt", 0.5, weights="none")
    assert report["model"]["source"] == "timm" and report["sparsity"] >= 0.5
    pruned = load_model("timm:convnext_atto", checkpoint=tmp_path / "pruned.pt")
    weight = pruned.module.stages[1].blocks[0].conv_dw.weight
    assert 0 < float((weight == 0).float().mean()) < 1


# -- layers of any output form, token poolings on a model with register tokens -----------------------

FACTORY = '''
import torch
from torch import nn


class Pair(nn.Module):
    def forward(self, x):
        return x * 2, x.mean(dim=(2, 3))


class Parts(nn.Module):
    def forward(self, x):
        return {"sum": x.sum(dim=1), "max": x.amax(dim=1)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.pair = Pair()
        self.parts = Parts()
        self.attn = nn.MultiheadAttention(6, 2)  # sequence first: (tokens, batch, channels)

    def forward(self, x):
        y, pooled = self.pair(torch.relu(self.conv(x)))
        self.parts(y)
        seq = y.flatten(2).permute(2, 0, 1)
        out, _ = self.attn(seq, seq, seq)
        return out.mean(0) + pooled


def build():
    return Net(), {"size": 24, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def not_a_model():
    return "a string"
'''


@pytest.fixture
def factory_file(tmp_path) -> Path:
    path = tmp_path / "code" / "mynet.py"
    path.parent.mkdir()
    path.write_text(FACTORY)
    return path


def test_tuple_dict_and_sequence_first_outputs(shared_image_set, factory_file, tmp_path):
    spec = f"{factory_file}:build"
    loaded = load_model(spec)
    infos = {i.name: i for i in layer_shapes(loaded.module, 24)}
    assert (infos["pair"].select, infos["pair"].output, infos["pair"].shape) == ("[0]", "tuple of 2", (6, 11, 11))
    assert infos["pair[1]"].shape == (6,) and infos["parts[max]"].shape == (11, 11)
    assert (infos["attn"].batch_dim, infos["attn"].shape) == (1, (121, 6))  # read batch second
    out = tmp_path / "store"
    layers = ["pair", "pair[1]", "parts[max]", "attn"]
    summary = _index(shared_image_set, out, model=spec, layers=layers)
    assert (summary.layers["pair"]["select"], summary.layers["attn"]["batch_dim"]) == ("[0]", 1)
    paths = _paths(out)
    picks = {"pair": lambda o: o[0], "pair[1]": lambda o: o[1], "parts[max]": lambda o: o["max"],
             "attn": lambda o: o[0].transpose(0, 1)}
    for layer, pick in picks.items():
        _check_cosines(out, layer, _raw(loaded, shared_image_set, paths, layer.split("[")[0], pick))
    entry = Store.open(out).layer_info("pair")
    assert (entry["output"], entry["select"]) == ("tuple of 2", "[0]")


def test_bad_selectors_and_outputs_without_a_batch_are_refused(shared_image_set, factory_file, tmp_path):
    spec = f"{factory_file}:build"
    with pytest.raises(UnknownLayerError, match=r"'pair\[5\]': pair returns tuple of 2, which has no part \[5\]; "
                                                r"its parts: \[0\], \[1\]"):
        _index(shared_image_set, tmp_path / "a", model=spec, layers=["pair[5]"])
    with pytest.raises(UnknownLayerError, match=r"no part \[mean\]; its parts: \[sum\], \[max\]"):
        _index(shared_image_set, tmp_path / "b", model=spec, layers=["parts[mean]"])

    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.flatten()  # no batch dimension left

    from collections import namedtuple

    from vecsim.models.layers import select

    Out = namedtuple("Out", "hidden pooled")
    value = Out(torch.zeros(2, 3), torch.ones(2))
    assert select(value, ("pooled",), "m[pooled]") is value.pooled and select(value, (-2,), "m[-2]") is value.hidden
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), Flat())
    with pytest.raises(UnknownLayerError, match="neither its first nor its second dimension is the batch"):
        layer_shapes(net, 8, ["1"], strict=True)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


REGISTER_VIT = '''
from timm.models.vision_transformer import VisionTransformer


def build():
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, reg_tokens=3,
                            num_classes=0)
    return net, {"size": 32}
'''


def test_mean_leaves_out_class_and_register_tokens(shared_image_set, tmp_path):
    path = tmp_path / "regvit.py"
    path.write_text(REGISTER_VIT)
    spec = f"{path}:build"
    out = tmp_path / "store"
    _index(shared_image_set, out, model=spec, layers=["blocks.0", "blocks.1"], pooling="blocks.0=cls,mean")
    loaded = load_model(spec)
    assert (loaded.prefix_tokens, loaded.class_token) == (4, True)
    paths = _paths(out)
    _check_cosines(out, "blocks.0", _raw(loaded, shared_image_set, paths, "blocks.0", lambda o: o[:, 0]))
    _check_cosines(out, "blocks.1", _raw(loaded, shared_image_set, paths, "blocks.1", lambda o: o[:, 4:].mean(1)))
    hand = _raw(loaded, shared_image_set, paths[:2], "blocks.1")  # 16 patches + 4 prefix tokens, 24 channels
    assert hand.shape == (2, 20 * 24)


def test_token_poolings_refuse_what_they_cannot_mean(shared_image_set, factory_file, tmp_path):
    with pytest.raises(ConfigError, match="needs a \\(tokens, channels\\) output.*use avg, max or grid:K"):
        _index(shared_image_set, tmp_path / "a", model="digits-cnn", layers=["features.conv2"], pooling="mean")
    with pytest.raises(ConfigError, match="'cls' needs a model with a class token"):
        _index(shared_image_set, tmp_path / "b", model=f"{factory_file}:build", layers=["attn"], pooling="cls")
    with pytest.raises(ConfigError, match="patch_embed gives 4 tokens, the model's sequence has 5"):
        _index(shared_image_set, tmp_path / "c", model="timm:vit_tiny_patch16_224", weights="none", size=32,
               layers=["patch_embed"], pooling="mean")  # before the class token is prepended
    with pytest.raises(ConfigError, match="needs a \\(C, H, W\\) output, the layer gives \\(5, 192\\); for token "
                                          "outputs use tokens, cls or mean"):
        _index(shared_image_set, tmp_path / "e", model="timm:vit_tiny_patch16_224", weights="none", size=32,
               layers=["blocks.0"], pooling="avg")
    with pytest.raises(ConfigError, match="choose flatten, avg, max or grid:K .* tokens, cls or mean"):
        _index(shared_image_set, tmp_path / "d", model="digits-cnn", layers=["features.conv2"], pooling="first")


# -- OpenCLIP ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_open_clip_image_tower_end_to_end_and_its_checkpoint(shared_image_set, tmp_path):
    spec = "open_clip:ViT-S-32-alt"  # the smallest OpenCLIP ViT; at 64 px it has 2x2 patches
    out = tmp_path / "store"
    layers = ["transformer.resblocks.0.attn", "transformer.resblocks.1", "ln_post"]
    _index(shared_image_set, out, model=spec, weights="none", size=64, layers=layers,
           pooling="transformer.resblocks.1=mean")
    loaded = load_model(spec, "none", size=64)
    assert (loaded.prefix_tokens, loaded.class_token, loaded.preprocessing.interpolation) == (1, True, "bicubic")
    assert loaded.preprocessing.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    paths = _paths(out)
    _check_cosines(out, "transformer.resblocks.0.attn",
                   _raw(loaded, shared_image_set, paths, "transformer.resblocks.0.attn", lambda o: o[0]))
    _check_cosines(out, "transformer.resblocks.1",
                   _raw(loaded, shared_image_set, paths, "transformer.resblocks.1", lambda o: o[:, 1:].mean(1)))
    _check_cosines(out, "ln_post", _raw(loaded, shared_image_set, paths, "ln_post"))
    record = Store.open(out).manifest["model"]
    assert record["source"] == "open_clip" and record["library_versions"]["open_clip_torch"]
    # a checkpoint of the whole CLIP model: its visual.* entries load into the tower
    state = {f"visual.{k}": v * 0.5 for k, v in loaded.module.state_dict().items()}
    state["text_projection"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "clip.pt")
    again = load_model(spec, checkpoint=tmp_path / "clip.pt", size=64)
    for key, value in again.module.state_dict().items():
        assert torch.equal(value, state[f"visual.{key}"]), key
    with pytest.raises(UnknownWeightsError, match="open_clip:ViT-B-32 takes --weights TAG or none; its tags: openai"):
        load_model("open_clip:ViT-B-32")


# -- the researcher's own factory ----------------------------------------------------------------

@pytest.mark.slow
def test_factory_file_with_a_checkpoint_reloads_and_refuses_a_changed_file(shared_image_set, factory_file, tmp_path,
                                                                            monkeypatch):
    spec = f"{factory_file}:build"
    first = load_model(spec)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        trained = {k: torch.randn_like(v) for k, v in first.module.state_dict().items()}
    torch.save(trained, tmp_path / "trained.pt")
    out = tmp_path / "store"
    _index(shared_image_set, out, model=spec, checkpoint=str(tmp_path / "trained.pt"), layers=["conv", "pair[1]"])
    record = Store.open(out).manifest["model"]
    assert record["file"] == str(factory_file) and len(record["file_sha256"]) == 64 and record["source"] == "factory"
    loaded = load_model(spec, checkpoint=tmp_path / "trained.pt")
    assert loaded.preprocessing.crop == 24 and loaded.preprocessing.std == (0.25, 0.25, 0.25)
    paths = _paths(out)
    _check_cosines(out, "conv", _raw(loaded, shared_image_set, paths, "conv"))
    # query --image of a stimulus's own file gives the hits of --id (the model reloaded from the spec)
    by_image = _cli("query", str(out), "--image", str(shared_image_set / paths[4]), "--layer", "conv", "-k", "5",
                    "--json")
    by_id = _cli("query", str(out), "--id", "4", "--layer", "conv", "-k", "5", "--json")
    assert by_image.returncode == 0, by_image.stderr
    assert [h["id"] for h in json.loads(by_image.stdout)] == [h["id"] for h in json.loads(by_id.stdout)]
    # a new image goes through the reloaded model: its vector is the raw activation's cosine with the stored ones
    from PIL import Image

    new = tmp_path / "new.png"
    Image.open(shared_image_set / paths[4]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new)
    hits = Store.open(out).query(image=str(new), layer="conv", k=3, device="cpu")
    raw_new = _raw(loaded, tmp_path, ["new.png"], "conv")
    expected = cosine_matrix(np.vstack([raw_new, _raw(loaded, shared_image_set, paths, "conv")]))[0, 1:]
    assert [h["id"] for h in hits] == list(np.argsort(-expected)[:3])
    # an open store keeps the model for the next image (vecsim serve's uploads): loaded once
    import vecsim.models

    kept, loads, real_reload = Store.open(out), [], vecsim.models.reload_model
    monkeypatch.setattr(vecsim.models, "reload_model", lambda record: loads.append(record["name"]) or real_reload(record))
    for _ in range(3):
        assert [h["id"] for h in kept.query(image=str(new), layer="conv", k=3, device="cpu")] == [h["id"] for h in hits]
    assert loads == [spec]
    # the factory file changes: the reload refuses, in one line, and so does the open store
    factory_file.write_text(FACTORY + "\n# edited\n")
    changed = _cli("query", str(out), "--image", str(new), "--layer", "conv")
    assert changed.returncode != 0 and len(changed.stderr.strip().splitlines()) == 1
    with pytest.raises(VecsimError):
        kept.query(image=str(new), layer="conv", k=3, device="cpu")
    assert loads == [spec, spec]
    assert "changed since the store was built" in changed.stderr and "mynet.py" in changed.stderr
    from vecsim.maintain import add, verify

    with pytest.raises(CheckpointError, match="factory file .* changed since the store was built"):
        add(out, [str(new)], progress=False)
    assert any("factory file" in p and "changed since" in p for p in verify(Store.open(out), rehash=True))


def test_factory_errors_are_clear(factory_file, tmp_path, monkeypatch):
    monkeypatch.chdir(factory_file.parent)  # a relative file is recorded by its absolute path
    assert load_model("mynet.py:build").name == f"{factory_file}:build"
    with pytest.raises(UnknownModelError, match="returned str, not an nn.Module or \\(nn.Module, preprocessing\\)"):
        load_model(f"{factory_file}:not_a_model")
    with pytest.raises(UnknownModelError, match="has no function 'buld'; did you mean: build"):
        load_model(f"{factory_file}:buld")
    with pytest.raises(UnknownModelError, match="does not exist"):
        load_model(f"{tmp_path}/nowhere.py:build")
    with pytest.raises(UnknownWeightsError, match="builds its own weights"):
        load_model(f"{factory_file}:build", weights="DEFAULT")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(UnknownModelError, match="cannot run factory file .*RuntimeError: no GPU here"):
        load_model(f"{broken}:build")
    bad_pre = tmp_path / "badpre.py"
    bad_pre.write_text("import torch\ndef build():\n    return torch.nn.Identity(), {'size': 32, 'std': [0, 1, 1]}\n")
    with pytest.raises(UnknownModelError, match="three positive stds"):
        load_model(f"{bad_pre}:build")


def test_package_module_factory(tmp_path, monkeypatch):
    package = tmp_path / "labnets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "small.py").write_text("import torch\ndef build():\n    return torch.nn.Conv2d(3, 4, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("labnets.small:build")
    assert loaded.file == str(package / "small.py") and len(loaded.file_sha256) == 64
    assert (loaded.preprocessing.resize, loaded.preprocessing.crop) == (256, 224) and loaded.notes
    with pytest.raises(UnknownModelError, match="cannot import 'labnets.large'"):
        load_model("labnets.large:build")
    # a factory file imports its helper modules beside it, also from inside the function
    (tmp_path / "beside").mkdir()
    (tmp_path / "beside" / "blocks_of_mine.py").write_text("import torch\ndef make():\n    return torch.nn.ReLU()\n")
    (tmp_path / "beside" / "net.py").write_text("def build():\n    from blocks_of_mine import make\n    return make()\n")
    assert type(load_model(f"{tmp_path}/beside/net.py:build").module).__name__ == "ReLU"
    assert str(tmp_path / "beside") not in sys.path


# -- a module handed over in Python --------------------------------------------------------------

@pytest.mark.slow
def test_a_module_in_python_is_indexed_and_not_reloaded(shared_image_set, tmp_path):
    from vecsim.models import Preprocessing

    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    out = tmp_path / "store"
    _index(shared_image_set, out, model=net, preprocessing=Preprocessing(20, 20), layers=["1", "2"])
    record = Store.open(out).manifest["model"]
    assert (record["name"], record["reloadable"], record["source"]) == ("python:Sequential", False, "python")
    from vecsim.models import wrap_module

    loaded = wrap_module(net, Preprocessing(20, 20))
    _check_cosines(out, "2", _raw(loaded, shared_image_set, _paths(out), "2"))
    assert _cli("query", str(out), "--id", "0", "--layer", "2").returncode == 0
    for args in (["query", str(out), "--image", str(shared_image_set / _paths(out)[0])],
                 ["add", str(out), str(shared_image_set / _paths(out)[0])]):
        result = _cli(*args)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "handed over in Python" in result.stderr and "cannot be loaded again" in result.stderr
    with pytest.raises(ConfigError, match="preprocessing= goes with model=<nn.Module>"):
        _index(shared_image_set, tmp_path / "x", model="digits-cnn", layers=["features.conv2"],
               preprocessing={"size": 20})


# -- errors and the extras -------------------------------------------------------------------------

def test_unknown_names_and_weights_name_close_matches():
    with pytest.raises(UnknownModelError, match="unknown timm model 'convnext_tinny'; did you mean: convnext_tiny"):
        load_model("timm:convnext_tinny", "none")
    with pytest.raises(UnknownWeightsError, match="unknown timm weights 'in22k' for vit_tiny_patch16_224; .*augreg_in21k"):
        load_model("timm:vit_tiny_patch16_224", "in22k")
    with pytest.raises(UnknownModelError, match="unknown OpenCLIP architecture 'ViT-B-33'; did you mean: ViT-B-32"):
        load_model("open_clip:ViT-B-33", "none")


def test_a_missing_extra_fails_in_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'vecsim\[timm\]'"):
        load_model("timm:resnet18", "none")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'vecsim\[clip\]'"):
        load_model("open_clip:RN50", "none")
    code = ("import sys; sys.modules['timm'] = None\nfrom vecsim.cli import main\n"
            "sys.argv = ['vecsim', 'layers', 'timm:resnet18']\nmain()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0
    assert "vecsim[timm]" in result.stderr


def test_help_imports_no_model_library():
    code = ("import sys\nfrom vecsim.cli import main\nsys.argv=['vecsim','--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', [m for m in ('torch', 'timm', 'open_clip') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT).stdout
    assert "HEAVY []" in out
