"""A lightweight MQTT load generator for bench/ingest.py: thousands of simulated
gateways from one or two processes, without one paho client per gateway.

Each simulated gateway is one raw TCP connection (`asyncio.open_connection`) speaking
MQTT 3.1.1 with pre-built packets: a CONNECT (clean session, keepalive 0 so an idle
connection needs no PINGREQ), its retained ``up/meta`` (`wire.encode_meta`) and its
``up/batch`` PUBLISH packets (QoS 1), every body encoded before the clock starts with
the real encoders (`native.codec.encode(batch, gateway=..., seq=...)` in the real
envelope, `wire.wrap`), consecutive seq numbers per gateway, as `agent/uplink.py`
publishes them. A small sans-I/O reader (`PacketReader`) splits what the broker sends
back into packets; PUBACKs are matched to their packet id, so the readings the broker
acknowledged are counted exactly. At most `window` publishes per connection wait for
their PUBACK.

A generator process (`generator_main`) builds the payloads of its share of the
gateways, then obeys commands from the bench over a `multiprocessing` pipe: connect to
a broker and publish the metas, publish a round of batches (paced: one batch per
interval per gateway, starts staggered over the interval; or as fast as the window
allows), clear the retained metas, disconnect, quit. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

import numpy as np

from common import wire
from hil.mqtt_packets import (
    CONNACK,
    DISCONNECT_PACKET,
    PUBACK,
    PacketReader,
    connect_packet,
    packet_id,
    publish_packet,
)
from native import codec
from native.batch import Batch

META_PID: Final = 65535
CLEAR_PID: Final = 65534
MAX_BATCH_PID: Final = 65000


# -- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadSpec:
    gateways: int  # in the whole run
    readings: int  # per batch
    points: int  # per gateway
    interval: float  # seconds between a gateway's batches
    batches: int  # per gateway per round
    rounds: int
    window: int  # unacknowledged publishes per connection
    t0_ms: int  # the first poll's wall-clock time

    @property
    def polls(self) -> int:
        """Polls of every point per batch (the last one may be partial)."""
        return math.ceil(self.readings / self.points)

    @property
    def poll_ms(self) -> int:
        return max(1, round(self.interval * 1000 / self.polls))


def gateway_id(index: int) -> str:
    return f"gw-{index + 1:05d}"


def stream_id(index: int) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"citygw-bench/{index}").hex


_KINDS: Final = (  # device kind, unit, base, amplitude, resolution, noise
    ("level", "m", 2.0, 0.8, 0.001, 0.002),
    ("temperature", "degC", 14.0, 6.0, 0.1, 0.05),
    ("noise", "dB(A)", 58.0, 9.0, 0.1, 1.5),
    ("strain", "ue", 120.0, 35.0, 0.01, 0.4),
    ("pm25", "ug/m3", 12.0, 5.0, 0.1, 0.6),
)


def point_kind(point: int) -> tuple[str, str, float, float, float, float]:
    return _KINDS[point % len(_KINDS)]


def meta_payload(index: int, spec: LoadSpec) -> bytes:
    gw = gateway_id(index)
    points = []
    for p in range(spec.points):
        kind, unit, *_ = point_kind(p)
        device = f"cab-{p // 10}"
        name = f"{kind}_{p}"
        points.append(
            wire.PointMeta(
                id=p + 1, key=f"{device}/{name}", device=device, name=name, unit=unit, driver="sim"
            )
        )
    return wire.encode_meta(wire.Meta(gateway=gw, stream=stream_id(index), points=tuple(points)))


def gateway_batches(index: int, spec: LoadSpec) -> Iterator[tuple[int, bytes, int]]:
    """(seq, envelope, readings) of every batch of the gateway, all rounds, in seq order:
    polls of `spec.points` quantised sensor series (a slow sine per point, noise, the
    point's resolution), a 0..9 ms response delay on every poll."""
    rng = np.random.default_rng(index)
    total_polls = spec.polls * spec.batches * spec.rounds
    t = np.arange(total_polls, dtype=np.float64)[:, None]
    cols = []
    for p in range(spec.points):
        _, _, base, amp, res, noise = point_kind(p)
        period = 600 + 37 * p + (index % 11) * 13  # polls
        phase = rng.uniform(0, 2 * math.pi)
        series = base + amp * np.sin(2 * math.pi * t[:, 0] / period + phase)
        series += rng.normal(0.0, noise, total_polls)
        cols.append(np.round(series / res) * res)
    values = np.round(np.stack(cols, axis=1), 3)  # (polls, points)
    stagger = int(index * spec.interval * 1000 / max(1, spec.gateways))
    delay = rng.integers(0, 10, total_polls)
    ts = spec.t0_ms + stagger + np.arange(total_polls, dtype=np.int64) * spec.poll_ms + delay
    ids = np.arange(1, spec.points + 1, dtype=np.uint32)
    gw, stream = gateway_id(index), stream_id(index)
    n = spec.readings
    for k in range(spec.batches * spec.rounds):
        rows = slice(k * spec.polls, (k + 1) * spec.polls)
        batch = Batch(
            array("I", np.tile(ids, spec.polls)[:n].tobytes()),
            array("q", np.repeat(ts[rows], spec.points)[:n].tobytes()),
            array("d", values[rows].reshape(-1)[:n].tobytes()),
            array("B", bytes(n)),
        )
        seq = k + 1
        body = codec.encode(batch, gateway=gw, seq=seq)
        yield seq, wire.wrap(wire.LANE_TELEMETRY, stream, seq, n, body), n


# -- one simulated gateway --------------------------------------------------------------------


@dataclass(slots=True)
class Gateway:
    index: int
    offset: float  # its start within the interval (staggered)
    meta: bytes  # the retained meta PUBLISH
    clear: bytes  # an empty retained PUBLISH on the meta topic
    rounds: list[list[tuple[int, bytes, int]]]  # per round: (packet id, PUBLISH, readings)
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    inflight: dict[int, int] = field(default_factory=dict)  # packet id -> readings
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    connack: asyncio.Future[int] | None = None
    acked_messages: int = 0
    acked_readings: int = 0
    closed: bool = False

    async def read_loop(self) -> None:
        assert self.reader is not None
        parser = PacketReader()
        try:
            while data := await self.reader.read(65536):
                for kind, _, body in parser.feed(data):
                    if kind == PUBACK and len(body) >= 2:
                        pid = packet_id(body)
                        readings = self.inflight.pop(pid, None)
                        if readings is not None:
                            self.acked_messages += 1
                            self.acked_readings += readings
                            self.acked.set()
                    elif kind == CONNACK and len(body) >= 2:
                        self._connacked(body[1])
        except (OSError, ValueError):
            pass
        finally:
            self.closed = True
            self.acked.set()
            self._connacked(-1)

    def _connacked(self, code: int) -> None:
        if self.connack is not None and not self.connack.done():
            self.connack.set_result(code)

    async def send(
        self, pid: int, packet: bytes, readings: int, window: int, deadline: float
    ) -> bool:
        """Write one PUBLISH once fewer than `window` wait for their PUBACK."""
        assert self.writer is not None
        loop = asyncio.get_running_loop()
        while len(self.inflight) >= window and not self.closed:
            self.acked.clear()
            timeout = deadline - loop.time()
            if timeout <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.acked.wait(), timeout)
        if self.closed:
            return False
        self.inflight[pid] = readings
        self.writer.write(packet)
        if self.writer.transport.get_write_buffer_size() > 1 << 20:
            await asyncio.wait_for(self.writer.drain(), max(0.1, deadline - loop.time()))
        return True

    async def wait_acked(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.inflight and not self.closed:
            self.acked.clear()
            timeout = deadline - loop.time()
            if timeout <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.acked.wait(), timeout)


