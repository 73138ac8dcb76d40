"""The mqtt driver's sans-I/O parts: payload formats and topic patterns."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.mqtt.payloads import REASONS, PayloadError, parse
from drivers.mqtt.settings import MqttPointSettings
from drivers.mqtt.topics import TopicPattern, TopicPatternError
from native.batch import BAD, GOOD, UNCERTAIN


def spec(**kw: Any) -> MqttPointSettings:
    return MqttPointSettings.model_validate({"topic": "t", **kw})


def vt(payload: bytes, s: MqttPointSettings) -> tuple[float, int | None]:
    """(value, timestamp) of a good reading."""
    r = parse(payload, s)
    assert r is not None and r.quality == GOOD and r.note is None, r
    return r.value, r.timestamp_ms


def reason(payload: bytes, s: MqttPointSettings) -> str:
    with pytest.raises(PayloadError) as exc:
        parse(payload, s)
    assert exc.value.reason in REASONS
    return exc.value.reason


# -- number --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "value"),
    [
        (b"12.3", 12.3),
        (b" -4\n", -4.0),
        (b"1e3", 1000.0),
        (b"true", 1.0),
        (b"FALSE", 0.0),
        (b"on", 1.0),
        (b"Off", 0.0),
    ],
)
def test_number(payload: bytes, value: float) -> None:
    assert vt(payload, spec()) == (value, None)


def test_number_scale_offset() -> None:
    assert vt(b"100", spec(scale=0.1, offset=-2)) == (pytest.approx(8.0), None)


@pytest.mark.parametrize("payload", [b"", b"abc", b"12,3", b"\xff\xfe", b"1_000", b"\xd9\xa3"])
def test_number_rejects(payload: bytes) -> None:
    assert reason(payload, spec()) == "not_a_number"


# -- json ----------------------------------------------------------------------------

DOC = b'{"data": {"pm25": 12.5, "ok": true, "s": "7.5", "o": {}}, "values": [1, 2, 3.5],' \
    b' "ts": 1700000000, "ms": 1700000000123, "iso": "2024-03-01T12:00:00+02:00",' \
    b' "naive": "2024-03-01T12:00:00", "list": [{"v": 9}]}'  # fmt: skip


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("data.pm25", 12.5),
        ("data.ok", 1.0),
        ("data.s", 7.5),
        ("values[2]", 3.5),
        ("list[0].v", 9.0),
    ],
)
def test_json_path(path: str, value: float) -> None:
    assert vt(DOC, spec(format="json", path=path)) == (value, None)


def test_json_root_array() -> None:
    assert vt(b"[4, 5]", spec(format="json", path="[1]")) == (5.0, None)


@pytest.mark.parametrize(
    ("ts", "fmt", "expected"),
    [
        ("ts", "epoch_s", 1_700_000_000_000),
        ("ts", "auto", 1_700_000_000_000),
        ("ms", "epoch_ms", 1_700_000_000_123),
        ("ms", "auto", 1_700_000_000_123),
        ("iso", "iso8601", 1_709_287_200_000),  # 10:00 UTC
        ("iso", "auto", 1_709_287_200_000),
        ("naive", "iso8601", 1_709_294_400_000),  # taken as UTC
    ],
)
def test_json_timestamp(ts: str, fmt: str, expected: int) -> None:
    s = spec(format="json", path="data.pm25", timestamp=ts, timestamp_format=fmt)
    assert vt(DOC, s) == (12.5, expected)


@pytest.mark.parametrize(
    ("payload", "path", "why"),
    [
        (b"{not json", "a", "bad_json"),
        (b"", "a", "bad_json"),
        (b'{"a": 1}', "b", "missing_path"),
        (b'{"a": [1]}', "a[3]", "missing_path"),
        (b'{"a": 1}', "a.b", "missing_path"),
        (b'{"a": {"b": 1}}', "a", "not_numeric"),
        (b'{"a": "high"}', "a", "not_numeric"),
    ],
)
def test_json_rejects(payload: bytes, path: str, why: str) -> None:
    assert reason(payload, spec(format="json", path=path)) == why


@pytest.mark.parametrize(
    ("doc", "fmt", "why"),
    [
        (b'{"v": 1}', "auto", "missing_timestamp"),
        (b'{"v": 1, "t": "yesterday"}', "auto", "bad_timestamp"),
        (b'{"v": 1, "t": 1700000000}', "iso8601", "bad_timestamp"),
        (b'{"v": 1, "t": 1700000000}', "epoch_ms", "bad_timestamp"),  # 1970: implausible
        (b'{"v": 1, "t": true}', "auto", "bad_timestamp"),
        (b'{"v": 1, "t": [1]}', "auto", "bad_timestamp"),
    ],
)
def test_json_timestamp_rejects(doc: bytes, fmt: str, why: str) -> None:
    s = spec(format="json", path="v", timestamp="t", timestamp_format=fmt)
    assert reason(doc, s) == why


# -- csv -----------------------------------------------------------------------------


def test_csv_column_and_timestamp() -> None:
    s = spec(format="csv", column=2, timestamp=0, timestamp_format="epoch_ms")
    assert vt(b"1700000000123,street-7,41.5\n", s) == (41.5, 1_700_000_000_123)
    s = spec(format="csv", column=1, delimiter=";", scale=2)
    assert vt(b'2024-01-01T00:00:00Z;"3"', s) == (6.0, None)
    s = spec(format="csv", column=1, delimiter=";", timestamp=0)
    assert vt(b"2024-01-01T00:00:00Z;3", s) == (3.0, 1_704_067_200_000)


@pytest.mark.parametrize(
    ("payload", "kw", "why"),
    [
        (b"", {"column": 0}, "bad_csv"),
        (b"\xff,1", {"column": 1}, "bad_csv"),
        (b"1,2", {"column": 5}, "missing_column"),
        (b"1,x", {"column": 1}, "not_a_number"),
        (b"1,2", {"column": 0, "timestamp": 4}, "missing_timestamp"),
        (b"soon,2", {"column": 1, "timestamp": 0}, "bad_timestamp"),
    ],
)
def test_csv_rejects(payload: bytes, kw: dict[str, Any], why: str) -> None:
    assert reason(payload, spec(format="csv", **kw)) == why


# -- binary --------------------------------------------------------------------------

CODES = {"u8": "B", "i8": "b", "u16": "H", "i16": "h", "u32": "I", "i32": "i", "f32": "f",
         "f64": "d"}  # fmt: skip
SAMPLES = {"u8": 200, "i8": -100, "u16": 60000, "i16": -30000, "u32": 4_000_000_000,
           "i32": -2_000_000_000, "f32": 1.5, "f64": -2.25}  # fmt: skip


@pytest.mark.parametrize("datatype", list(CODES))
@pytest.mark.parametrize("endian", ["big", "little"])
def test_binary(datatype: str, endian: str) -> None:
    order = ">" if endian == "big" else "<"
    raw = SAMPLES[datatype]
    payload = b"\xaa\xbb" + struct.pack(order + CODES[datatype], raw) + b"\xcc"
    s = spec(format="binary", datatype=datatype, endian=endian, byte_offset=2, scale=2, offset=1)
    assert vt(payload, s) == (raw * 2 + 1, None)


def test_binary_integer_with_a_decimal_scale_is_the_decimal_meant() -> None:
    s = spec(format="binary", datatype="u16", scale=0.1, offset=-40.0)
    assert 2301 * 0.1 - 40 != 190.1
    assert vt(struct.pack(">H", 2301), s) == (190.1, None)


def test_binary_short() -> None:
    s = spec(format="binary", datatype="u32", byte_offset=1)
    assert reason(b"\x00\x01\x02\x03", s) == "short_binary"
    assert vt(b"\x00\x00\x00\x00\x07", s) == (7.0, None)


@pytest.mark.parametrize("datatype", ["f32", "f64"])
def test_binary_float_nan_is_missing_and_bad(datatype: str) -> None:
    code = ">f" if datatype == "f32" else ">d"
    for raw in (math.nan, math.inf, -math.inf):
        r = parse(struct.pack(code, raw), spec(format="binary", datatype=datatype))
        assert r is not None and math.isnan(r.value) and r.quality == BAD


# -- validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"format": "json"}, "needs path"),
        ({"format": "csv"}, "needs column"),
        ({"format": "binary"}, "needs datatype"),
        ({"path": "a"}, "path is only for format = 'json'"),
        ({"format": "json", "path": "a..b"}, "not a JSON path"),
        ({"format": "csv", "column": 0, "timestamp": "a.b"}, "only for format = 'json'"),
        ({"timestamp_format": "epoch_s"}, "only for a timestamp taken from the payload"),
        ({"topic": "a/#/b"}, "'#' must be the last level"),
        ({"topic": "a/x{device}"}, "whole level"),
        ({"scale": 0}, "must not be 0"),
    ],
)
def test_point_validation(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        MqttPointSettings.model_validate({"topic": "t", **kw})


# -- no crash on anything ------------------------------------------------------------

SPECS = [
    spec(),
    spec(format="json", path="a.b[1]", timestamp="t"),
    spec(format="json", path="[0]", timestamp="t", timestamp_format="iso8601"),
    spec(format="json", path="a", timestamp="t", timestamp_format="epoch_s"),
    spec(format="csv", column=1, timestamp=0),
    spec(format="csv", column=0, delimiter="\t", timestamp=1, timestamp_format="iso8601"),
    spec(format="binary", datatype="f64", byte_offset=3, endian="little"),
    spec(format="binary", datatype="i8"),
]

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.sampled_from("abt"), kids),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | JSONISH.map(lambda d: repr(d).encode()))
def test_parse_never_raises_anything_else(payload: bytes) -> None:
    for s in SPECS:
        try:
            r = parse(payload, s)
        except PayloadError as exc:
            assert exc.reason in REASONS
        else:
            assert r is not None
            assert isinstance(r.value, float)
            assert math.isfinite(r.value) == (r.quality == GOOD)
            assert r.timestamp_ms is None or isinstance(r.timestamp_ms, int)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "t"]), JSONISH, max_size=2))
def test_parse_json_documents(doc: dict[str, Any]) -> None:
    import orjson

    try:
        payload = orjson.dumps(doc)
    except TypeError:  # integers beyond 64 bits
        return
    for s in SPECS[1:4]:
        try:
            parse(payload, s)
        except PayloadError as exc:
            assert exc.reason in REASONS


# -- topic patterns ------------------------------------------------------------------


def test_pattern_subscription_and_captures() -> None:
    p = TopicPattern("sensors/{device}/air/{point}")
    assert p.subscription == "sensors/+/air/+"
    assert p.captures == ("device", "point")
    assert p.match("sensors/street-7/air/pm25") == {"device": "street-7", "point": "pm25"}
    assert p.match("sensors/street-7/air") is None
    assert p.match("sensors/street-7/air/pm25/x") is None
    assert p.match("sensors/street-7/water/pm25") is None


def test_pattern_wildcards() -> None:
    p = TopicPattern("city/+/noise/{point}")
    assert p.subscription == "city/+/noise/+"
    assert p.match("city/north/noise/laeq") == {"point": "laeq"}
    h = TopicPattern("sensors/street-7/#")
    assert h.match("sensors/street-7") == {}  # '#' also matches the parent level
    assert h.match("sensors/street-7/a/b/c") == {}
    assert h.match("sensors/street-8/a") is None
    assert TopicPattern("#").match("$SYS/broker/uptime") is None
    assert TopicPattern("+/x").match("$SYS/x") is None
    assert TopicPattern("$SYS/#").match("$SYS/broker") == {}
    assert TopicPattern("a/+/b").match("a//b") == {}  # empty levels are levels


@pytest.mark.parametrize("bad", ["", "a/#/b", "a#", "a/b+", "a/{x}/{x}", "a/{x y}", "a/{}"])
def test_pattern_rejects(bad: str) -> None:
    with pytest.raises(TopicPatternError):
        TopicPattern(bad)


def _mqtt_matches(filt: str, topic: str) -> bool:
    """Reference: the MQTT 3.1.1 matching rules, written independently."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    f, t = filt.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level != "+" and level != t[i]:
            return False
    return len(f) == len(t)


