"""kfp.local for the component tests: components run as subprocesses of this environment."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kfp_local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kfp import local

    root = tmp_path_factory.mktemp("pipeline_root")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    return root


SMALL = {"users": 60, "ads": 80, "items": 60, "days": 4, "seed": 3}
