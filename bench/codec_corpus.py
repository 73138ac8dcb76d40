"""The codec benchmark's corpus: real sensor series shipped in a PyPI package, and seeded
synthetic city series. Every series is (name, timestamps in int64 ms, values as float64).

Real: ``vega_datasets`` (in the ``bench`` extra) ships two hourly air-temperature series
measured in 2010 (Seattle and San Francisco, degrees F at 0.1 resolution, 8759 and 8760
readings); their own times are used, read as UTC. The package's data files are read
directly, without importing it (that would import pandas).

Synthetic (random.Random seeded, so every run sees the same numbers), 12,000 readings:
  temperature  1 Hz, 0.01 degC, diurnal swing + weather drift + sensor noise (sd 0.015),
               timestamps jittered by 0..9 ms (a Modbus poll's response time)
  water_level  every 60 s on the minute, metres at 0.001: constant for long stretches,
               a 1 mm wobble now and then, and rare steps of 5..40 cm (a weir gate)
  pm25         every 10 s (0..49 ms jitter), ug/m3 at 0.1: a drifting baseline, noise of
               sd 1.5, and spikes of 30..300 lasting a few readings (a passing bus)
  traffic      vehicles counted per minute (integers), Poisson with a day/night rate
  noise_db     LAeq over 1 s at 0.1 dB: 45..80 dB, noisy, with loud events
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.util
import math
import random
from array import array
from pathlib import Path
from typing import TypeAlias

Series: TypeAlias = "tuple[str, array[int], array[float]]"

T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z in ms
N_SYNTHETIC = 12_000


def _vega_dir() -> Path | None:
    spec = importlib.util.find_spec("vega_datasets")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "_data"


def _ms(text: str) -> int:
    fmt = "%Y/%m/%d %H:%M:%S" if text.count(":") == 2 else "%Y/%m/%d %H:%M"
    t = dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC)
    return int(t.timestamp()) * 1000


def real_series() -> list[Series]:
    """The vega_datasets temperature series, or [] when the package is not installed."""
    folder = _vega_dir()
    if folder is None:
        return []
    out: list[Series] = []
    for name, file in (("seattle_temp", "seattle-temps.csv"), ("sf_temp", "sf-temps.csv")):
        ts: array[int] = array("q")
        vs: array[float] = array("d")
        with open(folder / file, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                ts.append(_ms(row["date"]))
                vs.append(float(row["temp"]))
        out.append((name, ts, vs))
    return out


def _temperature(rng: random.Random) -> Series:
    ts, vs = array("q"), array("d")
    drift = 0.0
    for i in range(N_SYNTHETIC):
        drift += rng.gauss(0, 0.002)
        true = 17.5 + 4.0 * math.sin(2 * math.pi * (i / 86_400.0 - 0.3)) + drift
        ts.append(T0 + i * 1000 + rng.randrange(10))
        vs.append(round(true + rng.gauss(0, 0.015), 2))
    return "temperature", ts, vs


def _water_level(rng: random.Random) -> Series:
    ts, vs = array("q"), array("d")
    level = 1.842
    wobble = 0.0
    for i in range(N_SYNTHETIC):
        r = rng.random()
        if r < 0.002:
            level += rng.choice((-1, 1)) * rng.uniform(0.05, 0.40)
        elif r < 0.05:
            wobble = rng.choice((-0.001, 0.0, 0.001))
        ts.append(T0 + i * 60_000)
        vs.append(round(level + wobble, 3))
    return "water_level", ts, vs


def _pm25(rng: random.Random) -> Series:
    ts, vs = array("q"), array("d")
    base = 12.0
    spike = 0
    height = 0.0
    for i in range(N_SYNTHETIC):
        base = min(60.0, max(3.0, base + rng.gauss(0, 0.05)))
        if spike == 0 and rng.random() < 0.004:
            spike, height = rng.randrange(2, 6), rng.uniform(30, 300)
        v = base + rng.gauss(0, 1.5)
        if spike:
            v += height * rng.uniform(0.5, 1.0)
            spike -= 1
        ts.append(T0 + i * 10_000 + rng.randrange(50))
        vs.append(round(max(0.0, v), 1))
    return "pm25", ts, vs


def _poisson(rng: random.Random, lam: float) -> int:
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def _traffic(rng: random.Random) -> Series:
    ts, vs = array("q"), array("d")
    for i in range(N_SYNTHETIC):
        hour = (i / 60.0) % 24
        rate = (
            2
            + 28 * math.exp(-(((hour - 8.5) / 1.5) ** 2))
            + 22 * math.exp(-(((hour - 17.5) / 2.0) ** 2))
        )
        ts.append(T0 + i * 60_000)
        vs.append(float(_poisson(rng, rate)))
    return "traffic", ts, vs


def _noise_db(rng: random.Random) -> Series:
    ts, vs = array("q"), array("d")
    event = 0
    loud = 0.0
    for i in range(N_SYNTHETIC):
        if event == 0 and rng.random() < 0.01:
            event, loud = rng.randrange(3, 30), rng.uniform(8, 25)
        v = 52 + 6 * math.sin(2 * math.pi * i / 86_400.0) + rng.gauss(0, 2.0)
        if event:
            v += loud
            event -= 1
        ts.append(T0 + i * 1000)
        vs.append(round(v, 1))
    return "noise_db", ts, vs


def synthetic_series(seed: int = 2024) -> list[Series]:
    rng = random.Random(seed)
    return [f(rng) for f in (_temperature, _water_level, _pm25, _traffic, _noise_db)]


def corpus() -> list[Series]:
    return real_series() + synthetic_series()
