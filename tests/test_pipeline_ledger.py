"""Ledger: records, resume state, atomic batch files, concurrent writers, compaction, S3."""
from __future__ import annotations

import threading

import pytest

from _pipeline_helpers import MotoS3
from pipelines.common import storage
from pipelines.preprocess.ledger import Ledger, slat_normalisation


def rec(sha, stage, status, fid=None, **kw):
    return {"sha256": sha, "source": "t", "file_identifier": fid or (sha or "x"), "stage": stage, "status": status,
            **kw}


def test_state_done_failed_skipped_and_retry(tmp_path):
    led = Ledger(str(tmp_path), "cfg1")
    led.write([rec("a", "download", "done", seconds=0.1), rec("a", "write", "done", shard="p1.parquet", bytes=10,
                                                              stats='{"slat_mean": [0,0], "slat_sqmean": [1,1]}')])
    led.write([rec("b", "download", "failed", reason="HTTP 404 Not Found")])
    led.write([rec(None, "download", "failed", fid="no-sha", reason="HTTP 503 (after 5 attempts)")])
    led.write([rec(None, "download", "skipped", fid="dup", reason="skipped: duplicate of done asset a")])
    st = led.state()
    assert st.done_sha == {"a"} and st.shards == {"p1.parquet"} and st.bytes_done == 10
    assert st.failed_sha == {"b"} and "t\x1fno-sha" in st.failed_ids
    assert st.is_done({"sha256": "a", "source": "t", "file_identifier": "a"})
    assert st.is_done({"sha256": None, "source": "t", "file_identifier": "dup"})  # duplicates are not redone
    assert st.is_failed({"sha256": None, "source": "t", "file_identifier": "no-sha"})
    assert not st.is_failed({"sha256": "c", "source": "t", "file_identifier": "c"})
    assert st.failed_reason["t\x1fb"] == "HTTP 404 Not Found"
    # a retried asset that now succeeds is done, not failed; done is final even if a later run fails it
    led.write([rec("b", "write", "done", shard="p2.parquet")])
    led.write([rec("a", "render", "failed", reason="late failure")])
    st = led.state()
    assert st.done_sha == {"a", "b"} and not st.failed_sha
    # ledgers are per config hash
    assert Ledger(str(tmp_path), "cfg2").state().done_sha == set()


def test_batch_files_are_atomic_and_temp_files_ignored(tmp_path):
    led = Ledger(str(tmp_path), "h")
    uri = led.write([rec("a", "download", "done")], name="batch-1")
    assert uri.endswith("/ledger/h/batch-1.parquet")
    # a writer killed mid-write leaves only a hidden temp file: never listed, never read
    (tmp_path / "ledger" / "h" / ".tmp-deadbeef-batch-2.parquet").write_bytes(b"PAR1 half written")
    assert led.files() == [uri]
    assert len(led.records()) == 1
    assert list((tmp_path / "ledger" / "h").glob(".tmp-*")) != []  # left alone; storage never exposes it


def test_concurrent_writers_and_compaction(tmp_path):
    led = Ledger(str(tmp_path), "h")
    errors = []

    def writer(i):
        try:
            led.write([rec(f"s{i}-{j}", "write", "done", shard=f"p{i}.parquet") for j in range(5)])
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors and len(led.files()) == 16
    assert len(led.state().done_sha) == 80
    assert led.compact() == 1 and len(led.files()) == 1
    assert len(led.state().done_sha) == 80 and len(led.records()) == 80


def test_slat_normalisation_rule():
    # two instances: channel means 0 and 2, mean-squares 1 and 5 -> mean 1, std sqrt(3 - 1)
    st = slat_normalisation([([0.0], [1.0]), ([2.0], [5.0])])
    assert st["mean"] == [1.0] and st["std"] == pytest.approx([2 ** 0.5]) and st["count"] == 2
    assert slat_normalisation([]) is None


def test_ledger_on_s3():
    s3 = MotoS3()
    try:
        s3.client().create_bucket(Bucket="out")

        class S:
            s3_endpoint_url = s3.endpoint
            s3_region = "us-east-1"
            s3_anonymous = False

        led = Ledger("s3://out/run", "h", S())
        led.write([rec("a", "write", "done", shard="p.parquet")])
        led.write([rec("b", "download", "failed", reason="x")])
        assert len(led.files()) == 2 and all(f.startswith("s3://out/run/ledger/h/") for f in led.files())
        st = led.state()
        assert st.done_sha == {"a"} and st.failed_sha == {"b"}
        led.compact()
        assert len(led.files()) == 1 and Ledger("s3://out/run", "h", S()).state().done_sha == {"a"}
        assert storage.exists("s3://out/run/ledger/h", S()) or led.files()
    finally:
        s3.stop()
