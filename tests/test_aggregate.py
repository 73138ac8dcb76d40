"""Tumbling-window aggregates: the kernel pair (compiled and pure-Python twin) and
AggregateTable, on hand-computed windows and on random batches (both implementations
must agree byte for byte, one batch or several, with or without a save/restore between)."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from native import aggregate_py, impl
from native.aggregate import AggregateTable
from native.batch import BAD, GOOD, UNCERTAIN, Batch
from native.pipeline import Pipeline
from native.stages import AGGREGATE_FUNCTIONS, AggregateStage
from native.table import PipelineCounts
from tests.helpers import IMPLEMENTATIONS, columns, load_kernels, saved_without, state_bytes

NAN = math.nan
INF = math.inf
MIN = 60_000
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Row = tuple[int, int, float, int]


@pytest.fixture(params=IMPLEMENTATIONS)
def kern(request: pytest.FixtureRequest) -> ModuleType:
    return load_kernels(request.param, "aggregate")


def both() -> tuple[ModuleType, ModuleType]:
    return load_kernels("cython", "aggregate"), load_kernels("python", "aggregate")


def stage(
    fns: Sequence[str] = AGGREGATE_FUNCTIONS, base: int = 100, window_ms: int = MIN, **kw: Any
) -> AggregateStage:
    """Outputs function k of ``fns`` under point id base + k."""
    outputs = tuple((f, base + k) for k, f in enumerate(fns))
    return AggregateStage(window_ms=window_ms, outputs=outputs, **kw)


def run(
    table: AggregateTable, rows: Sequence[Row], now_ms: int = 0, elapsed_ms: int | None = None
) -> tuple[list[Row], Any]:
    counts = PipelineCounts()
    out = table.run(Batch.from_rows(rows), now_ms, counts, elapsed_ms)
    return list(out.rows()), counts


def by_id(rows: Sequence[Row]) -> dict[int, float]:
    return {pid: v for pid, _, v, _ in rows}


def test_function_codes_match_the_specs() -> None:
    assert aggregate_py.FUNCTIONS == AGGREGATE_FUNCTIONS
    assert load_kernels("cython", "aggregate").FUNCTIONS == AGGREGATE_FUNCTIONS


# -- hand-computed windows -----------------------------------------------------------------


def test_window_functions(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(window_ms=MIN)}, kern)
    vals = [4.0, 1.0, 7.0, 2.0]
    rows: list[Row] = [(1, 1000 * k, v, GOOD) for k, v in enumerate(vals)]
    out, counts = run(t, rows)
    assert out == [] and counts.suppressed == 4 and counts.windows == 0
    # the next minute's first reading closes the window; its aggregates come out first
    out, counts = run(t, [(1, MIN + 5, 10.0, GOOD)])
    assert counts.windows == 1 and counts.suppressed == 1
    assert [(pid, ts, q) for pid, ts, _, q in out] == [(100 + k, 0, GOOD) for k in range(8)]
    got = by_id(out)
    mean = sum(vals) / 4
    assert got[100] == 1.0  # min
    assert got[101] == 7.0  # max
    assert got[102] == pytest.approx(mean)  # mean
    assert got[103] == 14.0  # sum
    assert got[104] == 4.0  # count
    assert got[105] == 2.0  # last, by arrival
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 4)  # population std
    assert got[106] == pytest.approx(std, rel=1e-12)
    assert got[107] == pytest.approx(10 * math.log10(sum(10 ** (v / 10) for v in vals) / 4))


def test_single_reading_window(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(window_ms=1000)}, kern)
    out, _ = run(t, [(1, 500, -3.5, GOOD), (1, 1500, 0.0, GOOD)])
    assert by_id(out) == {
        100: -3.5,
        101: -3.5,
        102: -3.5,
        103: -3.5,
        104: 1.0,
        105: -3.5,
        106: 0.0,
        107: pytest.approx(-3.5),
    }


def test_laeq(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["laeq"], window_ms=MIN), 2: stage(["laeq"], 200)}, kern)
    rows: list[Row] = [(1, 0, 60.0, GOOD), (1, 1, 70.0, GOOD)]
    rows += [(2, k, 63.2, GOOD) for k in range(50)]
    out, _ = run(t, [*rows, (1, MIN, 0.0, GOOD), (2, MIN, 0.0, GOOD)])
    assert by_id(out)[100] == pytest.approx(10 * math.log10((1e6 + 1e7) / 2))
    assert by_id(out)[100] == pytest.approx(67.40362689)
    assert by_id(out)[200] == pytest.approx(63.2, abs=1e-12)  # constant level: itself


def test_windows_are_aligned_to_the_epoch(kern: ModuleType) -> None:
    t0 = 1_700_000_040_000  # a multiple of 60 000
    assert t0 % MIN == 0
    t = AggregateTable({1: stage(["count", "min"], window_ms=MIN)}, kern)
    rows: list[Row] = [
        (1, t0 - 1, 1.0, GOOD),  # window before
        (1, t0, 2.0, GOOD),  # first ms of [t0, t0 + 60000)
        (1, t0 + 59_999, 3.0, GOOD),  # last ms of it
        (1, t0 + 60_000, 4.0, GOOD),  # next window
    ]
    out, counts = run(t, rows)
    assert counts.windows == 2
    assert out == [
        (100, t0 - MIN, 1.0, GOOD),
        (101, t0 - MIN, 1.0, GOOD),
        (100, t0, 2.0, GOOD),
        (101, t0, 2.0, GOOD),
    ]


def test_negative_timestamps_floor(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["count"], window_ms=1000)}, kern)
    out, _ = run(t, [(1, -1, 1.0, GOOD), (1, -1000, 1.0, GOOD), (1, 0, 1.0, GOOD)])
    assert out == [(100, -1000, 2.0, GOOD)]  # -1 and -1000 share [-1000, 0)


def test_extreme_timestamps_do_not_overflow(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["count"], window_ms=MIN, grace_ms=10**18)}, kern)
    rows: list[Row] = [(1, INT64_MIN, 1.0, GOOD), (1, INT64_MIN + 1, 1.0, GOOD), (1, 0, 1.0, GOOD)]
    out, _ = run(t, rows)
    # the first window would start below INT64_MIN: clamped there
    assert out == [(100, INT64_MIN, 2.0, GOOD)]
    out, _ = run(t, [(1, INT64_MAX, 1.0, GOOD), (1, INT64_MAX - 1, 1.0, GOOD)], INT64_MAX)
    assert out == [(100, 0, 1.0, GOOD)]
    # the open window's end + grace is past int64: the clock can never reach it
    assert run(t, [], INT64_MAX) == ([], PipelineCounts())
    assert list(t.count) == [2]


def test_timed_close_with_grace(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["count", "last"], window_ms=MIN, grace_ms=2000)}, kern)
    out, counts = run(t, [(1, 10, 5.0, GOOD), (1, 20, 6.0, GOOD)], now_ms=30)
    assert out == []
    out, counts = run(t, [], now_ms=MIN + 1999)  # within grace: still open
    assert out == [] and counts.windows == 0
    out, counts = run(t, [(1, 59_000, 7.0, GOOD)], now_ms=MIN + 2000)
    # a reading within grace still counts; then the clock closes the window
    assert out == [(100, 0, 3.0, GOOD), (101, 0, 7.0, GOOD)] and counts.windows == 1
    # the window was emitted: a reading for it now is late, and nothing closes twice
    out, counts = run(t, [(1, 59_500, 8.0, GOOD)], now_ms=10 * MIN)
    assert out == [(1, 59_500, 8.0, GOOD)] and counts.late == 1 and counts.windows == 0
    # the point went quiet: no reading, no window, nothing to emit
    out, counts = run(t, [], now_ms=20 * MIN)
    assert out == [] and counts.windows == 0
    # a new window opens and closes normally
    out, counts = run(t, [(1, 20 * MIN + 1, 9.0, GOOD)], now_ms=20 * MIN + 10)
    assert out == []
    out, counts = run(t, [], now_ms=21 * MIN + 2000)
    assert out == [(100, 20 * MIN, 1.0, GOOD), (101, 20 * MIN, 9.0, GOOD)]


def test_no_clock_means_only_readings_close(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["count"], window_ms=1000, grace_ms=0)}, kern)
    assert run(t, [(1, 10, 5.0, GOOD)], now_ms=0)[0] == []
    assert run(t, [], now_ms=0)[0] == []
    assert run(t, [], now_ms=1000)[0] == [(100, 0, 1.0, GOOD)]


def test_timed_closes_come_after_the_readings_in_slot_order(kern: ModuleType) -> None:
    t = AggregateTable(
        {7: stage(["count"], 700, window_ms=1000), 3: stage(["count"], 300, window_ms=1000)}, kern
    )
    assert run(t, [(7, 0, 1.0, GOOD), (3, 0, 1.0, GOOD)])[0] == []
    out, counts = run(t, [(8, 5, 1.0, GOOD)], now_ms=1_000_000)
    assert out == [(8, 5, 1.0, GOOD), (300, 0, 1.0, GOOD), (700, 0, 1.0, GOOD)]
    assert counts.windows == 2


def test_late_readings_counted_not_aggregated(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["count", "sum"], window_ms=1000)}, kern)
    rows: list[Row] = [
        (1, 5000, 1.0, GOOD),
        (1, 4999, 100.0, GOOD),  # previous window: late, passes through
        (1, 5999, 2.0, GOOD),
        (1, 5000, 3.0, GOOD),  # repeated timestamp: same window, aggregated
        (1, 6000, 4.0, GOOD),
    ]
    out, counts = run(t, rows)
    assert counts.late == 1 and counts.suppressed == 4 and counts.windows == 1
    assert out == [(1, 4999, 100.0, GOOD), (100, 5000, 3.0, GOOD), (101, 5000, 6.0, GOOD)]


def test_bad_readings_pass_through_and_do_not_touch_the_window(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["count", "min", "max"], window_ms=1000)}, kern)
    rows: list[Row] = [
        (1, 10, 5.0, GOOD),
        (1, 20, -100.0, BAD),
        (1, 30, 100.0, UNCERTAIN),
        (1, 40, NAN, GOOD),
        (1, 50, INF, GOOD),
        (1, 60, -INF, GOOD),
        (1, 5000, 1.0, BAD),  # a later window, but bad: does not close the open one
        (1, 1500, 6.0, GOOD),  # closes [0, 1000)
    ]
    out, counts = run(t, rows)
    assert counts.windows == 1 and counts.suppressed == 2 and counts.late == 0
    passed = [(1, 20), (1, 30), (1, 40), (1, 50), (1, 60), (1, 5000)]
    assert [r[:2] for r in out] == [*passed, (100, 0), (101, 0), (102, 0)]
    assert math.isnan(out[2][2]) and out[1] == (1, 30, 100.0, UNCERTAIN)
    assert by_id(out[6:]) == {100: 1.0, 101: 5.0, 102: 5.0}
    # a point whose readings are all bad never opens a window
    out, counts = run(t, [], now_ms=10**12)
    assert by_id(out) == {100: 1.0, 101: 6.0, 102: 6.0} and counts.windows == 1
    out, counts = run(t, [(1, 10**7, NAN, GOOD)], now_ms=10**13)
    assert len(out) == 1 and counts.windows == 0


def test_raw_passes_readings_on(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["mean"], window_ms=1000, raw=True), 2: stage(["max"], 200)}, kern)
    rows: list[Row] = [
        (1, 0, 1.0, GOOD),
        (2, 0, 1.0, GOOD),
        (9, 0, 1.0, GOOD),  # no stage
        (1, 999, 2.0, GOOD),
        (1, 1000, 3.0, GOOD),
        (5, 0, 1.0, GOOD),  # within slot_of, no stage
    ]
    out, counts = run(t, rows)
    assert counts.suppressed == 1  # only point 2's reading
    assert out == [
        (1, 0, 1.0, GOOD),
        (9, 0, 1.0, GOOD),
        (1, 999, 2.0, GOOD),
        (100, 0, 1.5, GOOD),
        (1, 1000, 3.0, GOOD),
        (5, 0, 1.0, GOOD),
    ]


def test_interleaved_points_keep_their_own_windows(kern: ModuleType) -> None:
    t = AggregateTable(
        {1: stage(["sum"], 100, window_ms=10), 2: stage(["sum", "count"], 200, window_ms=100)},
        kern,
    )
    rows: list[Row] = [(1 + k % 2, k, float(k), GOOD) for k in range(30)]
    out, counts = run(t, rows)
    # point 1: even k, windows [0,10) and [10,20) close, [20,30) stays open
    assert out == [(100, 0, 20.0, GOOD), (100, 10, 70.0, GOOD)]
    assert counts.windows == 2 and counts.suppressed == 30
    out, counts = run(t, [], now_ms=10**6)
    assert out == [(100, 20, 120.0, GOOD), (200, 0, 225.0, GOOD), (201, 0, 15.0, GOOD)]


def test_table_and_kernel_validation(kern: ModuleType) -> None:
    with pytest.raises(ValueError, match="at least one"):
        AggregateStage(window_ms=10, outputs=())
    with pytest.raises(ValueError, match="beyond int64"):
        AggregateTable({1: stage(window_ms=2**63)}, kern)
    t = AggregateTable({1: stage(["count"], window_ms=10)}, kern)
    b = Batch.from_rows([(1, 0, 1.0, GOOD)])
    b.quality.append(0)
    with pytest.raises(ValueError, match="differ in length"):
        t.run(b, 0, PipelineCounts())
    # output columns shorter than the size the kernel asks for
    b = Batch.from_rows([(3, 0, 1.0, GOOD)])
    args = (t.slot_of, t.window_ms, t.grace_ms, t.raw, t.nfn, t.fcode, t.fout)
    state = (t.phase, t.start, t.count, t.acc, t.deadline)
    cols = (b.point_ids, b.timestamps, b.values, b.quality)
    with pytest.raises(ValueError, match="shorter"):
        kern.aggregate(*cols, *args, *state, 0, 0, array("I"), array("q"), array("d"), array("B"))
    with pytest.raises(ValueError, match="window must be > 0"):
        kern.aggregate_size(
            *cols, t.slot_of, array("q", [0]), *args[2:5], t.phase, t.start, t.deadline, 0, 0
        )
    with pytest.raises(ValueError, match="slot arrays differ"):
        kern.aggregate_size(*cols, *args[:5], t.phase, t.start, array("q"), 0, 0)


def test_empty_batch(kern: ModuleType) -> None:
    t = AggregateTable({1: stage(["count"], window_ms=10)}, kern)
    assert run(t, []) == ([], PipelineCounts())


def test_pipeline_runs_the_table(kern: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    real = impl.kernels
    monkeypatch.setattr(impl, "kernels", lambda name: kern if name == "aggregate" else real(name))
    p = Pipeline({1: [stage(["max"], 50, window_ms=1000)]})
    assert p.timed
    out, counts = p.process(Batch.from_rows([(1, 1, 3.0, GOOD), (1, 2, 4.0, GOOD)]), 500)
    assert len(out) == 0 and counts.suppressed == 2
    saved = p.save_state()
    p2 = Pipeline({1: [stage(["max"], 50, window_ms=1000)]})
    assert p2.load_state(saved) == 1
    out, counts = p2.process(Batch(), 5000)
    assert list(out.rows()) == [(50, 0, 4.0, GOOD)] and counts.windows == 1


# -- save / restore ------------------------------------------------------------------------


def test_save_load_round_trip(kern: ModuleType) -> None:
    specs = {1: stage(window_ms=1000), 2: stage(["mean", "std"], 200, window_ms=500, raw=True)}
    first: list[Row] = [(1, 10, 3.0, GOOD), (2, 20, 1.0, GOOD), (1, 30, 5.0, GOOD)]
    second: list[Row] = [(1, 40, 8.0, GOOD), (2, 700, 2.0, GOOD), (1, 1200, 1.0, GOOD)]
    a = AggregateTable(specs, kern)
    run(a, first)
    saved = a.save_state()
    b = AggregateTable(specs, kern)
    assert b.load_state(saved) == 2
    assert state_bytes(a) == state_bytes(b)
    assert run(a, second, now_ms=5000) == run(b, second, now_ms=5000)
    # a changed spec does not resume a stale state
    c = AggregateTable({1: stage(window_ms=2000), 2: specs[2]}, kern)
    assert c.load_state(saved) == 1
    out, _ = run(c, second)
    assert 100 not in by_id(out)


# -- the clocks: the timed close is measured on the monotonic clock ------------------------

HOUR = 3_600_000
K = 1_780_000_020_000  # a minute's start on the wall clock


@pytest.mark.parametrize("step_ms", [2 * HOUR, -HOUR])
def test_timed_close_ignores_wall_clock_steps(kern: ModuleType, step_ms: int) -> None:
    """Windows of several points open, then the gateway's wall clock steps: +2 h must not
    close them all at once (the readings that follow, stamped by their devices, still
    belong to them), -1 h must not hold them open for an hour. They close when end +
    grace has passed on the monotonic clock."""
    t = AggregateTable({pid: stage(["count"], 100 * pid, grace_ms=2000) for pid in (1, 2, 3)}, kern)
    real, mono = K + 10_000, 5_000  # the right time, and a monotonic clock
    wall = real

    def flush(*ts: int) -> tuple[list[Row], Any]:
        return run(t, [(pid, x, 1.0, GOOD) for x in ts for pid in (1, 2, 3)], wall, mono)

    assert flush(real) == ([], PipelineCounts(suppressed=3))
    real, mono, wall = real + 11_000, mono + 11_000, real + 11_000 + step_ms
    out, counts = flush()
    assert out == [] and counts.windows == 0
    real, mono, wall = real + 20_000, mono + 20_000, wall + 20_000
    # a reading stamped by its device in the open window: aggregated, not late
    assert flush(real) == ([], PipelineCounts(suppressed=3))
    end_plus_grace = K + MIN + 2000
    mono, wall = mono + end_plus_grace - real - 1, wall + end_plus_grace - real - 1
    assert flush() == ([], PipelineCounts())
    out, counts = run(t, [], wall + 1, mono + 1)
    assert out == [(100, K, 2.0, GOOD), (200, K, 2.0, GOOD), (300, K, 2.0, GOOD)]
    assert counts.windows == 3


def test_timed_close_within_grace_follows_the_wall_clock(kern: ModuleType) -> None:
    """Without a step the close is where the wall clock passes end + grace, for a reading
    that arrived within the grace; one that arrived later (or a wall clock that stepped
    ahead) moves the close by the grace at most."""
    t = AggregateTable({1: stage(["count"], grace_ms=2000)}, kern)
    run(t, [(1, K + 5000, 1.0, GOOD)], K + 5800, 100)  # 800 ms on its way: lag counted
    assert run(t, [], K + MIN + 1999, 100 + MIN - 5000 + 1199)[1].windows == 0
    assert run(t, [], K + MIN + 2000, 100 + MIN - 5000 + 1200)[1].windows == 1
    run(t, [(1, K + MIN + 5000, 1.0, GOOD)], K + 2 * HOUR, 0)  # 2 h late: grace dropped
    assert run(t, [], K + 2 * HOUR, MIN - 5000 - 1)[1].windows == 0
    assert run(t, [], K + 2 * HOUR, MIN - 5000)[1].windows == 1


def test_aggregate_state_of_the_previous_version_loads(kern: ModuleType) -> None:
    """A window saved before the monotonic clock (no deadline, no pipeline clock) loads,
    goes on aggregating, and closes by time within window + grace of the restart (the
    pipeline clock starts at 0), not at once."""
    specs = {1: stage(["count"], grace_ms=2000), 2: stage(["count"], 200, grace_ms=2000)}
    t = AggregateTable(specs, kern)
    run(t, [(1, K + 1000, 1.0, GOOD), (2, K - 5000, 1.0, GOOD), (2, K, 1.0, GOOD)], K + 1000)
    old = {pid: saved_without(t, pid, ("deadline",)) for pid in specs}
    restarted = AggregateTable(specs, kern)
    assert restarted.load_state(old) == 2
    assert state_bytes(restarted)["phase"] == state_bytes(t)["phase"]
    assert run(restarted, [(1, K + 2000, 1.0, GOOD)], K + 3 * HOUR, 0) == (
        [],
        PipelineCounts(suppressed=1),
    )
    assert run(restarted, [], K + 3 * HOUR, MIN + 1999)[1].windows == 0
    out, counts = run(restarted, [], K + 3 * HOUR, MIN + 2000)
    assert out == [(100, K, 2.0, GOOD), (200, K, 1.0, GOOD)] and counts.windows == 2


# -- random batches: both implementations, split or not, saved or not ----------------------

WINDOWS = [1, 7, 100, 1000, MIN]
GRACES = [0, 50, 2000]
FUNCS = hs.lists(hs.sampled_from(AGGREGATE_FUNCTIONS), min_size=1, max_size=8, unique=True)
SPEC = hs.builds(
    lambda fns, w, g, raw: (fns, w, g, raw),
    FUNCS,
    hs.sampled_from(WINDOWS),
    hs.sampled_from(GRACES),
    hs.booleans(),
)
VALUE = hs.one_of(
    hs.floats(allow_nan=True, allow_infinity=True),
    hs.sampled_from([0.0, -0.0, NAN, INF, -INF, 1e308, -1e308, 5e-324, 4000.0, -4000.0]),
    hs.floats(-200.0, 200.0),
)
TS = hs.one_of(
    hs.integers(-3000, 200_000),
    hs.sampled_from([INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1, -1, 0]),
)
ROW = hs.tuples(hs.integers(0, 6), TS, VALUE, hs.sampled_from([GOOD, GOOD, GOOD, BAD, UNCERTAIN]))
ELAPSED = hs.one_of(hs.none(), hs.integers(0, 300_000), hs.sampled_from([INT64_MIN, INT64_MAX]))
NOW = hs.one_of(
    hs.just(0),
    hs.integers(-1000, 300_000),
    hs.sampled_from([INT64_MIN, INT64_MAX]),
    # on and next to a window's end + grace
    hs.builds(
        lambda k, w, g, d: k * w + g + d,
        hs.integers(-2, 200),
        hs.sampled_from(WINDOWS),
        hs.sampled_from(GRACES),
        hs.integers(-1, 1),
    ),
)


def build_specs(raw_specs: list[tuple[list[str], int, int, bool]]) -> dict[int, AggregateStage]:
    # points 0..len-1 have the stage (the rows use ids up to 6: some have none, some are
    # past slot_of)
    return {
        pid: stage(fns, 1000 + 10 * pid, window_ms=w, grace_ms=g, raw=raw)
        for pid, (fns, w, g, raw) in enumerate(raw_specs)
    }


def make_batch(rows: Sequence[Row]) -> Batch:
    return Batch.from_rows(rows)


Step = tuple[list[Row], int, int | None]  # readings, wall clock, monotonic (None: the wall)


def drive(
    table: AggregateTable, steps: Sequence[Step]
) -> list[tuple[tuple[bytes, ...], tuple[int, int, int]]]:
    results = []
    for rows, now, elapsed in steps:
        counts = PipelineCounts()
        out = table.run(make_batch(rows), now, counts, elapsed)
        results.append((columns(out), (counts.windows, counts.late, counts.suppressed)))
    return results


STEPS = hs.lists(hs.tuples(hs.lists(ROW, max_size=40), NOW, ELAPSED), min_size=1, max_size=6)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def on_the_edge(
    specs: dict[int, AggregateStage], steps: list[Step], data: hs.DataObject
) -> list[Step]:
    """Moves some steps' clock onto (or 1 ms next to) the end + grace of the window of
    one of the readings so far, where a timed close is decided (both clocks the same:
    then a window opened by a reading within its grace closes there)."""
    seen: list[Row] = []
    out = []
    for rows, now, elapsed in steps:
        seen += [r for r in rows if r[0] in specs and INT64_MIN / 2 < r[1] < INT64_MAX / 2]
        move: bool = data.draw(hs.booleans())
        if move and seen:
            pid, ts, _, _ = data.draw(hs.sampled_from(seen))
            w, g = specs[pid].window_ms, specs[pid].grace_ms
            now, elapsed = ts - ts % w + w + g + data.draw(hs.integers(-1, 1)), None
        out.append((rows, now, elapsed))
    return out


@SETTINGS
@given(hs.lists(SPEC, min_size=1, max_size=5), STEPS, hs.data())
def test_twins_agree(raw_specs: list[Any], steps: list[Step], data: hs.DataObject) -> None:
    specs = build_specs(raw_specs)
    steps = on_the_edge(specs, steps, data)
    cy, py = (AggregateTable(specs, k) for k in both())
    assert drive(cy, steps) == drive(py, steps)
    assert state_bytes(cy) == state_bytes(py)


@SETTINGS
@given(hs.lists(SPEC, min_size=1, max_size=5), hs.lists(ROW, max_size=80), hs.data())
def test_split_batches_give_the_same_output(
    raw_specs: list[Any], rows: list[Row], data: hs.DataObject
) -> None:
    """One batch or the same readings in several at the same clocks: same output, same
    counts, same state (a window never closes by time in the run that opened it)."""
    specs = build_specs(raw_specs)
    now, elapsed = data.draw(NOW), data.draw(ELAPSED)
    cuts = sorted(data.draw(hs.lists(hs.integers(0, len(rows)), max_size=4)))
    pieces = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)]
    for k in both():
        whole = AggregateTable(specs, k)
        split = AggregateTable(specs, k)
        ((cols, counts),) = drive(whole, [(rows, now, elapsed)])
        results = drive(split, [(p, now, elapsed) for p in pieces])
        joined = tuple(b"".join(r[0][c] for r in results) for c in range(4))
        total = tuple(sum(r[1][c] for r in results) for c in range(3))
        assert (joined, total) == (cols, counts)
        assert state_bytes(whole) == state_bytes(split)


@SETTINGS
@given(hs.lists(SPEC, min_size=1, max_size=5), STEPS, hs.lists(ROW, max_size=80), hs.data())
def test_a_run_in_parts_is_the_run(
    raw_specs: list[Any], before: list[Step], rows: list[Row], data: hs.DataObject
) -> None:
    """After any earlier runs (windows open, some due now), one run's readings cut into
    parts (``run_part`` for all but the last) give exactly the one run's output, counts
    and state: the windows due close after the last part, as after the whole batch."""
    specs = build_specs(raw_specs)
    now, elapsed = data.draw(NOW), data.draw(ELAPSED)
    cuts = sorted(data.draw(hs.lists(hs.integers(0, len(rows)), max_size=4)))
    pieces = [rows[a:b] for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)]
    for k in both():
        whole, split = AggregateTable(specs, k), AggregateTable(specs, k)
        drive(whole, before)
        drive(split, before)
        ((cols, counts),) = drive(whole, [(rows, now, elapsed)])
        results = []
        for i, piece in enumerate(pieces):
            c = PipelineCounts()
            run = split.run if i == len(pieces) - 1 else split.run_part
            out = run(make_batch(piece), now, c, elapsed)
            results.append((columns(out), (c.windows, c.late, c.suppressed)))
        joined = tuple(b"".join(r[0][c] for r in results) for c in range(4))
        total = tuple(sum(r[1][c] for r in results) for c in range(3))
        assert (joined, total) == (cols, counts)
        assert state_bytes(whole) == state_bytes(split)


@SETTINGS
@given(hs.lists(SPEC, min_size=1, max_size=5), STEPS, hs.data())
def test_restored_table_continues_exactly(
    raw_specs: list[Any], steps: list[Step], data: hs.DataObject
) -> None:
    specs = build_specs(raw_specs)
    at = data.draw(hs.integers(0, len(steps)))
    for k in both():
        ran_on = AggregateTable(specs, k)
        drive(ran_on, steps[:at])
        restored = AggregateTable(specs, k)
        assert restored.load_state(ran_on.save_state()) == len(specs)
        assert drive(restored, steps[at:]) == drive(ran_on, steps[at:])
        assert state_bytes(restored) == state_bytes(ran_on)


@SETTINGS
@given(hs.lists(SPEC, min_size=1, max_size=5), STEPS)
def test_size_is_exact(raw_specs: list[Any], steps: list[Step]) -> None:
    """aggregate_size predicts aggregate's row count, and changes no state."""
    for k in both():
        t = AggregateTable(specs := build_specs(raw_specs), k)
        for rows, now, elapsed in steps:
            b = make_batch(rows)
            before = state_bytes(t)
            cols = (b.point_ids, b.timestamps, b.values, b.quality)
            params = (t.slot_of, t.window_ms, t.grace_ms, t.raw, t.nfn)
            clocks = (now, now if elapsed is None else elapsed)
            size = k.aggregate_size(*cols, *params, t.phase, t.start, t.deadline, *clocks)
            assert state_bytes(t) == before
            out = Batch.from_rows([(0, 0, 0.0, 0)] * (size + 3))
            n_out, *_ = k.aggregate(
                *cols, *params, t.fcode, t.fout, t.phase, t.start, t.count, t.acc, t.deadline,
                *clocks, out.point_ids, out.timestamps, out.values, out.quality,
            )  # fmt: skip
            assert n_out == size
            assert list(out.rows())[size:] == [(0, 0, 0.0, 0)] * 3  # nothing past n_out
        assert len(specs) == len(t)
