from __future__ import annotations

import numpy as np
import pytest

import vecsim
from vecsim.evalset import allot, eval_order, exact_similarity
from vecsim.store import Store

from conftest import cosine_matrix, raw_features


def test_allot_fits_the_budget_and_prefers_nothing_but_size():
    sizes = allot({"small": 100, "big": 1_000_000}, eval_size=500, budget_bytes=10 * 2**20, n=1000)
    assert sizes["small"] == (500, "float32")
    m, dtype = sizes["big"]
    assert dtype == "float16" and 0 < m * (1_000_000 * 2 + 4) <= 10 * 2**20 - 500 * 404
    assert allot({"a": 10}, 500, 2**30, n=20) == {"a": (20, "float32")}


def test_subset_similarities_equal_those_of_raw_activations(shared_image_set, tmp_path):
    layers = ["features.relu1", "features.relu4"]
    out = tmp_path / "s"
    # relu1 has 16,384 units: a 0.2 MB budget holds only a few of them, relu4 gets the rest
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=layers, out=str(out),
                         dim="8", eval_size=12, eval_memory=0.2, batch_size=4, progress=False)
    store = Store.open(out)
    paths = dict(zip(store.stimuli().column("id").to_pylist(), store.stimuli().column("path").to_pylist()))
    order = eval_order(sorted(paths), 0)
    sizes = {}
    for layer in layers:
        ev = store.eval_subset(layer)
        sizes[layer] = len(ev["ids"])
        assert ev["ids"].tolist() == order[: len(ev["ids"])].tolist()  # a prefix of the seeded order
        raw = raw_features("digits-cnn", shared_image_set, [paths[i] for i in ev["ids"]], layer, weights="DEFAULT")
        np.testing.assert_allclose(ev["gram"], raw @ raw.T, rtol=2e-3, atol=1e-3 * np.abs(raw @ raw.T).max())
        np.testing.assert_allclose(exact_similarity(ev), cosine_matrix(raw), atol=1e-4)
        centred = raw - raw.mean(axis=1, keepdims=True)
        np.testing.assert_allclose(exact_similarity(ev, "correlation"), cosine_matrix(centred), atol=1e-4)
        assert store.manifest["layers"][layer]["eval"]["size"] == len(ev["ids"])
        if layer == "features.relu4":
            assert ev["channels"].shape == (len(ev["ids"]), 64, 16)
    assert sizes["features.relu4"] == 12 and sizes["features.relu1"] < 12


def test_held_subset_gram_over_column_chunks_equals_the_exact_one(monkeypatch):
    """Vectors of very different magnitudes, added batch by batch: the Gram computed once at
    the end matches float64, for float16-held vectors (converted over column chunks, split
    here by a small chunk size) and float32-held ones (one block product, no conversion)."""
    import torch

    import vecsim.evalset as evalset

    monkeypatch.setattr(evalset, "CHUNK_BYTES", 4 * 9 * 37)  # 37 columns per chunk for 9 rows
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 500)) * np.logspace(-3, 4, 9)[:, None]
    for dtype in ("float16", "float32"):
        ev = evalset.LayerEval(size=9, units=500, device="cpu", grid=None, dtype=dtype)
        slots = [4, 0, 7, 1, 8, 2, 6, 3, 5]
        for start in range(0, 9, 4):
            assert ev.held is not None
            batch = slots[start : start + 4]
            ev.add(batch, torch.tensor(x[batch], dtype=torch.float32), None)
        assert ev.held is None  # complete: the Gram is computed and the raw rows (the memory budget) freed
        got = ev.result(np.arange(9))
        np.testing.assert_allclose(exact_similarity(got), cosine_matrix(x), atol=2e-3 if dtype == "float16" else 1e-5)
        np.testing.assert_allclose(np.diag(got["gram"]), (x * x).sum(1), rtol=2e-3 if dtype == "float16" else 1e-5)
        np.testing.assert_allclose(got["sums"], x.sum(1), rtol=1e-4)


def test_row_sums_are_float64_accurate_without_a_float64_copy():
    import subprocess
    import sys

    # a fresh interpreter, so the peak RSS it reports is this computation's, not earlier tests'
    code = """
import resource, torch, numpy as np
from vecsim.evalset import _row_sums
x = torch.empty(16, 2_000_000).normal_(generator=torch.Generator().manual_seed(0)).add_(1e3)  # no temporary
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the high-water mark is x itself here
sums = _row_sums(x).numpy()
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
exact = x.double().sum(dim=1).numpy()
print(grown, float(np.max(np.abs(sums - exact) / np.abs(exact))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grown_mb, rel_error = map(float, out.stdout.split())
    assert rel_error < 1e-12  # float64 accumulation (a large common offset makes float32 drift)
    assert grown_mb < 120  # a float64 copy of the block would be 256 MB


@pytest.mark.parametrize("budget", [10**9, 1_500])  # float32-held; float16-held (too small a budget for float32)
def test_non_finite_stimuli_are_held_as_zeros_and_left_out_of_the_subset(budget):
    """The finite mask is applied on the device (nothing waits for it in the hook): a stimulus
    with NaN activations never reaches the saved Gram, sums or channel responses."""
    import torch

    from vecsim.evalset import EvalSubset

    rng = np.random.default_rng(2)
    out = torch.tensor(rng.normal(size=(10, 3, 4, 4)), dtype=torch.float32)
    out[3, 1, 2, 2] = float("nan")
    out[8, 0, 0, 0] = float("inf")
    subset = EvalSubset(list(range(10)), seed=0, eval_size=10, budget_bytes=budget,
                        units={"l": 48}, shapes={"l": (3, 4, 4)}, device="cpu")
    for lo in (0, 4, 7):  # three batches
        hi = {0: 4, 4: 7, 7: 10}[lo]
        subset.begin_batch(list(range(lo, hi)))
        x = out[lo:hi].flatten(1)
        subset.capture("l", x, out[lo:hi], torch.isfinite(x).all(dim=1))
    ev = subset.layers["l"].result(subset.order)
    good = [i for i in subset.order.tolist() if i not in (3, 8)]
    assert ev["ids"].tolist() == good  # in the seeded order, the non-finite two left out
    raw = out.flatten(1).double().numpy()[good]
    tol = 1e-5 if budget > 1_500 else 2e-3
    assert subset.layers["l"].dtype == ("float32" if budget > 1_500 else "float16")
    np.testing.assert_allclose(exact_similarity(ev), cosine_matrix(raw), atol=tol)
    np.testing.assert_allclose(ev["sums"], raw.sum(1), rtol=1e-5)
    pooled = torch.nn.functional.adaptive_avg_pool2d(out[good], 4).flatten(2).numpy()
    np.testing.assert_allclose(ev["channels"], pooled, rtol=1e-6)
