"""BTHome v2 encryption (https://bthome.io/encryption/): AES-CCM, 4-byte MIC.

Service data of an encrypted advert: ``device-info | [MAC, reversed, if bit 1] |
ciphertext | counter (4, little-endian) | MIC (4)``; the nonce is
``MAC (6, natural order) | 0xD2 0xFC | device-info | counter (4)``.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from drivers.ble.advert import DecodeError

UUID16_LE = b"\xd2\xfc"
MIC_LEN = 4
COUNTER_LEN = 4


def make_cipher(key: bytes) -> AESCCM:
    """The AES-CCM object of a 16-byte bind key (build once per key, reuse)."""
    if len(key) != 16:
        raise ValueError(f"a BTHome bind key is 16 bytes, got {len(key)}")
    return AESCCM(key, tag_length=MIC_LEN)


def nonce(mac: bytes, device_info: int, counter: bytes) -> bytes:
    return mac + UUID16_LE + bytes((device_info,)) + counter


def decrypt(
    cipher: AESCCM, mac: bytes, device_info: int, data: bytes, start: int
) -> tuple[bytes, int]:
    """Decrypt ``data[start:]`` (ciphertext, counter, MIC): plaintext and counter.

    DecodeError "truncated" if there is no room for counter and MIC, "bad_mic" if the
    key, MAC or data do not authenticate.
    """
    end = len(data) - COUNTER_LEN - MIC_LEN
    if end < start:
        raise DecodeError("bthome", "truncated", "no room for counter and MIC", offset=len(data))
    counter = data[end : end + COUNTER_LEN]
    try:
        plain = cipher.decrypt(
            nonce(mac, device_info, counter), data[start:end] + data[end + COUNTER_LEN :], None
        )
    except InvalidTag:
        raise DecodeError(
            "bthome", "bad_mic", "wrong bind key or corrupted payload", offset=end + COUNTER_LEN
        ) from None
    return plain, int.from_bytes(counter, "little")


def encrypt(key: bytes, mac: bytes, device_info: int, counter: int, plaintext: bytes) -> bytes:
    """The service data of an encrypted advert (for tests and simulators).

    ``mac`` in natural order; ``device_info`` should have bit 0 set.
    """
    ctr = counter.to_bytes(4, "little")
    sealed = make_cipher(key).encrypt(nonce(mac, device_info, ctr), plaintext, None)
    return bytes((device_info,)) + sealed[:-MIC_LEN] + ctr + sealed[-MIC_LEN:]
