"""MLLP delivery against a real receiver (the `hl7` package's asyncio MLLP server), and our own demo sink."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import hl7
import hl7.mllp
import pytest

from dicom_node.deliver.hl7 import CHANNEL, HL7Sender
from dicom_node.deliver.mllp import (
    CONNECTION_FAILED,
    DISPOSITIONS,
    MALFORMED_ACK,
    TIMEOUT,
    FramingError,
    MLLPError,
    build_ack,
    frame,
    parse_ack,
    send_message,
    unframe,
)
from dicom_node.deliver.sender import Disposition
from dicom_node.outputs.oru import build_oru
from dicom_node.peers.hl7_sink import HL7Sink, run_sink_forever
from dicom_node.peers.node_process import free_port
from dicom_node.settings import HL7Settings
from dicom_node.storage.outbox import Outbox

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 10.0

# A policy answers (MSH-10, how often this MSH-10 has arrived) with an ACK code, WITHHOLD or GARBAGE.
WITHHOLD = "WITHHOLD"
GARBAGE = "GARBAGE"
Policy = Callable[[str, int], str]


def message(n: int, prefix: str = "MSG") -> str:
    return (
        f"MSH|^~\\&|CXR_LENS|RADIOLOGY|HS_RESULTS|HEALTHSHARE|20240305143015||ORU^R01^ORU_R01|{prefix}{n:04d}|P|2.5.1\r"
        f"PID|1||P{n}\r"
    )


class Receiver:
    """A real MLLP peer: `hl7.mllp.start_hl7_server` in a background thread's own event loop."""

    def __init__(self, policy: Policy = lambda _id, _n: "AA", port: int = 0, err_text: str = "") -> None:
        self.policy = policy
        self.err_text = err_text
        self.port = port
        self.received: list[str] = []  # MSH-10 in arrival order, repeats included
        self.bodies: dict[str, list[str]] = {}
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> Receiver:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self._server = future.result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _start(self) -> asyncio.AbstractServer:
        return await hl7.mllp.start_hl7_server(self._serve, "127.0.0.1", self.port, encoding="utf-8")

    async def _serve(self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    msg = await reader.readmessage()
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                control_id = msg.extract_field("MSH", 1, 10)
                with self._cond:
                    self.received.append(control_id)
                    self.bodies.setdefault(control_id, []).append(str(msg))
                    seen = self.received.count(control_id)
                    self._cond.notify_all()
                answer = self.policy(control_id, seen)
                if answer == WITHHOLD:
                    continue
                if answer == GARBAGE:
                    writer.writeblock(b"this is not an ACK")
                else:
                    ack = str(msg.create_ack(answer))
                    if answer not in ("AA", "CA"):
                        ack += f"\rERR|||207^Application internal error^HL70357|E||||{self.err_text}"
                    writer.writemessage(hl7.parse(ack))
                await writer.drain()
        finally:
            writer.close()
            self._tasks.discard(task)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), f"receiver state: {self.received}"

    def count(self, control_id: str) -> int:
        with self._cond:
            return self.received.count(control_id)

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., Receiver]]:
    started: list[Receiver] = []

    def start(**kwargs: object) -> Receiver:
        receiver = Receiver(**kwargs).start()  # type: ignore[arg-type]
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite")
    yield box
    box.close()


def make_sender(outbox: Outbox, port: int, **overrides: object) -> HL7Sender:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "ack_timeout_s": 2.0,
        "retry_initial_s": 0.05,
        "retry_max_s": 0.2,
    }
    values.update(overrides)
    return HL7Sender(outbox, HL7Settings(**values))  # type: ignore[arg-type]


def states(outbox: Outbox) -> list[tuple[str, int]]:
    rows = outbox._db.execute("SELECT state, attempts FROM outbox ORDER BY id").fetchall()
    return [(s, a) for s, a in rows]


def later(seconds: float = 10.0) -> float:
    return time.time() + seconds


# --- framing, ACK parsing, the disposition table -------------------------------------------------------------


def test_frame_and_unframe() -> None:
    assert frame("MSH|x\r") == b"\x0bMSH|x\r\x1c\x0d"
    assert unframe(frame("MSH|ü\r")) == "MSH|ü\r".encode()
    for bad in (b"MSH|x\r", b"\x0bMSH|x\r", b"\x0ba\x1c\x0d\x0bb\x1c\x0d"):
        with pytest.raises(FramingError):
            unframe(bad)


