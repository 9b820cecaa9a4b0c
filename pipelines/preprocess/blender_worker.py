"""Blender (bpy) side of the render stage; one asset per process.

    python blender_worker.py <job.json>     # cold: start, run one job, exit
    python blender_worker.py --serve        # warm: a started interpreter that forks a child per job (`serve`)

This file is a standalone script on purpose: it imports only the standard library, numpy and bpy, so a
crash, hang or runaway allocation inside Blender only ever takes this process down, and the parent
(`pipelines.preprocess.render`) can kill it. The job file (JSON) says:

    input            path of the asset's main file
    format           glb gltf obj ply fbx stl blend (case-insensitive)
    out_dir          where to write results
    memory_limit_mb  address-space cap for this process (0 = none), applied before bpy is imported
    threads          Cycles CPU threads (0 = Blender's choice)
    device           "auto" (GPU when Cycles finds one, else CPU), "cpu" or "gpu"
    samples, denoise, view_transform, bottom_light_up
    passes[].samples overrides samples for that pass
    export_mesh      write mesh.npz (normalised, triangulated, world coordinates)
    passes           [{"name": str, "resolution": int, "c2w": [[4x4], ...], "fov": [rad, ...]}]

Outputs under out_dir: `<pass name>/<i:03d>.png` (RGBA), `mesh.npz` (vertices float32 [V, 3], faces int32
[F, 3]), `result.json` (scale, offset, device, timings). On a handled failure it writes `error.json`
(`{"error": "<short reason>"}`) and exits with status 3.

`bpy` is imported inside the sandbox, by the process that renders: importing it starts oneTBB's worker
threads, which a fork does not copy, so a child forked after the import renders on one thread (6 views at 512 px,
16 samples, 2 cores: 11.3 s forked after the import, 5.9 s imported after the last fork).

The sandbox (`confine`), entered before the asset is opened and mandatory: the worker forks (so that it is
single-threaded) and enters new mount, PID, network, IPC and UTS namespaces, directly where it holds
CAP_SYS_ADMIN (mode "namespace") or inside an unprivileged user namespace that maps only its own uid/gid (mode
"userns", how a non-root container runs). Inside: an empty tmpfs made the root with pivot_root (the old root
detached), holding only the bundle and output directories (read-write), the Python installation, bpy and the
system library directories (read-only) and /dev/null, /dev/urandom, /dev/random (+ GPU device nodes unless the
device is "cpu"); no /proc, /sys, /etc, /home or /tmp of the host; the environment emptied but for PATH, locale
and GPU selection; every capability dropped with securebits locked, no_new_privs, and a seccomp filter that
refuses network sockets (AF_UNIX only), ptrace and process_vm_*, mount / namespace / keyring / bpf / perf /
io_uring / module syscalls and namespace flags on clone. Where it cannot be set up the asset fails with
`no sandbox: <why>`; only a job with `allow_unsandboxed` renders without it (mode "none", warned on stderr).
The mode goes into result.json / error.json (`wall`). `blender_worker.py --check-sandbox` enters it and prints
what is reachable inside (exit 0 when it holds). After import, any image, library, sound, font, movie clip or
cache file whose path resolves outside the bundle (and is not packed into the file) fails the asset.

Safety: Python auto-execution stays off: the preference is cleared before anything is loaded and .blend
files are opened with `use_scripts=False`, so registered text blocks, drivers with Python expressions and
app handlers stored in the file do not run.

Scene conventions (TRELLIS data toolkit, render step): Blender world, Z up. Every root object is parented to
one empty; the empty scales the scene so the largest side of its bounding box is 1 and moves the box centre
to the origin. Lights: point 1000 W at (4, 1, 6); area 10000 W at (0, 0, 10), scale 100; area 1000 W at
(0, 0, -10). No world lighting. Cycles, box pixel filter of width 1, diffuse/glossy bounces 1,
transparent/transmission bounces 3, transparent film, RGBA PNG. Camera sensor 32 mm, focal 16 / tan(fov/2).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import traceback
import ctypes
import importlib.util
import tempfile
import errno
import socket
import re
import struct
import logging
import base64
import urllib.parse
import zlib
import select

EXIT_HANDLED = 3
MESH_TYPES = {"MESH", "CURVE", "SURFACE", "FONT", "META"}


class AssetError(Exception):
    """A failure with a short reason that is reported as is."""


def _limit_memory(mb: int) -> None:
    if mb and mb > 0:
        limit = int(mb) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_PRIVATE, MS_RELATIME, MNT_DETACH = 1024, 2048, 1 << 18, 1 << 21, 2
SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
DEVICES = ("/dev/null", "/dev/urandom", "/dev/random")  # no /dev/zero: an endless file for a "buffer"
GPU_DEVICE_PREFIXES = ("/dev/nvidia", "/dev/dri")
ENV_KEEP = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
            "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "OMP_NUM_THREADS")
# seccomp: (AUDIT_ARCH, syscalls refused with EPERM, socket, clone). Refused: tracing and reading other
# processes, (un)mounting and namespaces, kernel keyrings, BPF, perf, io_uring, module and kexec loading,
# handle-based opens (escape a bind mount), kcmp / pidfd_getfd.
SECCOMP_ARCH = {
    "x86_64": (0xC000003E, (101, 310, 311, 165, 166, 155, 161, 272, 308, 321, 298, 250, 248, 249, 323, 246, 320,
                            175, 313, 176, 425, 426, 427, 304, 303, 430, 432, 429, 428, 442, 169, 167, 163, 103,
                            312, 438), 41, 56),
    "aarch64": (0xC00000B7, (117, 270, 271, 40, 39, 41, 51, 97, 268, 280, 241, 219, 217, 218, 282, 104, 294, 105,
                             273, 106, 425, 426, 427, 265, 264, 430, 432, 429, 428, 442, 142, 224, 89, 116, 272,
                             438), 198, 220),
}
CLONE3_NR = 435  # the same on x86_64 and aarch64
SANDBOX_MODES = ("namespace", "userns")  # "none": only where the job allows running without the sandbox


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(libc, src, target, fstype, flags, data=None) -> None:
    enc = (lambda x: None if x is None else os.fsencode(x))
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes_get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def ctypes_get_errno() -> int:
    return ctypes.get_errno()


def _fork_and_wait() -> None:
    """Fork; the parent waits and exits with the child's status, the child returns (and carries on)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _enter_namespaces(libc) -> str:
    """Private mount, PID, network, IPC and UTS namespaces: directly with CAP_SYS_ADMIN ("namespace"), else
    inside a new user namespace that maps only this uid/gid ("userns"). Raises OSError with the reason."""
    if libc.unshare(NAMESPACES) == 0:
        return "namespace"
    first = os.strerror(ctypes_get_errno())
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | NAMESPACES) != 0:
        err = ctypes_get_errno()
        raise OSError(err, f"namespaces not permitted ({first}); user namespace: {os.strerror(err)}"
                           " (kernel.unprivileged_userns_clone / user.max_user_namespaces, or a seccomp profile"
                           " that blocks unshare)")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    return "userns"


