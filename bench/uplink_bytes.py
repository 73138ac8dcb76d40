"""Bytes a gateway puts on the wire per reading taken from its devices: citygw against
Sparkplug B, the ThingsBoard IoT Gateway's JSON and JSON + zstd, for the same readings.

    pip install -e '.[bench]'          (zstandard, protobuf, numpy)
    python setup.py build_ext --inplace
    python bench/uplink_bytes.py

What is measured
----------------
Per configuration, the devices' polls are simulated (bench/uplink_sites.py: seeded
synthetic street-cabinet data; simulated time, no sleeping) and flushed the way the agent
flushes (agent/runtime.py `Agent._flush_sync`, alarms aside): every `flush` seconds the
polls that arrived since the last flush are cut into parts (`Batch.regroup`,
FLUSH_PART_ROWS), their timestamps checked (`impl.flag_timestamps`), run through the
agent's `native.pipeline.Pipeline` built from the points' stage specs (`last=` on the last
part), the output regrouped by `uplink.max_batch_points` (10,000, the default) and each
chunk encoded with `native.codec.encode(chunk, gateway=..., seq=...)` and wrapped in the
32-byte envelope (`common.wire.wrap`, telemetry lane), published on
``citygw/<gateway>/up/batch``. The same pipeline output (the readings that survive the
deadband/SDT stages, where a configuration has them: the other gateways would filter
too) is what the other senders send, flush by flush:

* Sparkplug B (Eclipse Sparkplug 3.0.0, chapter 6 payloads; schema: Eclipse Tahu's
  sparkplug_b.proto, built with protobuf dynamic descriptors in bench/sparkplug_b.py):
  one DDATA per device per flush on ``spBv1.0/<group>/DDATA/<edge node>/<device>``, a
  `Payload` with its timestamp and seq (both required) and one `Metric` per reading with
  its alias (the node's DBIRTH bound name to alias; names are not repeated), its
  timestamp (required in DDATA) and `double_value` (`boolean_value` for 0/1 points);
  no datatype (the spec: SHOULD NOT in DDATA), no quality property (every reading is
  good). The NBIRTH and DBIRTHs are reported separately, once per MQTT session.
* ThingsBoard IoT Gateway JSON, gateway MQTT API (https://thingsboard.io/docs/reference/
  gateway-mqtt-api/, "Telemetry upload API"): ``{"Device A": [{"ts": 1483228800000,
  "values": {"temperature": 42, ...}}, ...], "Device B": [...]}`` on
  ``v1/gateway/telemetry``, serialised compactly (orjson, as tb-mqtt-client does).
  "TB JSON" = one message per flush holding every device (the API allows it; the
  combined ratio uses this one, the cheapest for TB), cut between timestamp entries
  where it would pass the gateway's maxPayloadSizeBytes (8196, tb_gateway.json).
  "TB gateway as shipped" = what thingsboard-gateway (master, 2026) actually
  publishes: its storage reader sends what arrived within minPackSendDelayMS (50 ms),
  and `TBGatewayService.__send_data` calls `gw_send_telemetry(device, ...)` once per
  device, so one message per device poll.
  Device connects (``v1/gateway/connect``) are reported with the session overhead.
* JSON + zstd: the TB JSON document of each flush, zstd level 19, no dictionary, one
  message per flush on ``citygw/<gateway>/up/json``.

JSON values are the decimals a sensor's resolution gives (230.1, 12.25; integers for
1 W, 1 ppm; true/false for 0/1 points). citygw sends what its drivers deliver, the same
decimals: a Modbus register with ``scale = 0.1`` reads ``raw / 10`` (drivers/scale.py).
This benchmark found that the driver used to compute ``raw * scale``, 230.10000000000002
for 2301, which the codec must keep bit-exactly: a third of such values defeated its
decimal blocks and citygw sent 1.5-1.85x more bytes (6.59 B a reading at 200 points and
flush 1 s, where it now sends about 3.6).

On the wire
-----------
"B/reading": per message, the MQTT 3.1.1 PUBLISH at QoS 1 (fixed header byte, remaining
length, 2-byte topic length, topic, 2-byte packet id, payload) plus the broker's PUBACK
(4 bytes: a metered LTE link bills both directions), summed over the run and divided by
the readings polled from the devices (before any filtering). TB's client speaks MQTT 5
(one more byte per PUBLISH, properties length); counted as 3.1.1 here like the others.
"+TLS/TCP": also TLS 1.3 records (5-byte header + content type + 16-byte AEAD tag = 22
bytes per record of at most 16,384 bytes) and TCP/IPv4 headers (40 bytes per segment, no
TCP options, MSS 1400), with each PUBLISH and each PUBACK in its own records and
segments (no coalescing of messages sent back to back). Pure TCP ACKs are not counted
(assumed piggybacked on the PUBACK and on the next PUBLISH; with delayed ACKs a flush of
several segments costs up to 40 bytes per two segments more), nor the session's set-up
(TCP and TLS handshakes, CONNECT), PINGREQs, LTE/PDCP/IPsec framing.

Every citygw message is decoded back (`wire.unwrap`, `codec.decode`) and checked
bit-exact against the chunk it was made from; the share of its value blocks that are
not decimal (`codec.value_block_modes`) and the CPU time of `codec.encode` and of zstd-19 per
flush on this machine are printed under each table.

Output and summary
------------------
A table per configuration, the session overheads, then the summary line (MQTT-level
figures, birth and meta messages excluded)::

    uplink_bytes: bytes_per_reading_1s=<X> bytes_per_reading_10s=<X> vs_sparkplug=<X> vs_tb_json=<X>

bytes_per_reading_1s/_10s: citygw, 200 points polled every 1 s, flush every 1 s / 10 s.
vs_sparkplug, vs_tb_json: citygw bytes / the other's bytes, the geometric mean of the
per-configuration ratios over the four configurations (each configuration weighs the
same, whatever its reading rate); the pooled ratio (all bytes / all bytes) is printed
above it.

Where real data would change the figures: the values are synthetic (models in
bench/uplink_sites.py, seeded). Noisier sensors cost every sender more and citygw
relatively more (JSON pays per printed digit, Sparkplug a fixed 8-byte double whatever
the value); a site with more constant registers (status words, counters, setpoints)
costs citygw less. With deadband/SDT on, the figure depends on the bands chosen against
the sensors' real noise, which only a site's own history can tell. Timestamps are one per
device poll, its due time plus an 8-45 ms response delay (40-400 ms for the MQTT
sensor): citygw's codec orders rows by point and pays each reading's timestamp bits
(delay jitter included), where JSON + zstd names a poll's timestamp once for its 20
readings; polls stamped on the grid (or a driver with less jitter) cost citygw less,
one timestamp per register read (several requests per poll) more.
"""

