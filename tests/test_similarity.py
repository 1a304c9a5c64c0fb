"""Tests for vecsim.similarity: tiled similarity-matrix export (CPU, seeded, small)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest

from vecsim import similarity as sim
from vecsim.errors import (
    ConfigError,
    DeviceError,
    DimensionMismatchError,
    DiskSpaceError,
    OutputExistsError,
)

N = 301  # not a multiple of the tile sizes used below
K = 16
ZERO_ROW = 17
# 4 bytes (float32 block) + 3 * 4 (float32 output buffers) per entry -> 10 rows per tile
TINY_LIMIT = N * 16 * 10 + 100


def _unit_vectors(n: int, k: int, seed: int, zero_row: int | None = ZERO_ROW):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, k))
    if zero_row is not None:
        X[zero_row] = 0.0
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    V = np.divide(X, norms, out=np.zeros_like(X), where=norms > 0).astype(np.float32)
    return X, V


def _brute_cosine(X: np.ndarray) -> np.ndarray:
    """float64 cosine of the raw rows; an all-zero row is 0 with everything, itself included."""
    norms = np.linalg.norm(X, axis=1)
    denom = np.outer(norms, norms)
    S = np.divide(X @ X.T, denom, out=np.zeros((len(X), len(X))), where=denom > 0)
    S = np.clip(S, -1, 1)
    np.fill_diagonal(S, np.where(norms > 0, 1.0, 0.0))
    return S


Data = namedtuple("Data", "X V ref ids paths labels")


@pytest.fixture(scope="module")
def data() -> Data:
    X, V = _unit_vectors(N, K, seed=0)
    rng = np.random.default_rng(1)
    ids = rng.permutation(10_000)[:N].astype(np.int64) + 1000  # not sorted, not 0..N-1
    paths = [f"stimuli/img_{int(i):05d}.png" for i in ids]
    paths[3] = "stimuli/caf\u00e9_\u00fcber.png"  # non-ASCII survives in the provenance
    labels = [None if r % 7 == 0 else f"class_{r % 5}" for r in range(N)]
    return Data(X, V, _brute_cosine(X), ids, paths, labels)


def _export(data: Data, out: Path, layers=None, **kw):
    layers = layers if layers is not None else {"conv1": data.V}
    kw.setdefault("metadata", {"model": "digits_cnn", "weights": "seed0", "reducer": {"conv1": {"k": K}}})
    return sim.export_similarity(
        layers, out, ids=data.ids, paths=data.paths, labels=data.labels, **kw
    )


def _two_layers_as_npy(data: Data, tmp_path: Path):
    """Two layers (the fixture's and an 8-dim one) and their exported (2, N, N) .npy, the
    reference the other formats are checked against."""
    _, V2 = _unit_vectors(N, 8, seed=5, zero_row=None)
    layers = {"conv1": data.V, "fc": V2}
    _export(data, tmp_path / "m.npy", layers=layers)
    return layers, np.load(tmp_path / "m.npy")


# --------------------------------------------------------------------------- in memory


def test_similarity_matrix_matches_brute_force(data):
    M = sim.similarity_matrix(data.V)
    assert M.dtype == np.float32 and M.shape == (N, N)
    np.testing.assert_allclose(M, data.ref, atol=1e-5)
    assert np.array_equal(M, M.T)
    assert M[ZERO_ROW, ZERO_ROW] == 0.0
    assert not np.isnan(M).any()
    D = sim.similarity_matrix(data.V, dtype="float16", distance=True)
    assert D.dtype == np.float16
    np.testing.assert_allclose(D.astype(np.float64), 1 - data.ref, atol=2e-3)


def test_similarity_tiles_cover_rows(data):
    seen = []
    for r0, r1, block in sim.similarity_tiles(data.V, tile_rows=37):
        assert block.dtype == np.float32 and block.shape == (r1 - r0, N)
        np.testing.assert_allclose(block, data.ref[r0:r1], atol=1e-5)
        seen.append((r0, r1))
    assert seen[0][0] == 0 and seen[-1][1] == N
    assert all(a[1] == b[0] for a, b in zip(seen, seen[1:]))
    assert len(seen) == -(-N // 37)


def test_similarity_tiles_accepts_memmap(data, tmp_path):
    mm = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float32, shape=data.V.shape)
    mm[:] = data.V
    mm.flush()
    ro = np.load(tmp_path / "v.npy", mmap_mode="r")
    blocks = [b for _, _, b in sim.similarity_tiles(ro, tile_rows=100)]
    np.testing.assert_allclose(np.vstack(blocks), data.ref, atol=1e-5)


def _force_engine(monkeypatch, engine):
    """Run the CPU products with ``engine`` ("numpy" or "onednn"; skipped where oneDNN is not usable)."""
    if engine == "onednn" and sim._onednn_linear() is None:
        pytest.skip("torch's oneDNN op is not usable here")
    monkeypatch.setattr(sim, "_CPU_ENGINE", engine)
    assert sim.cpu_engine() == engine


def _numpy_tiles(V, tile, upper, distance, same):
    zero = sim._zero_rows(V)
    return [(r0, r1, c0, S.copy()) for r0, r1, c0, S in
            sim._blocks(V, zero, tile, "cpu", upper=upper, distance=distance, same=same)]


@pytest.mark.parametrize("upper", [True, False], ids=["upper", "full"])
@pytest.mark.parametrize("distance", [False, True], ids=["similarity", "distance"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_torch_tiles_equal_the_numpy_tiles(data, upper, distance, dtype):
    """The GPU code path (matmul, finishing and conversion on the device), run on torch's CPU
    device: the same blocks as the numpy path, exactly 1 / 0 where the numpy path sets them
    (diagonal, the all-zero row, byte-identical pairs across tiles), and a float16 block is
    the float32 block rounded once."""
    torch = pytest.importorskip("torch")
    same = sim._identical_pairs([[3, 40, 41], [100, 250]], N)
    zero = sim._zero_rows(data.V)
    precision = torch.get_float32_matmul_precision()
    want = _numpy_tiles(data.V, 37, upper, distance, same)
    got = [(r0, r1, c0, S.copy()) for r0, r1, c0, S in
           sim._torch_blocks(data.V, zero, 37, "cpu", upper=upper, distance=distance, reuse=True,
                             same=same, dtype=np.dtype(dtype))]
    assert [g[:3] for g in got] == [w[:3] for w in want]
    fixed_one = 0.0 if distance else 1.0
    for (r0, r1, c0, S), (_, _, _, W) in zip(got, want):
        assert S.dtype == np.dtype(dtype) and S.shape == W.shape
        tol = 1e-3 if dtype == "float16" else 1e-6
        np.testing.assert_allclose(S.astype(np.float64), W, atol=tol)
        exact = W == fixed_one  # set, not computed: the diagonal and identical pairs
        exact |= (W == (1.0 if distance else 0.0))  # the zero row/column
        assert exact.sum() >= r1 - r0 - 1
        assert np.array_equal(S[exact].astype(np.float32), W[exact])
    if dtype == "float16":  # the device's rounding is numpy's
        f32 = [S for *_, S in sim._torch_blocks(data.V, zero, 37, "cpu", upper=upper, distance=distance,
                                                 reuse=False, same=same, dtype=np.dtype("float32"))]
        f16 = [S for *_, S in got]
        for a, b in zip(f32, f16):
            assert np.array_equal(a.astype(np.float16).view(np.uint16), b.view(np.uint16))
    assert torch.get_float32_matmul_precision() == precision  # restored after the matmuls at "highest"


def test_torch_tiles_under_the_per_backend_precision_setting(data):
    """A caller who set torch's per-backend matmul precision (torch >= 2.9) makes torch refuse
    the legacy getter; the device tiles still run, at "ieee", and the caller's setting is back
    afterwards."""
    torch = pytest.importorskip("torch")
    matmul = getattr(torch.backends.cuda, "matmul", None)
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no per-backend precision setting")
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        zero = sim._zero_rows(data.V)
        seen = []
        with sim.torch_float32("cpu"):
            seen.append(matmul.fp32_precision)
        blocks = [S for *_, S in sim._torch_blocks(data.V, zero, 50, "cpu", upper=False, distance=False,
                                                   reuse=False, same=None, dtype=np.dtype("float32"))]
        np.testing.assert_allclose(np.vstack(blocks), data.ref, atol=1e-5)
        assert seen == ["ieee"] and matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_torch_tiles_fresh_blocks_are_not_reused(data):
    pytest.importorskip("torch")
    zero = sim._zero_rows(data.V)
    blocks = [S for *_, S in sim._torch_blocks(data.V, zero, 50, "cpu", upper=False, distance=False,
                                               reuse=False, same=None, dtype=np.dtype("float32"))]
    np.testing.assert_allclose(np.vstack(blocks), data.ref, atol=1e-5)


@pytest.mark.parametrize("suffix,dtype", [(".npy", "float16"), (".npy", "float32"), (".parquet", "float16")])
def test_export_through_the_gpu_tile_path_equals_the_cpu_export(data, tmp_path, monkeypatch, suffix, dtype):
    """export_similarity(device="cuda") with the device tiles computed by torch on the CPU:
    the float16 tiles that arrive already converted go through the mirroring and the
    writers like the CPU path's float32 ones, and the files agree."""
    pytest.importorskip("torch")
    real = sim._torch_blocks
    monkeypatch.setattr(sim, "_require_cuda", lambda device: None)
    monkeypatch.setattr(sim, "_torch_blocks", lambda V, zero, tile, device, **kw: real(V, zero, tile, "cpu", **kw))
    groups = [[3, 40], [100, 250, 251]]
    _export(data, tmp_path / f"cpu{suffix}", dtype=dtype, memory_limit_bytes=TINY_LIMIT, identical=groups)
    _export(data, tmp_path / f"gpu{suffix}", dtype=dtype, memory_limit_bytes=TINY_LIMIT, identical=groups,
            device="cuda")
    if suffix == ".npy":
        a, b = np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "gpu.npy")
        assert b.dtype == np.dtype(dtype) and np.array_equal(b, b.T)
        assert np.all(np.diag(b)[np.arange(N) != ZERO_ROW] == 1) and b[ZERO_ROW].max() == 0
        assert b[3, 40] == b[250, 100] == 1
    else:
        import pyarrow.parquet as pq
        ta, tb = pq.read_table(tmp_path / "cpu.parquet"), pq.read_table(tmp_path / "gpu.parquet")
        assert ta.column_names == tb.column_names and ta.schema == tb.schema
        for name in ("i", "j", "id_i", "id_j"):
            assert ta[name].equals(tb[name])
        a, b = (t["similarity"].to_numpy() for t in (ta, tb))
    np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), atol=1e-3 if dtype == "float16" else 1e-6)


