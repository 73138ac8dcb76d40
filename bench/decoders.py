"""Decoder throughput: a mixed corpus of BLE advertisements and MQTT sensor payloads
through the sans-I/O decoders, single-threaded, for a bounded number of rounds.

BLE corpus: BTHome v2 (plain, several objects; and encrypted with a bind key), Ruuvi
RAWv2, iBeacon and Eddystone-TLM adverts. MQTT corpus: plain numbers, JSON with a nested
path and a payload timestamp, CSV, and a binary layout. Baseline in the same run:
`orjson.loads` of the same JSON payloads (the floor of any JSON decoding) and a bare
`bytes.hex()` of each advert (the floor of touching the bytes in Python), so the
figures read as ratios to what this machine does anyway.

Last line:  decoders: ble_adverts_per_s=<N> mqtt_msgs_per_s=<N>
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from drivers.ble.advert import Advertisement
from drivers.ble.decoders import Decoders
from drivers.ble.decoders.bthome_encryption import encrypt
from drivers.mqtt.payloads import parse
from drivers.mqtt.settings import MqttPointSettings

BTHOME = "0000fcd2-0000-1000-8000-00805f9b34fb"
EDDYSTONE = "0000feaa-0000-1000-8000-00805f9b34fb"
KEY = bytes.fromhex("231d39c1d7cc1ab1aee224cd096db932")
N_ROUNDS = 20_000  # each round decodes the whole corpus once


def ble_corpus(rounds: int) -> list[list[Advertisement]]:
    """One list of adverts per round; encrypted adverts get a fresh counter each round
    (a replayed counter would be rejected, as it should)."""
    plain = bytes.fromhex("40" "0009" "02ca09" "03bf13" "0c020c" "0d120c")  # fmt: skip
    ruuvi = bytes.fromhex("0512FC5394C37C0004FFFC040CAC364200CDCBB8334C884F")
    ibeacon = bytes.fromhex("0215e2c56db5dffb48d2b060d0f5a71096e00007002ac5")
    tlm = bytes.fromhex("2000" "0bb8" "1780" "00000100" "00000200")  # fmt: skip
    mac = "54:48:E6:8F:80:A5"
    out = []
    for r in range(rounds):
        sealed = encrypt(KEY, bytes.fromhex(mac.replace(":", "")), 0x41, r + 1,
                         bytes.fromhex("02ca0903bf13"))  # fmt: skip
        out.append([
            Advertisement("A4:C1:38:00:00:01", r, -60, service_data={BTHOME: plain}),
            Advertisement(mac, r, -66, service_data={BTHOME: sealed}),
            Advertisement("C8:25:64:3E:9A:01", r, -70, manufacturer_data={0x0499: ruuvi}),
            Advertisement("F0:0D:CA:FE:00:07", r, -80, manufacturer_data={0x004C: ibeacon}),
            Advertisement("F0:0D:CA:FE:00:08", r, -75, service_data={EDDYSTONE: tlm}),
        ])  # fmt: skip
    return out


def mqtt_corpus() -> list[tuple[bytes, MqttPointSettings]]:
    def spec(**kw: object) -> MqttPointSettings:
        return MqttPointSettings.model_validate({"topic": "t", **kw})

    return [
        (b"61.5", spec()),
        (orjson.dumps({"ts": 1795930581.25, "data": {"pm25": 12.3, "no2": 20.1}}),
         spec(format="json", path="data.pm25", timestamp="ts", timestamp_format="epoch_s")),
        (b"2026-11-29T07:00:00Z,17.25,63.0",
         spec(format="csv", column=1, timestamp=0, timestamp_format="iso8601")),
        (struct.pack(">HfB", 7, 3.25, 1), spec(format="binary", byte_offset=2, datatype="f32")),
    ]  # fmt: skip


def rate(n: int, fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    rounds = ble_corpus(N_ROUNDS)
    n_ble = sum(len(r) for r in rounds)
    decoders = Decoders(bind_keys={"54:48:E6:8F:80:A5": KEY})

    def decode_ble() -> None:
        for adverts in rounds:
            for adv in adverts:
                if decoders.decode(adv) is None:
                    raise AssertionError(f"not decoded: {adv}")

    def touch_ble() -> None:
        for adverts in rounds:
            for adv in adverts:
                for data in (*adv.service_data.values(), *adv.manufacturer_data.values()):
                    data.hex()

    payloads = mqtt_corpus()
    n_mqtt = N_ROUNDS * len(payloads)

    def decode_mqtt() -> None:
        for _ in range(N_ROUNDS):
            for payload, spec in payloads:
                parse(payload, spec)

    json_payload = payloads[1][0]

    def json_floor() -> None:
        for _ in range(n_mqtt):
            orjson.loads(json_payload)

    ble = rate(n_ble, decode_ble)
    ble_floor = rate(n_ble, touch_ble)
    mqtt = rate(n_mqtt, decode_mqtt)
    floor = rate(n_mqtt, json_floor)
    print(f"corpus: {n_ble} BLE adverts (5 formats, 1 in 5 encrypted), {n_mqtt} MQTT payloads "
          "(number, JSON, CSV, binary)")  # fmt: skip
    print(f"baseline (same run): bytes.hex of each advert {ble_floor:,.0f}/s; "
          f"orjson.loads of the JSON payload {floor:,.0f}/s")  # fmt: skip
    print(f"ratios: BLE decode / hex floor = {ble / ble_floor:.3f}; "
          f"MQTT parse / orjson floor = {mqtt / floor:.3f}")  # fmt: skip
    print(f"decoders: ble_adverts_per_s={ble:.0f} mqtt_msgs_per_s={mqtt:.0f}")


if __name__ == "__main__":
    main()
