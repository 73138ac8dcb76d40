"""Filter stages (hampel, median, deadband, sdt, rate limit, ema): both kernel
implementations against each other, hand-computed behaviour, the SDT error bound and
state carried across batches and restarts."""

from __future__ import annotations

import itertools
import math
import random
from array import array
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from native import filters_py
from native.batch import BAD, GOOD, UNCERTAIN, Batch
from native.filters import (
    MAD_SCALE,
    DeadbandTable,
    EmaTable,
    FilterTable,
    HampelTable,
    MedianTable,
    RateLimitTable,
    SdtTable,
)
from native.pipeline import Pipeline
from native.stages import (
    DeadbandStage,
    EmaStage,
    HampelStage,
    MedianStage,
    RateLimitStage,
    SdtStage,
)
from native.table import PipelineCounts
from tests.helpers import columns, load_kernels, state_bytes

NAN = math.nan
INF = math.inf
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

Row = tuple[int, int, float, int]
Table = FilterTable[Any]

TABLES: dict[str, type[Table]] = {
    "hampel": HampelTable,
    "median": MedianTable,
    "deadband": DeadbandTable,
    "sdt": SdtTable,
    "ratelimit": RateLimitTable,
    "ema": EmaTable,
}


@pytest.fixture(params=["cython", "python"])
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return load_kernels(request.param, "filters")


def run(table: Table, batches: Sequence[Batch]) -> tuple[list[Batch], PipelineCounts]:
    """Runs copies of ``batches`` through ``table``; the outputs and the counts."""
    counts = PipelineCounts()
    outs = [table.run(Batch.concat([b]), 0, counts) for b in batches]
    return outs, counts


def rows(table: Table, data: Sequence[Row], counts: PipelineCounts | None = None) -> list[Row]:
    out = table.run(Batch.from_rows(data), 0, counts if counts is not None else PipelineCounts())
    return list(out.rows())


def good(pid: int, points: Sequence[tuple[int, float]]) -> list[Row]:
    return [(pid, t, v, GOOD) for t, v in points]


def split(data: Sequence[Row], cuts: Sequence[int]) -> list[Batch]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [Batch.from_rows(data[a:b]) for a, b in itertools.pairwise(bounds)]


# -- random inputs for the twin tests ------------------------------------------------------

STAGE_PIDS = (0, 1, 2, 3, 5)  # 4: below the end of slot_of without a stage; 6, 7: past it

SPECS: dict[str, st.SearchStrategy[Any]] = {
    "hampel": st.builds(
        HampelStage,
        window=st.integers(3, 9),
        threshold=st.sampled_from([0.5, 1.0, 3.0]),
        action=st.sampled_from(["replace", "flag", "drop"]),
    ),
    "median": st.builds(MedianStage, window=st.integers(2, 8)),
    "deadband": st.builds(
        DeadbandStage,
        band=st.sampled_from([0.0, 0.5, 2.0]),
        heartbeat_ms=st.sampled_from([0, 1, 50, 1000]),
    ),
    "sdt": st.builds(
        SdtStage,
        deviation=st.sampled_from([0.1, 1.0, 5.0]),
        max_interval_ms=st.sampled_from([0, 100, 2000]),
        min_interval_ms=st.sampled_from([0, 0, 10, 50]),
    ),
    "ratelimit": st.builds(
        RateLimitStage,
        max_rate=st.sampled_from([0.5, 10.0, 1000.0]),
        action=st.sampled_from(["clamp", "flag", "drop"]),
    ),
    "ema": st.one_of(
        st.builds(EmaStage, alpha=st.sampled_from([0.1, 0.5, 1.0])),
        st.builds(EmaStage, tau_ms=st.sampled_from([1, 100, 5000])),
    ),
}

VALUES = st.one_of(
    st.integers(-4, 4).map(float),  # ties: medians, MAD == 0, deadband edges
    st.floats(-100.0, 100.0),
    st.floats(),  # anything: NaN, +-inf, subnormals, +-1.8e308
    st.sampled_from([-0.0, 0.0, 1e308, -1e308, 5e-324, NAN, INF, -INF]),
)
STEPS = st.one_of(
    st.integers(-3, 3),  # repeated and backwards time
    st.integers(1, 3000),
    st.integers(-(2**64), 2**64),  # far jumps, clipped to the int64 ends
)


