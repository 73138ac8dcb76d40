"""Broker addresses as written in configs and on the command line
(``mqtt://[user[:pass]@]host[:1883]``, ``mqtts://…[:8883]``) and the TLS context
for them: shared by the uplink, the ingest and config validation."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Annotated
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator

from common.redact import redact

ALLOWED = "use mqtt://host[:port] (default port 1883) or mqtts://host[:port] (8883)"


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    has_path: bool = False

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Raises ValueError naming the URL and what is allowed."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError(f"{redact(url)!r} is not a valid broker URL; {ALLOWED}") from None
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"{redact(url)!r} is not a valid broker URL; {ALLOWED}")
        if port == 0:
            raise ValueError(f"{redact(url)!r} is not a valid broker URL; port must be 1..65535")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            has_path=parts.path not in ("", "/") or bool(parts.query or parts.fragment),
        )


def check_config_broker(url: str) -> str:
    """A broker URL as a config may give it: valid, no credentials (they have their
    own keys), no path. Raises ValueError saying what is wrong."""
    address = BrokerAddress.parse(url)
    if address.username or address.password:
        raise ValueError("the broker URL must not contain credentials; use username and password")
    if address.has_path:
        raise ValueError(f"{redact(url)!r} is not a valid broker URL; {ALLOWED}")
    return url


def check_client_id(value: str) -> str:
    if len(value) > 128 or any(c.isspace() or c in "+#/" for c in value):
        raise ValueError(
            f"{value!r} is not a valid client id; up to 128 characters, no spaces, +, # or /"
        )
    return value


#: config field types for the uplink's and the MQTT driver's connections
BrokerUrl = Annotated[str, AfterValidator(check_config_broker)]
ClientId = Annotated[str, AfterValidator(check_client_id)]


def tls_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """The TLS context of an ``mqtts://`` connection. The broker is always verified: its
    certificate must chain to ca_file (only that CA when it is given, else the system's
    CA store) and name the host of the URL (IP or DNS SAN); TLS 1.2 at least. A client
    certificate (mTLS) is presented when cert_file is given, its key from key_file.

    Raises OSError (ssl.SSLError, FileNotFoundError) when a file cannot be used."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    # create_default_context already does this; said here so no refactoring loses it
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    if ctx.minimum_version < ssl.TLSVersion.TLSv1_2:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file or None)
    return ctx
