"""Poison messages at the platform (issue 12, defect 3): what the store can never accept
is refused at the wire decoder or, if it gets past it, dead-lettered by the worker and
acknowledged, while everything around it is stored exactly once; what fails because the
store is down or busy is retried and never dead-lettered.

"Stalls" are bounded waits here: the worker that retried every store error forever
fails these tests by timing out instead of hanging."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from psycopg import sql

from central import worker as worker_module
from central.store import AlarmBody, Store
from central.store_sqlite import SqliteStore
from central.stores import open_store
from central.worker import IngestWorker
from common import wire
from common.broker import Mosquitto
from native.stages import AlarmEvent
from tests.conftest import PG_ADMIN_URL
from tests.helpers import GW, STREAM, Gateway, wait_until

#: how long a store call may take here before the worker counts as stalled
STALL_S = 15.0

POINT = {"id": 1, "key": "bridge-7/strain", "device": "bridge-7", "name": "strain"}


def meta_payload(gateway: str = GW, point: dict[str, Any] | None = None, **fields: Any) -> bytes:
    obj = {"v": 1, "gateway": gateway, "stream": STREAM, "points": [point or POINT]} | fields
    return orjson.dumps(obj)


def deep_location_meta(levels: int = 300) -> bytes:
    """A meta whose location nests `levels` lists: orjson reads it (up to 1024 levels)
    but writes only 254, so a store that serialises it again fails."""
    nested = b"[" * levels + b"]" * levels
    return meta_payload(location="X").replace(b'"X"', b'{"pole":' + nested + b"}")


def alarm_uplink(seq: int, rule: str = "overstrain", gateway: str = GW) -> bytes:
    event = AlarmEvent(1, rule, "critical", True, 1_700_000_000_500, 612.5, 1_700_000_000_000)
    return wire.wrap(wire.LANE_ALARM, STREAM, seq, 1, wire.encode_alarms(gateway, [event]))


def stats_payload(gateway: str = GW, devices: object = None) -> bytes:
    extra = {} if devices is None else {"devices": devices}
    return orjson.dumps({"v": 1, "gateway": gateway} | {f: 1 for f in wire.STATS_FIELDS} | extra)


@pytest.fixture
def no_wire_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder as it was: the storable-text and location checks off, so that what
    the store refuses reaches the worker."""
    monkeypatch.setattr(wire, "check_text", lambda *a, **k: None)
    monkeypatch.setattr(wire, "_check_location", lambda *a, **k: None, raising=False)


def make_worker(broker: str, store: Any, **kw: Any) -> IngestWorker:
    kw.setdefault("group", None)
    return IngestWorker(broker, store, backoff_min=0.01, backoff_max=0.05, **kw)


async def bounded(what: str, awaitable: Any, timeout: float = STALL_S) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        raise AssertionError(f"{what}: still not done after {timeout} s (stalled)") from None


async def store_messages(worker: IngestWorker, messages: list[tuple[str, bytes]]) -> None:
    """What the consumer does with one group: decode, then store (bounded)."""
    work = await asyncio.to_thread(worker._decode, messages)
    await bounded("storing the group", worker._store(work))


# -- the decoder --------------------------------------------------------------------------

TOO_LONG = "k" * 2000
UNSTORABLE_AT_DECODE = [
    ("meta", meta_payload(site="block\x0012"), "'site' contains a NUL"),
    *[
        ("meta", meta_payload(point=POINT | {f: "a\x00b"}), f"'{f}' contains a NUL")
        for f in ("key", "device", "name", "unit", "driver", "type")
    ],
    ("meta", meta_payload(location={"lat": 52.5, "note": "a\x00"}), "'location'.*NUL"),
    ("meta", meta_payload(location={"pole": [{"a\x00": 1}]}), "'location'.*a key.*NUL"),
    ("meta", deep_location_meta(), "'location'.* nested deeper"),
    ("meta", meta_payload(location={"notes": ["x" * 1000] * 70}), "'location' is .* bytes"),
    ("meta", meta_payload(point=POINT | {"key": TOO_LONG}), "'key' is 2000 bytes"),
    ("meta", meta_payload(gateway="g" * 300), "gateway id is 300 bytes"),
    ("alarm", alarm_uplink(1, rule="high\x00"), "'rule' contains a NUL"),
    ("alarm", alarm_uplink(1, rule=TOO_LONG), "'rule' is 2000 bytes"),
    ("alarm", alarm_uplink(1, gateway="gw\x001"), "'gateway' contains a NUL"),
    ("stats", stats_payload("gw\x001"), "'gateway' contains a NUL"),
    # device information (issue 13): up/stats `devices`
    ("stats", stats_payload(devices={"m": {"serial": "SN\x00"}}), "devices.*NUL"),
    ("stats", stats_payload(devices={"m": {TOO_LONG: "x"}}), "devices.* 2000 bytes"),
    ("stats", stats_payload(devices={"m": {"fw": TOO_LONG}}), "devices.* 2000 bytes"),
    ("stats", stats_payload(devices={"m": ["SN"]}), "devices.* must be an object"),
]


