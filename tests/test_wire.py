"""The wire format: topics, the binary uplink envelope, the JSON meta message."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import uuid
from typing import Any

import orjson
import pytest

from common import wire
from common.wire import Envelope, Meta, PointMeta, WireError

STREAM = "00112233445566778899aabbccddeeff"


def meta_dict(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "v": 1,
        "gateway": "gw-1",
        "site": "block-12",
        "location": {"lat": 52.52, "lon": 13.405},
        "stream": STREAM,
        "points": [
            {
                "id": 1,
                "key": "bridge-7/strain_1",
                "device": "bridge-7",
                "name": "strain_1",
                "unit": "µε",
                "driver": "sim",
                "type": "float",
            },
            {
                "id": 2,
                "key": "bridge-7/temperature",
                "device": "bridge-7",
                "name": "temperature",
                "unit": "°C",
                "driver": "sim",
                "type": "float",
            },
        ],
    }
    d.update(over)
    return d


# -- topics ---------------------------------------------------------------------------------


def test_topic_builders() -> None:
    assert wire.topic("citygw", "gw-1", "up/batch") == "citygw/gw-1/up/batch"
    assert wire.batch_topic("gw-1") == "citygw/gw-1/up/batch"
    assert wire.alarm_topic("gw-1", "city/x") == "city/x/gw-1/up/alarm"
    assert wire.meta_topic("gw-1") == "citygw/gw-1/up/meta"
    assert wire.state_topic("gw-1") == "citygw/gw-1/state"
    assert wire.lane_topic(wire.LANE_ALARM, "g") == "citygw/g/up/alarm"
    assert wire.lane_topic(wire.LANE_EVENT, "g") == "citygw/g/up/batch"
    assert wire.lane_topic(wire.LANE_TELEMETRY, "g") == "citygw/g/up/batch"
    assert wire.topic("citygw", "gw-1", "down/cmd") == "citygw/gw-1/down/cmd"
    assert wire.ingest_filters("citygw", None) == [
        "citygw/+/up/batch",
        "citygw/+/up/alarm",
        "citygw/+/up/meta",
        "citygw/+/up/stats",
        "citygw/+/state",
    ]
    assert wire.ingest_filters("citygw", "") == wire.ingest_filters("citygw", None)
    assert wire.ingest_filters("c", "g") == [
        "$share/g/c/+/up/batch",
        "$share/g/c/+/up/alarm",
        "c/+/up/meta",
        "c/+/up/stats",
        "c/+/state",
    ]


def test_stats_round_trip_and_rejects() -> None:
    stats = wire.GatewayStats("gw-1", 1795938246112, 120_000, 35, 2, 40, 3, 7)
    assert wire.decode_stats(wire.encode_stats(stats)) == stats
    for bad in (b"", b"[]", b'{"v": 2}', b'{"v": 1, "gateway": 3}', b'{"v": 1, "gateway": "g"}'):
        with pytest.raises(WireError):
            wire.decode_stats(bad)
    negative = wire.encode_stats(stats).replace(b'"evicted_points":35', b'"evicted_points":-1')
    with pytest.raises(WireError, match="evicted_points"):
        wire.decode_stats(negative)


# -- device information in up/stats (issue 13) -----------------------------------------------

STATS = wire.GatewayStats("gw-1", 1795938246112, 120_000, 35, 2, 40, 3, 7)


def test_stats_carry_device_information() -> None:
    devices = {
        "meter-1": {"serial": "SN-4711", "firmware": "1.02"},
        "display": {"text": "Hello World!", "raw": "beef", "firmware_version": "6.1.0"},
        "caf\u00e9": {"text": "\u00b5\u03b5 \u2603"},  # any Unicode the stores keep
    }
    stats = dataclasses.replace(STATS, devices=devices)
    assert wire.decode_stats(wire.encode_stats(stats)) == stats
    # a gateway before issue 13 sends no `devices`: it decodes, as None (nothing known)
    assert b"devices" not in wire.encode_stats(STATS)
    assert wire.decode_stats(wire.encode_stats(STATS)).devices is None
    old = orjson.loads(wire.encode_stats(stats))
    assert wire.decode_stats(orjson.dumps({**old, "devices": None})).devices is None
    # an empty one is "no device has any" (what was stored goes)
    assert wire.decode_stats(orjson.dumps({**old, "devices": {}})).devices == {}
    # and an ingest before issue 13 ignores the field: the counters are where they were
    assert {k: old[k] for k in wire.STATS_FIELDS} == {
        f: getattr(STATS, f) for f in wire.STATS_FIELDS
    }


@pytest.mark.parametrize(
    ("devices", "match"),
    [
        ([], "'devices' must be an object"),
        ({"d": "SN"}, "must be an object"),
        ({"d": {"serial": 4711}}, "must be a string"),
        ({"d": {"serial": None}}, "must be a string"),
        ({"d": {"serial": "SN\x00"}}, "NUL"),
        ({"d\x00": {"serial": "SN"}}, "NUL"),
        ({"d": {"se\x00rial": "SN"}}, "NUL"),
        ({"": {"serial": "SN"}}, "empty"),
        ({"d": {"": "SN"}}, "empty"),
        ({"d": {"serial": "x" * (wire.MAX_INFO_VALUE_BYTES + 1)}}, "at most 1024"),
        ({"d": {"serial": "\u00e9" * 513}}, "1026 bytes"),  # bytes, not characters
        ({"d" * (wire.MAX_TEXT_BYTES + 1): {"serial": "SN"}}, "at most 1024"),
    ],
)
def test_stats_refuse_hostile_device_information(devices: object, match: str) -> None:
    data = orjson.dumps({**orjson.loads(wire.encode_stats(STATS)), "devices": devices})
    with pytest.raises(WireError, match=match):
        wire.decode_stats(data)
    with pytest.raises(WireError):  # nor does a gateway send it
        wire.encode_stats(dataclasses.replace(STATS, devices=devices))  # type: ignore[arg-type]


@pytest.mark.parametrize("devices", [{1: {"serial": "SN"}}, {"d": {2: "SN"}}])
def test_encode_stats_refuses_names_that_are_not_strings(devices: object) -> None:
    """A Python caller's mistake (JSON keys are always strings): WireError, not TypeError."""
    with pytest.raises(WireError, match="not a string"):
        wire.encode_stats(dataclasses.replace(STATS, devices=devices))  # type: ignore[arg-type]


