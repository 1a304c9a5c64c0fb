"""GPU checks of the stages that run on the model's device: extract, reduce, evalset,
similarity and index. Every test needs a CUDA GPU and is skipped without one.

Run them (on a machine with a GPU) with::

    python -m pytest -q -m gpu tests/test_gpu.py

They touch neither lancedb nor the store (``vecsim.store`` / ``index_stimuli``), so they
also run where lancedb is not installed; faiss is needed only by the index tests, which
are skipped when it cannot be imported. Each test is small (seconds on a GPU).

The CPU/GPU comparisons run with TF32 switched off (the fixture ``exact_fp32``): with
TF32 convolutions the two devices legitimately differ by ~1e-3 relative, which would
hide a real bug behind a loose tolerance.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

GPU = "cuda"


@pytest.fixture
def exact_fp32():
    """float32 convolutions and matmuls without TF32 for the duration of a test."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _low_rank(n, units, rank=10, seed=0):
    """Non-negative, correlated rows (like post-ReLU activations) on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, rank, generator=gen) @ torch.randn(rank, units, generator=gen)
    return (low + 0.1 * torch.randn(n, units, generator=gen)).abs()


def _assert_same_vectors(cpu, gpu, tol=1e-3):
    """Unit vectors computed on the two devices: each pair's cosine ≈ 1, and the same Gram."""
    gpu = gpu.detach().cpu().double()
    cpu = cpu.detach().double()
    assert gpu.shape == cpu.shape
    cos = (cpu * gpu).sum(1) / (cpu.norm(dim=1) * gpu.norm(dim=1)).clamp(min=1e-30)
    assert float(cos.min()) > 1 - tol, cos
    assert float((cpu @ cpu.T - gpu @ gpu.T).abs().max()) < tol


# -- devices -----------------------------------------------------------------------------


def test_auto_device_is_cuda():
    from vecsim.extract import resolve_device

    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"


# -- reduce ------------------------------------------------------------------------------


def test_count_sketch_regenerated_on_cuda_equals_the_cpu_one():
    from vecsim.reduce import CountSketch

    units, dim, seed = 200_000, 4096, 7
    cpu = CountSketch(units, dim, seed, "cpu")
    gpu = CountSketch(units, dim, seed, GPU)
    assert gpu.buckets.device.type == "cuda" and gpu.signs.device.type == "cuda"
    assert torch.equal(gpu.buckets.cpu(), cpu.buckets)
    assert torch.equal(gpu.signs.cpu(), cpu.signs)
    moved = CountSketch(units, dim, seed, "cpu").to(GPU)
    assert torch.equal(moved.buckets.cpu(), cpu.buckets) and torch.equal(moved.signs.cpu(), cpu.signs)
    x = _randn(6, units, seed=1)
    expected = cpu(x)
    got = gpu(x.to(GPU))
    assert got.device.type == "cuda" and got.dtype == torch.float32
    # index_add_ on CUDA adds in a different order: float32 rounding only
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize(
    "shape, config",
    [
        ((120_000,), dict(sketch_dim=8192, dim=24)),
        ((32, 40, 40), dict(sketch_dim=4096, dim=24, similarity="correlation")),
        ((32, 40, 40), dict(pooling="grid:3", dim=16, center=True)),
        ((32, 40, 40), dict(pooling="avg", dim=16)),
    ],
    ids=["sketch", "sketch-correlation", "grid-centred", "avg"],
)
def test_reducer_fitted_on_cpu_gives_the_same_vectors_on_cuda(exact_fp32, shape, config):
    from vecsim.reduce import LayerReducer, ReducerConfig

    n = 32
    x = _low_rank(n, int(np.prod(shape))).reshape(n, *shape)
    reducer = LayerReducer("layer", shape, ReducerConfig(**config), "cpu")
    z, _, _, _ = reducer.prepare(x.clone())
    reducer.fit(z)
    y_cpu, norms_cpu, finite_cpu = reducer(x.clone())

    reducer.to(GPU)
    assert reducer.matrix.device.type == "cuda"
    if reducer.sketch is not None:
        assert reducer.sketch.buckets.device.type == "cuda"
    y_gpu, norms_gpu, finite_gpu = reducer(x.to(GPU))
    assert y_gpu.device.type == "cuda" and y_gpu.dtype == torch.float32 and y_gpu.shape == y_cpu.shape
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=1e-4)
    torch.testing.assert_close(norms_gpu.cpu(), norms_cpu, rtol=1e-4, atol=0)
    assert torch.equal(finite_gpu.cpu(), finite_cpu)


