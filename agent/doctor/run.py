"""All the doctor's checks for one config, in report order: config, buffer, clock,
broker, devices, service. What needs a valid config is skipped without one; the network
checks (broker, devices) run concurrently."""

from __future__ import annotations

import asyncio
import datetime
import getpass
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.doctor.broker import BrokerTarget, probe_broker
from agent.doctor.buffer import check_buffer
from agent.doctor.check import Check, skipped
from agent.doctor.clock import clock_check, synchronised
from agent.doctor.config import check_config
from agent.doctor.devices import DeviceEnv, check_devices
from agent.doctor.service import (
    Systemctl,
    service_user,
    systemctl_runner,
    systemd_check,
    unit_check,
)
from agent.status import agent_running
from common.cli import age

#: what --skip takes
AREAS = ("buffer", "clock", "broker", "devices", "service")


@dataclass(frozen=True)
class Options:
    #: seconds per network step (a DNS lookup, a connection, a handshake, a device's answer)
    timeout: float = 5.0
    unit_dir: Path = Path("/etc/systemd/system")
    skip: frozenset[str] = frozenset()
    #: the tests replace what the checks find on this machine
    sysfs: Path = Path("/sys")
    access: Callable[[str, int], bool] = field(default=os.access)
    systemctl: Callable[[float], Systemctl | None] = field(default=systemctl_runner)


def _uplink_note(agent: dict[str, object], now_ms: int) -> str | None:
    """Why the auth step must not connect: the running agent holds the session."""
    up = agent.get("uplink")
    if not isinstance(up, dict) or up.get("state") != "online":
        return None
    last = up.get("last_puback_ms")
    return (
        "the running agent is connected (last PUBACK "
        f"{age(last if isinstance(last, int) else None, now_ms)}): its credentials work; "
        "not tried again, as a second session with its identity would drop the agent's"
    )


async def run_checks(config: Path, opts: Options) -> list[Check]:
    now_ms = time.time_ns() // 1_000_000
    now = datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC)
    first, cfg = check_config(config)
    checks = [first]

    def off(area: str) -> list[Check] | None:
        if area in opts.skip:
            return [skipped(area, f"--skip {area}")]
        if cfg is None and area in ("buffer", "broker", "devices"):
            return [skipped(area, "not checked: the config is not valid")]
        return None

    agent = None
    if (skip := off("buffer")) is not None:
        checks += skip
    elif cfg is not None:
        found, state = check_buffer(cfg.buffer, now_ms)
        checks += found
        if agent_running(state, now_ms):
            agent = state.get("agent") or {}

    if (skip := off("clock")) is not None:
        checks += skip
    else:
        synced, source = await asyncio.to_thread(synchronised, opts.timeout)
        checks.append(clock_check(now, synced, source))

    async def broker() -> list[Check]:
        if (skip := off("broker")) is not None:
            return skip
        assert cfg is not None
        note = _uplink_note(agent, now_ms) if agent is not None else None
        return await probe_broker(BrokerTarget.of_uplink(cfg), opts.timeout, now, note)

    async def devices() -> list[Check]:
        if (skip := off("devices")) is not None:
            return skip
        assert cfg is not None
        # permissions are the agent's: its service's user, if that is not who runs this
        who = service_user(opts.unit_dir)
        access, user = opts.access, getpass.getuser()
        if who is not None and who.name != user:
            access, user = who.may_read_write, who.name
        return await check_devices(
            cfg, DeviceEnv(opts.timeout, now_ms, agent, opts.sysfs, access, user)
        )

    network = await asyncio.gather(broker(), devices())
    checks += network[0] + network[1]

    if (skip := off("service")) is not None:
        checks += skip
    else:
        checks.append(unit_check(opts.unit_dir, config))
        checks.append(systemd_check(opts.systemctl(opts.timeout)))
    return checks
