"""OpenCLIP's image towers: ``open_clip:ARCH`` (``open_clip:ViT-B-32``) with ``--weights TAG``
(``laion2b_s34b_b79k``, fetched by OpenCLIP's own loader into its cache) or ``none``
(seeded random init), and OpenCLIP's preprocessing for the tower.

The module vecsim hooks is the CLIP model's ``visual``: its layers are named as in it
(``transformer.resblocks.5``, ``ln_post``), without the ``visual.`` prefix. A checkpoint is
a state dict of the tower or of the whole CLIP model (its ``visual.*`` entries are used).
"""

from __future__ import annotations

import contextlib
import logging

from vecsim.errors import UnknownModelError, UnknownWeightsError, close_matches
from vecsim.models.base import (
    LoadedModel, Preprocessing, library_version, load_state, read_checkpoint, require, seeded_init, token_layout,
    weights_failure,
)

PREFIX = "open_clip:"


def load_open_clip(spec: str, weights: str | None, checkpoint, expected_sha: str | None,
                   size: int | None) -> LoadedModel:
    open_clip = require("open_clip", "clip", spec)
    arch = spec[len(PREFIX):]
    if arch not in open_clip.list_models():
        raise UnknownModelError(f"unknown OpenCLIP architecture {arch!r}{close_matches(arch, open_clip.list_models())} "
                                "(open_clip.list_models() lists them)")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    tag = None
    if checkpoint is None and (weights is None or weights.lower() != "none"):
        if weights not in tags:
            given = "" if weights is None else f"unknown weights {weights!r}; "
            raise UnknownWeightsError(f"{given}open_clip:{arch} takes --weights TAG or none; its tags: "
                                      f"{', '.join(tags) or '(none listed)'}")
        tag = weights
    options = {} if size is None else {"force_image_size": size}

    def build():
        with _quiet():  # OpenCLIP logs a warning for every model built without pretrained weights
            return open_clip.create_model(arch, pretrained=tag, **options)

    if tag is None:
        model = seeded_init(build)
    else:
        try:
            model = build()
        except Exception as exc:  # download or cache failures surface here
            raise weights_failure(f"OpenCLIP weights {tag} for {arch}", exc, "put them in OpenCLIP's cache") from None
    notes: list[str] = []
    pre = _preprocessing(open_clip, model, notes)
    tower = model.visual
    del model  # the text tower is not needed
    sha = None
    if checkpoint is not None:
        state, sha = read_checkpoint(checkpoint, expected_sha)
        if any(k.startswith("visual.") for k in state):
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        load_state(tower, state, checkpoint)
    prefix, class_token = token_layout(tower)
    return LoadedModel(tower, pre, spec, tag, None if checkpoint is None else str(checkpoint), sha, None, notes,
                       source="open_clip", library_versions=library_version("open_clip_torch"),
                       prefix_tokens=prefix, class_token=class_token)


@contextlib.contextmanager
def _quiet():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _preprocessing(open_clip, model, notes: list[str]) -> Preprocessing:
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"]
    side = int(size if isinstance(size, int) else size[0])
    if cfg.get("resize_mode", "shortest") != "shortest":
        notes.append(f"OpenCLIP's resize_mode {cfg['resize_mode']!r} is approximated by shorter side + centre crop")
    return Preprocessing(side, side, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"))
