"""SIGKILL under load: ``python -m bench.crash [--n 100] [--processes N]``.

Starts a real node (``cxr-lens serve``, demo model, batch size 4) in a subprocess with local PACS and MLLP sinks
(both answering after 0.1 s, so outputs queue in the outbox), and has a re-sending modality stream ``--n``
synthetic CR chest images. The node is SIGKILLed at each of the moments below (see ``KILL_MOMENTS`` in
``bench/scenarios.py``) and restarted on the same spool; each life gets a share of the images. At the end every
image must have its SC at the PACS exactly once (one SOP Instance UID) and its ORU acknowledged exactly once (one
MSH-10); re-deliveries of the same UID or MSH-10 are counted. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.scenarios import KILL_MOMENTS, NodeUnderTest, run_crash, verdict

MOMENTS = ("receiving", "sc-stored", "inference", "oru-stored", "outbox", "inference", "receiving", "outbox",
           "sc-stored", "oru-stored")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="images (default 100)")
    parser.add_argument("--moments", default=",".join(MOMENTS),
                        help=f"comma-separated kill moments, of: {', '.join(KILL_MOMENTS)}")
    parser.add_argument("--processes", type=int, default=0,
                        help="worker.processes (default 0: one process; N: the model and N stage processes apart)")
    args = parser.parse_args(argv)
    moments = [m.strip() for m in args.moments.split(",") if m.strip()]
    with tempfile.TemporaryDirectory(prefix="cxr-lens-bench-crash-") as tmp, \
            NodeUnderTest(Path(tmp), batch_size=4, processes=args.processes) as nut:
        report = run_crash(nut, moments, n=args.n, settle_timeout=900.0)
    print(report.table())
    return verdict(report.problems())


if __name__ == "__main__":
    raise SystemExit(main())