def test_stats_refuse_lone_surrogates_and_oversize() -> None:
    base = wire.encode_stats(STATS)[:-1]
    with pytest.raises(WireError):  # JSON may escape one; no store keeps it
        wire.decode_stats(base + b',"devices":{"d":{"text":"\\ud800"}}}')
    with pytest.raises(WireError, match="lone surrogate"):
        wire.encode_stats(dataclasses.replace(STATS, devices={"d": {"text": "\ud800"}}))
    big = {f"dev-{i}": {"serial": "x" * 1000} for i in range(300)}  # each one fine, not all
    data = orjson.dumps({**orjson.loads(wire.encode_stats(STATS)), "devices": big})
    assert len(data) > wire.MAX_STATS_BYTES
    with pytest.raises(WireError, match=f"at most {wire.MAX_STATS_BYTES}"):
        wire.decode_stats(data)
    with pytest.raises(WireError, match=f"at most {wire.MAX_STATS_BYTES}"):
        wire.encode_stats(dataclasses.replace(STATS, devices=big))


def test_bound_devices_rule() -> None:
    """What a gateway does with device information the wire cannot take: cut (at a NUL,
    at MAX_INFO_VALUE_BYTES on a character boundary) or left out, each reported."""
    long_value = "a" + "\u20ac" * 400  # 1 + 1200 bytes: the cut falls inside a euro sign
    devices: dict[str, dict[str, object]] = {
        "meter": {"serial": "SN-4711\x00\x00junk", "model": "SDM630", "fw": long_value},
        "ble": {"text": "ok", "bad\x00name": "x", "": "empty name", "raw": b"\xbe\xef"},
        "sur": {"text": "\ud800"},
        "x" * 2000: {"serial": "a device name too long"},
    }
    got, problems = wire.bound_devices(devices)  # type: ignore[arg-type]
    cut = wire.MAX_INFO_VALUE_BYTES
    assert got == {
        "ble": {"text": "ok"},
        "meter": {"fw": "a" + "\u20ac" * ((cut - 1) // 3), "model": "SDM630", "serial": "SN-4711"},
    }
    assert len(got["meter"]["fw"].encode()) <= cut
    by_entry = {(p.device[:8], p.name, p.truncated) for p in problems}
    assert by_entry == {
        ("meter", "serial", True),
        ("meter", "fw", True),
        ("ble", "bad\x00name", False),
        ("ble", "", False),
        ("ble", "raw", False),
        ("sur", "text", False),
        ("x" * 8, "serial", False),
    }
    reasons = {p.name: p.reason for p in problems if p.device == "meter"}
    assert reasons == {"serial": "value cut at a NUL", "fw": f"value cut at over {cut} bytes"}
    # what it keeps, the wire takes and the platform decodes as is
    stats = dataclasses.replace(STATS, devices=got)
    assert wire.decode_stats(wire.encode_stats(stats)).devices == got


def test_bound_devices_keeps_up_stats_within_its_size() -> None:
    devices = {f"dev-{i:03d}": {"serial": f"{i:03d}" + "x" * 997} for i in range(300)}
    got, problems = wire.bound_devices(devices)
    kept = len(got)
    assert 200 < kept < 300
    assert list(got) == [f"dev-{i:03d}" for i in range(kept)]  # in name order, each whole
    assert {p.device for p in problems} == {f"dev-{i:03d}" for i in range(kept, 300)}
    assert all(not p.truncated and "up/stats full" in p.reason for p in problems)
    data = wire.encode_stats(dataclasses.replace(STATS, devices=got))
    assert len(data) <= wire.MAX_STATS_BYTES
    assert wire.decode_stats(data).devices == got


@pytest.mark.parametrize("gateway", ["", "a/b", "a+", "#", "x\x00", "role.ingest", "g" * 65])
def test_topic_rejects_bad_gateway(gateway: str) -> None:
    with pytest.raises(WireError):
        wire.topic("citygw", gateway, "up/batch")


def test_topic_rejects_unknown_kind() -> None:
    with pytest.raises(WireError, match="unknown topic kind"):
        wire.topic("citygw", "gw", "down/firmware")


@pytest.mark.parametrize(
    ("topic", "prefix", "expected"),
    [
        ("citygw/gw-1/up/batch", "citygw", ("gw-1", "up/batch")),
        ("citygw/gw-1/up/alarm", "citygw", ("gw-1", "up/alarm")),
        ("citygw/gw-1/up/meta", "citygw", ("gw-1", "up/meta")),
        ("citygw/gw-1/state", "citygw", ("gw-1", "state")),
        ("a/b/gw/up/batch", "a/b", ("gw", "up/batch")),
    ],
)
def test_parse_topic(topic: str, prefix: str, expected: tuple[str, str]) -> None:
    assert wire.parse_topic(topic, prefix) == expected


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "citygw",
        "citygw/",
        "citygw/gw-1",
        "citygw/gw-1/up",
        "citygw/gw-1/up/batch/extra",
        "citygw/gw-1/up/other",
        "citygw/gw-1/down/other",
        "citygw//up/batch",
        "other/gw-1/up/batch",
        "citygwx/gw-1/up/batch",
        "citygw/gw+/up/batch",
        # the gateway segment must be a gateway id, which a broker's role user is not
        # (the shipped ACL's gateway patterns give every user its own "<prefix>/%u/up/#")
        "citygw/role.ingest/up/batch",
        "citygw/role.commands/state",
        "citygw/" + "g" * 65 + "/up/meta",
        "citygw/gw é/up/alarm",
    ],
)
def test_parse_topic_rejects(topic: str) -> None:
    with pytest.raises(WireError):
        wire.parse_topic(topic, "citygw")


