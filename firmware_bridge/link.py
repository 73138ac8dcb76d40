"""The link layer, sans-I/O: sequence numbers, ACK/NACK, retransmission, duplicate
suppression, heartbeats, link-loss detection and the HELLO handshake.

Bytes and the current time go in (`receive(data, now)`, `tick(now)`), events come out,
and the bytes to write are collected in `data_to_send()`. Nothing here reads a clock
or touches a file descriptor, so tests drive it with made-up times. `HostLink` and
`DeviceLink` share the engine `Link`; they differ only in the session handshake
(docs/firmware-protocol.md, "Reliability" and "Session").
"""

from __future__ import annotations

import dataclasses
import secrets
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from firmware_bridge import messages as m
from firmware_bridge.frame import (
    DEFAULT_MAX_FRAME,
    MIN_MAX_FRAME,
    OVERHEAD,
    Flags,
    Frame,
    FrameDecoder,
    FrameError,
    encode,
)

#: HELLOs remembered while unanswered (one per hello_interval): an answer to an older
#: one still opens the session
MAX_HELLOS = 8

__all__ = [
    "Delivered",
    "DeviceLink",
    "Event",
    "FrameRejected",
    "FrameTooLarge",
    "HostLink",
    "Link",
    "LinkLost",
    "LinkUp",
    "MessageReceived",
    "SendFailed",
    "SessionStarted",
    "Timers",
]

# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageReceived:
    message: m.Message
    seq: int
    flags: int


@dataclass(frozen=True, slots=True)
class Delivered:
    """The peer acknowledged the reliable frame `seq`."""

    seq: int


@dataclass(frozen=True, slots=True)
class SendFailed:
    """The reliable frame `seq` was not acknowledged: ``timeout`` (retries exhausted),
    ``link_lost``, or the NACK reason in lower case (``unsupported``...)."""

    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class LinkUp:
    """Host side: the device answered HELLO (sent every time a session starts).
    ``since_hello``: seconds from sending that HELLO to this answer. The device's uptime
    in the answer was read in between, so ``now - since_hello - uptime`` maps uptime to
    host time erring early by at most the device's reply delay, even when the answer
    is a retransmission (an offset from the arrival would err late by the timeout)."""

    capabilities: m.Capabilities
    since_hello: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionStarted:
    """Device side: a HELLO opened a session; the device must answer CAPABILITIES."""

    hello: m.Hello
    seq: int


@dataclass(frozen=True, slots=True)
class LinkLost:
    """``silence`` (no frame for lost_after heartbeats), ``device_reset`` (the device
    lost its session: it rebooted) or ``no_session`` (the device NACKed for it)."""

    reason: str


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """A frame that was dropped: a FrameError reason, ``unknown_type`` or ``bad_payload``."""

    reason: str


Event = (
    MessageReceived | Delivered | SendFailed | LinkUp | SessionStarted | LinkLost | FrameRejected
)


class FrameTooLarge(ValueError):
    """The message does not fit in the frame size the peer accepts."""


@dataclass(frozen=True, slots=True)
class Timers:
    """Timing of the link, in seconds (the defaults of docs/firmware-protocol.md)."""

    rto: float = 0.5  # first retransmission timeout; doubles per retry...
    rto_max: float = 2.0  # ...up to this
    retries: int = 4  # retransmissions before SendFailed("timeout")
    heartbeat: float = 1.0  # send a HEARTBEAT when nothing was sent for this long
    lost_after: int = 3  # link lost after this many heartbeat intervals of silence
    hello_interval: float = 1.0  # host: repeat HELLO this often until answered
    dedup_window: int = 64  # remembered sequence numbers of received reliable frames


@dataclass(slots=True)
class _Pending:
    type: int
    payload: bytes
    deadline: float
    attempts: int = 0


