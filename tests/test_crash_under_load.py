"""SIGKILL under load, scaled (issue #6 item 6): a stream of images, the node killed at five moments and
restarted on the same spool each time; every image's SC reaches the PACS once and its ORU is acknowledged once.

Full-size run: ``python -m bench.crash``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.scenarios import NodeUnderTest, run_crash

pytestmark = [pytest.mark.tf, pytest.mark.slow]

MOMENTS = ("receiving", "sc-stored", "inference", "oru-stored", "outbox")  # see KILL_MOMENTS


def test_sigkill_at_five_moments_then_each_output_once(tmp_path: Path) -> None:
    with NodeUnderTest(tmp_path, batch_size=4) as nut:
        report = run_crash(nut, MOMENTS, n=24)
        print(report.table())
        assert report.problems() == [], report.table() + "\n" + nut.node.log_tail()
