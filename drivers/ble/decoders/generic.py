"""Generic layouts: named values at byte offsets of one manufacturer or service data payload.

For sensors with a fixed binary advert and no published format: the config says where
each value sits, its type and endianness, ``value = raw * scale + offset_value``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from drivers.ble.advert import Decoded, DecodeError, Measurement, normalize_uuid

FORMAT = "generic"

FieldType = Literal["u8", "i8", "u16", "i16", "u24", "i24", "u32", "i32", "f32"]

#: type -> (size, struct code or None for 24-bit, signed)
TYPES: dict[str, tuple[int, str | None, bool]] = {
    "u8": (1, "B", False),
    "i8": (1, "b", True),
    "u16": (2, "H", False),
    "i16": (2, "h", True),
    "u24": (3, None, False),
    "i24": (3, None, True),
    "u32": (4, "I", False),
    "i32": (4, "i", True),
    "f32": (4, "f", True),
}


@dataclass(frozen=True, slots=True)
class GenericField:
    name: str
    offset: int
    type: FieldType
    endian: Literal["little", "big"] = "little"
    scale: float = 1.0
    offset_value: float = 0.0
    unit: str = ""

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"generic field {self.name!r}: unknown type {self.type!r}")
        if self.endian not in ("little", "big"):
            raise ValueError(f"generic field {self.name!r}: endian must be little or big")
        if self.offset < 0:
            raise ValueError(f"generic field {self.name!r}: negative offset {self.offset}")


@dataclass(frozen=True, slots=True)
class GenericLayout:
    """Where the payload is (``company_id`` or ``service_uuid``) and its fields."""

    company_id: int | None = None
    service_uuid: str | None = None
    fields: tuple[GenericField, ...] = ()
    min_length: int = 0


def payload_of(
    layout: GenericLayout,
    manufacturer_data: Mapping[int, bytes],
    service_data: Mapping[str, bytes],
) -> bytes | None:
    if layout.company_id is not None:
        return manufacturer_data.get(layout.company_id)
    if layout.service_uuid is not None:
        return service_data.get(normalize_uuid(layout.service_uuid))
    return None


def read_field(f: GenericField, data: bytes) -> float:
    size, code, signed = TYPES[f.type]
    end = f.offset + size
    if end > len(data):
        raise DecodeError(
            FORMAT,
            "truncated",
            f"field {f.name!r} ({f.type}) needs bytes {f.offset}..{end - 1}, "
            f"payload has {len(data)}",
            offset=f.offset,
        )
    raw: float
    if code is None:
        raw = int.from_bytes(data[f.offset : end], f.endian, signed=signed)
    else:
        (raw,) = struct.unpack_from(("<" if f.endian == "little" else ">") + code, data, f.offset)
    return raw * f.scale + f.offset_value


def decode(layout: GenericLayout, data: bytes) -> Decoded:
    if len(data) < layout.min_length:
        raise DecodeError(
            FORMAT,
            "truncated",
            f"{len(data)} bytes, layout needs at least {layout.min_length}",
            offset=len(data),
        )
    return Decoded(
        FORMAT, tuple(Measurement(f.name, read_field(f, data), f.unit) for f in layout.fields)
    )
