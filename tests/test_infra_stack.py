"""The scaling-out stack on 127.0.0.1: the team MLflow server on a real PostgreSQL and an S3 stand-in, a Ray head,
and the rehearsal commands of docs/scaling-out.md run verbatim against them.

- S3: moto's ThreadedMotoServer (buckets `mdt-mlflow` for MLflow's artifacts, `mdt-runs` for the jobs' outputs).
- PostgreSQL: Debian's server binaries (infra/ci/install-system-deps.sh installs them; `make test` runs it where it
  may), a throw-away cluster in /tmp on 127.0.0.1 with password authentication; as root it runs as the `postgres`
  user (initdb refuses root).
- MLflow: section 5's commands of the page (`export ...; infra/mlflow/start-server.sh`), with the placeholders
  replaced by the local PostgreSQL URI and the moto bucket.
- Ray: section 1's `ray start --head ...` with free ports instead of 6379 / 8265 (the machine is shared), then
  section 1's `export` / `ray job submit` / `ray job status` / `ray job logs --follow` / `ray job list` lines as
  one bash script, with RAY_ADDRESS, OUT (an s3:// prefix on moto) and MLFLOW_TRACKING_URI (the team server)
  set to the stand-ins. The preprocessing job writes its shards to S3, the distillation job (`--preset ci`, a
  few steps on 2 gloo workers) trains on them, checkpoints to S3 and logs to the team server.
- The distillation run is then read back through MLflow's REST API (params, metric history, artifacts), the
  artifacts are found in the bucket, the run row in PostgreSQL, the checkpoints and shards in S3; section 9's
  `python infra/estimate.py --report ... --spot` runs on the preprocessing run's real report.

Every process group started here is stopped at the end (never `ray stop`). Without PostgreSQL the tests skip
with the reason, unless CI is set, where they fail.
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _pipeline_helpers import free_port, ray_port_args  # noqa: E402
from infra.doc_commands import doc_commands  # noqa: E402

VENV_BIN = Path(sys.executable).parent
START_SCRIPT = ROOT / "infra" / "mlflow" / "start-server.sh"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
S3_CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
LOOPBACK = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def unavailable(reason: str):
    if IN_CI:
        pytest.fail(reason + " (CI is set, so this is an error: `bash infra/ci/install-system-deps.sh` installs it)")
    pytest.skip(reason + " (run `sudo bash infra/ci/install-system-deps.sh`)")


def section(number: str) -> list:
    return [c for c in doc_commands() if c.section_number == number]


def script(lines: list[str], overrides: dict[str, str]) -> str:
    """The page's lines verbatim; after an `export` line that sets an overridden variable, the override."""
    out = ["set -euo pipefail", f"cd {shlex.quote(str(ROOT))}"]
    for line in lines:
        out.append(line)
        if line.startswith("export "):
            for var, value in overrides.items():
                if re.search(rf"(^|\s){var}=", line[len("export "):]):
                    out.append(f"export {var}={shlex.quote(value)}")
    return "\n".join(out) + "\n"


