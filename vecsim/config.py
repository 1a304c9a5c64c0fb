"""The one configuration model of ``vecsim index``, and its precedence.

Precedence: CLI flag (or keyword argument), then config file (JSON or TOML), then the
defaults below. The resolved config is saved in the store's manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vecsim.errors import ConfigError


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class IndexConfig:
    source: str = _opt(None, "folder of images (searched recursively) or builtin:digits")
    model: str = _opt(None, "torchvision classification model name, digits-cnn, timm:NAME, open_clip:ARCH, "
                            "path/to/file.py:factory or package.module:factory")
    layers: list[str] = _opt(None, "module names to hook (see `vecsim layers MODEL`)")
    out: str = _opt(None, "store folder to create")
    weights: str | None = _opt(None, "torchvision weight enum name or DEFAULT (the default); timm: pretrained (the "
                                     "default) or a tag; open_clip: a tag; none: seeded random init")
    checkpoint: str | None = _opt(None, "local state dict for the named model (loaded with weights_only=True)")
    dim: str = _opt("256", "reduced dims: N, auto, or per layer 'layer=N,...,N'")
    max_dim: int = _opt(512, "cap for --dim auto")
    energy: float = _opt(0.99, "second-moment energy kept by --dim auto")
    similarity: str = _opt("cosine", "cosine (of raw activations) or correlation (Pearson across units)")
    center: bool = _opt(False, "classic centred PCA instead of the uncentred projection")
    sketch_dim: int | None = _opt(None, "count-sketch dims before the projection (default for layers above 65536 units: the power of two from 16384 to 131072 nearest above units/20; 0: never)")
    sketch_seed: int = _opt(0, "seed of the count sketch")
    drop_zero_units: bool = _opt(False, "drop units that are zero for every training stimulus before the sketch (cosine only)")
    pooling: str = _opt("flatten", "flatten, avg, max or grid:K for feature maps; tokens, cls or mean for token "
                                   "outputs (or per layer 'layer=avg,...')")
    index: str = _opt("auto", "auto, flat, hnsw, ivf-pq (OPQ + IVF-PQ), or any FAISS factory string")
    train_size: int = _opt(1000, "stimuli in the seeded training sample the projection is fitted on")
    seed: int = _opt(0, "seed of the training sample and of the evaluation subset")
    eval_size: int = _opt(500, "stimuli whose exact raw similarities are kept per layer (0: none)")
    eval_memory: float = _opt(512.0, "MB for holding the evaluation subset's raw vectors during the run")
    manifest: str | None = _opt(None, "CSV or Parquet with a 'path' column (+ label, metadata columns)")
    labels_from_folders: bool = _opt(False, "label = top-level sub-folder name")
    size: int | None = _opt(None, "input side in pixels (resize shorter side + centre crop); overrides the weights' preprocessing")
    mean: list[float] | None = _opt(None, "normalisation mean R,G,B")
    std: list[float] | None = _opt(None, "normalisation std R,G,B")
    device: str = _opt("auto", "auto, cpu or cuda[:N]")
    batch_size: int = _opt(32, "images per decoded batch and forward pass (on a CPU: slices of about 8 at 224 px)")
    workers: int | None = _opt(None, "decoding threads (default: the number of cores; 0 decodes in the main thread)")
    max_pixels: int = _opt(100_000_000, "images with more pixels are rejected before decoding")
    chunk_size: int = _opt(1024, "stimuli per committed chunk")
    overwrite: bool = _opt(False, "replace a complete store at --out")

    def __post_init__(self) -> None:
        """The loose forms a flag, a config file or a keyword may give, in their one type:
        'a,b' layers, an int dim, 'R,G,B' mean/std, path objects for paths (also for a
        config built directly)."""
        for name in ("source", "out", "manifest", "checkpoint"):
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.layers, str):
            self.layers = split_list(self.layers)
        if isinstance(self.dim, int) and not isinstance(self.dim, bool):
            self.dim = str(self.dim)
        for name in ("mean", "std"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, parse_floats(getattr(self, name), name))

    def validate(self) -> "IndexConfig":
        for name, kinds in _scalar_types().items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds)):
                want = {(int,): "an integer", (int, float): "a number", (bool,): "true or false"}.get(kinds, "text")
                raise ConfigError(f"--{name.replace('_', '-')} must be {want}, got {value!r}")
        if self.manifest and self.labels_from_folders:
            raise ConfigError("give --manifest (labels from its label column) or --labels-from-folders, not both")
        if not self.source:  # the CLI's first argument; `source` in a --config file
            raise ConfigError("SOURCE is required: a folder of images or builtin:digits, as the first argument "
                              "(`vecsim index SOURCE --model ... --layers ... --out ...`)")
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} is required")
        if not self.layers:
            raise ConfigError("--layers is required (comma-separated module names; see `vecsim layers MODEL`)")
        if self.eval_size < 0 or self.eval_memory < 0:
            raise ConfigError("--eval-size and --eval-memory must be 0 or more")
        for name in ("train_size", "batch_size", "chunk_size", "max_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ConfigError(f"--{name} needs three numbers R,G,B")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ConfigError("--std values must be positive")
        if self.workers is not None and self.workers < 0:
            raise ConfigError("--workers must be 0 or more")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    # what must match for a run to resume the same store
    IDENTITY_FIELDS = (
        "source", "model", "layers", "weights", "checkpoint", "dim", "max_dim", "energy", "similarity", "center",
        "sketch_dim", "sketch_seed", "drop_zero_units", "pooling", "index", "train_size", "seed", "eval_size", "eval_memory", "manifest", "labels_from_folders",
        "size", "mean", "std", "max_pixels",
    )


def _scalar_types() -> dict[str, tuple]:
    """Per setting with one scalar type (its annotation, None allowed; after __post_init__'s
    loose forms), the Python types its value may have: a config file's ``train_size = "abc"``
    is a clear error, not a failed comparison deep in the run. Lists are left out."""
    import types
    import typing

    accepted = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}
    out = {}
    for name, tp in typing.get_type_hints(IndexConfig).items():
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(iter(a for a in typing.get_args(tp) if a is not type(None)))
        if tp in accepted:
            out[name] = accepted[tp]
    return out


def config_fields() -> list:
    return [f for f in fields(IndexConfig)]


def load_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix.lower() not in (".toml", ".json"):
        raise ConfigError(f"config file {path} must be TOML (.toml) or JSON (.json)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table/object of settings")
    data = {k.replace("-", "_"): v for k, v in data.get("index", data).items()}
    known = {f.name for f in config_fields()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"config file {path} has unknown setting(s): {', '.join(unknown)}")
    return data


def resolve(overrides: dict[str, Any], config_file: str | Path | None = None) -> IndexConfig:
    """Flags (non-None values in ``overrides``) over the config file over the defaults."""
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return IndexConfig(**values).validate()


def split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in split_list(text)]
    except ValueError:
        raise ConfigError(f"--{name} must be three comma-separated numbers, e.g. 0.485,0.456,0.406") from None


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def config_json_schema() -> dict:
    """JSON Schema of :class:`IndexConfig` (checked in under schemas/)."""
    import typing

    hints = typing.get_type_hints(IndexConfig)
    props = {}
    for f in config_fields():
        props[f.name] = {**_type_schema(hints[f.name]), "description": f.metadata["help"]}
        if f.default is not MISSING and f.default is not None:
            props[f.name]["default"] = f.default
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "vecsim index configuration",
        "type": "object",
        "properties": props,
        "required": ["source", "model", "layers", "out"],
        "additionalProperties": False,
    }


def _type_schema(tp) -> dict:
    import types
    import typing

    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [_type_schema(a) for a in args if a is not type(None)]
        schema = inner[0] if len(inner) == 1 else {"anyOf": inner}
        return {"anyOf": [schema, {"type": "null"}]} if type(None) in args else schema
    if typing.get_origin(tp) is list:
        return {"type": "array", "items": _type_schema(args[0])}
    return {"type": _JSON_TYPES[tp]}
