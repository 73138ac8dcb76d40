"""The platform's ingest worker: MQTT uplinks -> decoded batches -> store, exactly once.

Several workers share the load on an MQTT 5 shared subscription
(``$share/<group>/<prefix>/+/up/#``); the broker gives each message to one of them and
the store's dedup key (gateway, stream, seq) drops whatever is delivered twice
(resends after a gateway reconnect, redelivery after a worker died).

A message is acknowledged (PUBACK) only after its batch is committed to the store
(paho's manual ack), so a worker killed between receive and commit loses nothing: the
broker redelivers within the session. One consumer task stores messages in arrival
order (so per gateway too), several at a time in one transaction, in a worker thread
so the event loop stays free. Garbage is counted by reason, logged at WARNING
(rate-limited), acknowledged and dropped; it never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent import wire
from agent.ingest.store import Body, Store, open_store
from agent.logs import Throttle
from agent.mqtt_url import BrokerAddress, tls_context
from agent.wire import Envelope, Meta, WireError
from native import codec
from native.batch import Batch

log = logging.getLogger("citygw.ingest")

DEFAULT_GROUP = "citygw-ingest"


@dataclass
class IngestCounters:
    messages: int = 0  # messages received (all topics)
    batches_stored: int = 0
    readings_stored: int = 0
    alarms_stored: int = 0
    duplicates_dropped: int = 0
    metas_stored: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    store_errors: int = 0  # failed store attempts (retried, nothing lost)
    connects: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass(slots=True)
class _Item:
    client: aiomqtt.Client
    message: aiomqtt.Message


@dataclass(slots=True)
class _Work:
    batches: list[tuple[str, Envelope, Body]] = field(default_factory=list)
    metas: list[tuple[str, Meta]] = field(default_factory=list)
    stats: list[wire.GatewayStats] = field(default_factory=list)


class IngestWorker:
    def __init__(
        self,
        broker: str,
        store: Store,
        group: str | None = DEFAULT_GROUP,
        prefix: str = wire.DEFAULT_PREFIX,
        *,
        client_id: str | None = None,
        session_expiry: int = 0,
        keepalive: int = 10,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        max_group: int = 256,
        receive_maximum: int = 1024,
        ca_file: str | None = None,
    ) -> None:
        """`client_id` with `session_expiry` > 0 gives a persistent session: the broker
        keeps this worker's queued and unacknowledged messages while it is away."""
        self.broker = broker
        self.address = BrokerAddress.parse(broker)
        self.store = store
        self.group = group or None
        self.prefix = prefix
        self.filters = wire.ingest_filters(prefix, self.group)
        self.client_id = client_id or f"citygw-ingest-{uuid.uuid4().hex[:12]}"
        self.session_expiry = session_expiry if client_id else 0
        self.keepalive = keepalive
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.max_group = max_group
        self.receive_maximum = receive_maximum
        self.ca_file = ca_file
        self.counters = IngestCounters()
        self.connected = asyncio.Event()  # set while subscribed
        self._throttle = Throttle(10.0)
        self._queue: asyncio.Queue[_Item] | None = None

    # -- public ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Receive and store until cancelled; reconnects with backoff."""
        self._queue = asyncio.Queue(maxsize=self.max_group * 4)
        consumer = asyncio.create_task(self._consume(self._queue), name="ingest-store")
        backoff = self.backoff_min
        try:
            while True:
                if consumer.done():  # pragma: no cover - _consume does not return
                    consumer.result()
                try:
                    await self._session(self._queue)
                except aiomqtt.MqttError as e:
                    if self.connected.is_set():
                        backoff = self.backoff_min
                    self.connected.clear()
                    if isinstance(e.__context__, ConnectionRefusedError):
                        # nobody listening (broker restarting): a refused connect costs
                        # nothing, and subscribing before the gateways reconnect matters
                        # on a broker that lost its sessions (they would publish into
                        # the void), so keep trying at the shortest interval.
                        backoff = self.backoff_min
                    delay = backoff * random.uniform(0.5, 1.0)
                    attempts = self._throttle.ready("reconnect")
                    if attempts is not None:
                        log.warning(
                            "ingest: broker connection lost, reconnecting",
                            extra={
                                "broker": self.broker,
                                "error": str(e),
                                "retry_s": round(delay, 2),
                                "attempts": attempts,
                            },
                        )
                    await asyncio.sleep(delay)
                    backoff = min(backoff * 2, self.backoff_max)
        finally:
            self.connected.clear()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer

    # -- receiving ------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        a = self.address
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = self.receive_maximum
        if self.session_expiry:
            props.SessionExpiryInterval = self.session_expiry
        client = aiomqtt.Client(
            a.host,
            a.port,
            identifier=self.client_id,
            username=a.username,
            password=a.password,
            protocol=aiomqtt.ProtocolVersion.V5,
            keepalive=self.keepalive,
            tls_context=tls_context(self.ca_file) if a.tls else None,
            clean_start=not self.session_expiry,
            properties=props,
        )
        # PUBACK only after the store committed (see module docstring)
        paho = client._client
        if hasattr(paho, "manual_ack_set"):
            paho.manual_ack_set(True)
        return client

    async def _session(self, queue: asyncio.Queue[_Item]) -> None:
        client = self._client()
        async with client:
            for f in self.filters:
                await client.subscribe(f, qos=1)
            self.counters.connects += 1
            self.connected.set()
            log.info(
                "ingest: subscribed",
                extra={"broker": self.broker, "filters": self.filters, "client_id": self.client_id},
            )
            async for message in client.messages:
                await queue.put(_Item(client, message))

    # -- storing --------------------------------------------------------------------------

    async def _consume(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            items = [await queue.get()]
            while len(items) < self.max_group and not queue.empty():
                items.append(queue.get_nowait())
            messages = [(i.message.topic.value, i.message.payload) for i in items]
            work = await asyncio.to_thread(self._decode, messages)
            await self._store(work)
            for item in items:
                self._ack(item)

    def _ack(self, item: _Item) -> None:
        m = item.message
        if m.qos == 0:
            return
        paho: Any = item.client._client
        if getattr(paho, "_manual_ack", False):
            try:
                paho.ack(m.mid, m.qos)
            except Exception:  # the connection is gone: the broker will redeliver
                log.debug("ingest: ack failed", exc_info=True)

    async def _store(self, work: _Work) -> None:
        delay = self.backoff_min
        while True:
            try:
                if work.batches:
                    results = await asyncio.to_thread(self._store_batches, work.batches)
                    stored = [b for b, ok in zip(work.batches, results, strict=True) if ok]
                    self.counters.batches_stored += len(stored)
                    for _, _, body in stored:
                        if isinstance(body, Batch):
                            self.counters.readings_stored += len(body)
                        else:
                            self.counters.alarms_stored += len(body)
                    self.counters.duplicates_dropped += len(results) - len(stored)
                    work.batches = []
                while work.metas:
                    gateway, meta = work.metas[0]
                    await asyncio.to_thread(self.store.store_meta, gateway, meta)
                    self.counters.metas_stored += 1
                    work.metas.pop(0)
                while work.stats:
                    await asyncio.to_thread(self.store.store_stats, work.stats[0])
                    work.stats.pop(0)
                return
            except Exception as e:
                self.counters.store_errors += 1
                log.error(
                    "ingest: store failed, retrying (messages not acknowledged)",
                    extra={"error": repr(e), "retry_s": round(delay, 2)},
                    exc_info=self._throttle.ready("store-error") is not None,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    def _store_batches(self, items: Sequence[tuple[str, Envelope, Body]]) -> list[bool]:
        return self.store.store_batches(items)

    async def deliver(self, topic: str, payload: bytes) -> None:
        """Decode and store one message handed over in-process (no broker), returning
        once it is committed: what a PUBACK after commit means (see agent/loopback.py)."""
        await self._store(await asyncio.to_thread(self._decode, [(topic, payload)]))

    def _decode(self, messages: Sequence[tuple[str, object]]) -> _Work:
        """Runs in a thread: topic, envelope and codec checks; rejects are counted."""
        work = _Work()
        for topic, payload in messages:
            self.counters.messages += 1
            try:
                gateway, kind = wire.parse_topic(topic, self.prefix)
            except WireError as e:
                self._reject("topic", topic, e)
                continue
            if not isinstance(payload, bytes | bytearray):
                self._reject("payload", topic, f"payload type {type(payload).__name__}")
                continue
            if kind == wire.KIND_META:
                try:
                    meta = wire.decode_meta(payload)
                except WireError as e:
                    self._reject("meta", topic, e)
                    continue
                if meta.gateway != gateway:
                    self._reject("meta_gateway", topic, f"meta says gateway {meta.gateway!r}")
                    continue
                work.metas.append((gateway, meta))
                continue
            if kind == wire.KIND_STATS:
                try:
                    stats = wire.decode_stats(payload)
                except WireError as e:
                    self._reject("stats", topic, e)
                    continue
                if stats.gateway != gateway:
                    self._reject("gateway", topic, f"stats say gateway {stats.gateway!r}")
                    continue
                work.stats.append(stats)
                continue
            if kind not in (wire.KIND_BATCH, wire.KIND_ALARM):
                self._reject("topic", topic, f"not an uplink topic ({kind})")
                continue
            try:
                env = wire.unwrap(payload)
            except WireError as e:
                self._reject("envelope", topic, e)
                continue
            if not wire.lane_matches_kind(env.lane, kind):
                self._reject("lane", topic, f"lane {env.lane_name} on {kind}")
                continue
            body: Body
            if kind == wire.KIND_ALARM:
                try:
                    claimed, body = wire.decode_alarms(env.body)
                except WireError as e:
                    self._reject("alarm", topic, e)
                    continue
            else:
                try:
                    decoded = codec.decode_message(env.body)
                except Exception as e:  # CodecError, or a codec bug: never crash on input
                    self._reject("codec", topic, e)
                    continue
                claimed, body = decoded.gateway, decoded.batch
                if decoded.version >= 2 and decoded.seq != env.seq:
                    self._reject("seq", topic, f"envelope seq {env.seq}, batch seq {decoded.seq}")
                    continue
            if claimed and claimed != gateway:
                self._reject("gateway", topic, f"the body says gateway {claimed!r}")
                continue
            if len(body) != env.n_points:
                self._reject("n_points", topic, f"header says {env.n_points}, body has {len(body)}")
                continue
            work.batches.append((gateway, env, body))
        return work

    def _reject(self, reason: str, topic: str, error: object) -> None:
        r = self.counters.rejected
        r[reason] = r.get(reason, 0) + 1
        n = self._throttle.ready(f"reject-{reason}")
        if n is not None:
            log.warning(
                "ingest: message rejected",
                extra={
                    "reason": reason,
                    "topic": topic[:200],
                    "error": str(error)[:300],
                    "count": n,
                },
            )


async def run_ingest(
    broker: str,
    db_url: str,
    group: str | None = DEFAULT_GROUP,
    prefix: str = wire.DEFAULT_PREFIX,
    client_id: str | None = None,
    session_expiry: int = 0,
) -> None:
    """`citygw ingest --broker URL --db URL --group NAME`: run until cancelled."""
    store = await asyncio.to_thread(open_store, db_url)
    try:
        log.info(
            "ingest: starting",
            extra={"broker": broker, "db": db_url.split("?")[0], "group": group, "prefix": prefix},
        )
        worker = IngestWorker(
            broker,
            store,
            group=group,
            prefix=prefix,
            client_id=client_id,
            session_expiry=session_expiry,
        )
        await worker.run()
    finally:
        await asyncio.to_thread(store.close)
