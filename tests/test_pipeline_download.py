"""Download stage: retries/backoff, 404, sha256, size cap, unsafe archives, cache, bundles, S3 — then the same
failure cases through the Ray graph, where each becomes a ledger failure while the other assets complete."""
from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import pytest

from _pipeline_helpers import (LoopbackHTTP, MotoS3, glb_bytes, obj_asset, sha256, tar_bytes, tiny_blend,
                               zip_bytes)
from mdt.config import load_config
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.asset_refs import ExternalReferenceError, references, resolve_reference
from pipelines.preprocess.download import Download, HostSlots, materialize_mesh, safe_member
from pipelines.preprocess.sources.base import make_row


@pytest.fixture(scope="module")
def http():
    s = LoopbackHTTP()
    yield s
    s.close()


def make_cfg(tmp_path, **over) -> PreprocessConfig:
    base = {"output": str(tmp_path / "out"), "download.cache_uri": str(tmp_path / "cache"),
            "download.extract_dir": str(tmp_path / "x"), "download.attempts": 4,
            "download.backoff_initial_s": 0.01, "download.backoff_max_s": 0.05, "download.timeout_s": 5}
    base.update(over)
    return load_config(PreprocessConfig, None, [f"{k}={v}" for k, v in base.items()])


def row(uri, sha=None, fid=None, **kw):
    return make_row(source="test", file_identifier=fid or uri, uri=uri, sha256=sha, **kw)


def test_http_retry_with_backoff_then_success(http, tmp_path):
    data = glb_bytes(1)
    url = http.add("/flaky.glb", body=data, fail_first=2)
    d = Download(make_cfg(tmp_path))
    t0 = time.time()
    r = d(row(url, sha256(data)))
    assert r["error"] is None, r["error"]
    assert http.routes["/flaky.glb"].hits == 3 and d.stats["http_attempts"] == 3
    assert time.time() - t0 >= 0.01  # waited between attempts
    assert r["mesh_bytes"] == data and r["sha256"] == sha256(data) and r["mesh_format"] == "glb"
    assert r["cache_uri"].endswith(f"/objects/{sha256(data)[:2]}/{sha256(data)}")


def test_http_gives_up_after_attempts(http, tmp_path):
    url = http.add("/down.glb", body=b"x", fail_first=100)
    r = Download(make_cfg(tmp_path, **{"download.attempts": 3}))(row(url))
    assert r["error"] == "download: HTTP 503 Service Unavailable (after 3 attempts)"
    assert http.routes["/down.glb"].hits == 3
    assert r["mesh_bytes"] is None and r["cache_uri"] is None


def test_404_is_not_retried(http, tmp_path):
    r = Download(make_cfg(tmp_path))(row(http.url("/missing.glb")))
    assert r["error"] == "download: HTTP 404 Not Found"


def test_wrong_sha256(http, tmp_path):
    url = http.add("/ok.glb", body=glb_bytes(2))
    r = Download(make_cfg(tmp_path))(row(url, "0" * 64))
    assert r["error"].startswith("download: sha256 mismatch: expected 000000000000")


def test_size_cap_by_length_and_by_stream(http, tmp_path):
    big = b"x" * 5000
    u1 = http.add("/big.glb", body=big)
    u2 = http.add("/big-nolen.glb", body=big, send_length=False)
    d = Download(make_cfg(tmp_path, **{"download.max_bytes": 1000}))
    assert d(row(u1))["error"] == "download: size cap: 5000 bytes > 1000"
    assert d(row(u2))["error"] == "download: size cap: more than 1000 bytes"


def test_cache_hit_skips_network(http, tmp_path):
    data = glb_bytes(3)
    url = http.add("/cached.glb", body=data)
    cfg = make_cfg(tmp_path)
    assert Download(cfg)(row(url, sha256(data)))["error"] is None
    d2 = Download(cfg)
    r = d2(row(url, sha256(data)))
    assert r["error"] is None and r["mesh_bytes"] == data
    assert http.routes["/cached.glb"].hits == 1 and d2.stats["cache_hits"] == 1


def test_zip_with_parent_paths_is_refused(tmp_path):
    good = glb_bytes(4)
    z = tmp_path / "evil.zip"
    z.write_bytes(zip_bytes({"ok/good.glb": good, "../evil.glb": b"pwned", "/abs.glb": b"pwned"}))
    d = Download(make_cfg(tmp_path))
    assert d(row(f"zip://ok/good.glb::{z}"))["mesh_bytes"] == good
    assert d(row(f"zip://../evil.glb::{z}"))["error"] == \
        "download: unsafe archive member path '../evil.glb' (contains '..')"
    assert d(row(f"zip://evil.glb::{z}"))["error"] == \
        "download: archive member 'evil.glb' is a link or has an unsafe path in the archive"
    assert not (tmp_path / "evil.glb").exists() and not (tmp_path / "x" / ".." / "evil.glb").exists()
    with pytest.raises(Exception):
        safe_member("/etc/passwd")


