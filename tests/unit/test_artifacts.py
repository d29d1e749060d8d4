"""The content-addressed artifact store: digests, verification, and confinement to its root."""

from __future__ import annotations

import hashlib

import pytest

from pyacemaker.artifacts import ArtifactError, ArtifactStore
from pyacemaker.v1 import common_pb2


def test_put_then_read_back_with_independent_digest(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    data = b"3\n\nH 0 0 0\n" * 100
    ref = store.put_bytes(data, kind="structures", suffix=".extxyz")
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert ref.size == len(data)
    assert ref.uri.startswith("objects/") and ref.uri.endswith(".extxyz")
    assert store.path(ref).read_bytes() == data


def test_same_content_is_stored_once(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    a = store.put_bytes(b"same", kind="x", suffix=".bin")
    source = tmp_path / "copy.bin"
    source.write_bytes(b"same")
    b = store.put_file(source, kind="x")
    assert a.sha256 == b.sha256
    assert len(list((store.root / "objects").rglob("*"))) == 2  # one shard dir + one object


def test_altered_or_missing_object_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_bytes(b"original", kind="x")
    store.path(ref).write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="sha256"):
        store.path(ref)
    assert not store.verify(ref)
    store.path(ref, verify=False).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        store.path(ref)


@pytest.mark.parametrize("uri", ["../outside.txt", "/etc/passwd", "objects/../../outside.txt", ""])
def test_paths_outside_the_root_are_refused(tmp_path, uri):
    store = ArtifactStore(tmp_path / "store")
    (tmp_path / "outside.txt").write_text("secret")
    ref = common_pb2.ArtifactRef(uri=uri, sha256=hashlib.sha256(b"secret").hexdigest(), size=6)
    with pytest.raises(ArtifactError):
        store.path(ref)


def test_symlink_escaping_the_root_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    (tmp_path / "outside.txt").write_text("secret")
    (store.root / "objects" / "link.txt").symlink_to(tmp_path / "outside.txt")
    ref = common_pb2.ArtifactRef(uri="objects/link.txt", sha256=hashlib.sha256(b"secret").hexdigest())
    with pytest.raises(ArtifactError, match="outside"):
        store.path(ref)


def test_a_large_file_is_hashed_again_only_when_it_changed(tmp_path, monkeypatch):
    """A large object's verified digest is recorded with its identity on disk; a write to it (same size, even
    with its old modification time put back) is noticed and refused."""
    import os

    from pyacemaker import artifacts

    monkeypatch.setattr(artifacts, "VERIFIED_RECORD_MIN_BYTES", 1000)
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_bytes(b"x" * 5000, kind="normal_equations", suffix=".npz")
    hashed: list[str] = []
    real_hash = artifacts.sha256_of_file
    monkeypatch.setattr(artifacts, "sha256_of_file", lambda path: hashed.append(str(path)) or real_hash(path))
    assert store.path(ref).read_bytes() == b"x" * 5000
    assert hashed == []  # recorded when it was put
    path = store.path(ref, verify=False)
    before = path.stat()
    path.write_bytes(b"y" * 5000)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the modification time cannot hide it
    with pytest.raises(ArtifactError, match="sha256"):
        store.path(ref)
    assert len(hashed) == 1
    small = store.put_bytes(b"small", kind="x")
    store.path(small)
    store.path(small)
    assert hashed.count(str(store.path(small, verify=False))) == 2  # small files are hashed on every use
