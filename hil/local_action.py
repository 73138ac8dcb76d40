"""A local rule driving a pump, for the `local-action` scenario (`[checks.local_action]`):
judged from the underpass simulator's own record (hil/sim_modbus.py
`UnderpassSimulator`: every level reading it served, every coil write it received and
acknowledged) and from the platform store, never from the agent's word.

- the pump's coil writes alternate on/off, all of them while the uplink was down, the
  starts no more than the rule's `max_starts_per_hour`, each stop at least `min_on` after
  its start and each start at least `min_off` after the stop before it (on the
  simulator's clock, less one allowed action latency: the rule times its interlocks at
  the decision, the simulator sees the write a little later); the level fell below
  `until` within a `min_on` at least once (so `min_on` was tested), and a `suppressed`
  action with detail `max_starts_per_hour...` and one with `min_on...` were stored;
- the platform holds the rule's done writes in the order the simulator received them
  (start for 1, stop for 0), no failed action, as many actions as the agent counted,
  none twice, and each start's (stop's) inputs show the level above `above` (below
  `below`);
- `action_latency_ms`: for each start, from its condition to its write acknowledged by
  the simulator. The condition becomes true at the first moment after the previous stop
  from which the sump's level (its physics, not a poll's answer: the poll's wait, up to
  its period, is part of the latency) is above `above`, but no earlier than `min_off` after
  the simulator received that stop: a start an interlock held back is made by the
  rule's timer, not by a reading. (The rule times `min_off` from its decision, a moment
  before the simulator sees the stop, so such a start can come a few ms "early": 0.)
  The verdict reports the maximum (a few starts: no percentile) and requires it within
  `max_latency_ms`; the stops' latencies (from `until` holding, `min_on` after the
  start) are a figure;
- the level readings the simulator served are all stored (`read_lost`, hil/produced.py;
  the pump's coil is left out: its write's read-back is a read no poll asked for).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.config import load_config
from agent.local_config import RuleConfig
from common.wire import RuleAction
from hil.produced import Window, modbus_read_loss, modbus_spans
from hil.sim_modbus import CoilWrite, UnderpassSimulator

if TYPE_CHECKING:
    from hil.runner import Rig, Verdict
    from hil.scenario import LocalActionChecks


def _wall(monotonic_t: float) -> float:
    return time.time() - (time.monotonic() - monotonic_t)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _became_true(
    levels: list[tuple[float, float]],
    prev: CoilWrite | None,
    interlock: float,
    holds: Callable[[float], bool],
    write: CoilWrite,
) -> float | None:
    """When the transition `write` made became due after the write `prev` (None: the
    first): the first moment from which the level (`levels`: its changes, (time, level))
    satisfies `holds`, no earlier than `interlock` s after the simulator received `prev`
    (min_on or min_off). The rule times an interlock from its decision, a moment before
    the simulator sees the write, so a transition at the interlock's end may reach it
    before that: then the interlock is taken to have ended with `write`'s receipt."""
    since = prev.acked if prev is not None else 0.0
    ready = min(prev.received + interlock, write.received) if prev is not None else 0.0
    at_since = [(since, x) for t, x in levels if t <= since][-1:]  # the level then
    after = at_since + [(t, x) for t, x in levels if t > since]
    before = [x for t, x in after if t <= ready]
    if before and holds(before[-1]):
        return ready  # the condition already held: the interlock's end
    return next((t for t, x in after if t > ready and holds(x)), None)


