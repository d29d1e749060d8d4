"""put_file(move=True) from another file system: what a container sees when its run dir and the artifact store
are separate mounts (the surrogate-labelling shards of a run under podman hit this)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from pyacemaker.artifacts import ArtifactStore

SHM = Path("/dev/shm")


@pytest.mark.skipif(
    not SHM.is_dir() or os.stat(SHM).st_dev == os.stat(tempfile.gettempdir()).st_dev,
    reason="needs /dev/shm on another file system than the temp dir",
)
def test_move_into_the_store_from_another_file_system(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    data = b"frame data\n" * 1000
    with tempfile.TemporaryDirectory(dir=SHM) as elsewhere:
        source = Path(elsewhere) / "shard_0000.extxyz"
        source.write_bytes(data)
        ref = store.put_file(source, "extxyz", move=True)
        assert not source.exists()  # moved, not copied
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert store.path(ref).read_bytes() == data
