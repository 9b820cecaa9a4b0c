"""The deployment files of infra/ and the commands of docs/scaling-out.md, checked offline (no Docker engine, no
cloud, no cluster):

- `python infra/validate.py` on every deployment file: the Ray cluster launcher config against the JSON schema
  inside the installed `ray` package and Ray's own config checks; the KubeRay RayCluster / RayJob manifests
  (KubeRay v1 fields, Kubernetes' schemas for the pod templates, GPU resources, node selectors, Secrets and the
  MLflow ConfigMap) with the RayJob entrypoints parsed by the jobs' own argument parsers and config loaders;
  the Dockerfiles' structure (CUDA 12, Python 3.11, non-root user, versions = pyproject's pins, no secrets).
- hadolint on the Dockerfiles, shellcheck on the shell scripts (binaries from the `test` extra's wheels).
- Broken copies of each file are rejected (a validator that accepts everything would pass the first test).
- Every command of docs/scaling-out.md is covered: run here, run by tests/test_infra_stack.py against local
  stand-ins, or (for docker / aws / kubectl / ray up, which need a cloud) parsed by the real CLI where one is
  installed and the files it takes validated.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from infra import validate  # noqa: E402
from infra.doc_commands import Command, commands, doc_commands  # noqa: E402

VENV_BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DOCKERFILES = [ROOT / "infra" / "docker" / "Dockerfile", ROOT / "infra" / "mlflow" / "Dockerfile"]
SHELL_SCRIPTS = [ROOT / "infra" / "mlflow" / "start-server.sh", ROOT / "infra" / "ci" / "install-system-deps.sh"]
# values for the page's placeholders and for the variables its commands expect in the environment
DOC_ENV = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "example", "HF_TOKEN": "example",
           "MLFLOW_DB_URI": "postgresql://mlflow:pw@db:5432/mlflow"}


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        reason = f"{name} not found (the `test` extra installs it on Linux x86-64)"
        if IN_CI:
            pytest.fail(reason + " (CI is set, so this is an error)")
        pytest.skip(reason)
    return path


def errors_of(path: Path) -> list[str]:
    rep = validate.validate_file(path)
    return rep.errors


# ------------------------------------------------------------------------------------------- the files pass


@pytest.mark.slow
def test_validate_cli_passes_on_the_repository():
    r = subprocess.run([sys.executable, "infra/validate.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok  ") == len(validate.DEFAULT_FILES), r.stdout
    assert "does not exist yet" not in r.stdout  # both jobs exist: their entrypoints were really parsed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(dockerfile):
    hadolint = tool("hadolint")
    r = subprocess.run([hadolint, "--config", "infra/docker/hadolint.yaml", str(dockerfile.relative_to(ROOT))],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_rejects_a_broken_dockerfile(tmp_path):
    hadolint = tool("hadolint")
    broken = tmp_path / "Dockerfile"
    text = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    # `cd` in RUN (DL3003) and an apt-get install without --no-install-recommends (DL3015)
    broken.write_text(text.replace("WORKDIR /build\n", "RUN cd /build && apt-get install -y vim\n"))
    r = subprocess.run([hadolint, "--config", str(ROOT / "infra" / "docker" / "hadolint.yaml"), str(broken)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "DL3003" in r.stdout, r.stdout


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    shellcheck = tool("shellcheck")
    r = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_ray_schema_is_the_one_shipped_with_ray():
    import ray

    schema = validate.ray_schema()
    assert "available_node_types" in schema["properties"] and "provider" in schema["required"]
    cfg = yaml.safe_load((ROOT / "infra" / "ray" / "aws-cluster.yaml").read_text())
    import jsonschema

    jsonschema.validate(cfg, schema)  # what `ray up` runs first
    assert ray.__version__ == validate.exact_pin(validate.project()["pins"]["ray"])


def test_rayjob_entrypoints_parse_with_the_jobs_own_parsers():
    """The RayJobs' entrypoints, parsed by jobs/preprocess.py's and jobs/distill.py's own `parse_args` and
    resolved by their `build_config` (presets + --set overrides), exactly as the job would on the cluster."""
    import jobs.distill
    import jobs.preprocess

    def entry(name):
        doc = yaml.safe_load((ROOT / "infra" / "kuberay" / name).read_text())
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] == "python" and argv[1].startswith("/home/ray/mdt/jobs/")  # the image's code (Dockerfile)
        return argv[2:]

    args = jobs.preprocess.parse_args(entry("rayjob-preprocess.yaml"))
    cfg = jobs.preprocess.build_config(args)
    assert cfg.output == "s3://BUCKET_NAME/trellis500k" and cfg.sources.specs == ["objaverse-xl:sketchfab"]
    assert cfg.resources["render"].concurrency == 160 and cfg.download.cache_uri == "s3://BUCKET_NAME/cache"

    args = jobs.distill.parse_args(entry("rayjob-distill.yaml"))
    cfg = jobs.distill.build_config(args)
    assert (cfg.name, cfg.output, cfg.data.uri) == ("trellis-ss-mdt", "s3://BUCKET_NAME/distill",
                                                    "s3://BUCKET_NAME/trellis500k")
    assert cfg.scaling.num_workers == 16 and cfg.stage == "ss"
    # 16 workers = the train-gpu group's maxReplicas x GPUs per pod
    doc = yaml.safe_load((ROOT / "infra" / "kuberay" / "rayjob-distill.yaml").read_text())
    group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert group["maxReplicas"] * gpus >= cfg.scaling.num_workers


# ------------------------------------------------------------------------------------------- broken files fail


def _set(doc, path, value):
    *head, last = path
    for k in head:
        doc = doc[k]
    if value is _DELETE:
        del doc[last]
    else:
        doc[last] = value


_DELETE = object()
GPU_GROUP = ("spec", "workerGroupSpecs", 1, "template", "spec")
HEAD_ENV = ("spec", "headGroupSpec", "template", "spec", "containers", 0, "env")

# (file, description, mutation of the loaded YAML or of the text, a fragment of the expected error)
YAML_MUTATIONS = [
    ("infra/ray/aws-cluster.yaml", "misspelt top-level key",
     lambda d: d.update(max_worker=d.pop("max_workers")), "ray-schema"),
    ("infra/ray/aws-cluster.yaml", "head type that does not exist",
     lambda d: d.update(head_node_type="gpu-head"), "ray:"),
    ("infra/ray/aws-cluster.yaml", "worker with a string max_workers",
     lambda d: _set(d, ("available_node_types", "train-gpu", "max_workers"), "two"), "ray-schema"),
    ("infra/ray/aws-cluster.yaml", "no instance profile",
     lambda d: _set(d, ("available_node_types", "render-gpu", "node_config", "IamInstanceProfile"), _DELETE),
     "IamInstanceProfile"),
    ("infra/ray/aws-cluster.yaml", "AWS keys in a setup command",
     lambda d: d.update(setup_commands=["export AWS_SECRET_ACCESS_KEY=abc"]), "credentials"),
    ("infra/ray/aws-cluster.yaml", "an image of another version",
     lambda d: d["docker"].update(image="ACCOUNT_ID.dkr.ecr.us-west-2.amazonaws.com/mdt-orchestrator:0.0.9"),
     "project version"),
    ("infra/kuberay/raycluster.yaml", "GPU group without nodeSelector",
     lambda d: _set(d, GPU_GROUP + ("nodeSelector",), _DELETE), "nodeSelector"),
    ("infra/kuberay/raycluster.yaml", "GPU group without GPUs requested",
     lambda d: _set(d, GPU_GROUP + ("containers", 0, "resources", "requests", "nvidia.com/gpu"), "2"),
     "nvidia.com/gpu requests"),
    ("infra/kuberay/raycluster.yaml", "MLflow URI as a literal instead of the ConfigMap",
     lambda d: _set(d, HEAD_ENV + (3,), {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow:5000"}),
     "ConfigMap"),
    ("infra/kuberay/raycluster.yaml", "AWS key as a literal instead of the Secret",
     lambda d: _set(d, HEAD_ENV + (1,), {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), "Secret"),
    ("infra/kuberay/raycluster.yaml", "misspelt pod field (Kubernetes schema)",
     lambda d: _set(d, GPU_GROUP + ("nodeSelecter",), {"a": "b"}), "schema"),
    ("infra/kuberay/raycluster.yaml", "misspelt KubeRay field",
     lambda d: d["spec"].update(workerGroupSpec=d["spec"]["workerGroupSpecs"]), "unknown field"),
    ("infra/kuberay/raycluster.yaml", "non-string rayStartParams",
     lambda d: _set(d, ("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0), "must be a string"),
    ("infra/kuberay/raycluster.yaml", "rayVersion that is not the pin",
     lambda d: _set(d, ("spec", "rayVersion"), "2.9.0"), "rayVersion"),
    ("infra/kuberay/rayjob-distill.yaml", "entrypoint with an unknown flag",
     lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " --objectve mdt"), "rejects its arguments"),
    ("infra/kuberay/rayjob-distill.yaml", "entrypoint with a preset that does not exist",
     lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace("trellis-ss", "trellis-xx")), "config"),
    ("infra/kuberay/rayjob-preprocess.yaml", "entrypoint overriding a key that does not exist",
     lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"].replace("render.concurrency",
                                                                           "render.concurency")), "config"),
    ("infra/kuberay/rayjob-preprocess.yaml", "cluster kept after the job",
     lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes"),
    ("infra/mlflow/k8s.yaml", "Deployment with a non-integer replica count",
     lambda d: _set(d, ("spec", "replicas"), "one"), "schema"),
    ("infra/mlflow/compose.yaml", "literal database password",
     lambda d: d["services"]["postgres"]["environment"].update(POSTGRES_PASSWORD="hunter2"), "literal"),
    ("infra/mlflow/compose.yaml", "MLflow on SQLite",
     lambda d: d["services"]["mlflow"]["environment"].update(MLFLOW_BACKEND_STORE_URI="sqlite:///m.db"),
     "postgresql"),
]
TEXT_MUTATIONS = [
    ("infra/docker/Dockerfile", "runs as root", lambda t: t.replace("USER 1000:100", "USER root"), "non-root"),
    ("infra/docker/Dockerfile", "torch not the pin",
     lambda t: t.replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0"), "TORCH_VERSION"),
    ("infra/docker/Dockerfile", "Python 3.12",
     lambda t: t.replace("ARG PYTHON_VERSION=3.11", "ARG PYTHON_VERSION=3.12"), "PYTHON_VERSION"),
    ("infra/docker/Dockerfile", "CUDA 11", lambda t: t.replace("ARG CUDA_VERSION=12.8.1", "ARG CUDA_VERSION=11.8.0"),
     "CUDA"),
    ("infra/docker/Dockerfile", "no cuda extra", lambda t: t.replace(" --extra cuda", ""), "--extra cuda"),
    ("infra/docker/Dockerfile", "a token baked in",
     lambda t: t.replace("ENV DEBIAN_FRONTEND=noninteractive \\\n    LANG",
                         "ENV HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyzABCDEFGH \\\n    LANG"), "credentials"),
    ("infra/docker/Dockerfile", "the base image's entrypoint kept", lambda t: t.replace("ENTRYPOINT []\n", ""),
     "entrypoint"),
    ("infra/mlflow/Dockerfile", "MLflow not the pin",
     lambda t: t.replace("ARG MLFLOW_VERSION=3.17.2", "ARG MLFLOW_VERSION=3.1.0"), "MLFLOW_VERSION"),
    (".dockerignore", "the venv in the build context", lambda t: t.replace("\n.venv\n", "\n"), ".venv"),
    (".dockerignore", "the code left out", lambda t: t + "jobs\n", "jobs/preprocess.py"),
]


def _copy_path(tmp_path: Path, rel: str) -> Path:
    # keep the file name (the validator tells the kind by it) and "mlflow" in the path of the MLflow Dockerfile
    dest = tmp_path / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest


@pytest.mark.parametrize("rel,what,mutate,expected", YAML_MUTATIONS, ids=[f"{m[0]}: {m[1]}" for m in YAML_MUTATIONS])
def test_validator_rejects_broken_yaml(tmp_path, rel, what, mutate, expected):
    src = ROOT / rel
    docs = [d for d in yaml.safe_load_all(src.read_text()) if d is not None]
    assert not errors_of(src)
    doc = copy.deepcopy(docs[0])
    mutate(doc)
    dest = _copy_path(tmp_path, rel)
    dest.write_text(yaml.safe_dump_all([doc, *docs[1:]], sort_keys=False))
    errs = errors_of(dest)
    assert errs, f"{what}: the validator accepted the broken file"
    assert any(expected in e for e in errs), errs


@pytest.mark.parametrize("rel,what,mutate,expected", TEXT_MUTATIONS, ids=[f"{m[0]}: {m[1]}" for m in TEXT_MUTATIONS])
def test_validator_rejects_broken_text(tmp_path, rel, what, mutate, expected):
    text = (ROOT / rel).read_text()
    broken = mutate(text)
    assert broken != text, f"{what}: the mutation did not apply"
    dest = _copy_path(tmp_path, rel)
    dest.write_text(broken)
    errs = errors_of(dest)
    assert any(expected in e for e in errs), (what, errs)


def test_validate_cli_exits_1_on_a_broken_file(tmp_path):
    cfg = yaml.safe_load((ROOT / "infra" / "ray" / "aws-cluster.yaml").read_text())
    cfg["available_node_types"]["train-gpu"]["min_workers"] = -1
    broken = tmp_path / "cluster.yaml"
    broken.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, str(ROOT / "infra" / "validate.py"), str(broken)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "FAIL" in r.stdout and "min_workers" in r.stderr, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------- the page's commands


def estimate_block(text: str) -> str:
    m = re.search(r"<!-- estimate:begin[^>]*-->\n```text\n(.*?)```\n<!-- estimate:end -->", text, re.S)
    assert m, "the estimate block markers are missing from docs/scaling-out.md"
    return m.group(1)


def test_estimate_output_matches_the_docs():
    r = subprocess.run([sys.executable, "infra/estimate.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = (ROOT / "docs" / "scaling-out.md").read_text()
    assert r.stdout.strip() == estimate_block(doc).strip(), "re-run `python infra/estimate.py` and paste its output"


class DocChecker:
    """Checks one command of the page; `check(cmd)` returns how it is covered or raises AssertionError."""

    STACK = "run verbatim by tests/test_infra_stack.py against local stand-ins"

    def __init__(self, workdir: Path, all_commands: list[Command]):
        self.workdir = workdir
        (workdir / "infra").symlink_to(ROOT / "infra")
        (workdir / "jobs").symlink_to(ROOT / "jobs")
        self.env = self._doc_env([c.text for c in all_commands if c.text.startswith("export ")])
        self.produced: dict[str, Path] = {}
        self.rules = [
            (r"^export ", self.export),
            (r"^(RAY_ADDRESS=\S+ )?ray start --head ", self.section1),
            (r"^ray job submit ", self.job_submit),
            (r"^ray job (status|logs|list) ", self.section1),
            (r"^ray (up|down|dashboard) ", self.ray_cluster_cli),
            (r"^sed ", self.sed),
            (r"^python infra/validate\.py ", self.run_here),
            (r"^python infra/estimate\.py$", self.run_here),
            (r"^python infra/estimate\.py --report ", self.stack),
            (r"^python infra/estimate\.py --bench ", self.estimate_bench),
            (r"^infra/mlflow/start-server\.sh$", self.stack),
            (r"^aws s3 cp --recursive ", self.stack),
            (r"^docker build ", self.docker_build),
            (r"^docker push ", self.external),
            (r"^aws ecr get-login-password .*\| docker login ", self.external),
            (r"^docker compose -f ", self.compose),
            (r"^kubectl apply -f ", self.kubectl_apply),
            (r"^kubectl -n mdt create secret generic ", self.kubectl_secret),
            (r"^kubectl -n mdt get rayjob ", self.kubectl_get_rayjob),
            (r"^kubectl -n mdt port-forward ", self.kubectl_port_forward),
        ]
        self.manifests = []
        for rel in validate.DEFAULT_FILES:
            if rel.endswith(".yaml") and ("kuberay" in rel or rel.endswith("k8s.yaml")):
                self.manifests += [d for d in yaml.safe_load_all((ROOT / rel).read_text()) if d]

    def _doc_env(self, exports: list[str]) -> dict[str, str]:
        base = {**os.environ, **DOC_ENV}
        r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + "\n".join(exports) + "\nenv -0"], env=base,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return dict(kv.split("=", 1) for kv in r.stdout.split("\0") if "=" in kv)

    def argv(self, text: str) -> list[str]:
        """The command's words as bash expands them (quotes, $VARS) with the page's exports in effect."""
        r = subprocess.run(["bash", "-c", "set -u; printf '%s\\0' " + text], env=self.env, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.split("\0")[:-1]

    def check(self, cmd: Command) -> str:
        for rx, fn in self.rules:
            if re.search(rx, cmd.text):
                return fn(cmd)
        raise AssertionError(f"line {cmd.line}: no check covers `{cmd.text}`")

    # ---- rules

    def export(self, cmd):
        r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + cmd.text], env=self.env, capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return "run here"

    def section1(self, cmd):
        assert cmd.section_number == "1", f"line {cmd.line}: only section 1's commands are run by the stack test"
        return self.STACK

    STACK_EXERCISES = {  # command prefix -> what tests/test_infra_stack.py does with it, and a marker in its code
        "infra/mlflow/start-server.sh": ("run verbatim (section 5's block) by tests/test_infra_stack.py",
                                         'section("5")'),
        "python infra/estimate.py --report": ("run by tests/test_infra_stack.py on the rehearsal's real report",
                                              "bench-runs/RUN_ID/report.json"),
        "aws s3 cp --recursive": ("emulated by tests/test_infra_stack.py: the same prefix downloaded with boto3 "
                                  "(no AWS CLI in the environment)", "download_file"),
    }

    def stack(self, cmd):
        stack_test = (ROOT / "tests" / "test_infra_stack.py").read_text()
        how, marker = next(v for k, v in self.STACK_EXERCISES.items() if cmd.text.startswith(k))
        assert marker in stack_test, f"{cmd.text}: not exercised by tests/test_infra_stack.py"
        return how

    def job_submit(self, cmd):
        from ray.scripts.scripts import cli

        argv = self.argv(cmd.text)
        ctx = cli.commands["job"].commands["submit"].make_context("submit", argv[3:])  # raises on a bad flag
        assert ctx.params["working_dir"] == "." and ctx.params["address"], ctx.params
        entry = shlex.join(ctx.params["entrypoint"])
        rep = validate.check_entrypoint(entry, f"line {cmd.line}")
        assert rep.ok, rep.errors
        assert not rep.notes or all("build_parser" in n for n in rep.notes), rep.notes
        if cmd.section_number == "1":
            return self.STACK
        return "flags parsed by Ray's CLI; entrypoint parsed and resolved by the job's own code"

    def ray_cluster_cli(self, cmd):
        from ray.scripts.scripts import cli

        argv = self.argv(cmd.text)
        ctx = cli.commands[argv[1]].make_context(argv[1], argv[2:])
        cfg = ctx.params["cluster_config_file"]
        assert cfg in self.produced, f"{cfg}: not produced by a sed line of the page before this command"
        assert not validate.validate_file(self.produced[cfg]).errors
        return "flags parsed by Ray's CLI; its cluster file validated"

    def sed(self, cmd):
        m = re.fullmatch(r"(sed .*?)\s*(?:> (\S+)|\| kubectl apply -f -)", cmd.text)
        assert m, f"line {cmd.line}: expected `sed ... > FILE` or `sed ... | kubectl apply -f -`"
        sed, out = m.group(1), m.group(2) or f"applied-{cmd.line}.yaml"
        src = self.argv(sed)[-1]
        out_path = self.workdir / out
        r = subprocess.run(["bash", "-c", f"set -euo pipefail; {sed} > {shlex.quote(str(out_path))}"], env=self.env,
                           cwd=self.workdir, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        text = out_path.read_text()
        assert "ACCOUNT_ID" not in text and "BUCKET_NAME" not in text, f"{src}: placeholders left after {sed}"
        if "kubectl" in cmd.text and src.endswith(".yaml") and "kuberay" in src:
            out_path = out_path.rename(self.workdir / Path(src).name)  # the validator tells the kind by name
        rep = validate.validate_file(out_path)
        assert rep.ok, rep.errors
        self.produced[out] = out_path
        return "run here; its output validated"

    def run_here(self, cmd):
        argv = self.argv(cmd.text)
        r = subprocess.run([sys.executable, *argv[1:]], cwd=self.workdir, env=self.env, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return "run here"

    def estimate_bench(self, cmd):
        """`--bench FILE` on a bench.json in the format pipelines/preprocess/bench.py writes (a list of configurations)."""
        path = self.workdir / self.argv(cmd.text)[3]
        path.parent.mkdir(parents=True, exist_ok=True)
        stages = {"download": 0.5, "render": 12.0, "voxelize": 3.0, "features": 1.0, "encode": 2.0, "write": 0.02}
        path.write_text(json.dumps([
            {"workers": 1, "assets": 8, "wall_s": 100.0, "stage_mean_s": stages},
            {"workers": 2, "assets": 8, "wall_s": 60.0, "stage_mean_s": {k: 2 * v for k, v in stages.items()}}]))
        self.run_here(cmd)
        r = subprocess.run([sys.executable, *self.argv(cmd.text)[1:], "--json"], cwd=self.workdir, env=self.env,
                           capture_output=True, text=True, timeout=120)
        est = json.loads(r.stdout)
        assert est["seconds"] == stages and "render" not in est["placeholders"], est  # the 1-worker figures
        return "run here on a bench.json in the benchmark's format"

    def docker_build(self, cmd):
        argv = self.argv(cmd.text)
        dockerfile = argv[argv.index("-f") + 1]
        assert argv[-1] == "." and dockerfile in validate.DEFAULT_FILES, argv  # context: the repository root
        assert validate.image_tag(argv[argv.index("-t") + 1]) == validate.project()["version"]
        return "not runnable here (no Docker engine): the Dockerfile is validated and linted by hadolint"

    def external(self, cmd):
        return "not runnable here (registry credentials): nothing to check beyond the image name"

    def compose(self, cmd):
        argv = self.argv(cmd.text)
        path = argv[argv.index("-f") + 1]
        assert path in validate.DEFAULT_FILES and argv[-2:] == ["up", "-d"], argv
        return "not runnable here (no Docker engine): the compose file is validated"

    def kubectl_apply(self, cmd):
        path = self.argv(cmd.text)[-1]
        assert path in validate.DEFAULT_FILES, path
        return "not runnable here (no cluster): the manifest is validated"

    def kubectl_secret(self, cmd):
        argv = self.argv(cmd.text)
        name = argv[argv.index("generic") + 1]
        keys = {a.removeprefix("--from-literal=").split("=", 1)[0] for a in argv if a.startswith("--from-literal=")}
        referenced = set()
        for obj in self._walk(self.manifests):
            ref = obj.get("secretKeyRef") if isinstance(obj, dict) else None
            if ref and ref.get("name") == name:
                referenced.add(ref["key"])
        assert referenced and referenced <= keys, f"Secret {name}: manifests use keys {referenced}, created {keys}"
        return "not runnable here (no cluster): the Secret's name and keys are those the manifests reference"

    def kubectl_get_rayjob(self, cmd):
        name = self.argv(cmd.text)[5]
        assert any(m.get("kind") == "RayJob" and m["metadata"]["name"] == name and m["metadata"].get("namespace")
                   == "mdt" for m in self.manifests), name
        return "not runnable here (no cluster): a RayJob of that name is in the manifests"

    def kubectl_port_forward(self, cmd):
        argv = self.argv(cmd.text)
        svc, ports = argv[argv.index("port-forward") + 1], argv[argv.index("port-forward") + 2]
        local, remote = ports.split(":")
        name = svc.removeprefix("service/")
        if name.endswith("-head-svc"):  # KubeRay names the head service <RayCluster>-head-svc
            cluster = [m for m in self.manifests if m.get("kind") == "RayCluster"
                       and m["metadata"]["name"] == name.removesuffix("-head-svc")]
            assert cluster, name
            ports_ = cluster[0]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
            assert int(remote) in [p["containerPort"] for p in ports_], ports_
        else:
            svcs = [m for m in self.manifests if m.get("kind") == "Service" and m["metadata"]["name"] == name]
            assert svcs and int(remote) in [p["port"] for p in svcs[0]["spec"]["ports"]], name
        return "not runnable here (no cluster): the service and port exist in the manifests"

    @staticmethod
    def _walk(x):
        yield x
        if isinstance(x, dict):
            for v in x.values():
                yield from DocChecker._walk(v)
        elif isinstance(x, list):
            for v in x:
                yield from DocChecker._walk(v)


def test_every_command_of_the_scaling_out_page_is_covered(tmp_path):
    cmds = doc_commands()
    assert len(cmds) > 30 and any(c.text.startswith("ray job submit") for c in cmds)
    checker = DocChecker(tmp_path, cmds)
    coverage, failures = [], []
    for c in cmds:
        try:
            coverage.append((c.line, checker.check(c), c.text[:80]))
        except AssertionError as e:
            failures.append(f"line {c.line}: {c.text[:100]}\n    {e}")
    print("\n".join(f"{line:4d} {how}: {text}" for line, how, text in coverage))
    assert not failures, "\n".join(failures)
    # the stack test really takes its commands from the page
    stack_test = (ROOT / "tests" / "test_infra_stack.py").read_text()
    assert 'section("1")' in stack_test and 'section("5")' in stack_test


@pytest.mark.parametrize("line,expected", [
    ("curl -fsSL https://example.com/install.sh | bash", "no check covers"),
    ('ray job submit --address "$RAY_ADDRESS" --workdir . -- python jobs/distill.py --preset ci', "workdir"),
    ('ray job submit --address "$RAY_ADDRESS" --working-dir . -- python jobs/distill.py --preset nope', "config"),
    ('ray job submit --address "$RAY_ADDRESS" --working-dir . -- python jobs/preprocess.py --sauce x', "rejects"),
    ("kubectl -n mdt create secret generic mdt-aws --from-literal=access-key=x --from-literal=secret=y", "keys"),
    ("kubectl -n mdt port-forward service/mlflow 5000:8080", "mlflow"),
], ids=["unknown command", "bad ray flag", "bad preset", "bad job flag", "wrong secret keys", "wrong port"])
def test_doc_checker_rejects_broken_commands(tmp_path, line, expected):
    page = f"## 3. Somewhere\n\n```bash\nexport RAY_ADDRESS=http://127.0.0.1:8265\n{line}\n```\n"
    cmds = commands(page)
    checker = DocChecker(tmp_path, cmds)
    checker.check(cmds[0])
    with pytest.raises(Exception) as e:
        checker.check(cmds[1])
    assert expected in str(e.value), str(e.value)


def test_estimate_synthesize_cost_model():
    """The data-free line: GPU-s per image = GPUs per actor x K x (NFE_ss + NFE_slat) x s per evaluation, with the
    trellis synthesize preset's 1 sample and TRELLIS's 25 steps with CFG on t in [0.5, 1] at rescale_t 3 = 44
    evaluations per flow (19 steps inside the interval count two: the time grid t_i = 3s / (1 + 2s), s = i / 25)."""
    s = [i / 25 for i in range(25, 0, -1)]
    nfe = sum(2 if 0.5 <= 3 * x / (1 + 2 * x) <= 1 else 1 for x in s)
    assert nfe == 44
    r = subprocess.run([sys.executable, "infra/estimate.py", "--json", "--synth-eval-s", "0.1", "--assets", "1000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    syn = out["synthesize"]
    assert syn["nfe"] == {"ss": nfe, "slat": nfe} and syn["samples_per_image"] == 1
    assert syn["gpu_s_per_image"] == pytest.approx(1 * 1 * 2 * nfe * 0.1)
    assert syn["gpu_h"] == pytest.approx(1000 * 2 * nfe * 0.1 / 3600)
    assert syn["wall_h"] == pytest.approx(1000 * 2 * nfe * 0.1 / 96 / 3600 / 0.8)
    assert out["gpu_h_total"] == pytest.approx(1000 * out["gpu_s_per_asset"] / 3600)
    assert "synthesize" not in out["placeholders"]
    default = json.loads(subprocess.run([sys.executable, "infra/estimate.py", "--json"], cwd=ROOT,
                                        capture_output=True, text=True, timeout=120).stdout)
    assert "synthesize" in default["placeholders"]