def test_non_finite_rows_are_zeroed_on_cuda_as_on_cpu():
    from vecsim.reduce import LayerReducer, ReducerConfig

    x = _low_rank(8, 100_000)
    reducer = LayerReducer("layer", (100_000,), ReducerConfig(sketch_dim=2048, dim=8), "cpu")
    reducer.fit(reducer.prepare(x.clone())[0])
    x[3, 17] = float("nan")
    x[5, 2] = float("inf")
    y_cpu, _, finite_cpu = reducer(x.clone())
    y_gpu, norms_gpu, finite_gpu = reducer.to(GPU)(x.to(GPU))
    assert finite_gpu.cpu().tolist() == finite_cpu.tolist() == [True] * 3 + [False, True, False, True, True]
    assert torch.isfinite(y_gpu).all() and torch.isfinite(norms_gpu).all()
    assert float(y_gpu[3].abs().max()) == 0.0 and float(y_gpu[5].abs().max()) == 0.0
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=0, atol=1e-4)


# -- hooked forward passes ----------------------------------------------------------------


def _fit_on_cpu(model, layers, configs, x):
    """Reducers of ``layers`` fitted on the CPU from the prepared (pooled, sketched) vectors of ``x``."""
    from vecsim.extract import LayerCapture
    from vecsim.models import layer_shapes
    from vecsim.reduce import LayerReducer

    shapes = {info.name: info.shape for info in layer_shapes(model, x.shape[-1], layers)}
    reducers = {layer: LayerReducer(layer, shapes[layer], configs[layer], "cpu") for layer in layers}
    with LayerCapture(model, layers, {layer: reducers[layer].prepare for layer in layers}) as capture:
        prepared = capture.run(x)
    for layer in layers:
        reducers[layer].fit(prepared[layer][0])
    return reducers


def _reduced_forward(model, reducers, x, passes=1):
    from vecsim.extract import LayerCapture

    layers = list(reducers)
    with LayerCapture(model, layers, {layer: reducers[layer] for layer in layers}) as capture:
        for _ in range(passes):
            results = capture.run(x)
    return results


def _check_hooked_forward_on_cuda(model, layers, configs, x):
    """Fit on the CPU, reduce on the CPU and on CUDA, compare; only (B, dim) comes back."""
    reducers = _fit_on_cpu(model, layers, configs, x)
    expected = _reduced_forward(model, reducers, x)

    gpu_model = copy.deepcopy(model).to(GPU)
    gpu_reducers = {layer: copy.deepcopy(r).to(GPU) for layer, r in reducers.items()}
    xg = x.to(GPU)
    _reduced_forward(gpu_model, gpu_reducers, xg)  # warm-up: cuBLAS/cuDNN workspaces
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    got = _reduced_forward(gpu_model, gpu_reducers, xg, passes=2)  # the second pass stops early
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - before

    batch = x.shape[0]
    out_bytes = 0
    for layer in layers:
        y, norms, finite = got[layer]
        dim = gpu_reducers[layer].dim
        for t in (y, norms, finite):
            assert isinstance(t, torch.Tensor) and t.device.type == "cuda", (layer, type(t))
            out_bytes += t.numel() * t.element_size()
        assert y.shape == (batch, dim) and y.dtype == torch.float32
        assert norms.shape == (batch,) and finite.shape == (batch,) and bool(finite.all())
        _assert_same_vectors(expected[layer][0], y)
        torch.testing.assert_close(norms.cpu(), expected[layer][1], rtol=1e-3, atol=0)
    # nothing but the reduced outputs outlives the pass: no raw activation (nor a pooled
    # copy of one) is kept on the GPU
    smallest_raw = min(batch * gpu_reducers[layer].units * 4 for layer in layers)
    assert held < smallest_raw, (held, out_bytes, smallest_raw)
    return gpu_model, gpu_reducers


