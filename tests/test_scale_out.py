"""Many processes, one PostgreSQL (issue #17 item 5): two ingest nodes, two workers and one sender share a
throw-away PostgreSQL and one spool directory; four associations push 100 radiographs across both ingest nodes;
one worker is SIGKILLed in the middle of a batch and one ingest node is killed and started again. Every image's
Secondary Capture reaches the PACS under one SOP Instance UID and every ORU the HL7 receiver under one MSH-10;
none is lost, no job fails, nothing is parked.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench.delivery import Peers, collect_delivery
from dicom_node.peers.modality import RetryingModality
from dicom_node.peers.node_process import (
    ROOT,
    NodeLayout,
    free_port,
    new_layout,
    node_toml,
    process_tree,
    wait_until,
)
from dicom_node.peers.synthetic_cr import chest_images
from tests.support import postgres as pg_support
from tests.support.postgres import PostgresCluster, needs_postgres

pytestmark = [pytest.mark.tf, pytest.mark.slow, needs_postgres()]

postgres_cluster = pg_support.postgres_cluster  # the session's cluster, a fixture

IMAGES = 100
LEASE_S = 3.0


class RoleProcess:
    """``cxr-lens serve --role ROLE`` in a subprocess with its own configuration and log."""

    def __init__(self, name: str, role: str, config: Path, root: Path) -> None:
        self.name = name
        self.role = role
        self.config = config
        self.log = root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.lives = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_LENS_")}
        self.lives += 1
        with self.log.open("ab") as out:
            out.write(f"\n=== life {self.lives} ===\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config), "--role", self.role],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )

    def this_life(self) -> str:
        text = self.log.read_text(errors="replace")
        return text[text.rfind(f"=== life {self.lives} ==="):]

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.this_life()[-4000:]}")
        life = self.this_life()
        return f"started (role {self.role})" in life and (self.role != "worker" or "model warm-up " in life)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def write_config(path: Path, layout: NodeLayout, url: str, *, port: int) -> None:
    """One process's configuration: its own DICOM port, the shared spool, database, PACS and HL7 receiver."""
    path.write_text(node_toml(layout, port=port, batch_size=8, processes="auto",
                              extra=f'[storage]\nurl = "{url}"\nlease_s = {LEASE_S}\n'))


def query(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


@pytest.fixture
def processes() -> Iterator[list[RoleProcess]]:
    started: list[RoleProcess] = []
    yield started
    for p in started:
        p.kill()


def test_two_ingest_two_workers_one_sender_each_output_once(
    tmp_path: Path, postgres_cluster: PostgresCluster, processes: list[RoleProcess]
) -> None:
    url = postgres_cluster.database()
    layout = new_layout(tmp_path)
    peers = Peers(layout)
    peers.start()
    ingest_ports = [layout.node_port, free_port()]
    try:
        for name, role, port in [("ingest-a", "ingest", ingest_ports[0]), ("ingest-b", "ingest", ingest_ports[1]),
                                 ("worker-1", "worker", 0), ("worker-2", "worker", 0), ("sender", "sender", 0)]:
            write_config(tmp_path / f"{name}.toml", layout, url, port=port)
            processes.append(RoleProcess(name, role, tmp_path / f"{name}.toml", tmp_path))
        ingest_a, ingest_b, worker_1, worker_2, sender = processes
        for p in processes:
            p.start()
        assert wait_until(lambda: all(p.ready() for p in processes), 300, poll_s=0.2), "processes not ready"

        images = chest_images(IMAGES, rows=256, cols=256, tag="SCALE")
        # Four associations at a time: two streams to each ingest node.
        modalities = [RetryingModality(ingest_ports[i // 2]) for i in range(4)]
        for i, modality in enumerate(modalities):
            modality.add(images[i::4])
            modality.start()

        # SIGKILL worker 1 once it has done a few jobs, while it holds claimed ones (in the middle of a batch).
        # With worker.processes (the default "auto") its model process claims the jobs, under its own pid.
        def holders() -> str:
            return " OR ".join(f"claimed_by LIKE '%:{pid}:%'" for pid in process_tree(worker_1.pid))

        def worker_1_busy() -> bool:
            return len(re.findall(r"job \d+ done", worker_1.this_life())) >= 3 and query(
                url, f"SELECT count(*) FROM jobs WHERE state = 'processing' AND ({holders()})")[0][0] > 0

        assert wait_until(worker_1_busy, 240, poll_s=0.02), "worker 1 never held a batch after 3 jobs done"
        held = holders()
        worker_1.kill()
        orphans = query(url, f"SELECT count(*) FROM jobs WHERE ({held}) AND state = 'processing'")

        # Kill ingest node B once its modalities are under way, and start it again on the same port.
        assert wait_until(lambda: sum(m.acknowledged for m in modalities[2:]) >= 10, 240), "ingest B got nothing"
        ingest_b.kill()
        time.sleep(1.0)  # its modalities meet a closed port and retry
        ingest_b.start()
        assert wait_until(ingest_b.ready, 120, poll_s=0.2)

        assert wait_until(lambda: all(m.finished for m in modalities), 600), "not every image was acknowledged"
        for modality in modalities:
            modality.stop()
            assert modality.error is None
        sources = {r.sop_instance_uid for m in modalities for r in m.replies if r.status == 0x0000}
        assert len(sources) == IMAGES

        def settled() -> bool:
            jobs = dict(query(url, "SELECT state, count(*) FROM jobs GROUP BY state"))
            box = dict(query(url, "SELECT state, count(*) FROM outbox GROUP BY state"))
            return jobs.get("done", 0) + jobs.get("failed", 0) + jobs.get("ineligible", 0) >= IMAGES and not (
                jobs.get("pending") or jobs.get("processing") or box.get("pending"))

        assert wait_until(settled, 900, poll_s=0.5), "queue or outbox did not drain:\n" + worker_2.this_life()[-3000:]
        time.sleep(1.0)  # a duplicate sent after settling would arrive now
        delivery = collect_delivery(peers)
        assert delivery.problems(sources) == []
        assert delivery.sc_distinct == IMAGES and delivery.oru_distinct == IMAGES
        jobs = dict(query(url, "SELECT state, count(*) FROM jobs GROUP BY state"))
        assert jobs == {"done": IMAGES}
        assert dict(query(url, "SELECT state, count(*) FROM outbox GROUP BY state")).get("parked") is None
        # The dead worker's batch went to the other one after its lease ran out.
        assert orphans[0][0] > 0
        assert "returned to the queue (lease ran out)" in worker_2.this_life()
        roles = sorted(r for (r,) in query(url, "SELECT role FROM nodes"))
        assert roles == ["ingest", "ingest", "ingest", "sender", "worker", "worker"]  # B's second life included
    finally:
        for p in processes:
            p.stop()
        peers.stop()
