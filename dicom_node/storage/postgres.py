"""The job queue and the outbox in PostgreSQL (psycopg 3), shared by every process of every machine.

Same semantics as the SQLite classes (:mod:`dicom_node.storage.jobs`, :mod:`dicom_node.storage.outbox`), with
what sharing needs:

- claims take the oldest pending rows with ``SELECT ... FOR UPDATE SKIP LOCKED``, so concurrent workers never get
  the same job and never wait on each other's rows;
- a claim is a lease: the queue renews the leases of the jobs it has in hand every ``lease_s / 3`` seconds
  while its process lives; a job whose lease ran out (its worker died) goes back to pending at the next claim, or fails
  once it has been interrupted ``max_attempts`` times, like the SQLite queue's requeue at start;
- ``add`` sends ``NOTIFY cxr_lens_jobs`` in its transaction; waiting workers ``LISTEN`` on a connection of their
  own and also look every ``poll_s`` seconds (a notification sent while that connection was down is not lost);
- one sender at a time delivers to a destination: ``due`` takes (or renews) a lease on the (channel, destination)
  pair, so two sender processes never break its FIFO order;
- the schema is created and migrated by the first store opened (``cxr_lens_schema`` holds the version), under
  an advisory lock so that processes starting together do not race.

Each store uses one connection, shared by its threads under a lock as the SQLite stores share theirs; a
connection that failed is reopened at the next call, and every database error surfaces as
:class:`~dicom_node.storage.backend.StorageError`.

Job and lease times come from the database's clock (one clock for every machine); outbox times from the caller's,
as its ``now`` arguments do in the SQLite outbox.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import select
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from dicom_node.storage.backend import NodeIdentity, StorageError, StorageNotFound, redacted
from dicom_node.storage.jobs import Job, JobSettling, JobState
from dicom_node.storage.outbox import OutboxItem

logger = logging.getLogger(__name__)

SCHEMA_TABLE = "cxr_lens_schema"
JOBS_CHANNEL = "cxr_lens_jobs"
# pg_advisory_xact_lock key that serialises migrations: "CXRL" in ASCII.
_MIGRATION_LOCK = 0x4358524C
# Database time as epoch seconds: clock_timestamp, not now(), so that a long transaction does not age its leases.
_NOW = "extract(epoch from clock_timestamp())::float8"

# Version n is _MIGRATIONS[n - 1]; append new versions, never edit a released one.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        spool_key text NOT NULL UNIQUE,
        received_at double precision NOT NULL,
        calling_ae text NOT NULL DEFAULT '',
        state text NOT NULL DEFAULT 'pending'
            CHECK (state IN ('pending', 'processing', 'done', 'failed', 'ineligible')),
        rule text,
        reason text,
        attempts integer NOT NULL DEFAULT 0,
        updated_at double precision NOT NULL,
        uid_hash text,
        claimed_by text,
        lease_expires_at double precision
    );
    CREATE INDEX jobs_pending ON jobs (id) WHERE state = 'pending';
    CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'processing';
    CREATE INDEX jobs_state ON jobs (state, updated_at);
    CREATE TABLE outbox (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel text NOT NULL,
        destination text NOT NULL,
        dedup_key text NOT NULL,
        payload bytea NOT NULL,
        state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'parked')),
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at double precision NOT NULL,
        last_error text,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        UNIQUE (channel, destination, dedup_key)
    );
    CREATE INDEX outbox_pending ON outbox (channel, destination, id) WHERE state = 'pending';
    CREATE INDEX outbox_problems ON outbox (updated_at) WHERE state = 'parked' OR last_error IS NOT NULL;
    CREATE TABLE outbox_senders (
        channel text NOT NULL,
        destination text NOT NULL,
        holder text NOT NULL,
        lease_expires_at double precision NOT NULL,
        PRIMARY KEY (channel, destination)
    );
    CREATE TABLE nodes (
        node_id text PRIMARY KEY,
        role text NOT NULL,
        host text NOT NULL,
        pid integer NOT NULL,
        ae_title text NOT NULL,
        started_at double precision NOT NULL,
        seen_at double precision NOT NULL
    );
    """,
    # 2: outputs are stored as they are, not compressed (pglz on every Secondary Capture and Parametric Map costs
    # the server more CPU than it saves on disk for pixel data, and the rows leave the outbox soon).
    """
    ALTER TABLE outbox ALTER COLUMN payload SET STORAGE EXTERNAL;
    """,
    # 3: an output's bytes may live in the shared spool, named by their SHA-256, with only the name here: the
    # database then writes kilobytes per image instead of megabytes (Parametric Maps on the source grid).
    """
    ALTER TABLE outbox ADD COLUMN payload_key text;
    ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;
    ALTER TABLE outbox ADD CONSTRAINT outbox_one_payload CHECK ((payload IS NULL) <> (payload_key IS NULL));
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

_JOB_COLUMNS = "id, spool_key, received_at, calling_ae, state, rule, reason, attempts, updated_at, uid_hash"
_ITEM_COLUMNS = "id, channel, destination, dedup_key, payload, state, attempts, next_attempt_at, last_error"
_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def _job(row: tuple[Any, ...]) -> Job:
    return Job(int(row[0]), row[1], row[2], row[3], JobState(row[4]), *row[5:])


class PayloadFiles:
    """Output payloads as files named by the SHA-256 of their bytes, ``<dir>/ab/<sha256>``, written durably
    (fsync, rename, directory fsync) before their row is committed, as the spool writes instances."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise StorageError(f"malformed outbox payload key {key[:80]!r}")
        return self.dir / key[:2] / key

    def write(self, data: bytes) -> str:
        key = hashlib.sha256(data).hexdigest()
        final = self.path(key)
        if final.exists():
            return key
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=".incoming-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return key

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"outbox payload {key[:12]} is missing from {self.dir}") from None


