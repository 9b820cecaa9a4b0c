"""Every source against small local stand-ins (no network, no Ray)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from _pipeline_helpers import glb_bytes, sha256, tar_bytes, write_gz_json, zip_bytes
from conftest import shared_path
from mdt.config import load_config
from pipelines.preprocess.config import PreprocessConfig
from pipelines.preprocess.rows import SOURCE_KEYS
from pipelines.preprocess.sources import build_source, list_rows, parse_spec


def cfg_with(**overrides) -> PreprocessConfig:
    return load_config(PreprocessConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def rows_of(spec: str, cfg: PreprocessConfig | None = None) -> list[dict]:
    cfg = cfg or PreprocessConfig()
    rows = list(build_source(spec, cfg).rows())
    for r in rows:
        assert tuple(r) == SOURCE_KEYS
        assert r["error"] is None and r["timings"] == "{}"
        json.loads(r["provenance"])
    return rows


def test_parse_spec():
    s = parse_spec("abo:/data/abo.tar?metadata=/data/ABO.csv")
    assert (s.kind, s.arg, s.options) == ("abo", "/data/abo.tar", {"metadata": "/data/ABO.csv"})
    assert parse_spec("s3://bucket/prefix").kind == "s3"
    assert parse_spec("synthetic:3").arg == "3"
    with pytest.raises(ValueError, match="unknown source kind"):
        parse_spec("nope:1")
    with pytest.raises(ValueError, match="kind:argument"):
        parse_spec("justtext")


def test_local_folder_shared_glbs():
    d = shared_path("assets", "glb")
    rows = rows_of(f"local:{d}")
    assert len(rows) == 10
    assert {r["source"] for r in rows} == {"local"}
    assert all(r["uri"].endswith(".glb") and r["sha256"] is None for r in rows)
    assert "kenney_tree.glb" in {r["file_identifier"] for r in rows}


def test_local_folder_formats_and_hidden(tmp_path):
    for name in ["a.glb", "sub/b.OBJ", "sub/b.mtl", "c.stl", "d.blend", "e.txt", ".hidden.glb", "f.ply", "g.fbx"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    rows = rows_of(f"local:{tmp_path}")
    assert sorted(r["file_identifier"] for r in rows) == ["a.glb", "c.stl", "d.blend", "f.ply", "g.fbx", "sub/b.OBJ"]
    cfg = cfg_with(**{"filter.file_types": "[glb, stl]", "sources.specs": f"[local:{tmp_path}]"})
    listed, stats = list_rows(cfg)
    assert sorted(r["file_identifier"] for r in listed) == ["a.glb", "c.stl"]
    with pytest.raises(FileNotFoundError):
        rows_of(f"local:{tmp_path}/missing")


def test_manifest_csv_and_parquet(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.glb").write_bytes(b"1")
    df = pd.DataFrame({"path": ["x.glb", "https://example.invalid/y.glb"], "sha256": ["AB" * 32, None],
                       "license": ["CC0", None], "aesthetic_score": [5.0, None], "caption": ["a box", "b"]})
    df.to_csv(tmp_path / "m" / "list.csv", index=False)
    df.to_parquet(tmp_path / "m" / "list.parquet")
    for name in ("list.csv", "list.parquet"):
        rows = rows_of(f"manifest:{tmp_path / 'm' / name}")
        assert rows[0]["uri"] == str(tmp_path / "m" / "x.glb")
        assert rows[0]["sha256"] == "ab" * 32 and rows[0]["license"] == "CC0" and rows[0]["aesthetic_score"] == 5.0
        assert json.loads(rows[0]["provenance"]) == {"caption": "a box"}
        assert rows[1]["uri"] == "https://example.invalid/y.glb" and rows[1]["sha256"] is None


def test_synthetic():
    rows = rows_of("synthetic:3?seed=10")
    assert [r["uri"] for r in rows] == ["synthetic://10", "synthetic://11", "synthetic://12"]
    assert rows[0]["source"] == "synthetic" and rows[0]["license"] == "CC0-1.0"


def _objaverse_standin(tmp_path):
    root = tmp_path / "objaverse"
    uids = ["a" * 32, "b" * 32, "c" * 32]
    paths = {u: f"glbs/000-00{i}/{u}.glb" for i, u in enumerate(uids)}
    write_gz_json(root / "hf-objaverse-v1" / "object-paths.json.gz", paths)
    for i, u in enumerate(uids):
        write_gz_json(root / "hf-objaverse-v1" / "metadata" / f"000-00{i}.json.gz",
                      {u: {"license": ["by", "by-nc", "cc0"][i], "name": f"obj{i}"}})
    return root, uids


def test_objaverse_v1(tmp_path):
    root, uids = _objaverse_standin(tmp_path)
    cfg = cfg_with(**{"sources.objaverse_dir": str(root), "sources.objaverse_hf_base": "http://127.0.0.1:1/hf"})
    rows = rows_of(f"objaverse:{uids[0]},{uids[2]}.glb,{'f' * 32}", cfg)
    assert [r["uri"] for r in rows] == [f"http://127.0.0.1:1/hf/glbs/000-000/{uids[0]}.glb",
                                        f"http://127.0.0.1:1/hf/glbs/000-002/{uids[2]}.glb"]
    assert [r["license"] for r in rows] == ["by", "cc0"]
    assert rows[0]["file_identifier"] == f"https://sketchfab.com/3d-models/{uids[0]}"
    (tmp_path / "uids.txt").write_text(f"{uids[1]}\n")
    assert len(rows_of(f"objaverse:@{tmp_path / 'uids.txt'}?annotations=false", cfg)) == 1
    assert len(rows_of("objaverse:all?annotations=false", cfg)) == 3


def test_objaverse_xl_all_subsets(tmp_path):
    root, uids = _objaverse_standin(tmp_path)
    cols = ["fileIdentifier", "source", "license", "fileType", "sha256", "metadata"]

    def put(sub, recs):
        (root / sub).mkdir(parents=True, exist_ok=True)
        pd.DataFrame(recs, columns=cols).to_parquet(root / sub / f"{sub}.parquet")

    put("sketchfab", [[f"https://sketchfab.com/3d-models/{uids[0]}", "sketchfab", "by", "glb", "1" * 64, "{}"]])
    put("github", [
        ["https://github.com/org/repo/blob/c0ffee/models/z.obj", "github", "MIT", "obj", "2" * 64, "{}"],
        ["https://github.com/org/repo/blob/c0ffee/a.glb", "github", "MIT", "glb", "3" * 64, "{}"],
        ["https://github.com/zed/other/blob/beef/m.stl", "github", None, "stl", "4" * 64, "{}"],
    ])
    put("thingiverse", [["https://www.thingiverse.com/thing:42/files?fileId=77", "thingiverse", "cc", "stl",
                         "5" * 64, '{"a": 1}']])
    put("smithsonian", [["https://3d-api.si.edu/x.glb", "smithsonian", "CC0", "glb", "6" * 64, "{}"]])
    cfg = cfg_with(**{"sources.objaverse_dir": str(root), "sources.objaverse_hf_base": "http://h/hf",
                      "sources.github_archive_url": "http://h/gh/{org}/{repo}/{commit}.zip",
                      "sources.thingiverse_url": "http://h/thing/{file_id}"})
    rows = rows_of("objaverse-xl:sketchfab,github,thingiverse,smithsonian", cfg)
    by = {r["source"]: [] for r in rows}
    for r in rows:
        by[r["source"]].append(r)
    assert by["objaverse_xl/sketchfab"][0]["uri"] == f"http://h/hf/glbs/000-000/{uids[0]}.glb"
    assert by["objaverse_xl/sketchfab"][0]["sha256"] == "1" * 64
    gh = [r["uri"] for r in by["objaverse_xl/github"]]
    # sorted by archive so each repository archive is fetched/opened once for all its assets
    assert gh == ["zip://a.glb::http://h/gh/org/repo/c0ffee.zip", "zip://models/z.obj::http://h/gh/org/repo/c0ffee.zip",
                  "zip://m.stl::http://h/gh/zed/other/beef.zip"]
    th = by["objaverse_xl/thingiverse"][0]
    assert th["uri"] == "http://h/thing/77#.stl" and json.loads(th["provenance"])["thing_id"] == "42"
    assert by["objaverse_xl/smithsonian"][0]["uri"] == "https://3d-api.si.edu/x.glb"
    # TRELLIS-style filtering by sha256 list happens before rows are built
    (tmp_path / "keep.txt").write_text("3" * 64 + "\n" + "6" * 64 + "\n")
    cfg.filter.sha256_list = str(tmp_path / "keep.txt")
    cfg.sources.specs = ["objaverse-xl:github,smithsonian"]
    listed, stats = list_rows(cfg)
    assert sorted(r["sha256"] for r in listed) == ["3" * 64, "6" * 64]


def test_abo_tar(tmp_path):
    g1, g2 = glb_bytes(1), glb_bytes(2)
    tar = tmp_path / "abo-3dmodels.tar"
    tar.write_bytes(tar_bytes({"3dmodels/original/0/B01.glb": g1, "3dmodels/original/1/B02.glb": g2,
                               "3dmodels/metadata.json": b"{}"}))
    rows = rows_of(f"abo:{tar}")
    assert [r["file_identifier"] for r in rows] == ["0/B01.glb", "1/B02.glb"]
    assert rows[0]["uri"] == f"tar://3dmodels/original/0/B01.glb::{tar}" and rows[0]["license"] == "CC-BY-NC-4.0"
    pd.DataFrame({"sha256": [sha256(g2)], "file_identifier": ["1/B02.glb"], "aesthetic_score": [4.9]}).to_csv(
        tmp_path / "ABO.csv", index=False)
    rows = rows_of(f"abo:{tar}?metadata={tmp_path / 'ABO.csv'}")
    assert len(rows) == 1 and rows[0]["sha256"] == sha256(g2) and rows[0]["aesthetic_score"] == 4.9


def test_3d_future_zip(tmp_path):
    z = tmp_path / "3D-FUTURE-model.zip"
    z.write_bytes(zip_bytes({"3D-FUTURE-model/m1/raw_model.obj": b"v 0 0 0\n", "3D-FUTURE-model/m1/image.jpg": b"J1",
                             "3D-FUTURE-model/m2/raw_model.obj": b"v 0 0 0\n"}))  # m2 has no image: skipped
    rows = rows_of(f"3d-future:{z}")
    assert len(rows) == 1
    r = rows[0]
    assert r["file_identifier"] == "3D-FUTURE-model/m1" and r["source"] == "3d_future"
    assert r["uri"] == f"zip://3D-FUTURE-model/m1/raw_model.obj::{z}"
    assert r["sha256_uri"] == f"zip://3D-FUTURE-model/m1/image.jpg::{z}"


def test_toys4k_zip(tmp_path):
    z = tmp_path / "toys4k_blend_files.zip"
    z.write_bytes(zip_bytes({
        "toys4k_blend_files/cup/cup_000/cup_000.blend": b"BLENDER-v280",
        "toys4k_blend_files/cup/cup_000/cup_000_attribution.txt": b"obtained under a CC attribution license\n by X",
        "toys4k_blend_files/car/car_001/car_001.blend": b"BLENDER-v280",
    }))
    rows = rows_of(f"toys4k:{z}")
    assert [r["file_identifier"] for r in rows] == ["car/car_001/car_001.blend", "cup/cup_000/cup_000.blend"]
    assert rows[1]["license"] == "obtained under a CC attribution license by X" and rows[0]["license"] is None
    assert json.loads(rows[1]["provenance"])["category"] == "cup"


def test_hssd_needs_token_and_builds_hf_uris(tmp_path, monkeypatch):
    pd.DataFrame({"file_identifier": ["objects/a/abc.glb"], "sha256": ["7" * 64], "aesthetic_score": [6.0]}).to_csv(
        tmp_path / "HSSD.csv", index=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    with pytest.raises(PermissionError, match="gated"):
        rows_of(f"hssd:{tmp_path / 'HSSD.csv'}")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    rows = rows_of(f"hssd:{tmp_path / 'HSSD.csv'}")
    assert rows[0]["uri"] == "hf://datasets/hssd/hssd-models/objects/a/abc.glb" and rows[0]["sha256"] == "7" * 64


def test_trellis_metadata_filter_dedupe_limit(tmp_path):
    d = tmp_path / "assets"
    d.mkdir()
    blobs = {f"m{i}.glb": glb_bytes(i) for i in range(4)}
    for n, b in blobs.items():
        (d / n).write_bytes(b)
    # the manifest knows hashes for m0..m2 and lists m0 twice (duplicate)
    man = pd.DataFrame({"uri": [str(d / n) for n in ["m0.glb", "m1.glb", "m2.glb", "m0.glb"]],
                        "sha256": [sha256(blobs[n]) for n in ["m0.glb", "m1.glb", "m2.glb", "m0.glb"]],
                        "file_identifier": ["m0", "m1", "m2", "m0-again"]})
    man.to_csv(tmp_path / "man.csv", index=False)
    trellis = pd.DataFrame({
        "sha256": [sha256(blobs["m0.glb"]), sha256(blobs["m1.glb"]), sha256(blobs["m2.glb"]), sha256(blobs["m3.glb"])],
        "file_identifier": ["m0", "m1", "m2", "m3.glb"],
        "aesthetic_score": [6.0, 4.0, 5.0, 5.5],
        "captions": ['["a"]', "[]", "[]", "[]"],
    })
    trellis.to_csv(tmp_path / "T.csv", index=False)
    cfg = cfg_with(**{"filter.trellis_metadata": f"[{tmp_path / 'T.csv'}]", "filter.min_aesthetic": 4.5,
                      "sources.specs": f"[manifest:{tmp_path / 'man.csv'}, local:{d}]"})
    rows, stats = list_rows(cfg)
    # m1 below the threshold; m0 duplicate dropped; local rows without sha matched by file_identifier (m3.glb)
    assert [r["file_identifier"] for r in rows] == ["m0", "m2", "m3.glb"]
    assert rows[0]["aesthetic_score"] == 6.0 and json.loads(rows[0]["provenance"])["captions"] == '["a"]'
    assert rows[2]["sha256"] == sha256(blobs["m3.glb"])  # expected hash filled in from the CSV
    assert stats["dropped_duplicate"] >= 1 and stats["dropped_trellis_metadata"] >= 1
    cfg.filter.limit = 2
    assert len(list_rows(cfg)[0]) == 2
    cfg.filter.limit = None
    cfg.filter.trellis_metadata = []
    cfg.filter.licenses = ["cc0-1.0"]
    cfg.sources.specs = ["synthetic:2", f"local:{d}"]
    assert [r["source"] for r in list_rows(cfg)[0]] == ["synthetic", "synthetic"]
