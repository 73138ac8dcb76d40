"""Helpers several test files share: both implementations of the native kernels, a
driver run bounded by a condition, a broker session that acknowledges everything, the
readings in an agent's intake, the data-driven malformed-config cases, and for the
platform ingest: fake gateways publishing real uplinks, bounded waits, a TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiomqtt
import pytest

from agent.config import ConfigError, load_config
from buffer import Buffer
from common import wire
from common.broker import BrokerError, Mosquitto
from drivers.base import BatchSink, Driver
from native import codec, impl
from native.batch import BAD, GOOD, Batch
from native.table import StageTable

IMPLEMENTATIONS = ["cython", "python"]


@contextlib.contextmanager
def running_broker(workdir: Path, **kwargs: Any) -> Iterator[Mosquitto]:
    """A private mosquitto with its config in `workdir` (created), started with
    `Mosquitto`'s keyword arguments and stopped at exit. It fails the test, never skips
    it, when the broker cannot start: a skipped integration test looks like a passing one."""
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        broker = Mosquitto(workdir=workdir, **kwargs)
        broker.start()
    except BrokerError as e:
        pytest.fail(f"cannot start the test broker: {e}", pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


def load_kernels(name: str, module: str = "kernels") -> ModuleType:
    """The kernel module pair ``module`` (see native.impl.MODULES) in implementation
    ``name`` ("cython" or "python"). A missing extension fails, unless twins are forced."""
    if name == "python":
        return importlib.import_module(f"native.{module}_py")
    if impl.pure_python_forced():
        pytest.skip("CITYGW_PURE_PYTHON is set: compiled kernels not under test")
    try:
        return importlib.import_module(f"native._{module}")
    except ImportError as exc:
        pytest.fail(
            f"native._{module} is not built ({exc}): run `python setup.py build_ext --inplace`, "
            "or set CITYGW_PURE_PYTHON=1 to test only the pure-Python twins"
        )


def columns(batch: Batch) -> tuple[bytes, bytes, bytes, bytes]:
    """A batch's columns as bytes: equal only if bit-identical (NaN payloads, -0.0)."""
    return (
        batch.point_ids.tobytes(),
        batch.timestamps.tobytes(),
        batch.values.tobytes(),
        batch.quality.tobytes(),
    )


def state_bytes(table: StageTable[Any]) -> dict[str, bytes]:
    """A stage table's state arrays as bytes, by name."""
    return {name: arr.tobytes() for name, (arr, _) in table.state.items()}


def saved_without(table: StageTable[Any], pid: int, missing: tuple[str, ...]) -> bytes:
    """Point ``pid``'s state as a version without the state arrays ``missing`` saved it
    (``StageTable.save_state``'s format: spec repr, NUL, the arrays in name order)."""
    slot = table.slot_of[pid]
    parts = [repr(table.specs[pid]).encode(), b"\0"]
    for name in sorted(table.state):
        if name not in missing:
            arr, k = table.state[name]
            parts.append(arr[slot * k : (slot + 1) * k].tobytes())
    return b"".join(parts)


class Sink:
    """A driver's sink that keeps every batch pushed to it."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def push(self, batch: Batch) -> bool:
        self.batches.append(batch)
        return True

    def rows(self) -> list[tuple[int, int, float, int]]:
        """Every reading pushed, as (point id, ts, value, quality), in push order."""
        return [r for b in self.batches for r in b.rows()]

    def values(self, point_id: int) -> list[float]:
        return [v for pid, _, v, _ in self.rows() if pid == point_id]


def intake_points(path: Path) -> int:
    """Readings in the intake of the agent's buffer at `path` (0 while the agent has not
    created it or written its schema yet)."""
    if not path.exists():
        return 0
    try:
        with Buffer.open_readonly(path) as buf:
            return buf.stats().intake_points
    except (BufferError, sqlite3.Error, OSError):
        return 0


class AckingSession:
    """A broker session for an uplink under test: every publish is acknowledged at once,
    and its topic kept."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    async def __aenter__(self) -> AckingSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        timeout: float | None = None,
    ) -> None:
        self.topics.append(topic)