def _locked_flags(path: str) -> int:
    """Mount flags of ``path``'s mount that a bind remount must keep (a user namespace may not clear them)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _new_root(libc, bundle_dir: str, out_dir: str, gpu: bool) -> None:
    """An empty tmpfs holding only the bundle and output directories (read-write), Python, bpy, the system
    library directories and a few devices (read-only), made the root with pivot_root; the old root is
    detached, so no path leads back to it. No /proc, /sys, /etc, /home or /tmp of the host."""

    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    root = tempfile.mkdtemp(prefix="mdt-wall-", dir=os.path.dirname(out_dir))
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=755")
    spec = importlib.util.find_spec("bpy")
    bpy_dir = os.path.dirname(os.path.abspath(spec.origin)) if spec and spec.origin else None
    # Python and bpy, under their real paths and under the (possibly symlinked) paths Blender derives its
    # data-file locations from
    dirs = [d for d in (sys.prefix, sys.base_prefix, sys.exec_prefix, bpy_dir) if d]
    python_dirs = {os.path.abspath(p) for p in dirs} | {os.path.realpath(p) for p in dirs}
    ro = [d for d in (*SYSTEM_DIRS, *sorted(python_dirs)) if os.path.isdir(d)]
    devices = list(DEVICES)
    if gpu and os.path.isdir("/dev"):
        devices += sorted(os.path.join("/dev", n) for n in os.listdir("/dev")
                          if os.path.join("/dev", n).startswith(GPU_DEVICE_PREFIXES))
    binds = [(d, True) for d in ro] + [(d, False) for d in devices if os.path.exists(d)]
    binds += [(os.path.realpath(bundle_dir), False), (os.path.realpath(out_dir), False)]
    for src, read_only in binds:
        dst = root + src
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "a").close()
        _mount(libc, src, dst, None, MS_BIND | MS_REC)
        if read_only:
            _mount(libc, None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | _locked_flags(src))
    os.makedirs(root + "/tmp", exist_ok=True)
    os.makedirs(root + "/.old-root", exist_ok=True)
    pivot_root = {"x86_64": 155, "aarch64": 41}[os.uname().machine]
    if libc.syscall(pivot_root, os.fsencode(root), os.fsencode(root + "/.old-root")) != 0:
        err = ctypes_get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    os.chdir("/")
    if libc.umount2(b"/.old-root", MNT_DETACH) != 0:
        err = ctypes_get_errno()
        raise OSError(err, f"detach the old root: {os.strerror(err)}")
    os.rmdir("/.old-root")


def _drop_privileges(libc) -> None:
    """Every capability dropped (bounding set, ambient, effective / permitted / inheritable; securebits locked
    so uid 0 regains none on exec), then no_new_privs."""

    if libc.prctl(28, 0xEF, 0, 0, 0) != 0:  # PR_SET_SECUREBITS: NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE (+ locks)
        raise OSError(ctypes_get_errno(), "securebits")
    for cap in range(64):
        if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes_get_errno() == 22:  # PR_CAPBSET_DROP; EINVAL: no such cap
            break
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        raise OSError(ctypes_get_errno(), "capset")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes_get_errno(), "no_new_privs")


def _seccomp(libc) -> None:
    """A seccomp filter: other architectures' (and x32) syscalls kill the process; the syscalls of
    SECCOMP_ARCH fail with EPERM; socket() only for AF_UNIX (no network, netlink or packet sockets); clone()
    without namespace flags."""

    arch = os.uname().machine
    if arch not in SECCOMP_ARCH:
        raise OSError(errno.ENOSYS, f"no seccomp filter for {arch}")
    audit_arch, denied, socket_nr, clone_nr = SECCOMP_ARCH[arch]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, kill, eperm = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EPERM
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if arch == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]  # x32 ABI
    for nr in denied:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    # clone3 passes its flags in memory, which a filter cannot read: "not implemented" makes the C library
    # fall back to clone(), whose flags are checked below
    prog += [(jeq, 0, 1, CLONE3_NR), (ret, 0, 0, 0x00050000 | errno.ENOSYS)]
    prog += [(jeq, 0, 4, socket_nr), (ld, 0, 0, 16), (jeq, 0, 1, 1), (ret, 0, 0, allow), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 3, clone_nr), (ld, 0, 0, 16), (jset, 0, 1, NAMESPACES | CLONE_NEWUSER | CLONE_NEWCGROUP),
             (ret, 0, 0, eperm)]
    prog += [(ret, 0, 0, allow)]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    arr = (Filter * len(prog))(*[Filter(*f) for f in prog])
    if libc.prctl(22, 2, ctypes.byref(Prog(len(prog), arr)), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes_get_errno(), f"seccomp: {os.strerror(ctypes_get_errno())}")


def confine(bundle_dir: str, out_dir: str, allow_unsandboxed: bool = False, gpu: bool = False) -> str:
    """The worker's sandbox (module docstring). Returns its mode: "namespace" (root), "userns" (unprivileged
    user namespace) or, only with ``allow_unsandboxed``, "none". Where it cannot be set up the asset fails
    with ``no sandbox: <why>``. On return this process runs inside; its parents only wait for it."""
    libc = _libc()
    # unshare(CLONE_NEWUSER) needs a single-threaded process and bpy starts threads: fork first (a child has
    # one thread). A new PID namespace takes effect for children: fork again, the grandchild (PID 1 there)
    # carries on; each parent waits and exits with its child's status.
    _fork_and_wait()
    try:
        mode = _enter_namespaces(libc)
    except OSError as e:
        if allow_unsandboxed:
            print(f"WARNING: rendering WITHOUT the sandbox: {e.strerror}", file=sys.stderr, flush=True)
            os.chdir(bundle_dir)
            return "none"
        raise AssetError(f"no sandbox: {e.strerror}") from None
    _fork_and_wait()
    try:
        _new_root(libc, bundle_dir, out_dir, gpu)
        os.chdir(os.path.realpath(bundle_dir))
        keep = {k: os.environ[k] for k in ENV_KEEP if k in os.environ}
        os.environ.clear()
        os.environ.update(keep, TMPDIR="/tmp", HOME="/tmp")
        import tempfile as _t  # optional: tempfile

        _t.tempdir = None
        _drop_privileges(libc)
        _seccomp(libc)
    except (OSError, KeyError) as e:
        raise AssetError(f"no sandbox: {getattr(e, 'strerror', None) or e}") from None
    return mode


def sandbox_properties() -> dict:
    """What this process can reach, measured from inside (``--check-sandbox``; the worker's result.json)."""

    libc = _libc()
    out = {"uid": os.getuid(), "proc": os.path.exists("/proc/self"), "root_entries": sorted(os.listdir("/")),
           "env": sorted(os.environ), "no_new_privs": libc.prctl(39, 0, 0, 0, 0), "seccomp": libc.prctl(21, 0, 0, 0, 0)}
    data = (ctypes.c_uint32 * 6)()
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)
    libc.capget(hdr, data)
    out["capabilities"] = [int(x) for x in data]
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        out["inet_socket"] = "allowed"
    except OSError as e:
        out["inet_socket"] = errno.errorcode.get(e.errno, str(e.errno))
    r = libc.ptrace(0, 0, 0, 0)  # PTRACE_TRACEME
    out["ptrace"] = "allowed" if r == 0 else errno.errorcode.get(ctypes_get_errno(), "?")
    r = libc.unshare(CLONE_NEWUSER)
    out["unshare"] = "allowed" if r == 0 else errno.errorcode.get(ctypes_get_errno(), "?")
    return out


