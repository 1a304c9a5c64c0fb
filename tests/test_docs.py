"""The documentation builds, links resolve, and the CLI reference matches the app."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_matches_the_app():
    gen = _load_script("gen_cli_docs")
    on_disk = gen.CLI_PAGE.read_text(encoding="utf-8") if gen.CLI_PAGE.exists() else ""
    assert on_disk == gen.generate(), f"docs/cli.md drifted from vecsim/cli.py: run `{gen.REGENERATE}` and commit it"


def test_cli_reference_lists_every_command_and_option():
    import typer.main

    from vecsim.cli import app

    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        assert f"## `vecsim {name}`" in text
        section = text.split(f"## `vecsim {name}`", 1)[1].split("\n## ", 1)[0]
        for param in command.params:
            shown = f"`{param.opts[0]}`" if param.param_type_name == "option" else f"`{param.name.upper()}"
            assert shown in section, f"{name}: {shown} missing from docs/cli.md"


def test_the_generator_states_defaults_given_only_in_help_texts():
    gen = _load_script("gen_cli_docs")
    text = gen.generate()
    index = text.split("## `vecsim index`", 1)[1].split("\n## ", 1)[0]
    assert "| `--dim` | text | 256 | N, auto, or per layer 'layer=N,...,N'. |" in index
    query = text.split("## `vecsim query`", 1)[1].split("\n## ", 1)[0]
    assert "| `-k` | integer | `10` |" in query


def test_mkdocs_build_strict(tmp_path):
    """A broken link or anchor, a page missing from the nav, or a docstring mkdocstrings
    cannot render fails the build (strict: every warning is an error)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(tmp_path / "site")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    site = tmp_path / "site"
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "A short tour" in home and 'href="indexing/"' in home  # the README, its docs/ links rewritten
    assert "bench_huge_layers.py" in (site / "results" / "index.html").read_text(encoding="utf-8")
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("vecsim.pipeline.index_stimuli", "vecsim.store.Store.query", "vecsim.config.IndexConfig",
                 "vecsim.compare.compare_stores", "vecsim.report.build_report", "vecsim.maintain.verify"):
        assert f'id="{name}"' in api, f"{name} not documented"
    assert ":func:<code>" not in api and ":class:<code>" not in api


def test_site_links_from_the_repository_root_are_rewritten():
    hooks = _load_script("mkdocs_hooks")
    text = "[a](docs/indexing.md#layers) [b](benchmarks/RESULTS.md) [c](https://x.org/docs/y.md) [d](#here) [e](pyproject.toml)"
    assert hooks._site_links(text, "README.md") == (
        "[a](indexing.md#layers) [b](results.md) [c](https://x.org/docs/y.md) [d](#here) [e](pyproject.toml)")
    assert hooks._site_links("[r](../docs/internals.md) [s](../README.md)", "benchmarks/RESULTS.md") == (
        "[r](internals.md) [s](index.md)")
