"""The benchmarks' peers, each in its own process, as they would be on other machines.

  python -m bench.peers sinks DIR      a DICOM sink (AE ``PACS``, SCs to DIR/pacs) and an MLLP receiver that ACKs
                                       (ORUs to DIR/hl7); prints ``{"pacs": port, "hl7": port}`` and runs until
                                       its standard input closes
  python -m bench.peers send PORT AET FILE...
                                       one association; prints ``ready`` once it is established, waits for a line
                                       on standard input, sends every FILE by C-STORE (as stored: no decoding) and
                                       prints ``{"start": t, "end": t, "ms": [reply time per C-STORE]}`` (monotonic
                                       clock, comparable across processes on one machine)

In the node's process they would share its GIL and skew what is measured: the node meets its peers over the
network, not inside its interpreter. They still share the machine's cores, as a loopback benchmark must.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pydicom
from pydicom.uid import generate_uid


def _sinks(directory: Path) -> int:
    from dicom_node.peers.dicom_sink import DicomSink
    from dicom_node.peers.hl7_sink import HL7Sink

    pacs = DicomSink(directory / "pacs", ae_title="PACS")
    ris = HL7Sink("127.0.0.1", 0, directory / "hl7")
    pacs.start()
    ris.start()
    print(json.dumps({"pacs": pacs.port, "hl7": ris.port}), flush=True)
    sys.stdin.read()  # until the benchmark closes our standard input
    pacs.stop()
    ris.stop()
    return 0


def _send(port: int, ae_title: str, files: list[str]) -> int:
    import pydicom
    from pynetdicom import AE

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    ae = AE(ae_title="BENCHSCU")
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, max_pdu=1_048_576)
    if not assoc.is_established:
        print(json.dumps({"error": "association refused"}), flush=True)
        return 1
    print("ready", flush=True)
    if not sys.stdin.readline():  # the benchmark went away (or gave up): send nothing
        assoc.abort()
        return 1
    times: list[float] = []
    errors: list[str] = []
    start = time.monotonic()
    for path in files:
        t = time.monotonic()
        status = assoc.send_c_store(path)
        times.append((time.monotonic() - t) * 1e3)
        if getattr(status, "Status", None) != 0:
            errors.append(f"status {getattr(status, 'Status', None)}")
    end = time.monotonic()
    assoc.release()
    print(json.dumps({"start": start, "end": end, "ms": times, "errors": errors}), flush=True)
    return 0


def copies(source: Path, n: int, directory: Path) -> list[Path]:
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


def process_cpu(pid: int, *, reaped_children: bool = False) -> tuple[float, float] | None:
    """(CPU, kernel CPU) seconds a process has used, its ended threads included, and with ``reaped_children`` the
    children it has waited for (Linux ``/proc/PID/stat``); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    user, kernel = int(fields[11]), int(fields[12])  # utime, stime
    if reaped_children:
        user, kernel = user + int(fields[13]), kernel + int(fields[14])  # cutime, cstime
    return (user + kernel) / ticks, kernel / ticks


class Sinks:
    """``bench.peers sinks`` as a child process; counts what it has received."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._process = subprocess.Popen([sys.executable, "-m", "bench.peers", "sinks", str(directory)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise SystemExit(f"the sinks process ended at start (exit {self._process.wait()})")
        ports = json.loads(line)
        self.pacs_port, self.hl7_port = int(ports["pacs"]), int(ports["hl7"])

    def received(self) -> tuple[int, int]:
        """(SCs stored, ORUs acknowledged) so far."""
        return _count(self.directory / "pacs", ".dcm"), _count(self.directory / "hl7", ".hl7")

    def stop(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _count(directory: Path, suffix: str) -> int:
    try:
        with os.scandir(directory) as entries:
            return sum(1 for e in entries if e.name.endswith(suffix))
    except FileNotFoundError:
        return 0


def push(
    port: int, ae_title: str, files: list[Path], senders: int, on_go: Callable[[], None] | None = None
) -> tuple[list[float], float, float]:
    """Send ``files`` over ``senders`` associations, one process each, started together once all are ready
    (``on_go`` is called just before: the senders' start-up is not part of what is measured).

    Returns the C-STORE reply times (ms), and the ``time.monotonic()`` of the first C-STORE and of the last reply.
    """
    chunks = [files[i::senders] for i in range(senders) if files[i::senders]]
    processes = [subprocess.Popen([sys.executable, "-m", "bench.peers", "send", str(port), ae_title,
                                   *map(str, chunk)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for chunk in chunks]
    try:
        for p in processes:
            assert p.stdout is not None
            if (line := p.stdout.readline().strip()) != "ready":
                raise SystemExit(f"sender did not associate: {line}")
        if on_go is not None:
            on_go()
        for p in processes:
            _write_line(p.stdin)
        reports = []
        for p in processes:
            out, _ = p.communicate(timeout=1800)
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in processes:  # on any failure above: no sender may go on sending after we are gone
            if p.poll() is None:
                p.kill()
                p.wait()
    errors = [e for r in reports for e in r.get("errors", [])]
    if errors:
        raise SystemExit(f"C-STORE failures: {errors[:5]}")
    times = [t for r in reports for t in r["ms"]]
    return times, min(r["start"] for r in reports), max(r["end"] for r in reports)


def _write_line(stream: IO[str] | None) -> None:
    assert stream is not None
    stream.write("go\n")
    stream.flush()


def main(argv: list[str]) -> int:
    if argv[:1] == ["sinks"] and len(argv) == 2:
        return _sinks(Path(argv[1]))
    if argv[:1] == ["send"] and len(argv) >= 4:
        return _send(int(argv[1]), argv[2], argv[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    threading.current_thread().name = "bench-peer"
    raise SystemExit(main(sys.argv[1:]))
