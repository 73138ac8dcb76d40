"""Sans-I/O BLE advertisement decoders: `Advertisement` in, `Decoded` measurements out.

Formats: BTHome v2 (plain and encrypted), Ruuvi RAWv2 (data format 5), iBeacon,
Eddystone-TLM, and generic per-address layouts. No bleak, no clock, no I/O: the state a
decoder needs (bind keys, layouts, the replay counters of encrypted BTHome) lives in one
`Decoders` object. ``decode`` returns None when an advert has no known format (not an
error) and raises `DecodeError` for a payload of a known format that is malformed,
undecryptable or replayed -- never any other exception for any payload.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.ble.advert import Advertisement, Decoded, DecodeError, Measurement
from drivers.ble.decoders import beacons, bthome, generic, ruuvi
from drivers.ble.decoders.generic import GenericField, GenericLayout

__all__ = [
    "FORMATS",
    "Advertisement",
    "DecodeError",
    "Decoded",
    "Decoders",
    "GenericField",
    "GenericLayout",
    "Measurement",
    "bench_bthome",
]

#: the values of ``fmt`` besides "auto", in the order "auto" tries them
FORMATS = ("bthome", "ruuvi", "ibeacon", "eddystone-tlm", "generic")


def _norm_address(address: str) -> str:
    return address.strip().upper()


class Decoders:
    """Stateful front: bind keys per address (bytes), generic layouts per address, and the
    replay-protection counters of encrypted BTHome per address."""

    def __init__(
        self,
        bind_keys: Mapping[str, bytes] | None = None,
        generic: Mapping[str, GenericLayout] | None = None,
    ) -> None:
        self._ciphers: dict[str, AESCCM] = {
            _norm_address(a): bthome.bthome_encryption.make_cipher(bytes(k))
            for a, k in (bind_keys or {}).items()
        }
        self._generic: dict[str, GenericLayout] = {
            _norm_address(a): layout for a, layout in (generic or {}).items()
        }
        #: last accepted encryption counter per address
        self.counters: dict[str, int] = {}
        self._by_format: dict[str, Callable[[Advertisement], Decoded | None]] = {
            "bthome": self._bthome,
            "ruuvi": self._ruuvi,
            "ibeacon": self._ibeacon,
            "eddystone-tlm": self._eddystone,
            "generic": self._generic_layout,
        }

    def decode(self, adv: Advertisement, fmt: str = "auto") -> Decoded | None:
        """The measurements of ``adv`` in format ``fmt`` ("auto": the first known format
        found, in the order of `FORMATS`). None: no such format in this advert."""
        if fmt == "auto":
            for decoder in self._by_format.values():
                decoded = decoder(adv)
                if decoded is not None:
                    return decoded
            return None
        chosen = self._by_format.get(fmt)
        if chosen is None:
            raise DecodeError(fmt, "unknown_format", f"known: auto, {', '.join(FORMATS)}")
        return chosen(adv)

    # -- one per format ----------------------------------------------------------------

    def _bthome(self, adv: Advertisement) -> Decoded | None:
        data = adv.service_data.get(bthome.UUID)
        if data is None:
            return None
        address = adv.address
        if data and data[0] & bthome.ENCRYPTED:
            address = _norm_address(address)
            decoded, counter = bthome.decode(
                data, address, self._ciphers.get(address), self.counters.get(address)
            )
            if counter is not None:
                self.counters[address] = counter
            return decoded
        return bthome.decode(data, address)[0]

    def _ruuvi(self, adv: Advertisement) -> Decoded | None:
        data = adv.manufacturer_data.get(ruuvi.COMPANY_ID)
        return None if data is None else ruuvi.decode(data)

    def _ibeacon(self, adv: Advertisement) -> Decoded | None:
        data = adv.manufacturer_data.get(beacons.APPLE)
        return None if data is None else beacons.decode_ibeacon(data)

    def _eddystone(self, adv: Advertisement) -> Decoded | None:
        data = adv.service_data.get(beacons.EDDYSTONE_UUID)
        return None if data is None else beacons.decode_eddystone_tlm(data)

    def _generic_layout(self, adv: Advertisement) -> Decoded | None:
        layout = self._generic.get(_norm_address(adv.address))
        if layout is None:
            return None
        data = generic.payload_of(layout, adv.manufacturer_data, adv.service_data)
        return None if data is None else generic.decode(layout, data)


def bench_bthome(n: int = 100_000) -> float:
    """Decode ``n`` plain BTHome adverts (packet id, battery, temperature, humidity,
    pressure): adverts per second, for benchmarks."""
    payload = bytes.fromhex("400009016102ca0903bf1304138a01")
    adv = Advertisement("A4:C1:38:00:00:01", 0, -60, service_data={bthome.UUID: payload})
    dec = Decoders()
    decode = dec.decode
    t0 = time.perf_counter()
    for _ in range(n):
        decode(adv)
    return n / (time.perf_counter() - t0)
