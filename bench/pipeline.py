"""End-to-end throughput against the model's own cost: ``python -m bench.pipeline [--n 64] [--model seed|demo]``.

Starts a real node (the seed article's InceptionV3 architecture with random weights by default, saved to a
temporary .keras file and loaded like any configured model) with a local DICOM sink as the PACS and a local MLLP
receiver that ACKs the ORUs. In the same process it first times the bare forward pass of that model at the
node's batch size (compiled on the node's Keras backend, ``explain.compiled_forward``, median). Then, for each
transfer syntax of RG1 (UNCR, J2KR, J2KI), after a warm-up round, ``--senders`` associations push N copies with
distinct UIDs as fast as the node answers, and it measures (the senders, the DICOM sink and the MLLP receiver
each run in their own process, ``bench.peers``, as they would on other machines; they still share this machine's
cores):

  end-to-end  from the first C-STORE to the last SC and ORU delivered, per image (the pipeline's fill and drain
              included: large N amortises them), and its ratio to the forward pass per image (targets: J2K
              lossless <= 2x, uncompressed <= 1.5x);
  ingest      images per second the SCP accepted while the node was processing (target >= 30/s);
  C-STORE     reply time p50 / p99 at the senders (target p99 < 0.5 s);
  stages      ms per image in the node's stages: prepare (read, parse, decode, render), model (one pass per
              batch, divided by its size) and output (overlay, SC, Parametric Map, SR, ORU, durable enqueue);
              medians in one process (``worker.processes = 0``), else means from the stage histogram the model
              and stage processes report (``cxr_lens_stage_seconds``);
  CPU         core-ms per image over the same span: the node (all its processes), and the whole machine (peers
              included); then the node's CPU split by role (Linux ``/proc``): this process's threads grouped by
              what they run, and the model process and the stage processes of ``worker.processes``.

``--processes 0,1,2`` runs one node per value of ``worker.processes`` over the same images (0: one process,
threads; N: the model in a child process and N stage processes; see dicom_node/process/processes.py) and ends with
the scaling table: images per second end to end and the node's CPU per image for each N. The node's own process
(receiving and sending) is this one, so that its threads can be told apart.

``--profile DIR`` records each syntax's measured span of this process with py-spy (``pip install py-spy``; it
reads the node's memory, so it needs ptrace rights: root, or ``kernel.yama.ptrace_scope=0``) as collapsed stacks
with thread names, ``DIR/<syntax>-p<N>.txt``, one ``frame;frame;... samples`` line per stack (``--native`` frames
included); the span's own figures are then perturbed by the sampling.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from bench.peers import Sinks, copies, process_cpu, push  # noqa: E402
from dicom_node.settings import DestinationSettings, Settings, load_settings  # noqa: E402

SYNTAXES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
TARGETS = {"RG1_UNCR.dcm": 1.5, "RG1_J2KR.dcm": 2.0}
INGEST_TARGET = 30.0
P99_TARGET_MS = 500.0
# The model and stage processes report their metrics to the node every second (dicom_node.process.processes):
# waited before reading the stage histogram, so that a span's figures hold all of its reports and none of the last.
CHILD_REPORTS_S = 2.0


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class StageTimes:
    """Wraps the node's pipeline stages and records wall time per call (per image for the model pass)."""

    def __init__(self, stages: Any) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        for name in ("prepare", "infer", "finish"):
            setattr(stages, name, self._timed(name, getattr(stages, name)))

    def _timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            started = time.perf_counter()
            result = function(*args)
            elapsed = (time.perf_counter() - started) * 1e3
            per = len(args[0]) if name == "infer" else 1
            with self._lock:
                self.samples[name].extend([elapsed / per] * per)
            return result

        return timed

    def reset(self) -> dict[str, list[float]]:
        with self._lock:
            samples, self.samples = self.samples, defaultdict(list)
        return samples


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds used so far by this process (the node) and by the whole machine (Linux /proc/stat)."""
    own = time.process_time()
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, less idle and iowait (guest is in user)
        machine = busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        machine = float("nan")
    return own, machine


#: Thread name (pynetdicom's and the node's) -> the role it is counted under in the CPU split.
_THREAD_ROLES: tuple[tuple[str, str], ...] = (
    ("AcceptorThread", "C-STORE handler"),
    # pynetdicom's DULServiceProvider threads keep the default name, those of the SCP's associations and those of
    # the DICOM sender's alike
    ("Thread-", "DUL (in and out)"),
    ("AcceptorServer", "SCP accept loop"),
    ("cxr-lens-decode", "decode pool"),
    ("cxr-lens-model", "model"),
    ("cxr-lens-output", "output pool"),
    ("cxr-lens-feeder", "feeder"),
    ("cxr-lens-dicom-sender", "DICOM sender"),
    ("RequestorThread", "DICOM sender"),
    ("cxr-lens-hl7-sender", "HL7 sender"),
    ("cxr-lens-http", "HTTP"),
    ("MainThread", "main (bench)"),
)


def _role(thread_name: str) -> str:
    return next((role for prefix, role in _THREAD_ROLES if thread_name.startswith(prefix)), "other")


class ThreadCpu:
    """CPU seconds (all, and in the kernel) per thread role of this process over a span (``/proc/self/task``).

    A helper thread samples every ``interval`` seconds, so a thread that ends within the span (an association)
    still counts up to its last sample; what no sample saw is reported as ``unattributed``.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self._interval = interval
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._start: dict[int, tuple[float, float]] = {}
        self._last: dict[int, tuple[str, tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process_start = 0.0

    def _read(self) -> dict[int, tuple[float, float]]:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                utime, stime = int(fields[11]) / self._ticks, int(fields[12]) / self._ticks
                out[int(tid)] = (utime + stime, stime)
            except (OSError, IndexError, ValueError):
                continue
        return out

    def _sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        for tid, cpu in self._read().items():
            self._last[tid] = (names.get(tid, self._last.get(tid, ("other", (0.0, 0.0)))[0]), cpu)

    def start(self) -> None:
        self._process_start = time.process_time()
        self._start = self._read()
        self._last = {}
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-thread-cpu", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def stop(self) -> dict[str, tuple[float, float]]:
        """(CPU, kernel CPU) seconds per role since :meth:`start` (``unattributed``: what no sample saw)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        roles: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
        for tid, (name, (cpu, kernel)) in self._last.items():
            role = _role(name) if name != "bench-thread-cpu" else "bench sampler"
            start_cpu, start_kernel = self._start.get(tid, (0.0, 0.0))
            total, total_kernel = roles[role]
            roles[role] = (total + cpu - start_cpu, total_kernel + kernel - start_kernel)
        seen = sum(cpu for cpu, _ in roles.values())
        roles["unattributed"] = ((time.process_time() - self._process_start) - seen, float("nan"))
        return dict(roles)


class Profiler:
    """``py-spy record`` over one span of this process, written as collapsed stacks with thread names."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, name: str) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).with_name("py-spy")
        command = [str(spy if spy.exists() else "py-spy"), "record", "--pid", str(os.getpid()), "--rate", "200",
                   "--native", "--threads", "--format", "raw", "--output", str(self.directory / f"{name}.txt")]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attached before the span starts
        if self._process.poll() is not None:
            assert self._process.stderr is not None
            raise SystemExit(f"py-spy did not start: {self._process.stderr.read().decode(errors='replace')}")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        self._process.wait(60)
        self._process = None


def _go(marks: list[tuple[float, float]], thread_cpu: ThreadCpu, child_cpu: ChildCpu) -> None:
    marks.append(_cpu_seconds())
    thread_cpu.start()
    child_cpu.start()


def _stage_totals(node: Any) -> dict[str, tuple[float, float]]:
    """(seconds, observations) per stage of the node's stage histogram, its child processes' reports included."""
    metrics = node.metrics
    families = metrics.merged() if hasattr(metrics, "merged") else metrics.registry.collect()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for family in families:
        if family.name != "cxr_lens_stage_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_sum"):
                totals[sample.labels["stage"]][0] += sample.value
            elif sample.name.endswith("_count"):
                totals[sample.labels["stage"]][1] += sample.value
    return {stage: (seconds, count) for stage, (seconds, count) in totals.items()}


def _stage_means(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
                 images: int) -> tuple[float, float, float]:
    """prepare and output ms per call, and the model's ms per image (its histogram has one entry per batch)."""
    def delta(stage: str) -> tuple[float, float]:
        (s0, c0), (s1, c1) = before.get(stage, (0.0, 0.0)), after.get(stage, (0.0, 0.0))
        return (s1 - s0) * 1e3, c1 - c0

    (prepare_ms, prepared), (batch_ms, _), (output_ms, output) = delta("prepare"), delta("batch"), delta("output")
    nan = float("nan")
    return (prepare_ms / prepared if prepared else nan, batch_ms / images if images else nan,
            output_ms / output if output else nan)


def _wait(node: Any, sinks: Sinks, expected: int, timeout: float, objects: int = 1) -> float:
    """Wait until the sinks hold ``objects`` DICOM objects (SC, Parametric Map, SR as ``[outputs]`` enables them)
    and one ORU for each of ``expected`` images; return the ``time.monotonic()`` when they did."""
    deadline = time.monotonic() + timeout
    while True:
        pacs, hl7 = sinks.received()
        if pacs >= expected * objects and hl7 >= expected:
            return time.monotonic()
        if failed := node.queue.recent_failures(1):
            raise SystemExit(f"a job failed: {failed[0].reason}")
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the node's outputs")
        time.sleep(0.05)  # this runs in the node's process: polling must not cost it CPU


def selected_syntaxes(syntaxes: str) -> list[str]:
    """The RG1 files of ``--syntaxes`` (a comma-separated subset of UNCR,J2KR,J2KI), in :data:`SYNTAXES`' order."""
    return [name for name in SYNTAXES if name[4:8] in syntaxes.split(",")]


def bench_settings(overrides: list[str], model: str, directory: Path) -> Settings:
    """The configuration with ``--set`` overrides; with ``model`` "seed", the seed article's InceptionV3 with
    random weights instead of the configured model, saved into ``directory`` and loaded like any configured one."""
    base = load_settings(None, overrides=overrides)
    if model != "seed":
        return base
    from models.architectures import build_seed_inception

    path = directory / "seed_inceptionv3_random.keras"
    build_seed_inception(seed=0).save(path)
    seed_model = base.model.model_copy(update={
        "path": str(path), "id": "seed-inceptionv3-random-weights", "version": "bench",
        "labels": ("covid19", "normal", "pneumonia"), "input_size": (256, 256), "channels": 3,
        "preprocess": "unit", "target_layer": "auto",
    })
    return base.model_copy(update={"model": seed_model})


def _forward_ms(processor: Any, batch: int, repeats: int = 15) -> float:
    from explain import compiled_forward

    model = processor.model
    h, w = model.input_size
    x = np.random.default_rng(0).random((batch, h, w, model.channels), dtype=np.float32)
    forward = compiled_forward(model.network, x.shape)  # on the node's Keras backend (TensorFlow or JAX)
    for _ in range(3):
        forward(x)
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        forward(x)
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples) / batch


