"""Checks across a Modbus device's points, after each table validated on its own:
overlapping registers, values too large for one request, odd addresses on devices that
refuse them, unknown poll groups, writes to read-only tables.

Each problem is a DeviceConfigProblem at the key of the point it is about (the later
point of an overlapping pair), worded for the technician at the cabinet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from drivers.base import DeviceConfigProblem
from drivers.modbus.settings import (
    BIT_TABLES,
    WRITABLE_TABLES,
    ModbusDeviceSettings,
    ModbusPointSettings,
)

__all__ = ["check_device"]

_WIDE = frozenset({"int32", "uint32", "float32", "int64", "uint64", "float64"})
_BITWISE = frozenset({"bool", "bit"})


def _label(j: int, tables: Sequence[Mapping[str, Any]] | None) -> str:
    """``points[3] 'l1_voltage'`` (the name when the caller passed the point tables)."""
    name = None
    if tables is not None and j < len(tables):
        raw = tables[j].get("name")
        name = raw if isinstance(raw, str) else None
    return f"points[{j}] {name!r}" if name else f"points[{j}]"


def _span(p: ModbusPointSettings) -> str:
    last = p.address + p.size - 1
    where = f"{p.table} {p.shown_address}"
    if last == p.address:
        return where
    return f"{where}-{last}" if p.address_base == 0 else f"{where}, {p.size} registers"


def _conflict(a: ModbusPointSettings, b: ModbusPointSettings) -> bool:
    """Whether two points of the same table that share an address read it twice."""
    if a.table in BIT_TABLES:
        return True
    if a.size > 1 or b.size > 1:
        return True
    # one register: a word and its bits, or different bits, are fine
    if a.datatype == "bit" and b.datatype == "bit":
        return a.bit == b.bit
    if a.datatype in _BITWISE or b.datatype in _BITWISE:
        return a.datatype == b.datatype
    return True


def check_device(
    device: ModbusDeviceSettings,
    points: Sequence[ModbusPointSettings],
    tables: Sequence[Mapping[str, Any]] | None = None,
) -> list[DeviceConfigProblem]:
    """Problems across the validated points of one device, in point order.

    ``tables`` are the device's point tables as written (after profile expansion), in
    the same order: when given, messages name the points and ``writable = true`` on a
    read-only table is reported (the generic keys are not in ``points``)."""
    problems: list[DeviceConfigProblem] = []

    def add(j: int, key: str, message: str) -> None:
        problems.append(DeviceConfigProblem(("points", j, key), message))

    for j, p in enumerate(points):
        label = _label(j, tables)
        if p.group and p.group not in device.poll_groups:
            groups = ", ".join(device.poll_groups) or "none"
            add(
                j,
                "group",
                f"unknown poll group {p.group!r}; this device's poll groups: {groups} "
                "(declare it in the device's poll_groups, e.g. "
                f'poll_groups = {{ {p.group} = "60s" }}, or leave group out to use poll)',
            )
        if p.address + p.size - 1 > 65535:
            add(
                j,
                "address",
                f"{label} ({p.datatype}, {p.size} registers) would end past address 65535",
            )
        if device.even_address_only and p.datatype in _WIDE and p.address % 2:
            add(
                j,
                "address",
                f"{label} is a {p.datatype} on odd address {p.shown_address}, but this device has "
                "even_address_only = true (it rejects 32/64-bit values on odd addresses); "
                "check the register map",
            )
        limit = device.request_limits(p.table)[0]
        what = "max_bits" if p.table in BIT_TABLES else "max_registers"
        if p.table in device.table_limits and getattr(device.table_limits[p.table], what):
            what = f"table_limits.{p.table}.{what}"
        if p.size > limit:
            add(
                j,
                "length" if p.datatype == "string" else "datatype",
                f"{label} takes {p.size} registers, more than one request may read "
                f"({what} = {limit})",
            )
        writable = tables is not None and j < len(tables) and tables[j].get("writable") is True
        if writable and p.table not in WRITABLE_TABLES:
            add(
                j,
                "writable",
                f"{p.table} points cannot be written; only coil and holding_register "
                "points may be writable",
            )

    # overlaps: sweep each table in address order
    by_table: dict[str, list[int]] = {}
    for j, p in enumerate(points):
        by_table.setdefault(p.table, []).append(j)
    found: list[tuple[int, int]] = []
    for indices in by_table.values():
        ordered = sorted(indices, key=lambda j: (points[j].address, j))
        for n, i in enumerate(ordered):
            a = points[i]
            end = a.address + a.size  # exclusive
            for k in ordered[n + 1 :]:
                b = points[k]
                if b.address >= end:
                    break
                if _conflict(a, b):
                    found.append((min(i, k), max(i, k)))
    for i, k in sorted(set(found), key=lambda pair: (pair[1], pair[0])):
        first, later = points[i], points[k]
        string = next((x for x in (first, later) if x.datatype == "string"), None)
        if first.size == 1 and later.size == 1 and first.address == later.address:
            what = (
                "reads the same register as"
                if first.table not in BIT_TABLES
                else "is the same bit as"
            )
            message = f"{_label(k, tables)} ({_span(later)}) {what} {_label(i, tables)}"
        else:
            message = (
                f"{_label(k, tables)} ({_span(later)}, {later.datatype}) overlaps "
                f"{_label(i, tables)} ({_span(first)}, {first.datatype})"
            )
        if string is not None:
            message += f"; is the string's length ({string.length} registers) right?"
        add(k, "address", message)
    return problems