@dataclass(slots=True)
class RoundResult:
    sent_messages: int = 0
    sent_readings: int = 0
    acked_messages: int = 0
    acked_readings: int = 0
    unacked_messages: int = 0
    late: int = 0  # publishes written more than half an interval after their due time
    max_late_s: float = 0.0
    first_s: float = 0.0  # monotonic time of the first publish
    last_s: float = 0.0  # ... and of the last PUBACK
    closed: int = 0  # connections the broker closed
    cpu_s: float = 0.0  # this generator's CPU time during the round

    def add(self, other: RoundResult) -> None:
        self.sent_messages += other.sent_messages
        self.sent_readings += other.sent_readings
        self.acked_messages += other.acked_messages
        self.acked_readings += other.acked_readings
        self.unacked_messages += other.unacked_messages
        self.late += other.late
        self.max_late_s = max(self.max_late_s, other.max_late_s)
        first = [t for t in (self.first_s, other.first_s) if t]
        self.first_s = min(first) if first else 0.0
        self.last_s = max(self.last_s, other.last_s)
        self.closed += other.closed
        self.cpu_s += other.cpu_s


class Generator:
    """A share of the gateways, their connections and their pre-built packets."""

    def __init__(self, indexes: range, spec: LoadSpec) -> None:
        self.spec = spec
        self.gateways: list[Gateway] = []
        for i in indexes:
            meta_topic = wire.meta_topic(gateway_id(i))
            batch_topic = wire.batch_topic(gateway_id(i))
            packets = [
                (
                    (seq - 1) % MAX_BATCH_PID + 1,
                    publish_packet(batch_topic, env, (seq - 1) % MAX_BATCH_PID + 1),
                    n,
                )
                for seq, env, n in gateway_batches(i, spec)
            ]
            per = spec.batches
            self.gateways.append(
                Gateway(
                    index=i,
                    offset=spec.interval * i / spec.gateways,
                    meta=publish_packet(meta_topic, meta_payload(i, spec), META_PID, retain=True),
                    clear=publish_packet(meta_topic, b"", CLEAR_PID, retain=True),
                    rounds=[packets[r * per : (r + 1) * per] for r in range(spec.rounds)],
                )
            )
        self.payload_bytes = sum(len(p) for g in self.gateways for r in g.rounds for _, p, _ in r)

    async def _connect_one(self, gw: Gateway, host: str, port: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=1 << 16), timeout
            )
        except (OSError, TimeoutError):
            return False
        gw.reader, gw.writer = reader, writer
        gw.closed = False
        gw.inflight.clear()
        gw.connack = loop.create_future()
        gw.task = asyncio.create_task(gw.read_loop())
        writer.write(connect_packet(f"bench-{gateway_id(gw.index)}"))
        try:
            code = await asyncio.wait_for(gw.connack, timeout)
        except TimeoutError:
            return False
        return code == 0

    async def connect(self, host: str, port: int, timeout: float = 30.0) -> dict[str, Any]:
        """Connect every gateway (50 at a time: the broker's listen backlog) and publish
        its retained meta; returns how many connected and had their meta acknowledged."""
        ok = 0
        for start in range(0, len(self.gateways), 50):
            chunk = self.gateways[start : start + 50]
            results = await asyncio.gather(
                *(self._connect_one(g, host, port, timeout) for g in chunk)
            )
            ok += sum(results)
        metas = await self._publish_once(clear=False, timeout=timeout)
        return {"connected": ok, "metas_acked": metas}

    async def _publish_once(self, *, clear: bool, timeout: float) -> int:
        """Every gateway's retained meta (or its removal); how many were acknowledged."""
        deadline = asyncio.get_running_loop().time() + timeout
        for g in self.gateways:
            if g.writer is not None and not g.closed:
                g.inflight[CLEAR_PID if clear else META_PID] = 0
                g.writer.write(g.clear if clear else g.meta)
        before = sum(g.acked_messages for g in self.gateways)
        await asyncio.gather(*(g.wait_acked(deadline) for g in self.gateways))
        return sum(g.acked_messages for g in self.gateways) - before

    async def clear_metas(self, timeout: float = 30.0) -> int:
        return await self._publish_once(clear=True, timeout=timeout)

    async def run_round(self, r: int, start: float, paced: bool, timeout: float) -> RoundResult:
        """Publish round `r`: paced from monotonic time `start` (a batch per interval per
        gateway, each gateway at its offset), or all at once; then wait for the PUBACKs
        until `timeout` s after the last due time."""
        spec = self.spec
        res = RoundResult()
        before = {g.index: (g.acked_messages, g.acked_readings) for g in self.gateways}
        cpu0 = time.process_time()
        loop = asyncio.get_running_loop()
        last_due = start + spec.batches * spec.interval
        deadline = (last_due if paced else start) + timeout
        firsts: list[float] = []

        async def one(g: Gateway) -> None:
            first = True
            for k, (pid, packet, n) in enumerate(g.rounds[r]):
                if paced:
                    due = start + g.offset + k * spec.interval
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    elif -wait > spec.interval / 2:
                        res.late += 1
                        res.max_late_s = max(res.max_late_s, -wait)
                elif k == 0 and loop.time() < start:
                    await asyncio.sleep(start - loop.time())
                if not await g.send(pid, packet, n, spec.window, deadline):
                    break
                if first:
                    firsts.append(loop.time())
                    first = False
                res.sent_messages += 1
                res.sent_readings += n
            await g.wait_acked(deadline)

        await asyncio.gather(*(one(g) for g in self.gateways if g.writer is not None))
        res.last_s = loop.time()
        res.first_s = min(firsts) if firsts else 0.0
        for g in self.gateways:
            m0, r0 = before[g.index]
            res.acked_messages += g.acked_messages - m0
            res.acked_readings += g.acked_readings - r0
            res.unacked_messages += len(g.inflight)
            res.closed += g.closed
        res.cpu_s = time.process_time() - cpu0
        return res

    async def disconnect(self) -> None:
        for g in self.gateways:
            if g.writer is not None:
                with contextlib.suppress(OSError):
                    g.writer.write(DISCONNECT_PACKET)
                    g.writer.close()
        for g in self.gateways:
            if g.task is not None:
                g.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError, TimeoutError):
                    await asyncio.wait_for(g.task, 5.0)
            if g.writer is not None:
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(g.writer.wait_closed(), 5.0)
            g.reader = g.writer = g.task = None


