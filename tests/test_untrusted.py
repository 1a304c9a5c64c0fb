"""Untrusted files: checkpoints, FAISS files and manifests that are truncated, foreign or
hostile give one clear error (a VecsimError; on the command line one ``error:`` line and
exit code 2), never a crash, a traceback or code execution."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vecsim
from vecsim.cli import main as cli_main
from vecsim.errors import CheckpointError, StoreError
from vecsim.models import load_model
from vecsim.store import FORMAT_VERSION, MANIFEST_NAME, Store

LAYER = "features.relu2"


# -- checkpoints -------------------------------------------------------------------------

class _Evil:
    """Unpickling this creates a file: the proof that pickled code ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _one_line_checkpoint_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as caught:
        load_model("digits-cnn", checkpoint=path)
    message = str(caught.value)
    assert message and "\n" not in message and str(path) in message
    return message


def test_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "code_ran"
    _Evil.marker = str(marker)
    zipped = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": _Evil()}}, zipped)
    legacy = tmp_path / "evil.pkl"  # a bare pickle, not torch's zip format
    legacy.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    for path in (zipped, legacy):
        assert "weights_only=True" in _one_line_checkpoint_error(path)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "text"])
def test_damaged_checkpoint_is_a_one_line_checkpoint_error(tmp_path, damage):
    good = tmp_path / "good.pt"
    torch.save(load_model("digits-cnn", weights="none").module.state_dict(), good)
    data = good.read_bytes()
    bad = tmp_path / f"{damage}.pt"
    bad.write_bytes({
        "truncated": data[: len(data) // 2],
        "random": np.random.default_rng(0).bytes(len(data)),
        "empty": b"",
        "text": b"this is not a checkpoint\n",
    }[damage])
    _one_line_checkpoint_error(bad)


# -- a store to damage -------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_store(shared_image_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "store"
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=[LAYER], out=str(out), dim="4",
                         progress=False)
    return out


