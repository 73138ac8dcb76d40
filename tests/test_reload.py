"""Config reload without a restart: the diff of two configs, and a running agent taking
one (devices added, removed and changed while the others poll on without a gap, stage
state kept where a point's stage spec is unchanged, the uplink reconnected only for
new settings, invalid and unappliable configs refused with the old one running), and
SIGHUP through `citygw run` driven by `citygw reload`."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config import Config, parse_config
from agent.reload import ReloadRefused, diff_configs, stage_points
from agent.runtime import Agent, build_pipeline
from buffer import Buffer, Lane
from common import wire
from common.broker import Mosquitto
from drivers.sim import SimDriver
from native import codec
from native.pipeline import Pipeline
from tests.helpers import wait_until

POLL_S = 0.05
GAP_MAX_MS = 2.5 * POLL_S * 1000  # one tick skipped under load at most: no gap


def device(
    name: str, poll: str = "50ms", base: float = 1.0, pipeline: str = "", enabled: bool = True
) -> str:
    return f"""
[[devices]]
name = "{name}"
driver = "sim"
poll = "{poll}"
enabled = {"true" if enabled else "false"}
  [[devices.points]]
  name = "x"
  base = {base}
  noise = 0.5
  {f"pipeline = [{pipeline}]" if pipeline else ""}
"""


def gateway(
    buffer: Path,
    *devices: str,
    gateway_id: str = "gw-rl",
    broker: str = "mqtt://127.0.0.1:9",  # discard: never connects unless a test says so
    uplink: str = "",
    flush: str = "100ms",
    site: str = "",
) -> str:
    return f"""
[gateway]
id = "{gateway_id}"
site = "{site}"
[uplink]
broker = "{broker}"
backoff_min = "100ms"
backoff_max = "1s"
{uplink}
[buffer]
path = "{buffer}"
flush_interval = "{flush}"
""" + "".join(devices)


def parse(text: str) -> Config:
    return parse_config(text, source="gateway.toml")


def buffered(path: Path) -> dict[str, list[int]]:
    """Every telemetry reading in the buffer: its timestamps by point key, in order."""
    out: dict[str, list[int]] = {}
    with Buffer.open_readonly(path) as buf:
        key_of = {p["id"]: p["key"] for p in buf.registry.all()}
        for msg in buf.peek(1_000_000):
            if msg.lane is Lane.TELEMETRY:
                for pid, ts, _v, _q in codec.decode(msg.payload).rows():
                    out.setdefault(key_of[pid], []).append(ts)
    return {key: sorted(ts) for key, ts in out.items()}


def polls(agent: Agent, name: str) -> int:
    return agent._driver_of[name].health()[name].polls


# -- the diff ------------------------------------------------------------------------------


def test_diff_names_added_removed_changed_and_unchanged_devices(tmp_path: Path) -> None:
    buf = tmp_path / "b.db"
    old = parse(gateway(buf, device("a"), device("b"), device("c"), device("off", enabled=False)))
    new = parse(
        gateway(
            buf,
            device("a"),
            device("c", base=2.0),
            device("d"),
            device("off", enabled=False),
            site="north",  # live: up/meta only
            flush="200ms",  # live
        )
    )
    diff = diff_configs(old, new)
    assert (diff.added, diff.removed, diff.changed) == (["d"], ["b"], ["c"])
    assert diff.unchanged == ["a", "off"]
    assert not diff.uplink_changed and diff.restart_needed == []
    assert diff.refusal() is None
    assert diff.as_dict()["added"] == ["d"]


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"gateway_id": "gw-other"}, "gateway.id"),
        ({"buffer": "other.db"}, "buffer.path"),
    ],
)
def test_diff_refuses_what_needs_a_restart(
    tmp_path: Path, change: dict[str, str], key: str
) -> None:
    old = parse(gateway(tmp_path / "b.db", device("a")))
    args: dict[str, Any] = {"buffer": tmp_path / "b.db"} | change
    buffer = Path(args.pop("buffer"))
    new = parse(gateway(tmp_path / buffer, device("a"), **args))
    diff = diff_configs(old, new)
    assert diff.restart_needed == [key]
    refused = diff.refusal()
    assert refused is not None and key in str(refused) and "needs a restart" in str(refused)


def test_diff_uplink_changes_only_for_its_connection_settings(tmp_path: Path) -> None:
    buf = tmp_path / "b.db"
    old = parse(gateway(buf, device("a")))
    batch_size = parse(gateway(buf, device("a"), uplink="max_batch_points = 500"))
    keepalive = parse(gateway(buf, device("a"), uplink='keepalive = "20s"'))
    assert not diff_configs(old, batch_size).uplink_changed  # the flush's, not the link's
    assert diff_configs(old, keepalive).uplink_changed


def test_diff_counts_points_whose_stage_state_is_kept_or_reset(tmp_path: Path) -> None:
    buf = tmp_path / "b.db"
    ema = '{ type = "ema", alpha = 0.5 }'
    agg = '{ type = "aggregate", window = "1m", functions = ["mean"] }'
    old = parse(gateway(buf, device("a", pipeline=ema), device("c", pipeline=agg)))
    # c changed (its poll), but its stage spec did not: its state is kept too
    new = parse(
        gateway(
            buf,
            device("a", pipeline='{ type = "ema", alpha = 0.2 }'),
            device("c", poll="1s", pipeline=agg),
        )
    )
    diff = diff_configs(old, new)
    assert diff.changed == ["a", "c"]
    assert (diff.stages_kept, diff.stages_reset) == (1, 1)


def test_diff_counts_derived_points_whose_stage_state_is_kept(tmp_path: Path) -> None:
    """A derived point's pipeline (its deadband, its aggregate windows) goes on across a
    reload of anything else, as a device point's does."""
    buf = tmp_path / "b.db"
    derived = """
[[derived]]
name = "twice"
inputs = { x = "a/x" }
expr = "2 * x"
pipeline = [{ type = "aggregate", window = "1m", functions = ["mean"] }]
"""
    old = parse(gateway(buf, device("a"), derived))
    new = parse(gateway(buf, device("a", poll="1s"), derived))
    assert stage_points(old, new) == (["derived/twice"], [])
    diff = diff_configs(old, new)
    assert (diff.stages_kept, diff.stages_reset) == (1, 0)


