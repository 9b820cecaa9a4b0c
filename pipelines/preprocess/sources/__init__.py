"""Sources: one file per dataset, each yielding rows with the same keys (pipelines/README.md, "Source row").

Spec forms (``--source`` / ``sources.specs``), each optionally followed by ``?key=value&key=value``:

| spec | dataset |
|---|---|
| ``local:<dir>`` or ``local:s3://bucket/prefix`` (alias ``s3:``) | every mesh file under a folder / prefix |
| ``manifest:<csv or parquet>`` | a table of ``uri`` + optional ``sha256`` … |
| ``synthetic:<count>`` | procedural meshes, ``synthetic://<seed>`` |
| ``objaverse:<uid,uid,…>`` / ``objaverse:@uids.txt`` / ``objaverse:all`` | Objaverse 1.0 |
| ``objaverse-xl:<sketchfab,github,thingiverse,smithsonian>`` | Objaverse-XL |
| ``abo:<abo-3dmodels.tar>`` | Amazon Berkeley Objects |
| ``3d-future:<3D-FUTURE-model.zip>`` | 3D-FUTURE |
| ``toys4k:<toys4k_blend_files.zip>`` | Toys4k |
| ``hssd:<HSSD.csv or file list>`` | HSSD (gated, ``$HF_TOKEN``) |

:func:`list_rows` lists every source on the driver, applies ``filter`` (TRELLIS-500K metadata, aesthetic
threshold, sha256 list, licences, file types), removes duplicates (same sha256 or same uri) and the limit.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from urllib.parse import parse_qsl

from pipelines.preprocess.config import MESH_FORMATS, PreprocessConfig
from pipelines.preprocess.download import mesh_format
from pipelines.preprocess.sources.base import ListingHints, SourceSpec, make_row, read_uri_bytes, to_uri

log = logging.getLogger(__name__)


def _registry():
    from pipelines.preprocess.sources.abo import ABOSource  # cycle: pipelines.preprocess.sources.abo
    from pipelines.preprocess.sources.future3d import Future3DSource  # cycle: pipelines.preprocess.sources.future3d
    from pipelines.preprocess.sources.hssd import HSSDSource  # cycle: pipelines.preprocess.sources.hssd
    from pipelines.preprocess.sources.local import LocalSource  # cycle: pipelines.preprocess.sources.local
    from pipelines.preprocess.sources.manifest import ManifestSource  # cycle: pipelines.preprocess.sources.manifest
    # cycle: pipelines.preprocess.sources.objaverse
    from pipelines.preprocess.sources.objaverse import ObjaverseSource, ObjaverseXLSource
    from pipelines.preprocess.sources.synthetic import SyntheticSource  # cycle: pipelines.preprocess.sources.synthetic
    from pipelines.preprocess.sources.toys4k import Toys4kSource  # cycle: pipelines.preprocess.sources.toys4k

    return {
        "local": LocalSource, "s3": LocalSource, "folder": LocalSource,
        "manifest": ManifestSource,
        "synthetic": SyntheticSource,
        "objaverse": ObjaverseSource,
        "objaverse-xl": ObjaverseXLSource, "objaverse_xl": ObjaverseXLSource, "oxl": ObjaverseXLSource,
        "abo": ABOSource,
        "3d-future": Future3DSource, "3d_future": Future3DSource, "future3d": Future3DSource,
        "toys4k": Toys4kSource,
        "hssd": HSSDSource,
    }


def parse_spec(text: str) -> SourceSpec:
    text = text.strip()
    if text.startswith("s3://"):
        return SourceSpec("s3", text, {}, text)
    if ":" not in text:
        raise ValueError(f"source spec {text!r} is not of the form kind:argument (e.g. synthetic:4, local:/data)")
    kind, rest = text.split(":", 1)
    kind = kind.lower()
    options: dict[str, str] = {}
    # Options follow the last '?' that is followed by key=value pairs.
    if "?" in rest:
        head, tail = rest.rsplit("?", 1)
        if tail and all("=" in kv for kv in tail.split("&")):
            rest, options = head, dict(parse_qsl(tail, keep_blank_values=True))
    if kind not in _registry():
        raise ValueError(f"unknown source kind {kind!r} in {text!r}; known: {', '.join(sorted(_registry()))}")
    return SourceSpec(kind, rest, options, text)


def build_source(spec: str | SourceSpec, cfg: PreprocessConfig, hints: ListingHints | None = None):
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    return _registry()[spec.kind](spec, cfg, hints or ListingHints())


# kinds whose argument names one local folder or file (or a URI): missing ones are argument errors
LOCAL_PATH_KINDS = {"local", "folder", "manifest", "abo", "3d-future", "3d_future", "future3d", "toys4k"}


def check_specs(cfg: PreprocessConfig, specs: list[str] | None = None) -> None:
    """Every spec parses and builds (unknown kind, bad count...) and every local path it names exists: one-line
    ValueError otherwise. Lists nothing and reads no asset (the job calls it before Ray starts)."""
    specs = list(specs if specs is not None else cfg.sources.specs)
    if not specs:
        raise ValueError("no sources given: pass --source SPEC (e.g. synthetic:4) or set sources.specs")
    for text in specs:
        spec = parse_spec(text)
        build_source(spec, cfg)
        arg = spec.arg.strip()
        if spec.kind in LOCAL_PATH_KINDS and "://" not in arg and not os.path.exists(os.path.expanduser(arg)):
            raise ValueError(f"source {text!r}: {to_uri(arg)} does not exist")


def _sha_list(cfg: PreprocessConfig) -> set[str] | None:
    if not cfg.filter.sha256_list:
        return None
    text = read_uri_bytes(to_uri(cfg.filter.sha256_list), cfg).decode()
    return {line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#")}


def list_rows(cfg: PreprocessConfig, specs: list[str] | None = None) -> tuple[list[dict], dict]:
    """All source rows after filtering and de-duplication, plus listing statistics."""
    from pipelines.preprocess.sources.trellis import TrellisMetadata  # cycle: pipelines.preprocess.sources.trellis

    specs = list(specs if specs is not None else cfg.sources.specs)
    if not specs:
        raise ValueError("no sources given: pass --source SPEC (e.g. synthetic:4) or set sources.specs")
    trellis = TrellisMetadata(cfg) if cfg.filter.trellis_metadata else None
    sha_list = _sha_list(cfg)
    allow = None
    if trellis is not None:
        allow = trellis.allowed()
    if sha_list is not None:
        allow = sha_list if allow is None else (allow & sha_list)
    types = {t.lower().lstrip(".") for t in cfg.filter.file_types} if cfg.filter.file_types else None
    hints = ListingHints(sha256_allow=allow if trellis is None else None, file_types=types)
    licenses = {x.lower() for x in cfg.filter.licenses} if cfg.filter.licenses else None

    stats: Counter = Counter()
    out: list[dict] = []
    seen_sha: set[str] = set()
    seen_uri: set[str] = set()
    for spec in specs:
        src = build_source(spec, cfg, hints)
        n_src = 0
        for row in src.rows():
            stats["listed"] += 1
            if trellis is not None:
                row = trellis.apply(row)
                if row is None:
                    stats["dropped_trellis_metadata"] += 1
                    continue
            if sha_list is not None and row["sha256"] not in sha_list:
                stats["dropped_sha256_list"] += 1
                continue
            score = row["aesthetic_score"]
            if cfg.filter.min_aesthetic is not None and score is not None and score < cfg.filter.min_aesthetic:
                stats["dropped_aesthetic"] += 1
                continue
            if licenses is not None and (row["license"] or "").lower() not in licenses:
                stats["dropped_license"] += 1
                continue
            fmt = mesh_format(row["uri"].split("::", 1)[0])
            if (types is not None and fmt not in types) or (fmt and fmt not in MESH_FORMATS and
                                                            not row["uri"].startswith("synthetic://")):
                stats["dropped_file_type"] += 1
                continue
            if row["sha256"] and row["sha256"] in seen_sha or row["uri"] in seen_uri:
                stats["dropped_duplicate"] += 1
                continue
            if cfg.sources.limit_per_source is not None and n_src >= cfg.sources.limit_per_source:
                break
            if row["sha256"]:
                seen_sha.add(row["sha256"])
            seen_uri.add(row["uri"])
            out.append(row)
            n_src += 1
            stats[f"source:{row['source']}"] += 1
            if cfg.filter.limit is not None and len(out) >= cfg.filter.limit:
                break
        if cfg.filter.limit is not None and len(out) >= cfg.filter.limit:
            break
    stats["rows"] = len(out)
    return out, dict(stats)


__all__ = ["parse_spec", "build_source", "list_rows", "make_row", "SourceSpec", "ListingHints"]
