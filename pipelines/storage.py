"""Small storage layer over local paths and s3:// URIs (pyarrow filesystems), with atomic writes.

Atomicity: a local file is written to a hidden temporary name in the same directory and renamed
(``os.replace``); an S3 object is written with one PUT / completed multipart upload, which S3 makes visible
only when complete. Either way a reader sees the whole file or nothing.
"""
from __future__ import annotations

import os
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
    """URIs of the files under ``uri`` (sorted); hidden names (``.x`` / ``_x``) are skipped."""
    fs, path = filesystem(uri, storage)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    out = []
    for fi in fs.get_file_info(sel):
        if fi.type != pafs.FileType.File:
            continue
        rel = fi.path[len(path):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if suffix and not fi.path.endswith(suffix):
            continue
        out.append(to_uri(fi.path, uri))
    return sorted(out)


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
