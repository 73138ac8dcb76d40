"""The uplink against a real mosquitto: TLS with a client certificate, the retained
state topic with its last will, and the retained point registry (up/meta)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest

from agent.config import parse_config
from agent.runtime import Agent
from central.stores import open_store
from central.worker import IngestWorker
from common import wire
from common.broker import Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent


def config(broker: str, buffer: Path, tls: str = "") -> str:
    return f"""
[gateway]
id = "gw-up"
site = "test bench"
location = {{ lat = 1.5, lon = 2.5 }}

[uplink]
broker = "{broker}"
keepalive = "2s"
ack_timeout = "2s"
backoff_min = "100ms"
backoff_max = "500ms"
{tls}

[buffer]
path = "{buffer}"
flush_interval = "100ms"

[[devices]]
name = "meter"
driver = "sim"
poll = "50ms"

  [[devices.points]]
  name = "power"
  unit = "W"
  base = 100.0
  noise = 1.0

  [[devices.points]]
  name = "voltage"
  unit = "V"
  base = 230.0
"""


async def retained(url: str, topic: str, timeout: float = 5.0) -> bytes:
    """The retained message on topic, as a new subscriber sees it."""
    host, port = url.removeprefix("mqtt://").split(":")
    async with aiomqtt.Client(host, int(port)) as client:
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("unreachable")


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    d = tmp_path / "pki"
    d.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        extra = ["-extfile", f"{name}.ext"] if ext else []
        if ext:
            (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *extra, cwd=d)  # fmt: skip
    return d


def test_tls_with_client_certificate(pki: Path, tmp_path: Path) -> None:
    """The gateway connects over TLS, verifies the broker against its CA and presents a
    client certificate the broker requires; readings arrive."""
    tls_port = free_port()
    extra = (
        f"\nlistener {tls_port} 127.0.0.1\ncafile {pki / 'ca.pem'}\n"
        f"certfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
        "require_certificate true\n"
    )
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    tls = (
        f'ca_file = "{pki / "ca.pem"}"\ncert_file = "{pki / "client.pem"}"\n'
        f'key_file = "{pki / "client.key"}"'
    )
    cfg = parse_config(config(f"mqtts://127.0.0.1:{tls_port}", tmp_path / "buf.db", tls))

    async def scenario(broker: Mosquitto) -> Agent:
        worker = IngestWorker(broker.url, store, group="t")  # ingest on the plain listener
        ingest = asyncio.create_task(worker.run())
        agent = Agent(cfg)
        try:
            await asyncio.wait_for(worker.connected.wait(), 10)
            await agent.start()
            await asyncio.sleep(1.0)
            await agent.stop_drivers()
            await agent.flush()
            assert await agent.drain(10)
            for _ in range(100):
                if store.counts().readings >= agent.counters.sent:
                    break
                await asyncio.sleep(0.05)
        finally:
            await agent.stop()
            ingest.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ingest
        return agent

    try:
        with Mosquitto(workdir=tmp_path, extra_conf=extra) as broker:
            agent = asyncio.run(scenario(broker))
        assert agent.uplink is not None and agent.uplink.status.connects == 1
        assert agent.counters.sent > 0
        assert store.counts().readings == agent.counters.sent
    finally:
        store.close()


def test_tls_refuses_an_unknown_broker(pki: Path, tmp_path: Path) -> None:
    """Without the right CA the gateway does not talk to the broker: it backs off and
    keeps its data, with the TLS error as the uplink's last error."""
    tls_port = free_port()
    extra = (
        f"\nlistener {tls_port} 127.0.0.1\ncertfile {pki / 'server.pem'}\n"
        f"keyfile {pki / 'server.key'}\n"
    )
    cfg = parse_config(config(f"mqtts://127.0.0.1:{tls_port}", tmp_path / "buf.db"))

    async def scenario() -> Agent:
        agent = Agent(cfg)
        await agent.start()
        await asyncio.sleep(1.5)
        await agent.stop()
        return agent

    with Mosquitto(workdir=tmp_path, extra_conf=extra):
        agent = asyncio.run(scenario())
    assert agent.uplink is not None
    assert agent.uplink.status.connects == 0
    assert "CERTIFICATE_VERIFY_FAILED" in (agent.uplink.status.last_error or "")
    assert agent.counters.sent > 0


