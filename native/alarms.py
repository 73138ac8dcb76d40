"""The alarm rules' table: the rules of one pipeline depth, one per point, of any type.

Each rule compiles to a type code and three parameters per slot (see
``native.alarms_py`` for what they mean), so one pass of the alarm kernel judges a whole
batch whatever mix of rules its points have. Readings pass on unchanged; raises and
clears come out of the kernel as event columns and become ``AlarmEvent``s here, in the
order the kernel decided them (readings in batch order, then the stale rules' clock
check in point id order). All rule state is in registered state arrays: a restart
resumes active alarms (raised ones are not raised again, and clear normally). The stale
rule measures silence on the pipeline's monotonic clock (``elapsed_ms``), from the
arrival of the point's last reading, so a step of the wall clock does not move it.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping
from types import ModuleType
from typing import TypeAlias

from native import impl
from native.alarms_py import (
    RULE_ABOVE,
    RULE_BAD_QUALITY,
    RULE_BELOW,
    RULE_FLATLINE,
    RULE_RATE,
    RULE_STALE,
)
from native.batch import Batch
from native.stages import (
    AlarmEvent,
    AlarmRule,
    BadQualityRule,
    FlatlineRule,
    RateRule,
    Severity,
    StaleRule,
    ThresholdRule,
)
from native.table import PipelineCounts, StageTable

_INT64_MAX = 2**63 - 1
#: event buffers up to this many rows are kept whatever the batch size
_KEEP_ROWS = 1 << 16

#: the kernel's event columns: slot, raised (0/1), ts, value, since
EventColumns: TypeAlias = "tuple[array[int], array[int], array[int], array[float], array[int]]"


def compile_rule(rule: AlarmRule) -> tuple[int, float, float, int]:
    """(type code, level, clear level, span) of a rule, as the kernel reads them."""
    if isinstance(rule, ThresholdRule):
        if rule.above is not None:
            code, level, clear = RULE_ABOVE, rule.above, rule.above - rule.hysteresis
        else:
            assert rule.below is not None  # the spec holds exactly one of them
            code, level, clear = RULE_BELOW, rule.below, rule.below + rule.hysteresis
        return code, level, clear, rule.min_duration_ms
    if isinstance(rule, RateRule):
        return RULE_RATE, rule.max_rate, 0.0, 0
    if isinstance(rule, StaleRule):
        return RULE_STALE, 0.0, 0.0, rule.after_ms
    if isinstance(rule, FlatlineRule):
        return RULE_FLATLINE, rule.tolerance, 0.0, rule.duration_ms
    if isinstance(rule, BadQualityRule):
        return RULE_BAD_QUALITY, 0.0, 0.0, rule.count
    raise TypeError(f"not an alarm rule: {rule!r}")


class AlarmTable(StageTable[AlarmRule]):
    """The alarm rules of one depth: ``{pid: rule}``, rules of any of the five types."""

    kind = "alarm"
    persistent = True
    timed = True
    # "seen" (the stale rule's arrival time) came with the monotonic clock; a stale rule
    # loaded without it counts its silence from the restart
    added_state = ("seen",)

    def __init__(self, specs: Mapping[int, AlarmRule], kernels: ModuleType | None = None) -> None:
        """``kernels``: the alarm kernel module to use (default: ``impl.kernels("alarms")``)."""
        super().__init__(specs)
        self.kernels = impl.kernels("alarms") if kernels is None else kernels
        compiled = [compile_rule(spec) for spec in self.specs.values()]
        self.rule = self._param("B", (c[0] for c in compiled))
        self.level = self._param("d", (c[1] for c in compiled))
        self.clear_level = self._param("d", (c[2] for c in compiled))
        # a span past int64 is never reached anyway
        self.span = self._param("q", (min(c[3], _INT64_MAX) for c in compiled))
        self._rule_ids: list[str] = [spec.id for spec in self.specs.values()]
        self._severities: list[Severity] = [spec.severity for spec in self.specs.values()]
        self.raised = self._state_array("raised", "B")
        self.active = self._state_array("active", "B")
        self.t0 = self._state_array("t0", "q")
        self.v0 = self._state_array("v0", "d")
        self.count = self._state_array("count", "q")
        self.raised_at = self._state_array("raised_at", "q")
        self.seen = self._state_array("seen", "q")
        self._events: EventColumns | None = None

    def _event_columns(self, rows: int) -> EventColumns:
        """The kernel's event columns, of at least ``rows`` rows. Allocating (and first
        touching) ~30 bytes per reading on every run cost more than the kernel itself, so
        they are kept between runs: grown to a power of two, shrunk when far too large."""
        have = 0 if self._events is None else len(self._events[0])
        if self._events is None or have < rows or (have > _KEEP_ROWS and have > 4 * rows):
            size = 1 << max(rows - 1, 1).bit_length()
            self._events = (
                array("i", bytes(4 * size)),
                array("B", bytes(size)),
                array("q", bytes(8 * size)),
                array("d", bytes(8 * size)),
                array("q", bytes(8 * size)),
            )
        return self._events

    def raised_points(self) -> list[int]:
        """The points whose alarm here is raised now."""
        return [pid for pid, up in zip(self.pids, self.raised, strict=True) if up]

    def run_part(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        # without the wall clock the kernel checks no silence; readings need only elapsed
        return self.run(batch, 0, counts, now_ms if elapsed_ms is None else elapsed_ms)

    def run(
        self, batch: Batch, now_ms: int, counts: PipelineCounts, elapsed_ms: int | None = None
    ) -> Batch:
        # each reading decides at most one event, the clock check at most one per slot
        ev_slot, ev_raised, ev_ts, ev_value, ev_since = self._event_columns(
            len(batch) + len(self.specs)
        )
        n_events: int = self.kernels.evaluate(
            batch.point_ids,
            batch.timestamps,
            batch.values,
            batch.quality,
            now_ms,
            now_ms if elapsed_ms is None else elapsed_ms,
            self.slot_of,
            self.rule,
            self.level,
            self.clear_level,
            self.span,
            self.raised,
            self.active,
            self.t0,
            self.v0,
            self.count,
            self.raised_at,
            self.seen,
            ev_slot,
            ev_raised,
            ev_ts,
            ev_value,
            ev_since,
        )
        pids, ids, severities = self.pids, self._rule_ids, self._severities
        counts.alarms.extend(
            AlarmEvent(
                pids[s],
                ids[s],
                severities[s],
                bool(ev_raised[k]),
                ev_ts[k],
                ev_value[k],
                ev_since[k],
            )
            for k, s in enumerate(ev_slot[:n_events])
        )
        return batch
