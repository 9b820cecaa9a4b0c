"""The house's floors: jobs/ -> pipelines/ -> mdt/, no arrow back up, no import cycle, thin jobs.

Imports are read from the source (every `import` / `from ... import`, at module level or inside functions), so a
lazy import that goes the wrong way is caught as well as a top-level one.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"jobs": 2, "pipelines": 1, "mdt": 0}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for top in FLOORS:
        for p in sorted((ROOT / top).rglob("*.py")):
            out[_module_name(p)] = p
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in `path` (resolved to the longest known module name)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(target: str) -> None:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in known:
                found.add(cand)
                return

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                resolve(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule, else a name of `mod`
                if f"{mod}.{a.name}" in known:
                    found.add(f"{mod}.{a.name}")
                else:
                    resolve(mod)
    found.discard(name)
    return found


def _external_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports anywhere in `path` (`import ray.train` -> "ray")."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def _folder(module: str) -> str:
    """The folder a module belongs to: `mdt.eval.chain` -> `mdt.eval`, `pipelines.distill.worker` ->
    `pipelines.distill`; a top-level module is its own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _folder_edges(top: str) -> dict[str, set[str]]:
    """Folder -> the other folders of `top` it imports from."""
    edges: dict[str, set[str]] = {}
    for m, deps in _graph().items():
        if m.startswith(top + "."):
            edges.setdefault(_folder(m), set()).update(
                _folder(d) for d in deps if d.startswith(top + ".") and _folder(d) != _folder(m))
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_imports_go_down_the_floors_only():
    bad = []
    for mod, deps in _graph().items():
        floor = FLOORS[mod.split(".")[0]]
        for d in deps:
            if FLOORS[d.split(".")[0]] > floor:
                bad.append(f"{mod} imports {d}")
    assert not bad, "imports that go up a floor:\n" + "\n".join(sorted(bad))


def test_no_job_is_imported():
    graph = _graph()
    users = sorted(f"{m} imports {d}" for m, deps in graph.items() for d in deps
                   if d.startswith("jobs.") and not m.startswith("jobs."))
    assert not users, "\n".join(users)


def test_no_import_cycle():
    graph = _graph()
    # Package __init__ files re-export their children; an edge child -> its own package is not a cycle of ideas.
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_folder_cycle_inside_the_library():
    """Folders of mdt/ depend on each other in one direction (eval may use training's builders, or the other
    way round, never both): a folder-level cycle is a tangle that module-level checks do not see."""
    cycles = _cycles(_folder_edges("mdt"))
    assert not cycles, "folder cycles in mdt/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_library_knows_no_ray_or_mlflow():
    """mdt/ is plain PyTorch: a training step, a sampler or a metric runs in a notebook without a cluster."""
    bad = sorted(f"{p.relative_to(ROOT)} imports {name}" for p in (ROOT / "mdt").rglob("*.py")
                 for name in _external_imports(p) & {"ray", "mlflow"})
    assert not bad, "\n".join(bad)


# Settings of a Ray job (its workers, cluster and tracking): the names of their fields in pipelines/*/config.py.
RAY_JOB_FIELDS = {"num_workers", "use_gpu", "cpus_per_worker", "num_cpus", "num_gpus", "placement_strategy",
                  "tracking_uri", "ray", "mlflow"}


def _dataclass_fields(path: Path) -> dict[str, set[str]]:
    """`{class name: its annotated field names}` of every dataclass defined in `path`."""

    def is_dataclass(d: ast.expr) -> bool:
        d = d.func if isinstance(d, ast.Call) else d
        return (isinstance(d, ast.Name) and d.id == "dataclass") or (isinstance(d, ast.Attribute)
                                                                      and d.attr == "dataclass")

    return {node.name: {s.target.id for s in node.body
                        if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.ClassDef) and any(is_dataclass(d) for d in node.decorator_list)}


def _ray_job_settings(path: Path) -> list[str]:
    return [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}: {cls}.{name}"
            for cls, names in _dataclass_fields(path).items() for name in sorted(names & RAY_JOB_FIELDS)]


def test_the_library_configures_no_ray_job():
    """A config dataclass of mdt/ holds what the library itself uses: the workers, cluster and tracking of a job
    are sections of that job's config in pipelines/ (e.g. pipelines/distill/config.py around the trainer's)."""
    bad = [b for p in sorted((ROOT / "mdt").rglob("*.py")) for b in _ray_job_settings(p)]
    assert not bad, "Ray job settings in the library:\n" + "\n".join(bad)


