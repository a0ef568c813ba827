"""ORU^R01 builder: strict v2.5.1 validation, a second parser as oracle, escaping, DICOM -> HL7 mappings."""

from __future__ import annotations

import base64
import copy
import zlib
from datetime import datetime, timedelta, timezone

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import MaxLengthReached, ValidationError
from hl7apy.parser import parse_message
from pydicom import Dataset
from pydicom.sequence import Sequence

from dicom_node.hl7.oru import (
    ORUBuildError,
    build_oru,
    da_tm_to_ts,
    dt_to_ts,
    escape,
    new_message_control_id,
)
from dicom_node.results import AI_DISCLAIMER, DEMO_LABEL, InferenceResult, OverlayRef
from dicom_node.settings import HL7Settings

NOW = datetime(2024, 3, 5, 14, 30, 15, tzinfo=timezone(timedelta(hours=1)))
CONTROL_ID = "CTL0000000000000001"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"
SOP_UID = "1.2.826.0.1.3680043.8.498.3"


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG (67 bytes): its Base64 fits hl7apy's STRICT limit of 199 characters per component."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (1).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")


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
    return InferenceResult(
        label="focal_opacity",
        class_index=1,
        probabilities={"no_finding": 0.12345678, "focal_opacity": 0.87654322},
        method="gradcam",
        model_id="cxr-lens-demo-cnn",
        model_version="1.0.0",
        is_demo=is_demo,
        heatmap_max=0.8,
        no_evidence=False,
    )


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
