"""The config of acting at the lowest level: `[[derived]]` points and `[[rules]]`.

A derived point is computed from other points by an expression (native/expr.py) and is
then a point like any other (a pipeline, the buffer, up/meta). A rule watches a boolean
expression or an alarm and, on its start and stop, writes to writable points, publishes
on a site broker or raises a gateway event, within its interlocks (agent/rules.py).

The models check each table on its own; `check_local` checks what needs the whole
config (inputs that exist, expressions that compile, no cycle, writable targets), with
the key path of every problem."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Set
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.commands import write_refusal
from agent.stage_config import PipelineStage, check_pipeline
from common import wire
from common.keypath import Section
from common.keypath import at as _at
from common.keypath import fail as _fail
from common.units import Duration
from native.expr import ExprError, compile_expr, topo_order

#: the device name derived points are listed under unless they name one
DERIVED_DEVICE = "derived"
#: the driver name up/meta gives derived points
DERIVED_DRIVER = "derived"
_LOCAL_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,31}"
_RULE_ID = r"[A-Za-z0-9_.-]{1,64}"
MAX_ACTIONS = 16
MAX_PAYLOAD_BYTES = 4096


def _inputs(v: dict[str, str]) -> dict[str, str]:
    if not v:
        raise _fail('needs at least one input: inputs = { name = "device/point" }')
    for name, key in v.items():
        if not isinstance(key, str) or key.count("/") != 1 or "" in key.split("/"):
            raise _at(name, f'must be a point key "device/point", got {key!r}')
    return v


class DerivedConfig(BaseModel):
    """A `[[derived]]` table: a point computed from `inputs` by `expr`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    device: str = Field(DERIVED_DEVICE, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    unit: str = ""
    type: Literal["float", "bool"] = "float"
    #: the expression's names for its inputs: name -> "device/point"
    inputs: dict[str, str]
    expr: str = Field(min_length=1, max_length=4096)
    #: an input older than this (against the newest input) makes the reading BAD
    max_age: Duration | None = Field(None, gt=0)
    min: float | None = None
    max: float | None = None
    pipeline: list[PipelineStage] = Field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.device}/{self.name}"

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, v: dict[str, str]) -> dict[str, str]:
        return _inputs(v)

    @field_validator("unit")
    @classmethod
    def _check_unit(cls, v: str) -> str:
        try:
            wire.check_text(v, "unit")
        except wire.WireError as exc:
            raise _fail(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _check_range(self) -> DerivedConfig:
        check_pipeline(self.pipeline, self.min, self.max)
        return self


class ActionConfig(Section):
    """One thing a rule does: exactly one of `write` (with `value`), `publish` (with
    `device`, the MQTT device whose site broker takes it, and `payload`) or `event`."""

    write: str | None = None
    value: float | None = None
    publish: str | None = Field(None, min_length=1, max_length=1024)
    device: str | None = None
    payload: str = ""
    retain: bool = False
    event: str | None = Field(None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _one_kind(self) -> ActionConfig:
        kinds = [k for k in ("write", "publish", "event") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise _fail("an action is exactly one of write, publish or event")
        if self.write is not None:
            if self.value is None or not math.isfinite(self.value):
                raise _at("value", "a write needs a finite value")
        elif self.value is not None:
            raise _at("value", "only a write takes a value")
        if self.publish is not None:
            if "+" in self.publish or "#" in self.publish:
                raise _at("publish", "a topic to publish on has no wildcards")
            if self.device is None:
                raise _at("device", "a publish names the MQTT device whose broker takes it")
            if len(self.payload.encode()) > MAX_PAYLOAD_BYTES:
                raise _at("payload", f"at most {MAX_PAYLOAD_BYTES} bytes")
        elif self.device is not None or self.payload or self.retain:
            raise _fail("device, payload and retain belong to a publish")
        return self

    @property
    def kind(self) -> str:
        return "write" if self.write is not None else "publish" if self.publish else "event"


class RuleConfig(BaseModel):
    """A `[[rules]]` table (agent/rules.py runs it)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str = Field(pattern=rf"^{_RULE_ID}$")
    inputs: dict[str, str] = Field(default_factory=dict)
    #: a boolean expression over the inputs; or `alarm`: an alarm rule's id
    when: str | None = Field(None, min_length=1, max_length=4096)
    #: when the rule stops (hysteresis); default: `when` no longer holds
    until: str | None = Field(None, min_length=1, max_length=4096)
    alarm: str | None = None
    #: with `alarm`: only that point's alarm (default: the alarm id on any point)
    alarm_point: str | None = None
    #: the condition must hold this long before the rule starts
    for_: Duration = Field(0.0, ge=0, alias="for")
    #: an input older than this makes the condition unknown: the rule holds its state
    max_age: Duration | None = Field(None, gt=0)
    min_on: Duration = Field(0.0, ge=0)
    min_off: Duration = Field(0.0, ge=0)
    max_starts_per_hour: int = Field(0, ge=0, le=3600)
    #: a local switch point: while its last value is nonzero the rule is suspended
    override: str | None = None
    dry_run: bool = False
    #: a failed write is tried this many times in all, `retry_delay` apart
    write_attempts: int = Field(3, ge=1, le=10)
    retry_delay: Duration = Field(1.0, ge=0.01, le=60)
    start: list[ActionConfig] = Field(default_factory=list, max_length=MAX_ACTIONS)
    stop: list[ActionConfig] = Field(default_factory=list, max_length=MAX_ACTIONS)

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, v: dict[str, str]) -> dict[str, str]:
        return _inputs(v) if v else v

    @model_validator(mode="after")
    def _condition(self) -> RuleConfig:
        if (self.when is None) == (self.alarm is None):
            raise _fail("a rule needs exactly one of when (an expression) or alarm (an id)")
        if self.alarm is not None:
            if self.until is not None:
                raise _at("until", "an alarm rule stops when its alarm clears")
            if self.inputs:
                raise _at("inputs", "an alarm rule has no inputs")
        elif not self.inputs:
            raise _at("inputs", 'a when rule needs inputs = { name = "device/point" }')
        if not self.start and not self.stop:
            raise _fail("a rule needs actions: start = [...] and/or stop = [...]")
        return self


Issue = tuple[tuple[str | int, ...], str]


def _compile(
    text: str, names: Mapping[str, str], want: str, loc: tuple[str | int, ...]
) -> Iterator[Issue]:
    """The problem of an expression that does not compile, if any."""
    try:
        compile_expr(text, tuple(names), want)
    except ExprError as exc:
        yield loc, str(exc)


def check_local(config: Any) -> Iterator[Issue]:
    """Every problem of the `[[derived]]` and `[[rules]]` tables that needs the rest of
    the config (`config` is the validated Config), with its location."""
    points: dict[str, Any] = {
        f"{d.name}/{p.name}": p for d in config.devices if d.enabled for p in d.points
    }
    devices = {d.name: d for d in config.devices}
    derived: dict[str, int] = {}
    for i, d in enumerate(config.derived):
        if d.device in devices:
            yield (
                ("derived", i, "device"),
                (
                    f"{d.key!r}: device {d.device!r} is a configured device; a derived point "
                    'goes under a device name of its own (default "derived")'
                ),
            )
        if d.key in derived:
            yield (
                ("derived", i, "name"),
                (f"duplicate derived point {d.key!r} (also derived[{derived[d.key]}])"),
            )
        derived.setdefault(d.key, i)
    known = points.keys() | derived.keys()
    for i, d in enumerate(config.derived):
        yield from _check_inputs(d.inputs, known, ("derived", i))
        want = "bool" if d.type == "bool" else "number"
        yield from _compile(d.expr, d.inputs, want, ("derived", i, "expr"))
    yield from _check_cycles(config.derived)
    rule_ids: dict[str, int] = {}
    for i, r in enumerate(config.rules):
        loc: tuple[str | int, ...] = ("rules", i)
        if r.id in rule_ids:
            yield (*loc, "id"), f"duplicate rule id {r.id!r} (also rules[{rule_ids[r.id]}])"
        rule_ids.setdefault(r.id, i)
        yield from _check_inputs(r.inputs, known, loc)
        for key in ("when", "until"):
            if (text := getattr(r, key)) is not None:
                yield from _compile(text, r.inputs, "bool", (*loc, key))
        if r.alarm_point is not None and r.alarm_point not in known:
            yield (*loc, "alarm_point"), f"unknown point {r.alarm_point!r}"
        if r.override is not None and r.override not in known:
            yield (*loc, "override"), f'unknown point {r.override!r} (give "device/point")'
        for side in ("start", "stop"):
            for j, a in enumerate(getattr(r, side)):
                yield from _check_action(a, points, devices, (*loc, side, j))


def _check_inputs(
    inputs: Mapping[str, str], known: Set[str], loc: tuple[str | int, ...]
) -> Iterator[Issue]:
    """Each input's name, and its point among the `known` ones (devices' and derived)."""
    for name, key in inputs.items():
        if not re.fullmatch(_LOCAL_NAME, name):
            yield (
                (*loc, "inputs", name),
                (f"input name {name!r} must be a letter or '_' and then letters, digits or '_'"),
            )
        elif key not in known:
            yield (
                (*loc, "inputs", name),
                (f"unknown point {key!r} (not a point of an enabled device nor a derived point)"),
            )


def _check_action(
    a: ActionConfig,
    points: Mapping[str, Any],
    devices: Mapping[str, Any],
    loc: tuple[str | int, ...],
) -> Iterator[Issue]:
    if a.write is not None:
        point = points.get(a.write)
        assert a.value is not None
        if point is None:
            yield (*loc, "write"), f'unknown point {a.write!r} (give "device/point")'
        elif (refused := write_refusal(a.write, point, a.value)) is not None:
            yield (*loc, "value" if point.writable else "write"), refused
    if a.publish is not None and a.device is not None:
        device = devices.get(a.device)
        if device is None or not device.enabled:
            yield (*loc, "device"), f"unknown device {a.device!r} (give an enabled MQTT device)"
        elif device.driver != "mqtt":
            yield (
                (*loc, "device"),
                (
                    f"device {a.device!r} uses driver {device.driver!r}; a publish goes through an "
                    "MQTT device's site broker"
                ),
            )


def _check_cycles(derived: list[DerivedConfig]) -> Iterator[Issue]:
    """A derived point that depends on itself, through any chain of derived points."""
    try:
        topo_order(_dependencies(derived))
    except ExprError as exc:
        yield ("derived",), str(exc)


def _dependencies(derived: list[DerivedConfig]) -> dict[str, list[str]]:
    return {d.key: list(d.inputs.values()) for d in derived}


def derived_order(derived: list[DerivedConfig]) -> list[DerivedConfig]:
    """The derived points with every one after the derived points it reads (the config
    has no cycle: `check_local`)."""
    by_key = {d.key: d for d in derived}
    return [by_key[key] for key in topo_order(_dependencies(derived))]
