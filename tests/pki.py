"""A throwaway PKI for the TLS tests, made with `cryptography`: CAs, server certificates
(with subjectAltNames) and client certificates (the CN is the MQTT identity a broker with
`use_identity_as_username` takes), as PEM files with their keys (mode 0600)."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: a CA: its key, its certificate and the PEM file holding the certificate
Ca = tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]

#: the subjectAltNames of a server certificate for the tests' brokers on loopback
LOCALHOST: Sequence[x509.GeneralName] = (
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.DNSName("localhost"),
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: float = 2
) -> x509.CertificateBuilder:
    """Valid until `days` from now (negative: expired that long ago), from an hour before
    that or before now, whichever is earlier."""
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=days)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, until) - datetime.timedelta(hours=1))
        .not_valid_after(until)
    )


def make_ca(d: Path, cn: str) -> Ca:
    """A self-signed CA named `cn`; its certificate in `d/<cn>.pem`."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, _name(cn), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert, _write_cert(cert, d / f"{cn}.pem")


def issue(
    d: Path,
    ca: Ca,
    name: str,
    cn: str,
    *,
    server_names: Sequence[x509.GeneralName] = (),
    days: float = 2,
) -> tuple[Path, Path]:
    """A certificate for `cn` signed by `ca`, valid for `days` from now (negative: expired):
    a server's when `server_names` are given, else a client's. (`d/<name>.pem`,
    `d/<name>.key`)."""
    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(cn, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(server_names)), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return _write_cert(cert, d / f"{name}.pem"), _write_key(key, d / f"{name}.key")
