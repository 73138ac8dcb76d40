"""Prometheus metrics: every family scraped over HTTP from a running agent and a running
ingest worker and held against their own counters; a port in use; the device-series cap;
the sample alert rules checked against those real scrapes."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from agent import metrics as agent_metrics
from agent.config import ConfigError, parse_config
from agent.runtime import Agent, Counters
from agent.status import render_status
from buffer import BufferStats, Lane, LaneStats
from central.ingest_metrics import REJECT_REASONS, STORE_KINDS, serve_ingest_metrics
from central.stores import open_store
from central.worker import UNSTORABLE, IngestWorker, run_ingest
from common import wire
from common.broker import Mosquitto, free_port
from common.metrics_http import start_metrics_server
from tests.helpers import Gateway, running_broker, wait_until

RULES = Path(__file__).parent.parent / "deploy" / "prometheus" / "citygw-alerts.yml"
#: series Prometheus makes itself (not in any scrape)
PROMETHEUS_OWN = {"up"}

Families = dict[str, Any]  # family name -> prometheus_client Metric


def get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=20) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(url: str) -> Families:
    status, _, text = get(url)
    assert status == 200, text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: Families, sample: str, **labels: str) -> float:
    """The value of the one sample named `sample` with exactly `labels`."""
    family = families[re.sub(r"_(total|bucket|count|sum)$", "", sample)]
    found = [s.value for s in family.samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, f"{sample}{labels}: {family.samples}"
    return float(found[0])


def names(families: Families) -> set[str]:
    return {s.name for f in families.values() for s in f.samples}


def agent_config(buffer: Path, broker: str, port: int, devices: str, **metrics: object) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in metrics.items())
    return f"""
[gateway]
id = "gw-m"
[uplink]
broker = "{broker}"
backoff_min = "100ms"
backoff_max = "1s"
[buffer]
path = "{buffer}"
flush_interval = "100ms"
[metrics]
port = {port}
{extra}
{devices}
"""


def sim_device(name: str, points: str = '[[devices.points]]\nname = "x"\n', **keys: object) -> str:
    settings = "".join(f"{k} = {v}\n" for k, v in keys.items())
    return f'[[devices]]\nname = "{name}"\ndriver = "sim"\npoll = "20ms"\n{settings}{points}'


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the module's scenarios (each runs once, its scrape shared)."""
    with running_broker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


# -- the agent ------------------------------------------------------------------------------


@dataclass
class AgentRun:
    families: Families
    counters: Counters
    uplink: dict[str, Any]
    devices: dict[str, dict[str, Any]]
    depth: int
    config_hash: str


