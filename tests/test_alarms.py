"""Alarm rules: the kernel pair (compiled and pure-Python twin) and the AlarmTable."""

from __future__ import annotations

import math
import struct
from array import array
from itertools import pairwise
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from native import alarms_py
from native.alarms import AlarmTable, compile_rule
from native.batch import BAD, GOOD, UNCERTAIN, Batch
from native.pipeline import ELAPSED_KEY, Pipeline
from native.stages import (
    AlarmEvent,
    AlarmRule,
    BadQualityRule,
    FlatlineRule,
    RangeStage,
    RateRule,
    StaleRule,
    ThresholdRule,
)
from native.table import PipelineCounts
from tests.helpers import columns, load_kernels, saved_without, state_bytes

NAN = math.nan
INF = math.inf
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

Row = tuple[int, int, float, int]
Ev = tuple[int, bool, int, float, int]  # (pid, raised, ts, value, since)


@pytest.fixture(params=["cython", "python"])
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return load_kernels(request.param, "alarms")


def run(
    table: AlarmTable, rows: list[Row], now_ms: int = 0, elapsed_ms: int | None = None
) -> list[AlarmEvent]:
    """Runs ``rows`` through the table, checks they pass unchanged, returns the events."""
    batch = Batch.from_rows(rows)
    before = columns(batch)
    counts = PipelineCounts()
    out = table.run(batch, now_ms, counts, elapsed_ms)
    assert out is batch and columns(out) == before
    return counts.alarms


def evs(events: list[AlarmEvent]) -> list[Ev]:
    return [(e.point_id, e.raised, e.ts_ms, e.value, e.since_ms) for e in events]


def exact(events: list[AlarmEvent]) -> list[tuple[object, ...]]:
    """Events with the value as its bit pattern, so NaNs compare equal."""
    return [
        (e.point_id, e.rule, e.severity, e.raised, e.ts_ms, struct.pack("<d", e.value), e.since_ms)
        for e in events
    ]


# -- threshold -----------------------------------------------------------------------------


def test_threshold_hysteresis_does_not_chatter(mod: ModuleType) -> None:
    t = AlarmTable({4: ThresholdRule(id="hot", above=10.0, hysteresis=2.0)}, kernels=mod)
    # noise around the threshold: one raise, no clear until the value is back below 8
    values = [9.0, 10.5, 9.5, 10.2, 8.5, 10.9, 8.0, 7.0, 10.1]
    got = evs(run(t, [(4, 1000 * i, v, GOOD) for i, v in enumerate(values)]))
    assert got == [
        (4, True, 1000, 10.5, 1000),
        (4, False, 6000, 8.0, 1000),
        (4, True, 8000, 10.1, 8000),
    ]


def test_threshold_without_hysteresis_clears_at_the_threshold(mod: ModuleType) -> None:
    t = AlarmTable({1: ThresholdRule(id="hot", above=10.0)}, kernels=mod)
    got = evs(run(t, [(1, 1, 10.0, GOOD), (1, 2, 10.5, GOOD), (1, 3, 10.0, GOOD)]))
    assert got == [(1, True, 2, 10.5, 2), (1, False, 3, 10.0, 2)]


def test_threshold_below_with_hysteresis(mod: ModuleType) -> None:
    t = AlarmTable({2: ThresholdRule(id="cold", below=0.0, hysteresis=1.0)}, kernels=mod)
    got = evs(run(t, [(2, 1, 0.0, GOOD), (2, 2, -0.5, GOOD), (2, 3, 0.5, GOOD), (2, 4, 1.0, GOOD)]))
    assert got == [(2, True, 2, -0.5, 2), (2, False, 4, 1.0, 2)]


