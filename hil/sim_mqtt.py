"""Simulated sensors that publish JSON to an MQTT broker (the site broker the agent's
``mqtt`` driver reads), with a record of every message.

Each sensor publishes, `rate_hz` times a second, one QoS 1 message to
``sensors/<name>/air`` shaped like the demo's airboxes
(``{"ts": <epoch s>, "data": {"pm25": 12.3, "no2": 21.0}}``, values on a 0.1 grid that
wander over time), so the demo's point table (`cli.demo.demo_config_text` with a site
broker, names ``airbox-1``..``airbox-N``) reads them. With probability `garbage` a message
is garbage instead, of one of GARBAGE_KINDS, each of which the driver's JSON parser
rejects for both points:

- ``"not_json"``: random bytes (starting with 0xFF, so never valid JSON or UTF-8);
- ``"truncated_json"``: a valid message cut in the middle;
- ``"missing_field"``: ``{"ts": ..., "data": {}}``;
- ``"wrong_type"``: the values are strings ``"n/a"``.

`sent` records every message: its wall time, topic, payload, sensor, the values it
carries (None for garbage), the garbage kind, and whether the broker acknowledged it
(False: the publish failed, e.g. the broker was down; the message may or may not have
arrived). The sensors reconnect after a connection loss (every 0.5 s, bounded by the
run's duration).

    sensors = MqttSensors(broker.url, count=3, rate_hz=2.0, garbage=0.1)
    await sensors.start()  ...  await sensors.stop()        # or: await sensors.run(10.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import aiomqtt
import orjson

from common.mqtt_url import BrokerAddress
from common.redact import redact

__all__ = ["GARBAGE_KINDS", "GarbageKind", "MqttSensors", "SentMessage"]

GarbageKind = Literal["not_json", "truncated_json", "missing_field", "wrong_type"]
GARBAGE_KINDS: tuple[GarbageKind, ...] = get_args(GarbageKind)

#: quantity -> (base of sensor 0, step between sensors, random-walk step sd, min, max)
_QUANTITIES: dict[str, tuple[float, float, float, float, float]] = {
    "pm25": (9.0, 3.0, 0.4, 0.0, 500.0),
    "no2": (21.0, 2.0, 0.6, 0.0, 1000.0),
}

RECONNECT_S = 0.5
PUBLISH_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class SentMessage:
    time: float  # wall clock when it was published
    topic: str
    payload: bytes
    sensor: str
    #: quantity -> value carried ("pm25", "no2"); None for garbage
    values: dict[str, float] | None
    garbage: GarbageKind | None
    #: the broker acknowledged it (QoS 1 PUBACK, or sent at QoS 0)
    acked: bool


class MqttSensors:
    """`count` sensors named `names` (default ``airbox-1``..) publishing to `topic`
    (``{name}`` is replaced) at `rate_hz` each, garbage with probability `garbage`. See
    the module doc."""

    def __init__(
        self,
        broker_url: str,
        count: int = 3,
        rate_hz: float = 1.0,
        *,
        garbage: float = 0.0,
        kinds: Sequence[GarbageKind] = GARBAGE_KINDS,
        seed: int = 7,
        names: Sequence[str] | None = None,
        topic: str = "sensors/{name}/air",
        qos: int = 1,
        client_id: str | None = None,
        max_record: int = 1_000_000,
    ) -> None:
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if not 0.0 <= garbage <= 1.0:
            raise ValueError(f"garbage must be a probability within 0..1, got {garbage}")
        unknown = set(kinds) - set(GARBAGE_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be some of {GARBAGE_KINDS}, got {list(kinds)}")
        self.address = BrokerAddress.parse(broker_url)
        if self.address.tls:
            raise ValueError(f"{redact(broker_url)}: the simulated sensors speak plain MQTT only")
        if names is None:
            names = [f"airbox-{i}" for i in range(1, count + 1)]
        self.names: tuple[str, ...] = tuple(names)
        self.rate_hz = rate_hz
        #: probability that a message is garbage (may be changed while running)
        self.garbage = garbage
        self.kinds: tuple[GarbageKind, ...] = tuple(kinds)
        self.topic = topic
        self.qos = qos
        self.client_id = client_id or f"hil-sensors-{seed}"
        self.rng = random.Random(seed)
        self.sent: list[SentMessage] = []
        self.max_record = max_record
        #: messages by outcome: "valid", each garbage kind, "failed" (publish raised)
        self.counts: Counter[str] = Counter()
        #: connection attempts that failed or connections that were lost
        self.connection_errors = 0
        self._level = {
            (name, q): base + step * i
            for i, name in enumerate(self.names)
            for q, (base, step, _sd, _lo, _hi) in _QUANTITIES.items()
        }
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # -- running ---------------------------------------------------------------------

    async def start(self) -> None:
        """Runs in the background until stop()."""
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self.run(), name="hil-mqtt-sensors")

    async def stop(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, PUBLISH_TIMEOUT_S + 5.0)

    async def run(self, duration_s: float | None = None, rounds: int | None = None) -> None:
        """Publishes until `duration_s` passed, `rounds` rounds (one message per sensor
        each) were made, or stop() was called, whichever comes first."""
        loop = asyncio.get_running_loop()
        deadline = None if duration_s is None else loop.time() + duration_s
        period = 1.0 / self.rate_hz
        done = 0
        next_round = loop.time()

        def finished() -> bool:
            return (
                self._stop.is_set()
                or (rounds is not None and done >= rounds)
                or (deadline is not None and loop.time() >= deadline)
            )

        while not finished():
            try:
                async with aiomqtt.Client(
                    self.address.host,
                    self.address.port,
                    identifier=self.client_id,
                    username=self.address.username,
                    password=self.address.password,
                    timeout=PUBLISH_TIMEOUT_S,
                ) as client:
                    while not finished():
                        for name in self.names:
                            await self._publish(client, name)
                        done += 1
                        next_round = max(next_round + period, loop.time())
                        if await self._wait(next_round - loop.time(), deadline):
                            break
            except aiomqtt.MqttError:
                self.connection_errors += 1
                await self._wait(RECONNECT_S, deadline)

    async def _wait(self, seconds: float, deadline: float | None) -> bool:
        """Sleeps `seconds` (never past the deadline); True if stop() was called."""
        if deadline is not None:
            seconds = min(seconds, deadline - asyncio.get_running_loop().time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), timeout=max(0.0, seconds))
        return self._stop.is_set()

    async def _publish(self, client: aiomqtt.Client, name: str) -> None:
        topic = self.topic.format(name=name)
        payload, values, kind = self.message(name)
        now = time.time()
        acked = True
        try:
            await client.publish(topic, payload, qos=self.qos, timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError:
            acked = False
        self.counts["failed" if not acked else (kind or "valid")] += 1
        if len(self.sent) < self.max_record:
            self.sent.append(SentMessage(now, topic, payload, name, values, kind, acked))
        if not acked:
            raise aiomqtt.MqttError("publish failed")  # reconnect

    def message(self, name: str) -> tuple[bytes, dict[str, float] | None, GarbageKind | None]:
        """The next message of sensor `name`: (payload, values, garbage kind). The values
        move on even when the message is garbage."""
        values: dict[str, float] = {}
        for q, (_base, _step, sd, lo, hi) in _QUANTITIES.items():
            level = min(hi, max(lo, self._level[(name, q)] + self.rng.gauss(0.0, sd)))
            self._level[(name, q)] = level
            values[q] = round(level, 1)
        ts = round(time.time(), 3)
        body = orjson.dumps({"ts": ts, "data": values})
        if not (self.garbage > 0 and self.rng.random() < self.garbage):
            return body, values, None
        kind = self.rng.choice(self.kinds)
        if kind == "not_json":
            payload = b"\xff" + self.rng.randbytes(self.rng.randint(0, 31))
        elif kind == "truncated_json":
            payload = body[: self.rng.randrange(1, len(body) - 1)]
        elif kind == "missing_field":
            payload = orjson.dumps({"ts": ts, "data": {}})
        else:
            payload = orjson.dumps({"ts": ts, "data": {q: "n/a" for q in values}})
        return payload, None, kind
