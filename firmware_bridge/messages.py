"""The messages of the serial link protocol and their payload codecs.

One frozen dataclass per message type (docs/firmware-protocol.md, "Messages"); every
integer is little-endian. `encode_payload()` gives a message's payload bytes;
`decode(frame)` turns a frame back into its message or raises `MessageError` with the
NACK reason that fits (``unknown_type`` or ``bad_payload``). Decoding is strict: a
payload of the wrong length is an error, never silently truncated or padded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar, NamedTuple, TypeVar

from firmware_bridge.frame import Frame

__all__ = [
    "MESSAGE_TYPES",
    "Ack",
    "BootReason",
    "Capabilities",
    "Command",
    "CommandResult",
    "CommandStatus",
    "ConfigReport",
    "Heartbeat",
    "Hello",
    "Log",
    "LogLevel",
    "Message",
    "MessageError",
    "MsgType",
    "Nack",
    "NackReason",
    "Opcode",
    "OtaBegin",
    "OtaBeginResult",
    "OtaBeginStatus",
    "OtaChunk",
    "OtaChunkAck",
    "OtaEnd",
    "OtaEndResult",
    "OtaEndStatus",
    "OtaState",
    "OtaStatus",
    "OtaStatusReq",
    "Reading",
    "Readings",
    "SlotState",
    "ValueType",
    "Version",
    "decode",
    "decode_payload",
]

MAX_HARDWARE_ID = 32


class MsgType(IntEnum):
    HELLO = 0x01
    CAPABILITIES = 0x02
    HEARTBEAT = 0x03
    ACK = 0x04
    NACK = 0x05
    READINGS = 0x10
    LOG = 0x11
    COMMAND = 0x20
    COMMAND_RESULT = 0x21
    OTA_BEGIN = 0x30
    OTA_BEGIN_RESULT = 0x31
    OTA_CHUNK = 0x32
    OTA_CHUNK_ACK = 0x33
    OTA_END = 0x34
    OTA_END_RESULT = 0x35
    OTA_STATUS_REQ = 0x36
    OTA_STATUS = 0x37


class NackReason(IntEnum):
    BAD_CRC = 1  # reserved: a frame failing its CRC is never answered (its seq is unknown)
    UNKNOWN_TYPE = 2
    BAD_PAYLOAD = 3
    BUSY = 4  # try again later (the sender retries like a timeout)
    UNSUPPORTED = 5
    BAD_STATE = 6  # not valid now (an OTA_CHUNK without OTA_BEGIN, say)
    TOO_LARGE = 7
    NO_SESSION = 8  # the device has not had a HELLO since it booted: send HELLO


class BootReason(IntEnum):
    POWER_ON = 0
    RESET = 1  # REBOOT command or reset pin
    WATCHDOG = 2
    BROWNOUT = 3
    OTA_UPDATE = 4  # first boot of a new image, on trial until confirmed
    ROLLED_BACK = 5  # the new image was not confirmed: back on the old one
    CRASH = 6  # fault handler


class SlotState(IntEnum):
    CONFIRMED = 0
    TRIAL = 1  # booted after OTA, rolled back at the next reset unless confirmed


class ValueType(IntEnum):
    I32 = 1
    F32 = 2
    F64 = 3
    BOOL = 4


FAULT = 0x80  # bit of a reading's type byte: the sensor reports a fault (quality BAD)


class LogLevel(IntEnum):
    DEBUG = 0
    INFO = 1
    WARNING = 2
    ERROR = 3


class Opcode(IntEnum):
    SET_INTERVAL = 1  # arg: u32 sampling interval in ms
    READ_CONFIG = 2  # no arg; result data: ConfigReport
    REBOOT = 3  # no arg; the device answers, then resets


_OPCODES = frozenset(int(o) for o in Opcode)


class CommandStatus(IntEnum):
    OK = 0
    INVALID_ARGUMENT = 1
    UNSUPPORTED = 2
    FAILED = 3


class OtaBeginStatus(IntEnum):
    ACCEPTED = 0
    BAD_SIGNATURE = 1
    WRONG_HARDWARE = 2
    DOWNGRADE = 3
    TOO_LARGE = 4
    BUSY = 5
    BAD_CHUNK_SIZE = 6
    REJECTED = 7  # any other refusal


class OtaEndStatus(IntEnum):
    OK = 0  # verified, written; the device reboots into the new slot next
    SHA_MISMATCH = 1
    INCOMPLETE = 2
    BAD_SIGNATURE = 3
    WRITE_FAILED = 4
    UNKNOWN_TRANSFER = 5


class OtaState(IntEnum):
    IDLE = 0
    RECEIVING = 1
    VERIFYING = 2
    COMPLETE = 3  # verified, waiting for reboot
    FAILED = 4


class MessageError(ValueError):
    """A frame whose message cannot be decoded; `reason` is the NACK reason to send."""

    def __init__(self, reason: NackReason, detail: str) -> None:
        super().__init__(f"{reason.name.lower()}: {detail}")
        self.reason = reason


class Version(NamedTuple):
    """A firmware version: three u16 on the wire."""

    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @classmethod
    def parse(cls, text: str) -> Version:
        parts = text.strip().split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"not a version major.minor.patch: {text!r}")
        major, minor, patch = (int(p) for p in parts)
        if max(major, minor, patch) > 0xFFFF:
            raise ValueError(f"version part above 65535: {text!r}")
        return cls(major, minor, patch)


NO_VERSION = Version(0, 0, 0)

# -- codec helpers ---------------------------------------------------------------------

_VER = struct.Struct("<HHH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


def _bad(cls: type, detail: str) -> MessageError:
    return MessageError(NackReason.BAD_PAYLOAD, f"{cls.__name__}: {detail}")


def _fixed(cls: type, st: struct.Struct, payload: bytes) -> tuple[int, ...]:
    if len(payload) != st.size:
        raise _bad(cls, f"{len(payload)} bytes, need {st.size}")
    return st.unpack(payload)


def _hwid(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > MAX_HARDWARE_ID:
        raise ValueError(f"hardware id longer than {MAX_HARDWARE_ID} bytes: {text!r}")
    return bytes([len(raw)]) + raw


def _tail_hwid(cls: type, tail: bytes) -> str:
    """A length-prefixed hardware id that must be the rest of the payload."""
    if not tail or tail[0] != len(tail) - 1 or tail[0] > MAX_HARDWARE_ID:
        raise _bad(cls, "bad hardware id length")
    try:
        return tail[1:].decode()
    except UnicodeDecodeError:
        raise _bad(cls, "hardware id is not UTF-8") from None


def _enum(cls: type, enum: type[IntEnum], value: int, what: str) -> None:
    try:
        enum(value)
    except ValueError:
        raise _bad(cls, f"unknown {what} {value}") from None


# -- messages --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """host -> device: opens a session. Answered by CAPABILITIES, not by ACK."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    _S: ClassVar[struct.Struct] = struct.Struct("<BHI")
    protocol_version: int = 1
    max_frame: int = 1024  # the largest frame the host accepts
    heartbeat_ms: int = 1000  # both sides send a HEARTBEAT when idle this long

    def encode_payload(self) -> bytes:
        return self._S.pack(self.protocol_version, self.max_frame, self.heartbeat_ms)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Hello:
        return cls(*_fixed(cls, cls._S, payload))


