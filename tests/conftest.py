"""Shared fixtures: a small generated stimulus set, the digits cache, seeded data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _vecsim_cache(tmp_path_factory):
    """Keep the built-in sets out of the user's home; shared by every test of the run."""
    if "VECSIM_CACHE" not in os.environ:
        os.environ["VECSIM_CACHE"] = str(tmp_path_factory.mktemp("vecsim-cache"))
    yield


def make_image_set(root: Path, per_class: int = 6, classes=("cat", "dog", "owl"), size=40, seed=0) -> Path:
    """Coloured, textured images in class folders (PNG and JPEG), deterministic."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, 3)
        for i in range(per_class):
            yy, xx = np.mgrid[0:size, 0:size]
            pattern = np.sin((xx * (c + 1) + yy * (i % 3 + 1)) / 4.0)[..., None]
            img = np.clip(base + 80 * pattern + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(img).save(folder / f"img_{i:02d}.{ext}")
    return root


@pytest.fixture
def image_set(tmp_path) -> Path:
    return make_image_set(tmp_path / "stimuli")


@pytest.fixture(scope="session")
def shared_image_set(tmp_path_factory) -> Path:
    return make_image_set(tmp_path_factory.mktemp("shared") / "stimuli")


def raw_features(model_name: str, root: Path, rel_paths: list[str], layer: str, size: int | None = None,
                 weights: str = "none", checkpoint=None):
    """Raw activations of ``layer`` computed directly (plain hook, no vecsim extraction), float64."""
    import torch

    from vecsim.models import load_model
    from vecsim.stimuli import decode_image

    loaded = load_model(model_name, weights=None if checkpoint else weights, checkpoint=checkpoint, size=size)
    module = dict(loaded.module.named_modules())[layer]
    grabbed = []
    handle = module.register_forward_hook(lambda m, i, o: grabbed.append(o.detach().clone()))
    try:
        with torch.no_grad():
            for rel in rel_paths:
                x = loaded.preprocessing(decode_image(root / rel).image).unsqueeze(0)
                loaded.module(x)
    finally:
        handle.remove()
    return torch.cat([g.flatten(1) for g in grabbed]).double().numpy()


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    n[n == 0] = 1
    y = x / n
    return y @ y.T