def test_digits_cnn_hooked_forward_on_cuda_matches_cpu(exact_fp32):
    from vecsim.models import load_model
    from vecsim.reduce import ReducerConfig

    model = load_model("digits-cnn").module
    configs = {
        "features.relu2": ReducerConfig(sketch_dim=4096, dim=32),  # 32,768 units, sketched
        "features.bn3": ReducerConfig(pooling="grid:2", dim=32),  # bn3 is followed by a ReLU
        "features.relu4": ReducerConfig(dim=32),  # 4,096 units, flattened
    }
    x = _randn(24, 3, 32, 32, seed=2)
    _check_hooked_forward_on_cuda(model, list(configs), configs, x)


def test_densenet121_transition_hooked_forward_on_cuda_matches_cpu(exact_fp32):
    from vecsim.models import load_model
    from vecsim.reduce import SKETCH_MIN, ReducerConfig

    model = load_model("densenet121", weights="none").module
    layer = "features.transition1.norm"  # norm → ReLU(inplace=True): the hook must copy
    x = _randn(12, 3, 96, 96, seed=3)  # 256 × 24 × 24 = 147,456 units: sketched by default
    _, reducers = _check_hooked_forward_on_cuda(model, [layer], {layer: ReducerConfig()}, x)
    assert reducers[layer].sketch is not None and reducers[layer].dim_in == SKETCH_MIN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["half", "bfloat16"])
@pytest.mark.parametrize(
    "name, layers, size",
    [
        ("digits-cnn", ["features.relu2", "features.relu4"], 32),
        ("densenet121", ["features.transition1.norm"], 96),
    ],
    ids=["digits-cnn", "densenet121"],
)
def test_low_precision_models_are_reduced_in_float32_on_cuda(exact_fp32, dtype, name, layers, size):
    from vecsim.models import load_model
    from vecsim.reduce import ReducerConfig

    cpu_model = load_model(name, weights=None if name == "digits-cnn" else "none").module
    x_cpu = _randn(12, 3, size, size, seed=4)
    configs = {layer: ReducerConfig(sketch_dim=4096, dim=16) for layer in layers}
    reducers = {layer: r.to(GPU) for layer, r in _fit_on_cpu(cpu_model, layers, configs, x_cpu).items()}
    model, x = copy.deepcopy(cpu_model).to(GPU), x_cpu.to(GPU)
    reference = _reduced_forward(model, reducers, x)  # float32 model on the GPU

    low = copy.deepcopy(model).to(dtype)
    got = _reduced_forward(low, reducers, x.to(dtype))
    for layer in layers:
        y, norms, finite = got[layer]
        assert y.dtype == torch.float32 and norms.dtype == torch.float32
        assert y.device.type == "cuda" and y.shape == (12, reducers[layer].dim)
        assert bool(finite.all()) and bool(torch.isfinite(y).all()) and bool(torch.isfinite(norms).all())
        assert bool((y.norm(dim=1) <= 1 + 1e-5).all())  # projected unit vectors
        # the same vectors up to the model's own rounding
        ref = reference[layer][0]
        cos = (y * ref).sum(1) / (y.norm(dim=1) * ref.norm(dim=1)).clamp(min=1e-30)
        assert float(cos.min()) > (0.99 if dtype == torch.float16 else 0.95), cos