@st.composite
def readings(draw: st.DrawFn) -> list[Row]:
    """Interleaved readings of points 0..7, per-point timestamps walking by STEPS."""
    raw = draw(
        st.lists(
            st.tuples(
                st.integers(0, 7),
                STEPS,
                VALUES,
                st.sampled_from([GOOD] * 6 + [BAD, UNCERTAIN]),
            ),
            max_size=150,
        )
    )
    start = draw(st.sampled_from([0, 1_700_000_000_000, I64_MIN, I64_MAX]))
    clock: dict[int, int] = {}
    out = []
    for pid, step, value, q in raw:
        ts = min(I64_MAX, max(I64_MIN, clock.get(pid, start) + step))
        clock[pid] = ts
        out.append((pid, ts, value, q))
    return out


def twin_case(kind: str) -> Callable[..., None]:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        specs=st.fixed_dictionaries({pid: SPECS[kind] for pid in STAGE_PIDS}),
        data=readings(),
        cuts=st.lists(st.integers(0, 200), max_size=4),
    )
    def check(specs: dict[int, Any], data: list[Row], cuts: list[int]) -> None:
        batches = split(data, cuts)
        results = []
        for name in ("cython", "python"):
            table = TABLES[kind](specs, kernels=load_kernels(name, "filters"))
            outs, counts = run(table, batches)
            results.append(([columns(b) for b in outs], counts, state_bytes(table)))
        assert results[0] == results[1]
        # the same input in one batch: the same readings out, the same state after
        whole = TABLES[kind](specs, kernels=filters_py)
        outs, counts = run(whole, [Batch.from_rows(data)])
        split_outs = results[1][0]
        joined = tuple(b"".join(col[k] for col in split_outs) for k in range(4))
        assert columns(outs[0]) == joined
        assert counts == results[1][1]
        assert state_bytes(whole) == results[1][2]

    return check


test_twins_hampel = twin_case("hampel")
test_twins_median = twin_case("median")
test_twins_deadband = twin_case("deadband")
test_twins_sdt = twin_case("sdt")
test_twins_ratelimit = twin_case("ratelimit")
test_twins_ema = twin_case("ema")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", sorted(TABLES))
def test_twins_on_long_runs(kind: str, seed: int) -> None:
    """Long per-point histories (windows wrap many times, doors narrow for long)."""
    rng = random.Random(f"{kind}{seed}")
    draw = {
        "hampel": lambda: HampelStage(
            window=rng.randrange(3, 40), threshold=rng.choice([0.5, 3.0]), action="replace"
        ),
        "median": lambda: MedianStage(window=rng.randrange(2, 40)),
        "deadband": lambda: DeadbandStage(band=rng.choice([0.5, 3.0]), heartbeat_ms=5000),
        "sdt": lambda: SdtStage(deviation=rng.choice([0.5, 3.0]), max_interval_ms=20_000),
        "ratelimit": lambda: RateLimitStage(max_rate=rng.choice([1.0, 20.0]), action="clamp"),
        "ema": lambda: EmaStage(tau_ms=rng.choice([500, 5000])),
    }[kind]
    specs = {pid: draw() for pid in range(0, 40, 2)}
    clock = [rng.randrange(10**12) for _ in range(41)]
    level = [0.0] * 41
    data = []
    for _ in range(4000):
        pid = rng.randrange(41)
        clock[pid] += rng.choice([1000, 1000, 1000, 999, 0, -5, 37_000])
        level[pid] += rng.gauss(0, 1)
        v = level[pid] + (rng.choice([80.0, -80.0]) if rng.random() < 0.02 else 0.0)
        q = BAD if rng.random() < 0.005 else GOOD
        data.append((pid, clock[pid], v, q))
    batches = split(data, [rng.randrange(4000) for _ in range(5)])
    results = []
    for name in ("cython", "python"):
        table = TABLES[kind](specs, kernels=load_kernels(name, "filters"))
        outs, counts = run(table, batches)
        results.append(([columns(b) for b in outs], counts, state_bytes(table)))
    assert results[0] == results[1]


# -- hampel --------------------------------------------------------------------------------


def test_hampel_replaces_a_spike_with_the_median(mod: ModuleType) -> None:
    t = HampelTable({1: HampelStage(window=5, threshold=3.0)}, kernels=mod)
    counts = PipelineCounts()
    # full at 5: m=3, MAD=1, |5-3|=2 <= 4.45; then [2,3,4,5,100]: m=4, MAD=1 -> spike;
    # then [3,4,5,100,6] (the raw 100 stays in the window): m=5, MAD=1, |6-5| ok
    data = good(1, list(enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 6.0])))
    out = rows(t, data, counts)
    assert [v for _, _, v, _ in out] == [1.0, 2.0, 3.0, 4.0, 5.0, 4.0, 6.0]
    assert [q for *_, q in out] == [GOOD] * 7
    assert counts == PipelineCounts(replaced=1)


