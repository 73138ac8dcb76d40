"""Who may speak for a gateway: the shipped broker ACL (deploy/mosquitto/citygw.acl) and
mosquitto.conf (deploy/mosquitto/citygw.conf) against a real Mosquitto.

A gateway's identity is its MQTT username (password file) or its client certificate's
CN (`use_identity_as_username`), never the topic: it publishes only its own `up/#` and
`state`, and reads only its own `down/#`. The platform's role users (`role.ingest`,
`role.commands`, names no gateway id can have) read every gateway's uplinks, send
commands and read their answers. What is allowed is asked of the broker itself (the
reason code of an MQTT 5 PUBACK: 0x87 "not authorized" for a refused publish); what is
read is watched by subscribers, with a marker published after the forgeries: the broker
handles one client's publishes in order and queues a subscriber's messages in order,
so a forgery it let through would arrive before the marker.

The broker here: the shipped ACL and a password file (`common.broker.acl_conf`), its own
listener for the platform's services, a listener for gateways with a password
(`gateway_listener`) and one for gateways with a client certificate; like the shipped
conf, both gateway listeners make the client id the username."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import orjson
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import parse_config
from agent.runtime import Agent
from buffer import Buffer
from central.stores import open_store
from central.worker import IngestWorker
from common import wire
from common.broker import (
    ROLE_COMMANDS,
    ROLE_INGEST,
    SHIPPED_ACL,
    SHIPPED_CONF,
    Mosquitto,
    acl_conf,
    free_port,
    gateway_listener,
    tls_listener,
    write_password_file,
)
from common.mqtt_url import tls_context
from native import codec
from native.batch import Batch
from tests.helpers import running_broker, wait_until
from tests.pki import LOCALHOST, issue, make_ca

pytestmark = pytest.mark.timeout(120)

GW_A, GW_B = "gw-a", "gw-b"
PASSWORDS = {
    GW_A: "pw-a",
    GW_B: "pw-b",
    ROLE_INGEST: "pw-ingest",
    ROLE_COMMANDS: "pw-commands",
}
#: MQTT 5 PUBACK reason codes: taken (with or without subscribers), refused by the ACL
ACCEPTED = {0x00, 0x10}
NOT_AUTHORIZED = 0x87
#: every topic a gateway publishes (`state` and the five up/ kinds)
GATEWAY_KINDS = ("up/batch", "up/alarm", "up/meta", "up/stats", "up/resp", "state")
UPLINK_KINDS = ("up/batch", "up/alarm", "up/meta", "up/stats", "state")  # the ingest's


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path  # SAN IP:127.0.0.1, DNS:localhost
    server_key: Path
    certs: dict[str, tuple[Path, Path]]  # CN -> (client certificate, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "city-ca")
    server_cert, server_key = issue(d, ca, "server", "broker", server_names=LOCALHOST)
    certs = {cn: issue(d, ca, cn, cn) for cn in (GW_A, GW_B)}
    return Pki(ca[2], server_cert, server_key, certs)


@dataclass(frozen=True)
class AclBroker:
    broker: Mosquitto
    gateways: int  # gateways with a username and password
    certs: int  # gateways with a client certificate (TLS)
    pki: Pki

    @property
    def platform(self) -> int:
        """The platform's services (role users), with a username and password."""
        return self.broker.port

    def tls(self, cn: str | None = None) -> ssl.SSLContext:
        if cn is None:
            return tls_context(str(self.pki.ca))
        cert, key = self.pki.certs[cn]
        return tls_context(str(self.pki.ca), str(cert), str(key))


@contextlib.contextmanager
def acl_broker_at(workdir: Path, pki: Pki, prefix: str = "citygw") -> Iterator[AclBroker]:
    gateways, certs = free_port(), free_port()
    conf = (
        acl_conf(workdir, PASSWORDS, prefix=prefix)
        + gateway_listener(gateways)
        + tls_listener(
            certs,
            pki.ca,
            pki.server_cert,
            pki.server_key,
            require_certificate=True,
            use_identity_as_username=True,
            use_username_as_clientid=True,
        )
    )
    with running_broker(workdir, extra_conf=conf) as broker:
        yield AclBroker(broker, gateways, certs, pki)


@pytest.fixture
def acl_broker(pki: Pki, tmp_path: Path) -> Iterator[AclBroker]:
    workdir = tmp_path / "broker"
    workdir.mkdir()
    with acl_broker_at(workdir, pki) as b:
        yield b


