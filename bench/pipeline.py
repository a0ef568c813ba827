"""End-to-end throughput against the model's own cost: ``python -m bench.pipeline [--n 64] [--model seed|demo]``.

Starts a real node (the seed article's InceptionV3 architecture with random weights by default, saved to a
temporary .keras file and loaded like any configured model) with a local DICOM sink as the PACS and a local MLLP
receiver that ACKs the ORUs. In the same process it first times the bare forward pass of that model at the
node's batch size (a compiled ``tf.function``, median). Then, for each transfer syntax of RG1 (UNCR, J2KR,
J2KI), after a warm-up round, ``--senders`` associations push N copies with distinct UIDs as fast as the node
answers, and it measures:

  end-to-end  from the first C-STORE to the last ORU acknowledged, per image; and its ratio to the forward
              pass per image (targets: J2K lossless <= 2x, uncompressed <= 1.5x);
  ingest      images per second the SCP accepted while the node was processing (target >= 30/s);
  C-STORE     reply time p50 / p99 at the senders (target p99 < 0.5 s);
  stages      medians per image of the node's stages: prepare (read, parse, decode, render), model (one pass
              per batch, divided by its size) and output (overlay, Secondary Capture, ORU, durable enqueue).
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
from pynetdicom import AE  # noqa: E402

from dicom_node.dicom_sink import DicomSink  # noqa: E402
from dicom_node.hl7.sink import HL7Sink  # noqa: E402
from dicom_node.settings import DestinationSettings, Settings, load_settings  # noqa: E402

SYNTAXES = ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
TARGETS = {"RG1_UNCR.dcm": 1.5, "RG1_J2KR.dcm": 2.0}
INGEST_TARGET = 30.0
P99_TARGET_MS = 500.0


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class StageTimes:
    """Wraps the node's pipeline stages and records wall time per call (per image for the model pass)."""

    def __init__(self, stages: Any, names: dict[str, str] | None = None) -> None:
        self.samples: dict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        for name, attribute in (names or {"prepare": "prepare", "infer": "infer", "finish": "finish"}).items():
            setattr(stages, attribute, self._timed(name, getattr(stages, attribute)))

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


def _push(port: int, ae_title: str, source: pydicom.Dataset, n: int, senders: int) -> tuple[list[float], float]:
    """Send ``n`` copies of ``source`` (new Study/Series/SOP UIDs each) over ``senders`` associations."""
    copies = []
    for _ in range(n):
        ds = pydicom.Dataset()
        ds.update(source)
        ds.file_meta = source.file_meta
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        copies.append(ds)
    times: list[float] = []
    lock = threading.Lock()
    errors: list[str] = []

    def send(chunk: list[pydicom.Dataset]) -> None:
        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, max_pdu=1_048_576)
        if not assoc.is_established:
            errors.append("association refused")
            return
        for ds in chunk:
            t = time.perf_counter()
            status = assoc.send_c_store(ds)
            elapsed = (time.perf_counter() - t) * 1e3
            with lock:
                times.append(elapsed)
            if getattr(status, "Status", None) != 0:
                errors.append(f"status {getattr(status, 'Status', None)}")
        assoc.release()

    started = time.perf_counter()
    threads = [threading.Thread(target=send, args=(copies[i::senders],)) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"C-STORE failures: {errors[:5]}")
    return times, time.perf_counter() - started


def _acked(ris: HL7Sink) -> int:
    return sum(1 for _ in ris.out_dir.glob("*.hl7"))


