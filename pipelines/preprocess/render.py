"""Render stage: Blender (Cycles) views, cameras and the normalised mesh of one asset per row.

The parent side (this module) chooses the cameras, writes the asset into a private temp directory, checks it
(external references, raw geometry) and has `pipelines/preprocess/blender_worker.py` render it in a child process that it
can kill: a per-asset timeout (the child's whole process group is SIGKILLed), an address-space cap set inside
the child with `resource.setrlimit`, the mandatory sandbox (`blender_worker.confine`; `render: no sandbox: <why>`
where it cannot be set up, unless `render.allow_unsandboxed`), an environment without credentials, a factory-reset scene,
and Python auto-execution in .blend files switched off. With `render.warm_workers` (default) the child is
forked from a warm worker, a started interpreter (`WarmWorker`, one per concurrent render), instead of a new
Python process per asset; the child imports bpy inside its sandbox (a fork after that import would leave Cycles
one thread), and the warm worker itself never opens an asset.
A worker that fails, crashes, hangs or runs out of memory gives a failed row (`"render: <reason>"`), never an
exception that kills the job.

Cameras (TRELLIS data toolkit, render step / render_cond step):
* feature views: n views on a sphere of radius 2 with FOV 40 deg, directions from a spherical Hammersley set
  with a random per-asset offset (u_i = (i + o0)/n, v_i = radical_inverse_2(i) + o1), u remapped with
  u' = 2u (u < 1/4) else 2u/3 + 1/3, pitch = arccos(1 - 2u') - pi/2, yaw = 2 pi v; position
  r (cos yaw cos pitch, sin yaw cos pitch, sin pitch) in Blender's Z-up world, looking at the origin with
  the camera's -Z forward and +Y up (OpenGL camera axes). About 3/4 of the views look from above.
* condition views: the same directions; 1/r^2 uniform in [1/r_max^2, 1/r_min^2] with
  r_min = (sqrt(3)/2)/sin(35 deg), r_max = (sqrt(3)/2)/sin(5 deg), and fov = 2 arcsin((sqrt(3)/2)/r): the
  bounding sphere of the unit cube always just fills the frame.
The per-asset offsets are drawn from a generator seeded by the asset's sha256 (and `seed`), so a re-run
renders the same cameras.

Row in: `sha256`, `mesh_bytes` (+ `mesh_format`, `mesh_name`, `mesh_bundle`, `untrusted_blend`) or
`cache_uri`. Row out (pipelines/README.md): `views`, `views_c2w`, `views_fov`, `mesh_ply`, `cond_images`,
`cond_c2w`, `cond_fov`, `cond_crop`, `render_info`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.preprocess.asset_content import MAX_PIXELS, check_bundle
from pipelines.preprocess.asset_refs import ExternalReferenceError, check_tree
from pipelines.preprocess.mesh_check import (PARSED_FORMATS, CompressedGeometry, MeshError, asset_encoding,
                                             check_geometry, parse_mesh)
from pipelines.preprocess.rows import fail, pack_array
from pipelines.preprocess.voxelize import mesh_to_ply

log = logging.getLogger(__name__)
WORKER = Path(__file__).with_name("blender_worker.py")
SUPPORTED_FORMATS = ("glb", "gltf", "obj", "ply", "fbx", "stl", "blend", "usd", "usda", "usdc", "usdz", "abc")
COND_R_MIN = (math.sqrt(3) / 2) / math.sin(math.radians(35))
COND_R_MAX = (math.sqrt(3) / 2) / math.sin(math.radians(5))


# ---------------------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------------------

def radical_inverse_base2(i: int) -> float:
    """Van der Corput sequence: the bits of i mirrored about the binary point."""
    out, f = 0.0, 0.5
    while i:
        out += f * (i & 1)
        i >>= 1
        f *= 0.5
    return out


def hammersley_yaw_pitch(n: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """yaw, pitch (radians, [n] each) of the remapped spherical Hammersley set with a random offset."""
    yaw, pitch = np.empty(n), np.empty(n)
    for i in range(n):
        u = i / n + offset[0] / n
        v = radical_inverse_base2(i) + offset[1]
        u = 2 * u if u < 0.25 else 2 * u / 3 + 1 / 3
        pitch[i] = math.acos(1 - 2 * u) - math.pi / 2
        yaw[i] = 2 * math.pi * v
    return yaw, pitch


def look_at_origin(position: np.ndarray) -> np.ndarray:
    """Camera-to-world 4x4 (OpenGL camera axes: -Z forward, +Y up) at `position`, looking at the origin,
    with world +Z as the up hint (world +Y when looking straight up or down)."""
    p = np.asarray(position, np.float64)
    back = p / np.linalg.norm(p)  # camera +Z points away from the target
    up = np.array([0.0, 0.0, 1.0])
    right = np.cross(up, back)
    if np.linalg.norm(right) < 1e-9:
        right = np.cross(np.array([0.0, 1.0, 0.0]), back)
    right /= np.linalg.norm(right)
    cam_up = np.cross(back, right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, cam_up, back, p
    return m


def orbit_positions(yaw: np.ndarray, pitch: np.ndarray, radius) -> np.ndarray:
    r = np.broadcast_to(np.asarray(radius, np.float64), yaw.shape)
    return np.stack([r * np.cos(yaw) * np.cos(pitch), r * np.sin(yaw) * np.cos(pitch), r * np.sin(pitch)], -1)


def feature_cameras(n: int, offset, radius: float = 2.0, fov_deg: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """c2w float32 [n, 4, 4] and fov float32 [n] (radians) of the feature views."""
    yaw, pitch = hammersley_yaw_pitch(n, offset)
    pos = orbit_positions(yaw, pitch, radius)
    c2w = np.stack([look_at_origin(p) for p in pos]).astype(np.float32)
    return c2w, np.full(n, math.radians(fov_deg), np.float32)


def cond_cameras(n: int, offset, rng: np.random.Generator, r_min: float = COND_R_MIN,
                 r_max: float = COND_R_MAX) -> tuple[np.ndarray, np.ndarray]:
    """c2w float32 [n, 4, 4] and fov float32 [n] of the condition views (random distance and FOV)."""
    yaw, pitch = hammersley_yaw_pitch(n, offset)
    inv_r2 = rng.uniform(1 / r_max**2, 1 / r_min**2, size=n)
    radius = 1 / np.sqrt(inv_r2)
    fov = 2 * np.arcsin((math.sqrt(3) / 2) / radius)
    pos = orbit_positions(yaw, pitch, radius)
    c2w = np.stack([look_at_origin(p) for p in pos]).astype(np.float32)
    return c2w, fov.astype(np.float32)


def asset_rng(sha256: str | None, seed: int = 0) -> np.random.Generator:
    key = int(hashlib.sha256(f"{sha256 or ''}:{seed}".encode()).hexdigest()[:16], 16)
    return np.random.default_rng(key)


# ---------------------------------------------------------------------------------------------------------
# Running the Blender worker
# ---------------------------------------------------------------------------------------------------------

@dataclass
class RenderSettings:
    """What the worker needs besides the cameras; the stage fills it from the config."""

    samples: int = 128
    denoise: bool = True
    device: str = "auto"  # auto | cpu | gpu
    threads: int = 0  # Cycles CPU threads, 0 = Blender's choice
    timeout_s: float = 900.0
    memory_limit_mb: int = 16384  # RLIMIT_AS of the worker; 0 = none
    view_transform: str = "Filmic"  # Blender 3.x's default for new scenes
    bottom_light_up: bool = False  # reference places the bottom area light with the default (downward) rotation
    allow_unsandboxed: bool = False  # render without the worker's sandbox where it cannot be set up


@dataclass
class RenderPass:
    name: str
    resolution: int
    c2w: np.ndarray  # [V, 4, 4]
    fov: np.ndarray  # [V]
    samples: int | None = None  # None: RenderSettings.samples


@dataclass
class RenderResult:
    ok: bool
    error: str | None = None
    images: dict[str, list[bytes]] = field(default_factory=dict)
    vertices: np.ndarray | None = None
    faces: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    log_tail: str = ""


# What a Blender worker inherits of the stage's environment: no credentials (AWS_*, HF_TOKEN, ...) ever.
WORKER_ENV = ("PATH", "LANG", "LC_ALL", "HOME", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES",
              "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "OMP_NUM_THREADS")


def worker_env() -> dict:
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class WarmWorker:
    """A warm Blender worker (``blender_worker.py --serve``): a started interpreter, one forked child per asset.

    ``run(job_path, timeout_s)`` returns the child's exit code (negative: killed by that signal), or None when
    the child ran past the timeout (its process group is then SIGKILLed; the warm worker itself lives on).
    Every wait on the warm worker is bounded: one that does not start within ``STARTUP_TIMEOUT_S``, does not
    answer a job within ``REPLY_TIMEOUT_S`` or has exited raises ``WarmWorkerError`` after being killed; the
    caller renders with a fresh process instead and starts a new warm worker for the next asset."""

    STARTUP_TIMEOUT_S = 180.0  # an interpreter start on a loaded machine (the child imports bpy, not it)
    REPLY_TIMEOUT_S = 60.0     # a fork and a line on a pipe

    def __init__(self, env: dict | None = None):
        self.dir = tempfile.mkdtemp(prefix="mdt-warm-worker-")
        self.pid: int | None = None
        env = {**(env or worker_env()), "TMPDIR": self.dir}
        self.log = open(os.path.join(self.dir, "serve.log"), "wb")
        # its own session: the launcher and the warm worker it forks share one process group, killable as one
        launcher = subprocess.Popen([sys.executable, str(WORKER), "--serve"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=self.log, env=env, start_new_session=True,
                                    cwd=self.dir)
        self.stdin, self.stdout = launcher.stdin, launcher.stdout
        self._buf = b""
        try:
            line = self._line(self.STARTUP_TIMEOUT_S)
            if line is None:
                raise WarmWorkerError(f"warm Blender worker did not start within {self.STARTUP_TIMEOUT_S:g} s: "
                                      + _tail(Path(self.dir, "serve.log"), 500))
            ready = line.split()
            self.pid, self.startup_s = int(ready[1]), float(ready[2])
            try:
                launcher.wait(timeout=self.REPLY_TIMEOUT_S)  # it forks the warm worker off and exits
            except subprocess.TimeoutExpired:
                raise WarmWorkerError("warm Blender worker's launcher did not exit") from None
        except BaseException:
            _kill_group(launcher)  # the launcher's process group holds the warm worker it forked, if any
            self.close()
            raise

    def _line(self, timeout_s: float | None) -> str | None:
        deadline = None if timeout_s is None else time.time() + timeout_s
        while b"\n" not in self._buf:
            wait = None if deadline is None else max(0.0, deadline - time.time())
            r, _, _ = select.select([self.stdout], [], [], wait)
            if not r:
                return None
            chunk = os.read(self.stdout.fileno(), 4096)
            if not chunk:
                raise WarmWorkerError("warm Blender worker exited: " + _tail(Path(self.dir, "serve.log"), 500))
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def _reply(self, word: str) -> int:
        """The next ``<word> <int>`` line, within REPLY_TIMEOUT_S; otherwise the warm worker is stuck."""
        line = self._line(self.REPLY_TIMEOUT_S)
        if line is None or not line.startswith(word + " "):
            raise WarmWorkerError(f"warm Blender worker stuck (expected {word!r}, got {line!r})")
        return int(line.split()[1])

    def run(self, job_path: str, timeout_s: float) -> int | None:
        t0 = time.time()
        try:
            self.stdin.write(f"{job_path}\n".encode())
            self.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WarmWorkerError(f"warm Blender worker gone: {e}") from None
        pid = self._reply("pid")
        try:
            line = self._line(max(0.0, timeout_s - (time.time() - t0)))
        except BaseException:
            _kill_pgid(pid)
            raise
        if line is None:
            _kill_pgid(pid)
            self._reply("status")  # the warm worker reaps the child and reports its status
            return None
        return int(line.split()[1])

    def close(self) -> None:
        for f in (self.stdin, self.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class WarmWorkerError(RuntimeError):
    pass


def _kill_pgid(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def render_file(path: str | os.PathLike, fmt: str, passes: list[RenderPass], settings: RenderSettings,
                export_mesh: bool = True, workdir: str | os.PathLike | None = None,
                bundle_dir: str | os.PathLike | None = None, warm: WarmWorker | None = None) -> RenderResult:
    """Render one asset file in a killable Blender worker process that sees only ``bundle_dir`` (default: the
    file's directory) of the asset (blender_worker.confine): a child forked by ``warm`` when given, else a
    fresh Python process that imports bpy for this asset alone."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in SUPPORTED_FORMATS:
        return RenderResult(False, f"unsupported format {fmt!r}")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return RenderResult(False, "empty or missing asset file")
    out_dir = Path(tempfile.mkdtemp(prefix="mdt-render-out-", dir=workdir))
    try:
        job = {
            "input": str(Path(path).resolve()), "format": fmt, "out_dir": str(out_dir.resolve()),
            "bundle_dir": str(Path(bundle_dir or Path(path).parent).resolve()),
            "memory_limit_mb": int(settings.memory_limit_mb), "threads": int(settings.threads),
            "device": settings.device, "samples": int(settings.samples), "denoise": bool(settings.denoise),
            "view_transform": settings.view_transform, "bottom_light_up": bool(settings.bottom_light_up),
            "export_mesh": bool(export_mesh), "allow_unsandboxed": bool(settings.allow_unsandboxed),
            "passes": [{"name": p.name, "resolution": int(p.resolution), "c2w": np.asarray(p.c2w).tolist(),
                        "fov": np.asarray(p.fov).tolist(), "samples": int(p.samples or settings.samples)}
                       for p in passes],
        }
        job_path = out_dir / "job.json"
        job_path.write_text(json.dumps(job))
        log_path = out_dir / "worker.log"
        env = worker_env()
        # Blender's own temp dir (blender_XXXX) lands under out_dir, which is removed below even after a kill
        (out_dir / "tmp").mkdir()
        env["TMPDIR"] = str(out_dir / "tmp")
        t0 = time.time()
        timed_out = f"blender timed out after {settings.timeout_s:g} s (worker killed)"
        if warm is not None:
            code = warm.run(str(job_path), settings.timeout_s)
            if code is None:
                return RenderResult(False, timed_out, log_tail=_tail(log_path))
        else:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([sys.executable, str(WORKER), str(job_path)], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True, cwd=str(out_dir))
                try:
                    code = proc.wait(timeout=settings.timeout_s)
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    return RenderResult(False, timed_out, log_tail=_tail(log_path))
                except BaseException:
                    _kill_group(proc)
                    raise
        wall = time.time() - t0
        err_file = out_dir / "error.json"
        if err_file.exists():
            err = json.loads(err_file.read_text())
            return RenderResult(False, err["error"], info={"wall": err.get("wall")}, log_tail=_tail(log_path))
        if code != 0:
            if code < 0:
                what = f"blender worker killed by signal {signal.Signals(-code).name}"
            else:
                what = f"blender worker exited with status {code}"
            if settings.memory_limit_mb:
                what += f" (memory cap {settings.memory_limit_mb} MiB)"
            return RenderResult(False, what, log_tail=_tail(log_path))
        info = json.loads((out_dir / "result.json").read_text())
        info["wall_s"] = wall
        images = {}
        for p in passes:
            files = [out_dir / p.name / f"{i:03d}.png" for i in range(len(p.fov))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                return RenderResult(False, f"{p.name}: {len(missing)} views not written", log_tail=_tail(log_path))
            images[p.name] = [f.read_bytes() for f in files]
        vertices = faces = None
        if export_mesh:
            with np.load(out_dir / "mesh.npz") as z:
                vertices, faces = z["vertices"], z["faces"]
        return RenderResult(True, images=images, vertices=vertices, faces=faces, info=info, log_tail=_tail(log_path))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-n:].decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------------------------
# Row stage
# ---------------------------------------------------------------------------------------------------------

class Render:
    """Row stage: asset bytes -> feature views, condition views (cropped), cameras, normalised mesh.

    Reads `cfg.render`, `cfg.cond` and `cfg.storage` (pipelines.preprocess.config.PreprocessConfig). Before Blender sees
    the asset: every external reference is checked (pipelines.preprocess.asset_refs) and, for the formats parsed without
    a renderer, the raw geometry (pipelines.preprocess.mesh_check).
    """

    name = "render"
    outputs = ("views", "views_c2w", "views_fov", "mesh_ply", "cond_images", "cond_c2w", "cond_fov", "cond_crop",
               "render_info", "asset_checks", "sandbox")
    drops = ("mesh_bytes",)
    resources = {"num_cpus": 1}

    def __init__(self, cfg: "PreprocessConfig"):
        r, c = cfg.render, cfg.cond
        self.storage_cfg = cfg.storage
        self.num_views, self.resolution = r.num_views, r.resolution
        self.radius, self.fov_deg, self.seed = r.radius, r.fov_deg, r.seed
        self.export_mesh = r.export_mesh
        if r.engine.upper() != "CYCLES":
            raise ValueError(f"render.engine {r.engine!r}: only CYCLES is supported (EEVEE is ~80x slower headless)")
        self.settings = RenderSettings(
            samples=r.samples, denoise=r.denoise, device=r.device, threads=r.threads, timeout_s=r.timeout_s,
            memory_limit_mb=r.memory_limit_mb, view_transform=r.view_transform, bottom_light_up=r.bottom_light_up,
            allow_unsandboxed=r.allow_unsandboxed)
        if r.allow_unsandboxed:
            log.warning("render.allow_unsandboxed is set: where the worker's sandbox cannot be set up, assets are "
                        "imported and rendered WITHOUT it (each such row records sandbox=none)")
        self.cond_enabled = c.enabled and c.num_views > 0
        self.cond_views, self.cond_resolution = c.num_views, c.render_resolution
        self.cond_samples = c.samples
        self.cond_image_size, self.cond_margin = c.image_size, c.crop_margin
        self.cond_format, self.cond_jpeg_quality = c.image_format, c.jpeg_quality
        self.warm_workers = r.warm_workers
        self.unscannable_ok = frozenset(r.unscannable_formats)
        self.max_pixels = r.max_image_pixels
        self._idle: list[WarmWorker] = []  # one per concurrent call (Ray calls one at a time; tests use threads)
        self._lock = threading.Lock()

    def _render(self, *args, **kwargs) -> RenderResult:
        if not self.warm_workers:
            return render_file(*args, **kwargs)
        with self._lock:
            warm = self._idle.pop() if self._idle else None
        try:
            if warm is None:
                warm = WarmWorker()
            res = render_file(*args, warm=warm, **kwargs)
        except WarmWorkerError as e:
            # the warm worker failed to start, got stuck or was killed from outside: not this asset's doing.
            # Render it in a fresh process (same wall, caps and timeout); the next asset gets a new warm worker.
            if warm is not None:
                warm.close()
            log.warning("render: %s; rendering this asset in a fresh process", e)
            return render_file(*args, **kwargs)
        with self._lock:
            self._idle.append(warm)
        return res

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; the warm workers end when their pipes close
            pass

    def cameras(self, sha256: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        rng = asset_rng(sha256, self.seed)
        out = {"views": feature_cameras(self.num_views, rng.random(2), self.radius, self.fov_deg)}
        if self.cond_enabled:
            out["cond"] = cond_cameras(self.cond_views, rng.random(2), rng)
        return out

    def __call__(self, row: dict) -> dict:
        row.setdefault("sandbox", None)
        cams = self.cameras(row.get("sha256"))
        with tempfile.TemporaryDirectory(prefix="mdt-render-") as tmp:
            tmp = Path(tmp)
            try:
                from pipelines.preprocess.download import materialize_mesh  # optional: pipelines

                path = Path(materialize_mesh(row, tmp / "asset", self.storage_cfg))
            except Exception as e:  # noqa: BLE001
                return fail(row, self.name, f"cannot materialise asset: {type(e).__name__}: {e}")
            fmt = (row.get("mesh_format") or path.suffix).lower().lstrip(".")
            # the coverage table's format/encoding, on failed rows too
            row["asset_checks"] = json.dumps({"encoding": asset_encoding(path, fmt)})
            try:
                checks = pre_import_checks(path, tmp / "asset", fmt, self.unscannable_ok, self.max_pixels)
            except (ExternalReferenceError, MeshError, ValueError) as e:
                return fail(row, self.name, str(e))
            passes = [RenderPass("views", self.resolution, *cams["views"])]
            if self.cond_enabled:
                passes.append(RenderPass("cond", self.cond_resolution, *cams["cond"], samples=self.cond_samples))
            res = self._render(path, fmt, passes, self.settings, self.export_mesh, tmp, bundle_dir=tmp / "asset")
        row["sandbox"] = res.info.get("wall") or ("unavailable" if (res.error or "").startswith("no sandbox")
                                                  else "unknown")  # killed before it said
        if not res.ok:
            return fail(row, self.name, res.error)
        if row["sandbox"] not in ("namespace", "userns") and not self.settings.allow_unsandboxed:
            return fail(row, self.name, f"no sandbox: worker reported {row['sandbox']!r}")
        if all(is_blank(png) for pngs in res.images.values() for png in pngs):
            return fail(row, self.name, "blank render (every view empty or black)")
        checks["warnings"] = list(res.info.get("warnings") or [])
        row["asset_checks"] = json.dumps(checks, sort_keys=True)

        row["views"] = res.images["views"]
        row["views_c2w"] = pack_array(cams["views"][0])
        row["views_fov"] = pack_array(cams["views"][1])
        row["mesh_ply"] = mesh_to_ply(res.vertices, res.faces) if self.export_mesh else None
        if self.cond_enabled:
            from mdt.conditioning import crop_condition_image, encode_image  # heavy: PIL, torch

            images, boxes = [], []
            for png in res.images["cond"]:
                img, box = crop_condition_image(png, size=self.cond_image_size, margin=self.cond_margin)
                images.append(encode_image(img, self.cond_format, self.cond_jpeg_quality))
                boxes.append(box)
            row["cond_images"] = images
            row["cond_c2w"] = pack_array(cams["cond"][0])
            row["cond_fov"] = pack_array(cams["cond"][1])
            row["cond_crop"] = pack_array(np.asarray(boxes, np.float32).reshape(-1, 4))
        else:
            row["cond_images"] = row["cond_c2w"] = row["cond_fov"] = row["cond_crop"] = None
        info = dict(res.info)
        info.update(samples=self.settings.samples, engine="CYCLES", resolution=self.resolution,
                    num_views=self.num_views, cond_views=self.cond_views if self.cond_enabled else 0,
                    cond_resolution=self.cond_resolution)
        row["render_info"] = json.dumps(info, sort_keys=True)
        return row


def pre_import_checks(path: Path, root: Path, fmt: str, unscannable_ok=frozenset(),
                      max_pixels: int = MAX_PIXELS) -> dict:
    """External references and content rules (always; pipelines.preprocess.asset_content) and raw geometry (formats
    parsed without Blender) of a materialised asset. Raises ExternalReferenceError / MeshError / ContentError;
    returns what was checked, for the ledger's stats. A file the cheap parser cannot read is left to Blender's
    importer and the worker's own checks."""
    files = check_tree(path, root)
    check_bundle(files, Path(path).relative_to(root).as_posix(), unscannable_ok, max_pixels)
    checks: dict = {"references": "checked", "content": "checked", "encoding": asset_encoding(path, fmt)}
    if fmt in PARSED_FORMATS:
        try:
            v, f = parse_mesh(path, fmt)
        except CompressedGeometry as e:  # the worker checks the decoded scene by the same rule
            checks["raw_geometry"] = f"{e}: checked on the imported scene"
        except MeshError as e:
            if not str(e).startswith("not a readable"):
                raise
            checks["raw_geometry"] = "unparsed"
        else:
            checks.update(check_geometry(v, f))
    return checks


def is_blank(png: bytes) -> bool:
    """True for an image with nothing visible: fully transparent, or black wherever it is opaque."""
    from PIL import Image  # heavy: PIL

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    visible = a[..., 3] > 0
    return not visible.any() or int(a[..., :3][visible].max()) == 0
