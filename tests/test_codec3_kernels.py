"""The compiled body codec of version 3 (native/_codec3.pyx) held to its pure-Python twin
(native/codec3_py.py): byte-identical bodies for the same columns; identical decoded
columns (values compared as bytes: NaN payloads, -0.0) and block modes; and on corrupt
input the same refusal (a ValueError with the same message, the same modes appended
before it) or the same decoded result, never anything else.

Inputs: deterministic synthetic series built here, covering every model and escape path
(seasons of 7, 12, 24, 96 and 1440 rows, class-1 values as more decimals and as
fractions; bench/codec.py checks the twins on the real corpus, whose packages the tests
do not install), random columns from hypothesis, truncated, bit-flipped and randomised
bodies, and bodies forged symbol by symbol to reach each refusal of the new flags."""

from __future__ import annotations

import calendar
import collections
import importlib
import itertools
import math
import random
import struct
from array import array
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from native import codec3_py as P
from native import impl
from native.codec_py import _put_varint, write_series_table

if impl.pure_python_forced():
    pytest.skip(
        "CITYGW_PURE_PYTHON is set: compiled kernels not under test", allow_module_level=True
    )
try:
    C: ModuleType = importlib.import_module("native._codec3")
except ImportError as exc:  # fail, never skip: an untested twin looks like a tested one
    raise RuntimeError(
        f"native._codec3 is not built ({exc}): run `python setup.py build_ext --inplace`"
    ) from None

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
PREFIX = bytes([7]) + b"gw-0042" + bytes([5])  # gateway "gw-0042", seq 5
T0 = 1_717_200_000_000  # 2024-06-01T00:00:00Z in ms
DAY = 86_400_000  # ms

Cols = tuple["array[int]", "array[int]", "array[float]", "array[int]"]


def f64(bits: int) -> float:
    value: float = struct.unpack("<d", struct.pack("<Q", bits))[0]
    return value


def cols(ids: list[int] | int, ts: list[int], vs: list[float], qs: list[int] | None = None) -> Cols:
    n = len(ts)
    id_list = [ids] * n if isinstance(ids, int) else ids
    return (
        array("I", id_list),
        array("q", ts),
        array("d", vs),
        array("B", qs if qs is not None else [0] * n),
    )


def outcome(mod: ModuleType, data: bytes, start: int, end: int) -> tuple[Any, ...]:
    """The decoded columns as bytes and the modes, or the refusal's message and the
    modes appended before it; anything but a ValueError fails the test."""
    modes: list[str] = []
    try:
        gw, seq, ids, ts, vs, qs = mod.decode_payload(data, start, end, modes)
    except ValueError as exc:
        return ("refused", str(exc), modes)
    assert (ids.typecode, ts.typecode, vs.typecode, qs.typecode) == ("I", "q", "d", "B")
    return ("ok", gw, seq, ids.tobytes(), ts.tobytes(), vs.tobytes(), qs.tobytes(), modes)


def same_decode(data: bytes, start: int = 0, end: int | None = None) -> tuple[Any, ...]:
    """Both decoders' outcome, asserted equal."""
    stop = len(data) if end is None else end
    got = outcome(C, data, start, stop)
    want = outcome(P, data, start, stop)
    assert got == want
    return got


def grouped(c: Cols) -> tuple[bytes, bytes, bytes, bytes]:
    """The columns as decode returns them: rows grouped by point id (stable)."""
    ids, ts, vs, qs = c
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return (
        array("I", [ids[i] for i in order]).tobytes(),
        array("q", [ts[i] for i in order]).tobytes(),
        array("d", [vs[i] for i in order]).tobytes(),
        array("B", [qs[i] for i in order]).tobytes(),
    )


def unit_of(c: Cols) -> int:
    """The timestamp unit the encoders pick (codec3_py._ts_unit, rows grouped)."""
    ids, ts, _, _ = c
    order = sorted(range(len(ids)), key=ids.__getitem__)
    g = 0
    for a, b in itertools.pairwise(order):
        if ids[a] == ids[b]:
            d = (ts[b] - ts[a]) & (2**64 - 1)
            d = d - 2**64 if d >> 63 else d
            g = math.gcd(g, abs(d))
    return g or 1


def twin(c: Cols, prefix: bytes = PREFIX) -> bytes:
    """Encodes with both (identical bytes), decodes with both (identical outcomes) and
    checks the round trip; returns the body."""
    body = C.encode_body(*c, prefix)
    assert body == P.encode_body(*c, prefix), "the encoders' bytes differ"
    got = same_decode(body)
    assert got[0] == "ok", got
    assert got[3:7] == grouped(c)
    return body


