"""The filter stages' tables: hampel, median, deadband, sdt, rate limit and ema.

Each table compiles its points' specs into parameter arrays by slot, keeps per-slot
state in registered state arrays (saved across restarts for the persistent ones:
deadband, sdt, ratelimit, ema) and runs one kernel of the ``filters`` pair
(``native/_filters.pyx`` / ``native/filters_py.py``, where the algorithms are described)
over the whole batch. A table takes an optional ``kernels`` module (for tests routing one
implementation); by default the one ``native.impl`` picked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any, ClassVar, TypeVar

from native import impl
from native.batch import Batch
from native.filters_py import ACTION_DROP, ACTION_FIX, ACTION_FLAG, spill_capacity
from native.stages import (
    DeadbandStage,
    EmaStage,
    HampelStage,
    MedianStage,
    RateLimitStage,
    SdtStage,
)
from native.table import PipelineCounts, StageTable, empty_columns, truncate

S = TypeVar("S")

_ACTIONS = {
    "replace": ACTION_FIX,
    "clamp": ACTION_FIX,
    "flag": ACTION_FLAG,
    "drop": ACTION_DROP,
}

#: Hampel's MAD scale: 1.4826 x MAD estimates the standard deviation of normal data.
MAD_SCALE = 1.4826


def _joined(batch: Batch, kept: int, spill: Batch, spilled: int) -> Batch:
    """The output of deadband/sdt: the first ``kept`` rows of ``batch`` (written in
    place), then the first ``spilled`` of ``spill`` (rows that ran ahead of the input:
    a held reading of an earlier batch came out next to the one that released it)."""
    truncate(batch, kept)
    if spilled:
        batch.extend(truncate(spill, spilled))
    return batch


class FilterTable(StageTable[S]):
    """A StageTable running a kernel of the ``filters`` pair (``kernels``: the module to
    use instead of the one native.impl picked, e.g. to test one implementation)."""

    def __init__(self, specs: Mapping[int, S], kernels: ModuleType | None = None) -> None:
        super().__init__(specs)
        self.kernels = kernels if kernels is not None else impl.kernels("filters")

    def _cols(self, batch: Batch) -> tuple[Any, Any, Any, Any]:
        return batch.point_ids, batch.timestamps, batch.values, batch.quality


class _WindowTable(FilterTable[S]):
    """Hampel and median: a window of raw values and its sorted copy per slot, each
    ``stride`` (the table's largest window) doubles long."""

    persistent: ClassVar[bool] = False

    def _windows(self, sizes: list[int]) -> None:
        self.window = self._param("i", sizes)
        self.stride = max(sizes)
        self.ring = self._state_array("ring", "d", self.stride, 0.0)
        self.sorted = self._state_array("sorted", "d", self.stride, 0.0)
        self.count = self._state_array("count", "i")
        self.pos = self._state_array("pos", "i")


class HampelTable(_WindowTable[HampelStage]):
    kind = "hampel"

    def __init__(self, specs: Mapping[int, HampelStage], kernels: ModuleType | None = None) -> None:
        super().__init__(specs, kernels)
        stages = list(self.specs.values())
        self._windows([s.window for s in stages])
        # computed here once, so both implementations compare against the same double
        self.k = self._param("d", (s.threshold * MAD_SCALE for s in stages))
        self.action = self._param("B", (_ACTIONS[s.action] for s in stages))

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        kept, replaced, flagged, dropped = self.kernels.hampel(
            *self._cols(batch),
            self.slot_of,
            self.window,
            self.k,
            self.action,
            self.ring,
            self.sorted,
            self.count,
            self.pos,
            self.stride,
        )
        counts.replaced += replaced
        counts.flagged += flagged
        counts.dropped += dropped
        return truncate(batch, kept) if dropped else batch


class MedianTable(_WindowTable[MedianStage]):
    kind = "median"

    def __init__(self, specs: Mapping[int, MedianStage], kernels: ModuleType | None = None) -> None:
        super().__init__(specs, kernels)
        self._windows([s.window for s in self.specs.values()])

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        self.kernels.median(
            *self._cols(batch),
            self.slot_of,
            self.window,
            self.ring,
            self.sorted,
            self.count,
            self.pos,
            self.stride,
        )
        return batch


class DeadbandTable(FilterTable[DeadbandStage]):
    kind = "deadband"
    persistent = True

    def __init__(
        self, specs: Mapping[int, DeadbandStage], kernels: ModuleType | None = None
    ) -> None:
        super().__init__(specs, kernels)
        stages = list(self.specs.values())
        self.band = self._param("d", (s.band for s in stages))
        self.heartbeat = self._param("q", (s.heartbeat_ms for s in stages))
        self.has_sent = self._state_array("has_sent", "B")
        self.sent_ts = self._state_array("sent_ts", "q")
        self.sent_value = self._state_array("sent_value", "d", fill=0.0)
        self.has_held = self._state_array("has_held", "B")
        self.held_ts = self._state_array("held_ts", "q")
        self.held_value = self._state_array("held_value", "d", fill=0.0)

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        spill = empty_columns(spill_capacity(len(batch), self.has_held, len(self)))
        kept, spilled, suppressed = self.kernels.deadband(
            *self._cols(batch),
            *self._cols(spill),
            self.slot_of,
            self.band,
            self.heartbeat,
            self.has_sent,
            self.sent_ts,
            self.sent_value,
            self.has_held,
            self.held_ts,
            self.held_value,
        )
        counts.suppressed += suppressed
        return _joined(batch, kept, spill, spilled)


class SdtTable(FilterTable[SdtStage]):
    kind = "sdt"
    persistent = True

    def __init__(self, specs: Mapping[int, SdtStage], kernels: ModuleType | None = None) -> None:
        super().__init__(specs, kernels)
        stages = list(self.specs.values())
        self.deviation = self._param("d", (s.deviation for s in stages))
        self.max_interval = self._param("q", (s.max_interval_ms for s in stages))
        self.min_interval = self._param("q", (s.min_interval_ms for s in stages))
        self.has_a = self._state_array("has_a", "B")
        self.a_ts = self._state_array("a_ts", "q")
        self.a_value = self._state_array("a_value", "d", fill=0.0)
        self.has_h = self._state_array("has_h", "B")
        self.h_ts = self._state_array("h_ts", "q")
        self.h_value = self._state_array("h_value", "d", fill=0.0)
        self.door_lo = self._state_array("door_lo", "d", fill=-math.inf)
        self.door_hi = self._state_array("door_hi", "d", fill=math.inf)

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        spill = empty_columns(spill_capacity(len(batch), self.has_h, len(self)))
        kept, spilled, suppressed = self.kernels.sdt(
            *self._cols(batch),
            *self._cols(spill),
            self.slot_of,
            self.deviation,
            self.max_interval,
            self.min_interval,
            self.has_a,
            self.a_ts,
            self.a_value,
            self.has_h,
            self.h_ts,
            self.h_value,
            self.door_lo,
            self.door_hi,
        )
        counts.suppressed += suppressed
        return _joined(batch, kept, spill, spilled)


class RateLimitTable(FilterTable[RateLimitStage]):
    kind = "ratelimit"
    persistent = True

    def __init__(
        self, specs: Mapping[int, RateLimitStage], kernels: ModuleType | None = None
    ) -> None:
        super().__init__(specs, kernels)
        stages = list(self.specs.values())
        self.max_rate = self._param("d", (s.max_rate for s in stages))
        self.action = self._param("B", (_ACTIONS[s.action] for s in stages))
        self.has_last = self._state_array("has_last", "B")
        self.last_ts = self._state_array("last_ts", "q")
        self.last_value = self._state_array("last_value", "d", fill=0.0)

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        kept, clamped, flagged, dropped = self.kernels.ratelimit(
            *self._cols(batch),
            self.slot_of,
            self.max_rate,
            self.action,
            self.has_last,
            self.last_ts,
            self.last_value,
        )
        counts.clamped += clamped
        counts.flagged += flagged
        counts.dropped += dropped
        return truncate(batch, kept) if dropped else batch


class EmaTable(FilterTable[EmaStage]):
    kind = "ema"
    persistent = True

    def __init__(self, specs: Mapping[int, EmaStage], kernels: ModuleType | None = None) -> None:
        super().__init__(specs, kernels)
        stages = list(self.specs.values())
        # tau > 0 selects the time-based mode; alpha is then unused
        self.alpha = self._param("d", (s.alpha or 0.0 for s in stages))
        self.tau = self._param("d", (float(s.tau_ms or 0) for s in stages))
        self.has_y = self._state_array("has_y", "B")
        self.last_ts = self._state_array("last_ts", "q")
        self.y = self._state_array("y", "d", fill=0.0)

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        self.kernels.ema(
            *self._cols(batch),
            self.slot_of,
            self.alpha,
            self.tau,
            self.has_y,
            self.last_ts,
            self.y,
        )
        return batch


__all__ = [
    "MAD_SCALE",
    "DeadbandTable",
    "EmaTable",
    "FilterTable",
    "HampelTable",
    "MedianTable",
    "RateLimitTable",
    "SdtTable",
]
