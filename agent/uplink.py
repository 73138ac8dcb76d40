"""The uplink: forwards the buffer to the platform broker over MQTT, QoS 1.

A window of batches is in flight at once; a batch is deleted from the buffer only
when its PUBACK arrives. On any connection error every in-flight batch is simply
forgotten: it is still in the buffer, and after reconnecting (exponential backoff
with jitter) it is peeked and sent again with its original sequence number, which
the platform uses to drop the duplicate. Alarms are peeked before events, events
before telemetry, so an alarm takes the next free slot of the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from agent import wire
from agent.mqtt_url import BrokerAddress, tls_context
from buffer import Lane, Message

log = logging.getLogger("citygw.uplink")


@dataclass(frozen=True, slots=True)
class UplinkSettings:
    broker: str
    gateway_id: str
    client_id: str
    topic_prefix: str = "citygw"
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    window: int = 8
    keepalive: float = 30.0
    ack_timeout: float = 10.0
    backoff_min: float = 1.0
    backoff_max: float = 60.0
    stats_interval: float = 60.0


class Publisher(Protocol):
    """What the uplink needs of a broker session (aiomqtt.Client has it)."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        timeout: float | None = None,
    ) -> None: ...


class BufferPort:
    """The buffer operations the uplink needs, run on the agent's buffer thread."""

    def __init__(
        self,
        peek: Callable[[int, Collection[int]], Awaitable[list[Message]]],
        ack: Callable[[Sequence[int]], Awaitable[int]],
    ) -> None:
        self.peek = peek
        self.ack = ack


