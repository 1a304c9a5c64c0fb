"""Built-in demo stimuli (scikit-learn's 8x8 digits) and a small CNN trained on them.

The digits ship inside scikit-learn, so the demo works offline; the CNN weights
ship inside vecsim (``vecsim/data/digits_cnn.pt``, reproduced by
``scripts/train_digits_cnn.py``) so the demo has a model whose layers carry
real, learned structure rather than random features.

Preprocessing the model expects (mirror it exactly wherever the model is fed):
PIL image -> ``convert("RGB")`` -> ``torchvision.transforms.functional.resize``
(shorter side to ``DIGITS_INPUT_SIZE``, bilinear, antialias) on the PIL image
-> ``center_crop(DIGITS_INPUT_SIZE)`` -> uint8 tensor / 255 ->
``normalize(DIGITS_MEAN, DIGITS_STD)``.  :func:`preprocess_digit` does this.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from vecsim.errors import UnknownWeightsError

if TYPE_CHECKING:
    from PIL import Image

DIGITS_INPUT_SIZE = 32
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)
DIGITS_COUNT = 1797
DIGITS_NUM_CLASSES = 10

WEIGHTS_PATH = Path(__file__).parent / "data" / "digits_cnn.pt"

_MARKER = ".complete"


def default_digits_root() -> Path:
    """Cache location, overridable so tests and CI never touch the user's home."""
    cache = os.environ.get("VECSIM_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "vecsim"
    return base / "builtin" / "digits"


def _is_complete(root: Path) -> bool:
    """The marker is written last, so its presence with the right count means a whole set."""
    try:
        return (root / _MARKER).read_text(encoding="utf-8").strip() == str(DIGITS_COUNT)
    except OSError:
        return False


def _write_set(dest: Path) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    targets = digits.target
    if len(images) != DIGITS_COUNT:  # pragma: no cover - guards a changed sklearn dataset
        raise RuntimeError(f"load_digits returned {len(images)} images, expected {DIGITS_COUNT}")
    for label in sorted({int(t) for t in targets}):
        (dest / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (pixels, label) in enumerate(zip(images, targets, strict=True)):
        # Fixed encoder options and no metadata: the bytes (and so sha256) never vary.
        img = Image.fromarray(np.ascontiguousarray(pixels))  # 2-D uint8 -> mode "L"
        img.save(
            dest / str(int(label)) / f"{index:04d}.png",
            format="PNG",
            optimize=False,
            compress_level=6,
        )
    (dest / _MARKER).write_text(f"{DIGITS_COUNT}\n", encoding="utf-8")


def materialize_digits(root: Path | None = None) -> Path:
    """Write the digits as ``root/<label>/<index:04d>.png`` once and reuse them after.

    The set is built in a temporary sibling and renamed into place, so a crash or a
    concurrent writer never leaves a half-written set where readers look for it.
    """
    root = Path(root) if root is not None else default_digits_root()
    if _is_complete(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the renamed set should be readable like any cache
    try:
        _write_set(tmp)
        for _ in range(3):
            try:
                os.replace(tmp, root)  # atomic; fails if root is a non-empty dir
                return root
            except OSError:
                if _is_complete(root):  # another process finished first: use theirs
                    return root
                if root.exists():
                    # A stale, incomplete set (e.g. user-made): move it aside, then retry.
                    stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.stale-", dir=root.parent))
                    try:
                        os.replace(root, stale / "old")
                    except OSError:
                        pass
                    shutil.rmtree(stale, ignore_errors=True)
        if _is_complete(root):
            return root
        raise RuntimeError(f"could not place the digits set at {root}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def preprocess_digit(image: Image.Image) -> torch.Tensor:
    """The one transform the shipped weights were trained with; returns a 3x32x32 float tensor."""
    from vecsim.models.tvimport import import_torchvision

    import_torchvision()
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = image.convert("RGB")
    img = TF.resize(
        img, DIGITS_INPUT_SIZE, interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    img = TF.center_crop(img, DIGITS_INPUT_SIZE)
    tensor = TF.pil_to_tensor(img).float().div_(255.0)
    return TF.normalize(tensor, list(DIGITS_MEAN), list(DIGITS_STD))


class DigitsCNN(nn.Module):
    """A ~60k-parameter CNN with named stages, so layers can be hooked by readable names."""

    def __init__(self, num_classes: int = DIGITS_NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 16, kernel_size=3, padding=1)),
                    ("bn1", nn.BatchNorm2d(16)),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(16, 32, kernel_size=3, padding=1)),
                    ("bn2", nn.BatchNorm2d(32)),
                    ("relu2", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("conv3", nn.Conv2d(32, 64, kernel_size=3, padding=1)),
                    ("bn3", nn.BatchNorm2d(64)),
                    ("relu3", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)),
                    ("conv4", nn.Conv2d(64, 64, kernel_size=3, padding=1)),
                    ("bn4", nn.BatchNorm2d(64)),
                    ("relu4", nn.ReLU()),
                ]
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def load_digits_cnn(pretrained: bool = True, num_classes: int = DIGITS_NUM_CLASSES) -> DigitsCNN:
    """The demo model in eval mode; the shipped weights only fit the 10-class head."""
    model = DigitsCNN(num_classes=num_classes)
    if pretrained:
        if num_classes != DIGITS_NUM_CLASSES:
            raise UnknownWeightsError(
                f"the shipped digits weights have {DIGITS_NUM_CLASSES} classes, not {num_classes}"
            )
        state = torch.load(WEIGHTS_PATH, weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    return model.eval()
