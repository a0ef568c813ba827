"""The job queue (SQLite, WAL): one row per received instance, claimed in batches by the worker.

A job is committed in the same C-STORE handler that spooled its bytes, before Success is answered; a job that
was being processed when the node stopped is requeued at the next start.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.storage.sqlite import connect, write_transaction

JOBS_DB = "jobs.sqlite"


def jobs_path(spool_dir: Path | str) -> Path:
    """Where the job queue of a node with this spool directory lives."""
    return Path(spool_dir) / JOBS_DB


class JobState(enum.StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    INELIGIBLE = "ineligible"


@dataclass(frozen=True)
class Job:
    id: int
    spool_key: str
    received_at: float
    calling_ae: str
    state: JobState
    rule: str | None
    reason: str | None
    attempts: int
    updated_at: float
    uid_hash: str | None = None


_JOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spool_key TEXT NOT NULL UNIQUE,
    received_at REAL NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'processing', 'done', 'failed', 'ineligible')),
    rule TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    uid_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
"""
_JOB_COLUMNS = "id, spool_key, received_at, calling_ae, state, rule, reason, attempts, updated_at, uid_hash"


def _job(row: tuple) -> Job:
    return Job(row[0], row[1], row[2], row[3], JobState(row[4]), *row[5:])


class JobSettling:
    """A job's final states, written the same way by both job stores: each store supplies ``_set``."""

    def _set(self, job_id: int, state: JobState, rule: str | None, reason: str | None) -> None:
        raise NotImplementedError

    def complete(self, job_id: int) -> None:
        self._set(job_id, JobState.DONE, None, None)

    def fail(self, job_id: int, reason: str) -> None:
        self._set(job_id, JobState.FAILED, None, reason)

    def mark_ineligible(self, job_id: int, rule: str | None, reason: str) -> None:
        self._set(job_id, JobState.INELIGIBLE, rule, reason)


class JobQueue(JobSettling):
    """Thread-safe job queue in one SQLite file (WAL). One row per distinct received content."""

    def __init__(self, db_path: Path | str) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._db = connect(self.db_path, _JOB_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, spool_key: str, *, calling_ae: str = "", uid_hash: str | None = None) -> tuple[int, bool]:
        """Record a received instance; returns ``(job_id, is_new)``.

        The same content received again is not queued again. A job that *failed* is put back to pending:
        the peer re-sending it is the operator's way to retry.
        """
        now = time.time()
        with self._work, write_transaction(self._db):
            row = self._db.execute("SELECT id, state FROM jobs WHERE spool_key=?", (spool_key,)).fetchone()
            if row is None:
                cur = self._db.execute(
                    "INSERT INTO jobs (spool_key, received_at, calling_ae, updated_at, uid_hash)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (spool_key, now, calling_ae, now, uid_hash),
                )
                self._work.notify_all()
                return int(cur.lastrowid or 0), True  # always set by an INSERT
            job_id, state = row
            if state == JobState.FAILED:
                self._db.execute(
                    "UPDATE jobs SET state='pending', rule=NULL, reason=NULL, updated_at=? WHERE id=?", (now, job_id)
                )
                self._work.notify_all()
                return int(job_id), True
            return int(job_id), False

    def wait_for_work(self, timeout: float) -> bool:
        """Block until a job may be pending (or ``timeout`` seconds pass); True when there is one."""
        with self._work:
            if self._has_pending():
                return True
            self._work.wait(timeout)
            return self._has_pending()

    def wake(self) -> None:
        """Wake threads blocked in :meth:`wait_for_work` (used on shutdown)."""
        with self._work:
            self._work.notify_all()

    def _has_pending(self) -> bool:
        return self._db.execute("SELECT 1 FROM jobs WHERE state='pending' LIMIT 1").fetchone() is not None

    def pending_count(self) -> int:
        """How many jobs wait for the worker (the C-STORE handler's bound on the queue)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE state='pending'").fetchone()[0])

    def claim_batch(self, max_n: int, *, count_attempt: bool = True) -> list[Job]:
        """Move up to ``max_n`` oldest pending jobs to processing and return them.

        ``count_attempt=False``: the caller counts each job's attempt itself when work on it really starts
        (:meth:`begin_attempt`), as the pipelined worker does for jobs it claims ahead of the model.
        """
        now = time.time()
        with self._lock, write_transaction(self._db):
            ids = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM jobs WHERE state='pending' ORDER BY id LIMIT ?", (max_n,)
                ).fetchall()
            ]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            increment = 1 if count_attempt else 0
            self._db.execute(
                f"UPDATE jobs SET state='processing', attempts=attempts+?, updated_at=? WHERE id IN ({marks})",
                (increment, now, *ids),
            )
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id IN ({marks}) ORDER BY id", ids
            ).fetchall()
        return [_job(r) for r in rows]

    def begin_attempt(self, job_id: int) -> None:
        """Count one attempt at a claimed job (see ``claim_batch(count_attempt=False)``)."""
        with self._lock:  # one statement: atomic on its own (autocommit)
            self._db.execute("UPDATE jobs SET attempts=attempts+1 WHERE id=?", (job_id,))

    def _set(self, job_id: int, state: JobState, rule: str | None, reason: str | None) -> None:
        with self._lock:  # one statement: atomic on its own (autocommit)
            self._db.execute(
                "UPDATE jobs SET state=?, rule=?, reason=?, updated_at=? WHERE id=?",
                (state.value, rule, reason, time.time(), job_id),
            )

    def requeue_processing(self, max_attempts: int = 3) -> int:
        """On start: jobs left in processing by a crash go back to pending; returns how many.

        A job already claimed ``max_attempts`` times is failed instead, so an instance that crashes the
        process cannot crash it forever.
        """
        now = time.time()
        with self._work, write_transaction(self._db):
            self._db.execute(
                "UPDATE jobs SET state='failed', reason=?, updated_at=? WHERE state='processing' AND attempts>=?",
                (f"interrupted {max_attempts} times (crash while processing?)", now, max_attempts),
            )
            cur = self._db.execute(
                "UPDATE jobs SET state='pending', updated_at=? WHERE state='processing'", (now,)
            )
            self._work.notify_all()
            return cur.rowcount

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zero included)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = {s.value: 0 for s in JobState}
        out.update({s: n for s, n in rows})
        return out

    def recent_failures(self, n: int = 10) -> list[Job]:
        """The ``n`` most recently failed jobs, newest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state='failed' ORDER BY updated_at DESC, id DESC LIMIT ?",
                (n,),
            ).fetchall()
        return [_job(r) for r in rows]