# -- a running agent -----------------------------------------------------------------------


def test_reload_adds_removes_and_restarts_devices_while_the_others_poll_on(
    tmp_path: Path,
) -> None:
    buf = tmp_path / "b.db"
    before = gateway(buf, device("a"), device("b"), device("c"))
    after = gateway(buf, device("a"), device("c", base=5.0), device("d"))

    async def scenario() -> tuple[int, int, Any]:
        agent = Agent(parse(before))
        await agent.start()
        try:
            a_health = agent._driver_of["a"].health()["a"]
            await wait_until(lambda: polls(agent, "a") >= 10 and polls(agent, "b") >= 10)
            started = time.time_ns() // 1_000_000
            diff = await agent.reload(parse(after))
            ended = time.time_ns() // 1_000_000
            assert agent.config.hash == parse(after).hash
            # the untouched device: the same poll loop, never stopped
            assert agent._driver_of["a"].health()["a"] is a_health
            assert "b" not in agent._driver_of and "b" not in agent.device_health
            await wait_until(lambda: polls(agent, "d") >= 10 and polls(agent, "c") >= 10)
        finally:
            await agent.stop()
        return started, ended, diff

    started, ended, diff = asyncio.run(scenario())
    assert (diff.added, diff.removed, diff.changed, diff.unchanged) == (["d"], ["b"], ["c"], ["a"])
    assert diff.restarted == []
    seen = buffered(buf)
    a = seen["a/x"]
    assert a[0] < started - 5 * POLL_S * 1000 and a[-1] > ended + 5 * POLL_S * 1000
    gaps = [t1 - t0 for t0, t1 in itertools.pairwise(a)]
    assert max(gaps) <= GAP_MAX_MS, f"device a had a gap of {max(gaps)} ms across the reload"
    # b's readings queued before the reload were flushed; none came after it
    assert seen["b/x"] and seen["b/x"][-1] <= ended
    assert seen["d/x"][0] >= started
    state = Buffer.open_readonly(buf)
    with state:
        record = state.get_state()["reload"]
    assert record["ok"] and record["source"] == "api" and record["diff"]["added"] == ["d"]
    assert record["hash"] == parse(after).hash