def decode(kind: str, payload: bytes) -> object:
    if kind == "meta":
        return wire.decode_meta(payload)
    if kind == "alarm":
        return wire.decode_alarms(wire.unwrap(payload).body)
    return wire.decode_stats(payload)


@pytest.mark.parametrize(("kind", "payload", "match"), UNSTORABLE_AT_DECODE)
def test_decoder_rejects_what_no_store_can_keep(kind: str, payload: bytes, match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        decode(kind, payload)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"site": "block\ud80012"}, "'site' contains a lone surrogate"),
        ({"points": [POINT | {"unit": "\udfff"}]}, "'unit' contains a lone surrogate"),
        ({"location": {"lat": 2**70}}, "'location' is not JSON-serialisable"),
        ({"location": {"pole": ("a\x00",)}}, r"'location'\['pole'\]\[0\] contains a NUL"),
    ],
)
def test_meta_from_dict_rejects_what_json_cannot_carry(fields: dict[str, Any], match: str) -> None:
    """A Python caller's meta (the gateway encodes its own): lone surrogates, which orjson
    refuses to read, and integers beyond 64 bits can only come this way."""
    obj = {"v": 1, "gateway": GW, "stream": STREAM, "points": [POINT]} | fields
    with pytest.raises(wire.WireError, match=match):
        wire.meta_from_dict(obj)


def test_decoder_keeps_accepting_what_stores_keep() -> None:
    meta = wire.decode_meta(
        meta_payload(site="Brücke 7 — µε", location={"lat": 52.5, "tags": [["a", {"b": None}]]})
    )
    assert meta.site == "Brücke 7 — µε" and meta.location is not None
    assert decode("alarm", alarm_uplink(1, rule="r" * 1024)) is not None


def test_the_largest_device_information_the_decoder_takes_is_stored(store: Store) -> None:
    """Every limit at once, incompressible: a 256-byte gateway, a 1024-byte device and
    name (PostgreSQL's primary key entry holds them) and a 1024-byte value."""
    rng = random.Random(13)

    def text(n: int) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzé☃0123456789") for _ in range(n))

    def cut(t: str, size: int) -> str:
        return t.encode()[:size].decode(errors="ignore")

    gateway, device, name, value = (cut(text(n), n) for n in (256, 1024, 1024, 1024))
    stats = wire.decode_stats(stats_payload(gateway, {device: {name: value}}))
    store.store_stats(stats)
    (entry,) = store.device_info(gateway)
    assert (entry.device, entry.name, entry.value) == (device, name, value)


def test_rejected_at_decode_is_a_dead_letter(store: Store) -> None:
    """Through `deliver` (the demo's loopback path): each unstorable message is refused
    with its reason, kept as a dead letter naming the field, and the next message is
    stored. The old decoder let them through: PostgreSQL then stalled, SQLite kept them."""
    worker = make_worker("mqtt://127.0.0.1", store)
    gw = Gateway(None)  # type: ignore[arg-type]  # builds uplinks, never publishes
    poison = [
        (wire.meta_topic(GW), meta_payload(point=POINT | {"unit": "\x00"}), "meta", "'unit'"),
        (wire.alarm_topic(GW), alarm_uplink(1, rule="hi\x00gh"), "alarm", "'rule'"),
        (wire.meta_topic(GW), deep_location_meta(), "meta", "'location'"),
        (wire.topic("citygw", GW, wire.KIND_STATS), stats_payload("g\x00"), "stats", "gateway"),
        (
            wire.topic("citygw", GW, wire.KIND_STATS),
            stats_payload(devices={"m": {"serial": "SN\x00"}}),
            "stats",
            "devices",
        ),
    ]

    async def body() -> None:
        for topic, payload, _, _ in poison:
            await bounded(f"deliver {topic}", worker.deliver(topic, payload))
        good, _ = gw.uplink(2)
        await bounded("deliver a good uplink", worker.deliver(wire.batch_topic(GW), good))

    asyncio.run(body())
    assert worker.counters.rejected == {"meta": 2, "alarm": 1, "stats": 2}
    letters = store.dead_letters()[::-1]  # newest first
    assert [(d.topic, d.payload, d.reason) for d in letters] == [(t, p, r) for t, p, r, _ in poison]
    for letter, (_, _, _, field) in zip(letters, poison, strict=True):
        assert field in letter.error, letter.error
    assert store.counts().batches == 1 and store.alarms(GW) == []
    assert store.point_keys() == [] and store.device_info() == []


