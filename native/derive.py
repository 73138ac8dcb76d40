"""Derived points and rule conditions: the engine that evaluates compiled expressions
(``native.expr``) over batches.

The engine keeps, per point some spec reads (its *slot*), the last value, ts and quality
and, for points a window function reads, a ring of the last ``RING`` GOOD finite
readings. All of it, and the specs' programs, live in flat arrays built once, so a batch
is one kernel call (``derive_py`` documents the walk, the VM and the quality rules).
"""

from __future__ import annotations

import bisect
import struct
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from native import impl
from native.batch import Batch
from native.derive_py import RING, WINDOW_FUNCTIONS
from native.expr import Program

KEY_PREFIX = "derive:"
#: a slot's saved state: magic, last value, last ts, last quality, seen, ring readings
#: (then their timestamps, int64, and their values, float64)
_HEAD = struct.Struct("<2sdqBBH")
_MAGIC = b"D2"


def _array_i() -> array[int]:
    return array("I")


def _array_q() -> array[int]:
    return array("q")


def _array_d() -> array[float]:
    return array("d")


def _array_b() -> array[int]:
    return array("B")


@dataclass(frozen=True, slots=True)
class DerivedSpec:
    """One expression to evaluate: a derived point (``out_id``) or a rule condition."""

    program: Program
    inputs: tuple[int, ...]  # point id of each program input
    out_id: int | None  # the derived point; None: a condition, not emitted as a reading
    max_age_ms: int = 0  # 0: no staleness check


@dataclass(frozen=True, slots=True)
class Conditions:
    """The evaluations of the specs without ``out_id``, columnar, in evaluation order."""

    spec: array[int] = field(default_factory=_array_i)  # index into the specs
    ts: array[int] = field(default_factory=_array_q)
    value: array[float] = field(default_factory=_array_d)
    quality: array[int] = field(default_factory=_array_b)

    def __len__(self) -> int:
        return len(self.spec)


def _nonempty(arr: array[Any], fill: Any = 0) -> array[Any]:
    """The compiled kernel takes a pointer to the first item of every array."""
    if not len(arr):
        arr.append(fill)
    return arr


