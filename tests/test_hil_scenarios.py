"""The HIL scenarios marked fast, run in CI: the real agent as a subprocess against the
simulators, with their faults, checked by the rig (hil/runner.py). They run a few at a
time, each with its own broker, ports and agent; `python -m hil run-all` runs them all."""

from __future__ import annotations

import asyncio

import pytest

from hil.runner import run_all
from hil.scenario import all_scenarios, load_scenario

FAST = [p for p in all_scenarios() if load_scenario(p).fast]


def test_every_shipped_scenario_is_valid_and_the_fast_ones_cover_the_issue() -> None:
    names = {load_scenario(p).name for p in all_scenarios()}
    assert names >= {
        "outage",
        "power-cut",
        "disk-full",
        "flaky-devices",
        "garbage-input",
        "clock-step",
        "alarm-under-backlog",
        "power-loss",
        "power-loss-full",
        "internal-faults",
        "hostile-clients",
        "bad-config-push",
        "local-action",
    }
    assert len(FAST) >= 12
    soak = {load_scenario(p).name: load_scenario(p) for p in all_scenarios()}
    for name in ("power-loss-soak", "power-loss-full-soak"):  # run-all: 100 cuts per mode
        cuts = [f.count for f in soak[name].faults if f.action == "power_loss"]
        assert sum(cuts) >= 100 and not soak[name].fast


@pytest.mark.timeout(900)
def test_fast_scenarios_pass() -> None:
    # two at a time: each runs its own agent, broker, simulators and ingest; more than
    # that on two cores starves the simulators, and a late answer is a failed poll
    verdicts = asyncio.run(run_all(FAST, parallel=2))
    lines = [v.line() for v in verdicts]
    failures = {v.scenario: v.failures for v in verdicts if not v.passed}
    assert not failures, "\n".join(lines) + f"\n{failures}"
    for v in verdicts:
        assert v.lost == 0 and v.duplicates == 0 and v.produced > 0
    by_name = {v.scenario: v for v in verdicts}
    assert by_name["disk-full"].evicted > 0
    assert by_name["power-cut"].figures["power_cuts"] >= 20
    assert by_name["alarm-under-backlog"].alarm_latency_ms is not None
    for name in ("power-loss", "power-loss-full"):
        assert (by_name[name].cuts or 0) >= 20 and f"cuts={by_name[name].cuts}" in lines[
            [v.scenario for v in verdicts].index(name)
        ]
        assert by_name[name].figures["unsynced_pages_lost"] > 0
    assert by_name["outage"].first_delivery_s is not None
    bad_push = by_name["bad-config-push"]
    assert bad_push.rolled_back == 1 and "rolled_back=1" in bad_push.line()
    assert all("read_lost=" in line for line in lines)
    # a local rule started the underpass pump with the link down, its interlocks held a
    # flapping level to max_starts_per_hour (the simulator's own record of the coil
    # writes), and the platform got every action in order (hil/local_action.py)
    local = by_name["local-action"]
    assert local.action_latency_ms is not None and local.action_latency_ms <= 200
    assert local.starts == 3 and local.actions is not None and local.actions > 2 * 3
    assert local.line().endswith(
        f" action_latency_ms={local.action_latency_ms} actions={local.actions} starts=3"
    )