# -- synthetic series --------------------------------------------------------------------------


def months_ms(n: int, year: int = 1990) -> list[int]:
    """The first of n consecutive calendar months, midnight UTC, in ms."""
    out = []
    for i in range(n):
        y, m = divmod(i, 12)
        out.append(calendar.timegm((year + y, m + 1, 1, 0, 0, 0)) * 1000)
    return out


def hourly_temperature(rng: random.Random, n: int) -> Cols:
    ts = [T0 + 3_600_000 * i for i in range(n)]
    vs = [
        round(12 + 8 * math.sin(i * 2 * math.pi / 24) + rng.gauss(0, 0.3) + i / 500, 1)
        for i in range(n)
    ]
    return cols(3, ts, vs)


def monthly(rng: random.Random, n: int) -> Cols:
    vs = [round(rng.uniform(0, 250), 1) for _ in range(n)]
    return cols(7, months_ms(n), vs)


def with_nan_gaps(rng: random.Random, n: int) -> Cols:
    ts = [T0 + 604_800_000 * i for i in range(n)]
    vs: list[float] = []
    for i in range(n):
        gap = (i // 40) % 3 == 1 and i % 40 < 7
        vs.append(math.nan if gap else round(315 + i * 0.03 + rng.gauss(0, 0.4), 1))
    return cols(1, ts, vs)


def float32_valued(rng: random.Random, n: int) -> Cols:
    ts = [T0 + 1000 * i + rng.randrange(5) for i in range(n)]
    vs = [struct.unpack("<f", struct.pack("<f", 20 + rng.gauss(0, 2)))[0] for _ in range(n)]
    return cols(2, ts, vs)


def averages(rng: random.Random, n: int) -> Cols:
    """Sensor averages written with 13 significant digits (616.333333333333) among
    plain readings (721.25): values of 12 or 13 decimals, escapes of class 1."""
    ts = [T0 + 960_000 * i + rng.choice((-1000, 0, 0, 1000)) for i in range(n)]
    vs: list[float] = []
    for _ in range(n):
        base = rng.randrange(400, 900)
        r = rng.random()
        if r < 0.4:
            vs.append(float(base))
        elif r < 0.7:
            vs.append(base + rng.choice((0.25, 0.5, 0.75)))
        else:
            vs.append(float(f"{base + rng.randrange(1, 3) / 3:.12f}"))
    return cols(9, ts, vs)


def random_bits(rng: random.Random, n: int) -> Cols:
    ts = [rng.randrange(INT64_MIN, INT64_MAX + 1) for _ in range(n)]
    vs = [f64(rng.getrandbits(64)) for _ in range(n)]
    return cols(4, ts, vs)


def specials(rng: random.Random, n: int) -> Cols:
    """Decimals with -0.0, +-inf, NaN of several payloads, subnormals, huge values:
    escapes of classes 2 and 3, repeated and not."""
    pool = [
        -0.0,
        math.inf,
        -math.inf,
        math.nan,
        f64(0x7FF8000000000001),
        f64(0xFFF8DEADBEEF0000),
        f64(0x7FF0000000000001),  # signalling NaN
        5e-324,
        -2.2250738585072014e-308,
        1.7976931348623157e308,
        9007199254740993.0,
        0.1,
        1e300,
    ]
    ts = [T0 + 60_000 * i for i in range(n)]
    vs: list[float] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:
            vs.append(rng.choice(pool))
        elif r < 0.25 and vs:
            vs.append(vs[-1])
        else:
            vs.append(round(rng.uniform(-50, 50), 2))
    return cols(5, ts, vs)


def wild_timestamps(rng: random.Random, n: int) -> Cols:
    """Timestamps that go backwards, repeat and wrap around the int64 extremes."""
    ts: list[int] = []
    t = INT64_MAX - 5000
    for _ in range(n):
        step = rng.choice((1000, 1000, -3000, 0, 2**62, -(2**62), 7))
        t = ((t + step + 2**63) % 2**64) - 2**63
        ts.append(t)
    vs = [float(rng.randrange(-3, 4)) for _ in range(n)]
    return cols(6, ts, vs)


def many_points(rng: random.Random, n: int) -> Cols:
    """Many points with 1..3 readings each, rows not grouped, quality not GOOD."""
    ids: list[int] = []
    ts: list[int] = []
    vs: list[float] = []
    qs: list[int] = []
    pid = 0
    while len(ids) < n:
        pid += rng.choice((1, 1, 2, 50, 70_000))
        for j in range(rng.randint(1, 3)):
            ids.append(pid)
            ts.append(T0 + 60_000 * j + rng.randrange(50))
            vs.append(round(rng.uniform(0, 100), rng.randrange(4)))
            qs.append(rng.choice((0, 0, 0, 1, 2, 200)))
    order = list(range(len(ids)))
    rng.shuffle(order)
    return cols(
        [ids[i] for i in order],
        [ts[i] for i in order],
        [vs[i] for i in order],
        [qs[i] for i in order],
    )


def polled_grid(rng: random.Random, n: int) -> Cols:
    """Fixed-rate polls answered after a variable delay, the rate changing between
    blocks (grid blocks, with the previous period or a new one)."""
    ts: list[int] = []
    t = T0
    period = 10_000
    for i in range(n):
        if i % 200 == 150:
            period = rng.choice((10_000, 5_000, 30_000))
        t += period
        ts.append(t + rng.randrange(12))
    vs = [round(40 + 0.01 * i + rng.gauss(0, 0.5), 2) for i in range(n)]
    return cols(8, ts, vs)


def smooth_and_steps(rng: random.Random, n: int) -> Cols:
    """Smooth curves (second differences), long constant runs and steps: value blocks of
    every order and bucket jumps of many steps."""
    ts = [T0 + 60_000 * i for i in range(n)]
    vs: list[float] = []
    level = 1.0
    for i in range(n):
        if i % 300 < 100:
            vs.append(round(1000 * math.sin(i / 40), 3))
        elif i % 300 < 200:
            vs.append(level)
        else:
            if rng.random() < 0.05:
                level = rng.choice((1.0, 1e12, 123456.789, 0.001, -7e15))
            vs.append(level)
    return cols(11, ts, vs)


def daily_cycle(rng: random.Random, n: int, step: int, decimals: int, swing: float) -> list[float]:
    """A level drifting slowly under the same steep daily shape every day, plus noise:
    the change a day before predicts a row better than the change a row before."""
    per_day = DAY // step
    shape = [
        math.sin(2 * math.pi * q / per_day) + 0.6 * math.sin(6 * math.pi * q / per_day + 1)
        for q in range(per_day)
    ]
    level = 50.0
    out = []
    for i in range(n):
        level += rng.gauss(0, 0.01)
        out.append(round(level + swing * shape[i % per_day] + rng.gauss(0, 0.05), decimals))
    return out


def hourly_flow(rng: random.Random, n: int) -> Cols:
    """Hourly water flow at 0.01 with a daily cycle: seasons of 24 rows."""
    return cols(12, [T0 + 3_600_000 * i for i in range(n)], daily_cycle(rng, n, 3_600_000, 2, 30))


def quarter_hourly_load(rng: random.Random, n: int) -> Cols:
    """A building's load every 15 minutes at 0.1 with a daily cycle (seasons of 96 rows)
    and a few missing readings (NaN: escapes in seasonal blocks, lookbacks not finite)."""
    vs = daily_cycle(rng, n, 900_000, 1, 25)
    for i in range(n):
        if i % 170 in (100, 101, 133):
            vs[i] = math.nan
    return cols(13, [T0 + 900_000 * i for i in range(n)], vs)


def minutely_schedule(rng: random.Random, n: int) -> Cols:
    """A heater switched on and off by the same schedule every day, one reading a
    minute: a season of 1440 rows (only in a message of more than 1441 rows)."""
    plan = random.Random(99)
    schedule: list[int] = []
    on = 0
    while len(schedule) < 1440:
        schedule += [on] * plan.randrange(2, 25)
        on ^= 1
    vs = [18 + 6.5 * schedule[i % 1440] for i in range(n)]
    return cols(14, [T0 + 60_000 * i for i in range(n)], vs)


def daily_weekly(rng: random.Random, n: int) -> Cols:
    """Vehicles counted a day, with a weekly pattern: seasons of 7 rows."""
    week = [1200, 1350, 1320, 1300, 1400, 700, 450]
    vs = [float(week[i % 7] + rng.randrange(-20, 21)) for i in range(n)]
    return cols(15, [T0 + DAY * i for i in range(n)], vs)


def monthly_cycle(rng: random.Random, n: int) -> Cols:
    """Monthly mean temperatures at 0.1 with a yearly cycle: seasons of 12 rows."""
    vs = [
        round(11 + 9 * math.sin(2 * math.pi * (i % 12) / 12) + rng.gauss(0, 0.3), 1)
        for i in range(n)
    ]
    return cols(16, months_ms(n, 1900), vs)


def mean_of_readings(rng: random.Random, plain: bool, centre: float = 21.0) -> float:
    """The average of 2..17 readings at 0.1: a plain double (sum / count), or printed to
    15 significant digits (its digits to 15 figures, then parsed)."""
    d = rng.randint(2, 17)
    x = sum(round(rng.gauss(centre, 1.5), 1) for _ in range(d)) / d
    return x if plain else float(f"{x:.15g}")


def averages_15g(rng: random.Random, n: int) -> Cols:
    """Averages printed to 15 significant digits among single readings: class-1 rows
    as fractions N / (d * 10**k) (and as more decimals)."""
    ts = [T0 + 300_000 * i + rng.randrange(3) * 1000 for i in range(n)]
    vs = [
        round(rng.gauss(21, 1.5), 1) if rng.random() < 0.3 else mean_of_readings(rng, False)
        for _ in range(n)
    ]
    return cols(17, ts, vs)


def averages_plain(rng: random.Random, n: int) -> Cols:
    """Averages kept as plain doubles (sum / count) among single readings: fractions
    with adjustments of 0 or a few units in the last place."""
    vs = [
        round(rng.gauss(21, 1.5), 1) if rng.random() < 0.3 else mean_of_readings(rng, True)
        for _ in range(n)
    ]
    return cols(18, [T0 + 300_000 * i for i in range(n)], vs)


def hourly_averages(rng: random.Random, n: int) -> Cols:
    """Hourly averages of three readings (15 figures) under a daily cycle, with gaps:
    seasons, fractions and escapes in the same blocks."""
    vs: list[float] = []
    for i in range(n):
        if rng.random() < 0.03:
            vs.append(math.nan)
            continue
        base = 20 + 6 * math.sin(2 * math.pi * (i % 24) / 24)
        x = sum(round(base + rng.gauss(0, 0.2), 1) for _ in range(3)) / 3
        vs.append(float(f"{x:.15g}"))
    return cols(20, [T0 + 3_600_000 * i for i in range(n)], vs)


def many_points_averages(rng: random.Random, n: int) -> Cols:
    """Many points with 1..3 readings each, averages among them: most rows are a
    series' first (their own residual model, in both value modes)."""
    ids: list[int] = []
    ts: list[int] = []
    vs: list[float] = []
    pid = 0
    while len(ids) < n:
        pid += rng.choice((1, 1, 3))
        for j in range(rng.randint(1, 3)):
            ids.append(pid)
            ts.append(T0 + 900_000 * j)
            vs.append(mean_of_readings(rng, rng.random() < 0.5, rng.uniform(-40, 400)))
    return cols(ids, ts, vs)


def bucket_jumps(rng: random.Random, n: int) -> Cols:
    """Timestamps and value bits jumping between 0 and the extremes: the integer models'
    buckets move ~60 steps a row (over 6 bytes a reading: the coder's buffer grows)."""
    ts = [rng.choice((0, 1, INT64_MAX, INT64_MIN)) for _ in range(n)]
    vs = [f64(rng.choice((0, 1, 2**63, 2**64 - 1))) for _ in range(n)]
    return cols(21, ts, vs)


SYNTHETIC: dict[str, Callable[[random.Random, int], Cols]] = {
    "hourly_temperature": hourly_temperature,
    "monthly": monthly,
    "nan_gaps": with_nan_gaps,
    "float32": float32_valued,
    "averages": averages,
    "random_bits": random_bits,
    "specials": specials,
    "wild_timestamps": wild_timestamps,
    "many_points": many_points,
    "polled_grid": polled_grid,
    "smooth_and_steps": smooth_and_steps,
    "hourly_flow": hourly_flow,
    "quarter_hourly_load": quarter_hourly_load,
    "minutely_schedule": minutely_schedule,
    "daily_weekly": daily_weekly,
    "monthly_cycle": monthly_cycle,
    "averages_15g": averages_15g,
    "averages_plain": averages_plain,
    "hourly_averages": hourly_averages,
    "many_points_averages": many_points_averages,
    "bucket_jumps": bucket_jumps,
}


def slices(c: Cols, size: int) -> list[Cols]:
    n = len(c[0])
    return [
        (c[0][a : a + size], c[1][a : a + size], c[2][a : a + size], c[3][a : a + size])
        for a in range(0, n, size)
    ]


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_synthetic_series(name: str) -> None:
    whole = SYNTHETIC[name](random.Random(name), 1500)
    for size in (1500, 600, 60):
        for part in slices(whole, size):
            twin(part)


def flag_reads(body: bytes) -> collections.Counter[tuple[int, int]]:
    """(flag, bit) of every block flag codec3_py's decoder reads in the body."""
    seen: collections.Counter[tuple[int, int]] = collections.Counter()
    bit = P.RangeDecoder.bit

    def traced(rd: P.RangeDecoder, probs: list[int], i: int) -> int:
        b = bit(rd, probs, i)
        if len(probs) == P.N_FLAGS:  # the block flags (an IntModel has more)
            seen[i, b] += 1
        return b

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P.RangeDecoder, "bit", traced)
        P.decode_payload(body, 0, len(body))
    return seen


