"""An MQTT-aware TCP proxy between a client (the agent's uplink or the mqtt driver) and a
broker, for injecting link faults at run time.

    proxy = MqttProxy("127.0.0.1", broker.port)
    await proxy.start()               # listens on 127.0.0.1:proxy.port (a free port)
    ... point the agent at proxy.url ...
    proxy.mode = "no_ack"             # the broker takes the PUBLISHes, the client never hears
    proxy.mode = "down"               # every connection cut, new ones refused
    await proxy.flap(period_s=2.0, down_s=0.5, count=3)
    await proxy.stop()

The proxy frames the byte stream of each direction into MQTT control packets (fixed
header byte, remaining-length varint, body; any number of packets per read, any packet
split over several reads) and decides per packet, by the mode at that moment:

- ``"pass"``: forward everything;
- ``"no_ack"``: forward everything except PUBACK packets going to the client (a broker that
  accepts QoS 1 messages but never acknowledges them);
- ``"blackhole"``: accept connections and forward nothing either way (a link that hangs:
  a CONNECT never gets its CONNACK);
- ``"down"``: setting it cuts every established connection (both sides are aborted, the
  client sees a reset) and closes the listening socket, so new connections are refused
  (ECONNREFUSED) until the mode changes again; the proxy then listens on the same port
  (a lost link).

Switch modes from the event loop's thread (`mode` is a plain attribute setter). The
broker side of a connection is opened when its first packet is to be forwarded, so a
connection accepted in "blackhole" never reaches the broker. Packets of both directions
are counted per type (`counters`); mode switches are recorded with their wall time
(`mode_changes`). A byte stream that is not MQTT (a remaining length over 4 bytes) closes
the connection and is counted in `counters.malformed`.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, get_args

__all__ = ["PACKET_TYPES", "DirectionCounts", "Mode", "MqttProxy", "ProxyCounters"]

Mode = Literal["pass", "down", "no_ack", "blackhole"]
MODES: tuple[str, ...] = get_args(Mode)

#: MQTT control packet type (high nibble of the first byte) -> name
PACKET_TYPES: dict[int, str] = {
    0: "RESERVED",
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "AUTH",
}

#: seconds to wait for the broker's TCP connect before the client is closed
CONNECT_TIMEOUT_S = 5.0


class MalformedPacket(Exception):
    """The stream is not MQTT: a remaining-length varint longer than 4 bytes."""


@dataclass
class DirectionCounts:
    """Packets of one direction, by type name ("PUBLISH", "PUBACK", ...)."""

    forwarded: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)
    bytes_forwarded: int = 0


@dataclass
class ProxyCounters:
    #: connections accepted and served (in any mode but "down")
    connections: int = 0
    #: connections accepted just as the mode switched to "down", closed at once (while
    #: "down" nothing listens: new connections are refused by the kernel, ECONNREFUSED)
    refused: int = 0
    #: established connections cut by a switch to "down" (or by stop())
    cut: int = 0
    #: connections whose broker side could not be opened (closed at once)
    broker_unreachable: int = 0
    #: connections closed because a stream was not MQTT
    malformed: int = 0
    to_broker: DirectionCounts = field(default_factory=DirectionCounts)
    to_client: DirectionCounts = field(default_factory=DirectionCounts)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes] | None:
    """One whole MQTT control packet: (type, its bytes: fixed header + body), or None at a
    clean end of stream before the first byte. Raises asyncio.IncompleteReadError when the
    stream ends inside a packet, MalformedPacket on a bad remaining length."""
    first = await reader.read(1)
    if not first:
        return None
    header = bytearray(first)
    length = 0
    for i in range(4):
        b = (await reader.readexactly(1))[0]
        header.append(b)
        length |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            break
    else:
        raise MalformedPacket(f"remaining length longer than 4 bytes: {bytes(header).hex()}")
    body = await reader.readexactly(length) if length else b""
    return first[0] >> 4, bytes(header) + body


class _Connection:
    """One client connection and (once opened) its broker side."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.broker: asyncio.StreamWriter | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def abort(self) -> None:
        """Closes both sides at once (RST, no lingering)."""
        self.closed = True
        for w in (self.client, self.broker):
            if w is not None:
                w.transport.abort()


