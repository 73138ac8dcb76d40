"""Range-check kernel (compiled and pure-Python twin) and the Pipeline built on it."""

from __future__ import annotations

import math
import random
from array import array
from types import ModuleType

import pytest

from native import impl, kernels_py
from native.batch import BAD, GOOD, UNAVAILABLE, UNCERTAIN, Batch
from native.pipeline import Pipeline
from native.stages import HampelStage, RangeStage, RateLimitStage
from native.table import PipelineCounts
from tests.helpers import columns, load_kernels

NONE, FLAG, DROP = kernels_py.ACTION_NONE, kernels_py.ACTION_FLAG, kernels_py.ACTION_DROP
INF = math.inf
NAN = math.nan


@pytest.fixture(params=["cython", "python"])
def kernels(request: pytest.FixtureRequest) -> ModuleType:
    return load_kernels(request.param)


@pytest.fixture(params=["cython", "python"])
def use_impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Routes the Pipeline through one implementation."""
    mod = load_kernels(request.param)
    monkeypatch.setattr(impl, "range_check", mod.range_check)
    return mod


def run_kernel(
    mod: ModuleType, batch: Batch, lo: list[float], hi: list[float], action: list[int]
) -> tuple[int, int, int]:
    counts: tuple[int, int, int] = mod.range_check(
        batch.point_ids,
        batch.timestamps,
        batch.values,
        batch.quality,
        array("d", lo),
        array("d", hi),
        array("B", action),
    )
    return counts


# -- the kernel ----------------------------------------------------------------------------


def test_implementation_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYGW_PURE_PYTHON", "1")
    assert impl._load() == (kernels_py, "python")
    monkeypatch.setenv("CITYGW_PURE_PYTHON", "0")
    mod, name = impl._load()
    assert (mod, name) == (load_kernels("cython"), "cython")


def test_flag_sets_bad_and_keeps_everything(kernels: ModuleType) -> None:
    b = Batch.from_rows(
        [
            (0, 10, 5.0, GOOD),  # in range
            (0, 11, 10.0, UNCERTAIN),  # on the upper bound: in range, quality untouched
            (0, 12, 10.5, UNCERTAIN),  # above
            (0, 13, -0.5, GOOD),  # below
            (0, 14, NAN, GOOD),  # NaN is never in range
            (1, 15, 1e300, GOOD),  # point 1 has no stage
        ]
    )
    assert run_kernel(kernels, b, [0.0, -INF], [10.0, INF], [FLAG, NONE]) == (6, 3, 0)
    assert list(b.quality) == [GOOD, UNCERTAIN, BAD, BAD, BAD, GOOD]
    assert list(b.timestamps) == [10, 11, 12, 13, 14, 15]


def test_drop_compacts_all_columns_in_order(kernels: ModuleType) -> None:
    rows = [
        (2, 1, 50.0, GOOD),  # dropped
        (1, 2, 50.0, GOOD),  # flagged
        (0, 3, 1.0, UNCERTAIN),  # no stage
        (2, 4, 5.0, GOOD),  # kept
        (2, 5, NAN, GOOD),  # dropped
        (7, 6, NAN, GOOD),  # id beyond the tables: pass-through
        (2, 7, 60.0, UNCERTAIN),  # dropped
    ]
    b = Batch.from_rows(rows)
    kept, flagged, dropped = run_kernel(
        kernels, b, [-INF, 0.0, 0.0], [INF, 10.0, 10.0], [NONE, FLAG, DROP]
    )
    assert (kept, flagged, dropped) == (4, 1, 3)
    got = list(b.slice(0, kept).rows())
    assert got[:3] == [(1, 2, 50.0, BAD), (0, 3, 1.0, UNCERTAIN), (2, 4, 5.0, GOOD)]
    assert got[3][:2] == (7, 6) and math.isnan(got[3][2])


@pytest.mark.parametrize("action", [FLAG, DROP])
def test_readings_without_a_value_pass_the_range_untouched(
    kernels: ModuleType, action: int
) -> None:
    """The documented rule (README, "Edge processing"): a range stage judges readings
    that claim a value; a BAD reading (failed read) and an UNAVAILABLE one (the device's
    "not available" marker) keep their quality and are neither dropped nor counted."""
    rows = [
        (0, 1, NAN, UNAVAILABLE),
        (0, 2, NAN, BAD),
        (0, 3, 99.0, BAD),  # a value flagged by an earlier stage: not counted again
        (0, 4, 99.0, GOOD),  # the one out-of-range reading
    ]
    b = Batch.from_rows(rows)
    counts = run_kernel(kernels, b, [0.0], [10.0], [action])
    got = list(b.slice(0, counts[0]).rows())
    assert got[0][::3] == (0, UNAVAILABLE) and math.isnan(got[0][2])
    assert got[1][::3] == (0, BAD) and math.isnan(got[1][2])
    assert got[2] == (0, 3, 99.0, BAD)
    if action == FLAG:  # flagged: kept with the number the device sent, quality BAD
        assert counts == (4, 1, 0)
        assert got[3] == (0, 4, 99.0, BAD)
    else:  # dropped: gone, and counted
        assert counts == (3, 0, 1)


def test_stage_without_limits_still_rejects_nan_only(kernels: ModuleType) -> None:
    b = Batch.from_rows([(0, 1, NAN, GOOD), (0, 2, INF, GOOD), (0, 3, -INF, GOOD)])
    assert run_kernel(kernels, b, [-INF], [INF], [DROP]) == (2, 0, 1)
    assert list(b.values[:2]) == [INF, -INF]


def test_empty_and_mismatched_columns(kernels: ModuleType) -> None:
    assert run_kernel(kernels, Batch(), [0.0], [1.0], [DROP]) == (0, 0, 0)
    b = Batch.from_rows([(0, 1, 2.0, GOOD)])
    b.quality.append(0)  # columns now differ in length
    with pytest.raises(ValueError, match="differ in length"):
        run_kernel(kernels, b, [0.0], [1.0], [DROP])
    with pytest.raises(ValueError, match="shorter than the action table"):
        run_kernel(kernels, Batch(), [0.0], [1.0], [DROP, DROP])


def random_batch(rng: random.Random, n: int, n_points: int) -> Batch:
    specials = [NAN, INF, -INF, -0.0, 0.0, 1e-310, -1e308]
    b = Batch()
    for _ in range(n):
        v = rng.choice(specials) if rng.random() < 0.05 else rng.uniform(-50.0, 150.0)
        b.append(rng.randrange(n_points), rng.randrange(-(2**63), 2**63), v, rng.randrange(4))
    return b


@pytest.mark.parametrize("seed", range(20))
def test_both_implementations_agree(seed: int) -> None:
    rng = random.Random(seed)
    n_points = rng.randrange(1, 40)
    lo = [rng.choice([-INF, rng.uniform(-20, 60)]) for _ in range(n_points)]
    hi = [rng.choice([INF, rng.uniform(60, 120)]) for _ in range(n_points)]
    action = [rng.choice([NONE, FLAG, DROP]) for _ in range(n_points)]
    # ids a little past the tables too
    batch = random_batch(rng, rng.randrange(0, 3000), n_points + 3)
    results = []
    for name in ("cython", "python"):
        b = Batch.concat([batch])
        counts = run_kernel(load_kernels(name), b, lo, hi, action)
        results.append((counts, columns(b)))  # the whole columns, tail past `kept` included
    assert results[0] == results[1]


# -- the Pipeline --------------------------------------------------------------------------


def test_range_stage_validation() -> None:
    with pytest.raises(ValueError, match="above max"):
        RangeStage(min=2.0, max=1.0)
    with pytest.raises(ValueError, match="NaN"):
        RangeStage(min=NAN)
    with pytest.raises(ValueError, match="'flag' or 'drop'"):
        RangeStage(action="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        Pipeline({1_000_000: [RangeStage()]})
    with pytest.raises(TypeError, match="unknown stage"):
        Pipeline({1: ["range"]})  # type: ignore[list-item]


def test_pipeline_flags_drops_and_passes_through(use_impl: ModuleType) -> None:
    p = Pipeline(
        {
            3: [RangeStage(min=0.0, max=100.0, action="flag")],
            5: [RangeStage(max=10.0, action="drop")],
            9: [],
        }
    )
    b = Batch.from_rows(
        [
            (3, 1, 101.0, GOOD),
            (5, 1, 11.0, GOOD),
            (1, 1, NAN, GOOD),  # no stages at all
            (5, 2, -1e9, GOOD),  # no lower limit
            (3, 2, 50.0, GOOD),
            (9, 2, NAN, GOOD),  # empty stage list
            (5, 3, NAN, GOOD),
        ]
    )
    out, counts = p.process(b)
    assert counts == PipelineCounts(flagged=1, dropped=2)
    assert out is b and len(out) == 5
    assert [(r[0], r[1], r[3]) for r in out.rows()] == [
        (3, 1, BAD),
        (1, 1, GOOD),
        (5, 2, GOOD),
        (3, 2, GOOD),
        (9, 2, GOOD),
    ]


def test_pipeline_runs_a_points_stages_in_order(use_impl: ModuleType) -> None:
    p = Pipeline(
        {
            1: [RangeStage(max=100.0, action="flag"), RangeStage(max=50.0, action="drop")],
            2: [RangeStage(max=10.0, action="drop")],
        }
    )
    b = Batch.from_rows([(1, 1, 120.0, GOOD), (1, 2, 70.0, GOOD), (1, 3, 1.0, GOOD)])
    b.extend(Batch.from_rows([(2, 4, 5.0, GOOD), (2, 5, 15.0, GOOD)]))
    out, counts = p.process(b)
    # 120: flagged BAD by the first stage, which the second leaves as it is (a BAD
    # reading is not judged again); 70: dropped by the second
    assert counts == PipelineCounts(flagged=1, dropped=2)
    assert list(out.timestamps) == [1, 3, 4]
    assert list(out.quality) == [BAD, GOOD, GOOD]
    # by point, for the warning that names them
    assert (counts.flagged_by_point, counts.dropped_by_point) == ({1: 1}, {1: 1, 2: 1})


def test_pipeline_counts_flags_and_drops_by_point_for_every_rejecting_stage() -> None:
    p = Pipeline(
        {
            1: [RateLimitStage(max_rate=1.0, action="flag")],
            2: [RateLimitStage(max_rate=1.0, action="drop")],
            3: [HampelStage(window=3, threshold=3.0, action="flag")],
            4: [RateLimitStage(max_rate=1.0, action="clamp")],  # moved, not rejected
        }
    )
    rows = [(pid, t * 1000, 0.0, GOOD) for t in range(3) for pid in (1, 2, 3, 4)]
    rows += [(pid, 3000, 1000.0, GOOD) for pid in (1, 2, 4)]
    rows += [(3, 3000, 0.0, GOOD), (3, 4000, 1000.0, GOOD), (1, 4000, 0.0, BAD)]
    out, counts = p.process(Batch.from_rows(rows))
    assert (counts.flagged, counts.dropped, counts.clamped) == (2, 1, 1)
    assert counts.flagged_by_point == {1: 1, 3: 1}
    assert counts.dropped_by_point == {2: 1}
    assert len(out) == len(rows) - 1


def test_empty_pipeline_and_empty_batch(use_impl: ModuleType) -> None:
    b = Batch.from_rows([(0, 1, NAN, GOOD)])
    assert Pipeline({}).process(b) == (b, PipelineCounts(0, 0))
    out, counts = Pipeline({0: [RangeStage(action="drop")]}).process(Batch())
    assert len(out) == 0 and counts == PipelineCounts()


def test_flag_timestamps_marks_good_readings_outside_the_window(kernels: ModuleType) -> None:
    lo, hi = 1_577_836_800_000, 1_900_000_000_000
    ts = array("q", [0, lo - 1, lo, 1_800_000_000_000, hi - 1, hi, -(2**63), 2**63 - 1])
    quality = array("B", [GOOD, BAD, GOOD, GOOD, GOOD, GOOD, UNCERTAIN, GOOD])
    assert kernels.flag_timestamps(ts, quality, lo, hi) == 3
    # BAD stays BAD; inside [lo, hi) untouched; outside and GOOD -> UNCERTAIN
    assert list(quality) == [UNCERTAIN, BAD, GOOD, GOOD, GOOD, UNCERTAIN, UNCERTAIN, UNCERTAIN]
    with pytest.raises(ValueError):
        kernels.flag_timestamps(ts, array("B", [0]), lo, hi)
