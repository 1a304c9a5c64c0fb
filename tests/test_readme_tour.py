"""The README's tour runs as printed: every `$ vecsim ...` line of its ```console blocks is run
on a store built from builtin:digits, in order, and must exit 0 and print what the README shows
column for column.

The tour is read from the README, so a command added there is checked without a change here.
A docs/ page opts its own ```console block in with the line `<!-- tour: checked -->` right
above it (the commands run after the README's, in the same folder, on the same store).
What is compared (numbers vary with the machine, the layout must not):

* lines without a number (column headers, `layer features.relu4`, `source builtin:digits`)
  must appear exactly, up to spacing;
* unless the README elides output with a `...` line, the command prints as many non-empty
  lines as the README shows, each with as many whitespace-separated columns.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TOUR_HEADING = "## A short tour"
CHECKED = "<!-- tour: checked -->"
NUMBER = re.compile(r"^[-+]?(\d[\d,]*\.?\d*|\.\d+)(e[-+]?\d+)?[%x×]?$")


def console_commands(blocks: list[str]) -> list[tuple[str, list[str]]]:
    """(command line, expected output lines) for every `$ ` line of these console blocks."""
    commands: list[tuple[str, list[str]]] = []
    for block in blocks:
        for line in block.splitlines():
            if line.startswith("$ "):
                commands.append((line[2:], []))
            elif commands:
                commands[-1][1].append(line)
    return commands


def tour_commands(text: str) -> list[tuple[str, list[str]]]:
    """The commands of the README tour's console blocks."""
    assert TOUR_HEADING in text, f"README.md has no '{TOUR_HEADING}' section"
    section = text.split(TOUR_HEADING, 1)[1].split("\n## ", 1)[0]
    return console_commands(re.findall(r"```console\n(.*?)```", section, flags=re.S))


def checked_page_commands(text: str) -> list[tuple[str, list[str]]]:
    """The commands of a page's console blocks marked with the CHECKED line."""
    return console_commands(re.findall(re.escape(CHECKED) + r"\s*```console\n(.*?)```", text, flags=re.S))


def has_number(line: str) -> bool:
    return any(NUMBER.match(token.strip("()[]{},;:")) for token in line.split())


def check_output(command: str, expected: list[str], printed: str) -> None:
    got = [line for line in printed.splitlines() if line.strip()]
    want = [line for line in expected if line.strip()]
    got_normalised = {" ".join(line.split()) for line in got}
    for line in want:
        if not has_number(line) and line.strip() != "...":
            assert " ".join(line.split()) in got_normalised, (
                f"`{command}` no longer prints the README's line\n  {line.strip()}\nit printed:\n{printed}")
    if any(line.strip() == "..." for line in want):
        return
    assert len(got) == len(want), f"`{command}` printed {len(got)} lines, the README shows {len(want)}:\n{printed}"
    for shown, printed_line in zip(want, got):
        assert len(shown.split()) == len(printed_line.split()), (
            f"`{command}`: the README's line\n  {shown.strip()}\nhas other columns than the printed\n  {printed_line.strip()}")


def test_the_tour_parser_reads_commands_and_outputs():
    text = "intro\n" + TOUR_HEADING + "\n\n```console\n$ vecsim info s   # a comment\nlayer  dim\nx 3\n\n$ vecsim query s\nrank\n```\n\n## Next\n```console\n$ vecsim other\n```\n"
    assert tour_commands(text) == [("vecsim info s   # a comment", ["layer  dim", "x 3", ""]), ("vecsim query s", ["rank"])]
    page = f"```console\n$ vecsim skipped\n```\n{CHECKED}\n\n```console\n$ vecsim layers m\nlayer\n```\n"
    assert checked_page_commands(page) == [("vecsim layers m", ["layer"])]
    assert has_number("  features.relu1: 16384 → 256 dims") and has_number("store s (format 2, complete)")
    assert not has_number("rank  features.relu1  features.relu2") and not has_number("source: exact-gram, n=500 (every cell)")
    check_output("c", ["layer  dim", "a  1"], "layer dim\nb 2\n")
    with pytest.raises(AssertionError, match="no longer prints"):
        check_output("c", ["layer  dim", "a  1"], "layer units\na 1\n")
    with pytest.raises(AssertionError, match="other columns"):
        check_output("c", ["layer  dim", "a  1"], "layer dim\na 1 2\n")
    with pytest.raises(AssertionError, match="printed 3 lines"):
        check_output("c", ["layer  dim", "a  1"], "layer dim\na 1\nb 2\n")


@pytest.mark.slow
def test_every_tour_command_runs_and_prints_the_readme_columns(tmp_path, monkeypatch, capsys):
    from vecsim.cli import main

    commands = tour_commands(README.read_text(encoding="utf-8"))
    tour = {line for line, _ in commands}
    for page in sorted((ROOT / "docs").glob("*.md")):
        commands += checked_page_commands(page.read_text(encoding="utf-8"))
    programs = {shlex.split(line, comments=True)[0] for line, _ in commands}
    assert programs == {"vecsim"}, f"the tour may only run vecsim commands, not {programs - {'vecsim'}}"
    assert {shlex.split(line)[1] for line in tour} >= {"index", "info", "query", "similarity", "report", "compare"}
    monkeypatch.chdir(tmp_path)
    printed: dict[str, str] = {}  # a page repeating a tour command is checked against the tour's run
    for line, expected in commands:
        if line not in printed:
            printed[line] = run_command(line, main, capsys)
        check_output(line, expected, printed[line])


def run_command(line: str, main, capsys) -> str:
    """Run one `vecsim ...` line in this process; its stdout, after checking it exited 0."""
    capsys.readouterr()
    try:
        main(shlex.split(line, comments=True)[1:])
    except SystemExit as exc:
        out, err = capsys.readouterr()
        assert not exc.code, f"`{line}` exited with {exc.code}: {err.strip()[-2000:]}"
        return out
    return capsys.readouterr().out
