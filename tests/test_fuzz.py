"""Fuzzing every decoder on the gateway's input paths: whatever comes in, only the
decoder's own error type may come out (a crash would take a driver, the downlink or the
ingest down, or hide the real problem from the technician).

- config loading (`parse_config` -> ConfigError): random text, TOML-flavoured text, and
  structurally plausible documents built from the real keys with random values;
- BLE decoders (-> DecodeError): BTHome v2 plain and encrypted (the decrypted objects
  too), Ruuvi, iBeacon, Eddystone-TLM, generic layouts, whole adverts;
- MQTT payload parsing (-> PayloadError) for random point settings;
- downlink command parsing (-> CommandRefused);
- the wire (-> WireError): unwrap, parse_topic, decode_meta, decode_alarms (with rule
  actions too), decode_stats.

Each decoder meets at least 2000 generated inputs (tests that share an example run
several decoders on it). The codec has its own fuzz tests (tests/test_codec_fuzz.py).
Inputs that crashed a decoder are kept as plain tests at the end."""

from __future__ import annotations

import copy
import math
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, note, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.commands import CommandRefused, FirmwareUpdateCommand, WriteCommand, parse_command
from agent.config import (
    BufferConfig,
    ConfigError,
    DeviceConfig,
    GatewayConfig,
    PointConfig,
    UplinkConfig,
    parse_config,
)
from agent.stage_config import STAGE_TYPES
from common import wire
from drivers import registry
from drivers.base import Driver, NoSettings, PointSpec
from drivers.ble.advert import Advertisement, Decoded, DecodeError, uuid16
from drivers.ble.decoders import FORMATS, Decoders, beacons, bthome, generic, ruuvi
from drivers.ble.decoders.bthome_encryption import encrypt, make_cipher
from drivers.ble.decoders.generic import TYPES, FieldType, GenericField, GenericLayout
from drivers.mqtt.payloads import NOTES, REASONS, PayloadError, parse
from drivers.mqtt.settings import MqttPointSettings
from native.batch import BAD

# The same cases on every run (CI must not pass or fail by luck); CITYGW_FUZZ_RANDOM=1
# draws new ones, to explore.
FUZZ = settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=not os.environ.get("CITYGW_FUZZ_RANDOM"),
)

#: relative paths in fuzzed configs resolve here; it does not exist
BASE_DIR = Path(tempfile.gettempdir()) / "citygw-fuzz-no-such-dir"


@pytest.fixture(autouse=True, scope="module")
def _environment() -> Iterator[None]:
    """A set and an unset variable for ${VAR}; driver lookups remembered (each one scans
    the installed entry points, which would be most of a parse)."""
    found: dict[str, Any] = {}
    lookup = registry.load_driver

    def load_driver(name: str) -> type[Driver]:
        if name not in found:
            try:
                found[name] = lookup(name)
            except (registry.DriverNotFound, registry.DriverLoadError) as exc:
                found[name] = exc
        if isinstance(found[name], Exception):
            raise found[name]
        return found[name]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CITYGW_FUZZ_VAR", "from-the-environment")
        mp.delenv("CITYGW_FUZZ_UNSET", raising=False)
        mp.setattr(registry, "load_driver", load_driver)
        yield


# -- config ----------------------------------------------------------------------------

PASSWORD_MARK = "pw-MARK-7f3a"  # only ever generated as the uplink password

#: strings a technician might write anywhere (and a few an attacker might)
WORDS = [
    "", " ", "1s", "250ms", "5m", "1h", "0s", "-1s", "1e400s", "nan", "64MB", "1KB", "0KB",
    "mqtt://127.0.0.1", "mqtts://broker.city:8883", "mqtt://u:p@h", "mqtt://h/x", "http://x",
    "mqtt://h:0", "citygw", "a/+/b", "a//b", "gw-1", "gw 1", "x" * 70,
    "sim", "modbus", "mqtt", "ble", "nope", "float", "int", "bool", "flag", "drop", "clamp",
    "replace", "normal", "full", "tcp", "rtu", "rtu-over-tcp", "sdm630", "sdm120",
    "adam4017-level", "renke-wind-speed", "profiles/x.toml", "holding_register",
    "input_register", "coil", "discrete_input", "float32", "uint16", "int16", "string",
    "ABCD", "CDAB", "BADC", "DCBA", "json", "csv", "binary", "number", "sensors/{device}/air",
    "sensors/+/#", "a/#/b", "{point}", "data.pm25", "values[2]", "a..b", "reception",
    "epoch_s", "epoch_ms", "iso8601", "auto", "bthome", "ruuvi", "generic", "ibeacon",
    "eddystone-tlm", "A4:C1:38:A1:B2:C3", "not-a-mac", "0000fcd2", "fcd2", "replay", "bleak",
    "poll", "notify", "active", "passive", "raise", "info", "warning", "critical", "mean",
    "laeq", "min", "max", "std", "count", "0" * 32, "zz" * 16, "../../etc/passwd",
    "~no_such_user_citygw/x.pem", "~/ca.pem", "/dev/null", "/etc/hostname", "buffer.db",
    "\x00", "a\x00b", "${CITYGW_FUZZ_VAR}", "${CITYGW_FUZZ_UNSET}", "$${CITYGW_FUZZ_VAR}",
    "${not a name}", "${}", "${", "é", "µε", "°C",
]  # fmt: skip


