"""Download stage: source row -> row with the verified asset bytes (pipelines/README.md, "After download").

What it guarantees:
- **Retries with backoff** through libraries, not hand-written loops: ``tenacity`` (exponential backoff with
  jitter) for HTTP(S)/Hugging Face, botocore's retry modes for S3. Transient errors (connection errors,
  timeouts, HTTP 408/425/429/5xx, truncated bodies) are retried; 4xx answers, size-cap violations and hash
  mismatches are not.
- **Per-host concurrency limit**: at most ``download.per_host_concurrency`` requests in flight per host,
  cluster-wide when the graph created a :class:`HostLimiterActor` (``limiter`` argument), per process
  otherwise.
- **sha256 verification** against the row's expected hash (``sha256``; 3D-FUTURE: hash of ``sha256_uri``);
  without one, the identity is the hash of the whole bundle (``asset_refs.bundle_sha256``).
- **Content rules** before anything is cached (``asset_content.check_bundle``): formats by magic bytes,
  unscannable formats, ``.blend`` structure, image pixel caps, glTF accessor bounds.
- **Local sources**: read by real path under the source folder, regular files only (``storage.read_local_confined``).
- **Size cap** (``download.max_bytes`` per file, ``max_archive_bytes`` per archive): checked against
  Content-Length / object size before reading and while streaming.
- **Content-addressed cache** ``<cache>/objects/<sha[:2]>/<sha>`` (+ ``.json`` sidecar written last, the
  commit marker), local dir or s3://, written atomically (temp + rename / one object PUT). A row whose
  expected sha256 is already cached is served from the cache without network access.
- **Archives** (``zip://<member>::<archive uri>``, ``tar://…``): each archive is fetched once into the cache
  and opened once per actor; members are read in place (zip, plain tar) or after one safe extraction per node
  (compressed tar). Member paths that are absolute or contain ``..`` are refused, as are tar links.
- **Multi-file assets** (``.gltf`` buffers/images, ``.obj`` mtllib + texture maps, ``.dae`` images) are sent
  as a zip bundle of the main file plus the files it references.
- ``.blend`` rows get ``untrusted_blend=True``: the renderer must open them with Python auto-exec disabled.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict, defaultdict
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

import tenacity

from pipelines.common import storage
from pipelines.preprocess import asset_content, asset_refs
from pipelines.common.config import StorageConfig
from pipelines.preprocess.config import MESH_FORMATS, DownloadConfig, PreprocessConfig
from pipelines.preprocess.rows import fail
import shutil
import requests

log = logging.getLogger(__name__)

TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
ARCHIVE_SCHEMES = ("zip://", "tar://")


class DownloadError(Exception):
    """A permanent failure: the reason ends up in the ledger."""


class TransientError(Exception):
    """Worth retrying (connection reset, 5xx, truncated body)."""


# --------------------------------------------------------------------------------------- host limiting


try:  # the cluster-wide limiter is a Ray actor; the module also works without Ray (tests call it directly)
    import ray

    @ray.remote(num_cpus=0)
    class HostLimiterActor:
        """Cluster-wide per-host slots. Leases expire so a killed worker cannot hold a slot forever."""

        def __init__(self, per_host: int):
            self.per_host = max(1, int(per_host))
            self.active: dict[str, dict[str, float]] = defaultdict(dict)
            self.peak: dict[str, int] = defaultdict(int)

        async def acquire(self, host: str, lease_s: float) -> str:
            while True:
                now = time.time()
                slots = self.active[host]
                for tok in [t for t, exp in slots.items() if exp < now]:
                    slots.pop(tok)
                if len(slots) < self.per_host:
                    tok = uuid.uuid4().hex
                    slots[tok] = now + lease_s
                    self.peak[host] = max(self.peak[host], len(slots))
                    return tok
                await asyncio.sleep(0.02)

        async def release(self, host: str, token: str) -> None:
            self.active[host].pop(token, None)

        async def stats(self) -> dict:
            return {"peak": dict(self.peak), "active": {h: len(s) for h, s in self.active.items()}}

    @ray.remote(num_cpus=0)
    class ContentClaimsActor:
        """First claimer of a content hash in a run owns it; later files with the same bytes are duplicates."""

        def __init__(self):
            self.owner: dict[str, str] = {}

        def claim(self, sha: str, who: str) -> str:
            return self.owner.setdefault(sha, who)

except ImportError:  # pragma: no cover
    ray = None
    HostLimiterActor = ContentClaimsActor = None


class ContentClaims:
    """``claim(sha, who) -> owner``: run-wide through the named actor if given, else per process."""

    def __init__(self, actor_name: str | None = None):
        self.actor = None
        self.local: dict[str, str] = {}
        if actor_name and ray is not None and ray.is_initialized():
            self.actor = ray.get_actor(actor_name)

    def claim(self, sha: str, who: str) -> str:
        if self.actor is not None:
            return ray.get(self.actor.claim.remote(sha, who))
        return self.local.setdefault(sha, who)


class HostSlots:
    """``with slots(host): ...`` — cluster-wide through the named actor if given, else per process."""

    _local: dict[tuple[str, int], threading.BoundedSemaphore] = {}
    _lock = threading.Lock()

    def __init__(self, per_host: int, actor_name: str | None = None, lease_s: float = 600.0):
        self.per_host = max(1, int(per_host))
        self.lease_s = lease_s
        self.actor = None
        if actor_name and ray is not None and ray.is_initialized():
            try:
                self.actor = ray.get_actor(actor_name)
            except ValueError:
                log.warning("host limiter %s not found; limiting per process", actor_name)

    @contextlib.contextmanager
    def __call__(self, host: str):
        if self.actor is not None:
            tok = ray.get(self.actor.acquire.remote(host, self.lease_s))
            try:
                yield
            finally:
                self.actor.release.remote(host, tok)
            return
        with self._lock:
            sem = self._local.setdefault((host, self.per_host), threading.BoundedSemaphore(self.per_host))
        with sem:
            yield


# --------------------------------------------------------------------------------------- path safety


def safe_member(name: str) -> str:
    """Normalised archive member path, or DownloadError when it could escape the extraction root."""
    raw = name.replace("\\", "/")
    if raw.startswith("/") or re.match(r"^[A-Za-z]:", raw):
        raise DownloadError(f"unsafe archive member path {name!r} (absolute)")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise DownloadError(f"unsafe archive member path {name!r} (contains '..')")
    if not parts:
        raise DownloadError(f"empty archive member path {name!r}")
    return "/".join(parts)


def is_safe_member(name: str) -> bool:
    try:
        safe_member(name)
        return True
    except DownloadError:
        return False


def _strip_unsafe(name: str) -> str:
    return "/".join(p for p in name.replace("\\", "/").split("/") if p not in ("", ".", ".."))


def split_archive_uri(uri: str) -> tuple[str, str, str]:
    """``zip://a/b.glb::s3://bkt/x.zip`` -> ("zip", "a/b.glb", "s3://bkt/x.zip")."""
    kind, rest = uri.split("://", 1)
    if "::" not in rest:
        raise DownloadError(f"archive uri {uri!r} lacks '::<archive uri>'")
    member, archive = rest.split("::", 1)
    return kind, member, archive


