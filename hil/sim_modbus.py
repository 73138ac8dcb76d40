"""A simulated street cabinet on Modbus, and a front that answers RTU-over-TCP requests
with garbage.

`CabinetSimulator` is the demo's pump station (`cli.demo.MODBUS_UNITS`: unit 1 an
Eastron SDM120 energy meter, unit 2 an ADAM-4017+ level transmitter, register images
from their shipped profiles whose values move with time) on a `ModbusSimulator`, so
`silent`, `delay` and `requests` work as there. It also records every read it answered
(`served`: wall time, unit, table, address, the registers or bits sent).

`GarbageRtuFront` listens for RTU over TCP and relays each request to an RTU-over-TCP
server (a CabinetSimulator with ``transport="rtu-over-tcp"``); with `probability` it
answers a request with garbage instead, one of `kinds`:

- ``"random"``: 1-32 random bytes, none of whose slices is a frame with a valid CRC and
  whose first byte is not the request's unit id, so never the start of an answer (the
  request is not relayed);
- ``"truncated"``: the real answer cut short, at least its first byte kept (the master
  waits, then times out; the rest is never sent, so the next answer is in step);
- ``"bad_crc"``: the real answer with both CRC bytes XORed with 0xA5.

pymodbus's server cannot send malformed frames, hence the front; `GarbageRtuServer` is
the two together (a cabinet on a free port behind a front). Every injection is recorded
(`injected`) and counted by kind (`counts`, with "valid" for relayed answers, which
`relayed` counts by the request they answered). In garbage mode `served` is a superset
of what the master got: it includes the answers the front then truncated or spoiled.
(pymodbus 3.16's master discards all three kinds
without a word; citygw's Modbus client reports each as a ModbusGarbledAnswer of kind
"junk", "truncated" or "bad_crc", see drivers/modbus/garbled.py.)

    async with GarbageRtuServer(probability=0.2, seed=1) as garbage:   # both in one
        ... point the agent at 127.0.0.1:garbage.port, transport = "rtu-over-tcp" ...
        garbage.counts, garbage.injected, garbage.cabinet.served

`UnderpassSimulator` is an underpass sump on a CabinetSimulator of its own (the HIL
scenario `local-action`): a level transmitter whose level follows simple physics,
``level += (inflow - pump * outflow) * dt`` every tick (at most 50 ms), and the pump's
coil, which the gateway's local rule writes. A `flood` pours in for a while; a `flap`
holds the level above and below the rule's thresholds in turn (waves over the kerb).
Beside `served` it records every coil write it received and acknowledged (`pump_writes`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from cli.demo import MODBUS_UNITS, modbus_image
from drivers.modbus.garbled import crc16
from drivers.modbus.simulator import ModbusSimulator, RegisterImage

__all__ = [
    "CABINET_UNITS",
    "CabinetSimulator",
    "CoilWrite",
    "GarbageKind",
    "GarbageRtuFront",
    "GarbageRtuServer",
    "Injection",
    "ServedRead",
    "UnderpassSimulator",
]

#: unit id -> profile name: the energy meter and the level transmitter
CABINET_UNITS: dict[int, str] = dict(MODBUS_UNITS)

_READ_TABLES = {1: "coil", 2: "discrete_input", 3: "holding_register", 4: "input_register"}


@dataclass(frozen=True, slots=True)
class ServedRead:
    """One read the simulator answered."""

    time: float  # wall clock when the values were taken from the image
    unit: int
    table: str
    address: int
    registers: tuple[int, ...]  # 16-bit registers, or bits as 0/1


class CabinetSimulator(ModbusSimulator):
    """The street cabinet (see the module doc). `units`: unit id -> profile name
    (default CABINET_UNITS); `tick_s`: how often the values move; `max_served` bounds the
    record (the oldest half is dropped when it is reached, counted in `served_dropped`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        transport: str = "tcp",
        tick_s: float | None = 1.0,
        units: Mapping[int, str] | None = None,
        max_served: int = 1_000_000,
    ) -> None:
        self.profiles: dict[int, str] = dict(units if units is not None else CABINET_UNITS)
        images: dict[int, RegisterImage] = {u: modbus_image(p) for u, p in self.profiles.items()}
        super().__init__(images, host, port, transport=transport, tick_s=tick_s)
        self.served: list[ServedRead] = []
        self.served_dropped = 0
        self.max_served = max_served

    async def __aenter__(self) -> CabinetSimulator:
        await self.start()
        return self

    async def _serve(self, unit: int, func_code: int, address: int, count: int) -> RegisterImage:
        image = await super()._serve(unit, func_code, address, count)
        table = _READ_TABLES.get(func_code)
        if table is not None:
            # pymodbus reads the image right after this returns, with no await between,
            # so these are the values it sends
            values = image.read(table, address, count)
            if values is not None:
                if len(self.served) >= self.max_served:
                    drop = max(1, self.max_served // 2)
                    del self.served[:drop]
                    self.served_dropped += drop
                self.served.append(
                    ServedRead(time.time(), unit, table, address, tuple(int(v) for v in values))
                )
        return image


# -- the underpass sump -----------------------------------------------------------------

#: the sump's register map (unit `UnderpassSimulator.unit`): the level in mm in holding
#: register 0 (uint16: a point with scale = 0.001 reads metres), the pump's coil 0
LEVEL_REGISTER = 0
LEVEL_SCALE = 0.001
PUMP_COIL = 0
#: the level transmitter's span (m)
LEVEL_MAX = 5.0


@dataclass(frozen=True, slots=True)
class CoilWrite:
    """A write of the pump's coil, as the simulator received it."""

    received: float  # wall clock when the request arrived
    acked: float  # wall clock when the coil took the value (the answer goes out at once)
    value: int  # 0 or 1


class _SumpImage(RegisterImage):
    """A register image that tells its simulator of every coil write it takes."""

    def __init__(self, sim: UnderpassSimulator) -> None:
        super().__init__()
        self._sim = sim

    def write(self, table: str, address: int, values: Sequence[int] | Sequence[bool]) -> bool:
        ok = super().write(table, address, values)
        if ok and table == "coil" and address <= PUMP_COIL < address + len(values):
            self._sim._pump_written(int(bool(values[PUMP_COIL - address])))
        return ok


@dataclass(frozen=True, slots=True)
class _Flap:
    start: float  # monotonic
    high: float
    low: float
    up: float
    down: float
    count: int


class UnderpassSimulator(CabinetSimulator):
    """The underpass sump (see the module doc) as unit `unit` on its own port. `level`:
    the level at the start (m); `outflow`: what the running pump takes out (m/s);
    `tick_s`: how often the physics moves (at most 50 ms). The rig's time is the
    monotonic clock; the records have wall-clock times, as the agent stamps readings."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        level: float = 0.1,
        outflow: float = 1.5,
        tick_s: float = 0.02,
        unit: int = 1,
    ) -> None:
        if not 0 < tick_s <= 0.05:
            raise ValueError(f"tick_s must be within (0, 0.05] s, got {tick_s}")
        super().__init__(host, port, tick_s=None, units={})
        self.unit = unit
        self.image = _SumpImage(self)
        self.devices[unit] = self.image
        self.level = level
        self.outflow = outflow
        self.physics_tick = tick_s
        self.inflow = 0.0  # m/s while a flood lasts
        self._flood_until = 0.0  # monotonic
        self._flap: _Flap | None = None
        self._arrived = 0.0  # wall clock of the write request being served
        self._last: float | None = None  # monotonic of the last physics step
        self._physics: asyncio.Task[None] | None = None
        #: every write of the pump's coil, in the order received
        self.pump_writes: list[CoilWrite] = []
        #: (wall clock, level in m) of every change of the level register: when the
        #: physical condition became true, which a poll sees up to its period later
        self.levels: list[tuple[float, float]] = []
        #: physics steps taken and the longest gap between two (s): a starved loop shows
        self.ticks = 0
        self.max_tick_gap = 0.0
        self._set_level(level)

    # -- what the rig does ------------------------------------------------------------

    def flood(self, inflow: float, seconds: float) -> None:
        """`inflow` m/s pours in for `seconds` from now."""
        self.inflow = inflow
        self._flood_until = time.monotonic() + seconds

    def flap(self, high: float, low: float, up: float, down: float, count: int) -> None:
        """`count` times: the level at `high` for `up` s, then at `low` for `down` s,
        whatever the pump does; then the physics again, from `low`."""
        self._flap = _Flap(time.monotonic(), high, low, up, down, count)

    @property
    def pump(self) -> int:
        return self.image.tables["coil"].get(PUMP_COIL, 0)

    def level_reads(self) -> list[tuple[float, float]]:
        """(wall clock, level in m) of every read of the level register served, as a
        point with scale LEVEL_SCALE decodes it."""
        from drivers.modbus.datatypes import to_engineering

        out = []
        for r in self.served:
            offset = LEVEL_REGISTER - r.address
            ours = r.unit == self.unit and r.table == "holding_register"
            if ours and 0 <= offset < len(r.registers):
                out.append((r.time, to_engineering(r.registers[offset], LEVEL_SCALE, 0.0)))
        return out

    # -- serving ----------------------------------------------------------------------

    async def start(self) -> None:
        await super().start()
        self._last = time.monotonic()
        self._physics = asyncio.create_task(self._physics_loop(), name="underpass-physics")

    async def stop(self) -> None:
        task, self._physics = self._physics, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await super().stop()

    async def _serve(self, unit: int, func_code: int, address: int, count: int) -> RegisterImage:
        if func_code in (5, 15):
            self._arrived = time.time()
        return await super()._serve(unit, func_code, address, count)

    def _pump_written(self, value: int) -> None:
        self.pump_writes.append(CoilWrite(self._arrived or time.time(), time.time(), value))
        self._arrived = 0.0

    async def _physics_loop(self) -> None:
        while True:
            await asyncio.sleep(self.physics_tick)
            self.step()

    def step(self, now: float | None = None) -> None:
        """One physics step to monotonic time `now` (default: now)."""
        now = time.monotonic() if now is None else now
        last = self._last if self._last is not None else now
        dt = max(0.0, now - last)
        self._last = now
        self.ticks += 1
        self.max_tick_gap = max(self.max_tick_gap, dt)
        flap = self._flap
        if flap is not None:
            elapsed = now - flap.start
            period = flap.up + flap.down
            if elapsed < period * flap.count:
                self._set_level(flap.high if elapsed % period < flap.up else flap.low)
                return
            self._flap = None
            self.level = flap.low
        inflow = self.inflow if now < self._flood_until else 0.0
        self._set_level(self.level + (inflow - self.pump * self.outflow) * dt)

    def _set_level(self, level: float) -> None:
        self.level = min(max(level, 0.0), LEVEL_MAX)
        raw = round(self.level / LEVEL_SCALE)
        if not self.levels or round(self.levels[-1][1] / LEVEL_SCALE) != raw:
            self.levels.append((time.time(), raw * LEVEL_SCALE))
        self.image.set("holding_register", LEVEL_REGISTER, [raw])


# -- garbage on RTU over TCP ------------------------------------------------------------

GarbageKind = Literal["random", "truncated", "bad_crc"]
GARBAGE_KINDS: tuple[GarbageKind, ...] = get_args(GarbageKind)


@dataclass(frozen=True, slots=True)
class Injection:
    time: float  # wall clock
    kind: GarbageKind
    request: bytes  # the request frame it answered
    sent: bytes  # what the master got instead of a proper answer


class _Unframed(Exception):
    """A function code whose frame length this front does not know."""


# fixed frame lengths (with CRC) by function code; None: a byte count decides
_REQUEST_LEN: dict[int, int | None] = {
    1: 8, 2: 8, 3: 8, 4: 8, 5: 8, 6: 8, 7: 4, 8: 8, 11: 4, 12: 4, 15: None, 16: None,
    17: 4, 22: 10, 23: None,
}  # fmt: skip
_RESPONSE_LEN: dict[int, int | None] = {
    1: None, 2: None, 3: None, 4: None, 5: 8, 6: 8, 7: 5, 8: 8, 11: 8, 12: None,
    15: 8, 16: 8, 17: None, 22: 10, 23: None,
}  # fmt: skip


async def _read_frame(reader: asyncio.StreamReader, *, request: bool) -> bytes | None:
    """One RTU frame (unit, function, ..., CRC), or None at a clean end of stream."""
    head = await reader.read(1)
    if not head:
        return None
    frame = bytearray(head)
    frame += await reader.readexactly(1)
    fc = frame[1]
    if not request and fc & 0x80:  # exception answer: code + CRC
        frame += await reader.readexactly(3)
        return bytes(frame)
    table = _REQUEST_LEN if request else _RESPONSE_LEN
    if fc not in table:
        raise _Unframed(f"function code {fc}")
    fixed = table[fc]
    if fixed is not None:
        frame += await reader.readexactly(fixed - 2)
        return bytes(frame)
    # byte-counted: requests 15/16 have address + quantity (4 bytes) before the count,
    # 23 has read address/quantity + write address/quantity (8 bytes); answers none
    before = {15: 4, 16: 4, 23: 8}.get(fc, 0) if request else 0
    frame += await reader.readexactly(before + 1)
    frame += await reader.readexactly(frame[-1] + 2)
    return bytes(frame)


def _has_frame(data: bytes) -> bool:
    """True if some slice of `data` (4 bytes or more) ends with a valid CRC of the rest,
    i.e. a master hunting for a frame in it could find one."""
    for i in range(len(data)):
        crc = 0xFFFF
        for j in range(i, len(data) - 2):
            crc = crc16(data[j : j + 1], crc)
            if j - i >= 1 and data[j + 1] | (data[j + 2] << 8) == crc:
                return True
    return False


def _junk(rng: random.Random, unit: int = 0) -> bytes:
    """1-32 random bytes in which no valid RTU frame hides and that do not start with
    `unit` (the unit id of the request they answer), so that they are never the start of
    an answer: a master can tell them from a truncated answer."""
    for _ in range(100):
        junk = rng.randbytes(rng.randint(1, 32))
        if junk[0] != unit and not _has_frame(junk):
            return junk
    return b"\xff" if unit != 0xFF else b"\xfe"


class GarbageRtuFront:
    """See the module doc. `probability` and `kinds` may be changed while it runs."""

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        host: str = "127.0.0.1",
        port: int = 0,
        probability: float = 0.1,
        kinds: Sequence[GarbageKind] = GARBAGE_KINDS,
        seed: int | float = 0,
        max_injected: int = 100_000,
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be within 0..1, got {probability}")
        unknown = set(kinds) - set(GARBAGE_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be some of {GARBAGE_KINDS}, got {list(kinds)}")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = port
        self.probability = probability
        self.kinds: tuple[GarbageKind, ...] = tuple(kinds)
        self.rng = random.Random(seed)
        self.injected: list[Injection] = []
        self.max_injected = max_injected
        #: answers by kind: "valid" (relayed as they came) and each GarbageKind
        self.counts: Counter[str] = Counter()
        #: valid answers relayed, by the request frame they answered
        self.relayed: Counter[bytes] = Counter()
        #: connections closed because a request had a function code it cannot frame
        self.unframed = 0
        #: loop time of the last answer (or junk) sent to a master, None before any
        self.last_answer: float | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> GarbageRtuFront:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer), name="garbage-rtu-conn")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _record(self, kind: GarbageKind, request: bytes, sent: bytes) -> None:
        self.counts[kind] += 1
        if len(self.injected) < self.max_injected:
            self.injected.append(Injection(time.time(), kind, request, sent))

    async def _serve(self, client: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_w: asyncio.StreamWriter | None = None
        back: asyncio.Task[None] | None = None
        try:
            up, up_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            # what to do with each relayed answer, in request order
            pending: deque[tuple[GarbageKind | None, bytes]] = deque()
            back = asyncio.create_task(self._answers(up, client_w, pending))
            while True:
                try:
                    request = await _read_frame(client, request=True)
                except _Unframed:
                    self.unframed += 1
                    return
                if request is None:
                    return
                kind: GarbageKind | None = None
                if self.probability > 0 and self.rng.random() < self.probability:
                    kind = self.rng.choice(self.kinds)
                if kind == "random":
                    junk = _junk(self.rng, request[0])
                    client_w.write(junk)
                    self.last_answer = asyncio.get_running_loop().time()
                    await client_w.drain()
                    self._record("random", request, junk)
                    continue
                pending.append((kind, request))
                up_w.write(request)
                await up_w.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if back is not None:
                back.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await back
            for w in (client_w, up_w):
                if w is not None:
                    w.transport.abort()

    async def _answers(
        self,
        up: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        pending: deque[tuple[GarbageKind | None, bytes]],
    ) -> None:
        try:
            while True:
                answer = await _read_frame(up, request=False)
                if answer is None:
                    break
                # an unanswered request (a silent unit) shifts the queue: harmless, the
                # choices are random anyway
                kind, request = pending.popleft() if pending else (None, b"")
                if kind == "truncated":
                    sent = answer[: self.rng.randrange(1, len(answer))]
                elif kind == "bad_crc":
                    sent = answer[:-2] + bytes(b ^ 0xA5 for b in answer[-2:])
                else:
                    sent = answer
                client_w.write(sent)
                self.last_answer = asyncio.get_running_loop().time()
                await client_w.drain()
                if kind is None:
                    self.counts["valid"] += 1
                    self.relayed[request] += 1
                else:
                    self._record(kind, request, sent)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, _Unframed):
            pass
        client_w.transport.abort()


class GarbageRtuServer:
    """A self-contained RTU-over-TCP street cabinet that sometimes answers garbage: a
    CabinetSimulator (``transport="rtu-over-tcp"``, on a free port) behind a
    GarbageRtuFront listening on `host`:`port`. `cabinet` (served, silent, delay, ...) and
    `front` (probability, counts, injected) are the two parts."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        probability: float = 0.1,
        kinds: Sequence[GarbageKind] = GARBAGE_KINDS,
        seed: int | float = 0,
        tick_s: float | None = 1.0,
        units: Mapping[int, str] | None = None,
    ) -> None:
        self.cabinet = CabinetSimulator(transport="rtu-over-tcp", tick_s=tick_s, units=units)
        self.front = GarbageRtuFront(
            0, host=host, port=port, probability=probability, kinds=kinds, seed=seed
        )

    @property
    def port(self) -> int:
        return self.front.port

    @property
    def probability(self) -> float:
        return self.front.probability

    @probability.setter
    def probability(self, value: float) -> None:
        self.front.probability = value

    @property
    def counts(self) -> Counter[str]:
        return self.front.counts

    @property
    def injected(self) -> list[Injection]:
        return self.front.injected

    async def start(self) -> None:
        await self.cabinet.start()
        self.front.upstream_port = self.cabinet.port
        try:
            await self.front.start()
        except BaseException:
            await self.cabinet.stop()
            raise

    async def stop(self) -> None:
        await self.front.stop()
        await self.cabinet.stop()

    async def __aenter__(self) -> GarbageRtuServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
