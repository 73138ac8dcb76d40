"""The platform console under a city's data: a PostgreSQL store loaded through the real
ingest path, then the console's HTTP API timed over real HTTP.

Load (``--url``, default a ``console_bench`` schema; the schema is dropped and recreated).
At ``--scale 1``:

- 2,000 gateways (``gw-00001``...), each with a retained ``up/meta`` (`store_meta`): a
  site, a location spread over a city (lat/lon), 5 devices of 10 points = 50 points
  (100,000 in all) of kinds water (level m, flow l/s, rain mm...), noise (LAeq, LAmax,
  LA90 dB(A)), air (PM2.5, PM10, NO2 ug/m3, temperature, humidity), bridge (strain ue,
  tilt) and lights (dimming %, power W); a retained state (`store_state`: 94 % online,
  5 % offline since some hours, 1 % never reported one) and an ``up/stats``
  (`store_stats`: counters, a few with backlog, evictions or losses; device information
  and health, about one device in fifty failing); a tenth of the fleet on an older
  software version; one gateway in twenty with a device placed away from it;
- 30 days (``--days``) of 1-minute readings of 1,000 points: the 20 first gateways send
  one uplink a minute each with one poll of their 50 points (a block of 50 readings: the
  layout `reading_blocks` gets from such gateways);
- one day of 1 Hz readings of 10 points: the next gateway's first device (a bridge:
  strain, tilt) polled every second, flushed every 10 s (blocks of 100 readings);
- the last 10 minutes of every other online gateway, one uplink a minute (so the latest
  values that the console shows exist for the whole fleet);
- alarm uplinks giving 10,000 events: raises of 10,000 distinct (gateway, point, rule)
  keys spread over the month, 85 % cleared minutes to hours later, 15 % of the keys
  flapping (raised again once or twice: folded into their event, so still 10,000).

Every uplink goes through `store_batches` in the order of its time (alarm uplinks among
the readings), each gateway's seq consecutive over its uplinks like a buffer's, in groups
of up to ``--group`` (256: the ingest worker's largest group, i.e. a worker draining a
backlog), one store object (one ingest worker). The envelopes carry the decoded bodies the
worker hands to the store (`Batch`, `AlarmEvent` lists); their encoded bytes are left
empty, the store never reads them. The store's `roll_up` (the ten-minute rollup of the
series) is drained as the worker's roll-up task does (every second, 200 blocks a
call, until none is left), taking turns with the storing in this one thread (the worker
runs it concurrently on a connection of its own, so its load goes faster). Reported:
the time of each part, readings/s of the readings part (storing and rolling up; the
values are generated in the same thread with numpy, a small share) and the schema's size
on disk. Timestamps end at the load's start (minute-aligned); the
platform-side times (received_ms, last_seen) are the load's.

Measure (needs `citygw platform serve`): the script starts ``python -m cli platform serve
--db URL --listen 127.0.0.1:<free port> --config <tmp console.toml>`` (one operator API
token, ``[[tokens]]``, and seven vital signs: the defaults' kinds, the highest water level
and the share of noise points above 70 dB(A) over the fleet's latest values), waits for
it, then over HTTP (httpx2, bearer token), one request at a time, each figure after one
untimed warm-up request (its time is printed):

- ``GET /api/overview`` ``--requests`` times: p50, p99;
- ``GET /api/series`` of the last day of a 1 Hz point and of the month of a 1-minute
  point (width=1000), ``--series-requests`` times each (each range a minute earlier than
  the one before): p50, p99;
- ``POST /api/events/{id}/ack`` on ``--acks`` distinct raised events: p50, p99.

Every figure of the last line is a p99 over its requests, in ms (targets: overview
<= 200, series <= 150, ack <= 50):

    console: overview_p99_ms=<N> series_day_1hz_ms=<N> series_month_1min_ms=<N> event_ack_ms=<N>

``--load-only`` stops after the load; ``--no-load`` measures a schema loaded before (give
it the load's ``--scale`` and ``--days``: they say which gateways hold the series).
Bounded: the load is a fixed number of uplinks; every wait on the server has a deadline.
"""

from __future__ import annotations

