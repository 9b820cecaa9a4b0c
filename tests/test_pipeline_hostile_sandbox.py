"""The render worker's sandbox, measured from inside: as root (namespaces directly), with CAP_SYS_ADMIN dropped
(an unprivileged user namespace, how the shipped image runs) and where no namespace can be made (the asset fails
with ``no sandbox: <why>`` unless the job allows running without it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from _pipeline_helpers import PROJECT_ROOT

pytestmark = pytest.mark.blender  # every test here runs the Blender worker in its sandbox

WORKER = PROJECT_ROOT / "pipelines" / "preprocess" / "blender_worker.py"
SETPRIV_NO_SYS_ADMIN = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]
# a parent that cannot make namespaces: the worker's own seccomp filter (it refuses unshare) installed first
NO_NAMESPACES = [sys.executable, "-c", "import os, sys; sys.path.insert(0, os.path.dirname(sys.argv[2])); "
                 "import blender_worker as w; w._seccomp(w._libc()); os.execv(sys.argv[1], sys.argv[1:])"]


def check(prefix: list[str], *args: str) -> tuple[int, dict]:
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "canary-secret", "HF_TOKEN": "canary-token"}
    r = subprocess.run([*prefix, sys.executable, str(WORKER), "--check-sandbox", *args], capture_output=True,
                       text=True, timeout=60, env=env)
    return r.returncode, json.loads(r.stdout.strip().splitlines()[-1])


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("runs as root to compare with and without CAP_SYS_ADMIN (non-root: see the container check)")


@pytest.mark.parametrize("how", ["root", "no_sys_admin"])
def test_sandbox_properties_inside(how):
    needs_root()
    if how == "no_sys_admin" and not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is not installed")
    code, p = check(SETPRIV_NO_SYS_ADMIN if how == "no_sys_admin" else [])
    assert code == 0, p
    assert p["mode"] == ("namespace" if how == "root" else "userns")
    assert p["proc"] is False and "proc" not in p["root_entries"] and "etc" not in p["root_entries"]
    assert not any(p["capabilities"]) and p["no_new_privs"] == 1 and p["seccomp"] == 2
    assert p["inet_socket"] == "EPERM" and p["ptrace"] == "EPERM" and p["unshare"] == "EPERM"
    assert not {"AWS_SECRET_ACCESS_KEY", "HF_TOKEN"} & set(p["env"]), p["env"]


def test_no_sandbox_fails_unless_allowed():
    needs_root()
    code, p = check(NO_NAMESPACES)
    assert code == 1 and p["mode"] is None, p
    assert p["error"].startswith("no sandbox: namespaces not permitted (Operation not permitted); "
                                 "user namespace: Operation not permitted"), p
    code, p = check(NO_NAMESPACES, "--allow-unsandboxed")
    assert code == 1 and p["mode"] == "none", p  # runs, but the check reports the sandbox as not holding


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_render_inside_the_sandbox(tmp_path, device):
    """A real render in the sandbox with the presets' device choice: probing GPUs there (no /proc) must not take
    the worker down (oneAPI's runtime aborts without /proc/self/maps)."""
    from _pipeline_helpers import GOOD_GLBS
    from conftest import shared_path

    from pipelines.preprocess.render import (
        RenderPass,
        RenderSettings,
        WarmWorker,
        feature_cameras,
        render_file,
    )

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "a.glb").write_bytes(shared_path("assets", "glb", GOOD_GLBS[0]).read_bytes())
    c2w, fov = feature_cameras(2, (0.0, 0.0))
    settings = RenderSettings(samples=1, denoise=False, device=device, threads=1, timeout_s=120)
    warm = WarmWorker()
    try:
        res = render_file(bundle / "a.glb", "glb", [RenderPass("views", 32, c2w, fov)], settings, workdir=tmp_path,
                          bundle_dir=bundle, warm=warm)
    finally:
        warm.close()
    assert res.ok, (res.error, res.log_tail[-2000:])
    assert res.info["wall"] == ("namespace" if os.geteuid() == 0 else "userns")