def test_hampel_flag_and_drop(mod: ModuleType) -> None:
    data = good(1, list(enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 6.0])))
    data.insert(3, (2, 99, 1e9, GOOD))  # another point, no stage: untouched, in order
    flag = HampelTable({1: HampelStage(window=5, action="flag")}, kernels=mod)
    counts = PipelineCounts()
    out = rows(flag, data, counts)
    assert out == [*data[:6], (1, 5, 100.0, BAD), data[7]]
    assert counts == PipelineCounts(flagged=1)
    drop = HampelTable({1: HampelStage(window=5, action="drop")}, kernels=mod)
    counts = PipelineCounts()
    out = rows(drop, data, counts)
    assert out == [*data[:6], data[7]]
    assert counts == PipelineCounts(dropped=1)


def test_hampel_zero_mad_and_unjudged_while_filling(mod: ModuleType) -> None:
    t = HampelTable({1: HampelStage(window=3, threshold=100.0)}, kernels=mod)
    # 0, 50: window not full -> unjudged; [0, 50, 50] m=50 MAD=0: 0 is not judged (past)
    out = rows(t, good(1, [(0, 0.0), (1, 50.0), (2, 50.0), (3, 50.0), (4, 50.001)]))
    assert [v for _, _, v, _ in out] == [0.0, 50.0, 50.0, 50.0, 50.0]


def test_hampel_bad_reading_passes_and_restarts_the_window(mod: ModuleType) -> None:
    t = HampelTable({1: HampelStage(window=3)}, kernels=mod)
    data = [*good(1, [(0, 5.0), (1, 5.0), (2, 5.0)]), (1, 3, 7.0, UNCERTAIN), (1, 4, NAN, GOOD)]
    data += good(1, [(5, 9.0), (6, 9.0)])  # window refilling: unjudged, not replaced by 5
    out = rows(t, data)
    assert out[:4] + out[5:] == data[:4] + data[5:]
    assert math.isnan(out[4][2]) and out[4][3] == GOOD


def test_hampel_threshold_uses_the_mad_scale(mod: ModuleType) -> None:
    # window 3 of [0, 1, x]: m = 1, MAD = 1 (for x in 2..3); limit |x - 1| <= 1.4826
    t = HampelTable({1: HampelStage(window=3, threshold=1.0)}, kernels=mod)
    assert list(t.k) == [MAD_SCALE]
    inside = rows(t, good(1, [(0, 0.0), (1, 1.0), (2, 2.48)]))
    assert inside[-1][2] == 2.48
    t = HampelTable({1: HampelStage(window=3, threshold=1.0)}, kernels=mod)
    outside = rows(t, good(1, [(0, 0.0), (1, 1.0), (2, 2.49)]))
    assert outside[-1][2] == 1.0


def test_hampel_even_window_mad_is_the_mean_of_the_middle_deviations(mod: ModuleType) -> None:
    # [0, 1, 2, 3.5]: m = 1.5, deviations 1.5 .5 .5 2 -> MAD (0.5 + 1.5) / 2 = 1, so
    # |3.5 - 1.5| = 2 > 1.4826: a spike (with the upper middle deviation it would not be)
    t = HampelTable({1: HampelStage(window=4, threshold=1.0)}, kernels=mod)
    out = rows(t, good(1, [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.5)]))
    assert [v for _, _, v, _ in out] == [0.0, 1.0, 2.0, 1.5]


def naive_filter(kind: str, specs: dict[int, Any], data: list[Row]) -> list[Row]:
    """Hampel ("replace") or median computed the obvious way, with sorted() lists."""

    def med(xs: list[float]) -> float:
        xs = sorted(xs)
        h = len(xs) // 2
        return xs[h] if len(xs) % 2 else (xs[h - 1] + xs[h]) / 2

    windows: dict[int, list[float]] = {}
    out = []
    for pid, ts, v, q in data:
        spec = specs.get(pid)
        if spec is None:
            out.append((pid, ts, v, q))
            continue
        if q != GOOD or not math.isfinite(v):
            windows[pid] = []
            out.append((pid, ts, v, q))
            continue
        win = windows.setdefault(pid, [])
        win.append(v)
        del win[: -spec.window]
        m = med(win)
        if kind == "median":
            v = m
        elif len(win) == spec.window:
            mad = med([abs(x - m) for x in win])
            if abs(v - m) > spec.threshold * MAD_SCALE * mad:
                v = m
        out.append((pid, ts, v, q))
    return out


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["hampel", "median"]),
    windows=st.lists(st.integers(3, 9), min_size=3, max_size=3),
    threshold=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
    data=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.one_of(st.integers(-3, 3).map(float), st.floats(-1e3, 1e3), st.just(NAN)),
            st.sampled_from([GOOD] * 8 + [BAD]),
        ),
        max_size=200,
    ),
    impl_name=st.sampled_from(["cython", "python"]),
)
def test_windows_match_a_naive_reference(
    kind: str,
    windows: list[int],
    threshold: float,
    data: list[tuple[int, float, int]],
    impl_name: str,
) -> None:
    specs: dict[int, Any] = {
        pid: HampelStage(window=w, threshold=threshold) if kind == "hampel" else MedianStage(w)
        for pid, w in enumerate(windows)
    }
    readings = [(pid, i, v, q) for i, (pid, v, q) in enumerate(data)]
    table = TABLES[kind](specs, kernels=load_kernels(impl_name, "filters"))
    got = rows(table, readings)
    want = naive_filter(kind, specs, readings)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[:2] == w[:2] and g[3] == w[3]
        assert g[2] == w[2] or (math.isnan(g[2]) and math.isnan(w[2])), (g, w)


