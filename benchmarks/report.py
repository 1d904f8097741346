"""Writing a benchmark's table into its own section of a docs page, keeping the rest of the page."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, title: str, body: str) -> None:
    """Put ``## title`` + body into ``path`` in place of the section of that title (or at the end)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head = f"\n## {title}"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + text[nxt:] if nxt != -1 else text[:start]
    path.write_text(text.rstrip("\n") + f"\n{head}\n\n{body.strip()}\n")
