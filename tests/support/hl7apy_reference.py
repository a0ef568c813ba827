"""Test-only reference: the ORU^R01 built with hl7apy objects, as ``dicom_node.outputs.oru`` did before it assembled ER7
by hand. The production builder is checked against it byte for byte (tests/test_hl7_oru.py).

It reuses the pure helpers of the production module (escaping, DICOM reading, DA/TM/DT -> TS), so what is
compared is the message assembly: field placement, empty and trailing fields, MSH-18, and validation.
"""

from __future__ import annotations

import base64
from datetime import datetime

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.exceptions import ValidationError
from pydicom import Dataset

from dicom_node.outputs.oru import (
    COMMENT_SOURCE,
    CONTROL_ID_LENGTH,
    DIAGNOSTIC_SERVICE_SECTION,
    ED_IMAGE_PNG,
    HL7_VERSION,
    LOCAL_CODING_SYSTEM,
    MESSAGE_TYPE,
    OBS_FINDING,
    OBS_LUNG_SHARE,
    OBS_METHOD,
    OBS_MODEL,
    OBS_OVERLAY,
    OBS_PARAMETRIC_MAP,
    OBS_SERIES,
    OBS_SOP_INSTANCE,
    OBS_STRUCTURED_REPORT,
    OBS_STUDY,
    OBS_TRUST_VERDICT,
    ORDER_CONTROL,
    ORDER_STATUS,
    RESULT_STATUS,
    SEX_CODES,
    TRUST_VERDICT_CODES,
    UNITS_DIMENSIONLESS,
    UTF8_CHARSET,
    Code,
    ORUBuildError,
    _assigning_authority,
    _code,
    _components,
    _number,
    _observation_ts,
    _person_name,
    _placer_order_number,
    _procedure_code,
    _text,
    da_tm_to_ts,
    datetime_to_ts,
    escape,
)
from dicom_node.outputs.results import (
    AI_DISCLAIMER,
    InferenceResult,
    OverlayRef,
)
from dicom_node.settings import HL7Settings

_PID_REQUIRED = ("pid_3", "pid_5")