# -- median --------------------------------------------------------------------------------


def test_median_even_and_odd_windows(mod: ModuleType) -> None:
    t = MedianTable({1: MedianStage(window=4), 2: MedianStage(window=3)}, kernels=mod)
    data = good(1, list(enumerate([1.0, 4.0, 2.0, 8.0, 6.0])))
    data += good(2, list(enumerate([5.0, 1.0, 9.0, -3.0, 2.0])))
    out = rows(t, data)
    assert [v for _, _, v, _ in out] == [1.0, 2.5, 2.0, 3.0, 5.0, 5.0, 3.0, 5.0, 1.0, 2.0]


def test_median_bad_reading_passes_and_restarts(mod: ModuleType) -> None:
    t = MedianTable({1: MedianStage(window=3)}, kernels=mod)
    data = [*good(1, [(0, 10.0), (1, 20.0)]), (1, 2, -INF, GOOD), (1, 3, 0.0, BAD)]
    data += good(1, [(4, 1.0), (5, 3.0)])
    out = rows(t, data)
    assert out == [(1, 0, 10.0, 0), (1, 1, 15.0, 0), data[2], data[3], data[4], (1, 5, 2.0, 0)]


def test_median_of_huge_values_does_not_overflow(mod: ModuleType) -> None:
    t = MedianTable({1: MedianStage(window=2)}, kernels=mod)
    out = rows(t, good(1, [(0, 1.7e308), (1, 1.7e308)]))
    assert out[1][2] == 1.7e308


# -- deadband ------------------------------------------------------------------------------


def test_deadband_step_sends_the_held_reading_first(mod: ModuleType) -> None:
    t = DeadbandTable({1: DeadbandStage(band=1.0)}, kernels=mod)
    counts = PipelineCounts()
    data = good(1, [(0, 10.0), (1, 10.5), (2, 10.8), (3, 12.0), (4, 12.5), (5, 11.0)])
    data.insert(2, (7, 2, 1.0, GOOD))  # no stage (past slot_of): passes in order
    out = rows(t, data, counts)
    assert out == [(1, 0, 10.0, 0), (7, 2, 1.0, 0), (1, 2, 10.8, 0), (1, 3, 12.0, 0)]
    assert counts.suppressed == 2  # 10.5 and 12.5; 11.0 (held) is not decided yet
    # the next batch releases the held reading of the last one, before its own
    counts = PipelineCounts()
    out = rows(t, good(1, [(6, 9.0)]), counts)
    assert out == [(1, 5, 11.0, 0), (1, 6, 9.0, 0)]
    assert counts.suppressed == 0


def test_deadband_heartbeat(mod: ModuleType) -> None:
    t = DeadbandTable({1: DeadbandStage(band=1.0, heartbeat_ms=10)}, kernels=mod)
    counts = PipelineCounts()
    data = good(1, [(0, 5.0), (3, 5.1), (6, 5.2), (10, 5.3), (12, 5.0), (25, 5.0), (20, 5.0)])
    out = rows(t, data, counts)
    # 10 and 25: heartbeats (held readings are dropped, not sent); 20: the clock went back
    assert out == [(1, 0, 5.0, 0), (1, 10, 5.3, 0), (1, 25, 5.0, 0), (1, 20, 5.0, 0)]
    assert counts.suppressed == 3


def test_deadband_bad_reading_flushes_and_restarts(mod: ModuleType) -> None:
    t = DeadbandTable({1: DeadbandStage(band=1.0)}, kernels=mod)
    data = [*good(1, [(0, 1.0), (1, 1.2)]), (1, 2, NAN, GOOD), (1, 3, 1.3, GOOD)]
    data += [(1, 4, 1.4, BAD), (1, 5, 1.4, GOOD)]
    out = rows(t, data)
    assert out[:2] == [(1, 0, 1.0, 0), (1, 1, 1.2, 0)]
    assert out[2][:2] == (1, 2) and math.isnan(out[2][2])
    assert out[3:] == [(1, 3, 1.3, 0), (1, 4, 1.4, BAD), (1, 5, 1.4, 0)]


