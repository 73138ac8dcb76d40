"""What each pipeline stage is configured with: plain frozen dataclasses, checked on
construction. The agent's config models (agent/config.py) turn TOML into these; the
stage tables (native/table.py and the modules per stage family) compile them into
arrays indexed by point. Times are int64 milliseconds, rates are per second.

A reading a stage cannot judge (quality not GOOD, or a NaN/inf value) passes through
every filter untouched and restarts that filter's state for its point, so a filter never
hides a fault and never compares across a gap of bad data. (The range stage also judges
UNCERTAIN readings and GOOD NaN/inf ones; see RangeStage.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, TypeAlias

Severity: TypeAlias = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")

AGGREGATE_FUNCTIONS = ("min", "max", "mean", "sum", "count", "last", "std", "laeq")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _finite(name: str, v: float | None) -> None:
    _require(v is None or math.isfinite(v), f"{name} must be a finite number, got {v}")


@dataclass(frozen=True, slots=True)
class RangeStage:
    """Physical limits of a point. A reading that claims a value (quality good or
    uncertain) out of range, or NaN: ``flag`` sets its quality BAD and keeps the value the
    device sent (for diagnosis; nothing downstream uses a BAD value), ``drop`` removes the
    reading and counts it. Readings already BAD or UNAVAILABLE pass untouched and
    uncounted: their quality says there is no value, and dropping them would hide a
    device fault. ``None`` means no limit on that side."""

    min: float | None = None
    max: float | None = None
    action: Literal["flag", "drop"] = "flag"

    def __post_init__(self) -> None:
        _require(
            self.action in ("flag", "drop"),
            f"range stage action must be 'flag' or 'drop', not {self.action!r}",
        )
        for name, bound in (("min", self.min), ("max", self.max)):
            _require(bound is None or not math.isnan(bound), f"range stage {name} is NaN")
        if self.min is not None and self.max is not None:
            _require(self.min <= self.max, f"range stage min {self.min} is above max {self.max}")


@dataclass(frozen=True, slots=True)
class HampelStage:
    """Spike removal. Over the point's last ``window`` good readings (the new one
    included), a reading further than ``threshold`` x 1.4826 x MAD from their median is a
    spike: ``replace`` puts the median in its place (quality kept), ``flag`` marks it
    BAD, ``drop`` removes it. Until the window is full, readings pass unjudged."""

    window: int = 7
    threshold: float = 3.0
    action: Literal["replace", "flag", "drop"] = "replace"

    def __post_init__(self) -> None:
        _require(3 <= self.window <= 255, f"hampel window must be 3..255, got {self.window}")
        _finite("hampel threshold", self.threshold)
        _require(self.threshold > 0, f"hampel threshold must be > 0, got {self.threshold}")
        _require(
            self.action in ("replace", "flag", "drop"),
            f"hampel action must be replace, flag or drop, not {self.action!r}",
        )


@dataclass(frozen=True, slots=True)
class MedianStage:
    """Rolling median: each reading becomes the median of the point's last ``window``
    good readings (itself included; fewer while the window fills). Even windows take
    the mean of the two middle values."""

    window: int = 5

    def __post_init__(self) -> None:
        _require(2 <= self.window <= 255, f"median window must be 2..255, got {self.window}")


@dataclass(frozen=True, slots=True)
class DeadbandStage:
    """Sends a reading only when it differs from the last sent one by more than
    ``band``; the reading held back just before such a change is sent first (so the
    platform sees where the change started), and with ``heartbeat_ms`` > 0 a reading is
    sent when none was for that long, so "unchanged" can be told from "dead"."""

    band: float
    heartbeat_ms: int = 0

    def __post_init__(self) -> None:
        _finite("deadband band", self.band)
        _require(self.band >= 0, f"deadband band must be >= 0, got {self.band}")
        _require(self.heartbeat_ms >= 0, f"deadband heartbeat must be >= 0: {self.heartbeat_ms}")


@dataclass(frozen=True, slots=True)
class SdtStage:
    """Swinging-door trending. Archives (sends) a reading only when the straight line
    from the last archived reading can no longer pass within ``deviation`` of every
    reading since; the line between two archived readings is then within ``deviation``
    of every reading between them. ``max_interval_ms`` > 0 archives at least that often;
    ``min_interval_ms`` > 0 discards readings closer than that to the last archived one
    (the bound then holds for the others only)."""

    deviation: float
    max_interval_ms: int = 0
    min_interval_ms: int = 0

    def __post_init__(self) -> None:
        _finite("sdt deviation", self.deviation)
        _require(self.deviation > 0, f"sdt deviation must be > 0, got {self.deviation}")
        _require(self.max_interval_ms >= 0, "sdt max_interval must be >= 0")
        _require(self.min_interval_ms >= 0, "sdt min_interval must be >= 0")
        _require(
            not self.max_interval_ms or self.min_interval_ms < self.max_interval_ms,
            "sdt min_interval must be less than max_interval",
        )


@dataclass(frozen=True, slots=True)
class RateLimitStage:
    """A reading that moved faster than ``max_rate`` per second from the point's last
    passed reading is ``clamp``-ed to the limit, ``flag``-ged BAD, or ``drop``-ped."""

    max_rate: float
    action: Literal["clamp", "flag", "drop"] = "clamp"

    def __post_init__(self) -> None:
        _finite("rate limit max_rate", self.max_rate)
        _require(self.max_rate > 0, f"rate limit max_rate must be > 0, got {self.max_rate}")
        _require(
            self.action in ("clamp", "flag", "drop"),
            f"rate limit action must be clamp, flag or drop, not {self.action!r}",
        )


@dataclass(frozen=True, slots=True)
class EmaStage:
    """Exponential moving average. With ``alpha``: y += alpha * (x - y) per reading.
    With ``tau_ms`` instead (irregular sampling): alpha = 1 - exp(-dt / tau)."""

    alpha: float | None = None
    tau_ms: int | None = None

    def __post_init__(self) -> None:
        _require(
            (self.alpha is None) != (self.tau_ms is None), "ema needs exactly one of alpha, tau"
        )
        if self.alpha is not None:
            _require(0 < self.alpha <= 1, f"ema alpha must be in (0, 1], got {self.alpha}")
        if self.tau_ms is not None:
            _require(self.tau_ms > 0, f"ema tau must be > 0, got {self.tau_ms}")


@dataclass(frozen=True, slots=True)
class AggregateStage:
    """Tumbling windows of ``window_ms`` aligned to the epoch (a 1 min window starts on
    the minute). When a window closes — a later reading of the point arrives, or its end
    plus ``grace_ms`` has passed in real time — one reading per function is emitted,
    under the point id paired with it in ``outputs``, stamped with the window's start.
    Only GOOD finite readings are aggregated. ``raw`` also passes the readings on; a
    reading older than the open window is late: counted, not aggregated."""

    window_ms: int
    outputs: tuple[tuple[str, int], ...]  # (function, point id of the aggregate series)
    raw: bool = False
    grace_ms: int = 2000

    def __post_init__(self) -> None:
        _require(self.window_ms > 0, f"aggregate window must be > 0, got {self.window_ms}")
        _require(self.grace_ms >= 0, f"aggregate grace must be >= 0, got {self.grace_ms}")
        _require(bool(self.outputs), "aggregate needs at least one function")
        names = [f for f, _ in self.outputs]
        for f in names:
            _require(
                f in AGGREGATE_FUNCTIONS,
                f"unknown aggregate function {f!r}; known: {', '.join(AGGREGATE_FUNCTIONS)}",
            )
        _require(len(set(names)) == len(names), "aggregate functions repeat")


# -- alarm rules: pass every reading on unchanged, emit AlarmEvents --------------------------


@dataclass(frozen=True, slots=True)
class ThresholdRule:
    """Raised when GOOD readings stay above ``above`` (or below ``below``) for
    ``min_duration_ms``; cleared when a reading is back by ``hysteresis``
    (<= above - hysteresis, or >= below + hysteresis)."""

    id: str
    severity: Severity = "warning"
    above: float | None = None
    below: float | None = None
    hysteresis: float = 0.0
    min_duration_ms: int = 0

    def __post_init__(self) -> None:
        _require((self.above is None) != (self.below is None), "threshold needs above or below")
        _finite("threshold above", self.above)
        _finite("threshold below", self.below)
        _finite("threshold hysteresis", self.hysteresis)
        _require(self.hysteresis >= 0, "threshold hysteresis must be >= 0")
        _require(self.min_duration_ms >= 0, "threshold min duration must be >= 0")


@dataclass(frozen=True, slots=True)
class RateRule:
    """Raised when a GOOD reading moved faster than ``max_rate`` per second from the
    point's previous GOOD reading; cleared by the first one that did not."""

    id: str
    max_rate: float
    severity: Severity = "warning"

    def __post_init__(self) -> None:
        _finite("rate rule max_rate", self.max_rate)
        _require(self.max_rate > 0, "rate rule max_rate must be > 0")


