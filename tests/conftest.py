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


# --- test tiers -------------------------------------------------------------------------------------------
# `make check` runs the tests that start nothing heavy: no Ray, no Blender, no server process, nothing slow.
# A test that starts one of those must carry its marker, or the fast tier would silently grow; the guard
# below watches what each test starts and fails an unmarked one, naming the marker it needs.
HEAVY_MARKERS = ("ray", "blender", "server")
_SERVER_PROGRAMS = ("moto_server", "postgres", "pg_ctl", "chromium", "chromium-browser", "chromedriver",
                    "uvicorn", "gunicorn", "minio", "redis-server")


def _launch_kinds(argv) -> tuple[set[str], bool]:
    """Which heavy things a subprocess command line starts, and whether it is a job script (one that exits 2
    on an argument error, before Ray starts: such a run starts nothing). Only the command's own words count (a
    script handed to `bash -c` that merely prints a command starts nothing); `--help` starts nothing either."""
    if isinstance(argv, (str, bytes, os.PathLike)):
        words = [os.fsdecode(argv)]
    else:
        words = [os.fsdecode(a) for a in argv]
    if "--help" in words or "-h" in words:
        return set(), False
    names = [os.path.basename(w) for w in words]
    kinds = set()
    if any(n in ("blender_worker.py", "blender") for n in names) or any("blender_worker" in w for w in words[1:3]):
        kinds.add("blender")
    ray_cli = "ray" in names[:3]
    if ray_cli and ("start" in words or ("job" in words and "submit" in words)):
        kinds.add("ray")
    job = any(w.replace(os.sep, "/").endswith(f"jobs/{j}.py") for w in words
              for j in ("preprocess", "distill", "evaluate", "demo", "synthesize"))
    if job:
        kinds.add("ray")
    if (any(n in _SERVER_PROGRAMS for n in names)
            or any(n == "mlflow" and nxt in ("server", "ui") for n, nxt in zip(names, words[1:]))
            or any(w == "-m" and nxt in ("http.server", "moto.server") for w, nxt in zip(words, words[1:]))):
        kinds.add("server")
    return kinds, job


@pytest.fixture(autouse=True)
def _heavy_start_guard(request, monkeypatch):
    import subprocess

    launched: list[tuple[set[str], bool, subprocess.Popen]] = []
    started: set[str] = set()
    real_init = subprocess.Popen.__init__

    def watched_init(self, args, *a, **kw):
        kinds, job = _launch_kinds(args)
        if kinds:
            launched.append((kinds, job, self))
        return real_init(self, args, *a, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", watched_init)
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a core dependency
        ray = None
    if ray is not None:
        real_ray_init = ray.init

        def watched_ray_init(*a, **kw):
            started.add("ray")
            return real_ray_init(*a, **kw)

        monkeypatch.setattr(ray, "init", watched_ray_init)
    ray_was_up = ray is not None and ray.is_initialized()
    yield
    if ray is not None and not ray_was_up and ray.is_initialized():   # e.g. Ray Data's implicit start
        started.add("ray")
    for kinds, job, proc in launched:
        if job and proc.returncode == 2:   # an argument error: refused before Ray started
            kinds = kinds - {"ray"}
        started.update(kinds)
    missing = sorted(k for k in started if request.node.get_closest_marker(k) is None)
    if missing:
        pytest.fail(f"this test starts {', '.join(missing)} without its marker: add "
                    + " ".join(f"@pytest.mark.{k}" for k in missing) + " (see `make check`)", pytrace=False)