class ChildCpu:
    """CPU seconds per role of the node's child processes (worker.processes) over a span."""

    def __init__(self, node: Any) -> None:
        self._node = node
        self._start: dict[int, tuple[str, tuple[float, float]]] = {}

    def _read(self) -> dict[int, tuple[str, tuple[float, float]]]:
        process_ids = getattr(self._node.worker, "process_ids", None)
        out = {}
        for role, pids in (process_ids() if process_ids is not None else {}).items():
            for pid in pids:
                if (cpu := process_cpu(pid)) is not None:
                    out[pid] = (f"{role} process{'es' if len(pids) > 1 else ''}", cpu)
        return out

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> dict[str, tuple[float, float]]:
        roles: dict[str, tuple[float, float]] = defaultdict(lambda: (0.0, 0.0))
        for pid, (role, (cpu, kernel)) in self._read().items():
            _, (cpu_0, kernel_0) = self._start.get(pid, (role, (0.0, 0.0)))
            total, total_kernel = roles[role]
            roles[role] = (total + cpu - cpu_0, total_kernel + kernel - kernel_0)
        return dict(roles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="images per transfer syntax (default 128)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations (default 4)")
    parser.add_argument("--model", choices=("seed", "demo"), default="seed")
    parser.add_argument("--syntaxes", default=",".join(s[4:8] for s in SYNTAXES), help="subset of UNCR,J2KR,J2KI")
    parser.add_argument("--processes", metavar="N[,N...]",
                        help="worker.processes of each run, one node per value (0: one process, threads); "
                             "default: the configuration's")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record each measured span with py-spy into DIR/<syntax>.txt (collapsed stacks)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a configuration override, as for cxr-lens")
    args = parser.parse_args(argv)
    from dicom_node.startup import configure_process

    configure_process(log_to_stderr=False)  # as the CLI does for a node

    from dicom_node.process.processes import resolve_processes
    from dicom_node.process.processor import load_processor
    from dicom_node.storage.backend import is_postgres, redacted

    with tempfile.TemporaryDirectory(prefix="cxr-lens-bench-") as tmp_name:
        tmp = Path(tmp_name)
        settings = bench_settings(args.set, args.model, tmp)
        processor = load_processor(settings)
        batch = settings.worker.batch_size
        objects = sum(map(bool, (settings.outputs.secondary_capture, settings.outputs.parametric_map,
                                 settings.outputs.structured_report)))
        forward = _forward_ms(processor, batch)
        counts = ([int(c) for c in args.processes.split(",")] if args.processes
                  else [resolve_processes(settings.worker.processes)])
        print(f"model {processor.model.model_id}; CPU cores {os.cpu_count()}; batch {batch}; "
              f"overlay cap {settings.pixels.overlay_max_long_side}; reduced decode {settings.pixels.reduced_decode}; "
              f"pipelined {settings.worker.pipelined}; decode threads {settings.worker.decode_threads}; "
              f"output threads {settings.worker.output_threads}; DICOM objects per image {objects}; "
              f"worker.processes {','.join(map(str, counts))}")
        # The queue and outbox store: --set storage.url=postgresql://... compares a PostgreSQL server with SQLite
        # (the server's CPU counts in the machine's column, not the node's).
        print(f"storage: {redacted(settings.storage.url) if is_postgres(settings.storage.url) else 'sqlite'}")
        print(f"bare forward pass: {forward:.1f} ms per image at batch {batch} (median of 15)\n", flush=True)
        inputs = {name: (copies(Path(get_testdata_file(name)), batch, tmp / f"{name}-warm"),
                         copies(Path(get_testdata_file(name)), args.n, tmp / name))
                  for name in selected_syntaxes(args.syntaxes)}
        runs: list[tuple[int, list[tuple[Any, ...]]]] = []
        ok = True
        for count in counts:
            rows, splits = _run(settings, count, processor, inputs, objects, args, tmp / f"run-{count}")
            runs.append((count, rows))
            ok &= _print_rows(rows, args, forward, count)
            _print_split(splits, args.n)
    if len(runs) > 1 or counts != [0]:
        _print_scaling(runs, args.n)
    return 0 if ok else 1


