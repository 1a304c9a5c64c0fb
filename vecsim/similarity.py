"""Full pairwise similarity matrices (RDMs), computed and written tile by tile.

The store layer hands this module the stored vectors (one ``(N, k)`` float32
array per layer, rows in stimulus order): unit activation vectors projected, so
each row's norm is at most 1 (the share the projection keeps) and the dot
product of two rows estimates their cosine (or Pearson correlation when the
reducer centred the rows first; the vectors already encode which, ``metric``
only records it). It is clipped to ``[-1, 1]``. The diagonal is set
explicitly: exactly 1 for a non-zero row (a stimulus's cosine with itself,
which the projected vectors would estimate as less), exactly 0 for an all-zero
row (cosine 0 with everything, itself included, never NaN). The distance form
is ``1 - s``.

Memory stays bounded by ``memory_limit_bytes``: rows are processed in tiles of
``rows x N`` entries, and no output is ever held whole in RAM. Output formats
(picked by the suffix of ``out``):

``.npy``
    ``(N, N)`` for one layer, ``(L, N, N)`` for several (in the given layer
    order). Created with ``np.lib.format.open_memmap``, its blocks reserved with
    ``fallocate`` where the file system has it, and filled one row tile at a time:
    a writer thread writes rows as soon as they are final while the rest are
    computed, and asks the kernel to start each piece's writeback; only the upper
    triangle is computed, the lower one is read back from the rows already
    written, so the file is exactly symmetric and the matmul work is halved.
    Provenance goes to the sidecar ``<out>.json`` (same path + ``.json``).
``.parquet``
    Long form: ``layer`` (dictionary-encoded string), ``i``, ``j`` (int32 row
    positions), ``id_i``, ``id_j`` (int64 stimulus ids) and ``similarity`` or
    ``distance`` (float32/float16); one row group per tile. ``triangle="upper"``
    keeps only the pairs ``i < j`` (the diagonal is dropped). The full form is
    the ``.npy`` export's square, written to a scratch file beside the output
    and read back (so exactly symmetric, equal to the ``.npy``; the free-disk
    check counts the scratch). Provenance sits in the schema metadata under
    ``b"vecsim"``.
``.h5`` / ``.hdf5``
    The layout :meth:`rsatoolbox.rdm.RDMs.save` writes, so
    ``rsatoolbox.rdm.load_rdm(path, file_type="hdf5")`` returns an ``RDMs``
    with one RDM per layer. rsatoolbox stores *dissimilarities*, so the HDF5
    file always holds ``1 - s`` whatever ``distance`` says. rsatoolbox can only
    store ASCII strings and no ``None``: in the HDF5 descriptors a ``None``
    label becomes ``""`` and non-ASCII characters are backslash-escaped; the
    exact values are in the provenance JSON (root attribute ``vecsim``). The
    condensed form has no diagonal, so ``get_matrices()`` shows 0 there, also
    for an all-zero row (whose self-distance is 1 in the other formats).

On the CPU the products are computed in blocks of 256 rows x 2048 columns, each finished
and converted to the output dtype while it is in the core's cache, by oneDNN through torch
(which picks its kernels from the CPU at run time) or, where that op is missing or fails its
check against numpy, by numpy's BLAS (:func:`cpu_engine`); the two agree to float32 rounding.
For the full square (``.npy``, Parquet's full form, :func:`similarity_matrix`) one worker
thread per core computes chunks of 256 rows, each single-threaded: torch's intra-op thread
count is 1 for the duration of the call and restored afterwards.

With ``device="cuda"`` the tiles are computed on the GPU (:func:`_torch_blocks`): the
products, the finishing and the conversion to the output dtype run there, and the next tile
is computed while the host mirrors and writes the current one.

Every export writes to a temporary name in the target folder, fsyncs it and
``os.replace``-s it into place at the end, so an interrupted export never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import math
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from vecsim._io import (
    fsync_dir, fsync_path, human_bytes, json_default, package_versions, preallocate, start_writeback,
    wait_writeback,
)
from vecsim.errors import (
    ConfigError,
    DeviceError,
    DimensionMismatchError,
    DiskSpaceError,
    OutputExistsError,
)

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "cpu_engine",
    "export_similarity",
    "estimate_export_bytes",
    "similarity_matrix",
    "similarity_tiles",
]

DEFAULT_MEMORY_LIMIT = 256 * 2**20

_FORMATS = {".npy": "npy", ".parquet": "parquet", ".h5": "hdf5", ".hdf5": "hdf5"}
_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
_METRICS = ("cosine", "correlation")
_TRIANGLES = ("full", "upper")
_UNIT_TOL = 1e-2  # how far above 1 a caller's row norm may be: looser than a store's NORM_SLACK,
# since vectors passed in directly may have been kept in float16
_PROVENANCE_VERSION = 1


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #


def _as_vectors(vectors, name: str = "vectors") -> np.ndarray:
    """(N, k) float32 C-contiguous view of ``vectors``; copies only when needed."""
    arr = np.asarray(vectors)
    if arr.ndim != 2:
        raise DimensionMismatchError(
            f"{name} must be a 2-D (N, k) array, got shape {arr.shape}; pass one row per stimulus"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DimensionMismatchError(
            f"{name} is empty (shape {arr.shape}); export needs at least one stimulus and one dimension"
        )
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ConfigError(f"{name} has dtype {arr.dtype}; pass a float32 array of vectors")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    return arr


def _zero_rows(V: np.ndarray, name: str = "vectors") -> np.ndarray:
    """Boolean mask of all-zero rows; raises if a row is non-finite or longer than unit length."""
    sq = np.einsum("ij,ij->i", V, V, dtype=np.float64)
    bad = ~np.isfinite(sq)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ConfigError(
            f"{name} row {row} contains NaN or inf ({int(bad.sum())} such rows); "
            "fix or drop those stimuli before computing similarities"
        )
    zero = sq == 0.0
    off = np.sqrt(sq) - 1.0 > _UNIT_TOL
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ConfigError(
            f"{name} row {row} has L2 norm {math.sqrt(sq[row]):.4g}, above 1 "
            f"({int(off.sum())} such rows); pass L2-normalised vectors, or unit vectors projected "
            "as vecsim stores them (norm at most 1)"
        )
    return zero


def _check_device(device: str) -> str:
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:n]', got {device!r}")
    return device


def _check_memory_limit(memory_limit_bytes) -> int:
    if not isinstance(memory_limit_bytes, (int, np.integer)) or memory_limit_bytes <= 0:
        raise ConfigError(
            f"memory_limit_bytes must be a positive integer, got {memory_limit_bytes!r}"
        )
    return int(memory_limit_bytes)


def _tile_rows_for(n: int, bytes_per_entry: float, memory_limit_bytes: int) -> int:
    """Rows per tile so that ``rows * n * bytes_per_entry`` stays within the limit (>= 1)."""
    rows = int(memory_limit_bytes // max(1.0, n * bytes_per_entry))
    if rows > _ROW_CHUNK:  # whole chunks: the CPU product calls keep a few shapes
        rows -= rows % _ROW_CHUNK
    return max(1, min(n, rows))


def _condensed_offset(n: int, i: int) -> int:
    """Index in the condensed (scipy squareform) vector of the pair (i, i+1)."""
    return i * n - i * (i + 1) // 2


# --------------------------------------------------------------------------- #
# tile computation (shared by every format; only the matmul differs per device)
# --------------------------------------------------------------------------- #


def _require_cuda(device: str) -> None:
    """Raise DeviceError unless torch sees a CUDA device (imports torch: GPU path only)."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a dependency
        raise DeviceError(f"device={device!r} needs torch, which failed to import: {exc}") from exc
    if not torch.cuda.is_available():
        raise DeviceError(f"device={device!r} but CUDA is not available here; use device='cpu'")


