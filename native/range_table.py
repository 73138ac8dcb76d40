"""The range stage's table: physical limits by point, one pass of ``range_check``."""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping

from native import impl
from native.batch import Batch
from native.kernels_py import ACTION_DROP, ACTION_FLAG, ACTION_NONE
from native.stages import RangeStage
from native.table import PipelineCounts, StageTable, truncate


class RangeTable(StageTable[RangeStage]):
    kind = "range"

    def __init__(self, specs: Mapping[int, RangeStage]) -> None:
        super().__init__(specs)
        # range_check indexes its tables by point id directly (no slots): it is the
        # first stage of most points and the cheapest lookup matters there
        size = len(self.slot_of)
        self.lo = array("d", [-math.inf]) * size
        self.hi = array("d", [math.inf]) * size
        self.action = array("B", [ACTION_NONE]) * size
        for pid, stage in self.specs.items():
            if stage.min is not None:
                self.lo[pid] = stage.min
            if stage.max is not None:
                self.hi[pid] = stage.max
            self.action[pid] = ACTION_DROP if stage.action == "drop" else ACTION_FLAG

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        kept, flagged, dropped = impl.range_check(
            batch.point_ids,
            batch.timestamps,
            batch.values,
            batch.quality,
            self.lo,
            self.hi,
            self.action,
        )
        counts.flagged += flagged
        counts.dropped += dropped
        # the kernel compacted the kept readings to the front of each column
        return truncate(batch, kept) if dropped else batch
