"""Config models of the ``modbus`` driver: the keys of a ``driver = "modbus"`` device
table and of its point tables (besides the generic ones in agent/config.py).

The validators here check one table at a time; what only shows across a device's points
(overlapping registers, unknown poll groups) is checked in checks.py.
"""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from common.units import Duration, Offset, Scale

Table = Literal["coil", "discrete_input", "input_register", "holding_register"]
DataType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float32", "float64", "string", "bit",
]  # fmt: skip
#: byte order within the value, as letters of the big-endian bytes: ABCD is Modbus's
#: standard big-endian; CDAB swaps 16-bit words; BADC swaps bytes in each word; DCBA
#: is little-endian. For 64-bit types the pattern extends to 8 bytes.
Order = Literal["ABCD", "CDAB", "BADC", "DCBA"]
Transport = Literal["tcp", "rtu", "rtu-over-tcp"]
AddressBase = Literal[0, 1, "modicon"]

#: tables of single bits (function codes 1, 2, 5, 15)
BIT_TABLES: frozenset[str] = frozenset({"coil", "discrete_input"})
#: tables a master may write (coils: 5/15, holding registers: 6/16)
WRITABLE_TABLES: frozenset[str] = frozenset({"coil", "holding_register"})
#: registers a value of each fixed-size datatype takes ("string" takes `length`)
REGISTERS: dict[str, int] = {
    "bool": 1, "bit": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2,
    "float32": 2, "int64": 4, "uint64": 4, "float64": 4,
}  # fmt: skip
#: device keys that belong to one transport only
SERIAL_KEYS = ("serial_port", "baudrate", "parity", "stopbits", "bytesize")
NETWORK_KEYS = ("host", "port")

#: error type agent/config.py shows as the plain message (at ctx["key"] when set)
_AT_KEY = "citygw_at_key"


def _problem(message: str, key: str = "") -> PydanticCustomError:
    return PydanticCustomError(_AT_KEY, "{message}", {"key": key, "message": message})


#: Modicon numbering: the leading digit of a 5- or 6-digit number names the table
_MODICON_DIGIT: dict[int, Table] = {
    0: "coil", 1: "discrete_input", 3: "input_register", 4: "holding_register"
}  # fmt: skip
_DIGIT_OF: dict[str, int] = {t: d for d, t in _MODICON_DIGIT.items()}


def _modicon(number: int) -> tuple[Table, int] | None:
    """(table, PDU address) of a Modicon number, or None if it is not one: 5 digits
    1..9999 (coils), 10001..19999, 30001..39999, 40001..49999; 6 digits 100001..165536,
    300001..365536, 400001..465536 (6-digit coils, 000001..065536, cannot be told from
    5-digit numbers once written as an integer)."""
    if 1 <= number <= 49999:
        digit, n = divmod(number, 10000)
    elif 100001 <= number <= 465536:
        digit, n = divmod(number, 100000)
    else:
        return None
    if digit not in _MODICON_DIGIT or n == 0:
        return None
    return _MODICON_DIGIT[digit], n - 1


def _modicon_ranges(table: str) -> str:
    digit = _DIGIT_OF[table]
    if digit == 0:
        return "1..9999"
    return f"{digit}0001..{digit}9999 or {digit}00001..{digit}65536"


def pdu_address(number: int, base: AddressBase, table: str | None) -> tuple[Table, int]:
    """(table, protocol address) of an address written in convention `base`; `table` is
    the point's table if it states one (with "modicon" it is inferred from the number
    and, if stated, must agree). ValueError names the number, the convention and the
    valid range."""
    if base == "modicon":
        found = _modicon(number)
        if found is None:
            raise ValueError(
                f"{number} is not a Modicon register number (address_base = 'modicon'): "
                "coils 1..9999, discrete inputs 10001..19999 or 100001..165536, input "
                "registers 30001..39999 or 300001..365536, holding registers "
                "40001..49999 or 400001..465536"
            )
        inferred, pdu = found
        if table is not None and table != inferred:
            raise ValueError(
                f"{number} is a {inferred} number (address_base = 'modicon'), but the point "
                f"says table = {table!r}; {table} numbers are {_modicon_ranges(table)}"
            )
        return inferred, pdu
    chosen: Table = cast(Table, table) if table is not None else "holding_register"
    if base == 1:
        if not 1 <= number <= 65536:
            raise ValueError(
                f"{number} is not a 1-based register number (address_base = 1): 1..65536"
            )
        return chosen, number - 1
    if not 0 <= number <= 65535:
        raise ValueError(
            f"{number} is not a protocol (PDU) address (address_base = 0): 0..65535 "
            "(0x0000..0xFFFF); for 30001/40001-style numbers set address_base = 'modicon', "
            "for numbers counted from 1 address_base = 1"
        )
    return chosen, number