def _holder_id(identity: NodeIdentity | None) -> str:
    """A name for this store's claims and leases, unique among every process that shares the database."""
    host, pid = (identity.host, identity.pid) if identity else (os.uname().nodename, os.getpid())
    return f"{host}:{pid}:{uuid.uuid4().hex[:8]}"


def _hung_up(conn: psycopg.Connection[Any]) -> bool:
    """True when an idle connection has something to read: nothing is due on it but the server's goodbye."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


class _Database:
    """One connection for a store's threads, opened on first use and reopened after a failure."""

    def __init__(self, url: str, *, connect_timeout_s: int = 5) -> None:
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None
        self._pid = os.getpid()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._pid != os.getpid():
            # A forked child must not talk over its parent's socket: open its own, leave the parent's alone.
            self._conn, self._pid = None, os.getpid()
        if self._conn is not None and not self._conn.closed and _hung_up(self._conn):
            self._conn.close()  # the server went away while we were idle (restart, failover): connect again
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self._connect_timeout_s,
                                         application_name="cxr-lens")
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Cursor[Any]]:
        """A cursor in one transaction: committed when the block ends, rolled back if it raises."""
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.Error as exc:
                if self._conn is not None and (self._conn.broken or isinstance(exc, psycopg.OperationalError)):
                    self._conn.close()
                    self._conn = None
                raise StorageError(f"PostgreSQL {redacted(self.url)}: {type(exc).__name__}: {exc}") from exc

    def open(self, create: bool) -> None:
        """Connect and bring the schema up to date (see :func:`migrate`); closed again if that fails."""
        try:
            migrate(self, create=create)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def migrate(db: _Database, *, create: bool = True) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; returns the version found before.

    ``create=False`` only checks: :class:`StorageNotFound` when the database has no schema of ours yet.
    """
    with db.transaction() as cur:
        if not create:
            cur.execute("SELECT to_regclass(%s) IS NOT NULL", (SCHEMA_TABLE,))
            row = cur.fetchone()
            if not row or not row[0]:
                raise StorageNotFound(f"PostgreSQL {redacted(db.url)}: no CXR Lens schema")
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        cur.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} "
                    "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        cur.execute(f"SELECT coalesce(max(version), 0) FROM {SCHEMA_TABLE}")
        row = cur.fetchone()
        found = int(row[0]) if row else 0
        if found > SCHEMA_VERSION:
            raise StorageError(f"PostgreSQL {redacted(db.url)}: schema version {found} is newer than this node's "
                               f"({SCHEMA_VERSION}); upgrade the node")
        if not create:
            if found < SCHEMA_VERSION:
                raise StorageError(f"PostgreSQL {redacted(db.url)}: schema version {found}, this node needs "
                                   f"{SCHEMA_VERSION}; start a node to migrate it")
            return found
        for version in range(found + 1, SCHEMA_VERSION + 1):
            cur.execute(_MIGRATIONS[version - 1])
            cur.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (%s)", (version,))
            logger.info("PostgreSQL schema migrated to version %d", version)
    return found


class _Listener:
    """``LISTEN`` on a connection of its own, in a thread; counts notifications and wakes waiters."""

    def __init__(self, url: str, channel: str, signal: threading.Condition, on_notify: Any) -> None:
        self._url = url
        self._channel = channel
        self._signal = signal
        self._on_notify = on_notify
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listening = False

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"cxr-lens-listen-{self._channel}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._url, autocommit=True, connect_timeout=5,
                                     application_name="cxr-lens-listen") as conn:
                    conn.execute(f"LISTEN {self._channel}")
                    self.listening, failures = True, 0
                    self._on_notify()  # anything sent while we were not listening is looked for now
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=0.25):
                            self._on_notify()
            except psycopg.Error as exc:
                self.listening = False
                failures += 1
                if failures == 1:
                    logger.warning("LISTEN %s lost (%s); polling until it is back", self._channel,
                                   type(exc).__name__)
                self._stop.wait(min(5.0, 0.5 * failures))
        self.listening = False


class PostgresJobQueue(JobSettling):
    """The job queue in PostgreSQL: the same methods and states as :class:`~dicom_node.storage.jobs.JobQueue`."""

    def __init__(
        self,
        url: str,
        *,
        lease_s: float = 60.0,
        max_attempts: int = 3,
        poll_s: float = 1.0,
        create: bool = True,
        identity: NodeIdentity | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.url = url
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.holder = _holder_id(identity)
        self._identity = identity
        self._poll_s = poll_s
        self._db = _Database(url)
        self._db.open(create)
        self._work = threading.Condition()
        self._generation = 0  # notifications and wake() calls seen; a waiter returns when it changes
        self._listener = _Listener(url, JOBS_CHANNEL, self._work, self._notified)
        self._closed = threading.Event()
        self._renewer: threading.Thread | None = None
        self._renew_lock = threading.Lock()
        self._in_hand: set[int] = set()
        self._in_hand_lock = threading.Lock()
        self._started_at = time.time()
        if identity is not None:
            self._start_renewer()

    # Life cycle
    def close(self) -> None:
        """Stop listening and renewing; the jobs still claimed here go back to the queue at once."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.wake()
        self._listener.stop()
        if self._renewer is not None:
            self._renewer.join(5.0)
        try:
            released = self._release_claims()
            if released:
                logger.info("%d claimed job(s) returned to the queue at close", released)
        except StorageError as exc:
            logger.warning("claims not released at close (%s); they return when their lease runs out",
                           type(exc.__cause__).__name__)
        self._db.close()

    def _start_renewer(self) -> None:
        with self._renew_lock:
            if self._renewer is None and not self._closed.is_set():
                self._renewer = threading.Thread(target=self._renew_forever, name="cxr-lens-lease", daemon=True)
                self._renewer.start()

    def _renew_forever(self) -> None:
        while not self._closed.is_set():
            try:
                self.renew()
            except StorageError as exc:
                logger.warning("lease renewal failed (%s); retrying", type(exc.__cause__).__name__)
            self._closed.wait(self.lease_s / 3)

    def renew(self) -> int:
        """Extend the leases of the jobs in hand (and say this process is alive); returns how many.

        Only jobs claimed here and not settled yet: one whose outcome could not be stored (the database was
        down) is let go, and its lease runs out so that a worker takes it again.
        """
        with self._in_hand_lock:
            in_hand = sorted(self._in_hand)
        with self._db.transaction() as cur:
            cur.execute(
                f"UPDATE jobs SET lease_expires_at = {_NOW} + %s"
                " WHERE id = ANY(%s) AND claimed_by = %s AND state = 'processing'",
                (self.lease_s, in_hand, self.holder),
            )
            renewed = cur.rowcount
            if self._identity is not None:
                ident = self._identity
                cur.execute(
                    f"INSERT INTO nodes (node_id, role, host, pid, ae_title, started_at, seen_at)"
                    f" VALUES (%s, %s, %s, %s, %s, %s, {_NOW})"
                    f" ON CONFLICT (node_id) DO UPDATE SET seen_at = excluded.seen_at",
                    (self.holder, ident.role, ident.host, ident.pid, ident.ae_title, self._started_at),
                )
        return renewed

    def _release_claims(self) -> int:
        with self._in_hand_lock:
            self._in_hand.clear()
        with self._db.transaction() as cur:
            cur.execute(
                f"UPDATE jobs SET state = 'pending', claimed_by = NULL, lease_expires_at = NULL, updated_at = {_NOW}"
                " WHERE claimed_by = %s AND state = 'processing'",
                (self.holder,),
            )
            return cur.rowcount

    # Receiving
    def add(self, spool_key: str, *, calling_ae: str = "", uid_hash: str | None = None) -> tuple[int, bool]:
        """Record a received instance; returns ``(job_id, is_new)`` (see ``JobQueue.add``)."""
        with self._db.transaction() as cur:
            cur.execute(
                f"INSERT INTO jobs (spool_key, received_at, calling_ae, updated_at, uid_hash)"
                f" VALUES (%s, {_NOW}, %s, {_NOW}, %s) ON CONFLICT (spool_key) DO NOTHING RETURNING id",
                (spool_key, calling_ae, uid_hash),
            )
            row = cur.fetchone()
            if row is not None:
                cur.execute(f"NOTIFY {JOBS_CHANNEL}")
                return int(row[0]), True
            cur.execute("SELECT id, state FROM jobs WHERE spool_key = %s FOR UPDATE", (spool_key,))
            found = cur.fetchone()
            if found is None:  # cannot happen: the conflict was on this key and rows are never deleted
                raise StorageError(f"job for spool {spool_key[:12]} vanished")
            job_id, state = int(found[0]), found[1]
            if state == JobState.FAILED:
                cur.execute(
                    f"UPDATE jobs SET state = 'pending', rule = NULL, reason = NULL, updated_at = {_NOW}"
                    " WHERE id = %s",
                    (job_id,),
                )
                cur.execute(f"NOTIFY {JOBS_CHANNEL}")
                return job_id, True
            return job_id, False

    def pending_count(self) -> int:
        with self._db.transaction() as cur:
            cur.execute("SELECT count(*) FROM jobs WHERE state = 'pending'")
            row = cur.fetchone()
        return int(row[0]) if row else 0

    # Waiting
    def _notified(self) -> None:
        with self._work:
            self._generation += 1
            self._work.notify_all()

    def wake(self) -> None:
        self._notified()

    def _has_work(self) -> bool:
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE state = 'pending') OR EXISTS (SELECT 1 FROM jobs"
                f" WHERE state = 'processing' AND lease_expires_at < {_NOW})"
            )
            row = cur.fetchone()
        return bool(row and row[0])

    def wait_for_work(self, timeout: float) -> bool:
        """Block until a job may be claimable (pending, or a lease ran out) or ``timeout`` passes.

        A database that cannot be reached counts as no work: the caller comes back after ``timeout``.
        """
        self._listener.start()
        with self._work:
            seen = self._generation
        try:
            if self._has_work():
                return True
        except StorageError:
            self._closed.wait(max(0.0, timeout))
            return False
        with self._work:
            # Without a listening connection, notifications may be lost: look again after poll_s at most.
            wait = timeout if self._listener.listening else min(timeout, self._poll_s)
            self._work.wait_for(lambda: self._generation != seen, max(0.0, wait))
        if self._closed.is_set():
            return False
        try:
            return self._has_work()
        except StorageError:
            return False

    # Claiming
    def claim_batch(self, max_n: int, *, count_attempt: bool = True) -> list[Job]:
        """Claim up to ``max_n`` oldest pending jobs for this queue (``FOR UPDATE SKIP LOCKED``), with a lease.

        While the database cannot be reached nothing can be claimed: an empty batch (logged), so that the
        worker's loop goes on and claims again once the database is back.
        """
        self._start_renewer()
        try:
            return self._claim(max_n, count_attempt)
        except StorageError as exc:
            logger.warning("no jobs claimed: %s", type(exc.__cause__).__name__)
            return []

    def _claim(self, max_n: int, count_attempt: bool) -> list[Job]:
        with self._db.transaction() as cur:
            recovered = self._recover_expired(cur)
            cur.execute(
                f"UPDATE jobs SET state = 'processing', attempts = attempts + %s, claimed_by = %s,"
                f" lease_expires_at = {_NOW} + %s, updated_at = {_NOW}"
                " WHERE id IN (SELECT id FROM jobs WHERE state = 'pending' ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_JOB_COLUMNS}",
                (1 if count_attempt else 0, self.holder, self.lease_s, max_n),
            )
            rows = cur.fetchall()
        if recovered:
            logger.info("%d job(s) whose worker was lost returned to the queue (lease ran out)", recovered)
        jobs = sorted((_job(r) for r in rows), key=lambda j: j.id)
        with self._in_hand_lock:
            self._in_hand.update(j.id for j in jobs)
        return jobs

    def _recover_expired(self, cur: psycopg.Cursor[Any]) -> int:
        """Jobs whose lease ran out: back to pending, or failed after ``max_attempts`` interruptions."""
        cur.execute(
            "UPDATE jobs SET state = CASE WHEN attempts >= %(max)s THEN 'failed' ELSE 'pending' END,"
            " reason = CASE WHEN attempts >= %(max)s THEN %(why)s ELSE reason END,"
            f" claimed_by = NULL, lease_expires_at = NULL, updated_at = {_NOW}"
            " WHERE id IN (SELECT id FROM jobs WHERE state = 'processing'"
            f" AND lease_expires_at < {_NOW} FOR UPDATE SKIP LOCKED)",
            {"max": self.max_attempts, "why": f"interrupted {self.max_attempts} times (worker lost while processing?)"},
        )
        return cur.rowcount

    def begin_attempt(self, job_id: int) -> None:
        with self._db.transaction() as cur:
            cur.execute("UPDATE jobs SET attempts = attempts + 1 WHERE id = %s", (job_id,))

    def _set(self, job_id: int, state: JobState, rule: str | None, reason: str | None) -> None:
        with self._in_hand_lock:
            self._in_hand.discard(job_id)  # settled, or given up on if this write fails
        with self._db.transaction() as cur:
            cur.execute(
                f"UPDATE jobs SET state = %s, rule = %s, reason = %s, updated_at = {_NOW}, claimed_by = NULL,"
                " lease_expires_at = NULL WHERE id = %s",
                (state.value, rule, reason, job_id),
            )

    def requeue_processing(self, max_attempts: int = 3) -> int:
        """At start: jobs whose lease ran out go back to pending (or fail after ``max_attempts``); returns how many.

        Unlike the SQLite queue, jobs that other live workers hold keep their claims.
        """
        self.max_attempts = max_attempts
        with self._db.transaction() as cur:
            return self._recover_expired(cur)

    # Reading
    def get(self, job_id: int) -> Job | None:
        with self._db.transaction() as cur:
            cur.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
            row = cur.fetchone()
        return _job(row) if row else None

    def counts(self) -> dict[str, int]:
        with self._db.transaction() as cur:
            cur.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            rows = cur.fetchall()
        out = {s.value: 0 for s in JobState}
        out.update({s: int(n) for s, n in rows})
        return out

    def recent_failures(self, n: int = 10) -> list[Job]:
        with self._db.transaction() as cur:
            cur.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = 'failed' ORDER BY updated_at DESC, id DESC LIMIT %s",
                (n,),
            )
            rows = cur.fetchall()
        return [_job(r) for r in rows]