def _finish(S: np.ndarray, r0: int, c0: int, zero: np.ndarray, distance: bool,
            same: np.ndarray | None = None) -> None:
    """In place: clip, exact diagonal, zero rows/columns, identical pairs, optional ``1 - s``.

    ``S`` holds rows ``r0:r0+len(S)`` and columns ``c0:c0+S.shape[1]`` of the similarity matrix.
    ``same`` is a (P, 2) array of row positions (both orders) of identical stimuli (the same model input),
    whose similarity is exactly 1 like the diagonal's.
    """
    R, C = S.shape
    np.clip(S, -1.0, 1.0, out=S)
    zr = zero[r0 : r0 + R]
    zc = zero[c0 : c0 + C]
    if zr.any():
        S[zr, :] = 0.0
    if zc.any():
        S[:, zc] = 0.0
    lo, hi = max(0, c0 - r0), min(R, c0 + C - r0)  # the rows whose diagonal is in the block
    if hi > lo:
        rows = np.arange(lo, hi)
        S[rows, rows + (r0 - c0)] = np.where(zr[lo:hi], 0.0, 1.0)
    if same is not None:  # never empty (_identical_pairs gives None then), sorted by row
        lo, hi = np.searchsorted(same[:, 0], [r0, r0 + R])
        i, j = same[lo:hi, 0], same[lo:hi, 1]
        sel = (j >= c0) & (j < c0 + S.shape[1]) & ~zero[i] & ~zero[j]
        S[i[sel] - r0, j[sel] - c0] = 1.0
    if distance:
        np.subtract(1.0, S, out=S)


def _blocks(
    V: np.ndarray,
    zero: np.ndarray,
    tile_rows: int,
    device: str,
    *,
    upper: bool,
    distance: bool = False,
    reuse: bool = True,
    same: np.ndarray | None = None,
    dtype: np.dtype = np.dtype(np.float32),
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """Yield ``(r0, r1, c0, S)``: finished block of rows r0:r1, columns c0:N, in ``dtype``
    (float32 or float16, converted once from the float32 products).

    ``upper`` computes only columns from ``r0`` on (``c0 = r0``), else all (``c0 = 0``); the
    block's square ``S[:, :r1 - r0]`` is then exactly symmetric. With ``reuse`` the block lives
    in a buffer that a later tile overwrites (the caller is done with it when it asks for the
    next one). On a GPU the tiles come from :func:`_torch_blocks`.
    """
    if device.startswith("cuda"):
        _require_cuda(device)
        yield from _torch_blocks(V, zero, tile_rows, device, upper=upper, distance=distance,
                                 reuse=reuse, same=same, dtype=dtype)
        return
    out_dtype = _tile_dtype(dtype)
    n = V.shape[0]
    buf = np.empty(tile_rows * n, dtype=out_dtype) if reuse else None
    for r0 in range(0, n, tile_rows):
        r1 = min(n, r0 + tile_rows)
        c0 = r0 if upper else 0
        shape = (r1 - r0, n - c0)
        S = buf[: shape[0] * shape[1]].reshape(shape) if reuse else np.empty(shape, dtype=out_dtype)
        _cpu_rows(V, zero, r0, c0, S, upper=upper, distance=distance, same=same)
        if upper:
            _symmetrize_diagonal_block(S[:, : r1 - r0])
        yield r0, r1, c0, S


# Products on the CPU are computed in blocks of _ROW_CHUNK rows x _COL_BLOCK columns (2 MiB of
# float32), each finished and converted into the output while it is still in the core's cache;
# a tile of rows is never held in float32 as well as in the output dtype.
_ROW_CHUNK = 256
_COL_BLOCK = 2048
# Which library computes the CPU products: None picks oneDNN (through torch) when it is there
# and gives numpy's results on a self-check, else numpy's BLAS; "numpy" or "onednn" forces one.
_CPU_ENGINE: str | None = None


@functools.lru_cache(maxsize=None)
def _onednn_linear():
    """torch's oneDNN inner product (``A @ B.T`` on dense float32 tensors), or None.

    oneDNN picks its kernels from the CPU's instruction set at run time; numpy's BLAS may be
    held to an older set (an ``OPENBLAS_CORETYPE`` setting, a generic build), which on an
    AVX-512 CPU halves its product rate. The op is torch's internal ``mkldnn._linear_pointwise``
    (the one torch's compiler emits for linear layers), so it is checked against numpy on
    first use and numpy is used whenever it is missing, fails or disagrees.
    """
    try:
        import torch

        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        rng = np.random.default_rng(0)
        A = rng.standard_normal((37, 70), dtype=np.float32)
        B = rng.standard_normal((53, 70), dtype=np.float32)
        got = op(torch.from_numpy(A), torch.from_numpy(B), None, "none", [], "").numpy()
        want = A.astype(np.float64) @ B.astype(np.float64).T
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-4):
            return None
        return op
    except Exception:  # noqa: BLE001 - any failure means: use numpy
        return None


def cpu_engine() -> str:
    """The library that computes similarity products on the CPU: ``"onednn"`` or ``"numpy"``."""
    if _CPU_ENGINE == "numpy":
        return "numpy"
    if _onednn_linear() is not None:
        return "onednn"
    if _CPU_ENGINE == "onednn":
        raise DeviceError("the oneDNN product path was asked for but torch's oneDNN op is not usable here")
    return "numpy"


def _tile_dtype(dtype) -> np.dtype:
    """The dtype tiles are produced in: float16 for a float16 output, else float32."""
    return np.dtype(np.float16 if np.dtype(dtype) == np.float16 else np.float32)


def _tensor(a: np.ndarray):
    """``torch.from_numpy`` without torch's warning for a read-only array (a store's memory
    map, an earlier tile's file map): vecsim only reads those."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def _product_blocks(V: np.ndarray, r0: int, r1: int, c0: int, c1: int, upper: bool):
    """Yield ``(a0, b0, P)``: ``V[a0:a0+len(P)] @ V[b0:b0+P.shape[1]].T`` as float32 numpy
    blocks of at most _ROW_CHUNK × _COL_BLOCK covering rows r0:r1 × columns c0:c1 (with
    ``upper``, a chunk of rows starting at a0 only from column max(c0, a0)), computed by
    :func:`cpu_engine`'s library. A block is valid until the next one is asked for."""
    op = _onednn_linear() if cpu_engine() == "onednn" else None
    Vt = _tensor(V)
    scratch = None if op is not None else np.empty(_ROW_CHUNK * _COL_BLOCK, dtype=np.float32)
    for a0 in range(r0, r1, _ROW_CHUNK):
        a1 = min(r1, a0 + _ROW_CHUNK)
        for b0 in range(max(c0, a0) if upper else c0, c1, _COL_BLOCK):
            b1 = min(c1, b0 + _COL_BLOCK)
            if op is not None:
                yield a0, b0, op(Vt[a0:a1], Vt[b0:b1], None, "none", [], "").numpy()
            else:
                P = scratch[: (a1 - a0) * (b1 - b0)].reshape(a1 - a0, b1 - b0)
                np.matmul(V[a0:a1], V[b0:b1].T, out=P)
                yield a0, b0, P