class DeriveEngine:
    """Evaluates ``specs`` (in topological order: a spec that reads another's ``out_id``
    comes after it) on each batch; see the module docstring."""

    def __init__(self, specs: Sequence[DerivedSpec], kernels: ModuleType | None = None) -> None:
        """``kernels``: the derive kernel module (default: ``impl.kernels("derive")``)."""
        self.kernels = impl.kernels("derive") if kernels is None else kernels
        self.specs = tuple(specs)
        slots: dict[int, int] = {}
        users: list[list[int]] = []

        def slot(pid: int) -> int:
            if pid < 0:
                raise ValueError(f"negative point id {pid}")
            if pid not in slots:
                slots[pid] = len(slots)
                users.append([])
            return slots[pid]

        self.code, self.code_off = array("i"), array("i", [0])
        self.consts, self.const_off = array("d"), array("i", [0])
        self.in_slot, self.in_off = array("i"), array("i", [0])
        self.win_in, self.win_fn, self.win_ms = array("i"), array("B"), array("q")
        self.win_off = array("i", [0])
        self.max_age, self.out_id = array("q"), array("q")
        outs: dict[int, int] = {}  # out id -> its spec
        windowed: set[int] = set()
        keep: dict[int, int] = {}  # slot -> the longest window over it (ms)
        depth = 1
        for j, spec in enumerate(self.specs):
            prog = spec.program
            if len(spec.inputs) != len(prog.inputs):
                raise ValueError(
                    f"spec {j}: {len(spec.inputs)} input ids for the program's "
                    f"{len(prog.inputs)} inputs ({', '.join(prog.inputs)})"
                )
            if spec.max_age_ms < 0:
                raise ValueError(f"spec {j}: negative max_age_ms")
            for pid in spec.inputs:
                s = slot(pid)
                if j not in users[s]:
                    users[s].append(j)
            self.in_slot.extend(slots[pid] for pid in spec.inputs)
            self.in_off.append(len(self.in_slot))
            self.code.extend(prog.code)
            self.code_off.append(len(self.code))
            self.consts.extend(prog.consts)
            self.const_off.append(len(self.consts))
            for k, fn, ms in prog.windows:
                self.win_in.append(k)
                self.win_fn.append(WINDOW_FUNCTIONS.index(fn))
                self.win_ms.append(ms)
                windowed.add(slots[spec.inputs[k]])
                keep[slots[spec.inputs[k]]] = max(keep.get(slots[spec.inputs[k]], 0), ms)
            self.win_off.append(len(self.win_in))
            self.max_age.append(spec.max_age_ms)
            depth = max(depth, prog.depth)
            if spec.out_id is None:
                self.out_id.append(-1)
            else:
                if spec.out_id in outs:
                    raise ValueError(
                        f"spec {j}: point {spec.out_id} is already the output of spec "
                        f"{outs[spec.out_id]}"
                    )
                outs[spec.out_id] = j
                self.out_id.append(spec.out_id)
        # each output gets a slot too (so `last` knows it); its readers must come later
        self.out_slot = array("i", [slot(p) if p >= 0 else -1 for p in self.out_id])
        for j, s in enumerate(self.out_slot):
            early = [u for u in users[s] if u <= j] if s >= 0 else []
            if early:
                raise ValueError(
                    f"spec {early[0]} reads point {self.out_id[j]}, the output of spec {j}: "
                    "specs must be in topological order (inputs first, no cycles)"
                )
        self.slots = slots
        self.keep_ms = keep
        n = len(slots)
        self.slot_of = array("i", [-1]) * (max(slots, default=-1) + 1)
        for pid, s in slots.items():
            self.slot_of[pid] = s
        self.dep_start = array("i", [0])
        self.dep_spec = array("i")
        for u in users:
            self.dep_spec.extend(sorted(u))
            self.dep_start.append(len(self.dep_spec))
        self.last_v = array("d", [float("nan")]) * n
        self.last_ts = array("q", bytes(8 * n))
        self.last_q = array("B", bytes(n))
        self.seen = array("B", bytes(n))
        self.ring_base = array("q", [-1]) * n
        for k, s in enumerate(sorted(windowed)):
            self.ring_base[s] = k * RING
        self.ring_head = array("q", bytes(8 * n))
        self.ring_n = array("q", bytes(8 * n))
        self.ring_ts = array("q", bytes(8 * RING * len(windowed)))
        self.ring_v = array("d", bytes(8 * RING * len(windowed)))
        self.dirty = array("B", bytes(len(self.specs)))
        self._saved_ts = array("q", [-1]) * n  # each slot's last ts at the last save
        self.stack = array("d", bytes(8 * depth))
        for arr in (self.code, self.in_slot, self.win_in, self.win_fn, self.win_ms):
            _nonempty(arr)
        for farr in (self.consts, self.ring_v):
            _nonempty(farr, 0.0)
        _nonempty(self.ring_ts)
        _nonempty(self.dep_spec)
        self._out = self._columns(0)

    def _columns(self, rows: int) -> tuple[array[Any], ...]:
        rows = max(rows, 2 * len(self.specs), 1)
        return (
            array("I", bytes(4 * rows)),
            array("q", bytes(8 * rows)),
            array("d", bytes(8 * rows)),
            array("B", bytes(rows)),
            array("I", bytes(4 * rows)),
            array("q", bytes(8 * rows)),
            array("d", bytes(8 * rows)),
            array("B", bytes(rows)),
        )

    def process(self, batch: Batch) -> tuple[Batch, Conditions]:
        """The derived readings and the conditions ``batch`` makes, in evaluation order."""
        n = len(batch)
        if n == 0 or not self.specs or not self.slots:
            return Batch(), Conditions()
        need = n + len(self.specs)
        if len(self._out[0]) < need or len(self._out[0]) > 4 * need + (1 << 16):
            self._out = self._columns(need)
        parts: list[tuple[array[Any], ...]] = []
        start = 0
        counts = array("q", [0, 0])
        while True:
            counts[0] = counts[1] = 0
            out = self._out
            start = self.kernels.process(
                start,
                batch.point_ids,
                batch.timestamps,
                batch.values,
                batch.quality,
                self.slot_of,
                self.dep_start,
                self.dep_spec,
                self.last_v,
                self.last_ts,
                self.last_q,
                self.seen,
                self.ring_base,
                self.ring_head,
                self.ring_n,
                self.ring_ts,
                self.ring_v,
                self.code,
                self.code_off,
                self.consts,
                self.const_off,
                self.in_slot,
                self.in_off,
                self.win_in,
                self.win_fn,
                self.win_ms,
                self.win_off,
                self.max_age,
                self.out_id,
                self.out_slot,
                self.dirty,
                self.stack,
                *out,
                counts,
            )
            o, c = counts[0], counts[1]
            parts.append(tuple(col[:o] for col in out[:4]) + tuple(col[:c] for col in out[4:]))
            if start >= n:
                break
            self._out = self._columns(2 * len(out[0]))  # more outputs than rows: grow
        if len(parts) > 1:
            for part in parts[1:]:
                for col, more in zip(parts[0], part, strict=True):
                    col.extend(more)
        first = parts[0]
        return Batch(*first[:4]), Conditions(*first[4:])

    # -- state -----------------------------------------------------------------------

    def last(self, point_id: int) -> tuple[float, int, int] | None:
        """(value, ts_ms, quality) of a point as the engine holds it; None if never seen."""
        s = self.slots.get(point_id)
        if s is None or not self.seen[s]:
            return None
        return self.last_v[s], self.last_ts[s], self.last_q[s]

    def _window(self, s: int) -> tuple[array[int], array[float]]:
        """Slot ``s``'s ring readings a window may still need (within its longest window
        of its last reading), oldest first."""
        base, head, count = self.ring_base[s], self.ring_head[s], self.ring_n[s]
        if base < 0 or not count:
            return array("q"), array("d")
        start = (head - count) % RING
        if start + count <= RING:
            parts = [(base + start, base + start + count)]
        else:
            parts = [(base + start, base + RING), (base, base + head)]
        ts, vs = array("q"), array("d")
        for lo, hi in parts:
            ts.extend(self.ring_ts[lo:hi])
            vs.extend(self.ring_v[lo:hi])
        first = bisect.bisect_right(ts, self.last_ts[s] - self.keep_ms[s])
        return ts[first:], vs[first:]

    def save_state(self, changed_only: bool = False) -> dict[str, bytes]:
        """``"derive:<point id>"`` -> the point's last reading and the ring readings its
        windows may still need, for every point seen (``changed_only``: read since the
        last save)."""
        out: dict[str, bytes] = {}
        for pid, s in self.slots.items():
            if not self.seen[s] or (changed_only and self.last_ts[s] == self._saved_ts[s]):
                continue
            self._saved_ts[s] = self.last_ts[s]
            ts, vs = self._window(s)
            head = _HEAD.pack(_MAGIC, self.last_v[s], self.last_ts[s], self.last_q[s], 1, len(ts))
            out[f"{KEY_PREFIX}{pid}"] = head + ts.tobytes() + vs.tobytes()
        return out

    def load_state(self, saved: Mapping[str, bytes]) -> int:
        """Resumes the points of ``saved`` (``save_state``'s form) that this engine reads;
        other keys and malformed blobs are skipped. Returns how many points resumed."""
        loaded = 0
        for key, blob in saved.items():
            if not key.startswith(KEY_PREFIX):
                continue
            try:
                pid = int(key[len(KEY_PREFIX) :])
            except ValueError:
                continue
            s = self.slots.get(pid)
            if s is None or len(blob) < _HEAD.size:
                continue
            magic, v, ts, q, seen, count = _HEAD.unpack_from(blob)
            if magic != _MAGIC or len(blob) != _HEAD.size + count * 16:
                continue
            self.last_v[s], self.last_ts[s], self.last_q[s], self.seen[s] = v, ts, q, seen
            base = self.ring_base[s]
            if base >= 0:
                times, values = array("q"), array("d")
                times.frombytes(blob[_HEAD.size : _HEAD.size + 8 * count])
                values.frombytes(blob[_HEAD.size + 8 * count :])
                n = min(count, RING)
                self.ring_ts[base : base + n] = times[count - n :]
                self.ring_v[base : base + n] = values[count - n :]
                self.ring_n[s] = n
                self.ring_head[s] = n % RING
            loaded += 1
        return loaded

    def carry_state(self, old: DeriveEngine) -> int:
        """A config reload: the points both engines read go on where ``old`` left them."""
        return self.load_state(old.save_state())
