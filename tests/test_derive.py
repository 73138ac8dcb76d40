"""The derive engine (native/derive.py) and its kernel pair: evaluation points, quality and
staleness, derived-of-derived, windows, state, and the compiled kernel bit-identical to
the pure one on random programs and batches."""

from __future__ import annotations

import math
import struct
from array import array
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from native import derive_py, impl
from native.batch import BAD, GOOD, UNAVAILABLE, UNCERTAIN, Batch
from native.derive import Conditions, DerivedSpec, DeriveEngine
from native.expr import compile_expr
from tests.helpers import columns, load_kernels

NAN = math.nan
Row = tuple[int, int, float, int]


@pytest.fixture(params=["cython", "python"])
def mod(request: pytest.FixtureRequest) -> ModuleType:
    return load_kernels(request.param, "derive")


def spec(
    text: str, ids: dict[str, int], out: int | None, max_age_ms: int = 0, want: str = "number"
) -> DerivedSpec:
    program = compile_expr(text, tuple(ids), want)
    return DerivedSpec(program, tuple(ids[n] for n in program.inputs), out, max_age_ms)


def rows(batch: Batch) -> list[Row]:
    return list(batch.rows())


def conds(c: Conditions) -> list[tuple[int, int, float, int]]:
    return list(zip(c.spec, c.ts, c.value, c.quality, strict=True))


def test_kernels_pair_is_registered() -> None:
    assert "derive" in impl.MODULES
    assert impl.kernels("derive").__name__ in ("native._derive", "native.derive_py")


# -- evaluation points --------------------------------------------------------------------


def test_one_output_per_evaluation_point(mod: ModuleType) -> None:
    e = DeriveEngine([spec("a + b", {"a": 1, "b": 2}, 10)], kernels=mod)
    out, c = e.process(
        Batch.from_rows(
            [
                (1, 1000, 1.0, GOOD),
                (2, 1000, 2.0, GOOD),  # same ts: one evaluation after both
                (7, 1000, 9.0, GOOD),  # a point no spec reads
                (1, 2000, 5.0, GOOD),
                (7, 3000, 1.0, GOOD),  # nothing dirty
                (2, 4000, 1.0, GOOD),
            ]
        )
    )
    assert rows(out) == [(10, 1000, 3.0, GOOD), (10, 2000, 7.0, GOOD), (10, 4000, 6.0, GOOD)]
    assert len(c) == 0
    assert e.last(10) == (6.0, 4000, GOOD)
    assert e.last(1) == (5.0, 2000, GOOD)
    assert e.last(7) is None  # not read by any spec
    assert e.last(999) is None


def test_evaluation_time_is_the_newest_input_and_age(mod: ModuleType) -> None:
    e = DeriveEngine([spec("age(a) * 1000 + b", {"a": 1, "b": 2}, 10)], kernels=mod)
    e.process(Batch.from_rows([(1, 1000, 0.0, GOOD)]))
    out, _ = e.process(Batch.from_rows([(2, 3500, 0.25, GOOD)]))
    assert rows(out) == [(10, 3500, 2500.25, GOOD)]
    # a reading older than the others: T stays the newest last ts
    out, _ = e.process(Batch.from_rows([(1, 3000, 0.0, GOOD)]))
    assert rows(out) == [(10, 3500, 500.25, GOOD)]


def test_never_seen_input_is_nan_and_bad(mod: ModuleType) -> None:
    e = DeriveEngine(
        [spec("a + b", {"a": 1, "b": 2}, 10), spec("if(b > 0, 1, a)", {"a": 1, "b": 2}, 11)],
        kernels=mod,
    )
    out, _ = e.process(Batch.from_rows([(1, 1000, 1.0, GOOD)]))
    assert out.point_ids.tolist() == [10, 11]
    assert math.isnan(out.values[0]) and out.quality[0] == BAD
    # a finite result still says an input was missing
    assert out.values[1] == 1.0 and out.quality[1] == BAD


