"""The agent's footprint at street rates: idle CPU, CPU per reading, RSS.

The real agent (`citygw run`, a subprocess: its CPU and memory are its own) with sim
devices, its uplink connected to a private mosquitto, and its Prometheus endpoint on
and scraped every 15 s like a Prometheus would, when the config has a `[metrics]`
section. Three runs, one after the other:

- idle: the agent's own cost when nothing is read. The 1,000-point street config
  (100 devices x 10 points) with every device polled once a day, named so that no poll
  falls in the run: what is left is the uplink (keepalive, up/stats every minute), the
  flusher, the status snapshot with its sync point and checkpoint, the metrics scrapes;
- street-1s: 200 points polled every second (20 devices x 10 points), 200 readings/s;
- street-10s: 1,000 points polled every 10 s (100 devices x 10 points), 100 readings/s.

Every point is a sim waveform (sine + noise, quantised) through a range stage; buffer
and uplink keep their defaults (flush every 1 s, intake 10 ms, sync=normal). Each run
warms up, then measures from one of the agent's status snapshots (written every 5 s)
to a later one, so the readings counted (the snapshots' `read`) and the agent's CPU
time (/proc/<pid>/stat utime + stime, all its threads) cover the same window.

Last line (targets of issue 15: idle <= 0.5 % of a core, <= 0.02 CPU-s per 1000
readings, RSS <= 40 MB):

    footprint: idle_cpu_pct=<X.XX> cpu_s_per_kpoint=<X.XXXX> rss_mb=<N>

idle_cpu_pct: % of one core in the idle run. cpu_s_per_kpoint: the worse street run's
CPU-seconds per 1000 readings, all of the agent's CPU counted (its idle cost too).
rss_mb: the agent's peak RSS (VmHWM), the highest of the three runs. Before it, a
same-run baseline per street run: the sim devices alone (no agent) polled into a sink
that only counts, in CPU-s per 1000 readings, the part of the figure that is the
simulated devices' and would be a real driver's on a gateway.

Full runs: 10 minutes each after a 30 s warm-up (about 35 minutes in all). `--quick` (CI):
15 s windows after a 5 s warm-up, about 80 s; its numbers are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import Config, parse_config  # noqa: E402
from agent.runtime import device_specs  # noqa: E402
from bench.e2e import proc_cpu_s  # noqa: E402
from common.broker import Mosquitto, free_port  # noqa: E402
from drivers.registry import load_driver  # noqa: E402
from drivers.schedule import phase_for  # noqa: E402
from native.batch import Batch  # noqa: E402

POINTS_PER_DEVICE = 10
DAY_S = 86_400.0
SCRAPE_INTERVAL_S = 15.0
SNAPSHOT_INTERVAL_S = 5.0  # agent.runtime.STATUS_INTERVAL_S: the window's grain
#: the metrics endpoint exists (issue 15's [metrics]) in this checkout's config
METRICS = "metrics" in Config.model_fields


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: int
    poll: str  # as the config writes it
    what: str


IDLE = Scenario("idle", 100, "24h", "1,000 points configured, none polled in the run")
STREET = (
    Scenario("street-1s", 20, "1s", "200 points polled every 1 s"),
    Scenario("street-10s", 100, "10s", "1,000 points polled every 10 s"),
)


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    window_s: float
    cpu_s: float
    readings: int
    skipped_polls: int
    rss_peak_mb: float
    scrapes: int
    scrape_failures: int

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_s / self.window_s

    @property
    def cpu_s_per_kpoint(self) -> float:
        return self.cpu_s / (self.readings / 1000) if self.readings else float("inf")


def device_names(n: int, quiet_s: float) -> list[str]:
    """`n` device names whose first once-a-day poll comes more than `quiet_s` after the
    start (drivers/schedule.py phases a device's polls by its name)."""
    names = (f"cab-{i:03d}" for i in itertools.count())
    return list(itertools.islice((nm for nm in names if phase_for(nm, DAY_S) > quiet_s), n))


def config_text(
    sc: Scenario, broker: str, buffer: Path, metrics_port: int | None, quiet_s: float
) -> str:
    out = [
        f'[gateway]\nid = "gw-{sc.name}"\n',
        f'[uplink]\nbroker = "{broker}"\n',
        f'[buffer]\npath = "{buffer}"\n',
    ]
    if metrics_port is not None:
        out.append(f'[metrics]\nenabled = true\naddress = "127.0.0.1"\nport = {metrics_port}\n')
    for seed, name in enumerate(device_names(sc.devices, quiet_s)):
        out.append(
            f'[[devices]]\nname = "{name}"\ndriver = "sim"\npoll = "{sc.poll}"\nseed = {seed}\n'
        )
        for p in range(POINTS_PER_DEVICE):
            out.append(
                f'[[devices.points]]\nname = "p{p}"\nbase = {20 + p}.0\namplitude = 2.0\n'
                f'period = "{600 + 60 * p}s"\nnoise = 0.05\nresolution = 0.01\n'
                'pipeline = [{ type = "range", min = -100.0, max = 100.0 }]\n'
            )
    return "\n".join(out)


def snapshot(buffer: Path) -> dict | None:
    """The agent's last status snapshot (agent/runtime.py `snapshot`), None before the first."""
    try:
        with sqlite3.connect(f"file:{buffer}?mode=ro", uri=True, timeout=5) as conn:
            row = conn.execute("SELECT value FROM state WHERE key = 'agent'").fetchone()
    except sqlite3.OperationalError:  # the database or its table is not there yet
        return None
    return orjson.loads(row[0]) if row else None


def skipped(snap: dict) -> int:
    return sum(int(h.get("skipped_polls", 0)) for h in snap["devices"].values())


def proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"/proc/{pid}/status has no {field}")


