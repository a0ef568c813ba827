"""``cxr-lens status``: what the node holds, read from its store while it runs (SQLite in WAL mode, or PostgreSQL).

Only identifiers of our own making appear (job ids, spool key prefixes, outbox ids, destinations, AE titles)
and the reasons the node recorded, never patient data.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dicom_node.settings import StorageSettings
from dicom_node.storage.backend import (
    StorageNotFound,
    is_postgres,
    open_job_store,
    open_outbox_store,
    redacted,
)
from dicom_node.storage.jobs import JobState

_CHANNELS = ("dicom", "hl7")
_OUTBOX_STATES = ("pending", "done", "parked")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")


def collect_status(
    spool_dir: Path | str,
    *,
    storage: StorageSettings | None = None,
    problems: int = 20,
    failures: int = 10,
    seen_within_s: float = 600.0,
) -> dict[str, Any]:
    """Queue depths by state, outbox counts, parked/retrying items with their last error, recent failures."""
    # With PostgreSQL (``storage``), also the processes seen in the last ``seen_within_s`` seconds; a database
    # that cannot be reached raises StorageError.
    spool_dir = Path(spool_dir)
    storage = storage or StorageSettings()
    shared = is_postgres(storage.url)
    status: dict[str, Any] = {
        "spool_dir": str(spool_dir),
        "storage": redacted(storage.url) if shared else "sqlite",
        "nodes": None,
        "jobs": {s.value: 0 for s in JobState},
        "outbox": {c: {s: 0 for s in _OUTBOX_STATES} for c in _CHANNELS},
        "problems": [],
        "recent_failures": [],
    }
    # Create no store where there is none (a mistyped path or database should read as empty).
    try:
        queue = open_job_store(storage, spool_dir, create=False)
    except StorageNotFound:
        pass
    else:
        try:
            status["jobs"] = queue.counts()
            status["recent_failures"] = [
                {
                    "job_id": j.id,
                    "spool": j.spool_key[:12],
                    "calling_ae": j.calling_ae,
                    "attempts": j.attempts,
                    "reason": j.reason or "",
                    "at": _iso(j.updated_at),
                }
                for j in queue.recent_failures(failures)
            ]
        finally:
            queue.close()
    try:
        outbox = open_outbox_store(storage, spool_dir, create=False)
    except StorageNotFound:
        pass
    else:
        try:
            for (channel, state), n in outbox.counts().items():
                status["outbox"].setdefault(channel, {s: 0 for s in _OUTBOX_STATES})[state] = n
            now = time.time()
            status["problems"] = [
                {
                    "id": item.id,
                    "channel": item.channel,
                    "destination": item.destination,
                    "state": item.state,
                    "attempts": item.attempts,
                    "last_error": item.last_error or "",
                    "next_attempt_in_s": round(max(0.0, item.next_attempt_at - now), 1)
                    if item.state == "pending" else None,
                }
                for item in outbox.problems(problems)
            ]
        finally:
            outbox.close()
    if shared:
        from dicom_node.storage.postgres import nodes_seen

        try:
            seen = nodes_seen(storage.url, seen_within_s)
        except StorageNotFound:
            seen = []
        now = time.time()
        status["nodes"] = [
            {"role": n.role, "host": n.host, "pid": n.pid, "ae_title": n.ae_title, "started": _iso(n.started_at),
             "seen_s_ago": round(max(0.0, now - n.seen_at), 1)}
            for n in seen
        ]
    return status


def format_status(d: dict[str, Any]) -> str:
    """Plain-text rendering of :func:`collect_status` for a terminal."""
    lines = [f"CXR Lens spool: {d['spool_dir']}"]
    if d.get("storage", "sqlite") != "sqlite":
        lines.append(f"Queue and outbox: {d['storage']}")
    if d.get("nodes") is not None:
        lines += ["", "Processes seen in the last 10 minutes"]
        lines += [f"  {n['role']:<7} {n['host']}:{n['pid']} ({n['ae_title']}), since {n['started']}, "
                  f"seen {n['seen_s_ago']} s ago" for n in d["nodes"]] or ["  none"]
    lines += ["", "Jobs"]
    lines += [f"  {state:<11} {n:>7}" for state, n in d["jobs"].items()]
    lines += ["", "Outbox            pending    done  parked"]
    for channel, counts in d["outbox"].items():
        lines.append(
            f"  {channel:<14} {counts.get('pending', 0):>8} {counts.get('done', 0):>7} {counts.get('parked', 0):>7}"
        )
    lines += ["", "Delivery problems"]
    if not d["problems"]:
        lines.append("  none")
    for p in d["problems"]:
        when = "parked" if p["state"] == "parked" else f"retry in {p['next_attempt_in_s']} s"
        lines.append(
            f"  #{p['id']} {p['channel']} -> {p['destination']}: {when}, {p['attempts']} attempt(s): {p['last_error']}"
        )
    lines += ["", "Recent failed jobs"]
    if not d["recent_failures"]:
        lines.append("  none")
    for f in d["recent_failures"]:
        lines.append(
            f"  job {f['job_id']} (spool {f['spool']}, from {f['calling_ae'] or '?'}, {f['at']}): {f['reason']}"
        )
    return "\n".join(lines) + "\n"