LEVEL = st.sampled_from(["a", "b", "street-7", "", "$x"])
PATTERN_LEVEL = st.sampled_from(["a", "b", "+", "{device}", "{point}", "street-7", ""])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    levels = draw(st.lists(PATTERN_LEVEL, min_size=1, max_size=4))
    seen: set[str] = set()
    out = []
    for lv in levels:  # a capture once; a repeat becomes '+'
        out.append("+" if lv.startswith("{") and lv in seen else lv)
        seen.add(lv)
    if draw(st.booleans()):
        out.append("#")
    return "/".join(out) or "+"  # "" is not a filter


@settings(max_examples=500, deadline=None)
@given(patterns(), st.lists(LEVEL, min_size=1, max_size=6))
def test_match_agrees_with_mqtt(pattern: str, levels: list[str]) -> None:
    p = TopicPattern(pattern)
    topic = "/".join(levels)
    captures = p.match(topic)
    assert (captures is not None) == _mqtt_matches(p.subscription, topic)
    if captures is not None:
        parts = topic.split("/")
        for i, lv in enumerate(pattern.split("/")):
            if lv.startswith("{"):
                assert captures[lv[1:-1]] == parts[i]


@settings(max_examples=300, deadline=None)
@given(patterns(), st.data())
def test_topics_built_from_the_filter_match(pattern: str, data: st.DataObject) -> None:
    """A topic made by filling each wildcard of the subscription always matches."""
    p = TopicPattern(pattern)
    parts = []
    for lv in p.subscription.split("/"):
        if lv == "+":
            parts.append(data.draw(st.sampled_from(["x", "street-7", ""])))
        elif lv == "#":
            parts.extend(data.draw(st.lists(st.sampled_from(["x", "y"]), max_size=3)))
        else:
            parts.append(lv)
    topic = "/".join(parts)
    if topic.startswith("$"):
        return
    if not parts:  # "#" alone with nothing below: any one-level topic
        topic = "x"
    assert p.match(topic) is not None


