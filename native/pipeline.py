"""The per-point pipeline: an ordered list of stages per point, run over whole batches.

Stages are compiled into lookup tables indexed by point id, so a batch goes through each
kernel in one columnar pass with no Python object per reading. Depth k of the pipeline
holds the k-th stage of every point; points are independent, so running depth by depth
keeps each point's own stage order. Later stages (Hampel, deadband, SDT, aggregates,
alarm rules) become more stage specs with their own tables at each depth.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from native import impl
from native.batch import Batch
from native.kernels_py import ACTION_DROP, ACTION_FLAG, ACTION_NONE

MAX_POINT_ID = 999_999  # ids are small ints; tables are sized max id + 1


@dataclass(frozen=True, slots=True)
class RangeStage:
    """Physical limits of a point. Out of range (or NaN): ``flag`` sets quality BAD and
    keeps the reading, ``drop`` removes it. ``None`` means no limit on that side."""

    min: float | None = None
    max: float | None = None
    action: Literal["flag", "drop"] = "flag"

    def __post_init__(self) -> None:
        if self.action not in ("flag", "drop"):
            raise ValueError(f"range stage action must be 'flag' or 'drop', not {self.action!r}")
        for name, bound in (("min", self.min), ("max", self.max)):
            if bound is not None and math.isnan(bound):
                raise ValueError(f"range stage {name} is NaN")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range stage min {self.min} is above max {self.max}")


# The union grows as stages are added.
StageSpec: TypeAlias = RangeStage


@dataclass(frozen=True, slots=True)
class PipelineCounts:
    flagged: int = 0  # readings marked BAD by a stage
    dropped: int = 0  # readings removed by a stage


class _RangeTable:
    """lo/hi/action by point id for the range stages at one depth of the pipeline."""

    __slots__ = ("action", "hi", "lo")

    def __init__(self, stages: Mapping[int, RangeStage]) -> None:
        size = max(stages) + 1
        self.lo = array("d", [-math.inf]) * size
        self.hi = array("d", [math.inf]) * size
        self.action = array("B", [ACTION_NONE]) * size
        for pid, stage in stages.items():
            if stage.min is not None:
                self.lo[pid] = stage.min
            if stage.max is not None:
                self.hi[pid] = stage.max
            self.action[pid] = ACTION_DROP if stage.action == "drop" else ACTION_FLAG

    def apply(self, batch: Batch) -> tuple[int, int]:
        kept, flagged, dropped = impl.range_check(
            batch.point_ids,
            batch.timestamps,
            batch.values,
            batch.quality,
            self.lo,
            self.hi,
            self.action,
        )
        if dropped:
            # the kernel compacted the kept readings to the front of each column
            for col in (batch.point_ids, batch.timestamps, batch.values, batch.quality):
                del col[kept:]
        return flagged, dropped


class Pipeline:
    """Runs each point's stages over batches. Points without stages pass through."""

    def __init__(self, stages_by_point: Mapping[int, Sequence[StageSpec]]) -> None:
        depth = max((len(s) for s in stages_by_point.values()), default=0)
        by_depth: list[dict[int, RangeStage]] = [{} for _ in range(depth)]
        for pid, stages in stages_by_point.items():
            if not 0 <= pid <= MAX_POINT_ID:
                raise ValueError(f"point id {pid} outside 0..{MAX_POINT_ID}")
            for k, stage in enumerate(stages):
                if not isinstance(stage, RangeStage):
                    raise TypeError(f"point {pid}: unknown stage {stage!r}")
                by_depth[k][pid] = stage
        self._tables = [_RangeTable(stages) for stages in by_depth]

    def process(self, batch: Batch) -> tuple[Batch, PipelineCounts]:
        """Filters ``batch`` in place (its arrays are modified) and returns it with counts."""
        flagged = dropped = 0
        for table in self._tables:
            f, d = table.apply(batch)
            flagged += f
            dropped += d
        return batch, PipelineCounts(flagged, dropped)