async def run_driver_until(
    driver: Driver, sink: BatchSink, done: Callable[[], bool], timeout: float = 10.0
) -> None:
    """Runs the driver until `done()` holds (checked every 5 ms), then cancels it."""
    task = asyncio.create_task(driver.run(sink))
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, "driver did not get there in time"
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def check_config_case(folder: Path, monkeypatch: pytest.MonkeyPatch) -> ConfigError:
    """Loads folder/gateway.toml, which must fail with exactly folder/expected.err
    (CITYGW_REGEN_EXPECTED=1 rewrites expected.err instead: read the diff)."""
    monkeypatch.chdir(folder)
    with pytest.raises(ConfigError) as info:
        load_config("gateway.toml")
    actual = str(info.value) + "\n"
    if os.environ.get("CITYGW_REGEN_EXPECTED"):
        (folder / "expected.err").write_text(actual, encoding="utf-8")
    assert actual == (folder / "expected.err").read_text(encoding="utf-8")
    return info.value


# -- platform ingest: fake gateways, bounded waits, a TCP proxy to cut PostgreSQL ------------

GW = "gw-1"
STREAM = uuid.UUID(int=0x1234).hex


def make_batch(n: int, start_ts: int = 1_700_000_000_000, pid0: int = 1) -> Batch:
    """`n` readings on points pid0..pid0+2 at start_ts, start_ts + 1, ...; every 7th BAD."""
    b = Batch()
    for i in range(n):
        b.append(pid0 + i % 3, start_ts + i, i * 0.1 + 1.0 / 3.0, BAD if i % 7 == 0 else GOOD)
    return b


async def wait_until(
    pred: Callable[[], bool],
    timeout: float = 10.0,
    message: str | Callable[[], str] = "condition not reached in time",
    check: Callable[[], None] | None = None,
) -> None:
    """Polls `pred` (in a thread: it may query a store) every 50 ms until it holds; calls
    `check()` each round (it raises to give up early, e.g. a process died); fails after
    `timeout` s with `message` (or what `message()` says then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(pred):
        if check is not None:
            check()
        if loop.time() > deadline:
            raise AssertionError(message() if callable(message) else message)
        await asyncio.sleep(0.05)


class Gateway:
    """A fake gateway: builds uplinks with the real codec and publishes them (QoS 1; a
    publish returns once the broker has the message)."""

    def __init__(self, broker: Mosquitto, gateway: str = GW, stream: str = STREAM) -> None:
        self.broker, self.gateway, self.stream = broker, gateway, stream
        self.ts = 1_700_000_000_000

    def uplink(self, seq: int, n: int = 20, lane: int = wire.LANE_TELEMETRY) -> tuple[bytes, Batch]:
        """The envelope of uplink `seq` (n readings, their times unique per seq for
        n <= 1000) and its batch."""
        b = make_batch(n, start_ts=self.ts + seq * 1000)
        body = codec.encode(b, gateway=self.gateway, seq=seq)
        return wire.wrap(lane, self.stream, seq, len(b), body), b

    async def publish(self, items: list[tuple[str, bytes]], retain: bool = False) -> None:
        async with aiomqtt.Client(
            "127.0.0.1", self.broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as c:
            for topic, payload in items:
                await c.publish(topic, payload, qos=1, retain=retain)

    async def send(self, seqs: list[int], n: int = 20) -> list[Batch]:
        out, msgs = [], []
        for seq in seqs:
            payload, b = self.uplink(seq, n)
            out.append(b)
            msgs.append((wire.batch_topic(self.gateway), payload))
        await self.publish(msgs)
        return out


class TcpProxy:
    """A plain TCP proxy on a free loopback port (for PostgreSQL: `hil/proxy.py` frames
    MQTT packets and cannot carry another protocol).

    `cut()` closes the listening socket (new connections are refused, ECONNREFUSED) and
    resets every established connection; `restore()` listens again on the same port.
    `upstream_ports()`: the local ports of the proxy's connections to the target, which
    the target sees as its clients' ports (PostgreSQL: `pg_stat_activity.client_port`).
    Run it on the test's event loop."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for client, upstream in list(self._pairs):
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()

    async def restore(self) -> None:
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        await self.cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def upstream_ports(self) -> list[int]:
        ports = []
        for _, upstream in self._pairs:
            sock = upstream.get_extra_info("sockname")
            if sock is not None:
                ports.append(int(sock[1]))
        return ports

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        if self._server is None:  # cut while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        tasks = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            self._pairs.discard(pair)
            writer.transport.abort()
            up_writer.transport.abort()

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
