"""The ``mqtt`` driver: sensors that publish to a site broker.

Devices with the same broker (URL, credentials, client id, TLS files) share one
connection; every point's topic filter is subscribed on it once. Each message is routed
to every point whose topic pattern matches (with its {device} / {point} captures equal
to the device's and point's names), parsed, and pushed as one batch. The routing is
sans-I/O (`Router`); `MqttDriver` only adds the connections: reconnect with exponential
backoff and jitter, and subscribe again after each reconnect (clean session).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any

import aiomqtt
from pydantic import BaseModel

from agent.logs import Throttle
from agent.mqtt_url import tls_context
from drivers.base import BatchSink, DeviceConfigProblem, DeviceSpec, Driver, PointSpec
from drivers.mqtt.payloads import PayloadError, parse
from drivers.mqtt.settings import MqttDeviceSettings, MqttPointSettings, check_point_unit, zone
from drivers.mqtt.topics import TopicPattern, TopicPatternError, join_topic
from native.batch import (
    GOOD,
    ID_TYPECODE,
    QUALITY_TYPECODE,
    TS_TYPECODE,
    VALUE_TYPECODE,
    Batch,
)

log = logging.getLogger("citygw.drivers.mqtt")

__all__ = ["Link", "MqttDriver", "Outcome", "Route", "Router", "link_key"]

#: messages waiting in a connection's queue before aiomqtt drops new ones (bounded RAM)
MAX_QUEUED_MESSAGES = 10_000


@dataclass(frozen=True, slots=True)
class Route:
    """One point's subscription: a message on a matching topic is a reading of it."""

    device: str
    point: PointSpec
    pattern: TopicPattern
    device_value: str
    point_value: str
    qos: int
    #: the device's zone of payload timestamps without an offset (a point's own wins)
    zone: tzinfo | None = None

    def accepts(self, topic: str) -> bool:
        captures = self.pattern.match(topic)
        if captures is None:
            return False
        dev = captures.get("device")
        pt = captures.get("point")
        return (dev is None or dev == self.device_value) and (pt is None or pt == self.point_value)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one message meant for one point: a reading, the reason it is none, or
    nothing (`absent`: the point's optional path is not in this message)."""

    route: Route
    value: float = math.nan
    timestamp_ms: int | None = None
    reason: str | None = None
    quality: int = GOOD
    #: what the reason is about: the missing path, the unmapped word...
    detail: str = ""
    #: a kept reading's remark, counted (payloads.NOTES: timestamp_fallback...)
    note: str | None = None
    absent: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None and not self.absent


def routes_of(devices: Iterable[DeviceSpec]) -> list[Route]:
    routes = []
    for device in devices:
        ds = device.settings
        assert isinstance(ds, MqttDeviceSettings)
        for point in device.points:
            ps = point.settings
            assert isinstance(ps, MqttPointSettings)
            routes.append(
                Route(
                    device=device.name,
                    point=point,
                    pattern=TopicPattern(join_topic(ds.topic_prefix, ps.topic)),
                    device_value=ds.device_value or device.name,
                    point_value=ps.point_value or point.name,
                    qos=ds.qos,
                    zone=zone(ds.timezone) if ds.timezone else None,
                )
            )
    return routes


class Router:
    """Sans-I/O: which points a message on a topic is for, and their readings."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def subscriptions(self) -> dict[str, int]:
        """Each distinct MQTT filter with the highest qos asked for it."""
        out: dict[str, int] = {}
        for r in self.routes:
            sub = r.pattern.subscription
            out[sub] = max(out.get(sub, 0), r.qos)
        return out

    def route(self, topic: str, payload: bytes) -> list[Outcome]:
        """One outcome per point the topic is for (none: no point's topic matches)."""
        out = []
        for r in self.routes:
            if not r.accepts(topic):
                continue
            ps = r.point.settings
            assert isinstance(ps, MqttPointSettings)
            try:
                reading = parse(payload, ps, unit=r.point.unit, zone=r.zone)
            except PayloadError as exc:
                out.append(Outcome(r, reason=exc.reason, detail=exc.detail))
            else:
                if reading is None:
                    out.append(Outcome(r, absent=True))
                else:
                    value, ts, quality, note = reading
                    out.append(Outcome(r, value, ts, quality=quality, note=note))
        return out


def link_key(settings: MqttDeviceSettings) -> tuple[object, ...]:
    """Devices with equal keys share one connection."""
    s = settings
    return (
        s.broker,
        s.username,
        s.password.get_secret_value() if s.password else None,
        s.client_id,
        str(s.ca_file),
        str(s.cert_file),
        str(s.key_file),
    )


@dataclass(slots=True)
class Link:
    """One connection to a broker and the devices on it."""

    settings: MqttDeviceSettings
    devices: list[str]
    router: Router
    client_id: str
    connected: bool = False
    connects: int = 0
    unmatched: int = 0
    rejected: int = 0
    last_link_error: str | None = None
    subscribed: dict[str, int] = field(default_factory=dict)

    @property
    def where(self) -> str:
        a = self.settings.address
        return f"{a.host}:{a.port}"


def client_for(settings: MqttDeviceSettings, client_id: str) -> aiomqtt.Client:
    """An aiomqtt client for a device's broker settings (not yet connected)."""
    address = settings.address
    tls = None
    if address.tls or settings.ca_file or settings.cert_file:
        tls = tls_context(
            str(settings.ca_file) if settings.ca_file else None,
            str(settings.cert_file) if settings.cert_file else None,
            str(settings.key_file) if settings.key_file else None,
        )
    return aiomqtt.Client(
        address.host,
        address.port,
        username=settings.username,
        password=settings.password.get_secret_value() if settings.password else None,
        identifier=client_id,
        clean_session=True,
        keepalive=int(settings.keepalive),
        timeout=10.0,
        tls_context=tls,
        max_queued_incoming_messages=MAX_QUEUED_MESSAGES,
    )


def payload_bytes(message: aiomqtt.Message) -> bytes:
    p = message.payload
    if isinstance(p, bytes | bytearray):
        return bytes(p)
    return b"" if p is None else str(p).encode()


class MqttDriver(Driver):
    name = "mqtt"
    device_model = MqttDeviceSettings
    point_model = MqttPointSettings

    #: reconnect delays: doubling from min to max, each with jitter (x 0.5..1)
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0

    @classmethod
    def check_device(
        cls,
        device: BaseModel,
        points: Sequence[BaseModel],
        tables: Sequence[Mapping[str, Any]],
    ) -> list[DeviceConfigProblem]:
        """Each point's topic behind the device's topic_prefix must be a valid pattern,
        and a point whose unit comes from the payload needs a unit to convert to."""
        assert isinstance(device, MqttDeviceSettings)
        problems = []
        for j, point in enumerate(points):
            assert isinstance(point, MqttPointSettings)
            unit = tables[j].get("unit", "") if j < len(tables) else ""
            if (why := check_point_unit(point, str(unit))) is not None:
                problems.append(DeviceConfigProblem(("points", j, "unit"), why))
            try:
                TopicPattern(join_topic(device.topic_prefix, point.topic))
            except TopicPatternError as exc:
                problems.append(
                    DeviceConfigProblem(
                        ("points", j, "topic"),
                        f"behind topic_prefix {device.topic_prefix!r}: {exc}",
                    )
                )
        return problems

    def __init__(self, devices: Sequence[DeviceSpec]) -> None:
        super().__init__(devices)
        groups: dict[tuple[object, ...], list[DeviceSpec]] = {}
        for d in self.devices:
            assert isinstance(d.settings, MqttDeviceSettings)
            groups.setdefault(link_key(d.settings), []).append(d)
        self.links: list[Link] = []
        for members in groups.values():
            s = members[0].settings
            assert isinstance(s, MqttDeviceSettings)
            self.links.append(
                Link(
                    settings=s,
                    devices=[d.name for d in members],
                    router=Router(routes_of(members)),
                    client_id=s.client_id or f"citygw-mqtt-{secrets.token_hex(4)}",
                )
            )
        self._throttle = Throttle(60.0)

    async def run(self, sink: BatchSink) -> None:
        async with asyncio.TaskGroup() as tg:
            for link in self.links:
                tg.create_task(self._run_link(link, sink), name=f"mqtt:{link.where}")

    async def _run_link(self, link: Link, sink: BatchSink) -> None:
        delay = self.reconnect_min_s
        subscriptions = link.router.subscriptions()
        while True:
            try:
                async with client_for(link.settings, link.client_id) as client:
                    for topic, qos in subscriptions.items():
                        await client.subscribe(topic, qos)
                    link.subscribed = dict(subscriptions)
                    link.connected = True
                    link.connects += 1
                    link.last_link_error = None
                    delay = self.reconnect_min_s
                    log.info(
                        "connected to %s, subscribed to %d topics",
                        link.where,
                        len(subscriptions),
                        extra={"devices": ",".join(link.devices)},
                    )
                    async for message in client.messages:
                        self.handle(link, message.topic.value, payload_bytes(message), sink)
            except aiomqtt.MqttError as exc:
                self._link_down(link, str(exc) or type(exc).__name__)
            except OSError as exc:  # e.g. a TLS file that went away
                self._link_down(link, str(exc))
            link.connected = False
            link.subscribed = {}
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max_s)

    def _link_down(self, link: Link, error: str) -> None:
        message = f"broker {link.where}: {error}"
        link.last_link_error = message
        for name in link.devices:
            self._health[name].failure(message)
        if (n := self._throttle.ready(f"link:{link.where}")) is not None:
            log.warning("%s; reconnecting (%d times)", message, n)

    def handle(self, link: Link, topic: str, payload: bytes, sink: BatchSink) -> Batch | None:
        """One message: readings pushed as one batch, failures in the devices' health.
        Returns the batch pushed (or refused by the sink), None if there was none."""
        received_ms = time.time_ns() // 1_000_000
        outcomes = link.router.route(topic, payload)
        if not outcomes:
            link.unmatched += 1
            if (n := self._throttle.ready(f"unmatched:{topic}")) is not None:
                log.warning(
                    "message on %s dropped: no point's topic matches (%d in the last minute)",
                    topic,
                    n,
                )
            return None
        good = [o for o in outcomes if o.ok]
        per_device: dict[str, int] = {}
        for o in outcomes:
            health = self._health[o.route.device]
            if o.ok:
                per_device[o.route.device] = per_device.get(o.route.device, 0) + 1
                if o.note is not None:  # kept, UNCERTAIN, but counted and said
                    health.reject(o.note)
                    if (n := self._throttle.ready(f"{o.note}:{o.route.point.key}")) is not None:
                        log.warning(
                            "message on %s for %s: %s, kept as uncertain (%d in the last minute)",
                            topic,
                            o.route.point.key,
                            o.note,
                            n,
                        )
            elif not o.absent:
                why = f"{o.reason}: {o.detail}" if o.detail else str(o.reason)
                link.rejected += 1
                health.failure(f"{topic}: {why}")
                health.reject(o.reason or "payload")
                key = f"bad:{topic}:{o.route.point.key}"
                if (n := self._throttle.ready(key)) is not None:
                    log.warning(
                        "message on %s for %s dropped: %s (%d in the last minute)",
                        topic,
                        o.route.point.key,
                        why,
                        n,
                    )
        if not good:
            return None
        batch = Batch(
            array(ID_TYPECODE, [o.route.point.id for o in good]),
            array(
                TS_TYPECODE,
                [received_ms if o.timestamp_ms is None else o.timestamp_ms for o in good],
            ),
            array(VALUE_TYPECODE, [o.value for o in good]),
            array(QUALITY_TYPECODE, [o.quality for o in good]),
        )
        accepted = sink.push(batch)
        for device, count in per_device.items():
            health = self._health[device]
            if accepted:
                health.success(count)
            else:
                health.skipped_polls += 1
        if not accepted and (k := self._throttle.ready(f"full:{link.where}")) is not None:
            log.warning(
                "agent saturated: readings from %s dropped (%d messages in the last minute)",
                link.where,
                k,
            )
        return batch
