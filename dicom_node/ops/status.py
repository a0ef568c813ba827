"""``cxr-lens status``: what the node holds, read from its store while it runs (SQLite in WAL mode, or PostgreSQL).

Only identifiers of our own making appear (job ids, spool key prefixes, outbox ids, destinations, AE titles)
and the reasons the node recorded, never patient data.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.outputs.oru import OBS_TRUST_VERDICT, SEGMENT_SEPARATOR
from dicom_node.settings import StorageSettings
from dicom_node.storage.backend import (
    StorageNotFound,
    is_postgres,
    open_job_store,
    open_outbox_store,
    redacted,
)
from dicom_node.storage.jobs import JobState
from dicom_node.storage.outbox import outbox_path

_CHANNELS = ("dicom", "hl7")
_OUTBOX_STATES = ("pending", "done", "parked")
# How many of the latest ORU messages the alarm rate is read from.
RECENT_RESULTS = 200


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def recent_trust(spool_dir: Path | str, limit: int = RECENT_RESULTS) -> dict[str, Any]:
    """The explanation trust verdicts of the latest ``limit`` ORU messages in the SQLite outbox (what HealthShare
    was told, delivered or not) and their alarm rate: the share of the judged results whose verdict is not ``ok``.

    Read-only, from the ``hl7`` channel: a node with ``[hl7]`` off keeps no ORU, and then nothing is counted.
    """
    path = outbox_path(spool_dir)
    verdicts: Counter[str] = Counter()
    messages = 0
    if path.exists():
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT payload FROM outbox WHERE channel='hl7' ORDER BY id DESC LIMIT ?",
                              (limit,)).fetchall()
        finally:
            db.close()
        messages = len(rows)
        for (payload,) in rows:
            verdict = _trust_verdict(bytes(payload).decode("utf-8", errors="replace"))
            if verdict:
                verdicts[verdict] += 1
    judged = sum(verdicts.values())
    alarms = judged - verdicts["ok"]
    return {"messages": messages, "judged": judged, "verdicts": dict(sorted(verdicts.items())),
            "alarm_rate": round(alarms / judged, 4) if judged else None}


def _trust_verdict(oru: str) -> str:
    """OBX-5's code of the ORU's trust verdict line, "" when it has none (``[trust]`` off)."""
    prefix = f"{OBS_TRUST_VERDICT.code}^"
    for segment in oru.split(SEGMENT_SEPARATOR):
        fields = segment.split("|")
        if fields[0] == "OBX" and len(fields) > 5 and fields[3].startswith(prefix):
            return fields[5].split("^")[0]
    return ""


def collect_status(
    spool_dir: Path | str,
    *,
    storage: StorageSettings | None = None,
    problems: int = 20,
    failures: int = 10,
    seen_within_s: float = 600.0,
) -> dict[str, Any]:
    """Queue depths by state, outbox counts, parked/retrying items with their last error, recent failures, and
    the explanation trust alarm rate of the latest results (:func:`recent_trust`)."""
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
    # Read from the SQLite outbox only: the PostgreSQL outbox has no query for the latest messages yet.
    status["trust"] = None if shared else recent_trust(spool_dir)
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
    trust = d.get("trust")
    lines += ["", f"Explanation trust (latest {RECENT_RESULTS} ORU messages)"]
    if trust is None:
        lines.append("  not read from a PostgreSQL outbox")
    elif trust.get("judged"):
        alarms = trust["judged"] - trust["verdicts"].get("ok", 0)
        counts = ", ".join(f"{verdict} {n}" for verdict, n in trust["verdicts"].items())
        lines.append(f"  alarm rate {100.0 * trust['alarm_rate']:.1f}%: {alarms} of {trust['judged']} results not ok "
                     f"({counts})")
    else:
        lines.append(f"  no verdicts in {trust.get('messages', 0)} ORU message(s) ([hl7] or [trust] off, or none yet)")
    lines += ["", "Recent failed jobs"]
    if not d["recent_failures"]:
        lines.append("  none")
    for f in d["recent_failures"]:
        lines.append(
            f"  job {f['job_id']} (spool {f['spool']}, from {f['calling_ae'] or '?'}, {f['at']}): {f['reason']}"
        )
    return "\n".join(lines) + "\n"
