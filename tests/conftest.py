"""Shared pytest configuration for CXR Lens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import config

from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.startup import configure_process

# The process-wide settings the CLI applies at start-up (pytest keeps its own logging and warning filters).
configure_process(log_to_stderr=False)
# Whatever the tests write must be valid DICOM: invalid values raise instead of warning.
config.settings.writing_validation_mode = config.RAISE


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[DicomSink]:
    """A DICOM sink playing the PACS (AE title PACS) on a free port."""
    s = DicomSink(tmp_path / "pacs", ae_title="PACS")
    s.start()
    yield s
    s.stop()
