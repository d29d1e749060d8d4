"""The content-addressed artifact store that every service reads and writes.

Files live at `<root>/objects/<first two hex digits>/<sha256><suffix>`. An `ArtifactRef` names a file by its
path inside the root plus its digest and size; a reader resolves it with `ArtifactStore.path`, which refuses
anything outside the root and verifies the digest before handing the path out.

Hashing a large file on every use is slow (sha256 runs at about 250 MB/s here; a refit's 345 MB of normal
equations were hashed twice per use), so a large file whose digest was verified is recorded in
`<root>/verified/<sha256>` with what identifies its content on disk (device, inode, size, change time in ns):
any write, truncation or replacement changes the change time or the inode, and the file is hashed again.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from pyacemaker.v1 import common_pb2

_CHUNK = 1 << 20
# Files from this size on have their verified digest recorded (smaller ones hash faster than the record is read).
VERIFIED_RECORD_MIN_BYTES = 16 << 20


# Longest artifact uri accepted (store paths are a few dozen characters).
MAX_URI_CHARS = 1024

# Artifact kinds of a linear fit's pacemaker export (the trainer writes them, the orchestrator copies them into
# the run dir): not potential files.
PACEMAKER_DATASET_KIND = "pacemaker_dataset"
PACEMAKER_INPUT_KIND = "pacemaker_input"


class ArtifactError(ValueError):
    """An artifact that is missing, altered, or points outside the store."""


def sha256_of_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _move(source: Path, target: Path) -> None:
    """A rename, or a copy and delete when the two lie on different file systems (a run dir and the store
    mounted separately into a container, /tmp on tmpfs)."""
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(source, target)
        source.unlink()


class ArtifactStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        (self.root / "verified").mkdir(exist_ok=True)

    def _object_path(self, sha256: str, suffix: str) -> Path:
        return self.root / "objects" / sha256[:2] / f"{sha256}{suffix}"

    def new_tempfile(self, suffix: str = "") -> Path:
        """A fresh file inside the store's tmp dir (same file system, so `put_file(move=True)` is a rename)."""
        handle, name = tempfile.mkstemp(dir=self.root / "tmp", suffix=suffix)
        os.close(handle)
        return Path(name)

    def put_file(self, path: str | Path, kind: str, move: bool = False) -> common_pb2.ArtifactRef:
        """Add a file (its suffix is kept so tools can tell the format) and return its reference."""
        path = Path(path)
        sha256 = sha256_of_file(path)
        size = path.stat().st_size
        target = self._object_path(sha256, "".join(path.suffixes[-1:]))
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = self.new_tempfile()
            if move:
                _move(path, staging)
            else:
                shutil.copyfile(path, staging)
            os.replace(staging, target)  # atomic: readers never see a half-written object
            if size >= VERIFIED_RECORD_MIN_BYTES:  # the bytes just hashed, moved or copied here
                self._record_verified(target, sha256)
        elif move:
            path.unlink()
        return common_pb2.ArtifactRef(uri=str(target.relative_to(self.root)), sha256=sha256, size=size, kind=kind)

    def put_bytes(self, data: bytes, kind: str, suffix: str = "") -> common_pb2.ArtifactRef:
        staging = self.new_tempfile(suffix)
        staging.write_bytes(data)
        return self.put_file(staging, kind, move=True)

    def _resolve(self, uri: str) -> Path:
        if "\0" in uri or len(uri) > MAX_URI_CHARS:
            raise ArtifactError(
                f"artifact uri {uri[:80]!r} is not a store path (NUL byte or over {MAX_URI_CHARS} characters)"
            )
        if not uri or Path(uri).is_absolute():
            raise ArtifactError(f"artifact uri {uri!r} must be a path relative to the store root")
        candidate = (self.root / uri).resolve()
        if not candidate.is_relative_to(self.root):
            raise ArtifactError(f"artifact uri {uri!r} points outside the store root {self.root}")
        return candidate

    def path(self, ref: common_pb2.ArtifactRef, verify: bool = True) -> Path:
        """The local path of an artifact, after checking that it exists and (by default) its digest."""
        path = self._resolve(ref.uri)
        try:
            is_file = path.is_file()
        except OSError as exc:  # a name too long for the file system, say
            raise ArtifactError(f"artifact {ref.uri[:80]!r} cannot be looked up ({exc.strerror})") from None
        if not is_file:
            raise ArtifactError(f"artifact {ref.uri} is missing from the store {self.root}")
        if verify:
            if ref.size and path.stat().st_size != ref.size:
                raise ArtifactError(f"artifact {ref.uri} has {path.stat().st_size} bytes, expected {ref.size}")
            if self._verified_before(path, ref.sha256):
                return path
            actual = sha256_of_file(path)
            if actual != ref.sha256:
                raise ArtifactError(f"artifact {ref.uri} has sha256 {actual}, expected {ref.sha256}")
            if path.stat().st_size >= VERIFIED_RECORD_MIN_BYTES:
                self._record_verified(path, actual)
        return path

    @staticmethod
    def _identity(path: Path) -> str:
        """What changes whenever the file's content can have changed (module docstring)."""
        status = path.stat()
        return f"{status.st_dev} {status.st_ino} {status.st_size} {status.st_ctime_ns}"

    def _verified_record(self, sha256: str) -> Path:
        return self.root / "verified" / sha256

    def _verified_before(self, path: Path, sha256: str) -> bool:
        if not all(c in "0123456789abcdef" for c in sha256) or len(sha256) != 64:
            return False
        try:
            return self._verified_record(sha256).read_text() == self._identity(path)
        except OSError:
            return False

    def _record_verified(self, path: Path, sha256: str) -> None:
        """Best effort: without the record the file is only hashed again next time."""
        try:
            staging = self.new_tempfile()
            staging.write_text(self._identity(path))
            os.replace(staging, self._verified_record(sha256))
        except OSError:
            pass

    def verify(self, ref: common_pb2.ArtifactRef) -> bool:
        try:
            self.path(ref)
        except ArtifactError:
            return False
        return True