def test_threshold_min_duration_ignores_short_excursions(mod: ModuleType) -> None:
    t = AlarmTable({1: ThresholdRule(id="hot", above=10.0, min_duration_ms=5000)}, kernels=mod)
    rows = [
        (1, 0, 11.0, GOOD),  # a run starts
        (1, 3000, 12.0, GOOD),
        (1, 4000, 9.0, GOOD),  # back in range before 5 s: nothing
        (1, 5000, 11.0, GOOD),  # a new run starts
        (1, 9000, 11.0, GOOD),
    ]
    assert run(t, rows) == []
    # split over batches: the run carries over
    assert evs(run(t, [(1, 10_000, 13.0, GOOD)])) == [(1, True, 10_000, 13.0, 5000)]
    assert t.raised_points() == [1]


def test_threshold_bad_or_nan_reading_interrupts_a_pending_run(mod: ModuleType) -> None:
    t = AlarmTable({1: ThresholdRule(id="hot", above=10.0, min_duration_ms=5000)}, kernels=mod)
    rows = [
        (1, 0, 11.0, GOOD),
        (1, 2000, 11.0, BAD),  # interrupts
        (1, 4000, 11.0, GOOD),  # a new run
        (1, 6000, 11.0, GOOD),  # 6 s after the first reading, but only 2 s into the run
        (1, 7000, NAN, GOOD),  # interrupts again
        (1, 8000, 11.0, GOOD),
        (1, 13_000, 11.0, GOOD),
    ]
    assert evs(run(t, rows)) == [(1, True, 13_000, 11.0, 8000)]
    # raised: neither bad quality nor NaN nor inf clears it, a good value does
    rows = [(1, 14_000, 1.0, BAD), (1, 15_000, NAN, GOOD), (1, 16_000, -INF, GOOD)]
    assert run(t, rows) == []
    assert evs(run(t, [(1, 17_000, 1.0, UNCERTAIN), (1, 18_000, 1.0, GOOD)])) == [
        (1, False, 18_000, 1.0, 13_000)
    ]


def test_threshold_backwards_time_never_raises(mod: ModuleType) -> None:
    t = AlarmTable({1: ThresholdRule(id="hot", above=10.0, min_duration_ms=1000)}, kernels=mod)
    rows = [(1, 5000, 11.0, GOOD), (1, 1000, 11.0, GOOD), (1, 5000, 11.0, GOOD)]
    rows += [(1, I64_MIN, 11.0, GOOD), (1, 5999, 11.0, GOOD)]
    assert run(t, rows) == []
    assert evs(run(t, [(1, 6000, 12.0, GOOD)])) == [(1, True, 6000, 12.0, 5000)]


# -- rate ----------------------------------------------------------------------------------


def test_rate_rule(mod: ModuleType) -> None:
    t = AlarmTable({3: RateRule(id="jump", max_rate=1.0)}, kernels=mod)
    rows = [
        (3, 0, 0.0, GOOD),
        (3, 1000, 0.5, GOOD),  # 0.5/s
        (3, 2000, 3.0, GOOD),  # 2.5/s: raise, since the previous reading
        (3, 3000, 5.0, GOOD),  # 2/s: still raised
        (3, 3500, 99.0, BAD),  # skipped
        (3, 3600, INF, GOOD),  # skipped
        (3, 4000, 5.5, GOOD),  # 0.5/s from 5.0 at 3000: clear
        (3, 4000, 50.0, GOOD),  # same ts: not judged, becomes the previous reading
        (3, 3000, 0.0, GOOD),  # backwards: not judged either
        (3, 4000, 1.0, GOOD),  # 1/s exactly: not above the limit
        (3, 4500, 0.0, GOOD),  # 2/s, falling: raise
    ]
    assert evs(run(t, rows)) == [
        (3, True, 2000, 3.0, 1000),
        (3, False, 4000, 5.5, 2000),
        (3, True, 4500, 0.0, 4000),
    ]


def test_rate_overflowing_difference_raises(mod: ModuleType) -> None:
    t = AlarmTable({3: RateRule(id="jump", max_rate=1e300)}, kernels=mod)
    rows = [(3, I64_MIN, -1.7e308, GOOD), (3, I64_MAX, 1.7e308, GOOD)]  # dv overflows to inf
    assert evs(run(t, rows)) == [(3, True, I64_MAX, 1.7e308, I64_MIN)]


# -- stale ---------------------------------------------------------------------------------