def test_a_driver_that_cannot_add_devices_live_restarts_with_all_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SimDriver, "live_devices", False)
    buf = tmp_path / "b.db"

    async def scenario() -> None:
        agent = Agent(parse(gateway(buf, device("a"), device("b"))))
        await agent.start()
        try:
            await wait_until(lambda: polls(agent, "a") >= 3)
            before = agent._driver_of["a"]
            diff = await agent.reload(parse(gateway(buf, device("a"), device("b", base=3.0))))
            assert diff.changed == ["b"] and diff.restarted == ["a"]
            after = agent._driver_of["a"]
            assert after is not before and agent._driver_of["b"] is after
            assert agent.drivers == [after]
            await wait_until(lambda: polls(agent, "a") >= 3 and polls(agent, "b") >= 3)
        finally:
            await agent.stop()

    asyncio.run(scenario())


def _point_state(pipeline: Pipeline, pid: int) -> dict[str, bytes]:
    """The state of one point in every table (windows too), by table."""
    return {
        key: blob
        for key, table in pipeline.tables
        if table.state
        for blob in table.save_state([pid]).values()
    }


def test_reload_keeps_stage_state_of_unchanged_specs_and_resets_changed_ones(
    tmp_path: Path,
) -> None:
    buf = tmp_path / "b.db"
    stages = '{ type = "median", window = 5 }, { type = "ema", alpha = 0.5 }'
    before = gateway(buf, device("a", pipeline=stages), device("c", pipeline=stages), flush="60s")
    changed = '{ type = "median", window = 5 }, { type = "ema", alpha = 0.2 }'
    # a changed too (its poll), but not its stages: its state carries over
    after = gateway(
        buf,
        device("a", poll="40ms", pipeline=stages),
        device("c", pipeline=changed),
        flush="60s",
    )

    async def scenario() -> None:
        agent = Agent(parse(before))
        await agent.start()
        try:
            await wait_until(lambda: polls(agent, "a") >= 6 and polls(agent, "c") >= 6)
            await agent.flush()  # state built from readings
            a, c = agent.points["a/x"].id, agent.points["c/x"].id
            old = agent.pipeline
            diff = await agent.reload(parse(after))
            assert (diff.stages_kept, diff.stages_reset) == (1, 1)
            new = agent.pipeline
            assert new is not old
            # no flush since the swap (60 s interval): the state is what carried over
            fresh = build_pipeline(agent.config, {k: p.id for k, p in agent.points.items()})
            kept = _point_state(new, a)
            assert len(kept) == 2  # the median's window and the ema
            assert kept == _point_state(old, a) and kept != _point_state(fresh, a)
            assert _point_state(new, c) == _point_state(fresh, c) != _point_state(old, c)
        finally:
            await agent.stop()

    asyncio.run(scenario())


def test_invalid_config_is_refused_and_the_old_one_keeps_running(tmp_path: Path) -> None:
    buf = tmp_path / "b.db"
    path = tmp_path / "gateway.toml"
    path.write_text(gateway(buf, device("a")))

    async def scenario() -> None:
        agent = Agent(parse(path.read_text()))
        await agent.start()
        try:
            old = agent.config
            path.write_text(gateway(buf, device("a", poll="-1s")))
            assert await agent.reload_file(path, "test") is None
            assert agent.config is old
            n = polls(agent, "a")
            await wait_until(lambda: polls(agent, "a") >= n + 5)
            assert agent.buffer is not None
            record = (await agent._on_buffer(agent.buffer.get_state))["reload"]
            assert not record["ok"] and record["source"] == "test"
            assert "devices[0].poll" in record["error"]
        finally:
            await agent.stop()

    asyncio.run(scenario())


def test_gateway_id_change_is_refused_before_anything_changes(tmp_path: Path) -> None:
    buf = tmp_path / "b.db"

    async def scenario() -> None:
        agent = Agent(parse(gateway(buf, device("a"))))
        await agent.start()
        try:
            old, drivers = agent.config, list(agent.drivers)
            with pytest.raises(ReloadRefused, match=r"gateway\.id changed: needs a restart"):
                await agent.reload(parse(gateway(buf, device("a"), device("b"), gateway_id="gw-2")))
            assert agent.config is old and agent.drivers == drivers
            assert "b" not in agent._driver_of
            assert agent.buffer is not None
            record = (await agent._on_buffer(agent.buffer.get_state))["reload"]
            assert not record["ok"] and "gateway.id" in record["error"]
        finally:
            await agent.stop()

    asyncio.run(scenario())