# -- evaluation subset --------------------------------------------------------------------


@pytest.mark.parametrize("budget", [2**30, 200_000], ids=["float32", "float16"])
def test_eval_subset_gram_on_cuda_equals_cpu(exact_fp32, budget):
    from vecsim.evalset import EvalSubset, eval_order

    ids = list(range(100, 130))
    shapes = {"flat": (3000,), "conv": (8, 10, 10)}
    units = {"flat": 3000, "conv": 800}
    data = {layer: _low_rank(len(ids), units[layer], seed=i) for i, layer in enumerate(shapes)}
    bad = int(eval_order(ids, 3)[0])  # the first stimulus of the subset...
    data["flat"][ids.index(bad), 9] = float("nan")  # ...is non-finite in one layer: left out there

    def run(device):
        subset = EvalSubset(ids, seed=3, eval_size=20, budget_bytes=budget, units=units, shapes=shapes,
                            device=device)
        for start in range(0, len(ids), 8):
            batch = ids[start : start + 8]
            subset.begin_batch(batch)
            for layer in shapes:
                x = data[layer][start : start + 8].to(device)
                finite = torch.isfinite(x).all(dim=1)
                output = x.reshape(len(batch), *shapes[layer])
                subset.capture(layer, x.clone(), output, finite)
        return subset, {layer: subset.layers[layer].result(subset.order) for layer in shapes}

    cpu_subset, cpu = run("cpu")
    gpu_subset, gpu = run(GPU)
    assert gpu_subset.sizes == cpu_subset.sizes
    if budget < 2**30:
        assert gpu_subset.layers["flat"].dtype == "float16"  # the scaled float16 path
    for layer in shapes:
        assert gpu_subset.layers[layer].row_sums.device.type == "cuda"  # (its raw rows are freed once complete)
        np.testing.assert_array_equal(gpu[layer]["ids"], cpu[layer]["ids"])
        scale = np.abs(cpu[layer]["gram"]).max()
        np.testing.assert_allclose(gpu[layer]["gram"], cpu[layer]["gram"], rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(gpu[layer]["sums"], cpu[layer]["sums"], rtol=1e-5)
        if "channels" in cpu[layer]:
            np.testing.assert_allclose(gpu[layer]["channels"], cpu[layer]["channels"], rtol=1e-5, atol=1e-6)
    assert bad not in gpu["flat"]["ids"] and bad in gpu["conv"]["ids"]
    assert len(gpu["conv"]["ids"]) == 20 and len(gpu["flat"]["ids"]) == 19


# -- similarity ---------------------------------------------------------------------------


def _unit_rows(n, k, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, k)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[7] = 0.0  # an all-zero row: similarity 0 with everything, itself included
    return v


def test_similarity_tiles_on_cuda_equal_the_cpu_tiles():
    from vecsim.similarity import similarity_matrix, similarity_tiles

    v = _unit_rows(2500, 64)
    cpu = list(similarity_tiles(v, tile_rows=700, device="cpu"))
    gpu = list(similarity_tiles(v, tile_rows=700, device=GPU))
    assert [(a, b) for a, b, _ in gpu] == [(a, b) for a, b, _ in cpu] == [(0, 700), (700, 1400), (1400, 2100), (2100, 2500)]
    for (_, _, s_cpu), (_, _, s_gpu) in zip(cpu, gpu):
        assert isinstance(s_gpu, np.ndarray) and s_gpu.dtype == np.float32
        np.testing.assert_allclose(s_gpu, s_cpu, rtol=0, atol=1e-5)
    np.testing.assert_allclose(similarity_matrix(v[:900], device=GPU), similarity_matrix(v[:900]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("float16", 1e-3)])
def test_npy_export_on_cuda_equals_the_cpu_export(tmp_path, dtype, atol):
    """Tiles finished and converted on the GPU, overlapped with the host's mirroring and
    writing: the same file as the CPU export (float16: within one rounding step), exactly
    symmetric, diagonal 1, the zero row 0, byte-identical stimuli 1."""
    from vecsim.similarity import export_similarity

    v = _unit_rows(3001, 64)
    kw = dict(ids=np.arange(3001), paths=[f"s{i}.png" for i in range(3001)], labels=[None] * 3001,
              metadata={}, dtype=dtype, memory_limit_bytes=3001 * 16 * 400, identical=[[1, 2000]])
    export_similarity({"l": v}, tmp_path / "cpu.npy", **kw)
    summary = export_similarity({"l": v}, tmp_path / "gpu.npy", device=GPU, **kw)
    assert summary["tile_rows"] < 3001  # several tiles
    a, b = np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "gpu.npy")
    assert b.dtype == np.dtype(dtype) and np.array_equal(b, b.T)
    np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=0, atol=atol)
    diag = np.diag(b)
    assert diag[7] == 0 and np.all(np.delete(diag, 7) == 1) and b[7].max() == 0 and b[1, 2000] == 1


