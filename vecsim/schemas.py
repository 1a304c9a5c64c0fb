"""The store's contract in checked-in form: Arrow schemas of the tables, JSON Schemas of
the manifest and of the index configuration.

Regenerate with ``python -m vecsim.schemas`` (writes ``schemas/``); a test fails when
the checked-in files drift from the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vecsim.config import config_json_schema
from vecsim.store import FORMAT_VERSION, STATUSES

_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_NULLABLE_STR = {"type": ["string", "null"]}


def _record(description: str, **properties: dict) -> dict:
    """An object whose listed properties are all required."""
    return {"type": "object", "description": description, "required": list(properties), "properties": properties}


REDUCER_SCHEMA = {
    "type": "object",
    "required": ["shape", "units", "config", "sketch", "dim_in", "dropped_zero_units", "fit"],
    "properties": {
        "shape": {"type": "array", "items": _INT, "description": "layer output per stimulus (no batch dim)"},
        "units": {**_INT, "description": "units after pooling: the raw vector whose cosine is preserved"},
        "config": {
            "type": "object",
            "required": ["similarity", "center", "dim", "max_dim", "energy", "sketch_dim", "sketch_seed", "pooling"],
            "properties": {
                "similarity": {"enum": ["cosine", "correlation"]},
                "center": {"type": "boolean"},
                "dim": {"type": ["integer", "null"], "description": "requested dim; null = auto"},
                "max_dim": _INT,
                "energy": _NUM,
                "sketch_dim": {"type": ["integer", "null"]},
                "sketch_seed": _INT,
                "pooling": _STR,
                "drop_zero_units": {"type": "boolean"},
                "prefix_tokens": {**_INT, "description": "class and register tokens before the patch tokens, which "
                                                          "pooling 'mean' leaves out (absent in older stores: 0)"},
                "class_token": {"type": "boolean", "description": "the first token is a class token (pooling 'cls')"},
            },
        },
        "sketch": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["kind", "units", "dim", "seed"],
                    "properties": {"kind": {"const": "count_sketch"}, "units": _INT, "dim": _INT, "seed": _INT},
                },
            ]
        },
        "dim_in": {**_INT, "description": "input dims of the projection (sketch dim, or units)"},
        "dropped_zero_units": {**_INT, "description": "units zero for every training stimulus, dropped (--drop-zero-units)"},
        "stored_norm": {"enum": ["raw", "row-centred"],
                        "description": "what the vectors table's raw_norm holds: the norm of the pooled raw vector, or "
                                       "of the row-centred one (correlation); absent in older stores (raw)"},
        "fit": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["n_train", "dim_in", "dim", "rank", "energy_kept", "exact", "lossless"],
                    "properties": {
                        "n_train": _INT, "dim_in": _INT, "dim": _INT, "rank": _INT, "energy_kept": _NUM,
                        "exact": {"type": "boolean", "description": "every direction of the training sample is kept"},
                        "lossless": {"type": "boolean", "description": "the projection keeps the whole input space"},
                        "in_sample_noise": {**_NUM, "description": "delta of the training vectors' in-sample shrinkage, "
                                            "D = (1 - delta/eigenvalue)^0.5 per kept direction; 0: not shrunk "
                                            "(absent in older stores)"},
                    },
                },
            ]
        },
    },
}

MANIFEST_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "vecsim store manifest (vecsim.json)",
    "type": "object",
    "required": [
        "format_version", "status", "created", "source", "model", "preprocessing", "device", "config",
        "seeds", "layers", "counts", "versions",
    ],
    "properties": {
        "format_version": {"type": "integer", "minimum": FORMAT_VERSION, "maximum": FORMAT_VERSION},
        "status": {"enum": list(STATUSES)},
        "created": _STR,
        "updated": _STR,
        "source": {
            "type": "object",
            "required": ["source", "root", "manifest", "extra_columns", "candidates", "ignored_files"],
            "properties": {
                "source": _STR, "root": _STR, "manifest": _NULLABLE_STR,
                "extra_columns": {"type": "array", "items": _STR}, "candidates": _INT, "ignored_files": _INT,
            },
        },
        "model": {
            "type": "object",
            "required": ["name", "weights", "checkpoint", "checkpoint_sha256", "num_classes", "init_seed"],
            "properties": {
                "name": _STR, "weights": _NULLABLE_STR, "checkpoint": _NULLABLE_STR,
                "checkpoint_sha256": _NULLABLE_STR, "num_classes": {"type": ["integer", "null"]},
                "init_seed": {"type": ["integer", "null"], "description": "seed of a random initialisation (weights none)"},
                "source": {"enum": ["torchvision", "digits", "timm", "open_clip", "factory", "python"],
                           "description": "where the model comes from (absent in older stores: torchvision or digits)"},
                "file": {**_NULLABLE_STR, "description": "a factory's source file (absolute path)"},
                "file_sha256": {**_NULLABLE_STR, "description": "its sha256: a reload refuses a changed file"},
                "library_versions": {"type": "object", "additionalProperties": _STR,
                                     "description": "version of the source's library (timm, open_clip_torch)"},
                "reloadable": {"type": "boolean", "description": "false for a model handed over in Python "
                                                                 "(index_stimuli(model=...)): query --image and add refuse"},
                "prefix_tokens": {**_INT, "description": "class and register tokens of the model's token outputs"},
                "class_token": {"type": "boolean", "description": "the first of them is a class token"},
                "size": {"type": ["integer", "null"], "description": "--size as given (timm and OpenCLIP build a "
                                                                     "ViT for it)"},
            },
        },
        "preprocessing": {
            "type": "object",
            "required": ["resize", "crop", "mean", "std", "interpolation"],
            "properties": {
                "resize": _INT, "crop": _INT, "interpolation": _STR,
                "mean": {"type": "array", "items": _NUM, "minItems": 3, "maxItems": 3},
                "std": {"type": "array", "items": _NUM, "minItems": 3, "maxItems": 3},
            },
        },
        "device": _STR,
        "config": {"$ref": "vecsim.config.schema.json"},
        "seeds": {"type": "object", "additionalProperties": _INT},
        "layers": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "required": ["slug", "table", "reducer"],
                "properties": {
                    "slug": _STR,
                    "table": _STR,
                    "depth": {**_INT, "description": "rank of the layer's captured output in a forward pass among "
                                                      "the store's layers (0 = first); stores indexed before it was recorded lack it"},
                    "transform_sha256": {**_STR, "description": "sha256 of transform.faiss (checked by vecsim verify)"},
                    "output": {**_STR, "description": "what the module returns when it is not a tensor ('tuple of 2'); "
                                                      "absent for a tensor"},
                    "select": {**_STR, "description": "the part of that output captured ('[0]': chosen in the layer "
                                                      "name or the first tensor)"},
                    "batch_dim": {"const": 1, "description": "present when the output is sequence first (tokens, "
                                                             "batch, ...): transposed to batch first in the hook"},
                    "reducer": REDUCER_SCHEMA,
                    "index": {
                        "type": "object",
                        "properties": {
                            "kind": _STR, "factory": _STR, "metric": _STR, "ntotal": _INT, "exact": {"type": "boolean"},
                            "recall_at_10": {**_NUM, "description": "approximate index vs exact search, held-out queries"},
                            "queries": _INT, "k": _INT, "recall_target": _NUM,
                            "held_out": {"type": "boolean",
                                         "description": "false: the index was trained on every vector, so the queries are training vectors"},
                            "efSearch": {**_INT, "description": "HNSW search setting tuned to reach recall_target"},
                            "nprobe": {**_INT, "description": "IVF lists probed, tuned to reach recall_target"},
                        },
                    },
                    "eval": {
                        "type": "object",
                        "description": "evaluation subset (eval.npz): exact raw similarities of a seeded prefix",
                        "required": ["size", "requested", "channels"],
                        "properties": {"size": _INT, "requested": _INT, "channels": {"type": "boolean"},
                                       "held_dtype": {"enum": ["float32", "float16"]},
                                       "in_training": {**_INT, "description": "subset stimuli that were in the "
                                                                              "projection's training sample"}},
                    },
                },
            },
        },
        "counts": {
            "type": "object",
            "required": ["stimuli", "failures"],
            "properties": {"stimuli": _INT, "failures": _INT},
        },
        "versions": {"type": "object", "additionalProperties": _STR},
        "additions": {
            "type": "array",
            "description": "vecsim add runs: stimuli added through the fitted transforms after the fit",
            "items": {"type": "object", "required": ["run", "added", "skipped_duplicates", "failed", "note"]},
        },
        "index_run": _record(
            "the index run that wrote the store last (its runs-table row comes when it finishes; "
            "a run that resumes a stopped one first adds the stopped run's row, finished empty)",
            run=_INT, started=_STR,
        ),
        "stopped_runs": {
            "type": "array",
            "description": "index runs stopped inside the training pass that a later run resumed from the scratch "
                           "(their runs-table rows are written when the fit creates the tables)",
            "items": {"type": "object", "required": ["run", "started"], "properties": {"run": _INT, "started": _STR}},
        },
        "pending_add": _record(
            "a vecsim add in progress (or stopped midway): rows from first_id on are rolled back by the next add",
            run=_INT, first_id=_INT,
        ),
    },
}


def arrow_schemas() -> dict[str, str]:
    """Readable Arrow schemas of the fixed LanceDB tables (vectors shown for dim 256)."""
    from vecsim.store import failures_schema, runs_schema, stimuli_schema, vectors_schema

    return {
        "stimuli": stimuli_schema(),
        "vectors_LAYER (dim 256)": vectors_schema(256),
        "failures": failures_schema(),
        "runs": runs_schema(),
    }


def generate() -> dict[str, str]:
    """File name → content of everything under ``schemas/``."""
    tables = arrow_schemas()
    arrow_text = "".join(
        f"# table: {name}\n{schema.to_string(show_schema_metadata=False)}\n\n" for name, schema in tables.items()
    )
    note = (
        "# Arrow schemas of the LanceDB tables in STORE/lance/ (generated by `python -m vecsim.schemas`).\n"
        "# stimuli: manifest columns other than path/label follow the seven fixed columns, with the manifest's types;\n"
        "#   input_sha256 (the model input's pixels, what makes two stimuli identical) is null in older stores.\n"
        "# vectors_<layer>: one table per layer; the vector width is the layer's reduced dim; raw_norm is the L2\n"
        "#   norm of the vector the chain normalised (row-centred for a correlation layer: manifest stored_norm).\n\n"
    )
    return {
        "tables.arrow.txt": note + arrow_text,
        "manifest.schema.json": json.dumps(MANIFEST_SCHEMA, indent=2) + "\n",
        "vecsim.config.schema.json": json.dumps(config_json_schema(), indent=2) + "\n",
    }


def write(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "schemas"
    for p in write(target):
        print(p)