import argparse
import math
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx2 as httpx  # noqa: E402
import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from central.console.auth import token_hash  # noqa: E402
from central.store import AlarmBody, Body, Store  # noqa: E402
from central.store_postgres import split_url  # noqa: E402
from central.stores import open_store  # noqa: E402
from central.worker import ROLL_UP_BLOCKS, ROLL_UP_EVERY_S  # noqa: E402
from common import wire  # noqa: E402
from common.wire import DeviceStatus, Envelope, GatewayStats, Meta, PointMeta  # noqa: E402
from native.batch import BAD, UNAVAILABLE, Batch  # noqa: E402
from native.stages import SEVERITIES, AlarmEvent  # noqa: E402

PG_URL: Final = "postgresql://postgres@127.0.0.1:5432/test?schema=console_bench"
MINUTE_MS: Final = 60_000
DAY_MS: Final = 86_400_000
DEVICES: Final = 5  # per gateway
POINTS_PER_DEVICE: Final = 10
POINTS: Final = DEVICES * POINTS_PER_DEVICE
HZ_POINTS: Final = 10  # the 1 Hz gateway's first device
HZ_FLUSH_S: Final = 10
RECENT_MINUTES: Final = 10
# as the ingest worker's roll-up task (central/worker.py, series branch)
# a city's extent (about 18 x 18 km): where the gateways stand
CITY_LAT: Final = (52.29, 52.45)
CITY_LON: Final = (4.76, 5.02)
DISTRICTS: Final = ("centrum", "noord", "oost", "zuid", "west", "nieuw-west", "zuidoost")

# name, unit, base, amplitude, shape, noise, resolution: one sensor series
Signal = tuple[str, str, float, float, str, float, float]
KINDS: Final[dict[str, tuple[Signal, ...]]] = {
    "water": (
        ("level", "m", 1.2, 0.6, "tide", 0.01, 0.001),
        ("flow", "l/s", 40.0, 15.0, "tide", 2.0, 0.1),
        ("rain", "mm", 0.0, 1.5, "rain", 0.0, 0.2),
        ("water_temp", "degC", 9.0, 1.5, "daily", 0.05, 0.1),
        ("battery", "V", 3.6, 0.05, "daily", 0.005, 0.01),
    ),
    "noise": (
        ("laeq", "dB(A)", 55.0, 9.0, "traffic", 1.5, 0.1),
        ("lamax", "dB(A)", 68.0, 10.0, "traffic", 3.0, 0.1),
        ("la90", "dB(A)", 45.0, 6.0, "traffic", 1.0, 0.1),
    ),
    "air": (
        ("pm25", "ug/m3", 11.0, 6.0, "traffic", 1.0, 0.1),
        ("pm10", "ug/m3", 19.0, 8.0, "traffic", 1.5, 0.1),
        ("no2", "ug/m3", 24.0, 12.0, "traffic", 2.0, 0.1),
        ("temperature", "degC", 8.0, 4.0, "daily", 0.1, 0.1),
        ("humidity", "%", 78.0, -12.0, "daily", 1.0, 0.1),
    ),
    "bridge": (
        ("strain", "ue", 120.0, 35.0, "traffic", 0.4, 0.01),
        ("tilt", "deg", 0.02, 0.01, "daily", 0.001, 0.0001),
        ("deck_temp", "degC", 7.0, 5.0, "daily", 0.1, 0.1),
    ),
    "lights": (
        ("dim", "%", 0.0, 80.0, "night", 0.0, 1.0),
        ("power", "W", 0.0, 95.0, "night", 1.0, 0.1),
    ),
}
KIND_NAMES: Final = tuple(KINDS)
# the rule an alarm on a point of this name would be raised by, and how likely each severity
RULES: Final = {"battery": "low", "humidity": "stale", "deck_temp": "stale", "water_temp": "stale"}
SEVERITY_P: Final = (0.3, 0.6, 0.1)  # of SEVERITIES (info, warning, critical)


# -- the fleet ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """What is loaded where: sizes from the scale, times from the load's start."""

    gateways: int
    minute_gateways: int  # gw 0 .. minute_gateways-1: 1-minute readings over `days`
    hz_gateway: int  # its first device at 1 Hz over the last day
    events: int
    days: int
    end_ms: int  # readings end here (minute-aligned, exclusive)

    @property
    def start_ms(self) -> int:
        return self.end_ms - self.days * DAY_MS

    @classmethod
    def of(cls, scale: float, days: int, end_ms: int) -> Layout:
        minute = max(1, round(20 * scale))
        return cls(
            gateways=max(minute + 1, round(2000 * scale)),
            minute_gateways=minute,
            hz_gateway=minute,
            events=max(10, round(10_000 * scale)),
            days=days,
            end_ms=end_ms,
        )