def test_block_modes_cover_every_path() -> None:
    """The synthetic series reach every value mode the decoders report, every season,
    and both forms of a class-1 value."""
    seen: set[str] = set()
    flags: collections.Counter[tuple[int, int]] = collections.Counter()
    for name, make in SYNTHETIC.items():
        whole = make(random.Random(name), 1500)
        for part in [whole, *slices(whole, 600)]:
            body = twin(part)
            modes: list[str] = []
            C.decode_payload(body, 0, len(body), modes)
            seen.update(m.split(" ", 2)[0] + (" order 2" if "order 2" in m else "") for m in modes)
            seen.update("esc" for m in modes if m.endswith(" esc"))
            seen.update(m.split("season ")[1].split(" ")[0] for m in modes if "season" in m)
            flags.update(flag_reads(body))
    assert {"decimal", "decimal order 2", "esc", "float32", "float64"} <= seen
    assert {"7", "12", "24", "96", "1440"} <= seen
    for flag in (P.F_FRACTION, P.F_SEASON):
        assert flags[flag, 0] and flags[flag, 1], (flag, flags)


def test_edge_sizes() -> None:
    rng = random.Random(5)
    for n in (0, 1, 2, 3, 127, 128, 129, 255, 256, 257):
        ts = [T0 + 1000 * i + rng.randrange(3) for i in range(n)]
        vs = [round(rng.gauss(20, 3), 1) for _ in range(n)]
        twin(cols(0, ts, vs))
        twin(cols(list(range(n)), ts, vs))
    assert C.encode_body(*cols(0, [], []), b"") == P.encode_body(*cols(0, [], []), b"")


