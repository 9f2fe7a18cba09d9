"""Each benchmark owns one section of docs/benchmarks.md, between its own markers."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(*, start: str, end: str, section: str) -> None:
    """Replace the text between ``start`` and ``end`` (markers included) with ``section``,
    which begins with ``start`` and ends with ``end``; append it if the markers are absent."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text)


def fmt(value: float | None) -> str:
    """A figure in a table: one decimal below 100, thousands separated above; "–" for none."""
    if value is None:
        return "–"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:,.0f}"