@dataclass(frozen=True, slots=True)
class Capabilities:
    """device -> host, the answer to HELLO (ACK_REQUESTED: the host's ACK of it is what
    confirms a trial image)."""

    TYPE: ClassVar[MsgType] = MsgType.CAPABILITIES
    _S: ClassVar[struct.Struct] = struct.Struct("<HBHHHBBBHQIHHH")
    protocol_version: int
    firmware: Version
    active_slot: int
    slot_state: SlotState
    boot_reason: BootReason
    max_frame: int
    uptime_ms: int
    sampling_interval_ms: int
    failed_version: Version = NO_VERSION  # the image rolled back from, if any
    hardware_id: str = ""
    request_seq: int = 0  # seq of the HELLO answered

    def encode_payload(self) -> bytes:
        return self._S.pack(
            self.request_seq,
            self.protocol_version,
            *self.firmware,
            self.active_slot,
            self.slot_state,
            self.boot_reason,
            self.max_frame,
            self.uptime_ms,
            self.sampling_interval_ms,
            *self.failed_version,
        ) + _hwid(self.hardware_id)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Capabilities:
        n = cls._S.size
        if len(payload) < n + 1:
            raise _bad(cls, f"{len(payload)} bytes, need at least {n + 1}")
        v = cls._S.unpack_from(payload)
        if v[5] > 1:
            raise _bad(cls, f"slot {v[5]}")
        _enum(cls, SlotState, v[6], "slot state")
        _enum(cls, BootReason, v[7], "boot reason")
        return cls(
            request_seq=v[0],
            protocol_version=v[1],
            firmware=Version(*v[2:5]),
            active_slot=v[5],
            slot_state=SlotState(v[6]),
            boot_reason=BootReason(v[7]),
            max_frame=v[8],
            uptime_ms=v[9],
            sampling_interval_ms=v[10],
            failed_version=Version(*v[11:14]),
            hardware_id=_tail_hwid(cls, payload[n:]),
        )


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Either direction, when nothing else was sent for a heartbeat interval."""

    TYPE: ClassVar[MsgType] = MsgType.HEARTBEAT
    _S: ClassVar[struct.Struct] = struct.Struct("<QB")
    uptime_ms: int
    session: bool = True  # the sender has a session (has seen HELLO / CAPABILITIES)

    def encode_payload(self) -> bytes:
        return self._S.pack(self.uptime_ms, 1 if self.session else 0)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Heartbeat:
        uptime, flags = _fixed(cls, cls._S, payload)
        return cls(uptime, bool(flags & 1))


@dataclass(frozen=True, slots=True)
class Ack:
    """The header seq (with IS_RESPONSE) names the acknowledged frame; no payload."""

    TYPE: ClassVar[MsgType] = MsgType.ACK

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def decode_payload(cls, payload: bytes) -> Ack:
        if payload:
            raise _bad(cls, f"{len(payload)} bytes, need 0")
        return cls()


@dataclass(frozen=True, slots=True)
class Nack:
    TYPE: ClassVar[MsgType] = MsgType.NACK
    reason: NackReason

    def encode_payload(self) -> bytes:
        return bytes([self.reason])

    @classmethod
    def decode_payload(cls, payload: bytes) -> Nack:
        if len(payload) != 1:
            raise _bad(cls, f"{len(payload)} bytes, need 1")
        _enum(cls, NackReason, payload[0], "reason")
        return cls(NackReason(payload[0]))


_VALUE_STRUCTS = {
    ValueType.I32: struct.Struct("<i"),
    ValueType.F32: struct.Struct("<f"),
    ValueType.F64: struct.Struct("<d"),
    ValueType.BOOL: struct.Struct("<?"),
}
_READING_HEAD = struct.Struct("<HQB")


@dataclass(frozen=True, slots=True)
class Reading:
    sensor_id: int
    uptime_ms: int  # device uptime when sampled
    type: ValueType
    value: float | int | bool
    fault: bool = False

    def encoded_size(self) -> int:
        return _READING_HEAD.size + _VALUE_STRUCTS[self.type].size


@dataclass(frozen=True, slots=True)
class Readings:
    """device -> host, ACK_REQUESTED: a count byte, then the readings back to back."""

    TYPE: ClassVar[MsgType] = MsgType.READINGS
    readings: tuple[Reading, ...]

    def encode_payload(self) -> bytes:
        if len(self.readings) > 255:
            raise ValueError("at most 255 readings per frame")
        out = bytearray([len(self.readings)])
        for r in self.readings:
            out += _READING_HEAD.pack(r.sensor_id, r.uptime_ms, r.type | (FAULT if r.fault else 0))
            out += _VALUE_STRUCTS[r.type].pack(r.value)
        return bytes(out)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Readings:
        if not payload:
            raise _bad(cls, "empty")
        count = payload[0]
        pos = 1
        out = []
        head = _READING_HEAD
        for _ in range(count):
            if pos + head.size > len(payload):
                raise _bad(cls, "truncated reading")
            sid, up, tb = head.unpack_from(payload, pos)
            pos += head.size
            try:
                vt = ValueType(tb & ~FAULT)
            except ValueError:
                raise _bad(cls, f"unknown value type {tb:#x}") from None
            st = _VALUE_STRUCTS[vt]
            if pos + st.size > len(payload):
                raise _bad(cls, "truncated value")
            (value,) = st.unpack_from(payload, pos)
            pos += st.size
            out.append(Reading(sid, up, vt, value, bool(tb & FAULT)))
        if pos != len(payload):
            raise _bad(cls, f"{len(payload) - pos} bytes after the last reading")
        return cls(tuple(out))


@dataclass(frozen=True, slots=True)
class Log:
    """device -> host: one log line (not ACK_REQUESTED: logs may be lost)."""

    TYPE: ClassVar[MsgType] = MsgType.LOG
    _S: ClassVar[struct.Struct] = struct.Struct("<BQ")
    level: LogLevel
    uptime_ms: int
    text: str

    def encode_payload(self) -> bytes:
        return self._S.pack(self.level, self.uptime_ms) + self.text.encode()

    @classmethod
    def decode_payload(cls, payload: bytes) -> Log:
        if len(payload) < cls._S.size:
            raise _bad(cls, f"{len(payload)} bytes, need at least {cls._S.size}")
        level, uptime = cls._S.unpack_from(payload)
        _enum(cls, LogLevel, level, "level")
        # a firmware may cut a line mid-character: replace, never refuse
        text = payload[cls._S.size :].decode(errors="replace")
        return cls(LogLevel(level), uptime, text)


@dataclass(frozen=True, slots=True)
class Command:
    """host -> device, ACK_REQUESTED; answered by COMMAND_RESULT."""

    TYPE: ClassVar[MsgType] = MsgType.COMMAND
    opcode: int  # an Opcode; others are answered UNSUPPORTED
    arg: bytes = b""

    @classmethod
    def set_interval(cls, interval_ms: int) -> Command:
        return cls(Opcode.SET_INTERVAL, _U32.pack(interval_ms))

    def encode_payload(self) -> bytes:
        return bytes([self.opcode]) + self.arg

    @classmethod
    def decode_payload(cls, payload: bytes) -> Command:
        if not payload:
            raise _bad(cls, "empty")
        # an unknown opcode is not a payload error: the device answers UNSUPPORTED
        op = payload[0]
        return cls(Opcode(op) if op in _OPCODES else op, payload[1:])


_CMD_RESULT = struct.Struct("<HBB")


@dataclass(frozen=True, slots=True)
class CommandResult:
    """device -> host, ACK_REQUESTED: the outcome of the COMMAND whose seq it names."""

    TYPE: ClassVar[MsgType] = MsgType.COMMAND_RESULT
    opcode: int
    status: CommandStatus
    data: bytes = b""
    request_seq: int = 0  # seq of the COMMAND answered

    def encode_payload(self) -> bytes:
        return _CMD_RESULT.pack(self.request_seq, self.opcode, self.status) + self.data

    @classmethod
    def decode_payload(cls, payload: bytes) -> CommandResult:
        if len(payload) < _CMD_RESULT.size:
            raise _bad(cls, f"{len(payload)} bytes, need at least {_CMD_RESULT.size}")
        seq, op, status = _CMD_RESULT.unpack_from(payload)
        _enum(cls, CommandStatus, status, "status")
        return cls(op, CommandStatus(status), payload[_CMD_RESULT.size :], seq)


@dataclass(frozen=True, slots=True)
class ConfigReport:
    """The data of a READ_CONFIG result: intervals, then the device's sensors."""

    _S: ClassVar[struct.Struct] = struct.Struct("<IIB")
    sampling_interval_ms: int
    heartbeat_ms: int
    sensors: tuple[tuple[int, ValueType], ...] = field(default=())

    def encode(self) -> bytes:
        n = len(self.sensors)
        out = bytearray(self._S.pack(self.sampling_interval_ms, self.heartbeat_ms, n))
        for sid, vt in self.sensors:
            out += struct.pack("<HB", sid, vt)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> ConfigReport:
        if len(data) < cls._S.size:
            raise _bad(cls, "truncated")
        interval, hb, n = cls._S.unpack_from(data)
        if len(data) != cls._S.size + 3 * n:
            raise _bad(cls, "sensor list length")
        sensors = []
        for i in range(n):
            sid, vt = struct.unpack_from("<HB", data, cls._S.size + 3 * i)
            _enum(cls, ValueType, vt, "value type")
            sensors.append((sid, ValueType(vt)))
        return cls(interval, hb, tuple(sensors))


