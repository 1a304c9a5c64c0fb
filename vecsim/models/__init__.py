"""Load a model from its spec, with its preprocessing and the record that loads it again,
and list or check its hookable layers.

A spec names the source (one module each, importing its library only when used):

* ``resnet50``, ``densenet121``, ...: torchvision's classification models; ``digits-cnn``: the shipped CNN
* ``timm:NAME`` / ``timm:NAME.TAG``: timm's models (:mod:`vecsim.models.timm_zoo`, extra ``timm``)
* ``open_clip:ARCH``: OpenCLIP's image towers (:mod:`vecsim.models.open_clip_zoo`, extra ``clip``)
* ``path/to/file.py:function``, ``package.module:function``: the researcher's own factory
  (:mod:`vecsim.models.factory`)

In Python, an ``nn.Module`` can be indexed directly (:func:`wrap_module`); such a store
records that its model cannot be loaded again.
"""

from __future__ import annotations

from pathlib import Path

from vecsim.errors import UnknownModelError, UnknownWeightsError
from vecsim.models.base import (
    IMAGENET_MEAN, IMAGENET_STD, INIT_SEED, LoadedModel, Preprocessing, override_preprocessing, read_checkpoint,
    seeded_init,
)
from vecsim.models.factory import PYTHON_PREFIX, preprocessing_from, wrap_module
from vecsim.models.layers import LayerInfo, check_layers, layer_shapes, split_layer
from vecsim.models.torchvision_zoo import DIGITS_MODEL, _weights_enum, available_models
from vecsim.models.tvimport import import_torchvision

__all__ = [
    "DIGITS_MODEL", "IMAGENET_MEAN", "IMAGENET_STD", "INIT_SEED", "LayerInfo", "LoadedModel", "Preprocessing",
    "available_models", "check_layers", "layer_shapes", "load_model", "model_source", "override_preprocessing", "preprocessing_from",
    "read_checkpoint", "reload_model", "seeded_init", "split_layer", "wrap_module", "_weights_enum",
]


def model_source(spec: str) -> str:
    """Which source a spec names: digits, torchvision, timm, open_clip, factory or python."""
    if spec == DIGITS_MODEL:
        return "digits"
    for prefix, source in (("timm:", "timm"), ("open_clip:", "open_clip"), (PYTHON_PREFIX, "python")):
        if spec.startswith(prefix):
            return source
    return "factory" if ":" in spec else "torchvision"


def load_model(
    name: str,
    weights: str | None = None,
    checkpoint: str | Path | None = None,
    size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    checkpoint_sha256: str | None = None,
    file_sha256: str | None = None,
) -> LoadedModel:
    """Build the model a spec names, in eval mode, with its preprocessing.

    ``weights``: for torchvision a weight enum member name (``IMAGENET1K_V1``, or the full
    ``ResNet18_Weights.IMAGENET1K_V1``), ``DEFAULT`` or ``none``, where ``None`` means
    ``DEFAULT`` (the shipped weights for the digits CNN); for timm ``pretrained`` (also what
    ``None`` means), a tag, or ``none``; for OpenCLIP a tag or ``none``; a factory builds its
    own. A checkpoint (a state dict for the model) replaces the weights; it is recorded by
    absolute path and sha256, and ``checkpoint_sha256`` (a store's record) makes a changed
    file an error, as ``file_sha256`` does for a factory's file. ``size``/``mean``/``std``
    override the source's preprocessing.
    """
    if not isinstance(name, str) or not name:
        raise UnknownModelError("--model is required: a torchvision name, digits-cnn, timm:NAME, open_clip:ARCH "
                                "or path/to/file.py:factory")
    if checkpoint is not None and weights not in (None, "none", "None"):
        raise UnknownWeightsError("give either --weights or --checkpoint, not both")
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser().resolve()
    source = model_source(name)
    import_torchvision()  # every source's preprocessing uses it (and timm, factories import it): without torch._dynamo
    if source == "digits":
        from vecsim.models.torchvision_zoo import load_digits

        loaded = load_digits(weights, checkpoint, checkpoint_sha256)
    elif source == "torchvision":
        from vecsim.models.torchvision_zoo import load_torchvision

        loaded = load_torchvision(name, weights, checkpoint, checkpoint_sha256)
    elif source == "timm":
        from vecsim.models.timm_zoo import load_timm

        loaded = load_timm(name, weights, checkpoint, checkpoint_sha256, size)
    elif source == "open_clip":
        from vecsim.models.open_clip_zoo import load_open_clip

        loaded = load_open_clip(name, weights, checkpoint, checkpoint_sha256, size)
    elif source == "factory":
        from vecsim.models.factory import load_factory

        loaded = load_factory(name, weights, checkpoint, checkpoint_sha256, file_sha256)
    else:
        raise UnknownModelError(f"{name} was handed over in Python (index_stimuli(model=...)) and cannot be "
                                "loaded again by name; index with a factory (path/to/file.py:function) to reload it")
    loaded.preprocessing = override_preprocessing(loaded.preprocessing, size, mean, std)
    loaded.size = size
    loaded.module.eval()
    return loaded


def reload_model(record: dict) -> LoadedModel:
    """The model a store's manifest records (its ``model``), checked against the recorded
    checkpoint and factory file digests. The preprocessing to use is the store's recorded one."""
    if record.get("reloadable") is False:
        raise UnknownModelError(f"this store's model ({record.get('name')}) was handed over in Python "
                                "(index_stimuli(model=...)) and cannot be loaded again: query stored stimuli by "
                                "--id or --path; to add or query new images, index with a factory "
                                "(path/to/file.py:function)")
    return load_model(record["name"], record.get("weights") or "none", record.get("checkpoint"), record.get("size"),
                      checkpoint_sha256=record.get("checkpoint_sha256"), file_sha256=record.get("file_sha256"))