# --------------------------------------------------------------------------- .npy


@pytest.mark.parametrize("dtype,atol", [("float32", 1e-5), ("float16", 2e-3)])
def test_npy_export_matches_brute_force(data, tmp_path, dtype, atol):
    out = tmp_path / "rdm.npy"
    calls = []
    summary = _export(data, out, dtype=dtype, memory_limit_bytes=TINY_LIMIT,
                      progress=lambda done, total: calls.append((done, total)))
    A = np.load(out)
    assert A.dtype == np.dtype(dtype) and A.shape == (N, N)
    np.testing.assert_allclose(A.astype(np.float64), data.ref, atol=atol)
    assert np.array_equal(A, A.T)  # exactly symmetric
    diag = np.diag(A)
    assert diag[ZERO_ROW] == 0
    assert np.all(np.delete(diag, ZERO_ROW) == 1)
    assert not np.isnan(A).any()
    # many tiles, N not a multiple of the tile
    tile = summary["tile_rows"]
    assert N % tile != 0 and -(-N // tile) >= 10
    assert calls[-1] == (N, N) and len(calls) == -(-N // tile)
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert summary["format"] == "npy" and summary["shape"] == (N, N)
    assert summary["bytes_written"] == out.stat().st_size + Path(str(out) + ".json").stat().st_size
    assert sorted(os.listdir(tmp_path)) == ["rdm.npy", "rdm.npy.json"]  # no temp files left


def test_npy_tile_size_does_not_change_result(data, tmp_path):
    a = _export(data, tmp_path / "a.npy", memory_limit_bytes=TINY_LIMIT)
    b = _export(data, tmp_path / "b.npy")  # default limit: one tile
    assert a["tile_rows"] < b["tile_rows"] == N
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-6)


def test_npy_distance_is_one_minus_similarity(data, tmp_path):
    _export(data, tmp_path / "s.npy", memory_limit_bytes=TINY_LIMIT)
    summary = _export(data, tmp_path / "d.npy", distance=True, memory_limit_bytes=TINY_LIMIT)
    S, D = np.load(tmp_path / "s.npy"), np.load(tmp_path / "d.npy")
    np.testing.assert_allclose(D, 1 - S, atol=1e-6)
    assert D[ZERO_ROW, ZERO_ROW] == 1.0 and D[0, 0] == 0.0
    assert summary["values"] == "distance"
    side = json.loads(Path(str(tmp_path / "d.npy") + ".json").read_text())
    assert side["distance"] is True and side["values"] == "distance"


def test_npy_multi_layer_shape_and_order(data, tmp_path):
    X2, V2 = _unit_vectors(N, 8, seed=5, zero_row=None)
    out = tmp_path / "multi.npy"
    summary = _export(data, out, layers={"fc": V2, "conv1": data.V}, memory_limit_bytes=TINY_LIMIT)
    A = np.load(out)
    assert A.shape == (2, N, N) and summary["shape"] == (2, N, N)
    np.testing.assert_allclose(A[0], _brute_cosine(X2), atol=1e-5)  # given order: fc first
    np.testing.assert_allclose(A[1], data.ref, atol=1e-5)
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["layers"] == ["fc", "conv1"]


def test_npy_sidecar_provenance(data, tmp_path):
    out = tmp_path / "rdm.npy"
    meta = {"model": "digits_cnn", "weights": "seed0", "store": "/stores/x", "reducer": {"conv1": {"k": K}}}
    _export(data, out, metadata=meta, metric="correlation", dtype="float16")
    side = json.loads(Path(str(out) + ".json").read_text(encoding="utf-8"))
    assert side["layers"] == ["conv1"]
    assert side["metric"] == "correlation"
    assert side["distance"] is False
    assert side["dtype"] == "float16"
    assert side["ids"] == data.ids.tolist()
    assert side["paths"] == data.paths  # exact, non-ASCII included
    assert side["labels"] == data.labels
    assert side["metadata"] == meta
    assert side["zero_rows"] == {"conv1": [ZERO_ROW]}
    assert side["shape"] == [N, N]


# --------------------------------------------------------------------------- .parquet


@pytest.mark.parametrize("triangle", ["full", "upper"])
def test_parquet_long_form_agrees_with_npy(data, tmp_path, triangle):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    layers, A = _two_layers_as_npy(data, tmp_path)
    out = tmp_path / "m.parquet"
    summary = _export(data, out, layers=layers, triangle=triangle, memory_limit_bytes=N * 200)
    pf = pq.ParquetFile(out)
    tile = summary["tile_rows"]
    assert 1 < tile < N
    n_tiles = -(-N // tile)
    assert pf.metadata.num_row_groups in (2 * n_tiles, 2 * n_tiles - 2)  # upper: last tile may be empty
    table = pf.read()
    assert table.schema.field("layer").type == pa.dictionary(pa.int8(), pa.string())
    for name, typ in [("i", pa.int32()), ("j", pa.int32()), ("id_i", pa.int64()),
                      ("id_j", pa.int64()), ("similarity", pa.float32())]:
        assert table.schema.field(name).type == typ
    cols = {c: table.column(c).to_numpy() for c in ("i", "j", "id_i", "id_j", "similarity")}
    layer = np.asarray(table.column("layer").to_pylist())
    expected_pairs = N * N if triangle == "full" else N * (N - 1) // 2
    assert table.num_rows == 2 * expected_pairs
    for li, name in enumerate(["conv1", "fc"]):
        sel = layer == name
        i, j = cols["i"][sel], cols["j"][sel]
        if triangle == "upper":
            assert np.all(i < j)
        assert len(set(zip(i.tolist(), j.tolist()))) == expected_pairs
        np.testing.assert_array_equal(cols["id_i"][sel], data.ids[i])
        np.testing.assert_array_equal(cols["id_j"][sel], data.ids[j])
        np.testing.assert_allclose(cols["similarity"][sel], A[li][i, j], atol=1e-6)
        if triangle == "full":  # the .npy's square itself (same tiles): equal and exactly symmetric
            square = np.empty((N, N), dtype=np.float32)
            square[i, j] = cols["similarity"][sel]
            np.testing.assert_array_equal(square, square.T)
            same_tiles = tmp_path / f"{name}_same_tiles.npy"
            _export(data, same_tiles, layers={name: layers[name]}, memory_limit_bytes=N * 200)
            np.testing.assert_array_equal(square, np.load(same_tiles))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".square"))]  # no scratch left
    meta = json.loads(pf.schema_arrow.metadata[b"vecsim"])
    assert meta["layers"] == ["conv1", "fc"] and meta["triangle"] == triangle
    assert meta["ids"] == data.ids.tolist() and meta["labels"] == data.labels