# -- OTA (the sender and receiver logic live in firmware_bridge/ota.py) ----------------

_OTA_BEGIN = struct.Struct("<II32sHHHH64s")


@dataclass(frozen=True, slots=True)
class OtaBegin:
    """host -> device, ACK_REQUESTED; answered by OTA_BEGIN_RESULT."""

    TYPE: ClassVar[MsgType] = MsgType.OTA_BEGIN
    transfer_id: int
    image_size: int
    sha256: bytes  # 32 bytes
    version: Version
    chunk_size: int  # data bytes per OTA_CHUNK (the last one may be shorter)
    signature: bytes  # 64 bytes, Ed25519
    hardware_id: str

    def encode_payload(self) -> bytes:
        if len(self.sha256) != 32 or len(self.signature) != 64:
            raise ValueError("sha256 must be 32 bytes and signature 64")
        return _OTA_BEGIN.pack(
            self.transfer_id,
            self.image_size,
            self.sha256,
            *self.version,
            self.chunk_size,
            self.signature,
        ) + _hwid(self.hardware_id)

    @classmethod
    def decode_payload(cls, payload: bytes) -> OtaBegin:
        n = _OTA_BEGIN.size
        if len(payload) < n + 1:
            raise _bad(cls, f"{len(payload)} bytes, need at least {n + 1}")
        tid, size, sha, ma, mi, pa, chunk, sig = _OTA_BEGIN.unpack_from(payload)
        return cls(tid, size, sha, Version(ma, mi, pa), chunk, sig, _tail_hwid(cls, payload[n:]))


