"""What the output builders' tests feed them: an inference result, and source radiographs with real header gaps."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.data import get_testdata_file

from dicom_node.outputs.results import InferenceResult
from dicom_node.peers.synthetic_cr import make_cr_dataset

# The kinds of :func:`source_radiograph`: pydicom's RG1 and synthetic radiographs, each with another gap.
SOURCE_KINDS = ["rg1", "cr_without_orientation", "cr_monochrome1_empty_orientation", "dx_with_imager_spacing"]


@dataclass(frozen=True)
class StandInModel:
    """The fields of ``models.loading.LoadedModel`` the processor reads; the demo model's by default."""

    labels: tuple[str, ...] = ("no_finding", "focal_opacity")
    model_id: str = "cxr-lens-demo-cnn"
    version: str = "1.0.0"
    is_demo: bool = True
    input_size: tuple[int, int] = (256, 256)
    channels: int = 1
    preprocess: str = "unit"


@dataclass(frozen=True)
class StandInExplanation:
    """What ``explain.explain`` returns for a batch of one: ``heatmaps`` (1, h, w) and the probabilities."""

    heatmaps: np.ndarray
    probabilities: np.ndarray
    class_index: np.ndarray = field(default_factory=lambda: np.array([1]))
    method: str = "gradcam"
    target_layer: str = "conv"


def inference_result(**changes: object) -> InferenceResult:
    """The demo model's "focal_opacity" call explained by Grad-CAM; keyword arguments change a field."""
    base = dict(
        label="focal_opacity",
        class_index=1,
        probabilities={"no_finding": 0.2, "focal_opacity": 0.8},
        method="gradcam",
        model_id="cxr-lens-demo-cnn",
        model_version="1.0.0",
        is_demo=True,
        heatmap_max=3.5,
        no_evidence=False,
    )
    base.update(changes)
    return InferenceResult(**base)  # type: ignore[arg-type]


def source_radiograph(kind: str, rows: int = 64, cols: int = 60) -> pydicom.Dataset:
    """A source covering one header gap of real radiographs (see :data:`SOURCE_KINDS`).

    RG1 is MONOCHROME1 with Pixel Spacing 0\\0 and no Imager Pixel Spacing, at its own size; the synthetic ones
    are ``rows`` x ``cols``.
    """
    if kind == "rg1":
        return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    if kind == "cr_without_orientation":
        ds = make_cr_dataset(rows=rows, cols=cols)
        del ds.PatientOrientation
        return ds
    if kind == "cr_monochrome1_empty_orientation":
        ds = make_cr_dataset(rows=rows, cols=cols, photometric="MONOCHROME1")
        ds.PatientOrientation = ""
        return ds
    if kind == "dx_with_imager_spacing":
        ds = make_cr_dataset(rows=rows, cols=cols, modality="DX")
        ds.ImagerPixelSpacing = [0.15, 0.143]
        return ds
    raise ValueError(kind)


def part10_bytes(dataset: pydicom.Dataset) -> bytes:
    """``dataset`` as a Part 10 file's bytes (preamble, file meta, data set), as the node stores its outputs."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
