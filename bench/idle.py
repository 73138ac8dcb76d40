"""The idle budget: an agent polling 100 points once a second should use well under 1% of
a core. Measures the real agent (`citygw run`, a subprocess) with its uplink to a private
mosquitto, in the same run:

- `intake_delay = "10ms"` (the default): each poll's readings are committed to the
  buffer's intake right after they are read (what a process crash can lose: 10 ms);
- `intake_delay = "10s"`, longer than `flush_interval`: every batch is flushed before an
  intake commit is due, so no intake commit happens — the agent as it was before the
  intake existed (a crash lost up to a flush interval of readings).

Each run warms up, then measures the agent's CPU time over a fixed window; the intake
rows committed come from the buffer's AUTOINCREMENT counter. The last line:

    idle: cpu_percent=<X.XX> baseline_cpu_percent=<X.XX> intake_commits_per_s=<X.X>

Loopback only, bounded: two runs of WARMUP + WINDOW seconds.
"""

from __future__ import annotations

import argparse
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.e2e import proc_cpu_s  # noqa: E402
from common.broker import Mosquitto  # noqa: E402

DEVICES = 10  # 10 devices x 10 points, each device polled once a second
POINTS = 10


def config_text(broker: str, buffer: Path, intake_delay: str) -> str:
    out = [
        '[gateway]\nid = "gw-idle"\n',
        f'[uplink]\nbroker = "{broker}"\n',
        f'[buffer]\npath = "{buffer}"\nintake_delay = "{intake_delay}"\n',
    ]
    for d in range(DEVICES):
        out.append(f'[[devices]]\nname = "dev-{d}"\ndriver = "sim"\npoll = "1s"\nseed = {d}\n')
        for p in range(POINTS):
            out.append(
                f'[[devices.points]]\nname = "p{p}"\nbase = {20 + p}.0\nnoise = 0.05\n'
                'resolution = 0.01\npipeline = [{ type = "range", min = -100.0, max = 100.0 }]\n'
            )
    return "\n".join(out)


def intake_rows(buffer: Path) -> int:
    with sqlite3.connect(f"file:{buffer}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'intake'").fetchone()
    return int(row[0]) if row else 0


def measure(
    broker: str, work: Path, intake_delay: str, warmup: float, window: float
) -> tuple[float, float]:
    """(CPU % of one core, intake commits per second) of one agent run."""
    buffer = work / f"buffer-{intake_delay}.db"
    cfg = work / f"gateway-{intake_delay}.toml"
    cfg.write_text(config_text(broker, buffer, intake_delay))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "-c", str(cfg), "--log-level", "WARNING"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(warmup)
        c0, r0, t0 = proc_cpu_s(proc.pid), intake_rows(buffer), time.monotonic()
        time.sleep(window)
        c1, r1, t1 = proc_cpu_s(proc.pid), intake_rows(buffer), time.monotonic()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return 100 * (c1 - c0) / (t1 - t0), (r1 - r0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=60.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="citygw-idle-") as tmp, Mosquitto() as broker:
        work = Path(tmp)
        cpu, commits = measure(broker.url, work, "10ms", args.warmup, args.window)
        base, _ = measure(broker.url, work, "10s", args.warmup, args.window)
    print(f"{DEVICES * POINTS} points polled once a second, {args.window:g} s windows")
    print(f"  intake_delay = 10ms: {cpu:.2f} % of a core, {commits:.1f} intake commits/s")
    print(f"  intake_delay = 10s (no intake commit, as before): {base:.2f} % of a core")
    print(
        f"idle: cpu_percent={cpu:.2f} baseline_cpu_percent={base:.2f} "
        f"intake_commits_per_s={commits:.1f}"
    )


if __name__ == "__main__":
    main()
