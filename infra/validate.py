#!/usr/bin/env python3
"""Validate the deployment files of infra/ (or edited copies of them) before they reach a cloud.

    python infra/validate.py                          # every deployment file of the repository
    python infra/validate.py cluster.yaml job.yaml    # given files; the kind is told by name or content

What is checked (no cloud, no cluster, no Docker engine needed):

- Ray cluster launcher configs: the JSON schema that ships inside the installed `ray` package
  (ray/autoscaler/ray-schema.json) with jsonschema; Ray's own checks after its defaults are filled in (what
  `ray up` runs before it touches the cloud); project rules (the project's image, a head that runs no tasks,
  GPU worker types for rendering and for training, S3 through instance profiles, no credentials).
- KubeRay RayCluster / RayJob: apiVersion ray.io/v1 and the fields of KubeRay's v1 API types, head and
  worker group specs, pod templates against Kubernetes' own schemas (kubernetes-validate), GPU resources,
  node selectors and tolerations, credentials from Secrets, the MLflow URI from a ConfigMap, and RayJob
  entrypoints parsed by the job's own argument parser and config loader (jobs/preprocess.py, jobs/distill.py).
- Other Kubernetes objects (Deployment, Service, ConfigMap, ...): Kubernetes' schemas.
- Dockerfiles: Ray's image conventions (no ENTRYPOINT, non-root user with a home, `ray` on PATH), versions
  equal to pyproject.toml's pins, no credentials; .dockerignore; the MLflow compose file.

Exit status 0 when every file passes, 1 otherwise (one line per problem), 2 for a file it cannot read.
Notes (e.g. a job script that does not exist yet) are printed but do not fail the run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.33"  # Kubernetes schema version the manifests are checked against (EKS/GKE supported)

DEFAULT_FILES = [
    "infra/ray/aws-cluster.yaml",
    "infra/kuberay/common.yaml",
    "infra/kuberay/raycluster.yaml",
    "infra/kuberay/rayjob-preprocess.yaml",
    "infra/kuberay/rayjob-distill.yaml",
    "infra/mlflow/k8s.yaml",
    "infra/mlflow/compose.yaml",
    "infra/docker/Dockerfile",
    "infra/mlflow/Dockerfile",
    ".dockerignore",
]


@dataclasses.dataclass
class Report:
    errors: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def extend(self, other: "Report") -> "Report":
        self.errors += other.errors
        self.notes += other.notes
        return self

    @property
    def ok(self) -> bool:
        return not self.errors


# ------------------------------------------------------------------------------------------- project facts


def project() -> dict[str, Any]:
    """Version and dependency pins from pyproject.toml: {'version', 'python', 'pins': {name: spec}}."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    proj = data["project"]
    reqs = list(proj["dependencies"])
    for extra in proj.get("optional-dependencies", {}).values():
        reqs += extra
    pins: dict[str, str] = {}
    for r in reqs:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*([^;]*)", r)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(3).strip()
    return {"version": proj["version"], "python": proj.get("requires-python", ""), "pins": pins}


def exact_pin(spec: str) -> str | None:
    m = re.fullmatch(r"==\s*([^,\s]+)", spec.strip())
    return m.group(1) if m else None


def image_tag(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


# ------------------------------------------------------------------------------------------- credentials

_TOKEN_PATTERNS = [
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), "a Hugging Face token"),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), "a GitHub token"),
    (re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}\b"), "an AWS secret key"),
]
_SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|access_key|private_key|api_key)")


def find_secrets(text: str) -> list[str]:
    """Literal credentials in a text (known token formats, and key=value / key: value with a literal value)."""
    found = [f"contains {what}" for rx, what in _TOKEN_PATTERNS if rx.search(text)]
    for m in re.finditer(r"(?m)^\s*(?:ENV\s+|ARG\s+|export\s+|-\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*[=:]\s*(\S.*)$", text):
        name, value = m.group(1), m.group(2).strip().strip("'\"")
        if not _SECRET_NAME.search(name) or name.lower().endswith(("_file", "_ref", "keyref")):
            continue
        if not value or value.startswith(("$", "{", "[", "#")) or value in ("true", "false", "null"):
            continue  # a reference, a mapping (valueFrom), a flag or nothing
        found.append(f"sets {name} to a literal value")
    return found