def build_oru_hl7apy(
    source: Dataset,
    result: InferenceResult,
    overlay: OverlayRef,
    settings: HL7Settings,
    *,
    message_control_id: str,
    now: datetime,
    parametric_map_uid: str = "",
    structured_report_uid: str = "",
) -> str:
    """The former ``build_oru``: hl7apy objects, one setattr per field, validated on every call; extended as the
    production builder was (the SC's lines only for an SC, an OBX per other DICOM object given)."""
    if not message_control_id or len(message_control_id) > CONTROL_ID_LENGTH or escape(message_control_id) != (
        message_control_id
    ):
        raise ORUBuildError("message_control_id must be 1-20 characters without HL7 delimiters")
    try:
        # Built TOLERANT, then checked by the validator that STRICT parsing uses: structure, cardinality,
        # required fields and datatypes are errors. STRICT construction would add a length check on the
        # *escaped* text (IS(20) for HD.1, ST(199) for every OBX-5 component, so no ED image at all); valid
        # DICOM values can exceed it and receivers (IRIS included) do not enforce v2.5.1 lengths.
        message = Message("ORU_R01", version=HL7_VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
        others = [(OBS_PARAMETRIC_MAP, parametric_map_uid), (OBS_STRUCTURED_REPORT, structured_report_uid)]
        _fill(message, source, result, overlay, settings, message_control_id, now, others)
        if not message.to_er7().isascii():
            message.msh.msh_18 = UTF8_CHARSET  # MSH-18, Table 0211; the sender encodes UTF-8
        validate_with_standins(message)
        er7 = message.to_er7()
    except ORUBuildError:
        raise
    except Exception as exc:  # hl7apy raises a zoo of exception types; name the boundary
        # Only the validator's texts are free of values (patient data); of the others, name the type.
        detail = str(exc) if isinstance(exc, ValidationError) else type(exc).__name__
        raise ORUBuildError(f"ORU^R01 {message_control_id}: {detail}") from exc
    return er7


def validate_with_standins(message: Message) -> None:
    """hl7apy validation (errors raise; lengths and tables are only warnings there).

    PID-3 and PID-5 are required in v2.5.1, but DICOM lets an image arrive without Patient ID or Name (type 2).
    The result is still sent with those fields empty, so the receiver decides (an AE parks it, visibly): they
    are validated with a stand-in value that is removed again.
    """
    pid = message.oru_r01_patient_result.oru_r01_patient.pid
    empty = [field for field in _PID_REQUIRED if not getattr(pid, field).to_er7()]
    for field in empty:
        setattr(pid, field, "STANDIN")
    try:
        message.validate()
    finally:
        for field in empty:
            setattr(pid, field, "")


def _put(segment: Segment, field: str, er7: str, *, required: bool = False) -> None:
    """Set a field from ER7; a required field is sent empty rather than left out."""
    if er7 or required:
        setattr(segment, field, er7)


def _obx(group: Group, set_id: int, value_type: str, identifier: Code, value: str, units: str = "") -> Segment:
    obx = group.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
    _put(obx, "obx_1", str(set_id))
    _put(obx, "obx_2", value_type)
    _put(obx, "obx_3", _code(identifier), required=True)
    _put(obx, "obx_5", value)
    _put(obx, "obx_6", units)
    _put(obx, "obx_11", RESULT_STATUS)
    return obx


def _fill(
    message: Message,
    ds: Dataset,
    result: InferenceResult,
    overlay: OverlayRef,
    settings: HL7Settings,
    control_id: str,
    now: datetime,
    others: list[tuple[Code, str]],
) -> None:
    """Fill the segments."""
    msh = message.msh
    _put(msh, "msh_3", _components(settings.sending_application))
    _put(msh, "msh_4", _components(settings.sending_facility))
    _put(msh, "msh_5", _components(settings.receiving_application))
    _put(msh, "msh_6", _components(settings.receiving_facility))
    _put(msh, "msh_7", datetime_to_ts(now), required=True)
    _put(msh, "msh_9", MESSAGE_TYPE)
    _put(msh, "msh_10", control_id)
    _put(msh, "msh_11", settings.processing_id)
    _put(msh, "msh_12", HL7_VERSION)
    _put(msh, "msh_15", settings.accept_ack_type)
    _put(msh, "msh_16", settings.application_ack_type)

    patient_result = message.add_group("ORU_R01_PATIENT_RESULT")
    pid = patient_result.add_group("ORU_R01_PATIENT").add_segment("PID")
    _put(pid, "pid_1", "1")
    patient_id = _text(ds, "PatientID")
    if patient_id:
        _put(pid, "pid_3", "^".join([escape(patient_id), "", "", _assigning_authority(ds), "MR"]).rstrip("^"))
    else:
        _put(pid, "pid_3", "", required=True)
    name = _person_name(ds, "PatientName")
    if name is not None:
        # DICOM PN is family^given^middle^prefix^suffix; XPN is family^given^middle^suffix^prefix.
        xpn = _components(name.family_name, name.given_name, name.middle_name, name.name_suffix, name.name_prefix)
        _put(pid, "pid_5", xpn, required=True)
    else:
        _put(pid, "pid_5", "", required=True)
    _put(pid, "pid_7", da_tm_to_ts(_text(ds, "PatientBirthDate"), _text(ds, "PatientBirthTime")))
    sex = _text(ds, "PatientSex").strip().upper()
    _put(pid, "pid_8", SEX_CODES.get(sex, "U") if sex else "")

    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    accession = _text(ds, "AccessionNumber")
    placer = _placer_order_number(ds, accession)
    orc = order.add_segment("ORC")
    _put(orc, "orc_1", ORDER_CONTROL)
    _put(orc, "orc_2", _components(placer))
    _put(orc, "orc_3", _components(accession))
    _put(orc, "orc_5", ORDER_STATUS)

    obr = order.add_segment("OBR")
    _put(obr, "obr_1", "1")
    _put(obr, "obr_2", _components(placer))
    _put(obr, "obr_3", _components(accession))
    _put(obr, "obr_4", _code(_procedure_code(ds, settings)), required=True)
    _put(obr, "obr_7", _observation_ts(ds))
    _put(obr, "obr_18", _components(accession))
    _put(obr, "obr_22", datetime_to_ts(now))
    _put(obr, "obr_24", DIAGNOSTIC_SERVICE_SECTION)
    _put(obr, "obr_25", RESULT_STATUS)

    # Order-level notes: they qualify the whole result, not one OBX (HL7 places them right after OBR).
    notes = [AI_DISCLAIMER] + ([result.model_label] if result.model_label else [])
    notes += [result.trust_warning] if result.trust_warning else []
    for i, text in enumerate(notes, start=1):
        nte = order.add_segment("NTE")
        _put(nte, "nte_1", str(i))
        _put(nte, "nte_2", COMMENT_SOURCE)
        _put(nte, "nte_3", _components(text))

    finding_text = f"{result.label} ({result.model_label})" if result.model_label else result.label
    set_id = 1
    _obx(order, set_id, "CWE", OBS_FINDING, _components(result.label, finding_text, LOCAL_CODING_SYSTEM))
    for label, probability in result.probabilities.items():
        set_id += 1
        identifier = Code(f"AIPROB.{label}", f"Probability of {label}", LOCAL_CODING_SYSTEM)
        _obx(order, set_id, "NM", identifier, _number(probability), _components(*UNITS_DIMENSIONLESS))
    if result.evidence is not None:
        verdict = str(result.evidence["verdict"])
        set_id += 1
        _obx(order, set_id, "NM", OBS_LUNG_SHARE, _number(float(result.evidence["lungs"])),
             _components(*UNITS_DIMENSIONLESS))
        set_id += 1
        _obx(order, set_id, "CWE", OBS_TRUST_VERDICT,
             _code(TRUST_VERDICT_CODES.get(verdict) or Code(verdict, verdict, LOCAL_CODING_SYSTEM)))
    set_id += 1
    _obx(order, set_id, "ST", OBS_METHOD, _components(result.method))
    set_id += 1
    _obx(order, set_id, "ST", OBS_MODEL, _components(result.model_text))
    study_uid = overlay.study_instance_uid or _text(ds, "StudyInstanceUID")
    set_id += 1
    _obx(order, set_id, "ST", OBS_STUDY, _components(study_uid))
    if overlay.sop_instance_uid:
        set_id += 1
        _obx(order, set_id, "ST", OBS_SERIES, _components(overlay.series_instance_uid))
        set_id += 1
        _obx(order, set_id, "HD", OBS_SOP_INSTANCE, _components(overlay.sop_instance_uid))
    for code, uid in others:
        if uid:
            set_id += 1
            _obx(order, set_id, "HD", code, _components(uid))

    if settings.include_image and overlay.png:
        set_id += 1
        data = base64.b64encode(overlay.png).decode("ascii")  # the Base64 alphabet has no HL7 delimiters
        _obx(order, set_id, "ED", OBS_OVERLAY, _components("", *ED_IMAGE_PNG, data))
