"""The codec benchmark's corpus: real measured series read from data files that PyPI
packages ship inside their wheels (nothing is downloaded at run time), and seeded
synthetic city series, reported apart. Every series is (name, timestamps in int64 ms,
values as float64). The data files are read directly (csv / text), without importing the
packages (that would import pandas and more).

Real (the ``bench`` extra installs the four packages):

  name            package (version), file: what it is; resolution; readings; timestamps
  seattle_temp    vega_datasets 0.9.0, _data/seattle-temps.csv: hourly air temperature,
                  Seattle 2010; degF at 0.1; 8759; the file's own times, read as UTC
  sf_temp         vega_datasets 0.9.0, _data/sf-temps.csv: the same for San Francisco;
                  8759
  co2_weekly      statsmodels 0.15.0, datasets/co2/co2.csv: weekly atmospheric CO2 at
                  Mauna Loa 1958-2001; ppm at 0.1; 2284 of which 59 are missing (NaN
                  gaps); the file's dates (YYYYMMDD, midnight UTC)
  sunspots_monthly statsmodels 0.15.0, datasets/sunspots/src/sunspots_monthly.dat:
                  monthly mean sunspot number 1749-01..2009-06 (a long low-resolution
                  record); 0.1; 3126; the first of each month, midnight UTC
  elnino_sst      statsmodels 0.15.0, datasets/elnino/elnino.csv: monthly sea surface
                  temperature of the Nino region 1950-2010; degC at 0.01 (written with
                  three decimals); 732; the first of each month, midnight UTC
  water_flow      river 0.26.1, datasets/water-flow.csv: hourly water flow through a
                  pipeline branch, 2022-03-20..05-16; l/s at 0.01; 1268 (a few hours
                  missing: gaps in time); the file's ISO times with their UTC offsets
  room_temp, room_humidity, room_light, room_co2
                  river 0.26.1, drift/datasets/occupancy.csv: the UCI "Occupancy
                  Detection" office sensors (temperature degC, relative humidity %,
                  light lux with lamps switching on and off, CO2 ppm), one reading every
                  ~16 minutes (959..961 s), 2015-02-04..10, averaged values with up to 13
                  significant digits; 509 each; the file's times, read as UTC
  house_kw, house_volts, kitchen_wh, heater_wh
                  EnergyData 0.0.2, data/householdpower.csv: the UCI "Individual
                  household electric power consumption" record (Sceaux, France), one
                  reading a minute; the first 28 days (2006-12-16 17:24 on, 40,320
                  readings each) of: global active power (kW at 0.001), voltage (V at
                  0.01, slowly varying), sub-metering 1 (kitchen: dishwasher, oven,
                  microwave; Wh a minute, integers, appliance on/off steps) and
                  sub-metering 3 (electric water heater and air conditioner, on/off
                  steps); the file's times, read as UTC

A package that is not installed drops its series (the benchmark says so).

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


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _ms(when: dt.datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return round(when.timestamp() * 1000)


def _vega(folder: Path) -> list[Series]:
    out: list[Series] = []
    for name, file in (("seattle_temp", "seattle-temps.csv"), ("sf_temp", "sf-temps.csv")):
        ts: array[int] = array("q")
        vs: array[float] = array("d")
        with open(folder / "_data" / file, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                text = row["date"]
                fmt = "%Y/%m/%d %H:%M:%S" if text.count(":") == 2 else "%Y/%m/%d %H:%M"
                ts.append(_ms(dt.datetime.strptime(text, fmt)))
                vs.append(float(row["temp"]))
        out.append((name, ts, vs))
    return out


def _month_ms(year: int, month: int) -> int:
    return _ms(dt.datetime(year, month, 1))


def _statsmodels(folder: Path) -> list[Series]:
    data = folder / "datasets"
    ts: array[int] = array("q")
    vs: array[float] = array("d")
    with open(data / "co2" / "co2.csv", newline="", encoding="utf-8") as f:
        for rec in csv.DictReader(f):
            ts.append(_ms(dt.datetime.strptime(rec["date"], "%Y%m%d")))
            vs.append(float(rec["co2"]) if rec["co2"].strip() else math.nan)
    out: list[Series] = [("co2_weekly", ts, vs)]
    ts, vs = array("q"), array("d")
    text = (data / "sunspots" / "src" / "sunspots_monthly.dat").read_text(encoding="utf-8")
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and len(parts[0]) == 4:
            year = int(parts[0])
            for month, v in enumerate(parts[1:13], start=1):
                ts.append(_month_ms(year, month))
                vs.append(float(v))
    out.append(("sunspots_monthly", ts, vs))
    ts, vs = array("q"), array("d")
    with open(data / "elnino" / "elnino.csv", newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            for month, v in enumerate(row[1:13], start=1):
                ts.append(_month_ms(int(float(row[0])), month))
                vs.append(float(v))
    out.append(("elnino_sst", ts, vs))
    return out


def _river(folder: Path) -> list[Series]:
    ts: array[int] = array("q")
    vs: array[float] = array("d")
    with open(folder / "datasets" / "water-flow.csv", newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        for when, flow in rows:
            ts.append(_ms(dt.datetime.fromisoformat(when)))
            vs.append(float(flow))
    out: list[Series] = [("water_flow", ts, vs)]
    cols: list[tuple[str, array[int], array[float]]] = [
        (name, array("q"), array("d"))
        for name in ("room_temp", "room_humidity", "room_light", "room_co2")
    ]
    with open(folder / "drift" / "datasets" / "occupancy.csv", newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        for row in rows:
            t = _ms(dt.datetime.fromisoformat(row[0]))
            for (_, cts, cvs), v in zip(cols, row[1:5], strict=True):
                cts.append(t)
                cvs.append(float(v))
    return out + cols


HOUSEHOLD_READINGS = 28 * 1440  # the first 28 days of the minute record


def _household(folder: Path) -> list[Series]:
    wanted = (("house_kw", 1), ("house_volts", 3), ("kitchen_wh", 5), ("heater_wh", 7))
    cols: list[tuple[str, array[int], array[float]]] = [
        (name, array("q"), array("d")) for name, _ in wanted
    ]
    with open(folder / "data" / "householdpower.csv", newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        next(rows)
        for i, row in enumerate(rows):
            if i == HOUSEHOLD_READINGS:
                break
            t = _ms(dt.datetime.strptime(row[0], "%Y-%m-%d %H:%M:%S"))
            for (_, cts, cvs), (_, k) in zip(cols, wanted, strict=True):
                cts.append(t)
                cvs.append(float(row[k]) if row[k] not in ("", "?") else math.nan)
    return list(cols)


_READERS = (
    ("vega_datasets", _vega),
    ("statsmodels", _statsmodels),
    ("river", _river),
    ("EnergyData", _household),
)


def real_series() -> tuple[list[Series], list[str]]:
    """The real series of the installed packages, and the names of those missing."""
    out: list[Series] = []
    missing: list[str] = []
    for package, read in _READERS:
        folder = _package_dir(package)
        if folder is None:
            missing.append(package)
        else:
            out += read(folder)
    return out, missing


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
    """Real and synthetic series together (the real ones first)."""
    return real_series()[0] + synthetic_series()
