"""The storage interface: what the node asks of its job queue and its outbox, and the factory that opens them.

Two backends keep the same semantics: SQLite files under ``node.spool_dir`` (the default: one machine, no
server) and PostgreSQL (``[storage] url = "postgresql://..."``: many processes and machines share one queue and
one outbox). The instance bytes stay in the spool directory in both cases (a shared filesystem when the roles
run on several machines).

Where they differ: the SQLite queue requeues every job left in ``processing`` when the node starts (one node owns
the file); the PostgreSQL queue gives each claim a lease that its holder renews while it runs, so the jobs of a
worker that died go back to the queue when the lease runs out, while other workers' claims are left alone.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit, urlunsplit

from dicom_node.storage.jobs import Job, JobQueue, jobs_path
from dicom_node.storage.outbox import Outbox, OutboxItem, outbox_path

if TYPE_CHECKING:
    from dicom_node.settings import Settings, StorageSettings

POSTGRES_SCHEMES = ("postgresql", "postgres")
# With PostgreSQL, the folder of node.spool_dir that holds the outbox's payloads (SC, Parametric Map, SR, ORU).
OUTBOX_PAYLOADS = "outbox"


class StorageError(OSError):
    """The shared store cannot be reached or refused a write.

    An ``OSError``, like a failing spool disk: the C-STORE handler answers 0xA700 (out of resources) instead of
    Success, and the instance is not acknowledged.
    """


class StorageNotFound(StorageError):
    """``create=False`` and there is no store there yet (no file, or a database without our schema)."""


class JobStore(Protocol):
    """The job queue: one row per distinct received content, claimed in batches by workers."""

    def add(self, spool_key: str, *, calling_ae: str = "", uid_hash: str | None = None) -> tuple[int, bool]:
        """Record a received instance; ``(job_id, is_new)``. A failed job received again goes back to pending."""

    def pending_count(self) -> int:
        """Jobs waiting for a worker (the C-STORE handler's bound on the queue)."""

    def wait_for_work(self, timeout: float) -> bool:
        """Block until a job may be claimable or ``timeout`` seconds pass; True when there is one."""

    def wake(self) -> None:
        """End the waits in :meth:`wait_for_work` now (the node is stopping)."""

    def claim_batch(self, max_n: int, *, count_attempt: bool = True) -> list[Job]:
        """Move up to ``max_n`` oldest pending jobs to processing, for this caller only, and return them."""

    def begin_attempt(self, job_id: int) -> None:
        """Count one attempt at a job claimed with ``count_attempt=False``."""

    def complete(self, job_id: int) -> None: ...

    def fail(self, job_id: int, reason: str) -> None: ...

    def mark_ineligible(self, job_id: int, rule: str | None, reason: str) -> None: ...

    def requeue_processing(self, max_attempts: int = 3) -> int:
        """At start: interrupted jobs go back to pending (those interrupted ``max_attempts`` times fail)."""

    def get(self, job_id: int) -> Job | None: ...

    def counts(self) -> dict[str, int]:
        """Jobs in each state, every state present."""

    def recent_failures(self, n: int = 10) -> list[Job]: ...

    def close(self) -> None: ...


class OutboxStore(Protocol):
    """The outbox: outputs stored before they are sent, FIFO per (channel, destination)."""

    def enqueue(
        self, channel: str, destination: str, dedup_key: str, payload: bytes, *, resend: bool = False,
        source_received_at: float | None = None,
    ) -> int:
        """Store an item once per (channel, destination, dedup_key); ``resend`` re-arms a delivered twin enqueued
        before ``source_received_at`` (see ``Outbox.enqueue``)."""

    def destinations(self, channel: str) -> list[str]: ...

    def head(self, channel: str, destination: str) -> OutboxItem | None:
        """The oldest pending item of a destination, due or not."""

    def due(self, channel: str, destination: str, now: float | None = None) -> OutboxItem | None:
        """The head if its next attempt is due and this sender may deliver to the destination, else None."""

    def mark_done(self, item_id: int) -> None: ...

    def mark_retry(self, item_id: int, error: str, next_attempt_at: float) -> None: ...

    def park(self, item_id: int, error: str) -> None: ...

    def get(self, item_id: int) -> OutboxItem | None: ...

    def counts(self) -> dict[tuple[str, str], int]:
        """Items per (channel, state)."""

    def problems(self, limit: int = 20) -> list[OutboxItem]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class NodeIdentity:
    """Who holds claims and beats in the registry of node processes (PostgreSQL), as ``cxr-lens status`` shows."""

    role: str
    ae_title: str
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)


def is_postgres(url: str) -> bool:
    """True for a ``postgresql://`` (or ``postgres://``) URL; empty and ``sqlite`` mean the SQLite files."""
    return urlsplit(url).scheme in POSTGRES_SCHEMES


def redacted(url: str) -> str:
    """The URL without its password, for logs and ``cxr-lens status``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _needs_psycopg() -> None:
    # psycopg is an optional dependency: say which extra brings it rather than fail on an import.
    if importlib.util.find_spec("psycopg") is None:
        raise StorageError("[storage] url names PostgreSQL, which needs psycopg: pip install 'cxr-lens[postgres]'")


def open_job_store(
    storage: StorageSettings, spool_dir: Path | str, *, create: bool = True, identity: NodeIdentity | None = None
) -> JobStore:
    """The job queue that ``storage`` names; ``create=False`` raises :class:`StorageNotFound` where none is.

    ``identity``: a PostgreSQL queue registers the process under it and keeps it seen while the queue is open.
    """
    if is_postgres(storage.url):
        _needs_psycopg()
        from dicom_node.storage.postgres import PostgresJobQueue

        return PostgresJobQueue(storage.url, lease_s=storage.lease_s, create=create, identity=identity)
    path = jobs_path(spool_dir)
    if not create and not path.exists():
        raise StorageNotFound(f"no job queue in {spool_dir}")
    return JobQueue(path)


def open_outbox_store(storage: StorageSettings, spool_dir: Path | str, *, create: bool = True) -> OutboxStore:
    """The outbox that ``storage`` names; ``create=False`` raises :class:`StorageNotFound` where none is."""
    if is_postgres(storage.url):
        _needs_psycopg()
        from dicom_node.storage.postgres import PostgresOutbox

        # The bytes of the outputs go to the shared spool, their names to the database (see PostgresOutbox).
        return PostgresOutbox(storage.url, lease_s=storage.lease_s, create=create,
                              payload_dir=Path(spool_dir) / OUTBOX_PAYLOADS)
    path = outbox_path(spool_dir)
    if not create and not path.exists():
        raise StorageNotFound(f"no outbox in {spool_dir}")
    return Outbox(path)


def open_storage(settings: Settings, *, role: str = "all") -> tuple[JobStore, OutboxStore]:
    """The node's job queue and outbox, by ``[storage] url``; the PostgreSQL schema is created or migrated here."""
    identity = NodeIdentity(role=role, ae_title=settings.node.ae_title)
    jobs = open_job_store(settings.storage, settings.node.spool_dir, identity=identity)
    try:
        outbox = open_outbox_store(settings.storage, settings.node.spool_dir)
    except BaseException:
        jobs.close()
        raise
    return jobs, outbox