class PostgresOutbox:
    """The outbox in PostgreSQL: the same methods as :class:`~dicom_node.storage.outbox.Outbox`.

    :meth:`due` hands a destination's head only to the sender that holds the destination's lease. With
    ``payload_dir`` (a folder of the shared spool) the payloads are files there and the rows hold their names;
    without it, the rows hold the bytes.
    """

    def __init__(self, url: str, *, lease_s: float = 60.0, create: bool = True,
                 payload_dir: Path | None = None) -> None:
        self.url = url
        self.lease_s = lease_s
        self.holder = _holder_id(None)
        self.files = PayloadFiles(payload_dir) if payload_dir is not None else None
        self._db = _Database(url)
        self._db.open(create)
        self._closed = False
        # The payload of each destination's last head, by its file name or (id, updated_at): see head().
        self._heads: dict[tuple[str, str], tuple[str | tuple[int, float], bytes]] = {}

    def close(self) -> None:
        """Hand the destinations this sender holds back at once (another sender need not wait for the lease)."""
        if self._closed:
            return
        self._closed = True
        try:
            with self._db.transaction() as cur:
                cur.execute("DELETE FROM outbox_senders WHERE holder = %s", (self.holder,))
        except StorageError as exc:
            logger.warning("sender leases not released at close (%s)", type(exc.__cause__).__name__)
        self._db.close()

    def enqueue(
        self, channel: str, destination: str, dedup_key: str, payload: bytes, *, resend: bool = False,
        source_received_at: float | None = None,
    ) -> int:
        """Store an item durably and return its id (see ``Outbox.enqueue``)."""
        now = time.time()
        try:
            stored: tuple[bytes | None, str | None] = (
                (None, self.files.write(payload)) if self.files is not None else (payload, None))
        except OSError as exc:
            raise StorageError(f"outbox payload not written ({type(exc).__name__})") from exc
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO outbox (channel, destination, dedup_key, payload, payload_key, next_attempt_at,"
                " created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (channel, destination, dedup_key) DO NOTHING RETURNING id",
                (channel, destination, dedup_key, *stored, now, now, now),
            )
            row = cur.fetchone()
            if row is not None:
                return int(row[0])
            cur.execute(
                "SELECT id, state, created_at FROM outbox"
                " WHERE channel = %s AND destination = %s AND dedup_key = %s FOR UPDATE",
                (channel, destination, dedup_key),
            )
            found = cur.fetchone()
            if found is None:
                raise StorageError(f"outbox item {channel}/{destination} vanished")
            item_id, state, enqueued_at = int(found[0]), found[1], float(found[2])
            if resend and state != "pending" and (source_received_at is None or enqueued_at < source_received_at):
                cur.execute(
                    "UPDATE outbox SET payload = %s, payload_key = %s, state = 'pending', attempts = 0,"
                    " next_attempt_at = %s, last_error = NULL, created_at = %s, updated_at = %s WHERE id = %s",
                    (*stored, now, now, now, item_id),
                )
            return item_id

    def destinations(self, channel: str) -> list[str]:
        with self._db.transaction() as cur:
            cur.execute("SELECT DISTINCT destination FROM outbox WHERE channel = %s AND state = 'pending'", (channel,))
            return [r[0] for r in cur.fetchall()]

    def head(self, channel: str, destination: str) -> OutboxItem | None:
        """The oldest pending item of a destination. Senders ask several times a second while items wait, so the
        payload (megabytes for a Parametric Map) is read once per version of the head, not each time.
        """
        slot = (channel, destination)
        cached = self._heads.get(slot)
        cached_id, cached_at = cached[0] if cached is not None and isinstance(cached[0], tuple) else (-1, -1.0)
        with self._db.transaction() as cur:
            cur.execute(
                "SELECT id, channel, destination, dedup_key,"
                " CASE WHEN id = %s AND updated_at = %s THEN NULL ELSE payload END,"
                " state, attempts, next_attempt_at, last_error, updated_at, payload_key FROM outbox"
                " WHERE channel = %s AND destination = %s AND state = 'pending' ORDER BY id LIMIT 1",
                (cached_id, cached_at, channel, destination),
            )
            row = cur.fetchone()
        if row is None:
            return None
        version: str | tuple[int, float] = row[10] if row[10] is not None else (int(row[0]), float(row[9]))
        if cached is not None and cached[0] == version:
            payload = cached[1]
        else:
            payload = self._payload(row[4], row[10])
            self._heads[slot] = (version, payload)
        return OutboxItem(int(row[0]), row[1], row[2], row[3], payload, *row[5:9])

    def _payload(self, in_row: bytes | None, key: str | None) -> bytes:
        if key is None:
            if in_row is None:
                raise StorageError("outbox row without a payload")
            return bytes(in_row)
        if self.files is None:
            raise StorageError(f"outbox payload {key[:12]} is a file, and this outbox has no payload_dir")
        return self.files.read(key)

    def _item(self, row: tuple[Any, ...]) -> OutboxItem:
        """An item from ``_ITEM_COLUMNS, payload_key``."""
        return OutboxItem(int(row[0]), row[1], row[2], row[3], self._payload(row[4], row[9]), *row[5:9])

    def due(self, channel: str, destination: str, now: float | None = None) -> OutboxItem | None:
        """The head if it is due and this outbox holds (or now takes) the destination's sender lease."""
        item = self.head(channel, destination)
        if item is None or item.next_attempt_at > (time.time() if now is None else now):
            return None
        return item if self._hold(channel, destination) else None

    def _hold(self, channel: str, destination: str) -> bool:
        with self._db.transaction() as cur:
            cur.execute(
                "INSERT INTO outbox_senders AS s (channel, destination, holder, lease_expires_at)"
                f" VALUES (%s, %s, %s, {_NOW} + %s) ON CONFLICT (channel, destination) DO UPDATE"
                " SET holder = excluded.holder, lease_expires_at = excluded.lease_expires_at"
                f" WHERE s.holder = excluded.holder OR s.lease_expires_at < {_NOW} RETURNING holder",
                (channel, destination, self.holder, self.lease_s),
            )
            return cur.fetchone() is not None

    def mark_done(self, item_id: int) -> None:
        self._set(item_id, "state = 'done', attempts = attempts + 1, last_error = NULL", ())

    def mark_retry(self, item_id: int, error: str, next_attempt_at: float) -> None:
        self._set(item_id, "attempts = attempts + 1, last_error = %s, next_attempt_at = %s", (error, next_attempt_at))

    def park(self, item_id: int, error: str) -> None:
        self._set(item_id, "state = 'parked', attempts = attempts + 1, last_error = %s", (error,))

    def _set(self, item_id: int, assignments: str, params: tuple[Any, ...]) -> None:
        with self._db.transaction() as cur:
            cur.execute(
                f"UPDATE outbox SET {assignments}, updated_at = %s WHERE id = %s",  # assignments: literals above
                (*params, time.time(), item_id),
            )

    def get(self, item_id: int) -> OutboxItem | None:
        with self._db.transaction() as cur:
            cur.execute(f"SELECT {_ITEM_COLUMNS}, payload_key FROM outbox WHERE id = %s", (item_id,))
            row = cur.fetchone()
        return self._item(row) if row else None

    def counts(self) -> dict[tuple[str, str], int]:
        with self._db.transaction() as cur:
            cur.execute("SELECT channel, state, count(*) FROM outbox GROUP BY channel, state")
            return {(c, s): int(n) for c, s, n in cur.fetchall()}

    def problems(self, limit: int = 20) -> list[OutboxItem]:
        with self._db.transaction() as cur:
            cur.execute(
                f"SELECT {_ITEM_COLUMNS}, payload_key FROM outbox WHERE state = 'parked' OR (state = 'pending'"
                " AND last_error IS NOT NULL) ORDER BY updated_at DESC LIMIT %s",
                (limit,),
            )
            rows = cur.fetchall()
        return [self._item(r) for r in rows]


@dataclass(frozen=True)
class NodeRecord:
    """A process seen by the database: its role, where it runs, when it started and when it was last seen."""

    node_id: str
    role: str
    host: str
    pid: int
    ae_title: str
    started_at: float
    seen_at: float


def nodes_seen(url: str, within_s: float = 600.0) -> list[NodeRecord]:
    """The processes that said they were alive in the last ``within_s`` seconds, by role then host."""
    db = _Database(url)
    db.open(create=False)
    try:
        with db.transaction() as cur:
            cur.execute(
                "SELECT node_id, role, host, pid, ae_title, started_at, seen_at FROM nodes"
                f" WHERE seen_at > {_NOW} - %s ORDER BY role, host, pid",
                (within_s,),
            )
            return [NodeRecord(r[0], r[1], r[2], int(r[3]), r[4], r[5], r[6]) for r in cur.fetchall()]
    finally:
        db.close()