def check_sandbox(allow_unsandboxed: bool = False) -> int:
    """``blender_worker.py --check-sandbox``: enter the sandbox as a render would, print its mode and what is
    reachable inside as one JSON line; exit 0 when the sandbox holds, 1 otherwise (the container check)."""

    work = tempfile.mkdtemp(prefix="mdt-sandbox-check-")
    bundle, out = os.path.join(work, "bundle"), os.path.join(work, "out")
    os.makedirs(bundle)
    os.makedirs(out)
    try:
        mode = confine(bundle, out, allow_unsandboxed)
    except AssetError as e:
        print(json.dumps({"mode": None, "error": str(e)}), flush=True)
        return 1
    props = {"mode": mode, **sandbox_properties()}
    print(json.dumps(props, sort_keys=True), flush=True)
    ok = (mode in SANDBOX_MODES and not props["proc"] and props["no_new_privs"] == 1 and props["seccomp"] == 2
          and not any(props["capabilities"]) and props["inet_socket"] != "allowed" and props["ptrace"] != "allowed")
    return 0 if ok else 1


def _outside_files(bpy, bundle_dir: str) -> list[str]:
    """Paths of data-blocks that read a file outside the bundle (packed data excepted)."""
    root = os.path.realpath(bundle_dir)
    bad = []
    for coll in ("images", "libraries", "sounds", "fonts", "movieclips", "cache_files", "volumes"):
        for block in getattr(bpy.data, coll, ()):
            path = getattr(block, "filepath", "") or ""
            if not path or getattr(block, "packed_file", None) is not None or path == "<builtin>":
                continue
            real = os.path.realpath(bpy.path.abspath(path, library=getattr(block, "library", None)))
            if real != root and not real.startswith(root + os.sep):
                bad.append(path)
    return bad


def _reset_scene(bpy) -> None:
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.context.preferences.filepaths.use_scripts_auto_execute = False


