"""End to end, on time under load: sim -> pipeline -> buffer -> private mosquitto -> ingest.

Two parts, then one summary line.

1. Flush hold. An agent in this process, its drivers stopped, is handed batches of
   growing size and flushes each while a timer probes the event loop every 0.25 ms: the
   probe's lateness (loop lag) during the flush is how long the flush kept the loop from
   running (its GIL holds), whatever its size.

2. Ladder. For each offered rate, in increasing steps, the real agent runs as a process
   alone on core 0 (bench/probed_agent.py: `citygw run`'s code plus a loop-lag probe and
   a poll-jitter probe); the broker and the ingest (`citygw ingest`, SQLite, one file per
   worker, --ingest-workers) run on the other cores. 10 sim devices are polled every
   10 ms, each replaying pre-sampled polls (`replay`), so producing a reading costs next
   to nothing and the agent is what is measured. After a warm-up, over a fixed window:
   readings the agent delivered (broker-acknowledged) and the ingest stored per second,
   polls skipped, loop lag and poll jitter (p50/p99/max), the agent's CPU seconds per
   million readings read and its RSS. The agent sustains a rung when no poll was
   skipped, poll jitter p99 <= 1 ms (--jitter-limit-ms), nothing was refused and neither
   its memory queue nor its buffer grew by more than two flushes, and it delivered 90 % of
   the rate (bursts of a flush: 10 % of a 10 s window); else the verdict names
   what fell behind (polls skipped / jitter / agent behind). An ingest storing under 95 %
   of the rate is reported ("ingest behind": the platform side, see bench/ingest.py),
   not counted against the agent. A first rung at 1,000 readings/s gives the same run's
   floor: the machine's and the probes' own lag and jitter with next to no load.
   A rung that fails is run once more (a noisy neighbour); the ladder stops at the first
   rung that fails twice (--keep-going: runs them all). The summary is the highest rung
   the agent sustained, points_per_s the readings per second it delivered there:

    e2e: points_per_s=<N> cpu_s_per_mpoint=<X> rss_mb=<N> bytes_per_point=<X> poll_jitter_p99_ms=<X>

   If the top rung was sustained, points_per_s is a lower bound of the capacity (said so).
   On a shared machine, --agent-nice -10 (root) keeps neighbours off the agent's core.

Everything is loopback and bounded. `--quick` is a short smoke run (CI).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import parse_config  # noqa: E402
from agent.runtime import Agent, device_specs, point_meta  # noqa: E402
from buffer import Buffer  # noqa: E402
from common.broker import Mosquitto  # noqa: E402
from drivers.registry import load_driver  # noqa: E402
from native.batch import Batch  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A high-rate logger: 10 devices polled at 100 Hz (vibration/strain monitoring),
# points per device chosen to offer the step's rate.
DEVICES = 10
POLL_S = 0.01
REPLAY_POLLS = 100  # one second of pre-sampled polls per device
JITTER_P99_MAX_MS = 1.0
RATES = "50000,100000,200000,300000,400000,600000,800000,1000000,1200000,1600000,2000000"
FLUSH_SIZES = "10000,100000,300000,1000000,3000000"
PROBE_S = 0.00025  # the flush-hold probe's period
IDLE_RATE = 1000  # the baseline rung: one point a device
AGENT = ROOT / "bench" / "probed_agent.py"


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def config_text(
    gateway: str,
    broker: str,
    buffer: Path,
    rate: int,
    intake_delay: str = "10ms",
    max_memory_points: int = 1_000_000,
    flush_interval: str = "1s",
) -> str:
    points = max(1, rate // int(DEVICES / POLL_S))
    out = [
        f'[gateway]\nid = "{gateway}"\n',
        f'[uplink]\nbroker = "{broker}"\nwindow = 16\nmax_batch_points = 20000\n',
        f'[buffer]\npath = "{buffer}"\ncapacity = "512MB"\nflush_interval = "{flush_interval}"\n'
        f'intake_delay = "{intake_delay}"\nmax_memory_points = {max_memory_points}\n',
    ]
    for d in range(DEVICES):
        out.append(
            f'[[devices]]\nname = "dev-{d}"\ndriver = "sim"\npoll = "{int(POLL_S * 1000)}ms"\n'
            f"seed = {d}\nreplay = {REPLAY_POLLS}\n"
        )
        for p in range(points):
            out.append(
                f'[[devices.points]]\nname = "p{p}"\nbase = {20 + p % 50}.0\namplitude = 2.0\n'
                f'period = "{60 + p}s"\nnoise = 0.05\nresolution = 0.01\n'
                'pipeline = [{ type = "range", min = -1000.0, max = 1000.0 }]\n'
            )
    return "\n".join(out)


def quantiles(samples: array[float]) -> tuple[float, float, float]:
    """p50, p99 and max of samples in seconds, in milliseconds."""
    if not samples:
        return 0.0, 0.0, 0.0
    s = sorted(samples)
    return tuple(s[min(len(s) - 1, int(q * len(s)))] * 1e3 for q in (0.5, 0.99, 1.0))  # type: ignore[return-value]


def ms(probe: dict[str, float]) -> str:
    """A probe's p50/p99/max in milliseconds."""
    return f"{probe['p50_ms']:.2f}/{probe['p99_ms']:.2f}/{probe['max_ms']:.2f}"