def test_deadband_zero_band_sends_every_change(mod: ModuleType) -> None:
    t = DeadbandTable({1: DeadbandStage(band=0.0)}, kernels=mod)
    out = rows(t, good(1, [(0, 1.0), (1, 1.0), (2, 1.0), (3, 2.0)]))
    assert out == good(1, [(0, 1.0), (2, 1.0), (3, 2.0)])


@pytest.mark.parametrize("kind", ["deadband", "sdt"])
def test_output_longer_than_the_input(kind: str, mod: ModuleType) -> None:
    """Held readings of earlier batches released at the start of a short batch: the
    output runs ahead of the input (rows wait, then spill past its end) yet keeps the
    order: each held reading right before the reading that released it."""
    spec = DeadbandStage(band=1.0) if kind == "deadband" else SdtStage(deviation=1.0)
    t = TABLES[kind]({pid: spec for pid in range(5)}, kernels=mod)
    # each point: sent/archived (0, 0.0), then (1, 0.5) held
    rows(t, [(pid, 0, 0.0, GOOD) for pid in range(5)] + [(pid, 1, 0.5, GOOD) for pid in range(5)])
    # a reading of each point releases its held one and comes out too (deadband: a jump;
    # sdt: a bad reading, as a jump would archive the held one and hold itself); then
    # readings of a point without the stage pass: with 5 rows waiting from the start,
    # the compiled FIFO (2 * 5 + 4 rows) runs into its end several times
    q = GOOD if kind == "deadband" else BAD
    jumps = [(pid, 2, 10.0 + pid, q) for pid in range(5)]
    others = [(9, 3 + k, float(k), UNCERTAIN) for k in range(40)]
    counts = PipelineCounts()
    out = rows(t, jumps + others, counts)
    released = [r for pid in range(5) for r in ((pid, 1, 0.5, GOOD), jumps[pid])]
    assert out == released + others
    assert counts.suppressed == 0


# -- sdt -----------------------------------------------------------------------------------


def test_sdt_ramp_keeps_only_its_ends(mod: ModuleType) -> None:
    t = SdtTable({1: SdtStage(deviation=0.5)}, kernels=mod)
    counts = PipelineCounts()
    ramp = good(1, [(1000 * i, 2.0 * i) for i in range(11)])
    assert rows(t, ramp, counts) == ramp[:1]
    assert counts.suppressed == 9  # 1..9; 10 is held
    out = rows(t, good(1, [(11_000, 0.0)]), counts)  # breaks the trend: the end comes out
    assert out == ramp[-1:]
    assert counts.suppressed == 9


def test_sdt_archives_the_held_point_when_the_door_closes(mod: ModuleType) -> None:
    t = SdtTable({1: SdtStage(deviation=1.0)}, kernels=mod)
    # from (0, 0): (1, 0.5) door [-0.5, 1.5]; (2, 3) slope 1.5 in door -> door [1, 1.5];
    # (3, 0) slope 0 < 1 -> archive (2, 3); from it (3, 0) is held; (4, 0): slope from
    # (2,3) = -1.5 vs door [-4, -2] -> archive (3, 0)
    data = good(1, [(0, 0.0), (1, 0.5), (2, 3.0), (3, 0.0), (4, 0.0)])
    assert rows(t, data) == [data[0], data[2], data[3]]


def test_sdt_max_and_min_interval(mod: ModuleType) -> None:
    t = SdtTable({1: SdtStage(deviation=1.0, max_interval_ms=3000)}, kernels=mod)
    flat = good(1, [(1000 * i, 7.0) for i in range(8)])
    assert [r[1] for r in rows(t, flat)] == [0, 3000, 6000]
    t = SdtTable({1: SdtStage(deviation=1.0, min_interval_ms=500)}, kernels=mod)
    counts = PipelineCounts()
    data = good(1, [(0, 0.0), (100, 50.0), (400, -50.0), (600, 1.0), (1200, 0.0), (1300, 9.0)])
    # 100, 400: too close to the archived (0, 0); 600 held; 1200 held; 1300 closes the
    # door: 1200 archived; 1300 is within 500 ms of it: discarded
    out = rows(t, data, counts)
    assert out == [data[0], data[4]]
    assert counts.suppressed == 4  # 100, 400, 600 (replaced by 1200), 1300