def generator_main(pipe: Connection, indexes: range, spec: LoadSpec) -> None:
    """A generator process: build, report ("ready", stats), then run commands until
    "quit" (or the pipe closes): ("connect", host, port), ("round", r, start, paced,
    timeout), ("clear",), ("disconnect",). Each answer is a (name, value) tuple."""
    t = time.perf_counter()
    gen = Generator(indexes, spec)
    pipe.send(
        (
            "ready",
            {
                "build_s": time.perf_counter() - t,
                "payload_bytes": gen.payload_bytes,
                "messages": sum(len(r) for g in gen.gateways for r in g.rounds),
            },
        )
    )
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                cmd = pipe.recv()
            except EOFError:
                return
            name = cmd[0]
            if name == "connect":
                pipe.send(("connect", loop.run_until_complete(gen.connect(cmd[1], cmd[2]))))
            elif name == "round":
                result = loop.run_until_complete(gen.run_round(*cmd[1:]))
                pipe.send(("round", result))
            elif name == "clear":
                pipe.send(("clear", loop.run_until_complete(gen.clear_metas())))
            elif name == "disconnect":
                loop.run_until_complete(gen.disconnect())
                pipe.send(("disconnect", None))
            elif name == "quit":
                loop.run_until_complete(gen.disconnect())
                return
    finally:
        loop.close()