# -- the uplink ------------------------------------------------------------------------------


def test_uplink_reconnects_only_when_its_settings_change(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    buf = tmp_path / "b.db"
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    first = gateway(buf, device("a"), broker=broker)
    devices_only = gateway(buf, device("a"), device("b"), broker=broker)
    new_keepalive = gateway(
        buf, device("a"), device("b"), broker=broker, uplink='keepalive = "20s"'
    )
    meta_topic = wire.topic("citygw", "gw-rl", "up/meta")

    async def scenario() -> None:
        metas: list[wire.Meta] = []
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as watcher:
            await watcher.subscribe(meta_topic, qos=1)

            async def watch() -> None:
                async for message in watcher.messages:
                    assert isinstance(message.payload, bytes)
                    metas.append(wire.decode_meta(message.payload))

            watching = asyncio.create_task(watch())
            agent = Agent(parse(first))
            await agent.start()
            try:
                up = agent.uplink
                assert up is not None
                await wait_until(lambda: up.status.state == "online" and len(metas) == 1)
                await agent.reload(parse(devices_only))
                # the same session: no reconnect, the new meta published in it
                await wait_until(lambda: len(metas) == 2, message="meta not republished")
                assert agent.uplink is up and up.status.connects == 1
                assert metas[1].config == {
                    "version": parse(devices_only).version,
                    "hash": parse(devices_only).hash,
                }
                assert {p.key for p in metas[1].points} >= {"a/x", "b/x"}
                diff = await agent.reload(parse(new_keepalive))
                assert diff.uplink_changed and diff.changed == []
                new_up = agent.uplink
                assert new_up is not up
                await wait_until(lambda: new_up.status.state == "online" and len(metas) == 3)
                assert new_up.status.connects == 2  # the counters carry on
                assert new_up.s.keepalive == 20.0
                # the new uplink's PUBACKs still reach the metrics' histogram
                assert agent.metrics is not None
                assert new_up.observe_puback == agent.metrics.puback_latency.observe
            finally:
                await agent.stop()
                watching.cancel()

    asyncio.run(scenario())


# -- end to end: citygw run + citygw reload ------------------------------------------------


def _cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


def test_citygw_reload_signals_the_running_agent(tmp_path: Path) -> None:
    buf = tmp_path / "b.db"
    path = tmp_path / "gateway.toml"
    path.write_text(gateway(buf, device("a", poll="200ms")))
    agent = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "-c", str(path), "--json-logs"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        deadline = time.monotonic() + 30
        while not _snapshot_written(buf):
            assert agent.poll() is None, agent.communicate()[0]
            assert time.monotonic() < deadline, "the agent wrote no status snapshot"
            time.sleep(0.1)
        # an invalid file: refused here, nothing sent
        path.write_text(gateway(buf, device("a", poll="-1s")))
        bad = _cli("reload", "-c", str(path))
        assert bad.returncode == 1 and "devices[0].poll" in bad.stderr
        path.write_text(gateway(buf, device("a", poll="200ms"), device("b", poll="200ms")))
        done = _cli("reload", "-c", str(path), "--timeout", "30")
        assert done.returncode == 0, done.stderr
        assert "added b" in done.stdout and "1 devices untouched" in done.stdout
        status = _cli("status", "-c", str(path))
        assert status.returncode == 0 and "last reload" in status.stdout
        assert "(sighup) applied" in " ".join(status.stdout.split())
    finally:
        agent.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=30)[0]
    assert agent.returncode == 0, out
    reloaded = [line for line in out.splitlines() if '"msg":"config reloaded"' in line]
    assert len(reloaded) == 1 and '"added":["b"]' in reloaded[0], out


def _snapshot_written(buf: Path) -> bool:
    if not buf.exists():
        return False
    try:
        with Buffer.open_readonly(buf) as b:
            return "agent" in b.get_state()
    except Exception:  # created but not yet initialised: try again
        return False
