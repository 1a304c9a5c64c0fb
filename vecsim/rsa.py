"""Which layer looks like the brain: a store's layers against external RDMs (brain regions,
behaviour), with rsatoolbox's comparators, noise ceilings, bootstraps and tests.

:func:`compare_rdms` reads target RDM files (:func:`read_targets`), matches their stimuli to
the store's, builds every layer's RDM on each target's matched stimuli and hands both to
rsatoolbox (the ``rsa`` extra, imported only here):

* the comparators are ``rsatoolbox.rdm.compare``'s own (:data:`COMPARATORS`);
* per target with several subjects, the lower and upper noise ceilings are
  ``rsatoolbox.inference.boot_noise_ceiling`` on the target's RDMs (leave one subject out);
* the confidence intervals and the tests come from a
  ``rsatoolbox.inference.eval_bootstrap_pattern`` (stimuli), ``eval_bootstrap_rdm``
  (subjects) or ``eval_bootstrap`` (both) run with every layer as a ``ModelFixed``:
  ``Result.get_ci`` and ``Result.test_pairwise`` / ``test_zero``, the layers that differ
  from the best one corrected for the number of comparisons with it.

A layer's RDM is ``1 − s``, s the store's similarity of the raw activations (cosine, or
Pearson correlation across units for a store indexed with ``--similarity correlation``):
exact from the layer's evaluation subset when it holds every matched stimulus
(``exact-gram``), else the stored cosine estimates (``stored-vectors``); each row says which.

rsatoolbox draws its bootstrap samples from numpy's global random state: each target ×
comparator run starts from ``np.random.seed(seed)`` (so every comparator and target of a run
sees the same stimulus samples where the sizes agree) and the caller's random state is put
back afterwards.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from vecsim.errors import (
    ConfigError, MissingExtraError, OutputExistsError, StimulusSetError, StoreError, close_matches,
)

COMPARATORS: dict[str, str] = {
    "corr": "Pearson correlation of the dissimilarities",
    "spearman": "Spearman rank correlation (ties averaged)",
    "rho-a": "Spearman's rho-a (ranks without tie correction)",
    "tau-a": "Kendall's tau-a (ties count against; for models that predict ties)",
    "cosine": "cosine of the dissimilarity vectors (no centring: the zero point counts)",
    "corr_cov": "Pearson correlation after whitening the dissimilarities' dependence (Diedrichsen et al. 2021)",
    "cosine_cov": "cosine after whitening (the unbiased distance correlation's estimator)",
}
BOOTSTRAPS = ("auto", "stimuli", "subjects", "both", "none")
TESTS = ("t-test", "bootstrap", "ranksum")
CORRECTIONS = ("fdr", "bonferroni", "none")
MATCH_BY = ("auto", "path", "id", "sha256")
MIN_MATCHED = 3
SUBJECTS_FOR_BOOTSTRAP = 5  # auto bootstraps subjects too from this many on
DEFAULT_BOOTSTRAPS = 1000
ALPHA = 0.05
CI_LEVEL = 0.95
SYMMETRY_TOL = 1e-6  # relative to the largest |value|
# rsatoolbox pattern descriptors that name stimuli, in the order they are looked for
STIMULUS_DESCRIPTORS = ("path", "stimulus", "stimuli", "image", "filename", "file", "sha256", "id", "name",
                        "conds", "cond", "condition")
TARGET_DESCRIPTORS = ("region", "roi", "area", "target", "layer")
SUBJECT_DESCRIPTORS = ("subject", "subj", "participant", "sub")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
RESULT_FILES = ("rsa.parquet", "rsa.csv", "rsa.json")


def _rsatoolbox():
    """rsatoolbox's rdm, model and inference modules; a one-line error naming the extra when missing."""
    try:
        import rsatoolbox.inference  # noqa: F401
        import rsatoolbox.model  # noqa: F401
        import rsatoolbox.rdm  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"comparing layers with external RDMs needs rsatoolbox ({exc}); "
                                "install it with: pip install 'vecsim[rsa]'") from None
    import rsatoolbox

    return rsatoolbox


# --------------------------------------------------------------------------- reading RDM files


@dataclass
class RDMFile:
    """The RDMs of one file as read: condensed dissimilarities (R, n(n−1)/2, the upper triangle
    row by row, as rsatoolbox keeps them) over the file's n stimuli, each stimulus's name (path,
    id or sha256) and per-RDM descriptors (subject, region, ...)."""

    path: str
    names: list[str]
    vectors: np.ndarray
    descriptors: dict[str, list[str]]
    form: str  # hdf5, npy, csv, parquet

    @property
    def n_rdm(self) -> int:
        return int(self.vectors.shape[0])


def _check_square(D: np.ndarray, where: str) -> np.ndarray:
    """(R, n, n) or (n, n) dissimilarities, checked finite and symmetric one RDM at a time (a
    one-line error otherwise), as condensed float64 vectors (R, n(n−1)/2)."""
    D = np.asarray(D)
    if D.ndim == 2:
        D = D[None]
    if D.ndim != 3 or D.shape[1] != D.shape[2]:
        shape = "x".join(map(str, D.shape[-2:] if D.ndim >= 2 else D.shape))
        raise ConfigError(f"{where}: an RDM must be a square matrix, got {shape}")
    n = D.shape[1]
    iu = np.triu_indices(n, 1)
    out = np.empty((D.shape[0], len(iu[0])))
    for r, M in enumerate(D):
        M = np.asarray(M, dtype=np.float64)
        of = f" of RDM {r}" if D.shape[0] > 1 else ""
        bad = ~np.isfinite(M)
        if bad.any():
            i, j = (int(x[0]) for x in np.nonzero(bad))
            raise ConfigError(f"{where}: {int(bad.sum())} NaN or infinite entries (the first at row {i}, column {j}"
                              f"{of}); fill or drop those stimuli first")
        upper, lower = M[iu], M.T[iu]
        gap = np.abs(upper - lower)
        if gap.size and float(gap.max()) > SYMMETRY_TOL * max(float(np.abs(upper).max()), 1e-300):
            k = int(np.argmax(gap))
            i, j = int(iu[0][k]), int(iu[1][k])
            raise ConfigError(f"{where}: not symmetric (entry [{i}, {j}] is {M[i, j]:g}, [{j}, {i}] is "
                              f"{M[j, i]:g}{of}); an RDM must be symmetric")
        out[r] = upper
    return out


