"""The ``mqtt`` driver: sensors that publish to a site broker.

Devices with the same broker (URL, credentials, client id, TLS files, MQTT version)
share one connection; every point's topic filter is subscribed on it once (a filter
another covers not at all). Each message is routed to every point whose topic pattern
matches (with its {device} / {point} captures equal to the device's and point's names),
parsed, and pushed as one batch; over MQTT 5, subscription identifiers make a message
that overlapping filters bring twice one reading per point. Retained messages are
ignored or taken once per value (a device's `retained`), an availability (LWT) topic
sets the device's health, `ignore_topics` silences expected traffic. The routing is
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
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any

import aiomqtt
import orjson
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel

from common.logs import Throttle
from common.mqtt_url import tls_context
from common.reconnect import MqttClient
from drivers.base import BatchSink, DeviceConfigProblem, DeviceSpec, Driver, PointSpec
from drivers.mqtt.payloads import PayloadError, parse
from drivers.mqtt.settings import (
    MqttDeviceSettings,
    MqttPointSettings,
    RetainedPolicy,
    check_point_unit,
    zone,
)
from drivers.mqtt.topics import TopicPattern, TopicPatternError, covers, join_topic, overlap
from native.batch import (
    GOOD,
    ID_TYPECODE,
    QUALITY_TYPECODE,
    TS_TYPECODE,
    UNCERTAIN,
    VALUE_TYPECODE,
    Batch,
)

log = logging.getLogger("citygw.drivers.mqtt")

__all__ = ["Delivery", "Link", "MqttDriver", "Outcome", "Route", "Router", "Session", "link_key"]

#: messages waiting in a connection's queue before aiomqtt drops new ones (bounded RAM)
MAX_QUEUED_MESSAGES = 10_000


@dataclass(frozen=True, slots=True)
class Session:
    """A device's session rules: what its retained messages become, the topics it
    ignores, and the availability topic whose words are its health."""

    device: str
    device_value: str
    retained: RetainedPolicy
    ignore: tuple[TopicPattern, ...]
    availability: TopicPattern | None
    settings: MqttDeviceSettings

    def ignores(self, topic: str) -> bool:
        return any(self.is_own(p, topic) for p in self.ignore)

    def is_own(self, pattern: TopicPattern, topic: str) -> bool:
        """Whether `topic` matches `pattern` with its {device} capture (if any) ours."""
        captures = pattern.match(topic)
        return captures is not None and captures.get("device", self.device_value) == (
            self.device_value
        )

    def availability_of(self, payload: bytes) -> tuple[bool | None, str]:
        """(True online / False offline / None not understood, the word found)."""
        try:
            text = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            return None, repr(payload[:40])
        word: object = text
        if text.startswith("{"):  # Zigbee2MQTT: {"state": "online"}
            try:
                node: object = orjson.loads(payload)
                for step in self.settings.availability_json_path:
                    if isinstance(step, int):
                        node = node[step] if isinstance(node, list) and step < len(node) else None
                    else:
                        node = node.get(step) if isinstance(node, dict) else None
                word = node
            except orjson.JSONDecodeError:
                pass
        if not isinstance(word, str):
            return None, repr(text[:40])
        key = word.strip().casefold()
        if key in self.settings.online_words:
            return True, word
        if key in self.settings.offline_words:
            return False, word
        return None, repr(word[:40])


@dataclass(frozen=True, slots=True)
class Route:
    """One point's subscription: a message on a matching topic is a reading of it."""

    device: str
    point: PointSpec
    pattern: TopicPattern
    device_value: str
    point_value: str
    qos: int
    session: Session
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