# -- envelope -------------------------------------------------------------------------------


def test_envelope_roundtrip() -> None:
    stream = uuid.uuid4().hex
    data = wire.wrap(wire.LANE_TELEMETRY, stream, 2**64 - 1, 12345, b"body-bytes")
    env = wire.unwrap(data)
    assert env == Envelope(wire.LANE_TELEMETRY, stream, 2**64 - 1, 12345, b"body-bytes")
    assert env.lane_name == "telemetry"
    assert wire.unwrap(bytearray(data)) == env
    assert wire.unwrap(memoryview(data)) == env


def test_envelope_exact_header_bytes() -> None:
    data = wire.wrap(wire.LANE_ALARM, STREAM, 0x0102030405060708, 3, b"\xaa\xbb")
    assert data == (
        b"CG"  # magic
        b"\x01"  # envelope version
        b"\x00"  # lane: alarm
        + bytes.fromhex(STREAM)  # stream id, 16 raw bytes
        + b"\x01\x02\x03\x04\x05\x06\x07\x08"  # seq, uint64 big-endian
        + b"\x00\x00\x00\x03"  # n_points, uint32 big-endian
        + b"\xaa\xbb"  # codec body
    )
    assert wire.HEADER_SIZE == 32


def test_wrap_accepts_dashed_uuid_and_intenum_lane() -> None:
    import enum

    class Lane(enum.IntEnum):
        ALARM = 0
        EVENT = 1
        TELEMETRY = 2

    u = uuid.uuid4()
    env = wire.unwrap(wire.wrap(Lane.EVENT, str(u), 1, 0, b""))
    assert env.stream == u.hex and env.lane == 1 and env.body == b""


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((3, STREAM, 1, 1, b""), "lane"),
        ((0, "xyz", 1, 1, b""), "stream id"),
        ((0, STREAM[:-2], 1, 1, b""), "stream id"),
        ((0, STREAM, -1, 1, b""), "seq"),
        ((0, STREAM, 2**64, 1, b""), "seq"),
        ((0, STREAM, 1, 2**32, b""), "n_points"),
    ],
)
def test_wrap_rejects(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.wrap(*args)


GOOD = wire.wrap(wire.LANE_EVENT, STREAM, 7, 1, b"x")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "too short"),
        (GOOD[:31], "too short"),
        (b"XG" + GOOD[2:], "magic"),
        (b"\x00" * 40, "magic"),
        (GOOD[:2] + b"\x02" + GOOD[3:], "unknown envelope version 2"),
        (GOOD[:2] + b"\x00" + GOOD[3:], "unknown envelope version 0"),
        (GOOD[:3] + b"\x03" + GOOD[4:], "unknown lane 3"),
        (GOOD[:3] + b"\xff" + GOOD[4:], "unknown lane 255"),
    ],
)
def test_unwrap_rejects(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.unwrap(data)


def test_unwrap_rejects_non_bytes() -> None:
    with pytest.raises(WireError):
        wire.unwrap("CG" * 20)  # type: ignore[arg-type]


def test_unwrap_fuzz_only_wire_error() -> None:
    rng = random.Random(20240611)
    seeds = [GOOD, wire.wrap(wire.LANE_ALARM, STREAM, 0, 0, b"")]
    ok = 0
    for i in range(20_000):
        if i % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        else:  # mutate a valid envelope: flips, truncation, extension
            b = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(3)
                if op == 0 and b:
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                elif op == 1:
                    del b[rng.randrange(len(b) + 1) :]
                else:
                    b += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 8)))
            data = bytes(b)
        try:
            env = wire.unwrap(data)
        except WireError:
            continue
        ok += 1
        assert env.lane in wire.LANES and len(env.stream) == 32
    assert ok > 0  # the mutator does produce valid envelopes too