class LocalActionJudge:
    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        checks = rig.scn.checks.local_action
        assert checks is not None
        self.checks: LocalActionChecks = checks

    @property
    def sim(self) -> UnderpassSimulator:
        assert self.rig.underpass is not None, "checks.local_action needs [sims.underpass]"
        return self.rig.underpass

    def save_record(self) -> None:
        """The simulator's record, to look into a failure later."""
        work = self.rig.work
        with (work / "underpass-served.jsonl").open("w") as f:
            for r in self.sim.served:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")
        with (work / "underpass-pump-writes.jsonl").open("w") as f:
            for w in self.sim.pump_writes:
                f.write(json.dumps(dataclasses.asdict(w)) + "\n")

    def rule(self) -> RuleConfig:
        config = load_config(self.rig.config)
        rule = next((r for r in config.rules if r.id == self.checks.rule), None)
        assert rule is not None, f"checks.local_action: no rule {self.checks.rule!r} in `local`"
        return rule

    def judge(self, v: Verdict, stored: list[RuleAction]) -> None:
        rule = self.rule()
        [level_key] = rule.inputs.values()
        sim = self.sim
        slack = self.checks.max_latency_ms / 1000
        writes = sim.pump_writes
        reads = sim.level_reads()
        starts = [w for w in writes if w.value == 1]
        v.starts = len(starts)
        v.figures["pump_writes"] = len(writes)
        v.figures["sim_ticks"] = sim.ticks
        v.figures["sim_max_tick_gap_ms"] = _ms(sim.max_tick_gap)
        v.check(bool(starts), "the simulator never received a write starting the pump")
        v.check(
            [w.value for w in writes] == [(i + 1) % 2 for i in range(len(writes))],
            f"the pump's coil writes do not alternate on/off: {[w.value for w in writes]}",
        )
        limit = rule.max_starts_per_hour
        if limit:
            v.check(
                len(starts) <= limit,
                f"the pump was started {len(starts)} times (max_starts_per_hour = {limit})",
            )
        self._outage(v, writes)
        self._interlocks(v, rule, writes, reads, slack)
        self._latency(v, rule, writes, sim.levels)
        self._stored(v, rule, level_key, writes, stored)
        self._level_loss(v, level_key)

    def _outage(self, v: Verdict, writes: list[CoilWrite]) -> None:
        """Every write while the uplink was down: the rule acted on its own."""
        events = self.rig.events
        down = next((t for t, what in events if what == "link down"), None)
        if down is None:
            return
        up = next((t for t, what in events if what == "link pass" and t > down), None)
        start, end = _wall(down), _wall(up) if up is not None else float("inf")
        outside = [w for w in writes if not start <= w.received <= end]
        v.check(not outside, f"{len(outside)} pump writes happened while the link was up")

    def _interlocks(
        self,
        v: Verdict,
        rule: RuleConfig,
        writes: list[CoilWrite],
        reads: list[tuple[float, float]],
        slack: float,
    ) -> None:
        below = self.checks.below
        held = 0  # runs the level ended (below `until`) well before min_on did
        for prev, w in itertools.pairwise(writes):
            gap = w.received - prev.received
            if prev.value == 1 and w.value == 0:
                v.check(
                    gap >= rule.min_on - slack,
                    f"the pump stopped {gap:.2f} s after its start (min_on {rule.min_on:g} s)",
                )
                held += any(prev.acked < t < w.received - slack and x < below for t, x in reads)
            elif prev.value == 0 and w.value == 1:
                v.check(
                    gap >= rule.min_off - slack,
                    f"the pump started {gap:.2f} s after its stop (min_off {rule.min_off:g} s)",
                )
        v.figures["runs_held_by_min_on"] = held
        if rule.min_on:
            v.check(held > 0, "the level never fell below `until` within a min_on: not tested")

    def _latency(
        self,
        v: Verdict,
        rule: RuleConfig,
        writes: list[CoilWrite],
        levels: list[tuple[float, float]],
    ) -> None:
        """Each write's latency from its condition (see the module doc) in the sump's
        physics, not in what a poll served (that would leave out the poll's wait); the
        stops' too, as a figure."""
        above, below = self.checks.above, self.checks.below
        starts: list[int] = []
        stops: list[int] = []
        prev: CoilWrite | None = None
        for w in writes:
            if w.value == 1:
                cond = _became_true(levels, prev, rule.min_off, lambda x: x > above, w)
            else:
                cond = _became_true(levels, prev, rule.min_on, lambda x: x < below, w)
            if cond is None or cond > w.received:
                what = "start" if w.value else "stop"
                side = f"above {above:g}" if w.value else f"below {below:g}"
                v.check(False, f"a {what} came with no level {side} before it")
            else:
                (starts if w.value else stops).append(max(0, _ms(w.acked - cond)))
            prev = w
        v.figures["start_latencies_ms"] = starts
        v.figures["stop_latencies_ms"] = stops
        if starts:
            v.action_latency_ms = max(starts)
            v.check(
                v.action_latency_ms <= self.checks.max_latency_ms,
                f"the pump started {v.action_latency_ms} ms after its condition "
                f"(at most {self.checks.max_latency_ms:g} ms)",
            )

    def _stored(
        self,
        v: Verdict,
        rule: RuleConfig,
        level_key: str,
        writes: list[CoilWrite],
        stored: list[RuleAction],
    ) -> None:
        actions = [a for a in stored if a.rule == rule.id]
        v.actions = len(actions)
        kinds: dict[str, int] = {}
        for a in actions:
            k = f"{a.transition}/{a.action or '-'}/{a.outcome}"
            kinds[k] = kinds.get(k, 0) + 1
        v.figures["rule_actions"] = kinds
        counted = self.rig.run_state.get("local", {})
        recorded = sum(counted.get(k, 0) for k in ("done", "suppressed", "failed"))
        v.check(
            len(actions) == recorded,
            f"the platform holds {len(actions)} actions of rule {rule.id}, the agent "
            f"recorded {recorded}",
        )
        keys = [(a.ts_ms, a.transition, a.action, a.outcome, a.target, a.detail) for a in actions]
        v.check(len(set(keys)) == len(keys), "a rule action was stored twice")
        v.check(
            all(a.ts_ms <= b.ts_ms for a, b in itertools.pairwise(actions)),
            "the rule's actions are not stored in the order they happened",
        )
        done = [
            (a.transition, a.value) for a in actions if a.action == "write" and a.outcome == "done"
        ]
        received = [("start" if w.value else "stop", float(w.value)) for w in writes]
        v.check(
            done == received,
            f"the stored writes {done} are not the writes the simulator received {received}",
        )
        failed = [a for a in actions if a.outcome == "failed"]
        v.check(not failed, f"{len(failed)} failed actions: {[a.detail for a in failed][:3]}")
        events = sum(1 for a in actions if a.transition == "start" and a.action == "event")
        v.check(
            events == len(done) - len(done) // 2,
            f"{events} start events stored for {len(done) - len(done) // 2} starts",
        )
        for detail, transition in (("max_starts_per_hour", "start"), ("min_on", "stop")):
            v.check(
                any(
                    a.outcome == "suppressed"
                    and a.transition == transition
                    and a.detail.startswith(detail)
                    for a in actions
                ),
                f"no suppressed {transition} with detail {detail}... was stored",
            )
        wrong = []
        for a in actions:
            if a.transition not in ("start", "stop"):
                continue
            level = next((i.value for i in a.inputs if i.point == level_key), None)
            right = level is not None and (
                level > self.checks.above if a.transition == "start" else level < self.checks.below
            )
            if not right:
                wrong.append((a.transition, a.action, a.outcome, level))
        v.check(
            not wrong,
            f"{len(wrong)} actions whose inputs show {level_key} on the wrong side of the "
            f"threshold: {wrong[:4]}",
        )

    def _level_loss(self, v: Verdict, level_key: str) -> None:
        rig = self.rig
        plan = {
            device: (unit, [s for s in spans if s[3] == level_key])
            for device, (unit, spans) in modbus_spans(rig.config, self.sim.port).items()
        }
        windows = [Window(t - rig._loss_window(kind), dead, kind) for t, dead, kind in rig.cuts]
        stored = {level_key: [r[1] for r in rig.store.readings(rig.gateway, level_key)]}
        loss = modbus_read_loss(plan, self.sim, stored, windows)
        v.figures["level_served"] = loss.produced
        v.figures["level_stored"] = loss.stored
        v.read_lost += loss.read_lost + loss.lost_outside
        v.check(loss.produced > 0, "the underpass level was never read")
        v.check(
            loss.lost_outside == 0,
            f"{loss.lost_outside} level readings the simulator served were lost",
        )
        v.check(
            loss.unmatched_stored == 0,
            f"{loss.unmatched_stored} stored level readings match no served request",
        )