# -- index --------------------------------------------------------------------------------


def _index_data(n=3000, d=64, queries=50):
    v = _unit_rows(n + queries, d, seed=5)
    v[7] = v[8]  # no zero row in an index
    return v[:n], v[n:], np.arange(1000, 1000 + n, dtype=np.int64)


def _is_gpu_index(index) -> bool:
    import faiss

    names = [type(index).__name__]
    if hasattr(index, "index"):
        names.append(type(faiss.downcast_index(index.index)).__name__)
    return any("Gpu" in name for name in names)


def test_neighbors_torch_search_on_cuda_equals_the_flat_index():
    """`vecsim neighbors` on a GPU searches an exact index with torch (products and top-k on
    the device): the flat index's neighbours and scores."""
    faiss = pytest.importorskip("faiss")
    from vecsim.query import _torch_search

    v = _unit_rows(3050, 64, seed=6)  # no duplicate rows: no ties among the top 10
    vectors, queries, ids = v[:3000], v[3000:], np.arange(1000, 4000, dtype=np.int64)
    flat = faiss.IndexIDMap(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(vectors, ids)
    with _torch_search(ids, vectors, GPU) as search:
        got_s, got_i = search(queries, 10)
    want_s, want_i = flat.search(queries, 10)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, rtol=0, atol=1e-5)


def test_to_gpu_moves_the_index_and_search_matches_the_cpu_index():
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        pytest.skip("this faiss build has no GPU support (faiss-cpu)")
    from vecsim.index import add, new_flat_index, search, to_gpu

    vectors, queries, ids = _index_data()
    cpu = new_flat_index(vectors.shape[1])
    add(cpu, vectors, ids)
    gpu = to_gpu(cpu, GPU)
    assert gpu is not cpu and _is_gpu_index(gpu), type(gpu)
    plain = faiss.IndexFlatIP(vectors.shape[1])
    plain.add(vectors)
    assert _is_gpu_index(to_gpu(plain, GPU))
    cpu_scores, cpu_ids = search(cpu, queries, 10)
    gpu_scores, gpu_ids = search(gpu, queries, 10)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
    assert (gpu_ids[:, 0] == cpu_ids[:, 0]).all()
    assert (gpu_ids == cpu_ids).mean() > 0.98


def test_to_gpu_without_faiss_gpu_support_keeps_the_cpu_index():
    faiss = pytest.importorskip("faiss")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss has GPU support here: the other test covers it")
    from vecsim.index import add, new_flat_index, search, to_gpu

    vectors, queries, ids = _index_data()
    cpu = new_flat_index(vectors.shape[1])
    add(cpu, vectors, ids)
    assert to_gpu(cpu, GPU) is cpu
    scores, found = search(cpu, queries, 5)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    assert (found[:, 0] == ids[exact[:, 0]]).all()
