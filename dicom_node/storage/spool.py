"""The spool: received instances as files named by the SHA-256 of their bytes.

The C-STORE handler answers Success only after the instance is on disk (file fsync + rename + directory fsync)
and its job row is committed, so an instance we acknowledged survives a crash (PS3.4 B.2.2: after a Success
status the SCP is responsible for the instance). File names derive from the SHA-256 of the received bytes,
never from a UID string: UIDs come from the peer and are not trusted as paths.

An instance is written from its parts as they lie in memory (file meta, then the data set as received) and read
back as a read-only memory map, so that a radiograph of several megabytes is not copied on either side. Once the
worker has read an instance, its pages leave the page cache (:meth:`Spool.evict`): the next instance written
reuses them instead of growing the cache by a radiograph per image (fresh pages cost the writer far more kernel
time than recycled ones, and the file is read again only if its job is retried).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from typing_extensions import Buffer

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
    def key_for(data: Buffer | Sequence[Buffer]) -> str:
        """The spool key of some bytes (or of the concatenation of several parts): their SHA-256 in hex."""
        digest = hashlib.sha256()
        for part in _parts(data):
            digest.update(part)
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise SpoolError(f"malformed spool key {key[:80]!r}")
        return self.instances / key[:2] / f"{key}.dcm"

    def write(self, data: Buffer | Sequence[Buffer]) -> str:
        """Store ``data`` (bytes, or parts stored one after the other) durably and return its spool key; writing
        the same bytes again is a no-op."""
        parts = _parts(data)
        key = self.key_for(parts)
        final = self.path(key)
        if final.exists():
            return key
        shard = final.parent
        shard.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=shard, prefix=".incoming-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                for part in parts:
                    _write_all(f.fileno(), part)
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

    @contextmanager
    def mapped(self, key: str) -> Iterator[memoryview]:
        """The instance's bytes as a read-only view of the file mapped in memory (no copy), unmapped on exit
        unless a view of it is still held (then when the last one goes)."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError:
            raise SpoolError(f"spool file {key[:12]} is missing") from None
        try:
            size = os.fstat(fd).st_size
            # mmap refuses an empty file; an empty instance is no less an instance
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)
        view = memoryview(mapping if mapping is not None else b"")
        try:
            yield view
        finally:
            view.release()
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # a slice or an array over it is still alive: unmapped when it goes
                    pass

    def evict(self, key: str) -> None:
        """Drop the instance's pages from the page cache (it stays on disk); a no-op where the OS cannot."""
        if not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def exists(self, key: str) -> bool:
        return self.path(key).exists()


def _parts(data: Buffer | Sequence[Buffer]) -> Sequence[Buffer]:
    """Parts given as a list or tuple; any other object is one buffer (bytes, a memoryview, an mmap)."""
    if isinstance(data, list | tuple):
        return data
    return [data]  # type: ignore[list-item]  # a Sequence that is no list or tuple (bytes) is one buffer


def _write_all(fd: int, part: Buffer) -> None:
    with memoryview(part) as view, view.cast("B") as data:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


