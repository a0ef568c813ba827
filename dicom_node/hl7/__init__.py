"""HL7 v2.5.1 results: ORU^R01 builder (pure), MLLP transport, outbox-backed sender, and a demo sink."""

from dicom_node.hl7.mllp import Ack, Disposition, MLLPError, build_ack, frame, send_message, unframe
from dicom_node.hl7.oru import ORUBuildError, build_oru, new_message_control_id
from dicom_node.hl7.sender import HL7Sender
from dicom_node.hl7.sink import HL7Sink, run_sink_forever

__all__ = [
    "Ack",
    "Disposition",
    "HL7Sender",
    "HL7Sink",
    "MLLPError",
    "ORUBuildError",
    "build_ack",
    "build_oru",
    "frame",
    "new_message_control_id",
    "run_sink_forever",
    "send_message",
    "unframe",
]