@dataclass(slots=True)
class Delivery:
    """What one delivered copy of a message meant: readings and rejections, the
    availability words heard, and what it was not taken for."""

    outcomes: list[Outcome] = field(default_factory=list)
    #: (device, True online / False offline / None not understood, the word)
    availability: list[tuple[str, bool | None, str]] = field(default_factory=list)
    #: devices whose ignore_topics matched (their points did not read it)
    ignored_by: list[str] = field(default_factory=list)
    #: retained copies not taken: (route, "ignore" or "repeat" (this value was taken))
    retained_skipped: list[tuple[Route, str]] = field(default_factory=list)
    #: the devices this message counts for (once per message, whatever the copies)
    devices: list[str] = field(default_factory=list)
    #: whether this copy is the one the message-level counters count (unmatched...)
    counted: bool = True

    @property
    def unmatched(self) -> bool:
        return not (self.outcomes or self.availability or self.ignored_by or self.retained_skipped)


#: points whose last payload the router remembers ("once per value"), bounded RAM
MAX_REMEMBERED = 100_000


def sessions_of(devices: Iterable[DeviceSpec]) -> dict[str, Session]:
    out = {}
    for device in devices:
        ds = device.settings
        assert isinstance(ds, MqttDeviceSettings)
        out[device.name] = Session(
            device=device.name,
            device_value=ds.device_value or device.name,
            retained=ds.retained,
            ignore=tuple(TopicPattern(join_topic(ds.topic_prefix, t)) for t in ds.ignore_topics),
            availability=(
                TopicPattern(join_topic(ds.topic_prefix, ds.availability_topic))
                if ds.availability_topic is not None
                else None
            ),
            settings=ds,
        )
    return out


def routes_of(devices: Iterable[DeviceSpec]) -> list[Route]:
    devices = list(devices)
    sessions = sessions_of(devices)
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
                    session=sessions[device.name],
                    zone=zone(ds.timezone) if ds.timezone else None,
                )
            )
    return routes


