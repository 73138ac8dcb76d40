"""The per-point pipeline: an ordered list of stages per point, run over whole batches.

Depth k of the pipeline holds the k-th stage of every point, grouped into one table per
stage type (native/table.py); points are independent, so running depth by depth, table by
table, keeps each point's own stage order while every kernel makes one columnar pass over
the batch. Alarm rules are stages too: they pass readings on and emit AlarmEvents.

Timed stages (stale alarms, the timed close of aggregate windows) measure real time on the
pipeline's own clock, ``elapsed_ms``: the milliseconds the pipeline has run, advanced by
the monotonic clock between runs and saved with the stage state. The wall clock can step
(NTP, an RTC back in 1970, a technician) and the monotonic clock starts again at every
boot, so neither can be kept in state; this clock does neither. Time while the agent was
not running does not count: a restart resumes the stale rules' silence where it stopped.
"""

from __future__ import annotations

import struct
from array import array
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from itertools import compress
from typing import Any

from native import stages as st
from native.aggregate import AggregateTable
from native.alarms import AlarmTable
from native.batch import GOOD, Batch
from native.filters import (
    DeadbandTable,
    EmaTable,
    HampelTable,
    MedianTable,
    RateLimitTable,
    SdtTable,
)
from native.range_table import RangeTable
from native.table import PipelineCounts, StageTable

MAX_POINT_ID = 999_999  # ids are small ints; tables are sized max id + 1
#: the pipeline clock's key in the saved state (not a point's: no digits after the last ":")
ELAPSED_KEY = "clock:elapsed"
_ELAPSED = struct.Struct("<q")

# spec type -> the table that runs it
_TABLES: dict[type, type[StageTable[Any]]] = {
    st.RangeStage: RangeTable,
    st.HampelStage: HampelTable,
    st.MedianStage: MedianTable,
    st.DeadbandStage: DeadbandTable,
    st.SdtStage: SdtTable,
    st.RateLimitStage: RateLimitTable,
    st.EmaStage: EmaTable,
    st.AggregateStage: AggregateTable,
    st.ThresholdRule: AlarmTable,
    st.RateRule: AlarmTable,
    st.StaleRule: AlarmTable,
    st.FlatlineRule: AlarmTable,
    st.BadQualityRule: AlarmTable,
}


def table_class(spec: object) -> type[StageTable[Any]]:
    cls = _TABLES.get(type(spec))
    if cls is None:
        raise TypeError(f"unknown stage {spec!r}")
    return cls


assert GOOD == 0, "_by_point takes a quality byte's truth for 'not good'"

#: the tables that flag or drop readings (the others replace, hold back or pass on)
_REJECTING = (RangeTable, HampelTable, RateLimitTable)


def _by_point(ids: array[int], quality: array[int], out: Batch, counts: PipelineCounts) -> None:
    """Adds to ``counts`` what one table flagged and dropped, by point, from its input
    (``ids``, ``quality``) and output. A point has one action per table, and a stage
    passes readings that are not good untouched: a point's readings that went missing
    were dropped, its readings that turned not good were flagged."""
    dropped = Counter(ids)
    dropped.subtract(Counter(out.point_ids))
    # GOOD is 0, so a quality byte is true when the reading is not good (C-speed compress)
    flagged = Counter(compress(out.point_ids, out.quality))
    flagged.subtract(Counter(compress(ids, quality)))
    for by, diff in ((counts.dropped_by_point, dropped), (counts.flagged_by_point, flagged)):
        for pid, n in diff.items():
            if n > 0:
                by[pid] = by.get(pid, 0) + n