def test_tar_and_tgz_members_symlinks_refused(tmp_path):
    g = glb_bytes(5)
    t = tmp_path / "a.tar"
    t.write_bytes(tar_bytes({"3dmodels/original/A.glb": g, "../x.glb": b"bad"}, symlinks={"link.glb": "/etc/passwd"}))
    tgz = tmp_path / "a.tar.gz"
    g2 = glb_bytes(6)  # other bytes: a second file with the same bytes would be a duplicate
    tgz.write_bytes(tar_bytes({"d/A.glb": g2, "../y.glb": b"bad"}, symlinks={"d/l.glb": "../../etc"}, mode="w:gz"))
    d = Download(make_cfg(tmp_path))
    assert d(row(f"tar://3dmodels/original/A.glb::{t}"))["mesh_bytes"] == g
    assert "unsafe path" in d(row(f"tar://link.glb::{t}"))["error"]
    assert d(row(f"tar://d/A.glb::{tgz}"))["mesh_bytes"] == g2  # extracted once per node, then read
    assert "unsafe path" in d(row(f"tar://d/l.glb::{tgz}"))["error"]
    extracted = [p for p in (tmp_path / "x").rglob("*") if p.is_file()]
    assert all(str(p).startswith(str(tmp_path / "x")) for p in extracted)
    assert not (tmp_path / "y.glb").exists()


def test_github_archive_fetched_once_for_many_assets(http, tmp_path):
    a, b = glb_bytes(6), glb_bytes(7)
    url = http.add("/gh/org/repo/c0ffee.zip", body=zip_bytes({"repo-c0ffee/a.glb": a, "repo-c0ffee/sub/b.glb": b}))
    d = Download(make_cfg(tmp_path))
    r1 = d(row(f"zip://a.glb::{url}", sha256(a)))
    r2 = d(row(f"zip://sub/b.glb::{url}", sha256(b)))
    assert r1["error"] is None and r2["error"] is None and r2["mesh_bytes"] == b
    assert http.routes["/gh/org/repo/c0ffee.zip"].hits == 1
    # a second actor on the same node reuses the cached archive instead of downloading it again
    assert Download(make_cfg(tmp_path))(row(f"zip://a.glb::{url}"))["error"] is None
    assert http.routes["/gh/org/repo/c0ffee.zip"].hits == 1


def test_blend_flagged_untrusted(tmp_path):
    z = tmp_path / "toys.zip"
    z.write_bytes(zip_bytes({"toys4k_blend_files/cup/cup_000/cup_000.blend": tiny_blend()}))
    r = Download(make_cfg(tmp_path))(row(f"zip://toys4k_blend_files/cup/cup_000/cup_000.blend::{z}"))
    assert r["error"] is None and r["mesh_format"] == "blend" and r["untrusted_blend"] is True


def test_3d_future_bundle_and_image_hash(tmp_path):
    files = obj_asset()
    members = {f"3D-FUTURE-model/m1/{k}": v for k, v in files.items()}
    members["3D-FUTURE-model/m1/image.jpg"] = b"JPEGDATA"
    z = tmp_path / "3D-FUTURE-model.zip"
    z.write_bytes(zip_bytes(members))
    r = row(f"zip://3D-FUTURE-model/m1/raw_model.obj::{z}", sha256(b"JPEGDATA"),
            sha256_uri=f"zip://3D-FUTURE-model/m1/image.jpg::{z}")
    r = Download(make_cfg(tmp_path))(r)
    assert r["error"] is None and r["sha256"] == sha256(b"JPEGDATA")
    assert r["mesh_bundle"] is True and r["mesh_format"] == "obj"
    with zipfile.ZipFile(io.BytesIO(r["mesh_bytes"])) as zf:
        assert sorted(zf.namelist()) == ["3D-FUTURE-model/m1/model.mtl", "3D-FUTURE-model/m1/raw_model.obj",
                                         "3D-FUTURE-model/m1/texture.png"]
    main = materialize_mesh(r, tmp_path / "work")
    assert main.name == "raw_model.obj" and (main.parent / "texture.png").exists()
    bad = Download(make_cfg(tmp_path))(row(f"zip://3D-FUTURE-model/m1/raw_model.obj::{z}", "1" * 64,
                                           sha256_uri=f"zip://3D-FUTURE-model/m1/image.jpg::{z}"))
    assert "sha256 mismatch" in bad["error"]