def test_the_ray_settings_checker_sees_them(tmp_path):
    """The checker reads every dataclass form (a checker that sees nothing passes everything); the job's own
    config, which must hold them, is seen too."""
    src = tmp_path / "c.py"
    src.write_text("import dataclasses\nfrom dataclasses import dataclass\n\n@dataclass\nclass A:\n"
                   "    num_workers: int = 1\n    lr: float = 0.1\n\n@dataclasses.dataclass(frozen=True)\n"
                   "class B:\n    tracking_uri: str = ''\n\nclass C:\n    use_gpu: bool = False\n")
    assert _ray_job_settings(src) == ["c.py: A.num_workers", "c.py: B.tracking_uri"]
    job = _ray_job_settings(ROOT / "pipelines" / "distill" / "config.py")
    assert {"pipelines/distill/config.py: ScalingConfig.num_workers",
            "pipelines/distill/config.py: DistillJobConfig.ray"} <= set(job), job


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py")))
def test_jobs_are_thin(job):
    lines = (ROOT / "jobs" / job).read_text().count("\n")
    assert lines <= 125, f"jobs/{job} has {lines} lines; a job parses, builds its config, calls one library function"


def test_the_checker_sees_a_wrong_way_import(tmp_path):
    """The graph builder resolves relative and lazy imports (a checker that sees nothing passes everything)."""
    known = {"mdt": ROOT / "mdt/__init__.py", "mdt.flow": ROOT / "mdt/flow.py", "pipelines": ROOT / "pipelines",
             "pipelines.preprocess.driver": ROOT / "pipelines/preprocess/driver.py", "mdt.x": tmp_path / "x.py"}
    src = tmp_path / "x.py"
    src.write_text("from . import flow\n\ndef f():\n    from pipelines.preprocess import driver\n")
    assert _imports("mdt.x", src, known) == {"mdt.flow", "pipelines.preprocess.driver"}


def test_the_ray_layer_is_one_folder_per_job():
    """Every module of pipelines/ sits in a job's folder or in common/ (rehearse.py, which runs the jobs' CLIs, and
    the package's own __init__ apart); each job folder has the driver its CLI calls."""
    loose = sorted(p.name for p in (ROOT / "pipelines").glob("*.py") if p.name not in {"__init__.py", "rehearse.py"})
    assert not loose, f"modules outside a job folder: {loose}"
    for job in (ROOT / "jobs").glob("*.py"):
        if job.stem != "generate":  # generation runs without Ray: mdt.generate
            driver = ROOT / "pipelines" / job.stem / "driver.py"
            assert driver.is_file(), f"jobs/{job.name} has no {driver.relative_to(ROOT)}"


def test_no_folder_cycle_in_the_ray_layer_and_common_imports_no_job():
    edges = _folder_edges("pipelines")
    cycles = _cycles(edges)
    assert not cycles, "folder cycles in pipelines/:\n" + "\n".join(" -> ".join(c) for c in cycles)
    assert edges["pipelines.common"] <= {"pipelines"}, f"common/ imports a job: {sorted(edges['pipelines.common'])}"


# A function-level import says why it is not at the top of its module: `# heavy: torch`, `# optional: bpy`,
# `# cycle: <module>` or `# clash: <name>`, on its line or the line above.
IMPORT_REASON = re.compile(r"#.*\b(heavy|optional|cycle|clash)\b")
# Modules whose function-level imports are annotated separately.
UNANNOTATED: set[str] = set()   # files exempt from the reason rule (none)


def _unexplained_imports(path: Path) -> list[int]:
    """Line numbers of imports nested in a function with no reason comment on their line or the line above."""
    lines = path.read_text().splitlines()
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            if in_func and isinstance(child, (ast.Import, ast.ImportFrom)):
                here, above = lines[child.lineno - 1], lines[child.lineno - 2] if child.lineno > 1 else ""
                if not IMPORT_REASON.search(here) and not (above.strip().startswith("#")
                                                           and IMPORT_REASON.search(above)):
                    out.append(child.lineno)
            visit(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(ast.parse("\n".join(lines), str(path)), False)
    return out


def test_function_level_imports_say_why():
    missing = [f"{p.relative_to(ROOT)}:{n}" for p in _modules().values()
               if str(p.relative_to(ROOT)) not in UNANNOTATED for n in _unexplained_imports(p)]
    assert not missing, "function-level imports without a reason comment (move them up, or say why):\n" + "\n".join(
        missing)


def test_the_reason_checker_sees_a_bare_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    import torch  # heavy: torch\n    # cycle: mdt.x\n"
                   "    from mdt import x\n    import json\n")
    assert _unexplained_imports(src) == [7]