def _reordered(vectors: np.ndarray, n: int, order: np.ndarray) -> np.ndarray:
    """Condensed RDMs over n stimuli → over the stimuli ``order`` (positions), one RDM at a time."""
    if len(order) == n and np.array_equal(order, np.arange(n)):
        return vectors
    iu = np.triu_indices(n, 1)
    sub = np.triu_indices(len(order), 1)
    out = np.empty((vectors.shape[0], len(sub[0])))
    M = np.zeros((n, n))
    for r, v in enumerate(vectors):
        M[iu] = v
        M[iu[1], iu[0]] = v
        out[r] = M[np.ix_(order, order)][sub]
    return out


def _stimulus_list(path: Path) -> list[str]:
    """One stimulus name per line (blank lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the stimulus list {path}: {exc}") from None
    return [line.strip() for line in lines if line.strip()]


def _beside(matrix: Path) -> Path | None:
    """The stimulus list that sits beside a matrix file, if any."""
    for cand in (matrix.with_name(matrix.stem + ".stimuli.txt"), matrix.with_name(matrix.stem + ".txt"),
                 matrix.with_name(matrix.name + ".stimuli.txt")):
        if cand.is_file():
            return cand
    return None


def _matrix_names(path: Path, n: int, stimuli: str | os.PathLike | None, header: list[str] | None) -> list[str]:
    if stimuli is not None:
        names = _stimulus_list(Path(stimuli))
        origin = f"the stimulus list {stimuli}"
    elif header is not None:
        names, origin = header, "its header row"
    else:
        sidecar = Path(str(path) + ".json")  # vecsim similarity's own .npy sidecar
        beside = _beside(path)
        if beside is not None:
            names, origin = _stimulus_list(beside), f"the stimulus list {beside}"
        elif sidecar.is_file():
            try:
                names = [str(p) for p in json.loads(sidecar.read_text(encoding="utf-8"))["paths"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{sidecar} is not a vecsim similarity sidecar with 'paths' ({exc})") from None
            origin = f"its sidecar {sidecar.name}"
        else:
            raise ConfigError(f"{path} is a bare matrix: give its stimuli with --stimuli FILE (one path, id or "
                              f"sha256 per line, in row order) or put them in {path.stem}.stimuli.txt beside it")
    if len(names) != n:
        raise ConfigError(f"{path} has {n} rows but {origin} names {len(names)} stimuli; they must agree, in row order")
    return names


def _read_csv_matrix(path: Path) -> tuple[np.ndarray, list[str] | None]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None

    def numeric(cells) -> bool:
        try:
            [float(c) for c in cells]
            return True
        except ValueError:
            return False

    header = None
    if rows and not numeric(rows[0]):  # a header row of stimulus names, maybe over a name column
        header = [c.strip() for c in rows[0]]
        rows = rows[1:]
        if rows and len(header) == len(rows[0]) and not numeric(rows[0][:1]):
            header = header[1:]  # the corner cell of a table with row names
    if rows and not numeric(rows[0][:1]):
        names = [r[0].strip() for r in rows]
        rows = [r[1:] for r in rows]
        if header is not None and names != header:
            raise ConfigError(f"{path}: its row names and column names differ; an RDM has one stimulus order")
        header = names
    try:
        M = np.array([[float(c) for c in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise ConfigError(f"{path}: not a numeric matrix ({exc})") from None
    if len({len(r) for r in rows}) > 1:
        raise ConfigError(f"{path}: its rows have different lengths; an RDM must be a square matrix")
    return M, header


def _read_hdf5(path: Path, pattern_descriptor: str | None, stimuli) -> RDMFile:
    rsa = _rsatoolbox()
    try:
        rdms = rsa.rdm.load_rdm(str(path), file_type="hdf5")
    except Exception as exc:  # h5py and rsatoolbox raise many kinds for a file that is not theirs
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path} is not an rsatoolbox RDMs HDF5 file ({first})") from None
    where = str(path)
    V = np.asarray(rdms.dissimilarities, dtype=np.float64)  # condensed, symmetric by construction
    bad = ~np.isfinite(V)
    if bad.any():
        raise ConfigError(f"{where}: {int(bad.sum())} NaN or infinite dissimilarities (the first in RDM "
                          f"{int(np.nonzero(bad)[0][0])}); fill or drop those stimuli first")
    pdesc = {k: list(v) for k, v in rdms.pattern_descriptors.items() if k != "index"}
    key = pattern_descriptor or next((k for k in STIMULUS_DESCRIPTORS if k in pdesc), None)
    if key in pdesc:
        names = [_name(v) for v in pdesc[key]]
    elif stimuli is not None and pattern_descriptor is None:  # patterns without names: the list names them
        names = _matrix_names(path, int(rdms.n_cond), stimuli, None)
    else:
        have = ", ".join(pdesc) or "none besides index"
        what = f"no pattern descriptor {key!r}" if pattern_descriptor else "no pattern descriptor naming stimuli"
        raise ConfigError(f"{path} has {what} (it has: {have}); pass --pattern-descriptor NAME or a "
                          "--stimuli FILE in pattern order")
    desc = {k: [_name(v) for v in vals] for k, vals in rdms.rdm_descriptors.items() if k != "index"}
    return RDMFile(where, names, V, desc, "hdf5")


def _name(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(value).strip()


def _is_text(dtype) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


_PAIR_COLUMNS = (("id_i", "id_j"), ("stimulus_i", "stimulus_j"), ("path_i", "path_j"), ("i", "j"))
_VALUE_COLUMNS = ("distance", "dissimilarity", "similarity")


def _read_parquet(path: Path) -> RDMFile:
    """vecsim's long form: a value column (distance, dissimilarity or similarity), a pair of
    stimulus columns, and any string columns as RDM descriptors (layer, subject, region)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except Exception as exc:
        raise ConfigError(f"cannot read {path} as Parquet ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    cols = table.column_names
    value = next((c for c in _VALUE_COLUMNS if c in cols), None)
    if value is None:
        raise ConfigError(f"{path} has no column {', '.join(_VALUE_COLUMNS[:-1])} or {_VALUE_COLUMNS[-1]}")
    meta = (table.schema.metadata or {}).get(b"vecsim")
    paths = None
    if meta:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            paths = [str(p) for p in json.loads(meta)["paths"]]
    pair = next(((a, b) for a, b in _PAIR_COLUMNS if a in cols and b in cols), None)
    if pair is None:
        raise ConfigError(f"{path} has no pair of stimulus columns ({', '.join('/'.join(p) for p in _PAIR_COLUMNS)})")
    if paths is not None and "i" in cols and "j" in cols:
        pair = ("i", "j")  # a vecsim export: positions into its recorded paths
    used = {value, *pair, "i", "j", "id_i", "id_j"}
    group_cols = [c for c in cols if c not in used and _is_text(table.schema.field(c).type)]
    left = [_name(v) for v in table.column(pair[0]).to_pylist()]
    right = [_name(v) for v in table.column(pair[1]).to_pylist()]
    if pair == ("i", "j") and paths is not None:
        left, right = [paths[int(k)] for k in left], [paths[int(k)] for k in right]
    names = sorted(set(left) | set(right), key=lambda s: (len(s), s)) if paths is None else \
        [p for p in paths if p in set(left) | set(right)]
    pos = {s: k for k, s in enumerate(names)}
    li, ri = np.array([pos[s] for s in left]), np.array([pos[s] for s in right])
    vals = table.column(value).to_numpy(zero_copy_only=False).astype(np.float64)
    if value == "similarity":
        vals = 1.0 - vals
    groups = (list(zip(*([_name(v) for v in table.column(c).to_pylist()] for c in group_cols))) if group_cols
              else [()] * len(vals))
    keys = list(dict.fromkeys(groups))
    n = len(names)
    D = np.full((len(keys), n, n), np.nan)
    key_pos = {k: g for g, k in enumerate(keys)}
    g = np.array([key_pos[k] for k in groups], dtype=np.int64)
    D[g, li, ri] = vals
    mirror = np.isnan(D[g, ri, li])
    D[g[mirror], ri[mirror], li[mirror]] = vals[mirror]
    for d in D:
        np.fill_diagonal(d, 0.0)
    missing = np.isnan(D)
    if missing.any():
        r, i, j = (int(x[0]) for x in np.nonzero(missing))
        raise ConfigError(f"{path}: {int(missing.sum())} pairs have no value (the first: {names[i]} – {names[j]}"
                          f"{f' of RDM {keys[r]}' if group_cols else ''}); every pair of its stimuli must be given")
    desc = {c: [k[ci] for k in keys] for ci, c in enumerate(group_cols)}
    return RDMFile(str(path), names, _check_square(D, str(path)), desc, "parquet")


def read_rdm_file(path: str | os.PathLike, *, stimuli: str | os.PathLike | None = None, similarities: bool = False,
                  pattern_descriptor: str | None = None) -> RDMFile:
    """Read one target file: rsatoolbox HDF5 (``.h5``/``.hdf5``), a square ``.npy`` ((n, n) or
    (subjects, n, n)) or ``.csv`` with its stimuli (``stimuli``, a list beside it, a CSV header,
    or vecsim's ``.npy.json`` sidecar), or vecsim's Parquet long form. ``similarities``: the
    ``.npy``/``.csv`` matrix holds similarities, turned into dissimilarities ``1 − s``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"RDM file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        return _read_hdf5(path, pattern_descriptor, stimuli)
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".npy":
        try:
            M = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path} as a .npy array ({exc})") from None
        header = None
    elif suffix == ".csv":
        M, header = _read_csv_matrix(path)
    else:
        raise ConfigError(f"cannot tell the RDM format of {path.name}: use .h5/.hdf5 (rsatoolbox), .npy or .csv "
                          "(a square matrix) or .parquet (vecsim's long form)")
    if not np.issubdtype(np.asarray(M).dtype, np.number):
        raise ConfigError(f"{path} does not hold numbers")
    V = _check_square(M, str(path))
    if similarities:
        V = 1.0 - V
    names = _matrix_names(path, np.asarray(M).shape[-1], stimuli, header)
    desc = {"subject": [str(s) for s in range(V.shape[0])]} if V.shape[0] > 1 else {}
    return RDMFile(str(path), names, V, desc, suffix[1:])


# --------------------------------------------------------------------------- matching stimuli


@dataclass
class StimulusMatch:
    """Which of a file's stimuli are in the store, and how they were matched."""

    by: str
    ids: np.ndarray  # store id per file stimulus (-1: not in the store)
    missing: list[str]

    @property
    def matched(self) -> int:
        return int((self.ids >= 0).sum())


def _sha256_file(path: Path) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


class _StoreStimuli:
    """The store's stimuli by relative path, id and sha256 (the first id of identical files)."""

    def __init__(self, store):
        table = store.stimuli()
        ids = table.column("id").to_numpy().astype(np.int64)
        self.by_path = {str(p).replace("\\", "/"): int(i) for i, p in zip(ids, table.column("path").to_pylist())}
        self.by_id = {str(int(i)): int(i) for i in ids}
        self.by_sha: dict[str, int] = {}
        for i, s in zip(ids.tolist(), table.column("sha256").to_pylist()):
            self.by_sha.setdefault(str(s).lower(), i)
        source = (store.manifest.get("source") or {}).get("source")
        self.root = Path(source).resolve() if source and not str(source).startswith("builtin:") else None

    def lookup(self, names: list[str], by: str, base: Path) -> np.ndarray:
        out = np.full(len(names), -1, dtype=np.int64)
        for k, name in enumerate(names):
            hit = None
            if by == "path":
                key = name.replace("\\", "/")
                key = key[2:] if key.startswith("./") else key
                hit = self.by_path.get(key)
                if hit is None and self.root is not None and os.path.isabs(name):
                    with contextlib.suppress(ValueError):
                        hit = self.by_path.get(Path(name).resolve().relative_to(self.root).as_posix())
            elif by == "id":
                hit = self.by_id.get(name[:-2] if name.endswith(".0") else name)
            elif by == "sha256":
                if _HEX64.match(name.lower()):
                    hit = self.by_sha.get(name.lower())
                else:  # a file: its bytes' digest
                    file = Path(name) if os.path.isabs(name) else base / name
                    digest = _sha256_file(file) if file.is_file() else None
                    hit = self.by_sha.get(digest) if digest else None
            out[k] = -1 if hit is None else hit
        return out


def match_names(stimuli: _StoreStimuli, names: list[str], by: str = "auto", base: Path = Path(".")) -> StimulusMatch:
    """Store ids of ``names`` by relative path, id or sha256 (of a hex digest, or of the named
    file's bytes); ``auto`` takes whichever matches the most (ties: path, id, sha256)."""
    if by not in MATCH_BY:
        raise ConfigError(f"unknown --match-by {by!r}; choose one of {', '.join(MATCH_BY)}")
    modes = ("path", "id", "sha256") if by == "auto" else (by,)
    best = None
    for mode in modes:
        ids = stimuli.lookup(names, mode, base)
        if best is None or (ids >= 0).sum() > (best[1] >= 0).sum():
            best = (mode, ids)
        if (ids >= 0).all():
            break
    mode, ids = best
    return StimulusMatch(mode, ids, [n for n, i in zip(names, ids) if i < 0])


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    """One target (a region, or a behavioural task): its subjects' RDMs on the matched stimuli,
    in the store's id order."""

    name: str
    file: str
    ids: np.ndarray  # matched store ids, ascending
    vectors: np.ndarray  # (R, m(m−1)/2): condensed RDMs, the upper triangle row by row
    subjects: list[str]  # per RDM
    n_given: int
    matched_by: str
    missing: list[str]

    @property
    def n_subjects(self) -> int:
        return len(set(self.subjects))

    @property
    def n_rdm(self) -> int:
        return int(self.vectors.shape[0])

    def describe(self) -> str:
        miss = ""
        if self.missing:
            shown = ", ".join(self.missing[:5]) + (", …" if len(self.missing) > 5 else "")
            miss = f"; not in the store: {len(self.missing)} ({shown})"
        return (f"{self.name} ({Path(self.file).name}): {self.n_rdm} RDM(s) of "
                f"{self.n_subjects} subject(s); matched {len(self.ids):,} of {self.n_given:,} stimuli by "
                f"{self.matched_by}{miss}")


def _pick(descriptors: dict, wanted: str | None, defaults: Sequence[str], what: str, where: str) -> str | None:
    if wanted:
        if wanted not in descriptors:
            raise ConfigError(f"{where} has no RDM descriptor {wanted!r} for the {what}{close_matches(wanted, descriptors)}"
                              f" (it has: {', '.join(descriptors) or 'none'})")
        return wanted
    return next((k for k in defaults if k in descriptors), None)


def _targets_of(f: RDMFile, stimuli: _StoreStimuli, match_by: str, target_by: str | None,
                subject_by: str | None) -> list[Target]:
    match = match_names(stimuli, f.names, match_by, Path(f.path).parent)
    ok = np.flatnonzero(match.ids >= 0)
    seen: dict[int, int] = {}
    for k in ok:
        first = seen.setdefault(int(match.ids[k]), int(k))
        if first != k:
            which = (f"stimulus {f.names[k]} is listed twice (rows {first} and {k})" if f.names[first] == f.names[k]
                     else f"stimuli {f.names[first]} and {f.names[k]} (rows {first} and {k}) both match store "
                     f"stimulus {int(match.ids[k])} (by {match.by})")
            raise StimulusSetError(f"{f.path}: {which}; each stimulus may appear once")
    if len(ok) < MIN_MATCHED:
        raise StimulusSetError(f"{f.path}: only {len(ok)} of its {len(f.names)} stimuli are in the store (by "
                               f"{match.by}; e.g. not found: {', '.join(match.missing[:3])}); comparing needs at "
                               f"least {MIN_MATCHED}: give paths relative to the store's stimulus folder, store ids "
                               "or sha256 digests")
    order = ok[np.argsort(match.ids[ok], kind="stable")]
    ids = match.ids[order]
    V = _reordered(f.vectors, len(f.names), order)
    tkey = _pick(f.descriptors, target_by, TARGET_DESCRIPTORS, "target", f.path)
    skey = _pick(f.descriptors, subject_by, SUBJECT_DESCRIPTORS, "subjects", f.path)
    stem = Path(f.path).stem
    groups = f.descriptors[tkey] if tkey else [""] * f.n_rdm
    out = []
    for value in dict.fromkeys(groups):
        rows = [r for r in range(f.n_rdm) if groups[r] == value]
        subjects = [f.descriptors[skey][r] for r in rows] if skey else [str(r) for r in rows]
        name = f"{stem}:{value}" if value else stem
        out.append(Target(name, f.path, ids, V[rows], subjects, len(f.names), match.by, match.missing))
    return out


def read_targets(store, files: Sequence[str | os.PathLike], *, stimuli: str | os.PathLike | None = None,
                 similarities: bool = False, match_by: str = "auto", pattern_descriptor: str | None = None,
                 target_by: str | None = None, subject_by: str | None = None) -> list[Target]:
    """Every target of ``files``, matched to ``store``'s stimuli. A file's RDMs split into targets
    by the RDM descriptor ``target_by`` (default: region, roi, area, target or layer when present)
    and into subjects by ``subject_by`` (default: subject, subj, participant or sub; else each
    RDM is a subject). A target is named ``<file stem>:<value>`` (the stem alone for one target)."""
    from vecsim.compare import _open

    if not files:
        raise ConfigError("give at least one --rdm FILE")
    st = _open(store)
    known = _StoreStimuli(st)
    targets: list[Target] = []
    for f in files:
        rdm_file = read_rdm_file(f, stimuli=stimuli, similarities=similarities, pattern_descriptor=pattern_descriptor)
        targets += _targets_of(rdm_file, known, match_by, target_by, subject_by)
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"two targets are both named {twice}; give the files distinct names")
    return targets