class Scraper(threading.Thread):
    """GETs the agent's /metrics every SCRAPE_INTERVAL_S, as a Prometheus would."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.done = threading.Event()
        self.scrapes = 0
        self.failures = 0

    def run(self) -> None:
        while not self.done.wait(SCRAPE_INTERVAL_S):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    resp.read()
                self.scrapes += 1
            except OSError:
                self.failures += 1


class AgentRun:
    """One `citygw run` subprocess of a scenario."""

    def __init__(self, sc: Scenario, broker: str, work: Path, quiet_s: float) -> None:
        self.sc = sc
        self.buffer = work / f"{sc.name}.db"
        self.log = work / f"{sc.name}.log"
        port = free_port() if METRICS else None
        cfg = work / f"{sc.name}.toml"
        cfg.write_text(config_text(sc, broker, self.buffer, port, quiet_s))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli", "run", "-c", str(cfg), "--log-level", "WARNING"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.scraper = Scraper(f"http://127.0.0.1:{port}/metrics") if port else None
        if self.scraper is not None:
            self.scraper.start()

    def next_snapshot(self, after_ms: int, timeout: float) -> tuple[dict, float]:
        """The first snapshot written after `after_ms`, and the agent's CPU seconds
        right then (polled every 20 ms: the CPU read is at most that late)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.sc.name}: the agent exited: {self.log_tail()}")
            snap = snapshot(self.buffer)
            if snap is not None and snap["updated_ms"] > after_ms:
                return snap, proc_cpu_s(self.proc.pid)
            time.sleep(0.02)
        raise SystemExit(f"{self.sc.name}: no status snapshot within {timeout:g} s")

    def measure(self, warmup: float, window: float) -> Result:
        """From the first snapshot after the warm-up to the first one at least the
        window later (less half a snapshot interval: the window is the nearest multiple)."""
        time.sleep(warmup)
        grace = 10 * SNAPSHOT_INTERVAL_S  # a snapshot is due every 5 s; a busy machine
        last = snapshot(self.buffer)
        s0, c0 = self.next_snapshot(last["updated_ms"] if last else 0, grace)
        time.sleep(max(0.0, window - SNAPSHOT_INTERVAL_S))  # not polling all the while
        end_ms = s0["updated_ms"] + int((window - SNAPSHOT_INTERVAL_S / 2) * 1000)
        s1, c1 = self.next_snapshot(end_ms, grace)
        scraper = self.scraper
        return Result(
            scenario=self.sc,
            window_s=(s1["updated_ms"] - s0["updated_ms"]) / 1000,
            cpu_s=c1 - c0,
            readings=s1["counters"]["read"] - s0["counters"]["read"],
            skipped_polls=skipped(s1) - skipped(s0),
            rss_peak_mb=proc_status_mb(self.proc.pid, "VmHWM"),
            scrapes=scraper.scrapes if scraper else 0,
            scrape_failures=scraper.failures if scraper else 0,
        )

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.scraper is not None:
            self.scraper.done.set()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run(sc: Scenario, broker: str, work: Path, warmup: float, window: float) -> Result:
    agent = AgentRun(sc, broker, work, quiet_s=warmup + window + 120)
    try:
        result = agent.measure(warmup, window)
    finally:
        agent.stop()
    print(
        f"{sc.name:<10} {sc.what}: window {result.window_s:.0f} s, "
        f"cpu {result.cpu_s:.2f} s = {result.cpu_pct:.2f} % of a core, "
        f"readings {result.readings} ({result.readings / result.window_s:.0f}/s), "
        f"cpu_s_per_kpoint {result.cpu_s_per_kpoint:.4f}, skipped polls "
        f"{result.skipped_polls}, peak rss {result.rss_peak_mb:.1f} MB"
        + (f", scrapes {result.scrapes} ({result.scrape_failures} failed)" if METRICS else ""),
        flush=True,
    )
    return result


