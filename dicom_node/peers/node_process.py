"""A CXR Lens node in a subprocess, seen from outside: its ports and files, start, SIGKILL, SIGTERM, RSS, queues.

The node runs as ``python -m dicom_node.cli serve --config FILE``, so it can be SIGKILLed and its memory read from
``/proc``; its SQLite files are read read-only. The benchmarks and the crash and load tests drive it this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.peers.modality import NODE_AE

# Where ``python -m dicom_node.cli`` finds the package (the repository root in a checkout).
ROOT = Path(__file__).resolve().parents[2]
PACS_AE = "PACS"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


@dataclass(frozen=True)
class NodeLayout:
    """Ports and paths of one node under test; the spool survives restarts."""

    root: Path
    node_port: int
    pacs_port: int
    hl7_port: int

    @property
    def spool(self) -> Path:
        return self.root / "spool"

    @property
    def config(self) -> Path:
        return self.root / "node.toml"

    @property
    def log(self) -> Path:
        return self.root / "node.log"


def new_layout(root: Path, *, batch_size: int = 16, batch_wait_ms: int = 50, retry_initial_s: float = 0.2,
               retry_max_s: float = 1.0, processes: int | str = 0, extra: str = "") -> NodeLayout:
    """Pick free ports and write the node's TOML configuration under ``root`` (:func:`node_toml`)."""
    root.mkdir(parents=True, exist_ok=True)
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    node_port, pacs_port, hl7_port = sorted(ports)
    layout = NodeLayout(root, node_port, pacs_port, hl7_port)
    layout.config.write_text(node_toml(
        layout, batch_size=batch_size, batch_wait_ms=batch_wait_ms, retry_initial_s=retry_initial_s,
        retry_max_s=retry_max_s, processes=processes, extra=extra,
    ))
    return layout


def node_toml(layout: NodeLayout, *, port: int | None = None, batch_size: int = 16, batch_wait_ms: int = 50,
              retry_initial_s: float = 0.2, retry_max_s: float = 1.0, processes: int | str = 0,
              extra: str = "") -> str:
    """A node's configuration for ``layout``: the DICOM port (``port``, else the layout's), its spool, the PACS and
    HL7 receiver; the demo model (the default). ``processes``: worker.processes (a count or "auto"); ``extra``:
    more TOML tables (``[outputs]``, ``[storage]``), appended as given."""
    return f"""
[node]
host = "127.0.0.1"
port = {port if port is not None else layout.node_port}
http_port = 0
spool_dir = {json.dumps(str(layout.spool))}
free_disk_floor_mb = 0
retry_initial_s = {retry_initial_s}
retry_max_s = {retry_max_s}
[worker]
batch_size = {batch_size}
batch_wait_ms = {batch_wait_ms}
processes = {json.dumps(processes)}
[[destinations]]
ae_title = "{PACS_AE}"
host = "127.0.0.1"
port = {layout.pacs_port}
[hl7]
host = "127.0.0.1"
port = {layout.hl7_port}
retry_initial_s = {retry_initial_s}
retry_max_s = {retry_max_s}
{extra}"""


class NodeProcess:
    """``cxr-lens serve`` in a subprocess: start, wait for C-ECHO, SIGKILL or SIGTERM, read its RSS."""

    def __init__(self, layout: NodeLayout) -> None:
        self.layout = layout
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float = 180.0) -> float:
        """Start the node and wait until it answers C-ECHO; returns the seconds that took."""
        t = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_LENS_")}
        with self.layout.log.open("ab") as out:
            out.write(f"\n=== life {self.lives + 1} ===\n".encode())
            out.flush()
            with self._lock:
                # A session of its own: SIGKILL reaches every process of the node at once (worker.processes).
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.layout.config)],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
        self.lives += 1
        try:
            self._wait_echo(ready_timeout)
            self._wait_model_ready(t + ready_timeout)
        except BaseException:
            self.kill()
            raise
        return time.monotonic() - t

    def _wait_echo(self, timeout: float) -> None:
        ae = AE(ae_title="HARNESS")
        ae.add_requested_context(Verification)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:  # a plain connect first: pynetdicom 3.0.4 leaks the socket of a refused association (#979)
                socket.create_connection(("127.0.0.1", self.layout.node_port), timeout=1).close()
            except OSError:
                time.sleep(0.2)
                continue
            assoc = ae.associate("127.0.0.1", self.layout.node_port, ae_title=NODE_AE)
            if assoc.is_established:
                assoc.send_c_echo()
                assoc.release()
                return
            time.sleep(0.2)
        raise AssertionError("node did not answer C-ECHO:\n" + self.log_tail())

    def _wait_model_ready(self, deadline: float) -> None:
        """Until this life's log says the model warm-up is over (worker.warm_up): load must meet a running model."""
        marker = f"=== life {self.lives} ==="
        while time.monotonic() < deadline:
            text = self.layout.log.read_text(errors="replace")
            if "model warm-up " in text[text.rfind(marker):]:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.1)
        raise AssertionError("node did not finish its model warm-up:\n" + self.log_tail())

    def kill(self) -> None:
        """SIGKILL to every process of the node: no shutdown code runs, as when the power goes. Safe to call from
        any thread."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait (graceful stop); SIGKILL if it does not end in ``timeout``. Returns the exit status."""
        with self._lock:
            if self.proc is None:
                return 0
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=30)
            return int(self.proc.returncode)

    def rss_mb(self) -> float:
        """Resident set size of the node, summed over its processes (``VmRSS`` in ``/proc/PID/status``), in MiB."""
        return sum(_rss_mb(pid) for pid in process_tree(self.pid))

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.layout.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _rss_mb(pid: int) -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # ended meanwhile
        return 0.0
    return next((int(line.split()[1]) / 1024.0 for line in lines if line.startswith("VmRSS:")), 0.0)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux ``/proc``): the node's model and stage processes with worker.processes."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _count(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    # Read-only: the node owns these files; a reader must neither create nor checkpoint them.
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return conn.execute(sql).fetchall()


def job_counts(spool: Path) -> Counter[str]:
    """Jobs by state, as the node's queue file says (empty before the first start)."""
    return Counter(dict(_count(spool / "jobs.sqlite", "SELECT state, COUNT(*) FROM jobs GROUP BY state")))


def outbox_counts(spool: Path) -> Counter[tuple[str, str]]:
    """Outbox items by (channel, state)."""
    rows = _count(spool / "outbox.sqlite", "SELECT channel, state, COUNT(*) FROM outbox GROUP BY channel, state")
    return Counter({(c, s): n for c, s, n in rows})
