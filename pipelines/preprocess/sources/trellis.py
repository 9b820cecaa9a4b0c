"""TRELLIS-500K metadata CSVs (``JeffreyXiang/TRELLIS-500K/<subset>.csv``) used as a filter.

``filter.trellis_metadata`` lists CSVs (local, s3://, http(s)://, or ``hf://datasets/JeffreyXiang/TRELLIS-500K/
ABO.csv``). A row is kept when its sha256 — or, when the sha256 is not known before download, its
``file_identifier`` — appears in one of them with ``aesthetic_score >= filter.min_aesthetic``. Kept rows get
the CSV's ``aesthetic_score``, expected ``sha256`` and ``captions``.
"""
from __future__ import annotations

import json
import logging

from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.sources.base import clean, read_table, to_uri

log = logging.getLogger(__name__)


class TrellisMetadata:
    def __init__(self, cfg: PreprocessConfig):
        self.by_sha: dict[str, dict] = {}
        self.by_fid: dict[str, str] = {}
        self.min_aesthetic = cfg.filter.min_aesthetic
        for uri in cfg.filter.trellis_metadata:
            df = read_table(to_uri(uri), cfg)
            if "sha256" not in df.columns:
                raise ValueError(f"TRELLIS metadata {uri} has no sha256 column")
            if self.min_aesthetic is not None and "aesthetic_score" in df.columns:
                df = df[df["aesthetic_score"] >= self.min_aesthetic]
            for rec in df.to_dict("records"):
                sha = str(rec["sha256"]).lower()
                self.by_sha[sha] = {"aesthetic_score": clean(rec.get("aesthetic_score")),
                                    "file_identifier": clean(rec.get("file_identifier")),
                                    "captions": clean(rec.get("captions"))}
                if self.by_sha[sha]["file_identifier"]:
                    self.by_fid[str(self.by_sha[sha]["file_identifier"])] = sha
        log.info("TRELLIS metadata: %d assets pass", len(self.by_sha))

    def allowed(self) -> set[str]:
        return set(self.by_sha)

    def apply(self, row: dict) -> dict | None:
        sha = row["sha256"]
        if sha is None:
            sha = self.by_fid.get(row["file_identifier"])
            if sha is None:
                return None
            row["sha256"] = sha
        info = self.by_sha.get(sha)
        if info is None:
            return None
        if info["aesthetic_score"] is not None:
            row["aesthetic_score"] = float(info["aesthetic_score"])
        if info["captions"] is not None:
            prov = json.loads(row["provenance"])
            prov.setdefault("captions", info["captions"])
            row["provenance"] = json.dumps(prov, sort_keys=True, default=str)
        return row
