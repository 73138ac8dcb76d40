"""Signed firmware packages: the container, Ed25519 signing, and the update policy.

A package is one fixed binary header, the Ed25519 signature, then the image
(docs/firmware-ota.md, "The package"):

    off  size  field
    0    4     magic b"CGFW"
    4    1     container format (1)
    5    1     n = hardware id length (1..32, printable ASCII)
    6    2     major    (u16 little-endian, like every integer here)
    8    2     minor
    10   2     patch
    12   4     image size in bytes
    16   32    SHA-256 of the image
    48   n     hardware id
    48+n 64    Ed25519 signature over bytes [0, 48+n): the manifest
    112+n size image

The signature covers the manifest, which carries the image's SHA-256, so the device can
rebuild the signed bytes from an OTA begin message alone (size, SHA-256, version,
hardware id) and check the signature before it erases a slot. Everything is sans-I/O
except the key file helpers.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAGIC = b"CGFW"
FORMAT = 1
SIGNATURE_SIZE = 64
MAX_HARDWARE_ID = 32
MAX_IMAGE_SIZE = 0xFFFF_FFFF
_FIXED = struct.Struct("<4sBBHHHI32s")  # magic .. sha256: 48 bytes
_HWID = re.compile(r"[!-~]{1,32}")  # printable ASCII without spaces


class Reason(enum.StrEnum):
    """Why a package or an update is refused; stable strings for logs and responses."""

    TRUNCATED = "truncated"
    BAD_FORMAT = "bad_format"
    SHA_MISMATCH = "sha_mismatch"
    BAD_SIGNATURE = "bad_signature"
    WRONG_HARDWARE = "wrong_hardware"
    DOWNGRADE = "downgrade"
    SAME_VERSION = "same_version"


class FirmwareError(Exception):
    """A refused package or update: `reason` for programs, the message for people."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class Version(NamedTuple):
    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, text: str) -> Version:
        """`X.Y.Z` with each part 0..65535, or ValueError."""
        parts = text.strip().split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"version {text!r}: give MAJOR.MINOR.PATCH, e.g. 1.4.0")
        v = cls(*(int(p) for p in parts))
        if max(v) > 0xFFFF:
            raise ValueError(f"version {text!r}: each part must be at most 65535")
        return v

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True, slots=True)
class Manifest:
    """What the signature vouches for."""

    version: Version
    hardware_id: str
    size: int
    sha256: bytes

    def encode(self) -> bytes:
        """The canonical signed bytes (the header up to the signature)."""
        hwid = self.hardware_id.encode("ascii")
        fixed = _FIXED.pack(MAGIC, FORMAT, len(hwid), *self.version, self.size, self.sha256)
        return fixed + hwid


@dataclass(frozen=True, slots=True)
class Package:
    manifest: Manifest
    signature: bytes
    image: bytes

    def encode(self) -> bytes:
        return self.manifest.encode() + self.signature + self.image

    def verify_signature(self, public_key: Ed25519PublicKey) -> None:
        verify_manifest(self.manifest, self.signature, public_key)


def _check_hardware_id(hardware_id: str) -> None:
    if not _HWID.fullmatch(hardware_id):
        raise ValueError(
            f"hardware id {hardware_id!r}: 1 to {MAX_HARDWARE_ID} printable ASCII "
            "characters without spaces"
        )


def sign(image: bytes, key: Ed25519PrivateKey, version: Version, hardware_id: str) -> Package:
    """The signed package for `image`."""
    _check_hardware_id(hardware_id)
    if not 0 < len(image) <= MAX_IMAGE_SIZE:
        raise ValueError(f"image of {len(image)} bytes: must be 1 byte to 4 GiB")
    manifest = Manifest(version, hardware_id, len(image), hashlib.sha256(image).digest())
    return Package(manifest, key.sign(manifest.encode()), image)