def test_stale_raises_by_clock_and_clears_on_a_reading(mod: ModuleType) -> None:
    t = AlarmTable({7: StaleRule(id="quiet", after_ms=10_000, severity="critical")}, kernels=mod)
    assert run(t, [], now_ms=1000) == []  # the first clock the table sees starts the wait
    assert run(t, [], now_ms=10_999) == []
    (ev,) = run(t, [], now_ms=11_000)
    assert (ev.point_id, ev.rule, ev.severity, ev.raised, ev.ts_ms, ev.since_ms) == (
        7,
        "quiet",
        "critical",
        True,
        11_000,
        1000,
    )
    assert math.isnan(ev.value)
    assert run(t, [], now_ms=50_000) == []  # raised once
    # any reading clears it, whatever its quality or value
    got = run(t, [(7, 20_500, NAN, BAD)], now_ms=21_000)
    assert len(got) == 1 and got[0].raised is False
    assert (got[0].ts_ms, got[0].since_ms) == (20_500, 11_000) and math.isnan(got[0].value)
    # silence counts from the reading's arrival (30 000), since = its timestamp
    assert run(t, [(7, 25_000, 1.0, GOOD)], now_ms=30_000) == []
    assert run(t, [(9, 31_000, 1.0, GOOD)], now_ms=39_999) == []  # another point's reading
    assert [(e.raised, e.ts_ms, e.since_ms) for e in run(t, [], now_ms=40_000)] == [
        (True, 40_000, 25_000)
    ]


def test_stale_without_clock_never_raises(mod: ModuleType) -> None:
    t = AlarmTable({7: StaleRule(id="quiet", after_ms=1)}, kernels=mod)
    assert run(t, [(7, 5, 1.0, GOOD)]) == []
    assert run(t, [], now_ms=0) == []
    assert [e.since_ms for e in run(t, [], now_ms=6)] == [5]


def test_stale_reading_in_the_same_run_prevents_the_raise(mod: ModuleType) -> None:
    t = AlarmTable({1: StaleRule(id="q", after_ms=100), 2: StaleRule(id="q", after_ms=100)}, mod)
    assert run(t, [], now_ms=1000) == []
    got = run(t, [(2, 1050, 1.0, GOOD)], now_ms=1100)
    assert [(e.point_id, e.raised, e.since_ms) for e in got] == [(1, True, 1000)]


# -- flatline ------------------------------------------------------------------------------


def test_flatline_raises_after_duration_and_clears_on_change(mod: ModuleType) -> None:
    t = AlarmTable({5: FlatlineRule(id="stuck", duration_ms=60_000, tolerance=0.5)}, kernels=mod)
    rows = [(5, 10_000 * i, v, GOOD) for i, v in enumerate([5.0, 5.25, 4.75, 5.5, 5.0, 4.5])]
    rows.append((5, 55_000, 80.0, BAD))  # ignored: neither breaks nor extends the run
    assert run(t, rows) == []
    assert evs(run(t, [(5, 60_000, 5.0, GOOD), (5, 65_000, 5.1, GOOD)])) == [
        (5, True, 60_000, 5.0, 0)
    ]
    rows = [(5, 70_000, 5.6, GOOD), (5, 80_000, 5.6, GOOD), (5, 130_000, 5.6, GOOD)]
    assert evs(run(t, rows)) == [(5, False, 70_000, 5.6, 60_000), (5, True, 130_000, 5.6, 70_000)]


def test_flatline_a_drift_beyond_tolerance_restarts_the_run(mod: ModuleType) -> None:
    t = AlarmTable({5: FlatlineRule(id="stuck", duration_ms=3000, tolerance=1.0)}, kernels=mod)
    # each step is within tolerance of the last, but not of the run's first value
    rows = [(5, 1000 * i, 0.75 * i, GOOD) for i in range(6)]
    # runs: 0.0 (0..1000, 1.5 breaks), 1.5 at 2000 (2.25 in, 3.0 out), 3.0 at 4000 (3.75 in)
    assert run(t, rows) == []
    assert evs(run(t, [(5, 7000, 3.5, GOOD)])) == [(5, True, 7000, 3.5, 4000)]


