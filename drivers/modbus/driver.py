"""The ``modbus`` driver: polls Modbus devices (TCP, RTU, RTU over TCP) and writes
their writable points.

Per device and poll group, the points are planned into as few read requests as the
device's limits allow (planner.py); each poll runs the group's requests, decodes every
point with a decoder chosen once at startup, and pushes one columnar batch stamped with
the time each response arrived. String points are not readings: their latest value is
kept in `device_info()`. A value the device marks "not available" (a raw value the point
declares in `invalid`, or a NaN float) is a NaN reading with quality UNAVAILABLE.

Failures stay small:
- An exception response (illegal address, say) to a merged read is isolated by
  splitting the read in halves until the failing points are found; the working reads
  replace it in the group's plan, so the next poll does not search again. A point whose
  own read still fails reads BAD (NaN) and is retried every 2, 4, 8 ... polls (up to
  ~10 minutes) instead of every poll. A point marked `optional` (some models of the
  device lack it) that the device refuses as an illegal data address (exception 2) is
  dropped instead: logged once, listed in `device_status()["dropped_points"]`, and its
  row leaves the batches (tried again after a restart).
- A timeout or link error is retried (`retries`, short backoff, the bus released in
  between); then the poll fails, the device's health records it, and the device backs
  off (polls skipped and counted, up to 60 s). Every (device, poll group) has its own
  task, so a dead device never delays another. A garbled answer (RTU: truncated, bad
  CRC, junk) is a timeout that is also counted by kind in the health's `rejected`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from array import array
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel

from common.logs import Throttle
from drivers.base import (
    BatchSink,
    DeviceConfigProblem,
    DeviceHealth,
    DeviceSpec,
    PerDeviceDriver,
    PointSpec,
)
from drivers.modbus.client import (
    ConnectionPool,
    ModbusConnection,
    ModbusError,
    ModbusExceptionResponse,
    ModbusGarbledAnswer,
)
from drivers.modbus.planner import TABLE_ORDER, Request, Span, plan, split
from drivers.modbus.settings import (
    BIT_TABLES,
    WRITABLE_TABLES,
    ModbusDeviceSettings,
    ModbusPointSettings,
)
from drivers.schedule import FixedRate, phase_for
from native.batch import (
    BAD,
    GOOD,
    ID_TYPECODE,
    QUALITY_TYPECODE,
    TS_TYPECODE,
    UNAVAILABLE,
    VALUE_TYPECODE,
    Batch,
)

log = logging.getLogger("citygw.drivers.modbus")

__all__ = ["ModbusDriver", "ModbusWriteError", "device_groups", "device_plans"]

#: exception codes that say "this part of the register map does not work" (illegal
#: function / address / value: some devices answer 3 to reads that are too long); the
#: others (busy, device failure, gateway path) are the device's state, retried as a
#: timeout is
MAP_EXCEPTIONS = frozenset({1, 2, 3})
#: the exception that drops an optional point (the device has no such register)
ILLEGAL_DATA_ADDRESS = 2
#: first pause before retrying a request that timed out (doubles each retry)
RETRY_BACKOFF_S = 0.05
#: longest pause of a dead device between polls
MAX_DEVICE_BACKOFF_S = 60.0
#: a stop (or a reload removing the device) lets a poll under way finish this long: the
#: answers a device is giving are readings; past it the poll is abandoned
STOP_GRACE_S = 1.0
#: longest pause between retries of a point whose read fails
MAX_POINT_BACKOFF_S = 600.0
#: one warning per failing read (or dead device) per this many seconds
WARN_EVERY_S = 60.0

_NAN = math.nan


class ModbusWriteError(Exception):
    """A write was refused, failed, or did not read back as written."""

    def __init__(self, device: str, point: str, value: float, reason: str) -> None:
        super().__init__(f"cannot write {value!r} to {device}/{point}: {reason}")
        self.device = device
        self.point = point
        self.value = value
        self.reason = reason


# -- planning -------------------------------------------------------------------------


def _msettings(device: DeviceSpec) -> ModbusDeviceSettings:
    s = device.settings
    if not isinstance(s, ModbusDeviceSettings):
        raise TypeError(f"device {device.name!r}: settings are not ModbusDeviceSettings")
    return s


def _psettings(point: PointSpec) -> ModbusPointSettings:
    s = point.settings
    if not isinstance(s, ModbusPointSettings):
        raise TypeError(f"point {point.key!r}: settings are not ModbusPointSettings")
    return s


def device_groups(device: DeviceSpec) -> list[tuple[str, float, list[PointSpec]]]:
    """(group, period, points) of a device, "" (the device's poll) first; empty groups
    are left out. A point naming an unknown group (check_device reports it) is polled
    with the device's poll."""
    s = _msettings(device)
    periods: dict[str, float] = {"": device.poll_s, **s.poll_groups}
    members: dict[str, list[PointSpec]] = {g: [] for g in periods}
    for p in device.points:
        g = _psettings(p).group
        if g not in members:
            log.warning(
                "point names a poll group the device does not define; polled with the device",
                extra={"device": device.name, "point": p.name, "group": g, "poll_s": device.poll_s},
            )
            g = ""
        members[g].append(p)
    return [(g, periods[g], pts) for g, pts in members.items() if pts]


def _plan(settings: ModbusDeviceSettings, points: Sequence[PointSpec]) -> list[Request]:
    spans = []
    for i, p in enumerate(points):
        ps = _psettings(p)
        spans.append(Span(i, ps.table, ps.address, ps.size))
    return plan(spans, tables={t: settings.request_limits(t) for t in TABLE_ORDER})


def device_plans(devices: Sequence[DeviceSpec]) -> dict[str, list[tuple[str, list[Request]]]]:
    """The read requests each device's polls start with: device -> [(group, requests)].
    A span's key is the point's index in that group's points, in config order."""
    return {
        d.name: [(g, _plan(_msettings(d), pts)) for g, _period, pts in device_groups(d)]
        for d in devices
    }


# -- per device and group state -------------------------------------------------------


@dataclass(slots=True)
class _Planned:
    """A request of a group's working plan, with its failure record."""

    request: Request
    failures: int = 0
    retry_at: int = 0  # the group's poll number from which it is tried again


def _bits_reader(chunk: Sequence[int]) -> float:
    return 1.0 if chunk[0] else 0.0


def _value_reader(p: ModbusPointSettings) -> Callable[[Sequence[int]], float | str]:
    """Registers (or bits) of one point -> its engineering value (float) or text; NaN
    when the device said "not available" (a declared marker, or a NaN float)."""
    if p.table in BIT_TABLES:
        return _bits_reader
    from drivers.modbus.datatypes import INTEGER_TYPES, decoder, markers
    from drivers.scale import engineering

    decode = decoder(p.datatype, p.order, p.bit)
    if p.datatype == "string":
        return decode
    if p.datatype in ("bool", "bit"):
        return lambda chunk: 1.0 if decode(chunk) else 0.0
    convert = engineering(p.scale, p.offset, p.datatype in INTEGER_TYPES)
    absent = markers(p.datatype, p.invalid)
    if absent:  # only points that declare markers pay for the lookup

        def read_or_absent(chunk: Sequence[int]) -> float:
            raw = cast(float, decode(chunk))
            return _NAN if raw in absent else convert(raw)

        return read_or_absent
    # a NaN float stays NaN through scale and offset: _decode makes it UNAVAILABLE
    return lambda chunk: convert(cast(float, decode(chunk)))


class _Group:
    __slots__ = (
        "dropped",
        "ids",
        "last_ms",
        "max_skip",
        "name",
        "period",
        "plan",
        "points",
        "polls",
        "readers",
        "rows",
    )

    def __init__(
        self,
        name: str,
        period: float,
        settings: ModbusDeviceSettings,
        points: list[PointSpec],
    ) -> None:
        self.name = name
        self.period = period
        self.points = points
        self.readers = [_value_reader(_psettings(p)) for p in points]
        #: keys of optional points dropped after the device refused them
        self.dropped: set[int] = set()
        self.rows: list[int] = []
        self.ids = array(ID_TYPECODE)
        self.number_rows()
        self.plan = [_Planned(r) for r in _plan(settings, points)]
        self.polls = 0
        self.last_ms = 0  # the latest reading time this group produced
        #: a failing point is retried at least every this many polls
        self.max_skip = max(1, int(MAX_POINT_BACKOFF_S / period))

    def number_rows(self) -> None:
        """The row of each point in the batch: -1 for a string point (kept in
        device_info) and for a dropped one."""
        self.rows = []
        ids: list[int] = []
        for i, p in enumerate(self.points):
            if _psettings(p).datatype == "string" or i in self.dropped:
                self.rows.append(-1)
            else:
                self.rows.append(len(ids))
                ids.append(p.id)
        self.ids = array(ID_TYPECODE, ids)


def _distinct_times(g: _Group, timestamps: array[int]) -> None:
    """A slow answer followed at once by the next poll (both answered in one millisecond on
    a busy shared link) would give a point two readings at one time: the later one gets the
    next millisecond, so a point's readings are always told apart. A clock step back of a
    second or more is left as it is, and the polls after it are told apart from its
    readings, not from the readings before the step."""
    floor = g.last_ms + 1
    for i, ts in enumerate(timestamps):
        if ts < floor and floor - ts < 1000:
            timestamps[i] = floor
    if len(timestamps):
        g.last_ms = max(timestamps)


class _Device:
    __slots__ = (
        "backoff_skips",
        "backoff_until",
        "conn",
        "groups",
        "health",
        "info",
        "name",
        "settings",
        "spec",
        "unit",
    )

    def __init__(self, spec: DeviceSpec, conn: ModbusConnection, health: DeviceHealth) -> None:
        self.spec = spec
        self.name = spec.name
        self.settings = _msettings(spec)
        self.unit = self.settings.unit_id
        self.conn = conn
        self.health = health
        self.groups = [
            _Group(g, period, self.settings, pts) for g, period, pts in device_groups(spec)
        ]
        self.info: dict[str, str] = {}
        self.backoff_until = 0.0  # loop time before which polls are skipped
        self.backoff_skips = 0


class _PollFailed(Exception):
    def __init__(self, error: ModbusError, partial: Batch) -> None:
        super().__init__(str(error))
        self.error = error
        self.partial = partial


# -- the driver -----------------------------------------------------------------------


class ModbusDriver(PerDeviceDriver):
    name = "modbus"
    device_model = ModbusDeviceSettings
    point_model = ModbusPointSettings

    @classmethod
    def expand_device(cls, table: dict[str, Any], base_dir: Path) -> dict[str, Any]:
        from drivers.modbus.profiles import expand_device

        return expand_device(table, base_dir)

    @classmethod
    def check_device(
        cls,
        device: BaseModel,
        points: Sequence[BaseModel],
        tables: Sequence[Mapping[str, Any]],
    ) -> list[DeviceConfigProblem]:
        from drivers.modbus.checks import check_device

        assert isinstance(device, ModbusDeviceSettings)
        settings = [p for p in points if isinstance(p, ModbusPointSettings)]
        return check_device(device, settings, tables)

    def __init__(self, devices: Sequence[DeviceSpec]) -> None:
        self._pool = ConnectionPool()
        self._devices: dict[str, _Device] = {}
        self._owner: dict[str, _Device] = {}  # point key -> its device (writes)
        self._throttle = Throttle(WARN_EVERY_S)
        super().__init__(devices)

    def attach_device(self, device: DeviceSpec) -> None:
        # RTU units on one serial bus (or behind one gateway) share its connection
        dev = _Device(device, self._pool.get(_msettings(device)), self._health[device.name])
        self._devices[device.name] = dev
        self._owner.update((p.key, dev) for p in device.points)

    def detach_device(self, name: str) -> None:
        dev = self._devices.pop(name)
        for p in dev.spec.points:
            self._owner.pop(p.key, None)
        self._pool.release(dev.settings)

    def close(self) -> None:
        """Closes every connection (run() does it when cancelled; for one-off use)."""
        self._pool.close()

    # -- what the CLI and status show ---------------------------------------------------

    def device_info(self, name: str) -> dict[str, str]:
        """Latest values of the device's string points (serial number, firmware...)."""
        return dict(self._devices[name].info)

    def working_plans(self, name: str) -> list[tuple[str, list[Request]]]:
        """The requests each poll group of the device runs now (after isolation)."""
        return [(g.name, [p.request for p in g.plan]) for g in self._devices[name].groups]

    def device_status(self, name: str) -> dict[str, object]:
        dev = self._devices[name]
        bad = [
            g.points[s.key].name
            for g in dev.groups
            for pr in g.plan
            if pr.failures
            for s in pr.request.spans
        ]
        return {
            "link": dev.conn.label,
            "unit_id": dev.unit,
            "requests_per_poll": {g.name: len(g.plan) for g in dev.groups},
            "bad_points": bad,
            "dropped_points": self.dropped_points(name),
            "backoff_skips": dev.backoff_skips,
        }

    def dropped_points(self, name: str) -> list[str]:
        """Optional points the device refused, no longer read (until a restart)."""
        return [g.points[k].name for g in self._devices[name].groups for k in sorted(g.dropped)]

    def refused(self, name: str) -> list[tuple[str, Request, int]]:
        """(group, request, failures) of the requests the device refuses now: their
        points read BAD and are retried with backoff."""
        return [
            (g.name, pr.request, pr.failures)
            for g in self._devices[name].groups
            for pr in g.plan
            if pr.failures
        ]

    async def poll_once(self, name: str) -> list[str]:
        """One poll of each of the device's groups, now, as run() makes them (learning
        what the device refuses); the readings are discarded. The errors of groups whose
        poll failed (timeouts, link errors)."""
        dev = self._devices[name]
        errors = []
        for g in dev.groups:
            try:
                await self._poll(dev, g)
            except _PollFailed as failed:
                errors.append(f"group {g.name or 'poll'}: {failed.error}")
        return errors

    # -- polling ------------------------------------------------------------------------

    def device_tasks(
        self, device: DeviceSpec, sink: BatchSink
    ) -> dict[str, Coroutine[Any, Any, None]]:
        dev = self._devices[device.name]
        return {f"modbus:{dev.name}:{g.name}": self._poll_loop(dev, g, sink) for g in dev.groups}

    async def run(self, sink: BatchSink) -> None:
        try:
            await super().run(sink)
        finally:
            self._pool.close()

    async def _poll_loop(self, dev: _Device, g: _Group, sink: BatchSink) -> None:
        loop = asyncio.get_running_loop()
        schedule = FixedRate(g.period, phase_for(f"{dev.name}/{g.name}", g.period))
        health = dev.health
        me = asyncio.current_task()
        while True:
            if me is not None and me.cancelling():
                # On Python 3.11 asyncio.wait_for (pymodbus waits for each answer with it)
                # swallows a cancel that arrives as the answer does; honour it here.
                raise asyncio.CancelledError
            health.skipped_polls += await schedule.wait()
            started = loop.time()
            if started + 1e-3 < dev.backoff_until:
                health.skipped_polls += 1
                dev.backoff_skips += 1
                continue
            poll = asyncio.ensure_future(self._poll(dev, g))
            try:
                batch = await asyncio.shield(poll)
            except asyncio.CancelledError:
                await self._finish(dev, g, poll, sink)
                raise
            except _PollFailed as failed:
                health.failure(str(failed.error))
                # from the end of the failed poll: nothing skipped after the first
                # failure, then 1, 3, 7 ... periods, at most MAX_DEVICE_BACKOFF_S
                k = min(health.consecutive_failures, 30)
                pause = min(g.period * (2 ** (k - 1) - 1), MAX_DEVICE_BACKOFF_S)
                dev.backoff_until = loop.time() + pause
                n = self._throttle.ready(f"{dev.name}:down")
                if n is not None:
                    log.warning(
                        "modbus poll failed",
                        extra={
                            "device": dev.name,
                            "error": str(failed.error),
                            "in_a_row": health.consecutive_failures,
                            "next_try_s": round(pause, 3),
                            "failures_since_last_line": n,
                        },
                    )
                _distinct_times(g, failed.partial.timestamps)
                if len(failed.partial) and not sink.push(failed.partial):
                    health.skipped_polls += 1
                continue
            except Exception as exc:  # a bug must not end the device's polling
                log.exception("modbus %s: poll of group %r crashed", dev.name, g.name)
                health.failure(f"internal error: {exc!r}")
                continue
            dev.backoff_until = 0.0
            _distinct_times(g, batch.timestamps)
            if not len(batch):
                health.success(0)
            elif sink.push(batch):
                health.success(len(batch))
            else:
                health.skipped_polls += 1

    @staticmethod
    async def _finish(
        dev: _Device, g: _Group, poll: asyncio.Future[Batch], sink: BatchSink
    ) -> None:
        """The poll under way when its task was cancelled: up to STOP_GRACE_S for it to
        end, and what it read goes to the sink."""
        try:
            batch = await asyncio.wait_for(poll, STOP_GRACE_S)
        except _PollFailed as failed:
            batch = failed.partial
        except TimeoutError:
            return
        except Exception:
            log.exception("modbus %s: poll of group %r crashed at a stop", dev.name, g.name)
            return
        _distinct_times(g, batch.timestamps)
        if len(batch):
            sink.push(batch)

    async def _poll(self, dev: _Device, g: _Group) -> Batch:
        """One poll of a group: the batch of its numeric points (BAD rows for points whose
        read failed or waits for its retry). Raises _PollFailed on timeouts/link errors."""
        g.polls += 1
        n = len(g.ids)
        values = array(VALUE_TYPECODE, [_NAN]) * n
        quality = array(QUALITY_TYPECODE, [BAD]) * n
        timestamps = array(TS_TYPECODE, [time.time_ns() // 1_000_000]) * n
        cols = (values, timestamps, quality)
        old = g.plan
        working: list[_Planned] = []
        for i, pr in enumerate(old):
            if pr.retry_at > g.polls:
                working.append(pr)
                continue
            try:
                working.extend(await self._execute(dev, g, pr, cols))
            except ModbusError as exc:
                g.plan = working + old[i:]
                read = [j for j in range(n) if quality[j] != BAD]  # decoded this poll
                partial = Batch(
                    array(ID_TYPECODE, [g.ids[j] for j in read]),
                    array(TS_TYPECODE, [timestamps[j] for j in read]),
                    array(VALUE_TYPECODE, [values[j] for j in read]),
                    array(QUALITY_TYPECODE, [quality[j] for j in read]),
                )
                self._renumber(g)
                raise _PollFailed(exc, partial) from exc
        g.plan = working
        ids = g.ids
        kept = self._renumber(g)
        if kept is not None:  # this poll dropped points: their rows leave the batch
            return Batch(
                array(ID_TYPECODE, [ids[j] for j in kept]),
                array(TS_TYPECODE, [timestamps[j] for j in kept]),
                array(VALUE_TYPECODE, [values[j] for j in kept]),
                array(QUALITY_TYPECODE, [quality[j] for j in kept]),
            )
        return Batch(array(ID_TYPECODE, ids), timestamps, values, quality)

    @staticmethod
    def _renumber(g: _Group) -> list[int] | None:
        """After points were dropped: the batch rows numbered anew; the old rows that
        remain (None if nothing was dropped since the last time)."""
        old_rows = g.rows
        if not any(r >= 0 and i in g.dropped for i, r in enumerate(old_rows)):
            return None
        g.number_rows()
        return [r for i, r in enumerate(old_rows) if r >= 0 and g.rows[i] >= 0]

    async def _read(self, dev: _Device, req: Request) -> tuple[list[int] | list[bool], int]:
        """The values of one request and the time (ms) they arrived, retrying timeouts,
        link errors and busy answers; map errors (MAP_EXCEPTIONS) are raised at once."""
        attempts = dev.settings.retries + 1
        pause = RETRY_BACKOFF_S
        for attempt in range(attempts):
            try:
                data = await dev.conn.read(req.table, req.address, req.count, dev.unit)
                return data, time.time_ns() // 1_000_000
            except ModbusExceptionResponse as exc:
                if exc.exception_code in MAP_EXCEPTIONS or attempt + 1 == attempts:
                    raise
            except ModbusError as exc:
                if isinstance(exc, ModbusGarbledAnswer):
                    dev.health.reject(exc.kind)  # every garbled answer, retried or not
                if attempt + 1 == attempts:
                    raise
            await asyncio.sleep(pause)  # the bus is free meanwhile
            pause *= 2
        raise AssertionError("unreachable")

    async def _execute(
        self,
        dev: _Device,
        g: _Group,
        pr: _Planned,
        cols: tuple[array[float], array[int], array[int]],
    ) -> list[_Planned]:
        """Runs one planned request and decodes it into the columns; returns what replaces
        it in the plan (itself, or the parts an exception response was isolated into)."""
        req = pr.request
        try:
            data, ts = await self._read(dev, req)
        except ModbusExceptionResponse as exc:
            if exc.exception_code not in MAP_EXCEPTIONS:
                raise
            health = dev.health
            health.errors += 1
            health.last_error = str(exc)
            health.last_error_ms = time.time_ns() // 1_000_000
            parts = split(req)
            if len(parts) > 1:
                log.info(
                    "modbus exception response to a merged read; splitting it to find the "
                    "failing points",
                    extra={
                        "device": dev.name,
                        "table": req.table,
                        "address": req.address,
                        "count": req.count,
                        "function_code": exc.function_code,
                        "exception_code": exc.exception_code,
                    },
                )
                out: list[_Planned] = []
                for part in parts:
                    out.extend(await self._execute(dev, g, _Planned(part), cols))
                return out
            if exc.exception_code == ILLEGAL_DATA_ADDRESS:
                rest = self._drop_optional(dev, g, pr, exc)
                if rest is None:
                    return []
                pr = rest
                req = pr.request
            pr.failures += 1
            skip = min(2 ** min(pr.failures, 30), g.max_skip)
            pr.retry_at = g.polls + skip
            n = self._throttle.ready(f"{dev.name}:{req.table}:{req.address}:{req.count}")
            if n is not None:
                log.warning(
                    "modbus points read BAD: the device refuses their registers",
                    extra={
                        "device": dev.name,
                        "points": [g.points[s.key].name for s in req.spans],
                        "table": req.table,
                        "address": req.address,
                        "count": req.count,
                        "function_code": exc.function_code,
                        "exception_code": exc.exception_code,
                        "error": str(exc),
                        "next_try_in_polls": skip,
                        "failures_since_last_line": n,
                    },
                )
            return [pr]
        if pr.failures:
            log.info(
                "modbus registers read again",
                extra={
                    "device": dev.name,
                    "table": req.table,
                    "address": req.address,
                    "count": req.count,
                    "after_failures": pr.failures,
                },
            )
            pr.failures = 0
            pr.retry_at = 0
        self._decode(dev, g, req, data, ts, cols)
        return [pr]

    def _drop_optional(
        self, dev: _Device, g: _Group, pr: _Planned, exc: ModbusExceptionResponse
    ) -> _Planned | None:
        """Drops the optional points of a request the device refused as an illegal
        address, and it cannot be narrowed further: reported once, counted in the
        device's status. What remains of the request (its other points), or None."""
        req = pr.request
        optional = [s for s in req.spans if _psettings(g.points[s.key]).optional]
        if not optional:
            return pr
        g.dropped.update(s.key for s in optional)
        names = sorted({g.points[s.key].name for s in optional})
        # the exception itself is already counted in errors; say what became of it
        dev.health.last_error = (
            f"optional point(s) {', '.join(names)} dropped: the device refuses "
            f"{req.table} {req.address}..{req.end - 1} ({exc})"
        )
        log.warning(
            "modbus optional points dropped: the device refuses their registers (this "
            "model lacks them); not read again until the agent restarts",
            extra={
                "device": dev.name,
                "points": names,
                "table": req.table,
                "address": req.address,
                "count": req.count,
                "exception_code": exc.exception_code,
            },
        )
        for name in names:
            dev.info.pop(name, None)
        rest = tuple(s for s in req.spans if s.key not in g.dropped)
        if not rest:
            return None
        # a request that cannot be narrowed: its other spans cover the same registers
        return _Planned(Request(req.table, req.address, req.count, rest), pr.failures)

    def _decode(
        self,
        dev: _Device,
        g: _Group,
        req: Request,
        data: Sequence[int],
        ts: int,
        cols: tuple[array[float], array[int], array[int]],
    ) -> None:
        values, timestamps, quality = cols
        base = req.address
        rows, readers = g.rows, g.readers
        for span in req.spans:
            i = span.key
            lo = span.address - base
            try:
                v = readers[i](data[lo : lo + span.count])
            except (ValueError, TypeError, UnicodeDecodeError, OverflowError) as exc:
                if self._throttle.ready(f"{dev.name}:decode:{i}") is not None:
                    log.warning(
                        "modbus value cannot be decoded",
                        extra={
                            "device": dev.name,
                            "point": g.points[i].name,
                            "registers": list(data[lo : lo + span.count]),
                            "error": str(exc),
                        },
                    )
                continue
            row = rows[i]
            if row < 0:
                dev.info[g.points[i].name] = str(v)
                continue
            assert not isinstance(v, str)
            values[row] = v
            timestamps[row] = ts
            # only the device's "no value" is NaN here (a marker, a NaN float)
            quality[row] = GOOD if v == v else UNAVAILABLE

    # -- writes ---------------------------------------------------------------------------

    async def write(self, point: PointSpec, value: float) -> float:
        """Writes a coil or holding register point, reads it back and returns the value
        it now holds (engineering units: `value` itself, but for the nearest float32 of a
        float32 point). Raises ModbusWriteError for every refusal (a value the register
        cannot hold exactly: see datatypes.from_engineering), failure or read-back
        mismatch."""
        dev = self._owner.get(point.key)
        device = point.key.rsplit("/", 1)[0] if dev is None else dev.name

        def refuse(reason: str) -> ModbusWriteError:
            return ModbusWriteError(device, point.name, value, reason)

        if dev is None:
            raise refuse("no such Modbus point")
        p = _psettings(point)
        if not point.writable:
            raise refuse("the point is not writable (set writable = true in its config)")
        if p.table not in WRITABLE_TABLES:
            raise refuse(f"a {p.table} is read-only (only coils and holding registers)")
        if p.datatype in ("string", "bit"):
            raise refuse(f"writing datatype {p.datatype!r} is not supported")
        if not math.isfinite(value):
            raise refuse("the value is not a finite number")
        if point.min is not None and value < point.min:
            raise refuse(f"below the point's declared minimum {point.min:g}")
        if point.max is not None and value > point.max:
            raise refuse(f"above the point's declared maximum {point.max:g}")
        words: list[int] | list[bool]
        if p.table == "coil" or p.datatype == "bool":
            if value not in (0.0, 1.0):
                raise refuse("a bit takes 0 or 1")
            words = [value == 1.0] if p.table == "coil" else [int(value)]
        else:
            from drivers.modbus.datatypes import encode, from_engineering, marker_text, markers

            try:
                raw = from_engineering(value, p.scale, p.offset, p.datatype)
                words = encode(raw, p.datatype, p.order)
            except (ValueError, OverflowError) as exc:
                raise refuse(str(exc)) from exc
            if raw in markers(p.datatype, p.invalid):
                raise refuse(
                    f'raw value {marker_text(raw, p.datatype)} is the point\'s "not available" '
                    "marker (invalid): it would read back as no value"
                )
        try:
            await dev.conn.write(p.table, p.address, words, dev.unit)
            back = await dev.conn.read(p.table, p.address, len(words), dev.unit)
        except ModbusError as exc:
            raise refuse(str(exc)) from exc
        if list(back) != list(words):
            raise refuse(
                f"read back {list(back)} from {p.table} {p.address}, wrote {list(words)}: "
                "the device did not take the value"
            )
        # what the register holds now, decoded as a poll would
        written = _value_reader(p)([int(w) for w in back])
        assert isinstance(written, float)
        log.info(
            "modbus write verified",
            extra={
                "device": dev.name,
                "point": point.name,
                "value": value,
                "written": written,
                "table": p.table,
                "address": p.address,
                "registers": list(words),
            },
        )
        return written
