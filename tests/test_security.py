"""Security of the uplink against a real Mosquitto: TLS with server verification by
default, mutual TLS, credentials from the environment or a file (and the warning when a
secret file is exposed), clear errors and backoff when the broker or the gateway is
refused; and what the downlink accepts (its own topic only, refusals with a reason, every
command logged with its outcome).

The PKI is made with tests/pki.py in tmp_path: a CA, a server certificate for
IP:127.0.0.1 and DNS:localhost, a client certificate (CN = the gateway's MQTT username),
and a second, unrelated CA with a client certificate of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import orjson
import pytest
from aiomqtt.exceptions import MqttConnectError
from cryptography import x509
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import ConfigError, parse_config
from agent.runtime import Agent
from agent.uplink import BufferPort, Uplink, UplinkSettings, connection_error
from buffer import Lane, Message
from common import wire
from common.broker import BrokerError, Mosquitto, free_port, tls_listener, write_password_file
from common.mqtt_url import tls_context
from tests.helpers import running_broker
from tests.pki import LOCALHOST, issue, make_ca
from tests.test_commands import CONFIG as COMMANDS_CONFIG

GATEWAY = "gw-sec"
STREAM = "0123456789abcdef0123456789abcdef"
#: the refusal tests watch the uplink this long and count its connection attempts
WATCH_S = 3.0
BACKOFF_MIN = 0.2


# -- a throwaway PKI -------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA the broker and the gateway's client certificate chain to
    server_cert: Path  # SAN IP:127.0.0.1, DNS:localhost
    server_key: Path
    elsewhere_cert: Path  # a server certificate for another host only (other.example)
    elsewhere_key: Path
    client_cert: Path  # CN = GATEWAY
    client_key: Path
    other_ca: Path  # an unrelated CA
    rogue_cert: Path  # a client certificate from other_ca, CN = GATEWAY too
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "city-ca")
    other = make_ca(d, "other-ca")
    server_cert, server_key = issue(d, ca, "server", "broker", server_names=LOCALHOST)
    elsewhere_cert, elsewhere_key = issue(
        d, ca, "elsewhere", "other.example", server_names=[x509.DNSName("other.example")]
    )
    client_cert, client_key = issue(d, ca, "client", GATEWAY)
    rogue_cert, rogue_key = issue(d, other, "rogue", GATEWAY)
    return Pki(
        ca[2],
        server_cert,
        server_key,
        elsewhere_cert,
        elsewhere_key,
        client_cert,
        client_key,
        other[2],
        rogue_cert,
        rogue_key,
    )


@dataclass(frozen=True)
class TlsBroker:
    broker: Mosquitto
    tls: int  # server certificate only
    mtls: int  # client certificate required; its CN becomes the username
    elsewhere: int  # a valid certificate, but for another host name


@pytest.fixture
def tls_broker(pki: Pki, tmp_path: Path) -> Iterator[TlsBroker]:
    """One Mosquitto: the plain listener (for the test's own clients), a TLS listener, a
    mutual-TLS listener, and a TLS listener whose certificate names another host."""
    tls, mtls, elsewhere = free_port(), free_port(), free_port()
    extra = (
        tls_listener(tls, pki.ca, pki.server_cert, pki.server_key)
        + tls_listener(
            mtls,
            pki.ca,
            pki.server_cert,
            pki.server_key,
            require_certificate=True,
            use_identity_as_username=True,
        )
        + tls_listener(elsewhere, pki.ca, pki.elsewhere_cert, pki.elsewhere_key)
        + "log_type notice\n"  # connections, with the username the broker took
    )
    workdir = tmp_path / "broker"
    workdir.mkdir()
    try:
        broker = Mosquitto(workdir=workdir, extra_conf=extra)
        broker.start()
    except BrokerError as e:
        pytest.fail(f"cannot start the test broker: {e}", pytrace=False)
    # start() waits for the plain listener only; the TLS ones open after it, once their
    # certificates are loaded (on a busy machine a test could find them still closed)
    deadline = time.monotonic() + 15
    for port in (tls, mtls, elsewhere):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    broker.stop()
                    pytest.fail(f"the broker's TLS listener on {port} did not open", pytrace=False)
                time.sleep(0.05)
    try:
        yield TlsBroker(broker, tls, mtls, elsewhere)
    finally:
        broker.stop()


# -- the uplink, with a buffer in memory -------------------------------------------------


class MemoryBuffer:
    """One telemetry batch waiting; acked tells whether its PUBACK came."""

    def __init__(self) -> None:
        self.waiting = [Message(1, Lane.TELEMETRY, b"\x01\x02\x03", 3, 0)]
        self.acked: list[int] = []

    async def peek(self, n: int, exclude: Collection[int]) -> list[Message]:
        return [m for m in self.waiting if m.seq not in exclude][:n]

    async def ack(self, seqs: Sequence[int]) -> int:
        self.acked += seqs
        self.waiting = [m for m in self.waiting if m.seq not in seqs]
        return len(seqs)


class CountingUplink(Uplink):
    """The real uplink; counts its connection attempts. Its backoff jitter is seeded so
    that the bound on attempts in `refused` holds on every run: with seed 1 and
    backoff_min 0.2 s the waits are 0.2, 0.37, 0.66, 0.56, 1.69 s, ... so a sixth attempt
    cannot start before 3.47 s. (Unseeded, full jitter may wait backoff_min a few times
    in a row, but never less: at most 1 + 3 s / 0.2 s attempts.)"""

    def __init__(self, settings: UplinkSettings, buffer: MemoryBuffer) -> None:
        super().__init__(settings, BufferPort(buffer.peek, buffer.ack), STREAM, b"{}")
        self.attempts = 0
        self._rng = random.Random(1)

    def _client(self) -> aiomqtt.Client:
        self.attempts += 1
        return super()._client()


def settings(port: int, host: str = "127.0.0.1", **kw: object) -> UplinkSettings:
    return UplinkSettings(
        broker=f"mqtts://{host}:{port}" if kw.pop("tls", True) else f"mqtt://{host}:{port}",
        gateway_id=GATEWAY,
        client_id=f"citygw-{GATEWAY}",
        keepalive=5.0,
        ack_timeout=1.0,
        backoff_min=BACKOFF_MIN,
        backoff_max=10.0,
        **kw,  # type: ignore[arg-type]
    )


async def watch(uplink: Uplink, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
    """Runs the uplink for `seconds` of wall time (not more on a slow machine: the bound
    on attempts depends on it), or until `until()` is true."""
    task = asyncio.create_task(uplink.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        for _ in range(int(seconds / 0.05) + 1):
            if until() or loop.time() >= deadline:
                break
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def delivered(s: UplinkSettings, port: int) -> tuple[CountingUplink, list[wire.Envelope]]:
    """Runs an uplink until its batch is acknowledged, watching the batch topic on the
    plain listener: (uplink, the envelopes that arrived)."""
    buf = MemoryBuffer()
    uplink = CountingUplink(s, buf)
    seen: list[wire.Envelope] = []

    async def scenario() -> None:
        async with aiomqtt.Client("127.0.0.1", port) as platform:
            await platform.subscribe(wire.batch_topic(GATEWAY), qos=1)
            await watch(uplink, 10.0, until=lambda: bool(buf.acked))
            async with asyncio.timeout(5):
                async for message in platform.messages:
                    assert isinstance(message.payload, bytes)
                    seen.append(wire.unwrap(message.payload))
                    break

    asyncio.run(scenario())
    assert buf.acked == [1]
    return uplink, seen


def refused(s: UplinkSettings) -> CountingUplink:
    """Runs an uplink that cannot get through for WATCH_S: it backs off, sends nothing."""
    buf = MemoryBuffer()
    uplink = CountingUplink(s, buf)
    asyncio.run(watch(uplink, WATCH_S))
    assert buf.acked == []
    assert uplink.status.connects == 0
    # it retries, but backs off exponentially: at most 5 attempts in 3 s (see above)
    assert 1 <= uplink.attempts <= 5, uplink.attempts
    return uplink


def refused_after_handshake(s: UplinkSettings, alert: str) -> CountingUplink:
    """An uplink that ran until a broker's TLS alert reached it (within 20 s).
    With TLS 1.3 the broker judges the client's certificate after the client's handshake
    is done, then sends its alert and closes; when the close comes as a reset before the
    client read the alert, the kernel discards the alert with the rest of the unread
    data, and that attempt can only say the connection was reset. A reset costs an
    attempt; a later one reads the alert."""
    buf = MemoryBuffer()
    uplink = CountingUplink(s, buf)
    errors: list[str] = []

    def alerted() -> bool:
        error = uplink.status.last_error
        if error and error not in errors:
            errors.append(error)
        return alert in (error or "")

    asyncio.run(watch(uplink, 20.0, until=alerted))
    assert buf.acked == [] and uplink.status.connects == 0
    assert alerted(), errors
    return uplink


# -- TLS -----------------------------------------------------------------------------------


def test_tls_context_verifies_the_broker_by_default(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded_system_store: list[bool] = []
    real = ssl.SSLContext.load_default_certs

    def spy(self: ssl.SSLContext, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH) -> None:
        loaded_system_store.append(True)
        real(self, purpose)

    monkeypatch.setattr(ssl.SSLContext, "load_default_certs", spy)
    ctx = tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert loaded_system_store == [True]  # no ca_file: the system's CA store

    loaded_system_store.clear()
    ctx = tls_context(str(pki.ca))
    assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert loaded_system_store == []  # with a ca_file, only that CA is trusted
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "city-ca"),),)]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_uplink_delivers_over_tls(tls_broker: TlsBroker, pki: Pki, host: str) -> None:
    """The broker's certificate names IP:127.0.0.1 and DNS:localhost: both verify."""
    uplink, seen = delivered(
        settings(tls_broker.tls, host, ca_file=str(pki.ca)), tls_broker.broker.port
    )
    assert [(e.seq, e.stream, e.body) for e in seen] == [(1, STREAM, b"\x01\x02\x03")]
    assert uplink.status.connects == 1 and uplink.status.last_error is None


def test_uplink_delivers_over_mutual_tls_as_its_certificate_identity(
    tls_broker: TlsBroker, pki: Pki
) -> None:
    s = settings(
        tls_broker.mtls,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    uplink, seen = delivered(s, tls_broker.broker.port)
    assert [e.seq for e in seen] == [1]
    assert uplink.status.connects == 1
    # use_identity_as_username: the broker took the certificate's CN as the username
    assert f"u'{GATEWAY}'" in tls_broker.broker.log.read_text()


def test_mutual_tls_refuses_an_uplink_without_a_client_certificate(
    tls_broker: TlsBroker, pki: Pki
) -> None:
    uplink = refused_after_handshake(
        settings(tls_broker.mtls, ca_file=str(pki.ca)), "certificate required"
    )
    error = uplink.status.last_error or ""
    assert error.startswith("TLS: the broker requires a client certificate"), error
    assert "certificate required" in error
    assert uplink.status.state == "stopped"


def test_mutual_tls_refuses_a_certificate_from_another_ca(tls_broker: TlsBroker, pki: Pki) -> None:
    s = settings(
        tls_broker.mtls,
        ca_file=str(pki.ca),
        cert_file=str(pki.rogue_cert),
        key_file=str(pki.rogue_key),
    )
    error = refused_after_handshake(s, "unknown ca").status.last_error or ""
    assert error.startswith("TLS: the broker does not trust the CA of the client certificate")
    assert "unknown ca" in error


def test_uplink_refuses_a_broker_signed_by_another_ca(tls_broker: TlsBroker, pki: Pki) -> None:
    error = refused(settings(tls_broker.tls, ca_file=str(pki.other_ca))).status.last_error or ""
    assert error.startswith("TLS: the broker's certificate is not trusted"), error
    assert "certificate verify failed" in error and "CERTIFICATE_VERIFY_FAILED" in error


def test_uplink_refuses_a_broker_certificate_for_another_host(
    tls_broker: TlsBroker, pki: Pki
) -> None:
    """Signed by the right CA, but for other.example: the host name is checked too."""
    error = refused(settings(tls_broker.elsewhere, ca_file=str(pki.ca))).status.last_error or ""
    assert "certificate verify failed" in error and "mismatch" in error, error


def test_plain_mqtt_to_a_tls_port_is_a_clear_error(tls_broker: TlsBroker) -> None:
    """mqtt:// to a TLS listener: no data in clear, the status says the connection
    failed (the broker drops what is not a TLS handshake)."""
    uplink = refused(settings(tls_broker.tls, tls=False))
    # not just "Operation timed out": what the socket said
    assert "failed to receive on socket" in (uplink.status.last_error or "")


def test_unusable_client_key_is_a_tls_setup_error(tls_broker: TlsBroker, pki: Pki) -> None:
    """A key that does not belong to the certificate fails before any connection."""
    s = settings(
        tls_broker.mtls,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.rogue_key),
    )
    error = refused(s).status.last_error or ""
    assert error.startswith("TLS setup failed (ca_file, cert_file, key_file): SSLError"), error


# -- credentials ---------------------------------------------------------------------------


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto that wants a username and password (gw-sec / the right one)."""
    workdir = tmp_path / "broker"
    workdir.mkdir()
    passwords = write_password_file(
        workdir / "passwd", {GATEWAY: "right horse battery", "platform": "platform-pw"}
    )
    with running_broker(workdir, allow_anonymous=False, password_file=passwords) as broker:
        yield broker


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


CONFIG = """
[gateway]
id = "gw-sec"
[uplink]
broker = "{broker}"
username = "gw-sec"
{secret}
ack_timeout = "1s"
backoff_min = "200ms"
backoff_max = "10s"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[[devices]]
name = "meter"
driver = "sim"
poll = "50ms"
  [[devices.points]]
  name = "power"
  base = 100.0
"""


def test_password_file_gets_the_agent_through(
    password_broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole agent, its password read from a file (with the newline an editor
    leaves): it connects and its readings reach the platform's subscriber."""
    secret = write_secret(tmp_path / "mqtt-password", "right horse battery\n")
    cfg = parse_config(
        CONFIG.format(
            broker=password_broker.url,
            secret=f'password_file = "{secret}"',
            buffer=tmp_path / "buf.db",
        )
    )
    assert cfg.uplink.password is not None
    assert cfg.uplink.password.get_secret_value() == "right horse battery"

    async def scenario() -> tuple[Agent, int]:
        agent = Agent(cfg)
        batches = 0
        async with aiomqtt.Client(
            "127.0.0.1", password_broker.port, username="platform", password="platform-pw"
        ) as platform:
            await platform.subscribe(wire.batch_topic(GATEWAY), qos=1)
            await agent.start()
            try:
                async with asyncio.timeout(10):
                    async for _ in platform.messages:
                        batches += 1
                        break
            finally:
                await agent.stop()
        return agent, batches

    with caplog.at_level(logging.DEBUG):
        agent, batches = asyncio.run(scenario())
    assert batches == 1
    assert agent.uplink is not None and agent.uplink.status.connects >= 1
    assert "right horse battery" not in caplog.text
    assert "right horse battery" not in repr(cfg) and "right horse battery" not in str(cfg)


def test_wrong_password_is_refused_clearly_and_backed_off(
    password_broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings(password_broker.port, tls=False, username=GATEWAY, password="wrong horse")
    with caplog.at_level(logging.DEBUG):
        uplink = refused(s)
    error = uplink.status.last_error or ""
    assert error.startswith("broker refused the connection: not authorized"), error
    assert "wrong horse" not in caplog.text and "wrong horse" not in error
    assert "uplink down, retrying" in caplog.text


def test_no_credentials_is_refused_clearly(password_broker: Mosquitto) -> None:
    error = refused(settings(password_broker.port, tls=False)).status.last_error or ""
    assert "not authorized" in error


def config_with(tmp_path: Path, uplink_lines: str) -> str:
    return (
        f'[gateway]\nid = "gw-sec"\n[uplink]\nbroker = "mqtts://127.0.0.1"\n{uplink_lines}\n'
        f'[buffer]\npath = "{tmp_path / "buf.db"}"\n'
    )


@pytest.mark.parametrize(
    ("content", "password"),
    [
        ("s3cret\n", "s3cret"),
        ("s3cret\r\n", "s3cret"),
        ("s3cret", "s3cret"),
        (" spaced  \n", " spaced  "),  # only the line end goes
    ],
)
def test_password_file_is_read_at_load(tmp_path: Path, content: str, password: str) -> None:
    write_secret(tmp_path / "pw", content)
    cfg = parse_config(config_with(tmp_path, 'password_file = "pw"'), base_dir=tmp_path)
    assert cfg.uplink.password is not None
    assert cfg.uplink.password.get_secret_value() == password
    assert password.strip() not in repr(cfg.uplink)


def test_password_file_via_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_secret(tmp_path / "pw", "from-file\n")
    monkeypatch.setenv("CITYGW_TEST_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("CITYGW_TEST_USER", "gw-user")
    cfg = parse_config(
        config_with(
            tmp_path,
            'username = "${CITYGW_TEST_USER}"\npassword_file = "${CITYGW_TEST_PASSWORD_FILE}"',
        )
    )
    assert cfg.uplink.username == "gw-user"
    assert cfg.uplink.password is not None
    assert cfg.uplink.password.get_secret_value() == "from-file"


@pytest.mark.parametrize(
    ("lines", "files", "message"),
    [
        (
            'password_file = "missing"',
            {},
            "<string>: uplink.password_file: file not found: missing "
            "(relative to the config file's folder)",
        ),
        (
            'password = "inline-secret"\npassword_file = "pw"',
            {"pw": "file-secret\n"},
            "<string>: uplink.password_file: give either password or password_file, not both",
        ),
        (
            'password_file = "pw"',
            {"pw": "\n"},
            "<string>: uplink.password_file: {dir}/pw is empty; write the password in it",
        ),
        (
            'password_file = "pw"',
            {"pw": "user:file-secret\nother:line\n"},
            "<string>: uplink.password_file: {dir}/pw must hold the password alone, on one line",
        ),
        (
            'cert_file = "cert.pem"\nkey_file = "missing.key"',
            {"cert.pem": "x"},
            "<string>: uplink.key_file: file not found: missing.key "
            "(relative to the config file's folder)",
        ),
    ],
)
def test_credential_file_errors_name_the_key(
    tmp_path: Path, lines: str, files: dict[str, str], message: str
) -> None:
    for name, text in files.items():
        write_secret(tmp_path / name, text)
    with pytest.raises(ConfigError) as err:
        parse_config(config_with(tmp_path, lines), base_dir=tmp_path)
    assert str(err.value) == message.format(dir=tmp_path)
    assert "secret" not in str(err.value).replace("file-secret", "")
    assert "file-secret" not in str(err.value) and "inline-secret" not in str(err.value)


@pytest.mark.parametrize(
    ("pw_mode", "key_mode", "warnings"),
    [
        (0o600, 0o600, []),
        (0o640, 0o600, []),  # a password file may be shared with the service's group
        (0o644, 0o600, ["uplink.password_file {dir}/pw is accessible by others (mode 0644); "
                        "run: chmod o-rwx {dir}/pw"]),
        (0o600, 0o640, ["uplink.key_file {dir}/client.key is accessible by group or others "
                        "(mode 0640); run: chmod 600 {dir}/client.key"]),
        (0o606, 0o604, ["uplink.password_file {dir}/pw is accessible by others (mode 0606); "
                        "run: chmod o-rwx {dir}/pw",
                        "uplink.key_file {dir}/client.key is accessible by group or others "
                        "(mode 0604); run: chmod 600 {dir}/client.key"]),
    ],
)  # fmt: skip
def test_exposed_secret_files_are_warned_about(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    pw_mode: int,
    key_mode: int,
    warnings: list[str],
) -> None:
    write_secret(tmp_path / "pw", "the-password\n", pw_mode)
    write_secret(tmp_path / "client.pem", "cert")
    write_secret(tmp_path / "client.key", "key", key_mode)
    lines = 'password_file = "pw"\ncert_file = "client.pem"\nkey_file = "client.key"'
    with caplog.at_level(logging.WARNING, logger="citygw.config"):
        parse_config(config_with(tmp_path, lines), base_dir=tmp_path)
    records = [r for r in caplog.records if r.name == "citygw.config"]
    assert [r.getMessage() for r in records] == [w.format(dir=tmp_path) for w in warnings]
    assert all(r.levelno == logging.WARNING for r in records)
    assert "the-password" not in caplog.text


def test_unreadable_password_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_secret(tmp_path / "pw", "s3cret\n", 0o000)
    real = Path.read_bytes

    def denied(self: Path) -> bytes:  # what a non-root agent gets (tests may run as root)
        if self.name == "pw":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"uplink\.password_file: cannot read .*pw: Permission"):
        parse_config(config_with(tmp_path, 'password_file = "pw"'), base_dir=tmp_path)


def test_connection_errors_in_words() -> None:
    connack = ReasonCode(PacketTypes.CONNACK, identifier=135)
    assert connection_error(MqttConnectError(connack)).startswith(
        "broker refused the connection: not authorized ([code:135] Not authorized)"
    )
    assert connection_error(MqttConnectError(4)).startswith(
        "broker refused the connection: bad username or password"
    )
    timeout = aiomqtt.MqttError("Operation timed out")
    alert = "failed to receive on socket: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"
    assert connection_error(timeout, alert) == (
        f"TLS: the broker does not trust the CA of the client certificate ({alert})"
    )
    assert connection_error(timeout, "failed to receive on socket: reset") == (
        "Operation timed out: failed to receive on socket: reset"
    )
    assert connection_error(timeout) == "Operation timed out"
    assert connection_error(aiomqtt.MqttError("[Errno 111] Connection refused")) == (
        "[Errno 111] Connection refused"
    )
    assert connection_error(FileNotFoundError(2, "No such file or directory")) == (
        "FileNotFoundError: [Errno 2] No such file or directory"
    )


# -- downlink commands ---------------------------------------------------------------------

# the pump of tests/test_commands.py, under this file's gateway id
COMMAND_CONFIG = COMMANDS_CONFIG.replace('id = "gw-cmd"', f'id = "{GATEWAY}"')


def test_downlink_answers_only_its_own_topic_and_logs_every_command(
    mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Commands on another gateway's down/cmd, on a look-alike topic, or retained are
    not executed and not answered; each command on its own topic is answered on up/resp
    (refusals with the reason) and logged with its outcome. The platform's publishes
    arrive in order and the agent answers in order, so once the last answer is here,
    any answer to an earlier stray command would be here too."""
    cfg = parse_config(COMMAND_CONFIG.format(broker=mosquitto.url, buffer=tmp_path / "buf.db"))
    own = wire.topic("citygw", GATEWAY, "down/cmd")
    stray = [
        (wire.topic("citygw", "gw-other", "down/cmd"), "x1"),
        ("citygw/gw-sec/down/cmd/extra", "x2"),
        ("citygw/gw-sec/down", "x3"),
        ("other/gw-sec/down/cmd", "x4"),
    ]
    sent = [
        (b'{"id": "c1", "op": "write", "point": "pump/setpoint", "value": 20}', "c1"),
        (b'{"id": "c2", "op": "write", "point": "pump/level", "value": 1}', "c2"),
        (b'{"id": "c3", "op": "write", "point": "pump/setpoint", "value": 51}', "c3"),
        (b'{"id": "c4", "op": "write", "point": "pump/nothing", "value": 1}', "c4"),
        (b'{"id": "c5", "op": "write", "point": "pump/setpoint", "value": "NaN"}', "c5"),
        (b'{"id": "c6", "op": "reboot"}', "c6"),
        (b'{"id": "c7", "op": "write", "point": "pump/setpoint", "value": 1e999}', None),
        (b'{"id": "c8", ', None),
        (b'{"id": "c9", "op": "write", "point": "pump/setpoint", "value": 30}', "c9"),
    ]

    async def scenario() -> list[dict[str, object]]:
        agent = Agent(cfg)
        answers: list[dict[str, object]] = []
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as platform:
            await platform.subscribe(wire.topic("citygw", GATEWAY, "up/resp"), qos=1)
            # a retained command waiting before the agent connects: never executed
            retained = b'{"id": "r1", "op": "write", "point": "pump/setpoint", "value": 5}'
            await platform.publish(own, retained, qos=1, retain=True)
            await agent.start()
            try:
                # probe until the agent answers: it is connected and subscribed
                for i in range(100):
                    await platform.publish(own, b'{"id": "probe-%d", "op": "noop"}' % i, qos=1)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            async for _ in platform.messages:
                                break
                        break
                for topic, cid in stray:
                    stray_body = {"id": cid, "op": "write", "point": "pump/setpoint", "value": 1}
                    await platform.publish(topic, orjson.dumps(stray_body), qos=1)
                for body, _ in sent:
                    await platform.publish(own, body, qos=1)
                async with asyncio.timeout(10):
                    async for message in platform.messages:
                        assert isinstance(message.payload, bytes)
                        answer = orjson.loads(message.payload)
                        if not str(answer["id"]).startswith("probe-"):  # late probe answers
                            answers.append(answer)
                        if answer["id"] == "c9":
                            break
            finally:
                await agent.stop()
                await platform.publish(own, b"", qos=1, retain=True)  # clear the retained one
        return answers

    with caplog.at_level(logging.INFO, logger="citygw"):
        answers = asyncio.run(scenario())
    assert [a["id"] for a in answers] == [cid for _, cid in sent]
    outcome = {str(a["id"]): (a["ok"], a.get("error")) for a in answers}
    assert outcome["c1"] == (True, None)
    assert outcome["c2"] == (False, "point 'pump/level' is not writable")
    assert outcome["c3"] == (
        False,
        "value 51 for 'pump/setpoint' is outside its declared range [0, 50]",
    )
    assert outcome["c4"] == (False, "unknown point 'pump/nothing' (give 'device/point')")
    assert outcome["c5"] == (
        False,
        "value for 'pump/setpoint' must be a finite number, got 'NaN'",
    )
    assert outcome["c6"] == (
        False,
        "unknown op 'reboot'; allowed: write, firmware_update, config_push, rule_override",
    )
    assert outcome["None"][0] is False and "command is not JSON" in str(outcome["None"][1])
    assert outcome["c9"] == (True, None)
    # every command in the log, with its outcome
    logged = [
        (r.getMessage(), getattr(r, "id", None))
        for r in caplog.records
        if "command" in r.msg and not str(getattr(r, "id", "")).startswith("probe-")
    ]
    assert logged == [
        ("downlink command ignored", None),  # the retained one, never executed
        ("command executed", "c1"),
        ("command refused", "c2"),
        ("command refused", "c3"),
        ("command refused", "c4"),
        ("command refused", "c5"),
        ("command refused", "c6"),
        ("command refused", None),
        ("command refused", None),
        ("command executed", "c9"),
    ]
    refusals = [r for r in caplog.records if r.getMessage() == "command refused"]
    assert all(getattr(r, "error", "") for r in refusals)
