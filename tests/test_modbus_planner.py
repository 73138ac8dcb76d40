"""The Modbus request planner (drivers/modbus/planner.py)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.modbus.datatypes import BIT_TABLES
from drivers.modbus.planner import TABLE_ORDER, Request, Span, describe, plan, split
from drivers.modbus.settings import Table

TABLES: tuple[Table, ...] = get_args(Table)


def _limit(table: str, max_registers: int, max_bits: int) -> int:
    return max_bits if table in BIT_TABLES else max_registers


def _gap(table: str, max_gap: int) -> int:
    return max_gap * 16 if table in BIT_TABLES else max_gap


def _holes(spans: Sequence[Span]) -> list[int]:
    """Lengths of the unused runs between the covered ranges of `spans`."""
    ordered = sorted(spans, key=lambda s: s.address)
    out = []
    hi = ordered[0].end
    for s in ordered[1:]:
        if s.address > hi:
            out.append(s.address - hi)
        hi = max(hi, s.end)
    return out


def _feasible(spans: Sequence[Span], limit: int, gap: int) -> bool:
    lo = min(s.address for s in spans)
    hi = max(s.end for s in spans)
    return hi - lo <= limit and all(h <= gap for h in _holes(spans))


def _brute_force(spans: Sequence[Span], max_registers: int, max_bits: int, max_gap: int) -> int:
    """The fewest requests by trying every partition of each table's spans (subset DP)."""
    total = 0
    for table in TABLES:
        mine = [s for s in spans if s.table == table]
        if not mine:
            continue
        limit, gap = _limit(table, max_registers, max_bits), _gap(table, max_gap)
        n = len(mine)
        ok = [False] + [
            _feasible([mine[i] for i in range(n) if m >> i & 1], limit, gap)
            for m in range(1, 1 << n)
        ]
        best = [0] + [n + 1] * ((1 << n) - 1)
        for m in range(1, 1 << n):
            low = m & -m
            sub = m
            while sub:
                if sub & low and ok[sub]:
                    best[m] = min(best[m], best[m ^ sub] + 1)
                sub = (sub - 1) & m
        total += best[(1 << n) - 1]
    return total


@st.composite
def problems(draw: st.DrawFn, max_spans: int = 12) -> tuple[list[Span], int, int, int]:
    max_registers = draw(st.integers(1, 16))
    max_bits = draw(st.integers(1, 40))
    max_gap = draw(st.integers(0, 4))
    tables = draw(st.lists(st.sampled_from(TABLES), min_size=1, max_size=2, unique=True))
    n = draw(st.integers(0, max_spans))
    spans = []
    for key in range(n):
        table = draw(st.sampled_from(tables))
        limit = _limit(table, max_registers, max_bits)
        count = draw(st.integers(1, min(limit, 8)))
        spans.append(Span(key, table, draw(st.integers(0, 40)), count))
    return spans, max_registers, max_bits, max_gap


def _check_plan(
    spans: list[Span], requests: list[Request], max_registers: int, max_bits: int, max_gap: int
) -> None:
    # every span in exactly one request, which contains it
    served = Counter(s for r in requests for s in r.spans)
    assert served == Counter(spans)
    for r in requests:
        assert r.spans
        assert all(s.table == r.table for s in r.spans)  # never mixes tables
        assert all(r.address <= s.address and s.end <= r.end for s in r.spans)
        # tight: starts at its first span and ends at its last
        assert r.address == min(s.address for s in r.spans)
        assert r.end == max(s.end for s in r.spans)
        assert r.count <= _limit(r.table, max_registers, max_bits)
        assert all(h <= _gap(r.table, max_gap) for h in _holes(r.spans))
    # order: by table, then address
    keys = [(TABLE_ORDER.index(r.table), r.address) for r in requests]
    assert keys == sorted(keys)


@given(problems())
def test_plan_invariants(problem: tuple[list[Span], int, int, int]) -> None:
    spans, max_registers, max_bits, max_gap = problem
    requests = plan(spans, max_registers, max_bits, max_gap)
    _check_plan(spans, requests, max_registers, max_bits, max_gap)
    # deterministic and independent of the input order
    assert plan(spans[::-1], max_registers, max_bits, max_gap) == requests


