"""The ``sim`` driver: simulated sensors with realistic waveforms.

Each point is base + sine + linear drift + gaussian noise + random level steps +
one-off spikes, quantised to the point's declared resolution. Everything is seeded
per device, so a run is reproducible. Devices can also be made to fail or to answer
slowly, to exercise health reporting and back-pressure. The demo, the tests and the
benchmark all read from this driver.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from decimal import Decimal

from drivers.base import BatchSink, DeviceSpec, Driver
from drivers.schedule import FixedRate, phase_for
from drivers.sim.settings import SimDeviceSettings, SimPointSettings
from native.batch import Batch

log = logging.getLogger("citygw.drivers.sim")

__all__ = ["SimDeviceSettings", "SimDriver", "SimPointSettings", "Waveform"]

_TWO_PI = 2.0 * math.pi


def _decimals(resolution: float) -> int:
    """Decimal places of a resolution as written (0.1 -> 1, 0.25 -> 2, 5 -> 0)."""
    exponent = Decimal(repr(resolution)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


class Waveform:
    """The generator of one point; `sample(t)` returns the reading at time t (s)."""

    __slots__ = ("_dec", "_level", "_phase", "_rng", "_t0", "s")

    def __init__(self, settings: SimPointSettings, rng: random.Random, t0: float) -> None:
        self.s = settings
        self._rng = rng
        self._t0 = t0
        self._phase = rng.random() * _TWO_PI
        self._level = 0.0
        self._dec = _decimals(settings.resolution) if settings.resolution else 0

    def sample(self, t: float) -> float:
        s, rng = self.s, self._rng
        v = s.base + s.drift * (t - self._t0) / 3600.0 + self._level
        if s.amplitude:
            v += s.amplitude * math.sin(_TWO_PI * t / s.period + self._phase)
        if s.noise:
            v += rng.gauss(0.0, s.noise)
        if s.step_probability and rng.random() < s.step_probability:
            self._level += s.step_size if rng.random() < 0.5 else -s.step_size
            v += self._level
        if s.spike_probability and rng.random() < s.spike_probability:
            v += s.spike_size
        if s.resolution:
            # round twice: to the step, then to its decimals, so 0.1 steps give 12.3,
            # not 12.299999999999999 (what a real device's register would show)
            v = round(round(v / s.resolution) * s.resolution, self._dec)
        return v


class SimDriver(Driver):
    name = "sim"
    device_model = SimDeviceSettings
    point_model = SimPointSettings

    async def run(self, sink: BatchSink) -> None:
        async with asyncio.TaskGroup() as tg:
            for device in self.devices:
                tg.create_task(self._poll_device(device, sink), name=f"sim:{device.name}")

    async def _poll_device(self, device: DeviceSpec, sink: BatchSink) -> None:
        settings = device.settings
        assert isinstance(settings, SimDeviceSettings)
        rng = random.Random(f"{settings.seed}:{device.name}")
        t0 = time.time()
        ids = [p.id for p in device.points]
        waves = []
        for p in device.points:
            assert isinstance(p.settings, SimPointSettings)
            waves.append(Waveform(p.settings, rng, t0))
        health = self._health[device.name]
        schedule = FixedRate(device.poll_s, phase_for(device.name, device.poll_s))
        while True:
            health.skipped_polls += await schedule.wait()
            if settings.latency:
                await asyncio.sleep(settings.latency)
            if settings.fail_probability and rng.random() < settings.fail_probability:
                health.failure("simulated timeout: device did not answer")
                continue
            now_ns = time.time_ns()
            t = now_ns / 1e9
            ts = now_ns // 1_000_000
            batch = Batch()
            for pid, wave in zip(ids, waves, strict=True):
                batch.append(pid, ts, wave.sample(t))
            if sink.push(batch):
                health.success(len(batch))
            else:
                health.skipped_polls += 1