@pytest.mark.parametrize(
    ("qa", "qb", "expected"),
    [
        (GOOD, GOOD, GOOD),
        (GOOD, UNCERTAIN, UNCERTAIN),
        (UNCERTAIN, BAD, BAD),
        (BAD, UNAVAILABLE, UNAVAILABLE),
        (UNAVAILABLE, UNCERTAIN, UNAVAILABLE),
        (GOOD, 9, BAD),  # an unknown quality code counts as BAD
    ],
)
def test_quality_is_the_worst_input(mod: ModuleType, qa: int, qb: int, expected: int) -> None:
    e = DeriveEngine([spec("a + b", {"a": 1, "b": 2}, 10)], kernels=mod)
    out, _ = e.process(Batch.from_rows([(1, 1000, 1.0, qa), (2, 1000, 2.0, qb)]))
    assert rows(out) == [(10, 1000, 3.0, expected)]


def test_non_finite_result_is_bad_unless_worse(mod: ModuleType) -> None:
    e = DeriveEngine([spec("a / b", {"a": 1, "b": 2}, 10)], kernels=mod)
    out, _ = e.process(
        Batch.from_rows(
            [
                (1, 1000, 1.0, GOOD),
                (2, 1000, 0.0, GOOD),  # inf: BAD
                (2, 2000, 0.0, UNCERTAIN),  # inf: BAD
                (2, 3000, 0.0, UNAVAILABLE),  # stays UNAVAILABLE
            ]
        )
    )
    assert out.quality.tolist() == [BAD, BAD, UNAVAILABLE]
    assert out.values.tolist() == [math.inf] * 3


def test_max_age_makes_stale_inputs_bad(mod: ModuleType) -> None:
    e = DeriveEngine([spec("a + b", {"a": 1, "b": 2}, 10, max_age_ms=30_000)], kernels=mod)
    out, _ = e.process(
        Batch.from_rows(
            [
                (1, 0, 1.0, GOOD),
                (2, 0, 1.0, GOOD),
                (2, 30_000, 2.0, GOOD),  # a is exactly 30 s old: still fresh
                (2, 30_001, 3.0, GOOD),  # a is stale
                (1, 40_000, 1.0, GOOD),  # fresh again
            ]
        )
    )
    assert rows(out) == [
        (10, 0, 2.0, GOOD),
        (10, 30_000, 3.0, GOOD),
        (10, 30_001, 4.0, BAD),
        (10, 40_000, 4.0, GOOD),
    ]


def test_conditions_are_columnar_and_not_readings(mod: ModuleType) -> None:
    e = DeriveEngine(
        [
            spec("level * 2", {"level": 1}, 10),
            spec("level > 0.8 and age(level) < 60", {"level": 1}, None, want="bool"),
            spec("level < 0", {"level": 1}, None, want="bool"),
        ],
        kernels=mod,
    )
    out, c = e.process(Batch.from_rows([(1, 1000, 0.9, GOOD), (1, 2000, 0.5, UNCERTAIN)]))
    assert rows(out) == [(10, 1000, 1.8, GOOD), (10, 2000, 1.0, UNCERTAIN)]
    assert conds(c) == [
        (1, 1000, 1.0, GOOD),
        (2, 1000, 0.0, GOOD),
        (1, 2000, 0.0, UNCERTAIN),
        (2, 2000, 0.0, UNCERTAIN),
    ]
    assert c.spec.typecode == "I" and c.ts.typecode == "q"
    assert c.value.typecode == "d" and c.quality.typecode == "B"


# -- derived of derived -------------------------------------------------------------------


def test_derived_of_derived_in_the_same_pass(mod: ModuleType) -> None:
    e = DeriveEngine(
        [
            spec("a * 10", {"a": 1}, 10),
            spec("d + b", {"d": 10, "b": 2}, 11),
            spec("e - 1", {"e": 11}, 12),
            spec("e > 20", {"e": 11}, None, want="bool"),
        ],
        kernels=mod,
    )
    out, c = e.process(
        Batch.from_rows([(1, 1000, 1.0, GOOD), (2, 1000, 5.0, GOOD), (2, 2000, 20.0, BAD)])
    )
    assert rows(out) == [
        (10, 1000, 10.0, GOOD),
        (11, 1000, 15.0, GOOD),
        (12, 1000, 14.0, GOOD),
        (11, 2000, 30.0, BAD),  # only b changed: 10 is not evaluated again
        (12, 2000, 29.0, BAD),
    ]
    assert conds(c) == [(3, 1000, 0.0, GOOD), (3, 2000, 1.0, BAD)]