def sim_alone(sc: Scenario, seconds: float) -> float:
    """CPU-s per 1000 readings of the scenario's sim devices alone, in this process, polled
    into a sink that only counts: what the simulated devices themselves cost (a wakeup
    per poll and the waveforms), before the agent does anything with their readings."""

    class CountingSink:
        n = 0

        def push(self, batch: Batch) -> bool:
            self.n += len(batch)
            return True

    async def run() -> tuple[int, float]:
        cfg = parse_config(config_text(sc, "mqtt://127.0.0.1:9", Path("unused.db"), None, 0))
        keys = [f"{d.name}/{p.name}" for d in cfg.devices for p in d.points]
        specs = device_specs(cfg, {key: i for i, key in enumerate(keys)})
        sink = CountingSink()
        tasks = [asyncio.create_task(load_driver(n)(devs).run(sink)) for n, devs in specs.items()]
        await asyncio.sleep(2.0)  # every device polled once at least (10 s: most of them)
        n0, c0 = sink.n, time.process_time()
        await asyncio.sleep(seconds)
        n, cpu = sink.n - n0, time.process_time() - c0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return n, cpu

    n, cpu = asyncio.run(run())
    return cpu / (n / 1000) if n else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI smoke run: 5 s warm-up, 15 s windows")
    ap.add_argument("--warmup", type=float, help="seconds before each window (default 30)")
    ap.add_argument("--window", type=float, help="seconds measured per run (default 600)")
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else (5.0 if args.quick else 30.0)
    window = args.window if args.window is not None else (15.0 if args.quick else 600.0)
    print(
        f"agent footprint: {window:g} s windows after {warmup:g} s warm-up; metrics "
        + (f"on, scraped every {SCRAPE_INTERVAL_S:g} s" if METRICS else "off (no [metrics] yet)"),
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="citygw-footprint-") as tmp, Mosquitto() as broker:
        work = Path(tmp)
        idle = run(IDLE, broker.url, work, warmup, window)
        street = [run(sc, broker.url, work, warmup, window) for sc in STREET]
    if idle.readings:
        print(f"warning: the idle run read {idle.readings} readings", flush=True)
    for r in street:
        base = sim_alone(r.scenario, min(window / 3, 60.0))
        print(
            f"baseline (same run): {r.scenario.name} sim devices alone, no agent: "
            f"cpu_s_per_kpoint {base:.4f} ({100 * base / r.cpu_s_per_kpoint:.0f} % of the "
            "agent's)",
            flush=True,
        )
    worst = max(street, key=lambda r: r.cpu_s_per_kpoint)
    rss = max(r.rss_peak_mb for r in (idle, *street))
    print(
        f"footprint: idle_cpu_pct={idle.cpu_pct:.2f} "
        f"cpu_s_per_kpoint={worst.cpu_s_per_kpoint:.4f} rss_mb={rss:.0f}"
    )


if __name__ == "__main__":
    main()
