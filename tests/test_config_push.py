"""A config pushed from the platform (issue 15): the gateway validates it, keeps the
previous one, tries the new one and rolls back by itself if its uplink is not healthy
again within the deadline; a restart during the trial does not strand it; and
`citygw platform push-config` end to end against a running agent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import orjson
import pytest
from typer.testing import CliRunner

from agent.commands import ConfigPushCommand
from agent.config import load_config
from agent.config_push import (
    Trial,
    previous_path,
    settle_interrupted,
    text_hash,
    trial_path,
    write_atomic,
)
from agent.runtime import Agent
from central.stores import open_store
from cli.main import app
from common import wire
from common.broker import Mosquitto, free_port
from tests.helpers import wait_until

GW = "gw-push"
ROOT = Path(__file__).resolve().parents[1]

CONFIG = """[gateway]
id = "{gateway}"
config_version = "{version}"
[uplink]
broker = "{broker}"
backoff_min = "100ms"
backoff_max = "500ms"
probe_interval = "200ms"
reconnect_spread = "100ms"
ack_timeout = "2s"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[[devices]]
name = "pump"
driver = "sim"
poll = "100ms"
  [[devices.points]]
  name = "level"
  base = 3.0
"""

EXTRA_DEVICE = """[[devices]]
name = "air"
driver = "sim"
poll = "100ms"
  [[devices.points]]
  name = "pm10"
  base = 20.0
"""


def config_text(tmp: Path, broker: str, version: str = "v1", gateway: str = GW) -> str:
    return CONFIG.format(gateway=gateway, version=version, broker=broker, buffer=tmp / "buf.db")


def dead_broker() -> str:
    return f"mqtt://127.0.0.1:{free_port()}"  # nobody listens: connections refused


class Platform:
    """The platform's side of the downlink: publishes commands, collects answers."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.answers: dict[str, dict[str, Any]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.client.messages:
            assert isinstance(message.payload, bytes)
            body = orjson.loads(message.payload)
            self.answers[body["id"]] = body

    async def push(self, cid: str, text: str, deadline_s: int = 300) -> None:
        body = {"id": cid, "op": "config_push", "config": text, "deadline_s": deadline_s}
        await self.client.publish(wire.topic("citygw", GW, "down/cmd"), orjson.dumps(body), qos=1)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await self._reader

    async def answer(self, cid: str, timeout: float = 30.0) -> dict[str, Any]:
        await wait_until(lambda: cid in self.answers, timeout, f"no answer to {cid}")
        return self.answers[cid]


@contextlib.asynccontextmanager
async def running(path: Path, mosquitto: Mosquitto) -> AsyncIterator[tuple[Agent, Platform]]:
    """The agent on config file `path`, online, and the platform subscribed to up/resp."""
    agent = Agent(load_config(path))
    await agent.start()
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.subscribe(wire.topic("citygw", GW, "up/resp"), qos=1)
            platform = Platform(client)
            try:
                yield agent, platform
            finally:
                await platform.close()
    finally:
        await agent.stop()


async def online(agent: Agent) -> None:
    await wait_until(
        lambda: agent.uplink is not None and agent.uplink.status.acked_at is not None,
        20,
        "the agent never came online",
    )


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


# -- refused: nothing changes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda t: t.replace("base = 3.0", 'base = "high"'), "devices[0].points[0].base"),
        (lambda t: t.replace(f'id = "{GW}"', 'id = "gw-other"'), "gateway.id 'gw-other' is not"),
        # valid, but not live: the reload refuses it, the old file goes back
        (lambda t: t.replace("buf.db", "other.db"), "buffer.path changed: needs a restart"),
    ],
)
def test_an_invalid_config_is_refused_and_the_old_one_keeps_running(
    mosquitto: Mosquitto, tmp_path: Path, change: Callable[[str], str], error: str
) -> None:
    old = config_text(tmp_path, mosquitto.url)
    path = write_config(tmp_path, old)

    async def scenario() -> tuple[dict[str, Any], Agent]:
        async with running(path, mosquitto) as (agent, platform):
            await online(agent)
            await platform.push("p-bad", change(old))
            return await platform.answer("p-bad"), agent

    answer, agent = asyncio.run(scenario())
    assert answer["ok"] is False and answer["outcome"] == "refused"
    assert error in answer["error"]
    assert path.read_text() == old and not trial_path(path).exists()
    assert agent.config.hash == text_hash(old.encode())


