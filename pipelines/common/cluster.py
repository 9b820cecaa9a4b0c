"""Where a job's processes run: the one Ray connection of every job and the one rule for local paths.

* `init_ray`: connect to an explicit address (`ray.address`, or $RAY_ADDRESS, which `ray job submit` sets for
  the entrypoint), else start a private local instance. (A cluster's own processes learn its address from the
  environment of `ray start`: see the README's cluster section.) A bare `ray.init()` would join whatever cluster
  `ray start` last registered on the machine (/tmp/ray/ray_current_cluster), possibly someone else's; and Ray's
  own helper processes that look the cluster up without an address log "Found multiple active Ray instances"
  and may attach to the latest one. So the private instance's GCS address is chosen up front and handed to
  every process of the job as $RAY_ADDRESS (not to this process's environment: it outlives the instance).
* `resolve_local_path`: Ray workers do not share the driver's working directory, so relative local paths are
  made absolute on the driver; URIs (`s3://`, `hf://`, ...) stay as they are.
* `durable_output` / `created_model_path`: under `ray job submit --working-dir` the entrypoint's working
  directory is a temporary copy of the code, deleted with the job; an output given there as a relative path is
  refused, and a model that the job creates itself (a tiny random conditioner) is placed under the output.
"""
from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"  # read by `ray.init(address="local")` when it starts the GCS


def init_ray(address: str | None = None, *, num_cpus: float | None = None, include_dashboard: bool = False,
             object_store_memory: int | None = None, runtime_env: dict | None = None,
             log_to_driver: bool = True) -> bool:
    """Connect to / start Ray; True when this call did (False: this process was already connected)."""
    import ray  # heavy: ray, psutil

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw: dict = {"log_to_driver": log_to_driver}
    if runtime_env:
        kw["runtime_env"] = runtime_env
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kw)
        return True
    # A private instance for this process only, on loopback, its GCS on a port chosen here so that its address
    # can be handed to every process of the job ($RAY_ADDRESS): nothing then looks for "the latest cluster".
    # Token authentication stays off for it: Ray 2.60 would otherwise turn it on and write ~/.ray/auth_token,
    # which then changes every later `ray start` on the machine.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    gcs_address = f"127.0.0.1:{_free_port()}"
    kw["runtime_env"] = _with_address(runtime_env, gcs_address)
    if object_store_memory:
        kw["object_store_memory"] = int(object_store_memory)
    os.environ[GCS_PORT_VARIABLE] = gcs_address.rsplit(":", 1)[1]
    try:
        ray.init(address="local", num_cpus=None if num_cpus is None else math.ceil(num_cpus),
                 include_dashboard=include_dashboard, _node_ip_address="127.0.0.1", **kw)
    finally:
        os.environ.pop(GCS_PORT_VARIABLE, None)
    return True


def _with_address(runtime_env: dict | None, gcs_address: str) -> dict:
    """`runtime_env` plus $RAY_ADDRESS for every process of the job (Ray's own helper actors included)."""
    env = dict((runtime_env or {}).get("env_vars") or {})
    env["RAY_ADDRESS"] = gcs_address
    return {**(runtime_env or {}), "env_vars": env}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_local_path(p: str | None, *, must_exist: bool = False) -> str | None:
    """A relative local path -> absolute against the current directory; absolute paths and URIs unchanged.

    With `must_exist`, a relative name that is not on disk (nor `<name>.json` / `<name>.safetensors`, a TRELLIS
    checkpoint stem) is returned unchanged: it is a hub id such as `org/repo/ckpts/stem`."""
    if not p or "://" in p or os.path.isabs(os.path.expanduser(p)):
        return os.path.expanduser(p) if p and "://" not in p else p
    q = Path(p).expanduser()
    if must_exist and not (q.exists() or Path(f"{q}.json").exists() or Path(f"{q}.safetensors").exists()):
        return p
    return str(q.resolve())


# ------------------------------------------------------------------------------------------------ ray job submit


def submitted_with_working_dir() -> bool:
    """True inside the entrypoint of `ray job submit --working-dir`: its cwd is a temporary copy."""
    spec = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not spec:
        return False
    try:
        return bool((json.loads(spec).get("runtime_env") or {}).get("working_dir"))
    except ValueError:
        return False


def is_relative_local(p: str | None) -> bool:
    return bool(p) and "://" not in p and not os.path.isabs(os.path.expanduser(p))


def durable_output(p: str | None, flag: str) -> None:
    """ValueError (one line) for a relative local output under `ray job submit --working-dir`."""
    if submitted_with_working_dir() and is_relative_local(p):
        raise ValueError(f"{flag} {p} is relative: under `ray job submit --working-dir` it would land in the job's "
                         "temporary copy of the code and vanish with it; give an absolute path or an s3:// URI")


def created_model_path(p: str | None, output: str | None) -> str | None:
    """Where the job writes a model it creates when missing (a tiny random network), as an absolute path: a
    relative `p` is taken against the cwd, except under `ray job submit --working-dir`, where the cwd is a
    temporary copy: there it goes to `<output>/models/<last part of p>` (the output is absolute by then)."""
    if submitted_with_working_dir() and is_relative_local(p) and output and "://" not in output:
        return str(Path(output) / "models" / Path(p).name)
    return resolve_local_path(p)


# ------------------------------------------------------------------------------------------------ a head's ports


def busy_ports(specs: list[str]) -> list[int]:
    """The ports of `specs` ("6390", "8300-8399") that something already listens on (any interface)."""
    ports = []
    for spec in specs:
        lo, _, hi = spec.partition("-")
        ports += range(int(lo), int(hi or lo) + 1)
    busy = []
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
            try:
                s.bind(("", port))   # all interfaces: Ray's GCS and raylet bind there
            except OSError:
                busy.append(port)
    return busy


if __name__ == "__main__":  # python -m pipelines.common.cluster --check-ports 6390 8290-8297 (the README's head)
    import sys

    args = sys.argv[1:]
    if args[:1] != ["--check-ports"] or len(args) < 2:
        sys.exit("usage: python -m pipelines.common.cluster --check-ports PORT|LO-HI ...")
    taken = busy_ports(args[1:])
    if taken:
        sys.exit(f"ports in use (another Ray instance or service): {', '.join(map(str, taken))}; "
                 "choose others for the head and its clients")
    print(f"free: {' '.join(args[1:])}")
