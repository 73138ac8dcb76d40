"""firmware_bridge.link, sans-I/O: a HostLink and a DeviceLink wired back to back with
made-up time, so every timer is exact and nothing sleeps."""

from __future__ import annotations

from collections.abc import Callable

from firmware_bridge import messages as m
from firmware_bridge.frame import FrameDecoder, encode
from firmware_bridge.link import (
    Delivered,
    DeviceLink,
    Event,
    FrameRejected,
    FrameTooLarge,
    HostLink,
    LinkLost,
    LinkUp,
    MessageReceived,
    SendFailed,
    SessionStarted,
    Timers,
)

T = Timers(rto=0.5, rto_max=2.0, retries=3, heartbeat=1.0, lost_after=3, hello_interval=1.0)


def caps(seq: int, uptime: int = 0) -> m.Capabilities:
    return m.Capabilities(
        protocol_version=1,
        firmware=m.Version(1, 0, 0),
        active_slot=0,
        slot_state=m.SlotState.CONFIRMED,
        boot_reason=m.BootReason.POWER_ON,
        max_frame=512,
        uptime_ms=uptime,
        sampling_interval_ms=1000,
        hardware_id="hw",
        request_seq=seq,
    )


class Pair:
    """Host and device; `pump` moves bytes both ways (through optional filters that
    may drop or mangle frames) and ticks both until nothing moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.host = HostLink(max_frame=1024, timers=T, now=0.0)
        self.dev = DeviceLink(max_frame=512, timers=T, now=0.0)
        self.host_events: list[Event] = []
        self.dev_events: list[Event] = []
        self.to_dev: Callable[[bytes], bytes] = lambda b: b
        self.to_host: Callable[[bytes], bytes] = lambda b: b
        self.answer_hello = True

    def pump(self) -> None:
        for _ in range(50):
            self.host_events += self.host.tick(self.now)
            self.dev_events += self.dev.tick(self.now)
            a, b = self.host.data_to_send(), self.dev.data_to_send()
            if not a and not b:
                return
            if a:
                evs = self.dev.receive(self.to_dev(a), self.now)
                self.dev_events += evs
                for e in evs:
                    if isinstance(e, SessionStarted) and self.answer_hello:
                        self.dev.send(caps(e.seq, self.dev.uptime_ms(self.now)), self.now)
            if b:
                self.host_events += self.host.receive(self.to_host(b), self.now)
        raise AssertionError("links never went quiet")

    def advance(self, seconds: float, step: float = 0.05) -> None:
        end = self.now + seconds
        while self.now < end - 1e-9:
            self.now = round(self.now + step, 6)
            self.pump()

    def up(self) -> None:
        self.pump()
        assert any(isinstance(e, LinkUp) for e in self.host_events)
        self.host_events.clear()
        self.dev_events.clear()


def drop_first(n: int, type_: int) -> Callable[[bytes], bytes]:
    """A filter that drops the first n frames of a type."""
    left = [n]

    def f(data: bytes) -> bytes:
        out = b""
        for part in data.split(b"\x00"):
            if not part:
                continue
            items = FrameDecoder(4096).feed(part + b"\x00")
            if items and getattr(items[0], "type", None) == type_ and left[0] > 0:
                left[0] -= 1
                continue
            out += part + b"\x00"
        return out

    return f


def test_hello_negotiates_frame_size_and_starts_session() -> None:
    p = Pair()
    p.pump()
    ups = [e for e in p.host_events if isinstance(e, LinkUp)]
    assert len(ups) == 1 and ups[0].capabilities.hardware_id == "hw"
    assert p.host.active and p.dev.active
    assert p.host.peer_max_frame == 512 and p.dev.peer_max_frame == 512
    assert any(isinstance(e, Delivered) for e in p.dev_events)  # host ACKed CAPABILITIES


def test_session_offset_is_taken_from_the_hello_answered() -> None:
    """The answer to a HELLO arrives after a retransmission: since_hello counts from that
    HELLO, so an uptime-to-host-time offset does not grow by the retransmission delay."""
    p = Pair()
    p.to_host = drop_first(1, m.MsgType.CAPABILITIES)  # the first answer is lost
    p.pump()
    p.advance(1.0)  # the device retransmits it after rto (0.5 s)
    (up,) = [e for e in p.host_events if isinstance(e, LinkUp)]
    assert 0.5 <= up.since_hello < 1.0  # that HELLO went out at 0, the answer came at 0.5+


def test_host_refuses_reliable_frames_before_its_session() -> None:
    """READINGS before CAPABILITIES: NACK no_session, so the device keeps them queued
    (an ACK would make it throw them away while the host has no clock offset yet)."""
    p = Pair()
    p.answer_hello = False
    p.pump()  # the device has a session (HELLO), the host none (no CAPABILITIES yet)
    assert p.dev.active and not p.host.active
    seq = p.dev.send(m.Readings((m.Reading(1, 5, m.ValueType.F32, 1.5),)), p.now)
    p.pump()
    assert SendFailed(seq, "no_session") in p.dev_events
    assert not any(isinstance(e, MessageReceived) for e in p.host_events)
    p.answer_hello = True
    p.advance(1.0)
    assert p.host.active
    seq = p.dev.send(m.Readings((m.Reading(1, 5, m.ValueType.F32, 1.5),)), p.now)
    p.pump()
    assert Delivered(seq) in p.dev_events


def test_a_new_host_process_starts_at_another_seq() -> None:
    # a left-over answer to the HELLO of the process before must not open our session
    firsts = {HostLink(timers=T)._tx_seq for _ in range(20)}
    assert len(firsts) > 1


def test_frame_size_before_hello_is_the_default() -> None:
    host = HostLink(timers=T)
    try:
        host.send(m.OtaChunk(1, 0, bytes(300)), 0.0)
    except FrameTooLarge:
        pass
    else:
        raise AssertionError("a 300-byte chunk went out before HELLO")


def test_hello_repeated_until_answered() -> None:
    p = Pair()
    p.answer_hello = False
    p.pump()
    p.advance(3.0)
    assert p.host.counters["hellos"] == 4  # t=0, 1, 2, 3
    p.answer_hello = True
    p.advance(1.0)
    assert p.host.active


def test_command_retransmitted_after_loss_then_delivered_once() -> None:
    p = Pair()
    p.up()
    p.to_dev = drop_first(2, m.MsgType.COMMAND)
    seq = p.host.send(m.Command.set_interval(250), p.now)
    p.advance(0.45)
    assert seq in p.host.pending
    p.advance(3.0)
    assert Delivered(seq) in p.host_events
    got = [e for e in p.dev_events if isinstance(e, MessageReceived)]
    got = [e for e in got if isinstance(e.message, m.Command)]
    assert len(got) == 1 and got[0].seq == seq
    assert p.host.counters["retransmits"] == 2


def test_lost_ack_duplicate_is_acked_not_redelivered() -> None:
    p = Pair()
    p.up()
    p.to_host = drop_first(1, m.MsgType.ACK)
    seq = p.host.send(m.Command(m.Opcode.READ_CONFIG), p.now)
    p.advance(2.0)
    assert Delivered(seq) in p.host_events
    cmds = [e for e in p.dev_events if isinstance(e, MessageReceived)]
    assert sum(isinstance(e.message, m.Command) for e in cmds) == 1
    assert p.dev.counters["duplicates"] == 1


def test_bounded_retries_then_send_failed() -> None:
    p = Pair()
    p.up()
    p.to_dev = drop_first(100, m.MsgType.COMMAND)
    seq = p.host.send(m.Command(m.Opcode.REBOOT), p.now)
    p.advance(6.0)
    assert SendFailed(seq, "timeout") in p.host_events
    assert p.host.counters["retransmits"] == T.retries
    assert seq not in p.host.pending


def test_nack_unknown_type_fails_at_once() -> None:
    p = Pair()
    p.up()
    p.host._out += encode(0x7E, 999, b"", 0x01)
    p.pump()
    assert FrameRejected("unknown_type") in p.dev_events
    # the host sees a NACK for a seq it never sent: counted, no event
    assert p.host.counters["stray_responses"] == 1


def test_nack_reason_reaches_the_sender() -> None:
    p = Pair()
    p.dev = DeviceLink(max_frame=512, timers=T, screen=lambda msg: m.NackReason.UNSUPPORTED)
    p.up()
    seq = p.host.send(m.Command(m.Opcode.REBOOT), p.now)
    p.pump()
    assert SendFailed(seq, "unsupported") in p.host_events


def test_device_without_session_nacks_and_host_rehellos() -> None:
    p = Pair()
    p.up()
    p.dev = DeviceLink(max_frame=512, timers=T, now=p.now)  # the device rebooted
    seq = p.host.send(m.Command(m.Opcode.READ_CONFIG), p.now)
    p.pump()
    assert SendFailed(seq, "no_session") in p.host_events
    assert LinkLost("no_session") in p.host_events
    assert sum(isinstance(e, LinkUp) for e in p.host_events) == 1  # HELLO again at once
    assert p.host.active and p.dev.active


def test_heartbeat_keeps_link_and_silence_loses_it() -> None:
    p = Pair()
    p.up()
    p.advance(10.0)
    assert not any(isinstance(e, LinkLost) for e in p.host_events + p.dev_events)
    assert p.host.counters["frames_rx"] >= 9
    p.to_host = lambda b: b""  # the device goes silent (stall)
    p.to_dev = lambda b: b""
    seq = p.host.send(m.Command(m.Opcode.READ_CONFIG), p.now)
    p.advance(3.2)
    assert LinkLost("silence") in p.host_events
    assert SendFailed(seq, "link_lost") in p.host_events or SendFailed(seq, "timeout") in (
        p.host_events
    )
    assert not p.host.active
    hellos = p.host.counters["hellos"]
    p.to_host = lambda b: b
    p.to_dev = lambda b: b
    p.advance(1.5)
    assert p.host.counters["hellos"] > hellos and p.host.active


def test_device_reboot_seen_in_heartbeat() -> None:
    p = Pair()
    p.up()
    p.advance(2.0)
    p.host_events.clear()
    p.dev = DeviceLink(max_frame=512, timers=T, now=p.now)  # reboot: no session
    p.advance(1.5)
    assert LinkLost("device_reset") in p.host_events
    assert any(isinstance(e, LinkUp) for e in p.host_events)


def test_garbage_between_frames_is_counted_and_skipped() -> None:
    p = Pair()
    p.up()
    p.host._out += b"\x11\x22\x33\x00\x05\x05"  # garbage, then a cut frame
    p.host.send(m.Command(m.Opcode.READ_CONFIG), p.now)
    p.pump()  # the cut frame swallows the command's frame: one more bad frame...
    assert not any(isinstance(e, MessageReceived) for e in p.dev_events)
    p.advance(1.0)  # ...so it is retransmitted
    assert any(isinstance(e, FrameRejected) for e in p.dev_events)
    got = [e for e in p.dev_events if isinstance(e, MessageReceived)]
    assert any(isinstance(e.message, m.Command) for e in got)


def test_next_deadline() -> None:
    host = HostLink(timers=T, now=10.0)
    assert host.next_deadline() == 10.0  # HELLO due
    host.tick(10.0)
    assert host.next_deadline() == 11.0
    seq = host.send(m.Command(m.Opcode.READ_CONFIG), 10.2)
    assert host.next_deadline() == 10.7
    assert seq in host.pending


def test_seq_wraps() -> None:
    link = HostLink(timers=T)
    link._tx_seq = 0xFFFF
    assert link.send(m.Ack(), 0.0, reliable=False) == 0xFFFF
    assert link.send(m.Ack(), 0.0, reliable=False) == 0
