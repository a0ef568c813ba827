"""ORU^R01 (HL7 v2.5.1) for one explained radiograph: a pure function of its inputs.

Profile (IHE RAD-132 as implemented in dcm4chee, see REFERENCE.md): MSH, PID, ORC, OBR, NTE (order level),
then one OBX per observation. AI output is preliminary: OBR-25 and every OBX-11 are ``P``.

Escaping: every DICOM- or model-derived value is escaped exactly once, here (:func:`escape`, HL7 v2.5.1
section 2.7.4), and handed to hl7apy as ER7. hl7apy keeps ER7 values as they are (it only escapes characters
that are not already part of an escape sequence), so a DICOM value that happens to contain ``\\F\\`` still
round-trips exactly.
"""

from __future__ import annotations

import base64
import re
import uuid
from datetime import datetime
from typing import NamedTuple

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message, Segment
from hl7apy.exceptions import ValidationError
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicom_node.errors import CxrLensError
from dicom_node.results import AI_DISCLAIMER, DEMO_LABEL, InferenceResult, OverlayRef
from dicom_node.settings import HL7Settings

HL7_VERSION = "2.5.1"
MESSAGE_TYPE = "ORU^R01^ORU_R01"
# HL7 Table 0396: "99zzz" is a locally defined coding system.
LOCAL_CODING_SYSTEM = "99CXRL"
ORDER_CONTROL = "SC"  # Table 0119: status changed
# Table 0038 "IP" (in process): a preliminary AI result does not complete the radiology order.
ORDER_STATUS = "IP"
DIAGNOSTIC_SERVICE_SECTION = "RAD"  # OBR-24, Table 0074
RESULT_STATUS = "P"  # OBR-25 / OBX-11, Tables 0123 / 0085: preliminary
COMMENT_SOURCE = "O"  # NTE-2, Table 0105: other system is the source of the comment
UNITS_DIMENSIONLESS = ("1", "", "UCUM")
# ED components 2-4 (REFERENCE.md). Table 0191 also lists "IM"; "Image" is what receivers commonly expect.
ED_IMAGE_PNG = ("Image", "PNG", "Base64")
SEX_CODES = {"M": "M", "F": "F", "O": "O"}  # DICOM (0010,0040) -> Table 0001; anything else present -> "U"
CONTROL_ID_LENGTH = 20  # MSH-10 is ST(20) in v2.5.1
UTF8_CHARSET = "UNICODE UTF-8"

_PID_REQUIRED = ("pid_3", "pid_5")
_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))


class Code(NamedTuple):
    """A coded element (CE/CWE components 1-3)."""

    code: str
    text: str
    system: str


OBS_FINDING = Code("AIFINDING", "AI predicted finding", LOCAL_CODING_SYSTEM)
OBS_METHOD = Code("AIXAI", "Explanation method", LOCAL_CODING_SYSTEM)
OBS_MODEL = Code("AIMODEL", "AI model", LOCAL_CODING_SYSTEM)
OBS_OVERLAY = Code("AIOVERLAY", "Grad-CAM overlay", LOCAL_CODING_SYSTEM)
OBS_STUDY = Code("113014", "DICOM Study", "DCM")
OBS_SERIES = Code("112002", "Series Instance UID", "DCM")
# There is no DCM code for a SOP Instance UID: RAD-28/128 use an HD OBX with only the text.
OBS_SOP_INSTANCE = Code("", "SOP Instance UID", "")


class ORUBuildError(CxrLensError):
    """The ORU^R01 could not be built or does not validate against HL7 v2.5.1."""


def escape(value: str) -> str:
    """Escape HL7 delimiters with the standard sequences (v2.5.1 section 2.7.4); the escape character first."""
    for char, sequence in _ESCAPES:
        value = value.replace(char, sequence)
    return value


def new_message_control_id() -> str:
    """A new MSH-10: 20 hex characters (80 random bits), within ST(20)."""
    return uuid.uuid4().hex[:CONTROL_ID_LENGTH].upper()


# --- DICOM DA / TM / DT -> HL7 TS (v2.5.1 section 2.A.74: YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]) ----

_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(\d{2})?(\d{2})?(?:\.(\d{0,6}))?$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{0,6}))?([+-]\d{4})?$")
_OFFSET = re.compile(r"^[+-](\d{2})(\d{2})$")


def _date_part(year: str, month: str | None, day: str | None) -> str | None:
    if month is not None and not 1 <= int(month) <= 12:
        return None
    if day is not None and (month is None or not 1 <= int(day) <= 31):
        return None
    return year + (month or "") + (day or "")


