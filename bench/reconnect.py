"""What a reconnecting gateway costs the broker: Mosquitto's CPU per MQTT connect over
TLS (mutual TLS, as the README recommends: RSA-2048 or ECDSA P-256 keys), over plain TCP,
and per reconnect probe (common/reconnect.py: a TCP connect and close, no TLS, no MQTT).
docs/architecture.md ("Reconnecting") turns these into connects per second for N gateways.

The broker's CPU is read from getrusage(RUSAGE_CHILDREN) after it exits (it is this
process's child), less that of a run with no connection at all; the connects are made
one after the other from this process (the client's CPU is not counted).

    python bench/reconnect.py [--connects 500]
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import resource
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from common.broker import Mosquitto, free_port, tls_listener
from hil.mqtt_packets import CONNACK, DISCONNECT_PACKET, connect_packet

Key = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_key(kind: str) -> Key:
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def certificate(name: str, key: Key, issuer: tuple[str, Key] | None, ca: bool = False) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = (
        (subject, key)
        if issuer is None
        else (
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]),
            issuer[1],
        )
    )
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if name == "broker":
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def write_pki(d: Path, kind: str) -> None:
    """ca.pem, broker.pem/.key and client.pem/.key, all with `kind` keys."""
    ca_key = new_key(kind)
    (d / "ca.pem").write_bytes(certificate("bench-ca", ca_key, None, ca=True))
    for name in ("broker", "client"):
        key = new_key(kind)
        (d / f"{name}.pem").write_bytes(certificate(name, key, ("bench-ca", ca_key)))
        (d / f"{name}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def mqtt_connect(port: int, context: ssl.SSLContext | None, i: int) -> None:
    """One MQTT session: TCP (+ TLS) connect, CONNECT, CONNACK, DISCONNECT."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
        sock.sendall(connect_packet(f"bench-{i}"))
        reply = sock.recv(4)
        if len(reply) < 4 or reply[0] >> 4 != CONNACK or reply[3] != 0:
            raise RuntimeError(f"no CONNACK accepting the connection: {reply!r}")
        sock.sendall(DISCONNECT_PACKET)
        if sock is not raw:
            sock.close()


def probe(port: int, i: int) -> None:
    """What common/reconnect.py's probe does: connect, close."""
    socket.create_connection(("127.0.0.1", port), timeout=10).close()


def broker_cpu(
    workdir: Path, extra: str, n: int, each: Callable[[int], None], port: int | None = None
) -> tuple[float, float]:
    """(broker CPU seconds, wall seconds) for n calls of `each` against a fresh broker
    (its plain listener on `port`, or a free one)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    broker = Mosquitto(port=port or free_port(), workdir=workdir, extra_conf=extra)
    broker.start()
    t = time.perf_counter()
    for i in range(n):
        each(i)
    wall = time.perf_counter() - t
    time.sleep(0.2)  # the broker closes the last connections
    broker.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def report(kind: str, what: str, cpu: float, idle: float, n: int) -> None:
    per = max(cpu - idle, 0.0) / n
    rate = f"{1 / per:,.0f}/s" if per else "-"
    print(f"  {kind:10} {what:28} {per * 1e3:6.3f} ms  (= {rate} on one core)")


def measure_tls(kind: str, n: int) -> None:
    with tempfile.TemporaryDirectory(prefix="citygw-bench-") as tmp:
        d = Path(tmp)
        write_pki(d, kind)
        port = free_port()
        extra = tls_listener(
            port, d / "ca.pem", d / "broker.pem", d / "broker.key", require_certificate=True
        )
        context = ssl.create_default_context(cafile=str(d / "ca.pem"))
        context.load_cert_chain(d / "client.pem", d / "client.key")
        idle, _ = broker_cpu(d, extra, 0, lambda i: None)
        cpu, _ = broker_cpu(d, extra, n, partial(mqtt_connect, port, context))
        report(kind, "mqtt over mutual TLS", cpu, idle, n)
        cpu, _ = broker_cpu(d, extra, n, partial(probe, port))
        report(kind, "probe (TCP connect, close)", cpu, idle, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connects", type=int, default=500)
    n = ap.parse_args().connects
    print(f"{n} connects each, one after the other; broker CPU per connect:")
    for kind in ("rsa2048", "ecdsa-p256"):
        measure_tls(kind, n)
    with tempfile.TemporaryDirectory(prefix="citygw-bench-") as tmp:
        d = Path(tmp)
        idle, _ = broker_cpu(d, "", 0, lambda i: None)
        port = free_port()
        cpu, _ = broker_cpu(d, "", n, partial(mqtt_connect, port, None), port)
        report("plain", "mqtt over TCP", cpu, idle, n)


if __name__ == "__main__":
    main()
