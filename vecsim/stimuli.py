"""Find stimuli, give them stable ids and labels, and decode them safely.

A stimulus set is a folder searched recursively (or ``builtin:digits``). Images are
recognised by their content, not their extension; files that look like images by name
but cannot be identified are recorded as failures, other files are ignored. Ids are
positions in the sorted list of candidate paths, so the same folder always gets the
same ids.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vecsim.errors import ImageDecodeError, StimulusSetError

BUILTIN_SETS = ("builtin:digits",)
IMAGE_SUFFIXES = {
    ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
    ".pbm", ".jfif", ".ico", ".tga",
}
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


@dataclass(frozen=True)
class Stimulus:
    """One candidate stimulus: its id, path relative to the set root, and label/metadata."""

    id: int
    path: str
    label: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Failure:
    """A stimulus that could not be used, and why (recorded, never fatal)."""

    id: int | None
    path: str
    stage: str
    reason: str
    layer: str | None = None


@dataclass
class StimulusSet:
    """The ordered stimuli of one source, with what was excluded while finding them."""

    source: str
    root: Path
    stimuli: list[Stimulus]
    failures: list[Failure]
    extra_columns: list[str]
    ignored_files: int = 0
    manifest: str | None = None
    extra_schema: Any = None  # Arrow schema of the manifest, for the extra columns' types

    def __len__(self) -> int:
        return len(self.stimuli)

    @property
    def has_labels(self) -> bool:
        return any(s.label is not None for s in self.stimuli)


def discover(
    source: str | os.PathLike,
    manifest: str | os.PathLike | None = None,
    labels_from_folders: bool = False,
) -> StimulusSet:
    """Build the stimulus set of a folder or built-in source.

    With a manifest (CSV or Parquet with a ``path`` column, optional ``label`` and any
    other columns), the set is the manifest's rows; otherwise every image under the
    folder. Raises StimulusSetError for a missing or empty source.
    """
    source_str = str(source)
    if source_str.startswith("builtin:"):
        root, labels_from_folders = _builtin_root(source_str), True
    else:
        root = Path(source_str).expanduser()
        if not root.exists():
            raise StimulusSetError(f"stimulus folder {root} does not exist")
        if not root.is_dir():
            raise StimulusSetError(f"{root} is not a folder; give the folder that holds the images")
    if manifest is not None:
        stim_set = _from_manifest(root, Path(manifest))
    else:
        stim_set = _from_folder(root, labels_from_folders)
    stim_set.source = source_str
    if not stim_set.stimuli:
        detail = f" ({len(stim_set.failures)} files could not be read)" if stim_set.failures else ""
        raise StimulusSetError(f"no images found in {root}{detail}")
    return stim_set


def _builtin_root(source: str) -> Path:
    if source != "builtin:digits":
        raise StimulusSetError(f"unknown built-in set {source!r}; choose one of: {', '.join(BUILTIN_SETS)}")
    from vecsim.digits import materialize_digits

    return materialize_digits()


def _walk_files(root: Path, unreadable: list[tuple[str, str]] | None = None) -> list[str]:
    """Relative POSIX paths of the non-directory entries, hidden entries skipped.

    Symbolic links to folders are followed (a class folder linked in from elsewhere is
    searched like any other); a folder reached a second time (a link back up, a loop, or a
    second link to it) is searched once. Folders that cannot be listed, and folders skipped
    as seen before, are appended to ``unreadable`` as (relative path, reason).
    """
    found = []
    seen: dict[str, str] = {}  # real path -> the relative path it was searched as

    def relative(where: Path) -> str:
        return where.relative_to(root).as_posix() if where != root and where.is_relative_to(root) else "."

    def onerror(exc: OSError) -> None:
        if unreadable is not None:
            unreadable.append((relative(Path(exc.filename or root)),
                               f"cannot list this folder ({exc.strerror or type(exc).__name__}); its files were not searched"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            if unreadable is not None:
                unreadable.append((relative(Path(dirpath)), f"a link to a folder already searched as {seen[real]!r} "
                                                            "(a loop or a second link); its files were not searched twice"))
            continue
        seen[real] = relative(Path(dirpath))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            full = Path(dirpath) / name
            found.append(full.relative_to(root).as_posix())
    return sorted(found)


_PIL_LIMIT_LOCK = threading.Lock()


def _open_image(source: Path | bytes):
    """``PIL.Image.open`` (header only) without PIL's own decompression-bomb limit.

    vecsim applies its ``max_pixels`` itself, from the header, before any pixel is
    decoded; PIL's global ``MAX_IMAGE_PIXELS`` would otherwise raise
    DecompressionBombError (not an OSError) or warn while a folder is being searched.
    The global is switched off only around the header read, under a lock, and restored.
    """
    from PIL import Image

    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_file(path: Path) -> int:
    """The size of a regular file, or ImageDecodeError saying why ``path`` is not one.

    Never opens the path, so a FIFO or a device cannot block or flood the reader.
    """
    try:
        st = os.stat(path)  # follows symlinks
    except OSError as exc:
        raise ImageDecodeError(_os_reason(exc, path)) from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a folder"
                if stat.S_ISDIR(st.st_mode) else "not a file")
        raise ImageDecodeError(f"not a regular file ({kind})")
    if st.st_size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    return st.st_size


def _os_reason(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (too many levels of symbolic links)"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "broken symbolic link (its target does not exist)"
    return f"cannot read the file ({exc.strerror or _short_reason(exc)})"


def sniff_image(path: Path) -> tuple[str, int, int]:
    """Identify an image from its header alone: (format, width, height). Raises ImageDecodeError."""
    from PIL import UnidentifiedImageError

    _check_file(path)
    try:
        with _open_image(Path(path)) as img:
            return str(img.format), int(img.width), int(img.height)
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (content not recognised)") from None
    except OSError as exc:
        raise ImageDecodeError(_os_reason(exc, path) if exc.errno else _short_reason(exc)) from None
    except Exception as exc:  # a hostile header may raise anything; discovery must go on
        raise ImageDecodeError(_short_reason(exc)) from None


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _printable(rel: str) -> str:
    """A relative path as stored: itself, or with undecodable bytes escaped (\\xff) when
    the file name is not valid UTF-8 (such a path cannot be stored as it is)."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _from_folder(root: Path, labels_from_folders: bool) -> StimulusSet:
    stimuli, failures, ignored = [], [], 0
    unreadable: list[tuple[str, str]] = []
    next_id = 0
    for rel in _walk_files(root, unreadable):
        try:
            sniff_image(root / rel)
        except ImageDecodeError as exc:
            if Path(rel).suffix.lower() in IMAGE_SUFFIXES:
                failures.append(Failure(next_id, _printable(rel), "discover", str(exc)))
                next_id += 1
            else:
                ignored += 1
            continue
        if _printable(rel) != rel:
            failures.append(Failure(next_id, _printable(rel), "discover",
                                    "file name is not valid UTF-8 and cannot be stored; rename the file"))
            next_id += 1
            continue
        label = rel.split("/", 1)[0] if labels_from_folders and "/" in rel else None
        stimuli.append(Stimulus(next_id, rel, label))
        next_id += 1
    failures += [Failure(None, _printable(rel), "discover", reason) for rel, reason in unreadable]
    return StimulusSet("", root, stimuli, failures, [], ignored)


