"""Service management: sd_notify against a real NOTIFY_SOCKET listener, the agent's and
the ingest's notifications and watchdog pings (which stop while the event loop is
blocked or a flush hangs, and go on through a broker outage), the journald log format,
and `citygw install-service`."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from agent import uplink
from agent.config import load_config
from agent.runtime import Agent
from agent.uplink import BufferPort, Uplink, UplinkSettings
from buffer import Message
from central.service import notify_service
from central.stores import open_store
from central.worker import IngestWorker
from cli import main as cli
from cli import service
from common import logs
from common.broker import Mosquitto, free_port
from common.sdnotify import Notifier, watchdog_interval
from tests.helpers import AckingSession, Gateway

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})

SIM = (
    '[[devices]]\nname = "dev-a"\ndriver = "sim"\npoll = "50ms"\nseed = 1\n'
    '[[devices.points]]\nname = "level"\nbase = 5.0\n'
)


class NotifyListener:
    """systemd's side of NOTIFY_SOCKET: a datagram socket whose messages a thread
    collects with the monotonic time they arrived."""

    def __init__(self, address: str) -> None:
        self.env = address  # as $NOTIFY_SOCKET says it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def received(self, what: str | None = None) -> list[tuple[float, str]]:
        """(arrival, message) of every message, or of those holding line `what`."""
        with self._lock:
            return [(t, m) for t, m in self.messages if what is None or what in m.split("\n")]

    def wait_for(
        self,
        what: str,
        count: int = 1,
        after: float = 0.0,
        timeout: float = 30.0,
        alive: Callable[[], None] | None = None,
    ) -> list[float]:
        """Arrival times of the first `count` messages holding `what` after `after`."""
        deadline = time.monotonic() + timeout
        while True:
            times = [t for t, _ in self.received(what) if t > after]
            if len(times) >= count:
                return times[:count]
            if alive is not None:
                alive()
            assert time.monotonic() < deadline, f"{count} x {what} not received: {self.messages}"
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    n = NotifyListener(str(tmp_path / "notify.sock"))
    yield n
    n.close()


def write_config(folder: Path, broker: str, flush: str = "100ms") -> Path:
    path = folder / "gateway.toml"
    path.write_text(
        f'[gateway]\nid = "gw-svc"\n[uplink]\nbroker = "{broker}"\n'
        'backoff_min = "100ms"\nbackoff_max = "300ms"\nack_timeout = "1s"\n'
        f'[buffer]\npath = "buf.db"\nflush_interval = "{flush}"\n' + SIM,
        encoding="utf-8",
    )
    return path


def dead_broker() -> str:
    return f"mqtt://127.0.0.1:{free_port()}"


# -- the protocol ------------------------------------------------------------------------


def test_notifier_sends_each_notification_to_a_path_socket(listener: NotifyListener) -> None:
    n = Notifier({"NOTIFY_SOCKET": listener.env})
    assert n.enabled and n.watchdog_s is None  # no WATCHDOG_USEC: not watched
    assert n.ready("up\nand running")
    assert n.status("3 readings")
    assert n.watchdog()
    before = time.monotonic_ns() // 1000
    assert n.reloading()
    after = time.monotonic_ns() // 1000
    assert n.stopping()
    n.close()
    listener.wait_for("STOPPING=1")
    got = [m for _, m in listener.received()]
    assert got[:3] == ["READY=1\nSTATUS=up and running", "STATUS=3 readings", "WATCHDOG=1"]
    reloading = dict(line.split("=", 1) for line in got[3].split("\n"))
    assert reloading["RELOADING"] == "1"
    # Type=notify-reload matches RELOADING=1 to the reload by CLOCK_MONOTONIC
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    assert got[4] == "STOPPING=1"


def test_notifier_reaches_an_abstract_socket() -> None:
    listener = NotifyListener(f"@citygw-test-{uuid.uuid4().hex}")
    try:
        env = {"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": "2500000"}
        n = Notifier(env)
        assert n.watchdog_s == 2.5
        assert n.watchdog()
        listener.wait_for("WATCHDOG=1")
    finally:
        listener.close()


def test_notifier_is_silent_without_a_socket_and_survives_a_gone_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    silent = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not silent.enabled and silent.watchdog_s is None and not silent.ready()
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    with caplog.at_level(logging.ERROR, "citygw.sdnotify"):
        assert not gone.watchdog() and not gone.watchdog()
    assert len(caplog.records) == 1  # logged once, not at every ping
    assert "notification failed" in caplog.records[0].getMessage()


def test_a_manager_that_does_not_read_never_blocks_the_sender(tmp_path: Path) -> None:
    """Its queue full, sends fail at once (the loop that pings must never stall)."""
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(tmp_path / "deaf.sock"))
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "deaf.sock")})
    sent: list[bool] = []
    sender = threading.Thread(
        target=lambda: sent.extend(n.watchdog() for _ in range(2000)), daemon=True
    )
    sender.start()
    sender.join(timeout=30)
    deaf.close()
    assert not sender.is_alive(), "a send blocked"
    assert sent[0] and not sent[-1]


def test_watchdog_interval_from_the_environment() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 1.0
    # a parent's watchdog, passed on in the environment, is not this process's
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None
    for bad in ("", "0", "-5", "soon"):
        assert watchdog_interval({"WATCHDOG_USEC": bad}) is None


# -- the agent ---------------------------------------------------------------------------


def test_run_notifies_ready_pings_through_a_broker_outage_and_stopping(
    tmp_path: Path, listener: NotifyListener
) -> None:
    """`citygw run` under a (fake) systemd with a 2 s watchdog and no broker: READY=1,
    pings every second while the uplink fails and backs off again and again (an outage
    is no lack of progress), STOPPING=1 at SIGTERM."""
    config = write_config(tmp_path, dead_broker())
    env = {**os.environ, "NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": "2000000"}
    env["PYTHONPATH"] = str(REPO)
    log = tmp_path / "agent.log"
    with cli_process(["run", "-c", str(config)], tmp_path, env, log) as (proc, alive):
        [ready] = listener.wait_for("READY=1", alive=alive)
        status = next(m for _, m in listener.received("READY=1"))
        assert "STATUS=uplink " in status and "readings read" in status
        # the uplink fails and backs off several times over (backoff <= 300 ms)...
        deadline = time.monotonic() + 30
        while log.read_text().count("uplink down, retrying") < 5:
            alive()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # ...and the pings go on meanwhile, and after it
        listener.wait_for("WATCHDOG=1", count=4, after=ready, alive=alive)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    listener.wait_for("STOPPING=1")
    text = log.read_text()
    assert "pings withheld" not in text, text
    # under systemd, stderr would be the journal's: here it is a file, so plain lines
    assert "INFO    citygw.agent: agent started" in text


@contextlib.contextmanager
def cli_process(
    args: list[str], cwd: Path, env: dict[str, str], log: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Callable[[], None]]]:
    """`python -m cli ARGS` with its stderr in `log`: the process, and a check that it
    still runs (failing with its log). Killed at exit if it still runs."""
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=cwd,
            env=env,
        )

    def alive() -> None:
        assert proc.poll() is None, log.read_text()

    try:
        yield proc, alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class AgentThread:
    """The agent on an event loop of its own in a thread, as `citygw run` would run it,
    so that a test can block that loop, or the agent's buffer thread, from outside."""

    def __init__(self, config: Path, notifier: Notifier) -> None:
        self.config = load_config(config)
        self.notifier = notifier
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.agent: Agent | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self.started.wait(30), f"agent did not start: {self._error!r}"

    def _run(self) -> None:
        try:
            self.loop.run_until_complete(self._main())
        except BaseException as exc:  # shown by the test that waits for the start
            self._error = exc
        finally:
            self.loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.agent = Agent(self.config, notifier=self.notifier)
        await self.agent.start()
        self.started.set()
        await self._stop.wait()
        await self.agent.stop()

    def block_loop(self, seconds: float) -> list[float]:
        """Blocks the agent's event loop for `seconds` (a callback that never yields,
        as a wedged CPU-bound step or a blocking call would); returns [start, end]."""
        span: list[float] = []

        def wedge() -> None:
            span.append(time.monotonic())
            time.sleep(seconds)
            span.append(time.monotonic())

        self.loop.call_soon_threadsafe(wedge)
        deadline = time.monotonic() + seconds + 30
        while len(span) < 2:
            assert time.monotonic() < deadline, "the loop never ran the wedge"
            time.sleep(0.05)
        return span

    def stop(self) -> None:
        if self._stop is not None and not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended on its own
                self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the agent did not stop"