def test_one_long_message() -> None:
    rng = random.Random(17)
    c = hourly_temperature(rng, 20_000)
    body = twin(c)
    assert len(body) < 20_000  # about half a byte a reading
    body = twin(bucket_jumps(rng, 6000))  # the coder's output buffer grows (a few times)
    assert len(body) > 30_000


def test_unit_of_two_to_the_63() -> None:
    """Every delta within a series is 2**63 mod 2**64: the unit 2**63, written and read."""
    c = cols([0, 0, 0, 1, 1], [INT64_MIN, 0, INT64_MIN, -1, INT64_MAX], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert unit_of(c) == 2**63
    body = twin(c)  # both decoders agree and give the columns back
    assert same_decode(body)[3:7] == grouped(c)


def test_bad_arguments() -> None:
    c = cols(0, [1, 2], [1.0, 2.0])
    for mod in (C, P):
        with pytest.raises(ValueError, match="columns differ in length"):
            mod.encode_body(c[0], c[1], array("d", [1.0]), c[3])
        with pytest.raises(ValueError, match="bad range"):
            mod.decode_payload(b"\x00\x00", 1, 3)
    big = P.MAX_READS + 1
    huge = (array("I", bytes(4 * big)), array("q", bytes(8 * big)), array("d", bytes(8 * big)))
    for mod in (C, P):
        with pytest.raises(ValueError, match="a message holds at most"):
            mod.encode_body(*huge, array("B", bytes(big)))


def test_decode_accepts_buffers_and_offsets() -> None:
    body = twin(hourly_temperature(random.Random(2), 300))
    framed = b"junk" + body + b"crc!"
    want = same_decode(body)
    assert same_decode(framed, 4, 4 + len(body)) == want
    assert outcome(C, bytearray(framed), 4, 4 + len(body)) == want
    assert outcome(C, memoryview(framed), 4, 4 + len(body)) == want


# -- random columns ----------------------------------------------------------------------------


def timestamps(draw: st.DrawFn, n: int) -> list[int]:
    regime = draw(st.sampled_from(["regular", "jitter", "random", "extremes", "months"]))
    if regime == "random":
        return draw(st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=n, max_size=n))
    if regime == "extremes":
        pool = st.sampled_from([INT64_MIN, INT64_MIN + 1, -1, 0, 1, INT64_MAX - 1, INT64_MAX])
        return draw(st.lists(pool, min_size=n, max_size=n))
    if regime == "months":
        return months_ms(n, draw(st.integers(1900, 2100)))
    start = draw(st.integers(-(2**62), 2**62))
    step = draw(st.sampled_from([1, 1000, 60_000, 900_000, 3_600_000, DAY, -1000, 0]))
    jitter = 0 if regime == "regular" else draw(st.integers(1, 50))
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    return [start + i * step + (rng.randrange(jitter) if jitter else 0) for i in range(n)]


