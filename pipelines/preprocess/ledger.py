"""Resume bookkeeping: per-asset, per-stage records keyed by (sha256 | source+file_identifier) × stage × config hash.

Layout: ``<output>/ledger/<config_hash>/<name>.parquet``, one small Parquet file per writer batch (no shared
file is ever appended to, so concurrent writers never conflict). Each file is written atomically (local:
temp name + rename; S3: one object PUT), so a file is complete or absent.

Records (``LEDGER_SCHEMA``): one per stage an asset completed (``done`` + seconds), one for the stage where it
failed (``failed`` + reason), and for committed assets a ``write``/``done`` record naming the shard file.
An asset is **done** when it has a ``write``/``done`` record; the writer commits the shard first and the
ledger file second, so a ``done`` record always points to a complete shard. Shard files no record names are
orphans of a killed run (:meth:`Ledger.orphan_shards`).
"""
from __future__ import annotations

import io
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.common import storage
from pipelines.preprocess.config import join_uri
import numpy as np

log = logging.getLogger(__name__)

LEDGER_SCHEMA = pa.schema([
    ("sha256", pa.string()),
    ("source", pa.string()),
    ("file_identifier", pa.string()),
    ("uri", pa.string()),
    ("stage", pa.string()),
    ("status", pa.string()),  # done | failed | skipped
    ("reason", pa.string()),
    ("seconds", pa.float64()),
    ("config_hash", pa.string()),
    ("run_id", pa.string()),
    ("shard", pa.string()),  # write/done only: shard file name (relative to the shard dir)
    ("bytes", pa.int64()),  # write/done only: bytes of the asset's shard row
    ("time", pa.float64()),  # unix time of the record
    ("stats", pa.string()),  # write/done only: JSON, e.g. per-instance SLat channel means
    ("sandbox", pa.string()),  # the render sandbox: namespace | userns | none (allowed unsandboxed) for an asset
    #                            that reached the render worker (unavailable: it could not be set up; unknown:
    #                            the worker was killed first), else the job's rule: required | optional
])

WRITE_STAGE = "write"


def sandbox_mode(row: dict, allow_unsandboxed: bool) -> str:
    """What a ledger record says of the render sandbox for ``row`` (see LEDGER_SCHEMA)."""
    return row.get("sandbox") or ("optional" if allow_unsandboxed else "required")


def asset_key(sha256: str | None, source: str | None, file_identifier: str | None) -> tuple[str, str]:
    return ("sha", sha256) if sha256 else ("id", f"{source}\x1f{file_identifier}")


@dataclass
class LedgerState:
    """What a new run needs: which assets to skip and which shard files are committed."""

    done_sha: set[str] = field(default_factory=set)
    done_ids: set[str] = field(default_factory=set)  # "source\x1ffile_identifier"
    skipped_ids: set[str] = field(default_factory=set)  # duplicates of a done asset: not redone, not rows
    done_count: int = 0  # assets with a committed shard row (one per content hash)
    failed_sha: set[str] = field(default_factory=set)
    failed_ids: set[str] = field(default_factory=set)
    failed_reason: dict[str, str] = field(default_factory=dict)
    shards: set[str] = field(default_factory=set)
    slat_stats: list[tuple[list[float], list[float]]] = field(default_factory=list)
    bytes_done: int = 0

    def is_done(self, row: dict) -> bool:
        if row.get("sha256") and row["sha256"] in self.done_sha:
            return True
        idkey = f"{row.get('source')}\x1f{row.get('file_identifier')}"
        return idkey in self.done_ids or idkey in self.skipped_ids

    def is_failed(self, row: dict) -> bool:
        if row.get("sha256") and row["sha256"] in self.failed_sha:
            return True
        return f"{row.get('source')}\x1f{row.get('file_identifier')}" in self.failed_ids


