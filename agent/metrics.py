"""The agent's Prometheus metrics: read from its own state when scraped.

Nothing is counted twice and nothing is done per reading: a scrape reads the counters the
agent keeps anyway (`Agent.counters`, the uplink's status, every device's health, the
supervised tasks' health) and asks the buffer thread for the buffer's stats. Only the
two histograms are fed as things happen: PUBACK latency (per uplink message) and flush
duration (per flush).

Label values are bounded by the config, never taken from the field: `device` is a device
name of the config (at most `MAX_DEVICE_SERIES` of them, in config order; the rest are
summed under `device="(others)"`, a value no device name can take), `task` a supervised
task's name, `lane` one of the buffer's three lanes, `action` and `transition` fixed words.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from buffer import BufferStats, Lane
from common.logs import Throttle
from common.metrics_http import start_metrics_server
from drivers.base import DeviceHealth

_Family = TypeVar("_Family", CounterMetricFamily, GaugeMetricFamily)

if TYPE_CHECKING:
    from agent.runtime import Agent

log = logging.getLogger("citygw.metrics")

#: devices with series of their own; the others are summed under OTHERS
MAX_DEVICE_SERIES = 500
OTHERS = "(others)"
#: a port in use is tried again this often
BIND_RETRY_S = 60.0
#: how long a scrape waits for the buffer thread (busy with a long flush) for its stats
BUFFER_STATS_TIMEOUT_S = 5.0

PUBACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

#: `Counters` field -> (family, label value or None); every field has one (a test checks)
COUNTERS: dict[str, tuple[str, str | None]] = {
    "read": ("citygw_readings_read", None),
    "refused": ("citygw_readings_refused", None),
    "sent": ("citygw_readings_flushed", None),
    "lost": ("citygw_readings_lost", None),
    "recovered": ("citygw_readings_recovered", None),
    "intake_dropped": ("citygw_readings_intake_dropped", None),
    "clock_flagged": ("citygw_readings_clock_flagged", None),
    "flagged": ("citygw_pipeline_readings", "flagged"),
    "dropped": ("citygw_pipeline_readings", "dropped"),
    "replaced": ("citygw_pipeline_readings", "replaced"),
    "clamped": ("citygw_pipeline_readings", "clamped"),
    "suppressed": ("citygw_pipeline_readings", "suppressed"),
    "late": ("citygw_pipeline_readings", "late"),
    "windows": ("citygw_pipeline_windows", None),
    "alarms_raised": ("citygw_alarms", "raised"),
    "alarms_cleared": ("citygw_alarms", "cleared"),
    "encoded_bytes": ("citygw_flushed_bytes", None),
    "flushes": ("citygw_flushes", None),
    "flush_failures": ("citygw_flush_failures", None),
    "intake_failures": ("citygw_intake_failures", None),
    "status_failures": ("citygw_status_failures", None),
    "clock_steps": ("citygw_clock_steps", None),
    "info_truncated": ("citygw_device_info_truncated", None),
    "info_refused": ("citygw_device_info_refused", None),
    "health_refused": ("citygw_device_health_left_out", None),
}

#: family -> (help, label name or None)
COUNTER_FAMILIES: dict[str, tuple[str, str | None]] = {
    "citygw_readings_read": ("Readings the drivers handed over and the memory queue took.", None),
    "citygw_readings_refused": (
        "Readings refused by the full memory queue (back-pressure: the poll is skipped).",
        None,
    ),
    "citygw_readings_flushed": (
        "Readings the flushes put into the buffer (pipeline output, aggregates included).",
        None,
    ),
    "citygw_readings_lost": (
        "Pipeline output lost while the buffer refused writes beyond the memory bound.",
        None,
    ),
    "citygw_readings_recovered": ("Readings a previous run left in the intake.", None),
    "citygw_readings_intake_dropped": ("Intake readings dropped at start after a power cut.", None),
    "citygw_readings_clock_flagged": (
        "Readings stamped by an obviously wrong clock (marked uncertain).",
        None,
    ),
    "citygw_pipeline_readings": ("Readings the pipeline acted on, by action.", "action"),
    "citygw_pipeline_windows": ("Aggregate windows closed.", None),
    "citygw_alarms": ("Alarm transitions, by transition (raised, cleared).", "transition"),
    "citygw_flushed_bytes": ("Codec payload bytes the flushes appended to the buffer.", None),
    "citygw_flushes": ("Flushes that appended to the buffer.", None),
    "citygw_flush_failures": ("Flushes the buffer refused (disk full, I/O error).", None),
    "citygw_intake_failures": ("Intake commits the buffer refused.", None),
    "citygw_status_failures": ("Status snapshots, sync points or checkpoints that failed.", None),
    "citygw_clock_steps": ("Wall-clock jumps seen (NTP step, RTC reset).", None),
    "citygw_device_info_truncated": ("Device information values cut to the wire's bounds.", None),
    "citygw_device_info_refused": ("Device information entries left out of up/stats.", None),
    "citygw_device_health_left_out": ("Devices left out of up/stats health (size bound).", None),
}


class AgentMetrics:
    """One agent's registry (its own: several agents can run in one process, as in the
    tests), its two histograms and its endpoint."""

    def __init__(self, agent: Agent, software: str) -> None:
        """`software`: this citygw's version, for `citygw_agent_info`."""
        cfg = agent.config.metrics
        self.software = software
        self.address, self.port = cfg.address, cfg.port
        self.registry = CollectorRegistry()
        self.puback_latency = Histogram(
            "citygw_uplink_puback_latency_seconds",
            "Time from an uplink message's publish to its PUBACK.",
            buckets=PUBACK_BUCKETS,
            registry=self.registry,
        )
        self.flush_duration = Histogram(
            "citygw_flush_duration_seconds",
            "Time a flush took (pipeline, encoding, the buffer's append), its wait for the "
            "buffer thread included.",
            buckets=FLUSH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(AgentCollector(agent, self))
        # process_cpu_seconds_total, process_resident_memory_bytes...; python_info; python_gc_*
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.server: asyncio.Server | None = None
        self.state = "starting"  # starting | serving | retrying | stopped
        self.bind_failures = 0
        self.buffer_stats_failures = 0
        self.last_error: str | None = None
        self._throttle = Throttle(interval=3600.0)

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/metrics"

    async def serve(self) -> None:
        """Binds the endpoint and returns. While it cannot (the port in use), the failure
        is logged, counted, shown in the status and the bind tried again every
        BIND_RETRY_S: the gateway runs on without metrics, never stops for them."""
        while True:
            try:
                self.server = await start_metrics_server(self.registry, self.address, self.port)
            except OSError as exc:
                self.bind_failures += 1
                self.state = "retrying"
                self.last_error = (
                    f"cannot listen on {self.address}:{self.port}: {exc.strerror or exc}"
                )
                if (n := self._throttle.ready("bind")) is not None:
                    log.warning(
                        "metrics endpoint not served (another program holds the port? set "
                        "[metrics] port); retrying",
                        extra={"error": self.last_error, "retry_s": BIND_RETRY_S, "failures": n},
                    )
                await asyncio.sleep(BIND_RETRY_S)
                continue
            self.state, self.last_error = "serving", None
            log.info("metrics endpoint served", extra={"url": self.url})
            return

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        self.state = "stopped"

    def as_dict(self) -> dict[str, Any]:
        """For the status snapshot (`citygw status`)."""
        return {
            "url": self.url,
            "state": self.state,
            "bind_failures": self.bind_failures,
            "last_error": self.last_error,
        }


class AgentCollector(Collector):
    """The agent's families, read from its state at scrape time (on the scrape's thread:
    the agent's dicts are copied whole before they are walked, the buffer is asked on its
    own thread)."""

    def __init__(self, agent: Agent, owner: AgentMetrics) -> None:
        self.agent = agent
        self.owner = owner
        self._throttle = Throttle(interval=600.0)

    def collect(self) -> Iterator[Metric]:
        yield from self._identity()
        yield from self._counters()
        yield from self._queue()
        stats = self._buffer_stats()
        if stats is not None:
            yield from _buffer(stats)
        yield from self._uplink()
        yield from self._devices()
        yield from self._tasks()
        yield from self._local()
        own = self.owner
        yield _counter(
            "citygw_metrics_bind_failures",
            "Failed binds of this endpoint (port in use; retried every minute).",
            own.bind_failures,
        )
        yield _counter(
            "citygw_metrics_buffer_stats_failures",
            "Scrapes that got no buffer stats in time (the buffer families were left out).",
            own.buffer_stats_failures,
        )

    def _local(self) -> Iterator[Metric]:
        """Derived readings made and the rules' actions by outcome (agent/local_action.py)."""
        local = self.agent.local
        if local is None:
            return
        c = local.counters
        yield _counter("citygw_derived_readings", "Readings of derived points made.", c["derived"])
        actions = CounterMetricFamily(
            "citygw_rule_actions",
            "Local rules' actions, by outcome (done includes dry runs; suppressed by an "
            "interlock or override).",
            labels=["outcome"],
        )
        for outcome in ("done", "suppressed", "failed"):
            actions.add_metric([outcome], c[outcome])
        yield actions
        yield _counter(
            "citygw_local_action_errors",
            "Batches the derive engine failed on (a bug: their derived readings are lost).",
            c["errors"],
        )
        active = GaugeMetricFamily("citygw_rule_active", "1 while a rule is on.", labels=["rule"])
        for rule in local.rules:
            active.add_metric([rule.config.id], float(rule.state.active))
        yield active

    def _identity(self) -> Iterator[Metric]:
        cfg = self.agent.config
        info = InfoMetricFamily("citygw_agent", "The agent's software and config.")
        info.add_metric(
            [],
            {
                "gateway": cfg.gateway.id,
                "software": self.owner.software,
                "config_version": cfg.version,
                "config_hash": cfg.hash,
            },
        )
        yield info

    def _counters(self) -> Iterator[Metric]:
        values = asdict(self.agent.counters)
        families = {
            name: CounterMetricFamily(name, help, labels=[label] if label else None)
            for name, (help, label) in COUNTER_FAMILIES.items()
        }
        for field, (name, label_value) in COUNTERS.items():
            value = values.get(field, 0)
            families[name].add_metric([label_value] if label_value else [], value)
        yield from families.values()

    def _queue(self) -> Iterator[Metric]:
        q = self.agent.queue
        yield _gauge(
            "citygw_memory_queue_readings",
            "Readings in memory waiting for the next flush.",
            q.points,
        )
        yield _gauge(
            "citygw_memory_queue_capacity_readings",
            "Most readings the memory queue holds (buffer.max_memory_points).",
            q.max_points,
        )

    def _buffer_stats(self) -> BufferStats | None:
        if self.agent.buffer is None:
            return None
        try:
            return self.agent.buffer_stats_from_thread(BUFFER_STATS_TIMEOUT_S)
        except Exception as exc:  # busy past the timeout, closed, or its own error
            self.owner.buffer_stats_failures += 1
            if (n := self._throttle.ready("stats")) is not None:
                log.warning(
                    "metrics: no buffer stats for this scrape",
                    extra={"error": f"{type(exc).__name__}: {exc}", "failures": n},
                )
            return None

    def _uplink(self) -> Iterator[Metric]:
        uplink = self.agent.uplink
        if uplink is None:
            return
        st = uplink.status
        yield _gauge(
            "citygw_uplink_connected",
            "1 while the uplink's MQTT session is up, else 0.",
            1 if st.state == "online" else 0,
        )
        yield _counter(
            "citygw_uplink_connects",
            "Uplink sessions established (each after the first is a reconnect).",
            st.connects,
        )
        yield _counter(
            "citygw_readings_sent",
            "Readings the platform's broker acknowledged (PUBACK); the buffer deleted them.",
            st.published_points,
        )
        yield _counter(
            "citygw_uplink_messages", "Uplink messages acknowledged.", st.published_messages
        )
        yield _counter(
            "citygw_uplink_bytes",
            "MQTT payload bytes of acknowledged uplink messages.",
            st.published_bytes,
        )
        yield _counter(
            "citygw_uplink_resent_messages",
            "Uplink messages published again after a lost session.",
            st.resent_messages,
        )
        yield _counter(
            "citygw_uplink_buffer_errors",
            "Buffer peeks, acks and stats the uplink's buffer refused (retried).",
            st.buffer_errors,
        )
        if st.last_puback_ms is not None:
            yield _gauge(
                "citygw_uplink_last_puback_timestamp_seconds",
                "When the last PUBACK arrived (Unix time).",
                st.last_puback_ms / 1000,
            )

    def _devices(self) -> Iterator[Metric]:
        a = self.agent
        health: dict[str, DeviceHealth] = {}
        for driver in list(a.drivers):
            health.update(dict(driver.health()))
        configured = [d.name for d in a.config.devices if d.enabled][:MAX_DEVICE_SERIES]
        named = [name for name in configured if name in health]
        labelled = set(named)
        others = [h for name, h in health.items() if name not in labelled]
        rows: list[tuple[str, list[DeviceHealth]]] = [(name, [health[name]]) for name in named]
        if others:
            rows.append((OTHERS, others))

        polls = _by_device(CounterMetricFamily, "citygw_device_polls", "Polls (failed ones too).")
        errors = _by_device(CounterMetricFamily, "citygw_device_errors", "Failed polls.")
        skipped = _by_device(
            CounterMetricFamily,
            "citygw_device_skipped_polls",
            "Polls skipped (late, or the memory queue full).",
        )
        readings = _by_device(CounterMetricFamily, "citygw_device_readings", "Readings taken.")
        rejected = _by_device(
            CounterMetricFamily,
            "citygw_device_rejected",
            "Malformed inputs refused (bad CRC, unparsable payload...).",
        )
        in_a_row = _by_device(
            GaugeMetricFamily,
            "citygw_device_consecutive_failures",
            "Failed polls in a row (0: the last poll succeeded); (others): the most.",
        )
        success = _by_device(
            GaugeMetricFamily,
            "citygw_device_last_success_timestamp_seconds",
            "When the last poll succeeded (Unix time); (others): the oldest.",
        )
        online = _by_device(
            GaugeMetricFamily,
            "citygw_device_online",
            "What the device's own availability signal says (1 online, 0 offline), if any.",
        )
        for label, hs in rows:
            polls.add_metric([label], sum(h.polls for h in hs))
            errors.add_metric([label], sum(h.errors for h in hs))
            skipped.add_metric([label], sum(h.skipped_polls for h in hs))
            readings.add_metric([label], sum(h.readings for h in hs))
            rejected.add_metric([label], sum(sum(dict(h.rejected).values()) for h in hs))
            in_a_row.add_metric([label], max(h.consecutive_failures for h in hs))
            successes = [h.last_success_ms for h in hs if h.last_success_ms is not None]
            if successes:
                success.add_metric([label], min(successes) / 1000)
            if label != OTHERS and hs[0].online is not None:
                online.add_metric([label], 1 if hs[0].online else 0)
        yield from (polls, errors, skipped, readings, rejected, in_a_row, success, online)
        yield _gauge("citygw_devices", "Devices polled or listened to.", len(health))
        yield _gauge(
            "citygw_devices_failing",
            "Devices whose last poll failed or whose availability signal says offline.",
            sum(h.consecutive_failures > 0 or h.online is False for h in health.values()),
        )
        yield _gauge(
            "citygw_devices_aggregated",
            f'Devices beyond the first {MAX_DEVICE_SERIES}, summed under device="{OTHERS}".',
            len(others),
        )

    def _tasks(self) -> Iterator[Metric]:
        tasks = dict(self.agent.task_health)
        restarts = CounterMetricFamily(
            "citygw_task_restarts",
            "Restarts of a supervised task after it failed.",
            labels=["task"],
        )
        failures = CounterMetricFamily(
            "citygw_task_failures", "Failures of a supervised task.", labels=["task"]
        )
        for name, health in sorted(tasks.items()):
            restarts.add_metric([name], health.restarts)
            failures.add_metric([name], health.failures)
        yield restarts
        yield failures
        # what the systemd watchdog judges (agent/watchdog.py): a loop that stopped turning
        progress = GaugeMetricFamily(
            "citygw_loop_progress_age_seconds",
            "Seconds since the flush loop or the uplink loop last turned.",
            labels=["loop"],
        )
        now = time.monotonic()
        for loop, beat in sorted(dict(self.agent.heartbeats).items()):
            progress.add_metric([loop], max(0.0, now - beat))
        yield progress


def _buffer(stats: BufferStats) -> Iterable[Metric]:
    now_ms = time.time_ns() // 1_000_000
    lanes = [(lane.name.lower(), stats.lanes[lane]) for lane in Lane]
    messages = GaugeMetricFamily(
        "citygw_buffer_messages", "Uplink messages waiting in the buffer.", labels=["lane"]
    )
    readings = GaugeMetricFamily(
        "citygw_buffer_readings", "Readings waiting in the buffer.", labels=["lane"]
    )
    size = GaugeMetricFamily(
        "citygw_buffer_bytes", "Payload bytes waiting in the buffer.", labels=["lane"]
    )
    oldest = GaugeMetricFamily(
        "citygw_buffer_oldest_unsent_age_seconds",
        "Age of the oldest message waiting (0: none waiting).",
        labels=["lane"],
    )
    for name, ls in lanes:
        messages.add_metric([name], ls.messages)
        readings.add_metric([name], ls.points)
        size.add_metric([name], ls.bytes)
        age = 0.0 if ls.oldest_created_ms is None else max(0, now_ms - ls.oldest_created_ms) / 1000
        oldest.add_metric([name], age)
    yield from (messages, readings, size, oldest)
    yield _gauge(
        "citygw_buffer_capacity_bytes",
        "The buffer's capacity (buffer.capacity).",
        stats.capacity_bytes,
    )
    yield _gauge(
        "citygw_buffer_intake_readings",
        "Readings in the intake, not yet through the pipeline.",
        stats.intake_points,
    )
    yield _counter(
        "citygw_readings_evicted",
        "Readings evicted from the full buffer, oldest telemetry first (since it was created).",
        stats.evicted_points,
    )
    yield _counter(
        "citygw_buffer_evicted_messages",
        "Messages evicted from the full buffer (since it was created).",
        stats.evicted_messages,
    )
    yield _counter(
        "citygw_buffer_unclean_starts",
        "Starts that found the previous run had not closed the buffer (crash, power cut).",
        stats.unclean_starts,
    )
    if stats.last_sync_ms is not None:
        yield _gauge(
            "citygw_buffer_last_sync_timestamp_seconds",
            "When the buffer was last made durable against a power cut (Unix time).",
            stats.last_sync_ms / 1000,
        )


def _by_device(kind: type[_Family], name: str, help: str) -> _Family:
    return kind(name, help, labels=["device"])


def _counter(name: str, help: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help, value=value)


def _gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value)