def _stable_message(text: str) -> str:
    """The first meaningful line of an exception's text, without Blender's ``Location: <file>:<line>`` line,
    ``Error:`` prefixes or any absolute path (install or temp locations differ between machines)."""

    lines = [ln.strip() for ln in text.strip().splitlines()
             if ln.strip() and not ln.strip().startswith(("Location:", "Traceback", "File "))]
    msg = re.sub(r"^(Error|RuntimeError):\s*", "", lines[0]) if lines else ""
    msg = re.sub(r"(?<![\w.])/(?:[^\s/'\"]+/)+([^\s/'\"]*)", r"\1", msg)  # /abs/dir/name -> name
    return msg[:300]


def _gltf_without_required_extensions(path: str, fmt: str) -> str | None:
    """A copy of a glTF/GLB file (same directory, so relative URIs still resolve) without the
    `extensionsRequired` list; None when there is nothing to drop."""

    with open(path, "rb") as f:
        data = f.read()
    if fmt == "glb":
        if data[:4] != b"glTF" or len(data) < 20:
            return None
        n = struct.unpack("<I", data[12:16])[0]
        doc = json.loads(data[20:20 + n])
        rest = data[20 + n:]
    else:
        doc, rest = json.loads(data), b""
    if not doc.pop("extensionsRequired", None):
        return None
    text = json.dumps(doc).encode()
    root, _ = os.path.splitext(path)
    out = f"{root}.relaxed.{fmt}"
    if fmt == "glb":
        text += b" " * (-len(text) % 4)
        body = struct.pack("<II", len(text), 0x4E4F534A) + text + rest
        data = b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body
    else:
        data = text
    with open(out, "wb") as f:
        f.write(data)
    return out


# ---- encodings: textures decoded before the import, decoder failures and unloaded textures fail the asset ----

# A KTX2 texture is decoded at its largest mip level within this many pixels: renders are at most 1024 px
# (TRELLIS's condition views), so 4096² keeps more texels than any view shows, at 64 MiB of RGBA at most.
MAX_TEXTURE_PIXELS = 4096 * 4096
MAX_TEXTURE_FILE_BYTES = 256 << 20  # a texture file is read whole: larger ones are refused


class _ImporterErrors:
    """Collects the glTF importer's error log during an import: Blender's importer logs a primitive whose Draco
    data it cannot decode and skips it, which would leave a partial mesh that looks valid."""

    LOGGERS = ("glTFImporter", "glTFImporter_errors")

    def __enter__(self):
        errors = self.messages = []

        class Collect(logging.Handler):
            def emit(self, record):
                if record.levelno >= logging.ERROR:
                    errors.append(record.getMessage())

        self.handler = Collect()
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self.handler)
        return False

    def raise_for_geometry(self) -> None:
        for msg in self.messages:
            if "draco" in msg.lower():
                raise AssetError(f"Draco geometry not decoded: {msg.strip()[:200]}")


def _read_gltf(path: str, fmt: str):
    """(JSON document, GLB binary chunk or None) of a glTF/GLB file."""

    with open(path, "rb") as f:
        data = f.read()
    if fmt != "glb":
        return json.loads(data), None
    if data[:4] != b"glTF" or len(data) < 20:
        raise AssetError("not a GLB file")
    n = struct.unpack("<I", data[12:16])[0]
    doc = json.loads(data[20:20 + n])  # ValueError when not JSON
    rest = data[20 + n:]
    binary = None
    if len(rest) >= 8 and struct.unpack("<I", rest[4:8])[0] == 0x004E4942:
        binary = rest[8:8 + struct.unpack("<I", rest[:4])[0]]
    return doc, binary


def _write_gltf(doc: dict, binary, path: str, fmt: str, tag: str) -> str:
    """``doc`` (+ the GLB binary chunk) written as ``<stem>.<tag>.<fmt>`` beside ``path``."""

    text = json.dumps(doc).encode()
    if fmt == "glb":
        text += b" " * (-len(text) % 4)
        body = struct.pack("<II", len(text), 0x4E4F534A) + text
        if binary is not None:
            binary = binary + b"\0" * (-len(binary) % 4)
            body += struct.pack("<II", len(binary), 0x004E4942) + binary
        text = b"glTF" + struct.pack("<II", 2, 12 + len(body)) + body
    out = f"{os.path.splitext(path)[0]}.{tag}.{fmt}"
    with open(out, "wb") as f:
        f.write(text)
    return out


def _uri_bytes(uri: str, base_dir: str) -> bytes:
    """Bytes of a data: URI or of a relative file URI (which must stay inside the asset's directory tree)."""

    if uri.startswith("data:"):
        head, _, payload = uri.partition(",")
        return base64.b64decode(payload) if head.endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
    real = os.path.realpath(os.path.join(base_dir, urllib.parse.unquote(uri)))
    if os.path.getsize(real) > MAX_TEXTURE_FILE_BYTES:
        raise AssetError(f"file over {MAX_TEXTURE_FILE_BYTES >> 20} MiB")
    with open(real, "rb") as f:
        return f.read()


def _image_bytes(doc: dict, binary, index: int, base_dir: str) -> bytes:
    image = doc["images"][index]
    if "uri" in image:
        return _uri_bytes(image["uri"], base_dir)
    view = doc["bufferViews"][image["bufferView"]]
    buffer = doc["buffers"][view["buffer"]]
    data = _uri_bytes(buffer["uri"], base_dir) if "uri" in buffer else binary
    start, length = int(view.get("byteOffset", 0)), int(view["byteLength"])
    if data is None or start < 0 or length < 0 or start + length > len(data):
        raise AssetError("buffer view outside its buffer")
    return data[start:start + length]


def _png_bytes(rgba) -> bytes:
    """An RGBA8 array [H, W, 4] as a PNG file (no filter, fast deflate)."""

    import numpy as np  # heavy: numpy

    h, w = rgba.shape[:2]
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgba.reshape(h, w * 4)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + chunk(b"IEND", b""))