def values(draw: st.DrawFn, n: int) -> list[float]:
    regime = draw(
        st.sampled_from(
            ["decimal", "bits", "special", "float32", "mixed", "floats", "average", "cycle"]
        )
    )
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    k = draw(st.integers(0, 15))
    scale = draw(st.sampled_from([1.0, 1e3, 1e9, 1e15]))
    period = draw(st.sampled_from([7, 12, 24, 96]))
    shape = [round(rng.uniform(-scale, scale), min(k, 3)) for _ in range(period)]
    out: list[float] = []
    for i in range(n):
        r = regime if regime != "mixed" else rng.choice(["decimal", "bits", "special", "average"])
        if r == "average":  # of 2..17 readings at k decimals, printed to 15 figures or not
            d = rng.randint(2, 17)
            x = sum(round(rng.uniform(-scale, scale), k) for _ in range(d)) / d
            out.append(x if rng.random() < 0.5 else float(f"{x:.15g}"))
        elif r == "cycle":  # the same shape every period, a step of noise now and then
            out.append(shape[i % period] + (rng.randrange(-2, 3) if rng.random() < 0.2 else 0))
        elif r == "decimal":
            out.append(round(rng.uniform(-scale, scale), rng.randrange(k + 1)))
        elif r == "bits":
            out.append(f64(rng.getrandbits(64)))
        elif r == "special":
            out.append(rng.choice([0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.5]))
        elif r == "float32":
            out.append(struct.unpack("<f", struct.pack("<f", rng.uniform(-scale, scale)))[0])
        else:
            out.append(draw(st.floats(allow_nan=True, allow_infinity=True)))
    return out


