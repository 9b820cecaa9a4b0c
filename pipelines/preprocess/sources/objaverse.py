"""Objaverse 1.0 (``objaverse:<uids>``) and Objaverse-XL (``objaverse-xl:<sketchfab,github,...>``).

Both go through the ``objaverse`` package (0.1.7) for metadata: ``object-paths.json.gz`` and per-shard
annotations for 1.0, ``objaverse.xl`` annotation parquets for XL, all cached under
``sources.objaverse_dir`` (the package downloads a missing file once; tests put stand-ins there).
The objects themselves are fetched by our download stage, not the package:

- sketchfab / 1.0: ``<objaverse_hf_base>/glbs/<shard>/<uid>.glb`` (one GLB per uid);
- github: the repository archive at the pinned commit, ``sources.github_archive_url`` (default GitHub's
  codeload zip); rows become ``zip://<path in repo>::<archive url>`` and are sorted by archive so that each
  repository is fetched and opened once, not once per asset (git LFS files are not resolved);
- thingiverse: ``sources.thingiverse_url`` with the file id; smithsonian: the GLB URL itself.

``objaverse:`` arguments: comma-separated uids, ``@<file>`` with one uid per line, or ``all``;
option ``?annotations=false`` skips loading the per-object metadata (licence).
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterator

from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.sources.base import ListingHints, SourceSpec, clean, make_row
import objaverse

SKETCHFAB_PREFIX = "https://sketchfab.com/3d-models/"
_GITHUB = re.compile(r"^https?://github\.com/([^/]+)/([^/]+)/blob/([^/]+)/(.+)$")
_THING = re.compile(r"thing:(\d+)")
_FILE_ID = re.compile(r"fileId=(\d+)")


def _objaverse_module(cfg: PreprocessConfig):
    base = os.path.expanduser(cfg.sources.objaverse_dir)
    # The 1.0 API keeps its cache paths in module globals; point them at the configured folder.
    objaverse.BASE_PATH = base
    objaverse._VERSIONED_PATH = os.path.join(base, "hf-objaverse-v1")
    return objaverse


def object_paths(cfg: PreprocessConfig) -> dict[str, str]:
    """uid -> ``glbs/<shard>/<uid>.glb`` (objaverse package, cached ``object-paths.json.gz``)."""
    return _objaverse_module(cfg)._load_object_paths()


class ObjaverseSource:
    name = "objaverse"

    def __init__(self, spec: SourceSpec, cfg: PreprocessConfig, hints: ListingHints):
        self.cfg = cfg
        self.arg = spec.arg.strip()
        self.annotations = spec.options.get("annotations", "true").lower() not in ("0", "false", "no")

    def _uids(self, paths: dict[str, str]) -> list[str]:
        if self.arg in ("", "all"):
            return sorted(paths)
        if self.arg.startswith("@"):
            with open(os.path.expanduser(self.arg[1:])) as f:
                return [u.strip().removesuffix(".glb") for u in f if u.strip()]
        return [u.strip().removesuffix(".glb") for u in self.arg.split(",") if u.strip()]

    def rows(self) -> Iterator[dict]:
        mod = _objaverse_module(self.cfg)
        paths = mod._load_object_paths()
        uids = [u for u in self._uids(paths) if u in paths]
        meta = mod.load_annotations(uids) if (self.annotations and uids) else {}
        base = self.cfg.sources.objaverse_hf_base.rstrip("/")
        for uid in uids:
            m = meta.get(uid) or {}
            lic = m.get("license")
            if isinstance(lic, dict):
                lic = lic.get("label") or lic.get("slug")
            yield make_row(source=self.name, file_identifier=SKETCHFAB_PREFIX + uid, uri=f"{base}/{paths[uid]}",
                           license=lic, uid=uid, name=m.get("name"))


class ObjaverseXLSource:
    name = "objaverse_xl"

    def __init__(self, spec: SourceSpec, cfg: PreprocessConfig, hints: ListingHints):
        self.cfg = cfg
        arg = spec.arg.strip()
        self.subsets = [s.strip() for s in arg.split(",") if s.strip()] if arg else list(
            cfg.sources.objaverse_xl_sources)
        unknown = set(self.subsets) - {"sketchfab", "github", "thingiverse", "smithsonian"}
        if unknown:
            raise ValueError(f"unknown Objaverse-XL source(s) {sorted(unknown)}")
        self.hints = hints
        self.alignment = spec.options.get("alignment", "false").lower() in ("1", "true", "yes")

    def annotations(self, subset: str):
        import objaverse.xl as oxl  # heavy: pandas

        d = os.path.expanduser(self.cfg.sources.objaverse_dir)
        dl = oxl.downloaders[subset]
        df = dl.get_alignment_annotations(download_dir=d) if self.alignment else dl.get_annotations(download_dir=d)
        if "source" not in df.columns:
            df = df.assign(source=subset)
        if self.hints.sha256_allow is not None:
            df = df[df["sha256"].str.lower().isin(self.hints.sha256_allow)]
        if self.hints.file_types is not None and "fileType" in df.columns:
            df = df[df["fileType"].str.lower().isin(self.hints.file_types)]
        return df

    def rows(self) -> Iterator[dict]:
        for subset in self.subsets:
            df = self.annotations(subset)
            if subset == "sketchfab":
                yield from self._sketchfab(df)
            elif subset == "github":
                yield from self._github(df)
            elif subset == "thingiverse":
                yield from self._thingiverse(df)
            else:
                yield from self._smithsonian(df)

    def _row(self, subset: str, rec: dict, uri: str, **extra) -> dict:
        meta = clean(rec.get("metadata"))
        if isinstance(meta, str):
            try:
                meta = json.loads(meta) or None
            except json.JSONDecodeError:
                pass
        return make_row(source=f"objaverse_xl/{subset}", file_identifier=rec["fileIdentifier"], uri=uri,
                        sha256=clean(rec.get("sha256")), license=clean(rec.get("license")),
                        file_type=clean(rec.get("fileType")), metadata=meta, **extra)

    def _sketchfab(self, df) -> Iterator[dict]:
        if not len(df):
            return
        paths = object_paths(self.cfg)
        base = self.cfg.sources.objaverse_hf_base.rstrip("/")
        for rec in df.to_dict("records"):
            uid = str(rec["fileIdentifier"]).rstrip("/").rsplit("/", 1)[-1]
            if uid not in paths:
                continue
            yield self._row("sketchfab", rec, f"{base}/{paths[uid]}", uid=uid)

    def _github(self, df) -> Iterator[dict]:
        recs = []
        for rec in df.to_dict("records"):
            m = _GITHUB.match(str(rec["fileIdentifier"]))
            if not m:
                continue
            org, repo, commit, path = m.groups()
            archive = self.cfg.sources.github_archive_url.format(org=org, repo=repo, commit=commit)
            recs.append((archive, path, rec, org, repo, commit))
        # One archive per repository at a commit; sorted so its assets sit next to each other.
        recs.sort(key=lambda t: (t[0], t[1]))
        for archive, path, rec, org, repo, commit in recs:
            yield self._row("github", rec, f"zip://{path}::{archive}", repo=f"{org}/{repo}", commit=commit)

    def _thingiverse(self, df) -> Iterator[dict]:
        for rec in df.to_dict("records"):
            fid = _FILE_ID.search(str(rec["fileIdentifier"]))
            thing = _THING.search(str(rec["fileIdentifier"]))
            if not fid:
                continue
            url = self.cfg.sources.thingiverse_url.format(file_id=fid.group(1))
            # The download URL has no extension; the file type is known from the annotations.
            ext = (clean(rec.get("fileType")) or "stl").lower()
            yield self._row("thingiverse", rec, url + f"#.{ext}", thing_id=thing.group(1) if thing else None,
                            file_id=fid.group(1))

    def _smithsonian(self, df) -> Iterator[dict]:
        for rec in df.to_dict("records"):
            yield self._row("smithsonian", rec, str(rec["fileIdentifier"]))
