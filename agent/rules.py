"""A local rule's state machine, sans-I/O: conditions and the clock in, decisions out.

A rule is off until its condition (`when`, or its alarm raised) has held for `for`; then
it starts. It stops when `until` holds (default: `when` no longer does; for an alarm
rule: the alarm cleared). Interlocks stand between a wanted transition and the deed:
`min_off` since the last stop before a start, `min_on` since the last start before a
stop, `max_starts_per_hour` starts in the last hour (pump motors are rated in starts per
hour). A transition they hold back is reported as suppressed, once per interlock until
the next transition (a flapping condition does not flood the alarm lane), and happens
when they let it, if it is still wanted. An override (the platform's, or a local switch point)
suspends the rule: it decides nothing, and a transition it would have made is reported
as suppressed; released, it decides again from the conditions as they are.

A condition whose quality is not GOOD or UNCERTAIN, or whose inputs are stale, is
unknown: the rule holds what it does. Time is the rule clock (`LocalAction.clock_ms`: real
time while the agent runs, kept across restarts), never the wall clock, which can step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import orjson

from agent.local_config import RuleConfig
from native.batch import GOOD, UNCERTAIN

HOUR_MS = 3_600_000
Transition = Literal["start", "stop", "override", "release"]


@dataclass(frozen=True, slots=True)
class Decision:
    """`outcome` "done": do the rule's actions for `transition` ("override" and
    "release" have none); "suppressed": an interlock or override held it back."""

    transition: Transition
    outcome: Literal["done", "suppressed"]
    detail: str = ""


@dataclass(slots=True)
class RuleState:
    """What a restart keeps (the rule clock's times)."""

    active: bool = False
    changed_ms: int | None = None  # the last start or stop
    starts: list[int] = field(default_factory=list)  # within the last hour
    overridden: str = ""  # who overrode it from the platform ("" none)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "active": self.active,
                "changed": self.changed_ms,
                "starts": self.starts,
                "overridden": self.overridden,
            }
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> RuleState:
        """Raises ValueError on a blob this version cannot read."""
        try:
            obj = orjson.loads(blob)
            state = cls(
                active=bool(obj["active"]),
                changed_ms=None if obj["changed"] is None else int(obj["changed"]),
                starts=[int(t) for t in obj["starts"]],
                overridden=str(obj["overridden"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"unreadable rule state: {exc}") from None
        return state


def _known(value: float, quality: int) -> bool | None:
    """A condition's truth, None when its quality says it is unknown."""
    if quality not in (GOOD, UNCERTAIN) or value != value:
        return None
    return value != 0.0


def _seconds(ms: int) -> str:
    return f"{max(ms, 0) / 1000:.1f} s"


class Rule:
    def __init__(self, config: RuleConfig, state: RuleState | None = None) -> None:
        self.config = config
        self.state = state or RuleState()
        self.for_ms = round(config.for_ * 1000)
        self.min_on_ms = round(config.min_on * 1000)
        self.min_off_ms = round(config.min_off * 1000)
        self.on: bool | None = None  # the start condition holds (None: unknown)
        self.off: bool | None = None  # the stop condition holds
        self._until = config.until is not None
        self.on_since: int | None = None  # rule clock when `on` became true
        self.local_override = False  # the switch point's last value was nonzero
        self.override_key = config.override or ""
        self._suppressed: str | None = None  # the reason last reported for this want

    # -- inputs ----------------------------------------------------------------

    def set_when(self, value: float, quality: int, now_ms: int) -> None:
        on = _known(value, quality)
        if on is None:
            return  # unknown: hold
        if on and not self.on:
            self.on_since = now_ms
        self.on = on
        if not on:
            self.on_since = None
        if not self._until:
            self.off = not on

    def set_until(self, value: float, quality: int) -> None:
        off = _known(value, quality)
        if off is not None:
            self.off = off

    def set_alarm(self, raised: bool, now_ms: int) -> None:
        self.set_when(1.0 if raised else 0.0, GOOD, now_ms)

    def set_switch(self, value: float, quality: int) -> Decision | None:
        """The local override switch's reading; a Decision when it turned on or off."""
        on = _known(value, quality)
        if on is None or on == self.local_override:
            return None
        self.local_override = on
        if self.state.overridden:
            return None  # still overridden from the platform
        what = f"local switch {self.override_key} = {value:g}"
        return Decision("override" if on else "release", "done", what)

    def set_platform_override(self, who: str) -> Decision | None:
        """`who` ("" releases) took over or gave back the rule from the platform."""
        was = bool(self.state.overridden or self.local_override)
        self.state.overridden = who
        now = bool(who or self.local_override)
        if now == was:
            return None
        return Decision("override" if now else "release", "done", who or "platform released")

    @property
    def overridden(self) -> str:
        if self.state.overridden:
            return self.state.overridden
        return f"local switch {self.override_key}" if self.local_override else ""

    # -- decisions ---------------------------------------------------------------

    def decide(self, now_ms: int) -> Decision | None:
        """The transition to make now (its actions follow), a suppression to report
        (once per reason), or None."""
        s = self.state
        s.starts = [t for t in s.starts if now_ms - t < HOUR_MS]
        want = self._wanted(now_ms)
        if want is None:
            return None  # a flapping condition is reported once until a transition
        reason = self._interlock(want, now_ms)
        if reason is None:
            self._suppressed = None
            s.active = want == "start"
            s.changed_ms = now_ms
            if want == "start":
                s.starts.append(now_ms)
            return Decision(want, "done")
        kind = reason.split(":", 1)[0]
        if kind == self._suppressed:
            return None
        self._suppressed = kind
        return Decision(want, "suppressed", reason)

    def _wanted(self, now_ms: int) -> Literal["start", "stop"] | None:
        if not self.state.active:
            held = self.on and self.on_since is not None and now_ms - self.on_since >= self.for_ms
            return "start" if held else None
        return "stop" if self.off else None

    def _interlock(self, want: str, now_ms: int) -> str | None:
        s = self.state
        if self.overridden:
            return f"override: overridden by {self.overridden}"
        since = None if s.changed_ms is None else now_ms - s.changed_ms
        if want == "stop":
            if since is not None and since < self.min_on_ms:
                return f"min_on: {_seconds(self.min_on_ms - since)} left of its minimum run"
            return None
        if since is not None and since < self.min_off_ms:
            return f"min_off: {_seconds(self.min_off_ms - since)} left of its minimum rest"
        limit = self.config.max_starts_per_hour
        if limit and len(s.starts) >= limit:
            wait = s.starts[0] + HOUR_MS - now_ms
            return f"max_starts_per_hour: {limit} starts in the last hour; next in {_seconds(wait)}"
        return None

    def next_due(self, now_ms: int) -> int | None:
        """The rule clock time when `decide` may have something new to say."""
        s = self.state
        if self.overridden:
            return None
        want = self._wanted(now_ms)
        if not s.active and self.on and self.on_since is not None and want is None:
            return self.on_since + self.for_ms
        if want is None or s.changed_ms is None:
            return None
        if want == "stop":
            return s.changed_ms + self.min_on_ms
        due = s.changed_ms + self.min_off_ms
        limit = self.config.max_starts_per_hour
        if limit and len(s.starts) >= limit:
            due = max(due, s.starts[0] + HOUR_MS)
        return due