_OTA_BEGIN_RESULT = struct.Struct("<HIBI")


@dataclass(frozen=True, slots=True)
class OtaBeginResult:
    TYPE: ClassVar[MsgType] = MsgType.OTA_BEGIN_RESULT
    transfer_id: int
    status: OtaBeginStatus
    resume_offset: int = 0  # bytes of this transfer id the device already holds
    request_seq: int = 0  # seq of the OTA_BEGIN answered

    @property
    def accepted(self) -> bool:
        return self.status is OtaBeginStatus.ACCEPTED

    def encode_payload(self) -> bytes:
        return _OTA_BEGIN_RESULT.pack(
            self.request_seq, self.transfer_id, self.status, self.resume_offset
        )

    @classmethod
    def decode_payload(cls, payload: bytes) -> OtaBeginResult:
        seq, tid, status, offset = _fixed(cls, _OTA_BEGIN_RESULT, payload)
        _enum(cls, OtaBeginStatus, status, "status")
        return cls(tid, OtaBeginStatus(status), offset, seq)


_TID_OFFSET = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class OtaChunk:
    """host -> device, not ACK_REQUESTED: acknowledged cumulatively by OTA_CHUNK_ACK."""

    TYPE: ClassVar[MsgType] = MsgType.OTA_CHUNK
    HEAD: ClassVar[int] = _TID_OFFSET.size  # payload bytes before the data
    transfer_id: int
    offset: int
    data: bytes

    def encode_payload(self) -> bytes:
        return _TID_OFFSET.pack(self.transfer_id, self.offset) + self.data

    @classmethod
    def decode_payload(cls, payload: bytes) -> OtaChunk:
        if len(payload) < _TID_OFFSET.size:
            raise _bad(cls, f"{len(payload)} bytes, need at least {_TID_OFFSET.size}")
        tid, offset = _TID_OFFSET.unpack_from(payload)
        return cls(tid, offset, payload[_TID_OFFSET.size :])


