"""The platform ingest as it runs in production: `citygw ingest` worker processes on one
shared subscription group, a private mosquitto, a private PostgreSQL schema, and fake
gateways publishing real encoded uplinks (QoS 1).

What Mosquitto (2.0) does with a shared-subscription member whose persistent session is
offline, which `test_sigkill_mid_stream` checks rather than assumes: it keeps the member
in the group's round robin (`subs__shared_process` picks the next member whatever its
connection state) and queues the messages it picks for it in its session (up to
`max_queued_messages`); nothing is handed to the members still connected. The member's
unacknowledged in-flight messages stay in its session too. When the member reconnects
with the same client id (clean start off, session not expired), Mosquitto resends the
in-flight ones and delivers the queue. So a worker that dies holds up its share of the
traffic until it is back: the client id must be stable and the worker restarted
(systemd `Restart=always`); if its session expires first, its queue is lost.

Every wait is bounded (deadlines of 30-90 s: a loaded 2-core machine), everything is
on loopback, and every worker process is killed at teardown."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import psycopg
import pytest

from central.store import Store
from central.stores import open_store
from common import wire
from common.broker import Mosquitto
from native import codec
from native.batch import Batch
from tests.conftest import PG_ADMIN_URL
from tests.helpers import Gateway, TcpProxy, make_batch, wait_until

ROOT = Path(__file__).resolve().parent.parent
GROUP = "g"
READINGS = 50  # per uplink
SUBSCRIBED = "ingest: subscribed"
STORE_FAILED = "store failed"


class Workers:
    """`citygw ingest` processes (``python -m cli ingest``) on one group, each logging to
    tmp_path/<client id>.log (appended across restarts)."""

    def __init__(self, tmp_path: Path, broker: str, db: str) -> None:
        self.tmp_path, self.broker, self.db = tmp_path, broker, db
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def log_path(self, client_id: str) -> Path:
        return self.tmp_path / f"{client_id}.log"

    def log(self, client_id: str) -> str:
        path = self.log_path(client_id)
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, client_id: str, db: str | None = None) -> None:
        assert client_id not in self.procs or self.procs[client_id].poll() is not None
        with self.log_path(client_id).open("ab") as log:
            self.procs[client_id] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli",
                    "ingest",
                    "--broker",
                    self.broker,
                    "--db",
                    db or self.db,
                    "--group",
                    GROUP,
                    "--client-id",
                    client_id,
                    "--session-expiry",
                    "600",
                    "--report-every",
                    "1",
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def readings_total(self, client_id: str) -> int:
        """What the worker's last throughput line says it stored (0 before the first)."""
        found = re.findall(r"readings_total=(\d+)", self.log(client_id))
        return int(found[-1]) if found else 0

    def kill(self, client_id: str) -> None:
        """SIGKILL: no goodbye to the broker, nothing flushed, nothing acknowledged."""
        proc = self.procs[client_id]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def alive(self, client_id: str) -> bool:
        return self.procs[client_id].poll() is None

    async def subscribed(self, client_id: str, times: int = 1, timeout: float = 60.0) -> None:
        """Until the worker's log says it subscribed `times` times (once per start)."""
        await wait_until(
            lambda: self.log(client_id).count(SUBSCRIBED) >= times,
            timeout,
            lambda: f"{client_id} did not subscribe; its log:\n{self.log(client_id)[-3000:]}",
            check=lambda: self._check_alive(client_id),
        )

    def _check_alive(self, client_id: str) -> None:
        proc = self.procs[client_id]
        if proc.poll() is not None:
            raise AssertionError(
                f"worker {client_id} exited with {proc.returncode}:\n{self.log(client_id)[-3000:]}"
            )

    def check_all_alive(self) -> None:
        for client_id in self.procs:
            self._check_alive(client_id)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(timeout=30)


@pytest.fixture
def store(pg_url: str) -> Iterator[Store]:
    """The test's own view of the workers' store (direct, never through a proxy)."""
    s = open_store(pg_url)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def workers(tmp_path: Path, mosquitto: Mosquitto, pg_url: str) -> Iterator[Workers]:
    w = Workers(tmp_path, mosquitto.url, pg_url)
    try:
        yield w
    finally:
        w.stop_all()


def client_ids(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"ingest-{tag}-{i}" for i in range(n)]


