"""The demo's surface view and overlap measurement, against a stand-in for the live ensemble:
each surface gets its own context, the answers print side by side with their flags, and the
overlap file holds what the issue asks for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pandas as pd
import pytest

from candgen import demo
from candgen.endpoint.surface_context import SurfaceContext
from candgen.serving.pipeline import RetrievalResult


class FakeClient:
    """Answers home with ads 1..k, search with the upper half of home then new ads, related
    with new ads only; records every request."""

    protocol = "http"

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, dict[str, Any]]] = []

    def retrieve(self, user_id: int, scenario: str, k: int, **context: Any) -> RetrievalResult:
        self.calls.append((user_id, scenario, context))
        if scenario == "home":
            ads = list(range(1, k + 1))
        elif scenario == "search":
            ads = list(range(1, k // 2 + 1)) + list(range(1_000, 1_000 + k - k // 2))
        else:
            ads = list(range(2_000, 2_000 + k))
        flags = [] if context else ["no_query" if scenario == "search" else "no_context_item"]
        return RetrievalResult(
            ad_ids=ads,
            scores=[1.0] * k,
            sources=[scenario] * k,
            source_counts={scenario: k},
            quota_policy="fixed",
            flags=flags if scenario != "home" else [],
        )


def test_each_surface_gets_only_its_own_context() -> None:
    context = SurfaceContext("gaming mouse", "logged", 7, "engaged")
    assert demo._context_kwargs("home", context) == {}
    assert demo._context_kwargs("search", context) == {"query": "gaming mouse"}
    assert demo._context_kwargs("related", context) == {"context_item_id": 7}
    assert demo._context_kwargs("search", SurfaceContext(None, "none", None, "none")) == {}


def test_show_user_prints_the_surfaces_side_by_side_with_flags_and_overlap(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = FakeClient()
    context = SurfaceContext("gaming mouse", "category", 3, "logged")
    demo._show_user(5, context, cast(Any, rc), {1: "Zennova gaming mouse"}, {3: "mouse #3"})
    out = capsys.readouterr().out
    assert [c[1:] for c in rc.calls] == [
        ("home", {}),
        ("search", {"query": "gaming mouse"}),
        ("related", {"context_item_id": 3}),
    ]
    assert 'search query "gaming mouse" (category)' in out
    assert "related context item 3 'mouse #3' (logged)" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == list(demo.SURFACES))
    # Each surface's column starts where its name does in the header.
    at = [lines[header].index(s) for s in demo.SURFACES]
    first = lines[header + 1]
    assert [first[i:].split(":")[0] for i in at] == list(demo.SURFACES)
    assert first.split(": ")[0].strip() == "home"
    assert "home: Zennova gaming mouse" in first and "related: 2000" in first
    assert f"|home ∩ search| / {demo.K} = 0.50" in out
    assert f"|home ∩ related| / {demo.K} = 0.00" in out


def test_show_user_prints_flags_for_a_user_without_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    demo._show_user(9, SurfaceContext(None, "none", None, "none"), cast(Any, FakeClient()), {}, {})
    out = capsys.readouterr().out
    assert "search query none; related context none" in out
    assert "FLAGS no_query" in out and "FLAGS no_context_item" in out


def test_measure_overlap_writes_the_mean_over_the_top_clickers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = pd.Timestamp("2026-01-01", tz="UTC")
    events = pd.DataFrame(
        {
            "user_id": [1, 2, 2, 3],
            "event_ts": [t] * 4,
            "surface": ["search", "home", "home", "home"],
            "event_type": ["click", "click", "click", "engage"],
            "item_id": [float("nan"), float("nan"), float("nan"), 1.0],
            "query": ["mouse", None, None, None],
            "context_item_id": [float("nan")] * 4,
        }
    )
    items = pd.DataFrame({"item_id": [1], "category": ["gaming"], "title": ["gaming mouse #1"]})
    rc = FakeClient()
    demo._measure_overlap(cast(Any, rc), events, items, tmp_path, {"model_uri": "models:/m/1"})
    got = json.loads((tmp_path / "surface_overlap.json").read_text())
    assert {k: got[k] for k in list(got)[:5]} == {
        "users": 2,
        "home_search_overlap_top100": 0.5,
        "home_related_overlap_top100": 0.0,
        "k": 100,
        "model": {"model_uri": "models:/m/1"},
    }
    assert got["refused"] == 0 and got["command"].startswith("make demo")
    # Only the two users who clicked, the heavier clicker first, each with their own query.
    assert [(u, s) for u, s, _ in rc.calls][:3] == [(2, "home"), (2, "search"), (2, "related")]
    assert (1, "search", {"query": "mouse"}) in rc.calls
    assert "over 2 users" in capsys.readouterr().out
