"""What every source shares: the row builder, spec options, table reading."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from pipelines.common import storage
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.rows import SOURCE_KEYS
import requests


def make_row(*, source: str, file_identifier: str, uri: str, sha256: str | None = None,
             sha256_uri: str | None = None, license: str | None = None, aesthetic_score: float | None = None,
             **provenance: Any) -> dict:
    """A source row with exactly the keys of ``rows.SOURCE_KEYS`` (extra keyword args -> provenance JSON)."""
    row = {
        "sha256": (str(sha256).lower() if sha256 else None),
        "source": source,
        "file_identifier": str(file_identifier),
        "uri": uri,
        "sha256_uri": sha256_uri,
        "license": (str(license) if license not in (None, "") else None),
        "aesthetic_score": (None if aesthetic_score is None or aesthetic_score != aesthetic_score
                            else float(aesthetic_score)),
        "provenance": json.dumps({k: v for k, v in provenance.items() if v is not None}, sort_keys=True,
                                 default=str),
        "error": None,
        "timings": "{}",
    }
    assert tuple(row) == SOURCE_KEYS
    return row


@dataclass
class SourceSpec:
    """``kind:arg?key=value&key=value`` parsed."""

    kind: str
    arg: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""


class Source(Protocol):
    name: str

    def rows(self) -> Iterator[dict]: ...


@dataclass
class ListingHints:
    """Filters a source may apply early (vectorised) before building row dicts; the generic filter
    (``sources.filter_rows``) is applied afterwards anyway."""

    sha256_allow: set[str] | None = None
    file_types: set[str] | None = None


def read_uri_bytes(uri: str, cfg: PreprocessConfig) -> bytes:
    """Bytes of a (small) metadata file: local path, s3://, http(s)://, hf://."""
    if uri.startswith(("http://", "https://")):

        r = requests.get(uri, timeout=cfg.download.timeout_s)
        r.raise_for_status()
        return r.content
    if uri.startswith("hf://"):
        from huggingface_hub import HfFileSystem  # heavy: huggingface_hub

        with HfFileSystem(endpoint=cfg.sources.hf_endpoint).open(uri, "rb") as f:
            return f.read()
    return storage.read_bytes(uri, cfg.storage)


def read_table(uri: str, cfg: PreprocessConfig):
    """CSV or Parquet metadata file -> pandas DataFrame."""
    import pandas as pd  # heavy: pandas

    data = read_uri_bytes(uri, cfg)
    if uri.lower().endswith((".parquet", ".pq")) or data[:4] == b"PAR1":
        return pd.read_parquet(io.BytesIO(data))
    return pd.read_csv(io.BytesIO(data))


def to_uri(path_or_uri: str) -> str:
    """Local paths become absolute; URIs stay."""
    if "://" in path_or_uri:
        return path_or_uri
    return os.path.abspath(os.path.expanduser(path_or_uri))


def clean(v: Any) -> Any:
    """NaN/NA -> None; numpy scalars -> Python."""
    try:
        import pandas as pd  # optional: pandas

        if v is None or (not isinstance(v, (list, dict, tuple)) and pd.isna(v)):
            return None
    except (TypeError, ValueError):
        pass
    if hasattr(v, "item") and not isinstance(v, (list, dict, str, bytes)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            return v
    return v