class Ledger:
    def __init__(self, output: str, config_hash: str, storage_cfg=None):
        self.output = output
        self.config_hash = config_hash
        self.storage_cfg = storage_cfg
        self.dir = join_uri(output, "ledger", config_hash)

    # ------------------------------------------------------------------ writing
    def write(self, records: list[dict], name: str | None = None) -> str | None:
        """Write one batch of records as one atomic file; returns its URI."""
        if not records:
            return None
        now = time.time()
        cols = {f.name: [] for f in LEDGER_SCHEMA}
        for r in records:
            for f in LEDGER_SCHEMA:
                v = r.get(f.name)
                if f.name == "config_hash":
                    v = v or self.config_hash
                elif f.name == "time":
                    v = v if v is not None else now
                cols[f.name].append(v)
        table = pa.table(cols, schema=LEDGER_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        uri = join_uri(self.dir, f"{name or 'batch-' + uuid.uuid4().hex}.parquet")
        storage.write_bytes_atomic(uri, buf.getvalue(), self.storage_cfg)
        return uri

    # ------------------------------------------------------------------ reading
    def files(self) -> list[str]:
        return storage.list_files(self.dir, self.storage_cfg, suffix=".parquet")

    def load(self, run_id: str | None = None) -> pa.Table:
        tables = []
        for uri in self.files():
            try:
                tables.append(pq.read_table(io.BytesIO(storage.read_bytes(uri, self.storage_cfg))))
            except (OSError, pa.ArrowInvalid) as e:  # never produced by our atomic writes; be tolerant
                log.warning("ledger: unreadable file %s (%s) ignored", uri, e)
        if not tables:
            return LEDGER_SCHEMA.empty_table()
        t = pa.concat_tables([_with_all_columns(x).cast(LEDGER_SCHEMA) for x in tables])
        if run_id is not None:
            t = t.filter(pa.compute.equal(t["run_id"], run_id))
        return t

    def records(self, run_id: str | None = None) -> list[dict]:
        return self.load(run_id).to_pylist()

    def state(self) -> LedgerState:
        """Latest outcome per asset (done is final; a later failure never un-does a done asset)."""
        st = LedgerState()
        recs = sorted(self.records(), key=lambda r: r["time"] or 0.0)
        last_fail: dict[tuple[str, str], dict] = {}
        seen_done_shard_rows: set[tuple[str, str]] = set()
        for r in recs:
            key = asset_key(r["sha256"], r["source"], r["file_identifier"])
            idkey = f"{r['source']}\x1f{r['file_identifier']}"
            if r["stage"] == WRITE_STAGE and r["status"] == "done":
                if r["sha256"]:
                    st.done_sha.add(r["sha256"])
                st.done_ids.add(idkey)
                if r["shard"]:
                    st.shards.add(r["shard"])
                if key not in seen_done_shard_rows:
                    seen_done_shard_rows.add(key)
                    st.done_count += 1
                    st.bytes_done += int(r["bytes"] or 0)
                    if r["stats"]:
                        s = json.loads(r["stats"])
                        if "slat_mean" in s:
                            st.slat_stats.append((s["slat_mean"], s["slat_sqmean"]))
                last_fail.pop(key, None)
            elif r["status"] == "skipped":
                st.skipped_ids.add(idkey)
            elif r["status"] == "failed":
                last_fail[key] = r
        for key, r in last_fail.items():
            if (r["sha256"] and r["sha256"] in st.done_sha):
                continue
            idkey = f"{r['source']}\x1f{r['file_identifier']}"
            if r["sha256"]:
                st.failed_sha.add(r["sha256"])
            st.failed_ids.add(idkey)
            st.failed_reason[idkey] = r["reason"] or ""
        return st

    # ------------------------------------------------------------------ maintenance
    def compact(self) -> int:
        """Merge all batch files into one (then delete them). Safe to interrupt: duplicate records are
        harmless (``state`` is idempotent) and files are only deleted after the merged file exists."""
        files = self.files()
        if len(files) <= 1:
            return len(files)
        table = self.load()
        name = f"compact-{int(time.time())}-{uuid.uuid4().hex[:8]}"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        storage.write_bytes_atomic(join_uri(self.dir, f"{name}.parquet"), buf.getvalue(), self.storage_cfg)
        for uri in files:
            storage.delete(uri, self.storage_cfg)
        return 1


def _with_all_columns(t: pa.Table) -> pa.Table:
    """A ledger file written before a column existed gets that column as nulls."""
    for f in LEDGER_SCHEMA:
        if f.name not in t.column_names:
            t = t.append_column(f, pa.nulls(t.num_rows, f.type))
    return t.select([f.name for f in LEDGER_SCHEMA])


def slat_normalisation(stats: list[tuple[list[float], list[float]]]) -> dict | None:
    """TRELLIS's statistics rule (reference §3.6): mean = E[instance mean], std = sqrt(E[instance mean of
    x²] − mean²), per channel."""
    if not stats:
        return None

    means = np.asarray([s[0] for s in stats], np.float64)
    sq = np.asarray([s[1] for s in stats], np.float64)
    mean = means.mean(0)
    std = np.sqrt(np.maximum(sq.mean(0) - mean**2, 1e-12))
    return {"mean": mean.tolist(), "std": std.tolist(), "count": int(len(stats))}