@st.composite
def columns(draw: st.DrawFn) -> Cols:
    n = draw(st.integers(0, 300))
    npoints = draw(st.sampled_from([1, 2, 5, 1000]))
    ids = draw(st.lists(st.integers(0, npoints - 1), min_size=n, max_size=n))
    if draw(st.booleans()):
        ids.sort()
    ts = timestamps(draw, n)
    vs = values(draw, n)
    qs = draw(st.one_of(st.just([0] * n), st.lists(st.integers(0, 255), min_size=n, max_size=n)))
    return cols(ids, ts, vs, qs)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(columns())
def test_random_columns(c: Cols) -> None:
    twin(c)


@st.composite
def seasonal_columns(draw: st.DrawFn) -> Cols:
    """One or two series at a rate with a season (15 minutes, an hour, a day, a month),
    long enough for it, values repeating a shape or averages: seasonal candidates and
    fractions in most blocks."""
    step = draw(st.sampled_from([900_000, 3_600_000, DAY, 0]))  # 0: calendar months
    n = draw(st.integers(10, 260))
    split = draw(st.integers(0, n))
    ts = months_ms(n) if step == 0 else [T0 + step * i for i in range(n)]
    ids = [0] * split + [1] * (n - split)
    return cols(ids, ts[:split] + ts[: n - split], values(draw, n))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seasonal_columns())
def test_random_seasonal_columns(c: Cols) -> None:
    twin(c)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(columns(), st.binary(max_size=300))
def test_random_prefix(c: Cols, prefix: bytes) -> None:
    body = C.encode_body(*c, prefix)
    assert body == P.encode_body(*c, prefix)


# -- corrupt input -----------------------------------------------------------------------------


def corrupt_samples() -> list[bytes]:
    rng = random.Random(23)
    out = []
    for name in ("hourly_temperature", "specials", "many_points", "polled_grid", "averages"):
        out.append(C.encode_body(*SYNTHETIC[name](rng, 300), PREFIX))
    # seasons (F_SEASON, the season's model), fractions (F_FRACTION, divisors,
    # adjustments), a series' first values (their own model)
    for name in ("hourly_flow", "monthly_cycle", "averages_plain", "hourly_averages"):
        out.append(C.encode_body(*SYNTHETIC[name](rng, 140), PREFIX))
    out.append(C.encode_body(*many_points_averages(rng, 60), PREFIX))
    out.append(C.encode_body(*float32_valued(rng, 150), PREFIX))
    out.append(C.encode_body(*random_bits(rng, 40), PREFIX))
    out.append(C.encode_body(*cols(0, [], []), PREFIX))
    return out


