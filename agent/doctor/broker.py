"""The broker checks, one step at a time so that the first one to fail says where the
trouble is: the name resolves (dns), the port accepts a connection (tcp), TLS completes
with the config's CA and client certificate (tls), the certificates are not expired or
about to (certificates: warn 30 days ahead), and the broker accepts the config's
credentials with an MQTT CONNECT and lets the gateway subscribe to its commands (auth).
The same steps check a `driver = "mqtt"` device's site broker."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import Config
from agent.doctor.check import Check, passed, skipped
from agent.uplink import connection_error, tls_failure
from common import wire
from common.mqtt_url import BrokerAddress, tls_context
from common.reconnect import MqttClient

if TYPE_CHECKING:  # imported where used: `citygw run` loads this module, not cryptography
    from cryptography import x509

#: a certificate that expires within this is a warn
EXPIRY_WARN = datetime.timedelta(days=30)
#: how long the TLS step waits after the handshake for an alert: with TLS 1.3 a broker
#: refuses the client certificate only after the client considers the handshake done
ALERT_WAIT_S = 0.5

#: the MQTT client's log: not shown (each failure becomes a check's message)
_quiet = logging.Logger("citygw.doctor.mqtt")
_quiet.addHandler(logging.NullHandler())


@dataclass(frozen=True, slots=True)
class BrokerTarget:
    """Where and as whom to connect: the uplink's broker or a device's site broker."""

    name: str  # the checks' name prefix: "broker"
    section: str  # the config table its keys are in: "uplink", "devices[2]"
    address: BrokerAddress
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str = ""
    v5: bool = True
    #: subscribed to after the CONNECT (the gateway's commands topic), if set
    subscribe: str | None = None

    @classmethod
    def of_uplink(cls, cfg: Config) -> BrokerTarget:
        u = cfg.uplink
        return cls(
            name="broker",
            section="uplink",
            address=BrokerAddress.parse(u.broker),
            username=u.username,
            password=u.password.get_secret_value() if u.password else None,
            ca_file=str(u.ca_file) if u.ca_file else None,
            cert_file=str(u.cert_file) if u.cert_file else None,
            key_file=str(u.key_file) if u.key_file else None,
            client_id=u.client_id,
            subscribe=wire.topic(u.topic_prefix, cfg.gateway.id, wire.KIND_CMD),
        )

    def tls_context(self) -> ssl.SSLContext:
        return tls_context(self.ca_file, self.cert_file, self.key_file)


def _name(cert: x509.Certificate) -> str:
    return ", ".join(a.rfc4514_string() for a in cert.subject) or "(no subject)"


def _names(cert: x509.Certificate) -> list[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n) for n in san.get_values_for_type(x509.DNSName)] + [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def expiry_check(
    name: str, certs: list[tuple[str, x509.Certificate]], now: datetime.datetime
) -> Check:
    """The certificates' end dates: expired is a fail, within EXPIRY_WARN a warn."""
    found, expired, soon = [], [], []
    for what, cert in certs:
        end = cert.not_valid_after_utc
        days = (end - now).total_seconds() / 86400
        line = f"{what} ({_name(cert)}) valid until {end:%Y-%m-%d}"
        if end <= now:
            expired.append(f"{what} ({_name(cert)}) expired on {end:%Y-%m-%d}")
        elif end - now < EXPIRY_WARN:
            soon.append(f"{line}: {days:.0f} days left")
        else:
            found.append(f"{line} ({days:.0f} days)")
    if expired:
        return Check(
            name,
            "fail",
            "; ".join(expired + soon + found),
            "renew the expired certificate: until then the broker or the gateway refuses TLS",
        )
    if soon:
        return Check(
            name,
            "warn",
            "; ".join(soon + found),
            f"renew it within {EXPIRY_WARN.days} days, before it expires",
        )
    return passed(name, "; ".join(found))


def _verify_failure(
    t: BrokerTarget, exc: ssl.SSLCertVerificationError, peer: x509.Certificate | None
) -> Check:
    """A TLS verification failure named, with the certificate the broker showed."""
    host = t.address.host
    shown = ""
    fix = f"set {t.section}.ca_file to the CA that signed the broker's certificate"
    if peer is not None:
        names = _names(peer)
        shown = (
            f"; the broker shows {_name(peer)}, issued by "
            f"{', '.join(a.rfc4514_string() for a in peer.issuer)}, valid "
            f"{peer.not_valid_before_utc:%Y-%m-%d} to {peer.not_valid_after_utc:%Y-%m-%d}, "
            f"for {', '.join(names) or 'no subjectAltName'}"
        )
        if exc.verify_code in (62, 64):  # host name / IP address mismatch
            fix = (
                f"use a host the certificate names ({', '.join(names) or 'none'}) in "
                f"{t.section}.broker, or have the certificate reissued for {host}"
            )
    if exc.verify_code == 10:
        fix = "the broker's certificate has expired: renew it on the broker"
    elif exc.verify_code == 9:
        fix = "the certificate is not valid yet: check the gateway's clock (see clock)"
    return Check(
        f"{t.name}.tls",
        "fail",
        f"the broker's certificate is not trusted: {exc.verify_message}{shown}",
        fix,
    )