def _wait(node: Any, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if failed := node.queue.recent_failures(1):
            raise SystemExit(f"a job failed: {failed[0].reason}")
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the node's outputs")
        time.sleep(0.01)


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
    import tensorflow as tf

    model = processor.model
    network = model.network
    h, w = model.input_size
    x = tf.constant(np.random.default_rng(0).random((batch, h, w, model.channels), dtype=np.float32))
    forward = tf.function(lambda t: network(t, training=False), autograph=False)
    for _ in range(3):
        forward(x).numpy()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        forward(x).numpy()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples) / batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="images per transfer syntax (default 64)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations (default 4)")
    parser.add_argument("--model", choices=("seed", "demo"), default="seed")
    parser.add_argument("--syntaxes", default=",".join(s[4:8] for s in SYNTAXES), help="subset of UNCR,J2KR,J2KI")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a configuration override, as for cxr-lens")
    args = parser.parse_args(argv)

    from dicom_node.pipeline import compose, load_processor

    with tempfile.TemporaryDirectory(prefix="cxr-lens-bench-") as tmp_name:
        tmp = Path(tmp_name)
        settings = load_settings(None, overrides=args.set)
        if args.model == "seed":
            settings = _seed_model_settings(settings, tmp)
        pacs = DicomSink(tmp / "pacs", ae_title="PACS")
        ris = HL7Sink("127.0.0.1", 0, tmp / "hl7")
        pacs.start()
        ris.start()
        settings = settings.model_copy(update={
            "node": settings.node.model_copy(update={"host": "127.0.0.1", "port": 0, "http_port": 0,
                                                     "spool_dir": tmp / "spool", "free_disk_floor_mb": 0}),
            "destinations": (DestinationSettings(ae_title="PACS", host="127.0.0.1", port=pacs.port),),
            "hl7": settings.hl7.model_copy(update={"enabled": True, "host": "127.0.0.1", "port": ris.port}),
        })
        processor = load_processor(settings)
        batch = settings.worker.batch_size
        forward = _forward_ms(processor, batch)
        node = compose(settings, processor)
        if settings.worker.pipelined:
            stages = StageTimes(node.worker._stages)
        else:  # one thread: the Processor's own steps (the model pass is not timed apart)
            stages = StageTimes(processor, {"prepare": "prepare", "finish": "_outputs"})
        print(f"model {processor.model.model_id}; CPU cores {os.cpu_count()}; batch {batch}; "
              f"overlay cap {settings.pixels.overlay_max_long_side}; reduced decode {settings.pixels.reduced_decode}; "
              f"pipelined {settings.worker.pipelined}; decode threads {settings.worker.decode_threads}; "
              f"output threads {settings.worker.output_threads}")
        print(f"bare forward pass: {forward:.1f} ms per image at batch {batch} (median of 15)\n", flush=True)
        rows = []
        node.start()
        try:
            expected = 0
            for name in (s for s in SYNTAXES if s[4:8] in args.syntaxes.split(",")):
                source = pydicom.dcmread(get_testdata_file(name))
                # Warm-up: decoders, the model's batch-size buckets, sender associations.
                expected += batch
                _push(node.scp_port, settings.node.ae_title, source, batch, args.senders)
                _wait(node, lambda: _acked(ris) >= expected, 600)
                stages.reset()
                started = time.perf_counter()
                expected += args.n
                times, ingest_s = _push(node.scp_port, settings.node.ae_title, source, args.n, args.senders)
                _wait(node, lambda: _acked(ris) >= expected and len(pacs.received) >= expected, 600)
                total = time.perf_counter() - started
                samples = stages.reset()
                per_image = total * 1e3 / args.n
                rows.append((name[4:8], per_image, per_image / forward, args.n / ingest_s,
                             _percentile(times, 50), _percentile(times, 99), max(times),
                             *(statistics.median(samples[s]) if samples[s] else float("nan")
                               for s in ("prepare", "infer", "finish"))))
                print(f"  {name}: done", flush=True)
        finally:
            node.stop()
            pacs.stop()
            ris.stop()
            node.dicom_sender.outbox.close()

    header = (f"{'syntax':<7}{'ms/img':>8}{'/fwd':>7}{'target':>8}{'ingest/s':>10}{'p50 ms':>8}{'p99 ms':>8}"
              f"{'max ms':>8}{'prepare':>9}{'model':>8}{'output':>8}")
    print(f"\nEnd to end, {args.n} images per syntax over {args.senders} associations (stage medians in ms/img)")
    print(header)
    print("-" * len(header))
    ok = True
    for syntax, per_image, ratio, ingest, p50, p99, worst, prep, model, out in rows:
        target = TARGETS.get(f"RG1_{syntax}.dcm")
        miss = (target is not None and ratio > target) or ingest < INGEST_TARGET or p99 > P99_TARGET_MS
        ok &= not miss
        print(f"{syntax:<7}{per_image:>8.1f}{ratio:>7.2f}{(f'<={target}' if target else '-'):>8}{ingest:>10.1f}"
              f"{p50:>8.1f}{p99:>8.1f}{worst:>8.1f}{prep:>9.1f}{model:>8.1f}{out:>8.1f}{' !' if miss else ''}")
    print(f"targets: J2KR <= 2.0x and UNCR <= 1.5x the forward pass per image; ingest >= {INGEST_TARGET:g}/s; "
          f"C-STORE p99 < {P99_TARGET_MS:g} ms ('!' marks a miss)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