class MqttProxy:
    """See the module docstring. `broker_host`/`broker_port`: where to forward to;
    `host`/`port`: where to listen (port 0: a free one, known as `.port` after start())."""

    def __init__(
        self,
        broker_host: str,
        broker_port: int,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        mode: Mode = "pass",
    ) -> None:
        _check_mode(mode)
        self.broker_host = broker_host
        self.broker_port = broker_port
        self.host = host
        self.port = port
        self.counters = ProxyCounters()
        #: (wall time, mode) of every switch, starting with the initial mode at start()
        self.mode_changes: list[tuple[float, Mode]] = []
        self._mode: Mode = mode
        self._listener: socket.socket | None = None
        self._started = False
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    # -- control ---------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        """Takes effect for the next packet of every connection; "down" also cuts every
        established connection and stops listening right away."""
        _check_mode(mode)
        was = self._mode
        self._mode = mode
        self.mode_changes.append((time.time(), mode))
        if not self._started:
            return
        if mode == "down":
            self._close_listener()
            self._cut_all()
        elif was == "down":
            self._listen()

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the proxy (valid after start())."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def active_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.mode_changes.append((time.time(), self._mode))
        self._listen()  # binds the port, even in "down", so that .port is known
        if self._mode == "down":
            self._close_listener()

    async def stop(self) -> None:
        """Stops listening, cuts every connection and waits for their handlers."""
        self._started = False
        self._close_listener()
        self._cut_all()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.gather(*handlers, return_exceptions=True)

    async def flap(self, period_s: float, down_s: float, count: int) -> None:
        """`count` outages: "down" for `down_s`, then back to the mode in force when flap
        was called ("pass" if that was "down") for the rest of `period_s`. Ends in that
        mode after the last period."""
        if not 0 < down_s <= period_s:
            raise ValueError(f"need 0 < down_s <= period_s, got {down_s} and {period_s}")
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        restore: Mode = "pass" if self._mode == "down" else self._mode
        for _ in range(count):
            self.mode = "down"
            await asyncio.sleep(down_s)
            self.mode = restore
            await asyncio.sleep(period_s - down_s)

    async def __aenter__(self) -> MqttProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- listening (synchronous, so that a mode switch takes effect at once) -----------

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._on_acceptable)
        except BaseException:
            sock.close()
            raise
        self.port = int(sock.getsockname()[1])
        self._listener = sock

    def _close_listener(self) -> None:
        sock, self._listener = self._listener, None
        if sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    def _on_acceptable(self) -> None:
        for _ in range(64):  # what is queued now; the reader fires again for the rest
            if self._listener is None:
                return
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. too many open files: the client sees a timeout
            sock.setblocking(False)
            task = asyncio.create_task(self._accept(sock), name="mqtt-proxy-conn")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def _cut_all(self) -> None:
        for conn in list(self._connections):
            if not conn.closed:
                self.counters.cut += 1
            conn.abort()

    async def _accept(self, sock: socket.socket) -> None:
        if self._mode == "down":
            self.counters.refused += 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
            return
        try:
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            return
        if self.mode == "down":  # switched while the streams were set up
            self.counters.refused += 1
            writer.transport.abort()
            return
        self.counters.connections += 1
        conn = _Connection(writer)
        self._connections.add(conn)
        await self._serve(conn, reader)

    async def _serve(self, conn: _Connection, client: asyncio.StreamReader) -> None:
        """Pumps client -> broker in this task; the broker -> client pump runs in a task of
        its own, started when the broker side is opened."""
        try:
            # in pass mode it connects upstream as it accepts, as a TCP proxy or load
            # balancer does: with the broker down, the client's connection closes at once
            if self._mode == "pass" and await self._open_broker(conn) is None:
                return
            await self._pump(conn, client, to_broker=True)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except MalformedPacket:
            self.counters.malformed += 1
        finally:
            conn.abort()
            self._connections.discard(conn)
            for task in conn.tasks:
                task.cancel()
            if conn.tasks:
                await asyncio.gather(*conn.tasks, return_exceptions=True)

    async def _open_broker(self, conn: _Connection) -> asyncio.StreamWriter | None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.broker_host, self.broker_port), CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError):
            self.counters.broker_unreachable += 1
            return None
        if conn.closed:  # cut while connecting
            writer.transport.abort()
            return None
        conn.broker = writer
        task = asyncio.create_task(self._back(conn, reader), name="mqtt-proxy-back")
        conn.tasks.add(task)
        return writer

    async def _back(self, conn: _Connection, broker: asyncio.StreamReader) -> None:
        try:
            await self._pump(conn, broker, to_broker=False)
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        except MalformedPacket:
            self.counters.malformed += 1
        finally:
            conn.abort()

    async def _pump(self, conn: _Connection, src: asyncio.StreamReader, *, to_broker: bool) -> None:
        counts = self.counters.to_broker if to_broker else self.counters.to_client
        while not conn.closed:
            packet = await read_packet(src)
            if packet is None:
                return
            ptype, data = packet
            name = PACKET_TYPES[ptype]
            mode = self._mode
            if (
                mode in ("blackhole", "down")
                or (mode == "no_ack" and not to_broker and ptype == 4)
                or conn.closed
            ):
                counts.dropped[name] += 1
                continue
            if to_broker:
                dst = conn.broker or await self._open_broker(conn)
                if dst is None:
                    return
            else:
                dst = conn.client
            dst.write(data)
            await dst.drain()
            counts.forwarded[name] += 1
            counts.bytes_forwarded += len(data)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown proxy mode {mode!r}; one of {', '.join(MODES)}")
