"""What every model source shares: the preprocessing, the loaded model and its reload
record, seeded random initialisation, and reading a checkpoint."""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vecsim.errors import CheckpointError, MissingExtraError, UnknownWeightsError
from vecsim.models.tvimport import import_torchvision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Shorter side resized to ``resize``, centre crop ``crop``, scaled to [0,1], normalised."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __call__(self, rgb_image):
        return self.prepare(rgb_image)[0]

    def prepare(self, rgb_image):
        """(the model input tensor, the sha256 of the resized and cropped 8-bit pixels it is made
        from): two images with the same digest give the model the same input, hence the same
        activations, whatever their files' bytes (another format, other metadata, a border the
        crop removes)."""
        import hashlib

        import torch

        import_torchvision()
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        mode = InterpolationMode(self.interpolation)
        img = F.resize(rgb_image, self.resize, interpolation=mode, antialias=True)
        img = F.center_crop(img, [self.crop, self.crop])
        digest = hashlib.sha256(f"{img.mode} {img.width}x{img.height}\n".encode())
        digest.update(img.tobytes())
        tensor = F.pil_to_tensor(img).to(torch.float32).div_(255.0)
        return F.normalize(tensor, list(self.mean), list(self.std)), digest.hexdigest()

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["resize"]), int(d["crop"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bilinear"))


@dataclass
class LoadedModel:
    """A model in eval mode, its preprocessing, and the record that loads it again
    (:meth:`describe`, the manifest's ``model``)."""

    module: Any  # torch.nn.Module in eval mode
    preprocessing: Preprocessing
    name: str  # the spec: a torchvision name, digits-cnn, timm:NAME, open_clip:ARCH, file.py:fn, pkg.mod:fn
    weights: str | None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)
    source: str = "torchvision"  # torchvision, digits, timm, open_clip, factory or python
    file: str | None = None  # a factory's source file (absolute)
    file_sha256: str | None = None  # its sha256: a reload refuses a changed file
    library_versions: dict[str, str] = field(default_factory=dict)  # of the source's library (timm, open_clip)
    reloadable: bool = True  # False for a module handed over in Python (index_stimuli(model=...))
    prefix_tokens: int = 0  # class and register tokens before the patch tokens (token pooling 'mean' skips them)
    class_token: bool = False  # the first token is a class token (token pooling 'cls' takes it)
    size: int | None = None  # --size as given: timm and OpenCLIP build a ViT for that input size

    def describe(self) -> dict:
        return {
            "name": self.name,
            "weights": self.weights,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "num_classes": self.num_classes,
            "init_seed": INIT_SEED if self.weights is None and self.checkpoint is None else None,
            "source": self.source,
            "file": self.file,
            "file_sha256": self.file_sha256,
            "library_versions": dict(self.library_versions),
            "reloadable": self.reloadable,
            "prefix_tokens": self.prefix_tokens,
            "class_token": self.class_token,
            "size": self.size,
        }


def require(module: str, extra: str, spec: str):
    """Import an optional library, or fail in one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{spec} needs the {module} package, which is not installed ({exc}); "
            f"install it with: pip install 'vecsim[{extra}]'"
        ) from None


def token_layout(module) -> tuple[int, bool]:
    """(prefix tokens, whether the first is a class token) of a token model, by timm's convention
    (``num_prefix_tokens``, ``has_class_token``; also on an OpenCLIP timm tower's ``trunk``) or
    OpenCLIP's VisionTransformer (``class_embedding``); (0, False) for anything else."""
    for candidate in (module, getattr(module, "trunk", None)):
        if candidate is None:
            continue
        if isinstance(getattr(candidate, "num_prefix_tokens", None), int):
            prefix = int(candidate.num_prefix_tokens)
            return prefix, bool(getattr(candidate, "has_class_token", prefix > 0))
        if getattr(candidate, "class_embedding", None) is not None:
            return 1, True
    return 0, False


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def weights_failure(what: str, exc: Exception, remedy: str) -> UnknownWeightsError:
    """The one-line error of pretrained weights that could not be fetched or read."""
    return UnknownWeightsError(f"could not load {what} ({type(exc).__name__}: {first_line(exc)}); {remedy}, "
                               "or pass --checkpoint FILE or --weights none")


def library_version(distribution: str) -> dict[str, str]:
    from importlib import metadata

    try:
        return {distribution: metadata.version(distribution)}
    except metadata.PackageNotFoundError:
        return {}


def override_preprocessing(pre: Preprocessing, size, mean, std) -> Preprocessing:
    """``--size`` (resize the shorter side to it, crop it square), ``--mean``, ``--std`` over a
    source's own preprocessing."""
    if size is not None:
        if size < 8:
            raise UnknownWeightsError(f"--size {size} is too small; give the input side in pixels, e.g. 224")
        pre = Preprocessing(size, size, pre.mean, pre.std, pre.interpolation)
    if mean is not None:
        pre = Preprocessing(pre.resize, pre.crop, tuple(mean), pre.std, pre.interpolation)
    if std is not None:
        pre = Preprocessing(pre.resize, pre.crop, pre.mean, tuple(std), pre.interpolation)
    return pre


INIT_SEED = 0


def seeded_init(factory):
    """A randomly initialised model that is the same every time (seed INIT_SEED), without
    touching the caller's global RNG: random-weight baselines must be reproducible."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return factory()


def read_checkpoint(path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """A state dict from a local file, loaded with ``weights_only=True`` (no pickled code runs).

    ``{"state_dict": ...}``-style wrappers and DataParallel's ``module.`` prefixes are
    unwrapped, and torch.nn.utils.prune's ``<name>_orig`` / ``<name>_mask`` pairs folded into
    ``<name>`` (their product, what the pruned module computes with). With
    ``expected_sha256`` (a store's record) a file that changed since is an error.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()  # read once: hashed, then loaded from memory
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 and sha != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} changed since the store was built (sha256 {sha[:12]}…, the store recorded "
            f"{expected_sha256[:12]}…): new images would not be comparable with the stored ones; restore that file"
        )
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        # a whole pickled model names classes weights_only refuses ("Unsupported global" / the
        # allowlist hint); anything else that fails to unpickle is not a checkpoint at all
        pickled_objects = "global" in str(exc).lower()
        if isinstance(exc, (pickle.UnpicklingError, KeyError, EOFError, RuntimeError)) and not pickled_objects:
            raise CheckpointError(
                f"checkpoint {path} is not a readable torch checkpoint (damaged, truncated or another kind of "
                f"file; torch.load: {type(exc).__name__}); pass a file written by torch.save(model.state_dict(), path)"
            ) from None
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects (a whole model?), which vecsim does not unpickle "
                "(it loads with weights_only=True); save the model's state_dict() instead "
                "(torch.save(model.state_dict(), path))"
            ) from None
        raise CheckpointError(
            f"cannot load checkpoint {path} as a state dict with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    for key in [k for k in state if k.endswith("_orig")]:  # torch.nn.utils.prune, not made permanent
        base = key[: -len("_orig")]
        if base + "_mask" in state and base not in state:
            state[base] = state.pop(key) * state.pop(base + "_mask")
    return state, sha


def classes_from_state(state: dict, head_key: str, default):
    tensor = state.get(head_key)
    return int(tensor.shape[0]) if tensor is not None and tensor.ndim in (2, 4) else default


def load_state(module, state: dict, path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(module).__name__}: {' '.join(first)[:300]}"
        ) from None


