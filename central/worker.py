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
(rate-limited), kept aside in the store's dead-letter table and then acknowledged, so it
never blocks the queue nor stops the worker.

A store error is classified (`store_errors.classify`). Transient (the store cannot take
anything now: connection lost, server restarting, locked, disk full): the same messages
are tried again with backoff for as long as it lasts, unacknowledged. Refused (this data
can never be stored): the group is split in halves until the refused message stands
alone; the others are stored, it becomes a dead letter (reason ``unstorable``) and all
are acknowledged. Unknown: retried `UNKNOWN_ERROR_ATTEMPTS` times, then handled as
refused for a message that still fails on its own.

A second task, on a store connection of its own (PostgreSQL), drains the store's rollup
queue every second (`Store.roll_up`: the ten-minute rollup PostgreSQL's `series` reads);
workers share it, and a failure there is logged, counted and retried with backoff without
holding up the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from central.service import notify_service
from central.store import DEAD_LETTER_MAX_BYTES, AlarmBody, Body, DeadLetter, Store
from central.store_errors import StoreFault, classify
from central.stores import open_store
from common import wire
from common.logs import Throttle
from common.mqtt_url import BrokerAddress, tls_context
from common.reconnect import (
    STABLE_AFTER_S,
    MqttClient,
    ReconnectPolicy,
    ReconnectSettings,
    check_cancelled,
    tcp_probe,
)
from common.redact import redact
from common.sdnotify import Notifier
from common.wire import Envelope, Meta, WireError
from native import codec
from native.batch import Batch

log = logging.getLogger("citygw.ingest")

DEFAULT_GROUP = "citygw-ingest"

#: store calls that fail with an error `classify` does not know, before the message that
#: still fails alone is dead-lettered (transient errors are retried without limit)
UNKNOWN_ERROR_ATTEMPTS: Final = 4
#: the reject reason of a message that decoded but that the store refuses
UNSTORABLE: Final = "unstorable"
#: the rollup of stored readings (`Store.roll_up`): drained this often, this many
#: blocks per transaction (short: it holds the store's connection the ingest writes on)
ROLL_UP_EVERY_S: Final = 1.0
ROLL_UP_BLOCKS: Final = 200

_T = TypeVar("_T")


@dataclass
class IngestCounters:
    messages: int = 0  # messages received (all topics)
    batches_stored: int = 0
    readings_stored: int = 0
    alarms_stored: int = 0
    actions_stored: int = 0  # local rule actions (alarm lane)
    duplicates_dropped: int = 0
    metas_stored: int = 0
    states_stored: int = 0
    retained_cleared: int = 0  # empty retained meta/stats/state: a gateway retired
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    dead_letters_stored: int = 0
    # failed store calls: retried, or for data the store refuses, its message dead-lettered
    store_errors: int = 0
    dead_letters_lost: int = 0  # dead letters the store refused too: logged, then acked
    blocks_rolled_up: int = 0  # stored blocks folded into the store's rollup (`roll_up`)
    roll_up_errors: int = 0  # failed roll_up calls (retried with backoff)
    connects: int = 0

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass(slots=True)
class _Item:
    client: aiomqtt.Client
    message: aiomqtt.Message


@dataclass(frozen=True, slots=True)
class _Source:
    """The message a decoded item came from: what its dead letter keeps if it is refused."""

    topic: str
    payload: bytes


@dataclass(slots=True)
class _Work:
    batches: list[tuple[str, Envelope, Body, _Source]] = field(default_factory=list)
    metas: list[tuple[str, Meta, _Source]] = field(default_factory=list)
    stats: list[tuple[wire.GatewayStats, _Source]] = field(default_factory=list)
    states: list[tuple[str, bool, _Source]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Refused:
    """A store call given up on: the data was refused (or an unknown error persisted)."""

    error: BaseException


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
        probe_interval: float = 0.25,
        reconnect_spread: float = 0.25,
        max_group: int = 256,
        receive_maximum: int = 1024,
        ca_file: str | None = None,
        roll_up_store: Store | None = None,
    ) -> None:
        """`roll_up_store`: the store object (connection) the roll-up task uses, so that
        folding blocks in never pauses storing on `store`'s (default: `store`).
        `client_id` with `session_expiry` > 0 gives a persistent session: the broker
        keeps this worker's queued and unacknowledged messages while it is away.
        `probe_interval` and `reconnect_spread`: common/reconnect.py (short: a platform runs
        few workers, and they should subscribe before the gateways are back)."""
        self.broker = broker
        self.address = BrokerAddress.parse(broker)
        self.store = store
        self.roll_up_store = roll_up_store or store
        self.group = group or None
        self.prefix = prefix
        self.filters = wire.ingest_filters(prefix, self.group)
        self.client_id = client_id or f"citygw-ingest-{uuid.uuid4().hex[:12]}"
        self.session_expiry = session_expiry if client_id else 0
        self.keepalive = keepalive
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.probe_interval = probe_interval
        self.reconnect_spread = reconnect_spread
        self.max_group = max_group
        self.receive_maximum = receive_maximum
        self.ca_file = ca_file
        self.counters = IngestCounters()
        #: called with (what, seconds) after each successful store call (ingest_metrics.py)
        self.observe_store: Callable[[str, float], None] | None = None
        self.connected = asyncio.Event()  # set while subscribed
        #: time.monotonic() of the store loop's last turn (a group taken, a store call
        #: tried); None while it waits for messages: idle is no lack of progress
        self.store_turned: float | None = None
        self._throttle = Throttle(10.0)
        self._queue: asyncio.Queue[_Item] | None = None
        self._online_since: float | None = None  # time.monotonic() of the last subscribe

    # -- public ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Receive and store until cancelled; reconnects by common/reconnect.py's policy:
        backoff, and probes of the broker's port that bring the worker back (subscribed)
        within about `probe_interval` + `reconnect_spread` of a broker's restart, which
        matters on a broker that lost its sessions (gateways would publish into the void)."""
        self._queue = asyncio.Queue(maxsize=self.max_group * 4)
        consumer = asyncio.create_task(self._consume(self._queue), name="ingest-store")
        roll_up = asyncio.create_task(self._roll_up(), name="ingest-roll-up")
        reconnect = ReconnectPolicy(
            ReconnectSettings(
                self.backoff_min,
                self.backoff_max,
                self.probe_interval,
                self.reconnect_spread,
                stable_after=min(self.backoff_max, STABLE_AFTER_S),
            ),
            tcp_probe(self.address.host, self.address.port),
            name="ingest",
        )
        try:
            while True:
                for task in (consumer, roll_up):
                    if task.done():  # pragma: no cover - neither returns
                        task.result()
                self._online_since = None
                try:
                    await self._session(self._queue)
                except aiomqtt.MqttError as e:
                    self.connected.clear()
                    online = self._online_since
                    online_s = None if online is None else time.monotonic() - online
                    delay = reconnect.failed(e, online_s)
                    attempts = self._throttle.ready("reconnect")
                    if attempts is not None:
                        log.warning(
                            "ingest: broker connection lost, reconnecting",
                            extra={
                                "broker": redact(self.broker),
                                "error": str(e),
                                "retry_s": round(delay, 2),
                                "attempts": attempts,
                            },
                        )
                    await reconnect.wait()
        finally:
            self.connected.clear()
            for task in (consumer, roll_up):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- receiving ------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        a = self.address
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = self.receive_maximum
        if self.session_expiry:
            props.SessionExpiryInterval = self.session_expiry
        client = MqttClient(  # ends an attempt at a reset, not at its timeout
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
                if f.startswith("$share/"):
                    await client.subscribe(f, qos=1)
                else:
                    # retained topics: replayed when the subscription is new, not when a
                    # resumed session still holds it (thousands of metas per restart)
                    await client.subscribe(f, options=SubscribeOptions(qos=1, retainHandling=1))
            check_cancelled()  # one a subscribe above swallowed
            self.counters.connects += 1
            self._online_since = time.monotonic()
            self.connected.set()
            log.info(
                "ingest: subscribed",
                extra={
                    "broker": redact(self.broker),
                    "filters": self.filters,
                    "client_id": self.client_id,
                },
            )
            async for message in client.messages:
                await queue.put(_Item(client, message))

    # -- storing --------------------------------------------------------------------------

    async def _consume(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            self.store_turned = None
            items = [await queue.get()]
            self.store_turned = time.monotonic()
            while len(items) < self.max_group and not queue.empty():
                items.append(queue.get_nowait())
            messages = [(i.message.topic.value, i.message.payload) for i in items]
            work = await asyncio.to_thread(self._decode, messages)
            await self._store(work)
            for item in items:
                self._ack(item)

    async def _roll_up(self) -> None:
        """Every `ROLL_UP_EVERY_S`, fold what was stored since into the store's rollup
        until none is left (several workers share it). A failure is logged (throttled)
        and counted, and the call retried with backoff; the queue waits in the store."""
        delay = self.backoff_min
        while True:
            try:
                while True:
                    n = await asyncio.to_thread(self.roll_up_store.roll_up, ROLL_UP_BLOCKS)
                    self.counters.blocks_rolled_up += n
                    if n < ROLL_UP_BLOCKS:
                        break
            except Exception as e:
                self.counters.roll_up_errors += 1
                self._log_store_failure(
                    e, classify(e), delay, "roll-up", "ingest: roll-up failed, retrying"
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = self.backoff_min
            await asyncio.sleep(ROLL_UP_EVERY_S)

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
        """Store everything in `work`. Returns once each message is stored or kept as a
        dead letter, so that all of them may be acknowledged (see the module doc)."""
        if work.batches:
            await self._store_uplinks(work, work.batches, UNKNOWN_ERROR_ATTEMPTS)
            work.batches = []
        for gateway, meta, src in work.metas:
            done = await self._call(partial(self.store.store_meta, gateway, meta), "meta")
            if isinstance(done, _Refused):
                self._unstorable(work, src, done.error)
            else:
                self.counters.metas_stored += 1
        work.metas = []
        for stats, src in work.stats:
            done = await self._call(partial(self.store.store_stats, stats), "stats")
            if isinstance(done, _Refused):
                self._unstorable(work, src, done.error)
        work.stats = []
        now = time.time_ns() // 1_000_000
        for gateway, online, src in work.states:
            store_state = partial(self.store.store_state, gateway, online, now)
            done = await self._call(store_state, "state")
            if isinstance(done, _Refused):
                self._unstorable(work, src, done.error)
            else:
                self.counters.states_stored += 1
        work.states = []
        await self._store_dead_letters(work.dead)
        work.dead = []

    async def _store_uplinks(
        self, work: _Work, items: list[tuple[str, Envelope, Body, _Source]], attempts: int
    ) -> None:
        """`items` in one transaction; if the store refuses them, each half on its own
        until the refused uplink stands alone. Every call is one transaction with the
        dedup keys in it, so whatever a call stored is stored once."""
        uplinks = [(gateway, env, body) for gateway, env, body, _ in items]
        done = await self._call(partial(self.store.store_batches, uplinks), "uplinks", attempts)
        if not isinstance(done, _Refused):
            self._count_uplinks(uplinks, done)
            return
        if len(items) == 1:
            self._unstorable(work, items[0][3], done.error)
            return
        half = len(items) // 2
        for part in (items[:half], items[half:]):  # in order: per gateway too
            # an unknown error gets its full retries again only where it is alone
            await self._store_uplinks(work, part, UNKNOWN_ERROR_ATTEMPTS if len(part) == 1 else 1)

    def _count_uplinks(
        self, uplinks: list[tuple[str, Envelope, Body]], results: list[bool]
    ) -> None:
        stored = [(g, body) for (g, _, body), ok in zip(uplinks, results, strict=True) if ok]
        self.counters.batches_stored += len(stored)
        for gateway, body in stored:
            if isinstance(body, Batch):
                self.counters.readings_stored += len(body)
            else:
                self.counters.alarms_stored += len(body.events)
                self.counters.actions_stored += len(body.actions)
                for a in body.actions:
                    log.info(
                        "ingest: rule action stored",
                        extra={
                            "gateway": gateway,
                            "rule": a.rule,
                            "transition": a.transition,
                            "action": a.action,
                            "outcome": a.outcome,
                        },
                    )
        self.counters.duplicates_dropped += len(results) - len(stored)

    async def _store_dead_letters(self, letters: list[DeadLetter]) -> None:
        """Kept like everything else: a store that is down is waited for. A letter the
        store refuses (tried alone) is logged and counted as lost, never retried forever:
        its message is acknowledged with the rest."""
        if not letters:
            return
        done = await self._call(partial(self.store.store_dead_letters, letters), "dead letters")
        if not isinstance(done, _Refused):
            self.counters.dead_letters_stored += len(letters)
            return
        if len(letters) > 1:
            for letter in letters:
                await self._store_dead_letters([letter])
            return
        self.counters.dead_letters_lost += 1
        log.error(
            "ingest: the store refused a dead letter too; dropped",
            extra={
                "topic": letters[0].topic[:200],
                "reason": letters[0].reason,
                "size": letters[0].size,
                "error": str(done.error)[:300],
            },
        )

    async def _call(
        self, fn: Callable[[], _T], what: str, attempts: int = UNKNOWN_ERROR_ATTEMPTS
    ) -> _T | _Refused:
        """`fn()` in a thread until it succeeds. A transient error is retried with backoff
        for as long as it lasts; `_Refused` when the store refuses the data, or once
        `attempts` calls failed with an error `classify` does not know."""
        delay = self.backoff_min
        failures = 0
        while True:
            self.store_turned = time.monotonic()
            started = time.perf_counter()
            try:
                result = await asyncio.to_thread(fn)
            except Exception as e:
                self.counters.store_errors += 1
                failures += 1
                fault = classify(e)
                if fault is StoreFault.REFUSED:
                    return _Refused(e)
                if fault is StoreFault.UNKNOWN and failures >= attempts:
                    return _Refused(e)
                self._log_store_failure(
                    e,
                    fault,
                    delay,
                    "store",
                    "ingest: store failed, retrying (messages not acknowledged)",
                    what=what,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
            else:
                if self.observe_store is not None:
                    self.observe_store(what, time.perf_counter() - started)
                return result

    def _log_store_failure(
        self,
        e: Exception,
        fault: StoreFault,
        delay: float,
        kind: str,
        message: str,
        **fields: str,
    ) -> None:
        """A failed store call that will be retried in `delay` s: logged once per throttle
        interval for its `kind` and fault, with how many it stands for (a trace only for
        an error `classify` does not know)."""
        count = self._throttle.ready(f"{kind}-{fault.value}")
        if count is not None:
            log.error(
                message,
                extra={
                    **fields,
                    "fault": fault.value,
                    "error": repr(e)[:500],
                    "retry_s": round(delay, 2),
                    "count": count,
                },
                exc_info=fault is StoreFault.UNKNOWN,
            )

    def _unstorable(self, work: _Work, src: _Source, error: BaseException) -> None:
        self._reject(work, src.topic, src.payload, UNSTORABLE, f"{type(error).__name__}: {error}")

    async def deliver(self, topic: str, payload: bytes) -> None:
        """Decode and store one message handed over in-process (no broker), returning
        once it is committed: what a PUBACK after commit means (see cli/loopback.py)."""
        await self._store(await asyncio.to_thread(self._decode, [(topic, payload)]))

    def _decode(self, messages: Sequence[tuple[str, object]]) -> _Work:
        """Runs in a thread: topic, envelope and codec checks; rejects are counted and
        kept aside."""
        work = _Work()
        for topic, payload in messages:
            self.counters.messages += 1
            reject = self._check(work, topic, payload)
            if reject is not None:
                self._reject(work, topic, payload, *reject)
        return work

    def _check(self, work: _Work, topic: str, payload: object) -> tuple[str, object] | None:
        """Add the message to `work`, or say why not: (reason, error)."""
        try:
            gateway, kind = wire.parse_topic(topic, self.prefix)
        except WireError as e:
            return "topic", e
        if not isinstance(payload, bytes | bytearray):
            return "payload", f"payload type {type(payload).__name__}"
        src = _Source(topic, bytes(payload))
        if not payload and kind in (wire.KIND_META, wire.KIND_STATS, wire.KIND_STATE):
            self.counters.retained_cleared += 1  # how MQTT deletes a retained message
            return None
        if kind == wire.KIND_META:
            try:
                meta = wire.decode_meta(payload)
            except WireError as e:
                return "meta", e
            if meta.gateway != gateway:
                return "meta_gateway", f"meta says gateway {meta.gateway!r}"
            work.metas.append((gateway, meta, src))
            return None
        if kind == wire.KIND_STATS:
            try:
                stats = wire.decode_stats(payload)
            except WireError as e:
                return "stats", e
            if stats.gateway != gateway:
                return "gateway", f"stats say gateway {stats.gateway!r}"
            work.stats.append((stats, src))
            return None
        if kind == wire.KIND_STATE:
            if payload not in (wire.STATE_ONLINE, wire.STATE_OFFLINE):
                return "state", f"state {bytes(payload[:40])!r}, expected online or offline"
            work.states.append((gateway, payload == wire.STATE_ONLINE, src))
            return None
        if kind not in (wire.KIND_BATCH, wire.KIND_ALARM):
            return "topic", f"not an uplink topic ({kind})"
        try:
            env = wire.unwrap(payload)
        except wire.UnknownVersionError as e:
            return "version", e
        except WireError as e:
            return "envelope", e
        if not wire.lane_matches_kind(env.lane, kind):
            return "lane", f"lane {env.lane_name} on {kind}"
        body: Body
        if kind == wire.KIND_ALARM:
            try:
                claimed, events, actions = wire.decode_alarms(env.body)
            except WireError as e:
                return "alarm", e
            body = AlarmBody(events, actions)
        else:
            try:
                decoded = codec.decode_message(env.body)
            except codec.UnknownVersionError as e:
                return "version", e
            except Exception as e:  # CodecError, or a codec bug: never crash on input
                return "codec", e
            claimed, body = decoded.gateway, decoded.batch
            if decoded.version >= 2 and decoded.seq != env.seq:
                return "seq", f"envelope seq {env.seq}, batch seq {decoded.seq}"
        if claimed and claimed != gateway:
            return "gateway", f"the body says gateway {claimed!r}"
        if len(body) != env.n_points:
            return "n_points", f"header says {env.n_points}, body has {len(body)}"
        work.batches.append((gateway, env, body, src))
        return None

    def _reject(self, work: _Work, topic: str, payload: object, reason: str, error: object) -> None:
        r = self.counters.rejected
        r[reason] = r.get(reason, 0) + 1
        raw = bytes(payload) if isinstance(payload, bytes | bytearray) else repr(payload).encode()
        work.dead.append(
            DeadLetter(
                received_ms=time.time_ns() // 1_000_000,
                topic=_storable(topic),
                reason=reason,
                error=_storable(str(error)[:1000]),
                payload=raw[:DEAD_LETTER_MAX_BYTES],
                size=len(raw),
            )
        )
        n = self._throttle.ready(f"reject-{reason}")
        if n is not None:
            log.log(
                # the decoder let through what the store refuses: a gap to close
                logging.ERROR if reason == UNSTORABLE else logging.WARNING,
                "ingest: message rejected, kept as a dead letter",
                extra={
                    "reason": reason,
                    "topic": topic[:200],
                    "error": str(error)[:300],
                    "count": n,
                },
            )


def _storable(text: str) -> str:
    """Text every store keeps (a dead letter's topic or error must never be refused in
    turn): NUL and lone surrogates written as escapes."""
    return text.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")


async def report_throughput(worker: IngestWorker, every: float) -> None:
    """Log the worker's throughput over each interval, until cancelled."""
    c = worker.counters
    last = time.monotonic()
    readings, batches = c.readings_stored, c.batches_stored
    while True:
        await asyncio.sleep(every)
        now = time.monotonic()
        elapsed = max(now - last, 1e-9)
        log.info(
            "ingest: throughput",
            extra={
                "readings_per_s": round((c.readings_stored - readings) / elapsed),
                "batches_per_s": round((c.batches_stored - batches) / elapsed, 1),
                "readings_total": c.readings_stored,
                "duplicates_dropped": c.duplicates_dropped,
                "rejected": c.rejected_total,
                "store_errors": c.store_errors,
                "blocks_rolled_up": c.blocks_rolled_up,
                "roll_up_errors": c.roll_up_errors,
                "connected": worker.connected.is_set(),
            },
        )
        last, readings, batches = now, c.readings_stored, c.batches_stored


async def run_ingest(
    broker: str,
    db_url: str,
    group: str | None = DEFAULT_GROUP,
    prefix: str = wire.DEFAULT_PREFIX,
    client_id: str | None = None,
    session_expiry: int = 0,
    report_every: float = 10.0,
    metrics_address: str = "127.0.0.1",
    metrics_port: int = 0,
    notifier: Notifier | None = None,
) -> None:
    """`citygw ingest --broker URL --db URL --group NAME`: run until cancelled, logging
    the throughput every `report_every` seconds (0: never), serving Prometheus metrics
    at http://metrics_address:metrics_port/metrics (port 0: none). Under systemd
    (`notifier`: from $NOTIFY_SOCKET by default): READY=1 once subscribed, the watchdog
    pinged while the store loop makes progress (central/service.py), STOPPING=1 at the end."""
    notifier = notifier or Notifier()
    store = await asyncio.to_thread(open_store, db_url)
    # PostgreSQL: the roll-up on a connection of its own (SQLite has no roll-up to do)
    roll_up_store = (
        await asyncio.to_thread(open_store, db_url)
        if db_url.startswith(("postgresql://", "postgres://"))
        else None
    )
    try:
        log.info(
            "ingest: starting",
            extra={
                "broker": redact(broker),
                "db": redact(db_url),
                "group": group,
                "prefix": prefix,
            },
        )
        worker = IngestWorker(
            broker,
            store,
            group=group,
            prefix=prefix,
            client_id=client_id,
            session_expiry=session_expiry,
            roll_up_store=roll_up_store,
        )
        helpers = [asyncio.create_task(notify_service(worker, notifier))]
        if report_every > 0:
            helpers.append(asyncio.create_task(report_throughput(worker, report_every)))
        from central.ingest_metrics import serve_ingest_metrics  # it imports this module

        metrics = (
            await serve_ingest_metrics(worker, metrics_address, metrics_port)
            if metrics_port
            else None
        )
        try:
            await worker.run()
        finally:
            notifier.stopping()
            for task in helpers:
                task.cancel()
            if metrics is not None:
                metrics.close()
    finally:
        await asyncio.to_thread(store.close)
        if roll_up_store is not None:
            await asyncio.to_thread(roll_up_store.close)