def watched(listener: NotifyListener, seconds: float) -> Notifier:
    return Notifier({"NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": str(int(seconds * 1e6))})


def gaps_within(times: list[float], start: float, end: float) -> list[float]:
    return [t for t in times if start < t < end]


def test_a_blocked_event_loop_stops_the_pings_until_it_runs_again(
    tmp_path: Path, listener: NotifyListener
) -> None:
    config = write_config(tmp_path, dead_broker())
    agent = AgentThread(config, watched(listener, 1.0))
    try:
        first = listener.wait_for("WATCHDOG=1", count=2)[-1]
        start, end = agent.block_loop(3.0)
        assert start > first
        pings = [t for t, _ in listener.received("WATCHDOG=1")]
        # one ping may have been on its way as the wedge began; none came after
        assert not gaps_within(pings, start + 0.5, end), (start, end, pings)
        listener.wait_for("WATCHDOG=1", count=3, after=end)  # it resumes
    finally:
        agent.stop()


def test_a_hung_flush_stops_the_pings_and_they_resume_when_it_returns(
    tmp_path: Path, listener: NotifyListener, caplog: pytest.LogCaptureFixture
) -> None:
    """A flush waiting on a SQLite call that does not return (a hung disk): the event
    loop runs on, but the flush loop does not turn, so the pings stop."""
    config = write_config(tmp_path, dead_broker())
    agent = AgentThread(config, watched(listener, 1.0))
    assert agent.agent is not None and agent.agent.buffer is not None
    buffer = agent.agent.buffer
    release = threading.Event()
    hung = threading.Event()
    append_many = buffer.append_many

    def hanging_append(*args: Any, **kwargs: Any) -> Any:
        hung.set()
        release.wait(60)
        return append_many(*args, **kwargs)

    try:
        with caplog.at_level(logging.ERROR, "citygw.watchdog"):
            listener.wait_for("WATCHDOG=1", count=2)
            buffer.append_many = hanging_append  # type: ignore[method-assign]
            assert hung.wait(30), "no flush reached the buffer"
            since = time.monotonic()
            # stale after the watchdog interval plus the flush interval (1.1 s): a ping
            # later than 2 s after the hang began would be wrong
            deadline = since + 30
            while not any("pings withheld" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the pings were never withheld"
                time.sleep(0.05)
            withheld = time.monotonic()
            time.sleep(1.5)  # three ping periods
            assert not gaps_within(
                [t for t, _ in listener.received("WATCHDOG=1")], since + 2.0, time.monotonic()
            )
        record = next(r for r in caplog.records if "pings withheld" in r.getMessage())
        assert "flush" in record.stalled_s  # type: ignore[attr-defined]
        buffer.append_many = append_many  # type: ignore[method-assign]
        release.set()
        listener.wait_for("WATCHDOG=1", count=2, after=withheld)
    finally:
        release.set()
        agent.stop()


# -- the uplink's turns ---------------------------------------------------------------------


async def _turns(up: Uplink, turns: list[float], seconds: float) -> tuple[list[float], str]:
    """The uplink's turns during `seconds` of running after its first one, and its
    state then."""
    task = asyncio.create_task(up.run())
    try:
        await asyncio.wait_for(_first(turns), 10)
        since = time.monotonic()
        await asyncio.sleep(seconds)
        return [t for t in turns if t > since], up.status.state
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=10)