def _keys(*models: Any) -> list[str]:
    return sorted({f.alias or name for m in models for name, f in m.model_fields.items()})


DRIVERS = {name: registry.load_driver(name) for name in ("sim", "modbus", "mqtt", "ble")}
GATEWAY_KEYS = [*_keys(GatewayConfig), "gateway_id"]
UPLINK_KEYS = [*_keys(UplinkConfig), "host", "pasword"]
BUFFER_KEYS = [*_keys(BufferConfig), "sync_mode"]
DEVICE_KEYS = _keys(DeviceConfig, *(d.device_model for d in DRIVERS.values()))
POINT_KEYS = _keys(PointConfig, *(d.point_model for d in DRIVERS.values()))
STAGE_KEYS = [*_keys(*STAGE_TYPES.values()), "for", "bogus"]
ODD_KEYS = ["", "x", "Name", "é", "a.b", "devices"]


class DocumentMaker:
    """Structurally plausible config documents: the real sections and keys (and a few
    made-up ones) with random values, starting from a valid skeleton. Driven by a
    `random.Random` that hypothesis seeds: generating such documents with hypothesis's
    own strategies costs ~10 ms each, ten times the parse."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def scalar(self) -> Any:
        r = self.rng
        kind = r.randrange(8)
        if kind <= 2:
            return r.choice(WORDS)
        if kind == 3:  # ASCII and any other code point (surrogates replaced)
            n = r.randrange(8)
            chars = [chr(r.choice([r.randrange(32, 127), r.randrange(0x10F800)])) for _ in range(n)]
            return "".join(chars).encode("utf-8", "replace").decode()
        if kind == 4:
            return r.choice([0, 1, -1, 7, 502, 65536, 2**31, 2**63 - 1, -(2**63), r.randrange(99)])
        if kind == 5:
            return r.choice([0.0, -0.0, 0.5, 1e-300, 1e308, -2.5, math.inf, -math.inf, math.nan,
                             r.uniform(-1e3, 1e3)])  # fmt: skip
        if kind == 6:
            return r.random() < 0.5
        return r.choice([[], {}, [r.choice(WORDS)], [1, 2], {"a": 1}])

    def value(self, keys: list[str]) -> Any:
        r = self.rng.random()
        if r < 0.8:
            return self.scalar()
        if r < 0.9:
            return [self.scalar() for _ in range(self.rng.randrange(3))]
        return {self.rng.choice(keys): self.scalar() for _ in range(self.rng.randrange(3))}

    def table(self, keys: list[str], base: dict[str, Any], **special: Any) -> dict[str, Any]:
        r = self.rng
        out = dict(base)
        if base and r.random() < 0.1:
            del out[r.choice(sorted(out))]
        while r.random() < 0.35:
            key = r.choice(keys) if r.random() < 0.9 else r.choice(ODD_KEYS)
            out[key] = special[key]() if key in special else self.value(keys)
        return out

    def stage(self) -> dict[str, Any]:
        kind = self.rng.choice([*STAGE_TYPES, "bogus"])
        return {"type": kind, **self.table(STAGE_KEYS, {})}

    def point(self) -> dict[str, Any]:
        r = self.rng
        return self.table(
            POINT_KEYS,
            {"name": r.choice(["p", "q", "level"])},
            pipeline=lambda: [self.stage() for _ in range(r.randrange(3))],
        )

    def device(self) -> dict[str, Any]:
        r = self.rng
        dev = self.table(DEVICE_KEYS, {"name": r.choice(["d", "e", "d"]), "poll": "1s"})
        dev["driver"] = r.choice([*DRIVERS, *DRIVERS, "nope", 7])
        dev["points"] = [self.point() for _ in range(r.randrange(4))]
        return dev

    def document(self) -> dict[str, Any]:
        r = self.rng
        password = lambda: r.choice([PASSWORD_MARK, 12, [PASSWORD_MARK]])  # noqa: E731
        doc: dict[str, Any] = {
            "gateway": self.table(GATEWAY_KEYS, {"id": "gw-fuzz"}),
            "uplink": self.table(UPLINK_KEYS, {"broker": "mqtt://127.0.0.1"}, password=password),
            "buffer": self.table(BUFFER_KEYS, {}),
            "devices": [self.device() for _ in range(r.randrange(4))],
        }
        if r.random() < 0.1:
            del doc[r.choice(sorted(doc))]
        if r.random() < 0.1:
            doc[r.choice(ODD_KEYS)] = self.scalar()
        return doc


def toml_key(key: str) -> str:
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return key
    return toml_string(key)


def toml_string(s: str) -> str:
    out = ['"']
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join([*out, '"'])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(doc: dict[str, Any]) -> str:
    """Tables as [headers] (devices as [[devices]]), the rest inline."""
    lines: list[str] = []
    for key, value in doc.items():
        if not isinstance(value, dict | list):
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, value in doc.items():
        if isinstance(value, dict):
            lines.append(f"[{toml_key(key)}]")
            lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(d, dict) for d in value):
            for item in value:
                lines.append(f"[[{toml_key(key)}]]")
                lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
        elif isinstance(value, list):
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


#: Crashes this fuzzing found in code outside the security change (exception type, file,
#: function): reported to their owners, each pinned by a strict xfail test at the end.
#: Remove an entry (and its xfail mark) when its fix lands.
def load(text: str) -> None:
    """parse_config: a Config or a ConfigError that lists its issues, nothing else."""
    try:
        parse_config(text, source="fuzz.toml", base_dir=BASE_DIR)
    except ConfigError as exc:
        assert exc.issues
        assert all(i.source == "fuzz.toml" and i.message for i in exc.issues)
        assert PASSWORD_MARK not in str(exc)


@FUZZ
@given(
    st.text(max_size=200),
    st.text(alphabet="[]{}=\"'.,#\n\t _-:$~/\\0123456789abdeginoprstuxyz", max_size=120),
)
def test_config_random_text(text: str, tomlish: str) -> None:
    """Any text, and text made of TOML's punctuation and a few letters."""
    load(text)
    load(tomlish)