# -- 1. flush hold ----------------------------------------------------------------------


def flush_holds(broker: Mosquitto, work: Path, sizes: list[int]) -> list[str]:
    """One line per flush size: its duration and the loop lag while it ran."""

    async def probe(lag: array[float], done: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not done.is_set():
            due = loop.time() + PROBE_S
            await asyncio.sleep(PROBE_S)
            lag.append(loop.time() - due)

    async def run() -> list[str]:
        biggest = max(sizes)
        buf = work / "flush-hold.db"
        # the agent's own flush every 60 s: the flushes measured are the bench's
        text = config_text("gw-flush", broker.url, buf, 100_000, "10ms", max(biggest, 1000), "60s")
        cfg = parse_config(text.replace('capacity = "512MB"', 'capacity = "2GB"'))
        agent = Agent(cfg)
        await agent.start()
        await agent.stop_drivers()
        await agent.flush()
        await agent.drain(30)
        devices = [[p.id for p in dev.points] for drv in agent.drivers for dev in drv.devices]
        lines = []
        for size in sizes:
            ts, k, pushed = time.time_ns() // 1_000_000 - 60_000, 0, 0
            while pushed < size:
                ids = devices[k % len(devices)]
                values = [20.0 + ((k + i) % 97) * 0.01 for i in range(len(ids))]
                assert agent.queue.push(Batch.at(ts + k // len(devices), ids, values))
                k, pushed = k + 1, pushed + len(ids)
            agent.queue.take_unsaved()  # the flush alone: no intake commit of the fill
            lag: array[float] = array("d")
            done = asyncio.Event()
            task = asyncio.create_task(probe(lag, done))
            await asyncio.sleep(0.01)
            del lag[:]
            t0 = time.perf_counter()
            n = await agent.flush()
            took = time.perf_counter() - t0
            done.set()
            await task
            if n != pushed:
                raise RuntimeError(f"flush hold: {n} of {pushed} readings flushed (run again)")
            p50, p99, worst = quantiles(lag)
            lines.append(
                f"flush hold: readings={n:>8} flush_ms={took * 1e3:7.1f} "
                f"loop_lag_ms p50={p50:.2f} p99={p99:.2f} max={worst:.2f}"
            )
            await agent.drain(120)
        await agent.stop()
        return lines

    from common import timers  # the loop `citygw run` uses

    # the in-process agent's warnings (aiomqtt's, while it sends a big backlog) are not
    # the benchmark's output
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("mqtt").setLevel(logging.ERROR)
    return timers.run(run())


# -- 2. ladder --------------------------------------------------------------------------


@dataclass
class Rung:
    offered: int
    stored_per_s: float
    published_per_s: float  # acknowledged by the broker (in bursts: one flush at a time)
    cpu_s_per_mpoint: float
    rss_mb: float
    bytes_per_point: float
    buffer_growth: int  # readings waiting in the agent's buffer: end - start of the window
    memory_growth: int  # readings read but not yet through a flush: end - start
    refused: int
    skipped_polls: int
    lag: dict[str, float]
    jitter: dict[str, float]
    jitter_limit_ms: float = JITTER_P99_MAX_MS

    def problems(self) -> list[str]:
        """What of the agent fell behind, most direct first; empty: the agent sustained
        the rung (the ingest's part is `ingest_behind`)."""
        out = []
        if self.skipped_polls:
            out.append(f"polls skipped ({self.skipped_polls})")
        if self.jitter["p99_ms"] > self.jitter_limit_ms:
            out.append(f"poll jitter p99 {self.jitter['p99_ms']:.2f} ms > {self.jitter_limit_ms}")
        # a flush moves a second's readings at once and the uplink sends them in bursts:
        # the queue and the buffer swing by a flush or so (taken at any moment), and what
        # was delivered over the window by one flush (10 %)
        grew = max(self.buffer_growth, self.memory_growth) > 2 * self.offered
        if self.refused or grew or self.published_per_s < 0.9 * self.offered:
            out.append(
                f"agent behind (refused {self.refused}, memory grew {self.memory_growth}, "
                f"buffer grew {self.buffer_growth}, delivered/s {self.published_per_s:.0f})"
            )
        return out

    @property
    def ingest_behind(self) -> bool:
        """The platform side, not the agent: the ingest stored under 95 % of the rate."""
        return self.stored_per_s < 0.95 * self.offered

    def line(self) -> str:
        verdict = "; ".join(self.problems()) or "ok"
        if self.ingest_behind:
            verdict += "; ingest behind"
        return (
            f"offered={self.offered:>7} published/s={self.published_per_s:>8.0f} "
            f"stored/s={self.stored_per_s:>8.0f} "
            f"skipped={self.skipped_polls} "
            f"lag_ms={ms(self.lag)} jitter_ms={ms(self.jitter)} "
            f"cpu_s/Mpt={self.cpu_s_per_mpoint:5.2f} rss_mb={self.rss_mb:4.0f} "
            f"B/pt={self.bytes_per_point:4.2f} {verdict}"
        )


def stored(dbs: list[Path], gateway: str) -> int:
    """Readings of ``gateway`` the ingest workers stored (each worker its own SQLite file)."""
    total = 0
    for db in dbs:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute(
                "SELECT COALESCE(SUM(n_points), 0) FROM uplinks WHERE gateway = ?", (gateway,)
            ).fetchone()
        total += int(row[0])
    return total


def stored_after_delivery(dbs: list[Path], gateway: str, timeout: float = 5.0) -> tuple[int, float]:
    """The stored count and the time, taken right after a flush's batches landed:
    ingest stores a second's readings at once, so a snapshot at an arbitrary moment
    would be off by up to one flush."""
    before = stored(dbs, gateway)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = stored(dbs, gateway)
        if now != before:
            return now, time.monotonic()
        time.sleep(0.01)
    return before, time.monotonic()


def buffered(path: Path) -> tuple[int, dict[str, Any]]:
    with Buffer.open_readonly(path) as buf:
        stats, state = buf.stats(), buf.get_state()
    return sum(s.points for s in stats.lanes.values()), state.get("agent") or {}


def wait_for(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except (OSError, ValueError, KeyError, sqlite3.Error, BufferError):
            pass  # not there yet (a file missing or half written, a schema in creation)
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout:g} s")


def probe_window(agent: subprocess.Popen[bytes], stats: Path, window: int) -> dict[str, Any]:
    """Ends the probes' current window (SIGUSR1) and returns what they saw in it."""
    agent.send_signal(signal.SIGUSR1)

    def read() -> dict[str, Any] | None:
        data: dict[str, Any] = json.loads(stats.read_text())
        return data if data["window"] == window else None

    stats_now: dict[str, Any] = wait_for("probe stats", read, 10)
    return stats_now


def run_rung(
    rate: int, attempt: int, broker: Mosquitto, ingest_dbs: list[Path], work: Path, args: Any
) -> Rung:
    gateway = f"gw-bench-{rate}-{attempt}"
    cfg, buf, stats = (work / f"{gateway}.{ext}" for ext in ("toml", "db", "json"))
    # room for 3 s of readings: a flush (1 s apart, plus its own time) never meets the bound
    memory = max(1_000_000, 3 * rate)
    cfg.write_text(config_text(gateway, broker.url, buf, rate, args.intake_delay, memory))
    with (work / f"{gateway}.log").open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, str(AGENT), str(cfg), str(stats)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        os.sched_setaffinity(agent.pid, {0})
        if args.agent_nice:
            os.setpriority(os.PRIO_PROCESS, agent.pid, args.agent_nice)

        def started() -> bool:
            if agent.poll() is not None:
                raise RuntimeError(f"the agent exited ({agent.returncode}): see {work}")
            return bool(buffered(buf)[1].get("pid") == agent.pid)

        wait_for("agent start", started, 120)
        time.sleep(args.warmup)
        first = probe_window(agent, stats, 1)  # the warm-up's probes: dropped
        s0, t0 = stored_after_delivery(ingest_dbs, gateway)
        c0, (b0, _) = proc_cpu_s(agent.pid), buffered(buf)
        time.sleep(args.window)
        probes = probe_window(agent, stats, 2)
        s1, t1 = stored_after_delivery(ingest_dbs, gateway)
        c1, (b1, _) = proc_cpu_s(agent.pid), buffered(buf)
        rss = proc_rss_mb(agent.pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    n = s1 - s0
    counters0, counters1 = first["counters"], probes["counters"]
    seconds = probes["loop_time"] - first["loop_time"]
    published = probes["published_points"] - first["published_points"]
    read = counters1["read"] - counters0["read"]
    return Rung(
        offered=rate,
        stored_per_s=n / (t1 - t0),
        published_per_s=published / seconds,
        cpu_s_per_mpoint=(c1 - c0) / (read / 1e6) if read else float("inf"),
        rss_mb=rss,
        bytes_per_point=(probes["published_bytes"] - first["published_bytes"]) / published
        if published
        else 0.0,
        buffer_growth=b1 - b0,
        memory_growth=(counters1["read"] - counters1["sent"])
        - (counters0["read"] - counters0["sent"]),
        refused=counters1["refused"] - counters0["refused"],
        skipped_polls=probes["skipped_polls"] - first["skipped_polls"],
        lag=probes["loop_lag"],
        jitter=probes["poll_jitter"],
        jitter_limit_ms=args.jitter_limit_ms,
    )


def sim_baseline(rate: int, seconds: float = 2.0) -> float:
    """CPU seconds per million readings of the sim driver alone into a sink that
    only counts: what producing the readings costs, before the agent does anything."""

    class CountingSink:
        n = 0

        def push(self, batch: Batch) -> bool:
            self.n += len(batch)
            return True

    async def run() -> tuple[int, float]:
        work = Path(tempfile.mkdtemp(prefix="citygw-bench-base-"))
        cfg = parse_config(config_text("gw-base", "mqtt://127.0.0.1:9", work / "b.db", rate))
        with Buffer(cfg.buffer.path, cfg.buffer.capacity) as buf:
            ids = buf.registry.ensure(point_meta(cfg))
        drivers = [load_driver(name)(devs) for name, devs in device_specs(cfg, ids).items()]
        sink = CountingSink()
        tasks = [asyncio.create_task(d.run(sink)) for d in drivers]
        await asyncio.sleep(0.5)  # the replayed polls sampled
        n0, c0 = sink.n, time.process_time()
        await asyncio.sleep(seconds)
        cpu = time.process_time() - c0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return sink.n - n0, cpu

    n, cpu = asyncio.run(run())
    return cpu / (n / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default=RATES, help="the ladder's offered rates (readings/s)")
    ap.add_argument("--flush-sizes", default=FLUSH_SIZES, help="readings per flush-hold flush")
    ap.add_argument("--warmup", type=float, default=6.0)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument("--retries", type=int, default=1, help="runs more of a rung that fails")
    ap.add_argument(
        "--intake-delay",
        default="10ms",
        help="the agent's buffer.intake_delay; longer than the 1 s flush interval (10s): "
        "no intake commit at all, the agent as it was before the intake",
    )
    ap.add_argument(
        "--jitter-limit-ms",
        type=float,
        default=JITTER_P99_MAX_MS,
        help="the poll jitter p99 a sustained rung may have (the target: 1 ms)",
    )
    ap.add_argument(
        "--keep-going",
        action="store_true",
        help="run every rung, past the first that fails (the trend on a noisy machine)",
    )
    ap.add_argument(
        "--ingest-workers",
        type=int,
        default=1,
        help="ingest processes (one SQLite file each, one shared subscription): enough that "
        "the platform side keeps up with the rungs",
    )
    ap.add_argument(
        "--agent-nice",
        type=int,
        default=0,
        help="the agent's nice value (below 0 needs root): on a shared machine, keeps "
        "other processes from taking its core in the middle of a poll",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run (CI): two low rungs, short windows, small flushes",
    )
    args = ap.parse_args()
    if args.quick:
        args.rates, args.flush_sizes = "20000,50000", "10000,100000"
        args.warmup, args.window, args.retries = 2.0, 3.0, 0
    rates = [int(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="citygw-bench-"))
    ingest_dbs = [work / f"platform-{k}.db" for k in range(args.ingest_workers)]
    # the agent gets core 0 to itself; the broker and the ingest (started from here,
    # inheriting this) the others
    others = set(range(1, os.cpu_count() or 1))
    best: Rung | None = None
    stopped_by: Rung | None = None
    ingest_short: list[Rung] = []
    if others:
        os.sched_setaffinity(0, others)
    with Mosquitto(workdir=work) as broker:
        if others:
            os.sched_setaffinity(0, {0})  # the flush-hold agent runs here, where the agent runs
        for line in flush_holds(broker, work, [int(s) for s in args.flush_sizes.split(",")]):
            print(line, flush=True)
        if others:
            os.sched_setaffinity(0, others)
        ingest = [sys.executable, "-m", "cli", "ingest", "--broker", broker.url, "--group", "bench"]
        ingests = [
            subprocess.Popen(
                [*ingest, "--db", f"sqlite:///{db}"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=(work / f"{db.stem}.log").open("wb"),
            )
            for db in ingest_dbs
        ]
        try:
            wait_for("ingest start", lambda: all(db.exists() for db in ingest_dbs), 30)
            time.sleep(1.0)
            # the floor: what the machine and the probes give with next to no load
            idle = run_rung(IDLE_RATE, 0, broker, ingest_dbs, work, args)
            print(
                f"baseline (same run): at {IDLE_RATE} readings/s "
                f"lag_ms={ms(idle.lag)} jitter_ms={ms(idle.jitter)} (p50/p99/max)",
                flush=True,
            )
            for rate in rates:
                for attempt in range(1 + args.retries):
                    rung = run_rung(rate, attempt, broker, ingest_dbs, work, args)
                    print(rung.line(), flush=True)
                    if not rung.problems():
                        break
                if not rung.problems():
                    best = rung
                    if rung.ingest_behind:
                        ingest_short.append(rung)
                elif stopped_by is None:
                    stopped_by = rung
                if stopped_by is not None and not args.keep_going:
                    break
        finally:
            for proc in ingests:
                proc.terminate()
                proc.wait(timeout=30)
    summarize(best, stopped_by, ingest_short, rates, args.ingest_workers)


def summarize(
    best: Rung | None,
    stopped_by: Rung | None,
    ingest_short: list[Rung],
    rates: list[int],
    ingest_workers: int,
) -> None:
    base = sim_baseline(best.offered if best else rates[0])
    raw = 21  # bytes of one reading as raw columns: u32 id + i64 ts + f64 value + u8 quality
    print(
        f"baseline (same run): sim driver alone (replaying) cpu_s_per_mpoint={base:.3f}; "
        f"raw columns {raw} B/reading"
    )
    if best is None:
        print(
            "e2e: points_per_s=0 cpu_s_per_mpoint=0.00 rss_mb=0 bytes_per_point=0.00 "
            "poll_jitter_p99_ms=0.00"
        )
        return
    print(
        f"ratios: agent cpu / sim alone = {best.cpu_s_per_mpoint / base:.1f}x; "
        f"uplink bytes / raw = {best.bytes_per_point / raw:.3f}"
    )
    if stopped_by is None:
        print(
            f"capacity: at least {best.offered} readings/s (the ladder's top was sustained: "
            "a lower bound; add rungs with --rates)"
        )
    else:
        print(
            f"capacity: {best.offered} readings/s sustained; first failed at "
            f"{stopped_by.offered}: {'; '.join(stopped_by.problems())}"
        )
    if ingest_short:
        print(
            f"ingest: {ingest_workers} worker(s) stored under 95 % of the rate from "
            f"{ingest_short[0].offered} readings/s (the platform side, not the agent: "
            "--ingest-workers, bench/ingest.py)"
        )
    print(
        f"e2e: points_per_s={best.published_per_s:.0f} "
        f"cpu_s_per_mpoint={best.cpu_s_per_mpoint:.2f} "
        f"rss_mb={best.rss_mb:.0f} bytes_per_point={best.bytes_per_point:.2f} "
        f"poll_jitter_p99_ms={best.jitter['p99_ms']:.2f}"
    )


if __name__ == "__main__":
    main()
