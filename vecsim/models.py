"""Load a model (torchvision name + weights, the shipped digits CNN, or a checkpoint),
its preprocessing, and the names and shapes of its hookable layers."""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vecsim.errors import CheckpointError, UnknownLayerError, UnknownModelError, UnknownWeightsError, close_matches

DIGITS_MODEL = "digits-cnn"
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
    module: Any  # torch.nn.Module in eval mode
    preprocessing: Preprocessing
    name: str
    weights: str | None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    num_classes: int | None = None
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "weights": self.weights,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "num_classes": self.num_classes,
            "init_seed": INIT_SEED if self.weights is None and self.checkpoint is None else None,
        }


def available_models() -> list[str]:
    import torchvision

    return [DIGITS_MODEL, *sorted(torchvision.models.list_models(module=torchvision.models))]


def load_model(
    name: str,
    weights: str | None = None,
    checkpoint: str | Path | None = None,
    size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    checkpoint_sha256: str | None = None,
) -> LoadedModel:
    """Build a model in eval mode with its preprocessing.

    ``weights``: a torchvision weight enum member name (``IMAGENET1K_V1``, or the full
    ``ResNet18_Weights.IMAGENET1K_V1``), ``DEFAULT``, or ``none``; ``None`` means
    ``DEFAULT`` (the shipped weights for the digits CNN). A checkpoint (a state dict for
    the named architecture) replaces the weights; it is recorded by absolute path and
    sha256, and ``checkpoint_sha256`` (a store's record) makes a changed file an error.
    ``size``/``mean``/``std`` override the weights' preprocessing.
    """
    if checkpoint is not None and weights not in (None, "none", "None"):
        raise UnknownWeightsError("give either --weights or --checkpoint, not both")
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser().resolve()
    if name == DIGITS_MODEL:
        loaded = _load_digits(weights, checkpoint, checkpoint_sha256)
    else:
        loaded = _load_torchvision(name, weights, checkpoint, checkpoint_sha256)
    loaded.preprocessing = _override_preprocessing(loaded.preprocessing, size, mean, std)
    loaded.module.eval()
    return loaded


def _override_preprocessing(pre: Preprocessing, size, mean, std) -> Preprocessing:
    if size is not None:
        if size < 8:
            raise UnknownWeightsError(f"--size {size} is too small; give the input side in pixels, e.g. 224")
        pre = Preprocessing(size, size, pre.mean, pre.std, pre.interpolation)
    if mean is not None:
        pre = Preprocessing(pre.resize, pre.crop, tuple(mean), pre.std, pre.interpolation)
    if std is not None:
        pre = Preprocessing(pre.resize, pre.crop, pre.mean, tuple(std), pre.interpolation)
    return pre


def _load_digits(weights, checkpoint, expected_sha) -> LoadedModel:
    from vecsim import digits

    pre = Preprocessing(digits.DIGITS_INPUT_SIZE, digits.DIGITS_INPUT_SIZE, digits.DIGITS_MEAN, digits.DIGITS_STD)
    if checkpoint is not None:
        state, sha = read_checkpoint(checkpoint, expected_sha)
        num_classes = _classes_from_state(state, "classifier.weight", 10)
        module = digits.DigitsCNN(num_classes=num_classes)
        _load_state(module, state, checkpoint)
        return LoadedModel(module, pre, DIGITS_MODEL, None, str(checkpoint), sha, num_classes)
    key = (weights or "DEFAULT")
    if key.lower() == "none":
        return LoadedModel(seeded_init(digits.DigitsCNN), pre, DIGITS_MODEL, None, num_classes=10)
    if key not in ("DEFAULT", "shipped"):
        raise UnknownWeightsError(f"the digits CNN has weights DEFAULT (shipped) or none, not {weights!r}")
    return LoadedModel(digits.load_digits_cnn(pretrained=True), pre, DIGITS_MODEL, "DEFAULT", num_classes=10)


INIT_SEED = 0