@FUZZ
@given(st.randoms(use_true_random=True))  # seeded by hypothesis: derandomized too
def test_config_plausible_documents(rng: random.Random) -> None:
    text = to_toml(DocumentMaker(rng).document())
    note(text)
    load(text)


# -- BLE -------------------------------------------------------------------------------

MAC = "A4:C1:38:A1:B2:C3"
MAC_BYTES = bytes.fromhex(MAC.replace(":", ""))
KEY = bytes(range(16))
CIPHER = make_cipher(KEY)
ADDRESSES = st.sampled_from([MAC, "a4:c1:38:a1:b2:c3", "not-a-mac", "", "A4:C1:38:A1:B2"])


def only_decode_error(fn: Any, *args: Any) -> Any:
    """The decoder's result, or None for its DecodeError; anything else fails."""
    try:
        result = fn(*args)
    except DecodeError as exc:
        assert exc.reason and exc.format
        return None
    decoded = result[0] if isinstance(result, tuple) else result  # bthome: (Decoded, counter)
    assert decoded is None or isinstance(decoded, Decoded)
    if decoded is not None:
        assert all(isinstance(m.value, float) for m in decoded.measurements)
    return result


@FUZZ
@given(
    st.integers(0, 255) | st.sampled_from([0x40, 0x41, 0x42, 0x43, 0x44, 0x47]),
    st.binary(max_size=48),
    ADDRESSES,
    st.none() | st.integers(0, 2**32),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_bthome(
    info: int, data: bytes, address: str, last: int | None, flag: bool, counter: int
) -> None:
    """Random service data (with and without a bind key), and adverts that authenticate,
    so that the decrypted objects meet the object parser too."""
    cipher = CIPHER if flag else None
    only_decode_error(bthome.decode, bytes([info]) + data, address, cipher, last)
    device_info = 0x41 | (0x02 if flag else 0)
    sealed = encrypt(KEY, MAC_BYTES, device_info, counter, data)
    if flag:  # the MAC in the advert
        sealed = sealed[:1] + MAC_BYTES[::-1] + sealed[1:]
    result = only_decode_error(bthome.decode, sealed, address, CIPHER, last)
    if result is not None:
        assert result[1] == counter


def _layouts(n: int) -> list[GenericLayout]:
    """Generic layouts of every field type, byte order, offset (past the end too), scale
    (zero, huge, infinite, NaN) and minimum length; made once (generating them for every
    example would cost most of the test)."""
    rng = random.Random(5)
    numbers = [1.0, 0.1, -2.5, 0.0, 1e308, -1e308, math.inf, math.nan, 1e-300]
    out = []
    for _ in range(n):
        fields = tuple(
            GenericField(
                name=f"f{j}",
                offset=rng.randrange(42),
                type=cast(FieldType, rng.choice(sorted(TYPES))),
                endian=rng.choice(["little", "big"]),
                scale=rng.choice(numbers),
                offset_value=rng.choice(numbers),
            )
            for j in range(rng.randrange(5))
        )
        where = rng.randrange(3)
        out.append(
            GenericLayout(
                company_id=0x1234 if where == 0 else None,
                service_uuid="181c" if where == 1 else None,
                fields=fields,
                min_length=rng.choice([0, 0, 4, 20, 50]),
            )
        )
    return out


LAYOUTS = st.sampled_from(_layouts(200))


@FUZZ
@given(st.binary(max_size=40), st.booleans(), LAYOUTS)
def test_fixed_and_generic_layouts(data: bytes, prefixed: bool, layout: GenericLayout) -> None:
    """Ruuvi, iBeacon and Eddystone-TLM, each on the same bytes behind its own header (or
    none), and a generic layout on them."""
    only_decode_error(ruuvi.decode, (b"\x05" if prefixed else b"") + data)
    only_decode_error(beacons.decode_ibeacon, (b"\x02\x15" if prefixed else b"") + data)
    only_decode_error(beacons.decode_eddystone_tlm, (b"\x20\x00" if prefixed else b"") + data)
    only_decode_error(generic.decode, layout, data)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from([bthome.UUID, beacons.EDDYSTONE_UUID, uuid16(0x181C), "x"]),
        st.binary(max_size=30),
        max_size=3,
    ),
    st.dictionaries(st.sampled_from([0x0499, 0x004C, 0x1234, 0x0059]), st.binary(max_size=30)),
    st.sampled_from(["auto", *FORMATS, "bogus"]),
    ADDRESSES,
    LAYOUTS,
)
def test_whole_adverts(
    service: dict[str, bytes],
    manufacturer: dict[int, bytes],
    fmt: str,
    address: str,
    layout: GenericLayout,
) -> None:
    """The `Decoders` front: format choice, bind keys, replay counters, layouts."""
    decoders = Decoders(bind_keys={MAC: KEY}, generic={address: layout, MAC: layout})
    adv = Advertisement(address, 0, -60, service_data=service, manufacturer_data=manufacturer)
    only_decode_error(decoders.decode, adv, fmt)