async def _peer_certificate(
    addr: str, port: int, host: str, timeout: float
) -> x509.Certificate | None:
    """The broker's certificate without verifying it: to describe one that failed."""
    from cryptography import x509

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(addr, port, ssl=ctx, server_hostname=host)
    except (OSError, TimeoutError):
        return None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    finally:
        writer.close()


async def _resolve(t: BrokerTarget, timeout: float) -> tuple[Check, list[str]]:
    host, port = t.address.host, t.address.port
    name = f"{t.name}.dns"
    try:
        async with asyncio.timeout(timeout):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
    except socket.gaierror as exc:
        return Check(
            name,
            "fail",
            f"cannot resolve {host}: {exc.strerror}",
            f"check the host name in {t.section}.broker and the gateway's DNS "
            "(resolvectl status, /etc/resolv.conf)",
        ), []
    except TimeoutError:
        return Check(
            name,
            "fail",
            f"no DNS answer for {host} within {timeout:g} s",
            "check the gateway's DNS server and its network link",
        ), []
    addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if addrs == [host]:
        return passed(name, f"{host} is an address (nothing to resolve)"), addrs
    return passed(name, f"{host} is {', '.join(addrs)}"), addrs


async def _connect(t: BrokerTarget, addrs: list[str], timeout: float) -> tuple[Check, str | None]:
    port = t.address.port
    name = f"{t.name}.tcp"
    failures = []
    for addr in addrs:
        try:
            async with asyncio.timeout(timeout):
                _, writer = await asyncio.open_connection(addr, port)
        except ConnectionRefusedError:
            failures.append(f"{addr}:{port} refused the connection (nothing listens there)")
        except TimeoutError:
            failures.append(f"{addr}:{port} did not answer within {timeout:g} s")
        except OSError as exc:
            failures.append(f"{addr}:{port}: {exc.strerror or exc}")
        else:
            writer.close()
            return passed(name, f"{addr}:{port} accepts connections"), addr
    return Check(
        name,
        "fail",
        "; ".join(failures),
        f"is the broker running, and is the port in {t.section}.broker right (mqtt 1883, "
        "mqtts 8883)? No answer at all: a firewall drops the packets, or no route "
        "(ip route; the modem)",
    ), None


async def _handshake(
    t: BrokerTarget, addr: str, timeout: float
) -> tuple[Check, x509.Certificate | None]:
    """The TLS step, and the broker's certificate (also when it was not trusted)."""
    from cryptography import x509

    name = f"{t.name}.tls"
    host, port = t.address.host, t.address.port
    try:
        ctx = t.tls_context()
    except OSError as exc:
        return Check(
            name,
            "fail",
            f"cannot use the TLS files: {type(exc).__name__}: {exc}",
            "check ca_file, cert_file and key_file: PEM files, the key matching the certificate",
        ), None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                addr, port, ssl=ctx, server_hostname=host
            )
    except ssl.SSLCertVerificationError as exc:
        peer = await _peer_certificate(addr, port, host, timeout)
        return _verify_failure(t, exc, peer), peer
    except TimeoutError:
        return Check(
            name,
            "fail",
            f"no TLS handshake with {addr}:{port} within {timeout:g} s",
            "is this the broker's TLS port (mqtts 8883)?",
        ), None
    except OSError as exc:
        return _tls_refused(t, exc), None
    tls_object = writer.get_extra_info("ssl_object")
    peer = x509.load_der_x509_certificate(tls_object.getpeercert(binary_form=True))
    version = tls_object.version()
    try:
        try:
            async with asyncio.timeout(ALERT_WAIT_S):
                closed = await reader.read(1) == b""
        except TimeoutError:
            closed = False  # the broker waits for the CONNECT, as it should
        except OSError as exc:  # an alert: the broker refused the client's certificate
            return _tls_refused(t, exc), peer
    finally:
        writer.close()
    if closed:
        return Check(
            name,
            "fail",
            "the broker closed the connection right after the TLS handshake",
            "it refused the client certificate (cert_file, key_file) or its CA",
        ), peer
    return passed(name, f"{version} with {_name(peer)}, verified for {host}"), peer