def gateway_id(index: int) -> str:
    return f"gw-{index + 1:05d}"


def stream_id(index: int) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"citygw-bench-console/{index}").hex


def device_kinds(index: int) -> list[str]:
    """The kinds of a gateway's devices (the 1 Hz gateway's first device is a bridge's)."""
    return [KIND_NAMES[(index * 3 + d) % len(KIND_NAMES)] for d in range(DEVICES)]


def point_signals(index: int, layout: Layout) -> list[tuple[str, str, Signal]]:
    """(device, point name, signal) of every point, in point id order (id = position + 1)."""
    kinds = device_kinds(index)
    if index == layout.hz_gateway:
        kinds[0] = "bridge"
    out = []
    for d, kind in enumerate(kinds):
        device = f"{kind}-{d + 1}"
        signals = KINDS[kind]
        for j in range(POINTS_PER_DEVICE):
            sig = signals[j % len(signals)]
            name = sig[0] if j < len(signals) else f"{sig[0]}_{j // len(signals) + 1}"
            out.append((device, name, sig))
    return out


def meta_of(index: int, layout: Layout, rng: np.random.Generator) -> Meta:
    points = tuple(
        PointMeta(
            id=i + 1,
            key=f"{device}/{name}",
            device=device,
            name=name,
            unit=sig[1],
            driver="ble" if device.startswith("air") else "modbus",
        )
        for i, (device, name, sig) in enumerate(point_signals(index, layout))
    )
    location = {
        "lat": round(float(rng.uniform(*CITY_LAT)), 6),
        "lon": round(float(rng.uniform(*CITY_LON)), 6),
    }
    site = f"{DISTRICTS[index % len(DISTRICTS)]}-{index // len(DISTRICTS) + 1:03d}"
    # a fleet mid-upgrade; one gateway in twenty has a device placed away from it
    software = "0.1.0" if index % 10 else "0.0.9"
    first = point_signals(index, layout)[0][0]
    locations = (
        {first: {"lat": location["lat"] + 0.002, "lon": location["lon"] - 0.003}}
        if index % 20 == 0
        else None
    )
    return Meta(
        gateway_id(index),
        stream_id(index),
        points,
        site=site,
        location=location,
        software=software,
        locations=locations,
    )


def stats_of(index: int, rng: np.random.Generator, now_ms: int, online: bool) -> GatewayStats:
    appended = int(rng.integers(10**6, 10**8))
    trouble = rng.random()
    backlog = int(rng.integers(1000, 200_000)) if not online or trouble < 0.03 else 0
    evicted = int(rng.integers(100, 50_000)) if trouble < 0.01 else 0
    devices = {
        f"{k}-{d + 1}": {"model": f"{k.upper()}-{100 + d}", "firmware": f"1.{index % 7}.{d}"}
        for d, k in enumerate(device_kinds(index))
    }
    # about one device in fifty failing, since some hours
    health = {
        name: DeviceStatus(True, now_ms - DAY_MS)
        if rng.random() >= 0.02
        else DeviceStatus(False, now_ms - int(rng.integers(60_000, DAY_MS)), "no response")
        for name in devices
    }
    return GatewayStats(
        gateway=gateway_id(index),
        ts=now_ms - int(rng.integers(0, 60_000)),
        appended_points=appended,
        evicted_points=evicted,
        evicted_messages=evicted // 50,
        backlog_points=backlog,
        backlog_messages=backlog // 50,
        lost_points=int(rng.integers(1, 500)) if trouble < 0.005 else 0,
        devices=devices,
        health=health,
    )