# -- JSON messages ----------------------------------------------------------------------

#: values of the wrong type or out of range, for any field of a JSON message (copied:
#: mutated() changes them in place)
ODD: st.SearchStrategy[Any] = st.sampled_from(
    [None, True, False, 0, -1, 2**32, 2**63, 2**64 - 1, -(2**63), 1.5, -0.0, 1e308, "", "x",
     "1", "nan", [], [1], ["x"], {}, {"a": 1}, [[]], {"": None}]
).map(copy.deepcopy)  # fmt: skip


def _paths(obj: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [at]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*at, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*at, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> bytes:
    """A valid message with up to two changes where a decoder must look: a value
    replaced by an odd one, a key removed, an unknown key added."""
    obj = draw(valid)
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(_paths(obj)))
        if not path:
            obj = draw(ODD)
            continue
        *parents, last = path
        node = obj
        for step in parents:
            node = node[step]
        action = draw(st.integers(0, 3))
        if action == 0 and isinstance(node, dict):
            del node[last]
        elif action == 1 and isinstance(node, dict):
            node[f"zz{last}"] = draw(ODD)
        else:
            node[last] = draw(ODD)
    return json_payload(obj)


def json_payload(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc)
    except TypeError:  # an integer beyond 64 bits: its Python text, not quite JSON
        return repr(doc).encode()


