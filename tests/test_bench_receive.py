"""``bench.receive``: each receiver gets every image, and the node's SCP measured there is the real one.

Full-size run: ``python -m bench.receive`` (128 images per receiver).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from bench import receive
from bench.peers import copies


@pytest.mark.slow
def test_the_node_scp_measured_alone_spools_and_queues_every_image(tmp_path: Path) -> None:
    source = Path(get_testdata_file("RG1_UNCR.dcm"))
    warm_up, files = copies(source, 1, tmp_path / "warm"), copies(source, 3, tmp_path / "in")
    command = [sys.executable, "-m", "bench.receive", "scp", "{port}", str(tmp_path / "node")]
    row = receive.measure("cxr-lens SCP", command, warm_up, files, senders=2)
    with sqlite3.connect(tmp_path / "node" / "jobs.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending'").fetchone()[0] == 4
    assert len(list((tmp_path / "node" / "spool").rglob("*.dcm"))) == 4
    assert row.images_per_s > 0 and row.user_ms >= 0 and row.kernel_ms >= 0


@pytest.mark.slow
def test_every_receiver_answers_success_for_every_image(capsys: pytest.CaptureFixture[str]) -> None:
    rows = receive.main(["--n", "2"])  # push() raises when any C-STORE is not answered Success
    labels = [row.receiver for row in rows]
    assert labels == ["dcmtk storescp, files", "dcmtk storescp, discards", "pynetdicom, no-op", "cxr-lens SCP"]
    table = capsys.readouterr().out
    assert all(label in table for label in labels)
