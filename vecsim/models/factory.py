"""The researcher's own model: a factory named ``path/to/file.py:function`` or
``package.module:function``, or (in Python) an ``nn.Module`` handed over directly.

The factory is called with no arguments (under a fixed seed, so a random initialisation is
the same every time) and returns an ``nn.Module``, or ``(module, preprocessing)`` with the
preprocessing a :class:`~vecsim.models.Preprocessing` or a dict (``size`` or
``resize``/``crop``, ``mean``, ``std``, ``interpolation``). The sha256 of the file that
defines it is recorded; a reload refuses a changed file, as it refuses a changed checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from vecsim.errors import CheckpointError, UnknownModelError, UnknownWeightsError, VecsimError, close_matches
from vecsim.models.base import (
    IMAGENET_MEAN, IMAGENET_STD, LoadedModel, Preprocessing, first_line, load_state, read_checkpoint, seeded_init,
    token_layout,
)

PYTHON_PREFIX = "python:"  # the recorded name of a module handed over in Python: not loadable again


def load_factory(spec: str, weights: str | None, checkpoint, expected_sha: str | None,
                 expected_file_sha: str | None) -> LoadedModel:
    target, _, function = spec.rpartition(":")
    if not target or not function.isidentifier():
        raise UnknownModelError(f"model {spec!r}: a factory is named path/to/file.py:function or "
                                "package.module:function")
    if weights is not None and weights.lower() != "none":
        raise UnknownWeightsError(f"{spec} builds its own weights; pass trained ones as --checkpoint FILE, "
                                  f"not --weights {weights}")
    with _beside(target):  # the file's own helper modules beside it import, also from inside the function
        namespace, file, file_sha = _import(target, expected_file_sha)
        factory = namespace.get(function)
        if not callable(factory):
            public = [n for n, v in namespace.items() if callable(v) and not n.startswith("_")]
            raise UnknownModelError(f"{target} has no function {function!r}{close_matches(function, public)}")
        try:
            result = seeded_init(factory)
        except VecsimError:
            raise
        except Exception as exc:
            raise UnknownModelError(f"factory {spec} raised {type(exc).__name__}: {first_line(exc)}") from None
    module, described = _unpack(result, spec)
    notes: list[str] = []
    pre = preprocessing_from(described, spec, notes)
    sha = None
    if checkpoint is not None:
        state, sha = read_checkpoint(checkpoint, expected_sha)
        load_state(module, state, checkpoint)
    prefix, class_token = token_layout(module)
    if _is_file(target):  # recorded with the file's absolute path: a reload from another folder finds it
        spec = f"{file}:{function}"
    return LoadedModel(module, pre, spec, None, None if checkpoint is None else str(checkpoint), sha, None, notes,
                       source="factory", file=file, file_sha256=file_sha, prefix_tokens=prefix, class_token=class_token)


def wrap_module(module, preprocessing=None) -> LoadedModel:
    """An ``nn.Module`` handed over in Python (``index_stimuli(model=net, preprocessing=...)``):
    recorded as ``python:ClassName``, which cannot be loaded again by name."""
    import torch.nn as nn

    if not isinstance(module, nn.Module):
        raise UnknownModelError(f"model must be a name (str) or a torch nn.Module, not {type(module).__name__}")
    notes: list[str] = ["handed over in Python: query --image and add cannot load it again"]
    pre = preprocessing_from(preprocessing, "the model", notes)
    prefix, class_token = token_layout(module)
    return LoadedModel(module.eval(), pre, f"{PYTHON_PREFIX}{type(module).__qualname__}", None, notes=notes,
                       source="python", reloadable=False, prefix_tokens=prefix, class_token=class_token)


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


@contextlib.contextmanager
def _beside(target: str):
    """A factory file's folder first on sys.path while it is imported and called."""
    folder = str(Path(target).expanduser().resolve().parent) if _is_file(target) else None
    if folder is not None:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder is not None:
            sys.path.remove(folder)