def test_specs_must_be_in_topological_order() -> None:
    with pytest.raises(ValueError, match="topological order"):
        DeriveEngine([spec("d + 1", {"d": 10}, 11), spec("a", {"a": 1}, 10)])
    with pytest.raises(ValueError, match="topological order"):
        DeriveEngine([spec("d + 1", {"d": 10}, 10)])  # reads itself
    with pytest.raises(ValueError, match="already the output of spec 0"):
        DeriveEngine([spec("a", {"a": 1}, 10), spec("a", {"a": 1}, 10)])
    with pytest.raises(ValueError, match="1 input ids for the program's 2 inputs"):
        DeriveEngine([DerivedSpec(compile_expr("a + b", ("a", "b")), (1,), 10)])


def test_a_derived_point_read_from_the_batch_too(mod: ModuleType) -> None:
    e = DeriveEngine([spec("a + 1", {"a": 1}, 10), spec("d * 2", {"d": 10}, 11)], kernels=mod)
    out, _ = e.process(Batch.from_rows([(10, 500, 4.0, GOOD), (1, 1000, 1.0, GOOD)]))
    assert rows(out) == [(11, 500, 8.0, GOOD), (10, 1000, 2.0, GOOD), (11, 1000, 4.0, GOOD)]


# -- windows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        ("mean_over", 4.0),  # 3, 4, 5: ts in (T - 3s, T]
        ("min_over", 3.0),
        ("max_over", 5.0),
        ("sum_over", 12.0),
        ("count_over", 3.0),
        ("delta_over", 2.0),  # newest minus oldest
    ],
)
def test_window_functions(mod: ModuleType, fn: str, expected: float) -> None:
    e = DeriveEngine([spec(f"{fn}(a, 3s)", {"a": 1}, 10)], kernels=mod)
    readings = [(1, 1000 * k, float(k), GOOD) for k in range(6)]
    readings[4] = (1, 4000, 100.0, BAD)  # not GOOD: not in the window
    readings.insert(5, (1, 4500, NAN, GOOD))  # not finite: not in the window
    readings.insert(6, (1, 4600, 4.0, GOOD))
    e.process(Batch.from_rows(readings[:-1]))
    out, _ = e.process(Batch.from_rows(readings[-1:]))
    # window (2000, 5000]: 3 (3000), 4 (4600), 5 (5000)
    assert out.values.tolist() == [expected]


def test_empty_window(mod: ModuleType) -> None:
    e = DeriveEngine(
        [
            spec("mean_over(a, 1s)", {"a": 1}, 10),
            spec("sum_over(a, 1s)", {"a": 1}, 11),
            spec("count_over(a, 1s)", {"a": 1}, 12),
            spec("delta_over(a, 1s)", {"a": 1}, 13),
        ],
        kernels=mod,
    )
    out, _ = e.process(Batch.from_rows([(1, 1000, 1.0, BAD)]))
    assert struct.pack("<4d", *out.values) == struct.pack("<4d", NAN, 0.0, 0.0, NAN)
    assert out.quality.tolist() == [BAD] * 4


def test_window_of_another_input_uses_its_own_ring(mod: ModuleType) -> None:
    e = DeriveEngine([spec("a + count_over(b, 10s)", {"a": 1, "b": 2}, 10)], kernels=mod)
    out, _ = e.process(
        Batch.from_rows([(2, 1000, 1.0, GOOD), (2, 2000, 1.0, GOOD), (1, 20_000, 0.0, GOOD)])
    )
    # a never seen: NaN and BAD; at T = 20 s, b's readings are out of the window
    assert out.quality.tolist() == [BAD, BAD, GOOD]
    assert math.isnan(out.values[0]) and math.isnan(out.values[1])
    assert out.values[2] == 0.0


def test_ring_keeps_the_last_4096_readings(mod: ModuleType) -> None:
    e = DeriveEngine([spec("count_over(a, 1h) + sum_over(a, 1h) / 1e9", {"a": 1}, 10)], kernels=mod)
    n = derive_py.RING + 100
    batch = Batch(
        array("I", [1]) * n,
        array("q", range(n)),
        array("d", [float(k) for k in range(n)]),
        array("B", bytes(n)),
    )
    out, _ = e.process(batch)
    assert len(out) == n
    count = math.floor(out.values[-1])
    assert count == derive_py.RING
    assert out.values[-1] == count + sum(range(100, n)) / 1e9


# -- output capacity, state ------------------------------------------------------------------