def written_number(table: str, pdu: int, base: AddressBase, six_digits: bool = False) -> int:
    """The number convention `base` writes protocol address `pdu` of `table` as (Modicon:
    5 digits where they suffice, unless `six_digits`)."""
    if base == 0:
        return pdu
    if base == 1:
        return pdu + 1
    digit = _DIGIT_OF[table]
    return digit * (100000 if six_digits or pdu >= 9999 else 10000) + pdu + 1


def written_address(table: str, pdu: int, base: AddressBase, written: int | None = None) -> str:
    """An address as its source wrote it, with the protocol address when they differ:
    ``30001 (PDU 0)``, or ``12`` for address_base = 0."""
    if base == 0:
        return str(pdu)
    number = written if written is not None else written_number(table, pdu, base)
    return f"{number} (PDU {pdu})"


def register_count(datatype: str, length: int | None) -> int:
    """Registers (or bits, in a bit table) one value takes."""
    if datatype == "string":
        return length or 1
    return REGISTERS[datatype]


class TableLimits(BaseModel):
    """Request limits for one table, overriding the device's (see ModbusDeviceSettings)."""

    model_config = ConfigDict(extra="forbid")

    max_registers: int | None = Field(None, ge=1, le=125)
    max_bits: int | None = Field(None, ge=1, le=2000)
    max_gap: int | None = Field(None, ge=0, le=124)


