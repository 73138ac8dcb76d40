"""A simulated gateway microcontroller on one end of a pseudo-terminal: the device of
the demo, the tests, the HIL rig (`python -m hil sim mcu`) and bench/serial.py.

`SimMcu` is the device side of docs/firmware-protocol.md: it waits for HELLO, answers
CAPABILITIES, samples its sensors at the configured interval and sends them as
reliable READINGS (kept and resent if a frame is not acknowledged, one frame in flight
at a time, so they arrive in sampling order), answers COMMANDs
(set sampling interval, read config, reboot), sends heartbeats and log lines, and keeps
two firmware slots with the bootloader's trial/confirm/rollback rules
(`firmware_bridge.ota.FirmwareSlots`).

Sensors: 1 level (a 4-20 mA transmitter, 0-5 m; below 3.8 mA it reports a fault),
2 manhole tilt switch (bool), 3 temperature (f32, degC), 4 supply voltage (i32, mV).

Faults (`faults`, changeable while running): drop the next received frames of given
types, drop received bytes or corrupt sent frames at random (`corrupt_tx`: one bit
flipped; `garbage_tx`: a noisy line, a bit flipped, the frame cut short or junk bytes
sent before it, counted in `counts["garbage_<kind>"]`), stall (neither read nor
write), reject images, and crash on boot of given versions (the bootloader then rolls
back after `crash_time`).

OTA: given `ota_public_key` (the fleet key a real device keeps in flash), OTA_*
messages go to a `firmware_bridge.ota.OtaReceiver` writing into `slots`; an
OTA_END_RESULT with status OK makes the sim reset into the new slot once that reply was
acknowledged. A reset forgets the transfer held in RAM. Without a key every OTA_BEGIN is
refused (REJECTED). `counts["ota_messages"]` and `counts["ota_chunk_bytes"]` say what
reached the receiver.

    sim = SimMcu.on_pty(interval=0.2, ota_public_key=key)   # sim.port: what the host opens
    task = asyncio.create_task(sim.run())
    ...
    task.cancel(); sim.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
import tty
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_bridge import messages as m
from firmware_bridge.frame import MAX_MAX_FRAME, OVERHEAD, FrameDecoder, FrameError
from firmware_bridge.link import (
    Delivered,
    DeviceLink,
    Event,
    LinkLost,
    MessageReceived,
    SendFailed,
    SessionStarted,
    Timers,
)
from firmware_bridge.ota import FirmwareSlots, OtaReceiver
from firmware_bridge.serial_io import PortClosed, SerialTransport

__all__ = ["SENSORS", "Faults", "Sensor", "SimMcu"]

READINGS_QUEUE = 10_000  # readings kept while no host listens (oldest dropped)
# READINGS frames awaiting their ACK. One: a frame that must be resent is never overtaken
# by a later one, so each sensor's readings reach the host in sampling order (a frame
# holds up to ~67 readings, so one in flight still outpaces any sampling rate).
READINGS_WINDOW = 1
SLOT_CAPACITY = 1024 * 1024  # bytes a firmware slot holds


@dataclass
class Faults:
    drop_rx_types: Counter[int] = field(default_factory=Counter)  # type -> frames to drop
    drop_rx_bytes: float = 0.0  # probability that a received byte is lost
    corrupt_tx: float = 0.0  # probability that a sent frame gets one bit flipped
    garbage_tx: float = 0.0  # probability that a sent frame is garbled (see _garble)
    stall: bool = False  # reads nothing, sends nothing (a hung firmware)
    reject_images: bool = False  # refuse every new OTA_BEGIN (REJECTED)
    crash_versions: set[str] = field(default_factory=set)  # images that crash at boot


@dataclass(frozen=True)
class Sensor:
    id: int
    name: str
    type: m.ValueType
    unit: str


SENSORS = (
    Sensor(1, "level", m.ValueType.F32, "m"),
    Sensor(2, "tilt", m.ValueType.BOOL, ""),
    Sensor(3, "temperature", m.ValueType.F32, "degC"),
    Sensor(4, "supply", m.ValueType.I32, "mV"),
)


class SimMcu:
    def __init__(
        self,
        fd: int,
        *,
        port: str = "",
        interval: float = 1.0,
        version: str = "1.0.0",
        hardware_id: str = "citygw-mcu-r1",
        max_frame: int = 1024,
        timers: Timers | None = None,
        seed: int = 0,
        confirm_timeout: float = 30.0,
        crash_time: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        ota_public_key: Ed25519PublicKey | None = None,
        slot_capacity: int = SLOT_CAPACITY,
    ) -> None:
        self.fd = fd
        self.port = port
        self.interval = interval
        self.hardware_id = hardware_id
        self.max_frame = max_frame
        self.timers = timers or Timers()
        self.confirm_timeout = confirm_timeout
        self.crash_time = crash_time
        self.clock = clock
        self.rng = random.Random(seed)
        self.faults = Faults()
        self.slots = FirmwareSlots.initial(m.Version.parse(version))
        self.ota = (
            OtaReceiver(
                self.slots,
                ota_public_key,
                hardware_id,
                max_chunk=max_frame - OVERHEAD - m.OtaChunk.HEAD,
                capacity=slot_capacity,
            )
            if ota_public_key is not None
            else None
        )
        self.counts: Counter[str] = Counter()
        #: garbled pieces sent by (garble kind, the reason a receiver's frame decoder
        #: rejects the piece: "cobs", "short", "bad_crc"...; "accepted" if it does not)
        self.garbled: Counter[tuple[str, str]] = Counter()
        self.commands: list[m.Command] = []  # every command executed (not duplicates)
        self.boots: list[m.BootReason] = []
        self._queue: deque[m.Reading] = deque(maxlen=READINGS_QUEUE)
        self._in_flight: dict[int, tuple[m.Reading, ...]] = {}
        self._caps_seq: int | None = None
        self._caps_acked = False  # the host has a session: READINGS may go
        self._reboot_after: int | None = None  # seq whose ACK triggers a reboot
        self._tilt = False
        self._boot(m.BootReason.POWER_ON)

    @classmethod
    def on_pty(cls, **kwargs: object) -> SimMcu:
        """A sim on a new pty; `port` is the path of the end the host opens. The sim
        also keeps that end open, so the host may close and reopen it."""
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline until the host configures it
        os.set_blocking(master, False)
        sim = cls(master, port=os.ttyname(slave), **kwargs)  # type: ignore[arg-type]
        sim._slave = slave
        return sim

    _slave: int | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SimMcu]:
        """Runs the sim for the `async with` block, then stops it and closes the pty."""
        task = asyncio.create_task(self.run(), name="sim-mcu")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.close()

    def close(self) -> None:
        """Closes both ends of the pty (after `run` was cancelled); idempotent."""
        for fd in (self.fd, self._slave):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd, self._slave = -1, None

    # -- boot and the bootloader -----------------------------------------------------------

    def _boot(self, cause: m.BootReason) -> None:
        """A reset: the bootloader picks the slot (FirmwareSlots.boot), RAM is gone."""
        reason = self.slots.boot(cause)
        if self.ota is not None:
            self.ota.reset()
        now = self.clock()
        self.boot_time = now
        self.boot_reason = reason
        self.boots.append(reason)
        self.link = DeviceLink(max_frame=self.max_frame, timers=self.timers, now=now)
        self._in_flight.clear()
        self._queue.clear()  # RAM is gone
        self._caps_seq = None
        self._caps_acked = False
        self._reboot_after = None
        self._next_sample = now
        self._crashed_until: float | None = None
        if self.slots.trial and str(self.slots.version) in self.faults.crash_versions:
            self._crashed_until = now + self.crash_time  # silent, then the watchdog
        self._log(m.LogLevel.INFO, f"boot: {reason.name.lower()}, firmware {self.slots.version}")
        if hasattr(self, "transport"):
            self.transport.link = self.link

    def reboot(self, cause: m.BootReason = m.BootReason.RESET) -> None:
        """A reset: into a staged image (on trial), back from an unconfirmed trial
        (rolled back), or the same firmware again (`cause`)."""
        self._boot(cause)

    @property
    def backlog(self) -> int:
        """Readings sampled and not yet acknowledged by the host (queued or in flight)."""
        return len(self._queue) + sum(len(b) for b in self._in_flight.values())

    def uptime_ms(self, now: float | None = None) -> int:
        return max(0, int(((self.clock() if now is None else now) - self.boot_time) * 1000))

    # -- the main loop ---------------------------------------------------------------------

    async def run(self) -> None:
        self.transport = SerialTransport(
            self.link,
            self.fd,
            self._on_event,
            clock=self.clock,
            read_filter=self._rx_filter,
            write_filter=self._tx_filter,
        )
        sampler = asyncio.create_task(self._sampler())
        try:
            while True:
                try:
                    await self.transport.run()
                except PortClosed:
                    # nobody has the other end open (EIO on a pty master): wait for one
                    await asyncio.sleep(0.05)
        finally:
            sampler.cancel()

    async def _sampler(self) -> None:
        while True:
            now = self.clock()
            if self._crashed_until is not None:
                if now >= self._crashed_until:
                    self.reboot(m.BootReason.WATCHDOG)  # on trial: the bootloader reverts
                await asyncio.sleep(0.05)
                continue
            if self.slots.trial and now - self.boot_time > self.confirm_timeout:
                self._log(m.LogLevel.ERROR, "trial image not confirmed: rolling back")
                self.reboot()
            if now >= self._next_sample:
                self._sample(now)
                self._next_sample = max(self._next_sample + self.interval, now)
            self._send_readings(now)
            await asyncio.sleep(min(0.05, max(0.0, self._next_sample - self.clock())))

    def _sample(self, now: float) -> None:
        up = self.uptime_ms(now)
        t = now - self.boot_time
        ma = 12.0 + 4.0 * math.sin(t / 30.0) + self.rng.gauss(0, 0.02)
        if self.rng.random() < 0.02:
            self._tilt = not self._tilt
        temp = 14.0 + 3.0 * math.sin(t / 600.0) + self.rng.gauss(0, 0.05)
        supply = 12000 + int(self.rng.gauss(0, 20))
        self._queue.extend(
            (
                m.Reading(1, up, m.ValueType.F32, (ma - 4.0) / 16.0 * 5.0, fault=ma < 3.8),
                m.Reading(2, up, m.ValueType.BOOL, self._tilt),
                m.Reading(3, up, m.ValueType.F32, temp),
                m.Reading(4, up, m.ValueType.I32, supply),
            )
        )
        self.counts["sampled"] += 4

    def _send_readings(self, now: float) -> None:
        # only once the host ACKed CAPABILITIES: before that it has no session and would
        # NACK them (no_session)
        if not self.link.active or not self._caps_acked:
            return
        if self.faults.stall or self._crashed_until is not None:
            return
        if len(self._in_flight) >= READINGS_WINDOW:
            return
        room = self.link.max_payload - 1
        while self._queue and len(self._in_flight) < READINGS_WINDOW:
            batch: list[m.Reading] = []
            size = 0
            while self._queue and len(batch) < 255:
                r = self._queue[0]
                if size + r.encoded_size() > room:
                    break
                batch.append(self._queue.popleft())
                size += r.encoded_size()
            seq = self.link.send(m.Readings(tuple(batch)), now)
            self._in_flight[seq] = tuple(batch)
            self.counts["readings_sent"] += len(batch)
        self.transport.poke()

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, ev: Event) -> None:
        now = self.clock()
        if self._crashed_until is not None:
            return
        if isinstance(ev, SessionStarted):
            self._answer_hello(ev, now)
        elif isinstance(ev, Delivered):
            self._in_flight.pop(ev.seq, None)
            if ev.seq == self._caps_seq:
                self._caps_acked = True
            if ev.seq == self._caps_seq and self.slots.trial:
                self.slots.confirm()  # the host heard the new firmware: keep it
                self._log(m.LogLevel.INFO, f"firmware {self.slots.version} confirmed")
            if ev.seq == self._reboot_after:
                asyncio.get_running_loop().call_later(0.05, self.reboot)
        elif isinstance(ev, SendFailed):
            self.counts[f"send_failed_{ev.reason}"] += 1
            if ev.reason == "no_session":
                self._caps_acked = False  # the host lost its session: wait for the next
            batch = self._in_flight.pop(ev.seq, None)
            if batch:
                self._queue.extendleft(reversed(batch))  # resend them later
                self.counts["readings_requeued"] += len(batch)
            if ev.seq == self._reboot_after:
                self.reboot()
        elif isinstance(ev, LinkLost):
            self.counts["link_lost"] += 1
        elif isinstance(ev, MessageReceived):
            self._on_message(ev.message, ev.seq, now)

    def _answer_hello(self, ev: SessionStarted, now: float) -> None:
        caps = m.Capabilities(
            protocol_version=1,
            firmware=self.slots.version,
            active_slot=self.slots.active,
            slot_state=self.slots.slot_state,
            boot_reason=self.boot_reason,
            max_frame=self.max_frame,
            uptime_ms=self.uptime_ms(now),
            sampling_interval_ms=round(self.interval * 1000),
            failed_version=self.slots.failed,
            hardware_id=self.hardware_id,
            request_seq=ev.seq,
        )
        self._caps_acked = False  # a new session: wait until the host has it too
        self._caps_seq = self.link.send(caps, now)
        self.counts["hellos"] += 1

    def _on_message(self, msg: m.Message, seq: int, now: float) -> None:
        if isinstance(msg, m.Command):
            self.commands.append(msg)
            self._command(msg, seq, now)
        elif isinstance(msg, m.OtaBegin | m.OtaChunk | m.OtaEnd | m.OtaStatusReq):
            self._ota(msg, seq, now)

    def _command(self, cmd: m.Command, seq: int, now: float) -> None:
        status, data = m.CommandStatus.OK, b""
        if cmd.opcode == m.Opcode.SET_INTERVAL:
            if len(cmd.arg) != 4:
                status = m.CommandStatus.INVALID_ARGUMENT
            else:
                ms = int.from_bytes(cmd.arg, "little")
                if not 100 <= ms <= 86_400_000:
                    status = m.CommandStatus.INVALID_ARGUMENT
                else:
                    self.interval = ms / 1000
                    self._next_sample = min(self._next_sample, now + self.interval)
                    self._log(m.LogLevel.INFO, f"sampling interval {ms} ms")
        elif cmd.opcode == m.Opcode.READ_CONFIG:
            data = m.ConfigReport(
                round(self.interval * 1000),
                round(self.link.timers.heartbeat * 1000),
                tuple((s.id, s.type) for s in SENSORS),
            ).encode()
        elif cmd.opcode == m.Opcode.REBOOT:
            pass  # after the result is acknowledged
        else:
            status = m.CommandStatus.UNSUPPORTED
        rseq = self.link.send(m.CommandResult(cmd.opcode, status, data, request_seq=seq), now)
        if cmd.opcode == m.Opcode.REBOOT:
            self._reboot_after = rseq

    def _ota(self, msg: m.Message, seq: int, now: float) -> None:
        if self.ota is None:
            replies = _refuse_ota(msg, seq)
        else:
            self.counts["ota_messages"] += 1
            if isinstance(msg, m.OtaChunk):
                self.counts["ota_chunk_bytes"] += len(msg.data)
            reject = self.faults.reject_images
            self.ota.refuse = m.OtaBeginStatus.REJECTED if reject else None
            replies = self.ota.on_message(msg, seq)
        for reply in replies:
            reliable = not isinstance(reply, m.OtaChunkAck)
            rseq = self.link.send(reply, now, reliable=reliable)
            if isinstance(reply, m.OtaEndResult) and reply.ok:
                self._reboot_after = rseq  # into the staged image once this is ACKed

    def _log(self, level: m.LogLevel, text: str) -> None:
        link = getattr(self, "link", None)
        if link is None or not link.active:
            return  # logs are not kept: they go only to a host that listens
        link.send(m.Log(level, self.uptime_ms(), text), self.clock(), reliable=False)

    # -- faults ----------------------------------------------------------------------------

    def _rx_filter(self, data: bytes) -> bytes:
        f = self.faults
        if f.stall or self._crashed_until is not None:
            return b""
        if f.drop_rx_bytes:
            data = bytes(b for b in data if self.rng.random() >= f.drop_rx_bytes)
        if f.drop_rx_types:
            data = self._drop_frames(data)
        return data

    def _drop_frames(self, data: bytes) -> bytes:
        # whole frames only: split on the delimiter, peek at each frame's type
        out = []
        parts = data.split(b"\x00")
        for part in parts[:-1]:
            items = FrameDecoder(65535).feed(part + b"\x00") if part else []
            type_ = getattr(items[0], "type", None) if items else None
            if type_ is not None and self.faults.drop_rx_types[type_] > 0:
                self.faults.drop_rx_types[type_] -= 1
                self.counts["dropped_frames"] += 1
                continue
            out.append(part + b"\x00")
        out.append(parts[-1])
        return b"".join(out)

    def _tx_filter(self, data: bytes) -> bytes:
        f = self.faults
        if f.stall or self._crashed_until is not None:
            return b""
        if not f.corrupt_tx and not f.garbage_tx:
            return data
        frames = data.split(b"\x00")
        for i, fr in enumerate(frames):
            if fr and f.corrupt_tx and self.rng.random() < f.corrupt_tx:
                fr = self._flip_bit(fr)
                self.counts["corrupted_frames"] += 1
            if fr and f.garbage_tx and self.rng.random() < f.garbage_tx:
                fr = self._garble(fr)
            frames[i] = fr
        return b"\x00".join(frames)

    def _flip_bit(self, frame: bytes) -> bytes:
        """The frame with one bit flipped, never into a 0x00 (a delimiter): a byte that
        has only that bit set gets the next bit flipped instead, so the frame always
        changes."""
        b = bytearray(frame)
        k = self.rng.randrange(len(b))
        bit = self.rng.randrange(8)
        b[k] ^= 1 << (bit if b[k] != 1 << bit else (bit + 1) % 8)
        return bytes(b)

    def _garble(self, frame: bytes) -> bytes:
        """Line noise on one encoded frame (its delimiter stays): a bit flipped, the frame
        cut short, or junk bytes sent before it as a frame of their own (the frame itself
        then arrives intact). The host drops each garbled piece (cobs, short, bad_crc...),
        one rejected frame per garble: `garbled` records which."""
        kind = self.rng.choice(("flip", "cut", "junk"))
        self.counts[f"garbage_{kind}"] += 1
        if kind == "flip":
            piece = out = self._flip_bit(frame)
        elif kind == "cut":
            piece = out = frame[: self.rng.randrange(1, len(frame))] if len(frame) > 1 else b"\x01"
        else:
            piece = bytes(self.rng.randrange(1, 256) for _ in range(self.rng.randrange(1, 64)))
            out = piece + b"\x00" + frame
        self.garbled[(kind, _rejection(piece))] += 1
        return out


def _rejection(piece: bytes) -> str:
    """Why a receiver's frame decoder drops `piece` (an encoded frame without its
    delimiter), "accepted" if it takes it (a CRC-32C collision)."""
    (item,) = FrameDecoder(MAX_MAX_FRAME).feed(piece + b"\x00")
    return item.reason if isinstance(item, FrameError) else "accepted"


def _refuse_ota(msg: m.Message, seq: int) -> list[m.Message]:
    """The answers of a firmware without an OTA key."""
    if isinstance(msg, m.OtaBegin):
        return [m.OtaBeginResult(msg.transfer_id, m.OtaBeginStatus.REJECTED, 0, seq)]
    if isinstance(msg, m.OtaEnd):
        return [m.OtaEndResult(msg.transfer_id, m.OtaEndStatus.UNKNOWN_TRANSFER, seq)]
    if isinstance(msg, m.OtaStatusReq):
        return [m.OtaStatus(0, 0, 0, m.OtaState.IDLE, seq)]
    return []