def _run(settings: Settings, processes: int, processor: Any, inputs: dict[str, tuple[list[Path], list[Path]]],
         objects: int, args: argparse.Namespace, directory: Path) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """One node with ``worker.processes = processes`` over every syntax: the table's rows and the CPU splits."""
    from dicom_node.node import compose
    from dicom_node.startup import freeze_heap

    sinks = Sinks(directory / "peers")
    settings = settings.model_copy(update={
        "node": settings.node.model_copy(update={"host": "127.0.0.1", "port": 0, "http_port": 0,
                                                 "spool_dir": directory / "spool", "free_disk_floor_mb": 0}),
        "worker": settings.worker.model_copy(update={"processes": processes}),
        "destinations": (DestinationSettings(ae_title="PACS", host="127.0.0.1", port=sinks.pacs_port),),
        "hl7": settings.hl7.model_copy(update={"enabled": True, "host": "127.0.0.1", "port": sinks.hl7_port}),
    })
    if processes:
        # The model runs in the node's child process; the one loaded here only timed the forward pass, and its
        # objects must not cost this (receiving) process's collector anything.
        freeze_heap()
        node = compose(settings)
        stages: StageTimes | None = None
    else:
        node = compose(settings, processor)
        stages = StageTimes(node.worker.stages)
    batch = settings.worker.batch_size
    rows = []
    splits: dict[str, dict[str, tuple[float, float]]] = {}
    thread_cpu, child_cpu = ThreadCpu(), ChildCpu(node)
    profiler = Profiler(args.profile)
    node.start()
    try:
        if not node.worker.model_ready.wait(600):
            raise SystemExit("the model did not get ready in 10 minutes")
        expected = 0
        for name, (warm, files) in inputs.items():
            # Warm-up: decoders, the model's batch-size buckets, sender associations.
            expected += batch
            push(node.scp_port, settings.node.ae_title, warm, args.senders)
            _wait(node, sinks, expected, 600, objects)
            if stages is not None:
                stages.reset()
            else:
                time.sleep(CHILD_REPORTS_S)  # the children's reports catch up with the warm-up
            stage_totals = _stage_totals(node)
            expected += args.n
            cpu_at_go: list[tuple[float, float]] = []
            profiler.start(f"{name[4:8]}-p{processes}")
            times, first, last_reply = push(node.scp_port, settings.node.ae_title, files, args.senders,
                                            on_go=lambda marks=cpu_at_go: _go(marks, thread_cpu, child_cpu))
            total, ingest_s = _wait(node, sinks, expected, 600, objects) - first, last_reply - first
            children = child_cpu.stop()
            splits[name[4:8]] = {**thread_cpu.stop(), **children}
            profiler.stop()
            node_cpu, machine_cpu = (
                (after - before) * 1e3 / args.n for before, after in zip(cpu_at_go[0], _cpu_seconds(), strict=True)
            )
            node_cpu += sum(cpu for cpu, _ in children.values()) * 1e3 / args.n
            if stages is not None:
                samples = stages.reset()
                medians = tuple(statistics.median(samples[s]) if samples[s] else float("nan")
                                for s in ("prepare", "infer", "finish"))
            else:
                time.sleep(CHILD_REPORTS_S)  # the children's last reports of the span
                medians = _stage_means(stage_totals, _stage_totals(node), args.n)
            per_image = total * 1e3 / args.n
            rows.append((name[4:8], per_image, args.n / ingest_s, _percentile(times, 50), _percentile(times, 99),
                         max(times), *medians, node_cpu, machine_cpu))
            print(f"  {name} (worker.processes {processes}): done", flush=True)
    finally:
        node.stop()
        sinks.stop()
        node.dicom_sender.outbox.close()
    return rows, splits


