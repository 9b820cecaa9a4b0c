"""The hostile constructions one at a time, without Ray or Blender: each fails at the first wall that can see it,
with its reason (the same files run through the `demo` preset in tests/test_pipeline_hostile.py)."""
from __future__ import annotations

import json
import os

import pytest

from mdt.config import load_config
from pipelines import storage
from pipelines.config import PreprocessConfig
from pipelines.download import Download
from pipelines.sources.base import make_row
from pipelines.synthetic_meshes import synthetic_mesh_glb


def make_cfg(tmp_path) -> PreprocessConfig:
    over = {"output": str(tmp_path / "out"), "download.cache_uri": str(tmp_path / "cache"),
            "download.extract_dir": str(tmp_path / "x")}
    return load_config(PreprocessConfig, None, [f"{k}={v}" for k, v in over.items()])


def local_row(root, rel):
    return make_row(source="local", file_identifier=rel, uri=str(root / rel), root=str(root))


def download(tmp_path, root, rel) -> dict:
    return Download(make_cfg(tmp_path))(local_row(root, rel))


# ----------------------------------------------------------------------------------- 1. the source root


@pytest.fixture
def folder(tmp_path):
    """assets/ with one good GLB, a symlinked directory and a symlinked file leading to outside/."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.glb").write_bytes(synthetic_mesh_glb(7))
    assets = tmp_path / "assets"
    (assets / "sub").mkdir(parents=True)
    (assets / "good.glb").write_bytes(synthetic_mesh_glb(1))
    (assets / "sub" / "inner.glb").write_bytes(synthetic_mesh_glb(2))
    (assets / "linked_dir").symlink_to(outside, target_is_directory=True)
    (assets / "inside_link_dir").symlink_to(assets / "sub", target_is_directory=True)
    (assets / "linked_file.glb").symlink_to(outside / "secret.glb")
    return assets, outside


def test_listing_never_enters_a_symlinked_directory(folder):
    assets, _ = folder
    listed = [os.path.relpath(u, assets) for u in storage.list_files(str(assets))]
    assert listed == ["good.glb", "linked_file.glb", "sub/inner.glb"]


def test_download_refuses_paths_through_symlinks(folder, tmp_path):
    assets, outside = folder
    assert download(tmp_path, assets, "good.glb")["error"] is None
    assert download(tmp_path, assets, "sub/inner.glb")["error"] is None
    for rel in ("linked_file.glb", "linked_dir/secret.glb", "inside_link_dir/inner.glb"):
        err = download(tmp_path, assets, rel)["error"]
        assert err == f"download: external reference outside the asset: {rel!r} (symlink in the source folder)", err
    cached = [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert (outside / "secret.glb").read_bytes() not in cached


def test_bundle_members_must_be_regular_files_inside(tmp_path):
    """A glTF buffer that is a symlink to /dev/zero, to a FIFO or to a file outside fails with its reason."""
    from _pipeline_helpers import TRIANGLE, _gltf_doc

    assets = tmp_path / "assets"
    assets.mkdir()
    os.mkfifo(assets / "fifo.bin")
    (assets / "dev.bin").symlink_to("/dev/zero")
    (tmp_path / "out.bin").write_bytes(TRIANGLE)
    (assets / "out.bin").symlink_to(tmp_path / "out.bin")
    for name, why in (("fifo.bin", "not a regular file"), ("dev.bin", "symlink to outside the bundle"),
                      ("out.bin", "symlink to outside the bundle")):
        (assets / f"{name}.gltf").write_text(json.dumps(_gltf_doc(name, len(TRIANGLE))))
        err = download(tmp_path, assets, f"{name}.gltf")["error"]
        assert err == f"download: external reference outside the asset: {name!r} ({why})", err