# -- bad quality ---------------------------------------------------------------------------


def test_bad_quality_streak(mod: ModuleType) -> None:
    t = AlarmTable({6: BadQualityRule(id="faulty", count=3)}, kernels=mod)
    rows = [(6, 1, 1.0, BAD), (6, 2, 1.0, UNCERTAIN), (6, 3, NAN, GOOD)]  # reset by a GOOD
    rows += [(6, 4, 1.0, BAD), (6, 5, 1.0, UNCERTAIN), (6, 6, NAN, BAD), (6, 7, 1.0, BAD)]
    got = evs(run(t, rows))
    assert len(got) == 1 and got[0][:3] == (6, True, 6) and got[0][4] == 4
    assert evs(run(t, [(6, 8, 2.0, BAD), (6, 9, 3.0, GOOD)])) == [(6, False, 9, 3.0, 6)]


# -- the table -----------------------------------------------------------------------------


def test_mixed_rules_pass_readings_unchanged_and_events_come_in_order(mod: ModuleType) -> None:
    specs: dict[int, AlarmRule] = {
        1: ThresholdRule(id="hot", above=10.0, severity="critical"),
        3: BadQualityRule(id="bad", count=1, severity="info"),
        5: StaleRule(id="quiet", after_ms=1000),
        8: RateRule(id="jump", max_rate=1.0),
    }
    t = AlarmTable(specs, kernels=mod)
    assert len(t) == 4
    rows = [
        (3, 100, 1.0, BAD),
        (2, 100, 99.0, GOOD),  # no rule: slot -1
        (1, 200, 11.0, GOOD),
        (9, 300, NAN, BAD),  # beyond the table
        (8, 300, 1.0, GOOD),
        (8, 400, 9.0, GOOD),
        (1, 500, -0.0, GOOD),  # back in range
    ]
    got = run(t, rows, now_ms=5000)
    assert [(e.point_id, e.rule, e.severity, e.raised, e.ts_ms) for e in got] == [
        (3, "bad", "info", True, 100),
        (1, "hot", "critical", True, 200),
        (8, "jump", "warning", True, 400),
        (1, "hot", "critical", False, 500),
    ]
    # point 5 first sees the clock now; the next run after 1 s raises it, after the readings
    got = run(t, [(3, 6000, 1.0, GOOD)], now_ms=6000)
    assert [(e.point_id, e.raised, e.ts_ms) for e in got] == [(3, False, 6000), (5, True, 6000)]


def test_most_events_a_run_can_make(mod: ModuleType) -> None:
    specs: dict[int, AlarmRule] = {0: BadQualityRule(id="b", count=1)}
    specs.update({pid: StaleRule(id="s", after_ms=1) for pid in range(1, 6)})
    t = AlarmTable(specs, kernels=mod)
    rows = [(0, i, 0.0, BAD if i % 2 == 0 else GOOD) for i in range(50)]
    got = run(t, rows, now_ms=-100)
    assert len(got) == 50 + 0  # the stale points first see the clock
    got = run(t, rows, now_ms=100)
    assert len(got) == 50 + 5 and [e.point_id for e in got[50:]] == [1, 2, 3, 4, 5]


def test_event_columns_are_reused_grown_and_shrunk(mod: ModuleType) -> None:
    t = AlarmTable({0: BadQualityRule(id="b", count=1)}, kernels=mod)
    big = [(0, i, float(i), BAD if i % 2 == 0 else GOOD) for i in range(70_000)]
    got = run(t, big)
    assert len(got) == 70_000 and got[-1].ts_ms == 69_999 and got[-1].raised is False
    assert len(t._event_columns(1)[0]) < 70_000  # a small run gives the memory back
    # what earlier runs left in the columns never leaks into a later run's events
    assert evs(run(t, [(0, 5, 1.0, BAD)])) == [(0, True, 5, 1.0, 5)]
    assert run(t, [(0, 6, 1.0, BAD)]) == []