def values(sig: Signal, t_ms: np.ndarray, rng: np.random.Generator, phase: float) -> np.ndarray:
    """A quantised series of one sensor at the times `t_ms` (ms UTC)."""
    _, _, base, amp, shape, noise, res = sig
    hour = (t_ms % DAY_MS) / 3_600_000 + phase
    if shape == "tide":  # semidiurnal, 12.42 h
        y = np.sin(2 * math.pi * t_ms / (12.42 * 3_600_000) + phase)
    elif shape == "traffic":  # rush hours at 8 and 17
        y = np.exp(-(((hour - 8) / 1.5) ** 2)) + np.exp(-(((hour - 17) / 2.0) ** 2)) - 0.3
    elif shape == "night":  # on from 17 to 7
        y = ((hour % 24 >= 17) | (hour % 24 < 7)).astype(np.float64)
    elif shape == "rain":  # mostly dry, showers
        y = np.where(rng.random(len(t_ms)) < 0.02, rng.exponential(1.0, len(t_ms)), 0.0)
    else:  # daily, warmest at 14
        y = np.cos(2 * math.pi * (hour - 14) / 24)
    v = base + amp * y + rng.normal(0.0, noise, len(t_ms)) if noise else base + amp * y
    # to the resolution, then to its decimals (1.009, not 1.0090000000000001)
    return np.round(np.round(v / res) * res, max(0, -math.floor(math.log10(res))))


def block(ts: np.ndarray, ids: np.ndarray, vals: np.ndarray, rng: np.random.Generator) -> Batch:
    """A batch from flat columns; about 1 reading in 2,000 is bad or unavailable."""
    n = len(ts)
    quality = np.zeros(n, dtype=np.uint8)
    odd = rng.random(n) < 0.0005
    if odd.any():
        quality[odd] = np.where(rng.random(int(odd.sum())) < 0.5, BAD, UNAVAILABLE)
        vals = np.where(quality == UNAVAILABLE, np.nan, vals)
    return Batch(
        array("I", ids.astype(np.uint32).tobytes()),
        array("q", ts.astype(np.int64).tobytes()),
        array("d", vals.astype(np.float64).tobytes()),
        array("B", quality.tobytes()),
    )


# -- alarms ------------------------------------------------------------------------------------