# -- the worker: what gets past the decoder -----------------------------------------------


def poison_rule(work: Any, index: int, rule: str) -> None:
    """Replace the alarm events of uplink `index` in a decoded group by one whose rule no
    store can keep (a lone surrogate cannot be encoded as UTF-8)."""
    gateway, env, body, *source = work.batches[index]
    events = [AlarmEvent(e.point_id, rule, e.severity, e.raised, e.ts_ms, e.value, e.since_ms)
              for e in body.events]  # fmt: skip
    work.batches[index] = (gateway, env, AlarmBody(events, body.actions), *source)


@pytest.mark.usefixtures("no_wire_checks")
def test_store_refusal_is_dead_lettered_and_the_rest_stored_once(store: Store) -> None:
    """A group with a refused uplink among good ones, a duplicate, a refused meta: the
    refused ones become dead letters ("unstorable"), every other message is stored once,
    and the worker takes the next group."""
    worker = make_worker("mqtt://127.0.0.1", store)
    gw = Gateway(None)  # type: ignore[arg-type]
    uplinks = [gw.uplink(seq) for seq in (1, 2, 3)]
    poison_alarm = alarm_uplink(4)
    later = [gw.uplink(seq) for seq in (5, 6, 7)]
    good_meta = meta_payload()
    messages = [
        *[(wire.batch_topic(GW), p) for p, _ in uplinks],
        (wire.alarm_topic(GW), poison_alarm),
        (wire.alarm_topic(GW), alarm_uplink(8, rule="fine")),
        *[(wire.batch_topic(GW), p) for p, _ in later],
        (wire.batch_topic(GW), uplinks[0][0]),  # a resend in the same group
        (wire.meta_topic("gw-2"), deep_location_meta().replace(GW.encode(), b"gw-2")),
        (wire.meta_topic(GW), good_meta),
        (wire.state_topic(GW), b"online"),
    ]

    async def body() -> None:
        work = await asyncio.to_thread(worker._decode, messages)
        assert len(work.batches) == 9
        poison_rule(work, 3, "over\ud800strain")
        await bounded("storing the poisoned group", worker._store(work))
        # and the next group goes through
        await store_messages(worker, [(wire.batch_topic(GW), gw.uplink(9)[0])])

    asyncio.run(body())
    c = worker.counters
    assert c.rejected == {"unstorable": 2}
    assert (c.batches_stored, c.duplicates_dropped, c.metas_stored, c.states_stored) == (
        8,
        1,
        1,
        1,
    )
    assert store.counts().batches == 8 and store.duplicate_readings() == 0
    sent = [*uplinks, *later, gw.uplink(9)]
    assert sorted(store.readings(GW)) == sorted(r for _, b in sent for r in b.rows())
    assert [e.rule for e in store.alarms(GW)] == ["fine"]
    assert store.point_keys() == ["bridge-7/strain"]
    letters = {d.topic: d for d in store.dead_letters()}
    assert set(letters) == {wire.alarm_topic(GW), wire.meta_topic("gw-2")}
    assert all(d.reason == "unstorable" for d in letters.values())
    refused = letters[wire.alarm_topic(GW)]
    assert refused.payload == poison_alarm and "UnicodeEncodeError" in refused.error
    assert "TypeError" in letters[wire.meta_topic("gw-2")].error


