"""``abo:<abo-3dmodels.tar>``: Amazon Berkeley Objects 3D models (one large uncompressed tar, CC BY-NC 4.0).

Rows are ``tar://3dmodels/original/<file_identifier>::<tar>``. With ``?metadata=<TRELLIS ABO.csv>`` the rows
(and their expected sha256) come from the CSV; otherwise the tar (local path) is listed. The tar may be a
local path, s3:// or https:// (the download stage fetches it once into the cache).
"""
from __future__ import annotations

import tarfile
from typing import Iterator

from pipelines.common import storage
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.sources.base import ListingHints, SourceSpec, clean, make_row, read_table, to_uri

PREFIX = "3dmodels/original/"
LICENSE = "CC-BY-NC-4.0"


class ABOSource:
    name = "abo"

    def __init__(self, spec: SourceSpec, cfg: PreprocessConfig, hints: ListingHints):
        self.tar = to_uri(spec.arg)
        self.metadata = spec.options.get("metadata")
        self.cfg = cfg
        self.hints = hints

    def rows(self) -> Iterator[dict]:
        if self.metadata:
            df = read_table(to_uri(self.metadata), self.cfg)
            if self.hints.sha256_allow is not None:
                df = df[df["sha256"].str.lower().isin(self.hints.sha256_allow)]
            for rec in df.to_dict("records"):
                fid = str(rec["file_identifier"])
                yield make_row(source=self.name, file_identifier=fid, uri=f"tar://{PREFIX}{fid}::{self.tar}",
                               sha256=clean(rec.get("sha256")), license=LICENSE,
                               aesthetic_score=clean(rec.get("aesthetic_score")), captions=clean(rec.get("captions")))
            return
        path = storage.local_path(self.tar)
        if "://" in self.tar and not self.tar.startswith("file://"):
            raise ValueError("abo: listing a remote tar needs ?metadata=<csv>; download it or give the CSV")
        with tarfile.open(path, "r:*") as tf:
            for ti in tf:
                if ti.isfile() and ti.name.startswith(PREFIX) and ti.name.lower().endswith(".glb"):
                    fid = ti.name[len(PREFIX):]
                    yield make_row(source=self.name, file_identifier=fid, uri=f"tar://{ti.name}::{self.tar}",
                                   license=LICENSE)