# -- meta -----------------------------------------------------------------------------------


def test_meta_roundtrip() -> None:
    data = wire.encode_meta(meta_dict())
    meta = wire.decode_meta(data)
    assert meta.gateway == "gw-1"
    assert meta.site == "block-12"
    assert meta.location == {"lat": 52.52, "lon": 13.405}
    assert meta.stream == STREAM
    assert meta.points[0] == PointMeta(
        1, "bridge-7/strain_1", "bridge-7", "strain_1", "µε", "sim", "float"
    )
    assert orjson.loads(data) == meta_dict()
    # a Meta encodes to the same message
    assert wire.decode_meta(wire.encode_meta(meta)) == meta
    assert isinstance(meta, Meta)


def test_meta_optional_fields_and_extras() -> None:
    d = meta_dict(site=None, location=None, future_field=[1, 2])
    d["points"] = [
        {"id": 9, "key": "d/n", "device": "d", "name": "n", "unit": None, "writable": True}
    ]
    meta = wire.decode_meta(orjson.dumps(d))
    assert meta.site is None and meta.location is None
    assert meta.points == (PointMeta(9, "d/n", "d", "n", "", "", "float"),)


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _point_without(key: str) -> dict[str, Any]:
    d = meta_dict()
    d["points"] = [_without(d["points"][0], key)]
    return d


