"""Small storage layer over local paths and s3:// URIs (pyarrow filesystems), with atomic writes.

Atomicity: a local file is written to a hidden temporary name in the same directory and renamed
(``os.replace``); an S3 object is written with one PUT / completed multipart upload, which S3 makes visible
only when complete. Either way a reader sees the whole file or nothing.
"""
from __future__ import annotations

import os
import stat
import uuid
from functools import lru_cache
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> str:
    if uri.startswith("file://"):
        return urlparse(uri).path
    return uri


def s3_endpoint(endpoint_url: str | None = None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@lru_cache(maxsize=8)
def _s3fs(endpoint_url: str | None, region: str, anonymous: bool) -> pafs.S3FileSystem:
    kw: dict = {"region": region, "anonymous": anonymous}
    if endpoint_url:
        u = urlparse(endpoint_url)
        kw["endpoint_override"] = u.netloc or u.path
        kw["scheme"] = u.scheme or "http"
    kw["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=5)
    return pafs.S3FileSystem(**kw)


def filesystem(uri: str, storage=None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path, file:// or s3:// URI."""
    if is_s3(uri):
        endpoint = s3_endpoint(getattr(storage, "s3_endpoint_url", None))
        region = getattr(storage, "s3_region", None) or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
        anonymous = bool(getattr(storage, "s3_anonymous", False))
        return _s3fs(endpoint, region, anonymous), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(uri))


def exists(uri: str, storage=None) -> bool:
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, storage=None) -> bytes:
    fs, path = filesystem(uri, storage)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, storage=None) -> None:
    fs, path = filesystem(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def upload_file_atomic(local_src: str, uri: str, storage=None) -> None:
    """Copy a local file to ``uri`` (local: temp + rename; S3: one object write)."""
    fs, path = filesystem(uri, storage)
    if isinstance(fs, pafs.LocalFileSystem):
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
        try:
            pafs.copy_files(local_src, tmp, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        pafs.copy_files(local_src, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def list_files(uri: str, storage=None, suffix: str = "", recursive: bool = True) -> list[str]:
    """URIs of the files under ``uri`` (sorted); hidden names (``.x`` / ``_x``) are skipped.

    Local folders are walked without following any symlink to a directory (inside or outside the folder:
    deny by default); a symlinked file is listed under its own name, and reading it goes through
    :func:`read_local_confined`, which refuses it when its real path leaves the folder."""
    fs, path = filesystem(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if isinstance(fs, pafs.LocalFileSystem):
        found = _walk_local(path, recursive)
    else:
        sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        found = [fi.path for fi in fs.get_file_info(sel) if fi.type == pafs.FileType.File]
    out = []
    for p in found:
        rel = p[len(path):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if suffix and not p.endswith(suffix):
            continue
        out.append(to_uri(p, uri))
    return sorted(out)


def _walk_local(root: str, recursive: bool) -> list[str]:
    """Paths of the non-directory entries under ``root``; symlinks to directories are listed nowhere and
    never entered (their targets may lie anywhere)."""
    out, todo = [], [root]
    while todo:
        d = todo.pop()
        try:
            entries = list(os.scandir(d))
        except (NotADirectoryError, FileNotFoundError, PermissionError):
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                if recursive:
                    todo.append(e.path)
            elif e.is_symlink() and e.is_dir(follow_symlinks=True):
                continue
            else:
                out.append(e.path)
    return out


class OutsideRootError(Exception):
    """A local path whose real location is not under its root (a symlink leading out), or not a regular
    file (device, FIFO, socket, directory)."""


def within(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def read_local_confined(path: str, root: str, max_bytes: int | None = None) -> bytes:
    """Bytes of the regular file ``path`` whose real path lies under the real path of ``root``.

    Raises :class:`OutsideRootError` for a path that resolves outside ``root`` (a symlinked file or any
    symlinked directory on the way) or that is not a regular file (``/dev/*``, FIFOs, sockets: opened
    non-blocking and checked with ``fstat`` before one byte is read), ``ValueError`` over ``max_bytes``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if not within(real, real_root):
        raise OutsideRootError("symlink to outside the bundle")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutsideRootError("not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ValueError(f"size cap: {st.st_size} bytes > {max_bytes}")
        chunks, n = [], 0
        while chunk := os.read(fd, 1 << 20):
            n += len(chunk)
            if max_bytes is not None and n > max_bytes:
                raise ValueError(f"size cap: more than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def delete(uri: str, storage=None) -> None:
    fs, path = filesystem(uri, storage)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def to_uri(path: str, like: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as ``like``."""
    return f"s3://{path}" if is_s3(like) else path


def size(uri: str, storage=None) -> int:
    fs, path = filesystem(uri, storage)
    return fs.get_file_info(path).size


def download_file(uri: str, local_dst: str, storage=None, chunk: int = 1 << 20) -> None:
    """Stream a local or s3:// file to a local path in chunks (never whole in memory)."""
    fs, path = filesystem(uri, storage)
    with fs.open_input_stream(path) as src, open(local_dst, "wb") as dst:
        while True:
            b = src.read(chunk)
            if not b:
                break
            dst.write(b)
