"""The result as a Comprehensive 3D SR Measurement Report (TID 1500), the IHE AI Results form of a finding.

Pure: takes the source dataset, the result and the identities of the other outputs; returns a new dataset.
The content tree (built with highdicom):

- observation context: a device observer, CXR Lens running the model (the model name says DEMO for the demo);
- procedure reported: (363679005, SCT, "Imaging procedure"), a CID 100 code;
- image library (TID 1600): the source image, with its projection descriptors when the source has them;
- one measurement group (TID 1501) for the image: a tracking identifier, the algorithm (TID 4019: the model id
  as its name and the model version), the source image, the finding site (lung), the predicted finding (the
  group's coded Finding), one measurement per class probability, and qualitative evaluations: the visual
  explanation method and, when trust evidence is given, its verdict and reasons (with the lung share of the
  explanation as one more measurement); and, when given, the Secondary Capture ("Best illustration of finding")
  and the Parametric Map (named by the method's code) as images of the group.

The source, the Secondary Capture and the Parametric Map are also listed in the Current Requested Procedure
Evidence Sequence (PS3.3 C.17.2.3: the instances created for the procedure and those the tree references). Labels,
methods and verdicts map to codes through small mappings: standard codes where one exists, the private scheme
:data:`PRIVATE_SCHEME` (declared in the Coding Scheme Identification Sequence) otherwise.

Identity is deterministic like the overlay's: (source, model id, model version, method) -> series and instance.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

import dicom_node.outputs.iod_lookups  # noqa: F401  (highdicom's IOD lookups cached per process: see there)
from dicom_node.errors import CxrLensError
from dicom_node.outputs.results import NODE_MANUFACTURER, NODE_MODEL_NAME, InferenceResult
from dicom_node.outputs.secondary_capture import _instance_number, software_version

COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
STRUCTURED_REPORT_SERIES_NUMBER = 9903
PRIVATE_SCHEME = "99CXRL"  # "99" prefix: a private coding scheme (PS3.16 8.2)
PROCEDURE_REPORTED = Code("363679005", "SCT", "Imaging procedure")
PROBABILITY_UNIT = Code("{probability}", "UCUM", "probability")
SHARE_UNIT = Code("{ratio}", "UCUM", "ratio")

# Label -> code for the demo model's classes. Neither is a clinical finding (the demo learnt synthetic phantoms),
# so both are private codes; a deployed model's labels get SNOMED CT codes through ``label_codes``.
DEMO_LABEL_CODES: Mapping[str, Code] = MappingProxyType(
    {
        "no_finding": Code("no_finding", PRIVATE_SCHEME, "No finding (model class)"),
        "focal_opacity": Code("focal_opacity", PRIVATE_SCHEME, "Focal opacity (model class)"),
    }
)
# Explanation method -> a CID 217 "Visual Explanation" code; the other CAM variants have no code of their own,
# so they are "Class activation" with the method's name in the algorithm's parameters.
METHOD_CODES: Mapping[str, Code] = MappingProxyType({"gradcam": codes.DCM.GradientWeightedClassActivation})
LUNG_SHARE = Code("lung_share", PRIVATE_SCHEME, "Share of the explanation on the lung fields")
TRUST_VERDICT = Code("trust_verdict", PRIVATE_SCHEME, "Explanation trust verdict")
TRUST_REASON = Code("trust_reason", PRIVATE_SCHEME, "Explanation trust reason")
# The trust evidence's verdicts and reasons (explain.trust's names); others get a private code of their own name.
TRUST_CODES: Mapping[str, Code] = MappingProxyType(
    {
        "ok": Code("ok", PRIVATE_SCHEME, "Explanation on the lung fields"),
        "suspect": Code("suspect", PRIVATE_SCHEME, "Explanation suspect"),
        "no_lung_fields": Code("no_lung_fields", PRIVATE_SCHEME, "No lung fields found"),
        "evidence_on_marker": Code("on_marker", PRIVATE_SCHEME, "Explanation on a burned-in marker"),
        "evidence_on_border": Code("on_border", PRIVATE_SCHEME, "Explanation on the image border"),
        "evidence_outside_lungs": Code("outside_lungs", PRIVATE_SCHEME, "Explanation outside the lung fields"),
    }
)


class StructuredReportError(CxrLensError):
    """The source's header or the result cannot make a valid Structured Report."""


@dataclass(frozen=True)
class InstanceReference:
    """Identity of another output of the same source (Secondary Capture, Parametric Map), in the source's study."""

    sop_class_uid: str
    series_instance_uid: str
    sop_instance_uid: str

    @classmethod
    def of(cls, dataset: Dataset) -> InstanceReference:
        return cls(str(dataset.SOPClassUID), str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))


