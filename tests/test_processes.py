"""worker.processes: the stage pool in other processes, a broken pool leaving its jobs claimed, metrics summed across
processes, and a whole node in processes that loses each of its processes to SIGKILL (then all of them at once)
and still delivers every output exactly once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from typing_extensions import Buffer

from dicom_node.ops.metrics import Metrics
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink
from dicom_node.peers.node_process import new_layout, wait_until
from dicom_node.process.processes import (
    ProcessMetrics,
    StageContext,
    StagePool,
    available_cores,
    resolve_processes,
    snapshot,
)
from dicom_node.process.worker import JobOutcome, Worker
from dicom_node.storage.jobs import Job, JobQueue, JobState, jobs_path
from dicom_node.storage.spool import Spool
from tests.support.peers import sample

ROOT = Path(__file__).resolve().parents[1]


def test_auto_is_one_stage_process_on_small_machines_and_the_cores_less_two_above() -> None:
    assert [resolve_processes("auto", cores) for cores in (1, 2, 3, 4, 16)] == [1, 1, 1, 2, 14]
    assert resolve_processes(3, cores=16) == 3
    assert resolve_processes(0, cores=16) == 0


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "50000 100000\n"}, 1),  # cgroup v2, half a CPU: rounded up to one
        ({"cpu.max": "max 100000\n"}, None),  # v2 without a quota: the affinity
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # v1, one CPU
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, unlimited
        ({}, None),  # no cgroup files at all
    ],
)
def test_available_cores_heeds_a_container_cpu_quota(tmp_path: Path, files: dict[str, str],
                                                     expected: int | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    affinity = len(os.sched_getaffinity(0))
    assert available_cores(str(tmp_path)) == (affinity if expected is None else min(affinity, expected))


def test_a_large_quota_does_not_raise_the_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("6400000 100000\n")  # 64 CPUs
    assert available_cores(str(tmp_path)) == len(os.sched_getaffinity(0))


def test_node_metrics_sum_what_the_children_report() -> None:
    node = ProcessMetrics()
    node.processed.inc(2)
    child = Metrics()
    child.processed.inc(3)
    child.ineligible.labels(rule="modality").inc()
    child.stage_seconds.labels(stage="prepare").observe(0.02)
    node.absorb(101, snapshot(child))
    child.processed.inc(4)  # snapshots are cumulative: the later one replaces the earlier
    node.absorb(101, snapshot(child))
    other = Metrics()
    other.stage_seconds.labels(stage="prepare").observe(0.5)
    node.absorb(102, snapshot(other))
    text = node.exposition().decode()
    assert "cxr_lens_processed_total 9.0" in text
    assert 'cxr_lens_ineligible_total{rule="modality"} 1.0' in text
    assert 'cxr_lens_stage_seconds_count{stage="prepare"} 2.0' in text
    assert 'cxr_lens_stage_seconds_bucket{le="0.025",stage="prepare"} 1.0' in text
    assert text.count("# HELP cxr_lens_processed_total ") == 1  # one family, not one per process


# --- the stage pool, with stand-in stages (no model) --------------------------------------------------------------


class PidStages:
    """Stages that say which process prepared and finished each job; ``bad`` payloads fail, ``die`` kills."""

    def __init__(self, results: Path) -> None:
        self.results = results

    def prepare(self, job: Job, data: Buffer) -> Any:
        payload = bytes(data)
        if payload == b"die":
            os.kill(os.getpid(), signal.SIGKILL)
        if payload == b"bad":
            raise ValueError("cannot parse")
        return (payload, os.getpid())

    def infer(self, items: Sequence[Any]) -> Sequence[Any]:
        return [payload.upper() for payload, _ in items]

    def finish(self, job: Job, item: Any, result: Any) -> JobOutcome:
        (self.results / f"{job.id}").write_text(f"{result.decode()} {item[1]} {os.getpid()}")
        return JobOutcome(job.id, JobState.DONE)


def _stage_context(directory: str) -> StageContext:
    spool_dir = Path(directory)
    return StageContext(PidStages(spool_dir / "results"), Spool(spool_dir), JobQueue(jobs_path(spool_dir)), Metrics())


def _pool_worker(tmp_path: Path, lost: threading.Event | None = None) -> tuple[JobQueue, Spool, Worker]:
    from functools import partial
    from multiprocessing import get_context

    (tmp_path / "results").mkdir()
    queue, spool = JobQueue(jobs_path(tmp_path)), Spool(tmp_path)
    reports = get_context("spawn").Queue()
    worker = Worker(queue, spool, PidStages(tmp_path / "results"), batch_size=4, batch_wait_ms=0, idle_poll_s=0.05,
                    runner=lambda: StagePool(2, partial(_stage_context, str(tmp_path)), reports),
                    on_runner_lost=lost.set if lost is not None else None)
    return queue, spool, worker


def _add(queue: JobQueue, spool: Spool, payloads: Sequence[bytes]) -> list[int]:
    return [queue.add(spool.write(p))[0] for p in payloads]


@pytest.mark.slow
def test_stage_pool_prepares_and_finishes_in_other_processes(tmp_path: Path) -> None:
    queue, spool, worker = _pool_worker(tmp_path)
    ids = _add(queue, spool, [f"img-{i}".encode() for i in range(6)] + [b"bad"])
    worker.start()
    try:
        assert wait_until(lambda: all(queue.get(i).state in (JobState.DONE, JobState.FAILED) for i in ids), 60)
    finally:
        worker.stop()
    jobs = {i: queue.get(i) for i in ids}
    assert jobs[ids[-1]].state == JobState.FAILED and jobs[ids[-1]].reason == "ValueError"
    assert jobs[ids[-1]].attempts == 1  # counted by the stage process, in the shared queue
    lines = [(tmp_path / "results" / str(i)).read_text().split() for i in ids[:-1]]
    assert [line[0] for line in lines] == [f"IMG-{i}" for i in range(6)]
    pids = {int(pid) for line in lines for pid in line[1:]}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


@pytest.mark.slow
def test_a_stage_process_that_dies_stops_the_worker_and_leaves_its_jobs_claimed(tmp_path: Path) -> None:
    lost = threading.Event()
    queue, spool, worker = _pool_worker(tmp_path, lost)
    ids = _add(queue, spool, [b"img-0", b"die", b"img-2"])
    worker.start()
    try:
        assert lost.wait(60), "the worker did not notice the stage process's death"
    finally:
        worker.stop(timeout=10)
    states = {queue.get(i).state for i in ids}
    assert JobState.FAILED not in states  # a crash is not the image's fault until it happens three times
    assert JobState.PROCESSING in states
    assert queue.requeue_processing() >= 1  # what the node does before starting processing again


def test_worker_records_nothing_for_futures_of_a_broken_runner(tmp_path: Path) -> None:
    class BrokenRunner:
        def prepare(self, job: Job) -> Future[Any]:
            future: Future[Any] = Future()
            future.set_exception(BrokenProcessPool("a stage process died"))
            return future

        def finish(self, job: Job, item: Any, result: Any) -> Future[JobOutcome]:
            raise AssertionError("nothing reaches finish")

        def shutdown(self, *, wait: bool, cancel_futures: bool) -> None:
            pass

    queue, spool = JobQueue(jobs_path(tmp_path)), Spool(tmp_path)
    ids = _add(queue, spool, [b"a", b"b"])
    lost = threading.Event()
    worker = Worker(queue, spool, PidStages(tmp_path), batch_size=2, batch_wait_ms=0, idle_poll_s=0.05,
                    runner=BrokenRunner, on_runner_lost=lost.set)
    worker.start()
    try:
        assert lost.wait(10)
    finally:
        worker.stop(timeout=5)
    assert [queue.get(i).state for i in ids] == [JobState.PROCESSING, JobState.PROCESSING]


# --- a whole node in processes, SIGKILLed one process at a time, then all at once -----------------------------------

SOURCES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


def _children(pid: int, *, workers_only: bool = True) -> list[int]:
    """Process ids whose parent is ``pid``; only the node's model and stage processes (multiprocessing's spawned
    ones, not its resource tracker) unless ``workers_only`` is False."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) != pid:
                        continue
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if not workers_only or b"spawn_main" in cmdline.read():
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _tree(pid: int, *, workers_only: bool = True) -> list[int]:
    return [pid] + [p for child in _children(pid, workers_only=workers_only)
                    for p in _tree(child, workers_only=workers_only)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_LENS_")}
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(config)], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    def echo() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        try:
            import socket

            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        assoc = ae.associate("127.0.0.1", port, ae_title="CXRLENS")
        if not assoc.is_established:
            return False
        assoc.release()
        return True

    assert wait_until(echo, 120, 0.3), log.read_text(errors="replace")[-3000:]


