"""The aggregate stage's table: tumbling windows by point, one kernel pass per batch.

The specs compile into arrays by slot (window, grace, raw, function codes and output ids,
8 per slot); the window state (phase, start, count and the accumulators) lives in state
arrays, saved and restored per point by the base class. The kernels are
``impl.kernels("aggregate")`` (``native/_aggregate.pyx`` or its twin
``native/aggregate_py.py``, where the algorithm is described), or a module given to the
constructor (tests route a table through one implementation that way).

Each run first asks ``aggregate_size`` for the exact number of output rows (readings
passed on plus aggregates emitted), then ``aggregate`` writes them into columns of that
size. After the batch's readings, windows whose deadline has come are closed: the deadline
is set when a window opens, on the pipeline's monotonic clock (``elapsed_ms``), from the
opening reading's time to the window's end plus grace (``aggregate_py.deadline_of``), so a
step of the wall clock neither closes windows early nor holds them open. ``now_ms == 0``
means "no clock", and then only a point's next window's reading closes its open window
(tests, replays).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType

from native import impl
from native.aggregate_py import ACC, FUNCTIONS, MAX_FN, OPEN
from native.batch import Batch
from native.stages import AGGREGATE_FUNCTIONS, AggregateStage
from native.table import PipelineCounts, StageTable, empty_columns, truncate

assert FUNCTIONS == AGGREGATE_FUNCTIONS, "aggregate function codes out of step with the specs"

_INT64_MAX = 2**63 - 1


class AggregateTable(StageTable[AggregateStage]):
    kind = "aggregate"
    persistent = True
    timed = True
    added_state = ("deadline",)  # came with the monotonic clock: see _upgraded

    def __init__(
        self, specs: Mapping[int, AggregateStage], kernels: ModuleType | None = None
    ) -> None:
        super().__init__(specs)
        self.kernels = kernels if kernels is not None else impl.kernels("aggregate")
        stages = list(self.specs.values())
        for pid, stage in self.specs.items():
            if stage.window_ms > _INT64_MAX or stage.grace_ms > _INT64_MAX:
                raise ValueError(f"aggregate window/grace of point {pid} beyond int64 ms")
            if len(stage.outputs) > MAX_FN:  # specs forbid repeats, so this cannot happen
                raise ValueError(f"aggregate of point {pid}: more than {MAX_FN} functions")
        self.window_ms = self._param("q", (s.window_ms for s in stages))
        self.grace_ms = self._param("q", (s.grace_ms for s in stages))
        self.raw = self._param("B", (int(s.raw) for s in stages))
        self.nfn = self._param("B", (len(s.outputs) for s in stages))
        codes: list[int] = []
        outs: list[int] = []
        for s in stages:
            pad = MAX_FN - len(s.outputs)
            codes += [FUNCTIONS.index(f) for f, _ in s.outputs] + [0] * pad
            outs += [pid for _, pid in s.outputs] + [0] * pad
        self.fcode = self._param("B", codes)
        self.fout = self._param("I", outs)
        # state: see aggregate_py's docstring (phase NEVER=0 / OPEN=1 / CLOSED=2)
        self.phase = self._state_array("phase", "B")
        self.start = self._state_array("start", "q")
        self.count = self._state_array("count", "q")
        self.acc = self._state_array("acc", "d", ACC, 0.0)
        self.deadline = self._state_array("deadline", "q")

    def _upgraded(self, slot: int) -> None:
        # A window saved without its deadline closes by time within window + grace of the
        # pipeline clock's start (the state had no clock either), never at once.
        if self.phase[slot] == OPEN:
            self.deadline[slot] = min(self.window_ms[slot] + self.grace_ms[slot], _INT64_MAX)

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        return self._run(batch, now_ms, counts, elapsed_ms, close_by_time=True)

    def run_part(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        # the wall clock still sets the deadlines of the windows this part opens
        return self._run(batch, now_ms, counts, elapsed_ms, close_by_time=False)

    def _run(
        self,
        batch: Batch,
        now_ms: int,
        counts: PipelineCounts,
        elapsed_ms: int | None,
        close_by_time: bool,
    ) -> Batch:
        k = self.kernels
        cols = (batch.point_ids, batch.timestamps, batch.values, batch.quality)
        params = (self.slot_of, self.window_ms, self.grace_ms, self.raw, self.nfn)
        clocks = (now_ms, now_ms if elapsed_ms is None else elapsed_ms)
        size = k.aggregate_size(
            *cols, *params, self.phase, self.start, self.deadline, *clocks, close_by_time
        )
        out = empty_columns(size)
        n_out, windows, late, suppressed = k.aggregate(
            *cols,
            *params,
            self.fcode,
            self.fout,
            self.phase,
            self.start,
            self.count,
            self.acc,
            self.deadline,
            *clocks,
            out.point_ids,
            out.timestamps,
            out.values,
            out.quality,
            close_by_time,
        )
        counts.windows += windows
        counts.late += late
        counts.suppressed += suppressed
        return truncate(out, n_out)