from __future__ import annotations

import math
import struct
import sys
import time
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import orjson
    import zstandard
except ImportError:  # pragma: no cover - the bench extra is missing
    sys.exit("bench/uplink_bytes.py needs the bench extra: pip install -e '.[bench]'")

from agent.runtime import CLOCK_AHEAD_MAX_MS, CLOCK_VALID_FROM_MS, FLUSH_PART_ROWS
from bench import uplink_sites as sites
from bench.sparkplug_b import BOOLEAN, DOUBLE, UINT64, Payload
from common import wire
from native import codec, impl
from native.batch import ID_TYPECODE, QUALITY_TYPECODE, TS_TYPECODE, VALUE_TYPECODE, Batch
from native.pipeline import Pipeline

GATEWAY = "gw-0042"
GROUP = "city"  # Sparkplug group id
STREAM = "5f0c2a1e9b7d4c3a8e6f1d2b3c4a5e6f"
MAX_BATCH_POINTS = 10_000  # UplinkConfig.max_batch_points' default
#: a gateway that has flushed once a second for 30 days: the seq its messages carry
SEQ_START = 30 * 86_400
CITYGW_TOPIC = wire.topic(wire.DEFAULT_PREFIX, GATEWAY, wire.KIND_BATCH)
JSON_TOPIC = f"{wire.DEFAULT_PREFIX}/{GATEWAY}/up/json"
TB_TOPIC = "v1/gateway/telemetry"
TB_MAX_PAYLOAD = 8196  # tb_gateway.json maxPayloadSizeBytes: larger messages are split

PUBACK = 4
TLS_RECORD = 16_384
TLS_OVERHEAD = 22
MSS = 1400
TCPIP = 40


# -- framing --------------------------------------------------------------------------------


def publish_bytes(topic: str, payload: int) -> int:
    """An MQTT 3.1.1 PUBLISH, QoS 1."""
    rest = 2 + len(topic.encode()) + 2 + payload
    rl = 1
    while rest >= 128**rl:
        rl += 1
    return 1 + rl + rest