def test_many_outputs_per_reading(mod: ModuleType) -> None:
    specs = [spec(f"a + {k}", {"a": 1}, 100 + k) for k in range(50)]
    e = DeriveEngine(specs, kernels=mod)
    n = 300
    batch = Batch(
        array("I", [1]) * n,
        array("q", range(n)),
        array("d", [1.0]) * n,
        array("B", bytes(n)),
    )
    out, _ = e.process(batch)
    assert len(out) == 50 * n
    assert out.point_ids.tolist() == list(range(100, 150)) * n
    assert out.timestamps.tolist() == [t for t in range(n) for _ in range(50)]
    assert out.values.tolist()[:3] == [1.0, 2.0, 3.0]


def test_empty_batch_and_no_specs(mod: ModuleType) -> None:
    e = DeriveEngine([spec("a", {"a": 1}, 10)], kernels=mod)
    out, c = e.process(Batch())
    assert len(out) == 0 and len(c) == 0
    out, c = DeriveEngine([], kernels=mod).process(Batch.from_rows([(1, 1, 1.0, GOOD)]))
    assert len(out) == 0 and len(c) == 0


def test_save_load_and_carry_state(mod: ModuleType) -> None:
    specs = [spec("mean_over(a, 10s) + b", {"a": 1, "b": 2}, 10)]
    e = DeriveEngine(specs, kernels=mod)
    e.process(Batch.from_rows([(1, 1000, 1.0, GOOD), (1, 2000, 3.0, GOOD), (2, 2000, 0.5, BAD)]))
    saved = e.save_state()
    assert sorted(saved) == ["derive:1", "derive:10", "derive:2"]
    fresh = DeriveEngine(specs, kernels=mod)
    assert fresh.load_state({**saved, "other:1": b"x", "derive:x": b"", "derive:99": b"?"}) == 3
    assert fresh.last(2) == (0.5, 2000, BAD)
    after = Batch.from_rows([(2, 3000, 1.0, GOOD)])
    out, _ = fresh.process(after)
    assert rows(out) == [(10, 3000, 3.0, GOOD)]  # mean of 1 and 3, plus 1
    out2, _ = e.process(Batch.from_rows([(2, 3000, 1.0, GOOD)]))
    assert columns(out) == columns(out2)
    # malformed blobs are skipped
    assert DeriveEngine(specs, kernels=mod).load_state({"derive:1": saved["derive:1"][:-3]}) == 0
    # a reload keeps the points both configs read
    reloaded = DeriveEngine([spec("sum_over(a, 10s)", {"a": 1}, 20)], kernels=mod)
    assert reloaded.carry_state(e) == 1
    out, _ = reloaded.process(Batch.from_rows([(1, 4000, 2.0, GOOD)]))
    assert rows(out) == [(20, 4000, 6.0, GOOD)]


def test_saved_state_keeps_what_the_windows_need_across_the_ring_wrap(mod: ModuleType) -> None:
    """A street gateway saves this every minute: the readings its longest window over a
    point may need, not the whole ring (a 10 s window at 10 Hz: 100 readings, not 4096)."""
    specs = [spec("mean_over(a, 10s)", {"a": 1}, 10), spec("a + b", {"a": 1, "b": 2}, 11)]
    e = DeriveEngine(specs, kernels=mod)
    n = derive_py.RING + 500  # the ring has wrapped
    e.process(Batch.from_rows([(1, 100 * k, float(k), GOOD) for k in range(n)]))
    saved = e.save_state()
    head = struct.Struct("<2sdqBBH")
    assert head.unpack_from(saved["derive:1"])[5] == 100  # ts in (T - 10 s, T]
    fresh = DeriveEngine(specs, kernels=mod)
    assert fresh.load_state(saved) == 3  # a, and the two outputs
    after = Batch.from_rows([(1, 100 * n, float(n), GOOD)])
    assert columns(fresh.process(after)[0]) == columns(e.process(after)[0])
    # only the points read since the last save go again
    assert e.save_state(changed_only=True).keys() == {"derive:1", "derive:10", "derive:11"}
    assert e.save_state(changed_only=True) == {}


# -- the compiled kernel against the pure one ----------------------------------------------

NAMES = ("a", "b", "c")
_LEAVES = st.sampled_from(
    ["a", "b", "c", "0", "1", "2.5", "-3", "1e300", "0.1", "age(a)", "age(c)"]
    + [
        f"{fn}({x}, {w})"
        for fn in ("mean_over", "min_over", "max_over", "sum_over", "count_over", "delta_over")
        for x in ("a", "b")
        for w in ("1500ms", "3s")
    ]
)


