"""timm's models: ``timm:NAME`` or ``timm:NAME.TAG`` (``timm:convnext_tiny``,
``timm:vit_base_patch16_224.augreg_in21k``), with timm's own preprocessing for the model.

Weights: ``pretrained`` (timm's default pretrained tag of NAME, or the spec's TAG, fetched
by timm's own loader into its cache), a tag (``--weights augreg_in21k``), ``none`` (seeded
random init), or a checkpoint (a state dict of the model, its head size read from it).
"""

from __future__ import annotations

import math

from vecsim.errors import UnknownModelError, UnknownWeightsError, close_matches
from vecsim.models.base import (
    LoadedModel, Preprocessing, build_then_load, classes_from_state, library_version, load_state, read_checkpoint,
    require, seeded_init, token_layout, weights_failure,
)

PREFIX = "timm:"


def load_timm(spec: str, weights: str | None, checkpoint, expected_sha: str | None, size: int | None) -> LoadedModel:
    timm = require("timm", "timm", spec)
    name = spec[len(PREFIX):]
    arch, _, tag = name.partition(".")
    if not arch.startswith("hf-hub:") and not timm.is_model(arch):
        raise UnknownModelError(f"unknown timm model {arch!r}{close_matches(arch, timm.list_models())} "
                                "(timm.list_models() lists them)")
    tag = _tag(arch, tag, weights, checkpoint)
    options = {}
    if size is not None and _fixed_input_size(timm, arch):  # a ViT's position embedding is built for one size
        options["img_size"] = size
    notes: list[str] = []
    sha = num_classes = None
    if checkpoint is not None:
        state, sha = read_checkpoint(checkpoint, expected_sha)
        classes = []

        def build():
            probe = timm.create_model(arch, pretrained=False, **options)
            head = probe.pretrained_cfg.get("classifier") or "head"
            classes[:] = [classes_from_state(state, f"{head}.weight",
                                             0 if not any(k.startswith(head + ".") for k in state) else None)]
            if classes[0] is None or classes[0] == getattr(probe, "num_classes", None):
                return probe
            return timm.create_model(arch, pretrained=False, num_classes=classes[0], **options)

        # the checkpoint replaces every weight: the random initialisation is skipped where it can be
        module = build_then_load(build, lambda m: load_state(m, state, checkpoint))
        num_classes, recorded = classes[0], None
    elif tag is None:
        module = seeded_init(lambda: timm.create_model(arch, pretrained=False, **options))
        recorded = None
    else:
        full = arch if tag == "" else f"{arch}.{tag}"
        try:
            module = timm.create_model(full, pretrained=True, **options)
        except Exception as exc:  # download or cache failures surface here
            raise weights_failure(f"timm's pretrained weights for {full}", exc,
                                  "put them in timm's cache (the Hugging Face hub cache)") from None
        recorded = f"{arch}.{module.pretrained_cfg.get('tag') or tag}".rstrip(".")
    num_classes = getattr(module, "num_classes", num_classes)
    prefix, class_token = token_layout(module)
    return LoadedModel(module, _preprocessing(timm, module, notes), spec, recorded,
                       None if checkpoint is None else str(checkpoint), sha, num_classes, notes, source="timm",
                       library_versions=library_version("timm"), prefix_tokens=prefix, class_token=class_token)


def _tag(arch: str, tag: str, weights: str | None, checkpoint) -> str | None:
    """The pretrained tag to load ('' for timm's default), or None for no pretrained weights."""
    if checkpoint is not None:
        return None
    if weights is None or weights == "pretrained":
        return tag
    if weights.lower() == "none":
        return None
    asked = weights.split(".", 1)[1] if weights.startswith(arch + ".") else weights  # a store's record: arch.tag
    if tag and asked != tag:
        raise UnknownWeightsError(f"timm:{arch}.{tag} names the tag {tag!r}, --weights another ({weights!r}); give one")
    import timm

    known = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
    if asked not in known:
        raise UnknownWeightsError(f"unknown timm weights {asked!r} for {arch}; choose pretrained, none or one of: "
                                  f"{', '.join(known) or '(timm lists no pretrained tags for it)'}")
    return asked


def _fixed_input_size(timm, arch: str) -> bool:
    try:
        return bool(timm.models.get_pretrained_cfg(arch).fixed_input_size)
    except Exception:  # no pretrained config for the architecture
        return False


def _preprocessing(timm, module, notes: list[str]) -> Preprocessing:
    """timm's eval transform for the model (resolve_data_config): shorter side to
    floor(size / crop_pct), centre crop, its interpolation, mean and std."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=module)
    height = int(cfg["input_size"][1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    if cfg.get("crop_mode", "center") != "center":
        notes.append(f"timm's crop_mode {cfg['crop_mode']!r} is approximated by a centre crop")
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        notes.append(f"timm's interpolation {interpolation!r} is replaced by bicubic")
        interpolation = "bicubic"
    return Preprocessing(int(math.floor(height / crop_pct)), height, tuple(cfg["mean"]), tuple(cfg["std"]),
                         interpolation)
