"""A local rule's state machine (agent/rules.py): conditions and the rule clock in,
decisions out; the interlocks and overrides that stand between them."""

from __future__ import annotations

from typing import Any

import pytest

from agent.local_config import RuleConfig
from agent.rules import HOUR_MS, Decision, Rule, RuleState
from native.batch import BAD, GOOD, UNAVAILABLE, UNCERTAIN


def rule(**keys: Any) -> Rule:
    base: dict[str, Any] = {
        "id": "pump",
        "inputs": {"level": "underpass/level"},
        "when": "level > 0.8",
        "start": [{"write": "underpass/pump", "value": 1}],
        "stop": [{"write": "underpass/pump", "value": 0}],
    }
    return Rule(RuleConfig.model_validate(base | keys))


def test_starts_when_the_condition_holds_and_stops_when_it_no_longer_does() -> None:
    r = rule()
    assert r.decide(0) is None
    r.set_when(1.0, GOOD, 100)
    assert r.decide(100) == Decision("start", "done")
    assert r.state.active and r.state.changed_ms == 100 and r.state.starts == [100]
    assert r.decide(150) is None  # started once
    r.set_when(0.0, GOOD, 200)
    assert r.decide(200) == Decision("stop", "done")
    assert not r.state.active


def test_for_makes_the_condition_hold_that_long_first() -> None:
    r = rule(**{"for": "2s"})
    r.set_when(1.0, GOOD, 1000)
    assert r.decide(1000) is None
    assert r.next_due(1000) == 3000
    r.set_when(1.0, GOOD, 2500)  # still true: the hold counts from the first
    assert r.decide(2999) is None
    assert r.decide(3000) == Decision("start", "done")


def test_a_condition_that_drops_within_for_starts_the_hold_again() -> None:
    r = rule(**{"for": "2s"})
    r.set_when(1.0, GOOD, 0)
    r.set_when(0.0, GOOD, 1500)
    r.set_when(1.0, GOOD, 1800)
    assert r.decide(2500) is None
    assert r.decide(3800) == Decision("start", "done")


def test_until_is_the_hysteresis() -> None:
    r = rule(until="level < 0.3")
    r.set_when(1.0, GOOD, 0)
    assert r.decide(0) == Decision("start", "done")
    r.set_when(0.0, GOOD, 10)  # below 0.8 but not below 0.3: keeps running
    r.set_until(0.0, GOOD)
    assert r.decide(10) is None
    r.set_until(1.0, GOOD)
    assert r.decide(20) == Decision("stop", "done")


@pytest.mark.parametrize("quality", [BAD, UNAVAILABLE])
def test_an_unknown_condition_holds_what_the_rule_does(quality: int) -> None:
    r = rule()
    r.set_when(1.0, GOOD, 0)
    assert r.decide(0) == Decision("start", "done")
    r.set_when(0.0, quality, 10)  # a failed read or stale input: not "the level fell"
    assert r.decide(10) is None and r.state.active
    r.set_when(float("nan"), GOOD, 20)
    assert r.decide(20) is None and r.state.active


def test_an_uncertain_condition_counts() -> None:
    r = rule()
    r.set_when(1.0, UNCERTAIN, 0)
    assert r.decide(0) == Decision("start", "done")


def test_min_on_defers_the_stop_and_says_so_once() -> None:
    r = rule(min_on="30s")
    r.set_when(1.0, GOOD, 0)
    r.decide(0)
    r.set_when(0.0, GOOD, 5000)
    d = r.decide(5000)
    assert d is not None and (d.transition, d.outcome) == ("stop", "suppressed")
    assert d.detail == "min_on: 25.0 s left of its minimum run"
    assert r.decide(6000) is None  # said once
    assert r.next_due(6000) == 30_000
    assert r.decide(30_000) == Decision("stop", "done")


def test_min_off_defers_the_start() -> None:
    r = rule(min_off="10s")
    r.set_when(1.0, GOOD, 0)
    r.decide(0)
    r.set_when(0.0, GOOD, 1000)
    r.decide(1000)
    r.set_when(1.0, GOOD, 2000)
    d = r.decide(2000)
    assert d == Decision("start", "suppressed", "min_off: 9.0 s left of its minimum rest")
    assert r.next_due(2000) == 11_000
    r.set_when(0.0, GOOD, 5000)  # no longer wanted: nothing happens when it is over
    assert r.decide(11_000) is None


def test_max_starts_per_hour_holds_a_flapping_condition() -> None:
    r = rule(max_starts_per_hour=3)
    starts = 0
    suppressed = []
    for k in range(20):  # the level flaps every second
        t = k * 1000
        r.set_when(float(k % 2 == 0), GOOD, t)
        d = r.decide(t)
        if d and d.transition == "start" and d.outcome == "done":
            starts += 1
        elif d and d.outcome == "suppressed":
            suppressed.append(d.detail)
    assert starts == 3
    assert suppressed == ["max_starts_per_hour: 3 starts in the last hour; next in 3594.0 s"]
    # an hour after the first start, a fourth may come
    r.set_when(1.0, GOOD, HOUR_MS)
    assert r.decide(HOUR_MS) == Decision("start", "done")


def test_a_platform_override_suspends_the_rule_until_released() -> None:
    r = rule()
    assert r.set_platform_override("platform (command c-1)") == Decision(
        "override", "done", "platform (command c-1)"
    )
    r.set_when(1.0, GOOD, 0)
    d = r.decide(0)
    assert d == Decision("start", "suppressed", "override: overridden by platform (command c-1)")
    assert r.decide(10) is None and not r.state.active
    assert r.set_platform_override("") == Decision("release", "done", "platform released")
    assert r.decide(20) == Decision("start", "done")  # decides again from the condition


def test_a_local_switch_overrides_and_the_platform_release_does_not_end_it() -> None:
    r = rule(override="cabinet/hand")
    assert r.set_switch(1.0, GOOD) == Decision("override", "done", "local switch cabinet/hand = 1")
    assert r.set_switch(1.0, GOOD) is None  # no change
    assert r.set_switch(0.0, BAD) is None  # unknown: the switch stays where it was
    assert r.overridden == "local switch cabinet/hand"
    r.set_when(1.0, GOOD, 0)
    assert r.decide(0) is not None and not r.state.active
    assert r.set_switch(0.0, GOOD) == Decision("release", "done", "local switch cabinet/hand = 0")
    assert r.decide(1) == Decision("start", "done")


def test_an_alarm_rule_follows_its_alarm() -> None:
    r = Rule(
        RuleConfig.model_validate({"id": "sign", "alarm": "flood", "start": [{"event": "flooded"}]})
    )
    r.set_alarm(True, 5)
    assert r.decide(5) == Decision("start", "done")
    r.set_alarm(False, 9)
    assert r.decide(9) == Decision("stop", "done")


def test_the_state_survives_a_restart_as_bytes() -> None:
    s = RuleState(active=True, changed_ms=123, starts=[100, 123], overridden="platform (command x)")
    assert RuleState.from_bytes(s.to_bytes()) == s
    with pytest.raises(ValueError, match="unreadable rule state"):
        RuleState.from_bytes(b"{}")
    # a restarted rule keeps its interlocks: min_on counts from the saved start
    r = Rule(rule(min_on="30s").config, RuleState(active=True, changed_ms=1000, starts=[1000]))
    r.set_when(0.0, GOOD, 2000)
    d = r.decide(2000)
    assert d is not None and d.outcome == "suppressed"