def test_one_table_maps_every_outcome() -> None:
    assert {code: DISPOSITIONS[code] for code in ("AA", "CA", "AR", "CR", "AE", "CE")} == {
        "AA": Disposition.DONE,
        "CA": Disposition.DONE,
        "AR": Disposition.RETRY,
        "CR": Disposition.RETRY,
        "AE": Disposition.PARK,
        "CE": Disposition.PARK,
    }
    assert {DISPOSITIONS[o] for o in (TIMEOUT, CONNECTION_FAILED, MALFORMED_ACK)} == {Disposition.RETRY}


def test_parse_ack_reads_msa_and_err_text() -> None:
    v25 = (
        b"MSH|^~\\&|HS|IRIS|CXR|RAD|20240101||ACK^R01^ACK|A1|P|2.5.1\r"
        b"MSA|AE|MSG0001\rERR|||207^x^HL70357|E||||no\\S\\good\r"
    )
    ack = parse_ack(v25)
    assert (ack.code, ack.control_id, ack.text, ack.disposition) == ("AE", "MSG0001", "no^good", Disposition.PARK)
    v23 = b"MSH|^~\\&|HS|IRIS|CXR|RAD|20240101||ACK|A1|P|2.3\rMSA|AR|MSG0002\rERR|PID^1^3^204&Unknown key&HL70357\r"
    assert parse_ack(v23).text == "Unknown key"
    assert parse_ack(b"MSH|^~\\&|a\rMSA|CA|X|fine\r").text == "fine"
    for bad in (b"garbage", b"MSH|^~\\&|a\r", b"MSH|^~\\&|a\rMSA|ZZ|X\r"):
        with pytest.raises(FramingError):
            parse_ack(bad)


def test_build_ack_echoes_control_id_and_swaps_parties() -> None:
    ack = hl7.parse(build_ack(message(7), "AE", "bad|value", now=datetime(2024, 1, 1, tzinfo=UTC)))
    msh = ack.segment("MSH")
    assert [str(msh[i]) for i in (3, 4, 5, 6)] == ["HS_RESULTS", "HEALTHSHARE", "CXR_LENS", "RADIOLOGY"]
    assert str(msh[9]) == "ACK^R01^ACK"
    assert ack.extract_field("MSA", 1, 1) == "AE"
    assert ack.extract_field("MSA", 1, 2) == "MSG0007"
    assert ack.extract_field("ERR", 1, 8) == "bad|value"
    assert hl7.parse(build_ack("not hl7", "AA")).extract_field("MSA", 1, 1) == "AR"


# --- the sender against a real receiver ----------------------------------------------------------------------


def test_aa_delivers_in_order(receiver_factory: Callable[..., Receiver], outbox: Outbox) -> None:
    receiver = receiver_factory()
    sender = make_sender(outbox, receiver.port)
    for n in range(3):
        sender.enqueue(message(n), dedup_key=f"sop-{n}")
    sender.enqueue(message(0), dedup_key="sop-0")  # the same output twice is stored once
    assert sender.run_once() == 3
    assert receiver.received == ["MSG0000", "MSG0001", "MSG0002"]
    assert states(outbox) == [("done", 1)] * 3
    assert receiver.bodies["MSG0001"] == [message(1)]


def test_ar_is_retried_and_delivered_once_accepted(
    receiver_factory: Callable[..., Receiver], outbox: Outbox
) -> None:
    receiver = receiver_factory(policy=lambda cid, seen: "AR" if cid == "MSG0000" and seen == 1 else "AA")
    sender = make_sender(outbox, receiver.port)
    sender.enqueue(message(0), "sop-0")
    sender.enqueue(message(1), "sop-1")
    assert sender.run_once() == 1  # AR: the head waits for its backoff and nothing overtakes it
    assert states(outbox) == [("pending", 1), ("pending", 0)]
    assert outbox.problems()[0].last_error.startswith("AR")
    assert sender.run_once() == 0  # not due yet
    assert sender.run_once(now=later()) == 2
    assert receiver.received == ["MSG0000", "MSG0000", "MSG0001"]
    assert states(outbox) == [("done", 2), ("done", 1)]