@dataclass(frozen=True, slots=True)
class OtaChunkAck:
    """device -> host, not ACK_REQUESTED: every byte below `next_offset` is stored."""

    TYPE: ClassVar[MsgType] = MsgType.OTA_CHUNK_ACK
    transfer_id: int
    next_offset: int

    def encode_payload(self) -> bytes:
        return _TID_OFFSET.pack(self.transfer_id, self.next_offset)

    @classmethod
    def decode_payload(cls, payload: bytes) -> OtaChunkAck:
        return cls(*_fixed(cls, _TID_OFFSET, payload))


@dataclass(frozen=True, slots=True)
class OtaEnd:
    """host -> device, ACK_REQUESTED; answered by OTA_END_RESULT."""

    TYPE: ClassVar[MsgType] = MsgType.OTA_END
    transfer_id: int

    def encode_payload(self) -> bytes:
        return _U32.pack(self.transfer_id)

    @classmethod
    def decode_payload(cls, payload: bytes) -> OtaEnd:
        return cls(*_fixed(cls, _U32, payload))


_OTA_END_RESULT = struct.Struct("<HIB")


@dataclass(frozen=True, slots=True)
class OtaEndResult:
    TYPE: ClassVar[MsgType] = MsgType.OTA_END_RESULT
    transfer_id: int
    status: OtaEndStatus
    request_seq: int = 0  # seq of the OTA_END answered

    @property
    def ok(self) -> bool:
        return self.status is OtaEndStatus.OK

    def encode_payload(self) -> bytes:
        return _OTA_END_RESULT.pack(self.request_seq, self.transfer_id, self.status)

    @classmethod
    def decode_payload(cls, payload: bytes) -> OtaEndResult:
        seq, tid, status = _fixed(cls, _OTA_END_RESULT, payload)
        _enum(cls, OtaEndStatus, status, "status")
        return cls(tid, OtaEndStatus(status), seq)


