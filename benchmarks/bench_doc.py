"""docs/BENCHMARKS.md is shared by the benchmark scripts: each owns one marked section."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nWritten by the scripts under `benchmarks/`; do not edit by hand.\n"


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replaces (or appends) the section ``name`` of the benchmarks doc with ``body``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = doc.read_text() if doc.exists() else HEADER
    if not text.startswith("# Benchmarks"):
        text = HEADER
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


HEADLINE = ROOT / "docs" / "benchmarks" / "headline.json"


def write_headline(figures: dict[str, dict], path: Path = HEADLINE) -> None:
    """Merges figures into the flat headline file every benchmark updates: key -> {"value",
    "target", "met", "how"} (how: what was measured, and with which command)."""
    import json

    current = json.loads(path.read_text()) if path.exists() else {}
    current.update(figures)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(current.items())), indent=2) + "\n")