async def _first(turns: list[float]) -> None:
    while not turns:
        await asyncio.sleep(0.01)


def _uplink(turns: list[float], peek: Callable[..., Any], **settings: Any) -> Uplink:
    async def ack(seqs: object) -> int:
        return 0

    return Uplink(
        UplinkSettings(gateway_id="gw", client_id="c", **settings),
        BufferPort(peek, ack),
        "0" * 32,
        b"{}",
        on_turn=lambda: turns.append(time.monotonic()),
    )


def test_the_uplink_turns_through_a_long_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """No broker and a 60 s backoff: the uplink still turns every TURN_S."""
    monkeypatch.setattr(uplink, "TURN_S", 0.1)
    asyncio.run(_long_backoff())


async def _long_backoff() -> None:
    turns: list[float] = []

    async def peek(limit: int, exclude: object) -> list[Message]:
        return []

    up = _uplink(
        turns, peek, broker=dead_broker(), backoff_min=60.0, backoff_max=60.0, probe_interval=60.0
    )
    got, state = await _turns(up, turns, 1.0)
    assert state == "backoff" and up.status.connects == 0
    assert len(got) >= 4, got


def test_an_idle_uplink_turns_and_one_stuck_on_the_buffer_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(uplink, "TURN_S", 0.1)
    asyncio.run(_idle_then_stuck())