def test_ae_parks_with_the_error_text_and_is_not_retried(
    receiver_factory: Callable[..., Receiver], outbox: Outbox
) -> None:
    receiver = receiver_factory(
        policy=lambda cid, _seen: "AE" if cid == "MSG0000" else "AA", err_text="PID-3 not known"
    )
    sender = make_sender(outbox, receiver.port)
    sender.enqueue(message(0), "sop-0")
    sender.enqueue(message(1), "sop-1")
    assert sender.run_once() == 2  # the parked head no longer blocks the queue
    assert sender.run_once(now=later()) == 0
    assert receiver.received == ["MSG0000", "MSG0001"]
    assert states(outbox) == [("parked", 1), ("done", 1)]
    parked = outbox.problems()[0]
    assert parked.state == "parked" and parked.last_error == "AE: PID-3 not known"


def test_receiver_down_then_up(receiver_factory: Callable[..., Receiver], outbox: Outbox) -> None:
    port = free_port()
    sender = make_sender(outbox, port)
    sender.enqueue(message(0), "sop-0")
    assert sender.run_once() == 1
    assert outbox.problems()[0].last_error.startswith(CONNECTION_FAILED)
    receiver = receiver_factory(port=port)
    assert sender.run_once(now=later()) == 1
    assert receiver.received == ["MSG0000"]
    assert states(outbox) == [("done", 2)]


def test_timeout_and_malformed_ack_are_retried(receiver_factory: Callable[..., Receiver], outbox: Outbox) -> None:
    answers = {1: WITHHOLD, 2: GARBAGE}
    receiver = receiver_factory(policy=lambda _cid, seen: answers.get(seen, "AA"))
    sender = make_sender(outbox, receiver.port, ack_timeout_s=0.3)
    sender.enqueue(message(0), "sop-0")
    sender.run_once()
    assert outbox.problems()[0].last_error.startswith(TIMEOUT)
    sender.run_once(now=later())
    assert outbox.problems()[0].last_error.startswith(MALFORMED_ACK)
    sender.run_once(now=later(20))
    assert states(outbox) == [("done", 3)]
    assert receiver.count("MSG0000") == 3


def test_ack_for_another_message_is_malformed(outbox: Outbox) -> None:
    with HL7Sink("127.0.0.1", 0, outbox.db_path.parent / "sink") as sink:
        wrong = message(1).replace("MSG0001", "OTHER")
        sink.receive = lambda _data: build_ack(wrong, "AA")  # type: ignore[method-assign]
        sender = make_sender(outbox, sink.port)
        sender.enqueue(message(1), "sop-1")
        sender.run_once()
    assert outbox.problems()[0].last_error.startswith(MALFORMED_ACK)


def test_run_forever_delivers_and_stops(receiver_factory: Callable[..., Receiver], outbox: Outbox) -> None:
    receiver = receiver_factory()
    sender = make_sender(outbox, receiver.port)
    stop = threading.Event()
    worker = threading.Thread(target=sender.run_forever, args=(stop,))
    worker.start()
    try:
        for n in range(3):
            sender.enqueue(message(n), f"sop-{n}")
        receiver.wait_for(lambda: len(receiver.received) == 3)
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    assert receiver.received == ["MSG0000", "MSG0001", "MSG0002"]