# ------------------------------------------------------------------------------------------- Ray launcher


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def check_cluster_config(cfg: Any) -> Report:
    rep = Report()
    if not isinstance(cfg, dict):
        rep.errors.append("cluster config: not a mapping")
        return rep
    import jsonschema

    # 1. the schema Ray ships (the one `ray up` validates against)
    validator = jsonschema.Draft7Validator(ray_schema())
    for e in sorted(validator.iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in e.absolute_path) or "<root>"
        rep.errors.append(f"ray-schema: {where}: {e.message}")
    if rep.errors:
        return rep
    # 2. Ray's own checks, after its defaults for the provider are merged in
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config

        quiet = logging.getLogger("ray.autoscaler")
        level, quiet.level = quiet.level, logging.WARNING  # "setting max workers for head node type to 0"
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                validate_config(prepare_config(copy.deepcopy(cfg)))
        finally:
            quiet.level = level
    except Exception as e:  # noqa: BLE001 - any rejection is a finding
        rep.errors.append(f"ray: {type(e).__name__}: {e}")
    # 3. the project's rules
    proj = project()
    image = (cfg.get("docker") or {}).get("image", "")
    if "mdt-orchestrator" not in image:
        rep.errors.append(f"docker.image {image!r} is not the project's image (…/mdt-orchestrator:<version>)")
    elif image_tag(image) != proj["version"]:
        rep.errors.append(f"docker.image tag {image_tag(image)!r} != project version {proj['version']!r}")
    types_ = cfg.get("available_node_types") or {}
    head = types_.get(cfg.get("head_node_type"), {})
    if (head.get("resources") or {}).get("CPU") != 0:
        rep.errors.append("the head node type must advertise CPU: 0 (drivers only, no tasks on the head)")
    gpu_types = {n: t for n, t in types_.items() if (t.get("resources") or {}).get("GPU", 0) > 0}
    for want in ("render-gpu", "train-gpu"):
        if want not in gpu_types:
            rep.errors.append(f"no GPU worker type {want!r} (resources with GPU > 0)")
    for name, t in gpu_types.items():
        if not any(k.startswith("accelerator_type:") for k in t.get("resources", {})):
            rep.errors.append(f"{name}: declare resources 'accelerator_type:<GPU>' so work can be steered to it")
        if t.get("max_workers", 0) < 1:
            rep.errors.append(f"{name}: max_workers must be >= 1 to autoscale")
    for name, t in types_.items():
        if name == cfg.get("head_node_type"):
            continue
        lo, hi = t.get("min_workers", 0), t.get("max_workers", 0)
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            rep.errors.append(f"{name}: need 0 <= min_workers ({lo}) <= max_workers ({hi})")
    for name, t in types_.items():
        if "IamInstanceProfile" not in (t.get("node_config") or {}):
            rep.errors.append(f"{name}: node_config.IamInstanceProfile missing (S3 access is by instance profile)")
    text = yaml.safe_dump(cfg)
    rep.errors += [f"credentials: {s}" for s in find_secrets(text)]
    if re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)", text):
        rep.errors.append("credentials: AWS keys in the cluster config (use instance profiles)")
    return rep


# ------------------------------------------------------------------------------------------- KubeRay

# Field names of KubeRay's v1 API types (ray-operator/apis/ray/v1/{raycluster,rayjob}_types.go), so that a
# misspelt field fails here instead of being dropped by the API server.
RAYCLUSTER_SPEC_FIELDS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                          "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion",
                          "workerGroupSpecs"}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                     "upscalingMode", "env", "envFrom", "volumeMounts", "version"}
RAYJOB_SPEC_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                      "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy",
                      "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
                      "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
                      "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}

# Environment every Ray container must get: credentials from Secrets, the tracking URI from a ConfigMap.
REQUIRED_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
REQUIRED_CONFIGMAP_ENV = ("MLFLOW_TRACKING_URI",)


def _unknown(d: dict, allowed: set[str], where: str) -> list[str]:
    return [f"{where}: unknown field {k!r}" for k in d if k not in allowed]


def _pod_schema_errors(template: dict, where: str) -> list[str]:
    try:
        import kubernetes_validate
    except ImportError:
        return []
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata") or {"name": "template"},
           "spec": template.get("spec")}
    pod["metadata"].setdefault("name", "template")
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        return [f"{where}.template: Kubernetes {K8S_VERSION} schema: {path}: {e.message}"]
    return []