def structured_report_uids(source: Dataset, result: InferenceResult) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the report for ``source``: stable across re-sends."""
    keys = [result.model_id, result.model_version, result.method]
    series_uid = generate_uid(entropy_srcs=["cxr-lens structured report series", str(source.SeriesInstanceUID), *keys])
    sop_uid = generate_uid(entropy_srcs=["cxr-lens structured report instance", str(source.SOPInstanceUID), *keys])
    return series_uid, sop_uid


def private_code(name: str) -> Code:
    """A code in :data:`PRIVATE_SCHEME` for a name with no mapping: the name is the value, readable as meaning."""
    return Code(name, PRIVATE_SCHEME, name.replace("_", " ").strip().capitalize() or name)


def label_code(label: str, label_codes: Mapping[str, Code] | None = None) -> Code:
    """The code of a model label: ``label_codes`` (from config) first, then the demo's, then a private code."""
    if label_codes is not None and label in label_codes:
        return label_codes[label]
    return DEMO_LABEL_CODES.get(label) or private_code(label)


def method_code(method: str) -> Code:
    return METHOD_CODES.get(method, codes.DCM.ClassActivation)


def series_description(result: InferenceResult) -> str:
    text = f"AI findings ({result.method}) - {result.model_id} {result.model_version}"
    if result.model_label:
        text += " " + result.model_label.split()[0]  # DEMO or TEST
    return text[:64]  # LO


def _valid_pair(source: Dataset, keyword: str) -> bool:
    value = source.get(keyword)
    return value is not None and len(value) == 2 and all(str(v).strip() for v in value)


# TID 1603's projection descriptors and the source attribute each one is read from.
_PROJECTION_DESCRIPTORS: tuple[tuple[Code, str], ...] = (
    (codes.DCM.PatientOrientationRow, "PatientOrientation"),
    (codes.DCM.PatientOrientationColumn, "PatientOrientation"),
    (codes.DCM.HorizontalPixelSpacing, "ImagerPixelSpacing"),
    (codes.DCM.VerticalPixelSpacing, "ImagerPixelSpacing"),
)


def _library_header(source: Dataset) -> tuple[Dataset, list[Code]]:
    """The header the image library (TID 1600) describes, and the descriptors to drop from its entry.

    highdicom reads Patient Orientation and Imager Pixel Spacing of a projection image without guards; where the
    source lacks one, the header carries a placeholder and the rows made from it are dropped afterwards
    (:func:`_drop_descriptors`): TID 1603's rows are optional, a made-up orientation or spacing is not.
    """
    header = Dataset()
    for keyword in (
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "Rows",
        "Columns",
    ):
        setattr(header, keyword, source[keyword].value)
    placeholders = {"PatientOrientation": ["L", "F"], "ImagerPixelSpacing": [1.0, 1.0]}
    dropped: list[Code] = []
    for keyword, placeholder in placeholders.items():
        if _valid_pair(source, keyword):
            setattr(header, keyword, list(source[keyword].value))
        else:
            setattr(header, keyword, placeholder)
            dropped += [code for code, read_from in _PROJECTION_DESCRIPTORS if read_from == keyword]
    return header, dropped


def _drop_descriptors(report: hd.sr.MeasurementReport, dropped: Sequence[Code]) -> None:
    """Remove the image library descriptors named in ``dropped`` (built from placeholders) from ``report``."""
    if not dropped:
        return
    for library in report[0].ContentSequence:
        if library.name != codes.DCM.ImageLibrary:
            continue
        for group in library.ContentSequence:
            for image in group.ContentSequence:
                descriptors = image.get("ContentSequence", [])
                for index in reversed(range(len(descriptors))):
                    if descriptors[index].name in dropped:
                        del descriptors[index]


def _reference_header(source: Dataset, ref: InstanceReference) -> Dataset:
    header = Dataset()
    header.StudyInstanceUID = source.StudyInstanceUID
    header.SeriesInstanceUID = ref.series_instance_uid
    header.SOPClassUID = ref.sop_class_uid
    header.SOPInstanceUID = ref.sop_instance_uid
    return header


def _trust_code(name: str) -> Code:
    return TRUST_CODES.get(name) or private_code(name)


def _evidence_items(evidence: Mapping[str, Any]) -> tuple[list[hd.sr.Measurement], list[hd.sr.QualitativeEvaluation]]:
    """The trust evidence's lung share (a measurement) and its verdict and reasons (qualitative evaluations)."""
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    if evidence.get("lungs") is not None:
        measurements.append(hd.sr.Measurement(name=LUNG_SHARE, value=float(evidence["lungs"]), unit=SHARE_UNIT))
    if evidence.get("verdict"):
        evaluations.append(hd.sr.QualitativeEvaluation(TRUST_VERDICT, _trust_code(str(evidence["verdict"]))))
    for reason in evidence.get("reasons") or ():
        evaluations.append(hd.sr.QualitativeEvaluation(TRUST_REASON, _trust_code(str(reason))))
    return measurements, evaluations


