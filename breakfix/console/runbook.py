"""Runbooks for the console: ``runbooks/<category>.md`` rendered to HTML with markdown-it-py.

The files live at the repository's ``runbooks/``; the package reaches them as
``breakfix/console/runbooks`` (a link to that folder in a checkout, real files in the wheel,
where setuptools copies them as package data), so the installed console reads the same text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from markdown_it import MarkdownIt

HERE = Path(__file__).resolve().parent
_NAME = re.compile(r"^[a-z0-9_]+$")
_md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")


def runbook_dir() -> Path:
    for d in (HERE / "runbooks", HERE.parent.parent / "runbooks"):
        if d.is_dir():
            return d
    return HERE / "runbooks"


@lru_cache(maxsize=64)
def runbook_html(category: str) -> str | None:
    """The rendered runbook of a category (raw HTML in the markdown is escaped), or None."""
    if not _NAME.match(category):
        return None
    path = runbook_dir() / f"{category}.md"
    if not path.is_file():
        path = runbook_dir() / "unknown_fault.md"
        if not path.is_file():
            return None
    return str(_md.render(strip_front_matter(path.read_text())))


def strip_front_matter(text: str) -> str:
    """Drop the YAML front matter (``---`` ... ``---``) the runbook tests read; the page shows the prose."""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end != -1:
            return text[end + 5:]
    return text
