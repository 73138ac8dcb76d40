"""The console over real HTTP: live updates reach an open page through the store, and two
`citygw platform serve` processes on one PostgreSQL store share events, sessions and
changes (nothing else is shared: each is its own process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2
import orjson
import pytest

from central.console.auth import hash_password, token_hash
from central.stores import open_store
from common import wire
from common.broker import free_port
from common.wire import Envelope
from native.batch import GOOD, Batch
from tests.helpers import GW, STREAM
from tests.test_console_api import T0, fed

TOKEN = "live-" + "y" * 40
#: the issue's promise: a change reaches an open page within 2 s
LIVE_WITHIN_S = 2.0


@contextlib.contextmanager
def serving(db: str, tmp_path: Path, name: str) -> Iterator[str]:
    """`citygw platform serve` as its own process; yields its base URL."""
    config = tmp_path / f"{name}.toml"
    config.write_text(
        '[[users]]\nname = "otto"\nrole = "operator"\n'
        f'password_hash = "{hash_password("pw-otto-1")}"\n'
        f'[[tokens]]\nname = "{name}-client"\nrole = "operator"\n'
        f'token_hash = "{token_hash(TOKEN)}"\n'
    )
    port = free_port()
    log = (tmp_path / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "platform",
            "serve",
            "--db",
            db,
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                out = (tmp_path / f"{name}.log").read_text()
                pytest.fail(f"platform serve exited with {proc.returncode}:\n{out}")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "platform serve did not come up in 30 s"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("platform serve did not stop within 10 s of SIGTERM")
        log.close()
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()


AUTH = {"authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def changes(url: str) -> AsyncIterator[asyncio.Queue[set[str]]]:
    """The kinds each "change" event of `url`'s live stream names, as they arrive."""
    q: asyncio.Queue[set[str]] = asyncio.Queue()
    ready = asyncio.Event()

    async def read() -> None:
        async with (
            httpx2.AsyncClient(timeout=None) as c,
            c.stream("GET", url + "/api/live", headers=AUTH) as r,
        ):
            assert r.status_code == 200
            event = ""
            async for line in r.aiter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                    if event == "hello":
                        ready.set()
                elif line.startswith("data:") and event == "change":
                    q.put_nowait(set(orjson.loads(line.split(":", 1)[1])["kinds"]))

    task = asyncio.create_task(read())
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield q
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def arrives(q: asyncio.Queue[set[str]], kind: str) -> float:
    """Seconds until a change of `kind` arrives (fails after LIVE_WITHIN_S)."""
    start = time.monotonic()
    while True:
        left = LIVE_WITHIN_S - (time.monotonic() - start)
        try:
            kinds = await asyncio.wait_for(q.get(), max(0.0, left))
        except TimeoutError:
            pytest.fail(f"no {kind!r} change within {LIVE_WITHIN_S} s")
        if kind in kinds:
            return time.monotonic() - start


def store_readings(db: str, seq: int) -> None:
    s = open_store(db)
    try:
        b = Batch()
        b.append(1, T0 + 86_400_000 + seq, 1.5, GOOD)
        assert s.store_batch(GW, Envelope(wire.LANE_TELEMETRY, STREAM, seq, len(b), b""), b)
    finally:
        s.close()


def test_two_processes_share_events_and_changes(pg_url: str, tmp_path: Path) -> None:
    fed(pg_url)  # the ingest creates the store and feeds it
    with serving(pg_url, tmp_path, "a") as a, serving(pg_url, tmp_path, "b") as b:

        async def scenario() -> None:
            async with changes(b) as on_b, httpx2.AsyncClient(headers=AUTH) as c:
                (event,) = (await c.get(a + "/api/events")).json()["events"]
                r = await c.post(a + f"/api/events/{event['id']}/ack", json={})
                assert r.status_code == 200, r.text
                await arrives(on_b, "events")  # acknowledged on a, pushed by b
                seen = (await c.get(b + f"/api/events/{event['id']}")).json()["event"]
                assert (seen["state"], seen["acked_by"]) == ("acknowledged", "a-client")
                await asyncio.to_thread(store_readings, pg_url, 10)  # as the ingest stores
                await arrives(on_b, "readings")

        asyncio.run(scenario())

        # a session opened on a is valid on b (it lives in the store), and so is its logout
        with httpx2.Client() as c:
            r = c.post(a + "/api/login", json={"user": "otto", "password": "pw-otto-1"})
            assert r.status_code == 200, r.text
            csrf = r.json()["csrf"]
            assert c.get(b + "/api/session").json()["user"] == "otto"
            assert c.post(b + "/api/logout", headers={"x-csrf-token": csrf}).status_code == 200
            assert c.get(a + "/api/session").status_code == 401


def test_live_on_sqlite(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'platform.db'}"
    fed(db)
    with serving(db, tmp_path, "a") as a:

        async def scenario() -> None:
            async with changes(a) as q:
                await asyncio.to_thread(store_readings, db, 10)
                await arrives(q, "readings")

        asyncio.run(scenario())


def test_refuses_an_open_listener_and_a_bad_store(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'platform.db'}"
    open_store(db).close()
    r = subprocess.run(
        [sys.executable, "-m", "cli", "platform", "serve", "--db", db, "--listen", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "refusing to listen on 0.0.0.0" in r.stderr, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "cli", "platform", "serve", "--db", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "unsupported store URL" in r.stderr, r.stderr
    bad = tmp_path / "console.toml"
    bad.write_text('[[users]]\nname = "ana"\nrole = "boss"\n')
    r = subprocess.run(
        [sys.executable, "-m", "cli", "platform", "serve", "--db", db, "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "users[0].role" in r.stderr, r.stderr
    assert "users[0].password_hash" in r.stderr, r.stderr


def test_demo_serves_the_console_until_interrupted(tmp_path: Path) -> None:
    port = free_port()
    out = tmp_path / "demo.log"
    with out.open("wb") as log:
        proc = subprocess.Popen(
            [
                # faulthandler: a stop that hangs is aborted below with every thread's stack
                *(sys.executable, "-X", "faulthandler", "-m", "cli", "demo"),
                *("--duration", "3", "--console"),
                *("--console-listen", f"127.0.0.1:{port}"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "250"},
        )
    try:
        deadline = time.monotonic() + 120
        while "until interrupted" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, "the demo did not finish its run in 120 s"
            time.sleep(0.2)
        text = out.read_text(errors="replace")
        assert "demo: read=" in text and " lost=0 " in text
        password = text.split("(user demo, password ")[-1].split(")")[0]
        url = f"http://127.0.0.1:{port}"
        with httpx2.Client() as c:  # the demo's store, after the run, still served
            r = c.post(url + "/api/login", json={"user": "demo", "password": password})
            assert r.status_code == 200, r.text
            events = c.get(url + "/api/events", params={"state": "all"}).json()["events"]
            assert events and {e["gateway"] for e in events} == {"gw-demo-block-7"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired as exc:
            proc.send_signal(signal.SIGABRT)  # the stacks of a hung stop, into the log
            proc.wait(10)
            text = out.read_text(errors="replace")
            raise AssertionError(f"no exit 30 s after SIGINT:\n{text}") from exc
        assert code == 0, out.read_text(errors="replace")