# --------------------------------------------------------------------------- layer RDMs


def layer_rdm(data, ids: np.ndarray, source: str = "auto") -> tuple[np.ndarray, str]:
    """(1 − s on ``ids`` (m, m), the source): s exact from the evaluation subset when it holds
    every id (unless ``source`` is stored-vectors), else the stored cosine estimates."""
    from vecsim.compare import EXACT, STORED, _in_sorted
    from vecsim.measures import cosine_from_gram

    ev = data.eval if source != STORED else None
    if ev is not None and _in_sorted(ev["ids"], ids).all():
        return 1.0 - cosine_from_gram(data.gram(ids)), EXACT
    if source == EXACT:
        held = 0 if data.eval is None else int(_in_sorted(data.eval["ids"], ids).sum())
        raise StoreError(f"the evaluation subset of {data.layer} holds {held} of the {len(ids)} matched stimuli; "
                         "use --source auto or stored-vectors, or re-index with a larger --eval-size")
    if data.centred:
        raise StoreError(f"{data.layer} was indexed with --center: its stored vectors are directions of "
                         "stimulus-centred vectors, not the raw cosines; keep an evaluation subset holding the "
                         "target's stimuli (--eval-size)")
    return 1.0 - cosine_from_gram(data.stored_gram(ids)), STORED


