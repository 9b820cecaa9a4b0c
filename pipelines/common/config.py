"""Configuration sections that several jobs of the Ray layer share (each job's own tree names them as fields):
`RayConfig`, the Ray instance of a Ray Data job (preprocess, synthesize, evaluate, the demo's data stages), and
`StorageConfig`, object-store access to sources, caches, shards and outputs."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS (ray job submit) or start a local instance
    num_cpus: int | None = None  # local instance only
    include_dashboard: bool = False  # local instance only (the dashboard probes cloud metadata at start)
    object_store_memory_gb: float | None = None  # local instance only
    rows_per_block: int = 4  # input granularity: rows per Ray Data block fed to the first stage


@dataclass
class StorageConfig:
    """Object-store access shared by sources, cache and output."""

    s3_endpoint_url: str | None = None  # e.g. http://127.0.0.1:9000; AWS_ENDPOINT_URL is honoured too
    s3_region: str = "us-east-1"
    s3_anonymous: bool = False
