"""Node memory over a long stream: ``python -m bench.soak [--n 1000] [--every 100] [--processes N]``.

Starts a real node (``cxr-lens serve``, demo model) in a subprocess with local PACS and MLLP sinks, sends ``--n``
synthetic CR chest images in chunks, waits for each chunk's outputs, and prints the node's RSS (VmRSS, summed over
its processes) before, every ``--every`` images, and after. The check: RSS growth from the end of the warm-up (the
first ``--every`` images, while allocator arenas and TensorFlow's caches fill) to the end stays under
``--bound-mb``; keeping each input image alone would exceed it several times over. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.scenarios import NodeUnderTest, run_memory, verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images processed after the warm-up (default 1000)")
    parser.add_argument("--every", type=int, default=100, help="RSS printed every this many images (default 100)")
    parser.add_argument("--rows", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--bound-mb", type=float, default=100.0, help="allowed growth after warm-up (default 100)")
    parser.add_argument("--processes", type=int, default=0,
                        help="worker.processes (default 0: one process; N: the model and N stage processes apart)")
    args = parser.parse_args(argv)
    t = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cxr-lens-bench-soak-") as tmp, \
            NodeUnderTest(Path(tmp), processes=args.processes) as nut:
        report = run_memory(nut, warmup=args.every, measured=args.n, every=args.every, bound_mb=args.bound_mb,
                            rows=args.rows, settle_timeout=900.0)
    print(report.table())
    print(f"{report.samples[-1][0]} images in {time.monotonic() - t:.0f} s")
    return verdict(report.problems())


if __name__ == "__main__":
    raise SystemExit(main())
