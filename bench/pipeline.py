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
  stages      medians per image of the node's stages: prepare (read, parse, decode, render), model (one pass
              per batch, divided by its size) and output (overlay, SC, Parametric Map, SR, ORU, durable enqueue).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from bench.peers import Sinks, push  # noqa: E402
from dicom_node.settings import DestinationSettings, Settings, load_settings  # noqa: E402

SYNTAXES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
TARGETS = {"RG1_UNCR.dcm": 1.5, "RG1_J2KR.dcm": 2.0}
INGEST_TARGET = 30.0
P99_TARGET_MS = 500.0


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


def _copies(source: Path, n: int, directory: Path) -> list[Path]:
    """``n`` copies of ``source`` as files (new Study/Series/SOP Instance UIDs each; pixel data as stored)."""
    directory.mkdir(parents=True)
    ds = pydicom.dcmread(source)
    paths = []
    for i in range(n):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(directory / f"{i:05d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


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


def _seed_model_settings(base: Settings, directory: Path) -> Settings:
    from models.architectures import build_seed_inception

    path = directory / "seed_inceptionv3_random.keras"
    build_seed_inception(seed=0).save(path)
    model = base.model.model_copy(update={
        "path": str(path), "id": "seed-inceptionv3-random-weights", "version": "bench",
        "labels": ("covid19", "normal", "pneumonia"), "input_size": (256, 256), "channels": 3,
        "preprocess": "unit", "target_layer": "auto",
    })
    return base.model_copy(update={"model": model})


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=128, help="images per transfer syntax (default 128)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations (default 4)")
    parser.add_argument("--model", choices=("seed", "demo"), default="seed")
    parser.add_argument("--syntaxes", default=",".join(s[4:8] for s in SYNTAXES), help="subset of UNCR,J2KR,J2KI")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a configuration override, as for cxr-lens")
    args = parser.parse_args(argv)
    from dicom_node.startup import configure_process

    configure_process(log_to_stderr=False)  # as the CLI does for a node

    from dicom_node.node import compose
    from dicom_node.process.processor import load_processor
    from dicom_node.storage.backend import is_postgres, redacted

    with tempfile.TemporaryDirectory(prefix="cxr-lens-bench-") as tmp_name:
        tmp = Path(tmp_name)
        settings = load_settings(None, overrides=args.set)
        if args.model == "seed":
            settings = _seed_model_settings(settings, tmp)
        sinks = Sinks(tmp / "peers")
        settings = settings.model_copy(update={
            "node": settings.node.model_copy(update={"host": "127.0.0.1", "port": 0, "http_port": 0,
                                                     "spool_dir": tmp / "spool", "free_disk_floor_mb": 0}),
            "destinations": (DestinationSettings(ae_title="PACS", host="127.0.0.1", port=sinks.pacs_port),),
            "hl7": settings.hl7.model_copy(update={"enabled": True, "host": "127.0.0.1", "port": sinks.hl7_port}),
        })
        processor = load_processor(settings)
        batch = settings.worker.batch_size
        objects = sum(map(bool, (settings.outputs.secondary_capture, settings.outputs.parametric_map,
                                 settings.outputs.structured_report)))
        forward = _forward_ms(processor, batch)
        node = compose(settings, processor)
        stages = StageTimes(node.worker.stages)
        print(f"model {processor.model.model_id}; CPU cores {os.cpu_count()}; batch {batch}; "
              f"overlay cap {settings.pixels.overlay_max_long_side}; reduced decode {settings.pixels.reduced_decode}; "
              f"pipelined {settings.worker.pipelined}; decode threads {settings.worker.decode_threads}; "
              f"output threads {settings.worker.output_threads}; DICOM objects per image {objects}")
        # The queue and outbox store: --set storage.url=postgresql://... compares a PostgreSQL server with SQLite
        # (the server's CPU counts in the machine's column, not the node's).
        print(f"storage: {redacted(settings.storage.url) if is_postgres(settings.storage.url) else 'sqlite'}")
        print(f"bare forward pass: {forward:.1f} ms per image at batch {batch} (median of 15)\n", flush=True)
        rows = []
        node.start()
        try:
            expected = 0
            for name in (s for s in SYNTAXES if s[4:8] in args.syntaxes.split(",")):
                source = Path(get_testdata_file(name))
                warm = _copies(source, batch, tmp / f"{name}-warm")
                files = _copies(source, args.n, tmp / name)
                # Warm-up: decoders, the model's batch-size buckets, sender associations.
                expected += batch
                push(node.scp_port, settings.node.ae_title, warm, args.senders)
                _wait(node, sinks, expected, 600, objects)
                stages.reset()
                expected += args.n
                cpu_at_go: list[tuple[float, float]] = []
                times, first, last_reply = push(node.scp_port, settings.node.ae_title, files, args.senders,
                                                on_go=lambda: cpu_at_go.append(_cpu_seconds()))
                total, ingest_s = _wait(node, sinks, expected, 600, objects) - first, last_reply - first
                node_cpu, machine_cpu = (
                    (after - before) * 1e3 / args.n for before, after in zip(cpu_at_go[0], _cpu_seconds())
                )
                samples = stages.reset()
                per_image = total * 1e3 / args.n
                rows.append((name[4:8], per_image, per_image / forward, args.n / ingest_s,
                             _percentile(times, 50), _percentile(times, 99), max(times),
                             *(statistics.median(samples[s]) if samples[s] else float("nan")
                               for s in ("prepare", "infer", "finish")), node_cpu, machine_cpu))
                print(f"  {name}: done", flush=True)
        finally:
            node.stop()
            sinks.stop()
            node.dicom_sender.outbox.close()

    header = (f"{'syntax':<7}{'ms/img':>8}{'/fwd':>7}{'target':>8}{'ingest/s':>10}{'p50 ms':>8}"
              f"{'p99 ms':>8}{'max ms':>8}{'prepare':>9}{'model':>8}{'output':>8}{'node cpu':>10}{'all cpu':>9}")
    print(f"\nEnd to end, {args.n} images per syntax over {args.senders} associations. ms/img: first C-STORE to "
          f"last output delivered, per image (fill and drain included); /fwd: its ratio to the forward pass "
          f"(stage medians in ms/img). CPU in core-ms per image over the same span: the node's process, and the "
          f"whole machine (peers, which a PACS and an HL7 engine would run elsewhere, included)")
    print(header)
    print("-" * len(header))
    ok = True
    for syntax, per_image, ratio, ingest, p50, p99, worst, prep, model, out, node_cpu, all_cpu in rows:
        target = TARGETS.get(f"RG1_{syntax}.dcm")
        miss = (target is not None and ratio > target) or ingest < INGEST_TARGET or p99 > P99_TARGET_MS
        ok &= not miss
        print(f"{syntax:<7}{per_image:>8.1f}{ratio:>7.2f}{(f'<={target}' if target else '-'):>8}"
              f"{ingest:>10.1f}{p50:>8.1f}{p99:>8.1f}{worst:>8.1f}{prep:>9.1f}{model:>8.1f}{out:>8.1f}"
              f"{node_cpu:>10.0f}{all_cpu:>9.0f}{' !' if miss else ''}")
    print(f"targets: J2KR <= 2.0x and UNCR <= 1.5x the forward pass per image; ingest >= {INGEST_TARGET:g}/s; "
          f"C-STORE p99 < {P99_TARGET_MS:g} ms ('!' marks a miss)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
