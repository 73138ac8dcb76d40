"""An ingest worker's Prometheus metrics (`citygw ingest --metrics-port`).

Read from the worker's counters when scraped; only the store latency histogram is fed as
things happen (per store call). Labels are bounded: `reason` is one of REJECT_REASONS (the
worker's own words, never the payload's), `kind` one of STORE_KINDS. Each worker has its
own registry and port: several workers on one host need one port each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from central.worker import UNSTORABLE, IngestWorker
from common.metrics_http import start_metrics_server

log = logging.getLogger("citygw.metrics")

#: every reason `IngestWorker._check` and `_unstorable` give a dead letter (a test reads
#: the worker's source to keep this complete); shown at 0 before the first one
REJECT_REASONS = (
    "topic",
    "payload",
    "meta",
    "meta_gateway",
    "stats",
    "gateway",
    "state",
    "version",
    "envelope",
    "lane",
    "alarm",
    "codec",
    "seq",
    "n_points",
    UNSTORABLE,
)
#: the store calls the worker makes (`IngestWorker._call`'s `what`, spaces as "_")
STORE_KINDS = ("uplinks", "meta", "stats", "state", "dead_letters")


class IngestMetrics:
    """One worker's registry and store latency histogram, hooked into the worker."""

    def __init__(self, worker: IngestWorker) -> None:
        self.registry = CollectorRegistry()
        self.store_latency = Histogram(
            "citygw_ingest_store_latency_seconds",
            "Time a successful store call took (one transaction), by what it stored.",
            labelnames=["kind"],
            registry=self.registry,
        )
        for kind in STORE_KINDS:  # every series from the start, at 0
            self.store_latency.labels(kind)
        worker.observe_store = self.observe_store
        self.registry.register(IngestCollector(worker))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def observe_store(self, what: str, seconds: float) -> None:
        self.store_latency.labels(what.replace(" ", "_")).observe(seconds)


class IngestCollector(Collector):
    def __init__(self, worker: IngestWorker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | InfoMetricFamily]:
        w = self.worker
        c = w.counters
        info = InfoMetricFamily("citygw_ingest", "The worker's subscription.")
        info.add_metric([], {"group": w.group or "", "prefix": w.prefix})
        yield info
        yield GaugeMetricFamily(
            "citygw_ingest_connected",
            "1 while subscribed at the broker, else 0.",
            value=1 if w.connected.is_set() else 0,
        )
        for name, help, value in (
            ("messages", "Messages received (all topics).", c.messages),
            ("readings_stored", "Readings stored.", c.readings_stored),
            ("batches_stored", "Uplink messages (batches and alarms) stored.", c.batches_stored),
            ("alarms_stored", "Alarm events stored.", c.alarms_stored),
            ("actions_stored", "Local rule actions stored (alarm lane).", c.actions_stored),
            (
                "duplicate_batches",
                "Uplink messages dropped as already stored (a resend after a reconnect).",
                c.duplicates_dropped,
            ),
            ("metas_stored", "Gateway metas stored.", c.metas_stored),
            ("states_stored", "Gateway online/offline states stored.", c.states_stored),
            (
                "retained_cleared",
                "Empty retained messages (a gateway retired).",
                c.retained_cleared,
            ),
            ("dead_letters_stored", "Dead letters kept in the store.", c.dead_letters_stored),
            (
                "dead_letters_lost",
                "Dead letters the store refused too (logged).",
                c.dead_letters_lost,
            ),
            ("store_errors", "Failed store calls (retried, or dead-lettered).", c.store_errors),
            ("blocks_rolled_up", "Stored blocks folded into the rollup.", c.blocks_rolled_up),
            ("roll_up_errors", "Failed roll-up calls (retried).", c.roll_up_errors),
            ("connects", "Broker sessions established.", c.connects),
        ):
            yield CounterMetricFamily(f"citygw_ingest_{name}", help, value=value)
        rejected = dict(c.rejected)  # copied whole: the decoding thread adds to it
        dead = CounterMetricFamily(
            "citygw_ingest_dead_letters",
            "Messages rejected and kept as dead letters, by reason.",
            labels=["reason"],
        )
        for reason in (*REJECT_REASONS, *sorted(set(rejected) - set(REJECT_REASONS))):
            dead.add_metric([reason], rejected.get(reason, 0))
        yield dead


async def serve_ingest_metrics(
    worker: IngestWorker, address: str, port: int
) -> asyncio.Server | None:
    """The worker's endpoint at http://address:port/metrics; None (logged) when the port
    cannot be bound: the worker stores on without metrics."""
    metrics = IngestMetrics(worker)
    try:
        server = await start_metrics_server(metrics.registry, address, port)
    except OSError as exc:
        log.error(
            "ingest: metrics endpoint not served (another worker on this host holds the "
            "port? give each its own --metrics-port)",
            extra={"address": address, "port": port, "error": exc.strerror or str(exc)},
        )
        return None
    log.info("ingest: metrics endpoint served", extra={"url": f"http://{address}:{port}/metrics"})
    return server
