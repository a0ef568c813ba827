"""ORU^R01 builder: strict v2.5.1 validation, a second parser as oracle, escaping, DICOM -> HL7 mappings."""

from __future__ import annotations

import base64
import copy
import dataclasses
import random
import zlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import MaxLengthReached, ValidationError
from hl7apy.parser import parse_message
from pydicom import Dataset, config
from pydicom.sequence import Sequence

from dicom_node.outputs.oru import (
    OBS_LUNG_SHARE,
    OBS_TRUST_VERDICT,
    TRUST_VERDICT_CODES,
    ORUBuildError,
    _text,
    build_oru,
    da_tm_to_ts,
    dt_to_ts,
    escape,
    new_message_control_id,
)
from dicom_node.outputs.results import (
    AI_DISCLAIMER,
    DEMO_LABEL,
    TEST_LABEL,
    InferenceResult,
    OverlayRef,
)
from dicom_node.settings import HL7Settings
from tests.support.hl7apy_reference import build_oru_hl7apy, validate_with_standins
from tests.support.outputs import inference_result

NOW = datetime(2024, 3, 5, 14, 30, 15, tzinfo=timezone(timedelta(hours=1)))
CONTROL_ID = "CTL0000000000000001"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"
SOP_UID = "1.2.826.0.1.3680043.8.498.3"
PM_UID = "1.2.826.0.1.3680043.8.498.4"
SR_UID = "1.2.826.0.1.3680043.8.498.5"


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG (67 bytes): its Base64 fits hl7apy's STRICT limit of 199 characters per component."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = chunk(b"IDAT", zlib.compress(b"\x00\x80"))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def make_source(**attributes: object) -> Dataset:
    """A CR chest source dataset with the attributes the ORU reads; keyword overrides, None removes."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.9"
    ds.StudyInstanceUID = STUDY_UID
    ds.PatientID = "PAT-001"
    ds.IssuerOfPatientID = "HOSPITAL_A"
    ds.PatientName = "Doe^Jane^Q^Dr.^III"
    ds.PatientBirthDate = "19700102"
    ds.PatientSex = "F"
    ds.AccessionNumber = "ACC-42"
    ds.StudyDate = "20240305"
    ds.StudyTime = "101520.123456"
    ds.Modality = "CR"
    for keyword, value in attributes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def make_result(is_demo: bool = False) -> InferenceResult:
    return inference_result(probabilities={"no_finding": 0.12345678, "focal_opacity": 0.87654322}, is_demo=is_demo,
                            heatmap_max=0.8)


# Trust evidence as explain.trust.Evidence.as_dict() gives it.
EVIDENCE_OK = {"lungs": 0.81, "body": 0.12, "outside_body": 0.02, "border": 0.03, "markers": 0.02,
               "peak_region": "lungs", "verdict": "ok", "reasons": []}
EVIDENCE_SUSPECT = {"lungs": 0.031, "body": 0.2, "outside_body": 0.029, "border": 0.1, "markers": 0.64,
                    "peak_region": "markers", "verdict": "suspect",
                    "reasons": ["evidence_on_marker", "evidence_outside_lungs"]}
EVIDENCE_NO_LUNGS = {"lungs": 0.0, "body": 0.7, "outside_body": 0.1, "border": 0.2, "markers": 0.0,
                     "peak_region": "body", "verdict": "no_lung_fields", "reasons": []}


def with_evidence(evidence: dict[str, object] | None, **changes: object) -> InferenceResult:
    return dataclasses.replace(make_result(), evidence=evidence, **changes)


def make_overlay(png: bytes | None = None) -> OverlayRef:
    return OverlayRef(STUDY_UID, SERIES_UID, SOP_UID, png)


def build(
    source: Dataset | None = None,
    result: InferenceResult | None = None,
    overlay: OverlayRef | None = None,
    settings: HL7Settings | None = None,
) -> str:
    return build_oru(
        source if source is not None else make_source(),
        result or make_result(),
        overlay or make_overlay(tiny_png()),
        settings or HL7Settings(),
        message_control_id=CONTROL_ID,
        now=NOW,
    )


def segments(er7: str, segment_id: str) -> list[str]:
    return [line for line in er7.split("\r") if line.startswith(segment_id + "|")]


def obx_by_code(message: hl7.Message, text: str) -> hl7.Segment:
    """The OBX whose OBX-3 code or text is ``text``."""
    for obx in message.segments("OBX"):
        if text in (message.unescape(str(obx[3][0][0])), message.unescape(str(obx[3][0][1]))):
            return obx
    raise AssertionError(f"no OBX {text}")


def test_message_validates_strictly_and_hl7apy_reproduces_every_segment() -> None:
    er7 = build()
    assert er7.endswith("\r") or er7.split("\r")[-1].startswith("OBX|")
    parsed = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert parsed.validate() is True
    assert parsed.to_er7() == er7.rstrip("\r")
    ids = [line[:3] for line in er7.split("\r") if line]
    assert ids[:6] == ["MSH", "PID", "ORC", "OBR", "NTE", "OBX"]
    assert set(ids[5:]) == {"OBX"}


def test_msh_carries_settings_and_ack_types() -> None:
    settings = HL7Settings(
        sending_application="CXR_LENS",
        sending_facility="RAD",
        receiving_application="HS",
        receiving_facility="IRIS",
        processing_id="T",
        accept_ack_type="AL",
        application_ack_type="AL",
    )
    msg = hl7.parse(build(settings=settings))
    msh = msg.segment("MSH")
    assert [str(msh[i]) for i in (3, 4, 5, 6)] == ["CXR_LENS", "RAD", "HS", "IRIS"]
    assert str(msh[7]) == "20240305143015+0100"
    assert str(msh[9]) == "ORU^R01^ORU_R01"
    assert str(msh[10]) == CONTROL_ID
    assert str(msh[11]) == "T"
    assert str(msh[12]) == "2.5.1"
    assert str(msh[15]) == "AL" and str(msh[16]) == "AL"


def test_both_parsers_read_the_same_values() -> None:
    er7 = build()
    msg = hl7.parse(er7)
    apy = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    patient = apy.oru_r01_patient_result.oru_r01_patient.pid
    order = apy.oru_r01_patient_result.oru_r01_order_observation
    pairs = [
        (patient.pid_3.cx_1.to_er7(), msg.extract_field("PID", 1, 3, 1, 1), "PAT-001"),
        (patient.pid_3.cx_4.to_er7(), msg.extract_field("PID", 1, 3, 1, 4), "HOSPITAL_A"),
        (patient.pid_5.xpn_1.to_er7(), msg.extract_field("PID", 1, 5, 1, 1), "Doe"),
        (patient.pid_7.to_er7(), msg.extract_field("PID", 1, 7), "19700102"),
        (patient.pid_8.to_er7(), msg.extract_field("PID", 1, 8), "F"),
        (order.orc.orc_1.to_er7(), msg.extract_field("ORC", 1, 1), "SC"),
        (order.orc.orc_3.to_er7(), msg.extract_field("ORC", 1, 3), "ACC-42"),
        (order.obr.obr_4.to_er7(), str(msg.segment("OBR")[4]), "36643-5^XR Chest 2V^LN"),
        (order.obr.obr_7.to_er7(), msg.extract_field("OBR", 1, 7), "20240305101520.1234"),
        (order.obr.obr_18.to_er7(), msg.extract_field("OBR", 1, 18), "ACC-42"),
        (order.obr.obr_24.to_er7(), msg.extract_field("OBR", 1, 24), "RAD"),
        (order.obr.obr_25.to_er7(), msg.extract_field("OBR", 1, 25), "P"),
        (order.nte[0].nte_3.to_er7(), msg.extract_field("NTE", 1, 3), AI_DISCLAIMER),
    ]
    for apy_value, hl7_value, expected in pairs:
        assert msg.unescape(apy_value) == hl7_value == expected
    observations = order.oru_r01_observation
    assert len(observations) == len(msg.segments("OBX"))
    for group, obx in zip(observations, msg.segments("OBX"), strict=True):
        assert group.obx.to_er7() == str(obx)
        assert str(obx[11]) == "P"


def test_observations_profile() -> None:
    msg = hl7.parse(build())
    finding = obx_by_code(msg, "AIFINDING")
    assert str(finding[2]) == "CWE"
    assert str(finding[5]) == "focal_opacity^focal_opacity^99CXRL"
    no_finding = obx_by_code(msg, "AIPROB.no_finding")
    assert (str(no_finding[2]), str(no_finding[5]), str(no_finding[6][0][0])) == ("NM", "0.123457", "1")
    assert str(obx_by_code(msg, "AIPROB.focal_opacity")[5]) == "0.876543"
    assert str(obx_by_code(msg, "AIXAI")[5]) == "gradcam"
    assert str(obx_by_code(msg, "AIMODEL")[5]) == "cxr-lens-demo-cnn 1.0.0"
    lines = {line.split("|")[3]: line for line in segments(build(), "OBX")}
    assert lines["113014^DICOM Study^DCM"].split("|", 2)[2] == f"ST|113014^DICOM Study^DCM||{STUDY_UID}||||||P"
    assert lines["112002^Series Instance UID^DCM"].split("|")[2] == "ST"
    assert lines["112002^Series Instance UID^DCM"].split("|")[5] == SERIES_UID
    assert lines["^SOP Instance UID"].split("|", 2)[2] == f"HD|^SOP Instance UID||{SOP_UID}||||||P"
    set_ids = [int(str(obx[1])) for obx in msg.segments("OBX")]
    assert set_ids == list(range(1, len(set_ids) + 1))


def test_parametric_map_and_report_follow_the_overlay_lines() -> None:
    er7 = build_oru(make_source(), make_result(), make_overlay(tiny_png()), HL7Settings(),
                    message_control_id=CONTROL_ID, now=NOW, parametric_map_uid=PM_UID, structured_report_uid=SR_UID)
    msg = hl7.parse(er7)
    pm, sr = obx_by_code(msg, "AIPMAP"), obx_by_code(msg, "AISR")
    assert [str(pm[2]), str(pm[3]), str(pm[5]), str(pm[11])] == [
        "HD", "AIPMAP^Parametric Map SOP Instance UID^99CXRL", PM_UID, "P"]
    assert [str(sr[2]), str(sr[3]), str(sr[5]), str(sr[11])] == [
        "HD", "AISR^Structured Report SOP Instance UID^99CXRL", SR_UID, "P"]
    order = [str(obx[3]) for obx in msg.segments("OBX")]
    assert order[-4:] == ["^SOP Instance UID", str(pm[3]), str(sr[3]), "AIOVERLAY^Grad-CAM overlay^99CXRL"]
    # The lines before them are those of a message without them, unchanged.
    plain = build()
    assert er7.split("\r")[:-3] == plain.split("\r")[:-1]
    assert er7.split("\r")[-1].split("|", 2)[2] == plain.split("\r")[-1].split("|", 2)[2]


@pytest.mark.parametrize(
    "patient_id",
    ["ID^1&2~3|4", "back\\slash", "looks\\F\\escaped", "\\E\\", "plain"],
)
def test_patient_id_with_delimiters_round_trips(patient_id: str) -> None:
    # A backslash makes a DICOM LO multi-valued; the ORU keeps the DICOM string, backslashes included.
    er7 = build(make_source(PatientID=patient_id, IssuerOfPatientID="A&B^C|E\\F", AccessionNumber="ACC|9^8"))
    msg = hl7.parse(er7)
    assert msg.extract_field("PID", 1, 3, 1, 1) == patient_id
    assert msg.extract_field("PID", 1, 3, 1, 4) == "A&B^C|E\\F"
    assert msg.extract_field("OBR", 1, 18) == msg.extract_field("ORC", 1, 3) == "ACC|9^8"
    apy = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert apy.validate() is True
    pid = apy.oru_r01_patient_result.oru_r01_patient.pid
    assert msg.unescape(pid.pid_3.cx_1.to_er7()) == patient_id


def test_person_name_with_delimiters_round_trips() -> None:
    name = "Mc&Don|ald~X^Jo&hn^Q|R^Dr.~^J&r."
    msg = hl7.parse(build(make_source(PatientName=name)))
    got = [msg.extract_field("PID", 1, 5, 1, i) for i in range(1, 6)]
    assert got == ["Mc&Don|ald~X", "Jo&hn", "Q|R", "J&r.", "Dr.~"]


def test_pn_to_xpn_swaps_prefix_and_suffix() -> None:
    msg = hl7.parse(build(make_source(PatientName="Family^Given^Middle^Prefix^Suffix")))
    assert str(msg.segment("PID")[5]) == "Family^Given^Middle^Suffix^Prefix"
    msg = hl7.parse(build(make_source(PatientName="Family^Given")))
    assert str(msg.segment("PID")[5]) == "Family^Given"
    # Only the alphabetic group of a PN goes to XPN.
    msg = hl7.parse(build(make_source(PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう")))
    assert str(msg.segment("PID")[5]) == "Yamada^Tarou"


def test_missing_attributes_give_empty_fields_never_none() -> None:
    bare = Dataset()
    bare.StudyInstanceUID = STUDY_UID
    er7 = build(bare)
    assert "None" not in er7
    # PID-3 is required in v2.5.1; without a DICOM Patient ID it is sent empty and the receiver decides.
    apy = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    with pytest.raises(ValidationError, match="PID.PID_3"):
        apy.validate()
    msg = hl7.parse(er7)
    for segment, field in [("PID", 3), ("PID", 5), ("PID", 7), ("PID", 8), ("ORC", 2), ("ORC", 3), ("OBR", 7)]:
        assert msg.extract_field(segment, 1, field) == "", f"{segment}-{field}"
    assert msg.extract_field("OBR", 1, 18) == ""
    assert str(msg.segment("OBR")[4]) == "36643-5^XR Chest 2V^LN"  # configured fallback


def test_empty_values_are_treated_as_missing() -> None:
    er7 = build(make_source(PatientID="", PatientName="", PatientSex="", StudyTime=""))
    msg = hl7.parse(er7)
    assert msg.extract_field("PID", 1, 3) == msg.extract_field("PID", 1, 5) == msg.extract_field("PID", 1, 8) == ""
    assert msg.extract_field("OBR", 1, 7) == "20240305"


@pytest.mark.parametrize(("dicom", "hl7_sex"), [("M", "M"), ("F", "F"), ("O", "O"), ("X", "U")])
def test_sex(dicom: str, hl7_sex: str) -> None:
    assert hl7.parse(build(make_source(PatientSex=dicom))).extract_field("PID", 1, 8) == hl7_sex


@pytest.mark.parametrize(
    ("date", "time", "offset", "ts"),
    [
        ("20240305", "", "", "20240305"),
        ("20240305", "10", "", "2024030510"),
        ("20240305", "1015", "", "202403051015"),
        ("20240305", "101520", "", "20240305101520"),
        ("20240305", "101520.1", "", "20240305101520.1"),
        ("20240305", "101520.123456", "", "20240305101520.1234"),
        ("20240305", "235959.999999", "", "20240305235959.9999"),  # truncated, never rounded into the next day
        ("20240305", "101520.", "", "20240305101520"),
        ("20240305", "10:15:20", "", "20240305101520"),  # ACR-NEMA form
        ("2024.03.05", "", "", "20240305"),
        ("20240305", "101520", "+0100", "20240305101520+0100"),
        ("20240305", "", "+0100", "20240305"),
        ("20240305", "101520", "bad", "20240305101520"),
        ("20240305", "25", "", "20240305"),  # invalid time: the date alone
        ("20241305", "1015", "", ""),
        ("2024030", "", "", ""),
        ("", "101520", "", ""),
        ("", "", "", ""),
    ],
)
def test_da_tm_to_ts(date: str, time: str, offset: str, ts: str) -> None:
    assert da_tm_to_ts(date, time, offset) == ts


@pytest.mark.parametrize(
    ("dt", "offset", "ts"),
    [
        ("2024", "", "2024"),
        ("202403", "", "202403"),
        ("20240305101520.123456+0100", "", "20240305101520.1234+0100"),
        ("20240305101520", "-0500", "20240305101520-0500"),
        ("20240305101520+0100", "-0500", "20240305101520+0100"),
        ("2024030510", "", "2024030510"),
        ("20240305106", "", ""),
        ("garbage", "", ""),
    ],
)
def test_dt_to_ts(dt: str, offset: str, ts: str) -> None:
    assert dt_to_ts(dt, offset) == ts


def test_observation_time_uses_timezone_offset_and_falls_back_to_acquisition_datetime() -> None:
    msg = hl7.parse(build(make_source(TimezoneOffsetFromUTC="-0300")))
    assert msg.extract_field("OBR", 1, 7) == "20240305101520.1234-0300"
    source = make_source(StudyDate=None, StudyTime=None, AcquisitionDateTime="20240304235900.5")
    assert hl7.parse(build(source)).extract_field("OBR", 1, 7) == "20240304235900.5"


def test_procedure_code_from_requested_procedure_code_sequence() -> None:
    item = Dataset()
    item.CodeValue = "RPID^1"
    item.CodeMeaning = "Chest & ribs"
    item.CodingSchemeDesignator = "99ORD"
    msg = hl7.parse(build(make_source(RequestedProcedureCodeSequence=Sequence([item]))))
    assert [msg.extract_field("OBR", 1, 4, 1, i) for i in (1, 2, 3)] == ["RPID^1", "Chest & ribs", "99ORD"]


def test_placer_order_number_from_request_attributes() -> None:
    request = Dataset()
    request.PlacerOrderNumberImagingServiceRequest = "PLACER-7"
    msg = hl7.parse(build(make_source(RequestAttributesSequence=Sequence([request]))))
    assert msg.extract_field("ORC", 1, 2) == msg.extract_field("OBR", 1, 2) == "PLACER-7"
    assert msg.extract_field("ORC", 1, 3) == msg.extract_field("OBR", 1, 3) == "ACC-42"


def test_demo_model_is_labelled() -> None:
    er7 = build(result=make_result(is_demo=True))
    msg = hl7.parse(er7)
    finding = obx_by_code(msg, "AIFINDING")
    assert msg.unescape(str(finding[5][0][1])) == f"focal_opacity ({DEMO_LABEL})"
    assert DEMO_LABEL in str(obx_by_code(msg, "AIMODEL")[5])
    notes = [msg.unescape(str(nte[3])) for nte in msg.segments("NTE")]
    assert notes == [AI_DISCLAIMER, DEMO_LABEL]
    assert DEMO_LABEL not in build(result=make_result(is_demo=False))


def test_test_model_is_labelled_like_the_demo_model() -> None:
    msg = hl7.parse(build(result=with_evidence(None, model_id="cxr-lens-shortcut-test-cnn", is_test=True)))
    assert msg.unescape(str(obx_by_code(msg, "AIFINDING")[5][0][1])) == f"focal_opacity ({TEST_LABEL})"
    assert str(obx_by_code(msg, "AIMODEL")[5]) == f"cxr-lens-shortcut-test-cnn 1.0.0 ({TEST_LABEL})"
    assert [msg.unescape(str(nte[3])) for nte in msg.segments("NTE")] == [AI_DISCLAIMER, TEST_LABEL]
    assert DEMO_LABEL not in str(msg)


def test_trust_evidence_gives_the_lung_share_and_the_verdict() -> None:
    msg = hl7.parse(build(result=with_evidence(EVIDENCE_OK)))
    share, verdict = obx_by_code(msg, "lung_share"), obx_by_code(msg, "trust_verdict")
    assert [str(share[2]), str(share[3]), str(share[5]), str(share[6][0][0]), str(share[11])] == [
        "NM", "lung_share^Share of the explanation on the lung fields^99CXRL", "0.81", "1", "P"]
    assert [str(verdict[2]), str(verdict[3]), str(verdict[5]), str(verdict[11])] == [
        "CWE", "trust_verdict^Explanation trust verdict^99CXRL", "ok^Explanation on the lung fields^99CXRL", "P"]
    # ok: no warning; the notes are those of a message without evidence.
    assert [msg.unescape(str(nte[3])) for nte in msg.segments("NTE")] == [AI_DISCLAIMER]
    # They follow the probabilities; the other lines are those of a message without evidence, renumbered.
    codes = [str(obx[3][0][0]) for obx in msg.segments("OBX")]
    assert codes[1:5] == ["AIPROB.no_finding", "AIPROB.focal_opacity", "lung_share", "trust_verdict"]
    plain = hl7.parse(build())
    assert [str(obx).split("|", 2)[2] for obx in plain.segments("OBX")] == [
        str(obx).split("|", 2)[2] for obx in msg.segments("OBX") if str(obx[3][0][0]) not in codes[3:5]]
    assert "lung_share" not in str(plain) and "trust_verdict" not in str(plain)


@pytest.mark.parametrize(
    ("evidence", "verdict", "warning"),
    [
        (EVIDENCE_SUSPECT, "suspect^Explanation suspect^99CXRL",
         "CHECK: evidence outside the lungs (markers 64%, lungs 3%)"),
        (EVIDENCE_NO_LUNGS, "no_lung_fields^No lung fields found^99CXRL",
         "CHECK: no lung fields found (not a frontal chest view?)"),
    ],
)
def test_a_verdict_other_than_ok_adds_a_warning_note(evidence: dict[str, object], verdict: str, warning: str) -> None:
    er7 = build(result=with_evidence(evidence, is_demo=True))
    assert_valid_er7(er7)
    msg = hl7.parse(er7)
    assert str(obx_by_code(msg, "trust_verdict")[5]) == verdict
    assert str(obx_by_code(msg, "lung_share")[5]) == _number_text(float(evidence["lungs"]))  # type: ignore[arg-type]
    notes = [msg.unescape(str(nte[3])) for nte in msg.segments("NTE")]
    assert notes == [AI_DISCLAIMER, DEMO_LABEL, warning]
    assert [str(nte[1]) for nte in msg.segments("NTE")] == ["1", "2", "3"]


def test_trust_codes_are_those_of_the_structured_report() -> None:
    # One meaning per code in the 99CXRL scheme, whichever message carries it.
    from dicom_node.outputs import structured_report as sr

    for ours, theirs in ((OBS_LUNG_SHARE, sr.LUNG_SHARE), (OBS_TRUST_VERDICT, sr.TRUST_VERDICT),
                         *((TRUST_VERDICT_CODES[v], sr.TRUST_CODES[v]) for v in ("ok", "suspect", "no_lung_fields"))):
        assert (ours.code, ours.text, ours.system) == (theirs.value, theirs.meaning, theirs.scheme_designator)


def _number_text(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".")


def test_image_is_sent_only_when_configured_and_present() -> None:
    png = tiny_png()
    er7 = build(overlay=make_overlay(png))
    parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    ed = obx_by_code(hl7.parse(er7), "AIOVERLAY")
    assert str(ed[2]) == "ED"
    assert [str(c) for c in ed[5][0][1:4]] == ["Image", "PNG", "Base64"]
    assert base64.b64decode(str(ed[5][0][4])) == png
    assert "|ED|" not in build(overlay=make_overlay(png), settings=HL7Settings(include_image=False))
    assert "|ED|" not in build(overlay=make_overlay(None))


def test_large_image_is_carried_whole() -> None:
    # hl7apy's STRICT parser limits OBX-5 components to 199 characters; a real overlay (tens of kB) is
    # still built, validated and carried intact.
    png = tiny_png() + bytes(range(256)) * 200
    er7 = build(overlay=make_overlay(png))
    ed = obx_by_code(hl7.parse(er7), "AIOVERLAY")
    assert base64.b64decode(str(ed[5][0][4])) == png
    assert parse_message(er7, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True).to_er7() == er7


def test_non_ascii_names_declare_utf8() -> None:
    er7 = build(make_source(PatientName="Müller^Zoë"))
    msg = hl7.parse(er7)
    assert str(msg.segment("MSH")[18]) == "UNICODE UTF-8"
    assert msg.extract_field("PID", 1, 5, 1, 1) == "Müller"
    assert "UNICODE UTF-8" not in build()


def test_builder_does_not_mutate_its_inputs() -> None:
    source = make_source()
    before = copy.deepcopy(source)
    build(source)
    assert source == before


@pytest.mark.parametrize("control_id", ["", "X" * 21, "A|B", "A^B"])
def test_bad_control_id_is_refused(control_id: str) -> None:
    with pytest.raises(ORUBuildError):
        build_oru(
            make_source(), make_result(), make_overlay(), HL7Settings(), message_control_id=control_id, now=NOW
        )


def test_new_message_control_ids_are_unique_and_fit_msh10() -> None:
    ids = {new_message_control_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 20 and escape(i) == i for i in ids)


def test_escape_uses_standard_sequences() -> None:
    assert escape("a|b^c&d~e\\f") == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"


def test_assigning_authority_takes_the_universal_entity_id() -> None:
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = "2.16.840.1.113883.3.72.5.9.1"
    qualifiers.UniversalEntityIDType = "ISO"
    msg = hl7.parse(build(make_source(IssuerOfPatientIDQualifiersSequence=Sequence([qualifiers]))))
    cx4 = [msg.extract_field("PID", 1, 3, 1, 4, i) for i in (1, 2, 3)]
    assert cx4 == ["HOSPITAL_A", "2.16.840.1.113883.3.72.5.9.1", "ISO"]
    assert msg.extract_field("PID", 1, 3, 1, 5) == "MR"


def test_identifiers_beyond_v251_conformance_lengths_are_sent_whole() -> None:
    # HD.1 is IS(20) and hl7apy's STRICT parser counts the escaped text; receivers (IRIS) do not enforce it.
    issuer = "urn:oid:2.16.840.1.113883.3.72.5.9.1|X"
    er7 = build(make_source(IssuerOfPatientID=issuer))
    assert hl7.parse(er7).extract_field("PID", 1, 3, 1, 4) == issuer
    parse_message(er7, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True).validate()
    with pytest.raises(MaxLengthReached):
        parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)


# --- the hand-assembled ER7 against the former hl7apy builder (tests/support/hl7apy_reference.py) ------------

Inputs = tuple[Dataset, InferenceResult, OverlayRef, HL7Settings, datetime]


@pytest.fixture
def lenient_dicom(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Modalities send invalid values too (lower-case CS, bad dates, backslashes): let the sources hold them."""
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.IGNORE)
    yield