# -- issue 13: what real firmwares send ------------------------------------------------

BERLIN = ZoneInfo("Europe/Berlin")


def test_zoneless_timestamp_in_the_points_zone() -> None:
    # Tasmota's default Time is local wall time without an offset
    s = spec(format="json", path="v", timestamp="Time", timezone="Europe/Berlin")
    summer = b'{"v": 1, "Time": "2026-07-01T14:00:00"}'
    assert vt(summer, s) == (1.0, 1_782_907_200_000)  # 12:00Z: CEST is UTC+2
    winter = b'{"v": 1, "Time": "2026-01-15T14:00:00"}'
    assert vt(winter, s) == (1.0, 1_768_482_000_000)  # 13:00Z: CET is UTC+1
    # an offset in the payload wins (Tasmota with SetOption52 1)
    assert vt(b'{"v": 1, "Time": "2026-07-01T14:00:00+02:00"}', s) == (1.0, 1_782_907_200_000)
    # the zone passed by the driver (the device's timezone) is used the same way
    plain = spec(format="json", path="v", timestamp="Time")
    r = parse(summer, plain, zone=BERLIN)
    assert r is not None and r.timestamp_ms == 1_782_907_200_000
    assert vt(summer, plain) == (1.0, 1_782_914_400_000)  # no zone: UTC, as before