def _decode_ktx2(data: bytes):
    """RGBA8 [H, W, 4] of a KTX2 (Basis Universal ETC1S / UASTC) texture: its largest mip level within
    MAX_TEXTURE_PIXELS. Raises AssetError with the decoder's reason."""
    import opengl_basisu  # heavy: numpy

    try:
        tex = opengl_basisu.Texture(data)
        for level in range(tex.levels):
            w, h = tex.level_size(level)
            if w * h <= MAX_TEXTURE_PIXELS:
                return tex.transcode("rgba8", level=level).data
    except (opengl_basisu.BasisuError, opengl_basisu.UnsupportedError, ValueError) as e:
        raise AssetError(f"KTX2: {e}") from None
    raise AssetError(f"KTX2: {tex.width}x{tex.height} has no mip level within {MAX_TEXTURE_PIXELS} pixels")


def _gltf_with_decoded_textures(path: str, fmt: str, work_dir: str) -> str | None:
    """A copy of a glTF/GLB in ``work_dir`` whose KHR_texture_basisu (KTX2) textures without a fallback image
    point to PNGs decoded here, inside the wall, as data: URIs (Blender's importer reads no KTX2; the bundle is
    left untouched); its other file URIs become absolute paths into the bundle. None when there is nothing to
    decode. A texture that cannot be decoded fails the asset: ``texture not loaded: <image> (<reason>)``."""

    try:
        doc, binary = _read_gltf(path, fmt)
    except (OSError, ValueError, AssetError):
        return None  # not a readable glTF: Blender's importer says why
    if not isinstance(doc, dict):
        return None
    textures = [t for t in doc.get("textures") or [] if isinstance(t, dict)]
    todo = [t for t in textures if t.get("source") is None and isinstance(t.get("extensions"), dict)
            and isinstance(t["extensions"].get("KHR_texture_basisu"), dict)]
    if not todo:
        return None
    base_dir = os.path.dirname(os.path.abspath(path))
    for key in ("buffers", "images"):
        for item in doc.get(key) or []:
            uri = item.get("uri") if isinstance(item, dict) else None
            if isinstance(uri, str) and not uri.startswith("data:"):
                item["uri"] = urllib.parse.quote(os.path.join(base_dir, urllib.parse.unquote(uri)))
    decoded: dict[int, int] = {}  # KTX2 image index -> index of its PNG image
    for tex in todo:
        src = tex["extensions"]["KHR_texture_basisu"].get("source")
        if src not in decoded:
            images = doc.get("images") if isinstance(doc.get("images"), list) else []
            image = images[src] if isinstance(src, int) and 0 <= src < len(images) else {}
            image = image if isinstance(image, dict) else {}
            uri = str(image.get("uri", ""))
            name = ("" if uri.startswith("data:") else os.path.basename(urllib.parse.unquote(uri))) \
                or image.get("name") or f"image {src}"
            try:
                if not image:
                    raise AssetError("no such image")
                rgba = _decode_ktx2(_image_bytes(doc, binary, src, base_dir))
            except (AssetError, OSError, KeyError, TypeError, ValueError) as e:
                raise AssetError(f"texture not loaded: {name} ({e})") from None
            png = base64.b64encode(_png_bytes(rgba)).decode()
            doc["images"].append({"uri": "data:image/png;base64," + png, "name": image.get("name") or name})
            decoded[src] = len(doc["images"]) - 1
        tex["source"] = decoded[src]
    if isinstance(doc.get("extensionsRequired"), list):
        doc["extensionsRequired"] = [e for e in doc["extensionsRequired"] if e != "KHR_texture_basisu"]
    return _write_gltf(doc, binary, os.path.join(work_dir, os.path.basename(path)), fmt, "decoded")


def _image_nodes(tree, depth: int = 0) -> list:
    """Linked image-texture nodes of a shader node tree, node groups included (8 levels at most)."""
    out = []
    for node in tree.nodes:
        if node.type == "TEX_IMAGE" and any(o.links for o in node.outputs):
            out.append(node)
        elif node.type == "GROUP" and node.node_tree is not None and depth < 8:
            out += _image_nodes(node.node_tree, depth + 1)
    return out


def _unloaded_textures(bpy) -> list[str]:
    """``<image> (<reason>)`` for every image-texture node of a rendered object's material that has no image or
    an image Blender could not load: Cycles draws those in its missing-texture magenta."""
    bad, seen = [], set()
    for obj in bpy.data.objects:
        if obj.type not in MESH_TYPES or obj.hide_render:
            continue
        for slot in obj.material_slots:
            mat = slot.material
            if mat is None or mat.node_tree is None or mat.name in seen:
                continue
            seen.add(mat.name)
            for node in _image_nodes(mat.node_tree):
                image = node.image
                if image is None:
                    bad.append(f"{mat.name}/{node.label or node.name} (no image the importer could read)")
                elif image.source in ("FILE", "SEQUENCE", "TILED") and not image.has_data \
                        and tuple(image.size) == (0, 0):  # reading the size loads the file
                    path = os.path.basename(bpy.path.abspath(image.filepath)) or image.name
                    why = "file missing" if not os.path.exists(bpy.path.abspath(image.filepath)) and \
                        image.packed_file is None else "unreadable image data"
                    bad.append(f"{path} ({why})")
    return bad


_DECODED_DIR: str | None = None  # where decoded copies of an asset go: the job's out_dir (set by main)