class Router:
    """Sans-I/O: which points a message on a topic is for, and their readings.

    Overlapping filters (``homeassistant/sensor/+/state`` and ``+/sensor/+/state``)
    make a broker send a message once per matching subscription. A filter covered by
    another is not subscribed at all; the rest get MQTT 5 subscription identifiers, and
    each delivered copy is read only by the points of the subscriptions it names, so
    one publish is one reading per point whatever the copies."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self.sessions = {r.device: r.session for r in self.routes}
        wanted: dict[str, int] = {}
        for r in self.routes:
            sub = r.pattern.subscription
            wanted[sub] = max(wanted.get(sub, 0), r.qos)
        for s in self.sessions.values():
            if s.availability is not None:
                sub = s.availability.subscription
                wanted[sub] = max(wanted.get(sub, 0), s.settings.qos)
        # a filter another one strictly covers would only bring copies: not subscribed
        kept: dict[str, int] = {}
        for sub, qos in wanted.items():
            if not any(covers(o, sub) and (o != sub) for o in wanted if not covers(sub, o)):
                kept[sub] = qos
        self._filters = [(TopicPattern(sub), i + 1) for i, sub in enumerate(kept)]
        for sub, qos in wanted.items():  # a covering filter takes the highest qos
            for f, _ in self._filters:
                if covers(f.subscription, sub):
                    kept[f.subscription] = max(kept[f.subscription], qos)
        self._subscriptions = kept
        self._ids = {f.subscription: i for f, i in self._filters}
        self._route_ids = [self._ids_of(r.pattern) for r in self.routes]
        self._availability_ids = {
            s.device: self._ids_of(s.availability)
            for s in self.sessions.values()
            if s.availability is not None
        }
        #: point id -> hash of the last payload it read (a retained repeat is not new)
        self._last: dict[int, int] = {}
        #: identifiers of the subscriptions the broker refused: no copy comes for them
        self.refused: set[int] = set()

    def subscriptions(self) -> dict[str, int]:
        """Each MQTT filter to subscribe to, with the highest qos asked for it; a filter
        another covers is left out (it would only bring copies)."""
        return dict(self._subscriptions)

    def subscription_id(self, sub: str) -> int:
        """The MQTT 5 subscription identifier of a filter `subscriptions` lists."""
        return self._ids[sub]

    def _ids_of(self, pattern: TopicPattern) -> frozenset[int]:
        """The identifiers of the subscribed filters that bring `pattern`'s messages."""
        sub = pattern.subscription
        return frozenset(i for f, i in self._filters if covers(f.subscription, sub))

    def route(
        self,
        topic: str,
        payload: bytes,
        retained: bool = False,
        sub_ids: Collection[int] | None = None,
    ) -> Delivery:
        """What one copy means. `sub_ids` are the subscription identifiers the copy
        carries (MQTT 5): it is read only by the points of those subscriptions. None
        (MQTT 3.1.1, or a tool): by every point whose topic matches."""
        out = Delivery()
        matching = [
            i for f, i in self._filters if i not in self.refused and f.match(topic) is not None
        ]
        if sub_ids is not None and matching:
            out.counted = min(matching) in sub_ids
        # per device, the first subscription that brings it this message: the device
        # counts the message on that copy only (one message, whatever the copies)
        firsts: dict[str, int] = {}
        digest = hash(payload)
        for r, ids in zip(self.routes, self._route_ids, strict=True):
            if not r.accepts(topic) or r.session.ignores(topic):
                continue
            ids = ids - self.refused if self.refused else ids
            if ids:
                firsts[r.device] = min(firsts.get(r.device, min(ids)), min(ids))
            if sub_ids is not None and ids.isdisjoint(sub_ids):
                continue  # another copy brings it to this point
            pid = r.point.id
            if retained:
                if r.session.retained == "ignore":
                    out.retained_skipped.append((r, "ignore"))
                    continue
                if self._last.get(pid) == digest:
                    out.retained_skipped.append((r, "repeat"))
                    continue
            if r.session.retained == "once":
                self._remember(pid, digest)
            ps = r.point.settings
            assert isinstance(ps, MqttPointSettings)
            try:
                reading = parse(payload, ps, unit=r.point.unit, zone=r.zone)
            except PayloadError as exc:
                out.outcomes.append(Outcome(r, reason=exc.reason, detail=exc.detail))
                continue
            if reading is None:
                out.outcomes.append(Outcome(r, absent=True))
                continue
            value, ts, quality, note = reading
            if retained and ts is None and quality == GOOD:
                quality = UNCERTAIN  # a retained value the payload does not date may be long dead
            out.outcomes.append(Outcome(r, value, ts, quality=quality, note=note))
        for s in self.sessions.values():
            if s.availability is None or not s.is_own(s.availability, topic):
                continue
            ids = self._availability_ids[s.device] - self.refused
            if ids:
                firsts[s.device] = min(firsts.get(s.device, min(ids)), min(ids))
            if sub_ids is not None and ids.isdisjoint(sub_ids):
                continue
            online, word = s.availability_of(payload)
            out.availability.append((s.device, online, word))
        out.ignored_by = [
            d for d, s in self.sessions.items() if d not in firsts and s.ignores(topic)
        ]
        out.devices = [
            d for d in self.sessions if d in firsts and (sub_ids is None or firsts[d] in sub_ids)
        ]
        return out

    def _remember(self, pid: int, digest: int) -> None:
        last = self._last
        last.pop(pid, None)
        if len(last) >= MAX_REMEMBERED:
            del last[next(iter(last))]
        last[pid] = digest


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
        s.mqtt_version,
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
    #: messages only an ignore_topics filter wanted, retained copies not taken
    ignored: int = 0
    retained_skipped: int = 0
    last_link_error: str | None = None
    subscribed: dict[str, int] = field(default_factory=dict)
    client: SiteClient | None = None  # while connected (a local rule publishes through it)

    @property
    def where(self) -> str:
        a = self.settings.address
        return f"{a.host}:{a.port}"


class SiteClient(MqttClient):
    """The client of a site broker: the agent's MQTT client (a connection attempt ends at
    a reset), which also notes whether the broker takes subscription identifiers (its
    CONNACK says so; sending one to a broker that does not is a protocol error)."""

    subscription_ids: bool = True

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        available = getattr(properties, "SubscriptionIdentifierAvailable", 1)
        self.subscription_ids = properties is not None and bool(available)
        super()._on_connect(client, userdata, flags, reason_code, properties)


