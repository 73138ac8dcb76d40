"""A HIL scenario file (hil/scenarios/NAME.toml): what runs, which faults happen when,
and which checks decide the verdict. Validated with pydantic, like the agent's config.

    name = "outage"
    description = "..."
    duration = "40s"          # how long the devices are read (then: drain and check)
    fast = true               # part of .ci/run
    devices = '''...'''       # [[devices]] tables of the agent's config; placeholders:
                              # {modbus_port} {modbus_slow_port} {modbus_rtu_port}
                              # {site_broker} {ble_replay}
                              # {mcu_port} (the simulated microcontroller's pty)
                              # {underpass_port} (the underpass sump, [sims.underpass])
    local = '''...'''         # [[derived]] and [[rules]] tables (same placeholders);
                              # left out of the drain's config, whose devices are off
    [uplink]                  # keys of the agent's [uplink] (broker is the rig's proxy)
    [buffer]                  # keys of the agent's [buffer] (path is the rig's)
    [sims]                    # which simulators run (see Sims)
    [checks]                  # what the verdict requires beside the invariants
    [[faults]]                # the timeline
    at = "5s"
    action = "link"           # see Fault
    mode = "down"

Real hardware: ``[target]`` replaces the private broker by a real one (``broker``)
and the device simulators by whatever ``devices`` names (serial ports, real IPs); the
faults that need a simulator are then skipped.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.units import Duration


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Fault(_Model):
    """One event of the timeline, at ``at`` seconds after the agent started.

    - ``broker_stop`` / ``broker_start``: the private Mosquitto goes away / comes back.
    - ``link`` with ``mode``: the proxy between agent and broker: ``pass``, ``down`` (link
      lost), ``no_ack`` (a broker that accepts but never acknowledges), ``blackhole``.
    - ``flap``: ``count`` times: link down for ``down`` s, then up for ``up`` s.
    - ``power_cuts``: ``count`` times: SIGKILL the agent after a random ``min_up`` ..
      ``max_up`` s of running, and start it again at once (a process death: the kernel
      still writes what the agent wrote).
    - ``power_loss``: the same, but a power cut (needs ``powerfs = true``): the buffer's
      filesystem drops what was not synced (keeping a random 0 .. ``keep_max`` of the
      dirty pages, written back in any order, as an OS may have done), the agent is
      killed, and it starts again in a new boot (a new boot id).
    - ``device`` with ``target`` ("slow" simulator) and ``silent`` / ``delay``.
    - ``modbus_set``: write ``value`` into the level transmitter's register (to cross an
      alarm threshold).
    - ``disk_limit``: the agent's file-size limit: ``bytes`` (0 = unlimited again).
    - ``clock_step``: the agent's wall clock jumps by ``seconds`` (libfaketime).
    - ``inject_stop``: no more internal faults (``[[inject]]``); `citygw status` is read
      first, while the agent still shows what failed.
    - ``flood``: ``value`` m/s pour into the underpass sump ([sims.underpass]) for
      ``for`` s.
    - ``level_flap``: ``count`` times: the sump's level held at ``high`` for ``up`` s,
      then at ``low`` for ``down`` s (across a rule's thresholds), whatever the pump does.
    - ``config_push``: the platform pushes (`citygw platform push-config`) the gateway's
      config with its uplink pointed at a dead broker, with ``deadline`` (30 s at least):
      the gateway must roll back by itself (hil/config_push.py).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    at: Duration
    action: Literal[
        "broker_stop",
        "broker_start",
        "link",
        "flap",
        "power_cuts",
        "device",
        "modbus_set",
        "disk_limit",
        "clock_step",
        "inject_stop",
        "power_loss",
        "config_push",
        "flood",
        "level_flap",
    ]
    mode: Literal["pass", "down", "no_ack", "blackhole"] = "pass"
    count: int = Field(1, ge=1, le=1000)
    down: Duration = 1.0
    up: Duration = 1.0
    min_up: Duration = 0.3
    max_up: Duration = 2.0
    target: str = "slow"
    silent: bool | None = None
    delay: Duration | None = None
    value: float = 0.0
    bytes: int = Field(0, ge=0)
    seconds: float = 0.0
    keep_max: float = Field(0.0, ge=0.0, le=1.0)
    deadline: Duration = 30.0  # config_push's
    for_: Duration = Field(1.0, alias="for")  # flood's
    high: float = 1.0  # level_flap's (m)
    low: float = 0.0


class Underpass(_Model):
    """The underpass sump (hil/sim_modbus.py `UnderpassSimulator`) on a Modbus port of
    its own, ``{underpass_port}``: unit 1, the level in mm in holding register 0, the
    pump's coil 0; level += (inflow - pump * outflow) * dt every `tick`."""

    level: float = Field(0.1, ge=0.0)  # m at the start
    outflow: float = Field(1.5, gt=0.0)  # m/s the running pump takes out
    tick: Duration = Field(0.02, gt=0.0, le=0.05)


class Sims(_Model):
    modbus: bool = True  # street cabinet: energy meter + level transmitter (Modbus TCP)
    modbus_slow: bool = False  # a second cabinet on its own link, to be made slow or silent
    modbus_garbage: float = 0.0  # probability of a garbage RTU-over-TCP answer (0: no server)
    mqtt_sensors: int = 0  # JSON sensors publishing to the site broker
    mqtt_garbage: float = 0.0  # probability of a garbage payload
    ble_adverts: int = 0  # adverts in the replay file the BLE driver plays
    ble_garbage: float = 0.0
    uplink_garbage: int = 0  # junk messages published on the platform's uplink topics
    mcu: bool = False  # the gateway's microcontroller (drivers/mcu/simulator.py) on a pty
    mcu_garbage: float = Field(default=0.0, ge=0.0, le=1.0)  # probability a sent frame is garbled
    # the broker with the shipped ACLs and passwords, and hostile clients (hil/hostile.py)
    hostile: bool = False
    underpass: Underpass | None = None

    @model_validator(mode="after")
    def _garbage_needs_its_sim(self) -> Sims:
        if self.mcu_garbage and not self.mcu:
            raise ValueError("mcu_garbage needs mcu = true")
        return self


class LocalActionChecks(_Model):
    """A local rule that drives the underpass pump (hil/local_action.py): judged from
    the simulator's record and the platform store. The rule's `when` is `level > above`
    and its `until` `level < below` on its one input; its interlocks come from its config."""

    rule: str
    above: float
    below: float
    #: the longest time from the condition (a served reading above `above`, or the end of
    #: an interlock) to the pump's coil write acknowledged by the simulator
    max_latency_ms: float = 200.0


class Checks(_Model):
    order: bool = True  # per-point timestamps strictly increase in sending order
    evictions: bool = False  # the buffer must have evicted (and reported exactly that)
    alarm_latency: bool = False  # an alarm must reach the store ahead of the backlog
    corrupt_start: bool = False  # start from a corrupted buffer: moved aside, reported
    jitter_point: str | None = None  # a healthy point whose poll jitter is measured
    max_jitter_ms: float = 250.0
    clock_flagged: bool = False  # readings under an obviously wrong clock flagged
    rejections: bool = False  # injected = rejected, kind by kind (hil/garbage.py)
    disk_full: bool = False  # the buffer must have refused writes (and the agent lived on)
    min_power_cuts: int = 0
    # produced and stored counted from the devices' record (hil/produced.py), not from
    # the buffer's counter, which a power cut can roll back (power-loss)
    device_count: bool = False
    # [[inject]] faults: each rule fired, the agent's counters match the record exactly,
    # its tasks restarted and `citygw status` showed them (hil/inject.py)
    internal_faults: bool = False
    # the broker back (broker_start) -> the first reading stored, at most this long
    max_first_delivery_s: float | None = None
    local_action: LocalActionChecks | None = None


class Target(_Model):
    broker: str | None = None  # a real broker instead of the private one


class Scenario(_Model):
    name: str
    description: str = ""
    duration: Duration = 30.0
    drain_timeout: Duration = 120.0
    fast: bool = True
    devices: str
    local: str = ""
    uplink: dict[str, Any] = Field(default_factory=dict)
    buffer: dict[str, Any] = Field(default_factory=dict)
    sims: Sims = Field(default_factory=Sims)
    checks: Checks = Field(default_factory=Checks)
    faults: list[Fault] = Field(default_factory=list)
    target: Target = Field(default_factory=Target)
    #: internal faults (hil/inject.py `Rule` keys), active from the agent's start
    inject: list[dict[str, Any]] = Field(default_factory=list)
    inject_seed: int = 1
    #: the buffer on hil/powerfs.py, whose unsynced data a power_loss drops
    powerfs: bool = False

    @model_validator(mode="after")
    def _power_loss_needs_powerfs(self) -> Scenario:
        if any(f.action == "power_loss" for f in self.faults) and not self.powerfs:
            raise ValueError("power_loss faults need powerfs = true")
        sump = any(f.action in ("flood", "level_flap") for f in self.faults)
        if (sump or self.checks.local_action) and self.sims.underpass is None:
            raise ValueError("flood, level_flap and checks.local_action need [sims.underpass]")
        return self


def load_scenario(path: Path) -> Scenario:
    with path.open("rb") as f:
        data = tomllib.load(f)
    return Scenario.model_validate(data)


SCENARIOS = Path(__file__).parent / "scenarios"


def all_scenarios() -> list[Path]:
    return sorted(SCENARIOS.glob("*.toml"))
