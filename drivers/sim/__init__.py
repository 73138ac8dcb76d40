"""The ``sim`` driver: simulated sensors with realistic waveforms.

Each point is base + sine + linear drift + gaussian noise + random level steps +
one-off spikes, quantised to the point's declared resolution. Everything is seeded
per device, so a run is reproducible. Devices can also be made to fail or to answer
slowly, to exercise health reporting and back-pressure. The demo, the tests and the
benchmark all read from this driver. With ``replay = N`` a device samples N polls once and
replays them with fresh timestamps: a load generator that costs a few microseconds a
poll whatever its points, so a benchmark measures the agent and not the simulation.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from array import array
from collections.abc import Coroutine, Sequence
from decimal import Decimal
from typing import Any

from drivers.base import BatchSink, DeviceSpec, PerDeviceDriver, PointSpec
from drivers.schedule import FixedRate, phase_for
from drivers.sim.settings import SimDeviceSettings, SimPointSettings
from native.batch import ID_TYPECODE, QUALITY_TYPECODE, TS_TYPECODE, VALUE_TYPECODE, Batch

log = logging.getLogger("citygw.drivers.sim")

__all__ = ["SimDeviceSettings", "SimDriver", "SimPointSettings", "Waveform"]

_TWO_PI = 2.0 * math.pi


def _decimals(resolution: float) -> int:
    """Decimal places of a resolution as written (0.1 -> 1, 0.25 -> 2, 5 -> 0)."""
    exponent = Decimal(repr(resolution)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


class Waveform:
    """The generator of one point; `sample(t)` returns the reading at time t (s)."""

    __slots__ = (
        "_amp",
        "_base",
        "_dec",
        "_drift",
        "_level",
        "_noise",
        "_omega",
        "_phase",
        "_res",
        "_rng",
        "_spike",
        "_spike_p",
        "_step",
        "_step_p",
        "_t0",
    )

    def __init__(self, settings: SimPointSettings, rng: random.Random, t0: float) -> None:
        s = settings
        self._rng = rng
        self._t0 = t0
        self._base, self._amp, self._noise = s.base, s.amplitude, s.noise
        self._omega = _TWO_PI / s.period
        self._drift = s.drift / 3600.0
        self._step_p, self._step = s.step_probability, s.step_size
        self._spike_p, self._spike = s.spike_probability, s.spike_size
        self._res = s.resolution or 0.0
        self._dec = _decimals(s.resolution) if s.resolution else 0
        self._phase = rng.random() * _TWO_PI
        self._level = 0.0

    def set_level(self, value: float) -> None:
        """From now on the waveform is centred on `value` (drift restarts from here)."""
        self._base = value
        self._level = 0.0
        self._t0 = time.time()

    def sample(self, t: float) -> float:
        # runs once per reading: hence the flat attributes and the early-outs
        v = self._base + self._drift * (t - self._t0) + self._level
        if self._amp:
            v += self._amp * math.sin(self._omega * t + self._phase)
        rng = self._rng
        if self._noise:
            v += rng.gauss(0.0, self._noise)
        if self._step_p and rng.random() < self._step_p:
            step = self._step if rng.random() < 0.5 else -self._step
            self._level += step
            v += step  # v already holds the old level
        if self._spike_p and rng.random() < self._spike_p:
            v += self._spike
        if self._res:
            # round twice: to the step, then to its decimals, so 0.1 steps give 12.3,
            # not 12.299999999999999 (what a real device's register would show)
            v = round(round(v / self._res) * self._res, self._dec)
        return v


class SimDriver(PerDeviceDriver):
    name = "sim"
    device_model = SimDeviceSettings
    point_model = SimPointSettings

    def __init__(self, devices: Sequence[DeviceSpec]) -> None:
        self._waves: dict[int, Waveform] = {}  # point id -> its generator, once running
        self._replayed: set[int] = set()  # points of devices that replay (no writes)
        super().__init__(devices)

    async def write(self, point: PointSpec, value: float) -> float:
        """A simulated actuator: the point's level becomes `value` (noise and the
        other components go on around it), as a setpoint written to a controller."""
        if point.id in self._replayed:
            raise NotImplementedError(
                f"sim point {point.key!r} replays pre-sampled polls (replay > 0): no writes"
            )
        wave = self._waves.get(point.id)
        if wave is None:
            raise LookupError(f"sim point {point.key!r} is not being simulated (yet)")
        wave.set_level(value)
        return value

    def device_tasks(
        self, device: DeviceSpec, sink: BatchSink
    ) -> dict[str, Coroutine[Any, Any, None]]:
        return {f"sim:{device.name}": self._poll_device(device, sink)}

    def detach_device(self, name: str) -> None:
        device = next(d for d in self.devices if d.name == name)
        for p in device.points:
            self._waves.pop(p.id, None)
            self._replayed.discard(p.id)

    async def _poll_device(self, device: DeviceSpec, sink: BatchSink) -> None:
        settings = device.settings
        assert isinstance(settings, SimDeviceSettings)
        rng = random.Random(f"{settings.seed}:{device.name}")
        t0 = time.time()
        ids = array(ID_TYPECODE, [p.id for p in device.points])
        waves = []
        for p in device.points:
            assert isinstance(p.settings, SimPointSettings)
            waves.append(Waveform(p.settings, rng, t0))
        replay = [
            array(VALUE_TYPECODE, [w.sample(t0 + k * device.poll_s) for w in waves])
            for k in range(settings.replay)
        ]
        if replay:
            self._replayed.update(ids)
        else:
            self._waves.update(zip(ids, waves, strict=True))
        good = array(QUALITY_TYPECODE, bytes(len(ids)))
        health = self._health[device.name]
        schedule = FixedRate(device.poll_s, phase_for(device.name, device.poll_s))
        last_ms = 0
        polls = 0
        while True:
            health.skipped_polls += await schedule.wait()
            if settings.latency:
                await asyncio.sleep(settings.latency)
            if settings.fail_probability and rng.random() < settings.fail_probability:
                health.failure("simulated timeout: device did not answer")
                continue
            # A late tick followed by an on-time one can land in the same millisecond; a
            # simulated device, like a real one, never reports two readings at one time.
            # (A real clock step backwards, seconds or more, is passed through as it is.)
            now_ms = time.time_ns() // 1_000_000
            last_ms = last_ms + 1 if 0 <= last_ms - now_ms < 1000 else now_ms
            if replay:
                # copies of the columns (a pushed batch is the agent's), no per-point work
                stamps = array(TS_TYPECODE, [last_ms]) * len(ids)
                batch = Batch(ids[:], stamps, replay[polls % len(replay)][:], good[:])
                polls += 1
            else:
                batch = Batch.at(last_ms, ids, [w.sample(last_ms / 1e3) for w in waves])
            if sink.push(batch):
                health.success(len(batch))
            else:
                health.skipped_polls += 1
