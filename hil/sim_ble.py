"""Simulated BLE tags: a replay file (the JSONL format `drivers.ble.source.ReplaySource`
plays, see `parse_record`) of BTHome v2 and Ruuvi RAWv2 adverts over a duration, with a
record of the measurements each advert encodes (a duration, or a number of adverts).

Every tag advertises every `interval_s` (its own phase, a little jitter). A valid advert
carries new values (a slow random walk) and the next packet id (BTHome object 0x00;
Ruuvi's measurement sequence), so the ``ble`` driver accepts each one once. Options:

- `garbage` (a probability): the advert is malformed instead; its `garbage` field is the
  DecodeError reason the citygw decoder gives it: BTHome ``"truncated"`` (last object cut),
  ``"unsupported_version"`` (device-info version 1), ``"unknown_object"`` (an object id
  not in the table, before the valid ones); Ruuvi ``"truncated"`` (fewer than 24 bytes),
  ``"unsupported_version"`` (data format 3). The file itself always stays loadable:
  a broken JSON line would stop the whole replay, not test the decoder.
- `duplicates` (a probability): a valid advert is sent again 50 ms later (a quarter
  interval if that is shorter), byte-identical (as tags repeat their adverts); the driver
  must drop the copy (``duplicate=True`` in the record).

`adverts` is the record: per advert its offset in the file `t`, address, format, rssi,
packet id, the measurements exactly as the decoder computes them (empty for garbage),
the garbage reason and the duplicate flag. The replay stamps adverts with the time it
emits them, so match records by order or packet id, not by time.

    tags = BleTagsSim(garbage=0.1, seed=3)
    tags.write(tmp / "adverts.jsonl", duration_s=60)     # or adverts=120
    record = write_replay(tmp / "adverts.jsonl", adverts=120, garbage=0.1)   # the same
"""

from __future__ import annotations

import math
import random
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import orjson

from drivers.ble.decoders.bthome_const import OBJECTS

__all__ = ["DEFAULT_TAGS", "BleTag", "BleTagsSim", "EncodedAdvert", "write_replay"]

#: an object id the BTHome table does not know (the parse stops there)
_UNKNOWN_OBJECT = next(i for i in range(0xFF, -1, -1) if i not in OBJECTS)
_BTHOME_KEY = "fcd2"
_RUUVI_KEY = str(0x0499)  # Ruuvi's company id
#: Ruuvi RAWv2: format, temperature, humidity, pressure, acceleration x/y/z, power info,
#: movement counter, measurement sequence, MAC (24 bytes, big-endian)
_RUUVI = struct.Struct(">BhHHhhhHBH6s")


@dataclass(frozen=True, slots=True)
class BleTag:
    name: str  # the advertised local name
    address: str  # "AA:BB:CC:DD:EE:FF"
    format: Literal["bthome", "ruuvi"]


#: the demo's two tags (cli.demo: kiosk-7-climate by address, bus-stop-12-ruuvi by name)
DEFAULT_TAGS: tuple[BleTag, ...] = (
    BleTag("ATC_A1B2C3", "A4:C1:38:A1:B2:C3", "bthome"),
    BleTag("Ruuvi 9A01", "C8:25:64:3E:9A:01", "ruuvi"),
)


@dataclass(frozen=True, slots=True)
class EncodedAdvert:
    t: float  # offset in the replay file, s
    address: str
    format: str
    rssi: int
    packet_id: int | None
    #: measurement name -> value, as the citygw decoder reads them; empty for garbage
    measurements: dict[str, float]
    #: the DecodeError reason a garbage advert gets, else None
    garbage: str | None = None
    #: a byte-identical repeat of the previous advert of this tag
    duplicate: bool = False
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class _TagState:
    temperature: float
    humidity: float
    pressure: float
    battery: float
    seq: int