def _cpu_rows(V: np.ndarray, zero: np.ndarray, r0: int, c0: int, out: np.ndarray, *, upper: bool,
              distance: bool, same: np.ndarray | None) -> None:
    """Fill ``out`` (rows ``r0:r0+len(out)``, columns ``c0:c0+out.shape[1]``) with finished
    similarities (:func:`_finish`) in ``out``'s dtype (float32 or float16; ``out`` may be a
    strided view). With ``upper`` a chunk of rows starting at ``a0`` skips the columns
    below ``a0``: the lower triangle of the tile's diagonal square is left for
    :func:`_symmetrize_diagonal_block`."""
    R, C = out.shape
    out_t = _tensor(out)
    for a0, b0, P in _product_blocks(V, r0, r0 + R, c0, c0 + C, upper):
        _finish(P, a0, b0, zero, distance, same)
        a1, b1 = a0 + P.shape[0], b0 + P.shape[1]
        out_t[a0 - r0 : a1 - r0, b0 - c0 : b1 - c0].copy_(_tensor(P))  # torch's cast: numpy's rounding, vectorised


def _torch_blocks(V, zero, tile_rows, device, *, upper, distance, reuse, same, dtype):
    """:func:`_blocks` with torch on ``device``: the matmul, the finishing (clip, diagonal,
    zero rows, identical pairs, ``1 - s``) and the conversion to ``dtype`` all run on the
    device, and only finished tiles cross to the host. On CUDA, tile t+1 is computed while
    the caller works on tile t, and tiles come back through one page-locked (pinned) host
    buffer, which copies several times faster than ordinary memory. ``V`` is copied to the
    device once. float32 matmuls run at "highest" precision (no TF32), so the tiles match
    the CPU ones to float32 rounding; the previous setting is restored. Also runs on torch's
    CPU device (no pinning, no overlap), which is how the tests check it without a GPU.
    """
    import torch

    cuda = str(device).startswith("cuda")
    out_dtype = _tile_dtype(dtype)
    tdt = torch.float16 if out_dtype == np.float16 else torch.float32
    n = V.shape[0]
    with torch_float32(device):
        try:
            Vd = torch.from_numpy(np.array(V, dtype=np.float32, copy=True)).to(device)
            zd = torch.from_numpy(np.ascontiguousarray(zero, dtype=bool)).to(device)
            host = torch.empty(tile_rows * n, dtype=tdt, pin_memory=cuda)
            starts = list(range(0, n, tile_rows))

            def compute(r0: int):
                r1 = min(n, r0 + tile_rows)
                c0 = r0 if upper else 0
                S = Vd[r0:r1] @ Vd[c0:].T
                _finish_torch(S, r0, c0, zd, distance, same, zero)
                return r0, r1, c0, S.to(tdt)

            ahead = compute(starts[0])
            for t in range(len(starts)):
                r0, r1, c0, S = ahead
                h = host[: S.numel()].view(S.shape)
                h.copy_(S, non_blocking=cuda)
                if cuda:
                    done = torch.cuda.Event()
                    done.record(torch.cuda.current_stream(Vd.device))
                del S
                # queued behind the copy: the device computes the next tile while the caller works
                ahead = compute(starts[t + 1]) if t + 1 < len(starts) else None
                if cuda:
                    done.synchronize()
                if reuse:
                    yield r0, r1, c0, h.numpy()
                else:  # a fresh array; torch's host copy runs on all its threads, numpy's on one
                    block = np.empty(tuple(h.shape), dtype=out_dtype)
                    torch.from_numpy(block).copy_(h)
                    yield r0, r1, c0, block
        finally:
            Vd = zd = host = ahead = None  # released before torch_float32 empties the cache


@contextlib.contextmanager
def torch_float32(device: str):
    """torch float32 matrix products at "highest" precision (no TF32) for the duration, so
    GPU results match the CPU's to float32 rounding; the previous setting is restored and,
    on CUDA, the allocator's cache emptied at the end (drop device tensors before leaving)."""
    import torch

    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch >= 2.9 refuses the legacy setting once the caller used the
        matmul = torch.backends.cuda.matmul  # per-backend one: stay with that one
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"

        def restore() -> None:
            matmul.fp32_precision = previous
    else:
        torch.set_float32_matmul_precision("highest")

        def restore() -> None:
            torch.set_float32_matmul_precision(previous)
    try:
        yield
    finally:
        restore()
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()


def _finish_torch(S, r0: int, c0: int, zd, distance: bool, same: np.ndarray | None,
                  zero: np.ndarray) -> None:
    """:func:`_finish` for a torch block on its device, with no host-device synchronisation
    (the masks are applied whole; the identical pairs are selected on the host)."""
    import torch

    R, C = S.shape
    S.clamp_(-1.0, 1.0)
    S.masked_fill_(zd[r0 : r0 + R, None] | zd[None, c0 : c0 + C], 0.0)
    lo, hi = max(0, c0 - r0), min(R, C - (r0 - c0))  # the rows whose diagonal is in the block
    if hi > lo:
        rows = torch.arange(lo, hi, device=S.device)
        S[rows, rows + (r0 - c0)] = (~zd[r0 + rows]).to(S.dtype)
    if same is not None:
        lo, hi = np.searchsorted(same[:, 0], [r0, r0 + R])
        i, j = same[lo:hi, 0], same[lo:hi, 1]
        sel = (j >= c0) & (j < c0 + C) & ~zero[i] & ~zero[j]
        if sel.any():
            S[torch.from_numpy(i[sel] - r0).to(S.device), torch.from_numpy(j[sel] - c0).to(S.device)] = 1.0
    if distance:
        S.neg_().add_(1.0)


_TRIL = {}


def _symmetrize_square(sq: np.ndarray) -> None:
    """Copy the strict upper triangle of the small square ``sq`` onto its lower triangle."""
    m = sq.shape[0]
    if m not in _TRIL:
        _TRIL[m] = np.tril_indices(m, -1)
    i, j = _TRIL[m]
    sq[i, j] = sq[j, i]


def _symmetrize_diagonal_block(D: np.ndarray) -> None:
    """Copy the strict upper triangle of the square block ``D`` onto its lower triangle
    (chunk by chunk: a transposed copy below each chunk's square, index pairs inside it)."""
    import torch

    R = D.shape[0]
    for a0 in range(0, R, _ROW_CHUNK):
        a1 = min(R, a0 + _ROW_CHUNK)
        _symmetrize_square(D[a0:a1, a0:a1])
        if a1 < R:
            torch.from_numpy(D[a1:, a0:a1]).copy_(torch.from_numpy(D[a0:a1, a1:]).T)


