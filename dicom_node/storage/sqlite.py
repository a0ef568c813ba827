"""What the SQLite job queue and outbox share: how a file is opened, and a write that reads first.

Several processes open the same files (the node's SCP adds jobs, the model process claims them, each stage
process enqueues outputs), so a change that reads rows and then writes on what it read must hold SQLite's write
lock from its first read: ``BEGIN IMMEDIATE``. A plain ``with connection:`` opens no transaction at all on a
connection in autocommit mode (``isolation_level=None``), and the in-process lock does not reach other processes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def connect(db_path: Path, schema: str) -> sqlite3.Connection:
    """The database at ``db_path`` (created with ``schema`` if new) in WAL mode, each commit on disk (FULL)."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One transaction that holds the write lock from its first statement: committed on exit, rolled back on an
    exception. Another process's writer waits for it (up to the connection's busy timeout), so nothing it read
    changes under it."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:  # also when COMMIT itself failed (a disk error): the next BEGIN must not find it open
            db.execute("ROLLBACK")
        raise
