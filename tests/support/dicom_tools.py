"""Independent judges of the DICOM objects we write: dciodvfy (dicom3tools) and dcmj2pnm (dcmtk)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

requires_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                       reason="dciodvfy (Debian package dicom3tools) is not installed")
requires_dcmtk = pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="dcmtk is not installed")


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy reports for a file (warnings are returned by ``dciodvfy_warnings``)."""
    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dcmj2pnm_png(path: Path, out: Path) -> Path:
    subprocess.run(["dcmj2pnm", "+on", str(path), str(out)], check=True, capture_output=True, timeout=60)
    return out