def _fill_symmetric(
    V: np.ndarray,
    zero: np.ndarray,
    tile_rows: int,
    device: str,
    distance: bool,
    target: Callable[[int, int], np.ndarray],
    source: Callable[[int, int], np.ndarray],
    done: Callable[[int, int, np.ndarray], None],
    same: np.ndarray | None = None,
    dtype: np.dtype = np.dtype(np.float32),
    piece: Callable[[int, int, np.ndarray], None] | None = None,
) -> None:
    """Fill an (N, N) matrix one row tile at a time, computing only the upper triangle.

    For each tile ``target(r0, r1)`` gives a writable ``(r1 - r0, N)`` array (of ``dtype``)
    for its rows; columns ``:r0`` are first filled with the transpose of the rows already
    finished, which ``source(s0, s1)`` returns (one earlier tile at a time, ``s0``/``s1`` on
    tile boundaries). Then the tile's rows are completed chunk by chunk (_ROW_CHUNK rows):
    the chunk's columns from its first row on come from the products, the columns between
    the tile's first row and the chunk's are the transpose of the tile's earlier chunks, and
    ``piece(a0, a1, rows)`` (when given) is called as soon as rows ``a0:a1`` are final, so a
    writer can start on them while the rest of the tile is computed. The result is exactly
    symmetric. ``done(r0, r1, rows)`` is called once the tile is complete.
    On the CPU the products are finished and converted straight into the target by worker
    threads (:func:`_fill_symmetric_cpu`), which ask for the next tile's target once the
    current tile's earlier columns are filled (so a caller with two buffers must not reuse
    the one read by ``source`` before that); on a GPU the tiles arrive finished and
    converted (:func:`_torch_blocks`) and are copied in.
    """
    import torch

    if not device.startswith("cuda"):
        _fill_symmetric_cpu(V, zero, tile_rows, distance, target, source, done, same, piece)
        return
    for r0, r1, _c0, S in _blocks(V, zero, tile_rows, device, upper=True, distance=distance, same=same,
                                  dtype=dtype):
        dst = target(r0, r1)
        dst_t = torch.from_numpy(dst)
        _mirror_earlier_tiles(dst_t, r0, r1, tile_rows, source)
        for a0 in range(r0, r1, _ROW_CHUNK):
            a1 = min(r1, a0 + _ROW_CHUNK)
            torch.from_numpy(dst[a0 - r0 : a1 - r0, a0:]).copy_(torch.from_numpy(S[a0 - r0 : a1 - r0, a0 - r0 :]))
            _symmetrize_square(dst[a0 - r0 : a1 - r0, a0:a1])
            _complete_chunk(dst, dst_t, r0, a0, a1, piece)
        done(r0, r1, dst)
        del dst, dst_t


def _mirror_earlier_tiles(dst_t, r0: int, r1: int, tile_rows: int, source) -> None:
    """Columns ``:r0`` of the tile of rows ``r0:r1``: the transpose of the earlier tiles'
    columns ``r0:r1``, one earlier tile's strip at a time."""
    for s0 in range(0, r0, tile_rows):
        s1 = min(r0, s0 + tile_rows)
        src = source(s0, s1)
        dst_t[:, s0:s1].copy_(_tensor(src[:, r0:r1]).T)
        del src  # a file map is unmapped here, keeping RSS to one tile's strip


def _complete_chunk(dst, dst_t, r0: int, a0: int, a1: int, piece) -> None:
    """Rows ``a0:a1`` of the tile starting at ``r0``, whose own columns (``a0:``) are done:
    columns ``r0:a0`` are the transpose of the tile's earlier chunks; then ``piece``."""
    if a0 > r0:
        dst_t[a0 - r0 : a1 - r0, r0:a0].copy_(dst_t[: a0 - r0, a0:a1].T)
    if piece is not None:
        piece(a0, a1, dst[a0 - r0 : a1 - r0])