NODE_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from dicom_node.deliver.hl7 import CHANNEL, HL7Sender
    from dicom_node.storage.outbox import Outbox
    from dicom_node.settings import HL7Settings

    db, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    settings = HL7Settings(host="127.0.0.1", port=port, ack_timeout_s=30, retry_initial_s=0.05, retry_max_s=0.2)
    outbox = Outbox(db)
    sender = HL7Sender(outbox, settings)
    for n in range(count):  # a restarted node enqueues the same outputs again: stored once (dedup_key)
        sender.enqueue(
            "MSH|^~\\\\&|CXR_LENS|RADIOLOGY|HS_RESULTS|HEALTHSHARE|20240305143015||ORU^R01^ORU_R01|"
            f"MSG{n:04d}|P|2.5.1\\rPID|1||P{n}\\r",
            dedup_key=f"sop-{n}",
        )
    while outbox.head(CHANNEL, sender.destination) is not None:
        sender.run_once()
        time.sleep(0.01)
    """
)


def test_node_killed_with_messages_pending_delivers_each_once(
    receiver_factory: Callable[..., Receiver], tmp_path: Path
) -> None:
    """SIGKILL the node while the receiver holds an ACK back; a new node on the same outbox finishes the job.

    Exactly-once here means: every message reaches the receiver, in order, and none is *accepted* twice when
    the receiver discards a repeated MSH-10. Delivery itself is at-least-once: MSG0003 was received but its
    ACK never reached the killed node, so the new node sends it again, the same bytes with the same MSH-10.
    Messages the old node saw acknowledged are never sent again.
    """
    count, held = 6, "MSG0003"
    release = threading.Event()
    receiver = receiver_factory(policy=lambda cid, _seen: WITHHOLD if cid == held and not release.is_set() else "AA")
    db, script = tmp_path / "outbox.sqlite", tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), str(db), str(receiver.port), str(count)]

    first = subprocess.Popen(args, env=env)
    try:
        receiver.wait_for(lambda: held in receiver.received)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(5)
    assert receiver.received == ["MSG0000", "MSG0001", "MSG0002", held]

    release.set()
    second = subprocess.run(args, env=env, timeout=30)
    assert second.returncode == 0

    expected = [f"MSG{n:04d}" for n in range(count)]
    accepted = list(dict.fromkeys(receiver.received))  # what a receiver deduplicating on MSH-10 keeps
    assert accepted == expected
    repeats = {cid: n for cid, n in Counter(receiver.received).items() if n > 1}
    assert repeats == {held: 2}
    assert receiver.bodies[held][0] == receiver.bodies[held][1]
    box = Outbox(db)
    try:
        assert box.counts() == {(CHANNEL, "done"): count}
    finally:
        box.close()


# --- our own sink ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "disposition"), [("AA", "done"), ("AE", "parked"), ("AR", "pending")])
def test_sink_modes(tmp_path: Path, mode: str, disposition: str) -> None:
    out = tmp_path / "sink"
    with HL7Sink("127.0.0.1", 0, out, mode) as sink:  # type: ignore[arg-type]
        ack = send_message("127.0.0.1", sink.port, message(5), timeout_s=2)
        assert (ack.code, ack.control_id) == (mode, "MSG0005")
        box = Outbox(tmp_path / "outbox.sqlite")
        try:
            sender = make_sender(box, sink.port)
            sender.enqueue(message(6), "sop-6")
            sender.run_once()
            assert states(box)[0][0] == disposition
        finally:
            box.close()
    stored = sorted(p.name for p in out.iterdir())
    assert stored == ["000001_MSG0005.hl7", "000002_MSG0006.hl7"]
    assert (out / "000001_MSG0005.hl7").read_bytes() == message(5).encode()


def test_sink_receives_a_real_oru_and_numbering_continues(tmp_path: Path, outbox: Outbox) -> None:
    from tests.test_hl7_oru import make_overlay, make_result, make_source, tiny_png

    oru = build_oru(
        make_source(PatientName="Mc&Don|ald^Jo~hn"),
        make_result(is_demo=True),
        make_overlay(tiny_png()),
        HL7Settings(),
        message_control_id="ORU0000000000000001",
        now=datetime(2024, 3, 5, tzinfo=UTC),
    )
    out = tmp_path / "sink"
    out.mkdir()
    (out / "000041_OLD.hl7").write_bytes(b"")
    with HL7Sink("127.0.0.1", 0, out) as sink:
        sender = make_sender(outbox, sink.port)
        sender.enqueue(oru, "sop-1")
        assert sender.run_once() == 1
    assert (out / "000042_ORU0000000000000001.hl7").read_bytes().decode("utf-8") == oru
    assert states(outbox) == [("done", 1)]


def test_run_sink_forever_until_stopped(tmp_path: Path) -> None:
    port = free_port()
    stop = threading.Event()
    worker = threading.Thread(target=run_sink_forever, args=("127.0.0.1", port, tmp_path, "AA"), kwargs={"stop": stop})
    worker.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                ack = send_message("127.0.0.1", port, message(9), timeout_s=2)
                break
            except MLLPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert ack.code == "AA"
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()
    assert (tmp_path / "000001_MSG0009.hl7").exists()