CORRUPT = corrupt_samples()


def test_every_truncation() -> None:
    for data in CORRUPT:
        for end in range(len(data)):
            same_decode(data, 0, end)


def test_bit_flips() -> None:
    rng = random.Random(29)
    for data in CORRUPT:
        for _ in range(300):
            m = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                m[rng.randrange(len(m))] ^= 1 << rng.randrange(8)
            same_decode(bytes(m))


def test_random_bytes_in_the_body() -> None:
    rng = random.Random(31)
    for data in CORRUPT:
        for _ in range(150):
            m = bytearray(data)
            a = rng.randrange(len(m))
            b = rng.randrange(a, min(len(m), a + 40) + 1)
            m[a:b] = bytes(rng.randrange(256) for _ in range(b - a))
            if rng.random() < 0.3:
                m += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
            same_decode(bytes(m))


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bodies(body: bytes) -> None:
    same_decode(PREFIX + body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORRUPT), st.integers(0, 2**32), st.integers(1, 8))
def test_random_corruptions(data: bytes, seed: int, edits: int) -> None:
    rng = random.Random(seed)
    m = bytearray(data)
    for _ in range(edits):
        op = rng.randrange(3)
        if op == 0 and len(m) > 1:
            del m[rng.randrange(len(m))]
        elif op == 1:
            m.insert(rng.randrange(len(m) + 1), rng.randrange(256))
        else:
            m[rng.randrange(len(m))] = rng.randrange(256)
    assume(bytes(m) != data)
    same_decode(bytes(m))


# -- forged bodies -----------------------------------------------------------------------------


class Forge:
    """A body written symbol by symbol with codec3_py's coder, in the order its decoder
    reads them: to reach refusals no encoder writes."""

    def __init__(self) -> None:
        self.rc = P.RangeEncoder()
        self.flags = [P._PROB_INIT] * P.N_FLAGS
        self.models: dict[str, P.IntModel] = collections.defaultdict(P.IntModel)
        self.prev_cls = 0  # the previous row's class: the context of the next one's

    def bit(self, flag: int, b: int) -> Forge:
        self.rc.bit(self.flags, flag, b)
        return self

    def int(self, model: str, u: int) -> Forge:
        self.models[model].put(self.rc, u)
        return self

    def raw(self, v: int, n: int) -> Forge:
        self.rc.put_raw(v, n)
        return self

    def cls(self, cls: int) -> Forge:
        """A row's class (in a block with escapes)."""
        ctx = P.F_CLASS + 3 * self.prev_cls
        self.prev_cls = cls
        return self.bit(ctx, cls >> 1).bit(ctx + 1 + (cls >> 1), cls & 1)

    def body(self, ids: list[int], unit: int) -> bytes:
        out = bytearray(PREFIX)
        starts = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
        write_series_table(out, array("I", ids), starts, len(ids), 0)
        _put_varint(out, unit)
        coded, raw = self.rc.finish()
        _put_varint(out, len(coded))
        return bytes(out + coded + raw)


def three_rows(k: int) -> Forge:
    """One series of three rows 1 s apart (unit 1000) up to its value block's season
    flag: a decimal block at k with first differences."""
    f = Forge().bit(P.F_TSMODE, 0).int("t0", 0).int("t1", P._zz(1)).int("t2", 0)
    return f.bit(P.F_VMODE, 0).bit(P.F_KNEW, 1).raw(k, 4).bit(P.F_ORDER2, 0)


def fraction_row(f: Forge, d: int, n: int, adj: int) -> Forge:
    """A row of class 1 as the fraction n / (d * 10**k) adjusted (prediction 0 in the
    first row of a series)."""
    f.cls(1).bit(P.F_FRACTION, 1)
    return f.int("xd", d - 2).int("xr", P._zz(n)).int("am", P._zz(adj))


def adj_to(v: float, d: int = 2, n: int = 0) -> int:
    """The adjustment that turns the fraction n / d (at k = 0) into v."""
    return P._ord64(P._bits(v)) - P._ord64(P._bits(n / d))


SPECIAL = "corrupt: a fraction adjusted to a special value"