def test_empty_batch_and_compile(mod: ModuleType) -> None:
    t = AlarmTable({1: ThresholdRule(id="hot", above=1.0)}, kernels=mod)
    assert run(t, []) == []
    assert compile_rule(ThresholdRule(id="x", below=1.0, hysteresis=0.5, min_duration_ms=7)) == (
        alarms_py.RULE_BELOW,
        1.0,
        1.5,
        7,
    )
    with pytest.raises(TypeError, match="not an alarm rule"):
        compile_rule(RangeStage())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without points"):
        AlarmTable({})
    # a duration past int64 is accepted (and never reached)
    big = AlarmTable({1: StaleRule(id="s", after_ms=2**70)}, kernels=mod)
    assert run(big, [], now_ms=1) == [] and run(big, [], now_ms=I64_MAX) == []


def test_kernel_rejects_inconsistent_arrays(mod: ModuleType) -> None:
    t = AlarmTable({1: ThresholdRule(id="hot", above=1.0)}, kernels=mod)
    b = Batch.from_rows([(1, 1, 2.0, GOOD)])

    def call(batch: Batch, cap: int, level: array[float] | None = None) -> int:
        ev = [array(c, [0]) * cap for c in ("i", "B", "q", "d", "q")]
        n: int = mod.evaluate(
            batch.point_ids,
            batch.timestamps,
            batch.values,
            batch.quality,
            0,
            0,
            t.slot_of,
            t.rule,
            t.level if level is None else level,
            t.clear_level,
            t.span,
            t.raised,
            t.active,
            t.t0,
            t.v0,
            t.count,
            t.raised_at,
            t.seen,
            *ev,
        )
        return n

    with pytest.raises(ValueError, match="event arrays shorter"):
        call(b, 1)
    with pytest.raises(ValueError, match="parameter and state arrays"):
        call(b, 2, array("d", [1.0, 2.0]))
    b.values.append(1.0)
    with pytest.raises(ValueError, match="differ in length"):
        call(b, 3)
    assert call(Batch(), 0 + 1) == 0
    assert call(Batch.from_rows([(1, 1, 2.0, GOOD)]), 2) == 1


def test_save_and_load_keep_a_raised_alarm_raised(mod: ModuleType) -> None:
    specs: dict[int, AlarmRule] = {
        1: ThresholdRule(id="hot", above=10.0, hysteresis=1.0),
        2: StaleRule(id="quiet", after_ms=1000),
        3: FlatlineRule(id="stuck", duration_ms=100),
    }
    t = AlarmTable(specs, kernels=mod)
    run(t, [(3, 0, 1.0, GOOD)], now_ms=1)
    got = run(t, [(1, 500, 12.0, GOOD), (3, 400, 1.0, GOOD)], now_ms=2000)
    assert [(e.point_id, e.raised) for e in got] == [(1, True), (3, True), (2, True)]
    saved = t.save_state()

    restarted = AlarmTable(specs, kernels=mod)
    assert restarted.load_state(saved) == 3
    assert restarted.raised_points() == [1, 2, 3]
    # still beyond: nothing raised again; the stale alarm is not raised twice either
    rows = [(1, 3000, 11.5, GOOD), (3, 3000, 1.0, GOOD)]
    assert run(restarted, rows, now_ms=9000) == []
    rows = [(1, 4000, 9.0, GOOD), (2, 4000, 0.0, GOOD), (3, 4000, 2.0, GOOD)]
    assert evs(run(restarted, rows, now_ms=4500)) == [
        (1, False, 4000, 9.0, 500),
        (2, False, 4000, 0.0, 2000),
        (3, False, 4000, 2.0, 400),
    ]
    # a changed rule starts afresh
    changed = dict(specs)
    changed[1] = ThresholdRule(id="hot", above=20.0)
    fresh = AlarmTable(changed, kernels=mod)
    assert fresh.load_state(saved) == 2
    assert fresh.raised_points() == [2, 3]


