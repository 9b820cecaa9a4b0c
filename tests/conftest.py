"""Shared test fixtures.

`../shared` (reference data and test assets) sits beside the checkout in CI. On a user's fresh clone it
may be missing: tests that need it then skip with the reason, unless CI is set, where they fail.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"

# Tests are sized for 2 cores; more threads than cores only adds contention.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def shared_path(*parts: str, required_in_ci: bool = True) -> Path:
    """Path under ../shared, or skip (fail when CI is set) if it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"{path} is missing: the shared reference data sits beside the checkout in CI"
        if required_in_ci and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + " (CI is set, so this is an error)")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return shared_path()


@pytest.fixture(scope="module")
def ray_connected():
    """This module's driver connection to the shared loopback Ray head (tests/_pipeline_helpers.py);
    disconnected at module end so that other test modules can start or join their own Ray."""
    import ray

    from _pipeline_helpers import connect_ray

    head = connect_ray()
    yield head
    ray.shutdown()
