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


def documented_command_lines(text: str) -> list[str]:
    """Every `vecsim ...` line of a page's code blocks, with a synopsis's indented
    continuation lines joined to it."""
    import re

    lines: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        joining = False  # the line before belongs to a vecsim command
        for line in block.splitlines():
            stripped = line.strip().removeprefix("$ ")
            if stripped.startswith("vecsim "):
                lines.append(stripped)
                joining = True
            elif joining and line.startswith(" ") and stripped.startswith(("[", "--", "(")):
                lines[-1] += " " + stripped
            else:
                joining = False
    return lines


def test_documented_commands_and_options_exist():
    """Hand-written synopses and examples in the README and docs/ name only commands and
    options the app has (a renamed or removed option fails here; docs/cli.md lists them all)."""
    import re

    import typer.main

    from vecsim.cli import app

    group = typer.main.get_command(app)
    known = {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} for name, cmd in group.commands.items()}
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for line in documented_command_lines(page.read_text(encoding="utf-8")):
            words = line.split("#", 1)[0].split()
            command = next((w for w in words[1:] if not w.startswith("-")), None)
            assert command in known, f"{page.name}: `{line}` names no vecsim command"
            unknown = {o for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line) if o != "--debug"} - known[command]
            assert not unknown, f"{page.name}: `vecsim {command}` has no option {sorted(unknown)}"
            checked += 1
    assert checked > 20


def test_documented_command_lines_are_found():
    text = "```\nvecsim index SOURCE --model NAME\n             [--dim N] [--seed S]\nvecsim info STORE\n```\n```console\n$ vecsim query s --id 5\nrank\n```\n"
    assert documented_command_lines(text) == ["vecsim index SOURCE --model NAME [--dim N] [--seed S]", "vecsim info STORE",
                                              "vecsim query s --id 5"]


def test_readme_stays_short_and_links_its_depth():
    """The README is read in ten minutes: at most 250 lines; the depth is one link away."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250, "README.md is over 250 lines: move the depth to a page in docs/"
    for page in ("docs/indexing.md", "docs/querying.md", "docs/similarity.md", "docs/cli.md", "benchmarks/RESULTS.md"):
        assert f"]({page}" in text, f"README.md does not link {page}"