def _cpu_workers() -> int:
    """Threads that compute CPU products: one per core this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _torch_threads(k: int):
    """torch's intra-op thread count set to ``k`` for the duration, then restored."""
    import torch

    previous = torch.get_num_threads()
    if previous == k:
        yield
        return
    torch.set_num_threads(k)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fill_symmetric_cpu(V, zero, tile_rows, distance, target, source, done, same, piece) -> None:
    """:func:`_fill_symmetric` on the CPU. One worker thread per core computes the tile's
    chunks of rows (products, finishing, conversion into the target, the chunk's own square
    made symmetric), each single-threaded, while this thread fills the tile's columns from
    the earlier tiles (their transpose) and completes the chunks in order as they arrive,
    handing each to ``piece``. Single-threaded workers instead of torch's threads inside one
    product: a core is never left waiting at the end of a parallel product, or spinning for
    the next one, while there is conversion, mirroring or writing to do."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    n = V.shape[0]

    def chunk(rows: np.ndarray, a0: int) -> None:
        _cpu_rows(V, zero, a0, a0, rows[:, a0:], upper=True, distance=distance, same=same)
        _symmetrize_square(rows[:, a0 : a0 + len(rows)])

    tiles = [(r0, min(n, r0 + tile_rows)) for r0 in range(0, n, tile_rows)]
    launched: list = []

    def launch(r0: int, r1: int) -> None:
        dst = target(r0, r1)
        starts = range(r0, r1, _ROW_CHUNK)
        launched.append((dst, starts, [pool.submit(chunk, dst[a0 - r0 : min(r1, a0 + _ROW_CHUNK) - r0], a0)
                                       for a0 in starts]))

    with _torch_threads(1), ThreadPoolExecutor(_cpu_workers(), thread_name_prefix="vecsim-sim") as pool:
        try:
            launch(*tiles[0])
            for k, (r0, r1) in enumerate(tiles):
                dst, starts, futures = launched.pop(0)
                dst_t = torch.from_numpy(dst)
                _mirror_earlier_tiles(dst_t, r0, r1, tile_rows, source)
                if k + 1 < len(tiles):  # queued behind this tile's chunks: no worker waits at its end
                    launch(*tiles[k + 1])  # (after the mirror: it may reuse the buffer read there)
                for a0, fut in zip(starts, futures):
                    fut.result()
                    _complete_chunk(dst, dst_t, r0, a0, min(r1, a0 + _ROW_CHUNK), piece)
                done(r0, r1, dst)
                del dst, dst_t
        except BaseException:
            for _dst, _starts, futures in launched:  # nothing more is computed into targets the caller drops
                for fut in futures:
                    fut.cancel()
            raise


# --------------------------------------------------------------------------- #
# public in-memory API
# --------------------------------------------------------------------------- #


def similarity_tiles(vectors: np.ndarray, tile_rows: int | None = None, device: str = "cpu"):
    """Yield ``(row_start, row_stop, block)`` with ``block = vectors[row_start:row_stop] @ vectors.T``.

    ``vectors`` is ``(N, k)`` float32, C-contiguous (a ``np.memmap`` works), rows
    norm at most 1 or all-zero. Each block is a fresh float32 ``(rows, N)`` array,
    clipped to [-1, 1] with the exact diagonal (1, or 0 for an all-zero row).
    ``tile_rows`` defaults to what fits in :data:`DEFAULT_MEMORY_LIMIT`.
    ``device="cuda"`` computes and finishes the blocks with torch on the GPU.
    """
    V = _as_vectors(vectors)
    zero = _zero_rows(V)
    _check_device(device)
    n = V.shape[0]
    if tile_rows is None:
        tile_rows = _tile_rows_for(n, 4, DEFAULT_MEMORY_LIMIT)
    if not isinstance(tile_rows, (int, np.integer)) or tile_rows <= 0:
        raise ConfigError(f"tile_rows must be a positive integer, got {tile_rows!r}")
    for r0, r1, _c0, S in _blocks(V, zero, int(tile_rows), device, upper=False, reuse=False):
        yield r0, r1, S


def similarity_matrix(
    vectors: np.ndarray,
    dtype: str = "float32",
    distance: bool = False,
    *,
    device: str = "cpu",
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
    identical: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """The whole ``(N, N)`` similarity (or ``1 - s`` distance) matrix in memory.

    For small N only: the result alone takes ``N * N * itemsize`` bytes (the
    working tiles are bounded by ``memory_limit_bytes`` on top of it). Exactly
    symmetric, diagonal 1 (0 for an all-zero row; reversed for distances).
    ``identical``: groups of row positions of identical stimuli (similarity 1).
    """
    V = _as_vectors(vectors)
    zero = _zero_rows(V)
    same = _identical_pairs(identical, V.shape[0])
    dt = _check_dtype(dtype)
    _check_device(device)
    limit = _check_memory_limit(memory_limit_bytes)
    n = V.shape[0]
    out = np.empty((n, n), dtype=dt)
    tile_rows = _tile_rows_for(n, 4 + dt.itemsize, limit)
    _fill_symmetric(
        V, zero, tile_rows, device, bool(distance),
        target=lambda a, b: out[a:b],
        source=lambda a, b: out[a:b],
        done=lambda a, b, rows: None,
        same=same,
        dtype=dt,
    )
    return out


def _identical_pairs(groups, n: int) -> np.ndarray | None:
    """Groups of row positions → a (P, 2) int64 array of every ordered pair within a group,
    sorted by row (so each tile takes its rows' pairs by bisection)."""
    if not groups:
        return None
    pairs = []
    for group in groups:
        g = np.unique(np.asarray(list(group), dtype=np.int64))
        if len(g) and (g.min() < 0 or g.max() >= n):
            raise ConfigError(f"identical rows {g.tolist()} are outside 0..{n - 1}")
        a, b = np.meshgrid(g, g, indexing="ij")
        keep = a != b
        pairs.append(np.stack([a[keep], b[keep]], axis=1))
    out = np.concatenate(pairs)
    out = out[np.argsort(out[:, 0], kind="stable")]
    return out if len(out) else None


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #


def _check_dtype(dtype) -> np.dtype:
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name if dtype is not None else None
    if key not in _DTYPES:
        raise ConfigError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    return _DTYPES[key]


def _ascii(values) -> np.ndarray:
    """Fixed-length ASCII bytes as rsatoolbox writes strings (None -> '', escapes non-ASCII)."""
    enc = [("" if v is None else str(v)).encode("ascii", "backslashreplace") for v in values]
    width = max([1] + [len(e) for e in enc])
    return np.array(enc, dtype=f"S{width}")


def _parquet_bytes_per_entry(n: int, itemsize: int) -> float:
    # value column (incompressible) + j and id_j as dictionary indices of
    # ceil(log2 N) bits each + a little for i/id_i/layer runs and page headers.
    # Past pyarrow's 1 MiB dictionary page the columns fall back to plain encoding.
    bits = max(1, math.ceil(math.log2(max(n, 2))))
    j_bytes = bits / 8 if n * 4 <= 2**20 else 4
    id_j_bytes = bits / 8 if n * 8 <= 2**20 else 8
    return itemsize + j_bytes + id_j_bytes + 0.25


def estimate_export_bytes(
    fmt: str, n: int, n_layers: int, dtype: str = "float32", triangle: str = "full",
    *, strings_bytes: int = 0, provenance_bytes: int = 0,
) -> int:
    """Bytes the export will need on disk (exact for .npy/.h5 data, an estimate for Parquet)."""
    itemsize = _check_dtype(dtype).itemsize
    if fmt == "npy":
        return 4096 + n_layers * n * n * itemsize + provenance_bytes
    if fmt == "hdf5":
        return (
            64 * 1024
            + n_layers * (n * (n - 1) // 2) * itemsize
            + n * 16 + n_layers * 8 + strings_bytes + provenance_bytes
        )
    if fmt == "parquet":
        pairs = n * n if triangle == "full" else n * (n - 1) // 2
        scratch = 4096 + n * n * itemsize if triangle == "full" else 0  # one layer's square, see _write_parquet_full
        return int(2**20 + n_layers * pairs * _parquet_bytes_per_entry(n, itemsize) + scratch + 2 * provenance_bytes)
    raise ConfigError(f"unknown format {fmt!r}")  # pragma: no cover


def export_similarity(
    layers: Mapping[str, np.ndarray],
    out: str | Path,
    *,
    ids: np.ndarray,
    paths: list[str],
    labels: list[str | None],
    metadata: dict,
    metric: str = "cosine",
    distance: bool = False,
    dtype: str = "float32",
    triangle: str = "full",
    overwrite: bool = False,
    memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    identical: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Write the full pairwise similarity matrix of every layer to ``out``.

    ``layers`` maps layer name to ``(N, k)`` float32 vectors of norm at most 1 (same N
    and row order for all; k may differ). The suffix of ``out`` picks the
    format (``.npy``, ``.parquet``, ``.h5``/``.hdf5``; see the module doc).
    ``distance`` writes ``1 - s`` (HDF5 always holds ``1 - s``). ``triangle``
    ``"upper"`` (Parquet only) keeps the pairs ``i < j``. The working tiles stay
    within ``memory_limit_bytes`` (at least one row). ``progress`` is called
    after each tile with ``(done_rows, total_rows)`` summed over all layers.

    Returns a summary dict: ``path``, ``files``, ``format``, ``shape``,
    ``layers``, ``n``, ``dtype``, ``metric``, ``values`` ("similarity" or
    ``"distance"``), ``triangle``, ``bytes_written``, ``bytes_estimated``,
    ``tile_rows``, ``device``, ``products`` (what computed the matrix products: ``"onednn"``
    or ``"numpy"`` on the CPU, see :func:`cpu_engine`), ``elapsed_s``.

    Raises OutputExistsError, DiskSpaceError, DimensionMismatchError,
    ConfigError, DeviceError.
    """
    t_start = time.perf_counter()

    # ---- parameters ----------------------------------------------------------
    out = Path(out)
    fmt = _FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"cannot tell the export format from {out.name!r}; "
            "end the file name in .npy, .parquet, .h5 or .hdf5"
        )
    if metric not in _METRICS:
        raise ConfigError(f"metric must be 'cosine' or 'correlation', got {metric!r}")
    dt = _check_dtype(dtype)
    dtype = dt.name
    if triangle not in _TRIANGLES:
        raise ConfigError(f"triangle must be 'full' or 'upper', got {triangle!r}")
    if triangle == "upper" and fmt != "parquet":
        raise ConfigError(
            f"triangle='upper' is only for Parquet exports (got {out.suffix}); "
            "use a .parquet output or triangle='full'"
        )
    _check_device(device)
    if device.startswith("cuda"):
        _require_cuda(device)
    limit = _check_memory_limit(memory_limit_bytes)
    distance = bool(distance)
    values_name = "distance" if (distance or fmt == "hdf5") else "similarity"

    # ---- vectors and descriptors --------------------------------------------
    if not isinstance(layers, Mapping) or len(layers) == 0:
        raise ConfigError("layers must be a non-empty dict of layer name -> (N, k) vectors")
    names = [str(name) for name in layers]
    if len(set(names)) != len(names):
        raise ConfigError(f"layer names must be distinct, got {names}")
    mats: list[np.ndarray] = []
    zeros: list[np.ndarray] = []
    n = None
    for name, vec in layers.items():
        V = _as_vectors(vec, f"layer {name!r}")
        if n is None:
            n = V.shape[0]
        elif V.shape[0] != n:
            raise DimensionMismatchError(
                f"layer {name!r} has {V.shape[0]} rows but layer {names[0]!r} has {n}; "
                "every layer must hold the same stimuli in the same order"
            )
        mats.append(V)
        zeros.append(_zero_rows(V, f"layer {name!r}"))
    n = int(n)  # set: layers is non-empty
    same = _identical_pairs(identical, n)
    if fmt == "hdf5" and n < 2:
        raise DimensionMismatchError(
            f"an rsatoolbox RDM needs at least 2 stimuli, got {n}; use .npy for a single stimulus"
        )

    ids_arr = np.asarray(ids)
    if ids_arr.ndim != 1 or not (np.issubdtype(ids_arr.dtype, np.integer) or ids_arr.size == 0):
        raise ConfigError(f"ids must be a 1-D integer array, got shape {ids_arr.shape} dtype {ids_arr.dtype}")
    ids_arr = ids_arr.astype(np.int64, copy=False)
    paths = list(paths)
    labels = list(labels)
    for what, seq in (("ids", ids_arr), ("paths", paths), ("labels", labels)):
        if len(seq) != n:
            raise DimensionMismatchError(
                f"len({what}) is {len(seq)} but the vectors have {n} rows; "
                "pass one id, path and label per row, in row order"
            )
    if len(np.unique(ids_arr)) != n:
        raise ConfigError("ids contain duplicates; every row must be a distinct stimulus")

    L = len(names)
    if fmt == "npy":
        shape: tuple[int, ...] = (n, n) if L == 1 else (L, n, n)
    elif fmt == "hdf5":
        shape = (L, n * (n - 1) // 2)
    else:
        shape = (L * (n * n if triangle == "full" else n * (n - 1) // 2),)

    # ---- provenance ------------------------------------------------------------
    provenance = {
        "vecsim_similarity_version": _PROVENANCE_VERSION,
        "format": fmt,
        "file": out.name,
        "layers": names,
        "layer_order": "as given; .npy axis 0 / HDF5 rdm index / Parquet 'layer'",
        "n": n,
        "shape": list(shape),
        "metric": metric,
        "values": values_name,
        "distance": values_name == "distance",
        "dtype": dtype,
        "triangle": triangle,
        "diagonal": "similarity 1 for non-zero rows, 0 for all-zero rows (distance = 1 - similarity)",
        "zero_rows": {name: np.flatnonzero(z).tolist() for name, z in zip(names, zeros)},
        "identical_rows": [sorted(int(i) for i in g) for g in (identical or [])],
        "ids": ids_arr.tolist(),
        "paths": [str(p) for p in paths],
        "labels": [None if lab is None else str(lab) for lab in labels],
        "metadata": metadata,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(extra=("h5py", "rsatoolbox")),
        "products": "torch on " + device if device.startswith("cuda") else cpu_engine(),
    }
    try:
        prov_json = json.dumps(provenance, default=json_default, allow_nan=False, indent=1)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"metadata is not JSON-serialisable ({exc}); pass plain dicts, lists, strings and numbers"
        ) from exc

    # ---- target, existing output, disk space ------------------------------------
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"output folder {parent} does not exist; create it first")
    sidecar = Path(str(out) + ".json") if fmt == "npy" else None
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; pass a file name ending in .npy, .parquet, .h5 or .hdf5")
    if not overwrite:
        for p in (out, sidecar):
            if p is not None and p.exists():
                raise OutputExistsError(f"{p} already exists; pass --overwrite to replace it or choose another name")

    strings_bytes = 0
    if fmt == "hdf5":
        strings_bytes = _ascii(paths).nbytes + _ascii(labels).nbytes + _ascii(names).nbytes
    needed = estimate_export_bytes(
        fmt, n, L, dtype, triangle, strings_bytes=strings_bytes, provenance_bytes=len(prov_json)
    )
    free = shutil.disk_usage(parent).free
    if needed > free:
        hint = " or use dtype='float16'" if dtype == "float32" else ""
        if fmt == "parquet" and triangle == "full":
            hint += " or triangle='upper'"
        raise DiskSpaceError(
            f"not enough free disk space in {parent}: the export needs {human_bytes(needed)} "
            f"({needed} bytes) but only {human_bytes(free)} ({free} bytes) are free; "
            f"free some space, write elsewhere{hint}"
        )

    # ---- write ------------------------------------------------------------------
    token = uuid.uuid4().hex[:8]
    tmp = parent / f".{out.name}.{token}.tmp"
    tmp_side = parent / f".{out.name}.json.{token}.tmp" if sidecar is not None else None
    total_rows = L * n
    done = [0]

    def tick(rows: int) -> None:
        done[0] += rows
        if progress is not None:
            progress(done[0], total_rows)

    common = dict(
        mats=mats, zeros=zeros, n=n, dt=dt, limit=limit, device=device, tick=tick, same=same,
    )
    try:
        if fmt == "npy":
            tile_rows = _write_npy(tmp, shape=shape, distance=distance, **common)
        elif fmt == "parquet":
            tile_rows = _write_parquet(
                tmp, names=names, ids=ids_arr, distance=distance, triangle=triangle,
                prov_json=prov_json, **common,
            )
        else:
            tile_rows = _write_hdf5(
                tmp, names=names, ids=ids_arr, paths=paths, labels=labels, metric=metric,
                prov_json=prov_json, **common,
            )
        fsync_path(tmp)
        if tmp_side is not None:
            with open(tmp_side, "w", encoding="utf-8") as fh:
                fh.write(prov_json)
                fh.flush()
                os.fsync(fh.fileno())
        if tmp_side is not None:  # an old sidecar goes first: a stop between the two renames
            with contextlib.suppress(FileNotFoundError):  # leaves no sidecar, never a stale one
                sidecar.unlink()
        os.replace(tmp, out)
        if tmp_side is not None:
            os.replace(tmp_side, sidecar)
        fsync_dir(parent)
    finally:
        for p in (tmp, tmp_side):
            if p is not None:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    files = [out] + ([sidecar] if sidecar is not None else [])
    return {
        "path": str(out),
        "files": [str(p) for p in files],
        "format": fmt,
        "shape": shape,
        "layers": names,
        "n": n,
        "dtype": dtype,
        "metric": metric,
        "values": values_name,
        "triangle": triangle,
        "bytes_written": int(sum(p.stat().st_size for p in files)),
        "bytes_estimated": int(needed),
        "tile_rows": int(tile_rows),
        "device": device,
        "products": provenance["products"],
        "elapsed_s": time.perf_counter() - t_start,
    }


# ---- .npy ------------------------------------------------------------------------


# The .npy writer hands rows to its thread in pieces of at least this many bytes (a tile's
# last piece may be smaller): small enough that the write after the last computed rows is
# short, large enough that the per-call costs do not matter.
_WRITE_PIECE_BYTES = 8 * 2**20


def _write_npy(tmp: Path, *, mats, zeros, n, dt, limit, device, tick, shape, distance, same=None,
               flush_tiles: bool = True) -> int:
    """Create the .npy with ``open_memmap`` (header, full size) and fill it tile by tile.

    Rows are ``pwrite``-n by a writer thread from one of two reusable tile buffers as soon as
    they are final (pieces of about _WRITE_PIECE_BYTES, see :func:`_fill_symmetric`), so the
    disk and the copy into the page cache overlap the products, and little is left to write
    once the last rows are computed. The writer asks the kernel to start writing each piece
    to disk without waiting (``sync_file_range``) and, at the end of tile t, waits until tile
    t-1 is on disk, so the final fsync has about one tile left to wait for and the dirty
    pages stay bounded; where ``sync_file_range`` is missing it ``fdatasync``-s each tile.
    On the CPU the products are finished and converted straight into those buffers
    (:func:`_cpu_rows`). The lower triangle of a tile is read back from the previous tile's
    buffer or, for older rows, through a short-lived read-only memory map of just those rows.
    Nothing maps the whole file for long: pages of such a map, once touched, would count
    towards the process's RSS, and the file can be far larger than RAM.
    ``flush_tiles=False`` writes without asking for any flush (a scratch file that is read
    back and deleted, see :func:`_write_parquet_full`).
    """
    from concurrent.futures import ThreadPoolExecutor

    header = np.lib.format.open_memmap(tmp, mode="w+", dtype=dt, shape=shape)
    data_offset = int(header.offset)
    del header
    itemsize = dt.itemsize
    row_bytes = n * itemsize
    # two output buffers + the read-back map of one earlier tile's strip (+ on a GPU the
    # pinned buffer the tiles arrive in; the CPU's float32 blocks are a few MiB whatever N is)
    tile_rows = _tile_rows_for(n, (4 if device.startswith("cuda") else 3) * itemsize, limit)
    bufs = [np.empty(tile_rows * n, dtype=dt), np.empty(tile_rows * n, dtype=dt)]
    piece_rows = max(1, -(-_WRITE_PIECE_BYTES // row_bytes))

    def write_piece(fd: int, arr: np.ndarray, offset: int) -> None:
        view = memoryview(arr).cast("B")
        pos = 0
        while pos < len(view):
            pos += os.pwrite(fd, view[pos:], offset + pos)
        if flush_tiles:
            start_writeback(fd, offset, len(view))

    def end_tile(fd: int, previous: tuple[int, int] | None) -> None:
        """At a tile's end: wait for the previous tile's bytes to be on disk."""
        if flush_tiles and previous is not None and not wait_writeback(fd, *previous):
            getattr(os, "fdatasync", os.fsync)(fd)

    with open(tmp, "r+b") as fh, ThreadPoolExecutor(max_workers=1) as writer:
        fd = fh.fileno()
        preallocate(fd, data_offset + int(np.prod(shape)) * itemsize)
        for li, (V, zero) in enumerate(zip(mats, zeros)):
            layer_base = data_offset + li * n * row_bytes
            # per buffer: its write futures, and the (r0, r1, rows) of the finished tile it holds;
            # a tile's buffer is (r0 // tile_rows) % 2, and the next tile's target is asked for
            # while the current one is being completed
            pending: list = [[], []]
            held: list = [None, None]
            span: list = []  # [first row, tile start] of the rows not yet handed to the writer
            last: list = [None]  # byte range of the previous finished tile

            def target(r0: int, r1: int) -> np.ndarray:
                slot = (r0 // tile_rows) % 2
                for fut in pending[slot]:  # the writes from two tiles ago
                    fut.result()
                pending[slot] = []
                held[slot] = None
                return bufs[slot][: (r1 - r0) * n].reshape(r1 - r0, n)

            def source(s0: int, s1: int) -> np.ndarray:
                h = held[(s0 // tile_rows) % 2]
                if h is not None and h[0] == s0:
                    return h[2]  # previous tile: still in memory, maybe still being written
                return np.memmap(fh, dtype=dt, mode="r", offset=layer_base + s0 * row_bytes, shape=(s1 - s0, n))

            def submit(upto: int) -> None:
                if not span:
                    return
                a0, r0 = span
                slot = (r0 // tile_rows) % 2
                rows = bufs[slot][(a0 - r0) * n : (upto - r0) * n]
                pending[slot].append(writer.submit(write_piece, fd, rows, layer_base + a0 * row_bytes))
                span.clear()

            def piece(a0: int, a1: int, rows: np.ndarray) -> None:
                if not span:
                    span.extend((a0, a0 - a0 % tile_rows))
                if a1 - span[0] >= piece_rows:
                    submit(a1)

            def done(r0: int, r1: int, rows: np.ndarray) -> None:
                submit(r1)
                slot = (r0 // tile_rows) % 2
                held[slot] = (r0, r1, rows)
                pending[slot].append(writer.submit(end_tile, fd, last[0]))
                last[0] = (layer_base + r0 * row_bytes, (r1 - r0) * row_bytes)
                tick(r1 - r0)

            try:
                _fill_symmetric(V, zero, tile_rows, device, distance, target, source, done, same, dtype=dt,
                                piece=piece)
            finally:
                for futs in pending:
                    for fut in futs:
                        fut.result()
        fh.flush()
    return tile_rows


# ---- .parquet --------------------------------------------------------------------


def _write_parquet(tmp, *, mats, zeros, n, dt, limit, device, tick, names, ids, distance,
                   triangle, prov_json, same=None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    L = len(names)
    if L <= np.iinfo(np.int8).max:
        idx_np, idx_pa = np.int8, pa.int8()
    elif L <= np.iinfo(np.int16).max:
        idx_np, idx_pa = np.int16, pa.int16()
    else:
        idx_np, idx_pa = np.int32, pa.int32()
    value_name = "distance" if distance else "similarity"
    value_type = pa.float16() if dt == np.float16 else pa.float32()
    schema = pa.schema(
        [
            ("layer", pa.dictionary(idx_pa, pa.string())),
            ("i", pa.int32()),
            ("j", pa.int32()),
            ("id_i", pa.int64()),
            ("id_j", pa.int64()),
            (value_name, value_type),
        ],
        metadata={b"vecsim": prov_json.encode("utf-8")},
    )
    layer_dict = pa.array(names, type=pa.string())
    upper = triangle == "upper"
    if not upper:
        return _write_parquet_full(tmp, mats=mats, zeros=zeros, n=n, dt=dt, limit=limit, device=device,
                                   tick=tick, ids=ids, distance=distance, same=same, schema=schema,
                                   layer_dict=layer_dict, idx_np=idx_np)
    # f32 block + (value + i + j + id_i + id_j + layer index) arrays, twice for the encoder's copy
    tile_rows = _parquet_tile_rows(n, 4 + 2 * (dt.itemsize + 4 + 4 + 8 + 8 + np.dtype(idx_np).itemsize), limit)

    with pq.ParquetWriter(str(tmp), schema) as writer:
        for li, (V, zero) in enumerate(zip(mats, zeros)):
            for r0, r1, _c0, S in _blocks(V, zero, tile_rows, device, upper=True, distance=distance, same=same,
                                          dtype=dt):
                R = r1 - r0
                rows = np.arange(r0, r1, dtype=np.int32)
                counts = (n - 1 - rows).astype(np.int64)
                total = int(counts.sum())
                if total == 0:
                    tick(R)
                    continue
                vals = np.empty(total, dtype=dt)
                pos = 0
                for a in range(R):
                    m = int(counts[a])
                    vals[pos : pos + m] = S[a, a + 1 :]
                    pos += m
                i_col = np.repeat(rows, counts)
                starts = np.cumsum(counts) - counts  # position of each row's first pair
                j_col = (np.arange(total, dtype=np.int64) - np.repeat(starts - rows - 1, counts)).astype(np.int32)
                _write_pairs(writer, schema, layer_dict, li, idx_np, ids, i_col, j_col, vals)
                tick(R)
    return tile_rows


def _parquet_tile_rows(n: int, bytes_per_entry: float, limit: int) -> int:
    """Rows per Parquet tile: within the memory limit, capped at pyarrow's largest row group."""
    return max(1, min(_tile_rows_for(n, bytes_per_entry, limit), (64 * 1024 * 1024) // n))


def _write_pairs(writer, schema, layer_dict, li, idx_np, ids, i_col, j_col, vals) -> None:
    """One row group of the long form: layer ``li``'s pairs ``(i_col, j_col)`` and their values."""
    import pyarrow as pa

    count = len(vals)
    table = pa.Table.from_arrays(
        [
            pa.DictionaryArray.from_arrays(pa.array(np.full(count, li, dtype=idx_np)), layer_dict),
            pa.array(i_col),
            pa.array(j_col),
            pa.array(ids[i_col]),
            pa.array(ids[j_col]),
            pa.array(vals),
        ],
        schema=schema,
    )
    writer.write_table(table, row_group_size=count)


def _write_parquet_full(tmp, *, mats, zeros, n, dt, limit, device, tick, ids, distance, same, schema,
                        layer_dict, idx_np) -> int:
    """The long form of every pair: each layer's square is first written, as the ``.npy``
    export writes it (upper triangle multiplied, lower one mirrored), to a scratch file beside
    ``tmp``, then read back one tile of rows at a time into row groups, so the Parquet values
    equal the ``.npy`` ones and are exactly symmetric. The scratch (N² values) is deleted as
    soon as the layer is written; :func:`estimate_export_bytes` counts it."""
    import pyarrow.parquet as pq

    # the read buffer + (value + i + j + id_i + id_j + layer index) arrays, twice for the encoder's copy
    tile_rows = _parquet_tile_rows(n, 2 * dt.itemsize + 2 * (4 + 4 + 8 + 8 + np.dtype(idx_np).itemsize), limit)
    scratch = Path(str(tmp) + ".square")
    all_j = np.arange(n, dtype=np.int32)
    buf = np.empty(tile_rows * n, dtype=dt)
    try:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for li, (V, zero) in enumerate(zip(mats, zeros)):
                _write_npy(scratch, mats=[V], zeros=[zero], n=n, dt=dt, limit=limit, device=device,
                           tick=lambda rows: None, shape=(n, n), distance=distance, same=same,
                           flush_tiles=False)
                with open(scratch, "rb") as fh:
                    fmt_ = np.lib.format
                    major, _minor = fmt_.read_magic(fh)
                    (fmt_.read_array_header_1_0 if major == 1 else fmt_.read_array_header_2_0)(fh)  # to the data
                    for r0 in range(0, n, tile_rows):
                        r1 = min(n, r0 + tile_rows)
                        R = r1 - r0
                        vals = buf[: R * n]
                        got = fh.readinto(memoryview(vals).cast("B"))
                        if got != vals.nbytes:  # pragma: no cover - the file was just written
                            raise OSError(f"short read from the scratch file {scratch}")
                        i_col = np.repeat(np.arange(r0, r1, dtype=np.int32), n)
                        j_col = np.tile(all_j, R)
                        _write_pairs(writer, schema, layer_dict, li, idx_np, ids, i_col, j_col, vals)
                        del i_col, j_col
                        tick(R)
                scratch.unlink()
    finally:
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
    return tile_rows


# ---- .h5 (rsatoolbox RDMs) -------------------------------------------------------


def _write_hdf5(tmp, *, mats, zeros, n, dt, limit, device, tick, names, ids, paths, labels, metric,
                prov_json, same=None) -> int:
    """rsatoolbox's ``RDMs.save`` layout, with the condensed dissimilarities filled per tile."""
    import h5py
    from importlib import metadata as md

    L = len(names)
    m = n * (n - 1) // 2
    tile_rows = _tile_rows_for(n, 4 + dt.itemsize, limit)
    with h5py.File(tmp, "w") as f:
        try:
            f.attrs["rsatoolbox_version"] = md.version("rsatoolbox")
        except md.PackageNotFoundError:
            pass
        f.attrs["dissimilarity_measure"] = metric
        f.attrs["vecsim"] = prov_json
        f.create_group("descriptors")
        rd = f.create_group("rdm_descriptors")
        rd["layer"] = _ascii(names)
        rd["index"] = np.arange(L, dtype=np.int64)
        pd = f.create_group("pattern_descriptors")
        pd["id"] = ids
        pd["path"] = _ascii(paths)
        pd["label"] = _ascii(labels)
        pd["index"] = np.arange(n, dtype=np.int64)
        dset = f.create_dataset("dissimilarities", shape=(L, m), dtype=dt)
        buf = np.empty(tile_rows * n, dtype=dt)
        for li, (V, zero) in enumerate(zip(mats, zeros)):
            for r0, r1, _c0, S in _blocks(V, zero, tile_rows, device, upper=True, distance=True, same=same):
                start, stop = _condensed_offset(n, r0), _condensed_offset(n, r1)
                chunk = buf[: stop - start]
                pos = 0
                for a in range(r1 - r0):
                    k = n - (r0 + a) - 1
                    chunk[pos : pos + k] = S[a, a + 1 :]
                    pos += k
                if stop > start:
                    dset[li, start:stop] = chunk
                tick(r1 - r0)
        f.flush()
    return tile_rows