def client_for(settings: MqttDeviceSettings, client_id: str) -> SiteClient:
    """An aiomqtt client for a device's broker settings (not yet connected)."""
    address = settings.address
    v5 = settings.mqtt_version == "5"
    tls = None
    if address.tls or settings.ca_file or settings.cert_file:
        tls = tls_context(
            str(settings.ca_file) if settings.ca_file else None,
            str(settings.cert_file) if settings.cert_file else None,
            str(settings.key_file) if settings.key_file else None,
        )
    return SiteClient(
        address.host,
        address.port,
        username=settings.username,
        password=settings.password.get_secret_value() if settings.password else None,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        # a clean session either way (MQTT 5 calls it clean start)
        clean_session=None if v5 else True,
        clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        keepalive=int(settings.keepalive),
        timeout=10.0,
        tls_context=tls,
        max_queued_incoming_messages=MAX_QUEUED_MESSAGES,
    )


def subscribe_properties(sub_id: int) -> Properties:
    """SUBSCRIBE properties carrying an MQTT 5 subscription identifier."""
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = sub_id
    return props


def subscription_ids(message: aiomqtt.Message) -> list[int] | None:
    """The subscription identifiers a delivered copy carries (None: none, MQTT 3.1.1)."""
    ids = getattr(message.properties, "SubscriptionIdentifier", None)
    if ids is None:
        return None
    return list(ids) if isinstance(ids, list) else [int(ids)]


