"""End to end: vecsim.index_stimuli on generated images and on builtin:digits."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import vecsim
from vecsim.errors import StimulusSetError, StoreExistsError, UnknownLayerError
from vecsim.store import Store

from conftest import cosine_matrix, raw_features

LAYERS = ["layer1", "layer3.1.bn2", "avgpool"]


@pytest.fixture(scope="module")
def small_store(shared_image_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "small"
    summary = vecsim.index_stimuli(source=str(shared_image_set), model="resnet18", weights="none", size=64,
                                   layers=LAYERS, out=str(out), dim="32", labels_from_folders=True,
                                   batch_size=5, chunk_size=4, progress=False)
    return out, summary


def test_store_api_and_manifest(small_store, shared_image_set):
    out, summary = small_store
    store = Store.open(out)
    assert store.complete and store.layers == LAYERS
    assert summary.indexed == 18 and summary.failed == 0
    stimuli = store.stimuli()
    assert stimuli.column("id").to_pylist() == list(range(18))
    row = stimuli.slice(0, 1).to_pylist()[0]
    assert row["sha256"] == hashlib.sha256((shared_image_set / row["path"]).read_bytes()).hexdigest()
    assert (row["width"], row["height"], row["label"]) == (40, 40, "cat")
    m = store.manifest
    assert m["model"]["name"] == "resnet18" and m["preprocessing"]["crop"] == 64
    assert m["layers"]["layer1"]["reducer"]["fit"]["exact"] is True
    assert "torch" in m["versions"] and m["seeds"]["training_sample"] == 0
    for layer in LAYERS:
        ids, vecs = store.vectors(layer)
        assert ids.dtype == np.int64 and vecs.dtype == np.float32 and vecs.flags.c_contiguous
        assert ids.tolist() == list(range(18))
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
        assert store.index(layer).ntotal == 18


def test_stored_cosines_equal_raw_activation_cosines_when_dim_covers_n(small_store, shared_image_set):
    out, _ = small_store
    store = Store.open(out)
    paths = store.stimuli().column("path").to_pylist()
    for layer in LAYERS:
        raw = raw_features("resnet18", shared_image_set, paths, layer, size=64)
        _, vecs = store.vectors(layer)
        np.testing.assert_allclose(vecs @ vecs.T, cosine_matrix(raw), atol=1e-4)
        _, norms = store.raw_norms(layer)
        np.testing.assert_allclose(norms, np.linalg.norm(raw, axis=1), rtol=1e-4)


def test_faiss_search_agrees_with_the_stored_vectors(small_store):
    out, _ = small_store
    store = Store.open(out)
    ids, vecs = store.vectors("layer1")
    scores, found = store.index("layer1").search(vecs[:3], 5)
    brute = np.argsort(-(vecs[:3] @ vecs.T), axis=1)[:, :5]
    assert (found == ids[brute]).all()


def test_no_raw_tensor_is_written(small_store):
    out, _ = small_store
    info = Store.open(out).info()
    raw_per_stimulus = sum(layer["units"] for layer in info["layers"].values()) * 4
    assert info["bytes"]["data_per_stimulus"] < raw_per_stimulus / 10
    assert info["bytes"]["raw_activations"] == raw_per_stimulus * 18
    # the fit's files (transform and the training sample's spectra) are a fixed cost, not per stimulus
    store = Store.open(out)
    fixed = sum((store.layer_dir(layer) / name).stat().st_size for layer in store.layers
                for name in ("transform.faiss", "spectrum.npy", "spectrum_centred.npy"))
    assert info["bytes"]["transforms"] == fixed


def test_broken_images_are_recorded_and_skipped(image_set, tmp_path):
    (image_set / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (image_set / "dog" / "text.png").write_text("hello")
    summary = vecsim.index_stimuli(source=str(image_set), model="digits-cnn", layers=["features.relu2"],
                                   out=str(tmp_path / "s"), dim="8", progress=False)
    store = Store.open(tmp_path / "s")
    failures = store.failures().to_pylist()
    assert summary.indexed == 18 and summary.failed == 2
    assert sorted(f["path"] for f in failures) == ["cat/broken.jpg", "dog/text.png"]
    assert all(f["reason"] for f in failures)
    assert store.index("features.relu2").ntotal == store.stimuli().num_rows == 18
    assert store.manifest["counts"] == {"stimuli": 18, "failures": 2}


def test_a_complete_store_is_not_overwritten_without_asking(small_store, shared_image_set, tmp_path):
    out, _ = small_store
    with pytest.raises(StoreExistsError, match="--overwrite"):
        vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu1"],
                             out=str(out), progress=False)
    assert Store.open(out).layers == LAYERS  # untouched


def test_a_folder_that_is_not_a_store_is_never_emptied_without_asking(shared_image_set, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("the researcher's notes")
    with pytest.raises(StoreExistsError, match="not an empty folder"):
        vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu4"],
                             out=str(out), dim="4", progress=False)
    assert (out / "keep.txt").read_text() == "the researcher's notes"


def test_bad_input_fails_before_anything_is_written(shared_image_set, tmp_path):
    with pytest.raises(UnknownLayerError, match="features.relu4"):
        vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu5"],
                             out=str(tmp_path / "x"), progress=False)
    with pytest.raises(StimulusSetError):
        vecsim.index_stimuli(source=str(tmp_path / "none"), model="digits-cnn", layers=["features.relu1"],
                             out=str(tmp_path / "y"), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_digits_cnn_keeps_similarities_at_dim_32(tmp_path_factory):
    from scipy.stats import spearmanr

    out = tmp_path_factory.mktemp("digits") / "store"
    vecsim.index_stimuli(source="builtin:digits", model="digits-cnn", layers=["features.conv4"],
                         out=str(out), dim="32", progress=False)
    store = Store.open(out)
    assert store.stimuli().num_rows == 1797
    paths = store.stimuli().column("path").to_pylist()
    from vecsim.stimuli import discover

    root = discover("builtin:digits").root
    raw = raw_features("digits-cnn", root, paths, "features.conv4", weights="DEFAULT")
    _, vecs = store.vectors("features.conv4")
    iu = np.triu_indices(len(paths), 1)
    rho = spearmanr(cosine_matrix(raw)[iu], (vecs @ vecs.T)[iu])[0]
    assert rho >= 0.95


def test_a_config_built_directly_takes_the_same_loose_forms_as_flags():
    from vecsim.config import IndexConfig, resolve
    from vecsim.errors import ConfigError

    given = dict(source="s", model="digits-cnn", out="o", layers="conv1, conv2", dim=64, mean="0.1,0.2,0.3")
    direct = IndexConfig(**given)
    assert direct.layers == ["conv1", "conv2"] and direct.dim == "64" and direct.mean == [0.1, 0.2, 0.3]
    assert direct == resolve(given)
    with pytest.raises(ConfigError, match="three comma-separated numbers"):
        IndexConfig(**{**given, "std": "a,b,c"})
    from pathlib import Path

    paths = IndexConfig(**{**given, "source": Path("s"), "out": Path("o")}).validate()  # type-checked after
    assert (paths.source, paths.out) == ("s", "o")


def test_a_module_run_several_times_per_pass_is_indexed_at_its_last_call(shared_image_set, tmp_path):
    """A Bottleneck's relu runs three times per pass (64, 64, then 256 channels): the store
    holds its last call, with the evaluation subset on (each batch captured once)."""
    import torch

    from vecsim.models import load_model
    from vecsim.stimuli import decode_image

    layer = "layer1.0.relu"
    summary = vecsim.index_stimuli(source=str(shared_image_set), model="resnet50", weights="none", size=32,
                                   layers=[layer], out=str(tmp_path / "s"), dim="32", batch_size=5,
                                   progress=False)
    assert summary.layers[layer]["calls"] == 3
    store = Store.open(tmp_path / "s")
    paths = store.stimuli().column("path").to_pylist()
    loaded = load_model("resnet50", weights="none", size=32)
    last = {}
    module = dict(loaded.module.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: last.__setitem__("out", o.detach().clone()))
    raw = []
    with torch.no_grad():
        for rel in paths:
            loaded.module(loaded.preprocessing(decode_image(shared_image_set / rel).image).unsqueeze(0))
            raw.append(last["out"].flatten(1).double().numpy())
    handle.remove()
    raw = np.concatenate(raw)
    assert raw.shape[1] == 256 * 8 * 8
    _, vecs = store.vectors(layer)
    np.testing.assert_allclose(vecs @ vecs.T, cosine_matrix(raw), atol=1e-4)
    assert summary.fidelity[layer] > 0.999  # the evaluation subset held each stimulus once


def test_info_says_which_pairs_are_exact(shared_image_set, tmp_path):
    """A projection that keeps every direction of its training sample is exact for pairs with a
    training stimulus; for all pairs only when every stimulus was in the sample."""
    layer = "features.relu4"
    for train_size, want in ((6, "training"), (1000, "all")):
        out = tmp_path / f"s{train_size}"
        vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=[layer], out=str(out),
                             dim="8" if train_size == 6 else "32", train_size=train_size, progress=False)
        info = Store.open(out).info()["layers"][layer]
        assert info["exact"] and info["exact_pairs"] == want
    # a count sketch before the projection estimates the raw cosines: never "exact"
    out = tmp_path / "sketched"
    summary = vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu2"],
                                   out=str(out), dim="32", sketch_dim=1024, progress=False)
    fit = summary.layers["features.relu2"]
    assert fit["exact"] and fit["sketched"] and fit["units"] == 32768
    assert Store.open(out).info()["layers"]["features.relu2"]["exact_pairs"] == "none"
    # a centred store keeps every direction of its centred sample but holds centred cosines
    out = tmp_path / "centred"
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=[layer], out=str(out),
                         dim="32", center=True, progress=False)
    info = Store.open(out).info()["layers"][layer]
    assert info["exact"] and info["exact_pairs"] == "none"