def _print_rows(rows: list[tuple[Any, ...]], args: argparse.Namespace, forward: float, processes: int) -> bool:
    header = (f"{'syntax':<7}{'ms/img':>8}{'/fwd':>7}{'target':>8}{'ingest/s':>10}{'p50 ms':>8}"
              f"{'p99 ms':>8}{'max ms':>8}{'prepare':>9}{'model':>8}{'output':>8}{'node cpu':>10}{'all cpu':>9}")
    print(f"\nworker.processes = {processes}. End to end, {args.n} images per syntax over {args.senders} "
          f"associations. ms/img: first C-STORE to last output delivered, per image (fill and drain included); "
          f"/fwd: its ratio to the forward pass (stages in ms/img: medians in one process, means across "
          f"processes). CPU in core-ms per image over the same span: the node's processes, and the whole machine "
          f"(peers, which a PACS and an HL7 engine would run elsewhere, included)")
    print(header)
    print("-" * len(header))
    ok = True
    for syntax, per_image, ingest, p50, p99, worst, prep, model, out, node_cpu, all_cpu in rows:
        target = TARGETS.get(f"RG1_{syntax}.dcm")
        ratio = per_image / forward
        miss = (target is not None and ratio > target) or ingest < INGEST_TARGET or p99 > P99_TARGET_MS
        ok &= not miss
        print(f"{syntax:<7}{per_image:>8.1f}{ratio:>7.2f}{(f'<={target}' if target else '-'):>8}"
              f"{ingest:>10.1f}{p50:>8.1f}{p99:>8.1f}{worst:>8.1f}{prep:>9.1f}{model:>8.1f}{out:>8.1f}"
              f"{node_cpu:>10.0f}{all_cpu:>9.0f}{' !' if miss else ''}")
    print(f"targets: J2KR <= 2.0x and UNCR <= 1.5x the forward pass per image; ingest >= {INGEST_TARGET:g}/s; "
          f"C-STORE p99 < {P99_TARGET_MS:g} ms ('!' marks a miss)")
    return ok