def _import(bpy, path: str, fmt: str, warnings: list) -> None:
    fmt = fmt.lower().lstrip(".")
    if fmt == "blend":
        bpy.ops.wm.open_mainfile(filepath=path, load_ui=False, use_scripts=False)
        bpy.context.preferences.filepaths.use_scripts_auto_execute = False
        return
    if fmt in ("glb", "gltf"):
        path = _gltf_with_decoded_textures(path, fmt, _DECODED_DIR or os.path.dirname(path)) or path
        try:
            with _ImporterErrors() as errors:
                result = bpy.ops.import_scene.gltf(filepath=path, merge_vertices=True)
            errors.raise_for_geometry()
        except RuntimeError as e:
            # Blender refuses files that *require* an extension it does not implement (e.g.
            # KHR_materials_iridescence); the geometry is still fine, so drop the requirement and retry.
            relaxed = _gltf_without_required_extensions(path, fmt) if "Extension" in str(e) else None
            if relaxed is None:
                raise
            _reset_scene(bpy)
            with _ImporterErrors() as errors:
                result = bpy.ops.import_scene.gltf(filepath=relaxed, merge_vertices=True)
            errors.raise_for_geometry()
            warnings.append("ignored unsupported required glTF extensions")
    elif fmt == "obj":
        result = bpy.ops.wm.obj_import(filepath=path)
    elif fmt == "ply":
        result = bpy.ops.wm.ply_import(filepath=path)
    elif fmt == "stl":
        result = bpy.ops.wm.stl_import(filepath=path)
    elif fmt == "fbx":
        result = bpy.ops.import_scene.fbx(filepath=path, use_image_search=False)
    elif fmt == "dae" and hasattr(bpy.ops.wm, "collada_import"):
        result = bpy.ops.wm.collada_import(filepath=path)
    elif fmt in ("usd", "usda", "usdc", "usdz"):
        result = bpy.ops.wm.usd_import(filepath=path)
    elif fmt == "abc":
        result = bpy.ops.wm.alembic_import(filepath=path)
    else:
        raise AssetError(f"unsupported format {fmt!r}")
    if "FINISHED" not in result:
        raise AssetError(f"{fmt} import did not finish ({', '.join(sorted(result))})")


def _remove_foreign_rig(bpy) -> None:
    """Cameras, lights and the like that came with the asset: our own lighting and cameras replace them."""
    for obj in list(bpy.data.objects):
        if obj.type in {"CAMERA", "LIGHT", "LIGHT_PROBE", "SPEAKER"}:
            bpy.data.objects.remove(obj, do_unlink=True)


def _geometry(bpy, np, depsgraph, with_faces: bool):
    """World-space vertices (and triangles) of every renderable geometry instance in the evaluated scene."""
    verts, faces, base = [], [], 0
    for inst in depsgraph.object_instances:
        obj = inst.object
        if obj.type not in MESH_TYPES:
            continue
        original = obj.original
        if original is not None and original.hide_render:
            continue
        try:
            mesh = obj.to_mesh()
        except RuntimeError:
            continue
        if mesh is None or not len(mesh.vertices):
            obj.to_mesh_clear()
            continue
        n = len(mesh.vertices)
        co = np.empty(n * 3, np.float64)
        mesh.vertices.foreach_get("co", co)
        m = np.array(inst.matrix_world, np.float64)
        co = co.reshape(n, 3) @ m[:3, :3].T + m[:3, 3]
        tri = None
        if with_faces:
            mesh.calc_loop_triangles()
            tri = np.empty(len(mesh.loop_triangles) * 3, np.int64)
            mesh.loop_triangles.foreach_get("vertices", tri)
            tri = tri.reshape(-1, 3) + base
        obj.to_mesh_clear()
        verts.append(co)
        if tri is not None:
            faces.append(tri)
        base += n
    if not verts:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    return np.concatenate(verts), (np.concatenate(faces) if faces else np.zeros((0, 3), np.int64))


def _normalise(bpy, np) -> tuple[float, list[float]]:
    """Parent all roots to one empty that maps the scene bbox to a unit-longest-side box centred at 0."""
    scene = bpy.context.scene
    depsgraph = bpy.context.evaluated_depsgraph_get()
    v, f = _geometry(bpy, np, depsgraph, with_faces=True)
    _check_geometry(np, v, f)
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = float((hi - lo).max())
    if not extent > 0:
        raise AssetError("degenerate geometry (zero extent)")
    scale = 1.0 / extent
    centre = (lo + hi) / 2
    roots = [o for o in scene.objects if o.parent is None]
    empty = bpy.data.objects.new("mdt_normaliser", None)
    scene.collection.objects.link(empty)
    for obj in roots:
        world = obj.matrix_world.copy()
        obj.parent = empty
        obj.matrix_parent_inverse.identity()
        obj.matrix_world = world
    offset = (-centre * scale).tolist()
    empty.scale = (scale, scale, scale)
    empty.location = offset
    bpy.context.view_layer.update()
    return scale, offset


def _check_geometry(np, v, f) -> None:
    """The rule of pipelines.preprocess.mesh_check.check_geometry, on the imported (decoded) scene (this script imports no
    project module): finite positions, faces in range, a non-zero total area."""
    if not len(v) or not len(f):
        raise AssetError("no mesh geometry in the asset")
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise AssetError(f"non-finite vertex positions ({int(bad.sum())} of {len(v)} vertices)")
    out = (f < 0) | (f >= len(v))
    if out.any():
        raise AssetError(f"face indices out of range ({int(out.any(axis=1).sum())} of {len(f)} faces index "
                         f"past {len(v)} vertices)")
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()
    extent = float(np.ptp(v, axis=0).max())
    if not area > 1e-12 * max(extent, 1e-30) ** 2:
        raise AssetError("zero total surface area")


