"""The built-in digits stimuli and the shipped demo CNN."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import vecsim.digits as digits_mod
from vecsim.digits import (
    DIGITS_COUNT,
    DIGITS_INPUT_SIZE,
    WEIGHTS_PATH,
    DigitsCNN,
    default_digits_root,
    load_digits_cnn,
    materialize_digits,
    preprocess_digit,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_digits(tmp_path_factory.mktemp("cache") / "digits")


def test_materialize_layout_and_labels(digits_root: Path) -> None:
    pngs = sorted(digits_root.glob("*/*.png"))
    assert len(pngs) == DIGITS_COUNT
    assert sorted(p.name for p in digits_root.iterdir() if p.is_dir()) == [
        str(i) for i in range(10)
    ]
    ref = load_digits()
    for path in pngs:
        index = int(path.stem)
        assert int(path.parent.name) == ref.target[index]
    # Pixel values are the 0..16 intensities rescaled to 0..255, at native 8x8.
    with Image.open(digits_root / str(ref.target[5]) / "0005.png") as img:
        assert img.mode == "L" and img.size == (8, 8)
        expected = np.rint(ref.images[5] * 255 / 16).astype(np.uint8)
        assert np.array_equal(np.asarray(img), expected)
    # Nothing left behind from the temporary build directory.
    assert [p.name for p in digits_root.parent.iterdir()] == [digits_root.name]


def test_materialize_is_idempotent(digits_root: Path) -> None:
    sample = sorted(digits_root.glob("*/*.png"))[::300]
    before = {p: (_sha256(p), p.stat().st_mtime_ns) for p in sample}
    assert materialize_digits(digits_root) == digits_root
    assert {p: (_sha256(p), p.stat().st_mtime_ns) for p in sample} == before


def test_materialize_is_byte_deterministic(digits_root: Path, tmp_path: Path) -> None:
    other = materialize_digits(tmp_path / "again")
    sample = sorted(digits_root.glob("*/*.png"))[::97]
    for path in sample:
        assert _sha256(other / path.relative_to(digits_root)) == _sha256(path)


def test_materialize_replaces_incomplete_set(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    (root / "3").mkdir(parents=True)
    (root / "3" / "junk.png").write_bytes(b"not a png")
    assert materialize_digits(root) == root
    assert not (root / "3" / "junk.png").exists()
    assert len(list(root.glob("*/*.png"))) == DIGITS_COUNT
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]


def test_default_root_honours_vecsim_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VECSIM_CACHE", str(tmp_path))
    assert default_digits_root() == tmp_path / "builtin" / "digits"
    monkeypatch.delenv("VECSIM_CACHE")
    assert default_digits_root() == Path.home() / ".cache" / "vecsim" / "builtin" / "digits"


def test_weights_file_is_small_and_safe_to_load() -> None:
    assert WEIGHTS_PATH.is_file()
    assert WEIGHTS_PATH.stat().st_size < 2 * 1024 * 1024
    state = torch.load(WEIGHTS_PATH, weights_only=True, map_location="cpu")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(state) == set(DigitsCNN().state_dict())


def test_model_layers_are_named_and_not_inplace() -> None:
    model = load_digits_cnn(pretrained=False)
    names = dict(model.named_modules())
    for name in (
        "features.conv1",
        "features.relu2",
        "features.pool1",
        "features.relu4",
        "pool",
        "classifier",
    ):
        assert name in names
    assert not any(isinstance(m, torch.nn.ReLU) and m.inplace for m in model.modules())
    out = model(torch.zeros(2, 3, DIGITS_INPUT_SIZE, DIGITS_INPUT_SIZE))
    assert out.shape == (2, 10)


def test_pretrained_model_classifies_digits(digits_root: Path) -> None:
    model = load_digits_cnn()
    assert not model.training
    paths = sorted(digits_root.glob("*/*.png"))
    rng = np.random.default_rng(0)
    chosen = [paths[i] for i in rng.choice(len(paths), size=300, replace=False)]
    images = []
    for path in chosen:
        with Image.open(path) as img:
            images.append(preprocess_digit(img))
    batch = torch.stack(images)
    assert batch.shape == (300, 3, DIGITS_INPUT_SIZE, DIGITS_INPUT_SIZE)
    labels = torch.tensor([int(p.parent.name) for p in chosen])
    with torch.no_grad():
        accuracy = (model(batch).argmax(dim=1) == labels).float().mean().item()
    assert accuracy >= 0.9


def test_pretrained_rejects_other_head_size() -> None:
    with pytest.raises(ValueError):
        load_digits_cnn(pretrained=True, num_classes=5)
    assert load_digits_cnn(pretrained=False, num_classes=5).classifier.out_features == 5


def test_materialize_loses_race_gracefully(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Another process completing the set while we build ours: theirs is kept, ours discarded."""
    root = tmp_path / "digits"
    real_write = digits_mod._write_set

    def write_then_other_process_finishes(dest: Path) -> None:
        real_write(dest)
        real_write(root)  # the competing writer's set lands first

    monkeypatch.setattr(digits_mod, "_write_set", write_then_other_process_finishes)
    theirs = root / "0" / "0000.png"
    assert materialize_digits(root) == root
    assert theirs.is_file() and len(list(root.glob("*/*.png"))) == DIGITS_COUNT
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]