class Pipeline:
    """Runs each point's stages over batches. Points without stages pass through."""

    def __init__(self, stages_by_point: Mapping[int, Sequence[st.StageSpec]]) -> None:
        # (depth, table class) -> {pid: spec}, in first-seen order
        groups: dict[tuple[int, type[StageTable[Any]]], dict[int, object]] = {}
        for pid, stages in stages_by_point.items():
            if not 0 <= pid <= MAX_POINT_ID:
                raise ValueError(f"point id {pid} outside 0..{MAX_POINT_ID}")
            for depth, spec in enumerate(stages):
                groups.setdefault((depth, table_class(spec)), {})[pid] = spec
        self.tables: list[tuple[str, StageTable[Any]]] = [
            (f"{depth}:{cls.kind}", cls(specs))
            for (depth, cls), specs in sorted(groups.items(), key=lambda kv: kv[0][0])
        ]
        self.timed = any(t.timed for _, t in self.tables)
        self.persistent = any(t.persistent for _, t in self.tables)
        self.elapsed_ms = 0  # the pipeline clock (module docstring)
        self._last_monotonic_ms: int | None = None  # none yet since start

    def process(
        self, batch: Batch, now_ms: int = 0, monotonic_ms: int | None = None, *, last: bool = True
    ) -> tuple[Batch, PipelineCounts]:
        """Runs ``batch`` through every table (its arrays may be modified) and returns
        the result with what the stages did. For timed stages: ``now_ms`` is the wall
        clock (0: no clock, no timed checks), which stamps their events; ``monotonic_ms``
        a monotonic clock (any origin), which advances the pipeline clock. Without it
        ``now_ms`` serves as both (tests, replays); give it always or never.

        ``last=False``: more parts of the same run follow, at the same clocks (a big flush
        cut into parts so that no step holds the GIL long): the clock checks wait for the
        last part, and the parts' outputs, in order, are what one run over the parts'
        concatenation gives (``StageTable.run_part``)."""
        elapsed = None if monotonic_ms is None else self._advance(monotonic_ms)
        counts = PipelineCounts()
        for _, table in self.tables:
            run = table.run if last else table.run_part
            if not isinstance(table, _REJECTING):
                batch = run(batch, now_ms, counts, elapsed)
                continue
            # the kernels count, but not by point: compare with the input (two memcpys)
            ids, quality = batch.point_ids[:], batch.quality[:]
            flagged, dropped = counts.flagged, counts.dropped
            batch = run(batch, now_ms, counts, elapsed)
            if counts.flagged != flagged or counts.dropped != dropped:
                _by_point(ids, quality, batch, counts)
        return batch, counts

    def _advance(self, monotonic_ms: int) -> int:
        """The pipeline clock, advanced by the monotonic time since the last run (none
        for the first run after a start; never backwards)."""
        last, self._last_monotonic_ms = self._last_monotonic_ms, monotonic_ms
        if last is not None and monotonic_ms > last:
            self.elapsed_ms += monotonic_ms - last
        return self.elapsed_ms

    def save_state(self, pids: Iterable[int] | None = None) -> dict[str, bytes]:
        """The state worth keeping across a restart, as ``{"<depth>:<kind>:<pid>": blob}``:
        of the points in ``pids`` (the ones a run touched; timed tables: all points)."""
        wanted = None if pids is None else frozenset(pids)
        out: dict[str, bytes] = {}
        if self.timed:  # saved with the timed tables' state, which is on this clock
            out[ELAPSED_KEY] = _ELAPSED.pack(self.elapsed_ms)
        for key, table in self.tables:
            if not table.persistent:
                continue
            for pid, blob in table.save_state(None if table.timed else wanted).items():
                out[f"{key}:{pid}"] = blob
        return out

    def load_state(self, saved: Mapping[str, bytes]) -> int:
        """Restores what ``save_state`` produced, where the config still matches;
        returns how many (point, stage) states resumed. The pipeline clock resumes where
        it was saved (state saved before it existed: from 0, see the tables' upgrades)."""
        clock = saved.get(ELAPSED_KEY, b"")
        if len(clock) == _ELAPSED.size:
            self.elapsed_ms = max(_ELAPSED.unpack(clock)[0], 0)
        self._last_monotonic_ms = None
        by_table: dict[str, dict[int, bytes]] = {}
        for k, blob in saved.items():
            key, _, pid = k.rpartition(":")
            if pid.isdigit():
                by_table.setdefault(key, {})[int(pid)] = blob
        return sum(table.load_state(by_table.get(key, {})) for key, table in self.tables)

    def carry_state(self, old: Pipeline, pids: Collection[int]) -> int:
        """Continues `old` (a config reload): its clock, and the stage state of the
        points in `pids` (their stages are unchanged); returns how many (point, stage)
        states carried over. The other points start afresh. Unlike a restart's
        `save_state`, every table with state carries (windows of raw values too)."""
        wanted = frozenset(pids)
        mine = dict(self.tables)
        carried = 0
        for key, table in old.tables:
            if table.state and key in mine:
                carried += mine[key].load_state(table.save_state(wanted))
        self.elapsed_ms, self._last_monotonic_ms = old.elapsed_ms, old._last_monotonic_ms
        return carried


__all__ = ["ELAPSED_KEY", "MAX_POINT_ID", "Pipeline", "PipelineCounts", "table_class"]
