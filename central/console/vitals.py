"""The overview's vital signs: each configured `[[vitals]]` entry (or `DEFAULT_VITALS`)
evaluated against the store now, with a level by its thresholds and direction."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from central.console.config import SHARE_KINDS, VitalConfig
from central.store import FleetRow, Store
from native.stages import SEVERITIES

Level = Literal["ok", "warn", "alarm", "none"]

#: what the overview shows when the config has no [[vitals]]
DEFAULT_VITALS: tuple[VitalConfig, ...] = (
    VitalConfig(
        id="online",
        name="Gateways online",
        kind="online_share",
        unit="%",
        warn=95.0,
        alarm=80.0,
        direction="low",
    ),
    VitalConfig(id="alarms", name="Active alarms", kind="active_alarms", warn=1.0),
    VitalConfig(
        id="readings", name="Readings per minute", kind="readings_per_minute", window=300.0
    ),
    VitalConfig(id="data_loss", name="Readings lost or evicted", kind="data_loss", warn=1.0),
)

#: at most this many names in a vital's detail
DETAIL_NAMES = 5


@dataclass(frozen=True, slots=True)
class Vital:
    id: str
    name: str
    value: float | None  # None: nothing to measure (no gateway, no reading in the window)
    unit: str
    text: str  # the value in words, as the tile shows it
    level: Level
    detail: str  # what it is made of (which gateways, points, severities)


def level(cfg: VitalConfig, value: float | None) -> Level:
    """ok / warn / alarm by the thresholds on the bad side (`direction`); "none" without
    a value or without thresholds."""
    if value is None or (cfg.warn is None and cfg.alarm is None):
        return "none"
    high = cfg.direction == "high"
    for threshold, name in ((cfg.alarm, "alarm"), (cfg.warn, "warn")):
        if threshold is not None and (value >= threshold if high else value <= threshold):
            return "alarm" if name == "alarm" else "warn"
    return "ok"


#: the kinds computed from the fleet's rows (`Store.fleet`), the others from their own queries
FLEET_KINDS: Final = frozenset({"online_share", "share_healthy", "data_loss", "active_alarms"})


def chosen(vitals: Sequence[VitalConfig]) -> Sequence[VitalConfig]:
    """The vitals the overview shows: the configured ones, the defaults when none."""
    return vitals or DEFAULT_VITALS


def evaluate_one(
    store: Store, cfg: VitalConfig, now_ms: int, fleet: Sequence[FleetRow] | None
) -> Vital:
    """One vital; `fleet` (the store's fleet rows) is needed for FLEET_KINDS."""
    if cfg.kind in FLEET_KINDS:
        assert fleet is not None, f"{cfg.kind} is computed from the fleet's rows"
        gateways = [g for g in fleet if _selected(cfg, g)]
        if cfg.kind == "online_share":
            return _online(cfg, gateways)
        if cfg.kind == "share_healthy":
            return _healthy(cfg, gateways)
        if cfg.kind == "data_loss":
            return _data_loss(cfg, gateways)
        return _alarms(cfg, store, {g.gateway for g in gateways})
    if cfg.kind == "readings_per_minute":
        rate = store.uplink_points(now_ms - int(cfg.window * 1000)) / (cfg.window / 60.0)
        return _vital(cfg, rate, cfg.unit or "/min", f"{rate:.0f} readings a minute", "")
    return _points(cfg, store, now_ms)


def _vital(cfg: VitalConfig, value: float | None, unit: str, text: str, detail: str) -> Vital:
    return Vital(cfg.id, cfg.name, value, unit, text, level(cfg, value), detail)


def _glob(text: str, pattern: str) -> bool:
    """The stores' globs: `*` and `?` only, case-insensitive."""
    return fnmatch.fnmatchcase(text.lower(), pattern.lower().replace("[", "[[]"))


def _selected(cfg: VitalConfig, gateway: FleetRow) -> bool:
    site = cfg.select.site
    return _glob(gateway.gateway, cfg.select.gateways) and (site is None or gateway.site == site)


def _names(names: Sequence[str]) -> str:
    more = len(names) - DETAIL_NAMES
    return ", ".join(names[:DETAIL_NAMES]) + (f" and {more} more" if more > 0 else "")


def _share(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole else None


def _online(cfg: VitalConfig, gateways: Sequence[FleetRow]) -> Vital:
    online = [g.gateway for g in gateways if g.state == "online"]
    down = [g.gateway for g in gateways if g.state != "online"]
    return _vital(
        cfg,
        _share(len(online), len(gateways)),
        cfg.unit or "%",
        f"{len(online)} of {len(gateways)} online" if gateways else "no gateways",
        f"not online: {_names(down)}" if down else "",
    )


def _healthy(cfg: VitalConfig, gateways: Sequence[FleetRow]) -> Vital:
    total = sum(g.devices_total for g in gateways)
    healthy = sum(g.devices_healthy for g in gateways)
    sick = [g.gateway for g in gateways if g.devices_healthy < g.devices_total]
    return _vital(
        cfg,
        _share(healthy, total),
        cfg.unit or "%",
        f"{healthy} of {total} devices healthy" if total else "no device health reported",
        f"unhealthy devices on {_names(sick)}" if sick else "",
    )


def _data_loss(cfg: VitalConfig, gateways: Sequence[FleetRow]) -> Vital:
    """Counters since each gateway's buffer was made (evicted) and its agent started (lost)."""
    reported = [g for g in gateways if g.stats is not None]
    evicted = sum(g.stats.evicted_points for g in reported if g.stats is not None)
    lost = sum(g.stats.lost_points for g in reported if g.stats is not None)
    losing = [
        g.gateway
        for g in reported
        if g.stats is not None and g.stats.evicted_points + g.stats.lost_points
    ]
    return _vital(
        cfg,
        float(evicted + lost) if reported else None,
        cfg.unit or "readings",
        f"{evicted + lost} readings" if reported else "no gateway statistics yet",
        f"evicted {evicted}, lost {lost}" + (f" on {_names(losing)}" if losing else ""),
    )


def _alarms(cfg: VitalConfig, store: Store, gateways: set[str]) -> Vital:
    """Raised and not cleared; any critical one makes the level alarm."""
    active = [
        e
        for e in store.alarm_episodes(active=True)
        if e.gateway in gateways
        and (cfg.select.points == "*" or _glob(e.key or "", cfg.select.points))
    ]
    by_severity = Counter(e.severity for e in active)
    vital = _vital(
        cfg,
        float(len(active)),
        cfg.unit,
        f"{len(active)} active",
        ", ".join(f"{by_severity[s]} {s}" for s in reversed(SEVERITIES) if by_severity[s]),
    )
    if by_severity["critical"]:
        return dataclasses.replace(vital, level="alarm")
    return vital


def _points(cfg: VitalConfig, store: Store, now_ms: int) -> Vital:
    """max / min / mean / share_above / share_below of the selected points' latest values."""
    s = cfg.select
    found = store.latest_values(now_ms - int(cfg.window * 1000), s.gateways, s.points, s.site)
    if not found:
        unit = (cfg.unit or "%") if cfg.kind in SHARE_KINDS else cfg.unit
        return _vital(cfg, None, unit, f"no readings in the last {_span(cfg.window)}", "")
    values = [v.value for v in found]
    if cfg.kind in SHARE_KINDS:
        assert cfg.threshold is not None  # the config requires it
        above = cfg.kind == "share_above"
        hits = [v for v in found if (v.value > cfg.threshold if above else v.value < cfg.threshold)]
        side = "above" if above else "below"
        return _vital(
            cfg,
            _share(len(hits), len(found)),
            cfg.unit or "%",
            f"{len(hits)} of {len(found)} {side} {cfg.threshold:g}",
            _names([f"{v.gateway}/{v.key}" for v in hits]),
        )
    if cfg.kind == "mean":
        mean = sum(values) / len(values)
        return _vital(cfg, mean, cfg.unit, _number(mean, cfg.unit), f"{len(found)} points")
    pick = (max if cfg.kind == "max" else min)(found, key=lambda v: v.value)
    return _vital(
        cfg,
        pick.value,
        cfg.unit,
        _number(pick.value, cfg.unit),
        f"{pick.gateway}/{pick.key} of {len(found)} points",
    )


def _number(value: float, unit: str) -> str:
    return f"{value:.4g} {unit}".rstrip()


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"
