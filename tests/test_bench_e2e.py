"""bench/e2e.py --quick runs end to end (agent, private broker, ingest) and ends with its
summary line. A smoke test only: the machine's speed is the benchmark's business."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(
    r"e2e: points_per_s=\d+ cpu_s_per_mpoint=[\d.]+ rss_mb=\d+ bytes_per_point=[\d.]+ "
    r"poll_jitter_p99_ms=[\d.]+"
)


def test_quick_run_reports_flush_holds_rungs_and_the_summary() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "e2e.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert SUMMARY.fullmatch(lines[-1]), lines[-1]
    holds = [line for line in lines if line.startswith("flush hold: ")]
    assert len(holds) == 2 and all("loop_lag_ms p50=" in line for line in holds)
    rungs = [line for line in lines if line.startswith("offered=")]
    assert rungs and all(" jitter_ms=" in line and " lag_ms=" in line for line in rungs)
