"""The base of every stage table: all stages of one type at one depth of a pipeline.

A table compiles its points' specs into arrays indexed by a dense *slot* (``slot_of[pid]``,
-1 for points without this stage), so a kernel runs over a whole batch in one pass with
no Python object per reading. Per-point state lives in arrays too (``self.state``), and
the base class saves and restores it per point, keyed by the spec, so a restart resumes
where the last flush left off and a changed spec starts afresh.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from array import array
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from native.batch import Batch
from native.stages import AlarmEvent

SLOT_TYPECODE = "i"  # int32, -1 = no stage for this point
NO_SLOT = -1

S = TypeVar("S")


@dataclass(slots=True)
class PipelineCounts:
    """What the stages did to one run's readings (added up over a pipeline's tables)."""

    flagged: int = 0  # marked BAD (range, hampel, rate limit)
    dropped: int = 0  # removed as invalid (range, hampel, rate limit)
    replaced: int = 0  # spikes replaced by the median (hampel)
    clamped: int = 0  # moved to the rate limit
    suppressed: int = 0  # held back as redundant (deadband, sdt) or folded into aggregates
    windows: int = 0  # aggregate windows closed (each emits one reading per function)
    late: int = 0  # readings older than their point's open aggregate window
    alarms: list[AlarmEvent] = field(default_factory=list)
    #: flagged and dropped readings by point id, so that a warning can name the points
    #: (details of the totals above: equal counts compare by the totals)
    flagged_by_point: dict[int, int] = field(default_factory=dict, compare=False)
    dropped_by_point: dict[int, int] = field(default_factory=dict, compare=False)


def empty_columns(capacity: int) -> Batch:
    """A zero-filled batch of ``capacity`` rows for a kernel to write its output into;
    the caller truncates it with ``truncate`` to the count the kernel returns."""
    return Batch(
        array("I", bytes(4 * capacity)),
        array("q", bytes(8 * capacity)),
        array("d", bytes(8 * capacity)),
        array("B", bytes(capacity)),
    )


def truncate(batch: Batch, n: int) -> Batch:
    """Cuts every column of ``batch`` to its first ``n`` rows, in place."""
    for col in (batch.point_ids, batch.timestamps, batch.values, batch.quality):
        del col[n:]
    return batch


class StageTable(ABC, Generic[S]):
    """All stages of one type at one depth. Subclasses set ``kind``, build their
    parameter arrays by slot in ``__init__`` (after calling this one), register their
    per-slot state with ``_state_array`` and implement ``run``."""

    kind: ClassVar[str]
    #: whether the state is worth saving across restarts (see Pipeline.save_state)
    persistent: ClassVar[bool] = False
    #: whether the stage acts on the clock too (aggregate windows, stale alarms), so it
    #: runs on every flush even when no reading came in
    timed: ClassVar[bool] = False
    #: state arrays added since the table's first state layout, oldest first: a point's
    #: state saved before one was added still loads, that array zeroed, then `_upgraded`
    added_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, specs: Mapping[int, S]) -> None:
        if not specs:
            raise ValueError(f"{self.kind} table without points")
        self.specs: dict[int, S] = dict(sorted(specs.items()))
        self.pids = array("I", self.specs)
        self.slot_of = array(SLOT_TYPECODE, [NO_SLOT]) * (max(self.specs) + 1)
        for slot, pid in enumerate(self.specs):
            self.slot_of[pid] = slot
        self.state: dict[str, tuple[array[Any], int]] = {}

    def __len__(self) -> int:
        return len(self.specs)

    def _state_array(
        self, name: str, typecode: str, per_slot: int = 1, fill: Any = 0
    ) -> array[Any]:
        """A state array of ``per_slot`` items per slot, registered for save/restore."""
        arr = array(typecode, [fill]) * (per_slot * len(self.specs))
        self.state[name] = (arr, per_slot)
        return arr

    def _param(self, typecode: str, values: Iterable[Any]) -> array[Any]:
        """A parameter array by slot, from one value per spec in slot order."""
        return array(typecode, values)

    @abstractmethod
    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        """Applies the stages to ``batch`` (which the table may modify or replace) and
        returns the resulting batch; readings of points without a stage here pass
        through in their order. For timed stages: ``now_ms`` is the wall clock (0: no
        clock, no timed check), ``elapsed_ms`` the pipeline's monotonic clock, on which
        they measure time (None: ``now_ms`` serves as both, for tests and replays)."""

    def run_part(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        """``run`` over a part of a run that more parts follow, at the same clocks (a big
        flush cut into parts, see Pipeline.process): the readings only. The clock checks
        that follow them in ``run`` (stale alarms, windows closing by time) are the last
        part's, so the parts together do exactly what one run over all of them does.
        Tables without clock checks run as usual."""
        return self.run(batch, now_ms, counts, elapsed_ms)

    # -- state across restarts ------------------------------------------------------------

    def save_state(self, pids: Iterable[int] | None = None) -> dict[int, bytes]:
        """Each point's state (all points, or those in ``pids`` that have this stage),
        prefixed by its spec so that a changed config does not resume a stale state."""
        out: dict[int, bytes] = {}
        wanted = self.specs if pids is None else (p for p in pids if p in self.specs)
        names = sorted(self.state)
        for pid in wanted:
            slot = self.slot_of[pid]
            parts = [repr(self.specs[pid]).encode(), b"\0"]
            for name in names:
                arr, k = self.state[name]
                parts.append(arr[slot * k : (slot + 1) * k].tobytes())
            out[pid] = b"".join(parts)
        return out

    def load_state(self, saved: Mapping[int, bytes]) -> int:
        """Restores the points whose saved spec matches, in the current state layout or an
        earlier one (``added_state``); returns how many."""
        current = sorted(self.state)
        layouts = [current] + [
            [n for n in current if n not in self.added_state[k:]]
            for k in reversed(range(len(self.added_state)))
        ]
        restored = 0
        for pid, blob in saved.items():
            spec = self.specs.get(pid)
            if spec is None:
                continue
            head, sep, body = blob.partition(b"\0")
            if not sep or head != repr(spec).encode():
                continue
            # each added array makes a layout longer, so the length tells them apart
            for names in layouts:
                sizes = [self.state[n][1] * self.state[n][0].itemsize for n in names]
                if len(body) == sum(sizes):
                    break
            else:
                continue
            slot = self.slot_of[pid]
            offset = 0
            for name in current:
                arr, k = self.state[name]
                if name in names:
                    size = k * arr.itemsize
                    part = array(arr.typecode, body[offset : offset + size])
                    offset += size
                else:
                    part = array(arr.typecode, bytes(k * arr.itemsize))
                arr[slot * k : (slot + 1) * k] = part
            if names is not current:
                self._upgraded(slot)
            restored += 1
        return restored

    def _upgraded(self, slot: int) -> None:
        """Sets the state arrays a slot's state, loaded from an earlier layout, lacked."""