def _time_part(hour: str, minute: str | None, second: str | None, fraction: str | None) -> str | None:
    if int(hour) > 23 or (minute is not None and int(minute) > 59) or (second is not None and int(second) > 60):
        return None
    if second is None and fraction:
        return None
    text = hour + (minute or "") + (second or "")
    if fraction:
        text += "." + fraction[:4]  # TS carries at most 4 fractional digits; truncate, never round up to :60
    return text


def _offset(offset: str) -> str:
    match = _OFFSET.match(offset.strip())
    if match is None or int(match.group(1)) > 14 or int(match.group(2)) > 59:
        return ""
    return offset.strip()


def da_tm_to_ts(date: str, time: str = "", utc_offset: str = "") -> str:
    """DICOM DA (+ optional TM, + optional TimezoneOffsetFromUTC) as an HL7 TS; "" when the date is unusable.

    Legacy ``YYYY.MM.DD`` and ``HH:MM:SS`` forms are accepted. A time without a date is no TS and is dropped.
    """
    match = _DA.match(date.strip().replace(".", ""))
    if match is None:
        return ""
    ts = _date_part(*match.groups())
    if ts is None:
        return ""
    tm = _TM.match(time.strip().replace(":", ""))
    if tm is None:
        return ts
    time_text = _time_part(*tm.groups())
    if time_text is None:
        return ts
    return ts + time_text + _offset(utc_offset)


def dt_to_ts(value: str, utc_offset: str = "") -> str:
    """DICOM DT (``YYYY[MM[DD[HH[MM[SS[.F{1,6}]]]]]][&ZZXX]``) as an HL7 TS; "" when unusable.

    The DT's own offset wins over ``utc_offset`` (TimezoneOffsetFromUTC), as PS3.5 section 6.2 says.
    """
    match = _DT.match(value.strip())
    if match is None:
        return ""
    year, month, day, hour, minute, second, fraction, own_offset = match.groups()
    date_text = _date_part(year, month, day)
    if date_text is None:
        return ""
    if hour is None:
        return date_text
    if day is None:
        return ""  # an hour needs a full date
    time_text = _time_part(hour, minute, second, fraction)
    if time_text is None:
        return date_text
    return date_text + time_text + _offset(own_offset or utc_offset)


def datetime_to_ts(moment: datetime) -> str:
    """A Python datetime as a TS to the second, with its UTC offset when it is timezone-aware."""
    return moment.strftime("%Y%m%d%H%M%S") + moment.strftime("%z")


# --- reading the source dataset ------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    """A DICOM string value as text; "" when absent or empty. Multiple values keep DICOM's backslash."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


def _person_name(ds: Dataset, keyword: str) -> PersonName | None:
    value = ds.get(keyword)
    if isinstance(value, MultiValue):
        value = value[0] if len(value) else None
    if value is None or str(value) == "":
        return None
    return value if isinstance(value, PersonName) else PersonName(str(value))


def _procedure_code(ds: Dataset, settings: HL7Settings) -> Code:
    """OBR-4 from RequestedProcedureCodeSequence[0], else the configured procedure code."""
    sequence = ds.get("RequestedProcedureCodeSequence")
    if sequence:
        item = sequence[0]
        code = _text(item, "CodeValue") or _text(item, "LongCodeValue")
        if code:
            return Code(code, _text(item, "CodeMeaning"), _text(item, "CodingSchemeDesignator"))
    return Code(settings.procedure_code, settings.procedure_text, settings.procedure_coding_system)


def _assigning_authority(ds: Dataset) -> str:
    """CX.4 (HD) as ER7: IssuerOfPatientID & UniversalEntityID & UniversalEntityIDType (PS3.3 C.7.1.1)."""
    qualifiers = ds.get("IssuerOfPatientIDQualifiersSequence")
    item = qualifiers[0] if qualifiers else Dataset()
    parts = (_text(ds, "IssuerOfPatientID"), _text(item, "UniversalEntityID"), _text(item, "UniversalEntityIDType"))
    return "&".join(escape(part) for part in parts).rstrip("&")


def _placer_order_number(ds: Dataset, accession: str) -> str:
    """The DICOM placer order number when the modality carried it, else the accession number."""
    placer = _text(ds, "PlacerOrderNumberImagingServiceRequest")
    requests = ds.get("RequestAttributesSequence")
    if not placer and requests:
        placer = _text(requests[0], "PlacerOrderNumberImagingServiceRequest")
    return placer or accession


def _observation_ts(ds: Dataset) -> str:
    """OBR-7: Study Date/Time, else Acquisition DateTime."""
    offset = _text(ds, "TimezoneOffsetFromUTC")
    return da_tm_to_ts(_text(ds, "StudyDate"), _text(ds, "StudyTime"), offset) or dt_to_ts(
        _text(ds, "AcquisitionDateTime"), offset
    )