@pytest.mark.usefixtures("no_wire_checks")
def test_deliver_returns_for_a_message_the_store_refuses(store: Store) -> None:
    """The loopback path (cli/loopback.py) waits for the commit; a refused message
    must end that wait with a dead letter, not hold the demo's uplink forever."""
    worker = make_worker("mqtt://127.0.0.1", store)
    gw = Gateway(None)  # type: ignore[arg-type]

    async def body() -> None:
        await bounded("deliver", worker.deliver(wire.meta_topic(GW), deep_location_meta()))
        await bounded("deliver", worker.deliver(wire.batch_topic(GW), gw.uplink(1)[0]))

    asyncio.run(body())
    assert [d.reason for d in store.dead_letters()] == ["unstorable"]
    assert store.counts().batches == 1


class RefusingStore:
    """Wraps a store; storing an uplink group that holds `seq` fails with an error the
    worker cannot classify."""

    def __init__(self, inner: Store, seq: int) -> None:
        self.inner, self.seq = inner, seq
        self.calls: list[list[int]] = []

    def store_batches(self, items: Any) -> list[bool]:
        seqs = [env.seq for _, env, _ in items]
        self.calls.append(seqs)
        if self.seq in seqs:
            raise RuntimeError("something odd")
        return self.inner.store_batches(items)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_unknown_error_is_retried_then_dead_lettered_alone(tmp_path: Path) -> None:
    inner = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    refusing = RefusingStore(inner, seq=5)
    worker = make_worker("mqtt://127.0.0.1", refusing)
    gw = Gateway(None)  # type: ignore[arg-type]
    seqs = list(range(1, 9))
    try:
        asyncio.run(store_messages(worker, [(wire.batch_topic(GW), gw.uplink(s)[0]) for s in seqs]))
        assert inner.counts().batches == 7
        (letter,) = inner.dead_letters()
        assert letter.reason == "unstorable" and letter.error == "RuntimeError: something odd"
        assert wire.unwrap(letter.payload).seq == 5
        # the whole group, then halves once each, then seq 5 alone, retried
        attempts = worker_module.UNKNOWN_ERROR_ATTEMPTS
        assert refusing.calls.count(seqs) == attempts
        assert refusing.calls.count([5]) == attempts
        assert worker.counters.store_errors == 2 * attempts + 2  # and once [5..8], [5, 6]
    finally:
        inner.close()


# -- transient errors: retried, never dead-lettered ---------------------------------------


def test_a_locked_sqlite_store_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    store = SqliteStore(path, busy_timeout=0.05)
    worker = make_worker("mqtt://127.0.0.1", store)
    gw = Gateway(None)  # type: ignore[arg-type]
    messages = [(wire.batch_topic(GW), gw.uplink(s)[0]) for s in (1, 2, 3)]
    messages.append((wire.batch_topic(GW), b"junk"))  # its dead letter waits for the lock too
    other = sqlite3.connect(path, isolation_level=None)

    async def body() -> None:
        other.execute("BEGIN EXCLUSIVE")
        work = await asyncio.to_thread(worker._decode, messages)
        task = asyncio.create_task(worker._store(work))
        await wait_until(lambda: worker.counters.store_errors >= 5)
        assert not task.done()
        other.execute("COMMIT")
        await bounded("storing after the lock", task)

    try:
        asyncio.run(body())
        assert store.counts().batches == 3
        assert [d.reason for d in store.dead_letters()] == ["envelope"]
        assert worker.counters.rejected == {"envelope": 1}
    finally:
        other.close()
        store.close()


def test_a_killed_postgresql_backend_is_retried(pg_url: str) -> None:
    """The backend is terminated in the middle of the worker's transaction (a trigger on
    the dedup table kills its own backend the first time): the transaction is gone, the
    store reconnects, the group is stored once and nothing is dead-lettered."""
    store = open_store(pg_url)
    schema = pg_url.rsplit("schema=", 1)[1]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        admin.execute("CREATE SEQUENCE kills")
        admin.execute(
            "CREATE FUNCTION kill_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF nextval('kills') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); "
            "END IF; RETURN NULL; END $$"
        )
        admin.execute(
            "CREATE TRIGGER kill_once AFTER INSERT ON uplinks "
            "FOR EACH STATEMENT EXECUTE FUNCTION kill_once()"
        )
    worker = make_worker("mqtt://127.0.0.1", store)
    gw = Gateway(None)  # type: ignore[arg-type]
    sent = [gw.uplink(s) for s in (1, 2, 3)]
    try:
        asyncio.run(store_messages(worker, [(wire.batch_topic(GW), p) for p, _ in sent]))
        assert worker.counters.store_errors >= 1
        assert store.counts().batches == 3 and store.duplicate_readings() == 0
        assert sorted(store.readings(GW)) == sorted(r for _, b in sent for r in b.rows())
        assert store.dead_letters() == [] and worker.counters.rejected == {}
    finally:
        store.close()


