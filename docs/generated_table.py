"""What the docs' generators share: a page's table between two marker lines, written anew or
checked (`--check`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def fill(page: str, begin: str, end: str, table: str) -> str:
    """`page` with `table` between its `begin` and `end` markers."""
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def main(path: Path, render: Callable[[str], str], script: str) -> None:
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else f"docs/{path.name} is stale: run {script}")
    path.write_text(new, encoding="utf-8")
