"""Pipeline stage throughput: compiled kernels vs their pure-Python twins.

One million readings (1000 points polled 1000 times at 1 Hz: a random walk at 0.01
resolution with occasional spikes and a few bad readings) go through a pipeline that has
one stage type on every point, in flushes of 10 000 readings, as the agent runs them. Each
stage runs in a fresh pipeline; the pure twins run in a subprocess with
CITYGW_PURE_PYTHON=1 on the first 100 000 readings (the rate is per reading either way).

    python bench/pipeline.py

A "derived" row measures ``DeriveEngine.process`` (native/derive.py) on the same readings:
100 derived points of 2-3 inputs each (arithmetic, one interp, one mean_over), in input
readings per second (each poll makes one reading of each: 1 derived reading per 10 input
readings). A "rules" row measures the agent's push path with 100 rules
(``LocalAction.process``: their conditions in the derive kernel, then each rule's state
machine on every condition evaluated; a condition that flips queues a decision, whose
actions are not run here). Neither counts in the last line's figures.

Last line: ``pipeline: slowest_stage_mpts=<X.X> speedup_vs_pure=<N>`` — the slowest stage's
compiled rate (million readings/s) and the smallest compiled/pure ratio over the stages.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from array import array
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.local_action import LocalAction
from agent.local_config import RuleConfig
from native import impl
from native import stages as st
from native.batch import BAD, Batch
from native.derive import DerivedSpec, DeriveEngine
from native.expr import compile_expr
from native.pipeline import Pipeline

POINTS = 1000
POLLS = 1000
FLUSH = 10_000
PURE_READINGS = 100_000
T0 = 1_796_000_000_000  # ms, a Sunday in November 2026
AGG_BASE = 100_000  # ids of the aggregate series
DERIVED = 100
DERIVED_BASE = 200_000  # ids of the derived points


def stage_sets() -> dict[str, dict[int, list[st.StageSpec]]]:
    def every(spec_of: object) -> dict[int, list[st.StageSpec]]:
        return {pid: [spec_of(pid)] for pid in range(POINTS)}  # type: ignore[operator]

    functions = ("min", "max", "mean", "sum", "count", "last", "std", "laeq")
    return {
        "range": every(lambda pid: st.RangeStage(min=-50.0, max=150.0)),
        "hampel w=7": every(lambda pid: st.HampelStage(window=7, threshold=3.0)),
        "median w=5": every(lambda pid: st.MedianStage(window=5)),
        "deadband": every(lambda pid: st.DeadbandStage(band=0.05, heartbeat_ms=600_000)),
        "sdt": every(lambda pid: st.SdtStage(deviation=0.05, max_interval_ms=900_000)),
        "ratelimit": every(lambda pid: st.RateLimitStage(max_rate=2.0)),
        "ema alpha": every(lambda pid: st.EmaStage(alpha=0.2)),
        "ema tau": every(lambda pid: st.EmaStage(tau_ms=30_000)),
        "aggregate 1m x8": every(
            lambda pid: st.AggregateStage(
                window_ms=60_000,
                outputs=tuple((f, AGG_BASE + pid * 8 + i) for i, f in enumerate(functions)),
            )
        ),
        "threshold rule": every(
            lambda pid: st.ThresholdRule(
                id="high", above=60.0, hysteresis=1.0, min_duration_ms=5000
            )
        ),
        "flatline rule": every(lambda pid: st.FlatlineRule(id="stuck", duration_ms=600_000)),
        "stale rule": every(lambda pid: st.StaleRule(id="stale", after_ms=60_000)),
    }


def readings(n: int) -> Batch:
    rng = random.Random(42)
    level = [50.0 + rng.uniform(-5, 5) for _ in range(POINTS)]
    ids = array("I", range(POINTS)) * POLLS
    ts = array("q", bytes(8 * POINTS * POLLS))
    values = array("d", bytes(8 * POINTS * POLLS))
    quality = array("B", bytes(POINTS * POLLS))
    i = 0
    for k in range(POLLS):
        t = T0 + k * 1000
        for pid in range(POINTS):
            level[pid] += rng.gauss(0.0, 0.03)
            v = round(level[pid], 2)
            r = rng.random()
            if r < 0.002:
                v += 40.0  # a spike
            elif r < 0.003:
                quality[i] = BAD
            ts[i] = t
            values[i] = v
            i += 1
    b = Batch(ids, ts, values, quality)
    return b.slice(0, n)


def run(n: int) -> dict[str, float]:
    """Million readings per second per stage set, with whatever kernels impl loaded."""
    batch = readings(n)
    flushes = [batch.slice(i, i + FLUSH) for i in range(0, n, FLUSH)]
    out: dict[str, float] = {}
    for name, specs in stage_sets().items():
        pipeline = Pipeline(specs)
        copies = [f.slice(0, len(f)) for f in flushes]  # stages modify their input
        start = time.perf_counter()
        for f in copies:
            pipeline.process(f, now_ms=f.timestamps[-1])
        out[name] = n / (time.perf_counter() - start) / 1e6
    return out


def derived_specs() -> list[DerivedSpec]:
    specs = []
    for k in range(DERIVED):
        a, b, c = (k * 10 + i for i in range(3))
        if k % 2:
            text = "interp(a, [40, 50, 60], [0, 1, 4]) + b * 0.5 - mean_over(b, 1m)"
            ids = {"a": a, "b": b}
        else:
            text = "interp(a, [40, 50, 60], [0, 1, 4]) * (b - c) / 2 + mean_over(a, 1m)"
            ids = {"a": a, "b": b, "c": c}
        program = compile_expr(text, tuple(ids))
        pids = tuple(ids[name] for name in program.inputs)
        specs.append(DerivedSpec(program, pids, DERIVED_BASE + k, max_age_ms=30_000))
    return specs


def run_derived(n: int) -> float:
    """Million input readings per second through the derive engine."""
    batch = readings(n)
    flushes = [batch.slice(i, i + FLUSH) for i in range(0, n, FLUSH)]
    engine = DeriveEngine(derived_specs())
    start = time.perf_counter()
    for f in flushes:
        engine.process(f)
    return n / (time.perf_counter() - start) / 1e6


def rule_set() -> Any:
    """100 rules, each on a point of its own: start above 52, stop below 48, interlocked."""
    rules = [
        RuleConfig.model_validate(
            {
                "id": f"r{k}",
                "inputs": {"x": f"d/p{k * 10}"},
                "when": "x > 52",
                "until": "x < 48",
                "min_on": "1m",
                "max_starts_per_hour": 6,
                "start": [{"event": "on"}],
                "stop": [{"event": "off"}],
            }
        )
        for k in range(DERIVED)
    ]
    return SimpleNamespace(rules=rules, derived=[])


def run_rules(n: int) -> float:
    """Million input readings per second through the rules' push path."""

    async def unused(*args: object) -> Any:
        raise AssertionError("no action runs in this benchmark")

    batch = readings(n)
    flushes = [batch.slice(i, i + FLUSH) for i in range(0, n, FLUSH)]
    ids = {f"d/p{pid}": pid for pid in range(POINTS)}
    local = LocalAction(rule_set(), ids, lambda key: None, unused, unused, unused)
    start = time.perf_counter()
    for f in flushes:
        local.process(f)
    return n / (time.perf_counter() - start) / 1e6