def test_pipeline_runs_alarm_rules_after_filters() -> None:
    p = Pipeline(
        {
            1: [RangeStage(max=100.0, action="drop"), ThresholdRule(id="hot", above=50.0)],
            2: [BadQualityRule(id="bad", count=1)],
        }
    )
    b = Batch.from_rows([(1, 1, 500.0, GOOD), (1, 2, 60.0, GOOD), (2, 3, 1.0, UNCERTAIN)])
    out, counts = p.process(b, now_ms=10)
    assert [(r[0], r[1]) for r in out.rows()] == [(1, 2), (2, 3)]
    # depth by depth: point 2's rule is its first stage, point 1's its second
    assert [(e.point_id, e.rule, e.ts_ms) for e in counts.alarms] == [(2, "bad", 3), (1, "hot", 2)]
    assert sorted(p.save_state()) == ["0:alarm:2", "1:alarm:1", ELAPSED_KEY]


# -- the clocks: silence is measured on the monotonic clock --------------------------------

MIN = 60_000
HOUR = 3_600_000
WALL = 1_780_000_000_000  # the wall clock when these scenarios start


class Clocks:
    """A wall clock that can step and a monotonic one that cannot, advancing together."""

    def __init__(self) -> None:
        self.wall, self.mono = WALL, 7_000

    def tick(self, ms: int, step_ms: int = 0) -> None:
        self.wall += ms + step_ms
        self.mono += ms


def test_stale_ignores_wall_clock_steps(mod: ModuleType) -> None:
    """Wall clock +2 h: no point looks silent. Then -1 h: a real silence is still raised
    on time, 5 min after the point's last reading arrived, since that reading's time."""
    quiet = StaleRule(id="quiet", after_ms=5 * MIN)
    t = AlarmTable({1: quiet, 2: quiet}, kernels=mod)
    c = Clocks()

    def flush(*pids: int) -> list[tuple[int, bool, int, int]]:
        rows = [(pid, c.wall, 1.0, GOOD) for pid in pids]
        return [(e.point_id, e.raised, e.ts_ms, e.since_ms) for e in run(t, rows, c.wall, c.mono)]

    for _ in range(3):  # both points report every minute
        assert flush(1, 2) == []
        c.tick(MIN)
    c.tick(1000, step_ms=2 * HOUR)
    assert flush() == []  # 2 h ahead: nothing has been silent for that long
    for _ in range(10):
        assert flush(1, 2) == []
        c.tick(MIN)
    assert flush(1, 2) == []
    last = c.wall  # point 2's last reading
    c.tick(1000, step_ms=-3 * HOUR)  # an hour behind the right time now
    for _ in range(4):
        assert flush(1) == []
        c.tick(MIN)
    c.tick(MIN - 1001)
    assert flush(1) == []  # 4:59.999 since point 2's last reading arrived
    c.tick(1)
    assert flush(1) == [(2, True, c.wall, last)]


def test_stale_silence_resumes_after_a_reboot() -> None:
    """The pipeline clock is saved with the stage state, so after a restart on another
    boot (the monotonic clock starts again near 0) a silence resumes where it stopped.
    The time the agent was down does not count: a restart does not raise every stale
    rule at once before the drivers have polled."""
    rules: dict[int, list[StaleRule]] = {1: [StaleRule(id="quiet", after_ms=5 * MIN)]}
    p = Pipeline(rules)
    c = Clocks()
    p.process(Batch.from_rows([(1, c.wall, 1.0, GOOD)]), c.wall, c.mono)
    c.tick(3 * MIN)
    assert p.process(Batch(), c.wall, c.mono)[1].alarms == []
    saved = p.save_state()
    c.wall, c.mono = c.wall + 10 * MIN, 2_000  # down for 10 min, then a new boot
    restarted = Pipeline(rules)
    assert restarted.load_state(saved) == 1
    assert restarted.process(Batch(), c.wall, c.mono)[1].alarms == []
    c.tick(2 * MIN - 1)
    assert restarted.process(Batch(), c.wall, c.mono)[1].alarms == []
    c.tick(1)
    (ev,) = restarted.process(Batch(), c.wall, c.mono)[1].alarms
    assert (ev.point_id, ev.raised, ev.ts_ms, ev.since_ms) == (1, True, c.wall, WALL)


