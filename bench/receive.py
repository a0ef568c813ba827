"""The receiving floor: CPU per image of receivers that only store, side by side: ``python -m bench.receive``.

The same N copies of an RG1 file (distinct UIDs, ``--sample``, default the 7 MB uncompressed one) go over
``--senders`` associations (``bench/peers.py``, a process each) to each receiver in turn, and it prints the
receiver's CPU per image (user and kernel, from ``/proc/<pid>/stat``, its reaped children included) and the images
per second it accepted:

  dcmtk storescp, files     what a C++ SCP costs to receive and write each instance to a file (no fsync)
  dcmtk storescp, discards  the same, writing nothing (``--ignore``): the network's share
  pynetdicom, no-op         pynetdicom's SCP with a handler that answers Success and keeps nothing
  cxr-lens SCP              the node's Storage SCP alone (``dicom_node.receive``): header parse, UID checks,
                            the spool (SHA-256 content key, write, fsync, rename) and the job in SQLite; no worker

What the node's receiving costs over the first line is ours to reduce; the first line is a floor no Python
receiver goes below on the same machine. It says how much of issue #16's CPU budget per image (30 core-ms for
uncompressed RG1) receiving alone leaves. On a virtual machine, writing a file into pages the guest has not
touched recently (or has handed back to the host) costs several times what it costs in recycled pages: the kernel
column shows it, for dcmtk and for us alike.

``python -m bench.receive scp PORT DIR`` runs the node's SCP alone (spool and job store under DIR) until its
standard input closes; the benchmark starts it that way, in its own process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.data import get_testdata_file

from bench.peers import copies, process_cpu, push
from dicom_node.peers.node_process import free_port, wait_until

AE_TITLE = "CXRLENS"
DCMTK_STORESCP = "/usr/bin/storescp"  # by path: pynetdicom installs console scripts of other names and options

# pynetdicom's SCP for every storage SOP class and transfer syntax, answering Success and keeping nothing.
_NO_OP_SCP = """
import sys
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
ae = AE(ae_title=sys.argv[2])
ae.maximum_pdu_size = 1_048_576  # as the node (node.max_pdu)
for context in AllStoragePresentationContexts:
    ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)])
sys.stdin.read()
"""


@dataclass(frozen=True)
class Row:
    receiver: str
    user_ms: float  # core-ms per image
    kernel_ms: float
    images_per_s: float

    @property
    def total_ms(self) -> float:
        return self.user_ms + self.kernel_ms


def _cpu(pid: int) -> tuple[float, float]:
    """(CPU, kernel CPU) seconds of the receiver ``pid``, the children it has reaped included (storescp forks)."""
    cpu = process_cpu(pid, reaped_children=True)
    if cpu is None:
        raise SystemExit(f"the receiver (pid {pid}) is gone")
    return cpu


def _listening(port: int, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise SystemExit(f"the receiver ended at start (exit {process.returncode})")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def measure(label: str, command: list[str], warm_up: list[Path], files: list[Path], senders: int) -> Row:
    """Start ``command`` (``{port}`` replaced), send ``warm_up`` then ``files``, and return its CPU per file."""
    port = free_port()
    process = subprocess.Popen([part.replace("{port}", str(port)) for part in command], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_until(lambda: _listening(port, process), 60):
            raise SystemExit(f"the receiver did not listen on port {port} within 60 s")
        push(port, AE_TITLE, warm_up, senders)
        cpu0, kernel0 = _cpu(process.pid)
        _, start, end = push(port, AE_TITLE, files, senders)
        time.sleep(0.2)  # storescp's last association (and its pynetdicom twin's threads) wind down
        cpu1, kernel1 = _cpu(process.pid)
    finally:
        process.kill()
        process.wait()
        assert process.stdin is not None
        process.stdin.close()
    n = len(files)
    kernel_ms = (kernel1 - kernel0) * 1e3 / n
    return Row(label, (cpu1 - cpu0) * 1e3 / n - kernel_ms, kernel_ms, n / (end - start))


def receivers(directory: Path) -> list[tuple[str, list[str]]]:
    """Each receiver's label and command line; dcmtk's are left out where it is not installed."""
    files = directory / "storescp"
    files.mkdir(parents=True, exist_ok=True)
    found = []
    if Path(DCMTK_STORESCP).exists():
        dcmtk = [DCMTK_STORESCP, "-aet", AE_TITLE, "+xa", "--max-pdu", "131072"]  # dcmtk's largest PDU
        found += [("dcmtk storescp, files", [*dcmtk, "-od", str(files), "{port}"]),
                  ("dcmtk storescp, discards", [*dcmtk, "--ignore", "{port}"])]
    found += [("pynetdicom, no-op", [sys.executable, "-c", _NO_OP_SCP, "{port}", AE_TITLE]),
              ("cxr-lens SCP", [sys.executable, "-m", "bench.receive", "scp", "{port}", str(directory / "node")])]
    return found


def run_scp(port: int, directory: Path) -> int:
    """The node's Storage SCP alone (default settings but the port, spool and job store), until stdin closes."""
    from dicom_node.receive.scp import StorageSCP
    from dicom_node.settings import load_settings
    from dicom_node.startup import configure_process
    from dicom_node.storage.jobs import JobQueue
    from dicom_node.storage.spool import Spool

    configure_process(log_to_stderr=False)
    settings = load_settings(None, [f"node.port={port}", "node.host=127.0.0.1", "node.free_disk_floor_mb=0"])
    scp = StorageSCP(settings.node, Spool(directory / "spool"), JobQueue(directory / "jobs.sqlite"))
    scp.start()
    sys.stdin.read()
    scp.stop()
    return 0


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="images per receiver (default 128)")
    parser.add_argument("--senders", type=int, default=1, help="concurrent associations (default 1: storescp "
                        "without --fork takes one at a time)")
    parser.add_argument("--sample", default="RG1_UNCR.dcm", help="pydicom test file (default RG1_UNCR.dcm)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="cxr-lens-receive-"))
    try:
        source = Path(get_testdata_file(args.sample))
        warm_up, files = copies(source, 4, tmp / "warm"), copies(source, args.n, tmp / "in")
        size = source.stat().st_size
        rows = []
        for label, command in receivers(tmp):
            rows.append(measure(label, command, warm_up, files, args.senders))
            print(f"  {label}: done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.n} x {args.sample} ({size / 1e6:.1f} MB) over {args.senders} association(s); CPU of the "
          f"receiver's process in core-ms per image; {os.cpu_count()} cores")
    print(f"{'receiver':26s} {'CPU':>7s} {'user':>7s} {'kernel':>7s} {'img/s':>7s}")
    for row in rows:
        print(f"{row.receiver:26s} {row.total_ms:7.1f} {row.user_ms:7.1f} {row.kernel_ms:7.1f} "
              f"{row.images_per_s:7.1f}")
    return rows


if __name__ == "__main__":
    if sys.argv[1:2] == ["scp"] and len(sys.argv) == 4:
        raise SystemExit(run_scp(int(sys.argv[2]), Path(sys.argv[3])))
    main()