def tls_tcp(n: int) -> int:
    """`n` bytes of MQTT as TLS 1.3 records in TCP/IPv4 segments."""
    tls = n + TLS_OVERHEAD * max(1, math.ceil(n / TLS_RECORD))
    return tls + TCPIP * math.ceil(tls / MSS)


@dataclass
class Tally:
    """One sender's messages over a run."""

    messages: int = 0
    readings: int = 0
    payload: int = 0
    mqtt: int = 0  # PUBLISH + PUBACK
    wire: int = 0  # the same in TLS records and TCP/IP segments

    def add(self, topic: str, payload: int, readings: int) -> None:
        pub = publish_bytes(topic, payload)
        self.messages += 1
        self.readings += readings
        self.payload += payload
        self.mqtt += pub + PUBACK
        self.wire += tls_tcp(pub) + tls_tcp(PUBACK)


# -- the configurations -------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    title: str
    key: str
    devices: tuple[sites.Device, ...]
    flush_s: float
    duration_s: int
    seed: int
    staged: bool  # the points' deadband/SDT stages on
    summary: bool = True  # one of the four configurations the summary combines


_SITE_200 = tuple(sites.polled_site("cab0042", meters=8, io=1, env=1, period_s=1.0))
_SITE_1000 = tuple(sites.polled_site("dist07", meters=20, io=10, env=20, period_s=60.0))
_CABINET = tuple(sites.street_cabinet("cab0042"))

SETUPS = (
    Setup("200 points polled every 1 s, flush every 1 s", "1s", _SITE_200, 1.0, 1800, 11, False),
    Setup("200 points polled every 1 s, flush every 10 s", "10s", _SITE_200, 10.0, 1800, 11, False),
    Setup(
        "1,000 points polled every 60 s, flush every 1 s", "60s", _SITE_1000, 1.0, 3600, 12, False
    ),
    Setup(
        "street cabinet (58 points, 1 s/10 s polls), deadband + SDT, flush every 1 s",
        "cabinet",
        _CABINET,
        1.0,
        1800,
        13,
        True,
    ),
    Setup(
        "the same street cabinet, flush every 10 s (not in the summary)",
        "cabinet10",
        _CABINET,
        10.0,
        1800,
        13,
        True,
        summary=False,
    ),
)


# -- senders ------------------------------------------------------------------------------


