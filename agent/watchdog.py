"""The agent under systemd: the watchdog's keep-alive and the STATUS= line.

The agent pings only while its flush loop and its uplink loop both turn
(`Agent.heartbeats`, common/watchdog.py). Each may pause for its own reasons without
being stuck: the flush loop sleeps `buffer.flush_interval` between flushes; the uplink
waits at most `Uplink.longest_pause` between turns, through a broker outage too (it
turns while it backs off). Beyond the watchdog interval on top of that pause, the loop
is stuck: a flush awaiting a hung SQLite call, an uplink waiting on a buffer thread
that never answers. A blocked event loop stops everything, the pings included.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from common import watchdog

if TYPE_CHECKING:
    from agent.runtime import Agent


def allowed_pauses(agent: Agent, interval: float) -> dict[str, float]:
    """How old each heartbeat may be before its loop counts as stuck (seconds)."""
    pauses = {"flush": agent.config.buffer.flush_interval}
    if agent.uplink is not None:
        pauses["uplink"] = agent.uplink.longest_pause
    return {name: interval + pause for name, pause in pauses.items()}


def stalled_loops(agent: Agent, interval: float, now: float) -> dict[str, float]:
    return watchdog.stalled(agent.heartbeats, allowed_pauses(agent, interval), now)


def service_status(agent: Agent) -> str:
    """One line for `systemctl status`: the uplink's state and what went through."""
    c = agent.counters
    up = agent.uplink.status if agent.uplink is not None else None
    state = up.state if up is not None else "not started"
    published = up.published_points if up is not None else 0
    return (
        f"uplink {state}; since start: {c.read} readings read, {c.sent} buffered, "
        f"{published} published, {c.refused} refused"
    )


async def keep_alive(agent: Agent) -> None:
    """Pings systemd's watchdog while the agent makes progress; until cancelled."""
    interval = agent.notifier.watchdog_s
    assert interval is not None, "started only when systemd watches the agent"
    await watchdog.keep_alive(
        agent.notifier,
        interval,
        partial(stalled_loops, agent, interval),
        partial(service_status, agent),
    )
