"""Scanning one unit's register map (sans-I/O): which addresses of a table it lets you
read, with exact edges, and whether it only takes reads of whole register pairs.

`MapScan` yields the read requests to send (`next_probe()`) and takes what came back for
each (`feed()`, an `Outcome`); the caller does the I/O (`citygw modbus scan`). The search:

1. The range is probed in blocks of `block` registers (bits): the request size tried
   first. A block that reads is readable as a whole.
2. A refused block is bisected (cut on an even address where possible, so that halves
   of an even-aligned block stay even-aligned) until the refused pieces are single
   registers; the readable sub-ranges are then known to the register.
3. A single register that is refused is tried once more as its even-aligned pair
   (address & ~1, 2 registers): devices whose values are 32-bit (energy meters) often
   refuse a read that starts on an odd address or has an odd count. If the pair reads,
   both registers are readable. Outcomes are remembered, so a pair the bisection has
   already asked about costs nothing.
4. As soon as a readable range of 3 registers is known (else at the end), two reads
   inside it test the alignment rule directly: one register at an even address, two
   from an odd address. A refusal of either is a property of the device
   (`ScanResult.even_count`, `.even_start`); once single registers are known to be
   refused, the bisection stops at even-aligned pairs.

A request that gets no answer (a timeout, or a gateway's exception 10/11: "path
unavailable", "target device failed to respond") is neither readable nor refused: the
range is reported as unanswered and not bisected. If the unit's first request gets no
answer the unit is taken as absent and nothing more is sent to it.

Bound: per block at most 2·block − 1 bisection requests, plus one pair per refused
register whose pair the bisection did not ask about, plus 2 alignment checks per unit
(register tables only); `requests` counts what was sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "GATEWAY_NO_TARGET",
    "MapScan",
    "Outcome",
    "Probe",
    "ScanResult",
    "merge",
    "outcome_of_exception",
]

#: what the device (or the gateway in front of it) did with a read request
Outcome = Literal["read", "refused", "silent"]

#: exception codes by which a gateway says the unit behind it did not answer: 10 gateway
#: path unavailable, 11 gateway target device failed to respond
GATEWAY_NO_TARGET: frozenset[int] = frozenset({10, 11})

_ADDRESS_SPACE = 0x10000


def outcome_of_exception(code: int) -> Outcome:
    """An exception response: the gateway's "no answer from the unit" (10, 11) is no
    answer; any other code (2: illegal data address, ...) is the unit refusing."""
    return "silent" if code in GATEWAY_NO_TARGET else "refused"


@dataclass(frozen=True, slots=True)
class Probe:
    """One read request: `count` registers (bits) from `address`."""

    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


_Kind = Literal["range", "pair", "check_count", "check_start"]


@dataclass(slots=True)
class ScanResult:
    """What a scan found (ranges are (first, end) with end exclusive, merged, clipped to
    the scanned range)."""

    present: bool  # the unit answered at least once
    readable: list[tuple[int, int]] = field(default_factory=list)
    unanswered: list[tuple[int, int]] = field(default_factory=list)
    requests: int = 0
    #: single registers refused but read as their even-aligned pair
    pairs_needed: int = 0
    #: a read of one register inside a readable range was refused
    even_count: bool = False
    #: a read of two registers from an odd address inside a readable range was refused
    even_start: bool = False

    @property
    def even_only(self) -> bool:
        """The device takes only whole, even-aligned register pairs (suggests the
        device setting even_address_only = true)."""
        return self.even_count or self.even_start or self.pairs_needed > 0


def merge(
    ranges: list[tuple[int, int]], lo: int = 0, hi: int = _ADDRESS_SPACE
) -> list[tuple[int, int]]:
    """Sorted, overlapping or touching ranges joined, clipped to [lo, hi)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        a, b = max(a, lo), min(b, hi)
        if a >= b:
            continue
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