def mesh_format(name: str) -> str:
    base = name.lower().rsplit("/", 1)[-1]
    return base.rsplit(".", 1)[-1] if "." in base else ""


# --------------------------------------------------------------------------------------- archives


class ArchiveReader:
    """Random access to the members of one local archive file."""

    def __init__(self, path: str, extract_root: str):
        self.path = path
        self.kind = None
        self.dir = None
        self._zip = self._tar = None
        self._members: dict[str, object] = {}
        self.unsafe: list[str] = []
        if zipfile.is_zipfile(path):
            self.kind = "zip"
            self._zip = zipfile.ZipFile(path)
            for info in self._zip.infolist():
                if info.is_dir():
                    continue
                if is_safe_member(info.filename):
                    self._members[safe_member(info.filename)] = info
                else:
                    self.unsafe.append(info.filename)
        elif tarfile.is_tarfile(path):
            with open(path, "rb") as f:
                magic = f.read(6)
            compressed = magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic[:6] == b"\xfd7zXZ\x00"
            if compressed:  # no random access: extract once per node, then read files
                self.kind = "dir"
                self.dir = self._extract_once(path, extract_root)
                listing = json.loads(Path(self.dir, ".mdt-members.json").read_text())
                self._members = {m: None for m in listing["members"]}
                self.unsafe = listing["unsafe"]
            else:
                self.kind = "tar"
                self._tar = tarfile.open(path, "r:")
                for ti in self._tar.getmembers():
                    if not ti.isfile():
                        if ti.issym() or ti.islnk():
                            self.unsafe.append(ti.name)
                        continue
                    if is_safe_member(ti.name):
                        self._members[safe_member(ti.name)] = ti
                    else:
                        self.unsafe.append(ti.name)
        else:
            raise DownloadError(f"not a zip or tar archive: {os.path.basename(path)}")
        # GitHub archives put everything under one "<repo>-<commit>/" directory.
        tops = {m.split("/", 1)[0] for m in self._members}
        self.single_top = next(iter(tops)) if len(tops) == 1 and all("/" in m for m in self._members) else None
        self._lock = threading.Lock()

    @staticmethod
    def _extract_once(path: str, extract_root: str) -> str:
        st = os.stat(path)
        key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]
        dest = os.path.join(extract_root, f"x-{key}")
        os.makedirs(extract_root, exist_ok=True)
        with open(os.path.join(extract_root, f".x-{key}.lock"), "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                if os.path.exists(os.path.join(dest, ".mdt-members.json")):
                    return dest
                tmp = dest + f".tmp-{uuid.uuid4().hex[:8]}"
                members, unsafe = [], []
                with tarfile.open(path, "r:*") as tf:
                    for ti in tf:
                        if not ti.isfile():
                            if ti.issym() or ti.islnk():
                                unsafe.append(ti.name)
                            continue
                        if not is_safe_member(ti.name):
                            unsafe.append(ti.name)
                            continue
                        name = safe_member(ti.name)
                        out = os.path.join(tmp, name)
                        os.makedirs(os.path.dirname(out), exist_ok=True)
                        src = tf.extractfile(ti)
                        with open(out, "wb") as f:
                            while chunk := src.read(1 << 20):
                                f.write(chunk)
                        members.append(name)
                os.makedirs(tmp, exist_ok=True)
                Path(tmp, ".mdt-members.json").write_text(json.dumps({"members": members, "unsafe": unsafe}))
                if os.path.exists(dest):  # an incomplete earlier attempt

                    shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
                return dest
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)

    def resolve(self, member: str) -> str:
        """Archive-relative path of ``member`` (tries the single top-level directory too)."""
        if member in self._members:
            return member
        if self.single_top and f"{self.single_top}/{member}" in self._members:
            return f"{self.single_top}/{member}"
        raise KeyError(member)

    def read(self, member: str, max_bytes: int) -> bytes:
        name = self.resolve(member)
        with self._lock:
            if self.kind == "zip":
                info = self._members[name]
                if info.file_size > max_bytes:
                    raise DownloadError(f"size cap: {info.file_size} bytes > {max_bytes}")
                return self._zip.read(info)
            if self.kind == "tar":
                ti = self._members[name]
                if ti.size > max_bytes:
                    raise DownloadError(f"size cap: {ti.size} bytes > {max_bytes}")
                return self._tar.extractfile(ti).read()
        p = os.path.join(self.dir, name)
        if os.path.getsize(p) > max_bytes:
            raise DownloadError(f"size cap: {os.path.getsize(p)} bytes > {max_bytes}")
        with open(p, "rb") as f:
            return f.read()

    def close(self):
        for h in (self._zip, self._tar):
            if h is not None:
                h.close()


