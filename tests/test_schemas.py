"""schemas/ is the store's contract: it must match what the code generates and what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

import vecsim
from vecsim.config import config_json_schema
from vecsim.schemas import MANIFEST_SCHEMA, generate

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def test_checked_in_schemas_match_the_code():
    generated = generate()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in SCHEMAS.iterdir() if p.is_file()}
    assert set(on_disk) == set(generated), "run `python -m vecsim.schemas` and commit schemas/"
    for name, text in generated.items():
        assert on_disk[name] == text, f"schemas/{name} drifted: run `python -m vecsim.schemas`"


def test_a_written_manifest_validates(shared_image_set, tmp_path):
    vecsim.index_stimuli(source=str(shared_image_set), model="digits-cnn", layers=["features.relu3"],
                         out=str(tmp_path / "s"), dim="auto", progress=False)
    manifest = json.loads((tmp_path / "s" / "vecsim.json").read_text())
    schema = {**MANIFEST_SCHEMA, "properties": {**MANIFEST_SCHEMA["properties"], "config": config_json_schema()}}
    jsonschema.validate(manifest, schema)
    assert manifest["config"]["dim"] == "auto"
    assert manifest["layers"]["features.relu3"]["reducer"]["config"]["dim"] is None