def same_as_hl7apy(inputs: Inputs, *, parametric_map_uid: str = "", structured_report_uid: str = "") -> str:
    """The hand-built ORU, asserted byte-identical to the hl7apy-built one."""
    source, result, overlay, settings, now = inputs
    others = {"parametric_map_uid": parametric_map_uid, "structured_report_uid": structured_report_uid}
    er7 = build_oru(source, result, overlay, settings, message_control_id=CONTROL_ID, now=now, **others)
    reference = build_oru_hl7apy(source, result, overlay, settings, message_control_id=CONTROL_ID, now=now, **others)
    assert er7 == reference
    return er7


def assert_valid_er7(er7: str) -> hl7.Message:
    """hl7apy's v2.5.1 validator (PID-3/PID-5 stood in, as the former builder did) and python-hl7 both accept it."""
    assert not er7.endswith("\r") and "\n" not in er7
    apy = parse_message(er7, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)
    validate_with_standins(apy)  # raises ValidationError
    msg = hl7.parse(er7)
    assert str(msg) == er7 + "\r"  # python-hl7 ends every segment with \r
    assert [str(segment[0]) for segment in msg][:4] == ["MSH", "PID", "ORC", "OBR"]
    msh = msg.segment("MSH")
    assert (str(msh[18]) if len(msh) > 18 else "") == ("" if er7.isascii() else "UNICODE UTF-8")
    return msg