def _lights(bpy, bottom_light_up: bool) -> None:
    scene = bpy.context.scene
    world = bpy.data.worlds.new("mdt_world")
    world.use_nodes = True
    bg = world.node_tree.nodes.get("Background")
    if bg is not None:
        bg.inputs["Strength"].default_value = 0.0
    scene.world = world

    def add(name, kind, energy, location, scale=1.0, rotation=(0.0, 0.0, 0.0)):
        light = bpy.data.lights.new(name, type=kind)
        light.energy = energy
        obj = bpy.data.objects.new(name, light)
        obj.location = location
        obj.scale = (scale, scale, scale)
        obj.rotation_euler = rotation
        scene.collection.objects.link(obj)

    add("mdt_point", "POINT", 1000.0, (4.0, 1.0, 6.0))
    add("mdt_area_top", "AREA", 10000.0, (0.0, 0.0, 10.0), scale=100.0)
    add("mdt_area_bottom", "AREA", 1000.0, (0.0, 0.0, -10.0),
        rotation=(math.pi, 0.0, 0.0) if bottom_light_up else (0.0, 0.0, 0.0))


def _choose_device(bpy, want: str) -> str:
    scene = bpy.context.scene
    scene.cycles.device = "CPU"
    if want == "cpu":
        return "CPU"
    try:
        prefs = bpy.context.preferences.addons["cycles"].preferences
        kinds = ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")
        if not os.path.exists("/proc/self/maps"):  # inside the sandbox: oneAPI's runtime aborts without /proc
            kinds = tuple(k for k in kinds if k != "ONEAPI")
        for kind in kinds:
            try:
                prefs.compute_device_type = kind
            except TypeError:
                continue
            prefs.get_device_list(kind)  # this kind only: probing every kind starts oneAPI too
            gpus = [d for d in prefs.devices if d.type == kind]
            if gpus:
                for d in prefs.devices:
                    d.use = d.type == kind
                scene.cycles.device = "GPU"
                return f"GPU:{kind}"
    except Exception:  # noqa: BLE001 - any trouble probing GPUs means CPU
        pass
    if want == "gpu":
        raise AssetError("no GPU found by Cycles")
    return "CPU"


def _render_settings(bpy, job: dict) -> None:
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    c = scene.cycles
    c.samples = int(job.get("samples", 128))
    c.pixel_filter_type = "BOX"
    c.filter_width = 1.0
    c.diffuse_bounces = 1
    c.glossy_bounces = 1
    c.transparent_max_bounces = 3
    c.transmission_bounces = 3
    c.use_denoising = bool(job.get("denoise", True))
    threads = int(job.get("threads", 0))
    if threads > 0:
        scene.render.threads_mode = "FIXED"
        scene.render.threads = threads
    scene.render.film_transparent = True
    scene.render.use_persistent_data = True  # keep the BVH and shaders between the views of one asset
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA"
    scene.render.image_settings.color_depth = "8"
    scene.render.resolution_percentage = 100
    # a .blend may bring its own post-processing: switch it all off
    scene.render.use_compositing = False
    scene.render.use_sequencer = False
    scene.render.use_motion_blur = False
    scene.render.use_border = False
    scene.display_settings.display_device = "sRGB"
    vt = job.get("view_transform")
    if vt:
        try:
            scene.view_settings.view_transform = vt
        except TypeError:
            scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.view_settings.exposure = 0.0
    scene.view_settings.gamma = 1.0


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)     # every thread of this process
    return r.ru_utime + r.ru_stime


def _camera(bpy):
    scene = bpy.context.scene
    cam_data = bpy.data.cameras.new("mdt_camera")
    cam_data.sensor_fit = "AUTO"
    cam_data.sensor_width = 32.0
    cam_data.clip_start = 0.01
    cam_data.clip_end = 1000.0
    cam = bpy.data.objects.new("mdt_camera", cam_data)
    scene.collection.objects.link(cam)
    scene.camera = cam
    return cam


