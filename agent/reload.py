"""What a config reload changes: the diff of two validated configs, without I/O.

`diff_configs(old, new)` says which devices are added, removed, changed (anything of
their config: driver settings, points, poll, enabled, location...) or unchanged,
whether the uplink must reconnect, how many points keep their stage state, and which
keys changed that the running agent cannot take (`restart_needed`: the buffer's
database, the gateway's identity, a section it has no live path for). The agent
refuses such a reload (`ReloadRefused`) before touching anything; everything else is
applied live by `Agent.reload` (agent/runtime.py).

What is live, per top-level key:
- ``gateway``: ``site``, ``location`` and ``config_version`` (up/meta is republished);
  ``id`` needs a restart (it is in every topic and batch, and the buffer's stream);
- ``uplink``: every key; the uplink reconnects only if its connection settings changed
  (``max_batch_points`` is the flush's, it never reconnects);
- ``buffer``: ``flush_interval``, ``intake_delay`` and ``max_memory_points``; the
  database's ``path``, ``capacity`` and ``sync`` need a restart;
- ``devices``: every key (the devices concerned are stopped, started or restarted);
- ``derived`` and ``rules``: every key (rebuilt once the rules' actions under way are
  recorded; each rule keeps its state, by id);
- any other section: needs a restart, until it has a live path of its own.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agent.config import Config, PointConfig
from agent.local_config import DerivedConfig
from agent.stage_config import PointContext, aggregate_functions, aggregate_key, stage_specs
from agent.uplink import UplinkSettings

__all__ = [
    "DriverPlan",
    "ReloadDiff",
    "ReloadRefused",
    "diff_configs",
    "plan_drivers",
    "stage_points",
]

#: the keys of each section that can change while the agent runs (module docstring)
LIVE_KEYS: dict[str, frozenset[str] | None] = {
    "gateway": frozenset({"site", "location", "config_version"}),
    "uplink": None,  # all of them
    "buffer": frozenset({"flush_interval", "intake_delay", "max_memory_points"}),
    "devices": None,  # diffed device by device
    "derived": None,  # rebuilt, each input's and unchanged rule's state kept
    "rules": None,
}


class ReloadRefused(Exception):
    """A valid config that the running agent cannot take (now), the message says why:
    each key that needs a restart, a firmware update under way on a device the reload
    would stop, the agent stopping. Nothing was changed."""


@dataclass(slots=True)
class ReloadDiff:
    """A reload's effect. Device lists hold device names in config order; the stage
    counts are points (with a pipeline, on a device running before and after):
    `stages_kept` keep their stage state (their stage spec is unchanged),
    `stages_reset` start afresh. `restart_needed`: the keys that changed but need a
    restart (a reload with any is refused). `restarted`: unchanged devices stopped
    and started anyway, because their driver cannot add or remove a device while it
    runs (filled in by the agent)."""

    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]
    uplink_changed: bool
    stages_kept: int
    stages_reset: int
    restart_needed: list[str]
    restarted: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def refusal(self) -> ReloadRefused | None:
        """The refusal of a reload with keys that need a restart; None if it can apply."""
        if not self.restart_needed:
            return None
        keys = ", ".join(self.restart_needed)
        return ReloadRefused(
            f"{keys} changed: needs a restart (citygw cannot apply "
            f"{'it' if len(self.restart_needed) == 1 else 'them'} to a running agent); "
            "restart the agent to use this config"
        )


def diff_configs(old: Config, new: Config) -> ReloadDiff:
    olds = {d.name: d for d in old.devices}
    news = {d.name: d for d in new.devices}
    # model equality: every key, the extras (driver keys) and the private state (the
    # drivers' validated settings, what a profile or a referenced file filled in)
    changed = [n for n in news if n in olds and olds[n] != news[n]]
    kept, reset = stage_points(old, new)
    return ReloadDiff(
        added=[n for n in news if n not in olds],
        removed=[n for n in olds if n not in news],
        changed=changed,
        unchanged=[n for n in news if n in olds and n not in changed],
        uplink_changed=UplinkSettings.of(old) != UplinkSettings.of(new),
        stages_kept=len(kept),
        stages_reset=len(reset),
        restart_needed=_restart_needed(old, new),
    )


@dataclass(slots=True)
class DriverPlan:
    """How a reload stops and starts devices, driver by driver (by name). A driver with
    live devices stops and starts only the devices concerned (`live`: driver -> the
    devices it stops, and those it starts); any other driver concerned stops as a
    whole and a new one starts with all its devices (`whole`), the unchanged ones
    (`restarted`) included."""

    live: dict[str, tuple[list[str], set[str]]]
    whole: list[str]
    restarted: list[str]
    stopping: set[str]  # every running device that stops, for however short


def plan_drivers(
    diff: ReloadDiff, new: Config, running: Mapping[str, Sequence[str]], live: Collection[str]
) -> DriverPlan:
    """`running`: each running driver's devices; `live`: the drivers among them that
    add and remove devices while they run."""
    changing = {*diff.removed, *diff.changed}
    starting = {*diff.added, *diff.changed}
    enabled: dict[str, list[str]] = {}  # driver -> its devices in the new config
    for d in new.devices:
        if d.enabled:
            enabled.setdefault(d.driver, []).append(d.name)
    plan = DriverPlan({}, [], [], set())
    for name in sorted(running.keys() | enabled.keys()):
        devices = running.get(name, [])
        stop = [d for d in devices if d in changing]
        start = {d for d in enabled.get(name, []) if d in starting}
        if not (stop or start):
            continue
        plan.stopping.update(stop)
        if name in live and name in running and name in enabled:
            plan.live[name] = (stop, start)
        else:
            plan.whole.append(name)
            plan.restarted += [d for d in devices if d not in changing]
    plan.stopping.update(plan.restarted)
    return plan


def stage_points(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """The keys of the points (with stages, enabled before and after) whose stage state
    a reload keeps, because their stage spec is unchanged, and of those it resets."""
    before = _stage_specs(old)
    after = _stage_specs(new)
    kept = [key for key, spec in after.items() if key in before and before[key] == spec]
    reset = [key for key in after if key in before and key not in kept]
    return kept, reset


def _stage_specs(config: Config) -> dict[str, list[Any]]:
    """The stage specs of every point whose pipeline runs (`Config.staged_points`), by
    key. A spec holds registry ids (aggregate series) that are stable per key, so every
    id is 0 here: two specs differ only where the config does."""
    return {
        key: stage_specs(p.pipeline, PointContext(key, p.min, p.max, _zero_ids(key, p)))
        for key, p in config.staged_points()
    }


def _zero_ids(key: str, point: PointConfig | DerivedConfig) -> dict[str, int]:
    return {aggregate_key(key, f): 0 for f in aggregate_functions(point.pipeline)}


def _restart_needed(old: Config, new: Config) -> list[str]:
    out: list[str] = []
    for section in type(new).model_fields:
        before, after = getattr(old, section), getattr(new, section)
        if section not in LIVE_KEYS:
            if before != after:
                out.append(section)
            continue
        live = LIVE_KEYS[section]
        if live is None:
            continue
        for key in type(after).model_fields:
            if key not in live and getattr(before, key) != getattr(after, key):
                out.append(f"{section}.{key}")
    return out
