"""``local:<dir>`` / ``s3:<s3://bucket/prefix>``: every mesh file under a folder or object prefix."""
from __future__ import annotations

import os
from typing import Iterator

from pipelines.common import storage
from pipelines.preprocess.config import MESH_FORMATS, PreprocessConfig
from pipelines.preprocess.download import mesh_format
from pipelines.preprocess.sources.base import ListingHints, SourceSpec, make_row, to_uri


class LocalSource:
    def __init__(self, spec: SourceSpec, cfg: PreprocessConfig, hints: ListingHints):
        self.root = to_uri(spec.arg)
        self.name = "s3" if storage.is_s3(self.root) else "local"
        self.cfg = cfg
        self.license = spec.options.get("license")
        self.formats = set(hints.file_types or MESH_FORMATS)

    def rows(self) -> Iterator[dict]:
        if not storage.is_s3(self.root) and not os.path.isdir(self.root):
            raise FileNotFoundError(f"local source folder not found: {self.root}")
        for uri in storage.list_files(self.root, self.cfg.storage):
            if mesh_format(uri) not in self.formats:
                continue
            rel = uri[len(self.root.rstrip("/")):].lstrip("/")
            yield make_row(source=self.name, file_identifier=rel, uri=uri, license=self.license, root=self.root)