def test_sdt_time_going_back_or_repeating_restarts(mod: ModuleType) -> None:
    t = SdtTable({1: SdtStage(deviation=1.0)}, kernels=mod)
    data = good(1, [(100, 1.0), (110, 2.0), (50, 3.0), (50, 3.5), (60, 3.5)])
    # held (110, 2) goes out before (50, 3); (50, 3.5): same time as the archived -> sent
    assert rows(t, data) == data[:4]


def test_sdt_bad_reading_flushes_and_restarts(mod: ModuleType) -> None:
    t = SdtTable({1: SdtStage(deviation=1.0)}, kernels=mod)
    data = [*good(1, [(0, 0.0), (1, 0.1), (2, 0.2)]), (1, 3, 0.3, BAD)]
    data += good(1, [(4, 0.4), (5, 0.5)])
    assert rows(t, data) == [data[0], data[2], data[3], data[4]]


def check_sdt_bound(data: list[Row], out: list[Row], dev: float, max_interval: int) -> None:
    """Every input reading between two consecutive emitted ones is within ``dev`` of the
    line through them; emitted ones further apart than max_interval are neighbours."""
    index = {r[1]: i for i, r in enumerate(data)}  # timestamps are unique here
    emitted = [index[r[1]] for r in out if r[3] == GOOD]
    assert [data[i] for i in emitted] == [r for r in out if r[3] == GOOD]
    assert emitted[0] == 0 and emitted[-1] == len(data) - 1  # the first; the flushed last
    for a, b in itertools.pairwise(emitted):
        (_, ta, va, _), (_, tb, vb, _) = data[a], data[b]
        for _, tr, vr, _ in data[a + 1 : b]:
            line = va + (vb - va) * (tr - ta) / (tb - ta)
            slack = 1e-9 * max(1.0, abs(va), abs(vb), abs(vr))
            assert abs(vr - line) <= dev + slack, (data[a], data[b], (tr, vr), line)
        if max_interval and tb - ta > max_interval:
            assert b == a + 1


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.integers(1, 3000), min_size=1, max_size=120),
    vals=st.lists(
        st.one_of(st.floats(-1e6, 1e6), st.integers(-3, 3).map(float)), min_size=120, max_size=120
    ),
    dev=st.sampled_from([0.01, 0.5, 3.0, 100.0]),
    max_interval=st.sampled_from([0, 1000, 5000]),
    impl_name=st.sampled_from(["cython", "python"]),
    cuts=st.lists(st.integers(0, 120), max_size=3),
)
def test_sdt_error_bound(
    steps: list[int],
    vals: list[float],
    dev: float,
    max_interval: int,
    impl_name: str,
    cuts: list[int],
) -> None:
    ts = 1_700_000_000_000
    data = []
    for step, v in zip(steps, vals, strict=False):
        ts += step
        data.append((1, ts, v, GOOD))
    t = SdtTable(
        {1: SdtStage(deviation=dev, max_interval_ms=max_interval)},
        kernels=load_kernels(impl_name, "filters"),
    )
    outs, _ = run(t, [*split(data, cuts), Batch.from_rows([(1, ts + 1, NAN, BAD)])])
    out = [r for b in outs for r in b.rows()]
    assert out[-1][1] == ts + 1  # the bad reading, after the flushed held one
    check_sdt_bound(data, out, dev, max_interval)


# -- rate limit ----------------------------------------------------------------------------


def test_ratelimit_clamp(mod: ModuleType) -> None:
    t = RateLimitTable({1: RateLimitStage(max_rate=1.0)}, kernels=mod)
    counts = PipelineCounts()
    data = good(1, [(0, 0.0), (1000, 5.0), (2000, 1.5), (3000, -10.0), (3500, 0.0)])
    out = rows(t, data, counts)
    # 5 -> 1 (1/s for 1 s); 1.5 (0.5/s) passes; -10 -> 0.5; 0 from 0.5 in 0.5 s: passes
    assert out == good(1, [(0, 0.0), (1000, 1.0), (2000, 1.5), (3000, 0.5), (3500, 0.0)])
    assert counts == PipelineCounts(clamped=2)


def test_ratelimit_flag_and_drop_keep_the_last_passed(mod: ModuleType) -> None:
    data = [*good(1, [(0, 0.0), (1000, 5.0), (2000, 1.5)]), (2, 1500, 1000000000.0, GOOD)]
    flag = RateLimitTable({1: RateLimitStage(max_rate=1.0, action="flag")}, kernels=mod)
    counts = PipelineCounts()
    # 1.5 is judged against (0, 0): 0.75/s
    assert rows(flag, data, counts) == [data[0], (1, 1000, 5.0, BAD), data[2], data[3]]
    assert counts == PipelineCounts(flagged=1)
    drop = RateLimitTable({1: RateLimitStage(max_rate=1.0, action="drop")}, kernels=mod)
    counts = PipelineCounts()
    assert rows(drop, data, counts) == [data[0], data[2], data[3]]
    assert counts == PipelineCounts(dropped=1)