def _print_scaling(runs: list[tuple[int, list[tuple[Any, ...]]]], n: int) -> None:
    """Images per second end to end and the node's CPU per image (all its processes), per worker.processes."""
    syntaxes = [row[0] for row in runs[0][1]]
    print(f"\nScaling ({n} images per syntax): images/s end to end | the node's CPU, core-ms per image "
          f"(all its processes) | C-STORE p99 ms")
    print(f"{'processes':<10}" + "".join(f"{s:>24}" for s in syntaxes))
    for count, rows in runs:
        cells = "".join(f"{1e3 / row[1]:>8.1f} |{row[9]:>6.0f} |{row[4]:>6.0f}" for row in rows)
        print(f"{count:<10}{cells}")


def _print_split(splits: dict[str, dict[str, tuple[float, float]]], n: int) -> None:
    """The node's CPU per image by thread role, one column per syntax: all, and (in brackets) in the kernel."""
    if not splits:
        return
    roles = sorted({role for split in splits.values() for role in split},
                   key=lambda r: -max(split.get(r, (0.0, 0.0))[0] for split in splits.values()))
    print(f"\nThe node's CPU by thread role, core-ms per image over the same span (/proc; {n} images): all (kernel)")
    print(f"{'role':<20}" + "".join(f"{syntax:>14}" for syntax in splits))

    def cell(cpu: float, kernel: float) -> str:
        shown = f"{cpu * 1e3 / n:>7.1f}"
        return f"{shown} ({kernel * 1e3 / n:>4.1f})" if math.isfinite(kernel) else shown + " " * 7

    for role in roles:
        print(f"{role:<20}" + "".join(cell(*split.get(role, (0.0, 0.0))) for split in splits.values()))
    totals = [sum(cpu for cpu, _ in split.values()) for split in splits.values()]
    print(f"{'total':<20}" + "".join(f"{total * 1e3 / n:>7.1f}" + " " * 7 for total in totals))


if __name__ == "__main__":
    raise SystemExit(main())
