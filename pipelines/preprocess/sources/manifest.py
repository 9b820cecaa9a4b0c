"""``manifest:<csv|parquet>``: a table with a ``uri`` column (alias ``path`` / ``local_path``) and optional
``sha256``, ``file_identifier``, ``license``, ``aesthetic_score``, ``source``; other columns go to provenance.
Relative paths are resolved against the manifest's folder."""
from __future__ import annotations

import os
from typing import Iterator

from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.sources.base import ListingHints, SourceSpec, clean, make_row, read_table, to_uri

URI_COLUMNS = ("uri", "path", "local_path", "url")
KNOWN = {"sha256", "file_identifier", "license", "aesthetic_score", "source", *URI_COLUMNS}


class ManifestSource:
    name = "manifest"

    def __init__(self, spec: SourceSpec, cfg: PreprocessConfig, hints: ListingHints):
        self.uri = to_uri(spec.arg)
        self.cfg = cfg
        self.hints = hints

    def rows(self) -> Iterator[dict]:
        df = read_table(self.uri, self.cfg)
        col = next((c for c in URI_COLUMNS if c in df.columns), None)
        if col is None:
            raise ValueError(f"manifest {self.uri} has none of the columns {URI_COLUMNS}")
        base = os.path.dirname(self.uri)
        if self.hints.sha256_allow is not None and "sha256" in df.columns:
            df = df[df["sha256"].str.lower().isin(self.hints.sha256_allow)]
        extra = [c for c in df.columns if c not in KNOWN]
        for rec in df.to_dict("records"):
            uri = str(rec[col])
            if "://" not in uri and not os.path.isabs(uri):
                uri = os.path.normpath(os.path.join(base, uri)) if "://" not in base else f"{base}/{uri}"
            yield make_row(
                source=clean(rec.get("source")) or self.name,
                file_identifier=clean(rec.get("file_identifier")) or uri,
                uri=uri,
                sha256=clean(rec.get("sha256")),
                license=clean(rec.get("license")),
                aesthetic_score=clean(rec.get("aesthetic_score")),
                **{c: clean(rec[c]) for c in extra},
            )
