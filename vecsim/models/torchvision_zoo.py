"""torchvision's classification models and the shipped digits CNN: by name, with a weight
enum member, ``none`` (seeded random init) or a checkpoint."""

from __future__ import annotations

from vecsim.errors import UnknownModelError, UnknownWeightsError, close_matches
from vecsim.models.base import (
    LoadedModel, Preprocessing, build_then_load, classes_from_state, load_state, read_checkpoint, seeded_init,
    weights_failure,
)
from vecsim.models.tvimport import import_torchvision

DIGITS_MODEL = "digits-cnn"


def available_models() -> list[str]:
    torchvision = import_torchvision()

    return [DIGITS_MODEL, *sorted(torchvision.models.list_models(module=torchvision.models))]


def load_digits(weights, checkpoint, expected_sha) -> LoadedModel:
    from vecsim import digits

    pre = Preprocessing(digits.DIGITS_INPUT_SIZE, digits.DIGITS_INPUT_SIZE, digits.DIGITS_MEAN, digits.DIGITS_STD)
    if checkpoint is not None:
        state, sha = read_checkpoint(checkpoint, expected_sha)
        num_classes = classes_from_state(state, "classifier.weight", 10)
        module = digits.DigitsCNN(num_classes=num_classes)
        load_state(module, state, checkpoint)
        return LoadedModel(module, pre, DIGITS_MODEL, None, str(checkpoint), sha, num_classes, source="digits")
    key = (weights or "DEFAULT")
    if key.lower() == "none":
        return LoadedModel(seeded_init(digits.DigitsCNN), pre, DIGITS_MODEL, None, num_classes=10, source="digits")
    if key not in ("DEFAULT", "shipped"):
        raise UnknownWeightsError(f"the digits CNN has weights DEFAULT (shipped) or none, not {weights!r}")
    return LoadedModel(digits.load_digits_cnn(pretrained=True), pre, DIGITS_MODEL, "DEFAULT", num_classes=10,
                       source="digits")


def _builder(name: str):
    torchvision = import_torchvision()
    from torchvision.models import get_model_builder

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownModelError(
            f"unknown model {name!r}{close_matches(name, [DIGITS_MODEL, *known])} "
            "(a torchvision classification model, digits-cnn, timm:NAME, open_clip:ARCH, file.py:factory or "
            "package.module:factory; see docs/models.md)"
        )
    return get_model_builder(name)


def _weights_enum(name: str, weights: str):
    import_torchvision()
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


def load_torchvision(name: str, weights: str | None, checkpoint, expected_sha=None) -> LoadedModel:
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
        classes = []

        def build():
            probe = builder(weights=None, **options)
            head = head_name(probe)
            classes[:] = [classes_from_state(state, f"{head}.weight" if head else "", None)]
            if not classes[0] or classes[0] == _head_size(probe, head):
                return probe
            return builder(weights=None, num_classes=classes[0], **options)

        # the checkpoint replaces every weight: the random initialisation is skipped
        module = build_then_load(build, lambda m: load_state(m, state, checkpoint))
        return LoadedModel(module, default_pre, name, None, str(checkpoint), sha, classes[0], notes)
    key = weights if weights is not None else "DEFAULT"
    if key.lower() == "none":
        # googlenet/inception_v3 warn unless init_weights is given; True is their default init
        init = {"init_weights": True} if name in AUX_HEADS else {}
        return LoadedModel(seeded_init(lambda: builder(weights=None, **init)), default_pre, name, None,
                           num_classes=1000)
    enum_value = _weights_enum(name, key)
    try:  # torchvision's builders load the weights strictly: the random initialisation is skipped
        module = build_then_load(lambda: builder(weights=enum_value))
    except Exception as exc:  # download or cache failures surface here
        raise weights_failure(str(enum_value), exc, "put the file in the torch hub cache") from None
    transforms = enum_value.transforms()
    pre = Preprocessing(
        int(transforms.resize_size[0]), int(transforms.crop_size[0]),
        tuple(transforms.mean), tuple(transforms.std), transforms.interpolation.value,
    )
    num_classes = len(enum_value.meta.get("categories", []) or []) or None
    return LoadedModel(module, pre, name, str(enum_value), num_classes=num_classes)


def _head_size(module, head: str | None) -> int | None:
    weight = module.get_submodule(head).weight if head else None
    return None if weight is None else int(weight.shape[0])


def head_name(module) -> str | None:
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