class Publisher:
    """Fake gateways publishing real uplinks over one MQTT connection (QoS 1: a publish
    returns once the broker has the message); remembers what it sent."""

    def __init__(self, broker: Mosquitto, n_gateways: int, first: int = 0) -> None:
        self.broker = broker
        self.gateways = [
            Gateway(broker, f"gw-{i:02d}", uuid.uuid4().hex)
            for i in range(first, first + n_gateways)
        ]
        self.sent: dict[str, list[Batch]] = {g.gateway: [] for g in self.gateways}
        self.published = 0

    async def publish(
        self, seqs: range, pause_every: int = 0, pause_s: float = 0.0, record: bool = True
    ) -> None:
        """Uplinks `seqs` of every gateway, interleaved; `pause_every` uplinks a pause
        (a steady stream rather than one burst). `record=False`: a resend."""
        async with aiomqtt.Client(
            "127.0.0.1", self.broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            for seq in seqs:
                for g in self.gateways:
                    payload, batch = g.uplink(seq, READINGS)
                    await client.publish(wire.batch_topic(g.gateway), payload, qos=1)
                    if record:
                        self.sent[g.gateway].append(batch)
                    self.published += 1
                    if pause_every and self.published % pause_every == 0:
                        await asyncio.sleep(pause_s)

    @property
    def batches(self) -> int:
        return sum(len(v) for v in self.sent.values())

    @property
    def readings(self) -> int:
        return sum(len(b) for v in self.sent.values() for b in v)


def stored(store: Store) -> int:
    return store.counts().batches


def assert_exactly_once(store: Store, pub: Publisher) -> None:
    c = store.counts()
    assert (c.batches, c.readings) == (pub.batches, pub.readings)
    assert store.duplicate_readings() == 0
    for gateway, batches in pub.sent.items():
        got = sorted(store.readings(gateway))
        assert got == sorted(r for b in batches for r in b.rows()), gateway


# -- several workers on one group ------------------------------------------------------------


@pytest.mark.parametrize("n_workers", [2, 3])
def test_shared_group_stores_each_batch_once(
    n_workers: int, mosquitto: Mosquitto, workers: Workers, store: Store
) -> None:
    ids = client_ids(n_workers)
    pubs = [Publisher(mosquitto, 3, first=3 * i) for i in range(2)]

    async def body() -> None:
        for cid in ids:
            workers.start(cid)
        for cid in ids:
            await workers.subscribed(cid)
        # two connections of three gateways each, at once, 40 uplinks per gateway
        await asyncio.gather(*(p.publish(range(1, 41)) for p in pubs))
        # and a gateway resending its last window after a reconnect
        await pubs[0].publish(range(31, 41), record=False)
        total = sum(p.batches for p in pubs)
        await wait_until(
            lambda: store.counts().batches + store.counts().duplicates_dropped >= total + 30,
            90,
            lambda: f"stored {store.counts()} of {total} (+30 resent)",
            check=workers.check_all_alive,
        )

        # each worker stored a share, and the shares add up: each batch by one worker
        await wait_until(
            lambda: sum(workers.readings_total(cid) for cid in ids) == 240 * READINGS,
            30,
            lambda: f"per worker: {[workers.readings_total(cid) for cid in ids]}",
            workers.check_all_alive,
        )
        assert all(workers.readings_total(cid) > 0 for cid in ids)

    asyncio.run(body())
    c = store.counts()
    assert (c.batches, c.duplicates_dropped) == (240, 30)
    assert c.readings == 240 * READINGS
    assert store.duplicate_readings() == 0
    for p in pubs:
        for gateway, batches in p.sent.items():
            assert sorted(store.readings(gateway)) == sorted(r for b in batches for r in b.rows())


# -- a worker killed mid-stream ------------------------------------------------------------------


def test_sigkill_mid_stream(mosquitto: Mosquitto, workers: Workers, store: Store) -> None:
    """Worker A is SIGKILLed while a steady stream goes on; Mosquitto keeps queueing A's
    round-robin share in A's session (B does not get it) until A is back with the same
    client id; then every batch is stored exactly once."""
    a, b = client_ids(2)
    pub = Publisher(mosquitto, 4)
    per_phase = 75  # uplinks per gateway: 300 uplinks a phase

    async def body() -> None:
        workers.start(a)
        workers.start(b)
        await workers.subscribed(a)
        await workers.subscribed(b)
        # phase 1: a steady stream; A dies once some of it is stored
        stream = asyncio.create_task(pub.publish(range(1, per_phase + 1), 10, 0.02))
        await wait_until(lambda: stored(store) >= 60, 60, "nothing stored", workers.check_all_alive)
        workers.kill(a)
        await stream
        # phase 2, A away: B stores what comes to it, A's share waits in A's session
        await pub.publish(range(per_phase + 1, 2 * per_phase + 1), 10, 0.01)
        await settle(store)
        while_down = stored(store)
        assert while_down < pub.batches, "Mosquitto handed A's share to B (not what 2.0 does)"
        assert workers.alive(b)
        # phase 3: A comes back with the same client id while the stream goes on
        stream = asyncio.create_task(pub.publish(range(2 * per_phase + 1, 3 * per_phase + 1)))
        await asyncio.sleep(0.2)
        workers.start(a)
        await workers.subscribed(a, times=2)
        await stream
        await wait_until(
            lambda: stored(store) >= pub.batches,
            90,
            lambda: f"stored {store.counts()} of {pub.batches} (while A was down: {while_down})",
            check=workers.check_all_alive,
        )

    asyncio.run(body())
    assert_exactly_once(store, pub)


async def settle(store: Store, quiet_s: float = 2.0, timeout: float = 30.0) -> None:
    """Until the stored count has not moved for `quiet_s` (bounded by `timeout`)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = -1, loop.time()
    while loop.time() < deadline:
        n = await asyncio.to_thread(stored, store)
        if n != last:
            last, since = n, loop.time()
        elif loop.time() - since >= quiet_s:
            return
        await asyncio.sleep(0.2)


# -- PostgreSQL unreachable, PostgreSQL restarting -------------------------------------------


def via(pg_url: str, proxy: TcpProxy) -> str:
    assert "@127.0.0.1:5432/" in pg_url
    return pg_url.replace("@127.0.0.1:5432/", f"@127.0.0.1:{proxy.port}/")


def test_postgres_unreachable(
    mosquitto: Mosquitto, workers: Workers, store: Store, pg_url: str
) -> None:
    """The worker's PostgreSQL connection goes through a proxy that is cut (connections
    reset, new ones refused) for a few seconds while gateways publish: nothing is
    stored or acknowledged meanwhile, and everything is stored once it is back. Cut a
    second time and killed while cut, the worker has acknowledged nothing it did not
    store: restarted, it gets it all again."""
    (cid,) = client_ids(1)
    pub = Publisher(mosquitto, 3)

    async def body() -> None:
        proxy = TcpProxy("127.0.0.1", 5432)
        await proxy.start()
        try:
            workers.start(cid, db=via(pg_url, proxy))
            await workers.subscribed(cid)
            await pub.publish(range(1, 11))
            await wait_until(
                lambda: stored(store) == 30, 60, "phase 1 not stored", workers.check_all_alive
            )

            await proxy.cut()
            await pub.publish(range(11, 31))
            failures = workers.log(cid).count(STORE_FAILED)
            await wait_until(
                lambda: workers.log(cid).count(STORE_FAILED) >= failures + 2,
                60,
                lambda: f"no store failure logged:\n{workers.log(cid)[-3000:]}",
                workers.check_all_alive,
            )
            await asyncio.sleep(2.0)  # a few seconds away, retrying
            assert stored(store) == 30
            await proxy.restore()
            await wait_until(
                lambda: stored(store) == 90,
                60,
                lambda: f"not resumed: {store.counts()}\n{workers.log(cid)[-3000:]}",
                workers.check_all_alive,
            )

            await proxy.cut()
            await pub.publish(range(31, 41))
            failures = workers.log(cid).count(STORE_FAILED)
            await wait_until(
                lambda: workers.log(cid).count(STORE_FAILED) > failures,
                60,
                "no store failure logged",
                workers.check_all_alive,
            )
            workers.kill(cid)
            await proxy.restore()
            workers.start(cid, db=via(pg_url, proxy))
            await wait_until(
                lambda: stored(store) == 120,
                60,
                lambda: f"lost while cut: {store.counts()}\n{workers.log(cid)[-3000:]}",
                workers.check_all_alive,
            )
        finally:
            await proxy.stop()

    asyncio.run(body())
    assert_exactly_once(store, pub)


def terminate_backends(ports: list[int]) -> int:
    """pg_terminate_backend on the sessions whose client is one of the proxy's upstream
    ports (the worker's connections and no one else's): what a PostgreSQL restart looks
    like to the worker. -> how many were terminated."""
    if not ports:
        return 0
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE client_addr = '127.0.0.1' AND client_port = ANY(%s) "
            "AND pid <> pg_backend_pid()",
            (ports,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def test_postgres_backend_killed(
    mosquitto: Mosquitto, workers: Workers, store: Store, pg_url: str
) -> None:
    """Three times during a steady stream, the worker's PostgreSQL backends are
    terminated (as by a server restart): it reconnects, and nothing is lost or doubled."""
    (cid,) = client_ids(1)
    pub = Publisher(mosquitto, 4)

    async def body() -> None:
        proxy = TcpProxy("127.0.0.1", 5432)  # only to know the worker's client ports
        await proxy.start()
        try:
            workers.start(cid, db=via(pg_url, proxy))
            await workers.subscribed(cid)
            stream = asyncio.create_task(pub.publish(range(1, 101), 10, 0.05))
            killed = 0
            for target in (60, 120, 180):
                await wait_until(
                    lambda t=target: stored(store) >= t,
                    60,
                    lambda t=target: f"to {t}: {store.counts()}\n{workers.log(cid)[-3000:]}",
                    workers.check_all_alive,
                )
                n = await asyncio.to_thread(terminate_backends, proxy.upstream_ports())
                assert n >= 1, "the worker had no PostgreSQL session to terminate"
                killed += n
            await stream
            await wait_until(
                lambda: stored(store) >= pub.batches,
                90,
                lambda: f"stored {store.counts()} of {pub.batches}\n{workers.log(cid)[-3000:]}",
                workers.check_all_alive,
            )
            assert killed >= 3
            assert proxy.connections >= 4  # it reconnected after each termination
        finally:
            await proxy.stop()

    asyncio.run(body())
    assert_exactly_once(store, pub)


# -- bad batches: dead letters -----------------------------------------------------------------


def test_dead_letters(mosquitto: Mosquitto, workers: Workers, store: Store) -> None:
    """Each kind of bad uplink is counted (logged with its reason), kept in the
    dead-letter table with its payload, and acknowledged: the good batch after them is
    stored, and a restarted worker (same session) does not get them again."""
    (cid,) = client_ids(1)
    gw = Gateway(mosquitto, "gw-1", uuid.uuid4().hex)
    topic = wire.batch_topic(gw.gateway)

    def envelope(seq: int) -> wire.Envelope:
        return wire.unwrap(gw.uplink(seq)[0])

    e = envelope(4)
    newer_codec = bytearray(e.body)
    newer_codec[len(codec.MAGIC)] = 9
    other = make_batch(20, start_ts=1)
    bad: list[tuple[str, bytes]] = [
        ("codec", wire.wrap(e.lane, e.stream, 2, 20, b"\xff\x00garbage")),
        ("version", gw.uplink(3)[0][:2] + b"\x09" + gw.uplink(3)[0][3:]),  # envelope version
        ("version", wire.wrap(e.lane, e.stream, 4, e.n_points, bytes(newer_codec))),
        ("gateway", wire.wrap(e.lane, e.stream, 5, 20, codec.encode(other, gateway="gw-9", seq=5))),
        ("seq", wire.wrap(e.lane, e.stream, 6, e.n_points, envelope(60).body)),
        ("n_points", wire.wrap(e.lane, e.stream, 7, e.n_points + 1, envelope(7).body)),
    ]  # fmt: skip

    async def body() -> None:
        workers.start(cid)
        await workers.subscribed(cid)
        sent = await gw.send([1])
        await gw.publish([(topic, payload) for _, payload in bad])
        sent += await gw.send([8])
        await wait_until(
            lambda: stored(store) == 2 and len(store.dead_letters(100)) == len(bad),
            60,
            lambda: (
                f"{store.counts()}, {len(store.dead_letters(100))} dead letters\n"
                + workers.log(cid)[-3000:]
            ),
            workers.check_all_alive,
        )
        assert sorted(store.readings(gw.gateway)) == sorted(r for b in sent for r in b.rows())
        # acknowledged: a restart on the same session brings none of them back
        workers.kill(cid)
        workers.start(cid)
        await workers.subscribed(cid, times=2)
        await gw.send([9])
        await wait_until(
            lambda: stored(store) == 3, 60, "batch 9 not stored", workers.check_all_alive
        )
        await asyncio.sleep(1.0)

    asyncio.run(body())
    letters = store.dead_letters(100)
    assert sorted((d.reason, d.payload) for d in letters) == sorted(bad)
    assert all(d.topic == topic and d.size == len(d.payload) and d.error for d in letters)
    assert len({d.received_ms for d in letters}) >= 1
    log = workers.log(cid)
    for reason in {r for r, _ in bad}:
        assert f"reason={reason} " in log, f"rejects for {reason!r} not counted in the log"
    assert store.duplicate_readings() == 0