def test_dst_gap_is_refused_and_fold_takes_the_earlier_instant() -> None:
    s = spec(format="json", path="v", timestamp="t", timezone="Europe/Berlin")
    # 2026-03-29 02:30 does not exist in Berlin (clocks jump 02:00 -> 03:00)
    with pytest.raises(PayloadError, match="DST gap") as exc:
        parse(b'{"v": 1, "t": "2026-03-29T02:30:00"}', s)
    assert exc.value.reason == "bad_timestamp"
    # 2026-10-25 02:30 happens twice (03:00 -> 02:00): the first one, CEST, flagged
    r = parse(b'{"v": 1, "t": "2026-10-25T02:30:00"}', s)
    assert r == (1.0, 1_792_888_200_000, UNCERTAIN, "timestamp_ambiguous")  # 00:30Z
    assert datetime.fromtimestamp(1_792_888_200, UTC).isoformat() == "2026-10-25T00:30:00+00:00"


@pytest.mark.parametrize(
    ("payload", "kw"),
    [
        (b'{"v": 2, "Time": "1970-01-01T00:00:15"}', {}),  # Tasmota before NTP sync
        (b'{"v": 2, "Time": "soon"}', {}),
        (b'{"v": 2}', {}),
        (b'{"v": 2, "Time": "2026-03-29T02:30:00"}', {"timezone": "Europe/Berlin"}),
    ],
)
def test_timestamp_fallback_to_reception(payload: bytes, kw: dict[str, Any]) -> None:
    s = spec(format="json", path="v", timestamp="Time", **kw)
    assert reason(payload, s) in ("bad_timestamp", "missing_timestamp")  # the default: refuse
    s = spec(format="json", path="v", timestamp="Time", timestamp_fallback="reception", **kw)
    assert parse(payload, s) == (2.0, None, UNCERTAIN, "timestamp_fallback")