def inputs(
    source: Dataset | None = None,
    result: InferenceResult | None = None,
    overlay: OverlayRef | None = None,
    settings: HL7Settings | None = None,
    now: datetime = NOW,
) -> Inputs:
    return (
        source if source is not None else make_source(),
        result or make_result(),
        overlay or make_overlay(tiny_png()),
        settings or HL7Settings(),
        now,
    )


def bare_source() -> Dataset:
    bare = Dataset()
    bare.StudyInstanceUID = STUDY_UID
    return bare


def code_item(**attributes: str) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def probabilities_result(probabilities: dict[str, float], **changes: object) -> InferenceResult:
    return dataclasses.replace(make_result(), probabilities=probabilities, **changes)


DELIMITED = "a|b^c&d~e\\f"
DATE_TIMES = [  # (date, time, offset) as the source carries them; every row of test_da_tm_to_ts and more
    ("20240305", "", ""),
    ("20240305", "10", ""),
    ("20240305", "1015", ""),
    ("20240305", "101520", ""),
    ("20240305", "101520.1", ""),
    ("20240305", "235959.999999", ""),
    ("20240305", "101520.", ""),
    ("20240305", "10:15:20", ""),
    ("2024.03.05", "", ""),
    ("20240305", "101520", "+0100"),
    ("20240305", "101520", "+1400"),
    ("20240305", "101520", "-1200"),
    ("20240305", "101520", "-1300"),
    ("20240305", "101520", "bad"),
    ("20240305", "25", ""),
    ("20240305", "235960", ""),
    ("20240231", "1015", ""),
    ("20241305", "1015", ""),
    ("2024030", "", ""),
    ("", "101520", ""),
    ("", "", ""),
]
ACQUISITION_DATE_TIMES = [
    "2024",
    "202403",
    "2024030510",
    "20240305101520.123456+0100",
    "20240305101520+0100",
    "20240305106",
    "garbage",
]

