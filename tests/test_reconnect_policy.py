"""The reconnect policy (common/reconnect.py) with a fake clock and a scripted probe:
when a wait is cut short and when not, the backoff, the classification of failed
connects, the TCP probe. (Against real brokers: tests/test_reconnect.py.)"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import ssl

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from common.reconnect import (
    ReconnectPolicy,
    ReconnectSettings,
    broker_absent,
    tcp_probe,
)
from tests.test_reconnect import MaxJitter

# -- the policy ----------------------------------------------------------------------------


class FakeTime:
    """A clock that `sleep` advances; records every sleep."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedProbe:
    """Answers from a script (the last answer repeats), noting when it was asked."""

    def __init__(self, clock: FakeTime, answers: list[bool]) -> None:
        self.clock = clock
        self.answers = answers
        self.asked: list[float] = []

    async def __call__(self) -> bool:
        self.asked.append(self.clock.now)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def refused() -> aiomqtt.MqttError:
    """What aiomqtt raises when nothing listens at the broker's port."""
    try:
        try:
            raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        except OSError as exc:
            raise aiomqtt.MqttError(str(exc)) from None
    except aiomqtt.MqttError as e:
        return e


def bad_password() -> MqttConnectError:
    return MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=134))


def policy(
    t: FakeTime,
    probe: ScriptedProbe | None,
    *,
    lo: float = 1.0,
    hi: float = 60.0,
    rng: random.Random | None = None,
) -> ReconnectPolicy:
    """probe_interval 5 s (probes 2.5..7.5 s apart), spread 10 s."""
    return ReconnectPolicy(
        ReconnectSettings(lo, hi, probe_interval=5.0, spread=10.0, stable_after=30.0),
        probe,
        name="test",
        rng=rng or random.Random(0),
        clock=t.clock,
        sleep=t.sleep,
    )


def grown(p: ReconnectPolicy, error: BaseException, attempts: int) -> float:
    """The wait after `attempts` failed attempts (the backoff's cap is 2**(attempts-1) lo)."""
    delay = 0.0
    for _ in range(attempts):
        delay = p.failed(error)
    return delay


def test_a_broker_seen_absent_then_back_cuts_the_wait_to_within_the_spread() -> None:
    t = FakeTime()
    probe = ScriptedProbe(t, [False, False, True])
    p = policy(t, probe, rng=MaxJitter())
    assert grown(p, refused(), 8) == 60.0
    asyncio.run(p.wait())
    assert probe.asked == [7.5, 15.0, 22.5] and p.shortcuts == 1
    assert t.now == 32.5  # back at 22.5 s, then the spread (10 s at most): not at 60 s


def test_an_attempt_refused_by_the_tcp_stack_counts_as_absent() -> None:
    """The attempt itself saw the port closed: the first probe that finds it open is
    the broker's return."""
    t = FakeTime()
    probe = ScriptedProbe(t, [True])
    p = policy(t, probe, rng=MaxJitter())
    assert grown(p, refused(), 7) == 60.0
    asyncio.run(p.wait())
    assert probe.asked == [7.5] and p.shortcuts == 1
    assert t.now == 17.5


@pytest.mark.parametrize(
    "error",
    [bad_password(), aiomqtt.MqttError("the broker closed the connection before its CONNACK")],
    ids=["refused-at-mqtt-level", "accepted-and-dropped"],
)
def test_a_present_broker_that_refuses_keeps_the_whole_backoff(error: BaseException) -> None:
    """The port is open all along: no absent-then-present change, no shortcut; and one
    probe per wait, right away (each costs the broker an accept)."""
    t = FakeTime()
    probe = ScriptedProbe(t, [True])
    p = policy(t, probe, rng=MaxJitter())
    assert grown(p, error, 7) == 60.0
    asyncio.run(p.wait())
    assert probe.asked == [0.0] and p.shortcuts == 0
    assert t.now == 60.0


