"""The spool: received instances as files named by the SHA-256 of their bytes.

The C-STORE handler answers Success only after the instance is on disk (file fsync + rename + directory fsync)
and its job row is committed, so an instance we acknowledged survives a crash (PS3.4 B.2.2: after a Success
status the SCP is responsible for the instance). File names derive from the SHA-256 of the received bytes,
never from a UID string: UIDs come from the peer and are not trusted as paths.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from dicom_node.errors import CxrLensError

INSTANCES_DIR = "instances"

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def uid_hash(uid: str) -> str:
    """A short, stable stand-in for a UID in logs (UIDs identify a patient's study: keep them out of logs)."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


class SpoolError(CxrLensError):
    """A spool key is malformed or its file is missing."""


class Spool:
    """Content-addressed store of received DICOM Part 10 files: ``<dir>/instances/ab/<sha256>.dcm``."""

    def __init__(self, spool_dir: Path | str) -> None:
        self.dir = Path(spool_dir)
        self.instances = self.dir / INSTANCES_DIR
        self.instances.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key_for(data: bytes) -> str:
        """The spool key of some bytes: their SHA-256 in hex."""
        return hashlib.sha256(data).hexdigest()

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise SpoolError(f"malformed spool key {key[:80]!r}")
        return self.instances / key[:2] / f"{key}.dcm"

    def write(self, data: bytes) -> str:
        """Store ``data`` durably and return its spool key; writing the same bytes again is a no-op."""
        key = self.key_for(data)
        final = self.path(key)
        if final.exists():
            return key
        shard = final.parent
        shard.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=shard, prefix=".incoming-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(shard)
        return key

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise SpoolError(f"spool file {key[:12]} is missing") from None

    def exists(self, key: str) -> bool:
        return self.path(key).exists()


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


