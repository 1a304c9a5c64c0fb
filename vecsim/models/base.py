"""What every model source shares: the preprocessing, the loaded model and its reload
record, seeded random initialisation, and reading a checkpoint."""

from __future__ import annotations

import functools
import gc
import hashlib
import io
import threading
import weakref
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


# torch.nn.init's functions that fill a tensor in place (what modules' reset_parameters and
# torchvision's models call); each returns the tensor it was given
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")
_skip_lock = threading.Lock()
_skipping: dict[int, list] = {}  # thread id -> (weak reference, data pointer) of each tensor left as it was
_installed: list[tuple[Any, str, Any]] = []  # (module, name, the real function) while skips are installed


def _install_skips() -> None:
    """Put the skipping versions in torch.nn.init and where torch's modules bound them by name
    (nn.MultiheadAttention's and nn.Transformer's initialisation)."""
    import torch
    from torch.nn import init
    from torch.nn.modules import activation, transformer

    skips = {}
    for name in _INIT_FUNCTIONS:
        real = getattr(init, name, None)
        if real is None:
            continue

        def skip(tensor, *args, _real=real, **kwargs):
            skipped = _skipping.get(threading.get_ident())
            if skipped is None or tensor.layout != torch.strided or tensor.device.type == "meta" or not tensor.numel():
                # another thread, no build of weights to be loaded, or nothing worth skipping
                return _real(tensor, *args, **kwargs)
            skipped.append((weakref.ref(tensor), tensor.data_ptr()))
            return tensor

        skips[real] = functools.update_wrapper(skip, real)
    for module in (init, activation, transformer):
        for name in _INIT_FUNCTIONS:
            real = getattr(module, name, None)
            if real in skips:
                _installed.append((module, name, real))
                setattr(module, name, skips[real])


def _remove_skips() -> None:
    while _installed:
        module, name, real = _installed.pop()
        setattr(module, name, real)


def build_then_load(build, load=None):
    """``build()`` (then ``load(module)``, where the loading is not part of the build) without
    the random initialisation that the loaded weights replace, most of a large model's build
    (benchmarks/bench_model_load.py).

    While ``build`` runs, torch.nn.init's functions leave the tensors they are given as they
    are, in this thread only (another thread's calls initialise as usual). Afterwards every
    tensor left so must be one of the module's parameters or persistent buffers, which a
    strict ``load_state_dict`` has overwritten (vecsim's :func:`load_state`, and torchvision's
    pretrained builders), or no longer exist (a temporary). Otherwise (a non-persistent buffer
    or a plain attribute filled by torch.nn.init, which no state dict carries) the model is
    built and loaded again with its initialisation, so the result never depends on memory
    left uninitialised.
    """
    ident = threading.get_ident()
    with _skip_lock:
        if ident in _skipping:  # nested: the outer build checks
            return _build_and_load(build, load)
        if not _skipping:
            _install_skips()
        _skipping[ident] = skipped = []
    try:
        module = build()
    finally:
        with _skip_lock:
            del _skipping[ident]
            if not _skipping:
                _remove_skips()
    if load is not None:
        load(module)
    if _all_overwritten(module, skipped):
        return module
    gc.collect()  # a discarded module in a reference cycle still holds its tensors
    if _all_overwritten(module, skipped):
        return module
    del module
    return _build_and_load(build, load)


def _build_and_load(build, load):
    module = build()
    if load is not None:
        load(module)
    return module


def _all_overwritten(module, skipped: list) -> bool:
    """Whether every tensor whose initialisation was skipped lies in one of ``module``'s
    parameters or persistent buffers, or is gone (see :func:`build_then_load`)."""
    import bisect

    import torch

    def spans(tensors):
        storages = [t.untyped_storage() for t in tensors if t is not None and t.layout == torch.strided]
        return sorted((s.data_ptr(), s.data_ptr() + s.nbytes()) for s in storages)

    def inside(pointer, sorted_spans, starts):
        at = bisect.bisect_right(starts, pointer) - 1
        return at >= 0 and pointer < sorted_spans[at][1]

    loaded = spans(module.state_dict(keep_vars=True).values())
    others = spans(list(module.parameters()) + list(module.buffers()))
    loaded_starts, other_starts = [lo for lo, _ in loaded], [lo for lo, _ in others]
    for ref, pointer in skipped:
        if inside(pointer, loaded, loaded_starts):
            continue
        if ref() is not None or inside(pointer, others, other_starts):
            return False
    return True


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
    data = path.read_bytes()  # read once: the bytes hashed are the bytes loaded
    # hashlib releases the GIL: the hash (as slow as the unpickling) runs on a thread beside it
    digest: list[str] = []
    hashing = threading.Thread(target=lambda: digest.append(hashlib.sha256(data).hexdigest()), daemon=True)
    hashing.start()
    try:
        obj, failure = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), None
    except Exception as exc:
        obj, failure = None, exc
    hashing.join()
    sha = digest[0]
    if expected_sha256 and sha != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} changed since the store was built (sha256 {sha[:12]}…, the store recorded "
            f"{expected_sha256[:12]}…): new images would not be comparable with the stored ones; restore that file"
        )
    if failure is not None:
        exc = failure
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
    metadata = getattr(obj, "_metadata", None)
    if metadata is not None:  # each module's state-dict version, which some modules' loading reads (MNASNet)
        state = _with_metadata(state, {("" if k == "module" else k.removeprefix("module.")): v
                                       for k, v in metadata.items()})
    for key in [k for k in state if k.endswith("_orig")]:  # torch.nn.utils.prune, not made permanent
        base = key[: -len("_orig")]
        if base + "_mask" in state and base not in state:
            state[base] = state.pop(key) * state.pop(base + "_mask")
    return state, sha


def _with_metadata(state: dict, metadata: dict) -> dict:
    from collections import OrderedDict

    state = OrderedDict(state)
    state._metadata = OrderedDict(metadata)
    return state


def classes_from_state(state: dict, head_key: str, default):
    tensor = state.get(head_key)
    return int(tensor.shape[0]) if tensor is not None and tensor.ndim in (2, 4) else default


def load_state(module, state: dict, path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # also a module's own loading code
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        first = lines[1:3] if isinstance(exc, RuntimeError) and len(lines) > 1 else lines[:1]
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(module).__name__}: {' '.join(first)[:300]}"
        ) from None


