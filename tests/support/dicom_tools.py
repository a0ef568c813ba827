"""Independent judges of the DICOM objects we write: dciodvfy (dicom3tools), dcmj2pnm and dsrdump (dcmtk), and
PixelMed's SR validator."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

requires_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                       reason="dciodvfy (Debian package dicom3tools) is not installed")
requires_dcmtk = pytest.mark.skipif(shutil.which("dcmj2pnm") is None, reason="dcmtk is not installed")
requires_dsrdump = pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dcmtk's dsrdump is not installed")
PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
requires_pixelmed = pytest.mark.skipif(
    shutil.which("java") is None or not PIXELMED_JAR.is_file(),
    reason="PixelMed's SR validator (Debian package pixelmed-apps) is not installed",
)
# PixelMed's compiled XSLT exceeds the XPath operator limits that JDK 17 sets by default.
_JAVA_XPATH_LIMITS_OFF = [
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
]


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dciodvfy reports for a file (warnings are returned by ``dciodvfy_warnings``)."""
    proc = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def dcmj2pnm_png(path: Path, out: Path) -> Path:
    subprocess.run(["dcmj2pnm", "+on", str(path), str(out)], check=True, capture_output=True, timeout=60)
    return out


def dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    """dcmtk's text dump of a Structured Report (``stdout``), with its exit status and ``stderr``."""
    return subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60)


def pixelmed_sr_errors(path: Path) -> list[str]:
    """The error lines of PixelMed's DicomSRValidator (IOD, templates and context groups) for a file."""
    proc = subprocess.run(
        [
            "java",
            *_JAVA_XPATH_LIMITS_OFF,
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert "IOD validation complete" in output, output  # the validator ran to the end
    return [line for line in output.splitlines() if line.startswith("Error")]