@pytest.fixture
def store_copy(built_store, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(built_store, copy)
    return copy


def _layer_file(store: Path, name: str) -> Path:
    return store / "layers" / Store.open(store).layer_info(LAYER)["slug"] / name


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "random":
        path.write_bytes(np.random.default_rng(1).bytes(len(data)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("not a faiss file\n")
    elif how == "missing":
        path.unlink()
    else:
        raise ValueError(how)


def run_cli_inprocess(capsys, *args) -> tuple[int, str]:
    """``vecsim ARGS`` through the real entry point; (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli_main(list(args))
    return exited.value.code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- FAISS files -----------------------------------------------------------------------

DAMAGES = ["truncated", "random", "empty", "text", "missing"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_index_file_is_a_store_error(store_copy, capsys, how):
    _damage(_layer_file(store_copy, "index.faiss"), how)
    with pytest.raises(StoreError, match="index"):
        Store.open(store_copy).index(LAYER)
    with pytest.raises(StoreError):
        Store.open(store_copy).query(id=0)
    code, err = run_cli_inprocess(capsys, "query", str(store_copy), "--id", "0")
    assert_one_error_line(code, err, "index.faiss")


def _foreign_index(kind: str):
    import faiss

    if kind == "other-dim":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(3))
        index.add_with_ids(np.eye(3, dtype=np.float32), np.array([0, 1, 2], dtype=np.int64))
    elif kind == "other-ids":  # right dim, but none of the store's stimulus ids
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
        index.add_with_ids(np.eye(4, dtype=np.float32), np.array([100, 101, 102, 103], dtype=np.int64))
    else:  # no ids at all: results would be row positions, silently wrong
        index = faiss.IndexFlatIP(4)
        index.add(np.eye(4, dtype=np.float32))
    return index


@pytest.mark.parametrize("kind", ["other-dim", "other-ids", "no-ids"])
def test_foreign_valid_index_file_is_a_store_error(store_copy, capsys, kind):
    import faiss

    faiss.write_index(_foreign_index(kind), str(_layer_file(store_copy, "index.faiss")))
    with pytest.raises(StoreError):
        Store.open(store_copy).query(id=0)
    code, err = run_cli_inprocess(capsys, "query", str(store_copy), "--id", "0")
    assert_one_error_line(code, err)


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_transform_file_is_a_store_error(store_copy, shared_image_set, capsys, how):
    _damage(_layer_file(store_copy, "transform.faiss"), how)
    with pytest.raises(StoreError, match="transform.faiss"):
        Store.open(store_copy).reducer(LAYER)
    image = next(p for p in sorted(shared_image_set.rglob("*.png")))
    code, err = run_cli_inprocess(capsys, "query", str(store_copy), "--image", str(image), "--device", "cpu")
    assert_one_error_line(code, err, "transform.faiss")


def _foreign_transform(kind: str, dim_in: int):
    import faiss

    if kind == "other-dims":
        other = faiss.PCAMatrix(7, 2)
        other.train(np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32))
        return other
    if kind == "not-linear":  # right input size, but no matrix
        return faiss.NormalizationTransform(dim_in)
    return faiss.LinearTransform(dim_in, 3, False)  # right input size, wrong output size, no matrix stored


@pytest.mark.parametrize("kind", ["other-dims", "not-linear", "empty-linear"])
def test_foreign_valid_transform_file_is_a_store_error(store_copy, kind):
    import faiss

    dim_in = Store.open(store_copy).layer_info(LAYER)["reducer"]["dim_in"]
    faiss.write_VectorTransform(_foreign_transform(kind, dim_in), str(_layer_file(store_copy, "transform.faiss")))
    with pytest.raises(StoreError, match="transform.faiss"):
        Store.open(store_copy).reducer(LAYER)


# -- manifests -------------------------------------------------------------------------

def _manifest_text(store: Path, how: str) -> bytes:
    text = (store / MANIFEST_NAME).read_text(encoding="utf-8")
    manifest = json.loads(text)
    if how == "truncated":
        return text[: len(text) // 2].encode()
    if how == "not-json":
        return b"\x00\xff\xfe binary garbage \x89PNG"
    if how == "no-version":
        return json.dumps({k: v for k, v in manifest.items() if k != "format_version"}).encode()
    if how == "list":
        return b"[1, 2, 3]"
    if how == "newer":
        return json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}).encode()
    raise ValueError(how)


MANIFEST_CASES = {
    "truncated": "not valid JSON",
    "not-json": "not valid JSON",
    "no-version": "format_version",
    "list": "format_version",
    "newer": "upgrade vecsim",
}


@pytest.mark.parametrize("how", list(MANIFEST_CASES))
def test_bad_manifest_is_a_store_error_with_a_clear_message(store_copy, capsys, how):
    (store_copy / MANIFEST_NAME).write_bytes(_manifest_text(store_copy, how))
    with pytest.raises(StoreError) as caught:
        Store.open(store_copy)
    assert MANIFEST_CASES[how] in str(caught.value) and "\n" not in str(caught.value)
    for args in (["info", str(store_copy)], ["query", str(store_copy), "--id", "0"]):
        code, err = run_cli_inprocess(capsys, *args)
        assert_one_error_line(code, err, MANIFEST_CASES[how])


def _edit_manifest(store: Path, edit) -> None:
    manifest = json.loads((store / MANIFEST_NAME).read_text(encoding="utf-8"))
    edit(manifest)
    (store / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")


MALFORMED = {
    "version-string": lambda m: m.update(format_version="1"),
    "version-zero": lambda m: m.update(format_version=0),
    "version-bool": lambda m: m.update(format_version=True),
    "no-status": lambda m: m.pop("status"),
    "layers-list": lambda m: m.update(layers=[1]),
    "layer-without-reducer": lambda m: m["layers"][LAYER].pop("reducer"),
    "slug-escapes-the-store": lambda m: m["layers"][LAYER].update(slug="../../elsewhere"),
}


@pytest.mark.parametrize("how", list(MALFORMED))
def test_malformed_manifest_is_a_store_error_not_a_crash(store_copy, capsys, how):
    _edit_manifest(store_copy, MALFORMED[how])
    with pytest.raises(StoreError) as caught:
        Store.open(store_copy)
    assert "newer vecsim" not in str(caught.value)  # "1" (a string) is damage, not a newer format
    for args in (["info", str(store_copy)], ["query", str(store_copy), "--id", "0"]):
        assert_one_error_line(*run_cli_inprocess(capsys, *args), MANIFEST_NAME)


def test_overwrite_replaces_a_store_whose_manifest_is_damaged(store_copy, shared_image_set):
    (store_copy / MANIFEST_NAME).write_bytes(b"{ truncated")
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=[LAYER], out=str(store_copy),
                         dim="4", progress=False, overwrite=True)
    assert Store.open(store_copy).complete


def test_newer_format_message_names_both_versions(store_copy):
    (store_copy / MANIFEST_NAME).write_bytes(_manifest_text(store_copy, "newer"))
    with pytest.raises(StoreError, match=rf"store format {FORMAT_VERSION + 1}.*up to {FORMAT_VERSION}.*upgrade vecsim"):
        Store.open(store_copy)


def test_older_format_is_refused_with_what_to_do(store_copy):
    manifest = json.loads((store_copy / MANIFEST_NAME).read_text())
    (store_copy / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION - 1}))
    with pytest.raises(StoreError, match=rf"older vecsim \(store format {FORMAT_VERSION - 1}.*index the stimuli again"):
        Store.open(store_copy)


def test_command_line_errors_have_no_traceback_in_a_real_process(built_store, tmp_path):
    """The same errors through ``python -m vecsim`` in a fresh interpreter."""
    newer = tmp_path / "newer"
    shutil.copytree(built_store, newer)
    (newer / MANIFEST_NAME).write_bytes(_manifest_text(newer, "newer"))
    broken = tmp_path / "broken"
    shutil.copytree(built_store, broken)
    _damage(_layer_file(broken, "index.faiss"), "random")
    for args, needle in ((["info", str(newer)], "upgrade vecsim"), (["query", str(broken), "--id", "0"], "index.faiss")):
        result = subprocess.run([sys.executable, "-m", "vecsim", *args], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        assert_one_error_line(result.returncode, result.stderr, needle)
        assert result.stdout == ""
