"""Helpers for the pipeline tests: a loopback HTTP server with scripted failures, a moto S3 server, one
shared Ray head per test session (started once, stopped by PID at exit), and stand-in dataset archives."""
from __future__ import annotations

import atexit
import gzip
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_port_args(port: int, dashboard_port: int | None = None) -> list[str]:
    """Explicit, pairwise distinct ports for every component of a `ray start --head` on port ``port``.

    Worker ports go below Linux's ephemeral range (32768-), where ``free_port`` never lands; the other
    components get free ephemeral ports, never the same one twice (Ray refuses to start on a clash)."""
    wbase = 10000 + (port % 100) * 150
    taken = set(range(wbase, wbase + 150)) | {port, dashboard_port}

    def another() -> int:
        while (p := free_port()) in taken:
            pass
        taken.add(p)
        return p

    return [f"--node-manager-port={another()}", f"--object-manager-port={another()}",
            f"--ray-client-server-port={another()}", f"--dashboard-agent-listen-port={another()}",
            f"--dashboard-agent-grpc-port={another()}", f"--runtime-env-agent-port={another()}",
            f"--metrics-export-port={another()}", f"--min-worker-port={wbase}", f"--max-worker-port={wbase + 149}"]


def ray_job_submit(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a `ray job submit` command, retrying while the head's job agent has not registered yet (it comes
    up a little after the dashboard answers: "No available agent"), for at most 90 s."""
    t0 = time.time()
    while True:
        r = subprocess.run(cmd, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.time() - t0 > 90:
            return r
        time.sleep(3)


def stop_process_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the whole process group a test started (servers spawn helpers), SIGKILL it after ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------ HTTP


class Route:
    """What the server answers for one path: ``fail_first`` answers 503 before serving ``body``."""

    def __init__(self, body: bytes = b"", status: int = 200, fail_first: int = 0, delay_s: float = 0.0,
                 send_length: bool = True, require_auth: str | None = None):
        self.body, self.status, self.fail_first = body, status, fail_first
        self.delay_s, self.send_length, self.require_auth = delay_s, send_length, require_auth
        self.hits = 0


class LoopbackHTTP:
    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                route = server.routes.get(path)
                with server.lock:
                    server.active += 1
                    server.peak = max(server.peak, server.active)
                try:
                    if route is None:
                        return self._send(404, b"not found")
                    route.hits += 1
                    if route.delay_s:
                        time.sleep(route.delay_s)
                    if route.require_auth and self.headers.get("Authorization") != f"Bearer {route.require_auth}":
                        return self._send(401, b"unauthorized")
                    if route.hits <= route.fail_first:
                        return self._send(503, b"try later")
                    self._send(route.status, route.body, route.send_length)
                finally:
                    with server.lock:
                        server.active -= 1

            def _send(self, status, body, send_length=True):
                self.send_response(status)
                if send_length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                if not send_length:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def add(self, path: str, **kw) -> str:
        self.routes[path] = Route(**kw)
        return self.url(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------ S3 (moto)


class MotoS3:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        for k, v in S3_ENV.items():
            os.environ.setdefault(k, v)
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self):
        self.server.stop()


# ------------------------------------------------------------------------------------------ Ray head


class RayHead:
    """``ray start --head --block`` in its own process group; stopped by killing that group (never ray stop)."""

    def __init__(self, dashboard: bool = False, num_cpus: int = 2, own_address: bool = False):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = free_port() if dashboard else None
        env = {**os.environ, **S3_ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
               # `python` in a job's entrypoint is the cluster's Python: here, the project's venv
               "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        if own_address:  # every process the head starts (job entrypoints) joins this head, not "the latest" Ray
            env["RAY_ADDRESS"] = self.address
        # Every port explicit: fixed defaults (agent 52365, metrics, ...) clash with other Ray instances on
        # a shared machine, and an agent that cannot bind leaves the head without job submission.
        cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={self.port}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               f"--include-dashboard={'true' if dashboard else 'false'}",
               *ray_port_args(self.port, self.dashboard_port)]
        if dashboard:
            cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        self.log = open(f"/tmp/mdt-test-ray-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._wait()
        atexit.register(self.stop)

    def _wait(self, timeout: float = 90):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
                if self.dashboard_port is None:
                    time.sleep(1.0)
                    return
                import urllib.request

                urllib.request.urlopen(f"http://127.0.0.1:{self.dashboard_port}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("ray head did not come up")

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self):
        stop_process_group(self.proc, timeout=8)
        self.log.close()


_SHARED: RayHead | None = None


def shared_ray_head() -> RayHead:
    """One dashboard-less Ray head for all pipeline tests of this pytest process."""
    global _SHARED
    if _SHARED is None:
        _SHARED = RayHead(dashboard=False, num_cpus=2)
    return _SHARED


def connect_ray():
    """Connect this process to the shared head (disconnect with ray.shutdown(); the head keeps running)."""
    import ray

    head = shared_ray_head()
    if not ray.is_initialized():
        ray.init(address=head.address, log_to_driver=False)
    return head


# ------------------------------------------------------------------------------------------ stand-ins


def glb_bytes(seed: int = 0) -> bytes:
    """A tiny valid GLB (a box) — stands in for a real asset where only bytes matter."""
    import trimesh

    m = trimesh.creation.box(extents=(1.0 + 0.01 * seed, 1.0, 1.0))
    return trimesh.Scene(m).export(file_type="glb")


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)  # writestr keeps '../' names verbatim: exactly the hostile case
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None, mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tf.addfile(ti)
    return buf.getvalue()


def write_gz_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        json.dump(obj, f)


def obj_asset() -> dict[str, bytes]:
    """An OBJ with an MTL and a texture (3D-FUTURE-like)."""
    obj = (b"mtllib model.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nusemtl m\nf 1/1 2/2 3/3\n")
    mtl = b"newmtl m\nKd 1 1 1\nmap_Kd -bm 1.0 texture.png\n"
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return {"raw_model.obj": obj, "model.mtl": mtl, "texture.png": buf.getvalue()}


def run_job(args: list[str], env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    e = {**os.environ, **S3_ENV, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
         "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    return subprocess.run([sys.executable, str(PROJECT_ROOT / "jobs" / "preprocess.py"), *args], env=e,
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ injected stage


class SleepOrFail:
    """A stage tests insert with ``stages=[download, tests._pipeline_helpers:SleepOrFail, stand_in]``: it
    sleeps ``sleep_s`` per row (makes a run long enough to be killed in the middle) and fails rows whose
    file_identifier contains ``fail``, both read from ``<output>/../sleep_or_fail.json`` (the test writes it
    before each run; the Ray workers read it, whatever cluster they run on)."""

    name = "test_hook"
    outputs = ()
    drops = ()
    resources = {"num_cpus": 0.25}

    def __init__(self, cfg):
        p = Path(cfg.output).parent / "sleep_or_fail.json"
        settings = json.loads(p.read_text()) if p.exists() else {}
        self.seconds = float(settings.get("sleep_s", 0))
        self.pattern = settings.get("fail", "")

    def __call__(self, row: dict) -> dict:
        if self.seconds:
            time.sleep(self.seconds)
        if self.pattern and self.pattern in row["file_identifier"]:
            raise RuntimeError(f"injected failure for {row['file_identifier']}")
        return row


def set_sleep_or_fail(out: Path, sleep_s: float = 0.0, fail: str = "") -> None:
    (Path(out).parent / "sleep_or_fail.json").write_text(json.dumps({"sleep_s": sleep_s, "fail": fail}))


# ------------------------------------------------------------------------------------------ hostile assets

GOOD_GLBS = ("kenney_ladder.glb", "quaternius_fence.glb")
TRIANGLE = b"".join(__import__("struct").pack("<3f", *v) for v in ((0, 0, 0), (1, 0, 0), (0, 1, 0)))


def _gltf_doc(uri: str, byte_length: int) -> dict:
    return {"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
            "meshes": [{"primitives": [{"attributes": {"POSITION": 0}}]}],
            "accessors": [{"bufferView": 0, "componentType": 5126, "count": 3, "type": "VEC3",
                           "min": [0, 0, 0], "max": [1, 1, 0]}],
            "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": len(TRIANGLE)}],
            "buffers": [{"uri": uri, "byteLength": byte_length}]}


def _glb_json_only(doc: dict) -> bytes:
    import struct

    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    body = struct.pack("<II", len(text), 0x4E4F534A) + text
    return b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body


def make_hostile_assets(root: Path, glb_dir: Path) -> tuple[Path, bytes, dict[str, tuple[str, str]]]:
    """A ``local:`` folder of real GLBs plus crafted hostile and broken files, and files outside it that the
    crafted ones point at. Returns (folder, canary marker, {file_identifier: (outcome, reason prefix)}) where
    outcome is ``done``, ``skipped`` or ``failed``; each outside file holds the marker, which must never show
    up in any output."""
    import uuid

    marker = f"MDT-CANARY-{uuid.uuid4().hex}".encode()
    outside = root / "outside"
    outside.mkdir(parents=True)
    canary = outside / "canary.bin"  # a valid triangle buffer: imported, it would make a "good" asset
    canary.write_bytes(TRIANGLE + marker)
    (outside / "evil.mtl").write_bytes(b"newmtl m\nKd 1 1 1\n# " + marker + b"\n")
    (outside / "canary.png").write_bytes(marker)
    planted = outside / "planted.glb"
    planted.write_bytes((glb_dir / GOOD_GLBS[0]).read_bytes()[:-4] + marker[:4])
    d = root / "assets"
    d.mkdir()
    out: dict[str, tuple[str, str]] = {}
    for name in GOOD_GLBS:
        (d / name).write_bytes((glb_dir / name).read_bytes())
        out[name] = ("done", "")
    (d / "copy_of_ladder.glb").write_bytes((glb_dir / GOOD_GLBS[0]).read_bytes())
    out["copy_of_ladder.glb"] = ("skipped", "skipped: duplicate of")
    n = len(TRIANGLE) + len(marker)
    ext = "external reference outside the asset"
    for kind, uri in (("absolute", str(canary)), ("escaping", "../outside/canary.bin"),
                      ("url", "http://127.0.0.1:9/canary.bin")):
        (d / f"{kind}_buffer.gltf").write_text(json.dumps(_gltf_doc(uri, n)))
        (d / f"{kind}_buffer.glb").write_bytes(_glb_json_only(_gltf_doc(uri, n)))
        out[f"{kind}_buffer.gltf"] = out[f"{kind}_buffer.glb"] = ("failed", ext)
    (d / "mtllib_outside.obj").write_text("mtllib ../outside/evil.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    out["mtllib_outside.obj"] = ("failed", ext)
    (d / "objtex").mkdir()
    (d / "objtex" / "model.obj").write_text("mtllib model.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nusemtl m\nf 1 2 3\n")
    (d / "objtex" / "model.mtl").write_text(f"newmtl m\nKd 1 1 1\nmap_Kd -bm 1.0 {outside / 'canary.png'}\n")
    out["objtex/model.obj"] = ("failed", ext)
    (d / "linked").mkdir()
    (d / "linked" / "linked.gltf").write_text(json.dumps(_gltf_doc("data.bin", n)))
    (d / "linked" / "data.bin").symlink_to(canary)
    out["linked/linked.gltf"] = ("failed", ext)
    (d / "symlinked_main.glb").symlink_to(planted)
    out["symlinked_main.glb"] = ("failed", ext)
    (d / "nan_vertex.ply").write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                                      "property float z\nelement face 1\nproperty list uchar int vertex_indices\n"
                                      "end_header\n0 0 0\n1 0 nan\n0 1 0\n3 0 1 2\n")
    out["nan_vertex.ply"] = ("failed", "non-finite vertex positions")
    (d / "inf_vertex.obj").write_text("v 0 0 0\nv 1 0 inf\nv 0 1 0\nf 1 2 3\n")
    out["inf_vertex.obj"] = ("failed", "non-finite vertex positions")
    (d / "out_of_range.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\nf 1 2 7\n")
    out["out_of_range.obj"] = ("failed", "face indices out of range")
    (d / "zero_area.obj").write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nv 3 0 0\nf 1 2 3\nf 2 3 4\n")
    out["zero_area.obj"] = ("failed", "zero total surface area")
    good = (glb_dir / GOOD_GLBS[1]).read_bytes()
    (d / "truncated.glb").write_bytes(good[: len(good) // 2])
    out["truncated.glb"] = ("failed", "")
    (d / "not_a_mesh.glb").write_bytes(b"this is a text file, not a mesh\n" * 8)
    out["not_a_mesh.glb"] = ("failed", "")
    out.update(add_deny_by_default_cases(d, outside, marker, glb_dir))
    return d, marker, out


def add_deny_by_default_cases(d: Path, outside: Path, marker: bytes, glb_dir: Path) -> dict[str, tuple[str, str]]:
    """Constructions that walk around a checker reading names instead of content (see
    tests/test_pipeline_hostile_units.py for each alone); files under ``outside`` hold ``marker``."""
    import base64
    import gzip
    import struct
    import zlib

    import zstandard

    ext = "external reference outside the asset"
    canary = outside / "canary.bin"
    n = canary.stat().st_size
    out: dict[str, tuple[str, str]] = {}
    (outside / "dir_asset").mkdir()  # a directory symlink: never entered, so its asset is never a row
    (outside / "dir_asset" / "tree.glb").write_bytes((glb_dir / "kenney_tree.glb").read_bytes() + marker)
    (d / "linked_dir").symlink_to(outside / "dir_asset", target_is_directory=True)
    (d / "json_in.glb").write_text(json.dumps(_gltf_doc(str(canary), n)))
    out["json_in.glb"] = ("failed", "content is not glb")
    for name, uri in (("data_no_base64", f"data:{canary}"), ("data_plain", f"data:text/plain,{canary}"),
                      ("proc_environ", "/proc/self/environ"), ("dev_zero", "/dev/zero"),
                      ("proc_file_uri", "file:///proc/self/environ")):
        (d / f"{name}.gltf").write_text(json.dumps(_gltf_doc(uri, n)))
        out[f"{name}.gltf"] = ("failed", ext)
    (d / "binary.usdc").write_bytes(b"PXR-USDC" + b"\x00" * 80 + str(canary).encode())
    out["binary.usdc"] = ("failed", "unscannable format: usdc")
    (d / "binary_named.usd").write_bytes(b"PXR-USDC" + b"\x00" * 80 + str(canary).encode())
    out["binary_named.usd"] = ("failed", "unscannable format: usdc")
    (d / "packaged.usdz").write_bytes(b"PK\x03\x04" + b"\x00" * 80 + str(canary).encode())
    out["packaged.usdz"] = ("failed", "unscannable format: usdz")
    (d / "expression.usda").write_text('#usda 1.0\ndef Xform "a" (references = @${OUT}/canary.usda@) {}\n')
    out["expression.usda"] = ("failed", ext)
    body = "\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"
    for name, line in (("ctrl_mtllib", "\x01mtllib ../outside/evil.mtl"), ("vt_mtllib", "\x0bmtllib ../outside/evil.mtl"),
                       ("quoted_mtllib", 'mtllib "../outside/evil.mtl"')):
        (d / f"{name}.obj").write_text(line + body)
        out[f"{name}.obj"] = ("failed", ext)
    blend = tiny_blend(body=b"//../outside/canary.png\x00")
    c = zstandard.ZstdCompressor()
    (d / "frames.blend").write_bytes(c.compress(blend[:40]) + c.compress(blend[40:]))
    out["frames.blend"] = ("failed", ext)
    (d / "gzip_members.blend").write_bytes(gzip.compress(blend[:40]) + gzip.compress(blend[40:]))
    out["gzip_members.blend"] = ("failed", ext)
    (d / "import_node.blend").write_bytes(c.compress(tiny_blend(body=b"GeometryNodeImportText\x00")))
    out["import_node.blend"] = ("failed", "blend file holds a geometry-node import node")
    (d / "mesh_cache.blend").write_bytes(tiny_blend(((b"DATA", "MeshCacheModifierData"),)))
    out["mesh_cache.blend"] = ("failed", "blend file holds a Mesh Cache modifier")
    (d / "seq_cache.blend").write_bytes(tiny_blend(((b"DATA", "MeshSeqCacheModifierData"),)))
    out["seq_cache.blend"] = ("failed", "blend file holds a Mesh Sequence Cache modifier")
    # the same .gltf beside two different .bin files: two assets (each fails on its own geometry), not duplicates
    for sub, y in (("swap_a", 0.0), ("swap_b", 1.0)):
        (d / sub).mkdir()
        flat = b"".join(struct.pack("<3f", *v) for v in ((0, y, 0), (1, y, 0), (2, y, 0)))
        (d / sub / "m.bin").write_bytes(flat)
        (d / sub / "m.gltf").write_text(json.dumps(_gltf_doc("m.bin", len(flat))))
        out[f"{sub}/m.gltf"] = ("failed", "")
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 6, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    doc = _gltf_doc("data:application/octet-stream;base64," + base64.b64encode(TRIANGLE).decode(), len(TRIANGLE))
    doc["images"] = [{"uri": "data:image/png;base64," + base64.b64encode(bomb).decode()}]
    (d / "pixel_bomb.gltf").write_text(json.dumps(doc))
    out["pixel_bomb.gltf"] = ("failed", "pixel cap: png image of 20000x20000 pixels")
    doc = _gltf_doc("data:application/octet-stream;base64," + base64.b64encode(TRIANGLE).decode(), len(TRIANGLE))
    doc["accessors"][0]["count"] = 1 << 30
    (d / "accessor_bomb.gltf").write_text(json.dumps(doc))
    out["accessor_bomb.gltf"] = ("failed", "glTF accessor 0 count")
    (d / "scene.dae").write_text(f"<?xml version='1.0'?><COLLADA><init_from>{canary}</init_from></COLLADA>")
    out["scene.dae"] = ("failed", "unsupported format 'dae'")
    return out


def files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
            hits.append(str(p))
    return hits


def tiny_blend(blocks: tuple[tuple[bytes, str], ...] = (), body: bytes = b"") -> bytes:
    """A minimal well-formed .blend (old 12-byte header, 64-bit little-endian): a DNA1 block naming the
    struct types of ``blocks`` ((block code, struct type name), each 8 zero bytes; the struct name must exist
    in Blender for a real file) and ``body`` in one DATA block, then ENDB."""
    import struct

    types = ["int", *dict.fromkeys(t for _, t in blocks)]

    def pad(b: bytes) -> bytes:
        return b + b"\x00" * (-len(b) % 4)

    dna = pad(b"SDNANAME" + struct.pack("<i", 1) + b"x\x00")
    dna += pad(b"TYPE" + struct.pack("<i", len(types)) + b"".join(t.encode() + b"\x00" for t in types))
    dna += pad(b"TLEN" + struct.pack(f"<{len(types)}h", *([4] * len(types))))
    dna += b"STRC" + struct.pack("<i", len(types) - 1) + b"".join(struct.pack("<hh", i, 0)
                                                                  for i in range(1, len(types)))

    def block(code: bytes, sdna: int, data: bytes) -> bytes:
        return struct.pack("<4siQii", code, len(data), 0x1000, sdna, 1) + data

    out = b"BLENDER-v300"
    for code, t in blocks:
        out += block(code, types.index(t) - 1, b"\x00" * 8)
    out += block(b"DATA", 0, body) if body else b""
    return out + block(b"DNA1", 0, dna) + block(b"ENDB", 0, b"")
