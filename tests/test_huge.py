"""Layers with millions of units: sketch inside the hook, bounded memory, zero units dropped, pooling."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import vecsim
from vecsim.reduce import LayerReducer, ReducerConfig
from vecsim.store import Store

from conftest import cosine_matrix, make_image_set, raw_features


def test_chain_equals_the_composition_of_its_parts():
    rng = np.random.default_rng(0)
    out = torch.tensor(np.maximum(rng.normal(size=(12, 8, 20, 20)), 0), dtype=torch.float32)
    reducer = LayerReducer("l", (8, 20, 20), ReducerConfig(dim=6, sketch_dim=512, sketch_seed=3))
    z, _, _, _ = reducer.prepare(out)
    reducer.fit(z)
    chained, _, _ = reducer(out)
    flat = out.flatten(1)
    sketched = torch.zeros(12, 512).index_add_(1, reducer.sketch.buckets, flat * reducer.sketch.signs)
    unit = sketched / sketched.norm(dim=1, keepdim=True)
    torch.testing.assert_close(chained, unit @ reducer.matrix.T)
    # normalised before the projection: the norm is the share kept, at most 1
    assert bool((chained.norm(dim=1) <= 1 + 1e-5).all()) and bool((chained.norm(dim=1) < 0.999).any())


def test_drop_zero_units_keeps_training_vectors_and_reports_the_count(shared_image_set, tmp_path):
    common = dict(source=str(shared_image_set), model="digits-cnn", layers=["features.relu1"], dim="8",
                  sketch_dim=1024, progress=False)
    plain = vecsim.index_stimuli(out=str(tmp_path / "a"), **common)
    dropped = vecsim.index_stimuli(out=str(tmp_path / "b"), drop_zero_units=True, **common)
    n = dropped.layers["features.relu1"]["dropped_zero_units"]
    raw = raw_features("digits-cnn", shared_image_set, Store.open(tmp_path / "b").stimuli().column("path").to_pylist(),
                       "features.relu1", weights="DEFAULT")
    assert n == int((np.abs(raw).sum(axis=0) == 0).sum()) and n > 0
    _, a = Store.open(tmp_path / "a").vectors("features.relu1")
    _, b = Store.open(tmp_path / "b").vectors("features.relu1")
    np.testing.assert_allclose(a, b, atol=1e-5)  # every stimulus here is a training stimulus
    assert plain.layers["features.relu1"]["dropped_zero_units"] == 0
    hits = Store.open(tmp_path / "b").query(image=str(shared_image_set / "dog" / "img_01.jpg"), k=1, device="cpu")
    assert hits[0]["path"] == "dog/img_01.jpg" and hits[0]["cosine"] > 0.999


@pytest.mark.parametrize("pooling, units", [("avg", 64), ("max", 64), ("grid:2", 256)])
def test_spatial_pooling_per_layer(shared_image_set, tmp_path, pooling, units):
    out = tmp_path / pooling.replace(":", "")
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu4", "features.relu2"],
                         out=str(out), dim="32", pooling=f"features.relu4={pooling}", progress=False)
    store = Store.open(out)
    assert store.layer_info("features.relu4")["reducer"]["units"] == units
    assert store.layer_info("features.relu2")["reducer"]["config"]["pooling"] == "flatten"
    raw = raw_features("digits-cnn", shared_image_set, store.stimuli().column("path").to_pylist(), "features.relu4",
                       weights="DEFAULT").reshape(18, 64, 8, 8)
    pooled = {"avg": raw.mean(axis=(2, 3)), "max": raw.max(axis=(2, 3)),
              "grid:2": raw.reshape(18, 64, 2, 4, 2, 4).mean(axis=(3, 5)).reshape(18, -1)}[pooling]
    _, vecs = store.vectors("features.relu4")
    np.testing.assert_allclose(vecs @ vecs.T, cosine_matrix(pooled), atol=1e-4)


def test_a_grid_larger_than_the_maps_is_refused_with_the_fix(shared_image_set, tmp_path):
    """relu4's maps are 8x8: grid:9 would repeat cells (unevenly), which reweights the cosine."""
    from vecsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"grid:9 on features.relu4: its maps are 8x8.*--pooling "
                                          r"features.relu4=grid:8,grid:9"):
        vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu4"],
                             out=str(tmp_path / "s"), dim="8", pooling="grid:9", progress=False)
    assert not (tmp_path / "s" / "vecsim.json").exists()
    with pytest.raises(ConfigError, match=r"--pooling features.relu4=grid:8,avg$"):  # the other layers keep theirs
        vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu4", "features.relu2"],
                             out=str(tmp_path / "t"), dim="8", pooling="features.relu4=grid:16,avg", progress=False)


def _peak_rss_mb(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_million_unit_layer_indexes_with_bounded_memory(tmp_path):
    """resnet18 conv1 at 256 px has 64x128x128 = 1,048,576 units: 300 raw training vectors would be 1.2 GB.

    Peak RSS is compared with a bare forward loop over the same images and batch size."""
    images = make_image_set(tmp_path / "img", per_class=100, size=64)
    bare = _peak_rss_mb(f"""
        import json, pathlib, resource, torch
        from vecsim.extract import iter_decoded
        from vecsim.models import load_model
        from vecsim.stimuli import discover
        items = [(s.id, s.path) for s in discover({str(images)!r}).stimuli]
        m = load_model("resnet18", "none", size=256)
        with torch.inference_mode():
            for b in iter_decoded(pathlib.Path({str(images)!r}), items, m.preprocessing, 16):
                m.module(b.images)
        print(json.dumps({{"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """)
    report = _peak_rss_mb(f"""
        import json, resource, vecsim
        s = vecsim.index_stimuli(source={str(images)!r}, model="resnet18", weights="none", size=256, layers=["conv1"],
                                 out={str(tmp_path / "s")!r}, dim="64", train_size=300, eval_size=100, eval_memory=64,
                                 batch_size=16, progress=False)
        print(json.dumps({{"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "n": s.indexed,
                          "fit": s.layers["conv1"], "fidelity": s.fidelity}}))
    """)
    raw_sample_mb = 300 * 1_048_576 * 4 / 2**20
    assert report["n"] == 300 and report["fit"]["dim_in"] == 65_536  # sketched automatically (2^k ≥ units/20)
    extra = report["rss_mb"] - bare["rss_mb"]
    assert extra < min(1024, raw_sample_mb / 2), (report, bare)  # the raw training sample was never held
    assert report["fidelity"]["conv1"] > 0.95