# --------------------------------------------------------------------------------------- references


def make_bundle(files: dict[str, bytes], max_bytes: int) -> bytes:
    """Zip of a bundle ({bundle-relative path: bytes}, from ``asset_refs.bundle_files``)."""
    total = sum(len(b) for b in files.values())
    if total > max_bytes:
        raise DownloadError(f"size cap: bundle of {total} bytes > {max_bytes}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def materialize_mesh(row: dict, workdir: str | os.PathLike, storage_cfg=None) -> Path:
    """Write the row's asset under ``workdir`` and return the path of the main file (for the renderer).

    Bundles are extracted with the same path checks as archives. Reads ``cache_uri`` when the row does
    not carry the bytes.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data = row.get("mesh_bytes")
    name = row.get("mesh_name") or f"asset.{row.get('mesh_format') or 'bin'}"
    if data is None:  # a large file: streamed from the cache to local disk, never whole in memory
        if not row.get("cache_uri"):
            raise DownloadError("row has neither mesh_bytes nor cache_uri")
        local = workdir / (".bundle.zip" if row.get("mesh_bundle") else
                           safe_member(posixpath.basename(name.replace("\\", "/")) or "asset"))
        storage.download_file(row["cache_uri"], str(local), storage_cfg)
        if not row.get("mesh_bundle"):
            return local
        data = local
    if row.get("mesh_bundle"):
        with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                rel = safe_member(info.filename)
                out = workdir / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            os.unlink(data)
        return workdir / safe_member(name)
    out = workdir / safe_member(posixpath.basename(name.replace("\\", "/")) or "asset")
    out.write_bytes(data)
    return out


# --------------------------------------------------------------------------------------- the stage


class Download:
    name = "download"
    outputs = ("mesh_bytes", "mesh_format", "mesh_name", "mesh_bundle", "mesh_size", "untrusted_blend",
               "cache_uri")
    drops = ()
    resources = {"num_cpus": 0.5}

    def __init__(self, cfg: PreprocessConfig | None = None, limiter: str | None = None,
                 done_sha256: frozenset | set | None = None, claims: str | None = None):
        cfg = cfg or PreprocessConfig()
        self.cfg: DownloadConfig = cfg.download
        self.storage_cfg: StorageConfig = cfg.storage
        self.sources_cfg = cfg.sources
        self.render_cfg = cfg.render  # the content rules' pixel cap and the formats allowed unscanned
        self.cache = cfg.cache_uri()
        self.extract_root = self.cfg.extract_dir or os.path.join(tempfile.gettempdir(), "mdt-archives")
        self.slots = HostSlots(self.cfg.per_host_concurrency, limiter,
                               lease_s=max(60.0, self.cfg.timeout_s * self.cfg.attempts * 2))
        self.done_sha256 = done_sha256 or frozenset()
        self.claims = ContentClaims(claims)
        self._session = None
        self._s3 = None
        self._archives: OrderedDict[str, ArchiveReader] = OrderedDict()
        self.stats = defaultdict(int)  # http_attempts, cache_hits, ...

    # ---------------------------------------------------------------- row entry point
    def __call__(self, row: dict) -> dict:
        for k in self.outputs:
            row.setdefault(k, None)
        try:
            self._download(row)
        except DownloadError as e:
            fail(row, self.name, str(e))
        except tenacity.RetryError as e:  # pragma: no cover (reraise=True makes this rare)
            fail(row, self.name, f"gave up after retries: {e.last_attempt.exception()}")
        except TransientError as e:
            fail(row, self.name, f"{e} (after {self.cfg.attempts} attempts)")
        if row.get("error"):
            for k in self.outputs:
                row[k] = None
        return row

    def _download(self, row: dict) -> None:
        uri: str = row["uri"]
        expected = (row.get("sha256") or "").lower() or None
        fmt_hint = mesh_format(uri.split("::", 1)[0])
        # Cache hit: only possible when the identity hash is known up front.
        if expected and not uri.startswith("synthetic://"):
            meta = self._cache_lookup(expected)
            if meta is not None:
                self.stats["cache_hits"] += 1
                self._claim(row, expected)
                self._fill(row, expected, meta, None)
                return
        root = json.loads(row.get("provenance") or "{}").get("root")
        data, name, reader = self._fetch_main(uri, root)
        fmt = mesh_format(name) or fmt_hint
        if fmt not in MESH_FORMATS:
            raise DownloadError(f"unsupported file type {fmt or '(none)'!r} ({posixpath.basename(name)})")
        if mesh_format(name) != fmt:  # e.g. a Thingiverse download URL: give the file its extension
            name = re.sub(r"[^\w.\-]", "_", posixpath.basename(name)) + f".{fmt}"
        if fmt == "dae":
            raise DownloadError("unsupported format 'dae': this Blender has no COLLADA importer")
        # content rules and the bundle (main file + every file it refers to) before anything is kept
        files = {name: data}
        try:
            if fmt in asset_refs.REFERRING_FORMATS:
                files = asset_refs.bundle_files(name, data, reader, self.cfg.bundle_max_files)
            asset_content.check_bundle(files, name, set(self.render_cfg.unscannable_formats),
                                       self.render_cfg.max_image_pixels)
        except (asset_refs.ExternalReferenceError, ValueError) as e:  # ContentError is a ValueError
            raise DownloadError(str(e)) from None
        bundle = len(files) > 1
        content_sha = asset_refs.bundle_sha256(files, name)
        if row.get("sha256_uri"):
            hash_data, _, _ = self._fetch_main(row["sha256_uri"], root)
            check_sha = hashlib.sha256(hash_data).hexdigest()
        else:
            check_sha = hashlib.sha256(data).hexdigest()
        if expected and check_sha != expected:
            raise DownloadError(f"sha256 mismatch: expected {expected[:12]}…, got {check_sha[:12]}…")
        # identity: the dataset's declared hash (verified above; 3D-FUTURE: of image.jpg), else the hash of the
        # whole bundle, so two assets are duplicates only when every file they use is the same
        sha = expected or content_sha
        if not expected and sha in self.done_sha256:
            raise DownloadError(f"skipped: duplicate of done asset {sha}")
        self._claim(row, sha)
        payload = make_bundle(files, self.cfg.max_bytes) if bundle else data
        meta = {"mesh_format": fmt, "mesh_name": name if bundle else posixpath.basename(name),
                "mesh_bundle": bundle, "mesh_size": len(payload), "content_sha256": content_sha}
        self._cache_store(sha, payload, meta)
        self._fill(row, sha, meta, payload)

    def _claim(self, row: dict, sha: str) -> None:
        """One row per content hash: a second file with the same bytes in this run is a duplicate."""
        me = f"{row.get('source')}:{row.get('file_identifier')}"
        owner = self.claims.claim(sha, me)
        if owner != me:
            raise DownloadError(f"skipped: duplicate of {owner} (same sha256 {sha})")

    def _fill(self, row: dict, sha: str, meta: dict, payload: bytes | None) -> None:
        carry = int(meta["mesh_size"]) <= self.cfg.carry_max_bytes
        if carry and payload is None:
            payload = storage.read_bytes(self._cache_obj(sha), self.storage_cfg)
        row["sha256"] = sha
        row["mesh_bytes"] = payload if carry else None
        row["mesh_format"] = meta["mesh_format"]
        row["mesh_name"] = meta["mesh_name"]
        row["mesh_bundle"] = bool(meta["mesh_bundle"])
        row["mesh_size"] = int(meta["mesh_size"])
        row["untrusted_blend"] = meta["mesh_format"] == "blend"
        row["cache_uri"] = self._cache_obj(sha)

    # ---------------------------------------------------------------- cache
    def _cache_obj(self, sha: str) -> str:
        return f"{self.cache.rstrip('/')}/objects/{sha[:2]}/{sha}"

    def _cache_lookup(self, sha: str) -> dict | None:
        side = self._cache_obj(sha) + ".json"
        try:
            if storage.exists(side, self.storage_cfg):
                return json.loads(storage.read_bytes(side, self.storage_cfg))
        except (OSError, json.JSONDecodeError):
            return None
        return None

    def _cache_store(self, sha: str, payload: bytes, meta: dict) -> None:
        obj = self._cache_obj(sha)
        storage.write_bytes_atomic(obj, payload, self.storage_cfg)
        storage.write_bytes_atomic(obj + ".json", json.dumps(meta).encode(), self.storage_cfg)

    # ---------------------------------------------------------------- fetching
    def _fetch_main(self, uri: str, root: str | None = None):
        """(bytes, name, read_rel) of the file at ``uri``; ``read_rel`` reads siblings for bundles. ``root``:
        the local source folder the file was listed from (default: the file's own directory)."""
        if uri.startswith(ARCHIVE_SCHEMES):
            _, member, archive_uri = split_archive_uri(uri)
            member = safe_member(member)
            reader = self._archive(archive_uri)
            try:
                name = reader.resolve(member)
            except KeyError:
                if any(_strip_unsafe(u) == member or _strip_unsafe(u).endswith("/" + member) for u in reader.unsafe):
                    raise DownloadError(f"archive member {member!r} is a link or has an unsafe path in the archive")
                raise DownloadError(f"archive member {member!r} not found in {posixpath.basename(archive_uri)}")
            data = reader.read(name, self.cfg.max_bytes)

            def read_rel(rel: str) -> bytes | None:
                try:
                    return reader.read(rel, self.cfg.max_bytes)
                except KeyError:
                    return None

            return data, name, read_rel
        if uri.startswith("synthetic://"):
            from pipelines.preprocess.synthetic_meshes import synthetic_mesh_glb  # heavy: PIL, scipy

            seed = int(uri[len("synthetic://"):])
            data = synthetic_mesh_glb(seed)
            return data, f"synthetic_{seed}.glb", lambda rel: None
        if uri.startswith(("http://", "https://", "hf://")):
            url, headers = self._http_target(uri)
            data = self._http_get(url, headers, self.cfg.max_bytes)
            name = unquote(posixpath.basename(urlparse(url).path)) or "asset"

            def read_rel(rel: str) -> bytes | None:
                try:
                    return self._http_get(urljoin(url, rel), headers, self.cfg.max_bytes)
                except DownloadError:
                    return None

            return data, name, read_rel
        if uri.startswith("s3://"):
            data = self._s3_get(uri, self.cfg.max_bytes)
            base = uri.rsplit("/", 1)[0]

            def read_rel(rel: str) -> bytes | None:
                try:
                    return self._s3_get(f"{base}/{rel}", self.cfg.max_bytes)
                except DownloadError:
                    return None

            return data, uri.rsplit("/", 1)[-1], read_rel
        # local path / file://: the file must lie under its source root by real path, with no symlink (to a
        # file or a directory) anywhere below the root; its bundle is its own directory
        path = os.path.abspath(storage.local_path(uri))
        root = os.path.abspath(storage.local_path(root)) if root and not storage.is_s3(root) else os.path.dirname(path)
        if not os.path.lexists(path):
            raise DownloadError(f"file not found: {path}")
        rel = os.path.relpath(path, root)
        real_root = os.path.realpath(root)
        if rel.startswith(os.pardir) or os.path.realpath(path) != os.path.join(real_root, rel):
            raise DownloadError(str(asset_refs.ExternalReferenceError(rel, "symlink in the source folder")))
        try:
            data = storage.read_local_confined(path, root, self.cfg.max_bytes)
        except storage.OutsideRootError as e:
            raise DownloadError(str(asset_refs.ExternalReferenceError(rel, str(e)))) from None
        except ValueError as e:
            raise DownloadError(str(e)) from None
        return data, os.path.basename(path), asset_refs.confined_reader(os.path.dirname(path), self.cfg.max_bytes)

    def _http_target(self, uri: str) -> tuple[str, dict]:
        if not uri.startswith("hf://"):
            return uri, {}
        # hf://datasets/<org>/<name>/<path in repo>[@revision is not supported: use sources.hssd_revision]
        parts = uri[len("hf://"):].split("/")
        if len(parts) < 4 or parts[0] not in ("datasets", "models", "spaces"):
            raise DownloadError(f"bad hf uri {uri!r}; expected hf://datasets/<org>/<repo>/<path>")
        from huggingface_hub import get_token, hf_hub_url  # heavy: huggingface_hub

        repo_type = parts[0].rstrip("s")
        url = hf_hub_url(repo_id=f"{parts[1]}/{parts[2]}", filename="/".join(parts[3:]), repo_type=repo_type,
                         revision=self.sources_cfg.hssd_revision, endpoint=self.sources_cfg.hf_endpoint)
        token = get_token()
        return url, ({"Authorization": f"Bearer {token}"} if token else {})

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            stop=tenacity.stop_after_attempt(max(1, self.cfg.attempts)),
            # exponential backoff (initial * 2^n, capped) plus up to `initial` of random jitter
            wait=(tenacity.wait_exponential(multiplier=self.cfg.backoff_initial_s, max=self.cfg.backoff_max_s)
                  + tenacity.wait_random(0, self.cfg.backoff_initial_s)),
            retry=tenacity.retry_if_exception_type(TransientError),
            reraise=True,
            before_sleep=lambda rs: log.info("retrying %s after %s", rs.fn, rs.outcome.exception()),
        )

    def _http_get(self, url: str, headers: dict, max_bytes: int) -> bytes:
        buf = io.BytesIO()
        self._http_stream(url, headers, max_bytes, buf)
        return buf.getvalue()

    def _http_stream(self, url: str, headers: dict, max_bytes: int, out) -> None:
        if self._session is None:
            self._session = requests.Session()
        host = urlparse(url).netloc
        for attempt in self._retrying():
            with attempt:
                self.stats["http_attempts"] += 1
                out.seek(0)
                out.truncate()
                with self.slots(host):
                    try:
                        with self._session.get(url, headers=headers, stream=True,
                                               timeout=self.cfg.timeout_s) as r:
                            if r.status_code in TRANSIENT_HTTP:
                                raise TransientError(f"HTTP {r.status_code} {r.reason}")
                            if r.status_code >= 400:
                                raise DownloadError(f"HTTP {r.status_code} {r.reason}")
                            length = r.headers.get("Content-Length")
                            if length is not None and int(length) > max_bytes:
                                raise DownloadError(f"size cap: {int(length)} bytes > {max_bytes}")
                            n = 0
                            for chunk in r.iter_content(1 << 16):
                                n += len(chunk)
                                if n > max_bytes:
                                    raise DownloadError(f"size cap: more than {max_bytes} bytes")
                                out.write(chunk)
                            if length is not None and n != int(length) and "Content-Encoding" not in r.headers:
                                raise TransientError(f"truncated body: {n} of {length} bytes")
                    except (requests.ConnectionError, requests.Timeout) as e:
                        raise TransientError(f"{type(e).__name__}: {e}") from e
                    except requests.exceptions.ChunkedEncodingError as e:
                        raise TransientError(f"truncated body: {e}") from e

    def _s3_client(self):
        if self._s3 is None:
            import boto3  # heavy: boto3, botocore
            from botocore.config import Config  # heavy: botocore

            kw = {}
            endpoint = storage.s3_endpoint(self.storage_cfg.s3_endpoint_url)
            if endpoint:
                kw["endpoint_url"] = endpoint
            conf = Config(retries={"max_attempts": max(1, self.cfg.attempts), "mode": "standard"},
                          connect_timeout=self.cfg.timeout_s, read_timeout=self.cfg.timeout_s)
            if self.storage_cfg.s3_anonymous:
                from botocore import UNSIGNED  # heavy: botocore

                conf = conf.merge(Config(signature_version=UNSIGNED))
            self._s3 = boto3.client("s3", region_name=self.storage_cfg.s3_region, config=conf, **kw)
        return self._s3

    def _s3_get(self, uri: str, max_bytes: int, to_file: str | None = None) -> bytes | None:
        from botocore.exceptions import ClientError, EndpointConnectionError  # heavy: botocore

        bucket, key = uri[len("s3://"):].split("/", 1)
        s3 = self._s3_client()
        try:
            with self.slots(bucket):
                head = s3.head_object(Bucket=bucket, Key=key)
                if head["ContentLength"] > max_bytes:
                    raise DownloadError(f"size cap: {head['ContentLength']} bytes > {max_bytes}")
                if to_file:
                    s3.download_file(bucket, key, to_file)
                    return None
                return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                raise DownloadError(f"s3 object not found: {uri}") from None
            raise DownloadError(f"s3 error {code}: {e}") from None
        except EndpointConnectionError as e:
            raise DownloadError(f"s3 unreachable after {self.cfg.attempts} attempts: {e}") from None

    # ---------------------------------------------------------------- archives
    def _archive(self, archive_uri: str) -> ArchiveReader:
        if archive_uri in self._archives:
            self._archives.move_to_end(archive_uri)
            return self._archives[archive_uri]
        path = self._archive_local(archive_uri)
        reader = ArchiveReader(path, self.extract_root)
        self._archives[archive_uri] = reader
        while len(self._archives) > 8:
            _, old = self._archives.popitem(last=False)
            old.close()
        return reader

    def _archive_local(self, archive_uri: str) -> str:
        """Local path of the archive: in place for local files, else fetched once (cache, then node copy)."""
        if not archive_uri.startswith(("http://", "https://", "hf://", "s3://")):
            path = storage.local_path(archive_uri)
            if not os.path.isfile(path):
                raise DownloadError(f"archive not found: {path}")
            return path
        key = hashlib.sha256(archive_uri.encode()).hexdigest()[:32]
        suffix = posixpath.basename(urlparse(archive_uri.split("?")[0]).path)[-40:] or "archive"
        cached = f"{self.cache.rstrip('/')}/archives/{key}-{suffix}"
        if not storage.is_s3(cached) and os.path.isfile(cached):
            return cached
        node_copy = os.path.join(self.extract_root, f"a-{key}-{suffix}")
        os.makedirs(self.extract_root, exist_ok=True)
        with open(os.path.join(self.extract_root, f".a-{key}.lock"), "w") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                if os.path.isfile(node_copy):
                    return node_copy
                tmp = node_copy + f".tmp-{uuid.uuid4().hex[:8]}"
                try:
                    if storage.is_s3(cached) and storage.exists(cached, self.storage_cfg):
                        self._s3_get(cached, self.cfg.max_archive_bytes, to_file=tmp)
                    else:
                        if archive_uri.startswith("s3://"):
                            self._s3_get(archive_uri, self.cfg.max_archive_bytes, to_file=tmp)
                        else:
                            url, headers = self._http_target(archive_uri)
                            with open(tmp, "wb") as f:
                                self._http_stream(url, headers, self.cfg.max_archive_bytes, f)
                        storage.upload_file_atomic(tmp, cached, self.storage_cfg)
                        if not storage.is_s3(cached):
                            return cached
                    os.replace(tmp, node_copy)
                    return node_copy
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)