def test_alarm_state_of_the_previous_version_loads(mod: ModuleType) -> None:
    """State saved before the monotonic clock (no "seen" array, no pipeline clock) still
    loads: a raised alarm stays raised, and a stale rule counts its silence from the
    restart (the pipeline clock starts at 0)."""
    specs: dict[int, AlarmRule] = {
        1: ThresholdRule(id="hot", above=10.0),
        2: StaleRule(id="quiet", after_ms=5 * MIN),
    }
    t = AlarmTable(specs, kernels=mod)
    assert len(run(t, [(1, WALL, 12.0, GOOD), (2, WALL, 1.0, GOOD)], WALL)) == 1
    old = {pid: saved_without(t, pid, ("seen",)) for pid in specs}
    restarted = AlarmTable(specs, kernels=mod)
    assert restarted.load_state(old) == 2
    assert restarted.raised_points() == [1]
    now = WALL + HOUR
    assert run(restarted, [], now, 0) == []
    assert run(restarted, [], now + 5 * MIN - 1, 5 * MIN - 1) == []
    got = run(restarted, [(1, now, 9.0, GOOD)], now + 5 * MIN, 5 * MIN)
    assert [(e.point_id, e.raised, e.since_ms) for e in got] == [(1, False, WALL), (2, True, WALL)]


# -- both implementations on random data ---------------------------------------------------

DURATIONS = st.sampled_from([0, 1, 500, 1000, 2500])

RULES = st.one_of(
    st.builds(
        ThresholdRule,
        id=st.just("th"),
        above=st.sampled_from([0.0, 1.0, 10.0]),
        hysteresis=st.sampled_from([0.0, 0.5, 2.0]),
        min_duration_ms=DURATIONS,
    ),
    st.builds(
        ThresholdRule,
        id=st.just("tl"),
        below=st.sampled_from([0.0, -1.0]),
        hysteresis=st.sampled_from([0.0, 1.0]),
        min_duration_ms=DURATIONS,
    ),
    st.builds(RateRule, id=st.just("rate"), max_rate=st.sampled_from([0.5, 2.0, 1e3])),
    st.builds(StaleRule, id=st.just("stale"), after_ms=st.sampled_from([1, 500, 3000])),
    st.builds(
        FlatlineRule,
        id=st.just("flat"),
        duration_ms=st.sampled_from([1, 1000, 3000]),
        tolerance=st.sampled_from([0.0, 0.5, 5.0]),
    ),
    st.builds(BadQualityRule, id=st.just("bad"), count=st.integers(1, 4)),
)

VALUES = st.one_of(
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, 9.0, 10.0, 11.0, -1.0, -2.0, NAN, INF, -INF]),
    st.floats(allow_nan=True, allow_infinity=True),
)
PIDS = [0, 1, 2, 3, 5, 8, 13]  # the rules are on a random subset of these


Clock = tuple[int, int | None]  # (wall, monotonic pipeline clock or None: the wall's)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[int, AlarmRule], list[Row], list[int], list[Clock]]:
    """(rules, readings, cut points, the clocks of each run): several points interleaved."""
    ruled = draw(st.lists(st.sampled_from(PIDS), min_size=1, max_size=6, unique=True))
    specs = {pid: draw(RULES) for pid in ruled}
    n = draw(st.integers(0, 200))
    # mostly points with a rule; 4 has none (slot -1 or beyond the table), 40 is beyond it
    pids = st.sampled_from([*ruled, *ruled, *ruled, 4, 40])
    ts = draw(st.integers(-5000, 5000))
    rows: list[Row] = []
    for _ in range(n):
        step = draw(st.sampled_from([0, 0, 100, 250, 1000, 3000, -700, None]))
        ts = draw(st.sampled_from([I64_MIN, I64_MAX, 0])) if step is None else ts + step
        ts = max(I64_MIN, min(I64_MAX, ts))
        pid = draw(pids)
        rows.append(
            (pid, ts, draw(VALUES), draw(st.sampled_from([GOOD, GOOD, GOOD, BAD, UNCERTAIN])))
        )
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    extremes = st.sampled_from([I64_MIN, I64_MAX])
    walls = st.one_of(st.just(0), st.integers(-2000, 400_000), extremes)
    monotonic = st.one_of(st.none(), st.integers(0, 400_000), extremes)
    clocks = [(draw(walls), draw(monotonic)) for _ in range(len(cuts) + 1)]
    return specs, rows, cuts, clocks


