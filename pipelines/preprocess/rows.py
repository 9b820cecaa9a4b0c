"""Row helpers shared by all stages (see pipelines/README.md, "Row fields").

Rows are plain dicts. Two rules come from Ray Data: every row of a stage's output has the same keys, and
arrays travel as bytes (``pack_array``), never as numpy arrays.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

# Keys every source row carries, in order. ``sources.base.make_row`` fills them.
SOURCE_KEYS = (
    "sha256",
    "source",
    "file_identifier",
    "uri",
    "sha256_uri",
    "license",
    "aesthetic_score",
    "provenance",
    "error",
    "timings",
)


def pack_array(a: np.ndarray) -> bytes:
    """numpy array -> ``.npy`` bytes (dtype and shape travel with the data)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def unpack_array(b: bytes | memoryview | None) -> np.ndarray | None:
    """Inverse of :func:`pack_array`; ``None`` stays ``None``."""
    if b is None:
        return None
    return np.load(io.BytesIO(bytes(b)), allow_pickle=False)


def fail(row: dict, stage: str, reason: str) -> dict:
    """Mark ``row`` as failed at ``stage`` (later stages pass it through untouched)."""
    reason = " ".join(str(reason).split())  # one line, stable for grouping
    if len(reason) > 500:
        reason = reason[:497] + "..."
    row["error"] = f"{stage}: {reason}"
    return row


def failed(row: dict) -> bool:
    return bool(row.get("error"))


def error_stage(error: str | None) -> str | None:
    """``"render: timeout"`` -> ``"render"``."""
    if not error:
        return None
    return error.split(":", 1)[0].strip()


def add_timing(row: dict, stage: str, seconds: float) -> None:
    t = json.loads(row.get("timings") or "{}")
    t[stage] = round(float(seconds), 6)
    row["timings"] = json.dumps(t, sort_keys=True)


def timings(row: dict) -> dict[str, float]:
    return json.loads(row.get("timings") or "{}")


def provenance(row: dict) -> dict[str, Any]:
    return json.loads(row.get("provenance") or "{}")
