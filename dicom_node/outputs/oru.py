"""ORU^R01 (HL7 v2.5.1) for one explained radiograph: a pure function of its inputs.

Profile (IHE RAD-132 as implemented in dcm4chee): MSH, PID, ORC, OBR, NTE (order level),
then one OBX per observation. AI output is preliminary: OBR-25 and every OBX-11 are ``P``.

Escaping: every DICOM- or model-derived value is escaped exactly once, here (:func:`escape`, HL7 v2.5.1
section 2.7.4), and placed in the ER7 text as it is, so a DICOM value that happens to contain ``\\F\\`` still
round-trips exactly.

The ER7 text is assembled by hand, without hl7apy objects (see "ER7 assembly" below for why).
"""

from __future__ import annotations

import base64
import re
import uuid
from datetime import datetime
from typing import NamedTuple

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicom_node.errors import CxrLensError
from dicom_node.outputs.results import (
    AI_DISCLAIMER,
    InferenceResult,
    OverlayRef,
)
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
# ED components 2-4 (HL7 v2.5.1 section 2.A.24). Table 0191 also lists "IM"; "Image" is what receivers commonly expect.
ED_IMAGE_PNG = ("Image", "PNG", "Base64")
SEX_CODES = {"M": "M", "F": "F", "O": "O"}  # DICOM (0010,0040) -> Table 0001; anything else present -> "U"
CONTROL_ID_LENGTH = 20  # MSH-10 is ST(20) in v2.5.1
UTF8_CHARSET = "UNICODE UTF-8"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
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
# The other DICOM objects of the result, in the same study, each named by its own code (HD, like the SC's).
OBS_PARAMETRIC_MAP = Code("AIPMAP", "Parametric Map SOP Instance UID", LOCAL_CODING_SYSTEM)
OBS_STRUCTURED_REPORT = Code("AISR", "Structured Report SOP Instance UID", LOCAL_CODING_SYSTEM)
# Explanation trust (explain.trust): the share of the evidence on the lung fields (NM) and the verdict (CWE), with
# the codes the Structured Report uses for the same concepts.
OBS_LUNG_SHARE = Code("lung_share", "Share of the explanation on the lung fields", LOCAL_CODING_SYSTEM)
OBS_TRUST_VERDICT = Code("trust_verdict", "Explanation trust verdict", LOCAL_CODING_SYSTEM)
TRUST_VERDICT_CODES = {
    "ok": Code("ok", "Explanation on the lung fields", LOCAL_CODING_SYSTEM),
    "suspect": Code("suspect", "Explanation suspect", LOCAL_CODING_SYSTEM),
    "no_lung_fields": Code("no_lung_fields", "No lung fields found", LOCAL_CODING_SYSTEM),
}


class ORUBuildError(CxrLensError):
    """The ORU^R01 could not be built or does not validate against HL7 v2.5.1."""


def escape(value: str) -> str:
    """Escape HL7 delimiters with the standard sequences (v2.5.1 section 2.7.4); the escape character first.

    Control characters (a CR would end the segment) go as hexadecimal data, ``\\Xhh\\`` (section 2.7.4 too).
    """
    for char, sequence in _ESCAPES:
        value = value.replace(char, sequence)
    if _CONTROL.search(value):
        value = _CONTROL.sub(lambda m: f"\\X{ord(m.group()):02X}\\", value)
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
#
# Assembled by hand rather than with hl7apy objects: hl7apy costs about 1 ms of pure-Python CPU per field set,
# and with its validator 40-55 ms per message on the 2-core node (measured), the largest CPU cost per image and
# GIL time the node's other threads need. The structure is fixed, so the tests check it against the former
# hl7apy builder byte for byte and with hl7apy's validator (tests/hl7apy_reference.py), not every message.
# One deliberate difference: hl7apy re-printed TS values with strftime, which glibc does not zero-pad before the
# year 1000 (09990102 went out as 9990102); here a TS goes out as computed.

FIELD_SEPARATOR = "|"
ENCODING_CHARACTERS = "^~\\&"  # MSH-2: component, repetition, escape, subcomponent
SEGMENT_SEPARATOR = "\r"


def _components(*parts: str) -> str:
    """Escape each component and join them with ``^``; trailing empty components are dropped."""
    return "^".join(escape(part) for part in parts).rstrip("^")


def _code(code: Code) -> str:
    return _components(code.code, code.text, code.system)