def alarm_timeline(
    layout: Layout, rng: np.random.Generator
) -> dict[int, dict[int, list[AlarmEvent]]]:
    """minute (since the start) -> gateway index -> its alarm events of that minute (one
    uplink), in time order."""
    keys = rng.choice(layout.gateways * POINTS, size=layout.events, replace=False)
    out: dict[int, dict[int, list[AlarmEvent]]] = defaultdict(lambda: defaultdict(list))
    span = layout.end_ms - layout.start_ms
    signals = {i: point_signals(i, layout) for i in sorted({int(k) // POINTS for k in keys})}
    for key in keys:
        gw, pos = divmod(int(key), POINTS)
        _, name, sig = signals[gw][pos]
        rule = RULES.get(name.split("_")[0], "high")
        severity = SEVERITIES[int(rng.choice(len(SEVERITIES), p=SEVERITY_P))]
        base, amp = sig[2], sig[3]
        t = layout.start_ms + int(rng.integers(0, span - 2 * MINUTE_MS))
        cycles = 1 + (int(rng.integers(1, 3)) if rng.random() < 0.15 else 0)
        for c in range(cycles):
            value = math.nan if rule == "stale" else base + (2.5 if rule == "high" else -2.5) * amp
            since = t - int(rng.integers(0, 5 * MINUTE_MS))
            evs = [(t, AlarmEvent(pos + 1, rule, severity, True, t, value, since))]
            last = c == cycles - 1
            if not last or rng.random() < 0.85:
                clear = t + int(rng.exponential(40 * MINUTE_MS)) + 1000
                if clear >= layout.end_ms:
                    clear = layout.end_ms - 1
                evs.append((clear, AlarmEvent(pos + 1, rule, severity, False, clear, base, t)))
                t = clear + int(rng.exponential(20 * MINUTE_MS)) + 1000
            for ts, e in evs:
                if ts < layout.end_ms:
                    m = (ts - layout.start_ms) // MINUTE_MS
                    out[m][gw].append(e)
            if t >= layout.end_ms:
                break
    for per_gateway in out.values():
        for events in per_gateway.values():
            events.sort(key=lambda e: e.ts_ms)
    return out


# -- loading -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    setup_s: float = 0.0  # metas, states, stats
    uplinks_s: float = 0.0
    uplinks: int = 0
    readings: int = 0
    alarm_events: int = 0
    groups: int = 0
    store_s: float = 0.0  # of uplinks_s: inside store_batches
    roll_up_s: float = 0.0  # of uplinks_s: inside roll_up (the series' ten-minute rollup)
    rolled_up: int = 0  # blocks


class Loader:
    """Feeds a store as one ingest worker would: uplinks grouped, each gateway's seq in order."""

    def __init__(self, store: Store, layout: Layout, group: int, seed: int) -> None:
        self.store = store
        self.layout = layout
        self.group = group
        self.rng = np.random.default_rng(seed)
        self.seq = [0] * layout.gateways
        self.pending: list[tuple[str, Envelope, Body]] = []
        self.result = LoadResult()
        self.online: list[bool] = []
        self.roll_up = store.roll_up
        self.next_roll_up = 0.0

    def setup(self) -> None:
        """Metas, states and stats of every gateway, as the worker stores retained ones."""
        t0 = time.monotonic()
        now = self.layout.end_ms
        for i in range(self.layout.gateways):
            self.store.store_meta(gateway_id(i), meta_of(i, self.layout, self.rng))
            r = self.rng.random()
            online = r < 0.94 or i <= self.layout.hz_gateway  # the series' gateways are up
            self.online.append(online)
            if r < 0.99 or online:
                since = now - int(self.rng.integers(60_000, (30 if online else 2) * DAY_MS))
                self.store.store_state(gateway_id(i), online, since)
            self.store.store_stats(stats_of(i, self.rng, now, online))
        self.result.setup_s = time.monotonic() - t0

    def uplink(self, index: int, lane: int, body: Body) -> None:
        self.seq[index] += 1
        env = Envelope(lane, stream_id(index), self.seq[index], len(body), b"")
        self.pending.append((gateway_id(index), env, body))
        if isinstance(body, Batch):
            self.result.readings += len(body)
        else:
            self.result.alarm_events += len(body)
        if len(self.pending) >= self.group:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        t = time.monotonic()
        stored = self.store.store_batches(self.pending)
        self.result.store_s += time.monotonic() - t
        if not all(stored):
            raise RuntimeError("the store took an uplink of the load for a duplicate")
        self.result.uplinks += len(self.pending)
        self.result.groups += 1
        self.pending = []
        if time.monotonic() >= self.next_roll_up:
            self.drain_roll_up()

    def drain_roll_up(self) -> None:
        """What the worker's roll-up task does every ROLL_UP_EVERY_S: fold the stored
        blocks into the rollup, ROLL_UP_BLOCKS a call, until none is left (here it takes
        turns with the storing; the worker runs it on a connection of its own)."""
        t = time.monotonic()
        while True:
            n = self.roll_up(ROLL_UP_BLOCKS)
            self.result.rolled_up += n
            if n < ROLL_UP_BLOCKS:
                break
        self.next_roll_up = time.monotonic() + ROLL_UP_EVERY_S
        self.result.roll_up_s += self.next_roll_up - ROLL_UP_EVERY_S - t

    def run(self, progress: Callable[[str], None]) -> LoadResult:
        lay = self.layout
        self.setup()
        progress(f"setup: {lay.gateways} metas, states, stats in {self.result.setup_s:.1f} s")
        alarms = alarm_timeline(lay, self.rng)
        t0 = time.monotonic()
        ids = np.arange(1, POINTS + 1, dtype=np.int64)
        hz_ids = np.tile(np.arange(1, HZ_POINTS + 1, dtype=np.int64), HZ_FLUSH_S)
        phases = self.rng.uniform(-1.5, 1.5, (lay.gateways, POINTS))
        signals = {i: point_signals(i, lay) for i in range(lay.minute_gateways + 1)}
        # per device: its poll's delay after the minute (a device answers all its points)
        delays = self.rng.integers(0, 900, (lay.gateways, DEVICES)).repeat(POINTS_PER_DEVICE, 1)
        recent = [
            i
            for i in range(lay.minute_gateways, lay.gateways)
            if self.online[i] and i != lay.hz_gateway
        ]
        minutes_a_day = DAY_MS // MINUTE_MS
        for day in range(lay.days):
            day_ms = lay.start_ms + day * DAY_MS
            t_min = day_ms + np.arange(minutes_a_day, dtype=np.int64) * MINUTE_MS
            day_vals = {
                g: np.stack(
                    [
                        values(sig, t_min, self.rng, phases[g, p])
                        for p, (_, _, sig) in enumerate(signals[g])
                    ],
                    axis=1,
                )
                for g in range(lay.minute_gateways)
            }
            hz: tuple[np.ndarray, np.ndarray] | None = None
            if day == lay.days - 1:
                t_s = day_ms + np.arange(DAY_MS // 1000, dtype=np.int64) * 1000
                hz_sigs = signals[lay.hz_gateway][:HZ_POINTS]
                hz_vals = np.stack(
                    [
                        values(sig, t_s, self.rng, phases[lay.hz_gateway, p])
                        for p, (_, _, sig) in enumerate(hz_sigs)
                    ],
                    axis=1,
                )
                hz = t_s, hz_vals
            for m in range(minutes_a_day):
                minute = day * minutes_a_day + m
                for g in range(lay.minute_gateways):
                    ts = t_min[m] + delays[g]
                    self.uplink(g, wire.LANE_TELEMETRY, block(ts, ids, day_vals[g][m], self.rng))
                if hz is not None:
                    self.hz_minute(m, hz, hz_ids)
                if minute >= lay.days * minutes_a_day - RECENT_MINUTES:
                    self.recent_minute(int(t_min[m]), recent, signals, phases, delays, ids)
                for g, events in sorted(alarms.get(minute, {}).items()):
                    self.uplink(g, wire.LANE_ALARM, AlarmBody(events))
            progress(
                f"day {day + 1}/{lay.days}: {self.result.uplinks} uplinks, "
                f"{self.result.readings} readings, {time.monotonic() - t0:.0f} s"
            )
        self.flush()
        self.drain_roll_up()
        self.result.uplinks_s = time.monotonic() - t0
        return self.result

    def hz_minute(self, m: int, hz: tuple[np.ndarray, np.ndarray], hz_ids: np.ndarray) -> None:
        """The 1 Hz gateway's uplinks of minute `m` of the last day: one per 10 s flush."""
        t_s, vals = hz
        g = self.layout.hz_gateway
        for k in range(60 // HZ_FLUSH_S):
            rows = slice(m * 60 + k * HZ_FLUSH_S, m * 60 + (k + 1) * HZ_FLUSH_S)
            ts = np.repeat(t_s[rows], HZ_POINTS) + np.tile(np.arange(HZ_POINTS) * 3, HZ_FLUSH_S)
            self.uplink(g, wire.LANE_TELEMETRY, block(ts, hz_ids, vals[rows].reshape(-1), self.rng))

    def recent_minute(
        self,
        t_ms: int,
        gateways: list[int],
        signals: dict[int, list[tuple[str, str, Signal]]],
        phases: np.ndarray,
        delays: np.ndarray,
        ids: np.ndarray,
    ) -> None:
        """One poll of every point of the other online gateways (their latest values)."""
        t = np.array([t_ms], dtype=np.int64)
        for g in gateways:
            sigs = signals.get(g) or point_signals(g, self.layout)
            vals = np.array(
                [values(sig, t, self.rng, phases[g, p])[0] for p, (_, _, sig) in enumerate(sigs)]
            )
            self.uplink(g, wire.LANE_TELEMETRY, block(t_ms + delays[g], ids, vals, self.rng))


def schema_bytes(admin: psycopg.Connection[Any], schema: str) -> tuple[int, int]:
    """(everything in the schema, reading_blocks' partitions) on disk, indexes included."""
    row = admin.execute(
        "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0), "
        "COALESCE(sum(pg_total_relation_size(c.oid)) FILTER "
        "(WHERE c.relname LIKE 'reading\\_blocks%%'), 0) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'm')",
        (schema,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def load(url: str, layout: Layout, group: int, seed: int) -> LoadResult:
    conninfo, schema = split_url(url)
    with psycopg.connect(conninfo, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        store = open_store(url)
        try:
            result = Loader(store, layout, group, seed).run(lambda s: print(s, flush=True))
            counts = store.counts()
        finally:
            store.close()
        admin.execute(sql.SQL("VACUUM ANALYZE {}.reading_blocks").format(sql.Identifier(schema)))
        total, blocks = schema_bytes(admin, schema)
    r = result
    print(
        f"load: {r.uplinks} uplinks ({r.readings} readings, {r.alarm_events} alarm events) in "
        f"{r.groups} groups in {r.uplinks_s:.1f} s -> {r.readings / r.uplinks_s:.0f} readings/s, "
        f"{r.uplinks / r.uplinks_s:.0f} uplinks/s ({r.store_s:.1f} s of it in store_batches, "
        f"{r.roll_up_s:.1f} s in roll_up: {r.rolled_up} blocks); setup {r.setup_s:.1f} s",
        flush=True,
    )
    print(
        f"store: readings={counts.readings} batches={counts.batches} "
        f"duplicates_dropped={counts.duplicates_dropped} gateways={counts.gateways}; on disk "
        f"{total / 2**20:.0f} MiB ({blocks / 2**20:.0f} MiB reading_blocks, "
        f"{blocks / max(1, counts.readings):.2f} bytes a reading)",
        flush=True,
    )
    return result


# -- measuring ---------------------------------------------------------------------------------


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `samples` (ms)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def timed(
    client: httpx.Client, method: str, path: str, n: int, params: Iterator[dict[str, Any]] | None
) -> tuple[float, list[float]]:
    """(warm-up ms, n timed ms) of a request; each must answer 200."""
    out: list[float] = []
    for _ in range(n + 1):
        kw = next(params) if params is not None else {}
        t = time.perf_counter()
        resp = client.request(method, path, **kw)
        ms = (time.perf_counter() - t) * 1000
        if resp.status_code != 200:
            raise RuntimeError(f"{method} {path} {kw}: HTTP {resp.status_code} {resp.text[:200]}")
        out.append(ms)
    return out[0], out[1:]


def report(name: str, first: float, samples: list[float], target: float) -> float:
    p99 = pct(samples, 0.99)
    print(
        f"  {name}: n={len(samples)} p50={statistics.median(samples):.1f} ms "
        f"p99={p99:.1f} ms max={max(samples):.1f} ms (first, untimed: {first:.1f} ms; "
        f"target p99 <= {target:.0f} ms{'' if p99 <= target else ' MISSED'})",
        flush=True,
    )
    return p99


def measure(
    base_url: str, token: str, layout: Layout, requests: int, series_requests: int, acks: int
) -> dict[str, float]:
    """The console's figures over HTTP (p99 ms each); `layout` names what was loaded."""
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, float] = {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60.0) as client:
        first, ms = timed(client, "GET", "/api/overview", requests, None)
        out["overview_p99_ms"] = report("overview", first, ms, 200)

        series = (
            (
                "series_day_1hz_ms",
                gateway_id(layout.hz_gateway),
                point_signals(layout.hz_gateway, layout)[0],
                layout.end_ms - DAY_MS,
            ),
            ("series_month_1min_ms", gateway_id(0), point_signals(0, layout)[0], layout.start_ms),
        )
        for name, gw, (device, point, _), since in series:
            # each request's range a minute earlier than the last: no answer can be reused
            params = iter(
                {
                    "params": {
                        "gateway": gw,
                        "point": f"{device}/{point}",
                        "since": since - i * MINUTE_MS,
                        "until": layout.end_ms - i * MINUTE_MS,
                        "width": 1000,
                    }
                }
                for i in range(series_requests + 1)
            )
            first, ms = timed(client, "GET", "/api/series", series_requests, params)
            out[name] = report(f"{name} ({gw} {device}/{point})", first, ms, 150)

        resp = client.get("/api/events", params={"state": "raised", "limit": acks + 1})
        resp.raise_for_status()
        ids = [int(e["id"]) for e in resp.json()["events"]]
        if len(ids) < acks + 1:
            raise RuntimeError(f"only {len(ids)} raised events to acknowledge, {acks + 1} needed")
        acked: list[float] = []
        for event_id in ids[: acks + 1]:
            t = time.perf_counter()
            resp = client.post(f"/api/events/{event_id}/ack", json={})
            ms_one = (time.perf_counter() - t) * 1000
            if resp.status_code != 200:
                raise RuntimeError(f"ack: HTTP {resp.status_code} {resp.text[:200]}")
            acked.append(ms_one)
        out["event_ack_ms"] = report("event ack", acked[0], acked[1:], 50)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: the overview an operations centre would configure: the defaults' kinds, and two over
#: the latest values of the whole fleet's points (README, "The console")
VITALS: Final = """
[[vitals]]
id = "online"
name = "Gateways online"
kind = "online_share"
warn = 95
alarm = 80
direction = "low"

[[vitals]]
id = "alarms"
name = "Active alarms"
kind = "active_alarms"

[[vitals]]
id = "readings"
name = "Readings per minute"
kind = "readings_per_minute"
window = "5m"

[[vitals]]
id = "loss"
name = "Data loss and evictions"
kind = "data_loss"

[[vitals]]
id = "healthy"
name = "Devices healthy"
kind = "share_healthy"
warn = 95
alarm = 90
direction = "low"

[[vitals]]
id = "water"
name = "Highest water level"
kind = "max"
select = { points = "water-*/level" }
window = "10m"
unit = "m"
warn = 1.8
alarm = 2.2

[[vitals]]
id = "noise"
name = "Noise points above 70 dB(A) LAeq"
kind = "share_above"
select = { points = "noise-*/laeq" }
threshold = 70
window = "10m"
warn = 10
alarm = 25
"""


def serve_and_measure(url: str, layout: Layout, args: argparse.Namespace) -> dict[str, float]:
    """Start `citygw platform serve` on the store, measure it over HTTP, stop it."""
    token = secrets.token_urlsafe(32)
    work = Path(tempfile.mkdtemp(prefix="citygw-bench-console-"))
    config = work / "console.toml"
    config.write_text(
        f'[[tokens]]\nname = "bench"\nrole = "operator"\ntoken_hash = "{token_hash(token)}"\n'
        + VITALS
    )
    port = free_port()
    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "cli", "platform", "serve", "--db", url),
                *("--listen", f"127.0.0.1:{port}", "--config", str(config)),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"platform serve exited ({proc.returncode}); see {log}")
            try:
                if httpx.get(f"{base}/api/session", timeout=2.0).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"platform serve: no answer within 60 s; see {log}")
            time.sleep(0.2)
        print(f"measuring {base} (platform serve pid {proc.pid}, log {log})", flush=True)
        return measure(base, token, layout, args.requests, args.series_requests, args.acks)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def loaded_layout(url: str, scale: float, days: int) -> Layout:
    """The layout of a schema loaded before: its end from the newest 1-minute block."""
    conninfo, schema = split_url(url)
    with psycopg.connect(conninfo) as db:
        row = db.execute(
            sql.SQL("SELECT max(t_max) FROM {}.reading_blocks WHERE gateway = %s").format(
                sql.Identifier(schema)
            ),
            (gateway_id(0),),
        ).fetchone()
    if row is None or row[0] is None:
        raise RuntimeError(f"no 1-minute readings of {gateway_id(0)} in schema {schema!r}")
    return Layout.of(scale, days, int(row[0]) // MINUTE_MS * MINUTE_MS + MINUTE_MS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", default=PG_URL, help="PostgreSQL store URL (its schema is replaced)")
    ap.add_argument("--scale", type=float, default=1.0, help="sizes x this (0.01: a quick run)")
    ap.add_argument("--days", type=int, default=30, help="days of 1-minute readings")
    ap.add_argument("--group", type=int, default=256, help="uplinks a store_batches call")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--requests", type=int, default=200, help="overview requests")
    ap.add_argument("--series-requests", type=int, default=50, help="requests a series")
    ap.add_argument("--acks", type=int, default=100, help="events acknowledged")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--load-only", action="store_true", help="load, do not measure")
    mode.add_argument("--no-load", action="store_true", help="measure what is loaded")
    args = ap.parse_args()
    if not 0 < args.scale <= 10 or not 1 <= args.days <= 400:
        ap.error("--scale must be in (0, 10], --days in [1, 400]")
    if args.no_load:
        layout = loaded_layout(args.url, args.scale, args.days)
    else:
        layout = Layout.of(
            args.scale, args.days, time.time_ns() // 1_000_000 // MINUTE_MS * MINUTE_MS
        )
        print(
            f"loading {layout.gateways} gateways x {POINTS} points; 1-minute readings of "
            f"{layout.minute_gateways * POINTS} points over {layout.days} days, 1 Hz readings "
            f"of {HZ_POINTS} points over a day, {layout.events} alarm events' keys",
            flush=True,
        )
        load(args.url, layout, args.group, args.seed)
    if args.load_only:
        return
    fig = serve_and_measure(args.url, layout, args)
    print(
        f"console: overview_p99_ms={fig['overview_p99_ms']:.1f} "
        f"series_day_1hz_ms={fig['series_day_1hz_ms']:.1f} "
        f"series_month_1min_ms={fig['series_month_1min_ms']:.1f} "
        f"event_ack_ms={fig['event_ack_ms']:.1f}"
    )


if __name__ == "__main__":
    main()