def test_gltf_references():
    doc = {"buffers": [{"uri": "mesh%20data.bin"}, {"uri": "data:application/octet-stream;base64,AA=="}],
           "images": [{"uri": "../tex/a.png"}]}
    refs = references("gltf", json.dumps(doc).encode())
    assert refs == ["mesh%20data.bin", "data:application/octet-stream;base64,AA==", "../tex/a.png"]
    assert resolve_reference(refs[0], "m/a.gltf", "gltf") == "m/mesh data.bin"
    assert resolve_reference(refs[1], "a.gltf", "gltf") is None
    with pytest.raises(ExternalReferenceError, match="external reference outside the asset: '../tex/a.png'"):
        resolve_reference(refs[2], "a.gltf", "gltf")


def test_local_file_missing_and_unsupported(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    d = Download(make_cfg(tmp_path))
    assert d(row(str(tmp_path / "nope.glb")))["error"].startswith("download: file not found")
    assert d(row(str(tmp_path / "notes.txt")))["error"] == "download: unsupported file type 'txt' (notes.txt)"


def test_synthetic_rows_use_the_generator(tmp_path):
    r = Download(make_cfg(tmp_path))(row("synthetic://3"))
    assert r["error"] is None and r["mesh_format"] == "glb" and r["mesh_bytes"][:4] == b"glTF"
    dup = Download(make_cfg(tmp_path), done_sha256=frozenset({r["sha256"]}))(row("synthetic://3"))
    assert dup["error"].startswith("download: skipped: duplicate")


def test_hf_uri_sends_token(http, tmp_path, monkeypatch):
    data = glb_bytes(8)
    http.add("/datasets/hssd/hssd-models/resolve/main/objects/a/x.glb", body=data, require_auth="hf_secret")
    cfg = make_cfg(tmp_path, **{"sources.hf_endpoint": http.url("")})
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert Download(cfg)(row("hf://datasets/hssd/hssd-models/objects/a/x.glb"))["error"] == \
        "download: HTTP 401 Unauthorized"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    r = Download(cfg)(row("hf://datasets/hssd/hssd-models/objects/a/x.glb", sha256(data)))
    assert r["error"] is None and r["mesh_bytes"] == data


def test_per_host_limit_in_process():
    slots = HostSlots(per_host=2)
    active, peak, lock = [0], [0], threading.Lock()

    def work():
        with slots("example.org:1"):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            with lock:
                active[0] -= 1

    ts = [threading.Thread(target=work) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert peak[0] == 2


def test_s3_source_and_cache(tmp_path):
    s3 = MotoS3()
    try:
        c = s3.client()
        c.create_bucket(Bucket="assets")
        data = glb_bytes(9)
        c.put_object(Bucket="assets", Key="in/x.glb", Body=data)
        cfg = make_cfg(tmp_path, **{"storage.s3_endpoint_url": s3.endpoint, "download.cache_uri": "s3://assets/cache"})
        r = Download(cfg)(row("s3://assets/in/x.glb", sha256(data)))
        assert r["error"] is None and r["mesh_bytes"] == data
        assert r["cache_uri"] == f"s3://assets/cache/objects/{sha256(data)[:2]}/{sha256(data)}"
        assert c.get_object(Bucket="assets", Key=r["cache_uri"][len("s3://assets/"):])["Body"].read() == data
        miss = Download(cfg)(row("s3://assets/in/missing.glb"))
        assert miss["error"] == "download: s3 object not found: s3://assets/in/missing.glb"
    finally:
        s3.stop()


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_failures_become_ledger_records_while_others_complete(http, tmp_path, ray_connected):
    """The Ray graph end to end: every bad asset ends as a ledger failure with its reason."""
    import pandas as pd

    from pipelines.preprocess import driver as graph
    from pipelines.preprocess.ledger import Ledger
    from pipelines.preprocess.shards import load_table

    g1, g2 = glb_bytes(10), glb_bytes(11)
    z = tmp_path / "evil.zip"
    z.write_bytes(zip_bytes({"../evil.glb": b"x", "fine.glb": g2}))
    entries = [
        (http.add("/g/slow1.glb", body=glb_bytes(14), delay_s=0.4), None, "slow1"),
        (http.add("/g/slow2.glb", body=glb_bytes(15), delay_s=0.4), None, "slow2"),
        (http.add("/g/good.glb", body=g1), sha256(g1), "good"),
        (http.add("/g/flaky.glb", body=glb_bytes(12), fail_first=1), None, "flaky"),
        (http.url("/g/missing.glb"), None, "missing"),
        (http.add("/g/wrong.glb", body=glb_bytes(13)), "f" * 64, "wrong-sha"),
        (http.add("/g/huge.glb", body=b"x" * 300_000), None, "huge"),
        (f"zip://../evil.glb::{z}", None, "evil"),
        (f"zip://fine.glb::{z}", None, "fine"),
    ]
    pd.DataFrame({"uri": [e[0] for e in entries], "sha256": [e[1] for e in entries],
                  "file_identifier": [e[2] for e in entries]}).to_csv(tmp_path / "m.csv", index=False)
    cfg = make_cfg(tmp_path, **{"download.max_bytes": 200_000, "stages": "[download, stand_in]",
                                "sources.specs": f"[manifest:{tmp_path / 'm.csv'}]", "write.rows_per_shard": 4,
                                "ray.rows_per_block": 1, "cond.num_views": 2,
                                # two download actors, one request at a time per host (cluster-wide limiter)
                                "resources.download.concurrency": 2, "resources.download.num_cpus": 0.25,
                                "download.per_host_concurrency": 1})
    http.peak = 0
    result = graph.run(cfg, progress_every_s=1e9)
    assert http.peak == 1
    by = {s["file_identifier"]: s for s in result.summaries}
    assert {k for k, v in by.items() if v["status"] == "done"} == {"good", "flaky", "fine", "slow1", "slow2"}
    assert by["missing"]["reason"] == "HTTP 404 Not Found"
    assert by["wrong-sha"]["reason"].startswith("sha256 mismatch")
    assert by["huge"]["reason"] == "size cap: 300000 bytes > 200000"
    assert by["evil"]["reason"].startswith("unsafe archive member path '../evil.glb'")
    recs = Ledger(cfg.output, result.config_hash).records()
    failed = {(r["file_identifier"], r["stage"]) for r in recs if r["status"] == "failed"}
    assert failed == {("missing", "download"), ("wrong-sha", "download"), ("huge", "download"), ("evil", "download")}
    assert sorted(load_table(cfg.output)["file_identifier"].to_pylist()) == ["fine", "flaky", "good", "slow1", "slow2"]
    rep = result.report
    assert rep["done"] == 5 and rep["failed"] == 4 and rep["stages"]["download"]["failed"] == 4
    assert {f["reason"] for f in rep["failure_reasons"]} >= {"HTTP 404 Not Found"}


@pytest.mark.ray
@pytest.mark.timeout(420)
def test_host_limiter_actor_blocks_until_release(ray_connected):
    import ray

    from pipelines.preprocess.download import HostLimiterActor

    lim = HostLimiterActor.remote(1)
    t1 = ray.get(lim.acquire.remote("h", 60.0))
    pending = lim.acquire.remote("h", 60.0)
    ready, _ = ray.wait([pending], timeout=0.5)
    assert not ready  # the second request waits for the slot
    other = ray.get(lim.acquire.remote("other-host", 60.0), timeout=10)  # other hosts are not blocked
    ray.get(lim.release.remote("h", t1))
    assert ray.get(pending, timeout=10)
    expired = HostLimiterActor.remote(1)
    ray.get(expired.acquire.remote("h", 0.1))  # a holder that never releases (killed worker)...
    assert ray.get(expired.acquire.remote("h", 60.0), timeout=10)  # ...loses the slot when its lease expires
    assert other
    ray.kill(lim)
    ray.kill(expired)


def test_large_files_stream_from_the_cache(tmp_path):
    """Files above download.carry_max_bytes do not travel in the row: the stage that needs them streams them
    from the cache to its own disk (single files and bundles)."""
    from _pipeline_helpers import obj_asset

    g = glb_bytes(21)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.glb").write_bytes(g)
    for name, data in obj_asset().items():
        (tmp_path / "src" / name).write_bytes(data)
    d = Download(make_cfg(tmp_path, **{"download.carry_max_bytes": 100}))
    r = d(row(str(tmp_path / "src" / "big.glb")))
    assert r["error"] is None and r["mesh_bytes"] is None and r["mesh_size"] == len(g)
    assert materialize_mesh(r, tmp_path / "w1").read_bytes() == g
    b = d(row(str(tmp_path / "src" / "raw_model.obj")))
    assert b["error"] is None and b["mesh_bytes"] is None and b["mesh_bundle"] is True
    main = materialize_mesh(b, tmp_path / "w2")
    assert main.read_bytes() == obj_asset()["raw_model.obj"]
    assert sorted(p.name for p in main.parent.iterdir()) == ["model.mtl", "raw_model.obj", "texture.png"]
    small = Download(make_cfg(tmp_path))(row(str(tmp_path / "src" / "big.glb"), fid="again"))
    assert small["mesh_bytes"] == g  # under the default threshold the bytes ride in the row