def _number(value: float) -> str:
    """NM without exponent (``1e-05`` is not NM): six decimals, trailing zeros dropped."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


# --- ER7 assembly --------------------------------------------------------------------------------------------


def _components(*parts: str) -> str:
    """Escape each component and join them with ``^``; trailing empty components are dropped."""
    return "^".join(escape(part) for part in parts).rstrip("^")


def _put(segment: Segment, field: str, er7: str, *, required: bool = False) -> None:
    """Set a field from ER7; a required field is sent empty rather than left out."""
    if er7 or required:
        setattr(segment, field, er7)


def _code(code: Code) -> str:
    return _components(code.code, code.text, code.system)


def _obx(
    group: Group, set_id: int, value_type: str, identifier: Code, value: str, units: str = ""
) -> Segment:
    obx = group.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
    _put(obx, "obx_1", str(set_id))
    _put(obx, "obx_2", value_type)
    _put(obx, "obx_3", _code(identifier), required=True)
    _put(obx, "obx_5", value)
    _put(obx, "obx_6", units)
    _put(obx, "obx_11", RESULT_STATUS)
    return obx


def build_oru(
    source: Dataset,
    result: InferenceResult,
    overlay: OverlayRef,
    settings: HL7Settings,
    *,
    message_control_id: str,
    now: datetime,
) -> str:
    """Build the ORU^R01 for one result: ER7 with ``\\r`` segment separators, checked by hl7apy's validator.

    ``source`` is the received image (patient, order and study come from it); ``overlay`` names the Secondary
    Capture that carries the heatmap. Missing DICOM attributes give empty fields. Raises
    :class:`ORUBuildError` when the message does not validate (structure, cardinality, datatypes).
    """
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
        _fill(message, source, result, overlay, settings, message_control_id, now)
        if not message.to_er7().isascii():
            message.msh.msh_18 = UTF8_CHARSET  # MSH-18, Table 0211; the sender encodes UTF-8
        _validate(message)
        er7 = message.to_er7()
    except ORUBuildError:
        raise
    except Exception as exc:  # hl7apy raises a zoo of exception types; name the boundary
        # Only the validator's texts are free of values (patient data); of the others, name the type.
        detail = str(exc) if isinstance(exc, ValidationError) else type(exc).__name__
        raise ORUBuildError(f"ORU^R01 {message_control_id}: {detail}") from exc
    return er7


def _validate(message: Message) -> None:
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


def _fill(
    message: Message,
    ds: Dataset,
    result: InferenceResult,
    overlay: OverlayRef,
    settings: HL7Settings,
    control_id: str,
    now: datetime,
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
    notes = [AI_DISCLAIMER] + ([DEMO_LABEL] if result.is_demo else [])
    for i, text in enumerate(notes, start=1):
        nte = order.add_segment("NTE")
        _put(nte, "nte_1", str(i))
        _put(nte, "nte_2", COMMENT_SOURCE)
        _put(nte, "nte_3", _components(text))

    finding_text = f"{result.label} ({DEMO_LABEL})" if result.is_demo else result.label
    set_id = 1
    _obx(order, set_id, "CWE", OBS_FINDING, _components(result.label, finding_text, LOCAL_CODING_SYSTEM))
    for label, probability in result.probabilities.items():
        set_id += 1
        identifier = Code(f"AIPROB.{label}", f"Probability of {label}", LOCAL_CODING_SYSTEM)
        _obx(order, set_id, "NM", identifier, _number(probability), _components(*UNITS_DIMENSIONLESS))
    set_id += 1
    _obx(order, set_id, "ST", OBS_METHOD, _components(result.method))
    set_id += 1
    _obx(order, set_id, "ST", OBS_MODEL, _components(result.model_text))
    study_uid = overlay.study_instance_uid or _text(ds, "StudyInstanceUID")
    set_id += 1
    _obx(order, set_id, "ST", OBS_STUDY, _components(study_uid))
    set_id += 1
    _obx(order, set_id, "ST", OBS_SERIES, _components(overlay.series_instance_uid))
    set_id += 1
    _obx(order, set_id, "HD", OBS_SOP_INSTANCE, _components(overlay.sop_instance_uid))

    if settings.include_image and overlay.png:
        set_id += 1
        data = base64.b64encode(overlay.png).decode("ascii")  # the Base64 alphabet has no HL7 delimiters
        _obx(order, set_id, "ED", OBS_OVERLAY, _components("", *ED_IMAGE_PNG, data))