# --------------------------------------------------------------------------- inference


class _NoBars:
    """Stands in for the tqdm module inside rsatoolbox's evaluation: the same loop, no bar."""

    @staticmethod
    def trange(*args, **kwargs):
        return range(*args)


@contextlib.contextmanager
def _seeded(seed: int, progress: bool):
    """numpy's global random state seeded for rsatoolbox, the caller's put back afterwards;
    rsatoolbox's progress bars off unless ``progress``."""
    from rsatoolbox.inference import evaluate

    state = np.random.get_state()
    bars = evaluate.tqdm
    if not progress:
        evaluate.tqdm = _NoBars
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
        evaluate.tqdm = bars


def adjust_pvalues(p: np.ndarray, correction: str) -> np.ndarray:
    """Bonferroni (p·m, at most 1) or Benjamini–Hochberg FDR-adjusted p-values of ``p``."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if correction == "none" or m == 0:
        return p.copy()
    if correction == "bonferroni":
        return np.minimum(p * m, 1.0)
    order = np.argsort(p)
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def _bootstrap_kind(kind: str, n_subjects: int) -> str:
    if kind == "auto":
        return "both" if n_subjects >= SUBJECTS_FOR_BOOTSTRAP else "stimuli"
    if kind in ("subjects", "both") and n_subjects < 3:
        raise ConfigError(f"--bootstrap {kind} resamples subjects and needs at least 3; this target has "
                          f"{n_subjects}: use --bootstrap stimuli")
    return kind


def evaluate_target(layer_rdms: dict[str, np.ndarray], target: Target, comparator: str, *, bootstrap: str = "auto",
                    n_bootstraps: int = DEFAULT_BOOTSTRAPS, seed: int = 0, test: str = "t-test",
                    correction: str = "fdr", ci: float = CI_LEVEL, progress: bool = False) -> dict:
    """rsatoolbox's evaluation of every layer (a ``ModelFixed``) against one target's RDMs with one
    comparator: per layer the value (mean over the target's RDMs of ``rsatoolbox.rdm.compare``),
    its bootstrap confidence interval, p against 0, p against the best layer (raw and corrected),
    and the target's noise ceilings (``boot_noise_ceiling``; NaN for one subject)."""
    rsa = _rsatoolbox()
    from rsatoolbox.inference import boot_noise_ceiling, eval_bootstrap, eval_bootstrap_pattern, eval_bootstrap_rdm
    from rsatoolbox.model import ModelFixed
    from rsatoolbox.rdm import RDMs

    names = list(layer_rdms)
    iu = np.triu_indices(len(target.ids), 1)
    data = RDMs(target.vectors, dissimilarity_measure="target",
                rdm_descriptors={"subject": list(target.subjects)},
                pattern_descriptors={"id": target.ids.tolist()})
    models = [ModelFixed(name, RDMs(layer_rdms[name][iu][None], pattern_descriptors={"id": target.ids.tolist()}))
              for name in names]
    stacked = RDMs(np.stack([layer_rdms[name][iu] for name in names]), pattern_descriptors={"id": target.ids.tolist()})
    values = np.mean(rsa.rdm.compare(stacked, data, method=comparator), axis=1)
    best = int(np.nanargmax(values)) if np.isfinite(values).any() else 0
    lower = upper = float("nan")
    if target.n_subjects >= 2:
        lower, upper = (float(x) for x in boot_noise_ceiling(data, method=comparator, rdm_descriptor="subject"))
    kind = _bootstrap_kind(bootstrap, target.n_subjects)
    out = {"values": values, "best": best, "noise_lower": lower, "noise_upper": upper, "bootstrap": kind,
           "n_bootstraps": 0 if kind == "none" else int(n_bootstraps), "seed": int(seed), "test": test,
           "correction": correction}
    nan = np.full(len(names), np.nan)
    if kind == "none":
        return {**out, "ci_low": nan, "ci_high": nan, "sem": nan, "p_zero": nan, "p_best": nan,
                "p_best_corrected": nan}
    with _seeded(seed, progress):
        if kind == "stimuli":
            result = eval_bootstrap_pattern(models, data, method=comparator, N=n_bootstraps,
                                            rdm_descriptor="subject", boot_noise_ceil=False)
        elif kind == "subjects":
            result = eval_bootstrap_rdm(models, data, method=comparator, N=n_bootstraps,
                                        rdm_descriptor="subject", boot_noise_ceil=False)
        else:
            result = eval_bootstrap(models, data, method=comparator, N=n_bootstraps,
                                    rdm_descriptor="subject", boot_noise_ceil=False)
    low, high = (np.asarray(x, dtype=np.float64) for x in result.get_ci(ci, test_type=test))
    if len(names) > 1:
        pairwise = np.asarray(result.test_pairwise(test_type=test), dtype=np.float64)
        p_best = pairwise[best].copy()
        p_best[best] = np.nan
        others = np.arange(len(names)) != best
        corrected = np.full(len(names), np.nan)
        corrected[others] = adjust_pvalues(p_best[others], correction)
    else:
        p_best = corrected = nan
    sem = result.get_sem()
    return {**out, "ci_low": low, "ci_high": high, "sem": nan if sem is None else np.asarray(sem, dtype=np.float64),
            "p_zero": np.asarray(result.test_zero(test_type=test), dtype=np.float64), "p_best": p_best,
            "p_best_corrected": corrected}


def parse_comparators(comparators: str | Iterable[str]) -> list[str]:
    """'corr', 'corr,spearman' or 'all' → comparator names, in order."""
    from vecsim.compare import parse_names

    return parse_names(comparators, COMPARATORS, "comparator")


# --------------------------------------------------------------------------- the comparison


@dataclass
class RDMComparison:
    """The result of :func:`compare_rdms`: one row per layer × target × comparator."""

    store: str
    model: dict
    layers: list[str]
    depth: dict[str, int]
    targets: list[dict]
    comparators: list[str]
    settings: dict
    cells: list[dict] = field(default_factory=list)

    def rows(self) -> list[dict]:
        return [dict(c) for c in self.cells]

    def value(self, layer: str, target: str, comparator: str) -> float:
        return self.cell(layer, target, comparator)["value"]

    def cell(self, layer: str, target: str, comparator: str) -> dict:
        for c in self.cells:
            if (c["layer"], c["target"], c["comparator"]) == (layer, target, comparator):
                return c
        raise KeyError(f"no row {layer} × {target} × {comparator}")

    def matrix(self, comparator: str) -> np.ndarray:
        """(layers, targets) values of one comparator."""
        names = [t["name"] for t in self.targets]
        M = np.full((len(self.layers), len(names)), np.nan)
        for c in self.cells:
            if c["comparator"] == comparator:
                M[self.layers.index(c["layer"]), names.index(c["target"])] = c["value"]
        return M

    def best(self, target: str, comparator: str) -> str:
        return next(c["layer"] for c in self.cells if c["target"] == target and c["comparator"] == comparator
                    and c["best"])

    def to_dict(self) -> dict:
        from vecsim._io import json_safe

        return json_safe({"store": self.store, "model": self.model, "layers": self.layers, "depth": self.depth,
                          "targets": self.targets, "comparators": self.comparators,
                          "comparator_descriptions": {c: COMPARATORS[c] for c in self.comparators},
                          "settings": self.settings, "rows": self.rows()})

    # -- text --------------------------------------------------------------------
    def format(self) -> str:
        s = self.settings
        lines = [f"store {self.store} ({self.model.get('name')}): {len(self.layers)} layers in depth order against "
                 f"{len(self.targets)} target(s)"]
        lines += [f"  {t['describe']}" for t in self.targets]
        for comparator in self.comparators:
            lines += ["", f"{comparator}: {COMPARATORS[comparator]}"]
            for t in self.targets:
                cells = [c for c in self.cells if c["comparator"] == comparator and c["target"] == t["name"]]
                first = cells[0]
                ceiling = ("noise ceiling: one subject, none" if not math.isfinite(first["noise_lower"]) else
                           f"noise ceiling [{first['noise_lower']:.4f}, {first['noise_upper']:.4f}]")
                boot = ("no bootstrap" if first["bootstrap"] == "none" else
                        f"{first['n_bootstraps']} bootstraps over {first['bootstrap']} (seed {first['seed']})")
                lines.append(f"  {t['name']}: {ceiling}; {boot}")
                width = max(5, *(len(c["layer"]) for c in cells))
                lines.append(f"    {'layer':<{width}}  {'value':>8}  {'95% CI':>19}  {'p vs best':>9}  source")
                for c in cells:
                    ci = ("-" if not math.isfinite(c["ci_low"]) else f"[{c['ci_low']:.4f}, {c['ci_high']:.4f}]")
                    if c["best"]:
                        mark = "best"
                    elif math.isfinite(c["p_best_corrected"]):
                        mark = f"{c['p_best_corrected']:.3g}" + ("*" if c["differs_from_best"] else "")
                    else:
                        mark = "-"
                    lines.append(f"    {c['layer']:<{width}}  {c['value']:>8.4f}  {ci:>19}  {mark:>9}  "
                                 f"{c['source']} n={c['n']}")
        lines += ["", f"p vs best: {s['test']} on the bootstrap ({s['correction']}-corrected over the comparisons "
                      f"with the best layer); * = differs at {ALPHA:g}"]
        return "\n".join(lines)

    # -- files -------------------------------------------------------------------
    def figure_names(self) -> list[str]:
        from vecsim.store import layer_slug

        return ([f"{layer_slug(t['name'])}_{c}.png" for t in self.targets for c in self.comparators]
                + [f"heatmap_{c}.png" for c in self.comparators])

    def save(self, out: str | os.PathLike, overwrite: bool = False) -> list[Path]:
        """rsa.parquet / rsa.csv (long form), rsa.json, per target and comparator the layer
        profile PNG, and per comparator the layer × target heatmap PNG."""
        import pyarrow as pa

        from vecsim._io import dumps_json, write_text_atomic
        from vecsim.compare import _heatmap, _out_dir, write_long_table
        from vecsim.store import layer_slug

        folder = _out_dir(out, [*RESULT_FILES, *self.figure_names()], overwrite, "compare --rdm")
        schema = pa.schema([
            ("layer", pa.string()), ("depth", pa.int32()), ("target", pa.string()), ("comparator", pa.string()),
            ("value", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("sem", pa.float64()),
            ("noise_lower", pa.float64()), ("noise_upper", pa.float64()), ("p_zero", pa.float64()),
            ("p_best", pa.float64()), ("p_best_corrected", pa.float64()), ("best", pa.bool_()),
            ("differs_from_best", pa.bool_()), ("source", pa.string()), ("n", pa.int64()),
            ("n_subjects", pa.int32()), ("n_rdms", pa.int32()), ("bootstrap", pa.string()),
            ("n_bootstraps", pa.int32()), ("seed", pa.int64()), ("test", pa.string()), ("correction", pa.string()),
        ])
        meta = {k: v for k, v in self.to_dict().items() if k != "rows"}
        written = write_long_table(folder, "rsa", self.rows(), schema, meta)
        path = folder / "rsa.json"
        write_text_atomic(path, dumps_json(self.to_dict()) + "\n")
        written.append(path)
        for t in self.targets:
            for comparator in self.comparators:
                path = folder / f"{layer_slug(t['name'])}_{comparator}.png"
                self._plot_profile(t["name"], comparator, path)
                written.append(path)
        for comparator in self.comparators:
            path = folder / f"heatmap_{comparator}.png"
            M = self.matrix(comparator)
            names = [t["name"] for t in self.targets]
            finite = M[np.isfinite(M)]
            lo = float(min(0.0, finite.min())) if finite.size else 0.0
            hi = float(max(finite.max(), 1e-9)) if finite.size else 1.0
            _heatmap(path, M, self.layers, names, f"{comparator} of each layer's RDM with each target's\n"
                     f"({COMPARATORS[comparator]})", vmin=lo, vmax=hi, row_label="layer (depth order)",
                     col_label="target")
            written.append(path)
        return written

    def _plot_profile(self, target: str, comparator: str, path: Path) -> None:
        from vecsim.compare import _figure

        cells = sorted((c for c in self.cells if c["target"] == target and c["comparator"] == comparator),
                       key=lambda c: self.layers.index(c["layer"]))
        x = np.arange(len(cells))
        fig = _figure(max(5.0, 1.0 + 0.6 * len(cells)), 4.6)
        ax = fig.add_subplot(1, 1, 1)
        first = cells[0]
        if math.isfinite(first["noise_lower"]):
            ax.axhspan(first["noise_lower"], first["noise_upper"], color="0.85", zorder=0,
                       label=f"noise ceiling [{first['noise_lower']:.3f}, {first['noise_upper']:.3f}]")
        values = np.array([c["value"] for c in cells])
        low = np.array([c["ci_low"] for c in cells])
        high = np.array([c["ci_high"] for c in cells])
        if np.isfinite(low).any():
            ax.errorbar(x, values, yerr=[np.clip(values - low, 0, None), np.clip(high - values, 0, None)], fmt="o-",
                        color="C0", ecolor="C0", capsize=3, lw=1.2, label=f"{int(CI_LEVEL * 100)}% CI "
                        f"({first['n_bootstraps']} bootstraps over {first['bootstrap']})")
        else:
            ax.plot(x, values, "o-", color="C0", lw=1.2)
        for xi, c in zip(x, cells):
            if c["best"]:
                ax.annotate("best", (xi, c["value"]), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
            elif c["differs_from_best"]:
                ax.annotate("*", (xi, c["value"]), textcoords="offset points", xytext=(8, -3), fontsize=9)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_xticks(x, [c["layer"] for c in cells], rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("layer (depth order)", fontsize=8)
        ax.set_ylabel(f"RDM {comparator}", fontsize=8)
        ax.set_title(f"{target}: {first['n']} stimuli, {first['n_subjects']} subject(s)\n"
                     f"* differs from the best ({first['test']}, {first['correction']}, {ALPHA:g})", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, frameon=False)
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")  # the legend sits below the axes, clear of the band


def compare_rdms(
    store,
    rdms: Sequence[str | os.PathLike],
    *,
    layers: Sequence[str] | str | None = None,
    comparators: str | Iterable[str] = ("corr",),
    stimuli: str | os.PathLike | None = None,
    similarities: bool = False,
    match_by: str = "auto",
    pattern_descriptor: str | None = None,
    target_by: str | None = None,
    subject_by: str | None = None,
    source: str = "auto",
    bootstrap: str = "auto",
    n_bootstraps: int = DEFAULT_BOOTSTRAPS,
    seed: int = 0,
    test: str = "t-test",
    correction: str = "fdr",
    progress: bool = False,
) -> RDMComparison:
    """Every layer of ``store`` (depth order) against every target RDM of ``rdms`` (see
    :func:`read_targets`), with each comparator of ``comparators`` (:data:`COMPARATORS`).

    ``bootstrap``: ``stimuli`` (rsatoolbox's ``eval_bootstrap_pattern``), ``subjects``
    (``eval_bootstrap_rdm``), ``both`` (``eval_bootstrap``), ``none``, or ``auto``: both from
    :data:`SUBJECTS_FOR_BOOTSTRAP` subjects on, else stimuli. ``test``: rsatoolbox's test type
    for the intervals and p-values (t-test, bootstrap or ranksum); ``correction`` (fdr,
    bonferroni, none) applies over the comparisons with the best layer.
    """
    from vecsim.compare import SOURCES, _LayerData, _layers, _open, layers_by_depth

    _rsatoolbox()
    if source not in SOURCES:
        raise ConfigError(f"unknown --source {source!r}; choose one of {', '.join(SOURCES)}")
    if bootstrap not in BOOTSTRAPS:
        raise ConfigError(f"unknown --bootstrap {bootstrap!r}; choose one of {', '.join(BOOTSTRAPS)}")
    if test not in TESTS:
        raise ConfigError(f"unknown --test {test!r}; choose one of {', '.join(TESTS)}")
    if correction not in CORRECTIONS:
        raise ConfigError(f"unknown --correction {correction!r}; choose one of {', '.join(CORRECTIONS)}")
    if isinstance(n_bootstraps, bool) or int(n_bootstraps) < 10 and bootstrap != "none":
        raise ConfigError(f"--bootstraps must be at least 10 (got {n_bootstraps}); {DEFAULT_BOOTSTRAPS} is usual")
    names = parse_comparators(comparators)
    st = _open(store)
    ordered, depth, _ = layers_by_depth(st, _layers(st, layers))
    targets = read_targets(st, rdms, stimuli=stimuli, similarities=similarities, match_by=match_by,
                           pattern_descriptor=pattern_descriptor, target_by=target_by, subject_by=subject_by)
    for t in targets:  # fail before any long bootstrap
        _bootstrap_kind(bootstrap, t.n_subjects)
    data = {layer: _LayerData(st, layer) for layer in ordered}
    cells = []
    for t in targets:
        built = {layer: layer_rdm(data[layer], t.ids, source) for layer in ordered}
        rdm_of = {layer: d for layer, (d, _) in built.items()}
        for comparator in names:
            res = evaluate_target(rdm_of, t, comparator, bootstrap=bootstrap, n_bootstraps=int(n_bootstraps),
                                  seed=seed, test=test, correction=correction, progress=progress)
            for k, layer in enumerate(ordered):
                corrected = float(res["p_best_corrected"][k])
                cells.append({
                    "layer": layer, "depth": int(depth[layer]), "target": t.name, "comparator": comparator,
                    "value": float(res["values"][k]), "ci_low": float(res["ci_low"][k]),
                    "ci_high": float(res["ci_high"][k]), "sem": float(res["sem"][k]),
                    "noise_lower": res["noise_lower"], "noise_upper": res["noise_upper"],
                    "p_zero": float(res["p_zero"][k]), "p_best": float(res["p_best"][k]),
                    "p_best_corrected": corrected, "best": k == res["best"],
                    "differs_from_best": bool(math.isfinite(corrected) and corrected < ALPHA),
                    "source": built[layer][1], "n": int(len(t.ids)), "n_subjects": t.n_subjects,
                    "n_rdms": t.n_rdm, "bootstrap": res["bootstrap"],
                    "n_bootstraps": res["n_bootstraps"], "seed": int(seed), "test": test, "correction": correction,
                })
    target_info = [{"name": t.name, "file": t.file, "n_given": t.n_given, "matched": int(len(t.ids)),
                    "matched_by": t.matched_by, "missing": t.missing, "n_subjects": t.n_subjects,
                    "n_rdms": t.n_rdm, "subjects": sorted(set(t.subjects)),
                    "describe": t.describe()} for t in targets]
    settings = {"source": source, "bootstrap": bootstrap, "n_bootstraps": int(n_bootstraps), "seed": int(seed),
                "test": test, "correction": correction, "alpha": ALPHA, "ci": CI_LEVEL, "match_by": match_by,
                "similarities": bool(similarities), "layer_rdm": f"1 - {data[ordered[0]].similarity} of the raw "
                "activations", "rsatoolbox": _version("rsatoolbox"),
                "random_state": "np.random.seed(seed) before each target x comparator evaluation"}
    return RDMComparison(str(st.path), st.manifest.get("model", {}), ordered, {k: int(depth[k]) for k in ordered},
                         target_info, names, settings, cells)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_out(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an ``out`` folder that already holds a comparison's tables, before the bootstraps
    run rather than after (:meth:`RDMComparison.save` checks every file again)."""
    from vecsim.compare import _out_dir

    path = Path(out)
    if path.exists() and not path.is_dir():
        _out_dir(out, [], overwrite, "compare --rdm")  # the one-line "is a file" error
    clash = [name for name in RESULT_FILES if (path / name).exists()]
    if clash and not overwrite:
        raise OutputExistsError(f"{path} already holds {clash[0]} from an earlier `vecsim compare --rdm`; pass "
                                "--overwrite to replace it or choose another --out")


def load_result(folder: str | os.PathLike) -> dict:
    """The rsa.json of a ``vecsim compare --rdm`` output folder (for the report)."""
    path = Path(folder) / "rsa.json"
    if not path.is_file():
        raise ConfigError(f"{folder} holds no rsa.json; give the --out folder of a `vecsim compare STORE --rdm FILE`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