@dataclass(slots=True)
class UplinkStatus:
    state: str = "starting"  # starting | connecting | online | backoff | stopped
    connected_since_ms: int | None = None
    last_puback_ms: int | None = None
    last_error: str | None = None
    connects: int = 0
    published_messages: int = 0
    published_points: int = 0
    published_bytes: int = 0  # MQTT payload bytes (envelope + codec) of acknowledged batches
    resent_messages: int = 0
    seen_seqs: set[int] = field(default_factory=set, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "connected_since_ms": self.connected_since_ms,
            "last_puback_ms": self.last_puback_ms,
            "last_error": self.last_error,
            "connects": self.connects,
            "published_messages": self.published_messages,
            "published_points": self.published_points,
            "published_bytes": self.published_bytes,
            "resent_messages": self.resent_messages,
        }


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [lo, min(hi, lo * 2**attempt)]."""
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return rng.uniform(lo, max(lo, cap))


#: a session that lasted this long (or backoff_max, if smaller) was "up": the next
#: reconnect starts the backoff from backoff_min again. A broker that accepts the
#: connection and drops it right away (a duplicate client id, an ACL) keeps backing off.
STABLE_AFTER_S = 30.0

#: what a TLS failure's text says, in words for the technician (first match wins)
_TLS_FAILURES = (
    ("certificate verify failed", "the broker's certificate is not trusted; check ca_file (the "
     "CA that signed it) and that the certificate names the broker's host"),
    ("certificate required", "the broker requires a client certificate; set cert_file and "
     "key_file"),
    ("unknown ca", "the broker does not trust the CA of the client certificate"),
    ("bad certificate", "the broker refused the client certificate"),
    ("certificate unknown", "the broker refused the client certificate"),
    ("certificate expired", "a certificate has expired"),
    ("handshake failure", "the TLS handshake failed (no common protocol or cipher?)"),
    ("wrong version number", "the broker does not speak TLS on this port (mqtt:// instead?)"),
)  # fmt: skip


def connection_error(exc: BaseException, transport_error: str | None = None) -> str:
    """What made a connection fail, for the status and the log: a refused CONNACK names
    the refusal, a TLS error what was not accepted. `transport_error` is what the MQTT
    client logged on its socket (a TLS alert after the handshake only shows there; the
    connect itself just times out)."""
    text = str(exc)
    if isinstance(exc, MqttConnectError):
        code = exc.rc.value if isinstance(exc.rc, ReasonCode) else exc.rc
        if code in (4, 134):
            return f"broker refused the connection: bad username or password ({text})"
        if code in (5, 135):
            return (
                f"broker refused the connection: not authorized ({text}); check username and "
                "password (or password_file), or the client certificate"
            )
        return f"broker refused the connection ({text})"
    if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLCertVerificationError):
        what = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ssl.SSLError):
            return f"TLS setup failed (ca_file, cert_file, key_file): {what}"
        return what
    detail = transport_error if transport_error and "timed out" in text else text
    lowered = f"{text} {transport_error or ''}".lower()
    for marker, meaning in _TLS_FAILURES:
        if marker in lowered:
            return f"TLS: {meaning} ({detail})"
    if detail != text:
        return f"{text}: {detail}"
    return text


class _PahoLog(logging.Logger):
    """The MQTT client's log for one connection: passed on to the "mqtt" logger as
    usual, and its last error kept (however the log levels are set)."""

    def __init__(self) -> None:
        super().__init__("mqtt.uplink")
        self.parent = logging.getLogger("mqtt")
        self.last_error: str | None = None

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            try:
                self.last_error = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                self.last_error = str(msg)
        super().log(level, msg, *args, **kwargs)


class Uplink:
    def __init__(
        self,
        settings: UplinkSettings,
        buffer: BufferPort,
        stream_id: str,
        meta: bytes,
        connect: Callable[[], AbstractAsyncContextManager[Publisher]] | None = None,
        on_command: Callable[[bytes], Awaitable[bytes | None]] | None = None,
        stats: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        """`connect` opens a session with the broker; the default is an MQTT client
        for `settings.broker` (the demo passes an in-process link instead).
        `on_command` answers a downlink command (down/cmd) with its response (up/resp),
        or with None when the command runs on (a firmware update): its answer is given
        later to `respond`.
        `stats` makes the retained up/stats message, published on connect and then
        every `settings.stats_interval` seconds."""
        self.s = settings
        self._on_command = on_command
        self._stats = stats
        self._connect = connect or self._client
        self.buffer = buffer
        self.stream_id = stream_id
        self.meta = meta
        self.status = UplinkStatus()
        self._address = BrokerAddress.parse(settings.broker)
        self._wake = asyncio.Event()
        self._answers: deque[bytes] = deque()  # late command answers, oldest first
        self._answer_ready = asyncio.Event()
        self._rng = random.Random()
        self._paho_log: _PahoLog | None = None  # the current connection's, for its errors
        gw, prefix = settings.gateway_id, settings.topic_prefix
        self._topics = {
            Lane.ALARM: wire.topic(prefix, gw, "up/alarm"),
            Lane.EVENT: wire.topic(prefix, gw, "up/batch"),
            Lane.TELEMETRY: wire.topic(prefix, gw, "up/batch"),
        }
        self._state_topic = wire.topic(prefix, gw, "state")
        self._meta_topic = wire.topic(prefix, gw, "up/meta")
        self._cmd_topic = wire.topic(prefix, gw, "down/cmd")
        self._resp_topic = wire.topic(prefix, gw, "up/resp")
        self._stats_topic = wire.topic(prefix, gw, wire.KIND_STATS)

    def wake(self) -> None:
        """New data is in the buffer."""
        self._wake.set()

    def respond(self, answer: bytes) -> None:
        """The answer of a command that ran on in the background: published on up/resp
        now, or once the broker is reachable again."""
        self._answers.append(answer)
        self._answer_ready.set()

    async def run(self) -> None:
        """Connects, forwards, reconnects; until cancelled."""
        attempt = 0
        try:
            while True:
                self.status.state = "connecting"
                self._paho_log = None
                try:
                    await self._session()
                except (aiomqtt.MqttError, OSError) as exc:  # OSError: TLS files, before aiomqtt
                    paho_error = self._paho_log.last_error if self._paho_log else None
                    self.status.last_error = connection_error(exc, paho_error)
                up_since = self.status.connected_since_ms
                stable_s = min(self.s.backoff_max, STABLE_AFTER_S)
                if (
                    up_since is not None
                    and time.time_ns() // 1_000_000 - up_since >= stable_s * 1000
                ):
                    attempt = 0  # it was up a while: start the backoff again from the bottom
                self.status.connected_since_ms = None
                delay = backoff_delay(attempt, self.s.backoff_min, self.s.backoff_max, self._rng)
                attempt += 1
                self.status.state = "backoff"
                log.warning(
                    "uplink down, retrying",
                    extra={
                        "broker": self.s.broker,
                        "error": self.status.last_error,
                        "retry_in_s": round(delay, 2),
                    },
                )
                await asyncio.sleep(delay)
        finally:
            self.status.state = "stopped"

    def _client(self) -> aiomqtt.Client:
        s = self.s
        self._paho_log = _PahoLog()
        return aiomqtt.Client(
            self._address.host,
            self._address.port,
            identifier=s.client_id,
            username=s.username,
            password=s.password,
            tls_context=tls_context(s.ca_file, s.cert_file, s.key_file)
            if self._address.tls
            else None,
            keepalive=max(1, int(s.keepalive)),
            clean_session=True,  # resends come from the buffer, not the client's session
            will=aiomqtt.Will(self._state_topic, b"offline", qos=1, retain=True),
            max_inflight_messages=s.window + 2,  # + state and meta
            timeout=s.ack_timeout,
            logger=self._paho_log,
        )

    async def _session(self) -> None:
        async with self._connect() as client:
            self.status.connects += 1
            self.status.connected_since_ms = time.time_ns() // 1_000_000
            self.status.state = "online"
            log.info("uplink connected", extra={"broker": self.s.broker})
            await client.publish(self._state_topic, b"online", qos=1, retain=True)
            await client.publish(self._meta_topic, self.meta, qos=1, retain=True)
            helpers: list[asyncio.Task[None]] = []
            if self._on_command is not None and isinstance(client, aiomqtt.Client):
                await client.subscribe(self._cmd_topic, qos=1)
                helpers.append(asyncio.create_task(self._commands(client), name="downlink"))
                helpers.append(asyncio.create_task(self._late_answers(client), name="answers"))
            if self._stats is not None:
                helpers.append(asyncio.create_task(self._report(client), name="stats"))
            try:
                await self._pump(client, helpers)
            finally:
                for task in helpers:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await task
                # a clean goodbye: the will only fires on an unclean one
                if self.status.state == "online":
                    with contextlib.suppress(aiomqtt.MqttError):
                        await client.publish(
                            self._state_topic, b"offline", qos=1, retain=True, timeout=1.0
                        )

    async def _commands(self, client: aiomqtt.Client) -> None:
        """Takes downlink commands one at a time, in the order they arrive, and answers
        each (a firmware update: once it is over, through `respond`)."""
        assert self._on_command is not None
        async for message in client.messages:
            if message.retain or not isinstance(message.payload, bytes):
                # a retained command would replay on every connect: never run it
                log.warning(
                    "downlink command ignored",
                    extra={"topic": str(message.topic), "retained": message.retain},
                )
                continue
            answer = await self._on_command(message.payload)
            if answer is not None:
                await client.publish(self._resp_topic, answer, qos=1)

    async def _late_answers(self, client: Publisher) -> None:
        """Publishes what `respond` was given; an answer leaves the queue only once
        published, so a connection lost meanwhile sends it with the next one."""
        while True:
            await self._answer_ready.wait()
            self._answer_ready.clear()
            while self._answers:
                await client.publish(self._resp_topic, self._answers[0], qos=1)
                self._answers.popleft()

    async def _report(self, client: Publisher) -> None:
        """The buffer's counters, retained, so the platform knows evictions and backlog."""
        assert self._stats is not None
        while True:
            payload = await self._stats()
            await client.publish(
                self._stats_topic, payload, qos=1, retain=True, timeout=self.s.ack_timeout
            )
            await asyncio.sleep(self.s.stats_interval)

    async def _publish(self, client: Publisher, msg: Message) -> Message:
        payload = wire.wrap(msg.lane, self.stream_id, msg.seq, msg.n_points, msg.payload)
        await client.publish(self._topics[msg.lane], payload, qos=1, timeout=self.s.ack_timeout)
        return msg

    async def _pump(self, client: Publisher, helpers: Sequence[asyncio.Task[None]] = ()) -> None:
        """Keeps the window full until a publish (or a helper task) fails."""
        inflight: dict[int, asyncio.Task[Message]] = {}
        running = list(helpers)
        try:
            while True:
                for helper in [t for t in running if t.done()]:
                    helper.result()  # a failed stats publish or command loop: reconnect
                    running.remove(helper)
                self._wake.clear()
                free = self.s.window - len(inflight)
                if free > 0:
                    for msg in await self.buffer.peek(free, inflight.keys()):
                        if msg.seq in self.status.seen_seqs:
                            self.status.resent_messages += 1
                        inflight[msg.seq] = asyncio.create_task(self._publish(client, msg))
                wake = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    [*inflight.values(), *running, wake], return_when=asyncio.FIRST_COMPLETED
                )
                wake.cancel()
                # result() re-raises a publish error, which ends the session: reconnect
                acked = [task.result() for task in inflight.values() if task.done()]
                for msg in acked:
                    del inflight[msg.seq]
                if acked:
                    await self._acked(acked)
        finally:
            for task in inflight.values():
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the first error already ended the session
                task.cancel()
            if len(self.status.seen_seqs) > 10_000:  # acks discard them; eviction does not
                self.status.seen_seqs.clear()
            self.status.seen_seqs.update(inflight)

    async def _acked(self, msgs: list[Message]) -> None:
        await self.buffer.ack([m.seq for m in msgs])
        st = self.status
        st.last_puback_ms = time.time_ns() // 1_000_000
        st.published_messages += len(msgs)
        for m in msgs:
            st.published_points += m.n_points
            st.published_bytes += wire.HEADER_SIZE + len(m.payload)
            st.seen_seqs.discard(m.seq)
