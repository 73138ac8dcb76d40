"""`citygw platform serve`: the console's process. Several of them behind a load balancer
share nothing but the store: sessions, events and their history live there, and live
updates are read from it (live.py)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from dataclasses import dataclass

import uvicorn

from central.console.app import Console, create_app
from central.console.auth import Accounts, LoginThrottle
from central.console.config import ConsoleConfig
from central.console.live import LiveHub
from central.console.pool import StorePool

log = logging.getLogger("citygw.console")

#: connections one `serve` process takes at once (each open page holds one live stream)
MAX_CONNECTIONS = 2000


class ServeRefused(Exception):
    """A setting that must not run (an open listener without users)."""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Listen:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"--listen {text!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
        return cls(host.strip("[]") or "127.0.0.1", int(port))

    def loopback(self) -> bool:
        """Every address the host resolves to is a loopback one."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ValueError(f"--listen {self.host!r}: {exc}") from None
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_exposure(listen: Listen, accounts: Accounts) -> None:
    if not accounts.configured and not listen.loopback():
        raise ServeRefused(
            f"refusing to listen on {listen.host}: beyond loopback the console needs users "
            "or tokens in its config (--config console.toml; `citygw platform hash-password` "
            "makes a password hash)"
        )


def build(db: str, config: ConsoleConfig, connections: int) -> Console:
    pool = StorePool(db, connections)
    listen_url = db if db.startswith(("postgresql://", "postgres://")) else None
    accounts = Accounts(config.users, config.tokens)
    return Console(
        pool=pool,
        config=config,
        accounts=accounts,
        live=LiveHub(pool, listen_url=listen_url),
        session_ttl_ms=round(config.console.session_ttl * 1000),
        throttle=LoginThrottle(),
    )


async def serve(
    console: Console,
    listen: Listen,
    *,
    forwarded_allow_ips: str = "127.0.0.1",
    started: asyncio.Event | None = None,
) -> None:
    """Serves until cancelled; `started` is set once the socket listens."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(console),
            host=listen.host,
            port=listen.port,
            log_config=None,
            access_log=False,
            proxy_headers=True,
            forwarded_allow_ips=forwarded_allow_ips,
            lifespan="off",
            # open live streams would hold a stop for ever
            timeout_graceful_shutdown=2,
            # beyond this many connections (live streams count) a request gets a 503 at
            # once: a flood of clients cannot exhaust the process
            limit_concurrency=MAX_CONNECTIONS,
        )
    )
    # uvicorn's own INFO lines (started, shutting down) repeat ours with ANSI colours in
    # an extra field; its warnings and errors still come through
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    # the caller owns the signals (it cancels this coroutine): uvicorn must not take them
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    hub = asyncio.create_task(console.live.run(), name="console-live")
    try:
        serving = asyncio.create_task(server.serve(), name="console-http")
        while not server.started and not serving.done():
            await asyncio.sleep(0.05)
        if serving.done():  # uvicorn logged why (the port is taken...) and exited
            with contextlib.suppress(SystemExit):
                serving.result()
            raise ServeRefused(f"could not listen on {listen.host}:{listen.port}")
        log.info("console: serving", extra={"listen": f"{listen.host}:{listen.port}"})
        if started is not None:
            started.set()
        try:
            await asyncio.shield(serving)
        except asyncio.CancelledError:
            server.should_exit = True  # a graceful stop: finish the requests under way
            await serving
            raise
    finally:
        server.should_exit = True
        hub.cancel()
        await asyncio.gather(hub, return_exceptions=True)
        console.pool.close()