def _measurement_report(
    source: Dataset,
    result: InferenceResult,
    label_codes: Mapping[str, Code] | None,
    evidence: Mapping[str, Any] | None,
    outputs: Sequence[tuple[Code, InstanceReference]],
) -> hd.sr.MeasurementReport:
    keys = [result.model_id, result.model_version, result.method]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(
            entropy_srcs=["cxr-lens device observer", NODE_MODEL_NAME, result.model_id, result.model_version]
        ),
        name=NODE_MANUFACTURER,
        manufacturer_name=NODE_MANUFACTURER,
        model_name=result.model_text[:64],  # "(DEMO MODEL)" for the demo
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    probabilities = [
        hd.sr.Measurement(name=label_code(label, label_codes), value=float(p), unit=PROBABILITY_UNIT)
        for label, p in result.probabilities.items()
    ]
    evaluations = [hd.sr.QualitativeEvaluation(codes.DCM.VisualExplanation, method_code(result.method))]
    if evidence is not None:
        extra_measurements, extra_evaluations = _evidence_items(evidence)
        probabilities += extra_measurements
        evaluations += extra_evaluations
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(entropy_srcs=["cxr-lens tracking", str(source.SOPInstanceUID), *keys]),
            identifier=f"{result.model_id} classification"[:64],
        ),
        finding_type=label_code(result.label, label_codes),
        algorithm_id=hd.sr.AlgorithmIdentification(
            name=result.model_id, version=result.model_version, parameters=[f"explanation method: {result.method}"]
        ),
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Lung)],
        measurements=probabilities,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    # The other outputs as images of the group (TID 1501 row 10b: any purpose); highdicom's constructor takes
    # only "Source of Measurement" images, so they are appended to its container.
    for purpose, ref in outputs:
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=purpose,
                referenced_sop_class_uid=ref.sop_class_uid,
                referenced_sop_instance_uid=ref.sop_instance_uid,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    library_header, dropped = _library_header(source)
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[group],
        referenced_images=[library_header],
    )
    _drop_descriptors(report, dropped)
    return report


@contextmanager
def _handed_over(content: Dataset) -> Iterator[Dataset]:
    """``content``, handed over to highdicom for the ``with`` block: a deep copy of it is the tree itself.

    highdicom's SR constructor deep-copies the content tree it is given, so that a caller may go on using its
    own, and builds its typed view from the copy. Ours is built for that one call and never touched again, and
    the copy was a quarter of the report's cost (~5 of ~21 core-ms per report, measured with ``bench.stages``
    and a side-by-side timing of both ways). The report is the same byte for byte (a test compares it with one
    built from a tree deep-copied as usual); were highdicom to stop copying, this would change nothing.
    """
    object.__setattr__(content, "__deepcopy__", lambda memo: content)  # an instance attribute: copy finds it first
    try:
        yield content
    finally:
        # The report keeps this tree as its typed view: left on it, the attribute would make the tree a reference
        # cycle (freed only by the cycle collector), the report unpicklable, and its later deep copies shared.
        vars(content).pop("__deepcopy__", None)


def _private_scheme_item() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "CXR Lens model classes and explanation trust"
    item.CodingSchemeResponsibleOrganization = NODE_MANUFACTURER
    return item


def build_structured_report(
    source: Dataset,
    result: InferenceResult,
    *,
    secondary_capture: InstanceReference | None = None,
    parametric_map: InstanceReference | None = None,
    label_codes: Mapping[str, Code] | None = None,
    evidence: Mapping[str, Any] | None = None,
) -> Dataset:
    """A TID 1500 Comprehensive 3D SR of ``result`` in the source's study, referencing the source image and the
    other outputs given (``InstanceReference.of(dataset)``).

    ``label_codes`` maps model labels to codes (the ``[outputs]`` config's hook; unmapped labels fall back to
    :data:`DEMO_LABEL_CODES`, then to a private code). ``evidence`` is the trust evidence's ``as_dict()``
    (``{"lungs": 0.81, ..., "verdict": "ok", "reasons": []}``); its absence leaves those items out.
    """
    series_uid, sop_uid = structured_report_uids(source, result)
    # The overlay illustrates the finding; the map is the explanation itself, named by its method's code.
    outputs = [
        (purpose, ref)
        for purpose, ref in (
            (codes.DCM.BestIllustrationOfFinding, secondary_capture),
            (method_code(result.method), parametric_map),
        )
        if ref is not None
    ]
    try:
        content = _measurement_report(source, result, label_codes, evidence, outputs)
        with _handed_over(content[0]) as root:
            sr = hd.sr.Comprehensive3DSR(
                evidence=[source, *(_reference_header(source, ref) for _, ref in outputs)],
                content=root,
                series_instance_uid=series_uid,
                series_number=STRUCTURED_REPORT_SERIES_NUMBER,
                sop_instance_uid=sop_uid,
                instance_number=_instance_number(source),
                manufacturer=NODE_MANUFACTURER,
                is_complete=True,
                is_final=False,  # PRELIMINARY and UNVERIFIED: an AI result no person has read
                series_description=series_description(result),
            )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        # highdicom's and pydicom's messages quote the offending value, which may be patient data: type only.
        message = f"the source header cannot make a Structured Report ({type(exc).__name__})"
        raise StructuredReportError(message) from exc
    sr.ManufacturerModelName = NODE_MODEL_NAME
    sr.SoftwareVersions = [software_version(), f"{result.model_id} {result.model_version}"[:64]]  # type: ignore[assignment]
    sr.CodingSchemeIdentificationSequence = [_private_scheme_item()]
    return sr
