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
- any other section: needs a restart, until it has a live path of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from agent.config import Config, DeviceConfig, PointConfig
from agent.stage_config import PointContext, aggregate_functions, aggregate_key, stage_specs
from agent.uplink import UplinkSettings

__all__ = ["ReloadDiff", "ReloadRefused", "diff_configs", "stage_points"]

#: the keys of each section that can change while the agent runs (module docstring)
LIVE_KEYS: dict[str, frozenset[str] | None] = {
    "gateway": frozenset({"site", "location", "config_version"}),
    "uplink": None,  # all of them
    "buffer": frozenset({"flush_interval", "intake_delay", "max_memory_points"}),
    "devices": None,  # diffed device by device
}


class ReloadRefused(Exception):
    """A valid config that the running agent cannot take: the message names each key
    and says it needs a restart."""


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

    @property
    def empty(self) -> bool:
        """Nothing to restart: no device, no uplink change."""
        return not (self.added or self.removed or self.changed or self.uplink_changed)

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
    changed = [
        n for n in news if n in olds and _device_identity(olds[n]) != _device_identity(news[n])
    ]
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


def stage_points(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """The keys of the points (with stages, enabled before and after) whose stage state
    a reload keeps, because their stage spec is unchanged, and of those it resets."""
    before = _stage_specs(old)
    after = _stage_specs(new)
    kept = [key for key, spec in after.items() if key in before and before[key] == spec]
    reset = [key for key in after if key in before and key not in kept]
    return kept, reset


def _stage_specs(config: Config) -> dict[str, list[Any]]:
    """The stage specs of every point with stages on an enabled device, by key. A spec
    holds registry ids (aggregate series) that are stable per key, so every id is 0
    here: two specs differ only where the config does."""
    return {
        key: stage_specs(p.pipeline, PointContext(key, p.min, p.max, _zero_ids(key, p)))
        for d in config.devices
        if d.enabled
        for p in d.points
        if p.pipeline
        for key in (f"{d.name}/{p.name}",)
    }


def _zero_ids(key: str, point: PointConfig) -> dict[str, int]:
    return {aggregate_key(key, f): 0 for f in aggregate_functions(point.pipeline)}


def _device_identity(device: DeviceConfig) -> tuple[Any, ...]:
    """All of a device's config, its drivers' validated settings included (what a
    profile or a referenced file filled in shows there)."""
    return (
        device.model_dump(),
        device.settings.model_dump(),
        [p.settings.model_dump() for p in device.points],
    )


def _restart_needed(old: Config, new: Config) -> list[str]:
    out: list[str] = []
    for section in type(new).model_fields:
        before, after = getattr(old, section), getattr(new, section)
        if section not in LIVE_KEYS:
            if _dump(before) != _dump(after):
                out.append(section)
            continue
        live = LIVE_KEYS[section]
        if live is None:
            continue
        for key in type(after).model_fields:
            if key not in live and _dump(getattr(before, key)) != _dump(getattr(after, key)):
                out.append(f"{section}.{key}")
    return out


def _dump(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value