def _segment(
    name: str, fields: dict[int, str], *, required: tuple[int, ...] = (), composite: tuple[int, ...] = ()
) -> str:
    """One segment from ``{field number: ER7}``, laid out as hl7apy's ``to_er7`` laid it out.

    An empty field is not sent: between sent fields it is empty, after the last one it is left out (no trailing
    ``|``). A ``required`` field is sent even when empty, so an empty one still ends with its ``|``. The
    ``composite`` fields (CX, XPN, HD, EI, CE, TS) lose their blank parts (:func:`_without_blank_parts`).
    MSH-1 is the field separator itself: MSH fields start at MSH-2.
    """
    first = 2 if name == "MSH" else 1
    sent = [number for number, er7 in fields.items() if er7 or number in required]
    values = [""] * (max(sent, default=first - 1) - first + 1)
    for number in sent:
        er7 = fields[number]
        values[number - first] = _without_blank_parts(er7) if number in composite else er7
    return FIELD_SEPARATOR.join([name, *values])


def _without_blank_parts(er7: str) -> str:
    """A composite field with its whitespace-only components and subcomponents sent empty, then trimmed.

    hl7apy parsed each field it was given and left out the whitespace-only (``str.isspace``) parts of a composite
    datatype, so a blank DICOM value (a PN component of spaces, a blank Code Meaning) went out empty; this keeps
    those bytes. Parts of primitive fields (ST, FT, ID, OBX-5) stay as they are. Only CX.4 (HD) carries
    subcomponents: everywhere else ``&`` is escaped.
    """
    components = er7.split("^")
    for i, component in enumerate(components):
        if "&" in component:
            component = "&".join(sub if sub.strip() else "" for sub in component.split("&")).rstrip("&")
        components[i] = component if component.strip() else ""
    return "^".join(components).rstrip("^")


def _obx(set_id: int, value_type: str, identifier: Code, value: str, units: str = "") -> str:
    fields = {1: str(set_id), 2: value_type, 3: _code(identifier), 5: value, 6: units, 11: RESULT_STATUS}
    return _segment("OBX", fields, required=(3,), composite=(3, 6))


