"""The uplink: forwards the buffer to the platform broker over MQTT, QoS 1.

A window of batches is in flight at once; a batch is deleted from the buffer only
when its PUBACK arrives. On any connection error every in-flight batch is simply
forgotten: it is still in the buffer, and after reconnecting (common/reconnect.py:
exponential backoff with jitter, cut short when the broker's port is back) it is
peeked and sent again with its original sequence number, which the platform uses to
drop the duplicate. Alarms are peeked before events, events before telemetry, so an
alarm takes the next free slot of the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from buffer import Lane, Message
from common import wire
from common.logs import Throttle
from common.mqtt_url import BrokerAddress, tls_context
from common.reconnect import (
    STABLE_AFTER_S,
    ClosedBeforeConnack,
    MqttClient,
    PublishRefused,
    ReconnectPolicy,
    ReconnectSettings,
    check_cancelled,
    tcp_probe,
)
from common.reconnect import backoff_delay as backoff_delay  # where it used to live
from common.redact import redact

if TYPE_CHECKING:
    from agent.config import Config

log = logging.getLogger("citygw.uplink")

#: a peek or ack the buffer refused is tried again after this, doubling up to the max
BUFFER_RETRY_MIN_S = 0.5
BUFFER_RETRY_MAX_S = 30.0
#: an idle pump and a long backoff still turn this often: each turn is the uplink's
#: progress heartbeat (`on_turn`), which the systemd watchdog checks
TURN_S = 5.0
#: paho's socket connect timeout (its Client.connect_timeout default)
CONNECT_TIMEOUT_S = 5.0


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
    #: while backing off, the broker's port is probed about this often (common/reconnect.py)
    probe_interval: float = 5.0
    #: reconnects after the broker's return are spread uniformly over this long
    reconnect_spread: float = 10.0
    stats_interval: float = 60.0

    @classmethod
    def of(cls, config: Config) -> UplinkSettings:
        """The uplink settings a gateway config gives."""
        up = config.uplink
        return cls(
            broker=up.broker,
            gateway_id=config.gateway.id,
            client_id=up.client_id or f"citygw-{config.gateway.id}",
            topic_prefix=up.topic_prefix,
            username=up.username,
            password=up.password.get_secret_value() if up.password else None,
            ca_file=str(up.ca_file) if up.ca_file else None,
            cert_file=str(up.cert_file) if up.cert_file else None,
            key_file=str(up.key_file) if up.key_file else None,
            window=up.window,
            keepalive=up.keepalive,
            ack_timeout=up.ack_timeout,
            backoff_min=up.backoff_min,
            backoff_max=up.backoff_max,
            probe_interval=up.probe_interval,
            reconnect_spread=up.reconnect_spread,
            stats_interval=up.stats_interval,
        )


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
    """The buffer operations the uplink needs, run on the agent's buffer thread. `peek`
    claims what it returns (never evicted while in flight); `release` gives claims back
    when a session ends (memory only: callable from the event loop)."""

    def __init__(
        self,
        peek: Callable[[int, Collection[int]], Awaitable[list[Message]]],
        ack: Callable[[Sequence[int]], Awaitable[int]],
        release: Callable[[Iterable[int]], None] = lambda seqs: None,
    ) -> None:
        self.peek = peek
        self.ack = ack
        self.release = release


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
    buffer_errors: int = 0  # peeks, acks and stats the buffer refused (retried, no reconnect)
    last_buffer_error: str | None = None
    seen_seqs: set[int] = field(default_factory=set, repr=False)
    #: time.monotonic() of the last PUBACK of any publish (state, meta, stats, batch):
    #: a config push's trial asks for one after its apply (agent/config_push.py)
    acked_at: float | None = field(default=None, repr=False)

    def healthy_since(self, t: float) -> bool:
        """Online, and the broker acknowledged a publish after `t` (time.monotonic())."""
        return self.state == "online" and self.acked_at is not None and self.acked_at > t

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
            "buffer_errors": self.buffer_errors,
            "last_buffer_error": self.last_buffer_error,
        }


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


def tls_failure(text: str) -> str | None:
    """What the text of a TLS failure (an exception, an alert the client logged) means,
    in words for the technician; None if it is none of the known ones."""
    lowered = text.lower()
    return next((meaning for marker, meaning in _TLS_FAILURES if marker in lowered), None)


def connection_error(exc: BaseException, transport_error: str | None = None) -> str:
    """What made a connection fail, for the status and the log: a refused CONNACK names
    the refusal, a TLS error what was not accepted. `transport_error` is what the MQTT
    client logged on its socket (a TLS alert after the handshake only shows there; the
    connect itself just ends, or times out)."""
    text = str(exc)
    if isinstance(exc, PublishRefused) and exc.reason.value == 0x87:
        return (
            f"{text}; the broker's ACL lets a gateway publish only under its own id: its "
            "username (or client certificate CN) must equal gateway.id"
        )
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
    said_little = isinstance(exc, ClosedBeforeConnack) or "timed out" in text
    detail = transport_error if transport_error and said_little else text
    meaning = tls_failure(f"{text} {transport_error or ''}")
    if meaning is not None:
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
        on_turn: Callable[[], None] = lambda: None,
    ) -> None:
        """`connect` opens a session with the broker; the default is an MQTT client
        for `settings.broker` (the demo passes an in-process link instead).
        `on_command` answers a downlink command (down/cmd) with its response (up/resp),
        or with None when the command runs on (a firmware update): its answer is given
        later to `respond`.
        `stats` makes the retained up/stats message, published on connect and then
        every `settings.stats_interval` seconds, or sooner after `report_now`.
        `on_turn` is called on every turn of the connect / forward / back off loop, at
        least every `longest_pause` seconds while the uplink works, broker or not."""
        self.s = settings
        self._on_turn = on_turn
        self._on_command = on_command
        self._stats = stats
        self._connect = connect or self._client
        self.buffer = buffer
        self.stream_id = stream_id
        self.meta = meta
        self.status = UplinkStatus()
        #: called with each message's seconds from publish to PUBACK (agent/metrics.py)
        self.observe_puback: Callable[[float], None] | None = None
        self._address = BrokerAddress.parse(settings.broker)
        self._wake = asyncio.Event()
        self._answers: deque[bytes] = deque()  # late command answers, oldest first
        self._answer_ready = asyncio.Event()
        self._report_now = asyncio.Event()
        self._meta_changed = asyncio.Event()
        self._rng = random.Random()
        self._throttle = Throttle()
        self._buffer_backoff = BUFFER_RETRY_MIN_S
        self._buffer_retry_at = 0.0  # monotonic: no buffer operation before this
        self._online_since: float | None = None  # time.monotonic() the session went online
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

    def report_now(self) -> None:
        """What up/stats carries changed (a device's information): published at once if
        online, else on connect as always."""
        self._report_now.set()

    def set_meta(self, meta: bytes) -> None:
        """A new up/meta (a reload changed the points or the config): published, retained,
        at once if online, and on every later connect."""
        self.meta = meta
        self._meta_changed.set()

    def adopt(self, old: Uplink) -> None:
        """Takes over from a stopped uplink (a reload changed the settings): its counters
        and the command answers it could not send yet."""
        self.status = old.status
        self._answers.extend(old._answers)
        if self._answers:
            self._answer_ready.set()

    def respond(self, answer: bytes) -> None:
        """The answer of a command that ran on in the background: published on up/resp
        now, or once the broker is reachable again."""
        self._answers.append(answer)
        self._answer_ready.set()

    async def run(self) -> None:
        """Connects, forwards, reconnects (common/reconnect.py: backoff, probes of the
        broker's port, spread); until cancelled."""
        s = self.s
        reconnect = ReconnectPolicy(
            ReconnectSettings(
                s.backoff_min,
                s.backoff_max,
                s.probe_interval,
                s.reconnect_spread,
                stable_after=min(s.backoff_max, STABLE_AFTER_S),
            ),
            # an injected session (the demo's loopback, tests) has no broker port to probe
            tcp_probe(self._address.host, self._address.port)
            if self._connect == self._client
            else None,
            name="uplink",
            rng=self._rng,
            sleep=self._backoff_sleep,
        )
        try:
            while True:
                self._on_turn()
                self.status.state = "connecting"
                self._paho_log = None
                self._online_since = None
                error: BaseException | None = None
                try:
                    await self._session()
                # what ended the session, classified here only; every end then backs off
                except (aiomqtt.MqttError, OSError) as exc:  # OSError: TLS files, before aiomqtt
                    paho_error = self._paho_log.last_error if self._paho_log else None
                    self.status.last_error = connection_error(exc, paho_error)
                    error = exc
                online = self._online_since
                online_s = None if online is None else time.monotonic() - online
                self.status.connected_since_ms = None
                delay = reconnect.failed(error, online_s)
                self.status.state = "backoff"
                log.warning(
                    "uplink down, retrying",
                    extra={
                        "broker": redact(self.s.broker),
                        "error": self.status.last_error,
                        "retry_in_s": round(delay, 2),
                    },
                )
                await reconnect.wait()
        finally:
            self.status.state = "stopped"

    @property
    def longest_pause(self) -> float:
        """The longest the uplink may go between two turns without being stuck: a
        connect (socket, then CONNACK), or the state and meta publishes and the
        subscribe after it, each bounded by ack_timeout, then a turn's wait."""
        return CONNECT_TIMEOUT_S + 3 * self.s.ack_timeout + TURN_S

    async def _backoff_sleep(self, seconds: float) -> None:
        """The reconnect policy's sleeps, in turns of at most TURN_S."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(left, TURN_S))
            self._on_turn()

    def _client(self) -> aiomqtt.Client:
        s = self.s
        self._paho_log = _PahoLog()
        return MqttClient(  # ends an attempt at a reset, not at ack_timeout
            self._address.host,
            self._address.port,
            identifier=s.client_id,
            username=s.username,
            password=s.password,
            tls_context=tls_context(s.ca_file, s.cert_file, s.key_file)
            if self._address.tls
            else None,
            keepalive=max(1, int(s.keepalive)),
            # MQTT 5: a PUBACK says whether the broker took the message (its ACL may not)
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,  # resends come from the buffer, not the client's session
            will=aiomqtt.Will(self._state_topic, b"offline", qos=1, retain=True),
            max_inflight_messages=s.window + 2,  # + state and meta
            timeout=s.ack_timeout,
            logger=self._paho_log,
        )

    async def _session(self) -> None:
        async with self._connect() as client:
            self._on_turn()
            self.status.connects += 1
            self.status.connected_since_ms = time.time_ns() // 1_000_000  # for display
            self._online_since = time.monotonic()  # for the backoff (wall clock may step)
            self.status.state = "online"
            log.info("uplink connected", extra={"broker": redact(self.s.broker)})
            helpers: list[asyncio.Task[None]] = []
            # from the first "online" on, every end of the session says "offline": a stop
            # during the meta publish or the subscribe ends in a clean disconnect too,
            # which fires no will, and "online" would stay retained
            try:
                await client.publish(self._state_topic, b"online", qos=1, retain=True)
                self._meta_changed.clear()
                await client.publish(self._meta_topic, self.meta, qos=1, retain=True)
                self.status.acked_at = time.monotonic()
                if self._on_command is not None and isinstance(client, aiomqtt.Client):
                    await client.subscribe(self._cmd_topic, qos=1)
                    helpers.append(asyncio.create_task(self._commands(client), name="downlink"))
                    helpers.append(asyncio.create_task(self._late_answers(client), name="answers"))
                if self._stats is not None:
                    helpers.append(asyncio.create_task(self._report(client), name="stats"))
                helpers.append(asyncio.create_task(self._meta_updates(client), name="meta"))
                check_cancelled()  # one the publishes or the subscribe above swallowed
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
                check_cancelled()

    async def _late_answers(self, client: Publisher) -> None:
        """Publishes what `respond` was given; an answer leaves the queue only once
        published, so a connection lost meanwhile sends it with the next one."""
        while True:
            await self._answer_ready.wait()
            self._answer_ready.clear()
            while self._answers:
                await client.publish(self._resp_topic, self._answers[0], qos=1)
                self._answers.popleft()
                check_cancelled()

    async def _meta_updates(self, client: Publisher) -> None:
        """Publishes each up/meta `set_meta` gives during the session."""
        while True:
            await self._meta_changed.wait()
            self._meta_changed.clear()
            await client.publish(
                self._meta_topic, self.meta, qos=1, retain=True, timeout=self.s.ack_timeout
            )
            check_cancelled()

    async def _report(self, client: Publisher) -> None:
        """The buffer's counters and the devices' information, retained, so the platform
        knows evictions, backlog and what each device says it is."""
        assert self._stats is not None
        while True:
            check_cancelled()
            self._report_now.clear()
            try:
                payload = await self._stats()
            except BufferError as exc:  # the buffer's trouble, not the broker's: next time
                self._buffer_failed("stats", exc)
            else:
                await client.publish(
                    self._stats_topic, payload, qos=1, retain=True, timeout=self.s.ack_timeout
                )
                self.status.acked_at = time.monotonic()
            # asyncio.wait, not wait_for: Python 3.11's wait_for loses a cancel that
            # arrives as the event is set, and the session's end would wait for this loop
            waiter = asyncio.ensure_future(self._report_now.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.s.stats_interval)
            finally:
                waiter.cancel()

    async def _publish(self, client: Publisher, msg: Message) -> Message:
        payload = wire.wrap(msg.lane, self.stream_id, msg.seq, msg.n_points, msg.payload)
        started = time.perf_counter()
        await client.publish(self._topics[msg.lane], payload, qos=1, timeout=self.s.ack_timeout)
        if self.observe_puback is not None:
            self.observe_puback(time.perf_counter() - started)
        return msg

    async def _pump(self, client: Publisher, helpers: Sequence[asyncio.Task[None]] = ()) -> None:
        """Keeps the window full until a publish (or a helper task) fails.

        The buffer's own errors (disk full, I/O error, locked) are not the broker's: they
        do not end the session. A failed peek is tried again after a backoff; batches
        whose PUBACK came but whose ack failed are kept aside (still claimed, so never
        evicted) and acked again, never published again."""
        inflight: dict[int, asyncio.Task[Message]] = {}
        unacked: dict[int, Message] = {}  # PUBACKed; the buffer's ack failed
        running = list(helpers)
        # The buffer may hold batches not in flight. A peek that returns fewer than it
        # asked for found them all; only a wake (the agent appended) makes more, so the
        # PUBACK of the last batch does not cost another trip to the buffer thread.
        more = True
        try:
            while True:
                self._on_turn()
                for helper in [t for t in running if t.done()]:
                    helper.result()  # a failed stats publish or command loop: reconnect
                    running.remove(helper)
                more |= self._wake.is_set()
                self._wake.clear()
                if unacked and self._buffer_ready() and await self._acked(list(unacked.values())):
                    unacked.clear()
                free = self.s.window - len(inflight) - len(unacked)
                if free > 0 and more and self._buffer_ready():
                    try:
                        msgs = await self.buffer.peek(free, inflight.keys() | unacked.keys())
                    except BufferError as exc:
                        self._buffer_failed("peek", exc)
                        msgs = []
                    else:
                        more = len(msgs) == free
                    for msg in msgs:
                        if msg.seq in self.status.seen_seqs:
                            self.status.resent_messages += 1
                        inflight[msg.seq] = asyncio.create_task(self._publish(client, msg))
                retry = self._buffer_wait()
                wake = asyncio.create_task(self._wake.wait())
                await asyncio.wait(
                    [*inflight.values(), *running, wake],
                    timeout=TURN_S if retry is None else min(retry, TURN_S),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                wake.cancel()
                # result() re-raises a publish error, which ends the session: reconnect
                acked = [task.result() for task in inflight.values() if task.done()]
                for msg in acked:
                    del inflight[msg.seq]
                if acked and not await self._acked(acked):
                    unacked.update((m.seq, m) for m in acked)
        finally:
            for task in inflight.values():
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: the first error already ended the session
                task.cancel()
            if len(self.status.seen_seqs) > 10_000:  # acks discard them; eviction does not
                self.status.seen_seqs.clear()
            self.status.seen_seqs.update(inflight)
            self.buffer.release(inflight)  # no PUBACK will come for them on this session

    def _buffer_ready(self) -> bool:
        return time.monotonic() >= self._buffer_retry_at

    def _buffer_wait(self) -> float | None:
        """How long the pump may sleep before a buffer operation is due again."""
        left = self._buffer_retry_at - time.monotonic()
        return left if left > 0 else None

    def _buffer_failed(self, what: str, exc: BaseException) -> None:
        """Counted, shown in the status, logged (rate-limited); retried after a backoff
        (BUFFER_RETRY_MIN_S doubling to BUFFER_RETRY_MAX_S, from the bottom after a success)."""
        st = self.status
        st.buffer_errors += 1
        st.last_buffer_error = f"{what}: {type(exc).__name__}: {exc}"
        delay = self._buffer_backoff
        self._buffer_backoff = min(delay * 2, BUFFER_RETRY_MAX_S)
        self._buffer_retry_at = time.monotonic() + delay
        if (n := self._throttle.ready(f"buffer-{what}")) is not None:
            log.error(
                "uplink: buffer operation failed, retrying (the connection stays up)",
                extra={"operation": what, "error": str(exc), "retry_s": delay, "failures": n},
            )

    async def _acked(self, msgs: list[Message]) -> bool:
        """Deletes PUBACKed batches from the buffer; False if the buffer refused."""
        try:
            await self.buffer.ack([m.seq for m in msgs])
        except BufferError as exc:
            self._buffer_failed("ack", exc)
            return False
        self._buffer_backoff = BUFFER_RETRY_MIN_S
        st = self.status
        st.last_puback_ms = time.time_ns() // 1_000_000
        st.acked_at = time.monotonic()
        st.published_messages += len(msgs)
        for m in msgs:
            st.published_points += m.n_points
            st.published_bytes += wire.HEADER_SIZE + len(m.payload)
            st.seen_seqs.discard(m.seq)
        return True