def test_state_online_then_last_will_offline_and_meta_retained(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    cfg_path = tmp_path / "gateway.toml"
    cfg_path.write_text(config(mosquitto.url, tmp_path / "buf.db"))
    state_topic = wire.topic("citygw", "gw-up", "state")
    meta_topic = wire.topic("citygw", "gw-up", "up/meta")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "-c", str(cfg_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def wait_online() -> bytes:
            for _ in range(100):
                with contextlib.suppress(TimeoutError):
                    if await retained(mosquitto.url, state_topic, 0.2) == b"online":
                        return b"online"
                await asyncio.sleep(0.1)
            return b"never online"

        assert asyncio.run(wait_online()) == b"online"
        meta = wire.decode_meta(asyncio.run(retained(mosquitto.url, meta_topic)))
        assert meta.gateway == "gw-up"
        assert meta.site == "test bench"
        assert [(p.key, p.unit, p.device, p.driver) for p in meta.points] == [
            ("meter/power", "W", "meter", "sim"),
            ("meter/voltage", "V", "meter", "sim"),
        ]
        assert sorted(p.id for p in meta.points) == [p.id for p in meta.points]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the broker notices the dead connection and publishes the will
    assert asyncio.run(retained(mosquitto.url, state_topic)) == b"offline"


def test_graceful_stop_says_offline(mosquitto: Mosquitto, tmp_path: Path) -> None:
    cfg_path = tmp_path / "gateway.toml"
    cfg_path.write_text(config(mosquitto.url, tmp_path / "buf.db"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "-c", str(cfg_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_topic = wire.topic("citygw", "gw-up", "state")
    try:

        async def wait_online() -> None:
            for _ in range(100):
                with contextlib.suppress(TimeoutError):
                    if await retained(mosquitto.url, state_topic, 0.2) == b"online":
                        return
                await asyncio.sleep(0.1)

        asyncio.run(wait_online())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert asyncio.run(retained(mosquitto.url, state_topic)) == b"offline"


class FlakySession:
    """A broker session that delivers every publish but, for the first `lose` batches,
    loses the PUBACK (the connection drops right after the broker got the message)."""

    def __init__(self, link: FlakyLink) -> None:
        self.link = link
        self.dead = False

    async def __aenter__(self) -> FlakySession:
        self.link.connects += 1
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        *,
        timeout: float | None = None,
    ) -> None:
        if self.dead:
            raise aiomqtt.MqttError("not connected")
        if not topic.endswith("/state"):
            await self.link.deliver(topic, payload)
        self.link.published.append((topic, payload))  # what reached the platform
        if self.dead:  # delivered, but the connection died meanwhile: no PUBACK either
            raise aiomqtt.MqttError("connection lost before PUBACK")
        if topic.endswith(("/up/batch", "/up/alarm")) and self.link.lose > 0:
            self.link.lose -= 1
            self.dead = True
            raise aiomqtt.MqttError("connection lost before PUBACK")


class FlakyLink:
    def __init__(self, deliver, lose: int) -> None:  # type: ignore[no-untyped-def]
        self.deliver = deliver
        self.lose = lose
        self.connects = 0
        self.published: list[tuple[str, bytes]] = []

    def connect(self) -> FlakySession:
        return FlakySession(self)


def test_lost_puback_resends_same_sequence_and_platform_drops_duplicate(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    worker = IngestWorker("mqtt://127.0.0.1", store, group=None)
    link = FlakyLink(worker.deliver, lose=3)
    cfg = parse_config(config("mqtt://127.0.0.1", tmp_path / "buf.db"))

    async def scenario() -> Agent:
        agent = Agent(cfg, connect=link.connect)
        await agent.start()
        await asyncio.sleep(1.0)
        await agent.stop_drivers()
        await agent.flush()
        assert await agent.drain(10)
        await agent.stop()
        return agent

    try:
        agent = asyncio.run(scenario())
        batches = [wire.unwrap(p) for t, p in link.published if t.endswith("/up/batch")]
        seqs = [env.seq for env in batches]
        assert link.connects == 4  # three lost PUBACKs, three reconnects
        # each batch whose PUBACK was lost went again with the same seq and stream...
        assert len(seqs) - len(set(seqs)) >= 3
        assert sorted(set(seqs)) == list(range(min(seqs), max(seqs) + 1))
        assert {env.stream for env in batches} == {agent.uplink.stream_id}  # type: ignore[union-attr]
        counts = store.counts()
        # ...and the platform stored each once, dropping the copies
        assert counts.duplicates_dropped >= 3
        assert counts.batches == len(set(seqs))
        assert counts.readings == agent.counters.sent > 0
        assert store.duplicate_readings() == 0
    finally:
        store.close()


def test_alarm_lane_leaves_before_the_telemetry_backlog(tmp_path: Path) -> None:
    from buffer import Buffer, Lane

    cfg = parse_config(config("mqtt://127.0.0.1", tmp_path / "buf.db"))
    with Buffer(cfg.buffer.path, cfg.buffer.capacity) as buf:
        backlog = [buf.append(Lane.TELEMETRY, b"t", 1) for _ in range(20)]
        alarm = buf.append(Lane.ALARM, b"a", 1)
        event = buf.append(Lane.EVENT, b"e", 1)
    published: list[tuple[str, int]] = []

    async def record(topic: str, payload: bytes) -> None:
        if "/up/batch" in topic or "/up/alarm" in topic:
            published.append((topic.rsplit("/", 1)[1], wire.unwrap(payload).seq))

    link = FlakyLink(record, lose=0)

    async def scenario() -> None:
        agent = Agent(cfg, connect=link.connect)
        await agent.start()
        await agent.stop_drivers()
        assert await agent.drain(10)
        await agent.stop()

    asyncio.run(scenario())
    assert published[0] == ("alarm", alarm)
    assert published[1] == ("batch", event)
    assert [seq for _, seq in published[2:22]] == backlog