@pytest.fixture(scope="module")
def agent_run(broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> AgentRun:
    """An agent with two sim devices (one failing half its polls, one point with a range
    stage that drops everything) sending to the broker; scraped once everything it read
    went out, so its counters hold still while they are compared."""
    port = free_port()
    drop = '[[devices.points]]\nname = "y"\nbase = 2.0\n'
    drop += 'pipeline = [{ type = "range", max = 1.5, action = "drop" }]\n'
    devices = sim_device("a", '[[devices.points]]\nname = "x"\nbase = 1.0\n' + drop)
    devices += sim_device("flaky", fail_probability=0.5, seed=3)
    text = agent_config(tmp_path_factory.mktemp("agent") / "b.db", broker.url, port, devices)
    cfg = parse_config(text, source="gw.toml")

    async def scenario() -> AgentRun:
        agent = Agent(cfg)
        await agent.start()
        try:
            assert agent.uplink is not None
            up = agent.uplink.status
            health = {n: h for d in agent.drivers for n, h in d.health().items()}
            await wait_until(
                lambda: up.published_messages >= 3 and health["flaky"].errors > 0, timeout=30
            )
            await agent.stop_drivers()
            await agent.flush()
            assert await agent.drain(timeout=30)
            families = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
            snapshot = agent.snapshot()
            return AgentRun(
                families,
                Counters(**snapshot["counters"]),
                snapshot["uplink"],
                snapshot["devices"],
                await agent.buffer_depth(),
                cfg.hash,
            )
        finally:
            await agent.stop()

    return asyncio.run(scenario())


def test_agent_readings_and_pipeline(agent_run: AgentRun) -> None:
    f, c = agent_run.families, agent_run.counters
    assert value(f, "citygw_readings_read_total") == c.read > 0
    assert value(f, "citygw_readings_flushed_total") == c.sent > 0
    # point y is dropped by its range stage; what was flushed went out (drained)
    assert value(f, "citygw_pipeline_readings_total", action="dropped") == c.dropped > 0
    assert value(f, "citygw_pipeline_readings_total", action="flagged") == 0
    assert value(f, "citygw_readings_sent_total") == agent_run.uplink["published_points"] == c.sent
    assert value(f, "citygw_readings_refused_total") == value(f, "citygw_readings_lost_total") == 0
    assert value(f, "citygw_alarms_total", transition="raised") == 0
    assert value(f, "citygw_flushes_total") == c.flushes > 0
    assert value(f, "citygw_flushed_bytes_total") == c.encoded_bytes > 0
    # every flush that had work was timed (failed ones too: there were none)
    assert value(f, "citygw_flush_duration_seconds_count") >= c.flushes
    assert value(f, "citygw_flush_duration_seconds_sum") > 0


def test_agent_buffer_and_uplink(agent_run: AgentRun) -> None:
    f, up = agent_run.families, agent_run.uplink
    lanes = {"alarm", "event", "telemetry"}
    for family in ("citygw_buffer_messages", "citygw_buffer_readings", "citygw_buffer_bytes"):
        assert {s.labels["lane"] for s in f[family].samples} == lanes
    depth = sum(value(f, "citygw_buffer_messages", lane=lane) for lane in lanes)
    assert depth == agent_run.depth == 0  # drained
    assert value(f, "citygw_buffer_oldest_unsent_age_seconds", lane="telemetry") == 0
    assert value(f, "citygw_buffer_capacity_bytes") == 64 * 1024**2
    assert value(f, "citygw_readings_evicted_total") == 0
    assert value(f, "citygw_uplink_connected") == 1
    assert value(f, "citygw_uplink_connects_total") == up["connects"] == 1
    assert value(f, "citygw_uplink_messages_total") == up["published_messages"] >= 3
    # every acknowledged message's PUBACK was timed
    assert value(f, "citygw_uplink_puback_latency_seconds_count") == up["published_messages"]
    assert 0 < value(f, "citygw_uplink_puback_latency_seconds_sum") < 10 * up["published_messages"]
    assert value(f, "citygw_uplink_last_puback_timestamp_seconds") == up["last_puback_ms"] / 1000


def test_agent_devices_tasks_process_and_identity(agent_run: AgentRun) -> None:
    f, devices = agent_run.families, agent_run.devices
    for name in ("a", "flaky"):
        h = devices[name]
        assert value(f, "citygw_device_polls_total", device=name) == h["polls"] > 0
        assert value(f, "citygw_device_errors_total", device=name) == h["errors"]
        assert value(f, "citygw_device_skipped_polls_total", device=name) == h["skipped_polls"]
        success = value(f, "citygw_device_last_success_timestamp_seconds", device=name)
        assert success == h["last_success_ms"] / 1000
        assert 0 < time.time() - success < 120
    assert devices["flaky"]["errors"] > 0 and devices["a"]["errors"] == 0
    assert value(f, "citygw_devices") == 2
    assert value(f, "citygw_devices_aggregated") == 0
    tasks = {s.labels["task"] for s in f["citygw_task_restarts"].samples}
    assert {"uplink", "flush", "status", "metrics", "driver:sim"} <= tasks
    assert value(f, "citygw_task_restarts_total", task="uplink") == 0
    for loop in ("flush", "uplink"):  # both turning (what the watchdog judges)
        assert 0 <= value(f, "citygw_loop_progress_age_seconds", loop=loop) < 30
    assert value(f, "process_resident_memory_bytes") > 10 * 1024**2
    assert value(f, "process_cpu_seconds_total") > 0
    (info,) = f["citygw_agent_info"].samples
    assert info.labels["gateway"] == "gw-m"
    assert info.labels["config_hash"] == agent_run.config_hash
    assert info.labels["software"]


def test_agent_names_follow_the_conventions(agent_run: AgentRun) -> None:
    for family in agent_run.families.values():
        if not family.name.startswith("citygw_"):
            assert family.name.split("_")[0] in ("process", "python"), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    infos = {f.name for f in agent_run.families.values() if f.name.endswith("_info")}
    assert infos == {"citygw_agent_info", "python_info"}
    assert {f.name for f in agent_run.families.values() if f.type == "histogram"} == {
        "citygw_uplink_puback_latency_seconds",
        "citygw_flush_duration_seconds",
    }


def test_every_agent_counter_is_exported() -> None:
    assert set(agent_metrics.COUNTERS) == {f.name for f in fields(Counters)}
    assert {name for name, _ in agent_metrics.COUNTERS.values()} == set(
        agent_metrics.COUNTER_FAMILIES
    )


def test_port_in_use_the_agent_runs_on_and_binds_once_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port held by another program: the agent reads, buffers and shows why it serves no
    metrics; it binds once the port is free. Also: beyond MAX_DEVICE_SERIES devices are
    summed under device="(others)", and an unreachable broker shows as a backlog."""
    monkeypatch.setattr(agent_metrics, "BIND_RETRY_S", 0.1)
    monkeypatch.setattr(agent_metrics, "MAX_DEVICE_SERIES", 2)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    devices = "".join(sim_device(f"d{i}", seed=i) for i in range(3))
    # port 9 (discard): the uplink never connects, readings stay in the buffer
    text = agent_config(tmp_path / "b.db", "mqtt://127.0.0.1:9", port, devices)

    async def scenario() -> None:
        agent = Agent(parse_config(text, source="gw.toml"))
        await agent.start()
        try:
            m = agent.metrics
            assert m is not None
            await wait_until(lambda: m.bind_failures >= 2 and agent.counters.sent > 0)
            assert m.state == "retrying" and str(port) in (m.last_error or "")
            stats = await asyncio.to_thread(agent.buffer_stats_from_thread, 10.0)
            console = Console(record=True, width=300)
            console.print(render_status(stats, {"agent": agent.snapshot()}))
            shown = console.export_text()
            assert f"not served: cannot listen on 127.0.0.1:{port}" in shown
            assert "failed tries" in shown

            blocker.close()
            await wait_until(lambda: m.state == "serving")
            await agent.stop_drivers()
            await agent.flush()
            f = await asyncio.to_thread(scrape, m.url)
            stats = await asyncio.to_thread(agent.buffer_stats_from_thread, 10.0)
            health = {n: h for d in agent.drivers for n, h in d.health().items()}
        finally:
            await agent.stop()
        assert value(f, "citygw_metrics_bind_failures_total") == m.bind_failures >= 2
        assert value(f, "citygw_uplink_connected") == 0
        backlog = value(f, "citygw_buffer_readings", lane="telemetry")
        assert backlog == stats.lanes[Lane.TELEMETRY].points == agent.counters.sent > 0
        assert value(f, "citygw_buffer_oldest_unsent_age_seconds", lane="telemetry") > 0
        assert value(f, "citygw_readings_sent_total") == 0
        # the first two devices of the config by name, the third summed as "(others)"
        labels = {s.labels["device"] for s in f["citygw_device_polls"].samples}
        assert labels == {"d0", "d1", "(others)"}
        others = value(f, "citygw_device_polls_total", device="(others)")
        assert others == health["d2"].polls > 0
        assert value(f, "citygw_devices_aggregated") == 1
        assert value(f, "citygw_devices") == 3

    try:
        asyncio.run(scenario())
    finally:
        blocker.close()


def test_metrics_config(tmp_path: Path) -> None:
    head = '[gateway]\nid = "gw"\n[uplink]\nbroker = "mqtt://h"\n'
    cfg = parse_config(head, base_dir=tmp_path)
    assert (cfg.metrics.enabled, cfg.metrics.address, cfg.metrics.port) == (
        True,
        "127.0.0.1",
        9465,
    )
    off = parse_config(head + "[metrics]\nenabled = false\n", base_dir=tmp_path)
    assert off.metrics.enabled is False
    with pytest.raises(ConfigError) as info:
        parse_config(head + '[metrics]\naddress = "localhost"\nport = 0\n', source="g.toml")
    assert str(info.value).splitlines() == [
        "g.toml: metrics.address: 'localhost' is not an IP address; use 127.0.0.1 (this "
        "machine only), 0.0.0.0 (every IPv4 interface) or ::1",
        "g.toml: metrics.port: must be >= 1, got 0",
    ]
    console = Console(record=True, width=200)
    empty = BufferStats({lane: LaneStats(0, 0, 0, None) for lane in Lane}, 0, 1, 0, 0, None, 0, 0)
    console.print(render_status(empty, {"agent": {"metrics": None}}))
    assert "off ([metrics] enabled = false)" in console.export_text()


def test_endpoint_answers_only_get_metrics() -> None:
    async def scenario() -> None:
        server = await start_metrics_server(CollectorRegistry(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        try:
            status, ctype, body = await asyncio.to_thread(get, base + "/metrics")
            assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
            om = "application/openmetrics-text; version=1.0.0"
            status, ctype, body = await asyncio.to_thread(get, base + "/metrics", om)
            assert status == 200 and ctype.startswith("application/openmetrics-text")
            assert body.endswith("# EOF\n")
            status, _, body = await asyncio.to_thread(get, base + "/other")
            assert (status, body) == (404, "metrics are at /metrics\n")
            post = urllib.request.Request(base + "/metrics", data=b"x", method="POST")
            with pytest.raises(urllib.error.HTTPError) as err:
                await asyncio.to_thread(urllib.request.urlopen, post, timeout=20)
            assert err.value.code == 405
            # a client that sends nothing is let go; the server still answers the next
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GARBAGE\r\n\r\n")
            assert (await reader.read()).startswith(b"HTTP/1.1 400 ")
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


# -- the ingest -----------------------------------------------------------------------------


@dataclass
class IngestRun:
    families: Families
    readings: int
    batches: int


@pytest.fixture(scope="module")
def ingest_run(broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> IngestRun:
    """`run_ingest` as `citygw ingest --metrics-port` runs it: three uplinks, one sent twice,
    one undecodable message; scraped once all are stored."""
    port = free_port()
    url = f"sqlite:///{tmp_path_factory.mktemp('ingest') / 'p.db'}"
    endpoint = f"http://127.0.0.1:{port}/metrics"

    def stored() -> Families | None:
        try:
            f = scrape(endpoint)
        except OSError:
            return None  # not listening yet
        dead = value(f, "citygw_ingest_dead_letters_total", reason="envelope")
        # a dead letter is counted when rejected, then stored: wait for both
        kept = value(f, "citygw_ingest_dead_letters_stored_total")
        # ... and its store call timed (observed once the call returned)
        timed = value(f, "citygw_ingest_store_latency_seconds_count", kind="dead_letters")
        done = value(f, "citygw_ingest_batches_stored_total") == 3 and dead == kept == timed == 1
        return f if done and value(f, "citygw_ingest_duplicate_batches_total") == 1 else None

    async def scenario() -> IngestRun:
        task = asyncio.create_task(
            run_ingest(broker.url, url, group="m", report_every=0, metrics_port=port)
        )
        try:
            await wait_until(lambda: _connected(endpoint), timeout=30, check=lambda: _alive(task))
            gw = Gateway(broker)
            await gw.send([1, 2, 3])
            await gw.publish([(wire.batch_topic(gw.gateway), gw.uplink(1)[0])])  # again
            await gw.publish([(wire.batch_topic(gw.gateway), b"")])  # no envelope
            found: list[Families] = []

            def all_stored() -> bool:
                f = stored()
                if f is not None:
                    found.append(f)
                return f is not None

            await wait_until(all_stored, timeout=30, check=lambda: _alive(task))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store = open_store(url)
        try:
            counts = store.counts()
        finally:
            store.close()
        return IngestRun(found[-1], counts.readings, counts.batches)

    return asyncio.run(scenario())


def _connected(endpoint: str) -> bool:
    try:
        return value(scrape(endpoint), "citygw_ingest_connected") == 1
    except OSError:
        return False


def _alive(task: asyncio.Task[None]) -> None:
    if task.done():
        raise AssertionError(f"the ingest stopped: {task.exception()!r}")


def test_ingest_families(ingest_run: IngestRun) -> None:
    f = ingest_run.families
    assert value(f, "citygw_ingest_readings_stored_total") == ingest_run.readings == 60
    assert value(f, "citygw_ingest_batches_stored_total") == ingest_run.batches == 3
    assert value(f, "citygw_ingest_duplicate_batches_total") == 1
    assert value(f, "citygw_ingest_messages_total") >= 5  # + the agent tests' retained ones
    assert value(f, "citygw_ingest_dead_letters_stored_total") == 1
    reasons = {s.labels["reason"]: s.value for s in f["citygw_ingest_dead_letters"].samples}
    assert reasons == {r: (1 if r == "envelope" else 0) for r in REJECT_REASONS}
    assert value(f, "citygw_ingest_store_errors_total") == 0
    kinds = {s.labels["kind"] for s in f["citygw_ingest_store_latency_seconds"].samples}
    assert kinds == set(STORE_KINDS)
    # the uplinks (one or more transactions) and the dead letter were timed
    assert value(f, "citygw_ingest_store_latency_seconds_count", kind="uplinks") >= 1
    assert value(f, "citygw_ingest_store_latency_seconds_count", kind="dead_letters") == 1
    assert value(f, "citygw_ingest_connects_total") == 1
    assert value(f, "process_resident_memory_bytes") > 10 * 1024**2
    (info,) = f["citygw_ingest_info"].samples
    assert info.labels == {"group": "m", "prefix": "citygw"}


def test_ingest_port_in_use_stores_on_without_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    worker = IngestWorker("mqtt://127.0.0.1:9", store)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with caplog.at_level("ERROR", logger="citygw.metrics"):
            server = asyncio.run(serve_ingest_metrics(worker, "127.0.0.1", port))
    store.close()
    assert server is None
    (record,) = caplog.records
    assert "--metrics-port" in record.getMessage() and record.port == port  # type: ignore[attr-defined]


def test_every_dead_letter_reason_is_known() -> None:
    source = inspect.getsource(IngestWorker._check)
    given = set(re.findall(r'return "(\w+)", ', source)) | {UNSTORABLE}
    assert len(given) > 10 and given == set(REJECT_REASONS)


# -- the alert rules ------------------------------------------------------------------------


def test_alert_rules_name_only_scraped_metrics(agent_run: AgentRun, ingest_run: IngestRun) -> None:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    scraped = names(agent_run.families) | names(ingest_run.families) | PROMETHEUS_OWN
    seen: set[str] = set()
    jobs: set[str] = set()  # the job names the scrape examples beside the rules use
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])
        used: list[str] = []

        def visit(node: object, used: list[str] = used) -> bool:
            if isinstance(node, promql_parser.VectorSelector) and node.name:
                used.append(node.name)
                jobs.update(m.value for m in node.matchers.matchers if m.name == "job")
            return True

        promql_parser.walk(promql_parser.parse(rule["expr"]), visit)
        assert used, rule["alert"]
        missing = set(used) - scraped
        assert not missing, f"{rule['alert']} names metrics no scrape has: {missing}"
        seen |= set(used)
    # what the issue asks the rules to cover
    assert {a["alert"] for a in alerts} >= {
        "CitygwGatewaySilent",
        "CitygwBacklogGrowing",
        "CitygwReadingsEvicted",
        "CitygwDeviceFailing",
        "CitygwUplinkDisconnected",
    }
    assert len(seen) >= 10
    assert jobs == {"citygw-agent", "citygw-ingest"}


def test_scrape_examples_point_at_the_default_ports() -> None:
    gateway = yaml.safe_load((RULES.parent / "gateway-agent.yml").read_text(encoding="utf-8"))
    (job,) = gateway["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9465"]
    assert job["job_name"] == "citygw-agent" and "gateway" in gateway["global"]["external_labels"]
    platform = yaml.safe_load((RULES.parent / "platform.yml").read_text(encoding="utf-8"))
    assert platform["rule_files"] == [RULES.name]
    (job,) = platform["scrape_configs"]
    assert job["job_name"] == "citygw-ingest"
    assert "127.0.0.1:9466" in job["static_configs"][0]["targets"]