@dataclass
class Points:
    """Point id -> (device index, device name, point definition)."""

    device: dict[int, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    defs: dict[int, sites.PointDef] = field(default_factory=dict)

    @classmethod
    def of(cls, devices: Iterable[sites.Device], first_ids: list[int]) -> Points:
        out = cls()
        for d, (dev, first) in enumerate(zip(devices, first_ids, strict=True)):
            out.names.append(dev.name)
            for i, p in enumerate(dev.points):
                out.device[first + i] = d
                out.defs[first + i] = p
        return out


def json_value(p: sites.PointDef, v: float) -> float | int | bool:
    if p.boolean:
        return v != 0.0
    return int(v) if p.k == 0 and math.isfinite(v) else v


class Senders:
    """Everyone but citygw, fed the readings citygw's pipeline let through, per flush."""

    def __init__(self, points: Points) -> None:
        self.points = points
        self.sparkplug = Tally()
        self.tb = Tally()
        self.tb_gw = Tally()
        self.zstd = Tally()
        self._spb_seq = 0
        self._zstd = zstandard.ZstdCompressor(level=19)
        self.zstd_s = 0.0

    def flush(self, chunks: list[Batch], now_ms: int) -> None:
        rows = [r for chunk in chunks for r in chunk.rows()]
        if not rows:
            return
        pts = self.points
        by_device: dict[int, list[tuple[int, int, float]]] = {}
        for pid, ts, value, _q in rows:
            by_device.setdefault(pts.device[pid], []).append((pid, ts, value))
        doc: dict[str, list[dict[str, object]]] = {}
        for d, readings in by_device.items():
            name = pts.names[d]
            # Sparkplug B: one DDATA per device
            payload = Payload(timestamp=now_ms, seq=self._spb_seq)
            self._spb_seq = (self._spb_seq + 1) % 256
            # TB: the device's readings grouped by timestamp
            per_ts: dict[int, dict[str, object]] = {}
            for pid, ts, value in readings:
                p = pts.defs[pid]
                m = payload.metrics.add()
                m.alias = pid
                m.timestamp = ts
                if p.boolean:
                    m.boolean_value = value != 0.0
                else:
                    m.double_value = value
                per_ts.setdefault(ts, {})[p.name] = json_value(p, value)
            self.sparkplug.add(
                f"spBv1.0/{GROUP}/DDATA/{GATEWAY}/{name}",
                len(payload.SerializeToString()),
                len(readings),
            )
            entries = [{"ts": ts, "values": values} for ts, values in per_ts.items()]
            doc[name] = entries
            for entry in entries:  # as shipped: one message per device poll
                self._tb_messages(self.tb_gw, {name: [entry]})
        self._tb_messages(self.tb, doc)
        t = time.perf_counter()
        packed = self._zstd.compress(orjson.dumps(doc))
        self.zstd_s += time.perf_counter() - t
        self.zstd.add(JSON_TOPIC, len(packed), len(rows))

    def _tb_messages(self, tally: Tally, doc: dict[str, list[dict[str, object]]]) -> None:
        """`doc` on v1/gateway/telemetry, cut into messages of at most TB_MAX_PAYLOAD bytes
        (between timestamp entries) when it is larger."""
        body = orjson.dumps(doc)
        if len(body) <= TB_MAX_PAYLOAD:
            tally.add(TB_TOPIC, len(body), _count(doc))
            return
        part: dict[str, list[dict[str, object]]] = {}
        size = 2
        for name, entries in doc.items():
            for entry in entries:
                add = len(orjson.dumps(entry)) + 1 + (len(orjson.dumps(name)) + 3)
                if part and size + add > TB_MAX_PAYLOAD:
                    tally.add(TB_TOPIC, len(orjson.dumps(part)), _count(part))
                    part, size = {}, 2
                part.setdefault(name, []).append(entry)
                size += add
        if part:
            tally.add(TB_TOPIC, len(orjson.dumps(part)), _count(part))


def _count(doc: dict[str, list[dict[str, object]]]) -> int:
    values = (e["values"] for entries in doc.values() for e in entries)
    return sum(len(v) for v in values if isinstance(v, dict))


class Citygw:
    """The agent's flush, cut down to what decides the bytes (`Agent._flush_sync`)."""

    def __init__(self, stages: dict[int, tuple[object, ...]]) -> None:
        self.pipeline = Pipeline(stages)  # type: ignore[arg-type]
        self.tally = Tally()
        self.seq = SEQ_START
        self.blocks: Counter[str] = Counter()  # value blocks by path: "decimal", "float64"...
        self.encode_s = 0.0

    def flush(self, held: list[Batch], now_ms: int, monotonic_ms: int) -> list[Batch]:
        pipeline = self.pipeline
        if not (held or pipeline.timed):
            return []
        parts = Batch.regroup(held, FLUSH_PART_ROWS) or [Batch()]
        outs: list[Batch] = []
        for k, part in enumerate(parts):
            impl.flag_timestamps(
                part.timestamps, part.quality, CLOCK_VALID_FROM_MS, now_ms + CLOCK_AHEAD_MAX_MS
            )
            out, _counts = pipeline.process(part, now_ms, monotonic_ms, last=k == len(parts) - 1)
            outs.append(out)
        chunks = Batch.regroup(outs, MAX_BATCH_POINTS)
        for chunk in chunks:
            self.seq += 1
            t = time.perf_counter()
            body = codec.encode(chunk, gateway=GATEWAY, seq=self.seq)
            self.encode_s += time.perf_counter() - t
            env = wire.wrap(wire.LANE_TELEMETRY, STREAM, self.seq, len(chunk), body)
            self.tally.add(CITYGW_TOPIC, len(env), len(chunk))
            # what the platform gets back: the chunk's readings, bit-exact (by point)
            got = codec.decode(wire.unwrap(env).body)
            assert sorted(_bits(got)) == sorted(_bits(chunk)), "codec round trip differs"
            self.blocks.update(m.split()[0] for m in codec.value_block_modes(body))
        return chunks


def _bits(b: Batch) -> list[tuple[int, int, bytes, int]]:
    return [(p, t, struct.pack("<d", v), q) for p, t, v, q in b.rows()]


def _batch(poll: sites.Poll) -> Batch:
    n = len(poll.ids)
    return Batch(
        array(ID_TYPECODE, poll.ids),
        array(TS_TYPECODE, [poll.ts_ms]) * n,
        array(VALUE_TYPECODE, poll.values),
        array(QUALITY_TYPECODE, bytes(n)),
    )


# -- once per MQTT session ---------------------------------------------------------------


def session_bytes(
    devices: tuple[sites.Device, ...], points: Points, first: sites.Poll
) -> dict[str, int]:
    """What each sender publishes once per MQTT connection before its data: citygw's
    retained up/meta and state, Sparkplug's NBIRTH and DBIRTHs, TB's device connects
    (PUBLISH + PUBACK each)."""
    meta = wire.encode_meta(
        {
            "v": 1,
            "gateway": GATEWAY,
            "site": "cabinet 0042",
            "location": None,
            "stream": STREAM,
            "points": [
                {
                    "id": pid,
                    "key": f"{points.names[points.device[pid]]}/{p.name}",
                    "name": p.name,
                    "unit": p.unit,
                    "type": "bool" if p.boolean else "float",
                    "device": points.names[points.device[pid]],
                    "driver": devices[points.device[pid]].driver,
                }
                for pid, p in points.defs.items()
            ],
            "software": "0.1.0",
            "config": {"version": "1", "hash": "0" * 16},
            "locations": {},
        }
    )
    prefix = wire.DEFAULT_PREFIX
    ours = publish_bytes(wire.topic(prefix, GATEWAY, wire.KIND_META), len(meta)) + PUBACK
    ours += publish_bytes(wire.topic(prefix, GATEWAY, wire.KIND_STATE), 6) + PUBACK
    ts = first.ts_ms
    nbirth = Payload(timestamp=ts, seq=0)
    m = nbirth.metrics.add(name="bdSeq", timestamp=ts, datatype=UINT64)
    m.long_value = 0
    m = nbirth.metrics.add(name="Node Control/Rebirth", timestamp=ts, datatype=BOOLEAN)
    m.boolean_value = False
    spb = publish_bytes(f"spBv1.0/{GROUP}/NBIRTH/{GATEWAY}", len(nbirth.SerializeToString()))
    spb += PUBACK
    for d, dev in enumerate(devices):
        dbirth = Payload(timestamp=ts, seq=d + 1)
        for pid, p in points.defs.items():
            if points.device[pid] != d:
                continue
            m = dbirth.metrics.add(name=p.name, alias=pid, timestamp=ts)
            if p.boolean:
                m.datatype, m.boolean_value = BOOLEAN, False
            else:
                m.datatype, m.double_value = DOUBLE, 230.1
        topic = f"spBv1.0/{GROUP}/DBIRTH/{GATEWAY}/{dev.name}"
        spb += publish_bytes(topic, len(dbirth.SerializeToString())) + PUBACK
    tb = sum(
        publish_bytes(
            "v1/gateway/connect", len(orjson.dumps({"device": dev.name, "type": "default"}))
        )
        + PUBACK
        for dev in devices
    )
    return {"citygw": ours, "sparkplug": spb, "tb": tb}


# -- a run --------------------------------------------------------------------------------


@dataclass
class Result:
    setup: Setup
    polled: int
    flushes: int
    rows: dict[str, Tally]
    session: dict[str, int]
    seconds: float
    float_share: float  # value blocks not decimal (ordered float32/float64 bits)
    cpu_ms: tuple[float, float]  # per flush with data: codec.encode, zstd-19


def run(setup: Setup) -> Result:
    started = time.perf_counter()
    polls, first_ids = sites.polls(list(setup.devices), setup.duration_s, setup.seed)
    points = Points.of(setup.devices, first_ids)
    stages: dict[int, tuple[object, ...]] = (
        {pid: p.stages for pid, p in points.defs.items() if p.stages} if setup.staged else {}
    )
    ours = Citygw(stages)
    others = Senders(points)
    flush_ms = int(setup.flush_s * 1000)
    now = sites.T0_MS + 370  # the flush loop's phase
    end = sites.T0_MS + setup.duration_s * 1000 + 1000
    i = flushes = 0
    while now <= end:
        now += flush_ms
        held: list[sites.Poll] = []
        while i < len(polls) and polls[i].ts_ms <= now:
            held.append(polls[i])
            i += 1
        mono = now - sites.T0_MS + 5_000_000
        chunks = ours.flush([_batch(p) for p in held], now, mono)
        others.flush(chunks, now)
        flushes += 1
    assert i == len(polls), "polls left after the last flush"
    rows = {
        "citygw": ours.tally,
        "sparkplug": others.sparkplug,
        "tb": others.tb,
        "tb_gw": others.tb_gw,
        "zstd": others.zstd,
    }
    polled = sum(len(p.ids) for p in polls)
    session = session_bytes(setup.devices, points, polls[0])
    floats = 1 - ours.blocks["decimal"] / max(1, ours.blocks.total())
    msgs = max(1, others.zstd.messages)
    cpu = (ours.encode_s * 1000 / msgs, others.zstd_s * 1000 / msgs)
    seconds = time.perf_counter() - started
    return Result(setup, polled, flushes, rows, session, seconds, floats, cpu)  # type: ignore[arg-type]


LABELS = {
    "citygw": f"citygw (codec v{codec.FORMAT_VERSION} + envelope)",
    "sparkplug": "Sparkplug B DDATA, aliases",
    "tb": "TB gateway API JSON, per flush",
    "tb_gw": "TB gateway as shipped, 1 msg/poll",
    "zstd": "JSON + zstd-19, 1 msg/flush",
}


def bpr(r: Result, key: str, wire_level: bool = False) -> float:
    t = r.rows[key]
    return (t.wire if wire_level else t.mqtt) / r.polled


def report(r: Result) -> None:
    s = r.setup
    sent = r.rows["citygw"].readings
    print(f"\n== {s.title}")
    print(
        f"   {s.duration_s // 60} min simulated, {len(s.devices)} devices, {r.flushes:,} flushes;"
        f" {r.polled:,} readings polled, {sent:,} sent after the pipeline"
        f" ({sent / r.polled:.1%}); ran in {r.seconds:.1f} s"
    )
    print(
        f"   {'sender':<38} {'messages':>9} {'payload B':>11} {'B/reading':>10}"
        f" {'+TLS+TCP/IP':>12} {'citygw/it':>10}"
    )
    ours = bpr(r, "citygw")
    for key, label in LABELS.items():
        t = r.rows[key]
        print(
            f"   {label:<38} {t.messages:>9,} {t.payload:>11,} {bpr(r, key):>10.2f}"
            f" {bpr(r, key, True):>12.2f} {ours / bpr(r, key):>10.2f}"
        )
    print(
        f"   codec value blocks not decimal: {r.float_share:.0%};"
        f" CPU per flush here: codec.encode"
        f" {r.cpu_ms[0]:.2f} ms, zstd-19 {r.cpu_ms[1]:.2f} ms"
    )
    ss = r.session
    n = len(s.devices)
    print(
        f"   once per MQTT session (not above): citygw up/meta + state {ss['citygw']:,} B;"
        f" Sparkplug NBIRTH + {n} DBIRTH {ss['sparkplug']:,} B; TB {n} connects {ss['tb']:,} B"
    )


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main() -> None:
    print(__doc__.split("\n\n", 1)[0])
    print(
        "B/reading: MQTT 3.1.1 PUBLISH QoS 1 + PUBACK bytes per reading polled;"
        " +TLS+TCP/IP: with TLS 1.3 records and TCP/IPv4 headers (MSS 1400, pure ACKs"
        " not counted); citygw/it: citygw's B/reading over the sender's."
    )
    results = [run(s) for s in SETUPS]
    for r in results:
        report(r)
    summary = [r for r in results if r.setup.summary]
    by_key = {r.setup.key: r for r in results}
    print("\n== all four configurations (the cabinet at flush 10 s left out)")
    ratios: dict[str, float] = {}
    for key in ("sparkplug", "tb", "tb_gw", "zstd"):
        per = [bpr(r, "citygw") / bpr(r, key) for r in summary]
        pooled = sum(r.rows["citygw"].mqtt for r in summary) / sum(
            r.rows[key].mqtt for r in summary
        )
        wire_per = [bpr(r, "citygw", True) / bpr(r, key, True) for r in summary]
        ratios[key] = geomean(per)
        print(
            f"   citygw / {LABELS[key]:<38} geometric mean {ratios[key]:.2f}"
            f" (with TLS+TCP/IP {geomean(wire_per):.2f}), pooled bytes {pooled:.2f}"
        )
    print(
        f"uplink_bytes: bytes_per_reading_1s={bpr(by_key['1s'], 'citygw'):.2f}"
        f" bytes_per_reading_10s={bpr(by_key['10s'], 'citygw'):.2f}"
        f" vs_sparkplug={ratios['sparkplug']:.2f} vs_tb_json={ratios['tb']:.2f}"
    )


if __name__ == "__main__":
    main()
