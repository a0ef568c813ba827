"""C-STORE reply time while the workers are busy: ``python -m bench.cstore_latency [--n 100]``.

Starts a real node (the configured model, default the demo model) with a local DICOM sink as the PACS and a
local MLLP sink, sends N copies of RG1 (distinct SOP Instance UIDs) over one association as fast as the node
answers, and prints the C-STORE round-trip percentiles measured at the sender, side by side with the same sends
to the idle DICOM sink (a pynetdicom SCP that writes files without fsync), plus how many jobs the workers
finished meanwhile.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE

from dicom_node.node import compose
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink
from dicom_node.settings import DestinationSettings, load_settings


def _send_all(port: int, ae_title: str, ds: pydicom.Dataset, uids: list[str]) -> list[float]:
    """Send ``ds`` once per UID in ``uids`` (as that SOP Instance UID) over one association."""
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, max_pdu=1_048_576)
    if not assoc.is_established:
        raise SystemExit(f"association to {ae_title} refused")
    times = []
    for uid in uids:
        ds.SOPInstanceUID = uid
        t = time.perf_counter()
        status = assoc.send_c_store(ds)
        times.append((time.perf_counter() - t) * 1000.0)
        if status.Status != 0x0000:
            raise SystemExit(f"C-STORE answered 0x{int(status.Status):04X}")
    assoc.release()
    return times


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--sample", default="RG1_UNCR.dcm")
    args = parser.parse_args(argv)
    from dicom_node.startup import configure_process

    configure_process(log_to_stderr=False)  # as the CLI does for a node
    source = pydicom.dcmread(get_testdata_file(args.sample))
    uids = [generate_uid() for _ in range(args.n)]
    with tempfile.TemporaryDirectory(prefix="cxr-lens-bench-") as tmp:
        pacs = DicomSink(Path(tmp) / "pacs", ae_title="PACS")
        pacs.start()
        ris = HL7Sink("127.0.0.1", 0, Path(tmp) / "hl7")
        ris.start()
        baseline = _send_all(pacs.port, "PACS", source, uids[: min(30, args.n)])  # transfer cost, no work behind it
        settings = load_settings(None, ["node.host='127.0.0.1'", "node.port=0", "node.http_port=0",
                                        "node.free_disk_floor_mb=0", f"node.spool_dir='{Path(tmp) / 'spool'}'",
                                        "hl7.host='127.0.0.1'", f"hl7.port={ris.port}"])
        settings = settings.model_copy(update={"destinations": (
            DestinationSettings(ae_title="PACS", host="127.0.0.1", port=pacs.port),)})
        node = compose(settings)
        node.start()
        try:
            warm = _send_all(node.scp_port, settings.node.ae_title, source, uids[:2])  # compile the model's pass
            while node.queue.counts().get("done", 0) < 2:
                time.sleep(0.1)
            t = time.perf_counter()
            times = _send_all(node.scp_port, settings.node.ae_title, source, uids[2:])
            elapsed = time.perf_counter() - t
            done_during = node.queue.counts().get("done", 0) - 2
        finally:
            node.stop()
            pacs.stop()
            ris.stop()
    del warm
    print(f"{len(times)} C-STOREs of {args.sample} ({source.Rows}x{source.Columns}) while the worker ran the "
          f"model; {done_during} jobs finished during the sends ({elapsed:.1f} s)")
    print(f"{'':<28}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    print(f"{'node (durable spool+queue)':<28}{statistics.median(times):>10.1f}{_pct(times, 99):>10.1f}"
          f"{max(times):>10.1f}")
    print(f"{'sink (pynetdicom, no fsync)':<28}{statistics.median(baseline):>10.1f}{_pct(baseline, 99):>10.1f}"
          f"{max(baseline):>10.1f}")
    print(f"ingest rate {len(times) / elapsed:.1f} images/s; node p50 / sink p50 = "
          f"{statistics.median(times) / statistics.median(baseline):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
