"""Real BLE advertisements, decoded by citygw and checked against the values that
independent decoders or the format's own documents give for them.

The adverts and their sources (repository, path and commit, or URL) are in
tests/data/ble_adverts/*.json, one file per source:
- bthome_ble_v2.json: the BTHome v2 vectors of bthome-ble's tests (Home Assistant's
  decoder), encrypted ones with their bind keys;
- ruuvi_df5.json: the four test vectors of Ruuvi's data format 5 page;
- beacons.json: iBeacon and Eddystone adverts of beacontools' and ibeacon-ble's tests;
- atc_pvvx.json: ATC1441 and pvvx thermometer adverts of bleparser's tests, decoded
  with generic layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from drivers.ble.advert import Advertisement, normalize_uuid, uuid16
from drivers.ble.decoders import Decoded, DecodeError, Decoders
from drivers.ble.driver import generic_layout
from drivers.ble.settings import GenericLayoutSettings

DATA = Path(__file__).resolve().parent / "data" / "ble_adverts"
BTHOME = uuid16(0xFCD2)


def load(name: str) -> dict[str, Any]:
    corpus: dict[str, Any] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return corpus


def ids(adverts: list[dict[str, Any]]) -> list[str]:
    return [str(a.get("test") or a.get("case")) for a in adverts]


def assert_values(decoded: Decoded | None, expected: dict[str, float]) -> None:
    assert decoded is not None
    got = {m.name: m.value for m in decoded.measurements}
    assert got.keys() == expected.keys(), got
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, got[name], value)


# -- BTHome v2: bthome-ble's tests ----------------------------------------------------------

BTHOME_ADVERTS = load("bthome_ble_v2.json")["adverts"]


@pytest.mark.parametrize("advert", BTHOME_ADVERTS, ids=ids(BTHOME_ADVERTS))
def test_bthome_ble_vectors(advert: dict[str, Any]) -> None:
    address = advert["address"]
    keys = {address: bytes.fromhex(advert["bind_key"])} if "bind_key" in advert else {}
    adv = Advertisement(
        address, 0, -60, service_data={BTHOME: bytes.fromhex(advert["service_data"])}
    )
    if "error" in advert:
        with pytest.raises(DecodeError) as info:
            Decoders(bind_keys=keys).decode(adv)
        assert (info.value.format, info.value.reason) == ("bthome", advert["error"])
        return
    decoded = Decoders(bind_keys=keys).decode(adv)
    assert decoded is not None and decoded.format == "bthome"
    assert decoded.encrypted == ("bind_key" in advert)
    assert [e.reason for e in decoded.dropped] == advert.get("dropped", [])
    assert {i.name: i.value for i in decoded.info} == advert.get("info", {})
    if "packet_id" in advert:
        assert decoded.packet_id == advert["packet_id"]
    if advert["measurements"] is not None:
        assert_values(decoded, advert["measurements"])


def test_bthome_corpus_covers_the_source() -> None:
    # every kind of case the source has: plain, encrypted, MAC included, errors, events, text
    assert len(BTHOME_ADVERTS) >= 80
    assert sum("bind_key" in a for a in BTHOME_ADVERTS) >= 6
    reasons = {a["error"] for a in BTHOME_ADVERTS if "error" in a}
    assert reasons >= {"unsupported_version", "bad_mic", "truncated", "unknown_object"}
    assert reasons >= {"unknown_event", "bad_text"}


# -- Ruuvi data format 5: the vectors of docs.ruuvi.com ---------------------------------------

RUUVI = load("ruuvi_df5.json")["adverts"]

#: the page's field -> (citygw measurement, factor to citygw's unit)
RUUVI_FIELDS = {
    "temperature": ("temperature", 1),
    "humidity": ("humidity", 1),
    "pressure_pa": ("pressure", 0.01),  # hPa
    "acceleration_x_g": ("acceleration_x", 1000),  # mG
    "acceleration_y_g": ("acceleration_y", 1000),
    "acceleration_z_g": ("acceleration_z", 1000),
    "tx_power": ("tx_power", 1),
    "voltage": ("voltage", 1),
    "movement_counter": ("movement_counter", 1),
}


@pytest.mark.parametrize("advert", RUUVI, ids=ids(RUUVI))
def test_ruuvi_df5_vectors(advert: dict[str, Any]) -> None:
    data = bytes.fromhex(advert["manufacturer_data"])
    decoded = Decoders().decode(
        Advertisement("CB:B8:33:4C:88:4F", 0, manufacturer_data={0x0499: data})
    )
    values = advert["values"]
    expected = {
        name: values[field] * factor
        for field, (name, factor) in RUUVI_FIELDS.items()
        if values[field] is not None  # not available: left out, never a number
    }
    assert_values(decoded, expected)
    assert decoded is not None and decoded.packet_id == values["sequence"]


# -- iBeacon and Eddystone: beacontools and ibeacon-ble -------------------------------------

BEACONS = load("beacons.json")["adverts"]


@pytest.mark.parametrize("advert", BEACONS, ids=[f"{a['source']}:{a['test']}" for a in BEACONS])
def test_beacon_vectors(advert: dict[str, Any]) -> None:
    adv = Advertisement(
        "00:00:00:00:00:00",
        0,
        -60,
        service_data={
            normalize_uuid(u): bytes.fromhex(h) for u, h in advert.get("service_data", {}).items()
        },
        manufacturer_data={
            int(c): bytes.fromhex(h) for c, h in advert.get("manufacturer_data", {}).items()
        },
    )
    if advert.get("none"):
        assert Decoders().decode(adv, advert["format"]) is None
        return
    if "error" in advert:
        with pytest.raises(DecodeError) as info:
            Decoders().decode(adv, advert["format"])
        assert info.value.reason == advert["error"]
        return
    decoded = Decoders().decode(adv, advert["format"])
    assert decoded is not None and decoded.format == advert["format"]
    expected = advert["measurements"]
    if expected is None:
        return
    got = {m.name: m.value for m in decoded.measurements}
    for name, value in expected.items():  # the sources assert some of the fields
        assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-9), name


# -- ATC1441 and pvvx thermometers: bleparser, through generic layouts -----------------------

ATC = load("atc_pvvx.json")


@pytest.mark.parametrize("advert", ATC["adverts"], ids=ids(ATC["adverts"]))
def test_atc_and_pvvx_adverts_with_generic_layouts(advert: dict[str, Any]) -> None:
    settings = GenericLayoutSettings.model_validate(ATC["layouts"][advert["layout"]])
    address = "A4:C1:38:00:00:01"
    adv = Advertisement(
        address,
        0,
        service_data={
            normalize_uuid(u): bytes.fromhex(h) for u, h in advert["service_data"].items()
        },
    )
    decoded = Decoders(generic={address: generic_layout(settings)}).decode(adv, "generic")
    assert decoded is not None
    got = {m.name: m.value for m in decoded.measurements}
    assert got.keys() == advert["measurements"].keys()
    for name, value in advert["measurements"].items():
        # binary scales (0.1, 0.01) are not exact in floats: within a part in 10^12
        assert got[name] == pytest.approx(value, rel=1e-12), name