def test_a_push_over_a_config_file_changed_since_the_start_is_refused(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """A rollback must return to a config known to run: the running one, not a file
    someone edited since and never loaded."""
    old = config_text(tmp_path, mosquitto.url)
    path = write_config(tmp_path, old)

    async def scenario() -> dict[str, Any]:
        async with running(path, mosquitto) as (agent, platform):
            await online(agent)
            path.write_text(old + "# edited\n")
            await platform.push("p-over", config_text(tmp_path, mosquitto.url, "v2"))
            return await platform.answer("p-over")

    answer = asyncio.run(scenario())
    assert answer["outcome"] == "refused" and "is not the config the agent runs" in answer["error"]
    assert path.read_text() == old + "# edited\n" and not trial_path(path).exists()


# -- applied, or rolled back -------------------------------------------------------------


def test_a_valid_config_is_applied_and_the_previous_one_kept(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    old = config_text(tmp_path, mosquitto.url)
    new = config_text(tmp_path, mosquitto.url, version="v2") + EXTRA_DEVICE
    path = write_config(tmp_path, old)

    async def scenario() -> tuple[dict[str, Any], Agent]:
        async with running(path, mosquitto) as (agent, platform):
            await online(agent)
            await platform.push("p-good", new)
            return await platform.answer("p-good"), agent

    answer, agent = asyncio.run(scenario())
    assert answer["ok"] is True and answer["outcome"] == "applied", answer
    assert (answer["version"], answer["hash"]) == ("v2", text_hash(new.encode()))
    assert answer["diff"]["added"] == ["air"]
    assert path.read_text() == new and previous_path(path).read_text() == old
    assert not trial_path(path).exists()
    assert agent.config.version == "v2" and "air/pm10" in agent.points


def test_a_config_that_cuts_the_uplink_off_is_rolled_back_within_its_deadline(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The uplink pointed at a dead broker: after the deadline the old file is back, the
    old config runs, and the answer comes through the old uplink. A second push during
    the trial is refused. (The deadline is set below the command's minimum of 30 s by
    starting the trial directly, as the command's parser would after its checks.)"""
    old = config_text(tmp_path, mosquitto.url)
    bad = config_text(tmp_path, dead_broker(), version="bad")
    path = write_config(tmp_path, old)
    deadline = 2.0

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], float, Agent]:
        async with running(path, mosquitto) as (agent, platform):
            await online(agent)
            t = time.monotonic()
            assert agent.pushes.start(ConfigPushCommand("p-dead", bad, deadline)) is None
            await wait_until(lambda: trial_path(path).exists(), 10)
            refused = agent.pushes.start(ConfigPushCommand("p-second", old, 30.0))
            assert refused is not None  # answered at once (the trial's uplink is dead)
            second = orjson.loads(refused)
            assert path.read_text() == bad  # on trial
            answer = await platform.answer("p-dead")
            return answer, second, time.monotonic() - t, agent

    answer, second, took, agent = asyncio.run(scenario())
    assert (
        second["outcome"] == "refused" and "already on trial (command 'p-dead')" in second["error"]
    )
    assert answer["ok"] is False and answer["outcome"] == "rolled_back", answer
    assert "not healthy within 2 s" in answer["error"]
    assert (answer["version"], answer["hash"]) == ("v1", text_hash(old.encode()))
    assert took < deadline + 15  # the rollback, its reconnect and its answer
    assert path.read_text() == old and not trial_path(path).exists()
    assert agent.config.hash == text_hash(old.encode())


# -- a restart during the trial ------------------------------------------------------------


def interrupted(tmp_path: Path, old: str, new: str, deadline_in_s: float) -> tuple[Path, Trial]:
    """The files as a trial a power cut interrupted leaves them: the new config in place,
    the old as .previous, the marker."""
    path = write_config(tmp_path, new)
    previous_path(path).write_text(old)
    trial = Trial(
        "p-cut", time.time() + deadline_in_s, 60.0, text_hash(new.encode()), text_hash(old.encode())
    )
    trial.save(path)
    return path, trial


def test_a_trial_past_its_deadline_is_rolled_back_before_the_agent_starts(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    old = config_text(tmp_path, mosquitto.url)
    path, _ = interrupted(tmp_path, old, config_text(tmp_path, dead_broker(), "bad"), -1.0)
    marker = settle_interrupted(path)
    assert marker is not None and marker.outcome == "rolled_back"
    assert "deadline passed" in (marker.error or "")
    assert path.read_text() == old  # before any load: the bad config never runs again

    async def scenario() -> dict[str, Any]:
        async with running(path, mosquitto) as (_, platform):  # the answer it still owes
            return await platform.answer("p-cut")

    answer = asyncio.run(scenario())
    assert answer["outcome"] == "rolled_back" and answer["hash"] == text_hash(old.encode())
    assert not trial_path(path).exists()


def test_a_trial_within_its_deadline_continues_after_a_restart(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The agent restarted on the pushed config (a dead broker) with 2 s of its deadline
    left: it goes on with the trial and rolls back when the time is up."""
    old = config_text(tmp_path, mosquitto.url)
    path, _ = interrupted(tmp_path, old, config_text(tmp_path, dead_broker(), "bad"), 2.0)
    assert settle_interrupted(path) is not None and trial_path(path).exists()  # left running

    async def scenario() -> tuple[dict[str, Any], Agent]:
        async with running(path, mosquitto) as (agent, platform):
            assert agent.config.version == "bad"
            return await platform.answer("p-cut"), agent

    answer, agent = asyncio.run(scenario())
    assert answer["outcome"] == "rolled_back" and answer["version"] == "v1"
    assert path.read_text() == old and not trial_path(path).exists()
    assert agent.config.version == "v1"


def test_config_files_are_replaced_atomically_keeping_their_mode(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("old")
    os.chmod(path, 0o600)  # it may hold the broker password
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["gateway.toml"]  # no temp file left


# -- the platform's command, end to end ------------------------------------------------------


def test_push_config_cli_against_a_running_agent(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """`citygw run` and `citygw platform push-config --db` as an operator runs them: the
    config is applied, the command says so (exit 0) and the history records it."""
    gw_dir, desk = tmp_path / "gateway", tmp_path / "desk"
    gw_dir.mkdir()
    desk.mkdir()
    path = write_config(gw_dir, config_text(gw_dir, mosquitto.url))
    new = desk / "gateway.toml"
    new.write_text(config_text(gw_dir, mosquitto.url, version="v2") + EXTRA_DEVICE)
    db = f"sqlite:///{tmp_path / 'platform.db'}"
    open_store(db).close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    cli = [sys.executable, "-m", "cli"]
    agent = subprocess.Popen(
        [*cli, "run", "-c", str(path)], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    try:
        # the agent is up once its meta is retained on the broker
        meta_topic = wire.topic("citygw", GW, "up/meta")
        subprocess.run(
            ["mosquitto_sub", "-p", str(mosquitto.port), "-t", meta_topic, "-C", "1", "-W", "30"],
            check=True,
            capture_output=True,
        )
        push = subprocess.run(
            [*cli, "platform", "push-config", str(new), "--gateway", GW, "--broker",
             mosquitto.url, "--deadline", "60", "--wait", "60", "--db", db, "--by", "ops"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        agent.terminate()
        _, err = agent.communicate(timeout=60)
    assert push.returncode == 0, push.stdout + push.stderr + err.decode()[-2000:]
    assert f"{GW}: applied, now running config v2" in push.stdout
    assert "devices added: air" in push.stdout
    assert "must exist next to the gateway's config" in push.stderr
    assert path.read_text() == new.read_text()
    store = open_store(db)
    try:
        [record] = store.config_pushes(GW)
        assert (record.outcome, record.pushed_by, record.version) == ("applied", "ops", "v2")
        assert record.text == new.read_text()
    finally:
        store.close()


def test_push_config_cli_without_an_answer_or_a_valid_file(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """No gateway listening: exit 5, recorded as sent. A file that does not validate, or
    names another gateway: exit 1, nothing sent."""
    db = f"sqlite:///{tmp_path / 'platform.db'}"
    open_store(db).close()
    path = write_config(tmp_path, config_text(tmp_path, mosquitto.url))
    runner = CliRunner()
    base = ["platform", "push-config", str(path), "--broker", mosquitto.url, "--db", db]
    silent = runner.invoke(app, [*base, "--gateway", GW, "--wait", "1"])
    assert silent.exit_code == 5, silent.output
    assert f"{GW}: no answer to push-" in silent.output
    other = runner.invoke(app, [*base, "--gateway", "gw-other"])
    assert other.exit_code == 1 and "its gateway.id is 'gw-push', not 'gw-other'" in other.output
    path.write_text(path.read_text().replace("base = 3.0", 'base = "high"'))
    invalid = runner.invoke(app, [*base, "--gateway", GW])
    assert invalid.exit_code == 1 and "not pushed: 1 problem(s) found" in invalid.output
    store = open_store(db)
    try:
        assert [p.outcome for p in store.config_pushes(GW)] == ["sent"]
    finally:
        store.close()