NAMED_CASES: dict[str, Callable[[], Inputs]] = {
    "default": lambda: inputs(),
    "bare-dataset": lambda: inputs(bare_source()),
    "no-patient-id": lambda: inputs(make_source(PatientID=None)),
    "no-patient-name": lambda: inputs(make_source(PatientName=None)),
    "no-id-no-name-no-birth-no-sex": lambda: inputs(
        make_source(PatientID=None, PatientName=None, PatientBirthDate=None, PatientSex=None)
    ),
    "empty-values": lambda: inputs(make_source(PatientID="", PatientName="", PatientSex="", StudyTime="")),
    "non-ascii-name": lambda: inputs(make_source(PatientName="Müller^Zoë")),
    "non-ascii-accession": lambda: inputs(make_source(AccessionNumber="Ünfall-7")),
    "ideographic-name": lambda: inputs(make_source(PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう")),
    "only-ideographic-name": lambda: inputs(make_source(PatientName="=山田^太郎")),
    "pn-prefix-suffix": lambda: inputs(make_source(PatientName="Family^Given^Middle^Prefix^Suffix")),
    "pn-family-given": lambda: inputs(make_source(PatientName="Family^Given")),
    "pn-given-only": lambda: inputs(make_source(PatientName="^Given")),
    "pn-delimiters": lambda: inputs(make_source(PatientName="Mc&Don|ald~X^Jo&hn^Q|R^Dr.~^J&r.")),
    "pn-spaces": lambda: inputs(make_source(PatientName=" Doe ^ J ")),
    **{
        f"patient-id-{i}": (
            lambda patient_id=patient_id: inputs(
                make_source(PatientID=patient_id, IssuerOfPatientID="A&B^C|E\\F", AccessionNumber="ACC|9^8")
            )
        )
        for i, patient_id in enumerate(["ID^1&2~3|4", "back\\slash", "looks\\F\\escaped", "\\E\\", "plain", "  x "])
    },
    "no-issuer": lambda: inputs(make_source(IssuerOfPatientID=None)),
    "issuer-qualifiers": lambda: inputs(
        make_source(
            IssuerOfPatientIDQualifiersSequence=Sequence(
                [code_item(UniversalEntityID="2.16.840.1.113883.3.72.5.9.1", UniversalEntityIDType="ISO")]
            )
        )
    ),
    "issuer-qualifiers-without-issuer": lambda: inputs(
        make_source(
            IssuerOfPatientID=None,
            IssuerOfPatientIDQualifiersSequence=Sequence([code_item(UniversalEntityID="1.2&3|4")]),
        )
    ),
    "issuer-qualifiers-type-only": lambda: inputs(
        make_source(
            IssuerOfPatientID=None,
            IssuerOfPatientIDQualifiersSequence=Sequence([code_item(UniversalEntityIDType="ISO")]),
        )
    ),
    "blank-issuer-qualifiers": lambda: inputs(
        make_source(
            IssuerOfPatientID=" ",
            IssuerOfPatientIDQualifiersSequence=Sequence([code_item(UniversalEntityID="\xa0")]),
        )
    ),
    "blank-patient-id-and-accession": lambda: inputs(make_source(PatientID=" ", AccessionNumber="\u3000")),
    "blank-name-components": lambda: inputs(make_source(PatientName="Doe^ ^\u3000^Dr.^ ")),
    "blank-name": lambda: inputs(make_source(PatientName=" ^ ")),
    "blank-code-meaning": lambda: inputs(
        make_source(RequestedProcedureCodeSequence=Sequence([code_item(CodeValue="C1", CodeMeaning=" ")]))
    ),
    "blank-settings-and-texts": lambda: inputs(
        result=probabilities_result({" ": 0.5}, label=" ", method=" ", model_id=" ", model_version=" "),
        settings=HL7Settings(sending_application=" ", receiving_facility="\u3000", procedure_text=" "),
    ),
    "issuer-beyond-lengths": lambda: inputs(make_source(IssuerOfPatientID="urn:oid:2.16.840.1.113883.3.72.5.9.1|X")),
    **{
        f"sex-{sex}": (lambda sex=sex: inputs(make_source(PatientSex=sex)))
        for sex in ["M", "F", "O", "X", "m", " f ", "U"]
    },
    **{
        f"study-date-time-{i}": (
            lambda date=date, time=time, offset=offset: inputs(
                make_source(StudyDate=date, StudyTime=time, TimezoneOffsetFromUTC=offset or None)
            )
        )
        for i, (date, time, offset) in enumerate(DATE_TIMES)
    },
    **{
        f"birth-date-time-{i}": (
            lambda date=date, time=time: inputs(make_source(PatientBirthDate=date, PatientBirthTime=time))
        )
        for i, (date, time, _) in enumerate(DATE_TIMES)
    },
    **{
        f"acquisition-date-time-{i}": (
            lambda dt=dt: inputs(
                make_source(StudyDate=None, StudyTime=None, AcquisitionDateTime=dt, TimezoneOffsetFromUTC="-0500")
            )
        )
        for i, dt in enumerate(ACQUISITION_DATE_TIMES)
    },
    "study-time-offset": lambda: inputs(make_source(TimezoneOffsetFromUTC="-0300")),
    "procedure-code-sequence": lambda: inputs(
        make_source(
            RequestedProcedureCodeSequence=Sequence(
                [code_item(CodeValue="RPID^1", CodeMeaning="Chest & ribs", CodingSchemeDesignator="99ORD")]
            )
        )
    ),
    "procedure-long-code-value": lambda: inputs(
        make_source(
            RequestedProcedureCodeSequence=Sequence([code_item(LongCodeValue="urn:x|long", CodeMeaning="Thorax")])
        )
    ),
    "procedure-code-without-value": lambda: inputs(
        make_source(RequestedProcedureCodeSequence=Sequence([code_item(CodeMeaning="No value")]))
    ),
    "procedure-code-value-only": lambda: inputs(
        make_source(RequestedProcedureCodeSequence=Sequence([code_item(CodeValue="C1")]))
    ),
    "placer-in-request-attributes": lambda: inputs(
        make_source(
            RequestAttributesSequence=Sequence([code_item(PlacerOrderNumberImagingServiceRequest="PLACER-7")])
        )
    ),
    "placer-top-level": lambda: inputs(make_source(PlacerOrderNumberImagingServiceRequest="PL|^8")),
    "placer-without-accession": lambda: inputs(
        make_source(AccessionNumber=None, PlacerOrderNumberImagingServiceRequest="PL-1")
    ),
    "demo": lambda: inputs(result=make_result(is_demo=True)),
    "test-model": lambda: inputs(result=with_evidence(EVIDENCE_SUSPECT, is_test=True)),
    "trust-ok": lambda: inputs(result=with_evidence(EVIDENCE_OK)),
    "trust-suspect-demo": lambda: inputs(result=with_evidence(EVIDENCE_SUSPECT, is_demo=True)),
    "trust-no-lung-fields": lambda: inputs(result=with_evidence(EVIDENCE_NO_LUNGS)),
    "trust-unknown-verdict": lambda: inputs(result=with_evidence(dict(EVIDENCE_OK, verdict="new|verdict"))),
    "trust-border": lambda: inputs(
        result=with_evidence(dict(EVIDENCE_OK, lungs=0.5, border=0.36, verdict="suspect",
                                  reasons=["evidence_on_border"]), probabilities={})
    ),
    "demo-without-image": lambda: inputs(
        result=make_result(is_demo=True), settings=HL7Settings(include_image=False)
    ),
    "image-not-configured": lambda: inputs(settings=HL7Settings(include_image=False)),
    "no-png": lambda: inputs(overlay=make_overlay(None)),
    "empty-png": lambda: inputs(overlay=make_overlay(b"")),
    "large-png": lambda: inputs(overlay=make_overlay(tiny_png() + bytes(range(256)) * 200)),
    "overlay-study-from-source": lambda: inputs(overlay=OverlayRef("", SERIES_UID, SOP_UID, tiny_png())),
    "overlay-without-uids": lambda: inputs(bare_source(), overlay=OverlayRef("", "", "", None)),
    "result-delimiters-and-non-ascii": lambda: inputs(
        result=probabilities_result(
            {DELIMITED: 0.5, "Ödem": 0.25},
            label=DELIMITED,
            method="grad|cam^ü",
            model_id="m&1",
            model_version="~2",
        )
    ),
    "probabilities-edge-values": lambda: inputs(
        result=probabilities_result({"a": 0.0, "b": -0.0, "c": 1e-9, "d": 1.0, "e": 0.9999999, "f": -0.25})
    ),
    "probabilities-not-finite": lambda: inputs(result=probabilities_result({"a": float("nan"), "b": float("inf")})),
    "no-probabilities-empty-texts": lambda: inputs(
        result=probabilities_result({}, label="", method="", model_id="", model_version="")
    ),
    "msh-settings": lambda: inputs(
        settings=HL7Settings(
            sending_application="CXR|LENS",
            sending_facility="RAD&1",
            receiving_application="HS^X",
            receiving_facility="IRIS~2",
            processing_id="T",
            accept_ack_type="NE",
            application_ack_type="AL",
        )
    ),
    "msh-non-ascii-only": lambda: inputs(settings=HL7Settings(sending_facility="Radiologie Süd")),
    "msh-empty-names": lambda: inputs(
        settings=HL7Settings(
            sending_application="", sending_facility="", receiving_application="", receiving_facility=""
        )
    ),
    "procedure-settings-delimiters": lambda: inputs(
        settings=HL7Settings(procedure_code="A^B", procedure_text="X|Y & Z", procedure_coding_system="~")
    ),
    "procedure-settings-text-only": lambda: inputs(
        settings=HL7Settings(procedure_code="", procedure_text="Chest", procedure_coding_system="")
    ),
    "now-naive": lambda: inputs(now=datetime(2024, 3, 5, 14, 30, 15, 999999)),
    "now-utc": lambda: inputs(now=datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC)),
    "now-negative-offset": lambda: inputs(now=datetime(2024, 1, 1, tzinfo=timezone(-timedelta(minutes=570)))),
    "now-offset-with-seconds": lambda: inputs(now=datetime(2024, 1, 1, tzinfo=timezone(timedelta(seconds=3630)))),
}
# Equal to the hl7apy builder, but not valid v2.5.1 (hl7apy's builder sent them all the same).
NOT_VALID_V251 = {
    "procedure-settings-empty": lambda: inputs(
        settings=HL7Settings(procedure_code="", procedure_text="", procedure_coding_system="")
    ),  # OBR-4 is required: sent empty
}


@pytest.mark.usefixtures("lenient_dicom")
@pytest.mark.parametrize("case", sorted(NAMED_CASES))
def test_same_bytes_as_hl7apy_and_valid(case: str) -> None:
    assert_valid_er7(same_as_hl7apy(NAMED_CASES[case]()))


@pytest.mark.usefixtures("lenient_dicom")
@pytest.mark.parametrize("case", sorted(NOT_VALID_V251))
def test_same_bytes_as_hl7apy_for_values_v251_does_not_allow(case: str) -> None:
    same_as_hl7apy(NOT_VALID_V251[case]())


@pytest.mark.parametrize(
    ("overlay", "pm_uid", "sr_uid"),
    [
        (make_overlay(tiny_png()), PM_UID, SR_UID),
        (make_overlay(None), PM_UID, ""),
        (make_overlay(tiny_png()), "", SR_UID),
        (OverlayRef(STUDY_UID, "", "", tiny_png()), PM_UID, SR_UID),  # the SC turned off
        (OverlayRef("", "", "", None), "", ""),  # no DICOM object at all: the study line only
    ],
)
def test_other_dicom_objects_same_bytes_as_hl7apy_and_valid(overlay: OverlayRef, pm_uid: str, sr_uid: str) -> None:
    er7 = same_as_hl7apy(inputs(overlay=overlay), parametric_map_uid=pm_uid, structured_report_uid=sr_uid)
    msg = assert_valid_er7(er7)
    codes = [msg.unescape(str(obx[3][0][0])) or msg.unescape(str(obx[3][0][1])) for obx in msg.segments("OBX")]
    assert ("112002" in codes, "SOP Instance UID" in codes) == (bool(overlay.sop_instance_uid),) * 2
    assert ("AIPMAP" in codes, "AISR" in codes) == (bool(pm_uid), bool(sr_uid))
    set_ids = [int(str(obx[1])) for obx in msg.segments("OBX")]
    assert set_ids == list(range(1, len(set_ids) + 1))


_ASCII = "ABCxyz0129 .-_|^~\\&"
_UNICODE = _ASCII + "äÖßéЖ中\u3000\xa0"
_BLANKS = (" ", "  ", "\u3000", " \xa0")  # str.isspace(): hl7apy sent blank parts of composite fields empty


def _random_text(rng: random.Random, alphabet: str, max_length: int = 12) -> str:
    if rng.random() < 0.05:
        return rng.choice(_BLANKS)
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_length)))