def _container_env_errors(container: dict, where: str) -> list[str]:
    errs = []
    env = {e.get("name"): e for e in container.get("env") or []}
    for name in REQUIRED_SECRET_ENV:
        ref = ((env.get(name) or {}).get("valueFrom") or {}).get("secretKeyRef")
        if not ref or not ref.get("name") or not ref.get("key"):
            errs.append(f"{where}: env {name} must come from a Secret (valueFrom.secretKeyRef)")
    for name in REQUIRED_CONFIGMAP_ENV:
        ref = ((env.get(name) or {}).get("valueFrom") or {}).get("configMapKeyRef")
        if not ref or not ref.get("name") or not ref.get("key"):
            errs.append(f"{where}: env {name} must come from a ConfigMap (valueFrom.configMapKeyRef)")
    for name, e in env.items():
        if name and _SECRET_NAME.search(name) and "value" in e:
            errs.append(f"{where}: env {name} has a literal value; take it from a Secret")
    return errs


def _gpus(container: dict) -> int:
    res = container.get("resources") or {}
    return int(str((res.get("limits") or {}).get("nvidia.com/gpu", 0)))


def _group_errors(group: dict, where: str, proj: dict) -> list[str]:
    errs = []
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        errs.append(f"{where}: rayStartParams must be a mapping")
    else:
        for k, v in params.items():
            if not isinstance(v, str):
                errs.append(f"{where}: rayStartParams.{k} must be a string (KubeRay: map[string]string), got {v!r}")
    template = group.get("template") or {}
    spec = template.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        errs.append(f"{where}: template.spec.containers is empty")
        return errs
    ray_c = containers[0]  # KubeRay runs Ray in the first container
    image = ray_c.get("image", "")
    if "mdt-orchestrator" not in image:
        errs.append(f"{where}: image {image!r} is not the project's image")
    elif image_tag(image) != proj["version"]:
        errs.append(f"{where}: image tag {image_tag(image)!r} != project version {proj['version']!r}")
    res = ray_c.get("resources") or {}
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(kind) or {}):
                errs.append(f"{where}: resources.{kind}.{r} missing (the autoscaler sizes nodes from them)")
    gpus = _gpus(ray_c)
    requested = int(str((res.get("requests") or {}).get("nvidia.com/gpu", gpus)))
    if gpus and requested != gpus:
        errs.append(f"{where}: nvidia.com/gpu requests ({requested}) != limits ({gpus})")
    if gpus:
        if not spec.get("nodeSelector"):
            errs.append(f"{where}: a GPU group needs a nodeSelector")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations") or []):
            errs.append(f"{where}: a GPU group needs a toleration for the nvidia.com/gpu taint")
        if isinstance(params, dict) and "accelerator_type:" not in params.get("resources", ""):
            errs.append(f"{where}: declare the accelerator_type:<GPU> resource in rayStartParams.resources "
                        "so the autoscaler can scale this group from zero for it")
    errs += _container_env_errors(ray_c, f"{where}.containers[{ray_c.get('name', 0)}]")
    errs += _pod_schema_errors(template, where)
    return errs