class ModbusDeviceSettings(BaseModel):
    """Keys a ``driver = "modbus"`` device accepts besides the common ones."""

    model_config = ConfigDict(extra="forbid")

    transport: Transport = "tcp"
    # tcp and rtu-over-tcp
    host: str | None = None
    port: int = Field(502, ge=1, le=65535)
    # rtu: the serial line; devices with the same serial_port share one bus
    serial_port: str | None = None
    baudrate: int = Field(9600, ge=300, le=921600)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    #: silence between requests on a shared bus (RS-485 needs >= 3.5 characters)
    inter_frame_delay: Duration = Field(0.005, le=1.0)

    unit_id: int = Field(1, ge=0, le=255)
    timeout: Duration = Field(1.0, gt=0.0, le=60.0)
    retries: int = Field(2, ge=0, le=10)
    #: limits of one request: the protocol allows 125 registers / 2000 bits; many
    #: devices accept fewer
    max_registers: int = Field(125, ge=1, le=125)
    max_bits: int = Field(2000, ge=1, le=2000)
    #: unused registers a merged read may span to save a request (0: never merge across)
    max_gap: int = Field(10, ge=0, le=124)
    #: limits for one table that differ from the device-wide ones above, e.g.
    #: { holding_register = { max_gap = 0 }, input_register = { max_gap = 20 } }
    table_limits: dict[Table, TableLimits] = Field(default_factory=dict)
    #: how the addresses of this device's own points are written (a profile states its
    #: own): 0 = the protocol (PDU) address as is, also for hex tables; 1 = register
    #: number counted from 1 (PDU = number - 1); "modicon" = 0xxxx/1xxxx/3xxxx/4xxxx
    #: numbers (30001 -> input register 0, 40001 -> holding register 0)
    address_base: AddressBase = 0
    #: the device rejects 32/64-bit values that start on an odd address
    even_address_only: bool = False
    #: poll groups besides the device's `poll`: e.g. { totals = "60s" }
    poll_groups: dict[str, Duration] = Field(default_factory=dict)
    #: a register map from drivers/modbus/profiles/<name>.toml (or a path to a .toml file)
    profile: str | None = None
    #: names of profile points this device does not read
    points_exclude: list[str] = Field(default_factory=list)

    @field_validator(*SERIAL_KEYS)
    @classmethod
    def _serial_only(cls, v: Any, info: ValidationInfo) -> Any:
        transport = info.data.get("transport")
        if transport is not None and transport != "rtu" and v is not None:
            raise _problem(
                f"{info.field_name} is a serial line setting, only for transport = 'rtu' "
                f"(this device has transport = {transport!r}"
                + (
                    "; set the serial line on the RS-485 gateway instead)"
                    if transport == "rtu-over-tcp"
                    else ")"
                )
            )
        return v

    @field_validator(*NETWORK_KEYS)
    @classmethod
    def _network_only(cls, v: Any, info: ValidationInfo) -> Any:
        if info.data.get("transport") == "rtu" and v is not None:
            raise _problem(
                f"{info.field_name} is only for transport = 'tcp' or 'rtu-over-tcp' "
                "(this device has transport = 'rtu'; it uses serial_port)"
            )
        return v

    @field_validator("inter_frame_delay")
    @classmethod
    def _serial_framing_only(cls, v: float, info: ValidationInfo) -> float:
        if info.data.get("transport") == "tcp":
            raise _problem(
                "inter_frame_delay is only for transport = 'rtu' or 'rtu-over-tcp' "
                "(Modbus TCP has no silent interval between frames)"
            )
        return v

    @field_validator("host", "serial_port")
    @classmethod
    def _not_blank(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not v.strip():
            raise _problem(f"{info.field_name} must not be empty")
        return v

    @field_validator("poll_groups")
    @classmethod
    def _check_groups(cls, v: dict[str, float]) -> dict[str, float]:
        for name, seconds in v.items():
            if not name or any(c.isspace() for c in name):
                raise _problem(f"{name!r} is not a valid poll group name; use letters and digits")
            if seconds < 0.01:
                raise _problem(f"poll group {name!r}: the interval must be >= 10ms")
        return v

    @field_validator("table_limits")
    @classmethod
    def _limits_fit_tables(cls, v: dict[str, TableLimits]) -> dict[str, TableLimits]:
        for table, limits in v.items():
            wrong = "max_registers" if table in BIT_TABLES else "max_bits"
            if getattr(limits, wrong) is not None:
                right = "max_bits" if table in BIT_TABLES else "max_registers"
                raise _problem(
                    f"{wrong} does not apply to a {table} (its requests are limited by {right})",
                    f"{table}.{wrong}",
                )
        return v

    def request_limits(self, table: str) -> tuple[int, int]:
        """(most registers or bits one request of `table` reads, most unused registers
        it may span): the table's own limits where table_limits sets them, else the
        device's."""
        own = self.table_limits.get(cast(Table, table))
        bits = table in BIT_TABLES
        size = self.max_bits if bits else self.max_registers
        gap = self.max_gap
        if own is not None:
            size = (own.max_bits if bits else own.max_registers) or size
            gap = own.max_gap if own.max_gap is not None else gap
        return size, gap

    @model_validator(mode="after")
    def _check_transport(self) -> ModbusDeviceSettings:
        if self.transport in ("tcp", "rtu-over-tcp") and self.host is None:
            raise _problem(
                f"transport = {self.transport!r} needs host (the IP address or name of the "
                + ("device)" if self.transport == "tcp" else "serial-to-Ethernet gateway)"),
                "host",
            )
        if self.transport == "rtu" and self.serial_port is None:
            raise _problem(
                "transport = 'rtu' needs serial_port (e.g. '/dev/ttyUSB0' or "
                "'/dev/serial/by-id/...')",
                "serial_port",
            )
        return self


class ModbusPointSettings(BaseModel):
    """Where a point lives in the device's register map and how to decode it."""

    model_config = ConfigDict(extra="forbid")

    table: Table = "holding_register"
    #: as the source's register table prints it, in the convention of address_base;
    #: after validation the protocol (PDU) address
    address: int = Field(description="protocol address after validation")
    #: how `address` is written (see ModbusDeviceSettings.address_base); a point takes
    #: its source's (the device's own, or its profile's) unless it states one
    address_base: AddressBase = 0
    #: default: "bool" in coil/discrete_input tables, "uint16" in register tables
    datatype: DataType = "uint16"
    order: Order = "ABCD"
    #: registers of a string (2 characters each)
    length: int | None = Field(None, ge=1, le=123)
    #: bit of a register for datatype "bit" (0 = least significant)
    bit: int | None = Field(None, ge=0, le=15)
    #: value = raw * scale + offset (inverse on writes)
    scale: Scale = 1.0
    offset: Offset = 0.0
    #: which poll group reads this point ("" = the device's `poll`)
    group: str = ""
    #: raw values (before scale/offset) the device sends for "not available", e.g.
    #: [0x7FFFFFFF] for an int32 or [0xFFFF] for a uint16; NaN is always one for floats.
    #: Integers are compared on the register bits (0x8000 and -32768 are the same int16
    #: marker); such a reading is stored as NaN with quality "unavailable"
    invalid: list[int | float] = Field(default_factory=list)

    @field_validator("invalid", mode="before")
    @classmethod
    def _markers_are_numbers(cls, v: Any) -> Any:
        for m in v if isinstance(v, list) else ():
            if isinstance(m, bool) or not isinstance(m, int | float):
                raise _problem(
                    f"marker {m!r} is not a number; write the raw value as the vendor's "
                    "table gives it, e.g. 0x7FFFFFFF or -32768 (or nan)"
                )
        return v

    #: some models of the device lack this register: after the device refuses it, it is
    #: dropped from the plan (reported) instead of reading BAD forever
    optional: bool = False
    #: the address as written, when address_base is not 0 (for display)
    _written: int | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _to_protocol_address(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Converts the written address to the protocol address (and, for Modicon
        numbers, infers the table), then validates; bit tables default to "bool"."""
        written = None
        if isinstance(data, dict):
            base, number, table = (
                data.get("address_base", 0),
                data.get("address"),
                data.get("table"),
            )
            valid_table = table is None or (isinstance(table, str) and table in _DIGIT_OF)
            if (
                base in (0, 1, "modicon")
                and isinstance(number, int)
                and not isinstance(number, bool)
                and valid_table
            ):
                try:
                    found, pdu = pdu_address(number, base, table)
                except ValueError as exc:
                    raise _problem(str(exc), "address") from None
                data = {**data, "table": found, "address": pdu}
                written = number if base != 0 else None
            table = data.get("table")
            if isinstance(table, str) and table in BIT_TABLES and "datatype" not in data:
                data = {**data, "datatype": "bool"}
        model = handler(data)
        if isinstance(model, cls) and written is not None:
            model._written = written
        return model

    @field_validator("datatype")
    @classmethod
    def _datatype_fits_table(cls, v: str, info: ValidationInfo) -> str:
        table = info.data.get("table")
        if table in BIT_TABLES and v != "bool":
            raise _problem(
                f"a {table} is a single bit: datatype must be 'bool' (or left out), got {v!r}"
            )
        return v

    @field_validator("length")
    @classmethod
    def _length_for_strings(cls, v: int | None, info: ValidationInfo) -> int | None:
        datatype = info.data.get("datatype")
        if v is not None and datatype is not None and datatype != "string":
            raise _problem(f"length is only for datatype = 'string', this point is {datatype!r}")
        return v

    @field_validator("bit")
    @classmethod
    def _bit_for_bits(cls, v: int | None, info: ValidationInfo) -> int | None:
        datatype = info.data.get("datatype")
        if v is not None and datatype is not None and datatype != "bit":
            raise _problem(f"bit is only for datatype = 'bit', this point is {datatype!r}")
        return v

    @model_validator(mode="after")
    def _check_required(self) -> ModbusPointSettings:
        if self.datatype == "string" and self.length is None:
            raise _problem(
                "datatype = 'string' needs length (the number of registers, 2 characters each)",
                "length",
            )
        if self.datatype == "bit" and self.bit is None:
            raise _problem(
                "datatype = 'bit' needs bit (0 = least significant bit of the register, 15 = "
                "most significant)",
                "bit",
            )
        if self.invalid:
            from drivers.modbus.datatypes import markers

            for i, m in enumerate(self.invalid):
                try:
                    markers(self.datatype, [m])
                except ValueError as exc:
                    raise _problem(str(exc), f"invalid[{i}]") from None
        if self.datatype in ("bool", "bit", "string") and (self.scale != 1 or self.offset != 0):
            raise _problem(
                f"scale and offset do not apply to datatype = {self.datatype!r}",
                "scale" if self.scale != 1 else "offset",
            )
        return self

    @property
    def size(self) -> int:
        """Registers (or bits, in a bit table) the value takes."""
        return register_count(self.datatype, self.length)

    @property
    def shown_address(self) -> str:
        """The address as the source wrote it, e.g. ``30001 (PDU 0)`` or ``12``."""
        return written_address(self.table, self.address, self.address_base, self._written)

    @property
    def six_digits(self) -> bool:
        """Whether the source wrote a 6-digit Modicon number (300001)."""
        return self._written is not None and self._written >= 100000