def chunks(rows: list[Row], cuts: list[int]) -> list[list[Row]]:
    bounds = [0, *cuts, len(rows)]
    return [rows[a:b] for a, b in pairwise(bounds)]


def replay(
    name: str, specs: dict[int, AlarmRule], parts: list[list[Row]], clocks: list[Clock]
) -> tuple[list[tuple[object, ...]], dict[str, bytes], AlarmTable]:
    t = AlarmTable(specs, kernels=load_kernels(name, "alarms"))
    events: list[AlarmEvent] = []
    for part, (now, elapsed) in zip(parts, clocks, strict=True):
        events += run(t, part, now, elapsed)
    return exact(events), state_bytes(t), t


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios())
def test_both_implementations_agree(
    case: tuple[dict[int, AlarmRule], list[Row], list[int], list[Clock]],
) -> None:
    specs, rows, cuts, clocks = case
    parts = chunks(rows, cuts)
    compiled_events, compiled_state, _ = replay("cython", specs, parts, clocks)
    twin_events, twin_state, table = replay("python", specs, parts, clocks)
    assert compiled_events == twin_events
    assert compiled_state == twin_state
    # per point, events alternate raise / clear, starting with a raise; a raise decided by
    # a duration or a rate of readings never looks back from before its start (a stale
    # raise is stamped by the wall clock, which may have stepped back since the reading)
    up_now: dict[int, bool] = {}
    for pid, _, _, up, ts, _, since in twin_events:
        assert isinstance(pid, int) and isinstance(ts, int) and isinstance(since, int)
        assert up_now.get(pid, False) != up
        up_now[pid] = bool(up)
        if up and not isinstance(specs[pid], BadQualityRule | StaleRule):
            assert since <= ts
    assert sorted(p for p, up in up_now.items() if up) == table.raised_points()


@pytest.mark.parametrize("name", ["cython", "python"])
@SETTINGS
@given(case=scenarios())
def test_split_batches_give_the_same_events_as_one(
    case: tuple[dict[int, AlarmRule], list[Row], list[int], list[Clock]], name: str
) -> None:
    specs, rows, cuts, clocks = case
    now, elapsed = clocks[-1]
    if elapsed is None:
        elapsed = now
    whole = replay(name, specs, [rows], [(now, elapsed)])
    # the parts arrive together (one monotonic clock), the wall clock only on the last
    # run: a clock check between the parts could see a stale point that the next part's
    # readings would have kept quiet
    parts = chunks(rows, cuts)
    split = replay(name, specs, parts, [(0, elapsed)] * (len(parts) - 1) + [(now, elapsed)])
    assert whole[:2] == split[:2]


@pytest.mark.parametrize("name", ["cython", "python"])
@SETTINGS
@given(case=scenarios())
def test_restart_resumes_exactly(
    case: tuple[dict[int, AlarmRule], list[Row], list[int], list[Clock]], name: str
) -> None:
    specs, rows, cuts, clocks = case
    parts = chunks(rows, cuts)
    mod = load_kernels(name, "alarms")
    uninterrupted = AlarmTable(specs, kernels=mod)
    table = AlarmTable(specs, kernels=mod)
    for part, (now, elapsed) in zip(parts, clocks, strict=True):
        expected = exact(run(uninterrupted, part, now, elapsed))
        assert exact(run(table, part, now, elapsed)) == expected
        table = AlarmTable(specs, kernels=mod)  # restart after every run
        assert table.load_state(uninterrupted.save_state()) == len(specs)
    assert state_bytes(table) == state_bytes(uninterrupted)
