"""Acting at the lowest level: derived points and local rules, wired into the agent.

Every batch a driver pushes goes through the derive engine (native/derive.py) on the
event loop before it is queued: the derived points' readings join the queue beside their
inputs, and the rules' conditions, evaluated in the same kernel pass, move the rules
(agent/rules.py) within the poll that read them, whatever the uplink is doing. Alarm
rules move when the flush raises or clears their alarm.

A decision's actions run on a task of the rule's own (a slow or failing write holds no
other rule), in order: a write is checked against the point's range as a downlink write
is, written through its driver (which reads it back) and tried `write_attempts` times;
a publish goes to the site broker of an MQTT device; an event is a line for the
platform. Each action, each suppression and each override is a `wire.RuleAction` with
the condition's inputs, appended to the buffer on the alarm lane (ahead of telemetry,
in order while the link is down) in one transaction with the rule's state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.commands import write_refusal
from agent.local_config import ActionConfig, RuleConfig, derived_order
from agent.rules import HOUR_MS, Decision, Rule, RuleState
from common import wire
from common.logs import Throttle
from drivers.base import PointSpec
from native.batch import BAD, GOOD, Batch
from native.derive import DerivedSpec, DeriveEngine
from native.expr import Program, compile_expr
from native.stages import AlarmEvent

log = logging.getLogger("citygw.rules")

#: the rule clock's key in the saved state
CLOCK_KEY = "rules:clock"
_CLOCK = struct.Struct("<q")
#: how many of each rule's last actions the status shows
LAST_ACTIONS = 5

Write = Callable[[PointSpec, float], Awaitable[float]]
Publish = Callable[[str, str, bytes, bool], Awaitable[None]]
Append = Callable[[list[wire.RuleAction], dict[str, bytes]], Awaitable[None]]


def state_key(rule_id: str) -> str:
    return f"rule:{rule_id}"


@dataclass(frozen=True, slots=True)
class _Role:
    rule: int  # index into the rules
    what: str  # "when", "until" or "switch"


class LocalAction:
    """The derive engine and the rules of one config."""

    def __init__(
        self,
        config: Any,
        ids: Mapping[str, int],
        point_of: Callable[[str], PointSpec | None],
        write: Write,
        publish: Publish,
        append: Append,
    ) -> None:
        self._ids = ids
        self._point_of = point_of  # the agent's writable points now (a reload changes them)
        self._write, self._publish, self._append = write, publish, append
        self.rules: list[Rule] = [Rule(r) for r in config.rules]
        self.by_id = {r.config.id: r for r in self.rules}
        specs: list[DerivedSpec] = []
        for d in derived_order(config.derived):
            program = compile_expr(
                d.expr, tuple(d.inputs), "bool" if d.type == "bool" else "number"
            )
            specs.append(self._spec(program, d.inputs, ids[d.key], d.max_age))
        self._roles: dict[int, _Role] = {}
        self._seen: dict[int, tuple[float, int]] = {}  # each condition's last evaluation
        for i, r in enumerate(config.rules):
            for what in ("when", "until"):
                text = getattr(r, what)
                if text is not None:
                    self._roles[len(specs)] = _Role(i, what)
                    program = compile_expr(text, tuple(r.inputs), "bool")
                    specs.append(self._spec(program, r.inputs, None, r.max_age))
            if r.override is not None:
                self._roles[len(specs)] = _Role(i, "switch")
                specs.append(
                    self._spec(compile_expr("x", ("x",), "number"), {"x": r.override}, None, None)
                )
        self.engine = DeriveEngine(specs)
        self.active = bool(specs)
        self.clock_ms = 0
        self._last_mono: int | None = None
        # each rule's decisions with the inputs it decided on, in order
        self._queues: list[asyncio.Queue[tuple[Decision, tuple[wire.RuleInput, ...]]]] = [
            asyncio.Queue() for _ in self.rules
        ]
        self._wake = asyncio.Event()
        self._busy = 0  # decisions queued or being carried out
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_actions: dict[str, deque[dict[str, Any]]] = {
            r.config.id: deque(maxlen=LAST_ACTIONS) for r in self.rules
        }
        #: the reading that decided each alarm rule's last alarm event
        self._alarm_inputs: dict[int, wire.RuleInput] = {}
        #: actions done (or dry run), suppressed, failed; derived readings made
        self.counters = {"done": 0, "suppressed": 0, "failed": 0, "derived": 0, "errors": 0}
        self.last_error = ""  # the last failure of `process`
        self._throttle = Throttle()

    def _spec(
        self,
        program: Program,
        inputs: Mapping[str, str],
        out_id: int | None,
        max_age: float | None,
    ) -> DerivedSpec:
        return DerivedSpec(
            program=program,
            inputs=tuple(self._ids[inputs[name]] for name in program.inputs),
            out_id=out_id,
            max_age_ms=0 if max_age is None else round(max_age * 1000),
        )

    # -- state -------------------------------------------------------------------

    def _now(self) -> int:
        """The rule clock, advanced by the monotonic clock (never backwards)."""
        mono = time.monotonic_ns() // 1_000_000
        if self._last_mono is not None and mono > self._last_mono:
            self.clock_ms += mono - self._last_mono
        self._last_mono = mono
        return self.clock_ms

    def load_state(self, saved: Mapping[str, bytes]) -> int:
        """Resumes the rules (and the derive engine's inputs) a restart interrupted."""
        clock = saved.get(CLOCK_KEY, b"")
        if len(clock) == _CLOCK.size:
            self.clock_ms = max(_CLOCK.unpack(clock)[0], 0)
        resumed = self.engine.load_state(saved)
        for rule in self.rules:
            blob = saved.get(state_key(rule.config.id))
            if blob is None:
                continue
            try:
                rule.state = RuleState.from_bytes(blob)
            except ValueError as exc:
                log.warning(
                    "rule state not resumed", extra={"rule": rule.config.id, "error": str(exc)}
                )
                continue
            resumed += 1
        return resumed

    def carry_state(self, old: LocalAction) -> None:
        """A reload: the clock, the engine's inputs and each rule's state (by id, as a
        restart keeps it: the pump runs whatever the new config says, and the starts of
        the last hour count against a changed limit) go on. What a rule knows of its
        conditions goes on where they are unchanged; a changed one is learnt again."""
        self.clock_ms, self._last_mono = old.clock_ms, old._last_mono
        self.engine.carry_state(old.engine)
        for rule in self.rules:
            before = old.by_id.get(rule.config.id)
            if before is None:
                continue
            rule.state = before.state
            rule.local_override = before.local_override
            self.last_actions[rule.config.id] = old.last_actions[rule.config.id]
            same = ("inputs", "when", "until", "alarm", "alarm_point", "max_age")
            if all(getattr(before.config, k) == getattr(rule.config, k) for k in same):
                rule.on, rule.off, rule.on_since = before.on, before.off, before.on_since

    def save_state(self) -> dict[str, bytes]:
        """The engine's inputs read since the last save (agent: every minute, at a stop)."""
        return self.engine.save_state(changed_only=True)

    def _rule_state(self, rule: Rule) -> dict[str, bytes]:
        return {
            state_key(rule.config.id): rule.state.to_bytes(),
            CLOCK_KEY: _CLOCK.pack(self.clock_ms),
        }

    # -- the push path (on the event loop) --------------------------------------------

    def process(self, batch: Batch) -> Batch:
        """The derived readings of `batch`; the rules move on its conditions. A failure
        here (a bug) costs the derived readings and the rules' view of this batch, never
        the batch: it is logged, counted and shown in the status."""
        try:
            return self._process(batch)
        except Exception as exc:
            self.counters["errors"] += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            if (n := self._throttle.ready("process")) is not None:
                log.exception("derived points and rules failed on a batch", extra={"failures": n})
            return Batch()

    def _process(self, batch: Batch) -> Batch:
        derived, conditions = self.engine.process(batch)
        self.counters["derived"] += len(derived)
        if len(conditions.spec):
            now = self._now()
            touched: set[int] = set()
            seen = self._seen
            for k, value, quality in zip(
                conditions.spec, conditions.value, conditions.quality, strict=True
            ):
                # a condition evaluated as it was before changes nothing (most polls)
                if seen.get(k) == (value, quality):
                    continue
                seen[k] = (value, quality)
                role = self._roles[k]
                rule = self.rules[role.rule]
                touched.add(role.rule)
                if role.what == "when":
                    rule.set_when(value, quality, now)
                elif role.what == "until":
                    rule.set_until(value, quality)
                elif (d := rule.set_switch(value, quality)) is not None:
                    self._queue(role.rule, d)
            for i in sorted(touched):
                self._decide(i, now)
        return derived

    def on_alarms(self, events: Sequence[AlarmEvent], key_of: Mapping[int, str]) -> None:
        """Alarm rules move on what a flush raised and cleared."""
        now: int | None = None
        for i, rule in enumerate(self.rules):
            c = rule.config
            if c.alarm is None:
                continue
            mine = [
                e
                for e in events
                if e.rule == c.alarm
                and (c.alarm_point is None or key_of.get(e.point_id) == c.alarm_point)
            ]
            if mine:
                now = self._now() if now is None else now
                e = mine[-1]
                rule.set_alarm(e.raised, now)
                key = key_of.get(e.point_id, str(e.point_id))
                self._alarm_inputs[i] = wire.RuleInput(c.alarm, key, e.value, e.ts_ms, GOOD)
                self._decide(i, now)

    def _decide(self, i: int, now: int) -> None:
        decision = self.rules[i].decide(now)
        if decision is not None:
            self._queue(i, decision)
        self._wake.set()

    def _queue(self, i: int, decision: Decision) -> None:
        """A decision to carry out, with the inputs as they are now (when it is carried
        out, behind a slow write, they may have moved on)."""
        self._busy += 1
        self._idle.clear()
        self._queues[i].put_nowait((decision, self._inputs(i)))

    async def idle(self, timeout: float) -> bool:
        """Waits until every decision is carried out and recorded (a reload or a stop
        must not cut an action off from its event); False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def override(self, rule_id: str, who: str) -> None:
        """The platform takes the rule over (`who` names the command) or releases it ("")."""
        i = next(i for i, r in enumerate(self.rules) if r.config.id == rule_id)
        decision = self.rules[i].set_platform_override(who)
        if decision is not None:
            self._queue(i, decision)
        if not who:
            self._decide(i, self._now())

    # -- running the decisions ------------------------------------------------------

    async def run(self) -> None:
        """One task per rule runs its decisions; this one also wakes the rules whose
        timers (`for`, `min_on`, `min_off`, the hourly limit) fall due."""
        async with asyncio.TaskGroup() as tg:
            for i in range(len(self.rules)):
                tg.create_task(self._worker(i), name=f"rule:{self.rules[i].config.id}")
            while True:
                now = self._now()
                dues = [d for r in self.rules if (d := r.next_due(now)) is not None]
                timeout = None if not dues else max(min(dues) - now, 0) / 1000
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    now = self._now()
                    for i in range(len(self.rules)):
                        self._decide(i, now)

    async def _worker(self, i: int) -> None:
        queue = self._queues[i]
        while True:
            decision, inputs = await queue.get()
            try:
                await self._execute(self.rules[i], decision, inputs)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    def _inputs(self, i: int) -> tuple[wire.RuleInput, ...]:
        c = self.rules[i].config
        if c.alarm is not None:
            alarm = self._alarm_inputs.get(i)
            return () if alarm is None else (alarm,)
        out = []
        for name, key in c.inputs.items():
            last = self.engine.last(self._ids[key])
            value, ts, quality = last if last is not None else (math.nan, 0, BAD)
            out.append(wire.RuleInput(name, key, value, ts, quality))
        return tuple(out)

    async def _execute(
        self, rule: Rule, decision: Decision, inputs: tuple[wire.RuleInput, ...]
    ) -> None:
        c = rule.config

        def event(
            action: str = "",
            outcome: str = "",
            target: str = "",
            value: float = math.nan,
            written: float = math.nan,
            detail: str = "",
            attempts: int = 1,
        ) -> wire.RuleAction:
            return wire.RuleAction(
                rule=c.id,
                ts_ms=time.time_ns() // 1_000_000,
                transition=decision.transition,
                action=action,
                outcome=outcome or decision.outcome,
                # an error's text can be anything: kept storable, never a dead letter
                target=wire.storable_text(target),
                value=value,
                written=written,
                detail=wire.storable_text(detail),
                inputs=inputs,
                attempts=attempts,
            )

        events: list[wire.RuleAction] = []
        if decision.outcome == "suppressed" or decision.transition in ("override", "release"):
            events.append(event(detail=decision.detail))
        else:
            actions = c.start if decision.transition == "start" else c.stop
            for a in actions:
                events.append(await self._act(c, a, event))
        await self._record(rule, events)

    async def _act(
        self, c: RuleConfig, a: ActionConfig, event: Callable[..., wire.RuleAction]
    ) -> wire.RuleAction:
        if a.write is not None:
            assert a.value is not None
            point = self._point_of(a.write)
            if point is None:
                return event(
                    "write", "failed", a.write, a.value, detail="the point's device is not enabled"
                )
            refused = write_refusal(a.write, point, a.value)
            if refused is not None:
                return event("write", "failed", a.write, a.value, detail=refused)
            if c.dry_run:
                return event("write", "dry_run", a.write, a.value, detail="dry_run: not written")
            error = ""
            for attempt in range(1, c.write_attempts + 1):
                try:
                    written = await self._write(point, a.value)
                except Exception as exc:  # the driver's error names what failed
                    error = str(exc) or type(exc).__name__
                    if attempt < c.write_attempts:
                        log.warning(
                            "rule write failed, retrying",
                            extra={
                                "rule": c.id,
                                "point": a.write,
                                "attempt": attempt,
                                "error": error,
                            },
                        )
                        await asyncio.sleep(c.retry_delay)
                    continue
                return event("write", "done", a.write, a.value, written, attempts=attempt)
            return event(
                "write", "failed", a.write, a.value, detail=error, attempts=c.write_attempts
            )
        if a.publish is not None:
            assert a.device is not None
            if c.dry_run:
                return event("publish", "dry_run", a.publish, detail=f"dry_run: {a.payload}")
            try:
                await self._publish(a.device, a.publish, a.payload.encode(), a.retain)
            except Exception as exc:
                return event("publish", "failed", a.publish, detail=str(exc) or type(exc).__name__)
            return event("publish", "done", a.publish, detail=a.payload)
        assert a.event is not None
        return event("event", "dry_run" if c.dry_run else "done", detail=a.event)

    async def _record(self, rule: Rule, events: list[wire.RuleAction]) -> None:
        """The events and the rule's state, in one buffer transaction."""
        for e in events:
            self.counters["done" if e.outcome == "dry_run" else e.outcome] += 1
            entry = {
                "ts_ms": e.ts_ms,
                "transition": e.transition,
                "action": e.action,
                "outcome": e.outcome,
                "target": e.target,
                "detail": e.detail,
            }
            self.last_actions[rule.config.id].append(entry)
            level = logging.WARNING if e.outcome in ("failed", "suppressed") else logging.INFO
            log.log(
                level,
                "rule action",
                extra={"rule": rule.config.id, **{k: v for k, v in entry.items() if v != ""}},
            )
        await self._append(events, self._rule_state(rule))

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock_ms
        return {
            r.config.id: {
                "state": "on" if r.state.active else "off",
                "condition": None if r.on is None else r.on,
                "overridden": r.overridden,
                "dry_run": r.config.dry_run,
                "starts_last_hour": sum(1 for t in r.state.starts if now - t < HOUR_MS),
                "last_actions": list(self.last_actions[r.config.id]),
            }
            for r in self.rules
        }
