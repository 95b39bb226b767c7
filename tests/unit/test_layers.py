"""The house's layers, read from the source: no package imports one above it, nothing imports in
a cycle, and the request path that runs inside Triton reaches only what the serving environment
has (requirements/serving.txt)."""

from __future__ import annotations

import pytest

from tests.imports import closure, imports, modules, package, third_party

# Each package's layer, lowest first. A package imports only packages of lower layers.
# registry sits below training because the trainer logs its run and registers its model.
LAYERS: dict[str, int] = {
    "candgen": 0, "errors": 0, "paths": 0, "vocab": 0, "images": 0,
    "data": 1,
    "models": 2,
    "features": 3, "evaluation": 3,
    "registry": 4,
    "training": 5,
    "index": 6,
    "serving": 7,
    "endpoint": 8,
    "quotas": 9,
    "orchestrate": 10, "demo": 11, "cli": 12,
}  # fmt: skip

# The modules that tritonserver's python backend imports, and what the serving environment
# offers them besides the standard library.
REQUEST_PATH = "candgen.serving"
SERVING_ENV = {
    "numpy",
    "torch",
    "faiss",
    "triton_python_backend_utils",
    "onnxruntime",
    "tokenizers",
    "tritonclient",  # the generators step asks the ads index's shards (candgen.serving.shards)
    "tqdm",  # AdIndex.build's progress bar (pinned in requirements/serving.txt)
}


def _edges() -> list[tuple[str, str]]:
    return [(a, b) for a in modules() for b in imports(a) if b.startswith("candgen")]


def test_every_package_has_a_layer() -> None:
    assert {package(m) for m in modules()} == set(LAYERS)


def test_no_package_imports_one_above_it_or_beside_it() -> None:
    upward = sorted(
        f"{a} -> {b}"
        for a, b in _edges()
        if package(a) != package(b) and LAYERS[package(b)] >= LAYERS[package(a)]
        and LAYERS[package(b)] > 0
    )  # fmt: skip
    assert upward == []


@pytest.mark.parametrize(
    ("lower", "forbidden"),
    [
        ("models", {"training", "evaluation", "registry"}),
        ("evaluation", {"training"}),
        ("serving", {"training"}),
        ("features", {"training", "serving"}),
    ],
)
def test_the_issue_s_named_boundaries(lower: str, forbidden: set[str]) -> None:
    crossing = sorted(f"{a} -> {b}" for a, b in _edges()
                      if package(a) == lower and package(b) in forbidden)  # fmt: skip
    assert crossing == []


def test_no_import_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in _edges():
        if package(a) != package(b):
            graph.setdefault(package(a), set()).add(package(b))
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    cycles = [c for n in sorted(graph) if n not in state and (c := visit(n, []))]
    assert cycles == []


def test_the_request_path_reaches_only_the_serving_environment() -> None:
    roots = [m for m in modules() if m == REQUEST_PATH or m.startswith(REQUEST_PATH + ".")]
    reached = closure(roots)
    outside = sorted(f"{m}: {sorted(third_party(m) - SERVING_ENV)}"
                     for m in reached if third_party(m) - SERVING_ENV)  # fmt: skip
    assert outside == []
    # The offline learner and the operations live outside the request path.
    assert not any(m.startswith(("candgen.quotas", "candgen.endpoint")) for m in reached)


def test_the_import_walk_sees_function_level_imports() -> None:
    # steps.py loads the model factory inside a function; a walk that missed it would pass
    # the boundary test above for the wrong reason.
    assert "candgen.models.factory" in imports("candgen.serving.steps")