def granted(result: object) -> bool:
    """Whether a SUBACK granted the subscription (MQTT 5 reason codes, 3.1.1 qos)."""
    codes = result if isinstance(result, list | tuple) else [result]
    for code in codes:
        value = code.value if isinstance(code, ReasonCode) else code
        if not isinstance(value, int) or value >= 0x80:
            return False
    return True


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
        """Each point's topic, ignore_topics filter and the availability_topic behind the
        device's topic_prefix must be valid patterns, and a point whose unit comes from
        the payload needs a unit to convert to."""
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
        extra: list[tuple[tuple[str | int, ...], str]] = [
            (("ignore_topics", i), t) for i, t in enumerate(device.ignore_topics)
        ]
        if device.availability_topic is not None:
            extra.append((("availability_topic",), device.availability_topic))
        for key_path, topic in extra:
            try:
                TopicPattern(join_topic(device.topic_prefix, topic))
            except TopicPatternError as exc:
                prefix = device.topic_prefix
                where = f"behind topic_prefix {prefix!r}: " if prefix else ""
                problems.append(DeviceConfigProblem(key_path, f"{where}{exc}"))
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
        for link in self.links:
            subs = list(link.router.subscriptions())
            crossing = [(a, b) for i, a in enumerate(subs) for b in subs[i + 1 :] if overlap(a, b)]
            if crossing and link.settings.mqtt_version != "5":
                a, b = crossing[0]
                log.warning(
                    "filters %s and %s overlap: over MQTT 3.1.1 a broker may send a message both "
                    'match twice, and it would be read twice (mqtt_version = "5" tells the '
                    "copies apart)",
                    a,
                    b,
                    extra={"devices": ",".join(link.devices)},
                )
        for health in self._health.values():
            health.messages = 0  # event-driven: status counts messages, not polls

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
                    v5 = link.settings.mqtt_version == "5" and client.subscription_ids
                    if not v5 and link.settings.mqtt_version == "5":
                        self._no_subscription_ids(link)
                    link.subscribed = {}
                    link.router.refused.clear()
                    for topic, qos in subscriptions.items():
                        sub_id = link.router.subscription_id(topic)
                        props = subscribe_properties(sub_id) if v5 else None
                        result = await client.subscribe(topic, qos, properties=props)
                        if granted(result):
                            link.subscribed[topic] = qos
                        else:
                            link.router.refused.add(sub_id)
                            self._refused(link, topic, result)
                    link.connected, link.client = True, client
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
                        self.handle(
                            link,
                            message.topic.value,
                            payload_bytes(message),
                            sink,
                            retained=bool(message.retain),
                            sub_ids=subscription_ids(message),
                        )
            except aiomqtt.MqttError as exc:
                self._link_down(link, str(exc) or type(exc).__name__)
            except OSError as exc:  # e.g. a TLS file that went away
                self._link_down(link, str(exc))
            link.connected, link.client = False, None
            link.subscribed = {}
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self.reconnect_max_s)

    async def publish(self, device: str, topic: str, payload: bytes, retain: bool) -> None:
        link = next((k for k in self.links if device in k.devices), None)
        if link is None:
            raise LookupError(f"no MQTT device {device!r}")
        if link.client is None:
            raise ConnectionError(f"site broker {link.where} of {device!r} is not connected")
        await link.client.publish(topic, payload, qos=1, retain=retain)

    def _no_subscription_ids(self, link: Link) -> None:
        if (n := self._throttle.ready(f"no-sub-ids:{link.where}")) is not None:
            log.warning(
                "broker %s does not take subscription identifiers: a message that "
                "crossing filters match may be read twice (%d connects)",
                link.where,
                n,
            )

    def _refused(self, link: Link, topic: str, result: object) -> None:
        """A subscription the broker refused (an ACL, say): its points stay silent."""
        message = f"broker {link.where} refused the subscription to {topic}: {result}"
        link.last_link_error = message
        devices = {r.device for r in link.router.routes if covers(topic, r.pattern.subscription)}
        for device in sorted(devices):
            self._health[device].failure(message)
        if (n := self._throttle.ready(f"refused:{link.where}:{topic}")) is not None:
            log.warning("%s (%d times)", message, n)

    def _link_down(self, link: Link, error: str) -> None:
        message = f"broker {link.where}: {error}"
        link.last_link_error = message
        for name in link.devices:
            self._health[name].failure(message)
        if (n := self._throttle.ready(f"link:{link.where}")) is not None:
            log.warning("%s; reconnecting (%d times)", message, n)

    def handle(
        self,
        link: Link,
        topic: str,
        payload: bytes,
        sink: BatchSink,
        retained: bool = False,
        sub_ids: Sequence[int] | None = None,
    ) -> Batch | None:
        """One delivered copy of a message: readings pushed as one batch, availability
        and failures in the devices' health. Returns the batch pushed (or refused by the
        sink), None if there was none."""
        received_ms = time.time_ns() // 1_000_000
        d = link.router.route(topic, payload, retained, sub_ids)
        for device in d.devices:
            health = self._health[device]
            health.messages = (health.messages or 0) + 1
        if d.counted and d.unmatched:
            link.unmatched += 1
            if (n := self._throttle.ready(f"unmatched:{topic}")) is not None:
                log.warning(
                    "message on %s dropped: no point's topic matches (%d in the last minute)",
                    topic,
                    n,
                )
            return None
        if d.counted and d.ignored_by and not (d.outcomes or d.availability):
            link.ignored += 1
        if d.counted and d.retained_skipped:
            link.retained_skipped += 1
        for device, online, word in d.availability:
            self._availability(device, topic, online, word, link)
        good = [o for o in d.outcomes if o.ok]
        per_device: dict[str, int] = {}
        for o in d.outcomes:
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
            if not accepted:
                health.skipped_polls += 1
            elif health.online is False:  # readings, but only its LWT says it is back
                health.readings += count
            else:
                health.success(count)
        if not accepted and (k := self._throttle.ready(f"full:{link.where}")) is not None:
            log.warning(
                "agent saturated: readings from %s dropped (%d messages in the last minute)",
                link.where,
                k,
            )
        return batch

    def _availability(
        self, device: str, topic: str, online: bool | None, word: str, link: Link
    ) -> None:
        """A device's availability word: offline makes it unhealthy until online."""
        health = self._health[device]
        if online is None:
            link.rejected += 1
            health.failure(f"{topic}: availability word {word} is neither online nor offline")
            health.reject("bad_availability")
            return
        was = health.online
        health.online = online
        if online:
            health.consecutive_failures = 0
            if was is False:
                log.info("%s is online again (%s: %s)", device, topic, word)
        else:
            health.failure(f"offline: {topic} says {word}")
            if was is not False:
                log.warning("%s is offline (%s: %s)", device, topic, word)