async def _idle_then_stuck() -> None:
    stuck = asyncio.Event()
    turns: list[float] = []

    async def peek(limit: int, exclude: object) -> list[Message]:
        if stuck.is_set():
            await asyncio.Event().wait()  # the buffer thread never answers
        return []

    up = _uplink(turns, peek, broker="mqtt://127.0.0.1:1")
    up._connect = AckingSession  # an in-process session, nothing to send
    task = asyncio.create_task(up.run())
    try:
        await asyncio.wait_for(_first(turns), 10)
        await asyncio.sleep(1.0)
        assert up.status.state == "online"
        assert len([t for t in turns if t > time.monotonic() - 1.0]) >= 4, turns
        stuck.set()
        up.wake()  # as a flush does: the next peek hangs (an idle pump does not peek)
        await asyncio.sleep(0.5)
        since = time.monotonic()
        await asyncio.sleep(1.0)
        assert not [t for t in turns if t > since], turns
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=10)


# -- the ingest worker -------------------------------------------------------------------


def test_ingest_notifies_ready_once_subscribed_and_pings(
    tmp_path: Path, mosquitto: Mosquitto, listener: NotifyListener
) -> None:
    env = {**os.environ, "NOTIFY_SOCKET": listener.env, "WATCHDOG_USEC": "2000000"}
    env["PYTHONPATH"] = str(REPO)
    env["CITYGW_BROKER"] = f"mqtt://127.0.0.1:{mosquitto.port}"
    env["CITYGW_DB"] = f"sqlite:///{tmp_path / 'platform.db'}"
    log = tmp_path / "ingest.log"
    with cli_process(["ingest", "--report-every", "0"], tmp_path, env, log) as (proc, alive):
        [ready] = listener.wait_for("READY=1", alive=alive)
        assert "ingest: subscribed" in log.read_text()  # READY=1 came after it
        status = next(m for _, m in listener.received("READY=1"))
        assert "STATUS=subscribed" in status
        listener.wait_for("WATCHDOG=1", count=2, after=ready, alive=alive)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    listener.wait_for("STOPPING=1")


def test_a_hung_store_call_stops_the_ingest_pings(
    tmp_path: Path, mosquitto: Mosquitto, listener: NotifyListener
) -> None:
    """An idle worker pings; one whose store call does not return stops."""
    store = open_store(f"sqlite:///{tmp_path / 'platform.db'}")
    release = threading.Event()
    hung = threading.Event()
    store_batches = store.store_batches

    def hanging(*args: Any, **kwargs: Any) -> Any:
        hung.set()
        release.wait(60)
        return store_batches(*args, **kwargs)

    async def main() -> None:
        worker = IngestWorker(
            f"mqtt://127.0.0.1:{mosquitto.port}", store, group=None, backoff_max=0.2
        )
        tasks = [
            asyncio.create_task(worker.run()),
            asyncio.create_task(notify_service(worker, watched(listener, 1.0))),
        ]
        try:
            await asyncio.to_thread(listener.wait_for, "READY=1")
            idle = time.monotonic()
            await asyncio.to_thread(listener.wait_for, "WATCHDOG=1", 3, idle)
            store.store_batches = hanging  # type: ignore[method-assign]
            await Gateway(mosquitto).send([1])
            assert await asyncio.to_thread(hung.wait, 30), "the batch never reached the store"
            since = time.monotonic()
            # stale after the interval plus the retry wait (1.2 s); pings every 0.5 s
            await asyncio.sleep(4.0)
            pings = [t for t, _ in listener.received("WATCHDOG=1")]
            assert not gaps_within(pings, since + 2.0, time.monotonic()), pings
            release.set()
            await asyncio.to_thread(listener.wait_for, "WATCHDOG=1", 2, time.monotonic())
            assert worker.counters.batches_stored == 1
        finally:
            release.set()
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=10)

    try:
        asyncio.run(main())
    finally:
        store.close()


# -- logs for journald ---------------------------------------------------------------------


def test_logs_under_journald_carry_the_priority_and_no_timestamp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = tmp_path / "journal-stream"
    with stream.open("w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setattr(sys, "stderr", f)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            logs.setup_logging("INFO")
            log = logging.getLogger("citygw.test")
            log.warning("uplink down", extra={"broker": "mqtt://u:secret@h:1883", "n": 3})
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("flush failed")
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    lines = stream.read_text().splitlines()
    assert lines[0].startswith("<4>citygw.test: uplink down [broker=mqtt://u:")
    assert "secret" not in lines[0] and lines[0].endswith("n=3]")
    assert lines[1] == "<3>citygw.test: flush failed"
    # every traceback line is its own journal entry: each has the priority
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines[2:])
    assert lines[-1] == "<3>ValueError: boom"