def main(job_path: str) -> int:
    t0 = _START or time.time()
    with open(job_path) as f:
        job = json.load(f)
    out_dir = job["out_dir"]
    _limit_memory(int(job.get("memory_limit_mb", 0)))
    timings = {}
    warnings: list[str] = []
    wall = None
    try:
        import numpy as np  # optional: numpy

        bundle_dir = job.get("bundle_dir") or os.path.dirname(job["input"])
        wall = confine(bundle_dir, out_dir, bool(job.get("allow_unsandboxed", False)),
                       gpu=job.get("device", "auto") != "cpu")
        import bpy  # optional: bpy
        from mathutils import Matrix  # optional: mathutils

        timings["startup"] = time.time() - t0  # process start (cold) or fork (warm), the sandbox, `import bpy`
        t = time.time()
        _reset_scene(bpy)
        global _DECODED_DIR
        _DECODED_DIR = out_dir
        _import(bpy, job["input"], job["format"], warnings)
        outside = _outside_files(bpy, bundle_dir)
        if outside:
            raise AssetError(f"external reference outside the asset: {outside[0]!r}")
        unloaded = _unloaded_textures(bpy)
        if unloaded:
            raise AssetError(f"texture not loaded: {unloaded[0]}")
        _remove_foreign_rig(bpy)
        timings["load"] = time.time() - t
        scale, offset = _normalise(bpy, np)
        _lights(bpy, bool(job.get("bottom_light_up", False)))
        _render_settings(bpy, job)
        device = _choose_device(bpy, job.get("device", "auto"))
        if job.get("export_mesh", True):
            t = time.time()
            v, fcs = _geometry(bpy, np, bpy.context.evaluated_depsgraph_get(), with_faces=True)
            if not len(fcs):
                raise AssetError("no triangles in the asset")
            np.savez(os.path.join(out_dir, "mesh.npz"), vertices=v.astype(np.float32), faces=fcs.astype(np.int32))
            timings["mesh"] = time.time() - t
        cam = _camera(bpy)
        scene = bpy.context.scene
        cpu0, wall0 = _cpu_seconds(), time.time()
        for p in job.get("passes", []):
            t = time.time()
            pass_dir = os.path.join(out_dir, p["name"])
            os.makedirs(pass_dir, exist_ok=True)
            scene.render.resolution_x = scene.render.resolution_y = int(p["resolution"])
            scene.cycles.samples = int(p.get("samples") or job.get("samples", 128))
            for i, (c2w, fov) in enumerate(zip(p["c2w"], p["fov"])):
                cam.data.lens = 16.0 / math.tan(float(fov) / 2.0)
                cam.matrix_world = Matrix(c2w)
                scene.render.filepath = os.path.join(pass_dir, f"{i:03d}.png")
                bpy.ops.render.render(write_still=True)
            timings[f"render_{p['name']}"] = time.time() - t
        # CPU seconds of all this process's threads per wall second of rendering (1.0 at most when Cycles has
        # one thread and no idle oneTBB workers; its workers spin while they wait, so it is not a speed-up)
        timings["render_busy_cores"] = (_cpu_seconds() - cpu0) / max(time.time() - wall0, 1e-9)
        timings["total"] = time.time() - t0
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"scale": scale, "offset": offset, "device": device, "timings": timings, "warnings": warnings,
                       "wall": wall,
                       "view_transform": scene.view_settings.view_transform,
                       "blender": bpy.app.version_string}, f)
        return 0
    except AssetError as e:
        reason = str(e)
    except MemoryError:
        reason = f"out of memory (cap {job.get('memory_limit_mb')} MiB)"
    except Exception as e:  # noqa: BLE001 - every failure becomes a short reason for the parent
        traceback.print_exc()
        reason = f"{type(e).__name__}: {_stable_message(str(e))}"
    # short and stable: no temp paths, a hint when the address-space cap is the likely cause
    reason = reason.replace(os.path.dirname(job["input"]) + os.sep, "")
    cap = int(job.get("memory_limit_mb", 0) or 0)
    if cap and "memory" not in reason and any(s in reason for s in ("map segment", "Cannot allocate", "bad_alloc")):
        reason = f"out of memory (cap {cap} MiB): {reason}"
    with open(os.path.join(out_dir, "error.json"), "w") as f:
        json.dump({"error": reason, "timings": timings, "wall": wall}, f)
    return EXIT_HANDLED


def serve() -> None:
    """Warm worker (zygote): a started interpreter (numpy imported) that forks one child per job. It does not
    import bpy: the child does, inside its sandbox (module docstring: oneTBB's threads do not survive a fork).

    Protocol on stdin/stdout, one line each: the parent writes a job path; this process answers
    ``pid <child pid>`` at once and ``status <exit code>`` (negative: killed by that signal) when the child
    ends. The child is the per-asset worker: its own process group (the parent kills it on timeout, this
    process lives on), output to the job's worker.log, memory cap, file-system wall and a factory-reset scene,
    all set up after the fork; this process never loads an asset, so nothing carries over between assets.
    It exits when its stdin closes (the render stage went away).
    """
    t0 = time.time()
    # heavy: numpy
    import numpy  # noqa: F401 - imported once here, inherited by every child

    if importlib.util.find_spec("bpy") is None:   # fail at start-up, not once per asset
        print("bpy is not installed", file=sys.stderr, flush=True)
        os._exit(1)
    startup_s = time.time() - t0
    # Detach from the process that started us (which only keeps the pipes): a warm worker is not a
    # per-asset worker of the stage's process, and it ends on its own when the pipe closes.
    if os.fork():
        os._exit(0)

    out = sys.stdout
    print(f"ready {os.getpid()} {startup_s:.3f}", file=out, flush=True)
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(0, 4096)
            if not chunk:  # the render stage went away
                os._exit(0)
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        job_path = line.decode().strip()
        if not job_path:
            continue
        forked = time.time()
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            with open(job_path) as f:
                log = os.path.join(json.load(f)["out_dir"], "worker.log")
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            sys.stdout = os.fdopen(1, "w", closefd=False)
            sys.stderr = os.fdopen(2, "w", closefd=False)
            global _START
            _START = forked
            run_cli([job_path])
        print(f"pid {pid}", file=out, flush=True)
        while True:  # the stage sends nothing while a child runs: readable stdin means it closed
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if select.select([0], [], [], 0.2)[0] and not os.read(0, 4096):
                os.killpg(pid, 9)  # no stage left to enforce the timeout: take the child down too
                os.waitpid(pid, 0)
                os._exit(0)
        print(f"status {os.waitstatus_to_exitcode(status)}", file=out, flush=True)


_START: float | None = None  # when this worker began work on its job (fork time for a warm worker's child)


def run_cli(argv: list[str]) -> None:
    """``blender_worker.py <job.json>``: run the job and exit without returning;
    ``blender_worker.py --serve``: the warm worker (``serve``)."""
    if argv and argv[0] == "--serve":
        serve()
    if argv and argv[0] == "--check-sandbox":
        os._exit(check_sandbox("--allow-unsandboxed" in argv))
    code = main(argv[0])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip Blender's atexit teardown (slow, and can crash after a failed import)


if __name__ == "__main__":
    run_cli(sys.argv[1:])
