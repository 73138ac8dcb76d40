"""The OTA transfer, sans-I/O: `OtaSender` on the gateway, `OtaReceiver` and
`FirmwareSlots` (the two slots and the bootloader's rules) on the device. The simulated
microcontroller (drivers/mcu/simulator.py) runs these; a C firmware mirrors them.

Messages in, messages out, time passed in as numbers: nothing here reads a clock or a
port, so the tests drive both ends against each other with loss and reordering.

The sender is go-back-N over cumulative acknowledgements: up to `window` chunks in
flight; an OTA_CHUNK_ACK names the next offset the device expects; no progress within
`ack_timeout` (or three duplicate acks) sends again from the acknowledged offset. A
resume (link back, or a new sender after a gateway restart) sends OTA_BEGIN again with
the same transfer id: the device answers with the offset it has, so at most the chunks
that were in flight are sent twice. docs/firmware-ota.md describes the exchange.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_bridge import messages as m
from firmware_bridge.image import FirmwareError, Manifest, Package, Version, verify_manifest

__all__ = [
    "FirmwareSlots",
    "OtaReceiver",
    "OtaResult",
    "OtaSender",
    "Outcome",
    "SenderState",
    "Slot",
    "chunk_size_for",
]


def chunk_size_for(max_payload: int) -> int:
    """The chunk size for frames of `max_payload` bytes: what fits beside the chunk
    header, in whole 64-byte flash pages when there is room, at most 4096."""
    room = min(max_payload - m.OtaChunk.HEAD, 4096)
    if room < 1:
        raise ValueError(f"a payload of {max_payload} bytes leaves no room for data")
    return room - room % 64 if room >= 64 else room


class Outcome(enum.StrEnum):
    UPDATED = "updated"
    ROLLED_BACK = "rolled_back"
    REFUSED = "refused"
    FAILED = "failed"  # the link or the device stopped answering


@dataclass(frozen=True, slots=True)
class OtaResult:
    outcome: Outcome
    reason: str = ""
    from_version: str = ""
    to_version: str = ""
    bytes_sent: int = 0  # chunk data put on the line, repeats included
    bytes_resent: int = 0
    resume_offset: int = 0  # where the device said it would continue (the last OTA_BEGIN)

    def summary(self) -> str:
        if self.outcome is Outcome.UPDATED:
            return f"updated {self.from_version} -> {self.to_version}"
        if self.outcome is Outcome.ROLLED_BACK:
            return (
                f"rolled back: {self.to_version} did not start, the device runs "
                f"{self.from_version} again" + (f" ({self.reason})" if self.reason else "")
            )
        return f"{self.outcome}: {self.reason}"


class SenderState(enum.StrEnum):
    IDLE = "idle"
    BEGIN = "begin"  # OTA_BEGIN sent, waiting for its result
    TRANSFER = "transfer"
    END = "end"  # OTA_END sent, waiting for its result
    REBOOT = "reboot"  # the device is restarting into the new image
    DONE = "done"


# -- the gateway's side ------------------------------------------------------------------


class OtaSender:
    """One package to one device. Call `start`, then feed `on_message` with every OTA
    message and `on_capabilities` with every CAPABILITIES; call `poll` at `deadline`.
    Each returns the messages to send. `result` is set once finished."""

    def __init__(
        self,
        package: Package,
        transfer_id: int,
        *,
        chunk_size: int,
        window: int = 8,
        ack_timeout: float = 2.0,
        begin_timeout: float = 2.0,
        stall_timeout: float = 60.0,
        reboot_timeout: float = 30.0,
        from_version: str = "",
    ) -> None:
        if chunk_size < 1 or window < 1:
            raise ValueError("chunk_size and window must be at least 1")
        self.package = package
        self.transfer_id = transfer_id
        self.chunk_size = chunk_size
        self.window = window
        self.ack_timeout = ack_timeout
        self.begin_timeout = begin_timeout
        self.stall_timeout = stall_timeout
        self.reboot_timeout = reboot_timeout
        self.from_version = from_version
        self.state = SenderState.IDLE
        self.result: OtaResult | None = None
        self.acked = 0  # every byte below this is confirmed written by the device
        self.resume_offset = 0  # where the device said it would continue (last BEGIN)
        self.bytes_sent = 0  # chunk payload bytes put on the line, repeats included
        self.bytes_resent = 0
        self.deadline: float | None = None
        self._next = 0  # the next offset to send
        self._sent_max = 0  # the highest offset ever sent (to count repeats)
        self._progress_at = 0.0  # when `acked` last moved (or the transfer (re)started)
        self._dup_acks = 0
        self.paused = False  # the link is down: only the stall and reboot timers run

    @property
    def size(self) -> int:
        return self.package.manifest.size

    @property
    def done(self) -> bool:
        return self.state is SenderState.DONE

    # -- inputs --------------------------------------------------------------------------

    def start(self, now: float) -> list[m.Message]:
        """OTA_BEGIN: also the way to resume (same transfer id, the device answers with
        the offset it holds)."""
        if self.done:
            return []
        if self.state is SenderState.IDLE:
            self._progress_at = now  # a resume keeps the stall clock running
        self.state = SenderState.BEGIN
        self.paused = False
        self.deadline = now + self.begin_timeout
        return [self._begin()]

    resume = start

    def pause(self, now: float) -> None:
        """The link went down: stop sending into it until `resume` (a new OTA_BEGIN)."""
        self.paused = True
        if self.state is not SenderState.REBOOT and not self.done:
            self.deadline = self._progress_at + self.stall_timeout

    def on_message(self, msg: m.Message, now: float) -> list[m.Message]:
        if self.done or getattr(msg, "transfer_id", self.transfer_id) != self.transfer_id:
            return []  # a stale answer to an older transfer
        if isinstance(msg, m.OtaBeginResult):
            return self._on_begin_result(msg, now)
        if isinstance(msg, m.OtaChunkAck):
            return self._on_ack(msg.next_offset, now)
        if isinstance(msg, m.OtaStatus):
            return self._on_ack(msg.offset, now)
        if isinstance(msg, m.OtaEndResult) and self.state is SenderState.END:
            if not msg.ok:
                reason = msg.status.name.lower()
                self._finish(Outcome.REFUSED, f"the device rejected the image: {reason}")
                return []
            self.state = SenderState.REBOOT
            self.deadline = now + self.reboot_timeout
        return []

    def on_capabilities(self, caps: m.Capabilities, now: float) -> list[m.Message]:
        """A CAPABILITIES from the device: after OTA_END it tells how the reboot went;
        earlier it means the device restarted under us, so the transfer is resumed."""
        if self.done:
            return []
        running = str(caps.firmware)
        new = str(self.package.manifest.version)
        rolled_back = caps.boot_reason is m.BootReason.ROLLED_BACK
        if self.state in (SenderState.BEGIN, SenderState.TRANSFER) or (
            self.state is SenderState.END and running != new and not rolled_back
        ):
            return self.start(now)  # its RAM is gone: it answers with what it kept
        if self.state not in (SenderState.END, SenderState.REBOOT):
            return []
        if rolled_back:
            failed = str(caps.failed_version)
            why = "the new image did not start and confirm; the bootloader reverted"
            if caps.failed_version != m.NO_VERSION and failed != new:
                why += f" (it names {failed})"
            self._finish(Outcome.ROLLED_BACK, why, running=running)
        elif running == new:
            self._finish(Outcome.UPDATED, running=running)
        else:
            self._finish(Outcome.ROLLED_BACK, f"the device came back with {running}", running)
        return []

    def poll(self, now: float) -> list[m.Message]:
        """Timers: resend what was not acknowledged, give up on a silent device."""
        if self.deadline is None or now < self.deadline or self.done:
            return []
        if self.state is SenderState.REBOOT:
            self._finish(
                Outcome.FAILED,
                f"no hello from the device within {self.reboot_timeout:g} s of the reboot",
            )
            return []
        if now - self._progress_at >= self.stall_timeout:
            self._finish(
                Outcome.FAILED, f"no progress for {self.stall_timeout:g} s at offset {self.acked}"
            )
            return []
        if self.paused:
            self.deadline = self._progress_at + self.stall_timeout
            return []
        if self.state is SenderState.BEGIN:
            self.deadline = now + self.begin_timeout
            return [self._begin()]
        if self.state is SenderState.END:
            self.deadline = now + self.ack_timeout
            return [m.OtaEnd(transfer_id=self.transfer_id)]
        # TRANSFER without an ack in time: go back to what the device confirmed
        self._next = self.acked
        return self._fill(now, restart_timer=True)

    # -- internals ------------------------------------------------------------------------

    def _begin(self) -> m.Message:
        man = self.package.manifest
        return m.OtaBegin(
            transfer_id=self.transfer_id,
            image_size=man.size,
            sha256=man.sha256,
            version=m.Version(*man.version),
            chunk_size=self.chunk_size,
            signature=self.package.signature,
            hardware_id=man.hardware_id,
        )

    def _on_begin_result(self, msg: m.OtaBeginResult, now: float) -> list[m.Message]:
        if self.state is not SenderState.BEGIN:
            return []
        if not msg.accepted:
            reason = msg.status.name.lower()
            self._finish(Outcome.REFUSED, f"the device refused the image: {reason}")
            return []
        offset = min(max(msg.resume_offset, 0), self.size)
        self.resume_offset = offset
        self.acked = self._next = offset
        self.state = SenderState.TRANSFER
        self._progress_at = now
        self._dup_acks = 0
        if offset >= self.size:
            return self._end(now)
        return self._fill(now, restart_timer=True)

    def _on_ack(self, offset: int, now: float) -> list[m.Message]:
        if self.state is not SenderState.TRANSFER:
            return []
        if offset > self.acked:
            self.acked = min(offset, self.size)
            self._next = max(self._next, self.acked)
            self._progress_at = now
            self._dup_acks = 0
            if self.acked >= self.size:
                return self._end(now)
            return self._fill(now, restart_timer=True)
        if offset == self.acked and self._next > self.acked:
            # the device keeps asking for the same offset: that chunk was lost
            self._dup_acks += 1
            if self._dup_acks == 3:
                self._next = self.acked
                return self._fill(now, restart_timer=True)
        return []

    def _fill(self, now: float, restart_timer: bool) -> list[m.Message]:
        out: list[m.Message] = []
        if self.paused:
            return out
        limit = min(self.size, self.acked + self.window * self.chunk_size)
        image = self.package.image
        while self._next < limit:
            n = min(self.chunk_size, self.size - self._next)
            data = image[self._next : self._next + n]
            out.append(m.OtaChunk(transfer_id=self.transfer_id, offset=self._next, data=data))
            self.bytes_sent += n
            if self._next < self._sent_max:
                self.bytes_resent += min(n, self._sent_max - self._next)
            self._next += n
            self._sent_max = max(self._sent_max, self._next)
        if restart_timer or out:
            self.deadline = now + self.ack_timeout
        return out

    def _end(self, now: float) -> list[m.Message]:
        self.state = SenderState.END
        self.deadline = now + self.ack_timeout
        return [m.OtaEnd(transfer_id=self.transfer_id)]

    def _finish(self, outcome: Outcome, reason: str = "", running: str = "") -> None:
        to = str(self.package.manifest.version)
        frm = self.from_version
        if outcome is Outcome.ROLLED_BACK:
            frm = running or frm
        else:
            to = running or to
        stats = (self.bytes_sent, self.bytes_resent, self.resume_offset)
        self.result = OtaResult(outcome, reason, frm, to, *stats)
        self.state = SenderState.DONE
        self.deadline = None


# -- the device's side -------------------------------------------------------------------


@dataclass(slots=True)
class Slot:
    image: bytes
    version: m.Version


@dataclass(slots=True)
class FirmwareSlots:
    """Two slots and the bootloader's rules, the reference model for a firmware: a
    staged image gets one trial boot; it stays only if it boots and is confirmed (the
    host ACKs its CAPABILITIES) before the next reset, else the next reset (a watchdog
    after a crash, or the device's confirm timeout) returns to the other slot.
    `failed` is the version last rolled back from (for CAPABILITIES)."""

    slots: list[Slot | None]
    active: int = 0
    staged: bool = False
    trial: bool = False
    failed: m.Version = m.NO_VERSION
    _previous: int = 0

    @classmethod
    def initial(cls, version: Version | m.Version, image: bytes = b"") -> FirmwareSlots:
        return cls([Slot(image, m.Version(*version)), None])

    @property
    def inactive(self) -> int:
        return 1 - self.active

    @property
    def version(self) -> m.Version:
        slot = self.slots[self.active]
        assert slot is not None
        return slot.version

    @property
    def slot_state(self) -> m.SlotState:
        return m.SlotState.TRIAL if self.trial else m.SlotState.CONFIRMED

    def erase_inactive(self) -> None:
        self.slots[self.inactive] = None
        self.staged = False

    def write_inactive(self, image: bytes, version: m.Version) -> None:
        self.slots[self.inactive] = Slot(image, m.Version(*version))
        self.staged = True

    def boot(self, cause: m.BootReason = m.BootReason.POWER_ON) -> m.BootReason:
        """A reset, and the boot reason the device reports: OTA_UPDATE when it tries
        the staged slot, ROLLED_BACK when it leaves an unconfirmed trial, else `cause`
        (power on, a reset command...)."""
        if self.staged:
            self.staged = False
            self._previous, self.active, self.trial = self.active, self.inactive, True
            return m.BootReason.OTA_UPDATE
        if self.trial:  # reset before the new image confirmed itself
            self.failed = self.version
            self.active, self.trial = self._previous, False
            return m.BootReason.ROLLED_BACK
        return cause

    def confirm(self) -> None:
        self.trial = False


@dataclass(slots=True)
class _Incoming:
    transfer_id: int
    manifest: Manifest
    chunk_size: int
    data: bytearray = field(default_factory=bytearray)


class OtaReceiver:
    """The device's OTA: validates OTA_BEGIN (hardware id, size, chunk size, the
    signature with the device's own public key) before it erases anything, writes
    chunks in order, acknowledges cumulatively, answers OTA_STATUS, and on OTA_END
    verifies the SHA-256 and writes the image into the inactive slot (staged: the
    device resets into it once the OK result is delivered).

    `refuse` (a simulator fault) rejects every new OTA_BEGIN with that status. `seq`
    given to `on_message` is the request's frame seq, echoed in replies. `reset()` is
    the device's reset: the transfer in RAM is gone, the staged transfer's id and
    SHA-256 (kept with the slot metadata in flash) are not."""

    def __init__(
        self,
        slots: FirmwareSlots,
        public_key: Ed25519PublicKey,
        hardware_id: str,
        *,
        max_chunk: int,
        capacity: int,
    ) -> None:
        self.slots = slots
        self.public_key = public_key
        self.hardware_id = hardware_id
        self.max_chunk = max_chunk
        self.capacity = capacity
        self.refuse: m.OtaBeginStatus | None = None
        self._rx: _Incoming | None = None
        self._staged: tuple[int, bytes] | None = None  # (transfer id, sha256) in flash

    def reset(self) -> None:
        self._rx = None

    @property
    def offset(self) -> int:
        return len(self._rx.data) if self._rx else 0

    def on_message(self, msg: m.Message, seq: int = 0) -> list[m.Message]:
        if isinstance(msg, m.OtaBegin):
            return [self._begin(msg, seq)]
        if isinstance(msg, m.OtaChunk):
            return self._chunk(msg)
        if isinstance(msg, m.OtaEnd):
            return self._end(msg, seq)
        if isinstance(msg, m.OtaStatusReq):
            return [self.status(seq)]
        return []

    def status(self, seq: int = 0) -> m.OtaStatus:
        rx = self._rx
        if rx is None:
            staged = self._staged if self.slots.staged else None
            state = m.OtaState.COMPLETE if staged else m.OtaState.IDLE
            return m.OtaStatus(staged[0] if staged else 0, 0, 0, state, seq)
        return m.OtaStatus(
            rx.transfer_id, len(rx.data), rx.manifest.size, m.OtaState.RECEIVING, seq
        )

    def _begin(self, msg: m.OtaBegin, seq: int) -> m.OtaBeginResult:
        def result(status: m.OtaBeginStatus, offset: int = 0) -> m.OtaBeginResult:
            return m.OtaBeginResult(msg.transfer_id, status, offset, seq)

        rx = self._rx
        if rx and rx.transfer_id == msg.transfer_id and rx.manifest.sha256 == msg.sha256:
            # a resume: keep what was written, continue from there
            return result(m.OtaBeginStatus.ACCEPTED, len(rx.data))
        if rx is None and self.slots.staged and self._staged == (msg.transfer_id, msg.sha256):
            # all of it is here and verified (the END_RESULT was lost): only OTA_END is left
            return result(m.OtaBeginStatus.ACCEPTED, msg.image_size)
        if self.slots.trial:
            # the inactive slot is the way back until the new image confirms: keep it
            return result(m.OtaBeginStatus.BUSY)
        if self.refuse is not None:
            return result(self.refuse)
        if msg.hardware_id != self.hardware_id:
            return result(m.OtaBeginStatus.WRONG_HARDWARE)
        if not 0 < msg.image_size <= self.capacity:
            return result(m.OtaBeginStatus.TOO_LARGE)
        if not 1 <= msg.chunk_size <= self.max_chunk:
            return result(m.OtaBeginStatus.BAD_CHUNK_SIZE)
        manifest = Manifest(Version(*msg.version), msg.hardware_id, msg.image_size, msg.sha256)
        try:  # checked before the slot is touched: an unsigned image never erases it
            verify_manifest(manifest, msg.signature, self.public_key)
        except (FirmwareError, ValueError):
            return result(m.OtaBeginStatus.BAD_SIGNATURE)
        self._rx = _Incoming(msg.transfer_id, manifest, msg.chunk_size)
        self._staged = None
        self.slots.erase_inactive()
        return result(m.OtaBeginStatus.ACCEPTED)

    def _chunk(self, msg: m.OtaChunk) -> list[m.Message]:
        rx = self._rx
        if rx is None or rx.transfer_id != msg.transfer_id:
            return []
        have = len(rx.data)
        if msg.offset == have and have + len(msg.data) <= rx.manifest.size:
            rx.data += msg.data
        # in order: written; a repeat or a gap: dropped. Either way say what comes next.
        return [m.OtaChunkAck(rx.transfer_id, len(rx.data))]

    def _end(self, msg: m.OtaEnd, seq: int) -> list[m.Message]:
        rx = self._rx
        tid = msg.transfer_id
        if rx is None and self._staged is not None and self._staged[0] == tid:
            # a repeated OTA_END: OK again while staged; after the reset into the new
            # image there is nothing to say (the host has its answer, or the hello)
            return [m.OtaEndResult(tid, m.OtaEndStatus.OK, seq)] if self.slots.staged else []
        if rx is None or rx.transfer_id != tid:
            return [m.OtaEndResult(tid, m.OtaEndStatus.UNKNOWN_TRANSFER, seq)]
        if len(rx.data) != rx.manifest.size:
            return [m.OtaEndResult(tid, m.OtaEndStatus.INCOMPLETE, seq)]
        self._rx = None
        if hashlib.sha256(rx.data).digest() != rx.manifest.sha256:
            return [m.OtaEndResult(tid, m.OtaEndStatus.SHA_MISMATCH, seq)]
        self.slots.write_inactive(bytes(rx.data), m.Version(*rx.manifest.version))
        self._staged = (tid, rx.manifest.sha256)
        return [m.OtaEndResult(tid, m.OtaEndStatus.OK, seq)]
