"""Concurrent associations while the model runs: ``python -m bench.load [--streams 4] [--per-stream 50]``.

Starts a real node (``cxr-lens serve``, demo model, default batch size) in a subprocess with a local DICOM sink as
the PACS and a local MLLP sink, sends a preload to get the model busy, then opens ``--streams`` associations at
once, each sending ``--per-stream`` synthetic 512x512 CR chest images (distinct studies), and prints the C-STORE
reply times (p50, p99, max; each must be under Orthanc's default DicomScuTimeout of 10 s), the images without a
Success, and whether every SC reached the PACS exactly once and every ORU was acknowledged exactly once.
Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.scenarios import NodeUnderTest, run_load, verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=4, help="concurrent associations (default 4)")
    parser.add_argument("--per-stream", type=int, default=50, help="images per association (default 50)")
    parser.add_argument("--preload", type=int, default=16, help="images sent first to get the model busy")
    parser.add_argument("--rows", type=int, default=512, help="image side in pixels (default 512)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cxr-lens-bench-load-") as tmp, NodeUnderTest(Path(tmp)) as nut:
        report = run_load(nut, streams=args.streams, per_stream=args.per_stream, preload=args.preload,
                          rows=args.rows, settle_timeout=900.0)
    print(report.table())
    return verdict(report.problems())


if __name__ == "__main__":
    raise SystemExit(main())