@pytest.mark.parametrize(
    ("k", "d", "n", "adj", "error"),
    [
        (1, 18, 0, 0, "corrupt: a fraction of 18 * 10**1"),
        (2, 2**64 + 1, 0, 0, f"corrupt: a fraction of {2**64 + 1} * 10**2"),
        (15, 10, 0, 0, "corrupt: a fraction of 10 * 10**15"),
        (0, 3, 2**53, 0, "corrupt: a fraction's numerator out of range"),
        (0, 3, -(2**53), 0, "corrupt: a fraction's numerator out of range"),
        (1, 2, 0, adj_to(math.inf), SPECIAL),
        (1, 2, 0, adj_to(-math.inf), SPECIAL),
        (1, 2, 0, adj_to(math.nan), SPECIAL),
    ],
)
def test_forged_fraction_refused(k: int, d: int, n: int, adj: int, error: str) -> None:
    f = fraction_row(three_rows(k).bit(P.F_SEASON, 0).bit(P.F_ESC, 1), d, n, adj)
    body = f.body([0, 0, 0], 1000)
    assert same_decode(body) == ("refused", error, [f"decimal {k} esc"])


def test_forged_fractions_decoded() -> None:
    """Fractions no encoder writes (odd adjustments, subnormals, -0.0, the largest
    numerators and divisors, huge values) decode alike, and so do the rows they
    predict."""
    cases = [
        (0, 2, 1, 0),
        (0, 17, 2**53 - 1, 0),
        (1, 17, -(2**53) + 1, 12345),
        (3, 7, 22, -(2**40)),
        (15, 9, 5, 0),
        (2, 2, 0, -1),  # -0.0
        (2, 2, 0, 1),  # the least subnormal
        (2, 3, 1, adj_to(1e300, 300, 1)),  # s = floor(1e302): a multiple of 2**64
        (1, 5, -1, adj_to(-1.7976931348623157e307, 50, -1)),  # s near -2**1024
    ]
    for k, d, n, adj in cases:
        f = fraction_row(three_rows(k).bit(P.F_SEASON, 0).bit(P.F_ESC, 1), d, n, adj)
        f.cls(0).int("vm", P._zz(3)).cls(0).int("vm", P._zz(-2))
        got = same_decode(f.body([0, 0, 0], 1000))
        assert got[0] == "ok", (k, d, n, adj, got)


def test_forged_fraction_overflow() -> None:
    """A fraction adjusted to a finite value whose scaled s overflows: both refuse it."""
    f = three_rows(1).bit(P.F_SEASON, 0).bit(P.F_ESC, 1)
    body = fraction_row(f, 2, 0, adj_to(1.7976931348623157e308)).body([0, 0, 0], 1000)
    want = ("refused", "corrupt: a fraction adjusted out of range", ["decimal 1 esc"])
    assert outcome(C, body, 0, len(body)) == want
    same_decode(body)


@pytest.mark.parametrize("season", [1, 0, -5, P.MAX_READS + 1, 2**62])
def test_forged_season_refused(season: int) -> None:
    body = three_rows(2).bit(P.F_SEASON, 1).int("season", P._zz(season)).body([0, 0, 0], 1000)
    assert same_decode(body) == ("refused", f"corrupt: a season of {season} rows", [])


def test_forged_seasons_decoded() -> None:
    """Seasons no encoder writes (longer than the series, changing from block to block,
    looking back at NaN, inf and huge values) decode alike."""
    n = 300
    specials = [math.inf, math.nan, 1e300, -0.0, 5e-324]
    rng = random.Random(37)
    for seasons in ([2, 2, 3], [P.MAX_READS, 5, 2], [130, 2, 200], [7, 7, 7]):
        f = Forge()
        prev = 0
        for b, season in enumerate(seasons):
            rows = range(b * P.BLOCK, min(n, (b + 1) * P.BLOCK))
            f.bit(P.F_TSMODE, 0)  # rows 1 s apart: deltas of 1, delta-of-deltas of 0
            for i in rows:
                if i == 0:
                    f.int("t0", P._zz(T0))
                else:
                    f.int("t1" if i == 1 else "t2", P._zz(int(i == 1)))
            f.bit(P.F_VMODE, 0).bit(P.F_KNEW, int(b == 0))
            if b == 0:
                f.raw(2, 4)
            f.bit(P.F_ORDER2, 0).bit(P.F_SEASON, 1).int("season", P._zz(season - prev))
            prev = season
            f.bit(P.F_ESC, 1)
            for i in rows:
                cls = 3 if rng.random() < 0.08 else 2 if rng.random() < 0.05 else 0
                f.cls(cls)
                if cls == 3:
                    bits = P._bits(rng.choice(specials))
                    f.raw(bits & 0xFFFFFFFF, 32).raw(bits >> 32, 32)
                elif cls == 0:
                    f.int("v0" if i == 0 else "vm", P._zz(rng.randrange(-300, 300)))
        got = same_decode(f.body([0] * n, 1000))
        assert got[0] == "ok", (seasons, got)
        assert got[-1][0] == f"decimal 2 season {seasons[0]} esc"
