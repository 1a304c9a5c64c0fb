"""mkdocs hooks: the README is the site's front page and benchmarks/RESULTS.md its results page.

Both files stay where GitHub readers expect them; the site takes them as they are, rewriting
only the links that point from the repository root into ``docs/`` (and to the results file),
so a broken link in either still fails ``mkdocs build --strict``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
# repository file -> page of the site
PAGES = {"README.md": "index.md", "benchmarks/RESULTS.md": "results.md"}


def _site_links(markdown: str, source: str) -> str:
    """Rewrite the relative link targets of ``source`` (a repository path) into site pages."""
    here = Path(source).parent

    def target(match: re.Match) -> str:
        link = match.group(2)
        if re.match(r"^[a-z]+:|^#", link):
            return match.group(0)
        path, _, anchor = link.partition("#")
        repo_path = Path(os.path.normpath(here / path)).as_posix() if path else source
        if repo_path in PAGES:
            page = PAGES[repo_path]
        elif repo_path.startswith("docs/"):
            page = repo_path[len("docs/"):]
        else:
            return match.group(0)  # left alone: strict mode reports it as a broken link
        return f"{match.group(1)}({page}{'#' + anchor if anchor else ''})"

    return re.sub(r"(\]\s*)\(([^)\s]+)\)", target, markdown)


_SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data):<code>([^<]*)</code>")


def on_page_content(html: str, page, config, files) -> str:
    """Docstrings use Sphinx roles (``:func:`x` ``); the API page shows them as code, linked
    when the object is documented on the same page."""

    def code(match: re.Match) -> str:
        name = match.group(1).lstrip("~.")
        if f'id="{name}"' in html:
            return f'<a href="#{name}"><code>{name}</code></a>'
        return f"<code>{name}</code>"

    return _SPHINX_ROLE.sub(code, html)


def on_files(files, config):
    for source, page in PAGES.items():
        text = (ROOT / source).read_text(encoding="utf-8")
        files.append(File.generated(config, page, content=_site_links(text, source)))
    return files