def parse(data: bytes) -> Package:
    """The package in `data`, structurally checked (its image matches the manifest's size
    and SHA-256), or FirmwareError. The signature is checked by `verify_manifest`."""
    if len(data) < _FIXED.size:
        raise FirmwareError(
            Reason.TRUNCATED, f"{len(data)} bytes, shorter than the {_FIXED.size}-byte header"
        )
    magic, fmt, n, major, minor, patch, size, sha = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise FirmwareError(Reason.BAD_FORMAT, f"not a firmware package (magic {magic!r})")
    if fmt != FORMAT:
        raise FirmwareError(Reason.BAD_FORMAT, f"container format {fmt}, this reads {FORMAT}")
    head = _FIXED.size + n + SIGNATURE_SIZE
    if len(data) < head:
        raise FirmwareError(Reason.TRUNCATED, f"{len(data)} bytes, the header needs {head}")
    try:
        hardware_id = data[_FIXED.size : _FIXED.size + n].decode("ascii")
        _check_hardware_id(hardware_id)
    except (UnicodeDecodeError, ValueError):
        raise FirmwareError(Reason.BAD_FORMAT, "the hardware id is not printable ASCII") from None
    body = len(data) - head
    if body < size:
        raise FirmwareError(
            Reason.TRUNCATED, f"image has {body} of its {size} bytes; the package is cut short"
        )
    if body > size:
        raise FirmwareError(Reason.BAD_FORMAT, f"{body - size} bytes after the {size}-byte image")
    image = data[head:]
    if hashlib.sha256(image).digest() != sha:
        raise FirmwareError(Reason.SHA_MISMATCH, "the image does not match its SHA-256")
    manifest = Manifest(Version(major, minor, patch), hardware_id, size, sha)
    return Package(manifest, data[_FIXED.size + n : head], image)


def verify_manifest(manifest: Manifest, signature: bytes, public_key: Ed25519PublicKey) -> None:
    """FirmwareError(BAD_SIGNATURE) unless `signature` signs `manifest` with the key's pair."""
    try:
        public_key.verify(signature, manifest.encode())
    except InvalidSignature:
        raise FirmwareError(
            Reason.BAD_SIGNATURE, "the signature does not verify with the given public key"
        ) from None


# -- the update policy ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpdatePolicy:
    """What the gateway demands before a byte of an image leaves it."""

    public_key: Ed25519PublicKey
    force: bool = False  # allow a downgrade or reinstalling the running version


def check_update(
    package: Package, policy: UpdatePolicy, hardware_id: str | None, current: Version | None
) -> None:
    """FirmwareError unless `package` may be installed on a device that reports
    `hardware_id` and runs `current` (None: not known, that rule is skipped). The
    signature is checked first: nothing else about an unsigned package is worth saying."""
    package.verify_signature(policy.public_key)
    m = package.manifest
    if hardware_id is not None and m.hardware_id != hardware_id:
        raise FirmwareError(
            Reason.WRONG_HARDWARE,
            f"the image is for hardware {m.hardware_id!r}, the device is {hardware_id!r}",
        )
    if current is None or policy.force:
        return
    if m.version < current:
        raise FirmwareError(
            Reason.DOWNGRADE, f"{m.version} is older than the running {current} (use --force)"
        )
    if m.version == current:
        raise FirmwareError(
            Reason.SAME_VERSION, f"the device already runs {current} (use --force to reinstall)"
        )


# -- keys -----------------------------------------------------------------------------


def generate_keypair(base: Path) -> tuple[Path, Path]:
    """Write `<base>.key` (PKCS#8 PEM, mode 0600) and `<base>.pub` (SubjectPublicKeyInfo PEM).
    FileExistsError if either exists: a signing key is never overwritten."""
    private_path, public_path = Path(f"{base}.key"), Path(f"{base}.pub")
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL with the mode at creation: the key is never readable by others, not even briefly
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    try:
        fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(pub)
    except OSError:
        private_path.unlink()
        raise
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file, or ValueError saying why not."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (or 64 hex digits: the raw key), or ValueError."""
    return public_key_from_bytes(path.read_bytes(), str(path))


def public_key_from_bytes(data: bytes, where: str = "public key") -> Ed25519PublicKey:
    text = data.strip()
    if re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode()))
    try:
        key = serialization.load_pem_public_key(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: not a PEM public key or 64 hex digits ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{where}: not an Ed25519 key")
    return key


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes a device stores."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