def test_ratelimit_repeated_or_backwards_time_reanchors(mod: ModuleType) -> None:
    t = RateLimitTable({1: RateLimitStage(max_rate=1.0)}, kernels=mod)
    data = good(1, [(0, 0.0), (1000, 0.5), (1000, 80.0), (500, 100.0), (1500, 100.5)])
    assert rows(t, data) == data


def test_ratelimit_bad_reading_passes_and_restarts(mod: ModuleType) -> None:
    t = RateLimitTable({1: RateLimitStage(max_rate=1.0)}, kernels=mod)
    data = [(1, 0, 0.0, GOOD), (1, 1, 50.0, BAD), (1, 2, INF, GOOD), (1, 3, 60.0, GOOD)]
    out = rows(t, data)
    assert out == data  # 60 is a first reading again


# -- ema -----------------------------------------------------------------------------------


def test_ema_alpha(mod: ModuleType) -> None:
    t = EmaTable({1: EmaStage(alpha=0.5)}, kernels=mod)
    data = [*good(1, [(0, 0.0), (1, 10.0), (2, 10.0)]), (1, 3, 99.0, BAD)]
    data += [*good(1, [(4, 4.0), (5, 0.0)]), (3, 5, 7.0, GOOD)]
    out = rows(t, data)
    assert [v for _, _, v, _ in out] == [0.0, 5.0, 7.5, 99.0, 4.0, 2.0, 7.0]


def test_ema_tau(mod: ModuleType) -> None:
    t = EmaTable({1: EmaStage(tau_ms=1000)}, kernels=mod)
    data = good(1, [(0, 0.0), (1000, 10.0), (1000, 0.0), (900, 0.0), (1900, 0.0)])
    y1 = 10.0 * (1.0 - math.exp(-1.0))
    y4 = y1 + (1.0 - math.exp(-1.0)) * (0.0 - y1)
    # no time passed at the repeated 1000 nor at the backwards 900: y is held there
    assert [v for _, _, v, _ in rows(t, data)] == [0.0, y1, y1, y1, y4]


# -- state across restarts -----------------------------------------------------------------

PERSISTENT: dict[str, dict[int, Any]] = {
    "deadband": {1: DeadbandStage(band=0.5, heartbeat_ms=3000), 4: DeadbandStage(band=2.0)},
    "sdt": {1: SdtStage(deviation=0.5, max_interval_ms=5000), 4: SdtStage(deviation=2.0)},
    "ratelimit": {1: RateLimitStage(max_rate=0.5), 4: RateLimitStage(2.0, action="flag")},
    "ema": {1: EmaStage(alpha=0.3), 4: EmaStage(tau_ms=2000)},
}


def walk(seed: int, n: int) -> list[Row]:
    rng = random.Random(seed)
    level = {1: 0.0, 3: 0.0, 4: 0.0}
    data = []
    for i in range(n):
        pid = rng.choice([1, 3, 4])
        level[pid] += rng.gauss(0, 1)
        data.append((pid, 1000 * i, level[pid], BAD if rng.random() < 0.02 else GOOD))
    return data


@pytest.mark.parametrize("kind", sorted(PERSISTENT))
def test_save_and_load_state_resumes_exactly(kind: str, mod: ModuleType) -> None:
    specs = PERSISTENT[kind]
    assert TABLES[kind](specs).persistent
    data = walk(7, 600)
    first, second = Batch.from_rows(data[:300]), Batch.from_rows(data[300:])
    steady = TABLES[kind](specs, kernels=mod)
    run(steady, [first])
    expected, expected_counts = run(steady, [second])
    before = TABLES[kind](specs, kernels=mod)
    run(before, [first])
    saved = before.save_state()
    assert set(saved) == {1, 4}
    after = TABLES[kind](specs, kernels=mod)
    assert after.load_state(saved) == 2
    out, counts = run(after, [second])
    assert columns(out[0]) == columns(expected[0])
    assert counts == expected_counts
    assert state_bytes(after) == state_bytes(steady)
    # a changed spec starts afresh
    changed = dict(specs)
    changed[1] = {
        "deadband": DeadbandStage(band=0.6),
        "sdt": SdtStage(deviation=0.6),
        "ratelimit": RateLimitStage(max_rate=0.6),
        "ema": EmaStage(alpha=0.6),
    }[kind]
    assert TABLES[kind](changed, kernels=mod).load_state(saved) == 1


def test_persistence_flags() -> None:
    assert not HampelTable.persistent and not MedianTable.persistent
    for cls in (DeadbandTable, SdtTable, RateLimitTable, EmaTable):
        assert cls.persistent
    assert {cls.kind for cls in TABLES.values()} == set(TABLES)