def _random_date(rng: random.Random) -> str:
    """A DA or one that is not: years from 1000 (see test_years_before_1000_are_sent_as_they_are)."""
    kind = rng.random()
    if kind < 0.1:
        return rng.choice(["", "garbage", "2024-03-05", "1.2.3"])
    date = f"{rng.randint(1000, 2999)}{rng.randint(0, 13):02d}{rng.randint(0, 32):02d}"
    return date[:4] + "." + date[4:6] + "." + date[6:] if kind < 0.15 else date


def _random_time(rng: random.Random) -> str:
    parts = [f"{rng.randint(0, 25):02d}", f"{rng.randint(0, 61):02d}", f"{rng.randint(0, 61):02d}"]
    text = "".join(parts[: rng.randint(0, 3)])
    if len(text) == 6 and rng.random() < 0.5:
        text += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 6)))
    return text if rng.random() < 0.9 else text[:2] + ":" + text[2:4]


def _random_offset(rng: random.Random) -> str | None:
    return rng.choice([None, "+0000", "+0100", "-0300", "+0530", "+1400", "-1200", "-1300", "+0060", "bad"])


def _random_uid(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return ""
    return "1.2." + ".".join(str(rng.randint(0, 99999)) for _ in range(rng.randint(1, 8)))


def _random_evidence(rng: random.Random) -> dict[str, object] | None:
    """None (trust off) or shares that sum to 1 with a verdict and reasons, as explain.trust gives them."""
    if rng.random() < 0.3:
        return None
    weights = [rng.random() for _ in range(5)]
    shares = dict(zip(("lungs", "body", "outside_body", "border", "markers"),
                      (round(w / sum(weights), 3) for w in weights), strict=True))
    reasons = [r for r in ("evidence_on_marker", "evidence_on_border", "evidence_outside_lungs") if rng.random() < 0.3]
    verdict = rng.choice(["ok", "suspect", "no_lung_fields"]) if not reasons else rng.choice(["suspect",
                                                                                                "no_lung_fields"])
    return {**shares, "peak_region": "lungs", "verdict": verdict, "reasons": reasons}


def random_inputs(rng: random.Random) -> Inputs:
    """A source with a random subset of the attributes the ORU reads, and random result, overlay, settings."""
    alphabet = _ASCII if rng.random() < 0.4 else _UNICODE
    text = lambda max_length=12: _random_text(rng, alphabet, max_length)  # noqa: E731
    ds = Dataset()
    maybe = lambda: rng.random() < 0.7  # noqa: E731
    if maybe():
        ds.StudyInstanceUID = _random_uid(rng)
    if maybe():
        ds.PatientID = text()
    if maybe():
        ds.IssuerOfPatientID = text(30)
    if rng.random() < 0.3:
        ds.IssuerOfPatientIDQualifiersSequence = Sequence(
            [code_item(**{k: text() for k in ("UniversalEntityID", "UniversalEntityIDType") if maybe()})]
        )
    if maybe():
        groups = ["^".join(text(8) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        ds.PatientName = "=".join(groups)
    if maybe():
        ds.PatientBirthDate = _random_date(rng)
    if rng.random() < 0.3:
        ds.PatientBirthTime = _random_time(rng)
    if maybe():
        ds.PatientSex = rng.choice(["M", "F", "O", "U", "X", "m", " f ", "", "other"])
    if maybe():
        ds.AccessionNumber = text(16)
    if rng.random() < 0.3:
        ds.PlacerOrderNumberImagingServiceRequest = text()
    if rng.random() < 0.3:
        ds.RequestAttributesSequence = Sequence(
            [code_item(PlacerOrderNumberImagingServiceRequest=text()) if maybe() else Dataset()]
        )
    if maybe():
        ds.StudyDate = _random_date(rng)
    if maybe():
        ds.StudyTime = _random_time(rng)
    offset = _random_offset(rng)
    if offset is not None:
        ds.TimezoneOffsetFromUTC = offset
    if rng.random() < 0.4:
        date = _random_date(rng)
        if len(date) == 8 and date.isdigit():  # a time alone would read as a year before 1000
            date += _random_time(rng) + (_random_offset(rng) or "")
        ds.AcquisitionDateTime = date
    if rng.random() < 0.4:
        keywords = ("CodeValue", "LongCodeValue", "CodeMeaning", "CodingSchemeDesignator")
        ds.RequestedProcedureCodeSequence = Sequence(
            [code_item(**{k: text() for k in keywords if rng.random() < 0.5})]
        )

    labels = {text(10) or "x" for _ in range(rng.randint(0, 4))}
    result = InferenceResult(
        label=rng.choice(sorted(labels)) if labels else text(),
        class_index=0,
        probabilities={label: rng.choice([0.0, 1.0, 1e-7, rng.random(), -rng.random()]) for label in labels},
        method=text(),
        model_id=text(),
        model_version=text(6),
        is_demo=rng.random() < 0.5,
        heatmap_max=1.0,
        no_evidence=False,
    )
    png_kind = rng.random()
    png = None if png_kind < 0.2 else tiny_png() if png_kind < 0.7 else rng.randbytes(rng.randint(0, 4000))
    overlay = OverlayRef(_random_uid(rng), _random_uid(rng), _random_uid(rng), png)
    settings = HL7Settings(
        sending_application=text(),
        sending_facility=text(),
        receiving_application=text(),
        receiving_facility=text(),
        processing_id=rng.choice(["P", "D", "T"]),
        accept_ack_type=rng.choice(["AL", "NE", "ER", "SU"]),
        application_ack_type=rng.choice(["AL", "NE", "ER", "SU"]),
        procedure_code=text() or "C",  # an empty OBR-4 is not valid v2.5.1 (NOT_VALID_V251)
        procedure_text=text(),
        procedure_coding_system=text(6),
        include_image=rng.random() < 0.7,
    )
    tz = rng.choice([None, UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])
    now = datetime(2000, 1, 1, tzinfo=tz) + timedelta(seconds=rng.randint(0, 10**9) + rng.random())
    return ds, result, overlay, settings, now


@pytest.mark.slow
@pytest.mark.usefixtures("lenient_dicom")
def test_randomised_sources_give_the_same_bytes_as_hl7apy_and_valid_messages() -> None:
    rng = random.Random(20240305)
    uid_rng = random.Random(9902)  # apart, so the other inputs are drawn as before
    trust_rng = random.Random(1313)  # likewise
    non_ascii = blank = blank_obr4 = 0
    for _ in range(200):
        source, result, overlay, settings, now = random_inputs(rng)
        result = dataclasses.replace(result, evidence=_random_evidence(trust_rng), is_test=trust_rng.random() < 0.2)
        case = (source, result, overlay, settings, now)
        pm_uid, sr_uid = _random_uid(uid_rng), _random_uid(uid_rng)
        er7 = same_as_hl7apy(case, parametric_map_uid=pm_uid, structured_report_uid=sr_uid)
        non_ascii += not er7.isascii()
        if segments(er7, "OBR")[0].split("|")[4] == "":  # a blank code: OBR-4 sent empty, as hl7apy sent it
            blank_obr4 += 1
            continue
        msg = assert_valid_er7(er7)
        # A blank part of a composite field (CX, EI) goes out empty; primitive fields (OBR-18 is ST) keep it.
        patient_id, accession = _text(source, "PatientID"), _text(source, "AccessionNumber")
        assert msg.extract_field("PID", 1, 3, 1, 1) == (patient_id if patient_id.strip() else "")
        assert msg.extract_field("ORC", 1, 3) == (accession if accession.strip() else "")
        assert msg.extract_field("OBR", 1, 18) == accession
        blank += any(value.isspace() for value in (patient_id, accession))
        assert [msg.unescape(str(nte[3])) for nte in msg.segments("NTE")][0] == AI_DISCLAIMER
        images = 1 if settings.include_image and overlay.png else 0
        sc_lines = 2 if overlay.sop_instance_uid else 0  # its series and SOP Instance UID
        others = sum(1 for uid in (pm_uid, sr_uid) if uid)
        trust = 2 if result.evidence is not None else 0  # the lung share and the verdict
        assert len(msg.segments("OBX")) == 4 + len(result.probabilities) + trust + sc_lines + others + images
        warned = result.evidence is not None and result.evidence["verdict"] != "ok"
        notes = [msg.unescape(str(nte[3])) for nte in msg.segments("NTE")]
        assert notes[1:] == [label for label in ("DEMO MODEL" if result.is_demo else "TEST MODEL" if result.is_test
                                                 else "", result.trust_warning) if label]
        assert notes[-1].startswith("CHECK: ") == warned
        if images:
            assert base64.b64decode(str(obx_by_code(msg, "AIOVERLAY")[5][0][4])) == overlay.png
    assert 50 < non_ascii < 150 and blank > 5 and blank_obr4 < 10


def test_years_before_1000_are_sent_as_they_are() -> None:
    # hl7apy re-formats TS values through datetime.strftime("%Y"), which glibc does not zero-pad: its builder sent
    # 09990102 as "9990102" (and 00010101 + 101520 as "10101101520"). The hand-built ER7 keeps the TS as computed.
    er7 = build(make_source(PatientBirthDate="09990102", StudyDate="00010101", StudyTime="101520"))
    msg = hl7.parse(er7)
    assert msg.extract_field("PID", 1, 7) == "09990102"
    assert msg.extract_field("OBR", 1, 7) == "00010101101520"


@pytest.mark.usefixtures("lenient_dicom")
def test_blank_parts_of_composite_fields_go_out_empty() -> None:
    # As hl7apy sent them: a whitespace-only component of CX, XPN, EI, CE, HD is empty; ST and FT keep it.
    msg = hl7.parse(build(make_source(PatientName="Doe^ ^Q", AccessionNumber=" ", PatientID=" ")))
    assert str(msg.segment("PID")[5]) == "Doe^^Q"
    assert str(msg.segment("PID")[3]) == "^^^HOSPITAL_A^MR"
    assert msg.extract_field("ORC", 1, 3) == "" and msg.extract_field("OBR", 1, 18) == " "


def test_oru_module_does_not_import_hl7apy() -> None:
    import subprocess
    import sys

    code = "import sys, dicom_node.outputs.oru; sys.exit('hl7apy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.usefixtures("lenient_dicom")
def test_control_characters_are_hex_escaped_and_do_not_split_segments() -> None:
    # A CR in a DICOM value would end the segment: control characters go as hexadecimal data (\Xhh\). hl7apy's
    # builder sent them raw (not comparable here).
    er7 = build(make_source(PatientID="a\rb\nc", PatientName="x\ry"))
    assert_valid_er7(er7)
    pid = segments(er7, "PID")
    assert len(pid) == 1
    assert "a\\X0D\\b\\X0A\\c" in pid[0] and "x\\X0D\\y" in pid[0]
    assert [line[:3] for line in er7.split("\r")] == [line[:3] for line in build(make_source()).split("\r")]
