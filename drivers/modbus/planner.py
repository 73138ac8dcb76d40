"""The request planner: which read requests fetch a device's points (sans-I/O, pure).

Each point is a `Span` — a range of addresses in one table, tagged with the caller's
key — and `plan` merges the spans of each table into as few read requests as the
device's limits allow:

- a request reads at most ``max_registers`` registers (register tables) or
  ``max_bits`` bits (coil, discrete_input tables);
- inside a request, the unused addresses between two consecutive covered ranges (the
  union of its spans) are at most ``max_gap`` registers; in bit tables the allowed gap
  is ``max_gap * 16`` bits (the same 2 bytes per unused register on the wire);
- each table may have its own limits (a device's `table_limits`): the rules above
  apply table by table, with that table's numbers;
- overlapping or identical spans (two bits of one register) are fine; each span belongs
  to exactly one request.

Minimality. Sort the spans of a table by (start, end) as s_1..s_n and merge greedily:
span j joins the open request unless it starts more than the allowed gap after the
request's end, or the request would grow beyond the limit; then it opens a new one.
This gives the fewest requests possible. Proof, by induction on n, against the even
weaker *cover* problem (a set of address ranges R, each of length <= limit, such that
every span lies inside some R, and the spans lying inside any R leave no hole > gap
and reach both its ends; a partition into requests is such a cover, so
OPT_cover <= OPT_partition). Let the greedy's first request be s_1..s_k, ending at E,
and Q any cover. Span s_{k+1} was refused for one of two reasons:

1. Gap: s_{k+1} starts more than gap after E. No span covers the addresses between
   (the first k end by E, the others start at or after s_{k+1}), so no range of Q holds
   spans of both sides; at least one range of Q serves the left side only, and the
   others form a cover of s_{k+1}..s_n: |Q| >= 1 + OPT_cover(rest).
2. Limit: s_{k+1} ends past start(s_1) + limit =: M. Drop from Q the range Q1 holding
   s_1 (it ends at or before M), and shrink every other range to the spans of the rest
   that lie in it — for the range B holding s_{k+1} all of them, for any other range
   only those ending after end(s_{k+1}). (i) Every span of the rest is still covered:
   one that ends by end(s_{k+1}) starts at or after start(s_{k+1}), so it lies inside
   s_{k+1} and hence inside the shrunk B; one that ends later was not in Q1 and kept its
   range. (ii) The shrunk ranges have no new holes: the removed spans all end by
   end(s_{k+1}), while in B the union runs without a hole from start(s_{k+1}) to
   end(s_{k+1}) (s_{k+1} itself, and no kept span starts earlier), and in any other
   range every kept span ends after end(s_{k+1}), so a hole among them lies above
   end(s_{k+1}), where nothing was removed. So |Q| >= 1 + OPT_cover(rest).

In both cases greedy = 1 + greedy(rest) = 1 + OPT_cover(rest) <= OPT_cover <= OPT,
and the greedy is a partition, so it is optimal (tests/test_modbus_planner.py checks it
against a brute force). Planning is O(n log n).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from drivers.modbus.datatypes import BIT_TABLES

if TYPE_CHECKING:
    from drivers.modbus.settings import Table

__all__ = ["TABLE_ORDER", "Request", "Span", "describe", "plan", "split"]

#: order of tables in a plan
TABLE_ORDER: tuple[Table, ...] = ("coil", "discrete_input", "holding_register", "input_register")
_RANK = {t: i for i, t in enumerate(TABLE_ORDER)}
#: bits a "register" of max_gap stands for in bit tables
GAP_BITS_PER_REGISTER = 16


@dataclass(frozen=True, slots=True)
class Span:
    """One point: `count` registers (register tables) or bits (bit tables) at `address`."""

    key: int  # the caller's point index
    table: Table
    address: int
    count: int

    @property
    def end(self) -> int:
        """The first address after the span."""
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class Request:
    """One read: `count` registers or bits of `table` from `address`, serving `spans`
    (sorted by address, then end, then key)."""

    table: Table
    address: int
    count: int
    spans: tuple[Span, ...]

    @property
    def end(self) -> int:
        """The first address after the request."""
        return self.address + self.count


def _request(spans: Sequence[Span]) -> Request:
    lo = min(s.address for s in spans)
    hi = max(s.end for s in spans)
    return Request(spans[0].table, lo, hi - lo, tuple(spans))


def plan(
    spans: Sequence[Span],
    max_registers: int = 125,
    max_bits: int = 2000,
    max_gap: int = 10,
    tables: Mapping[str, tuple[int, int]] | None = None,
) -> list[Request]:
    """The fewest read requests that fetch all `spans` within the limits (see the module
    docstring for the rule and the proof). Ordered by table (coil, discrete_input,
    holding_register, input_register), then address; deterministic.

    `tables` overrides the limits of some tables: table -> (most registers or bits one
    request reads, max_gap in registers). The rule holds per table, so the proof does too.

    ValueError for a span of an unknown table, with count < 1, outside 0..65535, or
    larger than its table's limit (naming the span's key)."""
    limits: dict[str, tuple[int, int]] = {
        t: (max_bits if t in BIT_TABLES else max_registers, max_gap) for t in TABLE_ORDER
    }
    limits.update(tables or {})
    for table, (size, gap_) in limits.items():
        if size < 1 or gap_ < 0:
            raise ValueError(
                f"{table}: limits must be max_registers/max_bits >= 1, max_gap >= 0; got "
                f"{size}, {gap_}"
            )

    def _limits(table: str) -> tuple[int, int]:
        size, gap_ = limits[table]
        return (size, gap_ * GAP_BITS_PER_REGISTER) if table in BIT_TABLES else (size, gap_)

    for s in spans:
        if s.table not in _RANK:
            raise ValueError(f"span {s.key}: unknown table {s.table!r}")
        if s.count < 1 or s.address < 0 or s.end > 65536:
            raise ValueError(
                f"span {s.key}: {s.table} {s.address} count {s.count} is not a valid range "
                "(count >= 1, addresses 0..65535)"
            )
        limit = _limits(s.table)[0]
        if s.count > limit:
            unit = "bits" if s.table in BIT_TABLES else "registers"
            raise ValueError(
                f"span {s.key}: {s.count} {unit} at {s.table} {s.address} exceed the limit "
                f"of one request ({limit} {unit})"
            )

    out: list[Request] = []
    ordered = sorted(spans, key=lambda s: (_RANK[s.table], s.address, s.end, s.key))
    current: list[Span] = []
    lo = hi = limit = gap = 0
    for s in ordered:
        if current and (
            s.table == current[0].table and s.address - hi <= gap and max(hi, s.end) - lo <= limit
        ):
            current.append(s)
            hi = max(hi, s.end)
            continue
        if current:
            out.append(Request(current[0].table, lo, hi - lo, tuple(current)))
        limit, gap = _limits(s.table)
        current = [s]
        lo, hi = s.address, s.end
    if current:
        out.append(Request(current[0].table, lo, hi - lo, tuple(current)))
    return out


def split(request: Request) -> list[Request]:
    """`request` in two, to isolate the point an exception response (illegal data
    address) is about: the first and the second half of its spans, each request
    tightened to its own spans.

    The cut goes between two consecutive spans (in the request's span order) that do not
    overlap, as near the middle as possible, so that a register is not read by both
    halves; if every cut overlaps, it is the plain middle. A request with one span, or
    whose spans all cover the same range, cannot be narrowed: [request]."""
    spans = request.spans
    n = len(spans)
    if n < 2 or all((s.address, s.count) == (spans[0].address, spans[0].count) for s in spans[1:]):
        return [request]
    cut = n // 2
    clean = []
    reach = spans[0].end
    for i in range(1, n):
        if spans[i].address >= reach:
            clean.append(i)
        reach = max(reach, spans[i].end)
    if clean:
        cut = min(clean, key=lambda i: (abs(2 * i - n), i))
    return [_request(spans[:cut]), _request(spans[cut:])]


def describe(requests: Sequence[Request]) -> list[str]:
    """One line per request, e.g. ``holding_register 100..131 (32 registers, 9 points)``
    (addresses inclusive, 0-based)."""
    lines = []
    for r in requests:
        unit = "bit" if r.table in BIT_TABLES else "register"
        keys = {s.key for s in r.spans}
        points = len(keys)
        lines.append(
            f"{r.table} {r.address}..{r.end - 1} ({r.count} {unit}{'s' if r.count != 1 else ''}, "
            f"{points} point{'s' if points != 1 else ''})"
        )
    return lines