def check_ray_cluster_spec(spec: Any, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: missing or not a mapping"]
    proj = project()
    errs = _unknown(spec, RAYCLUSTER_SPEC_FIELDS, where)
    ray_pin = exact_pin(proj["pins"].get("ray", ""))
    if str(spec.get("rayVersion")) != str(ray_pin):
        errs.append(f"{where}.rayVersion {spec.get('rayVersion')!r} != the ray pin in pyproject.toml ({ray_pin})")
    errs += _unknown(spec.get("autoscalerOptions") or {}, AUTOSCALER_FIELDS, f"{where}.autoscalerOptions")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        errs.append(f"{where}.headGroupSpec missing")
    else:
        errs += _unknown(head, HEAD_GROUP_FIELDS, f"{where}.headGroupSpec")
        errs += [f"{where}.headGroupSpec: {k} is required" for k in sorted(HEAD_GROUP_REQUIRED - set(head))]
        errs += _group_errors(head, f"{where}.headGroupSpec", proj)
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        errs.append(f"{where}.workerGroupSpecs: no worker groups")
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        errs.append(f"{where}.workerGroupSpecs: duplicate groupName in {names}")
    if not any(_gpus((g.get("template", {}).get("spec", {}).get("containers") or [{}])[0]) for g in groups):
        errs.append(f"{where}.workerGroupSpecs: no GPU group (resources.limits nvidia.com/gpu)")
    for i, g in enumerate(groups):
        w = f"{where}.workerGroupSpecs[{g.get('groupName', i)}]"
        errs += _unknown(g, WORKER_GROUP_FIELDS, w)
        errs += [f"{w}: {k} is required" for k in sorted(WORKER_GROUP_REQUIRED - set(g))]
        lo, hi, n = g.get("minReplicas", 0), g.get("maxReplicas", 0), g.get("replicas", g.get("minReplicas", 0))
        if not all(isinstance(x, int) for x in (lo, hi, n)) or not lo <= n <= hi or hi < 1:
            errs.append(f"{w}: need integers minReplicas <= replicas <= maxReplicas and maxReplicas >= 1")
        errs += _group_errors(g, w, proj)
    return errs


def check_kuberay(doc: dict, where: str, run_entrypoints: bool = True) -> Report:
    rep = Report()
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1":
        rep.errors.append(f"{where}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    if not (doc.get("metadata") or {}).get("name"):
        rep.errors.append(f"{where}: metadata.name missing")
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        rep.errors += check_ray_cluster_spec(spec, f"{where}.spec")
    elif kind == "RayJob":
        rep.errors += _unknown(spec, RAYJOB_SPEC_FIELDS, f"{where}.spec")
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            rep.errors.append(f"{where}.spec.submissionMode {spec.get('submissionMode')!r} is not one of "
                              f"{sorted(SUBMISSION_MODES)}")
        if "rayClusterSpec" in spec:
            rep.errors += check_ray_cluster_spec(spec["rayClusterSpec"], f"{where}.spec.rayClusterSpec")
            if spec.get("shutdownAfterJobFinishes") is not True:
                rep.errors.append(f"{where}.spec.shutdownAfterJobFinishes must be true (GPU nodes outliving "
                                  "the job cost money)")
        elif not spec.get("clusterSelector"):
            rep.errors.append(f"{where}.spec: needs rayClusterSpec or clusterSelector")
        entry = spec.get("entrypoint")
        if not isinstance(entry, str) or not entry.strip():
            rep.errors.append(f"{where}.spec.entrypoint missing")
        elif run_entrypoints:
            rep.extend(check_entrypoint(entry, f"{where}.spec.entrypoint"))
    else:
        rep.errors.append(f"{where}: kind must be RayCluster or RayJob, got {kind!r}")
    rep.errors += [f"{where}: credentials: {s}" for s in find_secrets(yaml.safe_dump(doc))]
    return rep


def check_k8s_object(doc: dict, where: str) -> Report:
    """A built-in Kubernetes object: Kubernetes' own schema (strict), and no literal credentials."""
    rep = Report()
    kind = doc.get("kind")
    if kind == "Secret":
        rep.errors.append(f"{where}: Secrets are not kept in the repository; create them with kubectl")
    try:
        import kubernetes_validate
    except ImportError:
        rep.notes.append(f"{where}: kubernetes-validate not installed; {kind} not checked against its schema")
    else:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            rep.errors.append(f"{where}: Kubernetes {K8S_VERSION} schema: {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            rep.errors.append(f"{where}: no Kubernetes {K8S_VERSION} schema for {doc.get('apiVersion')}/{kind}")
    if kind in ("Deployment", "StatefulSet", "Job"):
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for e in c.get("env") or []:
                if _SECRET_NAME.search(e.get("name", "")) and "value" in e:
                    rep.errors.append(f"{where}: env {e['name']} has a literal value; take it from a Secret")
    rep.errors += [f"{where}: credentials: {s}" for s in find_secrets(yaml.safe_dump(doc))]
    return rep


# ------------------------------------------------------------------------------------------- entrypoints

_ENTRY = re.compile(r"^(?:\S*/)?python3?(?:\.\d+)?$")


def job_script(entrypoint: str) -> tuple[str, list[str]] | None:
    """('preprocess', argv) for 'python [/any/prefix/]jobs/preprocess.py ARGS...', else None."""
    argv = shlex.split(entrypoint)
    if len(argv) < 2 or not _ENTRY.match(argv[0]):
        return None
    m = re.search(r"(?:^|/)jobs/([A-Za-z_][A-Za-z0-9_]*)\.py$", argv[1])
    return (m.group(1), argv[2:]) if m else None


def job_parser(module) -> argparse.ArgumentParser | None:
    if hasattr(module, "build_parser"):
        return module.build_parser()
    return None


def check_entrypoint(entrypoint: str, where: str = "entrypoint") -> Report:
    """Parse a job entrypoint with the job's own argument parser, then resolve its config (presets and
    --set overrides) with the job's own loader, without running anything."""
    rep = Report()
    found = job_script(entrypoint)
    if found is None:
        rep.errors.append(f"{where}: not of the form 'python [.../]jobs/<job>.py ARGS': {entrypoint!r}")
        return rep
    job, argv = found
    if not (ROOT / "jobs" / f"{job}.py").exists():
        rep.notes.append(f"{where}: jobs/{job}.py does not exist yet; entrypoint not checked")
        return rep
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    module = importlib.import_module(f"jobs.{job}")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser = job_parser(module)
            if parser is not None:
                args = parser.parse_args(argv)
            elif hasattr(module, "parse_args"):
                args = module.parse_args(argv)
            else:
                rep.errors.append(f"{where}: jobs/{job}.py exposes neither build_parser() nor parse_args()")
                return rep
    except SystemExit as e:
        msg = err.getvalue().strip().splitlines()
        rep.errors.append(f"{where}: jobs/{job}.py rejects its arguments (exit {e.code}): "
                          f"{msg[-1] if msg else ''}")
        return rep
    if hasattr(module, "build_config"):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                module.build_config(args)
        except Exception as e:  # noqa: BLE001 - ConfigError and friends
            rep.errors.append(f"{where}: jobs/{job}.py config: {type(e).__name__}: {e}")
    else:  # fall back to the job's own --print-config (resolves the config, runs nothing)
        r = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *argv, "--print-config"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()
            rep.errors.append(f"{where}: jobs/{job}.py --print-config exited {r.returncode}: "
                              f"{tail[-1] if tail else ''}")
    return rep


# ------------------------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        if buf:
            ins, _, rest = buf.partition(" ")
            out.append((ins.upper(), rest.strip()))
        buf = ""
    return out


def _args(instructions, expand: dict[str, str] | None = None) -> dict[str, str]:
    vals: dict[str, str] = {}
    for ins, rest in instructions:
        if ins == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            vals[k.strip()] = v.strip().strip('"')
    return vals


def check_dockerfile(text: str, flavour: str = "gpu") -> list[str]:
    """Structure of infra/docker/Dockerfile (flavour 'gpu') or infra/mlflow/Dockerfile ('mlflow')."""
    errs: list[str] = []
    ins = dockerfile_instructions(text)
    proj = project()
    pins = proj["pins"]
    args = _args(ins)
    froms = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    if not froms:
        return ["no FROM"]
    final = ins[froms[-1]:]
    base = final[0][1].split()[0]
    for k, v in args.items():
        base = base.replace("${" + k + "}", v).replace("$" + k, v)
    users = [v for k, v in final if k == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        errs.append("the final stage must switch to a non-root USER")
    entrypoints = [v for k, v in final if k == "ENTRYPOINT"]
    if flavour == "gpu":
        if not re.match(r"nvidia/cuda:12\.", base):
            errs.append(f"final base image {base!r} is not a CUDA 12 image (nvidia/cuda:12.*)")
        # the CUDA images have an ENTRYPOINT; Ray's convention is none: it must be reset explicitly
        if entrypoints != ["[]"]:
            errs.append("the final stage must reset the base image's entrypoint with `ENTRYPOINT []`")
        run_text = " ".join(v for k, v in final if k == "RUN")
        if not re.search(r"useradd[^&]*--create-home[^&]*--home-dir /home/ray[^&]*--uid 1000", run_text):
            errs.append("no `useradd --create-home --home-dir /home/ray --uid 1000 ... ray` (Ray's user)")
        if users and users[-1].split(":")[0] not in ("ray", "1000"):
            errs.append(f"USER {users[-1]} is not Ray's user (ray / 1000)")
        env_text = " ".join(v for k, v in final if k == "ENV")
        if "PATH=/opt/venv/bin:" not in env_text or "/etc/profile.d/" not in run_text:
            errs.append("`ray` must be on PATH for login shells too (ENV PATH and /etc/profile.d)")
        if not re.search(r"\bwget\b", run_text):
            errs.append("wget missing (KubeRay's health probes use it)")
        if "ray --version" not in run_text:
            errs.append("the image should check `ray --version` at build time")
        torch = exact_pin(pins.get("torch", ""))
        if args.get("TORCH_VERSION") != torch:
            errs.append(f"ARG TORCH_VERSION={args.get('TORCH_VERSION')} != pyproject torch pin {torch}")
        py = re.search(r"(\d+\.\d+)", proj["python"])
        if not py or not args.get("PYTHON_VERSION", "").startswith(py.group(1)):
            errs.append(f"ARG PYTHON_VERSION={args.get('PYTHON_VERSION')} does not match requires-python "
                        f"{proj['python']!r}")
        if not args.get("CUDA_VERSION", "").startswith("12."):
            errs.append(f"ARG CUDA_VERSION={args.get('CUDA_VERSION')} is not CUDA 12")
        try:
            from packaging.specifiers import SpecifierSet

            if args.get("FLASH_ATTN_VERSION") not in SpecifierSet(pins.get("flash-attn", "")):
                errs.append(f"ARG FLASH_ATTN_VERSION={args.get('FLASH_ATTN_VERSION')} is outside pyproject's "
                            f"flash-attn{pins.get('flash-attn')}")
        except ImportError:
            pass
        all_run = " ".join(v for k, v in ins if k == "RUN")
        if not re.search(r"-r pyproject\.toml(?=.*--extra render)(?=.*--extra cuda)", all_run):
            errs.append("the dependencies must be installed from pyproject.toml with --extra render --extra cuda "
                        "(so that ray, bpy, spconv... are the pinned versions)")
        for pkg in ("ray", "bpy", "spconv-cu120", "mlflow"):
            m = re.search(rf"['\"\s]{re.escape(pkg)}(?:\[[^\]]*\])?==([0-9][^'\"\s]*)", all_run)
            if m and m.group(1) != exact_pin(pins.get(pkg, "")):
                errs.append(f"{pkg}=={m.group(1)} installed, pyproject pins {pins.get(pkg)}")
    elif flavour == "mlflow":
        mlflow = exact_pin(pins.get("mlflow", ""))
        if args.get("MLFLOW_VERSION") != mlflow:
            errs.append(f"ARG MLFLOW_VERSION={args.get('MLFLOW_VERSION')} != pyproject mlflow pin {mlflow}")
        if not any("start-server.sh" in v for k, v in final if k in ("CMD", "ENTRYPOINT")):
            errs.append("the MLflow image must run infra/mlflow/start-server.sh")
    for k, v in ins:
        if k in ("ENV", "ARG") and _SECRET_NAME.search(v.split("=", 1)[0]):
            errs.append(f"{k} {v.split('=', 1)[0]}: credentials must not be baked into an image")
        if k in ("COPY", "ADD") and re.search(r"(\.aws|\.env\b|\.pem|id_rsa|credentials)", v):
            errs.append(f"{k} {v}: copies credentials into the image")
    errs += [f"credentials: {s}" for s in find_secrets(text)]
    return errs


def check_dockerignore(text: str) -> list[str]:
    import fnmatch

    pats = [p.strip() for p in text.splitlines() if p.strip() and not p.strip().startswith("#")]
    errs = []

    def matches(path: str, pat: str) -> bool:
        # Docker: a pattern matches a path or any of its parent directories; "**/" matches any depth
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pat.startswith("**/"):
            return any(fnmatch.fnmatch(q.rsplit("/", 1)[-1], pat[3:]) for q in prefixes)
        return any(fnmatch.fnmatch(q, pat) for q in prefixes)

    def ignored(path: str) -> bool:
        hit = False
        for p in pats:  # the last matching line wins; "!" re-includes
            neg = p.startswith("!")
            if matches(path, (p[1:] if neg else p).lstrip("/")):
                hit = not neg
        return hit

    for must in (".git", ".venv", "outputs", "mlruns", ".env", ".aws/credentials"):
        if not ignored(must):
            errs.append(f".dockerignore does not exclude {must}")
    for keep in ("pyproject.toml", "README.md", "mdt/__init__.py", "pipelines/preprocess/driver.py", "jobs/preprocess.py",
                 "jobs/configs/preprocess_trellis.yaml", "mdt/config.py"):
        if ignored(keep):
            errs.append(f".dockerignore excludes {keep}, which the image needs")
    return errs


def check_compose(doc: Any) -> list[str]:
    errs = []
    services = (doc or {}).get("services") or {}
    for s in ("postgres", "mlflow"):
        if s not in services:
            errs.append(f"compose: service {s!r} missing")
    ml = services.get("mlflow") or {}
    env = ml.get("environment") or {}
    if not str(env.get("MLFLOW_BACKEND_STORE_URI", "")).startswith("postgresql://"):
        errs.append("compose: mlflow.environment.MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI")
    if "MLFLOW_ARTIFACTS_DESTINATION" not in env:
        errs.append("compose: mlflow.environment.MLFLOW_ARTIFACTS_DESTINATION missing (the S3 artifact store)")
    dep = ml.get("depends_on") or {}
    if not (isinstance(dep, dict) and (dep.get("postgres") or {}).get("condition") == "service_healthy"):
        errs.append("compose: mlflow must wait for postgres to be healthy (depends_on condition)")
    mlflow_pin = exact_pin(project()["pins"].get("mlflow", ""))
    if image_tag(str(ml.get("image", ""))) != mlflow_pin:
        errs.append(f"compose: mlflow image tag != pyproject mlflow pin {mlflow_pin}")
    for name, svc in services.items():
        for k, v in (svc.get("environment") or {}).items():
            if _SECRET_NAME.search(k) and not str(v).startswith("${"):
                errs.append(f"compose: {name}.environment.{k} is a literal; use ${{{k}}} from the environment")
    errs += [f"compose: credentials: {s}" for s in find_secrets(yaml.safe_dump(doc))]
    return errs


# ------------------------------------------------------------------------------------------- dispatch


def _load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def validate_file(path: str | Path, run_entrypoints: bool = True) -> Report:
    path = Path(path)
    name = path.name
    rep = Report()
    where = str(path)
    if name == ".dockerignore":
        rep.errors += [f"{where}: {e}" for e in check_dockerignore(path.read_text())]
        return rep
    if name.startswith("Dockerfile") or name.endswith(".Dockerfile"):
        flavour = "mlflow" if "mlflow" in str(path.resolve()) else "gpu"
        rep.errors += [f"{where}: {e}" for e in check_dockerfile(path.read_text(), flavour)]
        return rep
    docs = _load_yaml_docs(path)
    if name in ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml"):
        rep.errors += [f"{where}: {e}" for e in check_compose(docs[0] if docs else {})]
        return rep
    if len(docs) == 1 and isinstance(docs[0], dict) and "cluster_name" in docs[0] and "provider" in docs[0]:
        rep.extend(_prefixed(check_cluster_config(docs[0]), where))
        return rep
    if not docs:
        rep.errors.append(f"{where}: empty")
    for i, doc in enumerate(docs):
        w = f"{where}[{i}:{(doc or {}).get('kind')}/{((doc or {}).get('metadata') or {}).get('name')}]"
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            rep.errors.append(f"{w}: not a Kubernetes object (apiVersion and kind)")
        elif str(doc["apiVersion"]).startswith("ray.io/") or doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            rep.extend(check_kuberay(doc, w, run_entrypoints))
        else:
            rep.extend(check_k8s_object(doc, w))
    return rep


def _prefixed(rep: Report, where: str) -> Report:
    return Report([f"{where}: {e}" for e in rep.errors], [f"{where}: {n}" for n in rep.notes])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("files", nargs="*", help="files to check (default: the repository's deployment files)")
    ap.add_argument("--no-entrypoints", action="store_true", help="do not load the jobs to check entrypoints")
    a = ap.parse_args(argv)
    files = [Path(f) for f in a.files] or [ROOT / f for f in DEFAULT_FILES]
    total = Report()
    for f in files:
        try:
            rep = validate_file(f, run_entrypoints=not a.no_entrypoints)
        except (OSError, yaml.YAMLError) as e:
            print(f"{f}: cannot read: {e}", file=sys.stderr)
            return 2
        total.extend(rep)
        print(f"{'ok  ' if rep.ok else 'FAIL'} {os.path.relpath(f)}")
    for n in total.notes:
        print(f"note: {n}")
    for e in total.errors:
        print(f"error: {e}", file=sys.stderr)
    return 0 if total.ok else 1


if __name__ == "__main__":
    sys.exit(main())