def test_parquet_distance_float16_column(data, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "d.parquet"
    _export(data, out, distance=True, dtype="float16", triangle="upper")
    table = pq.read_table(out)
    assert "distance" in table.column_names and "similarity" not in table.column_names
    i, j = table.column("i").to_numpy(), table.column("j").to_numpy()
    d = table.column("distance").to_numpy().astype(np.float64)
    np.testing.assert_allclose(d, 1 - data.ref[i, j], atol=2e-3)


# --------------------------------------------------------------------------- .h5 (rsatoolbox)


def test_hdf5_loads_with_rsatoolbox(data, tmp_path):
    rdm_mod = pytest.importorskip("rsatoolbox.rdm")
    layers, A = _two_layers_as_npy(data, tmp_path)
    out = tmp_path / "m.h5"
    _export(data, out, layers=layers, memory_limit_bytes=TINY_LIMIT)  # distance=False: still 1 - s
    rdms = rdm_mod.load_rdm(str(out), file_type="hdf5")
    assert rdms.n_rdm == 2 and rdms.n_cond == N
    assert rdms.dissimilarity_measure == "cosine"
    expected = 1.0 - A.astype(np.float64)
    for li in range(2):
        np.fill_diagonal(expected[li], 0.0)  # rsatoolbox's condensed form has no diagonal
    np.testing.assert_allclose(rdms.get_matrices(), expected, atol=1e-6)
    assert list(rdms.rdm_descriptors["layer"]) == ["conv1", "fc"]
    assert list(rdms.rdm_descriptors["index"]) == [0, 1]
    np.testing.assert_array_equal(np.asarray(rdms.pattern_descriptors["id"]), data.ids)
    ascii_paths = [p.encode("ascii", "backslashreplace").decode() for p in data.paths]
    assert list(rdms.pattern_descriptors["path"]) == ascii_paths
    assert list(rdms.pattern_descriptors["label"]) == ["" if lab is None else lab for lab in data.labels]
    import h5py

    with h5py.File(out, "r") as f:
        prov = json.loads(f.attrs["vecsim"])
    assert prov["paths"] == data.paths and prov["labels"] == data.labels
    assert prov["values"] == "distance" and prov["layers"] == ["conv1", "fc"]


def test_hdf5_correlation_metric_recorded(data, tmp_path):
    rdm_mod = pytest.importorskip("rsatoolbox.rdm")
    out = tmp_path / "c.hdf5"
    _export(data, out, metric="correlation", dtype="float16")
    rdms = rdm_mod.load_rdm(str(out), file_type="hdf5")
    assert rdms.dissimilarity_measure == "correlation" and rdms.n_rdm == 1


# --------------------------------------------------------------------------- errors and safety


def test_existing_output_raises_unless_overwrite(data, tmp_path):
    out = tmp_path / "rdm.npy"
    _export(data, out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        _export(data, out)
    _export(data, out, overwrite=True, distance=True)
    assert np.load(out)[0, 0] == 0.0  # replaced by the distance form
    (tmp_path / "x.parquet").write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        _export(data, tmp_path / "x.parquet")


def test_disk_space_error(data, tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskSpaceError) as err:
        _export(data, tmp_path / "rdm.npy")
    msg = str(err.value)
    assert "1000 bytes" in msg  # free
    needed = N * N * 4
    assert any(int(tok) >= needed for tok in msg.replace("(", " ").split() if tok.isdigit())
    assert isinstance(err.value, OSError)
    assert os.listdir(tmp_path) == []


def test_interrupted_export_leaves_nothing(data, tmp_path):
    out = tmp_path / "rdm.npy"

    def boom(done, total):
        if done > N // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _export(data, out, memory_limit_bytes=TINY_LIMIT, progress=boom)
    assert os.listdir(tmp_path) == []


def test_input_validation(data, tmp_path):
    out = tmp_path / "x.npy"
    with pytest.raises(DimensionMismatchError, match="same stimuli"):
        _export(data, out, layers={"a": data.V, "b": data.V[:-1]})
    with pytest.raises(DimensionMismatchError, match="2-D"):
        _export(data, out, layers={"a": data.V[0]})
    with pytest.raises(DimensionMismatchError, match="len\\(paths\\)"):
        sim.export_similarity({"a": data.V}, out, ids=data.ids, paths=data.paths[:-1],
                              labels=data.labels, metadata={})
    with pytest.raises(ConfigError, match="Parquet"):
        _export(data, out, triangle="upper")
    with pytest.raises(ConfigError, match="triangle"):
        _export(data, tmp_path / "x.parquet", triangle="lower")
    with pytest.raises(ConfigError, match="dtype"):
        _export(data, out, dtype="float64")
    with pytest.raises(ConfigError, match="metric"):
        _export(data, out, metric="euclidean")
    with pytest.raises(ConfigError, match=".npy, .parquet"):
        _export(data, tmp_path / "x.csv")
    with pytest.raises(ConfigError, match="norm"):
        _export(data, out, layers={"a": data.V * 3})
    with pytest.raises(ConfigError, match="JSON"):
        _export(data, out, metadata={"bad": object()})
    with pytest.raises(ConfigError, match="duplicates"):
        sim.export_similarity({"a": data.V}, out, ids=np.zeros(N, np.int64), paths=data.paths,
                              labels=data.labels, metadata={})
    assert os.listdir(tmp_path) == []


def test_float64_input_is_converted(data, tmp_path):
    out = tmp_path / "x.npy"
    _export(data, out, layers={"a": data.V.astype(np.float64)})
    np.testing.assert_allclose(np.load(out), data.ref, atol=1e-5)


def test_cuda_unavailable_raises_device_error(data, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(DeviceError, match="CUDA"):
        _export(data, tmp_path / "x.npy", device="cuda")
    assert os.listdir(tmp_path) == []


def test_module_import_is_light():
    code = (
        "import sys, vecsim.similarity; "
        "bad = [m for m in ('torch', 'lancedb', 'pyarrow', 'h5py') if m in sys.modules]; "
        "print(', '.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, f"imported at module load: {proc.stdout}{proc.stderr}"


def test_identical_rows_are_exactly_one_across_tiles_and_formats(data, tmp_path):
    """Byte-identical stimuli (groups of row positions) get similarity 1 / distance 0 in every
    tile and format, whichever triangle holds them; a zero row in a group stays 0."""
    pq = pytest.importorskip("pyarrow.parquet")
    rsa_rdm = pytest.importorskip("rsatoolbox.rdm")
    groups = [[3, 280], [40, 41, 200], [ZERO_ROW, 100]]
    want = data.ref.copy()
    for g in groups[:2]:
        for a in g:
            for b in g:
                want[a, b] = 1.0
    M = sim.similarity_matrix(data.V, identical=groups, memory_limit_bytes=TINY_LIMIT)
    np.testing.assert_allclose(M, want, atol=1e-5)
    assert M[ZERO_ROW, 100] == 0.0
    _export(data, tmp_path / "m.npy", memory_limit_bytes=TINY_LIMIT, identical=groups, distance=True)
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), 1 - want, atol=1e-5)
    _export(data, tmp_path / "m.parquet", memory_limit_bytes=TINY_LIMIT, identical=groups, triangle="upper")
    t = pq.read_table(tmp_path / "m.parquet")
    i, j, s = (t.column(c).to_numpy() for c in ("i", "j", "similarity"))
    np.testing.assert_allclose(s, want[i, j], atol=1e-5)
    _export(data, tmp_path / "m.h5", memory_limit_bytes=TINY_LIMIT, identical=groups)
    rdm = rsa_rdm.load_rdm(str(tmp_path / "m.h5"), file_type="hdf5").get_matrices()[0]
    assert rdm[3, 280] == rdm[41, 200] == 0.0
    with pytest.raises(ConfigError, match="outside"):
        sim.similarity_matrix(data.V, identical=[[0, N]])


@pytest.mark.parametrize("engine", ["numpy", "onednn"])
def test_tiles_hold_one_earlier_strip_at_a_time(engine, monkeypatch):
    # the export reads earlier rows back through file maps whose touched pages count as RSS:
    # each must be released before the next is asked for, or memory grows with N
    import weakref

    class Strip(np.ndarray):
        pass

    _, V = _unit_vectors(50, 6, seed=3, zero_row=None)
    n, tile = len(V), 7
    out = np.zeros((n, n), dtype=np.float32)
    live: list = []

    def target(r0, r1):
        return out[r0:r1]

    def source(s0, s1):
        assert all(ref() is None for ref in live), "an earlier strip is still held"
        strip = out[s0:s1].copy().view(Strip)
        live.append(weakref.ref(strip))
        return strip

    _force_engine(monkeypatch, engine)
    sim._fill_symmetric(V, np.zeros(n, bool), tile, "cpu", False, target, source, lambda r0, r1, rows: None)
    assert len(live) == sum(range(n // tile + 1))  # one strip per earlier tile, per tile
    np.testing.assert_allclose(out, np.clip(V @ V.T, -1, 1) * (1 - np.eye(n)) + np.eye(n), atol=1e-6)
    assert np.array_equal(out, out.T)


@pytest.mark.parametrize("path", ["cpu", "device tiles"])
def test_rows_are_handed_on_in_order_once_final(path, monkeypatch):
    # the .npy writer starts writing a chunk of rows as soon as _fill_symmetric hands it on:
    # every row must be final by then, handed on once, in order, tile after tile
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(sim, "_ROW_CHUNK", 4)  # several chunks per tile, a short last one
    _, V = _unit_vectors(61, 6, seed=5, zero_row=7)
    n, tile = len(V), 11
    zero = np.zeros(n, bool)
    zero[7] = True
    device = "cpu"
    if path == "device tiles":
        real = sim._torch_blocks
        monkeypatch.setattr(sim, "_require_cuda", lambda device: None)
        monkeypatch.setattr(sim, "_torch_blocks", lambda V, zero, t, d, **kw: real(V, zero, t, "cpu", **kw))
        device = "cuda"
    out = np.full((n, n), np.nan, dtype=np.float32)
    handed: list = []
    tiles_done: list = []

    def piece(a0, a1, rows):
        assert not np.isnan(rows).any() and rows.shape == (a1 - a0, n)
        handed.append((a0, a1, rows.copy()))

    def done(r0, r1, rows):
        assert handed[-1][1] == r1
        tiles_done.append((r0, r1))

    threads = torch.get_num_threads()
    sim._fill_symmetric(V, zero, tile, device, False, lambda a, b: out[a:b], lambda a, b: out[a:b], done,
                        piece=piece)
    assert torch.get_num_threads() == threads
    assert [(a0, a1) for a0, a1, _ in handed] == [
        (a0, min(r1, a0 + 4)) for r0, r1 in tiles_done for a0 in range(r0, r1, 4)]
    assert tiles_done == [(r0, min(n, r0 + tile)) for r0 in range(0, n, tile)]
    assert np.array_equal(np.concatenate([rows for *_, rows in handed]), out)  # unchanged after hand-on
    assert np.array_equal(out, out.T)
    np.testing.assert_allclose(out, sim.similarity_matrix(V), atol=1e-6)


def test_a_failing_worker_stops_the_export_cleanly(data, tmp_path, monkeypatch):
    # an error in a product worker reaches the caller; no file is left behind and torch's
    # thread count is restored
    torch = pytest.importorskip("torch")
    real = sim._cpu_rows
    calls = []

    def flaky(*args, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("simulated")
        return real(*args, **kw)

    monkeypatch.setattr(sim, "_cpu_rows", flaky)
    threads = torch.get_num_threads()
    with pytest.raises(MemoryError, match="simulated"):
        _export(data, tmp_path / "x.npy", memory_limit_bytes=TINY_LIMIT)
    assert torch.get_num_threads() == threads
    assert os.listdir(tmp_path) == []


def test_npy_writer_flushes_each_tile_and_preallocates(data, tmp_path, monkeypatch):
    # the writer asks for each piece's writeback and, at each tile's end, waits for the
    # previous tile's bytes: together they cover the data, in order; the file is preallocated
    started, waited, reserved = [], [], []
    real_start, real_wait, real_pre = sim.start_writeback, sim.wait_writeback, sim.preallocate
    monkeypatch.setattr(sim, "start_writeback", lambda fd, o, b: started.append((o, b)) or real_start(fd, o, b))
    monkeypatch.setattr(sim, "wait_writeback", lambda fd, o, b: waited.append((o, b)) or real_wait(fd, o, b))
    monkeypatch.setattr(sim, "preallocate", lambda fd, b: reserved.append(b) or real_pre(fd, b))
    summary = _export(data, tmp_path / "a.npy", memory_limit_bytes=TINY_LIMIT, dtype="float16")
    size = (tmp_path / "a.npy").stat().st_size
    header = size - N * N * 2
    assert reserved == [size]
    tile = summary["tile_rows"]
    last_tile_bytes = (N - (N - 1) // tile * tile) * N * 2
    # pieces: all the data; waits: every tile but the last, which the final fsync covers
    for ranges, left in ((started, 0), (waited, last_tile_bytes)):
        ends = header
        for offset, nbytes in ranges:
            assert offset == ends and nbytes > 0
            ends += nbytes
        assert size - ends == left
    assert len(waited) == -(-N // tile) - 1 and len(started) >= -(-N // tile)
    np.testing.assert_allclose(np.load(tmp_path / "a.npy").astype(np.float64), data.ref, atol=2e-3)


def test_npy_writer_without_sync_file_range_or_fallocate(data, tmp_path, monkeypatch):
    # where the kernel calls are missing the writer fdatasyncs each tile and the file is the same
    monkeypatch.setattr(sim, "start_writeback", lambda fd, o, b: False)
    monkeypatch.setattr(sim, "wait_writeback", lambda fd, o, b: False)
    monkeypatch.setattr(sim, "preallocate", lambda fd, b: False)
    syncs = []
    real = getattr(os, "fdatasync", os.fsync)
    monkeypatch.setattr(os, "fdatasync", lambda fd: syncs.append(fd) or real(fd), raising=False)
    summary = _export(data, tmp_path / "a.npy", memory_limit_bytes=TINY_LIMIT)
    assert len(syncs) == -(-N // summary["tile_rows"]) - 1  # each tile's end, for the tile before
    A = np.load(tmp_path / "a.npy")
    np.testing.assert_allclose(A.astype(np.float64), data.ref, atol=1e-5)
    assert np.array_equal(A, A.T)


def test_preallocate_and_writeback_calls_on_a_real_file(tmp_path):
    # the kernel calls the .npy writer uses: contents kept, blocks reserved, ranges flushed
    from vecsim import _io

    path = tmp_path / "f.bin"
    path.write_bytes(b"header")
    with open(path, "r+b") as fh:
        fd = fh.fileno()
        if not _io.preallocate(fd, 1 << 20):
            pytest.skip("this file system or platform has no fallocate")
        assert os.fstat(fd).st_size == 1 << 20 and os.fstat(fd).st_blocks * 512 >= 1 << 20
        assert not _io.preallocate(fd, 0)
        os.pwrite(fd, b"x" * 8192, 4096)
        if _io._sync_file_range() is not None:
            assert _io.start_writeback(fd, 4096, 8192) and _io.wait_writeback(fd, 4096, 8192)
            assert not _io.wait_writeback(-1, 0, 1)  # a failing call says so
    data = path.read_bytes()
    assert data[:6] == b"header" and data[4096:12288] == b"x" * 8192 and len(data) == 1 << 20


def test_float16_conversion_is_numpys_bit_for_bit():
    """The CPU tiles are converted by torch's cast: numpy's rounding for every finite float32
    (random bit patterns across the whole range, subnormal results, ties, signed zeros,
    overflow to inf), into a strided destination."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 0x7F800000, 300_000, dtype=np.uint32) | (rng.integers(0, 2, 300_000, dtype=np.uint32) << 31)
    src = bits.view(np.float32).reshape(100, 3000).copy()
    edge = np.array([0.0, -0.0, 1.0, -1.0, 2.0, 6.1e-5, 6.103515625e-05, 5.96e-8, 2**-24, 2**-25, 3 * 2**-25,
                     2**-26, 1e-30, 65504.0, -65504.0, 65519.0, 65520.0, 0.5 + 2**-12, 0.5 + 3 * 2**-12,
                     1 + 2**-11, 1 + 3 * 2**-11], dtype=np.float32)
    src[0, : len(edge)] = edge
    wide = np.zeros((100, 5000), dtype=np.float16)
    with np.errstate(over="ignore"):
        want = src.astype(np.float16)
    torch.from_numpy(wide[:, 1000:4000]).copy_(torch.from_numpy(src))
    np.testing.assert_array_equal(wide[:, 1000:4000].view(np.uint16), want.view(np.uint16))
    assert not wide[:, :1000].any() and not wide[:, 4000:].any()


@pytest.mark.parametrize("engine", ["numpy", "onednn"])
@pytest.mark.parametrize("chunks", [(7, 23), (256, 2048)], ids=["small-blocks", "default-blocks"])
def test_cpu_products_in_blocks_match_brute_force(data, tmp_path, monkeypatch, engine, chunks):
    """The CPU path computes each tile in blocks of rows x columns (finished and converted
    block by block, the upper triangle only where the caller mirrors): with blocks that do
    not divide N or the tiles, every output equals brute force, is exactly symmetric, and
    keeps the exact 1 / 0 entries (diagonal, all-zero row, byte-identical pairs)."""
    _force_engine(monkeypatch, engine)
    monkeypatch.setattr(sim, "_ROW_CHUNK", chunks[0])
    monkeypatch.setattr(sim, "_COL_BLOCK", chunks[1])
    groups = [[3, 40, 41], [100, 250]]
    ref = data.ref.copy()
    for g in groups:
        for i in g:
            for j in g:
                ref[i, j] = 1.0
    for limit in (TINY_LIMIT, sim.DEFAULT_MEMORY_LIMIT):
        for dtype, tol in (("float32", 1e-5), ("float16", 2e-3)):
            M = sim.similarity_matrix(data.V, dtype=dtype, memory_limit_bytes=limit, identical=groups)
            assert M.dtype == np.dtype(dtype) and np.array_equal(M, M.T)
            np.testing.assert_allclose(M.astype(np.float64), ref, atol=tol)
            assert M[ZERO_ROW].max() == 0.0 and M[3, 41] == M[250, 100] == 1.0
            assert (np.diag(M) == np.where(np.arange(N) == ZERO_ROW, 0, 1)).all()
            out = tmp_path / f"{engine}_{limit}_{dtype}.npy"
            _export(data, out, dtype=dtype, distance=True, memory_limit_bytes=limit, identical=groups)
            D = np.load(out)
            assert D.dtype == np.dtype(dtype) and np.array_equal(D, D.T)
            np.testing.assert_allclose(D.astype(np.float64), 1 - ref, atol=tol)
    zero = sim._zero_rows(data.V)
    same = sim._identical_pairs(groups, N)
    for upper in (True, False):
        for r0, r1, c0, S in sim._blocks(data.V, zero, 37, "cpu", upper=upper, same=same):
            np.testing.assert_allclose(S, ref[r0:r1, c0:], atol=1e-5)
            if upper:
                assert np.array_equal(S[:, : r1 - r0], S[:, : r1 - r0].T)
    tiles = np.vstack([b for _, _, b in sim.similarity_tiles(data.V, tile_rows=40)])
    np.testing.assert_allclose(tiles, data.ref, atol=1e-5)