def _numbers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    two = st.tuples(children, children)
    return st.one_of(
        st.builds(lambda p, op: f"({p[0]} {op} {p[1]})", two, st.sampled_from("+-*/")),
        st.builds(
            lambda x, f: f"{f}({x})",
            children,
            st.sampled_from(["abs", "sqrt", "exp", "ln", "log10", "-"]),
        ),
        st.builds(lambda p: f"pow({p[0]}, {p[1]})", two),
        st.builds(
            lambda xs, f: f"{f}({', '.join(xs)})",
            st.lists(children, min_size=2, max_size=3),
            st.sampled_from(["min", "max"]),
        ),
        st.builds(lambda x, p: f"clamp({x}, {p[0]}, {p[1]})", children, two),
        st.builds(lambda x: f"interp({x}, [-1, 0, 2.5], [3, -2, 7])", children),
        st.builds(
            lambda p, op, q: f"if({p[0]} {op} {p[1]} or not ({q} == {q}), {p[0]}, {p[1]})",
            two,
            st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
            children,
        ),
    )


EXPRESSIONS = st.recursive(_LEAVES, _numbers, max_leaves=8)
VALUES = st.sampled_from(
    [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        2.0,
        3.0,
        1e308,
        -1e308,
        1e-310,
        math.inf,
        -math.inf,
        NAN,
        -NAN,
        struct.unpack("<d", bytes.fromhex("0100000000f8ffff"))[0],
    ]
) | st.floats(-1e6, 1e6)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[str, int]], list[Batch]]:
    texts = draw(st.lists(EXPRESSIONS, min_size=1, max_size=4))
    ages = draw(
        st.lists(st.sampled_from([0, 0, 1000, 2500]), min_size=len(texts), max_size=len(texts))
    )
    batches = []
    t = draw(st.integers(0, 10_000))
    for _ in range(draw(st.integers(1, 3))):
        rs = []
        for _ in range(draw(st.integers(0, 25))):
            t += draw(st.sampled_from([0, 0, 1, 500, 1000, -700]))
            rs.append(
                (
                    draw(st.sampled_from([1, 2, 3, 4, 50])),
                    t,
                    draw(VALUES),
                    draw(st.sampled_from([GOOD, GOOD, GOOD, BAD, UNCERTAIN, UNAVAILABLE])),
                )
            )
        batches.append(Batch.from_rows(rs))
    return list(zip(texts, ages, strict=True)), batches


def _engine(case: list[tuple[str, int]], mod: ModuleType) -> DeriveEngine:
    ids = {"a": 1, "b": 2, "c": 3}
    specs = []
    for k, (text, age) in enumerate(case):
        # every other spec reads the previous one's output as "c"
        if k % 2:
            ids = {"a": 1, "b": 2, "c": 49 + k}
        specs.append(spec(text, ids, 50 + k if k % 3 != 2 else None, age))
    return DeriveEngine(specs, kernels=mod)


def _state(e: DeriveEngine) -> list[bytes]:
    arrays = (e.last_v, e.last_ts, e.last_q, e.seen, e.ring_head, e.ring_n, e.ring_ts, e.ring_v)
    return [a.tobytes() for a in arrays]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=scenarios())
def test_compiled_kernel_is_bit_identical(case: tuple[list[tuple[str, int]], list[Batch]]) -> None:
    compiled = load_kernels("cython", "derive")
    texts, batches = case
    engines = [_engine(texts, compiled), _engine(texts, derive_py)]
    for batch in batches:
        (out_c, cond_c), (out_p, cond_p) = (e.process(batch) for e in engines)
        assert columns(out_c) == columns(out_p)
        assert [a.tobytes() for a in (cond_c.spec, cond_c.ts, cond_c.value, cond_c.quality)] == [
            a.tobytes() for a in (cond_p.spec, cond_p.ts, cond_p.value, cond_p.quality)
        ]
        for v in (*out_p.values, *cond_p.value):
            assert v == v or struct.pack("<d", v) == struct.pack("<d", NAN)  # canonical NaN
        assert _state(engines[0]) == _state(engines[1])
    assert engines[0].save_state() == engines[1].save_state()
