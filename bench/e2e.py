"""End-to-end throughput: sim -> pipeline -> buffer -> private mosquitto -> ingest.

The real agent (`citygw run`) runs as a subprocess pinned to one core; the ingest
(`citygw ingest`, SQLite store) runs as another process. For each offered rate,
in increasing steps, the benchmark warms up, then measures over a fixed window:
readings stored by ingest per second, the agent's CPU seconds per million
readings and its RSS. A step counts as sustained when the agent refused no poll
and its buffer did not grow over the window. The last line reports the highest
sustained step:

    e2e: points_per_s=<N> cpu_s_per_mpoint=<X.XX> rss_mb=<N> bytes_per_point=<X.XX>

Everything is loopback and bounded: at most len(RATES) steps of WARMUP+WINDOW s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import parse_config  # noqa: E402
from agent.runtime import device_specs, point_meta  # noqa: E402
from buffer import Buffer  # noqa: E402
from common.broker import Mosquitto  # noqa: E402
from drivers.registry import load_driver  # noqa: E402
from native.batch import Batch  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
# A high-rate logger: 10 devices polled at 100 Hz (vibration/strain monitoring),
# points per device chosen to offer the step's rate.
DEVICES = 10
POLL_S = 0.01


@dataclass
class Step:
    offered: int
    points_per_s: float
    cpu_s_per_mpoint: float
    rss_mb: float
    bytes_per_point: float
    buffer_growth: int
    refused: int
    skipped_polls: int

    @property
    def sustained(self) -> bool:
        """Kept up: every poll on time, nothing refused, the buffer not growing by
        more than one flush, and the platform storing (nearly) the offered rate."""
        return (
            self.refused == 0
            and self.skipped_polls == 0
            and self.buffer_growth <= self.offered
            and self.points_per_s >= 0.95 * self.offered
        )


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def config_text(
    gateway: str, broker: str, buffer: Path, rate: int, intake_delay: str = "10ms"
) -> str:
    points = max(1, rate // int(DEVICES / POLL_S))
    out = [
        f'[gateway]\nid = "{gateway}"\n',
        f'[uplink]\nbroker = "{broker}"\nwindow = 16\nmax_batch_points = 20000\n',
        f'[buffer]\npath = "{buffer}"\ncapacity = "512MB"\nflush_interval = "1s"\n'
        f'intake_delay = "{intake_delay}"\nmax_memory_points = 1000000\n',
    ]
    for d in range(DEVICES):
        out.append(
            f'[[devices]]\nname = "dev-{d}"\ndriver = "sim"\npoll = "{int(POLL_S * 1000)}ms"\n'
            f"seed = {d}\n"
        )
        for p in range(points):
            out.append(
                f'[[devices.points]]\nname = "p{p}"\nbase = {20 + p % 50}.0\namplitude = 2.0\n'
                f'period = "{60 + p}s"\nnoise = 0.05\nresolution = 0.01\n'
                'pipeline = [{ type = "range", min = -1000.0, max = 1000.0 }]\n'
            )
    return "\n".join(out)


def stored(db: Path, gateway: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT COALESCE(SUM(n_points), 0) FROM uplinks WHERE gateway = ?", (gateway,)
        ).fetchone()
    return int(row[0])


def stored_after_delivery(db: Path, gateway: str, timeout: float = 5.0) -> tuple[int, float]:
    """The stored count and the time, taken right after a flush's batches landed:
    ingest stores a second's readings at once, so a snapshot at an arbitrary moment
    would be off by up to one flush."""
    before = stored(db, gateway)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = stored(db, gateway)
        if now != before:
            return now, time.monotonic()
        time.sleep(0.01)
    return before, time.monotonic()


def buffered(path: Path) -> tuple[int, dict]:
    with Buffer.open_readonly(path) as buf:
        stats, state = buf.stats(), buf.get_state()
    return sum(s.points for s in stats.lanes.values()), state.get("agent") or {}


def skipped(state: dict) -> int:
    return sum(int(h.get("skipped_polls", 0)) for h in (state.get("devices") or {}).values())


def run_step(
    rate: int,
    broker: Mosquitto,
    ingest_db: Path,
    work: Path,
    warmup: float,
    window: float,
    intake_delay: str,
) -> Step:
    gateway = f"gw-bench-{rate}"
    cfg = work / f"{gateway}.toml"
    buf = work / f"{gateway}.db"
    cfg.write_text(config_text(gateway, broker.url, buf, rate, intake_delay))
    with (work / f"{gateway}.log").open("wb") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "cli", "run", "-c", str(cfg), "--log-level", "WARNING"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        os.sched_setaffinity(agent.pid, {0})
        time.sleep(warmup)
        s0, t0 = stored_after_delivery(ingest_db, gateway)
        c0, (b0, st0) = proc_cpu_s(agent.pid), buffered(buf)
        time.sleep(window)
        s1, t1 = stored_after_delivery(ingest_db, gateway)
        c1, (b1, st1) = proc_cpu_s(agent.pid), buffered(buf)
        rss = proc_rss_mb(agent.pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
    n = s1 - s0

    def delta(section: str, key: str) -> int:
        return int((st1.get(section) or {}).get(key, 0)) - int((st0.get(section) or {}).get(key, 0))

    published = delta("uplink", "published_points")
    return Step(
        offered=rate,
        points_per_s=n / (t1 - t0),
        cpu_s_per_mpoint=(c1 - c0) / (n / 1e6) if n else float("inf"),
        rss_mb=rss,
        bytes_per_point=delta("uplink", "published_bytes") / published if published else 0.0,
        buffer_growth=b1 - b0,
        refused=(st1.get("counters") or {}).get("refused", 0),
        skipped_polls=skipped(st1) - skipped(st0),
    )


def sim_baseline(rate: int, seconds: float = 3.0) -> float:
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
        c0 = time.process_time()
        await asyncio.sleep(seconds)
        cpu = time.process_time() - c0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return sink.n, cpu

    n, cpu = asyncio.run(run())
    return cpu / (n / 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="25000,50000,100000,150000,200000")
    ap.add_argument("--warmup", type=float, default=6.0)
    ap.add_argument("--window", type=float, default=10.0)
    ap.add_argument(
        "--intake-delay",
        default="10ms",
        help="the agent's buffer.intake_delay; longer than the 1 s flush interval (10s): "
        "no intake commit at all, the agent as it was before the intake",
    )
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="citygw-bench-"))
    ingest_db = work / "platform.db"
    with Mosquitto(workdir=work) as broker, (work / "ingest.log").open("wb") as ingest_log:
        ingest = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "ingest",
                "--broker",
                broker.url,
                "--db",
                f"sqlite:///{ingest_db}",
                "--group",
                "bench",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=ingest_log,
        )
        try:
            os.sched_setaffinity(ingest.pid, {1 % os.cpu_count()})  # type: ignore[operator]
            time.sleep(1.5)
            best: Step | None = None
            for rate in rates:
                step = run_step(
                    rate, broker, ingest_db, work, args.warmup, args.window, args.intake_delay
                )
                print(
                    f"offered={step.offered:>7} stored/s={step.points_per_s:>9.0f} "
                    f"cpu_s/Mpt={step.cpu_s_per_mpoint:6.2f} rss_mb={step.rss_mb:5.1f} "
                    f"B/pt={step.bytes_per_point:5.2f} buffer_growth={step.buffer_growth} "
                    f"refused={step.refused} skipped_polls={step.skipped_polls} "
                    f"{'ok' if step.sustained else 'NOT sustained'}",
                    flush=True,
                )
                if not step.sustained:
                    break
                best = step
        finally:
            ingest.terminate()
            ingest.wait(timeout=30)
    base = sim_baseline(best.offered if best else rates[0])
    raw = 21  # bytes of one reading as raw columns: u32 id + i64 ts + f64 value + u8 quality
    print(
        f"baseline (same run): sim driver alone cpu_s_per_mpoint={base:.2f}; "
        f"raw columns {raw} B/reading"
    )
    if best is not None:
        print(
            f"ratios: agent cpu / sim alone = {best.cpu_s_per_mpoint / base:.2f}x; "
            f"uplink bytes / raw = {best.bytes_per_point / raw:.3f}"
        )
    if best is None:
        print("e2e: points_per_s=0 cpu_s_per_mpoint=0.00 rss_mb=0 bytes_per_point=0.00")
        return
    print(
        f"e2e: points_per_s={best.points_per_s:.0f} cpu_s_per_mpoint={best.cpu_s_per_mpoint:.2f} "
        f"rss_mb={best.rss_mb:.0f} bytes_per_point={best.bytes_per_point:.2f}"
    )


if __name__ == "__main__":
    main()