def _tls_refused(t: BrokerTarget, exc: OSError) -> Check:
    text = f"{type(exc).__name__}: {exc}"
    meaning = tls_failure(text)
    return Check(
        f"{t.name}.tls",
        "fail",
        f"TLS failed: {meaning} ({text})" if meaning else f"TLS failed: {text}",
        "check ca_file, cert_file and key_file against what the broker expects",
    )


def _client_certificate(t: BrokerTarget) -> list[tuple[str, x509.Certificate]]:
    from cryptography import x509

    if not t.cert_file:
        return []
    try:
        with open(t.cert_file, "rb") as f:
            return [("the client certificate", x509.load_pem_x509_certificate(f.read()))]
    except (OSError, ValueError):
        return []  # the TLS step has said what is wrong with it


def refusals(granted: Sequence[int | ReasonCode]) -> list[str]:
    """The failure codes of a SUBACK (an MQTT 5 reason code, or 0x80 over MQTT 3.1.1).
    A broker whose ACL is checked at subscribe time (EMQX) refuses there; Mosquitto's
    ACL file grants every subscription and withholds the messages instead."""
    return [str(g) for g in granted if (g.is_failure if isinstance(g, ReasonCode) else g >= 0x80)]


async def _authenticate(t: BrokerTarget, timeout: float) -> Check:
    name = f"{t.name}.auth"
    client = MqttClient(
        t.address.host,
        t.address.port,
        identifier=t.client_id,
        username=t.username,
        password=t.password,
        tls_context=t.tls_context() if t.address.tls else None,
        protocol=aiomqtt.ProtocolVersion.V5 if t.v5 else aiomqtt.ProtocolVersion.V311,
        clean_session=None if t.v5 else True,
        keepalive=max(10, int(timeout * 2)),
        timeout=timeout,
        logger=_quiet,
    )
    who = f"as {t.username!r}" if t.username else "without a username"
    refused: list[str] = []
    try:
        async with asyncio.timeout(timeout * 3), client:
            if t.subscribe is not None:
                refused = refusals(await client.subscribe(t.subscribe, qos=1, timeout=timeout))
    except MqttConnectError as exc:
        return Check(
            name,
            "fail",
            connection_error(exc),
            "check username and password (or password_file) with the broker's operator",
        )
    except (aiomqtt.MqttError, TimeoutError) as exc:
        return Check(
            name,
            "fail",
            f"no MQTT session {who}: {connection_error(exc) or type(exc).__name__}",
            "is this an MQTT broker, and the scheme right (mqtt:// or mqtts://)?",
        )
    if refused:
        return Check(
            name,
            "fail",
            f"connected {who}, but the broker refuses the subscription to {t.subscribe} "
            f"({', '.join(refused)}): commands from the platform would not arrive",
            "the broker's ACL lets a gateway use only its own topics: its username (or "
            "client certificate CN) must equal gateway.id",
        )
    also = f" and subscribed to {t.subscribe}" if t.subscribe else ""
    return passed(name, f"connected {who} (MQTT {'5' if t.v5 else '3.1.1'}){also}")


async def probe_broker(
    t: BrokerTarget,
    timeout: float,
    now: datetime.datetime,
    connected_note: str | None = None,
) -> list[Check]:
    """The checks of `t`, step by step; the steps after a failed one are skipped.
    `connected_note`: the agent holds a session with this identity now (so the auth step
    does not connect, which would take it over) and this says so."""
    checks: list[Check] = []

    def rest(after: str, steps: tuple[str, ...]) -> list[Check]:
        return checks + [skipped(f"{t.name}.{s}", f"not tried: {after} failed") for s in steps]

    later = ("tls", "certificates") if t.address.tls else ()
    dns, addrs = await _resolve(t, timeout)
    checks.append(dns)
    if not addrs:
        return rest("dns", ("tcp", *later, "auth"))
    tcp, addr = await _connect(t, addrs, timeout)
    checks.append(tcp)
    if addr is None:
        return rest("tcp", (*later, "auth"))
    if t.address.tls:
        tls, peer = await _handshake(t, addr, timeout)
        checks.append(tls)
        certs = ([("the broker's certificate", peer)] if peer else []) + _client_certificate(t)
        if certs:
            checks.append(expiry_check(f"{t.name}.certificates", certs, now))
        else:
            checks.append(skipped(f"{t.name}.certificates", "no certificate to check"))
        if tls.status == "fail":
            return rest("tls", ("auth",))
    if connected_note is not None:
        checks.append(passed(f"{t.name}.auth", connected_note))
    else:
        checks.append(await _authenticate(t, timeout))
    return checks
