"""How far a user's search and related answers differ from their home feed, as the live ensemble
served them in the demo: the mean |home ∩ search| / 100 (and |home ∩ related| / 100) of the top
100 over the users with the most ad clicks, each asking with their own logged query and context
item. Issue 14's target: home/search overlap <= 0.5.

    make demo     # step 6 measures it and writes data/demo/surface_overlap.json
    .venv/bin/python benchmarks/surface_overlap.py [--from data/demo/surface_overlap.json]

Measures nothing itself: it records the demo's file into docs/benchmarks/headline.json
(``context.home_search_overlap_top100``) and the ``surface_overlap`` section of
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_doc import ROOT, write_headline, write_section

DEFAULT = ROOT / "data" / "demo" / "surface_overlap.json"
TARGET = 0.5
KEYS = ("users", "home_search_overlap_top100", "home_related_overlap_top100", "k")


def load(path: Path) -> dict[str, Any]:
    """The demo's measurement; SystemExit naming the file and the key when it is incomplete."""
    if not path.exists():
        raise SystemExit(f"{path}: not found; `make demo` writes it (step 6)")
    got: dict[str, Any] = json.loads(path.read_text())
    missing = [k for k in KEYS if k not in got]
    if missing:
        raise SystemExit(f"{path}: missing {', '.join(missing)}")
    if not got["users"]:
        raise SystemExit(f"{path}: measured over no users")
    return got


def _model(got: dict[str, Any]) -> str:
    model = got.get("model") or {}
    if isinstance(model, dict):
        uri, run = model.get("model_uri", "?"), str(model.get("run_id", "?"))[:12]
        return f"{uri} (run {run})"
    return str(model)


def figures(got: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The headline figure: the mean home/search overlap against the issue's target."""
    value = float(got["home_search_overlap_top100"])
    k = int(got["k"])
    return {
        "context.home_search_overlap_top100": {
            "value": round(value, 4),
            "target": f"<= {TARGET}",
            "met": bool(value <= TARGET),
            "how": f"mean |home ∩ search| / {k} of the live ensemble's top {k} over the "
            f"{got['users']} users with the most ad clicks, each with their own query (their "
            "latest logged one, else their most engaged category's noun; "
            f"`make demo`, step 6; {_model(got)}; recorded by "
            "`.venv/bin/python benchmarks/surface_overlap.py`)",
        }
    }


def section(got: dict[str, Any]) -> str:
    k, n = int(got["k"]), got["users"]
    search, related = got["home_search_overlap_top100"], got["home_related_overlap_top100"]
    verdict = "met" if float(search) <= TARGET else "missed"
    machine = f" on {got['machine']}" if got.get("machine") else ""
    wall = f", {got['wall_s']} s for the {3 * n} requests" if got.get("wall_s") else ""
    return f"""## Surface overlap (issue 14): how much search and related differ from home

`make demo`, step 6{machine}{wall}: the live `retrieve` ensemble asked for {k} ads on home,
search and related by each of the {n} users with the most ad clicks, search with the user's
latest logged query (else their most engaged category's noun), related with their latest
logged context item (else their latest engaged organic item). Model: {_model(got)}.

| pair | mean overlap of the top {k} | target |
|---|---|---|
| home / search | {search:.3f} | <= {TARGET} ({verdict}) |
| home / related | {related:.3f} | - |

Recorded by `.venv/bin/python benchmarks/surface_overlap.py` from the demo's
`surface_overlap.json`."""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="path", type=Path, default=DEFAULT, help="the demo's file")
    args = p.parse_args()
    got = load(args.path)
    figs = figures(got)
    write_headline(figs)
    write_section("surface_overlap", section(got))
    print(json.dumps(figs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
