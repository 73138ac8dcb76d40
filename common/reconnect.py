"""How the uplink and the ingest worker reconnect to their broker: one policy for both.

After a failed attempt or a lost session the client waits a full-jitter exponential
backoff (`backoff_delay`), so a broker that refuses it (credentials, authorization,
TLS) or accepts and drops it at once is not hammered. A long wait alone would keep a
gateway away for up to `backoff_max` after its broker is back, so while it waits it
probes the broker's TCP port (connect and close: no TLS, no MQTT) about every
`probe_interval`. When a probe finds the port open after the broker was seen absent
(the attempt or an earlier probe was refused, unreachable or unresolvable), the wait is
cut to a random delay within `spread`. A broker that is present but refuses at the MQTT
level never shows that absent-then-present change, so its backoff stands; and after a
successful probe a wait probes no more (each probe costs the broker an accept).

A stopping broker drops every session at the same instant, so the first retry after a
session (and after a first failure) also waits a random part of the spread. How N
gateways load a broker with these settings: docs/architecture.md, "Reconnecting".
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttCodeError
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger("citygw.reconnect")

#: a session online this long (or backoff_max, if smaller) was "up": the next retry
#: starts the backoff from backoff_min again. A broker that accepts the connection and
#: drops it right away (a duplicate client id, an ACL) keeps backing off.
STABLE_AFTER_S = 30.0

#: the longest a probe waits for the TCP handshake (a host that drops SYNs)
PROBE_TIMEOUT_S = 2.0
#: a probe's connection must stay open this long to count as a broker (see tcp_probe)
PROBE_HOLD_S = 1.0

#: what a failed connect says when nothing listens there, or the host is unreachable
_ABSENT_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}
)

Probe = Callable[[], Awaitable[bool]]


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [lo, min(hi, lo * 2**attempt)]."""
    cap = min(hi, lo * (2 ** min(attempt, 30)))
    return rng.uniform(lo, max(lo, cap))


