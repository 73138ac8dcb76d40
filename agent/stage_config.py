"""The ``pipeline = [...]`` of a point: one model per stage type, and their translation
into the specs that native/ runs (native/stages.py).

Each model names its type (``type = "hampel"``), so TOML errors point at the stage and
key that is wrong (``devices[2].points[0].pipeline[1].window``). Durations are strings
like ``"30s"``; rates are per second. To add a stage type: write its model, add it to
``_STAGE_MODELS`` and to ``PipelineStage``, and give it a ``spec``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, Union, get_args

from pydantic import BaseModel, Field, field_validator, model_validator

from common.keypath import Section, at, fail
from common.units import Duration
from native import stages as st

Severity = Literal["info", "warning", "critical"]
AggregateFunction = Literal["min", "max", "mean", "sum", "count", "last", "std", "laeq"]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


@dataclass(frozen=True, slots=True)
class PointContext:
    """What a stage needs to know of its point to become a spec."""

    key: str  # "device/point"
    min: float | None  # the point's declared range (for percent-of-span settings)
    max: float | None
    ids: dict[str, int]  # registry ids by point key, derived (aggregate) points included


def aggregate_key(point_key: str, function: str) -> str:
    """The key of the series an aggregate function makes of a point."""
    return f"{point_key}:{function}"


class RangeStageConfig(Section):
    """Readings that claim a value (good, uncertain) outside [min, max] are flagged
    (quality bad, the number kept) or dropped (counted); bad and unavailable readings
    pass untouched (native.stages.RangeStage)."""

    type: Literal["range"]
    min: float | None = Field(None, allow_inf_nan=False)
    max: float | None = Field(None, allow_inf_nan=False)
    action: Literal["flag", "drop"] = "flag"

    @model_validator(mode="after")
    def _check_bounds(self) -> RangeStageConfig:
        if self.min is None and self.max is None:
            raise fail("a range stage needs min, max or both")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise at("min", f"must be less than max ({self.max:g}), got {self.min:g}")
        return self

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.RangeStage(min=self.min, max=self.max, action=self.action)


class HampelStageConfig(Section):
    """Spike removal: a reading further than ``threshold`` MADs from the median of the
    last ``window`` readings is replaced by that median (or flagged, or dropped)."""

    type: Literal["hampel"]
    window: int = Field(7, ge=3, le=255)
    threshold: float = Field(3.0, gt=0, allow_inf_nan=False)
    action: Literal["replace", "flag", "drop"] = "replace"

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.HampelStage(window=self.window, threshold=self.threshold, action=self.action)


class MedianStageConfig(Section):
    """Rolling median of the last ``window`` readings."""

    type: Literal["median"]
    window: int = Field(5, ge=2, le=255)

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.MedianStage(window=self.window)


class DeadbandStageConfig(Section):
    """Send a reading only when it moved by more than ``band`` (in the point's unit) or
    ``percent`` of the point's span (max - min) since the last one sent; ``heartbeat``
    sends one anyway when none was sent for that long."""

    type: Literal["deadband"]
    band: float | None = Field(None, ge=0, allow_inf_nan=False)
    percent: float | None = Field(None, gt=0, le=100, allow_inf_nan=False)
    heartbeat: Duration | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of(self) -> DeadbandStageConfig:
        if (self.band is None) == (self.percent is None):
            raise fail("a deadband needs exactly one of band, percent")
        return self

    def spec(self, point: PointContext) -> st.StageSpec:
        band = self.band
        if band is None:
            assert self.percent is not None and point.min is not None and point.max is not None
            band = self.percent / 100.0 * (point.max - point.min)
        return st.DeadbandStage(band=band, heartbeat_ms=_ms(self.heartbeat or 0.0))


class SdtStageConfig(Section):
    """Swinging-door trending: keep only the readings needed to redraw the series
    within ``deviation``; at least one every ``max_interval``."""

    type: Literal["sdt"]
    deviation: float = Field(gt=0, allow_inf_nan=False)
    max_interval: Duration = Field(0.0, ge=0)
    min_interval: Duration = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _intervals(self) -> SdtStageConfig:
        if self.max_interval and self.min_interval >= self.max_interval:
            raise at("min_interval", "must be shorter than max_interval")
        return self

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.SdtStage(
            deviation=self.deviation,
            max_interval_ms=_ms(self.max_interval),
            min_interval_ms=_ms(self.min_interval),
        )


class RateLimitStageConfig(Section):
    """A reading that moved faster than ``max_rate`` (unit per second) is clamped to
    the limit, flagged, or dropped."""

    type: Literal["ratelimit"]
    max_rate: float = Field(gt=0, allow_inf_nan=False)
    action: Literal["clamp", "flag", "drop"] = "clamp"

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.RateLimitStage(max_rate=self.max_rate, action=self.action)


class EmaStageConfig(Section):
    """Exponential moving average: ``alpha`` per reading, or time constant ``tau``."""

    type: Literal["ema"]
    alpha: float | None = Field(None, gt=0, le=1)
    tau: Duration | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_of(self) -> EmaStageConfig:
        if (self.alpha is None) == (self.tau is None):
            raise fail("an ema needs exactly one of alpha, tau")
        return self

    def spec(self, point: PointContext) -> st.StageSpec:
        if self.tau is not None:
            return st.EmaStage(tau_ms=max(1, _ms(self.tau)))
        return st.EmaStage(alpha=self.alpha)


class AggregateStageConfig(Section):
    """Tumbling windows aligned to the clock (a ``1m`` window starts on the minute);
    each function becomes its own series ``<device>/<point>:<function>``, stamped with
    the window's start. ``raw = true`` sends the readings too."""

    type: Literal["aggregate"]
    window: Duration = Field(gt=0)
    functions: list[AggregateFunction] = Field(min_length=1)
    raw: bool = False
    grace: Duration = Field(2.0, ge=0)

    @field_validator("functions")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise fail(f"functions repeat: {v}")
        return v

    @field_validator("window")
    @classmethod
    def _whole_ms(cls, v: float) -> float:
        if v < 0.001 or not math.isclose(v * 1000, round(v * 1000)):
            raise fail(f"must be a whole number of milliseconds, got {v:g} s")
        return v

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.AggregateStage(
            window_ms=_ms(self.window),
            outputs=tuple((f, point.ids[aggregate_key(point.key, f)]) for f in self.functions),
            raw=self.raw,
            grace_ms=_ms(self.grace),
        )


# -- alarm rules ---------------------------------------------------------------------


class _RuleConfig(Section):
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    severity: Severity = "warning"

    @property
    def rule_id(self) -> str:
        return self.id or str(getattr(self, "type"))  # noqa: B009


class ThresholdRuleConfig(_RuleConfig):
    """Alarm when readings stay above ``above`` (or below ``below``) for ``for``;
    cleared once back by ``hysteresis``."""

    type: Literal["threshold"]
    above: float | None = Field(None, allow_inf_nan=False)
    below: float | None = Field(None, allow_inf_nan=False)
    hysteresis: float = Field(0.0, ge=0, allow_inf_nan=False)
    for_: Duration = Field(0.0, ge=0, alias="for")

    @model_validator(mode="after")
    def _one_of(self) -> ThresholdRuleConfig:
        if (self.above is None) == (self.below is None):
            raise fail("a threshold needs exactly one of above, below")
        return self

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.ThresholdRule(
            id=self.rule_id,
            severity=self.severity,
            above=self.above,
            below=self.below,
            hysteresis=self.hysteresis,
            min_duration_ms=_ms(self.for_),
        )


class RateRuleConfig(_RuleConfig):
    """Alarm when a reading moved faster than ``max_rate`` (unit per second)."""

    type: Literal["rate"]
    max_rate: float = Field(gt=0, allow_inf_nan=False)

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.RateRule(id=self.rule_id, max_rate=self.max_rate, severity=self.severity)


class StaleRuleConfig(_RuleConfig):
    """Alarm when the point had no reading for ``after``."""

    type: Literal["stale"]
    after: Duration = Field(gt=0)

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.StaleRule(id=self.rule_id, after_ms=_ms(self.after), severity=self.severity)


class FlatlineRuleConfig(_RuleConfig):
    """Stuck sensor: alarm when readings stayed within ``tolerance`` for ``for``."""

    type: Literal["flatline"]
    for_: Duration = Field(gt=0, alias="for")
    tolerance: float = Field(0.0, ge=0, allow_inf_nan=False)

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.FlatlineRule(
            id=self.rule_id,
            duration_ms=_ms(self.for_),
            tolerance=self.tolerance,
            severity=self.severity,
        )


class BadQualityRuleConfig(_RuleConfig):
    """Alarm after ``count`` readings in a row that are not good (bad, uncertain or
    unavailable)."""

    type: Literal["bad_quality"]
    count: int = Field(ge=1)

    def spec(self, point: PointContext) -> st.StageSpec:
        return st.BadQualityRule(id=self.rule_id, count=self.count, severity=self.severity)


PipelineStage = Annotated[
    Union[  # noqa: UP007 - the discriminated union needs the Union form
        RangeStageConfig,
        HampelStageConfig,
        MedianStageConfig,
        DeadbandStageConfig,
        SdtStageConfig,
        RateLimitStageConfig,
        EmaStageConfig,
        AggregateStageConfig,
        ThresholdRuleConfig,
        RateRuleConfig,
        StaleRuleConfig,
        FlatlineRuleConfig,
        BadQualityRuleConfig,
    ],
    Field(discriminator="type"),
]
STAGE_MODELS: tuple[type[BaseModel], ...] = get_args(get_args(PipelineStage)[0])
STAGE_TYPES: dict[str, type[BaseModel]] = {
    get_args(m.model_fields["type"].annotation)[0]: m for m in STAGE_MODELS
}


def check_pipeline(
    stages: list[PipelineStage], point_min: float | None, point_max: float | None
) -> None:
    """Checks a point's range and the stages of its pipeline against it and each other
    (raises an error naming the key)."""
    if point_min is not None and point_max is not None and not point_min < point_max:
        raise at("max", f"must be greater than min ({point_min:g}), got {point_max:g}")
    rules: dict[str, int] = {}
    aggregates = 0
    for i, stage in enumerate(stages):
        percent = isinstance(stage, DeadbandStageConfig) and stage.percent is not None
        if percent and (point_min is None or point_max is None):
            raise at(
                f"pipeline[{i}].percent",
                "a deadband in percent of span needs the point's min and max",
            )
        if isinstance(stage, _RuleConfig):
            if stage.rule_id in rules:
                raise at(
                    f"pipeline[{i}].id",
                    f"rule id {stage.rule_id!r} is already used by pipeline[{rules[stage.rule_id]}]"
                    "; give each rule of a point its own id",
                )
            rules[stage.rule_id] = i
        if isinstance(stage, AggregateStageConfig):
            aggregates += 1
            if aggregates > 1:
                raise at(f"pipeline[{i}]", "a point can have one aggregate stage")


def aggregate_functions(stages: list[PipelineStage]) -> list[str]:
    """The functions of the point's aggregate stage (each is a series of its own)."""
    return [f for s in stages if isinstance(s, AggregateStageConfig) for f in s.functions]


def stage_specs(stages: list[PipelineStage], point: PointContext) -> list[st.StageSpec]:
    return [stage.spec(point) for stage in stages]