class Group:
    """A command in its own process group (session); stop() ends the whole group."""

    def __init__(self, argv: list[str], env: dict, log: Path, cwd: Path = ROOT):
        self.log_path = log
        self.log = open(log, "w")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def terminate(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):  # test servers: no need to linger
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader are still in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def wait_http(url: str, group: Group, what: str, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not group.alive():
            raise RuntimeError(f"{what} exited with {group.proc.returncode}:\n{group.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not answering {url} after {timeout} s:\n{group.tail()}")


def get_json(url: str, **params) -> dict:
    q = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(url + q, timeout=30) as r:
        return json.loads(r.read())


def post_json(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# ------------------------------------------------------------------------------------------- PostgreSQL


def postgres_bindir() -> Path | None:
    """Debian keeps the server binaries in /usr/lib/postgresql/<major>/bin (not on PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "pg_ctl").exists():
        return Path(initdb).resolve().parent
    return None


class LocalPostgres:
    """A throw-away PostgreSQL on 127.0.0.1 (password auth over TCP), stopped with `pg_ctl stop` on its dir."""

    user = "mlflow"
    password = "mlflow-test-pw"

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.port = free_port()
        # as root, under /tmp itself (not $TMPDIR): the postgres user must reach it
        self.dir = Path(tempfile.mkdtemp(prefix="mdt-pg-", dir="/tmp" if os.geteuid() == 0 else None))
        self.data = self.dir / "data"
        self.as_user: list[str] = []
        self.started = False
        owner = None
        if os.geteuid() == 0:  # initdb refuses to run as root: run the server as Debian's postgres user
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                unavailable("running as root but there is no `postgres` user to run PostgreSQL")
            owner = (pw.pw_uid, pw.pw_gid)
            os.chown(self.dir, *owner)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if owner:
            os.chown(pwfile, *owner)
        self._run("initdb", "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off -c full_page_writes=off",
                  "start")
        self.started = True

    def _run(self, tool: str, *args: str) -> None:
        r = subprocess.run([*self.as_user, str(self.bindir / tool), *args], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            log = self.dir / "server.log"
            raise RuntimeError(f"{tool} failed ({r.returncode}): {r.stdout[-2000:]} {r.stderr[-2000:]}"
                               + (log.read_text()[-2000:] if log.exists() else ""))

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password,
                                dbname=dbname, connect_timeout=10)

    def create_database(self, name: str) -> str:
        conn = self.connect()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.started:
            subprocess.run([*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                            "-w", "-t", "30", "stop"], capture_output=True, timeout=60)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------- the stack


def head_argv(doc_line: str, port: int, dashboard_port: int) -> list[str]:
    """Section 1's `ray start --head` with free ports for 6379 / 8265 and every other port explicit (Ray's fixed
    defaults clash with other Ray instances on a shared machine)."""
    argv = shlex.split(doc_line)
    assert argv[0] == "RAY_ADDRESS=127.0.0.1:6379", "the head's processes must be told their cluster"
    argv = argv[1:]                                            # the variable goes into the head's environment
    assert argv[:3] == ["ray", "start", "--head"] and "--port=6379" in argv and "--dashboard-port=8265" in argv
    assert "--temp-dir=/tmp/ray-mdt" in argv
    argv = [f"--port={port}" if a == "--port=6379" else f"--dashboard-port={dashboard_port}"
            if a == "--dashboard-port=8265" else f"--temp-dir=/tmp/ray-mdt-{port}" if a.startswith("--temp-dir=")
            else a for a in argv]
    argv += ray_port_args(port, dashboard_port)
    argv[0] = str(VENV_BIN / "ray")
    return argv


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    pytest.importorskip("psycopg2", reason="psycopg2-binary is in the `test` extra")
    bindir = postgres_bindir()
    if bindir is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    from moto.server import ThreadedMotoServer
    import boto3

    work = tmp_path_factory.mktemp("stack")
    s3_port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    moto.start()
    s3_endpoint = f"http://127.0.0.1:{s3_port}"
    cleanup: list = [moto.stop]
    try:
        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        for bucket in ("mdt-mlflow", "mdt-runs"):
            s3.create_bucket(Bucket=bucket)
        path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"

        # Ray: section 1's head; its processes run the jobs, so they get the S3 stand-in and the venv's python
        head_line = next(c.text for c in section("1") if "ray start --head" in c.text)
        port, dash = free_port(), free_port()
        head_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "MLFLOW_"))}
        head_env.update(S3_CREDS, **LOOPBACK, PATH=path, AWS_ENDPOINT_URL=s3_endpoint, RAY_AUTH_MODE="disabled",
                        RAY_ADDRESS=f"127.0.0.1:{port}",
                        RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
        head = Group(head_argv(head_line, port, dash), head_env, work / "ray-head.log")
        cleanup.append(lambda d=f"/tmp/ray-mdt-{port}": shutil.rmtree(d, ignore_errors=True))
        cleanup.append(head.stop)

        pg = LocalPostgres(bindir)
        cleanup.append(pg.stop)
        db_uri = pg.create_database("mlflow")

        # MLflow: section 5 of the page, placeholders replaced by the stand-ins
        mlflow_port = free_port()
        server_lines = [c.text for c in section("5")]
        start_at = next(i for i, line in enumerate(server_lines) if line == "infra/mlflow/start-server.sh")
        server_lines = server_lines[:start_at] + ["exec infra/mlflow/start-server.sh"]
        server_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        server_env.update(S3_CREDS, **LOOPBACK, PATH=path, MLFLOW_BIN=str(VENV_BIN / "mlflow"),
                          MLFLOW_S3_ENDPOINT_URL=s3_endpoint, MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(mlflow_port),
                          MLFLOW_WORKERS="1", MLFLOW_DISABLE_TELEMETRY="true")
        server_script = script(server_lines, {"MLFLOW_BACKEND_STORE_URI": db_uri,
                                              "MLFLOW_ARTIFACTS_DESTINATION": "s3://mdt-mlflow/team",
                                              "MLFLOW_SERVER_ALLOWED_HOSTS": "127.0.0.1:*,localhost:*"})
        mlflow = Group(["bash", "-c", server_script], server_env, work / "mlflow-server.log")
        cleanup.append(mlflow.stop)

        mlflow_url, dashboard_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{dash}"
        t_mlflow = wait_http(mlflow_url + "/health", mlflow, "mlflow server (start-server.sh)", 240)
        t_ray = wait_http(dashboard_url + "/api/version", head, "ray start --head", 120)
        wait_job_agent(dashboard_url)
        yield types.SimpleNamespace(work=work, s3=s3, s3_endpoint=s3_endpoint, pg=pg, mlflow=mlflow,
                                    mlflow_url=mlflow_url, head=head, dashboard_url=dashboard_url,
                                    startup={"mlflow_s": t_mlflow, "ray_s": t_ray})
    finally:
        t0 = time.time()
        for stop in cleanup:  # all process groups shut down at once, then each is waited for (or killed)
            if isinstance(getattr(stop, "__self__", None), Group):
                stop.__self__.terminate()
        for stop in reversed(cleanup):
            t1 = time.time()
            try:
                stop()
                print(f"  {getattr(stop, '__qualname__', stop)}: {time.time() - t1:.1f} s")
            except Exception as e:  # noqa: BLE001 - keep stopping the rest
                print(f"cleanup: {e!r}", file=sys.stderr)
        print(f"stack stopped in {time.time() - t0:.1f} s")


def wait_job_agent(dashboard_url: str, timeout: float = 90) -> None:
    """The head's job agent registers a little after the dashboard answers: submit a no-op until it is taken."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard_url)
    t0 = time.time()
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except Exception as e:  # noqa: BLE001 - "No available agent" and friends
            if time.time() - t0 > timeout:
                raise TimeoutError(f"no job agent on {dashboard_url}: {e}") from e
            time.sleep(2)
    while client.get_job_status(job) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.time() - t0 > timeout:
            raise TimeoutError("the no-op job did not finish")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def rehearsal(stack):
    """Section 1's commands after `ray start`, verbatim, against the stand-ins."""
    lines = [c.text for c in section("1") if "ray start --head" not in c.text]
    body = script(lines, {"RAY_ADDRESS": stack.dashboard_url, "OUT": "s3://mdt-runs/rehearsal",
                          "MLFLOW_TRACKING_URI": stack.mlflow_url})
    body += 'echo "MDT_RUN=$RUN"\n'
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env.update(**LOOPBACK, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="disabled")
    (stack.work / "rehearsal.sh").write_text(body)
    t0 = time.time()
    r = subprocess.run(["bash", "-c", body], env=env, cwd=ROOT, capture_output=True, text=True, timeout=480)
    out = r.stdout + r.stderr
    (stack.work / "rehearsal.log").write_text(out)
    assert r.returncode == 0, f"{out[-6000:]}\n--- ray head log:\n{stack.head.tail(2000)}"
    run = re.search(r"^MDT_RUN=(\S+)$", r.stdout, re.M).group(1)
    print(f"stack up: mlflow {stack.startup['mlflow_s']:.0f} s, ray {stack.startup['ray_s']:.0f} s; "
          f"section 1 commands {time.time() - t0:.0f} s")
    jobs = {name: get_json(f"{stack.dashboard_url}/api/jobs/{name}-{run}") for name in ("preprocess", "distill")}
    return types.SimpleNamespace(run=run, out=out, jobs=jobs, wall_s=time.time() - t0)


# ------------------------------------------------------------------------------------------- tests


def test_start_script_refuses_bad_stores(tmp_path):
    """The script is for the team server: a missing or non-PostgreSQL backend, or a non-S3 artifact store, is
    refused before anything starts."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MLFLOW_BIN": "/bin/false"}
    cases = [
        ({}, "MLFLOW_BACKEND_STORE_URI"),
        ({"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db", "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/p"}, "postgresql"),
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://u:p@h/db", "MLFLOW_ARTIFACTS_DESTINATION": "/tmp/a"}, "s3://"),
    ]
    for env, message in cases:
        r = subprocess.run(["bash", str(START_SCRIPT)], env={**base, **env}, capture_output=True, text=True,
                           timeout=30, cwd=tmp_path)
        assert r.returncode != 0 and message in r.stderr, (env, r.stderr)


def test_rehearsal_jobs_succeed_and_write_to_s3(stack, rehearsal):
    for name, job in rehearsal.jobs.items():
        assert job["status"] == "SUCCEEDED", (name, job.get("message"), rehearsal.out[-4000:])
    assert "Job 'distill-" in rehearsal.out and "SUCCEEDED" in rehearsal.out  # ray job logs --follow / list
    keys = [o["Key"] for page in stack.s3.get_paginator("list_objects_v2").paginate(
        Bucket="mdt-runs", Prefix="rehearsal/") for o in page.get("Contents", [])]
    shards = [k for k in keys if k.startswith("rehearsal/shards/") and k.endswith(".parquet")
              and "/ledger/" not in k]
    assert shards and "rehearsal/shards/manifest.json" in keys, keys
    ckpt = [k for k in keys if k.startswith(f"rehearsal/distill/rehearsal-{rehearsal.run}/")
            and "/checkpoint_" in k]
    assert ckpt, [k for k in keys if "/distill/" in k]


def test_distill_run_read_back_from_team_server(stack, rehearsal):
    """The distillation run, through MLflow's REST API; its artifacts in the bucket, its row in PostgreSQL."""
    url = stack.mlflow_url
    exp = get_json(url + "/api/2.0/mlflow/experiments/get-by-name", experiment_name="mdt-distill-ci")["experiment"]
    found = post_json(url + "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [exp["experiment_id"]],
        "filter": f"tags.mlflow.runName = 'rehearsal-{rehearsal.run}'"}).get("runs", [])
    assert len(found) == 1, found
    run_id = found[0]["info"]["run_id"]
    run = get_json(url + "/api/2.0/mlflow/runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED", run["info"]
    # the record a resubmission resumes from (docs, section 7) is in S3 beside the checkpoints
    rec = stack.s3.get_object(Bucket="mdt-runs", Key=f"rehearsal/distill/rehearsal-{rehearsal.run}/mlflow_run.json")
    assert json.loads(rec["Body"].read())["run_id"] == run_id

    params = {p["key"]: p["value"] for p in run["data"].get("params", [])}
    assert params.get("objective.name") == "flow_matching", sorted(params)[:40]
    assert params.get("name") == f"rehearsal-{rehearsal.run}"
    assert params.get("output") == "s3://mdt-runs/rehearsal/distill"
    metrics = {m["key"]: m for m in run["data"].get("metrics", [])}
    # the objective's total loss is logged at every log point; `loss_bin_<i>` only where a step drew a t in bin i
    assert "loss" in metrics, sorted(metrics)
    loss_keys = ["loss"]
    hist = get_json(url + "/api/2.0/mlflow/metrics/get-history", run_id=run_id, metric_key=loss_keys[0])["metrics"]
    assert len(hist) >= 2 and all(isinstance(m["value"], float) for m in hist), hist

    artifact_uri = run["info"]["artifact_uri"]
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri  # proxied: clients never see S3
    listing = get_json(url + "/api/2.0/mlflow/artifacts/list", run_id=run_id, path="config")
    paths = {f["path"] for f in listing.get("files", [])}
    assert "config/resolved.yaml" in paths, paths
    exp_id = run["info"]["experiment_id"]
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/"
                                "config/resolved.yaml", timeout=30) as r:
        served = r.read()
    assert b"flow_matching" in served

    # the artifacts really are in the bucket, under the configured prefix
    key = f"team/{exp_id}/{run_id}/artifacts/config/resolved.yaml"
    assert stack.s3.get_object(Bucket="mdt-mlflow", Key=key)["Body"].read() == served

    # and the run really is in PostgreSQL
    conn = stack.pg.connect("mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT status, artifact_uri FROM runs WHERE run_uuid = %s", (run_id,))
            status, db_artifact_uri = cur.fetchone()
            cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = %s", (run_id, loss_keys[0]))
            (n_metric_rows,) = cur.fetchone()
    finally:
        conn.close()
    assert (status, db_artifact_uri) == ("FINISHED", artifact_uri)
    assert n_metric_rows == len(hist)


def test_estimate_from_the_rehearsal_report(stack, rehearsal, tmp_path):
    """Section 9: copy the preprocessing run's reports out of S3 (the page uses `aws s3 cp --recursive`; boto3
    here) and run `python infra/estimate.py --report .../report.json --spot` on the measured figures."""
    prefix = "rehearsal/shards/runs/"
    objs = [o["Key"] for o in stack.s3.list_objects_v2(Bucket="mdt-runs", Prefix=prefix).get("Contents", [])]
    assert any(k.endswith("/report.json") for k in objs), objs
    for k in objs:
        dest = tmp_path / "bench-runs" / k[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        stack.s3.download_file("mdt-runs", k, str(dest))
    report = next((tmp_path / "bench-runs").glob("*/report.json"))
    line = next(c.text for c in section("9") if "--report" in c.text)
    argv = shlex.split(line.replace("bench-runs/RUN_ID/report.json", str(report)))
    r = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ", spot," in r.stdout and "assets/h" in r.stdout
    assert "(PLACEHOLDER)" not in r.stdout.split("- per asset")[0], r.stdout  # measured stages, not placeholders