# -- asking the broker -------------------------------------------------------------------


def verdicts(
    port: int,
    user: str | None,
    topics: Sequence[str],
    *,
    tls: ssl.SSLContext | None = None,
    password: str | None = None,
) -> dict[str, int]:
    """The PUBACK reason code of a QoS 1 publish to each topic, from one MQTT 5 client
    connected as `user` (its password from PASSWORDS unless given)."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5
    )
    if user is not None:
        client.username_pw_set(user, PASSWORDS[user] if password is None else password)
    if tls is not None:
        client.tls_set_context(tls)
    connected = threading.Event()
    refused: list[str] = []
    codes: dict[int, int] = {}

    def on_connect(c: paho.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        if rc.is_failure:
            refused.append(str(rc))
        connected.set()

    def on_publish(c: paho.Client, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        codes[mid] = rc.value

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()
    try:
        assert connected.wait(5), f"no CONNACK from port {port}"
        assert not refused, f"{user} refused: {refused}"
        sent = {topic: client.publish(topic, b"probe", qos=1) for topic in topics}
        for topic, info in sent.items():
            info.wait_for_publish(5)
            assert info.mid in codes, f"no PUBACK for {topic} from port {port}"
        return {topic: codes[info.mid] for topic, info in sent.items()}
    finally:
        client.disconnect()
        client.loop_stop()


def assert_verdicts(
    got: dict[str, int], allowed: Sequence[str], denied: Sequence[str], who: str
) -> None:
    wrong = {t: c for t, c in got.items() if t in allowed and c not in ACCEPTED}
    wrong |= {t: c for t, c in got.items() if t in denied and c != NOT_AUTHORIZED}
    assert not wrong, f"{who}: unexpected PUBACK reason codes {wrong}"


def client(
    port: int,
    user: str | None,
    *,
    password: str | None = None,
    identifier: str | None = None,
    v5: bool = False,
    tls: ssl.SSLContext | None = None,
    clean: bool = True,
    timeout: float = 10.0,
) -> aiomqtt.Client:
    """An MQTT client as `user` (MQTT 3.1.1 like the uplink, or 5 like the ingest)."""
    kw: dict[str, object] = {"clean_start": clean} if v5 else {"clean_session": clean}
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=identifier,
        username=user,
        password=(PASSWORDS.get(user or "") if password is None else password),
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        tls_context=tls,
        timeout=timeout,
        **kw,  # type: ignore[arg-type]
    )


async def connect(port: int, user: str | None, password: str, tls: ssl.SSLContext | None) -> None:
    # a refused client certificate shows only after the TLS 1.3 handshake: time out soon
    async with client(port, user, password=password, tls=tls, timeout=1.0):
        pass


async def collect(c: aiomqtt.Client, last: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    """What `c` receives up to and including `last` (topic, payload)."""
    got: list[tuple[str, bytes]] = []
    async with asyncio.timeout(10):
        async for m in c.messages:
            assert isinstance(m.payload, bytes)
            got.append((m.topic.value, m.payload))
            if got[-1] == last:
                return got
    raise AssertionError(f"the connection ended before {last} arrived; got {got}")


def t(gateway: str, kind: str, prefix: str = "citygw") -> str:
    """A topic as any client may write it (wire.topic refuses a role user's name)."""
    return f"{prefix}/{gateway}/{kind}"


# -- the ACL, topic by topic ---------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["citygw", "city/north"])
def test_who_may_publish_where(pki: Pki, tmp_path: Path, prefix: str) -> None:
    """Each identity's publishes as the broker judges them, with the ACL moved under
    another prefix too (as its header tells a deployment to)."""
    with acl_broker_at(tmp_path, pki, prefix) as b:
        own = [t(GW_A, k, prefix) for k in GATEWAY_KINDS]
        foreign = [t(GW_B, k, prefix) for k in GATEWAY_KINDS]
        commands = [t(GW_A, "down/cmd", prefix), t(GW_B, "down/cmd", prefix)]
        elsewhere = ["other/gw-a/up/batch", t(GW_A, "other", prefix)]
        if prefix != "citygw":
            elsewhere.append(t(GW_A, "up/batch"))
        denied = foreign + commands + elsewhere
        # a gateway: only its own up/ and state, on any listener (the username decides)
        for port in (b.gateways, b.platform):
            got = verdicts(port, GW_A, own + denied)
            assert_verdicts(got, own, denied, f"{GW_A} on port {port}")
        # the ingest publishes nothing; not under its own name either
        mine = [t(ROLE_INGEST, k, prefix) for k in GATEWAY_KINDS]
        everything = own + commands + mine
        assert_verdicts(verdicts(b.platform, ROLE_INGEST, everything), [], everything, "ingest")
        # commands to any gateway, nothing else
        mine = [t(ROLE_COMMANDS, k, prefix) for k in GATEWAY_KINDS]
        rest = own + mine + [t(ROLE_COMMANDS, "down/cmd", prefix)]
        got = verdicts(b.platform, ROLE_COMMANDS, commands + rest)
        assert got[t(ROLE_COMMANDS, "down/cmd", prefix)] == NOT_AUTHORIZED
        assert_verdicts(got, commands, rest, "commands")


def test_a_gateway_cannot_publish_for_another_and_the_ingest_reads_every_gateway(
    acl_broker: AclBroker,
) -> None:
    """Gateway A forges B's batch, alarm, meta, stats and state (retained where B's are):
    the ingest role, through a shared subscription and through a plain one, receives
    every gateway's own uplinks and none of the forgeries; no forgery is retained."""
    b = acl_broker

    async def scenario() -> tuple[list[list[tuple[str, bytes]]], list[tuple[str, bytes]]]:
        shared = client(b.platform, ROLE_INGEST, v5=True)
        plain = client(b.platform, ROLE_INGEST, v5=True)
        async with shared, plain, client(b.gateways, GW_A) as a, client(b.gateways, GW_B) as gb:
            for f in wire.ingest_filters("citygw", "citygw-ingest"):
                await shared.subscribe(f, qos=1)
            for f in wire.ingest_filters("citygw", None):
                await plain.subscribe(f, qos=1)
            for kind in UPLINK_KINDS:
                retain = kind in ("up/meta", "up/stats", "state")
                await a.publish(t(GW_B, kind), b"forged by A", qos=1, retain=retain)
            for gw, c in ((GW_A, a), (GW_B, gb)):
                for kind in UPLINK_KINDS:
                    retain = kind in ("up/meta", "up/stats", "state")
                    await c.publish(t(gw, kind), gw.encode(), qos=1, retain=retain)
            last = (t(GW_B, "state"), GW_B.encode())
            seen = [await collect(shared, last), await collect(plain, last)]
            # a newcomer gets what is retained; a marker ends what it is sent at once
            async with client(b.platform, ROLE_INGEST, v5=True) as newcomer:
                for f in wire.ingest_filters("citygw", None):
                    await newcomer.subscribe(f, qos=1)
                await a.publish(t(GW_A, "up/batch"), b"marker", qos=1)
                retained = await collect(newcomer, (t(GW_A, "up/batch"), b"marker"))
        return seen, retained

    seen, retained = asyncio.run(scenario())
    expected = [(t(gw, k), gw.encode()) for gw in (GW_A, GW_B) for k in UPLINK_KINDS]
    assert seen[0] == expected  # shared: batch and alarm; unshared: meta, stats, state
    assert seen[1] == expected
    assert sorted(retained[:-1]) == sorted(
        (t(gw, k), gw.encode()) for gw in (GW_A, GW_B) for k in ("up/meta", "up/stats", "state")
    )


def test_commands_reach_only_their_gateway_and_only_the_command_role_sends_them(
    acl_broker: AclBroker,
) -> None:
    """Gateway A subscribes to B's down/cmd and to everything (granted: Mosquitto does
    not check subscriptions) but receives only its own commands; it cannot forge a
    command, for B or for itself, nor B's answer; the command role sends to both and
    reads their answers, and nothing else."""
    b = acl_broker

    async def scenario() -> dict[str, list[tuple[str, bytes]]]:
        async with (
            client(b.gateways, GW_A) as a,
            client(b.gateways, GW_B) as gb,
            client(b.platform, ROLE_COMMANDS, v5=True) as platform,
        ):
            await a.subscribe(t(GW_B, "down/cmd"), qos=1)
            await a.subscribe("#", qos=1)
            await gb.subscribe(t(GW_B, "down/#"), qos=1)
            await platform.subscribe("#", qos=1)
            await a.publish(t(GW_B, "down/cmd"), b"forged by A", qos=1)
            await a.publish(t(GW_A, "down/cmd"), b"forged by A", qos=1)
            await a.publish(t(GW_B, "up/resp"), b"forged by A", qos=1)
            await platform.publish(t(GW_B, "down/cmd"), b"for B", qos=1)
            await platform.publish(t(GW_A, "down/cmd"), b"for A", qos=1)
            await a.publish(t(GW_A, "up/batch"), b"A's batch", qos=1)
            await a.publish(t(GW_A, "up/resp"), b"A answers", qos=1)
            await gb.publish(t(GW_B, "up/resp"), b"B answers", qos=1)
            return {
                GW_A: await collect(a, (t(GW_A, "down/cmd"), b"for A")),
                GW_B: await collect(gb, (t(GW_B, "down/cmd"), b"for B")),
                ROLE_COMMANDS: await collect(platform, (t(GW_B, "up/resp"), b"B answers")),
            }

    got = asyncio.run(scenario())
    assert got[GW_A] == [(t(GW_A, "down/cmd"), b"for A")]
    assert got[GW_B] == [(t(GW_B, "down/cmd"), b"for B")]
    assert got[ROLE_COMMANDS] == [
        (t(GW_A, "up/resp"), b"A answers"),
        (t(GW_B, "up/resp"), b"B answers"),
    ]


@pytest.mark.parametrize(
    ("user", "password"),
    [(None, None), (GW_A, "wrong"), (GW_A, PASSWORDS[GW_B]), ("gw-unknown", "pw-a")],
)
def test_without_valid_credentials_nothing_gets_in(
    acl_broker: AclBroker, user: str | None, password: str | None
) -> None:
    b = acl_broker
    for port in (b.gateways, b.platform):
        with pytest.raises(aiomqtt.MqttError, match=r"(?i)not authori[sz]ed"):
            asyncio.run(connect(port, user, password or "", None))
    # the certificate listener: no certificate, no TLS session (whatever the password)
    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(connect(b.certs, user, password or "", b.tls()))


def test_no_client_takes_over_another_by_its_client_id(acl_broker: AclBroker) -> None:
    """On the gateways' listeners the client id is the username: gateway A connecting
    with B's client id, or with an ingest worker's (whose persistent session holds the
    uplinks it has not stored yet), disconnects neither."""
    b = acl_broker

    async def scenario() -> list[tuple[str, bytes]]:
        ingest = client(b.platform, ROLE_INGEST, identifier="ingest.a1", v5=True, clean=False)
        async with ingest, client(b.gateways, GW_B, identifier="citygw-gw-b") as gb:
            await ingest.subscribe(t(GW_B, "up/batch"), qos=1)
            for stolen in ("citygw-gw-b", "gw-b", "ingest.a1"):
                async with client(b.gateways, GW_A, identifier=stolen) as a:
                    await a.publish(t(GW_A, "state"), b"online", qos=1)
                async with client(b.certs, None, identifier=stolen, tls=b.tls(GW_A)) as a:
                    await a.publish(t(GW_A, "state"), b"online", qos=1)
            # both still connected: B's publish goes through, the ingest receives it
            await gb.publish(t(GW_B, "up/batch"), b"still here", qos=1)
            return await collect(ingest, (t(GW_B, "up/batch"), b"still here"))

    assert asyncio.run(scenario()) == [(t(GW_B, "up/batch"), b"still here")]


def test_a_certificate_is_the_gateways_identity(acl_broker: AclBroker) -> None:
    """With `use_identity_as_username`, the CN is the identity: A's certificate may
    publish A's uplinks and no one else's, whatever username it puts in CONNECT."""
    b = acl_broker
    own = [t(GW_A, k) for k in GATEWAY_KINDS]
    denied = [t(GW_B, k) for k in GATEWAY_KINDS] + [t(GW_A, "down/cmd"), t(GW_B, "down/cmd")]
    for claimed in (None, GW_B, ROLE_COMMANDS):
        got = verdicts(b.certs, claimed, own + denied, tls=b.tls(GW_A), password="x")
        assert_verdicts(got, own, denied, f"certificate {GW_A} claiming to be {claimed}")
    got = verdicts(b.certs, None, [t(GW_B, "up/batch"), t(GW_A, "up/batch")], tls=b.tls(GW_B))
    assert got == {t(GW_B, "up/batch"): 0x10, t(GW_A, "up/batch"): NOT_AUTHORIZED}


def test_the_ingest_refuses_a_topic_that_names_no_gateway(tmp_path: Path) -> None:
    """The second line behind the ACL: the ACL's gateway patterns apply to role users
    too (`citygw/role.ingest/up/...`), so the ingest stores nothing from a topic whose
    gateway segment is not a gateway id; it dead-letters it with the reason."""
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    worker = IngestWorker("mqtt://127.0.0.1:1", store)
    batch = Batch()
    batch.append(1, 1_700_000_000_000, 1.5)
    stream = "0123456789abcdef0123456789abcdef"
    for name in (ROLE_INGEST, ROLE_COMMANDS):
        body = codec.encode(batch, gateway=name, seq=1)
        payload = wire.wrap(wire.LANE_TELEMETRY, stream, 1, 1, body)
        asyncio.run(worker.deliver(t(name, "up/batch"), payload))
    assert store.counts().batches == 0
    assert worker.counters.rejected == {"topic": 2}
    letters = store.dead_letters()
    assert sorted(d.topic for d in letters) == sorted(
        t(n, "up/batch") for n in (ROLE_INGEST, ROLE_COMMANDS)
    )
    assert all("is not valid: 1 to 64 letters, digits" in d.error for d in letters)
    store.close()


# -- the real agent and ingest through the ACL ---------------------------------------------

AGENT_CONFIG = """
[gateway]
id = "gw-a"
[uplink]
broker = "{broker}"
{auth}
backoff_min = "100ms"
ack_timeout = "2s"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[[devices]]
name = "pump"
driver = "sim"
poll = "50ms"
  [[devices.points]]
  name = "setpoint"
  writable = true
  min = 0.0
  max = 50.0
  base = 10.0
  [[devices.points]]
  name = "level"
  base = 3.0
"""
FORGED_VALUE = 666.0


@pytest.mark.parametrize("auth", ["password", "certificate"])
def test_agent_and_ingest_deliver_through_the_acl_and_an_impostor_cannot_interfere(
    acl_broker: AclBroker, tmp_path: Path, auth: str
) -> None:
    """The agent (gateway gw-a, by password or by its certificate), an IngestWorker with
    the ingest role's credentials in its broker URL (shared subscription), and the
    command role: readings, meta and state are stored, a command is answered. Meanwhile
    gateway gw-b, with valid credentials of its own, tries to speak for gw-a: it
    pre-claims gw-a's next (stream, seq) keys (which would make the platform drop gw-a's
    real batches as duplicates), renames its points, says it is offline and sends it a
    command. None of it reaches the store or the agent."""
    b = acl_broker
    if auth == "password":
        broker = f"mqtt://127.0.0.1:{b.gateways}"
        lines = f'username = "{GW_A}"\npassword = "{PASSWORDS[GW_A]}"'
    else:
        broker = f"mqtts://127.0.0.1:{b.certs}"
        cert, key = b.pki.certs[GW_A]
        lines = f'ca_file = "{b.pki.ca}"\ncert_file = "{cert}"\nkey_file = "{key}"'
    cfg = parse_config(AGENT_CONFIG.format(broker=broker, auth=lines, buffer=tmp_path / "buf.db"))
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    url = f"mqtt://{ROLE_INGEST}:{PASSWORDS[ROLE_INGEST]}@127.0.0.1:{b.platform}"
    worker = IngestWorker(url, store, group="citygw-ingest")

    def forged_batch(stream: str, seq: int) -> bytes:
        batch = Batch()
        batch.append(1, 1_700_000_000_000 + seq, FORGED_VALUE)
        return wire.wrap(wire.LANE_TELEMETRY, stream, seq, 1, codec.encode(batch, seq=seq))

    forged_meta = orjson.dumps(
        {"v": 1, "gateway": GW_A, "points": [{"id": 1, "key": "fake/point"}]}
    )

    def write(cid: str, value: float) -> bytes:
        return orjson.dumps({"id": cid, "op": "write", "point": "pump/setpoint", "value": value})

    async def scenario() -> tuple[list[str], list[str]]:
        ingest = asyncio.create_task(worker.run())
        agent = Agent(cfg)
        answered: list[str] = []
        states: list[str] = []
        try:
            await wait_until(worker.connected.is_set, message="ingest did not subscribe")
            await agent.start()
            assert agent.buffer is not None
            stream = agent.buffer.stream_id
            async with (
                client(b.gateways, GW_B) as impostor,
                client(b.platform, ROLE_COMMANDS, v5=True) as platform,
            ):
                for seq in range(1, 301):
                    await impostor.publish(t(GW_A, "up/batch"), forged_batch(stream, seq), qos=1)
                await impostor.publish(t(GW_A, "up/meta"), forged_meta, qos=1, retain=True)
                await impostor.publish(t(GW_A, "state"), b"offline", qos=1, retain=True)
                await platform.subscribe(t(GW_A, "up/resp"), qos=1)
                # until the agent is subscribed: a write is idempotent, so repeat it
                for _ in range(100):
                    await platform.publish(t(GW_A, "down/cmd"), write("w1", 20), qos=1)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            async for m in platform.messages:
                                assert isinstance(m.payload, bytes)
                                answered.append(orjson.loads(m.payload)["id"])
                                break
                        break
                # the agent takes commands now: a forged one, then the platform's
                await impostor.publish(t(GW_A, "down/cmd"), write("forged", 1), qos=1)
                await platform.publish(t(GW_A, "down/cmd"), write("w2", 30), qos=1)
                async with asyncio.timeout(10):
                    async for m in platform.messages:
                        assert isinstance(m.payload, bytes)
                        answer = orjson.loads(m.payload)
                        assert answer["ok"] is True, answer
                        answered.append(answer["id"])
                        if answer["id"] == "w2":
                            break

            def stored() -> bool:
                states[:] = [str(g.state) for g in store.gateways()]
                return store.counts().batches >= 10 and states == ["online"]

            await wait_until(stored, message=lambda: f"stored {store.counts()}, {states}")
        finally:
            with contextlib.suppress(Exception):
                await agent.stop()
            ingest.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ingest
        return answered, states

    answered, states = asyncio.run(scenario())
    assert set(answered) == {"w1", "w2"}  # late answers to repeated w1s, never "forged"
    assert [g.gateway for g in store.gateways()] == [GW_A] and states == ["online"]
    readings = store.readings(GW_A)
    assert readings and all(v != FORGED_VALUE for _, _, v, _ in readings)
    assert store.counts().duplicates_dropped == 0 and store.duplicate_readings() == 0
    assert sorted(store.point_keys(GW_A)) == ["pump/level", "pump/setpoint"]
    assert store.dead_letters() == [] and worker.counters.rejected == {}
    store.close()


def test_a_publish_the_acl_refuses_is_never_taken_for_delivered(
    acl_broker: AclBroker, tmp_path: Path
) -> None:
    """A gateway whose identity is not its gateway id (here: gw-b's credentials, config
    id gw-a) is refused by the ACL, but Mosquitto still acknowledges the publish. Under
    MQTT 3.1.1 that PUBACK looked like a delivery: the buffer deleted the batch, and every
    reading was lost without a word. The uplink speaks MQTT 5 and reads the PUBACK's
    reason code: the batches stay in the buffer and the status says why."""
    lines = f'username = "{GW_B}"\npassword = "{PASSWORDS[GW_B]}"'
    broker = f"mqtt://127.0.0.1:{acl_broker.gateways}"
    cfg = parse_config(AGENT_CONFIG.format(broker=broker, auth=lines, buffer=tmp_path / "b.db"))

    async def scenario() -> tuple[int, int, dict[str, object]]:
        agent = Agent(cfg)
        await agent.start()
        try:
            assert agent.uplink is not None
            status = agent.uplink.status
            await wait_until(
                lambda: "0x87" in (status.last_error or ""),
                message=lambda: f"uplink status {status.as_dict()}",
            )
            await agent.stop_drivers()
            await agent.flush()
            return agent.counters.sent, await agent.buffer_depth(), status.as_dict()
        finally:
            await agent.stop()

    sent, depth, status = asyncio.run(scenario())
    assert sent > 0 and depth > 0 and status["published_points"] == 0
    with Buffer.open_readonly(tmp_path / "b.db") as buf:
        stats = buf.stats()
    assert stats.acked_points == 0 and stats.appended_points == sent
    assert "Not authorized" in str(status["last_error"]), status
    assert "must equal gateway.id" in str(status["last_error"]), status


# -- the shipped mosquitto.conf ----------------------------------------------------------


def test_the_shipped_mosquitto_conf_runs_as_documented(pki: Pki, tmp_path: Path) -> None:
    """deploy/mosquitto/citygw.conf with its paths and ports replaced: a gateway with
    its password over TLS, and one with its certificate, speak only for themselves;
    the platform's listener takes the roles; nobody gets in anonymously."""
    passwd = write_password_file(tmp_path / "passwd", PASSWORDS)
    text = SHIPPED_CONF.read_text()
    paths = {
        "/etc/mosquitto/citygw/passwd": passwd,
        "/etc/mosquitto/citygw/citygw.acl": SHIPPED_ACL,
        "/etc/mosquitto/certs/broker.pem": pki.server_cert,
        "/etc/mosquitto/certs/broker.key": pki.server_key,
        "/etc/mosquitto/certs/gateway-ca.pem": pki.ca,
    }
    for path, local in paths.items():
        text = text.replace(f" {path}\n", f" {local}\n")
    ports: dict[int, int] = {}

    def local_listener(m: re.Match[str]) -> str:
        ports[int(m.group(1))] = port = free_port()
        return f"listener {port} 127.0.0.1"

    text = re.sub(r"^listener (\d+)(?: \S+)?$", local_listener, text, flags=re.MULTILINE)
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert not [line for line in settings if "/etc/" in line], "a path the test did not map"
    assert sorted(ports) == [8883, 8884, 8885]
    workdir = tmp_path / "broker"
    workdir.mkdir()
    own, foreign = [t(GW_A, "up/batch"), t(GW_A, "state")], [t(GW_B, "up/batch")]
    ca = tls_context(str(pki.ca))
    with Mosquitto(workdir=workdir, extra_conf="\n" + text) as broker:
        got = verdicts(ports[8883], GW_A, own + foreign, tls=ca)
        assert_verdicts(got, own, foreign, "password gateway")
        cert, key = pki.certs[GW_A]
        with_cert = tls_context(str(pki.ca), str(cert), str(key))
        assert_verdicts(verdicts(ports[8884], None, own + foreign, tls=with_cert), own, foreign, "")
        commands = [t(GW_A, "down/cmd")]
        got = verdicts(ports[8885], ROLE_COMMANDS, commands + own, tls=ca)
        assert_verdicts(got, commands, own, "commands")
        for port, tls in ((ports[8883], ca), (ports[8885], ca), (broker.port, None)):
            with pytest.raises(aiomqtt.MqttError, match=r"(?i)not authori[sz]ed"):
                asyncio.run(connect(port, None, "", tls))


# -- the gateway's config -------------------------------------------------------------------


def test_an_identity_other_than_the_gateway_id_is_warned_about(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The ACL would drop such a gateway's uplinks (over MQTT 3.1.1 after a PUBACK, so
    the gateway could not tell): a warning at load, and in `citygw validate`, with the
    fix. Not an error: a broker without the ACL takes it."""
    cert, key = pki.certs[GW_B]
    text = (
        f'[gateway]\nid = "{GW_A}"\n[uplink]\nbroker = "mqtts://127.0.0.1"\n'
        f'username = "{{user}}"\ncert_file = "{{cert}}"\nkey_file = "{key}"\n'
        f'[buffer]\npath = "{tmp_path / "buf.db"}"\n'
    )
    own_cert = pki.certs[GW_A][0]
    with caplog.at_level(logging.WARNING, logger="citygw.config"):
        parse_config(text.format(user=GW_A, cert=own_cert))
        assert [r for r in caplog.records if r.name == "citygw.config"] == []
        parse_config(text.format(user="gateway-a", cert=cert))
    warnings = [r.getMessage() for r in caplog.records if r.name == "citygw.config"]
    assert warnings == [
        "uplink.username 'gateway-a' differs from gateway.id 'gw-a': a broker with citygw's "
        "ACL (deploy/mosquitto/citygw.acl) drops its uplinks; set username = 'gw-a' (and "
        "the broker user of that name)",
        f"uplink.cert_file {cert}: its CN 'gw-b' differs from gateway.id 'gw-a': a broker "
        "with citygw's ACL (deploy/mosquitto/citygw.acl) drops its uplinks when it takes "
        "the CN as the username; issue the certificate for CN=gw-a",
    ]
    # the command as a user runs it (pytest's log capture would take the warning)
    path = tmp_path / "gateway.toml"
    path.write_text(text.format(user="gateway-a", cert=own_cert))
    run = [sys.executable, "-m", "cli", "validate", "-c", str(path)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "gateway.toml: OK" in result.stdout
    assert "uplink.username 'gateway-a' differs from gateway.id 'gw-a'" in result.stderr
    assert "CN 'gw-a'" not in result.stderr
