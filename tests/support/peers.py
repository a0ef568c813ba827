"""Real peers for tests: free ports, dcmtk binaries, and an Orthanc started from a throw-away configuration."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicom_node.peers.node_process import free_port

ORTHANC_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")


def sample(name: str) -> Path:
    """A file from pydicom's test data or pydicom-data (e.g. ``RG1_UNCR.dcm``); skips when absent."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pip install pydicom-data)")
    return Path(path)


def find_binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


def needs_binary(*names: str) -> pytest.MarkDecorator:
    """Skip unless one of ``names`` is installed (CI installs dcmtk, orthanc and dicom3tools)."""
    return pytest.mark.skipif(
        find_binary(*names) is None, reason=f"{names[0]} not installed (Debian packages dcmtk / orthanc)"
    )


def run_tool(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run a command-line peer (echoscu, storescu ...) and capture its output."""
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Orthanc:
    """A running Orthanc: DICOM on ``dicom_port`` (AE ``ae_title``), REST on ``http_port``."""

    process: subprocess.Popen[bytes]
    dicom_port: int
    http_port: int
    ae_title: str
    workdir: Path
    log_path: Path = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | list[Any] | None = None,
                timeout: float = 30.0) -> Any:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/dicom" if isinstance(body, bytes) else "application/json")
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            raw = rsp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as rsp:
            return rsp.read()

    def upload(self, dicom_file: Path | str) -> dict[str, Any]:
        """``POST /instances``; returns Orthanc's answer (ID, ParentStudy, ...)."""
        return self.request("POST", "/instances", Path(dicom_file).read_bytes())

    def push(self, resource_id: str, modality: str = "cxrlens") -> Any:
        """``POST /modalities/{modality}/store``: Orthanc C-STOREs the resource to that modality (synchronously)."""
        return self.request("POST", f"/modalities/{modality}/store", {"Resources": [resource_id], "Synchronous": True})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def start_orthanc(
    workdir: Path,
    *,
    modalities: dict[str, tuple[str, str, int]] | None = None,
    ae_title: str = "ORTHANC",
    startup_timeout: float = 30.0,
    extra_config: dict[str, Any] | None = None,
) -> Orthanc:
    """Start Debian's Orthanc from a temporary configuration and wait until its REST API answers.

    ``modalities`` maps a name to ``(AE title, host, port)``, e.g. ``{"cxrlens": ("CXRLENS", "127.0.0.1", p)}``.
    """
    binary = find_binary(*ORTHANC_CANDIDATES)
    if binary is None:
        raise FileNotFoundError("Orthanc is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = {
        "Name": "cxr-lens-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomScuTimeout": 10,
        "Plugins": [],
        "DicomModalities": {name: list(v) for name, v in (modalities or {}).items()},
        **(extra_config or {}),
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    orthanc = Orthanc(process, dicom_port, http_port, ae_title, workdir, log_path)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}:\n{orthanc.log_tail()}")
        try:
            orthanc.get("/system")
            return orthanc
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.1)
    orthanc.stop()
    raise TimeoutError(f"Orthanc did not answer within {startup_timeout} s:\n{orthanc.log_tail()}")


def dataset_part(part10: bytes) -> bytes:
    """The encoded data set of a DICOM Part 10 file: everything after preamble, prefix and file meta group."""
    assert part10[128:132] == b"DICM", "not a DICOM Part 10 file"
    # (0002,0000) UL, explicit VR little endian: tag, 'UL', length 4, value = length of the rest of group 2.
    assert part10[132:138] == b"\x02\x00\x00\x00UL"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length:]


_COPIED_FROM_SOURCE = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)


def fake_secondary_capture(source: bytes, *, sop_instance_uid: str | None = None) -> bytes:
    """A minimal valid grayscale SC (64x64, 8 bit) in the source's study, as Part 10 bytes (test stand-in for
    the lead's secondary_capture.build)."""
    src = dcmread(BytesIO(source), stop_before_pixels=True)
    uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    for keyword in _COPIED_FROM_SOURCE:
        setattr(ds, keyword, src.get(keyword, ""))
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9901
    ds.InstanceNumber = 1
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Manufacturer = "CXR Lens"
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 64
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(64 * 64) % 256).astype(np.uint8).tobytes()
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