def test_timestamp_fallback_csv() -> None:
    s = spec(format="csv", column=1, timestamp=2, timestamp_fallback="reception")
    assert parse(b"x,3", s) == (3.0, None, UNCERTAIN, "timestamp_fallback")
    s = spec(format="csv", column=1, timestamp=0, timestamp_fallback="reception")
    assert parse(b"1970-01-01T00:00:01,3", s) == (3.0, None, UNCERTAIN, "timestamp_fallback")


NONFINITE = [b"nan", b"NaN", b"-nan", b"NAN", b"inf", b"-inf", b"+Inf", b"Infinity", b"1e999"]


@pytest.mark.parametrize("text", NONFINITE)
def test_nan_and_inf_are_missing_and_bad(text: bytes) -> None:
    def missing(payload: bytes, s: MqttPointSettings) -> None:
        r = parse(payload, s)
        assert r is not None and math.isnan(r.value) and r.quality == BAD, r

    missing(text, spec())  # ESPHome's plain-text state of a failed sensor
    missing(b'{"a": "%s"}' % text, spec(format="json", path="a"))  # in a JSON string
    missing(b"1," + text, spec(format="csv", column=1))
    missing(text, spec(scale=10, offset=1))  # scale/offset do not revive it
    if text != b"1e999":  # bare in a JSON document (invalid JSON, printed by C firmwares)
        missing(b'{"b": "nan x", "a": %s, "c": [1]}' % text, spec(format="json", path="a"))


def test_json_null_and_overflow_are_missing() -> None:
    for payload, s in [
        (b'{"a": null}', spec(format="json", path="a")),
        (b"1e300", spec(scale=1e10)),
    ]:
        r = parse(payload, s)
        assert r is not None and math.isnan(r.value) and r.quality == BAD


def test_bare_nan_repair_keeps_strings() -> None:
    s = spec(format="json", path="b")
    # "nan" inside a string is not touched while the bare one is quoted
    assert reason(b'{"b": "nan here", "a": nan}', s) == "not_numeric"
    assert reason(b'{"b": nanny}', s) == "bad_json"


WORDS = {"Online": 1, "Offline": 0, "unavailable": math.nan}


