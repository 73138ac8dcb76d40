"""What the devices produced, from the simulators' own records, against what the platform
stored: the readings lost before they were durable in the buffer (`read_lost`).

The agent's own counters die with it (a kill, a power cut), so the rig counts from the
other side: the Modbus simulator records every request it answered (`SimRequest`, with
the rig's monotonic time), and the agent's read plan (`device_plans`, the same code the
driver polls with) says which points each request carried. A served request whose
readings are not in the store is a loss. The driver stamps a request's readings when
its answer arrives and sends the point's next request only after that, so a point's
requests (the simulator records their wall-clock time too) and its stored readings
alternate in time: each reading answers the latest request before it, and a request left
without one lost its reading. A run whose wall clock was faked (clock steps) is matched
by count instead.

A loss is allowed only inside a `Window` the design states: the moments before a kill
or a power cut during which a reading is not yet durable (in memory, in the intake, in
a commit not yet synced); see docs/architecture.md "Durability".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeAlias

from agent.config import load_config
from agent.runtime import device_specs
from drivers.modbus.driver import device_plans
from drivers.modbus.settings import ModbusDeviceSettings
from drivers.modbus.simulator import ModbusSimulator

#: Modbus function code of each table's read
_READ_FC = {"coil": 1, "discrete_input": 2, "holding_register": 3, "input_register": 4}


@dataclass(frozen=True, slots=True)
class Window:
    """Readings served in [start, end] (rig monotonic seconds) may be lost by design."""

    start: float
    end: float
    why: str

    def holds(self, t: float) -> bool:
        return self.start <= t <= self.end


@dataclass(slots=True)
class ReadLoss:
    devices: list[str] = field(default_factory=list)
    produced: int = 0  # readings the devices served to the agent
    stored: int = 0  # of them, found in the store
    read_lost: int = 0  # produced, not stored, served inside a design window
    lost_outside: int = 0  # produced, not stored, served outside every window
    unmatched_stored: int = 0  # stored readings no served request explains
    by_count: bool = False  # matched by count (faked clock): windows explain a shortfall
    outside_at: list[float] = field(default_factory=list)  # monotonic, of those outside

    def figures(self) -> dict[str, int | bool]:
        return {
            "device_produced": self.produced,
            "device_stored": self.stored,
            "read_lost": self.read_lost,
            "read_lost_outside_windows": self.lost_outside,
            "stored_without_request": self.unmatched_stored,
        }


#: device -> (unit id, [(function code, address, size, point key)]): what each read carries
ModbusPlan: TypeAlias = dict[str, tuple[int, list[tuple[int, int, int, str]]]]


def modbus_spans(config: Path, port: int) -> ModbusPlan:
    """device -> (unit, [(function code, address, size, point key)]) of the config's
    Modbus devices on `port`, as the driver plans its reads."""
    cfg = load_config(config)
    ids = {f"{d.name}/{p.name}": i for i, d in enumerate(cfg.devices) for p in d.points}
    devices = [
        d
        for d in device_specs(cfg, ids).get("modbus", [])
        if isinstance(d.settings, ModbusDeviceSettings) and d.settings.port == port
    ]
    out: ModbusPlan = {}
    for device in devices:
        assert isinstance(device.settings, ModbusDeviceSettings)
        groups = dict(device_plans([device])[device.name])
        spans: list[tuple[int, int, int, str]] = []
        by_group = _group_points(device)
        for group, requests in groups.items():
            points = by_group[group]
            for req in requests:
                for span in req.spans:
                    fc = _READ_FC[span.table]
                    spans.append((fc, span.address, span.count, points[span.key]))
        out[device.name] = (device.settings.unit_id, spans)
    return out


def _group_points(device: object) -> dict[str, list[str]]:
    """The point keys of each poll group, in the order the planner indexes them."""
    from drivers.modbus.driver import device_groups

    return {g: [p.key for p in pts] for g, _period, pts in device_groups(device)}  # type: ignore[arg-type]


def modbus_read_loss(
    plan: ModbusPlan,
    sim: ModbusSimulator,
    stored: Mapping[str, Sequence[int]],
    windows: Iterable[Window],
    *,
    by_count: bool = False,
) -> ReadLoss:
    """The readings `sim` served to the devices of `plan` (`modbus_spans` of its port),
    against `stored` (point key -> the timestamps the store holds for it)."""
    windows = list(windows)
    loss = ReadLoss(by_count=by_count)
    served: dict[str, list[tuple[float, float]]] = defaultdict(list)  # key -> (mono, wall)
    for device, (unit, spans) in sorted(plan.items()):
        loss.devices.append(device)
        for req in sim.requests:
            if req.unit != unit:
                continue
            for fc, address, size, key in spans:
                inside = req.address <= address and address + size <= req.address + req.count
                if fc == req.function_code and inside:
                    served[key].append((req.time, req.wall))
    for key, times in served.items():
        ts = sorted(stored.get(key, ()))
        loss.produced += len(times)
        if by_count:
            # no times to match under a faked clock: a shortfall is explained by the
            # design's windows up to the number of the point's requests served in them
            found = min(len(times), len(ts))
            loss.stored += found
            loss.unmatched_stored += len(ts) - found
            short = len(times) - found
            in_windows = sum(1 for mono, _ in times if any(w.holds(mono) for w in windows))
            loss.read_lost += min(short, in_windows)
            loss.lost_outside += short - min(short, in_windows)
            continue
        missing, extra = _match(times, ts)
        loss.stored += len(times) - len(missing)
        loss.unmatched_stored += extra
        for t in missing:
            if any(w.holds(t) for w in windows):
                loss.read_lost += 1
            else:
                loss.lost_outside += 1
                loss.outside_at.append(t)
    return loss


def _match(served: list[tuple[float, float]], stored: list[int]) -> tuple[list[float], int]:
    """The served requests (monotonic, wall-clock s) with no stored reading, and the
    stored readings no request explains. The driver sends a point's next request only
    after it stamped the last answer's readings (with the same wall clock the simulator
    records), so requests and readings alternate: walking them in time order (a request
    first at equal milliseconds), each reading belongs to the latest request not yet
    answered, and a request left over lost its reading."""
    events = sorted(
        [(int(wall * 1000), 0, mono) for mono, wall in served] + [(ts, 1, 0.0) for ts in stored]
    )
    waiting: list[float] = []  # requests not yet answered
    extra = 0
    for _, kind, mono in events:
        if kind == 0:
            waiting.append(mono)
        elif waiting:
            # the latest: at equal milliseconds the next request may sort before the
            # answer to this one; the count stays right either way
            waiting.pop()
        else:
            extra += 1
    return waiting, extra
