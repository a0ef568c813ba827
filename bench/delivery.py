"""The node's PACS and HL7 receiver in the calling process, and what reached them, judged from outside.

The PACS (a :class:`~dicom_node.peers.dicom_sink.DicomSink`) and the HL7 receiver (an
:class:`~dicom_node.peers.hl7_sink.HL7Sink`) outlive the node's restarts; each can answer late (``delay_s``) and run
a hook after it stored an item and before its answer goes back, e.g. to SIGKILL the node at that moment.
:func:`collect_delivery` reads what they hold, for the exactly-once check of :meth:`Delivery.problems`.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.uid import SecondaryCaptureImageStorage as SECONDARY_CAPTURE_IMAGE_STORAGE
from pynetdicom.events import Event

from dicom_node.deliver.mllp import message_control_id
from dicom_node.peers.dicom_sink import DicomSink
from dicom_node.peers.hl7_sink import HL7Sink
from dicom_node.peers.modality import Hook
from dicom_node.peers.node_process import PACS_AE, NodeLayout

_UID_TEXT = re.compile(r"[0-9]+(?:\.[0-9]+)+")


class _Hooked:
    """A peer's hook, run after it stores an item and before its answer goes back; ``delay_s`` slows it down,
    so that the node's outbox queues up."""

    after_store: Hook | None = None
    delay_s: float = 0.0

    def _stored_then_hook(self, store: Callable[[], Any]) -> Any:
        if self.delay_s:
            time.sleep(self.delay_s)
        answer = store()
        hook = self.after_store  # read once: the test may disarm it meanwhile
        if hook is not None and hook():
            self.after_store = None
        return answer


class _PACS(_Hooked, DicomSink):
    """The DICOM sink, with the hook run after an SC is stored and before the status goes back."""

    def _handle_store(self, event: Event) -> int:
        return self._stored_then_hook(lambda: super(_PACS, self)._handle_store(event))


class _Receiver(_Hooked, HL7Sink):
    """The MLLP sink, with the hook run after a message is stored and before its ACK goes back."""

    def receive(self, data: bytes) -> str:
        return self._stored_then_hook(lambda: super(_Receiver, self).receive(data))


class Peers:
    """The PACS and the HL7 receiver on the layout's ports; they outlive the node's restarts."""

    def __init__(self, layout: NodeLayout) -> None:
        self.pacs = _PACS(layout.root / "pacs", ae_title=PACS_AE, port=layout.pacs_port)
        self.ris = _Receiver("127.0.0.1", layout.hl7_port, layout.root / "hl7")

    def start(self) -> None:
        self.pacs.start()
        self.ris.start()

    def stop(self) -> None:
        self.pacs.stop()
        self.ris.stop()

    @property
    def sc_distinct(self) -> int:
        """Distinct SC SOP Instance UIDs the PACS stored."""
        return len({r.sop_instance_uid for r in self.pacs.received})

    @property
    def oru_count(self) -> int:
        """ORU messages stored and acknowledged (re-deliveries included)."""
        return sum(1 for _ in self.ris.out_dir.glob("*.hl7"))


@dataclass
class Delivery:
    """What reached the peers, keyed by the source image's SOP Instance UID."""

    sc_deliveries: int = 0  # C-STOREs the PACS answered, re-deliveries included
    sc_uids_by_source: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    oru_messages: int = 0  # messages the HL7 receiver stored and acknowledged, re-deliveries included
    control_ids_by_sc: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    oru_unmatched: int = 0  # ORUs naming no SC the PACS stored

    @property
    def sc_distinct(self) -> int:
        return sum(len(uids) for uids in self.sc_uids_by_source.values())

    @property
    def sc_redeliveries(self) -> int:
        return self.sc_deliveries - self.sc_distinct

    @property
    def oru_distinct(self) -> int:
        return sum(len(ids) for ids in self.control_ids_by_sc.values())

    @property
    def oru_redeliveries(self) -> int:
        return self.oru_messages - self.oru_distinct - self.oru_unmatched

    def problems(self, sources: set[str]) -> list[str]:
        """Why delivery was not exactly-once for ``sources`` (empty when it was).

        Exactly-once as the peers see it: one SC SOP Instance UID per source image (a PACS keeps one instance
        per UID) and one ORU per SC by MSH-10 (a receiver discards a repeated MSH-10). Re-deliveries of the same
        UID or MSH-10 are at-least-once at work: counted, not failed.
        """
        out = []
        if missing := sources - set(self.sc_uids_by_source):
            out.append(f"{len(missing)} image(s) without an SC at the PACS")
        if extra := set(self.sc_uids_by_source) - sources:
            out.append(f"{len(extra)} SC(s) reference an image that was not sent")
        if several := [s for s, uids in self.sc_uids_by_source.items() if len(uids) > 1]:
            out.append(f"{len(several)} image(s) got more than one distinct SC")
        sc_uids = {u for s, uids in self.sc_uids_by_source.items() if s in sources for u in uids}
        if no_oru := [u for u in sc_uids if not self.control_ids_by_sc.get(u)]:
            out.append(f"{len(no_oru)} SC(s) without an acknowledged ORU")
        if several_oru := [u for u in sc_uids if len(self.control_ids_by_sc.get(u, ())) > 1]:
            out.append(f"{len(several_oru)} SC(s) with ORUs under more than one MSH-10")
        if self.oru_unmatched:
            out.append(f"{self.oru_unmatched} ORU(s) name no SC stored at the PACS")
        return out


def collect_delivery(peers: Peers) -> Delivery:
    """Read what the PACS and the HL7 receiver hold now."""
    d = Delivery()
    # The Secondary Captures only: the Structured Report and Parametric Map of the same image travel beside them.
    received = [r for r in peers.pacs.received if r.sop_class_uid == SECONDARY_CAPTURE_IMAGE_STORAGE]
    d.sc_deliveries = len(received)
    for item in {r.sop_instance_uid: r for r in received}.values():
        sc = pydicom.dcmread(item.path, stop_before_pixels=True)
        d.sc_uids_by_source[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)].add(str(sc.SOPInstanceUID))
    stored = {u for uids in d.sc_uids_by_source.values() for u in uids}
    for path in sorted(peers.ris.out_dir.glob("*.hl7")):
        message = path.read_bytes().decode("utf-8", errors="replace")
        d.oru_messages += 1
        named = [uid for uid in _UID_TEXT.findall(message) if uid in stored]
        if named:
            d.control_ids_by_sc[named[0]][message_control_id(message)] += 1
        else:
            d.oru_unmatched += 1
    return d