def _point_with(**over: Any) -> dict[str, Any]:
    d = meta_dict()
    d["points"] = [{**d["points"][0], **over}]
    return d


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"[" * 5000 + b"]" * 5000, "JSON"),
        (orjson.dumps(_without(meta_dict(), "v")), "missing field 'v'"),
        (orjson.dumps(meta_dict(v=2)), "unknown version 2"),
        (orjson.dumps(meta_dict(v=True)), "unknown version"),
        (orjson.dumps(_without(meta_dict(), "gateway")), "missing field 'gateway'"),
        (orjson.dumps(meta_dict(gateway="a/b")), "gateway id"),
        (orjson.dumps(meta_dict(gateway=5)), "must be a string"),
        (orjson.dumps(_without(meta_dict(), "stream")), "missing field 'stream'"),
        (orjson.dumps(meta_dict(stream="abc")), "stream id"),
        (orjson.dumps(_without(meta_dict(), "points")), "missing field 'points'"),
        (orjson.dumps(meta_dict(points={})), "must be a list"),
        (orjson.dumps(meta_dict(points=[1])), "must be an object"),
        (orjson.dumps(meta_dict(site=3)), "site"),
        (orjson.dumps(meta_dict(location=[1, 2])), "location"),
        (orjson.dumps(_point_without("id")), "missing field 'id'"),
        (orjson.dumps(_point_without("key")), "missing field 'key'"),
        (orjson.dumps(_point_without("device")), "missing field 'device'"),
        (orjson.dumps(_point_without("name")), "missing field 'name'"),
        (orjson.dumps(_point_with(id=-1)), "'id' must be an integer"),
        (orjson.dumps(_point_with(id=2**32)), "'id' must be an integer"),
        (orjson.dumps(_point_with(id=1.5)), "'id' must be an integer"),
        (orjson.dumps(_point_with(id=True)), "'id' must be an integer"),
        (orjson.dumps(_point_with(key="")), "'key' must not be empty"),
        (orjson.dumps(_point_with(unit=5)), "'unit' must be a string"),
        (orjson.dumps(meta_dict(points=[meta_dict()["points"][0]] * 2)), "duplicate point id"),
    ],
)
def test_decode_meta_rejects(data: bytes, match: str) -> None:
    with pytest.raises(WireError, match=match):
        wire.decode_meta(data)


def test_encode_meta_validates() -> None:
    with pytest.raises(WireError, match="missing field 'points'"):
        wire.encode_meta(_without(meta_dict(), "points"))
    with pytest.raises(WireError, match="JSON-serialisable"):
        wire.encode_meta(meta_dict(location={"x": object()}))


def test_decode_meta_fuzz_only_wire_error() -> None:
    rng = random.Random(7)
    good = wire.encode_meta(meta_dict())
    for _ in range(5_000):
        b = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(len(b))
            if rng.random() < 0.5:
                b[i] = rng.getrandbits(8)
            else:
                del b[i:]
                break
        with contextlib.suppress(WireError):
            wire.decode_meta(bytes(b))
