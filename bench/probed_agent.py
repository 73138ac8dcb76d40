"""The agent as `citygw run` runs it (on common.timers' loop), plus what bench/e2e.py reads:

* event-loop lag: a timer due every LAG_PERIOD_S, and how late it fires (the longest the
  loop could not run a ready callback: a GIL held elsewhere, a long callback, the OS);
* poll jitter: how late each device poll starts after its due time (FixedRate.observer);
* the agent's counters (read, refused, polls skipped, published) at that moment.

On SIGUSR1 it writes what the probes saw since the last SIGUSR1, and the counters, to the
stats file (JSON, replaced whole) and starts counting again; SIGTERM stops the agent as
usual. The probe
costs about a thousand timer callbacks a second, a few percent of a core.

    python bench/probed_agent.py CONFIG STATS_JSON
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from array import array
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import load_config  # noqa: E402
from agent.runtime import Agent  # noqa: E402
from common import timers  # noqa: E402
from common.logs import setup_logging  # noqa: E402
from drivers.schedule import FixedRate  # noqa: E402

LAG_PERIOD_S = 0.001


def summary(samples: array[float]) -> dict[str, Any]:
    """Count, p50, p99 and max of lateness samples (seconds) in milliseconds."""
    if not samples:
        return {"n": 0, "p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    ranked = sorted(samples)

    def at(q: float) -> float:
        return round(ranked[min(len(ranked) - 1, int(q * len(ranked)))] * 1e3, 3)

    return {"n": len(ranked), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1.0)}


class Probes:
    def __init__(self, agent: Agent, loop: asyncio.AbstractEventLoop, out: Path) -> None:
        self.agent = agent
        self.loop = loop
        self.out = out
        self.lag: array[float] = array("d")
        self.jitter: array[float] = array("d")
        self.windows = 0
        self._due = loop.time() + LAG_PERIOD_S
        loop.call_at(self._due, self._tick)
        FixedRate.observer = self.jitter.append

    def _tick(self) -> None:
        now = self.loop.time()
        self.lag.append(now - self._due)
        # the next due time on the grid, never in the past: one sample per stall
        self._due = max(self._due + LAG_PERIOD_S, now + LAG_PERIOD_S / 2)
        self.loop.call_at(self._due, self._tick)

    def dump(self) -> None:
        """What the probes saw since the last dump, then a fresh start."""
        self.windows += 1
        uplink = self.agent.uplink.status.as_dict() if self.agent.uplink else {}
        stats = {
            "window": self.windows,
            "loop_time": self.loop.time(),
            "counters": asdict(self.agent.counters),
            "skipped_polls": sum(
                h.skipped_polls for drv in self.agent.drivers for h in drv.health().values()
            ),
            "published_points": uplink.get("published_points", 0),
            "published_bytes": uplink.get("published_bytes", 0),
            "loop_lag": summary(self.lag),
            "poll_jitter": summary(self.jitter),
        }
        del self.lag[:], self.jitter[:]
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, self.out)


def main() -> None:
    config, out = load_config(sys.argv[1]), Path(sys.argv[2])
    setup_logging("WARNING")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        agent = Agent(config)  # what run_agent does, with the agent at hand
        probes = Probes(agent, loop, out)
        loop.add_signal_handler(signal.SIGUSR1, probes.dump)
        await agent.start()
        await stop.wait()
        await agent.stop()

    timers.run(run())  # the loop `citygw run` uses


if __name__ == "__main__":
    main()