def _import(target: str, expected_sha: str | None) -> tuple[dict, str | None, str | None]:
    """(the namespace of the factory's module, its file, the file's sha256)."""
    if _is_file(target):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise UnknownModelError(f"factory file {path} does not exist")
        data = path.read_bytes()  # hashed, then run: the code that runs is the code recorded
        sha = _check_sha(path, hashlib.sha256(data).hexdigest(), expected_sha)
        name = f"vecsim_factory_{sha[:16]}"
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        sys.modules[name] = module  # dataclasses and pickling look their module up there
        try:
            exec(compile(data, str(path), "exec"), module.__dict__)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UnknownModelError(f"cannot run factory file {path} ({type(exc).__name__}: {exc})") from None
        return module.__dict__, str(path), sha
    try:
        module = importlib.import_module(target)
    except ImportError as exc:
        raise UnknownModelError(f"cannot import {target!r} ({exc}); a factory is named path/to/file.py:function "
                                "or package.module:function") from None
    file = getattr(module, "__file__", None)
    if not file:
        return module.__dict__, None, None
    sha = _check_sha(Path(file), hashlib.sha256(Path(file).read_bytes()).hexdigest(), expected_sha)
    return module.__dict__, str(Path(file).resolve()), sha


def _check_sha(path: Path, sha: str, expected: str | None) -> str:
    if expected and sha != expected:
        raise CheckpointError(
            f"factory file {path} changed since the store was built (sha256 {sha[:12]}…, the store recorded "
            f"{expected[:12]}…): new images would not be comparable with the stored ones; restore that file"
        )
    return sha


def _unpack(result, spec: str):
    import torch.nn as nn

    if isinstance(result, nn.Module):
        return result, None
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result
    raise UnknownModelError(f"factory {spec} returned {type(result).__name__}, not an nn.Module or "
                            "(nn.Module, preprocessing)")


_KEYS = {"size", "resize", "crop", "mean", "std", "interpolation"}


def preprocessing_from(described, owner: str, notes: list[str]) -> Preprocessing:
    """A :class:`Preprocessing` from one, from a dict (``size`` or ``resize``/``crop``, ``mean``,
    ``std``, ``interpolation``), or for None torchvision's ImageNet default (resize 256, crop 224)."""
    if isinstance(described, Preprocessing):
        return described
    if described is None:
        notes.append(f"{owner} gives no preprocessing: ImageNet's (resize 256, crop 224) unless --size/--mean/--std")
        return Preprocessing(256, 224)
    if not isinstance(described, dict) or not set(described) <= _KEYS or not ({"size", "crop"} & set(described)):
        raise UnknownModelError(f"{owner}'s preprocessing must be a vecsim Preprocessing or a dict with size (or "
                                f"resize and crop), mean, std, interpolation; got {described!r:.120}")
    try:
        crop = int(described.get("crop", described.get("size")))
        pre = Preprocessing(int(described.get("resize", described.get("size", crop))), crop,
                            tuple(float(v) for v in described.get("mean", IMAGENET_MEAN)),
                            tuple(float(v) for v in described.get("std", IMAGENET_STD)),
                            str(described.get("interpolation", "bilinear")))
    except (TypeError, ValueError) as exc:
        raise UnknownModelError(f"{owner}'s preprocessing {described!r:.120} is not valid ({exc})") from None
    if len(pre.mean) != 3 or len(pre.std) != 3 or min(pre.std) <= 0 or pre.crop < 8 or pre.resize < pre.crop:
        raise UnknownModelError(f"{owner}'s preprocessing {described!r:.120} needs three means, three positive "
                                "stds and a crop of at least 8 pixels no larger than the resize")
    if pre.interpolation not in ("bilinear", "bicubic", "nearest"):
        raise UnknownModelError(f"{owner}'s preprocessing interpolation must be bilinear, bicubic or nearest, "
                                f"not {pre.interpolation!r}")
    return pre
