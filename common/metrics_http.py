"""The Prometheus endpoint of the agent and the ingest: GET /metrics on the running loop.

prometheus_client's own server (`start_http_server`) is a thread that wakes twice a
second and takes half a second to stop; this one is an asyncio server: nothing runs while
nobody scrapes, it closes at once, and a port in use is an OSError the caller handles.
The loop only moves bytes: the registry is collected and encoded in a worker thread, one
scrape at a time, so a scrape never holds the loop (the agent's polls) for longer than a
socket write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import choose_encoder

from common.logs import Throttle

log = logging.getLogger("citygw.metrics")

#: a request's line and headers must arrive within this, and fit in this many bytes
REQUEST_TIMEOUT_S = 10.0
MAX_REQUEST_BYTES = 8192

_throttle = Throttle()

# a `_created` series beside every histogram (and labelled child) doubles the series for a
# start time Prometheus does not use (process_start_time_seconds says it)
disable_created_metrics()


async def start_metrics_server(
    registry: CollectorRegistry, address: str, port: int
) -> asyncio.Server:
    """Serves `registry` at http://address:port/metrics (and /). Raises OSError when the
    address cannot be bound (port in use, address not on this machine)."""
    scrape = asyncio.Lock()
    return await asyncio.start_server(
        partial(_handle, registry, scrape), address, port, limit=MAX_REQUEST_BYTES
    )


async def _handle(
    registry: CollectorRegistry,
    scrape: asyncio.Lock,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        status, content_type, body = await _answer(registry, scrape, head)
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
            + body
        )
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass  # a client that went away, was too slow or sent too much: nothing to answer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _answer(
    registry: CollectorRegistry, scrape: asyncio.Lock, head: bytes
) -> tuple[str, str, bytes]:
    """(status line, content type, body) for one request."""
    text = "text/plain; charset=utf-8"
    request, *lines = head.decode("latin-1").split("\r\n")
    parts = request.split(" ")
    if len(parts) != 3:
        return "400 Bad Request", text, b"malformed request line\n"
    method, target, _ = parts
    if method != "GET":
        return "405 Method Not Allowed", text, b"only GET\n"
    if target.split("?", 1)[0] not in ("/metrics", "/"):
        return "404 Not Found", text, b"metrics are at /metrics\n"
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    encoder, content_type = choose_encoder(headers.get("accept", ""))
    async with scrape:
        try:
            body = await asyncio.to_thread(encoder, registry)
        except Exception as exc:  # a collector's bug: this scrape fails, the process goes on
            if (n := _throttle.ready("collect")) is not None:
                log.exception("metrics collection failed", extra={"failures": n})
            return "500 Internal Server Error", text, f"collection failed: {exc!r}\n".encode()
    return "200 OK", content_type, body