def seeded_init(factory):
    """A randomly initialised model that is the same every time (seed INIT_SEED), without
    touching the caller's global RNG: random-weight baselines must be reproducible."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return factory()


def _builder(name: str):
    import torchvision
    from torchvision.models import get_model_builder

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownModelError(
            f"unknown model {name!r}{close_matches(name, [DIGITS_MODEL, *known])} "
            "(vecsim takes torchvision classification models and digits-cnn)"
        )
    return get_model_builder(name)


def _weights_enum(name: str, weights: str):
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    if "." in weights and weights.split(".", 1)[0] != enum.__name__:
        raise UnknownWeightsError(
            f"weights {weights!r} are not {name}'s ({enum.__name__}); choose one of: "
            f"{', '.join(enum.__members__)}, none"
        )
    member = weights.split(".", 1)[1] if "." in weights else weights
    if member not in enum.__members__:
        raise UnknownWeightsError(
            f"unknown weights {weights!r} for {name}; choose one of: "
            f"{', '.join(enum.__members__)}, none"
        )
    return enum[member]


AUX_HEADS = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _load_torchvision(name: str, weights: str | None, checkpoint, expected_sha=None) -> LoadedModel:
    builder = _builder(name)
    default_pre = Preprocessing(256, 224)
    if checkpoint is not None:
        state, sha = read_checkpoint(checkpoint, expected_sha)
        # the weights come from the checkpoint: skip googlenet/inception_v3's slow init (and its warning)
        options, notes = ({"init_weights": False} if name in AUX_HEADS else {}), []
        if name in AUX_HEADS and not any(k.startswith(AUX_HEADS[name]) for k in state):
            # the state dict of a model fine-tuned from torchvision's pretrained one: torchvision
            # builds that with transform_input=True and drops the auxiliary heads
            options = {"aux_logits": False, "transform_input": True, "init_weights": False}
            notes.append(f"{name} checkpoint without auxiliary heads: built as torchvision builds its pretrained "
                         "model (no auxiliary heads, transform_input=True)")
        probe = builder(weights=None, **options)
        head = _head_name(probe)
        num_classes = _classes_from_state(state, f"{head}.weight" if head else "", None)
        module = builder(weights=None, num_classes=num_classes, **options) if num_classes else probe
        _load_state(module, state, checkpoint)
        return LoadedModel(module, default_pre, name, None, str(checkpoint), sha, num_classes, notes)
    key = weights if weights is not None else "DEFAULT"
    if key.lower() == "none":
        # googlenet/inception_v3 warn unless init_weights is given; True is their default init
        init = {"init_weights": True} if name in AUX_HEADS else {}
        return LoadedModel(seeded_init(lambda: builder(weights=None, **init)), default_pre, name, None,
                           num_classes=1000)
    enum_value = _weights_enum(name, key)
    try:
        module = builder(weights=enum_value)
    except Exception as exc:  # download or cache failures surface here
        raise UnknownWeightsError(
            f"could not load {enum_value} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "put the file in the torch hub cache, or pass --checkpoint FILE or --weights none"
        ) from None
    transforms = enum_value.transforms()
    pre = Preprocessing(
        int(transforms.resize_size[0]), int(transforms.crop_size[0]),
        tuple(transforms.mean), tuple(transforms.std), transforms.interpolation.value,
    )
    num_classes = len(enum_value.meta.get("categories", []) or []) or None
    return LoadedModel(module, pre, name, str(enum_value), num_classes=num_classes)


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


def _head_name(module) -> str | None:
    """The classifier layer whose output size is the class count: the last Linear, or for
    a model without one (SqueezeNet: a 1x1 convolution) the last Conv2d."""
    import torch.nn as nn

    linear = conv = None
    for n, m in module.named_modules():
        if isinstance(m, nn.Linear):
            linear = n
        elif isinstance(m, nn.Conv2d):
            conv = n
    return linear or conv


def _classes_from_state(state: dict, head_key: str, default):
    tensor = state.get(head_key)
    return int(tensor.shape[0]) if tensor is not None and tensor.ndim in (2, 4) else default


def _load_state(module, state: dict, path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = [ln.strip() for ln in str(exc).splitlines() if ln.strip()][1:3]
        raise CheckpointError(
            f"checkpoint {path} does not fit {type(module).__name__}: {' '.join(first)[:300]}"
        ) from None


def check_layers(module, layers: list[str]) -> None:
    """Raise UnknownLayerError naming close matches for any layer the model lacks."""
    names = [n for n, _ in module.named_modules() if n]
    known = set(names)
    for layer in layers:
        if layer not in known:
            raise UnknownLayerError(
                f"unknown layer {layer!r}{close_matches(layer, names)} "
                "(`vecsim layers MODEL` lists them)"
            )


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str
    shape: tuple[int, ...]  # per stimulus, without the batch dimension (of the module's last call)
    calls: int = 1  # times the module runs in one forward pass (torchvision's ResNet blocks reuse one ReLU)
    order: int = 0  # when its (last) call ends among the hooked modules' calls in the pass: depth order

    @property
    def units(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def layer_shapes(module, size: int, names: list[str] | None = None,
                 input_shape: tuple[int, ...] | None = None, strict: bool = False) -> list[LayerInfo]:
    """Output shape (of the last call) and calls per forward pass of every (or the named)
    module, for one ``size``×``size`` RGB input (or one of ``input_shape``, without the batch).

    Modules that do not run in the forward pass (in eval mode) or whose output is not a
    tensor are left out; with ``strict`` (and ``names``) such a named module is an
    UnknownLayerError saying which.
    """
    import torch

    wanted = set(names) if names is not None else None
    seen: dict[str, LayerInfo] = {}
    other: dict[str, str] = {}  # modules whose output is not a tensor: its type
    handles = []
    shape = tuple(input_shape) if input_shape is not None else (3, size, size)

    fired = [0]  # hooked calls so far in the pass

    def make_hook(name, kind):
        def hook(_mod, _inp, out):
            fired[0] += 1
            if isinstance(out, torch.Tensor):
                calls = seen[name].calls + 1 if name in seen else 1
                seen[name] = LayerInfo(name, kind, tuple(out.shape[1:]), calls, fired[0])
            else:
                other[name] = type(out).__name__
        return hook

    def run(net, device) -> None:
        modules = [(n, m) for n, m in net.named_modules() if n and (wanted is None or n in wanted)]
        try:
            for n, m in modules:
                handles.append(m.register_forward_hook(make_hook(n, type(m).__name__)))
            with torch.inference_mode():
                net(torch.zeros(1, *shape, device=device, dtype=dtype))
        finally:
            for h in handles:
                h.remove()
            handles.clear()

    param = next(module.parameters(), None)
    # a float16/bfloat16 model takes input of its own dtype
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    try:  # shapes only: a copy on the meta device computes no activations (and warms nothing up)
        import copy

        if param is not None and param.device.type != "cpu":
            raise RuntimeError("a deep copy would first duplicate the weights on the device")
        shadow = copy.deepcopy(module).to("meta")
        for m in shadow.modules():  # the copy would carry the model's own hooks (and a capture's)
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        run(shadow, "meta")
    except Exception:  # a model on a GPU, or an operation without a meta kernel: one real forward at batch 1
        seen.clear()
        other.clear()
        run(module, param.device if param is not None else torch.device("cpu"))
    order = [n for n, m in module.named_modules() if n and (wanted is None or n in wanted)]
    if strict and names is not None:
        for name in names:
            if name in seen:
                continue
            if name in other:
                raise UnknownLayerError(f"layer {name!r} returns a {other[name]}, not a tensor; hook one of its "
                                        "submodules (`vecsim layers MODEL` lists them)")
            raise UnknownLayerError(f"layer {name!r} does not run in the model's forward pass (in eval mode, as "
                                    "vecsim runs it); choose another (`vecsim layers MODEL` lists the hookable ones)")
    return [seen[n] for n in order if n in seen]
