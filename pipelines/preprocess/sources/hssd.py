"""``hssd:<TRELLIS HSSD.csv | file list>``: HSSD objects from the gated Hugging Face dataset ``hssd/hssd-models``.

Access needs a Hugging Face token with the dataset's terms accepted; huggingface_hub reads it from
``$HF_TOKEN`` (or a stored login). Rows are ``hf://datasets/<sources.hssd_repo>/<file_identifier>``; the
download stage resolves them with ``huggingface_hub.hf_hub_url`` (``sources.hf_endpoint``,
``sources.hssd_revision``) and sends the token. The argument is a CSV/Parquet with ``file_identifier`` and
``sha256`` (TRELLIS's ``HSSD.csv``) or a text file of repo paths; ``hssd:`` alone lists the repo's ``.glb``
files through the Hub API.
"""
from __future__ import annotations

from typing import Iterator

from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.sources.base import ListingHints, SourceSpec, clean, make_row, read_table, read_uri_bytes, to_uri

LICENSE = "CC-BY-NC-4.0"


class HSSDSource:
    name = "hssd"

    def __init__(self, spec: SourceSpec, cfg: PreprocessConfig, hints: ListingHints):
        self.arg = spec.arg.strip()
        self.cfg = cfg
        self.hints = hints
        self.repo = cfg.sources.hssd_repo

    def _check_token(self) -> None:
        from huggingface_hub import get_token  # heavy: huggingface_hub

        if not get_token():
            raise PermissionError(
                f"HSSD ({self.repo}) is a gated Hugging Face dataset: set HF_TOKEN to a token whose account "
                "has accepted the dataset's terms")

    def rows(self) -> Iterator[dict]:
        self._check_token()
        if not self.arg:
            from huggingface_hub import HfApi  # heavy: huggingface_hub

            files = HfApi(endpoint=self.cfg.sources.hf_endpoint).list_repo_files(
                self.repo, repo_type="dataset", revision=self.cfg.sources.hssd_revision)
            recs = [{"file_identifier": f} for f in sorted(files) if f.lower().endswith(".glb")]
        elif self.arg.lower().endswith((".csv", ".parquet", ".pq")):
            df = read_table(to_uri(self.arg), self.cfg)
            if self.hints.sha256_allow is not None and "sha256" in df.columns:
                df = df[df["sha256"].str.lower().isin(self.hints.sha256_allow)]
            recs = df.to_dict("records")
        else:
            text = read_uri_bytes(to_uri(self.arg), self.cfg).decode()
            recs = [{"file_identifier": line.strip()} for line in text.splitlines() if line.strip()]
        for rec in recs:
            fid = str(rec["file_identifier"]).lstrip("/")
            yield make_row(source=self.name, file_identifier=fid, uri=f"hf://datasets/{self.repo}/{fid}",
                           sha256=clean(rec.get("sha256")), license=LICENSE,
                           aesthetic_score=clean(rec.get("aesthetic_score")), captions=clean(rec.get("captions")))