class Link:
    """The engine both sides share. Subclasses add the session handshake."""

    def __init__(
        self,
        *,
        max_frame: int = 1024,
        timers: Timers | None = None,
        now: float = 0.0,
        screen: Callable[[m.Message], m.NackReason | None] | None = None,
    ) -> None:
        self.timers = timers or Timers()
        self.max_frame = max_frame  # what this side accepts
        self.peer_max_frame = DEFAULT_MAX_FRAME  # what we may send (until negotiated)
        self.decoder = FrameDecoder(max_frame)
        self.counters: Counter[str] = Counter()
        self._screen = screen  # may refuse a reliable message with a NACK reason
        self._t0 = now
        self._tx_seq = 0
        self._out = bytearray(b"\x00")  # a leading delimiter ends any partial frame
        self._pending: dict[int, _Pending] = {}
        self._seen: deque[int] = deque()
        self._seen_set: set[int] = set()
        self._last_rx = now
        self._last_tx = now
        self.active = False  # a session is up: heartbeats and link-loss checks run

    # -- the public surface -------------------------------------------------------------

    def uptime_ms(self, now: float) -> int:
        return max(0, int((now - self._t0) * 1000))

    @property
    def max_payload(self) -> int:
        """The largest payload that fits a frame the peer accepts."""
        return self.peer_max_frame - OVERHEAD

    def send(self, message: m.Message, now: float, reliable: bool = True) -> int:
        """Queues a message; returns its seq. A reliable one is retransmitted until the
        peer ACKs it (Delivered) or the retries run out (SendFailed)."""
        payload = message.encode_payload()
        if len(payload) + OVERHEAD > self.peer_max_frame:
            raise FrameTooLarge(
                f"{type(message).__name__}: {len(payload) + OVERHEAD} bytes, "
                f"the peer accepts {self.peer_max_frame}"
            )
        seq = self._next_seq()
        flags = Flags.ACK_REQUESTED if reliable else Flags.NONE
        self._emit(message.TYPE, seq, payload, flags, now)
        if reliable:
            self._pending[seq] = _Pending(message.TYPE, payload, now + self.timers.rto)
        return seq

    def receive(self, data: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        for item in self.decoder.feed(data):
            if isinstance(item, FrameError):
                self.counters[f"rejected_{item.reason}"] += 1
                events.append(FrameRejected(item.reason))
            else:
                self._on_frame(item, now, events)
        return events

    def tick(self, now: float) -> list[Event]:
        events: list[Event] = []
        t = self.timers
        for seq, p in list(self._pending.items()):
            if now < p.deadline:
                continue
            if p.attempts >= t.retries:
                del self._pending[seq]
                self.counters["send_failed"] += 1
                events.append(SendFailed(seq, "timeout"))
                continue
            p.attempts += 1
            p.deadline = now + min(t.rto * 2**p.attempts, t.rto_max)
            self.counters["retransmits"] += 1
            self._emit(p.type, seq, p.payload, Flags.ACK_REQUESTED | Flags.RETRANSMIT, now)
        if self.active and now - self._last_rx >= t.lost_after * t.heartbeat:
            self._lose("silence", now, events)
        self._timers(now, events)
        if now - self._last_tx >= t.heartbeat and self._heartbeats_due():
            self.send(m.Heartbeat(self.uptime_ms(now), self.active), now, reliable=False)
        return events

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (None: only when bytes arrive)."""
        t = self.timers
        times = [p.deadline for p in self._pending.values()]
        if self._heartbeats_due():
            times.append(self._last_tx + t.heartbeat)
        if self.active:
            times.append(self._last_rx + t.lost_after * t.heartbeat)
        extra = self._extra_deadline()
        if extra is not None:
            times.append(extra)
        return min(times) if times else None

    @property
    def pending(self) -> frozenset[int]:
        """Seqs of reliable frames not yet acknowledged."""
        return frozenset(self._pending)

    def nack(self, seq: int, reason: m.NackReason, now: float) -> None:
        """Answers frame `seq` with a NACK (an application that cannot take it)."""
        self._emit(m.MsgType.NACK, seq, bytes([reason]), Flags.IS_RESPONSE, now)

    # -- hooks for the two sides --------------------------------------------------------

    def _heartbeats_due(self) -> bool:
        return self.active

    def _extra_deadline(self) -> float | None:
        return None

    def _timers(self, now: float, events: list[Event]) -> None:
        """Side-specific timers, called by tick."""

    def _session(self, msg: m.Message, frame: Frame, now: float, events: list[Event]) -> bool:
        """Called for every decoded message before duplicate checks; True: the message
        starts a new session, so the duplicate memory is cleared first."""
        return False

    def _refuse(self, msg: m.Message) -> m.NackReason | None:
        return self._screen(msg) if self._screen else None

    def _after(self, msg: m.Message, frame: Frame, now: float, events: list[Event]) -> None:
        events.append(MessageReceived(msg, frame.seq, frame.flags))

    def _on_nack(self, seq: int, reason: m.NackReason, now: float, events: list[Event]) -> None:
        pass

    # -- internals ----------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self._tx_seq
        self._tx_seq = (seq + 1) & 0xFFFF
        return seq

    def _emit(self, type_: int, seq: int, payload: bytes, flags: int, now: float) -> None:
        self._out += encode(type_, seq, payload, flags)
        self._last_tx = now
        self.counters["frames_tx"] += 1

    def _lose(self, reason: str, now: float, events: list[Event]) -> None:
        """The session is gone: every reliable frame in flight fails with it."""
        self.active = False
        self.counters["link_lost"] += 1
        events.append(LinkLost(reason))
        for seq in sorted(self._pending):
            events.append(SendFailed(seq, "link_lost"))
        self._pending.clear()

    def _reset_seen(self) -> None:
        self._seen.clear()
        self._seen_set.clear()

    def _on_frame(self, frame: Frame, now: float, events: list[Event]) -> None:
        self._last_rx = now
        self.counters["frames_rx"] += 1
        if frame.flags & Flags.IS_RESPONSE:
            self._on_response(frame, now, events)
            return
        reliable = bool(frame.flags & Flags.ACK_REQUESTED)
        try:
            msg = m.decode(frame)
        except m.MessageError as e:
            reason = e.reason.name.lower()
            self.counters[f"rejected_{reason}"] += 1
            events.append(FrameRejected(reason))
            if reliable:
                self.nack(frame.seq, e.reason, now)
            return
        if self._session(msg, frame, now, events):
            self._reset_seen()
        if reliable:
            if frame.seq in self._seen_set:
                # our ACK was lost and the peer repeated: ACK again, do not act twice
                self.counters["duplicates"] += 1
                self._emit(m.MsgType.ACK, frame.seq, b"", Flags.IS_RESPONSE, now)
                return
            refusal = self._refuse(msg)
            if refusal is not None:
                self.counters["nacks_tx"] += 1
                self.nack(frame.seq, refusal, now)
                return  # not remembered: a retry may be accepted
            self._emit(m.MsgType.ACK, frame.seq, b"", Flags.IS_RESPONSE, now)
            self._seen.append(frame.seq)
            self._seen_set.add(frame.seq)
            if len(self._seen) > self.timers.dedup_window:
                self._seen_set.discard(self._seen.popleft())
        self._after(msg, frame, now, events)

    def _on_response(self, frame: Frame, now: float, events: list[Event]) -> None:
        try:
            msg = m.decode(frame)
        except m.MessageError as e:
            self.counters["rejected_bad_response"] += 1
            events.append(FrameRejected(e.reason.name.lower()))
            return
        pending = self._pending.get(frame.seq)
        if pending is None:
            self.counters["stray_responses"] += 1  # late: we already gave up or got it
            return
        if isinstance(msg, m.Ack):
            del self._pending[frame.seq]
            self.counters["acks_rx"] += 1
            events.append(Delivered(frame.seq))
        elif isinstance(msg, m.Nack):
            self.counters["nacks_rx"] += 1
            if msg.reason is m.NackReason.BUSY:
                pending.deadline = now + self.timers.rto  # retried like a timeout
                return
            del self._pending[frame.seq]
            events.append(SendFailed(frame.seq, msg.reason.name.lower()))
            self._on_nack(frame.seq, msg.reason, now, events)
        else:
            self.counters["rejected_bad_response"] += 1


class HostLink(Link):
    """The gateway's side: sends HELLO until CAPABILITIES answers (LinkUp), then
    watches the device; after a loss or a device reset it says HELLO again."""

    def __init__(
        self,
        *,
        max_frame: int = 1024,
        timers: Timers | None = None,
        now: float = 0.0,
        screen: Callable[[m.Message], m.NackReason | None] | None = None,
    ) -> None:
        super().__init__(max_frame=max_frame, timers=timers, now=now, screen=screen)
        self.capabilities: m.Capabilities | None = None
        self._hello_due: float | None = now
        self._hellos: dict[int, float] = {}  # the HELLOs not yet answered: seq -> sent
        self._device_uptime = -1
        # a new process must not reuse the HELLO seqs of the one before it: a left-over
        # answer to that one's HELLO would be taken as the answer to ours
        self._tx_seq = secrets.randbelow(0x10000)

    def rehello(self, now: float) -> None:
        """Starts a new session now (the link counts as down until it is answered)."""
        self.active = False
        self._hello_due = now

    def _heartbeats_due(self) -> bool:
        return self.active

    def _extra_deadline(self) -> float | None:
        return None if self.active else self._hello_due

    def _timers(self, now: float, events: list[Event]) -> None:
        if self.active or self._hello_due is None or now < self._hello_due:
            return
        hello = m.Hello(max_frame=self.max_frame, heartbeat_ms=round(self.timers.heartbeat * 1000))
        if len(self._hellos) >= MAX_HELLOS:
            del self._hellos[next(iter(self._hellos))]
        self._hellos[self.send(hello, now, reliable=False)] = now
        self.counters["hellos"] += 1
        self._hello_due = now + self.timers.hello_interval

    def _lose(self, reason: str, now: float, events: list[Event]) -> None:
        super()._lose(reason, now, events)
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self._hello_due = now

    def _on_nack(self, seq: int, reason: m.NackReason, now: float, events: list[Event]) -> None:
        if reason is m.NackReason.NO_SESSION and self.active:
            self._lose("no_session", now, events)

    def _refuse(self, msg: m.Message) -> m.NackReason | None:
        # before the session (CAPABILITIES) there is no clock offset for readings: a
        # NACK keeps them queued on the device, where an ACK would throw them away
        if not self.active:
            return m.NackReason.NO_SESSION
        return super()._refuse(msg)

    def _session(self, msg: m.Message, frame: Frame, now: float, events: list[Event]) -> bool:
        if isinstance(msg, m.Heartbeat):
            reset = not msg.session or msg.uptime_ms < self._device_uptime
            self._device_uptime = msg.uptime_ms
            if self.active and reset:
                self._lose("device_reset", now, events)
            elif not self.active and not msg.session and self._hello_due is not None:
                self._hello_due = min(self._hello_due, now)  # it waits for us: HELLO now
            return False
        if isinstance(msg, m.Capabilities) and msg.request_seq in self._hellos:
            sent = self._hellos[msg.request_seq]
            self._hellos.clear()  # later answers to older HELLOs are plain messages
            self.capabilities = msg
            self._device_uptime = msg.uptime_ms
            self.peer_max_frame = min(self.max_frame, max(msg.max_frame, MIN_MAX_FRAME))
            self.active = True
            self._hello_due = None
            self._last_rx = now
            events.append(LinkUp(msg, now - sent))
            return True
        return False


class DeviceLink(Link):
    """The microcontroller's side: waits for HELLO (SessionStarted; the application
    answers CAPABILITIES), refuses reliable frames with NO_SESSION until then, and
    sends heartbeats even without a session so the host knows it is there."""

    def __init__(
        self,
        *,
        max_frame: int = 1024,
        timers: Timers | None = None,
        now: float = 0.0,
        screen: Callable[[m.Message], m.NackReason | None] | None = None,
    ) -> None:
        super().__init__(max_frame=max_frame, timers=timers, now=now, screen=screen)
        self.hello: m.Hello | None = None

    def _heartbeats_due(self) -> bool:
        return True

    def _lose(self, reason: str, now: float, events: list[Event]) -> None:
        super()._lose(reason, now, events)
        self.peer_max_frame = DEFAULT_MAX_FRAME

    def _session(self, msg: m.Message, frame: Frame, now: float, events: list[Event]) -> bool:
        if not isinstance(msg, m.Hello):
            return False
        self.hello = msg
        self.peer_max_frame = min(self.max_frame, max(msg.max_frame, MIN_MAX_FRAME))
        if msg.heartbeat_ms:
            t = self.timers
            self.timers = dataclasses.replace(t, heartbeat=msg.heartbeat_ms / 1000)
        self.active = True
        events.append(SessionStarted(msg, frame.seq))
        return True

    def _after(self, msg: m.Message, frame: Frame, now: float, events: list[Event]) -> None:
        if not isinstance(msg, m.Hello):  # SessionStarted already said it
            events.append(MessageReceived(msg, frame.seq, frame.flags))

    def _refuse(self, msg: m.Message) -> m.NackReason | None:
        if not self.active:
            return m.NackReason.NO_SESSION
        return super()._refuse(msg)