def read_manifest_table(path: Path):
    """A manifest file as an Arrow table (CSV or Parquet, by suffix)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise StimulusSetError(f"manifest {path} does not exist")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path)
        # an empty cell is missing whatever the column's type (as in a Parquet manifest): NULL
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise StimulusSetError(f"cannot read manifest {path}: {_short_reason(exc)}") from None


RESERVED_COLUMNS = {"id", "path", "label", "sha256", "width", "height", "input_sha256"}


def _from_manifest(root: Path, manifest: Path) -> StimulusSet:
    table = read_manifest_table(manifest)
    if "path" not in table.column_names:
        raise StimulusSetError(
            f"manifest {manifest} has no 'path' column (columns: {', '.join(table.column_names)})"
        )
    clashing = sorted(RESERVED_COLUMNS & set(table.column_names) - {"path", "label"})
    if clashing:
        raise StimulusSetError(f"manifest column(s) {', '.join(clashing)} are reserved by vecsim; rename them")
    extra_columns = [c for c in table.column_names if c not in ("path", "label")]
    rows = table.to_pylist()
    seen: set[str] = set()
    by_path = {}
    for row in rows:
        rel = path_key(row["path"]) if row["path"] is not None else ""
        if not rel or rel == "." or rel in seen:
            raise StimulusSetError(f"manifest {manifest} has an empty or duplicate path: {row['path']!r}")
        if PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
            raise StimulusSetError(f"manifest {manifest} path {row['path']!r} is not inside the stimulus folder "
                                   f"{root}; paths are relative to it")
        seen.add(rel)
        by_path[rel] = row
    stimuli, failures = [], []
    for next_id, rel in enumerate(sorted(by_path)):
        row = by_path[rel]
        try:
            sniff_image(root / rel)
        except ImageDecodeError as exc:
            reason = "file listed in the manifest does not exist" if not (root / rel).exists() else str(exc)
            failures.append(Failure(next_id, rel, "discover", reason))
            continue
        label = row.get("label")
        extra = {c: row.get(c) for c in extra_columns}
        stimuli.append(Stimulus(next_id, rel, None if label is None else str(label), extra))
    return StimulusSet(
        "", root, stimuli, failures, extra_columns, manifest=str(manifest), extra_schema=table.schema
    )


@dataclass(frozen=True)
class DecodedImage:
    sha256: str
    width: int
    height: int
    image: Any  # PIL.Image in RGB


def path_key(path) -> str:
    """A stimulus path as stores record it: POSIX separators, ``.`` components dropped
    (``./a/b.png`` and ``a/./b.png`` are ``a/b.png``); ``..`` and a leading ``/`` are kept."""
    return PurePosixPath(Path(str(path)).as_posix()).as_posix()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read, hash and decode one image to RGB, or raise ImageDecodeError with the reason.

    EXIF rotation is applied; 16-bit images are scaled to 8 bits (not clipped); alpha is
    composited on white; an animated image gives its first frame. Images above
    ``max_pixels`` are rejected from the header, before any pixel is decoded.
    """
    _check_file(Path(path))
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(_os_reason(exc, Path(path))) from None
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    return decode_bytes(data, max_pixels)


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    from PIL import ImageOps, UnidentifiedImageError

    sha = hashlib.sha256(data).hexdigest()
    try:
        # no warnings.catch_warnings() here: it is not thread-safe (decoding runs in a
        # thread pool) and could leave its filter installed for the whole process.
        # PIL's bomb warning cannot fire: _open_image lifts PIL's limit, ours applies.
        img = _open_image(bytes(data))
        width, height = img.size
        if max_pixels and width * height > max_pixels:
            raise ImageDecodeError(
                f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                f"{max_pixels:,} (raise --max-pixels to accept it)"
            )
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
        width, height = img.size  # as the model sees it (a 90° EXIF rotation swaps them)
        rgb = to_rgb(img)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (content not recognised)") from None
    except Exception as exc:  # hostile data may raise anything (struct.error, IndexError, MemoryError...)
        raise ImageDecodeError(_short_reason(exc)) from None
    return DecodedImage(sha, width, height, rgb)


def to_rgb(img):
    """Convert any PIL mode to RGB without clipping high-bit-depth data.

    16-bit images are scaled by 255/65535; 32-bit integer images (mode ``I``) by
    255/65535 when their maximum exceeds 255, as 8-bit data otherwise. Float images (mode ``F``) in [0, 1]
    are taken as they are, others are divided by their maximum; negatives become 0.
    Transparency (an alpha channel, a palette's or a PNG's transparent colour) is
    composited on white.
    """
    from PIL import Image
    import numpy as np

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = float(arr.max(initial=0))
        if img.mode == "F":
            top = 1.0 if peak <= 1.0 else peak
        elif img.mode.startswith("I;16"):
            top = 65535.0
        else:  # "I": 32 bits, whose full range real images rarely use
            top = 65535.0 if peak > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette entry or a PNG tRNS colour marks transparent pixels
    elif img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, DEFAULT_BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB") if img.mode != "RGB" else img