def _send(port: int, names: Sequence[str], *, copies: int = 1) -> None:
    ae = AE(ae_title="MODALITY")
    datasets = [pydicom.dcmread(sample(n)) for _ in range(copies) for n in names]
    for i, ds in enumerate(datasets):
        if i >= len(names):  # further copies: new instances of the same image
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRLENS", max_pdu=1_048_576)
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()


def _jobs(spool: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{spool / 'jobs.sqlite'}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())


@pytest.mark.tf
@pytest.mark.slow
def test_node_in_processes_survives_sigkill_of_each_process_and_of_all(tmp_path: Path) -> None:
    layout = new_layout(tmp_path, batch_size=2, batch_wait_ms=0, processes=1,
                        extra="[outputs]\nparametric_map = false\nstructured_report = false\n")
    node_port, pacs_port, hl7_port = layout.node_port, layout.pacs_port, layout.hl7_port
    spool, config, log = layout.spool, layout.config, layout.log
    pacs = DicomSink(tmp_path / "pacs", ae_title="PACS", port=pacs_port)
    ris = HL7Sink("127.0.0.1", hl7_port, tmp_path / "hl7")
    pacs.start()
    ris.start()
    proc = _start(config, log)
    sent = 0
    try:
        _ready(node_port, proc, log)
        assert wait_until(lambda: len(_tree(proc.pid)) == 3, 60), _tree(proc.pid)  # node, model, one stage process
        (model,) = _children(proc.pid)
        (stage,) = _children(model)

        # 1. The model process, with a batch in hand: the node starts it again and requeues what it held.
        _send(node_port, SOURCES, copies=2)
        sent += 6
        os.kill(model, signal.SIGKILL)
        assert wait_until(lambda: not _alive(stage), 10), "the stage process outlived its model process"
        assert wait_until(lambda: len(_tree(proc.pid)) == 3 and model not in _tree(proc.pid), 120), log.read_text()
        assert wait_until(lambda: _jobs(spool).get("done", 0) == sent, 180), (_jobs(spool), log.read_text()[-3000:])

        # 2. A stage process: its model process ends (status 3) and the node starts both again.
        (model,) = _children(proc.pid)
        assert wait_until(lambda: len(_children(model)) == 1, 60)
        (stage,) = _children(model)
        os.kill(stage, signal.SIGKILL)  # idle: the model process notices at once, not with the next job
        assert wait_until(lambda: model not in _tree(proc.pid) and len(_tree(proc.pid)) == 3, 120), log.read_text()
        assert "exit status 3" in log.read_text()
        (model,) = _children(proc.pid)
        assert wait_until(lambda: len(_children(model)) == 1, 60)
        (stage,) = _children(model)
        _send(node_port, SOURCES, copies=2)  # then with jobs in hand
        sent += 3  # the first copies were received before: not processed again
        os.kill(stage, signal.SIGKILL)
        assert wait_until(lambda: model not in _tree(proc.pid) and len(_tree(proc.pid)) == 3, 120), log.read_text()
        assert wait_until(lambda: _jobs(spool).get("done", 0) == sent, 180), (_jobs(spool), log.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            tree = _tree(proc.pid, workers_only=False)
            os.killpg(proc.pid, signal.SIGKILL)  # 3. all of them at once, outputs possibly still in the outbox
            proc.wait(timeout=10)
            assert wait_until(lambda: not any(_alive(p) for p in tree), 10)
    # The whole group again, after a restart on the same spool, with images queued.
    proc = _start(config, log)
    try:
        _ready(node_port, proc, log)
        _send(node_port, SOURCES, copies=2)
        sent += 3  # new instances only: the others are received again, not queued again
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc = _start(config, log)
        _ready(node_port, proc, log)

        def stored() -> set[str]:
            return {r.sop_instance_uid for r in pacs.received}

        def reported() -> set[str]:  # the ORUs' MSH-10 (the sink names each file <n>_<MSH-10>.hl7)
            return {path.stem.split("_", 1)[1] for path in ris.out_dir.glob("*.hl7")}

        assert wait_until(lambda: _jobs(spool).get("done", 0) == sent and len(stored()) == sent
                          and len(reported()) == sent, 240), (_jobs(spool), len(stored()), len(reported()))
        time.sleep(2.0)  # anything sent twice would arrive now
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        pacs.stop()
        ris.stop()
    assert proc.returncode == 0
    assert "did not stop in time" not in log.read_text()  # each stop ended the model process, none killed it
    # Each of the two whole-group kills may land between a peer's acknowledgement and the outbox recording it:
    # that one Secondary Capture (and that one ORU) is sent again after the restart, under the same SOP Instance
    # UID (the archive replaces it) and the same MSH-10 (the receiver can tell it is a duplicate). Nothing else is ever
    # sent twice: the killed model and stage processes send nothing themselves.
    kills = 2
    sops = [r.sop_instance_uid for r in pacs.received]
    assert len(set(sops)) == sent, "a Secondary Capture did not arrive"
    assert len(sops) - sent <= kills, f"{len(sops) - sent} Secondary Captures sent twice; at most one per group kill"
    hl7_files = list(ris.out_dir.glob("*.hl7"))
    assert len(reported()) == sent and len(hl7_files) - sent <= kills, (len(reported()), len(hl7_files))
    assert _jobs(spool) == {"done": sent}


@pytest.mark.tf
def test_what_travels_to_a_stage_process_needs_no_framework(tmp_path: Path) -> None:
    """A stage process unpickles the prepared item and the model's result for each image: neither may import Keras
    or TensorFlow there (seconds of start-up and hundreds of MB in every stage process)."""
    import pickle

    from dicom_node.process.processor import Prepared, load_processor
    from dicom_node.settings import load_settings

    processor = load_processor(load_settings())
    data = sample("RG1_UNCR.dcm").read_bytes()
    from dicom_node.imaging.instance import read_file

    instance = read_file(data)
    items = [processor.prepare(instance.header, instance.pixel_data) for _ in range(2)]
    assert all(isinstance(item, Prepared) for item in items)
    results = processor.infer(items)  # type: ignore[arg-type]
    outputs = processor.build_outputs(items[1], results[1])  # what the stage process will do with them
    path = tmp_path / "finish.pickle"
    path.write_bytes(pickle.dumps((items[1], results[1])))
    script = (f"import pickle, sys; pickle.loads(open({str(path)!r}, 'rb').read()); "
              "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    assert results[1].explanation.heatmaps.shape[0] == 1  # this image's row only, not the whole batch
    assert outputs.result.label in processor.model.labels
