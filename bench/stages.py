"""Where one image's CPU goes, step by step, in one thread: ``python -m bench.stages [--n 32] [--model demo|seed]``.

``bench.pipeline`` gives the node's CPU per image by process and thread role; this gives the bill of one image's
work by step, so that a budget can be set per output and a change measured where it acts. For each transfer
syntax of RG1 (UNCR, J2KR, J2KI) it runs the node's own code on N images, one after the other in this thread, with
nothing else running, and prints core-ms per image (``time.thread_time``; rendering and the model pass, which run
on the JPEG 2000 decoder's and the framework's threads too, in ``time.process_time``):

  spool key     SHA-256 of the received bytes (``Spool.key_for``, what the C-STORE handler hashes)
  parse         the spooled file's header and a view of its Pixel Data (``read_file``)
  render        decode at the needed level, viewer rendering, model input (``Processor.prepare``)
  model         the compiled prediction + heatmap pass at the node's batch size, per image
  outputs       ``Processor.build_outputs``: trust, overlay, the DICOM objects ``[outputs]`` enables and the ORU;
                split below it by its own step timings (wall ms in this one thread)
  enqueue       the outputs into a SQLite outbox with one DICOM destination and HL7 (``enqueue_outputs``),
                writing each DICOM object as a Part 10 file's bytes included (shown below it, measured apart)

Not here: receiving (``bench.receive``), sending, and what processes and threads add (``bench.pipeline``).
``--set outputs.structured_report=false`` (any ``section.key=value``) changes the configuration as for cxr-lens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pydicom.data import get_testdata_file  # noqa: E402

from bench.pipeline import bench_settings, selected_syntaxes  # noqa: E402
from dicom_node.settings import DestinationSettings, HL7Settings  # noqa: E402

#: build_outputs' own step timings, in the order it runs them
OUTPUT_STEPS = ("trust", "overlay", "secondary_capture", "parametric_map", "structured_report", "hl7")


def _kind(dataset: Any) -> str:
    """SC, map or SR: which of the node's DICOM objects ``dataset`` is."""
    name = str(dataset.SOPClassUID.name)
    kinds = {"Secondary Capture": "SC", "Parametric Map": "map", " SR ": "SR"}
    return next((kind for key, kind in kinds.items() if key in name), name)


def measure(processor: Any, data: bytes, n: int, batch: int, outbox_dir: Path) -> list[tuple[str, float]]:
    """``(step, core-ms per image)`` over ``n`` copies of the spooled file ``data`` (after one warm-up round), in
    the order they run; a step's parts follow it, their names indented."""
    from dicom_node.deliver.dicom import DicomSender
    from dicom_node.deliver.hl7 import HL7Sender
    from dicom_node.process.processor import Prepared, _parse_spooled, _part10_bytes, enqueue_outputs
    from dicom_node.storage.outbox import Outbox
    from dicom_node.storage.spool import Spool

    outbox = Outbox(outbox_dir / "outbox.sqlite")
    destination = DestinationSettings(ae_title="PACS", host="127.0.0.1", port=104)  # never sent to here
    dicom_sender = DicomSender(outbox, [destination], ae_title="CXRLENS")
    hl7_sender = HL7Sender(outbox, HL7Settings(enabled=True, host="127.0.0.1", port=2575))
    totals: dict[str, float] = defaultdict(float)
    parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def timed(name: str, clock: Callable[[], float], call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = clock()
        out = call(*args, **kwargs)
        totals[name] += (clock() - start) * 1e3
        return out

    for _ in range(2):  # the first round warms up (model buckets, caches) and is not counted
        totals.clear()
        parts.clear()
        done = 0
        while done < n:
            items: list[Prepared] = []
            for _ in range(min(batch, n - done)):
                timed("spool key", time.thread_time, Spool.key_for, data)
                instance = timed("parse", time.thread_time, _parse_spooled, data)
                item = timed("render", time.process_time, processor.prepare, instance.header, instance.pixel_data)
                assert isinstance(item, Prepared), item
                items.append(item)
            results = timed("model", time.process_time, processor.infer, items)
            for item, result in zip(items, results, strict=True):
                done += 1
                outputs = timed("outputs", time.thread_time, processor.build_outputs, item, result)
                for step in OUTPUT_STEPS:
                    if step in outputs.result.timings_ms:
                        parts["outputs"][step].append(outputs.result.timings_ms[step])
                for dataset in outputs.dicom_outputs:  # apart, for its own figure: enqueue writes them again
                    start = time.thread_time()
                    _part10_bytes(dataset)
                    parts["enqueue"][f"Part 10 {_kind(dataset)}"].append(
                        (time.thread_time() - start) * 1e3)
                timed("enqueue", time.thread_time, enqueue_outputs, done, outputs, dicom_sender, hl7_sender,
                      received_at=time.time())
    outbox.close()
    rows: list[tuple[str, float]] = []
    for name, total in totals.items():
        rows.append((name, total / n))
        rows += [(f"  {part}", statistics.fmean(values)) for part, values in parts[name].items()]
    return rows


def main(argv: list[str] | None = None) -> dict[str, list[tuple[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="images per transfer syntax (default 32)")
    parser.add_argument("--model", choices=("seed", "demo"), default="demo")
    parser.add_argument("--syntaxes", default="UNCR,J2KR,J2KI", help="subset of UNCR,J2KR,J2KI")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a configuration override, as for cxr-lens")
    args = parser.parse_args(argv)
    from dicom_node.process.processor import load_processor
    from dicom_node.startup import configure_process, freeze_heap

    configure_process(log_to_stderr=False)  # as the CLI does for a node: OpenCV on the calling thread, and so on
    rows: dict[str, list[tuple[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-lens-stages-") as tmp_name:
        tmp = Path(tmp_name)
        settings = bench_settings(args.set, args.model, tmp)
        processor = load_processor(settings)
        freeze_heap()  # as the node does once its model is loaded
        batch = settings.worker.batch_size
        for name in selected_syntaxes(args.syntaxes):
            data = Path(str(get_testdata_file(name))).read_bytes()
            (tmp / name).mkdir()
            rows[name[4:8]] = measure(processor, data, args.n, batch, tmp / name)
    names = [name for name, _ in next(iter(rows.values()))]
    print(f"\nmodel {processor.model.model_id}; {args.n} images per syntax, one thread, batch {batch}; core-ms per "
          f"image (indented: a step's parts, not added again to the total; those of outputs are its own timings, "
          f"wall ms in this thread); {os.cpu_count()} cores")
    print(f"{'step':24s}" + "".join(f"{syntax:>8s}" for syntax in rows))
    values = {syntax: dict(row) for syntax, row in rows.items()}
    for name in names:
        print(f"{name:24s}" + "".join(f"{values[syntax].get(name, float('nan')):8.1f}" for syntax in rows))
    print(f"{'total':24s}" + "".join(f"{sum(v for k, v in row if not k.startswith(' ')):8.1f}"
                                      for row in rows.values()))
    return rows


if __name__ == "__main__":
    main()
