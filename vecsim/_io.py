"""Generic file and JSON helpers: durable writes (fsync, atomic replace), JSON of numpy
values, byte counts for people, installed package versions. No vecsim state, numpy only."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from vecsim._faults import kill_point


def package_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Installed versions of vecsim's stack (and of the ``extra`` distributions), by name."""
    from importlib import metadata

    versions = {}
    for dist in ("vecsim", "torch", "torchvision", "numpy", "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "lancedb",
                 "pyarrow", "pillow", *extra):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


# sync_file_range(2) flags (Linux)
_SYNC_WRITE = 2  # start writeback of the range's dirty pages, do not wait
_SYNC_WAIT = 1 | 2 | 4  # wait for writeback in flight, start the rest, wait for it all


@functools.lru_cache(maxsize=None)
def _libc(name: str, *argtypes: str):
    """libc's function ``name`` taking ``argtypes`` (names of ctypes types) and returning an
    int, or None where there is none (not Linux, an old libc)."""
    try:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [getattr(ctypes, t) for t in argtypes]
    fn.restype = ctypes.c_int
    return fn


def _sync_file_range():
    """libc's ``sync_file_range(fd, offset, nbytes, flags)``, or None."""
    return _libc("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")


def _fallocate():
    """libc's ``fallocate(fd, mode, offset, len)``, or None."""
    return _libc("fallocate", "c_int", "c_int", "c_int64", "c_int64")


def preallocate(fd: int, nbytes: int) -> bool:
    """Reserve disk blocks for the first ``nbytes`` of ``fd`` (``fallocate``, mode 0: the
    file's contents and a larger size are kept). A file of known size written this way
    cannot run out of space halfway, and the file system maps its blocks once instead of
    page by page as the writes come. False where the call is missing or the file system
    does not support it (nothing is emulated: the writes then allocate as usual)."""
    fn = _fallocate()
    return fn is not None and nbytes > 0 and fn(fd, 0, 0, nbytes) == 0


def start_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Ask the kernel to start writing a byte range of ``fd`` to disk without waiting for it
    (``sync_file_range`` with ``SYNC_FILE_RANGE_WRITE``). False where that call is missing or
    fails: the caller then relies on its own ``fdatasync``."""
    fn = _sync_file_range()
    return fn is not None and fn(fd, offset, nbytes, _SYNC_WRITE) == 0


def wait_writeback(fd: int, offset: int, nbytes: int) -> bool:
    """Wait until a byte range of ``fd`` is written to disk (its data; the file's size and
    metadata are the final ``fsync``'s job). False where ``sync_file_range`` is missing or fails."""
    fn = _sync_file_range()
    return fn is not None and fn(fd, offset, nbytes, _SYNC_WAIT) == 0


def fsync_path(path: Path) -> None:
    """Flush a finished file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames in the folder ``path`` durable (where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_replace(tmp: Path, target: Path) -> None:
    """Make the finished temporary file ``tmp`` durable, then rename it onto ``target``: a
    reader (or a crash) sees the old file or the whole new one, never part of it; the folder
    is flushed too, so the rename itself survives a power cut."""
    fsync_path(tmp)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def save_array(path: Path, array=None, **arrays) -> None:
    """One array as .npy (``array``) or several as .npz (keywords), written through fsync_replace."""
    if (array is None) == (not arrays):
        raise TypeError("give one array, or named arrays for an .npz")
    tmp = path.with_name(path.name + (".tmp.npy" if array is not None else ".tmp.npz"))
    if array is not None:
        np.save(tmp, array)
    else:
        np.savez(tmp, **arrays)
    fsync_replace(tmp, path)


def write_text_atomic(path: Path, text: str, kill: str | None = None) -> None:
    """Write ``text`` to ``path`` through a flushed temporary file and a rename (see fsync_replace)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if kill:
        kill_point(kill)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=json_default) + "\n", kill="manifest-written")


def json_default(obj):
    """``json.dump``'s ``default``: numpy scalars and arrays as Python values, paths as strings."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts: numpy to Python, NaN/±inf → None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dumps_json(obj: Any) -> str:
    return json.dumps(json_safe(obj), indent=2, allow_nan=False)