def framed(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Mostly mutated valid messages; also raw bytes, and JSON that is not an object."""
    structured = mutated(valid)
    return st.one_of(
        structured, structured, structured, st.binary(max_size=40), ODD.map(json_payload)
    )


# -- MQTT payloads ---------------------------------------------------------------------

TEXT_VALUES = st.sampled_from(
    ["1795930581", "1795930581123", "2026-11-29T09:24:57", "2026-11-29T09:24:57+01:00",
     "9999-12-31T23:59:59", "0001-01-01T00:00:00+14:00", "1e400", "nan", "-inf", "12.5",
     " 3 ", "on", "OFF", "0x10", "1_000", "١٢", "", '"7"']
)  # fmt: skip
TS_FORMATS = st.sampled_from(["auto", "epoch_s", "epoch_ms", "iso8601"])


@st.composite
def point_settings(draw: st.DrawFn) -> MqttPointSettings:
    fmt = draw(st.sampled_from(["number", "json", "csv", "binary"]))
    kw: dict[str, Any] = {"topic": "t", "format": fmt}
    if fmt == "json":
        kw["path"] = draw(st.sampled_from(["a", "a.b", "[0]", "data.a[1]", "t", "b[2].a"]))
        kw["optional"] = draw(st.booleans())
        if draw(st.booleans()):
            kw["unit_path"] = draw(st.sampled_from(["t", "a.t"]))
        if draw(st.booleans()):
            kw["timestamp"] = draw(st.sampled_from(["t", "a.t", "data"]))
            kw["timestamp_format"] = draw(TS_FORMATS)
            kw["timestamp_fallback"] = draw(st.sampled_from(["reject", "reception"]))
            if draw(st.booleans()):
                kw["timezone"] = "Europe/Berlin"
    elif fmt == "csv":
        kw["column"] = draw(st.integers(0, 4))
        kw["delimiter"] = draw(st.sampled_from([",", ";", "\t", " "]))
        if draw(st.booleans()):
            kw["timestamp"] = draw(st.integers(0, 4))
            kw["timestamp_format"] = draw(TS_FORMATS)
            kw["timestamp_fallback"] = draw(st.sampled_from(["reject", "reception"]))
            if draw(st.booleans()):
                kw["timezone"] = "America/New_York"
    elif fmt == "binary":
        kw["datatype"] = draw(st.sampled_from(["u8", "i8", "u16", "i16", "u32", "i32", "f32",
                                               "f64"]))  # fmt: skip
        kw["byte_offset"] = draw(st.integers(0, 20))
        kw["endian"] = draw(st.sampled_from(["big", "little"]))
    if fmt != "binary" and draw(st.booleans()):
        kw["values"] = {"on": 1.0, "Offline": 0.0, "unavailable": math.nan}
    if draw(st.booleans()):
        kw["scale"] = draw(st.sampled_from([0.1, -1e308, 1e308, 1e-300]))
        kw["offset"] = draw(st.sampled_from([0.0, -1e308, 1e308]))
    try:
        return MqttPointSettings.model_validate(kw)
    except ValidationError:
        assume(False)
        raise


DOCS = st.fixed_dictionaries(
    {
        "a": st.fixed_dictionaries({"b": st.floats(), "t": TEXT_VALUES | st.integers()}),
        "t": TEXT_VALUES | st.integers() | st.floats(),
        "data": st.fixed_dictionaries({"a": st.lists(st.integers() | TEXT_VALUES, max_size=3)}),
        "b": st.lists(st.fixed_dictionaries({"a": st.floats() | TEXT_VALUES}), max_size=3),
    }
)
CELLS = st.integers() | st.floats() | TEXT_VALUES | st.text(max_size=4)
PAYLOADS = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=20).map(str.encode),
    TEXT_VALUES.map(str.encode),
    mutated(DOCS),
    mutated(DOCS),
    st.lists(CELLS, max_size=5).map(lambda cells: ",".join(map(str, cells)).encode()),
)


@FUZZ
@given(point_settings(), PAYLOADS)
def test_mqtt_payloads(spec: MqttPointSettings, payload: bytes) -> None:
    try:
        reading = parse(payload, spec)
    except PayloadError as exc:
        assert exc.reason in REASONS
    else:
        if reading is not None:  # None: an optional path absent
            value, ts, quality, note = reading
            assert isinstance(value, float)
            assert math.isfinite(value) == (quality != BAD)
            assert ts is None or isinstance(ts, int)
            assert note is None or note in NOTES


# -- downlink commands -----------------------------------------------------------------


def _spec(key: str, writable: bool, lo: float | None, hi: float | None) -> PointSpec:
    return PointSpec(1, key, key.split("/")[1], "", "float", writable, NoSettings(), lo, hi)


CMD_POINTS = {
    "pump/setpoint": _spec("pump/setpoint", True, 0.0, 100.0),
    "pump/level": _spec("pump/level", False, None, None),
    "pump/open": _spec("pump/open", True, None, None),
    "pump/low": _spec("pump/low", True, -1e308, -1e300),
}
CMD_DEVICES: dict[str, str | None] = {"pump": "the sim driver cannot update firmware", "mcu": None}
COMMANDS = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=130),
        "op": st.just("write"),
        "point": st.sampled_from([*CMD_POINTS, "pump/none", "pump", "/"]),
        "value": st.integers() | st.floats() | st.booleans(),
    }
) | st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=130),
        "op": st.just("firmware_update"),
        "device": st.sampled_from([*CMD_DEVICES, "nope", ""]) | st.integers(),
        "url": st.sampled_from(["https://fw.example/a.cgfw", "http://x/y", "https://", ""])
        | st.text(max_size=40),
    },
    optional={
        "sha256": st.sampled_from(["ab" * 32, "zz" * 32, "ab"]) | st.integers(),
        "force": st.booleans() | st.integers() | st.none(),
    },
)


@FUZZ
@given(framed(COMMANDS))
@example(b'{"id": "big", "op": "write", "point": "pump/open", "value": 1, "pad": "' + b"x" * 4100)
def test_commands(payload: bytes) -> None:
    try:
        cmd = parse_command(payload, CMD_POINTS, CMD_DEVICES)
    except CommandRefused as exc:
        assert str(exc)
        assert exc.command_id is None or isinstance(exc.command_id, str)
    else:
        if isinstance(cmd, FirmwareUpdateCommand):
            assert CMD_DEVICES.get(cmd.device, "unknown") is None
            assert cmd.url.startswith("https://") and isinstance(cmd.force, bool)
            assert cmd.sha256 is None or len(cmd.sha256) == 32
            return
        assert isinstance(cmd, WriteCommand) and cmd.point.writable
        assert math.isfinite(cmd.value)
        lo, hi = cmd.point.min, cmd.point.max
        assert (lo is None or cmd.value >= lo) and (hi is None or cmd.value <= hi)


# -- wire ------------------------------------------------------------------------------


def only_wire_error(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except wire.WireError:
        return None


STREAM = "0123456789abcdef0123456789abcdef"
HEADERS = st.builds(
    lambda magic, version, lane, seq, n, body: (
        wire.HEADER.pack(magic, version, lane, bytes(16), seq, n) + body
    ),
    st.sampled_from([wire.MAGIC, b"CH", b"\x00\x00"]),
    st.sampled_from([wire.VERSION, 0, 2, 255]),
    st.integers(0, 255),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.binary(max_size=20),
)
LEVELS = st.sampled_from(
    ["citygw", "gw-1", "up", "batch", "alarm", "meta", "state", "down", "cmd", "resp",
     "stats", "", "+", "#", "$share", "\x00", "é"]
)  # fmt: skip


@FUZZ
@given(
    st.binary(max_size=60) | HEADERS | HEADERS.map(lambda b: b[: len(b) // 2]),
    st.lists(LEVELS, max_size=6).map("/".join) | st.text(max_size=30),
    LEVELS,
)
def test_wire_envelope_and_topic(data: bytes, topic: str, prefix: str) -> None:
    env = only_wire_error(wire.unwrap, data)
    if env is not None:
        assert env.lane in wire.LANES and len(env.stream) == 32
    found = only_wire_error(wire.parse_topic, topic, prefix or "citygw")
    if found is not None:
        gateway, kind = found
        assert kind in wire.KINDS and "/" not in gateway


META_POINT = st.fixed_dictionaries(
    {"id": st.integers(0, 2**32 - 1), "key": st.sampled_from(["d/p", "d/q", "e/p"])},
    optional={
        "device": st.just("d"),
        "name": st.just("p"),
        "unit": st.just("m") | st.none(),
        "driver": st.just("sim"),
        "type": st.just("float"),
    },
)
META = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "gateway": st.sampled_from(["gw-1", "", "a/b", "x+"]),
        "stream": st.sampled_from([STREAM, "0" * 31, "zz" * 16, STREAM.upper()]),
        "points": st.lists(META_POINT, max_size=3),
    },
    optional={
        "site": st.text(max_size=5) | st.none(),
        "location": st.fixed_dictionaries({"lat": st.floats(), "lon": st.floats()}) | st.none(),
    },
)
ALARM_EVENT = st.fixed_dictionaries(
    {
        "point": st.integers(0, 2**32),
        "rule": st.sampled_from(["high", ""]),
        "severity": st.sampled_from(["info", "warning", "critical", "bogus"]),
        "state": st.sampled_from(["raise", "clear", "bogus"]),
        "ts": st.integers(-(2**63), 2**63),
        "value": st.floats() | st.integers() | st.none(),
        "since": st.integers(-(2**63), 2**63),
    }
)
_RULE_TEXT_OK = st.sampled_from(["level", "underpass/level", "é", "x" * 1024])
#: mostly valid, so that whole actions get through to the later checks too
RULE_TEXT = _RULE_TEXT_OK | _RULE_TEXT_OK | st.sampled_from(["", "a\x00b", "\ud800", "x" * 1025])
RULE_INPUT = st.fixed_dictionaries(
    {
        "name": RULE_TEXT,
        "point": RULE_TEXT,
        "value": st.floats() | st.integers() | st.none(),
        "ts": st.integers(-(2**63), 2**63),
        "quality": st.integers(-1, 4),
    }
)
RULE_ACTION = st.fixed_dictionaries(
    {
        "rule": RULE_TEXT,
        "ts": st.integers(-(2**63), 2**63),
        "transition": st.sampled_from([*wire.RULE_TRANSITIONS, "bogus"]),
        "action": st.sampled_from([*wire.RULE_ACTIONS, "bogus"]),
        "outcome": st.sampled_from([*wire.RULE_OUTCOMES, "bogus"]),
        "target": RULE_TEXT,
        "value": st.floats() | st.integers() | st.none(),
        "written": st.floats() | st.integers() | st.none(),
        "detail": RULE_TEXT,
        "attempts": st.integers(-1, 2**32),
        "inputs": st.lists(RULE_INPUT, max_size=3) | st.lists(RULE_INPUT, min_size=64, max_size=66),
    }
)
ALARMS = st.fixed_dictionaries(
    {"v": st.just(1), "gateway": st.just("gw-1"), "events": st.lists(ALARM_EVENT, max_size=3)},
    optional={"actions": st.lists(RULE_ACTION, max_size=3)},  # local rules' actions
)
#: alarm-lane bodies that always carry rule actions (and maybe no events)
ALARM_ACTIONS = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "gateway": st.just("gw-1"),
        "events": st.lists(ALARM_EVENT, max_size=1),
        "actions": st.lists(RULE_ACTION, min_size=1, max_size=3),
    }
)
INFO_TEXT = st.sampled_from(["", "SN-4711", "a\x00b", "\ud800", "x" * 1025])
STATS = st.fixed_dictionaries(
    {
        "v": st.just(1),
        "gateway": st.just("gw-1"),
        **{f: st.integers(-1, 2**63) for f in wire.STATS_FIELDS},
    },
    optional={  # device information (issue 13)
        "devices": st.none()
        | st.lists(st.integers(), max_size=2)
        | st.dictionaries(
            INFO_TEXT,
            st.dictionaries(INFO_TEXT, INFO_TEXT | st.integers() | st.none(), max_size=3)
            | INFO_TEXT,
            max_size=3,
        )
    },
)


@FUZZ
@given(framed(META), framed(ALARMS), framed(STATS))
def test_wire_json_messages(meta: bytes, alarms: bytes, stats: bytes) -> None:
    """decode_meta, decode_alarms and decode_stats, each on its own kind of message."""
    only_wire_error(wire.decode_meta, meta)
    only_wire_error(wire.decode_alarms, alarms)
    only_wire_error(wire.decode_stats, stats)


@FUZZ
@given(framed(ALARM_ACTIONS))
def test_wire_alarm_actions(alarms: bytes) -> None:
    """decode_alarms on bodies with local rules' actions: WireError only, and what it
    accepts is what the spec allows."""
    decoded = only_wire_error(wire.decode_alarms, alarms)
    if decoded is not None:
        for a in decoded[2]:
            assert a.rule and a.transition in wire.RULE_TRANSITIONS
            assert a.action in wire.RULE_ACTIONS and a.outcome in wire.RULE_OUTCOMES
            assert a.attempts >= 0 and len(a.inputs) <= wire.MAX_RULE_INPUTS
            assert all(0 <= i.quality <= 3 and i.name and i.point for i in a.inputs)


# -- inputs that crashed a decoder -----------------------------------------------------


def test_generators_make_valid_input_too() -> None:
    """The structured generators are not only garbage: their skeletons are valid."""
    parse_config(to_toml({"gateway": {"id": "g"}, "uplink": {"broker": "mqtt://h"}}))
    assert wire.decode_alarms(json_payload({"v": 1, "gateway": "g", "events": []}))[0] == "g"
    read = {"name": "n", "point": "d/p", "value": None, "ts": 0, "quality": 0}
    action = {"rule": "r", "ts": 1, "transition": "start", "action": "write", "outcome": "done",
              "target": "p/q", "value": 1.0, "written": 1.0, "detail": "", "attempts": 1,
              "inputs": [read]}  # fmt: skip
    body = {"v": 1, "gateway": "g", "events": [], "actions": [action]}
    assert len(wire.decode_alarms(json_payload(body))[2]) == 1


@pytest.mark.parametrize("field", ["severity", "state"])
@pytest.mark.parametrize("odd", [[], {}, ["info"]])
def test_alarm_with_a_list_or_object_where_a_word_belongs(field: str, odd: object) -> None:
    """Found by fuzzing: a JSON list or object as severity or state raised TypeError
    (unhashable) instead of WireError."""
    event = {"point": 1, "rule": "high", "severity": "info", "state": "raise", "ts": 1,
             "value": 1.0, "since": 1, field: odd}  # fmt: skip
    with pytest.raises(wire.WireError, match=f"'{field}' must be"):
        wire.decode_alarms(json_payload({"v": 1, "gateway": "gw-1", "events": [event]}))


CONFIG_HEAD = '[gateway]\nid = "g"\n[uplink]\nbroker = "mqtt://127.0.0.1"\n'


@pytest.mark.parametrize(
    ("section", "key"),
    [("", "ca_file"), ("", "password_file"), ("[buffer]\n", "path")],
)
def test_home_of_an_unknown_user_is_a_config_error(section: str, key: str) -> None:
    """Found by fuzzing: "~user/..." of a user without a home raised RuntimeError."""
    where = "~no_such_user_citygw/x"
    with pytest.raises(ConfigError) as err:
        parse_config(f'{CONFIG_HEAD}{section}{key} = "{where}"\n')
    table = "buffer" if section else "uplink"
    assert str(err.value) == (
        f"<string>: {table}.{key}: cannot expand '{where}': no such user's home; "
        "write the full path"
    )


@pytest.mark.parametrize(
    "device",
    [
        # drivers/modbus/settings.py _bool_in_bit_tables: TypeError (unhashable list)
        'name = "d"\ndriver = "modbus"\nhost = "127.0.0.1"\n[[devices.points]]\n'
        'name = "p"\ntable = []',
        # agent/stage_config.py _whole_ms: OverflowError (int of an infinite window)
        'name = "d"\ndriver = "sim"\n[[devices.points]]\nname = "p"\n'
        'pipeline = [{type = "aggregate", window = inf, functions = ["mean"]}]',
        # drivers/ble/settings.py resolve_replay_file: ValueError (NUL in a path)
        'name = "d"\ndriver = "ble"\nsource = "replay"\nreplay_file = "a\\u0000b"\n'
        'address = "A4:C1:38:A1:B2:C3"',
        # drivers/mqtt/settings.py _check_file: RuntimeError ("~user" without a home)
        'name = "d"\ndriver = "mqtt"\nbroker = "mqtt://127.0.0.1"\n'
        'ca_file = "~no_such_user_citygw/ca.pem"',
        # drivers/modbus/profiles.py load_profile: RuntimeError ("~user" without a home)
        'name = "d"\ndriver = "modbus"\nhost = "127.0.0.1"\n'
        'profile = "~no_such_user_citygw/x.toml"',
        # drivers/modbus/profiles.py load_profile: ValueError (NUL in a path)
        'name = "d"\ndriver = "modbus"\nhost = "127.0.0.1"\nprofile = "a\\u0000b.toml"',
    ],
    ids=[
        "modbus-table-list",
        "aggregate-window-inf",
        "ble-replay-nul",
        "mqtt-ca-tilde",
        "modbus-profile-tilde",
        "modbus-profile-nul",
    ],
)
def test_config_crashes_found_by_fuzzing(device: str) -> None:
    """Each of these raised its own exception instead of ConfigError."""
    with pytest.raises(ConfigError):
        parse_config(CONFIG_HEAD + "[[devices]]\n" + device + "\n")