class MapScan:
    """The search over [start, stop) of one unit's table (see the module doc).
    `registers`: a register table (pairs and the alignment checks apply); False for
    coils and discrete inputs."""

    def __init__(self, start: int, stop: int, block: int, *, registers: bool = True) -> None:
        if not 0 <= start < stop <= _ADDRESS_SPACE or block < 1:
            raise ValueError(
                f"scan range {start}..{stop - 1} block {block}: need 0 <= start < stop <= "
                f"65536 and block >= 1"
            )
        self.start, self.stop, self.block = start, stop, block
        self.registers = registers
        self._next_block = start
        self._stack: list[tuple[Probe, _Kind]] = []  # LIFO, lowest address on top
        self._known: dict[Probe, Outcome] = {}
        self._pending: tuple[Probe, _Kind] | None = None
        self._answered = False
        self._absent = False
        self._checked = False
        self._readable: list[tuple[int, int]] = []
        self._unanswered: list[tuple[int, int]] = []
        self._result = ScanResult(present=False)

    # -- the caller's side ----------------------------------------------------------

    def next_probe(self) -> Probe | None:
        """The next request to send, or None when the scan is complete."""
        if self._pending is not None:
            raise RuntimeError(f"feed the outcome of {self._pending[0]} first")
        while not self._absent:
            item = self._take()
            if item is None:
                return None
            probe, kind = item
            known = self._known.get(probe)
            if known is not None:
                self._apply(probe, kind, known)
                continue
            self._pending = item
            self._result.requests += 1
            return probe
        return None

    def feed(self, probe: Probe, outcome: Outcome) -> None:
        """What came back for the request `next_probe()` returned last."""
        if self._pending is None or self._pending[0] != probe:
            raise RuntimeError(f"{probe} is not the request awaiting an outcome")
        _, kind = self._pending
        self._pending = None
        self._known[probe] = outcome
        if not self._answered:
            if outcome == "silent":
                self._absent = True  # nobody home: nothing more to this unit
                return
            self._answered = True
        self._apply(probe, kind, outcome)

    @property
    def result(self) -> ScanResult:
        r = self._result
        r.present = self._answered
        r.readable = merge(self._readable, self.start, self.stop)
        r.unanswered = merge(self._unanswered, self.start, self.stop)
        return r

    # -- the search -----------------------------------------------------------------

    def _take(self) -> tuple[Probe, _Kind] | None:
        if self._stack:
            return self._stack.pop()
        if self._next_block < self.stop:
            p = Probe(self._next_block, min(self.block, self.stop - self._next_block))
            self._next_block = p.end
            return p, "range"
        if not self._checked:  # the map gave no range long enough for both checks
            self._checked = True
            self._stack.extend(reversed(self._alignment_checks()))
            if self._stack:
                return self._stack.pop()
        return None

    def _alignment_checks(self) -> list[tuple[Probe, _Kind]]:
        """One register at an even address, then two from an odd one, inside what was
        read (which any sub-range of must read, unless alignment matters)."""
        if not self.registers:
            return []
        checks: list[tuple[Probe, _Kind]] = []
        ranges = merge(self._readable)
        even = next(((a + a % 2) for a, b in ranges if a + a % 2 < b), None)
        if even is not None:
            checks.append((Probe(even, 1), "check_count"))
        odd = next(((a + 1 - a % 2) for a, b in ranges if a + 1 - a % 2 + 2 <= b), None)
        if odd is not None:
            checks.append((Probe(odd, 2), "check_start"))
        return checks

    def _apply(self, probe: Probe, kind: _Kind, outcome: Outcome) -> None:
        if kind == "check_count":
            self._result.even_count = outcome == "refused"
            return
        if kind == "check_start":
            self._result.even_start = outcome == "refused"
            return
        if outcome == "read":
            self._readable.append((probe.address, probe.end))
            if kind == "pair":
                self._result.pairs_needed += 1
            if not self._checked:  # as early as possible: the rule halves the bisection
                checks = self._alignment_checks()
                if len(checks) == 2:
                    self._checked = True
                    self._stack.extend(reversed(checks))
        elif outcome == "silent":
            self._unanswered.append((probe.address, probe.end))
        elif kind == "range":
            self._bisect(probe)

    def _bisect(self, probe: Probe) -> None:
        a, n = probe.address, probe.count
        if n == 2 and a % 2 == 0 and self._result.even_count:
            return  # a refused pair of a device that reads no single register
        if n == 1:
            if self.registers:
                self._stack.append((Probe(a & ~1, 2), "pair"))
            return
        m = a + n // 2
        if m % 2:  # cut on an even address: halves of an even-aligned range stay aligned
            m = next((c for c in (m + 1, m - 1) if a < c < a + n), m)
        self._stack.append((Probe(m, a + n - m), "range"))
        self._stack.append((Probe(a, m - a), "range"))