# -- the worker against a real broker -----------------------------------------------------


async def run_workers(workers: list[IngestWorker], body: Callable[[], Any]) -> None:
    tasks = [asyncio.create_task(w.run()) for w in workers]
    try:
        for w in workers:
            await bounded("connecting", w.connected.wait(), 10)
        await body()
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


@pytest.mark.usefixtures("no_wire_checks")
def test_poison_uplink_is_acknowledged_and_the_group_behind_it_stored(
    mosquitto: Mosquitto, pg_url: str
) -> None:
    """An alarm rule with a NUL, past the decoder: PostgreSQL refuses it. The worker
    dead-letters it, stores the uplinks around it once, and acknowledges it: a worker
    resuming the same session is not sent it again."""
    store = open_store(pg_url)
    gw = Gateway(mosquitto)
    session = {"client_id": "ingest-poison", "session_expiry": 60}

    async def first() -> None:
        messages = [(wire.batch_topic(GW), gw.uplink(s)[0]) for s in (1, 2, 3, 4)]
        messages.append((wire.alarm_topic(GW), alarm_uplink(5, rule="over\x00strain")))
        messages += [(wire.batch_topic(GW), gw.uplink(s)[0]) for s in (6, 7, 8, 9)]
        await gw.publish(messages)
        await wait_until(
            lambda: store.counts().batches == 8 and len(store.dead_letters()) == 1,
            message=lambda: f"stalled: {worker.counters}",
        )
        await asyncio.sleep(0.3)  # the last PUBACKs on their way before the disconnect

    async def resumed() -> None:
        await gw.send([10])
        await wait_until(lambda: store.counts().batches == 9)
        await asyncio.sleep(0.3)  # time for a redelivery that must not come

    try:
        worker = make_worker(mosquitto.url, store, **session)
        asyncio.run(run_workers([worker], first))
        (letter,) = store.dead_letters()
        assert (letter.reason, letter.topic) == ("unstorable", wire.alarm_topic(GW))
        assert "NUL" in letter.error
        second = make_worker(mosquitto.url, store, **session)
        asyncio.run(run_workers([second], resumed))
        assert second.counters.messages == 1 and len(store.dead_letters()) == 1
        assert store.counts().duplicates_dropped == 0 and store.duplicate_readings() == 0
    finally:
        store.close()


@pytest.mark.parametrize("refused_by", ["decoder", "store"])
def test_retained_poison_meta_does_not_stall_two_workers(
    refused_by: str, mosquitto: Mosquitto, pg_url: str, request: pytest.FixtureRequest
) -> None:
    """A retained up/meta with a NUL goes to every worker (retained topics are not
    shared). Each refuses it once, by the decoder or by the store, and both go on storing
    the group's uplinks."""
    if refused_by == "store":
        request.getfixturevalue("no_wire_checks")
    stores = [open_store(pg_url), open_store(pg_url)]
    workers = [make_worker(mosquitto.url, s, group="g") for s in stores]
    gw = Gateway(mosquitto)
    bad_meta = meta_payload(point=POINT | {"unit": "µ\x00ε"})

    async def body() -> None:
        sent = await gw.send(list(range(1, 21)))
        await wait_until(
            lambda: stores[0].counts().batches == 20,
            message=lambda: f"stalled: {[w.counters for w in workers]}",
        )
        assert sorted(stores[0].readings(GW)) == sorted(r for b in sent for r in b.rows())

    async def retain() -> None:
        await gw.publish([(wire.meta_topic(GW), bad_meta)], retain=True)

    try:
        asyncio.run(retain())
        asyncio.run(run_workers(workers, body))
        reason = "meta" if refused_by == "decoder" else "unstorable"
        assert [w.counters.rejected for w in workers] == [{reason: 1}, {reason: 1}]
        letters = stores[0].dead_letters()
        assert [(d.reason, d.payload) for d in letters] == [(reason, bad_meta)] * 2
        assert stores[0].point_keys() == []
    finally:
        for s in stores:
            s.close()