@dataclass(frozen=True, slots=True)
class StaleRule:
    """Raised when no reading of the point has arrived for ``after_ms`` (real time while
    the agent runs, not the wall clock); cleared by its next reading."""

    id: str
    after_ms: int
    severity: Severity = "warning"

    def __post_init__(self) -> None:
        _require(self.after_ms > 0, "stale rule after must be > 0")


@dataclass(frozen=True, slots=True)
class FlatlineRule:
    """Stuck sensor: raised when GOOD readings spanning at least ``duration_ms`` all lie
    within ``tolerance`` of the first of them; cleared by a reading outside it."""

    id: str
    duration_ms: int
    tolerance: float = 0.0
    severity: Severity = "warning"

    def __post_init__(self) -> None:
        _require(self.duration_ms > 0, "flatline duration must be > 0")
        _finite("flatline tolerance", self.tolerance)
        _require(self.tolerance >= 0, "flatline tolerance must be >= 0")


@dataclass(frozen=True, slots=True)
class BadQualityRule:
    """Raised after ``count`` consecutive readings whose quality is not GOOD; cleared by
    a GOOD one."""

    id: str
    count: int
    severity: Severity = "warning"

    def __post_init__(self) -> None:
        _require(self.count >= 1, "bad-quality rule count must be >= 1")


AlarmRule: TypeAlias = ThresholdRule | RateRule | StaleRule | FlatlineRule | BadQualityRule

StageSpec: TypeAlias = (
    RangeStage
    | HampelStage
    | MedianStage
    | DeadbandStage
    | SdtStage
    | RateLimitStage
    | EmaStage
    | AggregateStage
    | AlarmRule
)


@dataclass(frozen=True, slots=True)
class AlarmEvent:
    """One raise or clear. ``ts_ms``/``value``: the reading that decided it (for a stale
    rule: the wall-clock time and NaN). ``since_ms``: when the condition began (raise) or
    when the alarm was raised (clear)."""

    point_id: int
    rule: str
    severity: Severity
    raised: bool
    ts_ms: int
    value: float
    since_ms: int
