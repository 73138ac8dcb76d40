"""The devices and readings of bench/uplink_bytes.py: seeded synthetic street-cabinet data.

A device is polled at a fixed rate from its `drivers.schedule.phase_for` phase (as the
agent's FixedRate schedule does); each poll's readings share one timestamp, the poll's due
time plus a response delay. A point's readings are integers at the sensor's resolution
(10**-k of the unit), made from a physical model, then turned into the float the driver
delivers: ``raw / 10**k``, the decimal, for Modbus registers with ``scale = 10**-k``
(drivers/scale.py `engineering`, checked here on every point's first poll) as for the
MQTT (JSON) points the sensor printed.

Models (shapes after bench/codec_corpus.py where one fits; times in s of UTC day):
  energy meter (20 registers): 3-phase voltage (0.1 V, 230 V + slow swing + walk + noise),
      currents (mA: cabinet load plus the street lighting circuit switching on at dusk,
      with noise), per-phase and total active power (1 W), reactive and apparent power,
      power factor (0.001), frequency (0.01 Hz, random walk around 50 Hz), import energy
      (0.01 kWh, the integral of the power), export energy (constant 0), THD of voltage and
      current (0.1 %), neutral current, internal temperature (0.1 degC)
  I/O module (coils, 0/1): lights-on and contactors (switch at dusk), a door that may open
      for a few minutes, breakers and supervision contacts (constant)
  environment: temperatures (0.1 degC: diurnal + drift + noise sd 0.05, the 0.1 step
      flickers), humidity (0.1 %RH), LAeq/LAFmax over 1 s (0.1 dB; noise_db's shape),
      water level (1 mm; water_level's shape: flat, 1 mm wobble, rare 5-40 cm steps),
      PM2.5/PM10 (0.1 ug/m3; pm25's shape: drifting baseline, noise sd 1.5, spikes),
      NO2 (1 ug/m3), CO2 (1 ppm)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from drivers.scale import engineering
from drivers.schedule import phase_for
from native import stages as st

#: 2024-06-01 20:45 UTC: the run crosses dusk, when street lighting switches on
T0_MS = 1_717_274_700_000
_DAY_S = 86_400.0
#: a register's scale as a config writes it (`scale = 0.1`), by decimals
_SCALE = {0: 1.0, 1: 0.1, 2: 0.01, 3: 0.001}

Gen = Callable[[np.random.Generator, np.ndarray, "DeviceState"], np.ndarray]


@dataclass
class DeviceState:
    """What the points of one device share (the load they all see)."""

    lights_on_s: float = 0.0  # time of day the lighting circuit switches on
    load_a: float = 0.0  # the cabinet's own load, A per phase
    lights_a: float = 0.0  # the lighting circuit's current, A per phase
    cache: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class PointDef:
    name: str
    unit: str
    k: int  # resolution 10**-k
    gen: Gen
    stages: tuple[st.StageSpec, ...] = ()  # the mixed cabinet's pipeline
    boolean: bool = False


@dataclass(frozen=True)
class Device:
    name: str
    driver: str  # "modbus" or "mqtt"
    period_s: float
    points: tuple[PointDef, ...]
    delay_ms: tuple[int, int] = (8, 45)  # response delay range (Modbus TCP/RTU gateway)


# -- point models -----------------------------------------------------------------------


def _walk(rng: np.random.Generator, n: int, sd_per_sqrt_s: float, dt: float) -> np.ndarray:
    return np.cumsum(rng.normal(0.0, sd_per_sqrt_s * math.sqrt(dt), n))


def _dt(t: np.ndarray) -> float:
    return float(t[1] - t[0]) if len(t) > 1 else 1.0


def _lights(t: np.ndarray, s: DeviceState) -> np.ndarray:
    return (t % _DAY_S >= s.lights_on_s).astype(float)


def _current(rng: np.random.Generator, t: np.ndarray, s: DeviceState, phase: int) -> np.ndarray:
    key = f"i{phase}"
    if key not in s.cache:
        base = s.load_a * rng.uniform(0.8, 1.2) + 0.05 * _walk(rng, len(t), 0.01, _dt(t))
        lit = s.lights_a * rng.uniform(0.85, 1.15) * _lights(t, s)
        level = base + lit  # noise: 4 mA + 0.1 % of the reading
        s.cache[key] = np.maximum(0.0, level + rng.normal(0, 1, len(t)) * (0.004 + 0.001 * level))
    return s.cache[key]


def _voltage(rng: np.random.Generator, t: np.ndarray, s: DeviceState, phase: int) -> np.ndarray:
    key = f"u{phase}"
    if key not in s.cache:
        if "u" not in s.cache:
            s.cache["u"] = (
                231.0 + 1.5 * np.sin(2 * np.pi * t / 3600.0) + _walk(rng, len(t), 0.02, _dt(t))
            )
        s.cache[key] = s.cache["u"] + rng.uniform(-1.5, 1.5) + rng.normal(0, 0.25, len(t))
    return s.cache[key]


def _true_pf(t: np.ndarray, s: DeviceState) -> np.ndarray:
    """The load's power factor (the LED lighting's is higher): smooth, the meter's noise
    comes from its voltage and current readings."""
    return 0.91 + 0.06 * _lights(t, s)


def _power(rng: np.random.Generator, t: np.ndarray, s: DeviceState, phase: int) -> np.ndarray:
    return _voltage(rng, t, s, phase) * _current(rng, t, s, phase) * _true_pf(t, s)


def _pf(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    return np.clip(_ptotal(rng, t, s) / np.maximum(_apparent(rng, t, s), 1.0), 0.0, 1.0)


def _ptotal(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    return sum(_power(rng, t, s, p) for p in (1, 2, 3))  # type: ignore[return-value]


def _apparent(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    return sum(_voltage(rng, t, s, p) * _current(rng, t, s, p) for p in (1, 2, 3))


def _reactive(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    pf = _true_pf(t, s)
    return _apparent(rng, t, s) * np.sqrt(1 - pf * pf)


def _energy(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    kwh = np.cumsum(_ptotal(rng, t, s)) * _dt(t) / 3_600_000.0
    return rng.uniform(1_000, 60_000) + kwh


def _temperature(base: float, swing: float, noise: float) -> Gen:
    def gen(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
        level = base + rng.uniform(-3, 3)
        diurnal = swing * np.sin(2 * np.pi * (t / _DAY_S - 0.375))
        return level + diurnal + _walk(rng, len(t), 0.002, _dt(t)) + rng.normal(0, noise, len(t))

    return gen


def _humidity(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    level = 62 + rng.uniform(-10, 10) - 12 * np.sin(2 * np.pi * (t / _DAY_S - 0.375))
    return np.clip(level + _walk(rng, len(t), 0.01, _dt(t)) + rng.normal(0, 0.3, len(t)), 0, 100)


def _laeq(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    """noise_db: 52 dB + a diurnal swing, sd 2 dB, loud events of 3..30 readings."""
    n = len(t)
    v = 52 + 6 * np.sin(2 * np.pi * t / _DAY_S) + rng.normal(0, 2.0, n)
    i = 0
    while i < n:
        if rng.random() < 0.01:
            length = int(rng.integers(3, 30))
            v[i : i + length] += rng.uniform(8, 25)
            i += length
        i += 1
    return v


def _lafmax(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    if "laeq" not in s.cache:
        s.cache["laeq"] = _laeq(rng, t, s)
    return s.cache["laeq"] + 4 + np.abs(rng.normal(0, 2.5, len(t)))


def _water_level(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    """water_level: flat for long stretches, a 1 mm wobble, rare steps of 5..40 cm."""
    n = len(t)
    out = np.empty(n)
    level, wobble = rng.uniform(0.5, 3.0), 0.0
    p_step, p_wobble = 0.002 * _dt(t) / 60, 0.05 * _dt(t) / 60
    for i in range(n):
        r = rng.random()
        if r < p_step:
            level += rng.choice((-1, 1)) * rng.uniform(0.05, 0.40)
        elif r < p_wobble:
            wobble = float(rng.choice((-0.001, 0.0, 0.001)))
        out[i] = level + wobble
    return out


def _pm25(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    """pm25: drifting baseline, noise sd 1.5, spikes of 30..300 over 2..5 readings."""
    if "pm" not in s.cache:
        n = len(t)
        base = np.clip(12 + _walk(rng, n, 0.05 / math.sqrt(10), _dt(t)), 3, 60)
        v = base + rng.normal(0, 1.5, n)
        i = 0
        while i < n:
            if rng.random() < 0.004:
                length = int(rng.integers(2, 6))
                v[i : i + length] += rng.uniform(30, 300) * rng.uniform(
                    0.5, 1.0, len(v[i : i + length])
                )
                i += length
            i += 1
        s.cache["pm"] = np.maximum(0.0, v)
    return s.cache["pm"]


def _pm10(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    return _pm25(rng, t, s) * 1.6 + np.abs(rng.normal(0, 1.0, len(t)))


def _level(base: float, walk: float, noise: float, spread: float = 0.2) -> Gen:
    """`base` (one point differs from the next by up to `spread` of it), a random walk
    of `walk` a square-root second, noise of sd `noise`."""

    def gen(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
        lvl = base * rng.uniform(1 - spread, 1 + spread)
        return np.maximum(
            0.0, lvl + _walk(rng, len(t), walk, _dt(t)) + rng.normal(0, noise, len(t))
        )

    return gen


def _const(value: float) -> Gen:
    return lambda rng, t, s: np.full(len(t), value)


def _lights_gen(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    return _lights(t, s)


def _door(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    out = np.zeros(len(t))
    if rng.random() < 0.3:  # a visit during the run: open for 2..10 minutes
        start = int(rng.integers(0, len(t)))
        out[start : start + int(rng.uniform(120, 600) / _dt(t))] = 1.0
    return out


def _phase(
    f: Callable[[np.random.Generator, np.ndarray, DeviceState, int], np.ndarray], p: int
) -> Gen:
    return lambda rng, t, s: f(rng, t, s, p)


def _neutral(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    i = [_current(rng, t, s, p) for p in (1, 2, 3)]
    return np.abs(i[0] - 0.5 * (i[1] + i[2])) * 0.8


def _thd_i(rng: np.random.Generator, t: np.ndarray, s: DeviceState) -> np.ndarray:
    return 5 + 6 * _lights(t, s) + rng.normal(0, 0.4, len(t))


def _sdt(dev: float, max_s: int = 900) -> tuple[st.StageSpec, ...]:
    return (st.SdtStage(deviation=dev, max_interval_ms=max_s * 1000),)


def _db(band: float, hb_s: int = 900) -> tuple[st.StageSpec, ...]:
    return (st.DeadbandStage(band=band, heartbeat_ms=hb_s * 1000),)


def _bool(name: str, gen: Gen) -> PointDef:
    return PointDef(name, "", 0, gen, _db(0.0), boolean=True)


ENERGY_METER: tuple[PointDef, ...] = (
    *(PointDef(f"voltage_l{p}", "V", 1, _phase(_voltage, p), _db(1.0, 300)) for p in (1, 2, 3)),
    *(PointDef(f"current_l{p}", "A", 3, _phase(_current, p), _sdt(0.1, 300)) for p in (1, 2, 3)),
    *(PointDef(f"power_l{p}", "W", 0, _phase(_power, p), _sdt(25.0, 300)) for p in (1, 2, 3)),
    PointDef("power_total", "W", 0, _ptotal, _sdt(50.0, 300)),
    PointDef("reactive_total", "var", 0, _reactive, _sdt(50.0, 300)),
    PointDef("apparent_total", "VA", 0, _apparent, _sdt(50.0, 300)),
    PointDef("power_factor", "", 3, _pf, _db(0.01)),
    PointDef("frequency", "Hz", 2, _level(50.0, 0.002, 0.004, spread=0.0), _db(0.05)),
    PointDef("energy_import", "kWh", 2, _energy, _db(0.1)),
    PointDef("energy_export", "kWh", 2, _const(0.0), _db(0.1)),
    PointDef("thd_voltage", "%", 1, _level(1.8, 0.001, 0.1), _db(0.5)),
    PointDef("thd_current", "%", 1, _thd_i, _db(1.0)),
    PointDef("current_n", "A", 3, _neutral, _sdt(0.2, 300)),
    PointDef("temperature_internal", "degC", 1, _temperature(36.0, 1.0, 0.04), _db(0.5)),
)

IO_MODULE: tuple[PointDef, ...] = (
    _bool("lights_on", _lights_gen),
    _bool("door_open", _door),
    *(_bool(f"breaker_{i}", _const(1.0)) for i in range(1, 13)),
    _bool("surge_ok", _const(1.0)),
    _bool("mains_ok", _const(1.0)),
    *(_bool(f"contactor_{i}", _lights_gen) for i in range(1, 5)),
)

TEMPERATURE = PointDef("temperature", "degC", 1, _temperature(17.0, 4.0, 0.05), _db(0.2))
HUMIDITY = PointDef("humidity", "%RH", 1, _humidity, _db(1.0))
LAEQ = PointDef("laeq", "dB", 1, _laeq, _sdt(1.0, 300))
LAFMAX = PointDef("lafmax", "dB", 1, _lafmax, _sdt(1.5, 300))
WATER = PointDef("water_level", "m", 3, _water_level, _sdt(0.005))
PM25 = PointDef("pm25", "ug/m3", 1, _pm25, _sdt(2.0))
PM10 = PointDef("pm10", "ug/m3", 1, _pm10, _sdt(3.0))
NO2 = PointDef("no2", "ug/m3", 0, _level(28.0, 0.02, 2.0), _sdt(4.0))
CO2 = PointDef("co2", "ppm", 0, _level(425.0, 0.05, 3.0), _sdt(10.0))


def _renamed(p: PointDef, name: str) -> PointDef:
    return PointDef(name, p.unit, p.k, p.gen, p.stages, p.boolean)


ENVIRONMENT: tuple[PointDef, ...] = (
    *(_renamed(TEMPERATURE, f"temperature_{i}") for i in range(1, 9)),
    *(_renamed(HUMIDITY, f"humidity_{i}") for i in range(1, 5)),
    LAEQ,
    LAFMAX,
    _renamed(WATER, "water_level_1"),
    _renamed(WATER, "water_level_2"),
    PM25,
    PM10,
    NO2,
    CO2,
)
assert len(ENERGY_METER) == len(IO_MODULE) == len(ENVIRONMENT) == 20


def polled_site(prefix: str, meters: int, io: int, env: int, period_s: float) -> list[Device]:
    """Modbus devices of 20 points each, all polled every `period_s`."""
    kinds = [("meter", ENERGY_METER, meters), ("io", IO_MODULE, io), ("env", ENVIRONMENT, env)]
    return [
        Device(f"{prefix}-{kind}-{i + 1}", "modbus", period_s, points)
        for kind, points, count in kinds
        for i in range(count)
    ]


def street_cabinet(prefix: str) -> list[Device]:
    """One street cabinet: a main and a lighting energy meter and the I/O module (1 s), a
    sound level meter (1 s), cabinet temperatures (10 s), a water level radar (10 s) and
    an air-quality sensor that publishes JSON over MQTT every 10 s."""
    io = tuple(p for p in IO_MODULE if not p.name.startswith(("breaker_1", "contactor")))
    return [
        Device(f"{prefix}-meter-main", "modbus", 1.0, ENERGY_METER),
        Device(f"{prefix}-meter-lighting", "modbus", 1.0, ENERGY_METER),
        Device(f"{prefix}-io", "modbus", 1.0, io[:8]),
        Device(f"{prefix}-sound", "modbus", 1.0, (LAEQ, LAFMAX)),
        Device(
            f"{prefix}-climate",
            "modbus",
            10.0,
            (
                _renamed(TEMPERATURE, "temperature_cabinet"),
                _renamed(TEMPERATURE, "temperature_ambient"),
                HUMIDITY,
            ),
        ),
        Device(f"{prefix}-level", "modbus", 10.0, (WATER,)),
        Device(f"{prefix}-air", "mqtt", 10.0, (PM25, PM10, NO2, CO2), delay_ms=(40, 400)),
    ]


# -- polls --------------------------------------------------------------------------------


@dataclass
class Poll:
    """One device poll: its readings, as the driver hands them to the agent."""

    device: int  # index in the site's device list
    ts_ms: int
    ids: list[int]
    values: list[float]  # as the driver delivers them (see the module docstring)


def polls(devices: list[Device], duration_s: int, seed: int) -> tuple[list[Poll], list[int]]:
    """Every poll of every device over `duration_s` from T0_MS, in timestamp order, and
    the first point id of each device (ids 1.. in device and point order)."""
    rng = np.random.default_rng(seed)
    out: list[Poll] = []
    first_ids: list[int] = []
    next_id = 1
    for d_idx, dev in enumerate(devices):
        first_ids.append(next_id)
        n = int(duration_s / dev.period_s)
        phase_s = phase_for(dev.name, dev.period_s)
        due_ms = T0_MS + np.round((phase_s + np.arange(n) * dev.period_s) * 1000).astype(np.int64)
        ts = due_ms + rng.integers(dev.delay_ms[0], dev.delay_ms[1], n)
        t_s = (ts - T0_MS) / 1000.0 + (T0_MS / 1000.0) % _DAY_S
        state = DeviceState(
            lights_on_s=75_600 + rng.uniform(-300, 900),  # 21:00 UTC, give or take
            load_a=rng.uniform(1.5, 6.0),
            lights_a=rng.uniform(8.0, 25.0),
        )
        raws: list[np.ndarray] = []
        for p in dev.points:
            true = p.gen(rng, t_s, state)
            raws.append(np.rint(true * 10**p.k).astype(np.int64))
        raw = np.stack(raws, axis=1)  # polls x points
        div = np.array([10.0**p.k for p in dev.points])
        values = raw / div
        for k, p in enumerate(dev.points):  # what the driver delivers, as it computes it
            assert engineering(_SCALE[p.k], 0.0, True)(int(raw[0, k])) == values[0, k]
        ids = list(range(next_id, next_id + len(dev.points)))
        next_id += len(dev.points)
        for j in range(n):
            out.append(Poll(d_idx, int(ts[j]), ids, values[j].tolist()))
    out.sort(key=lambda p: p.ts_ms)
    return out, first_ids