# -- kernels at the edges ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_empty_batch_and_mismatched_columns(kind: str, mod: ModuleType) -> None:
    specs = {
        "hampel": HampelStage(),
        "median": MedianStage(),
        "deadband": DeadbandStage(band=1.0),
        "sdt": SdtStage(deviation=1.0),
        "ratelimit": RateLimitStage(max_rate=1.0),
        "ema": EmaStage(alpha=0.5),
    }
    t = TABLES[kind]({0: specs[kind]}, kernels=mod)
    out, counts = run(t, [Batch()])
    assert len(out[0]) == 0 and counts == PipelineCounts()
    b = Batch.from_rows([(0, 1, 2.0, GOOD), (0, 2, 3.0, GOOD)])
    b.values.append(1.0)  # columns now differ in length
    with pytest.raises(ValueError, match="differ in length"):
        t.run(b, 0, PipelineCounts())


def test_kernels_reject_short_tables(mod: ModuleType) -> None:
    cols = (array("I", [0]), array("q", [0]), array("d", [1.0]), array("B", [0]))
    slot_of = array("i", [0])
    with pytest.raises(ValueError, match="shorter than the slot count"):
        # tau, has_y, last_ts and y have no room for slot 0
        mod.ema(*cols, slot_of, array("d", [0.5]), array("d"), array("B"), array("q"), array("d"))

    def deadband(spill_rows: int, holding: int) -> tuple[int, int, int]:
        # band 0.5; sent (0, 0.0); held (0, 0.25) or nothing; the reading (0, 1.0)
        sent = (array("B", [1]), array("q", [0]), array("d", [0.0]))
        held = (array("B", [holding]), array("q", [0]), array("d", [0.25]))
        params = (array("d", [0.5]), array("q", [0]))
        spill = (
            array("I", [0] * spill_rows),
            array("q", [0] * spill_rows),
            array("d", [0.0] * spill_rows),
            array("B", [0] * spill_rows),
        )
        result: tuple[int, int, int] = mod.deadband(*cols, *spill, slot_of, *params, *sent, *held)
        return result

    # one row in, one slot holding a reading from an earlier batch: 2 * 1 + 4 spill rows
    with pytest.raises(ValueError, match="spill columns shorter"):
        deadband(5, holding=1)
    with pytest.raises(ValueError, match="spill columns shorter"):
        deadband(3, holding=0)
    assert deadband(4, holding=0) == (1, 0, 0)
    # the held reading goes in place, the reading that released it to the spill
    assert deadband(6, holding=1) == (1, 1, 0)
    assert list(cols[2]) == [0.25]
    window = (array("d", [0.0] * 3), array("d", [0.0] * 3), array("i", [0]), array("i", [0]))
    with pytest.raises(ValueError, match="window is outside"):
        mod.median(*cols, slot_of, array("i", [4]), *window, 3)


def test_filters_in_a_pipeline() -> None:
    p = Pipeline(
        {
            1: [HampelStage(window=3), DeadbandStage(band=0.5)],
            2: [RateLimitStage(max_rate=1.0), EmaStage(alpha=0.5)],
            3: [MedianStage(window=2), SdtStage(deviation=0.1)],
        }
    )
    assert [k for k, _ in p.tables] == [
        "0:hampel",
        "0:ratelimit",
        "0:median",
        "1:deadband",
        "1:ema",
        "1:sdt",
    ]
    b = Batch.from_rows(
        good(1, [(0, 1.0), (1, 1.0), (2, 1.0), (3, 50.0), (4, 3.0)])
        + good(2, [(0, 0.0), (1000, 4.0)])
        + good(3, [(0, 0.0), (1, 2.0), (2, 4.0)])
    )
    out, counts = p.process(b)
    # 1: 50 is a spike -> 1.0, held by the deadband like the 1.0s before it; 3.0 is a
    #    step: the held (3, 1.0) goes out first
    # 2: 4 is clamped to 1 (1/s), then averaged with 0 -> 0.5
    # 3: medians 0, 1, 3; sdt sends (0, 0), holds (1, 1) with door [0.9, 1.1]; (2, 3) has
    #    slope 1.5 from (0, 0): (1, 1) is archived and (2, 3) held
    assert list(out.rows()) == [
        (1, 0, 1.0, 0),
        (1, 3, 1.0, 0),
        (1, 4, 3.0, 0),
        (2, 0, 0.0, 0),
        (2, 1000, 0.5, 0),
        (3, 0, 0.0, 0),
        (3, 1, 1.0, 0),
    ]
    assert counts == PipelineCounts(replaced=1, clamped=1, suppressed=2)
