"""A durable outbox (SQLite, WAL): every output is stored before it is sent and kept until a peer accepts it.

One table serves both channels (``dicom`` Secondary Captures, ``hl7`` ORU messages). Items leave a destination
in FIFO order: the oldest pending item of a destination blocks the ones behind it until it is delivered or
parked, which is what HL7 receivers with a pool size of one (IRIS) expect.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.storage.sqlite import connect, write_transaction

OUTBOX_DB = "outbox.sqlite"


def outbox_path(spool_dir: Path | str) -> Path:
    """Where the outbox (SC and ORU deliveries) of a node with this spool directory lives."""
    return Path(spool_dir) / OUTBOX_DB

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    destination TEXT NOT NULL,
    dedup_key TEXT NOT NULL,
    payload BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'done', 'parked')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    UNIQUE (channel, destination, dedup_key)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (channel, destination, state, id);
"""


@dataclass(frozen=True)
class OutboxItem:
    id: int
    channel: str
    destination: str
    dedup_key: str
    payload: bytes
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None


class Outbox:
    """Thread-safe durable outbox in one SQLite file."""

    def __init__(self, db_path: Path | str) -> None:
        self.db_path = Path(db_path)
        self._lock = threading.Lock()
        self._db = connect(self.db_path, _SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def enqueue(
        self, channel: str, destination: str, dedup_key: str, payload: bytes, *, resend: bool = False,
        source_received_at: float | None = None,
    ) -> int:
        """Store an item durably and return its id.

        An item with the same (channel, destination, dedup_key) is not stored twice. With ``resend`` a delivered
        or parked twin is put back to pending with the new payload (a re-sent study replaces its output), unless
        it was enqueued at or after ``source_received_at`` (when the instance behind the new payload arrived):
        then it came from that same instance, by an attempt interrupted after storing its outputs or by a worker
        whose lease ran out as it finished, and sending it again would deliver the same object twice.
        ``created_at`` is when the item's current payload was enqueued.
        """
        now = time.time()
        with self._lock, write_transaction(self._db):
            row = self._db.execute(
                "SELECT id, state, created_at FROM outbox WHERE channel=? AND destination=? AND dedup_key=?",
                (channel, destination, dedup_key),
            ).fetchone()
            if row is None:
                cur = self._db.execute(
                    "INSERT INTO outbox (channel, destination, dedup_key, payload, next_attempt_at, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (channel, destination, dedup_key, payload, now, now, now),
                )
                return int(cur.lastrowid or 0)  # always set by an INSERT
            item_id, state, enqueued_at = row
            if resend and state != "pending" and (source_received_at is None or enqueued_at < source_received_at):
                self._db.execute(
                    "UPDATE outbox SET payload=?, state='pending', attempts=0, next_attempt_at=?, last_error=NULL,"
                    " created_at=?, updated_at=? WHERE id=?",
                    (payload, now, now, now, item_id),
                )
            return int(item_id)

    def destinations(self, channel: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT destination FROM outbox WHERE channel=? AND state='pending'", (channel,)
            ).fetchall()
        return [r[0] for r in rows]

    def head(self, channel: str, destination: str) -> OutboxItem | None:
        """The oldest pending item of a destination (due or not)."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, channel, destination, dedup_key, payload, state, attempts, next_attempt_at, last_error"
                " FROM outbox WHERE channel=? AND destination=? AND state='pending' ORDER BY id LIMIT 1",
                (channel, destination),
            ).fetchone()
        return OutboxItem(*row) if row else None

    def due(self, channel: str, destination: str, now: float | None = None) -> OutboxItem | None:
        """The head of a destination's queue if its next attempt is due, else None (FIFO: nothing overtakes it)."""
        item = self.head(channel, destination)
        if item is None or item.next_attempt_at > (time.time() if now is None else now):
            return None
        return item

    def mark_done(self, item_id: int) -> None:
        self._set(item_id, "state='done', attempts=attempts+1, last_error=NULL", ())

    def mark_retry(self, item_id: int, error: str, next_attempt_at: float) -> None:
        self._set(item_id, "attempts=attempts+1, last_error=?, next_attempt_at=?", (error, next_attempt_at))

    def park(self, item_id: int, error: str) -> None:
        self._set(item_id, "state='parked', attempts=attempts+1, last_error=?", (error,))

    def get(self, item_id: int) -> OutboxItem | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, channel, destination, dedup_key, payload, state, attempts, next_attempt_at, last_error"
                " FROM outbox WHERE id=?",
                (item_id,),
            ).fetchone()
        return OutboxItem(*row) if row else None

    def counts(self) -> dict[tuple[str, str], int]:
        """Number of items per (channel, state)."""
        with self._lock:
            rows = self._db.execute("SELECT channel, state, COUNT(*) FROM outbox GROUP BY channel, state").fetchall()
        return {(c, s): n for c, s, n in rows}

    def problems(self, limit: int = 20) -> list[OutboxItem]:
        """Parked items and pending items that have failed at least once, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, channel, destination, dedup_key, payload, state, attempts, next_attempt_at, last_error"
                " FROM outbox WHERE state='parked' OR (state='pending' AND last_error IS NOT NULL)"
                " ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [OutboxItem(*r) for r in rows]

    def _set(self, item_id: int, assignments: str, params: tuple) -> None:
        with self._lock:  # one statement: atomic on its own (autocommit)
            self._db.execute(
                f"UPDATE outbox SET {assignments}, updated_at=? WHERE id=?",  # assignments are literals above
                (*params, time.time(), item_id),
            )


def backoff_delay(attempts: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: initial, 2x initial, 4x initial ... capped at ``max_s``."""
    return min(max_s, initial_s * (2 ** max(0, attempts)))