class BleTagsSim:
    """See the module doc."""

    def __init__(
        self,
        tags: Sequence[BleTag] = DEFAULT_TAGS,
        *,
        interval_s: float = 1.0,
        garbage: float = 0.0,
        duplicates: float = 0.0,
        seed: int = 7,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        for p, what in ((garbage, "garbage"), (duplicates, "duplicates")):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{what} must be a probability within 0..1, got {p}")
        if not tags:
            raise ValueError("no tags")
        self.tags = tuple(tags)
        self.interval_s = interval_s
        self.garbage = garbage
        self.duplicates = duplicates
        self.seed = seed
        self.adverts: list[EncodedAdvert] = []

    @property
    def counts(self) -> Counter[str]:
        """Adverts by kind: "valid", "duplicate", "garbage:<reason>"."""
        c: Counter[str] = Counter()
        for a in self.adverts:
            c["duplicate" if a.duplicate else f"garbage:{a.garbage}" if a.garbage else "valid"] += 1
        return c

    def generate(
        self, duration_s: float | None = None, *, adverts: int | None = None
    ) -> list[EncodedAdvert]:
        """The adverts of `duration_s` seconds, or the first `adverts` adverts (repeats
        not counted), or both limits (replaces `adverts`), in time order."""
        if duration_s is None and adverts is None:
            raise ValueError("give duration_s, adverts or both")
        limit = math.inf if adverts is None else adverts
        end = math.inf if duration_s is None else duration_s
        rng = random.Random(self.seed)
        states = [
            _TagState(
                temperature=rng.uniform(8.0, 22.0),
                humidity=rng.uniform(45.0, 80.0),
                pressure=rng.uniform(990.0, 1030.0),
                battery=rng.uniform(80.0, 100.0),
                seq=rng.randrange(0, 200),
            )
            for _ in self.tags
        ]
        out: list[EncodedAdvert] = []
        n_tags = len(self.tags)
        rounds = math.ceil(min(end / self.interval_s, limit / n_tags) - 1e-9)
        made = 0
        for r in range(rounds):
            for i, (tag, st) in enumerate(zip(self.tags, states, strict=True)):
                t = (r + i / n_tags) * self.interval_s
                t = round(t + rng.uniform(0.0, 0.05 * self.interval_s), 6)
                if t >= end or made >= limit:
                    continue
                made += 1
                _walk(st, rng)
                rssi = rng.randint(-95, -50)
                garbage = rng.random() < self.garbage
                adv = (
                    self._bthome(tag, st, rssi, t, rng, garbage)
                    if tag.format == "bthome"
                    else self._ruuvi(tag, st, rssi, t, rng, garbage)
                )
                out.append(adv)
                if not garbage and self.duplicates > 0 and rng.random() < self.duplicates:
                    t2 = round(t + min(0.05, 0.25 * self.interval_s), 6)
                    if t2 < end:
                        out.append(
                            replace(adv, t=t2, duplicate=True, record={**adv.record, "t": t2})
                        )
        out.sort(key=lambda a: a.t)
        self.adverts = out
        return out

    def write(
        self, path: str | Path, duration_s: float | None = None, *, adverts: int | None = None
    ) -> Path:
        """Generates adverts as `generate` does and writes them as a replay file."""
        self.generate(duration_s, adverts=adverts)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for adv in self.adverts:
                f.write(orjson.dumps(adv.record) + b"\n")
        return path

    # -- encoders ----------------------------------------------------------------------

    @staticmethod
    def _record(
        tag: BleTag,
        t: float,
        rssi: int,
        service_data: dict[str, str] | None = None,
        manufacturer_data: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return {
            "t": t,
            "address": tag.address,
            "rssi": rssi,
            "name": tag.name,
            "service_data": service_data or {},
            "manufacturer_data": manufacturer_data or {},
        }

    def _bthome(
        self, tag: BleTag, st: _TagState, rssi: int, t: float, rng: random.Random, garbage: bool
    ) -> EncodedAdvert:
        st.seq = (st.seq + 1) % 256
        battery = round(st.battery)
        temp = round(st.temperature * 100)
        hum = round(st.humidity * 100)
        payload = (
            bytes([0x40, 0x00, st.seq, 0x01, battery, 0x02])
            + temp.to_bytes(2, "little", signed=True)
            + bytes([0x03])
            + hum.to_bytes(2, "little")
        )
        measurements = {"battery": float(battery), "temperature": temp / 100, "humidity": hum / 100}
        reason: str | None = None
        if garbage:
            reason = rng.choice(("truncated", "unsupported_version", "unknown_object"))
            if reason == "truncated":
                payload = payload[:-1]  # inside the 2-byte humidity
            elif reason == "unsupported_version":
                payload = bytes([0x20]) + payload[1:]
            else:
                # first: the objects before an unknown id would be kept
                payload = payload[:1] + bytes([_UNKNOWN_OBJECT, 0x00]) + payload[1:]
            measurements = {}
        record = self._record(tag, t, rssi, service_data={_BTHOME_KEY: payload.hex()})
        return EncodedAdvert(
            t, tag.address, "bthome", rssi, st.seq, measurements, reason, False, record
        )

    def _ruuvi(
        self, tag: BleTag, st: _TagState, rssi: int, t: float, rng: random.Random, garbage: bool
    ) -> EncodedAdvert:
        st.seq = (st.seq + 1) % 0xFFFF  # 0xFFFF means "not available"
        temp = round(st.temperature / 0.005)
        hum = round(st.humidity / 0.0025)
        pres = round(st.pressure * 100) - 50000
        acc = [rng.randint(-40, 40), rng.randint(-40, 40), 1000 + rng.randint(-20, 20)]
        volt = round(st.battery * 12) + 1900 - 1600  # mV above 1600: 2.86..3.1 V
        tx = 12  # (12 * 2 - 40) = -16 dBm
        moves = st.seq % 200
        mac = bytes.fromhex(tag.address.replace(":", ""))
        payload = _RUUVI.pack(5, temp, hum, pres, *acc, (volt << 5) | tx, moves, st.seq, mac)
        measurements = {
            "temperature": temp * 5 / 1000,
            "humidity": hum * 25 / 10000,
            "pressure": (pres + 50000) / 100,
            "acceleration_x": float(acc[0]),
            "acceleration_y": float(acc[1]),
            "acceleration_z": float(acc[2]),
            "voltage": (volt + 1600) / 1000,
            "tx_power": float(tx * 2 - 40),
            "movement_counter": float(moves),
        }
        reason: str | None = None
        if garbage:
            reason = rng.choice(("truncated", "unsupported_version"))
            if reason == "truncated":
                payload = payload[: rng.randint(1, _RUUVI.size - 1)]
            else:
                payload = bytes([3]) + payload[1:]
            measurements = {}
        record = self._record(tag, t, rssi, manufacturer_data={_RUUVI_KEY: payload.hex()})
        return EncodedAdvert(
            t, tag.address, "ruuvi", rssi, st.seq, measurements, reason, False, record
        )


def _walk(st: _TagState, rng: random.Random) -> None:
    st.temperature = min(40.0, max(-20.0, st.temperature + rng.gauss(0.0, 0.05)))
    st.humidity = min(99.0, max(5.0, st.humidity + rng.gauss(0.0, 0.2)))
    st.pressure = min(1080.0, max(950.0, st.pressure + rng.gauss(0.0, 0.1)))
    st.battery = max(1.0, st.battery - 0.01)


def write_replay(
    path: str | Path,
    *,
    adverts: int | None = None,
    duration_s: float | None = None,
    garbage: float = 0.0,
    duplicates: float = 0.0,
    interval_s: float = 1.0,
    seed: int = 7,
    tags: Sequence[BleTag] = DEFAULT_TAGS,
) -> list[EncodedAdvert]:
    """Writes a replay file of the default tags (see BleTagsSim) and returns its record."""
    sim = BleTagsSim(tags, interval_s=interval_s, garbage=garbage, duplicates=duplicates, seed=seed)
    sim.write(path, duration_s, adverts=adverts)
    return sim.adverts