@settings(max_examples=400)
@given(problems(max_spans=8))
def test_plan_is_minimal(problem: tuple[list[Span], int, int, int]) -> None:
    spans, max_registers, max_bits, max_gap = problem
    requests = plan(spans, max_registers, max_bits, max_gap)
    assert len(requests) == _brute_force(spans, max_registers, max_bits, max_gap)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.integers(1, 6)).map(
            lambda t: Span(0, "holding_register", *t)
        ),
        max_size=7,
    ),
    st.integers(6, 10),
    st.integers(0, 2),
)
def test_plan_is_minimal_dense_overlaps(spans: list[Span], limit: int, gap: int) -> None:
    """Many overlapping spans on a short range: where a greedy would most likely go wrong."""
    spans = [Span(i, s.table, s.address, s.count) for i, s in enumerate(spans)]
    requests = plan(spans, max_registers=limit, max_gap=gap)
    _check_plan(spans, requests, limit, 2000, gap)
    assert len(requests) == _brute_force(spans, limit, 2000, gap)


def test_bridging_span() -> None:
    # a long span bridges two short ones that could not share a request without it
    spans = [
        Span(0, "holding_register", 0, 1),
        Span(1, "holding_register", 1, 9),  # 1..9
        Span(2, "holding_register", 3, 9),  # 3..11: would make the first request 12 long
        Span(3, "holding_register", 4, 1),
        Span(4, "holding_register", 11, 1),
    ]
    requests = plan(spans, max_registers=10, max_gap=0)
    assert [(r.address, r.count) for r in requests] == [(0, 10), (3, 9)]
    assert [[s.key for s in r.spans] for r in requests] == [[0, 1], [2, 3, 4]]
    assert len(requests) == _brute_force(spans, 10, 2000, 0)


# -- examples --------------------------------------------------------------------------


def test_sdm630_like_map() -> None:
    # 30 float32 inputs at 0, 2, ..., 58, plus two at 342 and 344
    addresses = [*range(0, 60, 2), 342, 344]
    spans = [Span(i, "input_register", a, 2) for i, a in enumerate(addresses)]
    requests = plan(spans)
    assert [(r.table, r.address, r.count, len(r.spans)) for r in requests] == [
        ("input_register", 0, 60, 30),
        ("input_register", 342, 4, 2),
    ]
    assert describe(requests) == [
        "input_register 0..59 (60 registers, 30 points)",
        "input_register 342..345 (4 registers, 2 points)",
    ]
    # a device that takes at most 40 registers a read
    small = plan(spans, max_registers=40)
    assert [(r.address, r.count) for r in small] == [(0, 40), (40, 20), (342, 4)]


def test_gap_rule() -> None:
    spans = [Span(0, "holding_register", 100, 1), Span(1, "holding_register", 111, 1)]
    assert len(plan(spans, max_gap=10)) == 1  # 101..110 unused: exactly 10
    assert len(plan(spans, max_gap=9)) == 2
    touching = [Span(0, "holding_register", 0, 2), Span(1, "holding_register", 2, 2)]
    assert len(plan(touching, max_gap=0)) == 1


def test_bit_tables_gap_in_bits() -> None:
    spans = [Span(0, "coil", 0, 1), Span(1, "coil", 161, 1)]  # 160 unused bits
    assert [r.count for r in plan(spans, max_gap=10)] == [162]
    assert len(plan(spans, max_gap=9)) == 2
    assert len(plan(spans, max_gap=10, max_bits=100)) == 2


def test_same_register_two_bits() -> None:
    spans = [
        Span(0, "holding_register", 7, 1),
        Span(1, "holding_register", 7, 1),
        Span(2, "holding_register", 6, 2),
    ]
    (request,) = plan(spans)
    assert (request.address, request.count) == (6, 2)
    assert [s.key for s in request.spans] == [2, 0, 1]
    assert describe([request]) == ["holding_register 6..7 (2 registers, 3 points)"]


def test_table_order() -> None:
    spans = [
        Span(0, "input_register", 0, 1),
        Span(1, "holding_register", 5, 1),
        Span(2, "coil", 3, 1),
        Span(3, "discrete_input", 0, 1),
        Span(4, "holding_register", 1, 1),
    ]
    requests = plan(spans, max_gap=0)
    assert [(r.table, r.address) for r in requests] == [
        ("coil", 3),
        ("discrete_input", 0),
        ("holding_register", 1),
        ("holding_register", 5),
        ("input_register", 0),
    ]
    assert describe(requests)[0] == "coil 3..3 (1 bit, 1 point)"