@pytest.mark.parametrize(
    ("payload", "kw", "value"),
    [
        (b"Online", {}, 1.0),
        (b" offline\n", {}, 0.0),
        (b"ONLINE", {}, 1.0),
        (b"12.5", {}, 12.5),  # numbers still pass
        (b'{"state": "online"}', {"format": "json", "path": "state"}, 1.0),
        (b"t,Offline", {"format": "csv", "column": 1}, 0.0),
        (b"Online", {"scale": 10, "offset": 3}, 1.0),  # a word's value is taken as given
    ],
)
def test_words_map_to_values(payload: bytes, kw: dict[str, Any], value: float) -> None:
    assert vt(payload, spec(values=WORDS, **kw)) == (value, None)


def test_word_mapped_to_nan_is_missing() -> None:
    r = parse(b"unavailable", spec(values=WORDS))
    assert r is not None and math.isnan(r.value) and r.quality == BAD


def test_unmapped_word_is_refused_by_name() -> None:
    with pytest.raises(PayloadError) as exc:
        parse(b'{"state": "Standby"}', spec(format="json", path="state", values=WORDS))
    assert exc.value.reason == "unmapped_word"
    assert "'Standby'" in exc.value.detail and "Online, Offline" in exc.value.detail


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({}, "at least one word"),
        ({"On": 1, "ON": 0}, "same word"),
        ({" ": 1}, "empty word"),
        ({"x": math.inf}, "finite"),
    ],
)
def test_words_validation(values: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        spec(values=values)


def test_optional_path_absent_is_no_reading() -> None:
    s = spec(format="json", path="params.switch:0.apower", optional=True)
    assert parse(b'{"params": {"ts": 1, "input:0": {"state": true}}}', s) is None
    assert vt(b'{"params": {"switch:0": {"apower": 8.5}}}', s) == (8.5, None)
    assert reason(b"{broken", s) == "bad_json"  # optional is about the path only
    assert reason(b'{"params": {"switch:0": {"apower": "x"}}}', s) == "not_numeric"
    assert reason(b'{"params": {}}', spec(format="json", path="params.x")) == "missing_path"


@pytest.mark.parametrize(
    ("doc", "unit", "value"),
    [
        (b'{"T": 68.0, "U": "F"}', "°C", 20.0),
        (b'{"T": 20.0, "U": "C"}', "°C", 20.0),
        (b'{"T": 293.15, "U": "K"}', "degC", 20.0),
        (b'{"T": 20.0, "U": "C"}', "°F", 68.0),
        (b'{"T": 760.0, "U": "mmHg"}', "hPa", 1013.25),
        (b'{"T": 36.0, "U": "km/h"}', "m/s", 10.0),
    ],
)
def test_unit_from_payload_is_converted(doc: bytes, unit: str, value: float) -> None:
    r = parse(doc, spec(format="json", path="T", unit_path="U"), unit=unit)
    assert r is not None and r.quality == GOOD
    assert r.value == pytest.approx(value, abs=0.01)


def test_unit_from_payload_refused() -> None:
    s = spec(format="json", path="T", unit_path="U")
    for doc, why in [
        (b'{"T": 1, "U": "hPa"}', "bad_unit"),  # not a temperature
        (b'{"T": 1, "U": "furlong"}', "bad_unit"),
        (b'{"T": 1, "U": 5}', "bad_unit"),
        (b'{"T": 1}', "missing_unit"),
    ]:
        with pytest.raises(PayloadError) as exc:
            parse(doc, s, unit="°C")
        assert exc.value.reason == why, doc


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"format": "json", "path": "v", "timezone": "Europe/Berlin"}, "only for a timestamp"),
        ({"timestamp_fallback": "reception"}, "only for a timestamp"),
        ({"optional": True}, "only for format = 'json'"),
        ({"unit_path": "U"}, "only for format = 'json'"),
        ({"format": "binary", "datatype": "u8", "values": {"on": 1}}, "for text formats"),
        ({"format": "json", "path": "v", "unit_path": "a..b"}, "not a JSON path"),
        ({"format": "json", "path": "v", "timestamp": "t", "timestamp_fallback": "x"}, "reject"),
    ],
)
def test_new_key_validation(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        MqttPointSettings.model_validate({"topic": "t", **kw})