def test_logs_elsewhere_stay_console_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    # JOURNAL_STREAM inherited by a process whose stderr goes somewhere else
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not logs.journal_stderr()


# -- install-service -----------------------------------------------------------------------


def service_config(folder: Path) -> Path:
    (folder / "state").mkdir()
    path = folder / "gw.toml"
    path.write_text(
        f'[gateway]\nid = "gw-svc"\n[uplink]\nbroker = "{dead_broker()}"\n'
        '[buffer]\npath = "state/buffer.db"\n',
        encoding="utf-8",
    )
    return path


def unit_lines(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_install_service_dry_run_prints_the_unit_for_the_config(tmp_path: Path) -> None:
    config = service_config(tmp_path)
    result = runner.invoke(
        cli.app, ["install-service", "-c", str(config), "--dry-run", "--user", "gwuser"]
    )
    assert result.exit_code == 0, result.output
    unit = unit_lines(result.stdout)
    [exec_start] = unit["ExecStart"]
    command, _, args = exec_start.partition(" run ")
    assert Path(command.split()[0]).is_absolute() and os.access(command.split()[0], os.X_OK)
    assert args == f"--config {config.resolve()}"
    assert unit["ReadWritePaths"] == [str(tmp_path.resolve() / "state")]
    assert unit["User"] == ["gwuser"]
    assert unit["Type"] == ["notify"] and unit["WatchdogSec"] == ["30"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["always"] and unit["StartLimitIntervalSec"] == ["0"]
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert unit[option] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert "char-ttyUSB rw" in unit["DeviceAllow"] and "char-ttyACM rw" in unit["DeviceAllow"]
    assert "AF_BLUETOOTH" in unit["RestrictAddressFamilies"][0]
    # the sandbox hides /tmp from the service: said, on stderr, not in the unit
    assert "PrivateTmp= hides /tmp" in result.stderr
    assert not (tmp_path / "citygw-agent.service").exists()


def test_install_service_writes_into_a_unit_dir_and_says_what_is_next(tmp_path: Path) -> None:
    config = service_config(tmp_path)
    units = tmp_path / "units"
    units.mkdir()
    shutil.rmtree(tmp_path / "state")  # made for the service: ReadWritePaths must exist
    result = runner.invoke(
        cli.app, ["install-service", "-c", str(config), "--unit-dir", str(units)]
    )
    assert result.exit_code == 0, result.output
    written = (units / "citygw-agent.service").read_text()
    assert f"--config {config.resolve()}" in written
    assert (tmp_path / "state").is_dir()
    assert "systemctl daemon-reload && systemctl enable --now citygw-agent.service" in (
        result.stdout
    )
    if shutil.which("systemd-analyze"):  # the unit as systemd reads it
        check = subprocess.run(
            ["systemd-analyze", "verify", str(units / "citygw-agent.service")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr


def test_install_service_refuses_what_cannot_work(tmp_path: Path) -> None:
    config = service_config(tmp_path)
    missing = runner.invoke(
        cli.app, ["install-service", "-c", str(config), "--unit-dir", str(tmp_path / "no")]
    )
    assert missing.exit_code == 1 and "no such directory" in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nid = "x"\n[buffer]\nflush_interval = "never"\n')
    invalid = runner.invoke(cli.app, ["install-service", "-c", str(bad), "--dry-run"])
    assert invalid.exit_code == 1 and "problem" in invalid.stderr
    # a system install of a config the sandbox hides, for a user that does not exist
    system = runner.invoke(
        cli.app, ["install-service", "-c", str(config), "--user", "nobody-here-xyz"]
    )
    assert system.exit_code == 1
    assert "PrivateTmp= hides /tmp" in system.stderr and "useradd --system" in system.stderr
    assert not Path("/etc/systemd/system/citygw-agent.service").exists() or (
        "nobody-here-xyz" not in Path("/etc/systemd/system/citygw-agent.service").read_text()
    )


def test_shipped_units_are_the_template_and_verify(tmp_path: Path) -> None:
    shipped = (REPO / "deploy/systemd/citygw-agent.service").read_text()
    assert shipped == service.render_unit(
        "/usr/local/bin/citygw",
        Path("/etc/citygw/gateway.toml"),
        Path("/var/lib/citygw"),
        "citygw",
        ("dialout",),
    )
    names = ["citygw-agent.service", "citygw-ingest@.service"]
    for name in names:  # verify wants the executable to exist
        text = (REPO / "deploy/systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace("/usr/local/bin/citygw", "/bin/true"))
    check = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
