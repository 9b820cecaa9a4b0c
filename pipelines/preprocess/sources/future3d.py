"""``3d-future:<3D-FUTURE-model.zip>``: 3D-FUTURE (manual download after accepting its licence agreement).

Each model is a folder ``3D-FUTURE-model/<model_id>/`` with ``raw_model.obj`` (+ ``model.mtl``, textures) and a
preview ``image.jpg``. As in TRELLIS, the **identity sha256 is the hash of image.jpg**, not of the mesh: rows
carry ``sha256_uri`` pointing at the image, and the download stage verifies/derives the key from it.
``?metadata=<TRELLIS 3D-FUTURE.csv>`` takes rows and expected hashes from the CSV; otherwise the zip is listed.
"""
from __future__ import annotations

import zipfile
from typing import Iterator

from pipelines.common import storage
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.sources.base import ListingHints, SourceSpec, clean, make_row, read_table, to_uri

LICENSE = "3D-FUTURE Data Sets Use License Agreement"
MESH = "raw_model.obj"
IMAGE = "image.jpg"


class Future3DSource:
    name = "3d_future"

    def __init__(self, spec: SourceSpec, cfg: PreprocessConfig, hints: ListingHints):
        self.zip = to_uri(spec.arg)
        self.metadata = spec.options.get("metadata")
        self.mesh = spec.options.get("mesh", MESH)
        self.cfg = cfg
        self.hints = hints

    def _row(self, folder: str, sha: str | None = None, **extra) -> dict:
        return make_row(source=self.name, file_identifier=folder, uri=f"zip://{folder}/{self.mesh}::{self.zip}",
                        sha256_uri=f"zip://{folder}/{IMAGE}::{self.zip}", sha256=sha, license=LICENSE, **extra)

    def rows(self) -> Iterator[dict]:
        if self.metadata:
            df = read_table(to_uri(self.metadata), self.cfg)
            if self.hints.sha256_allow is not None:
                df = df[df["sha256"].str.lower().isin(self.hints.sha256_allow)]
            for rec in df.to_dict("records"):
                yield self._row(str(rec["file_identifier"]).rstrip("/"), clean(rec.get("sha256")),
                                aesthetic_score=clean(rec.get("aesthetic_score")), captions=clean(rec.get("captions")))
            return
        with zipfile.ZipFile(storage.local_path(self.zip)) as zf:
            names = set(zf.namelist())
        folders = sorted({n.rsplit("/", 1)[0] for n in names if n.endswith("/" + self.mesh)})
        for folder in folders:
            if f"{folder}/{IMAGE}" in names:
                yield self._row(folder, model_id=folder.rsplit("/", 1)[-1])