@dataclass(frozen=True, slots=True)
class OtaStatusReq:
    """host -> device, ACK_REQUESTED; answered by OTA_STATUS. transfer_id 0: any."""

    TYPE: ClassVar[MsgType] = MsgType.OTA_STATUS_REQ
    transfer_id: int = 0

    def encode_payload(self) -> bytes:
        return _U32.pack(self.transfer_id)

    @classmethod
    def decode_payload(cls, payload: bytes) -> OtaStatusReq:
        return cls(*_fixed(cls, _U32, payload))


_OTA_STATUS = struct.Struct("<HIIIB")


@dataclass(frozen=True, slots=True)
class OtaStatus:
    TYPE: ClassVar[MsgType] = MsgType.OTA_STATUS
    transfer_id: int  # the transfer the device holds (0: none)
    offset: int  # next expected offset: every byte below it is stored
    image_size: int
    state: OtaState
    request_seq: int = 0  # seq of the OTA_STATUS_REQ answered

    def encode_payload(self) -> bytes:
        return _OTA_STATUS.pack(
            self.request_seq, self.transfer_id, self.offset, self.image_size, self.state
        )

    @classmethod
    def decode_payload(cls, payload: bytes) -> OtaStatus:
        seq, tid, offset, size, state = _fixed(cls, _OTA_STATUS, payload)
        _enum(cls, OtaState, state, "state")
        return cls(tid, offset, size, OtaState(state), seq)


Message = (
    Hello
    | Capabilities
    | Heartbeat
    | Ack
    | Nack
    | Readings
    | Log
    | Command
    | CommandResult
    | OtaBegin
    | OtaBeginResult
    | OtaChunk
    | OtaChunkAck
    | OtaEnd
    | OtaEndResult
    | OtaStatusReq
    | OtaStatus
)

M = TypeVar("M", bound=Message)

MESSAGE_TYPES: dict[int, Callable[[bytes], Message]] = {
    cls.TYPE: cls.decode_payload
    for cls in (
        Hello,
        Capabilities,
        Heartbeat,
        Ack,
        Nack,
        Readings,
        Log,
        Command,
        CommandResult,
        OtaBegin,
        OtaBeginResult,
        OtaChunk,
        OtaChunkAck,
        OtaEnd,
        OtaEndResult,
        OtaStatusReq,
        OtaStatus,
    )
}

#: requests answered by a message that names their seq in `request_seq`
REPLY_TYPES: dict[MsgType, MsgType] = {
    MsgType.HELLO: MsgType.CAPABILITIES,
    MsgType.COMMAND: MsgType.COMMAND_RESULT,
    MsgType.OTA_BEGIN: MsgType.OTA_BEGIN_RESULT,
    MsgType.OTA_END: MsgType.OTA_END_RESULT,
    MsgType.OTA_STATUS_REQ: MsgType.OTA_STATUS,
}


def decode_payload(type_: int, payload: bytes) -> Message:
    """The message of a type byte and a payload. Raises MessageError."""
    fn = MESSAGE_TYPES.get(type_)
    if fn is None:
        raise MessageError(NackReason.UNKNOWN_TYPE, f"type {type_:#04x}")
    try:
        return fn(payload)
    except MessageError:
        raise
    except (struct.error, ValueError) as e:  # belt and braces: never another error type
        raise MessageError(NackReason.BAD_PAYLOAD, str(e)) from None


def decode(frame: Frame) -> Message:
    """The message a frame carries. Raises MessageError."""
    return decode_payload(frame.type, frame.payload)
