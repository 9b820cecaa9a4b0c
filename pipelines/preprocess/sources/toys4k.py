"""``toys4k:<toys4k_blend_files.zip>``: Toys4k (manual download via the authors' form; the evaluation set).

Members ``toys4k_blend_files/<category>/<category>_<NNN>/<category>_<NNN>.blend``; the file identifier is the
path below ``toys4k_blend_files/``. Each object's licence is the text of its sibling ``*_attribution.txt``.
``.blend`` files can carry Python: the download stage flags them ``untrusted_blend`` for the renderer.
``?metadata=<TRELLIS Toys4k.csv>`` restricts rows to the CSV and adds expected hashes and scores.
"""
from __future__ import annotations

import posixpath
import zipfile
from typing import Iterator

from pipelines.common import storage
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.sources.base import ListingHints, SourceSpec, clean, make_row, read_table, to_uri

ROOT = "toys4k_blend_files/"


class Toys4kSource:
    name = "toys4k"

    def __init__(self, spec: SourceSpec, cfg: PreprocessConfig, hints: ListingHints):
        self.zip = to_uri(spec.arg)
        self.metadata = spec.options.get("metadata")
        self.cfg = cfg
        self.hints = hints

    def rows(self) -> Iterator[dict]:
        meta = None
        if self.metadata:
            df = read_table(to_uri(self.metadata), self.cfg)
            meta = {str(r["file_identifier"]): r for r in df.to_dict("records")}
        with zipfile.ZipFile(storage.local_path(self.zip)) as zf:
            names = sorted(zf.namelist())
            attributions = {}
            for n in names:
                if n.endswith("_attribution.txt"):
                    text = zf.read(n).decode("utf-8", "replace").strip()
                    attributions[posixpath.dirname(n)] = " ".join(text.split())[:1000]
        for n in names:
            if not (n.startswith(ROOT) and n.lower().endswith(".blend")):
                continue
            fid = n[len(ROOT):]
            rec = {}
            if meta is not None:
                if fid not in meta:
                    continue
                rec = meta[fid]
            category = fid.split("/", 1)[0]
            yield make_row(source=self.name, file_identifier=fid, uri=f"zip://{n}::{self.zip}",
                           sha256=clean(rec.get("sha256")), aesthetic_score=clean(rec.get("aesthetic_score")),
                           license=attributions.get(posixpath.dirname(n)), category=category,
                           captions=clean(rec.get("captions")))