def test_plan_errors() -> None:
    assert plan([]) == []
    with pytest.raises(ValueError, match="span 7"):
        plan([Span(7, "holding_register", 0, 126)])
    with pytest.raises(ValueError, match="span 8"):
        plan([Span(8, "holding_register", 0, 5)], max_registers=4)
    with pytest.raises(ValueError, match="span 9"):
        plan([Span(9, "coil", 0, 2001)])
    with pytest.raises(ValueError, match="span 3"):
        plan([Span(3, "holding_register", 65535, 2)])
    with pytest.raises(ValueError, match="span 4"):
        plan([Span(4, "holding_register", 0, 0)])
    with pytest.raises(ValueError, match="table"):
        plan([Span(5, "register", 0, 1)])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_gap"):
        plan([], max_gap=-1)
    # the protocol's largest read is fine
    assert plan([Span(1, "holding_register", 65535 - 124, 125)])[0].count == 125


# -- split -----------------------------------------------------------------------------


@given(problems())
def test_split(problem: tuple[list[Span], int, int, int]) -> None:
    spans, max_registers, max_bits, max_gap = problem
    for request in plan(spans, max_registers, max_bits, max_gap):
        parts = split(request)
        if len(request.spans) == 1 or len({(s.address, s.count) for s in request.spans}) == 1:
            assert parts == [request]
            continue
        assert len(parts) == 2
        first, second = parts
        # the same spans, in order, each in one half
        assert first.spans + second.spans == request.spans
        assert first.spans and second.spans
        for part in parts:
            assert part.table == request.table
            assert request.address <= part.address and part.end <= request.end
            assert part.address == min(s.address for s in part.spans)
            assert part.end == max(s.end for s in part.spans)
        # tighter: together the halves read no more than the request did
        assert first.count + second.count <= request.count + _overlap(first, second)


def _isolate(request: Request) -> list[Request]:
    """What the driver does when every read fails: split until nothing splits."""
    parts = split(request)
    if len(parts) == 1:
        return parts
    return [leaf for part in parts for leaf in _isolate(part)]


@given(problems())
def test_isolation_ends_at_points(problem: tuple[list[Span], int, int, int]) -> None:
    spans, max_registers, max_bits, max_gap = problem
    for request in plan(spans, max_registers, max_bits, max_gap):
        leaves = _isolate(request)
        assert tuple(s for leaf in leaves for s in leaf.spans) == request.spans
        for leaf in leaves:  # one point, or points on the very same registers
            assert len({(s.address, s.count) for s in leaf.spans}) == 1


def _overlap(a: Request, b: Request) -> int:
    return max(0, min(a.end, b.end) - max(a.address, b.address))


def test_split_examples() -> None:
    spans = [Span(i, "holding_register", a, 2) for i, a in enumerate([0, 2, 4, 10, 12, 20])]
    (request,) = plan(spans)
    first, second = split(request)
    assert (first.address, first.count, [s.key for s in first.spans]) == (0, 6, [0, 1, 2])
    assert (second.address, second.count, [s.key for s in second.spans]) == (10, 12, [3, 4, 5])
    # recursive isolation ends at single spans
    assert [[s.key for s in r.spans] for r in _isolate(request)] == [[k] for k in range(6)]

    single = plan([Span(0, "input_register", 5, 2)])[0]
    assert split(single) == [single]
    # two bits of one register: nothing to narrow
    bits = plan([Span(0, "holding_register", 3, 1), Span(1, "holding_register", 3, 1)])[0]
    assert split(bits) == [bits]


def test_split_prefers_a_clean_cut() -> None:
    # [0] [1] [1] [1] at register 5: the middle cut (after 2 spans) would read register 5
    # twice; the cut between address 0 and 5 does not
    spans = [Span(0, "holding_register", 0, 1)] + [
        Span(k, "holding_register", 5, 1) for k in (1, 2, 3)
    ]
    (request,) = plan(spans)
    first, second = split(request)
    assert [s.key for s in first.spans] == [0]
    assert [s.key for s in second.spans] == [1, 2, 3]
    assert split(second) == [second]


def test_split_without_a_clean_cut() -> None:
    # a float64 with bits of its registers: every cut overlaps, the middle one is taken
    spans = [
        Span(0, "holding_register", 0, 4),
        Span(1, "holding_register", 1, 1),
        Span(2, "holding_register", 2, 1),
        Span(3, "holding_register", 3, 1),
    ]
    (request,) = plan(spans)
    first, second = split(request)
    assert [s.key for s in first.spans] == [0, 1]
    assert (first.address, first.count) == (0, 4)
    assert [s.key for s in second.spans] == [2, 3]
    assert (second.address, second.count) == (2, 2)