def build_oru(
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
    """Build the ORU^R01 for one result: ER7 with ``\\r`` between segments (none after the last).

    ``source`` is the received image (patient, order and study come from it); ``overlay`` names the Secondary
    Capture that carries the heatmap (its series and SOP Instance UID lines are left out when it has none, an SC
    turned off); ``parametric_map_uid`` and ``structured_report_uid`` name the other DICOM objects of the result,
    each in an OBX of its own when given. Missing DICOM attributes give empty fields; PID-3 and PID-5 (required in
    v2.5.1, type 2 in DICOM) are then sent empty and the receiver decides. Raises :class:`ORUBuildError` for a
    control ID that does not fit MSH-10 or a source that cannot be read; its text carries no patient values.
    """
    if not message_control_id or len(message_control_id) > CONTROL_ID_LENGTH or escape(message_control_id) != (
        message_control_id
    ):
        raise ORUBuildError("message_control_id must be 1-20 characters without HL7 delimiters")
    try:
        msh = {
            2: ENCODING_CHARACTERS,
            3: _components(settings.sending_application),
            4: _components(settings.sending_facility),
            5: _components(settings.receiving_application),
            6: _components(settings.receiving_facility),
            7: datetime_to_ts(now),
            9: MESSAGE_TYPE,
            10: message_control_id,
            11: settings.processing_id,
            12: HL7_VERSION,
            15: settings.accept_ack_type,
            16: settings.application_ack_type,
        }
        others = [(OBS_PARAMETRIC_MAP, parametric_map_uid), (OBS_STRUCTURED_REPORT, structured_report_uid)]
        segments = [_msh(msh), *_order_segments(source, result, overlay, settings, now, others)]
        if not all(segment.isascii() for segment in segments):
            msh[18] = UTF8_CHARSET  # MSH-18, Table 0211; the sender encodes UTF-8
            segments[0] = _msh(msh)
    except Exception as exc:  # e.g. a DICOM value pydicom cannot decode: name the type, never the value
        raise ORUBuildError(f"ORU^R01 {message_control_id}: {type(exc).__name__}") from exc
    return SEGMENT_SEPARATOR.join(segments)


def _msh(fields: dict[int, str]) -> str:
    return _segment("MSH", fields, required=(7,), composite=(3, 4, 5, 6, 7, 9, 11, 12))  # HD, TS, MSG, PT, VID


def _order_segments(
    ds: Dataset,
    result: InferenceResult,
    overlay: OverlayRef,
    settings: HL7Settings,
    now: datetime,
    others: list[tuple[Code, str]],
) -> list[str]:
    """PID, ORC, OBR, the order-level NTEs and the OBXs, in message order; ``others`` are (OBX-3, SOP Instance
    UID) of the result's other DICOM objects, an empty UID for one not made."""
    patient_id = _text(ds, "PatientID")
    cx = "^".join([escape(patient_id), "", "", _assigning_authority(ds), "MR"]).rstrip("^") if patient_id else ""
    name = _person_name(ds, "PatientName")
    xpn = ""
    if name is not None:
        # DICOM PN is family^given^middle^prefix^suffix; XPN is family^given^middle^suffix^prefix.
        xpn = _components(name.family_name, name.given_name, name.middle_name, name.name_suffix, name.name_prefix)
    sex = _text(ds, "PatientSex").strip().upper()
    pid = {
        1: "1",
        3: cx,
        5: xpn,
        7: da_tm_to_ts(_text(ds, "PatientBirthDate"), _text(ds, "PatientBirthTime")),
        8: SEX_CODES.get(sex, "U") if sex else "",
    }
    segments = [_segment("PID", pid, required=(3, 5), composite=(3, 5, 7))]

    accession = _text(ds, "AccessionNumber")
    placer = _placer_order_number(ds, accession)
    orc = {1: ORDER_CONTROL, 2: _components(placer), 3: _components(accession), 5: ORDER_STATUS}
    segments.append(_segment("ORC", orc, composite=(2, 3)))
    obr = {
        1: "1",
        2: _components(placer),
        3: _components(accession),
        4: _code(_procedure_code(ds, settings)),
        7: _observation_ts(ds),
        18: _components(accession),
        22: datetime_to_ts(now),
        24: DIAGNOSTIC_SERVICE_SECTION,
        25: RESULT_STATUS,
    }
    segments.append(_segment("OBR", obr, required=(4,), composite=(2, 3, 4, 7, 22)))

    # Order-level notes: they qualify the whole result, not one OBX (HL7 places them right after OBR); a trust
    # warning too, since a finding made for the wrong reason is the whole result's problem.
    notes = [AI_DISCLAIMER] + ([result.model_label] if result.model_label else [])
    notes += [result.trust_warning] if result.trust_warning else []
    for i, text in enumerate(notes, start=1):
        segments.append(_segment("NTE", {1: str(i), 2: COMMENT_SOURCE, 3: _components(text)}))

    finding_text = f"{result.label} ({result.model_label})" if result.model_label else result.label
    observations = [("CWE", OBS_FINDING, _components(result.label, finding_text, LOCAL_CODING_SYSTEM), "")]
    units = _components(*UNITS_DIMENSIONLESS)
    for label, probability in result.probabilities.items():
        identifier = Code(f"AIPROB.{label}", f"Probability of {label}", LOCAL_CODING_SYSTEM)
        observations.append(("NM", identifier, _number(probability), units))
    if result.evidence is not None:
        verdict = str(result.evidence["verdict"])
        value = TRUST_VERDICT_CODES.get(verdict) or Code(verdict, verdict, LOCAL_CODING_SYSTEM)
        observations += [
            ("NM", OBS_LUNG_SHARE, _number(float(result.evidence["lungs"])), units),
            ("CWE", OBS_TRUST_VERDICT, _code(value), ""),
        ]
    study_uid = overlay.study_instance_uid or _text(ds, "StudyInstanceUID")
    observations += [
        ("ST", OBS_METHOD, _components(result.method), ""),
        ("ST", OBS_MODEL, _components(result.model_text), ""),
        ("ST", OBS_STUDY, _components(study_uid), ""),
    ]
    if overlay.sop_instance_uid:
        observations += [
            ("ST", OBS_SERIES, _components(overlay.series_instance_uid), ""),
            ("HD", OBS_SOP_INSTANCE, _components(overlay.sop_instance_uid), ""),
        ]
    observations += [("HD", code, _components(uid), "") for code, uid in others if uid]
    if settings.include_image and overlay.png:
        data = base64.b64encode(overlay.png).decode("ascii")  # the Base64 alphabet has no HL7 delimiters
        observations.append(("ED", OBS_OVERLAY, _components("", *ED_IMAGE_PNG, data), ""))
    segments += [_obx(i, *observation) for i, observation in enumerate(observations, start=1)]
    return segments