def main() -> None:
    if "--child" in sys.argv:
        rates = run(PURE_READINGS)
        derived = run_derived(PURE_READINGS)
        rules = run_rules(PURE_READINGS)
        out = {"impl": impl.accelerated(), "rates": rates, "derived": derived, "rules": rules}
        print(json.dumps(out))
        return
    if not impl.accelerated():
        sys.exit("bench/pipeline.py: the Cython kernels are not built (pip install -e .)")
    compiled = run(POINTS * POLLS)
    derived = run_derived(POINTS * POLLS)
    rules = run_rules(POINTS * POLLS)
    child = subprocess.run(
        [sys.executable, __file__, "--child"],
        env={**os.environ, "CITYGW_PURE_PYTHON": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(child.stdout)
    assert result["impl"] is False, "the child did not run the pure twins"
    pure: dict[str, float] = result["rates"]
    print(f"{'stage':<18} {'cython Mpts/s':>14} {'pure Mpts/s':>12} {'speed-up':>9}")
    for name, rate in compiled.items():
        print(f"{name:<18} {rate:14.1f} {pure[name]:12.3f} {rate / pure[name]:8.0f}x")
    for name, rate, pure_rate in (
        ("derived x100", derived, result["derived"]),
        ("rules x100", rules, result["rules"]),
    ):
        print(f"{name:<18} {rate:14.1f} {pure_rate:12.3f} {rate / pure_rate:8.0f}x")
    slowest = min(compiled.values())
    speedup = min(compiled[k] / pure[k] for k in compiled)
    print(f"pipeline: slowest_stage_mpts={slowest:.1f} speedup_vs_pure={speedup:.0f}")


if __name__ == "__main__":
    main()