def broker_absent(error: BaseException | None) -> bool:
    """Whether a failed attempt found nobody at the broker's address: connection refused,
    host or network unreachable, name not resolvable. (aiomqtt raises its MqttError
    `from None` for a failed socket connect: the OSError is its __context__.) A timeout
    is not counted: aiomqtt's wait for the CONNACK times out the same way."""
    for _ in range(8):  # a cause chain is short; never follow a cycle
        if error is None or isinstance(error, ssl.SSLError):
            return False
        if isinstance(error, socket.gaierror) or (
            isinstance(error, OSError) and error.errno in _ABSENT_ERRNOS
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def tcp_probe(
    host: str, port: int, timeout: float = PROBE_TIMEOUT_S, hold: float = PROBE_HOLD_S
) -> Probe:
    """A probe that says whether a broker listens at host:port: the TCP connection is
    accepted and then kept open for `hold` seconds. A proxy or load balancer in front of
    a broker that is down accepts the connection and closes (or resets) it at once: that
    is no broker. A broker waits for the client to speak first."""

    async def probe() -> bool:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except OSError:  # refused, unreachable, unresolvable, timed out (TimeoutError)
            return False
        try:
            async with asyncio.timeout(hold):
                await reader.read(1)  # b"": closed by the other side
            return False
        except TimeoutError:
            return True  # still open: something that speaks only when spoken to
        except OSError:  # reset
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return probe


@dataclass(frozen=True, slots=True)
class ReconnectSettings:
    backoff_min: float
    backoff_max: float
    #: mean seconds between probes while waiting (each interval uniform in 0.5..1.5 x)
    probe_interval: float
    #: a reconnect that many clients make at once is delayed uniformly within this
    spread: float
    #: a session online this long resets the backoff
    stable_after: float = STABLE_AFTER_S


class ReconnectPolicy:
    """The waits between connection attempts: `failed` after each failed attempt or lost
    session, then `await wait()`. `probe` None: no probes (an in-process link)."""

    def __init__(
        self,
        settings: ReconnectSettings,
        probe: Probe | None,
        *,
        name: str,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.s = settings
        self.name = name  # for the log: "uplink", "ingest"
        self._probe = probe
        self._rng = rng or random.Random()
        self._clock = clock
        self._sleep = sleep
        #: failed attempts since the last session that lasted
        self.attempt = 0
        self.probes = 0
        #: waits cut short because the broker came back
        self.shortcuts = 0
        self._delay = 0.0
        self._absent = False

    def failed(self, error: BaseException | None, online_s: float | None = None) -> float:
        """An attempt failed with `error`, or a session ended after `online_s` seconds
        online: returns the wait before the next attempt (which `wait` may cut short)."""
        s = self.s
        if online_s is not None and online_s >= s.stable_after:
            self.attempt = 0
        delay = backoff_delay(self.attempt, s.backoff_min, s.backoff_max, self._rng)
        if self.attempt == 0:
            delay += self._rng.uniform(0.0, min(s.spread, s.backoff_max))
        self.attempt += 1
        self._delay = delay
        self._absent = broker_absent(error)
        return delay

    async def wait(self) -> None:
        """Sleeps the wait `failed` returned, probing the broker meanwhile: a probe that
        succeeds after the broker was absent cuts the wait to a random delay within the
        spread. (A probe in progress at the end of the wait may extend it by at most its
        own timeout.)"""
        deadline = self._clock() + self._delay
        absent = self._absent
        interval = self.s.probe_interval
        probe = self._probe
        if probe is not None and not absent:
            # what ended the attempt may not say (a proxy closing for a broker that is
            # down looks like a broker dropping us): ask once now, or a broker back before
            # the first probe would look present all along and the wait would run out
            self.probes += 1
            if await probe():
                probe = None  # present: the whole backoff applies
            else:
                absent = True
        while probe is not None:
            now = self._clock()
            at = now + self._rng.uniform(0.5 * interval, 1.5 * interval)
            if at >= deadline:
                break
            await self._sleep(at - now)
            self.probes += 1
            if not await probe():
                absent = True
                continue
            if absent:
                cut = self._rng.uniform(0.0, self.s.spread)
                if self._clock() + cut < deadline:
                    deadline = self._clock() + cut
                    self.shortcuts += 1
                    log.info(
                        "broker reachable again, reconnecting",
                        extra={"link": self.name, "reconnect_in_s": round(cut, 2)},
                    )
            break
        remaining = deadline - self._clock()
        if remaining > 0:
            await self._sleep(remaining)


def check_cancelled() -> None:
    """Raises CancelledError if the current task was asked to stop. Python 3.11's
    `asyncio.wait_for` (in aiomqtt's connect, publish and subscribe) returns a result that
    arrived with the cancel instead of raising it; a session or loop that went on would
    never end, and whoever stopped it waited for ever. Called after the awaits that may
    have swallowed one."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class ClosedBeforeConnack(aiomqtt.MqttError):
    """The broker (or something on the way) closed or reset the connection before its
    CONNACK: what the MQTT client logged on its socket says why (a TLS alert, a reset)."""

    def __init__(self) -> None:
        super().__init__("the broker closed the connection before its CONNACK")


class PublishRefused(aiomqtt.MqttError):
    """The broker acknowledged a publish with a failure reason code (MQTT 5): it did not
    take the message, e.g. because its ACL does not let this client publish there."""

    def __init__(self, topic: str, reason: ReasonCode) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(
            f"the broker refused the publish on {topic}: {reason} (0x{reason.value:02X})"
        )


class MqttClient(aiomqtt.Client):
    """aiomqtt's client, but a connection attempt ends when its socket is closed or reset
    before the CONNACK. aiomqtt 2.x ignores a disconnect that comes before the CONNACK
    (`_on_disconnect` returns early) and waits out its `timeout` (the uplink's
    ack_timeout) although paho has already closed the socket."""

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        if not self._connected.done():
            # paho may call this from the thread that runs its connect()
            self._loop.call_soon_threadsafe(self._closed_before_connack)
        super()._on_disconnect(client, userdata, flags, reason_code, properties)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refusals: dict[int, ReasonCode] = {}  # mid -> failure reason of its PUBACK

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        if reason_code.is_failure:
            self._refusals[mid] = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish(  # type: ignore[override]
        self,
        topic: str,
        payload: Any = None,
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """aiomqtt's publish, but a PUBACK that refuses the message (MQTT 5 reason code
        0x80 or above: not authorized, quota exceeded...) raises PublishRefused: a
        broker that refuses a publish still acknowledges it, and a message it refused
        must never be taken for delivered."""
        info = self._client.publish(topic, payload, qos, retain, properties)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            if self._disconnected.done() and self._disconnected.exception():
                raise MqttCodeError(
                    info.rc, "Could not publish message"
                ) from self._disconnected.exception()
            raise MqttCodeError(info.rc, "Could not publish message")
        if not info.is_published():
            confirmation = asyncio.Event()
            with self._pending_call(info.mid, confirmation, self._pending_publishes):
                await self._wait_for(confirmation.wait(), timeout=timeout)
        refused = self._refusals.pop(info.mid, None)
        if refused is not None:
            raise PublishRefused(topic, refused)

    def _closed_before_connack(self) -> None:
        # only while __aenter__ waits for the CONNACK (it holds the lock): after a
        # timed-out attempt nobody would retrieve the exception
        if self._lock.locked() and not self._connected.done():
            self._connected.set_exception(ClosedBeforeConnack())