def test_a_proxy_that_closed_for_a_broker_that_is_down_is_told_apart_at_once() -> None:
    """A connection closed before the CONNACK says nothing by itself: a TCP proxy (or load
    balancer) whose broker is down does that too. A probe right away finds nobody behind
    it, so a broker back a moment later is seen by the next probe, however soon it came
    back (found in the HIL outage scenario: a broker back before the first probe looked
    present all along, and the gateway slept out its whole backoff)."""
    t = FakeTime()
    probe = ScriptedProbe(t, [False, True])
    p = policy(t, probe, rng=MaxJitter())
    closed = aiomqtt.MqttError("the broker closed the connection before its CONNACK")
    assert grown(p, closed, 7) == 60.0
    asyncio.run(p.wait())
    assert probe.asked == [0.0, 7.5] and p.shortcuts == 1
    assert t.now == 17.5


def test_backoff_grows_and_a_lasting_session_resets_it() -> None:
    t = FakeTime()
    p = policy(t, None, lo=1.0, hi=60.0)
    first = p.failed(refused())
    assert 1.0 <= first <= 11.0  # backoff_min + a random part of the spread
    caps = [p.failed(refused()) for _ in range(10)]
    assert all(1.0 <= d <= min(60.0, 2.0**k) for k, d in enumerate(caps, start=1))
    assert p.attempt == 11
    p.failed(aiomqtt.MqttError("lost"), online_s=29.9)  # not long enough
    assert p.attempt == 12
    again = p.failed(aiomqtt.MqttError("lost"), online_s=30.0)
    assert p.attempt == 1 and 1.0 <= again <= 11.0
    # the spread of a first retry never exceeds backoff_max
    assert policy(t, None, lo=0.1, hi=0.5, rng=MaxJitter()).failed(refused()) == 0.6


def test_no_tight_loop_against_a_flapping_broker() -> None:
    """The worst case for the probe: every probe flips (absent, present, ...), every
    attempt is refused by the TCP stack. A wait still needs a probe interval (at least
    half of probe_interval) before it can be cut: attempts per second stay bounded."""
    t = FakeTime()
    probe = ScriptedProbe(t, [False, True] * 10_000)
    p = policy(t, probe, lo=0.01, hi=60.0)
    attempts = 0
    while t.now < 3600.0:
        p.failed(refused())
        attempts += 1
        asyncio.run(p.wait())
    assert attempts <= 3600.0 / 2.5 + 1, attempts
    assert len(probe.asked) <= 3600.0 / 2.5 + attempts


def test_without_a_probe_it_just_sleeps() -> None:
    t = FakeTime()
    p = policy(t, None, rng=MaxJitter())
    assert grown(p, refused(), 5) == 16.0
    asyncio.run(p.wait())
    assert t.sleeps == [16.0]


def test_broker_absent_reads_the_cause_of_a_failed_connect() -> None:
    assert broker_absent(refused())
    assert broker_absent(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert broker_absent(OSError(errno.EHOSTUNREACH, "No route to host"))
    assert not broker_absent(None)
    assert not broker_absent(bad_password())
    assert not broker_absent(aiomqtt.MqttError("Operation timed out"))
    assert not broker_absent(TimeoutError())  # a CONNACK that never came times out too
    assert not broker_absent(ssl.SSLError(1, "certificate verify failed"))
    assert not broker_absent(FileNotFoundError(errno.ENOENT, "ca.pem"))


def test_tcp_probe_tells_a_broker_from_a_closed_port_and_a_proxy_without_one() -> None:
    """A broker accepts and waits for the client to speak; a proxy or load balancer whose
    broker is down accepts and closes (or resets) at once: no broker there either."""

    async def scenario() -> tuple[bool, bool, bool, int]:
        accepted = 0
        held: list[asyncio.StreamWriter] = []

        def broker(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            held.append(w)  # waits for CONNECT

        def dead_proxy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.close()  # the upstream did not answer

        server = await asyncio.start_server(broker, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        up = await tcp_probe("127.0.0.1", port)()
        proxy = await asyncio.start_server(dead_proxy, "127.0.0.1", 0)
        behind_proxy = await tcp_probe("127.0.0.1", proxy.sockets[0].getsockname()[1])()
        for s in (server, proxy):
            s.close()
        for w in held:
            w.close()
        await server.wait_closed()
        down = await tcp_probe("127.0.0.1", port)()
        return up, behind_proxy, down, accepted

    up, behind_proxy, down, accepted = asyncio.run(scenario())
    assert (up, behind_proxy, down, accepted) == (True, False, False, 1)
