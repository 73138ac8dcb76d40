"""Signed firmware packages: container round trip, tampering of each part, the update
policy (hardware, no downgrade unless forced), key files, and `citygw firmware
keygen|sign|verify` through typer's CliRunner."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import firmware as cli_firmware
from firmware_bridge import image as fw
from firmware_bridge.image import FirmwareError, Reason, UpdatePolicy, Version

runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
IMAGE = bytes((i * 7 + 3) & 0xFF for i in range(5000))
HW = "cgw-mcu-r2"


def package(version: str = "1.2.0", hw: str = HW, image: bytes = IMAGE) -> fw.Package:
    return fw.sign(image, KEY, Version.parse(version), hw)


def reason(fn: object, *args: object) -> Reason:
    with pytest.raises(FirmwareError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.reason


def test_round_trip_and_layout() -> None:
    pkg = package()
    data = pkg.encode()
    assert data[:4] == b"CGFW" and data[4] == 1 and data[5] == len(HW)
    assert len(data) == 48 + len(HW) + 64 + len(IMAGE)
    back = fw.parse(data)
    assert back == pkg
    back.verify_signature(KEY.public_key())
    assert back.manifest.version == Version(1, 2, 0)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (10, Reason.BAD_SIGNATURE),  # patch number: manifest
        (16, Reason.SHA_MISMATCH),  # the recorded SHA-256 no longer matches the image
        (48 + 2, Reason.BAD_SIGNATURE),  # hardware id
        (48 + len(HW) + 5, Reason.BAD_SIGNATURE),  # the signature itself
        (48 + len(HW) + 64 + 1234, Reason.SHA_MISMATCH),  # the image
        (0, Reason.BAD_FORMAT),  # magic
    ],
)
def test_one_flipped_byte_is_refused_with_its_reason(where: int, expected: Reason) -> None:
    data = bytearray(package().encode())
    data[where] ^= 0x01
    got = reason(lambda: fw.parse(bytes(data)).verify_signature(KEY.public_key()))
    assert got == expected


def test_size_field_tampered() -> None:
    data = bytearray(package().encode())
    data[12] ^= 0x01  # size 5000 -> 5001: the image looks cut short
    assert reason(fw.parse, bytes(data)) == Reason.TRUNCATED


@pytest.mark.parametrize("cut", [0, 3, 47, 48 + len(HW) + 10, 48 + len(HW) + 64 + 4999])
def test_truncated_package(cut: int) -> None:
    assert reason(fw.parse, package().encode()[:cut]) == Reason.TRUNCATED


def test_trailing_bytes() -> None:
    assert reason(fw.parse, package().encode() + b"\0") == Reason.BAD_FORMAT


def test_other_key_refused() -> None:
    pkg = package()
    assert reason(pkg.verify_signature, OTHER.public_key()) == Reason.BAD_SIGNATURE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_parse_raises_only_its_own_error(data: bytes) -> None:
    with contextlib.suppress(FirmwareError):
        fw.parse(b"CGFW\x01" + data)


def test_policy() -> None:
    pkg = package("1.2.0")
    ok = UpdatePolicy(KEY.public_key())
    fw.check_update(pkg, ok, HW, Version(1, 1, 9))
    fw.check_update(pkg, ok, HW, None)
    assert reason(fw.check_update, pkg, ok, "other-board", Version(1, 0, 0)) == (
        Reason.WRONG_HARDWARE
    )
    assert reason(fw.check_update, pkg, ok, HW, Version(1, 3, 0)) == Reason.DOWNGRADE
    assert reason(fw.check_update, pkg, ok, HW, Version(1, 2, 0)) == Reason.SAME_VERSION
    forced = UpdatePolicy(KEY.public_key(), force=True)
    fw.check_update(pkg, forced, HW, Version(1, 3, 0))
    fw.check_update(pkg, forced, HW, Version(1, 2, 0))
    # the signature comes first, even when forced and for the wrong board
    bad = UpdatePolicy(OTHER.public_key(), force=True)
    assert reason(fw.check_update, pkg, bad, "other-board", None) == Reason.BAD_SIGNATURE


def test_version_parse() -> None:
    assert Version.parse("10.0.65535") == Version(10, 0, 65535)
    assert Version(1, 10, 0) > Version(1, 9, 9)
    for bad in ("1.2", "1.2.3.4", "a.b.c", "1.2.65536", "-1.0.0"):
        with pytest.raises(ValueError):
            Version.parse(bad)


def test_bad_hardware_ids() -> None:
    for hw in ("", "has space", "x" * 33, "café"):
        with pytest.raises(ValueError):
            package(hw=hw)


def test_keygen_files(tmp_path: Path) -> None:
    private, public = fw.generate_keypair(tmp_path / "fw")
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    key = fw.load_private_key(private)
    pub = fw.load_public_key(public)
    assert fw.raw_public_key(pub) == fw.raw_public_key(key.public_key())
    hex_file = tmp_path / "raw.pub"
    hex_file.write_text(fw.raw_public_key(pub).hex())
    assert fw.raw_public_key(fw.load_public_key(hex_file)) == fw.raw_public_key(pub)
    with pytest.raises(FileExistsError):
        fw.generate_keypair(tmp_path / "fw")
    with pytest.raises(ValueError):
        fw.load_public_key(private)


# -- the command line ------------------------------------------------------------------


def test_cli_keygen_sign_verify(tmp_path: Path) -> None:
    base = tmp_path / "keys" / "fleet"
    base.parent.mkdir()
    r = runner.invoke(cli_firmware.app, ["keygen", "--out", str(base)])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(os.stat(f"{base}.key").st_mode) == 0o600
    again = runner.invoke(cli_firmware.app, ["keygen", "--out", str(base)])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output

    img = tmp_path / "app.bin"
    img.write_bytes(IMAGE)
    r = runner.invoke(
        cli_firmware.app,
        ["sign", str(img), "--key", f"{base}.key", "--version", "2.0.1", "--hardware", HW],
    )
    assert r.exit_code == 0, r.output
    pkg = tmp_path / "app.bin.cgfw"
    assert fw.parse(pkg.read_bytes()).manifest.version == Version(2, 0, 1)

    def verify(*extra: str) -> tuple[int, str]:
        res = runner.invoke(
            cli_firmware.app, ["verify", str(pkg), "--pubkey", f"{base}.pub", *extra]
        )
        return res.exit_code, " ".join(res.output.split())

    code, text = verify()
    assert code == 0 and "OK: firmware 2.0.1 for cgw-mcu-r2" in text and "signature valid" in text
    assert verify("--hardware", HW, "--current", "2.0.0")[0] == 0
    code, text = verify("--hardware", "other", "--current", "1.0.0")
    assert code == 1 and "refused (wrong_hardware)" in text
    code, text = verify("--hardware", HW, "--current", "2.1.0")
    assert code == 1 and "refused (downgrade)" in text
    assert verify("--hardware", HW, "--current", "2.1.0", "--force")[0] == 0
    code, text = verify("--current", "2.0.1")
    assert code == 1 and "refused (same_version)" in text

    data = bytearray(pkg.read_bytes())
    data[-1] ^= 0xFF
    pkg.write_bytes(bytes(data))
    code, text = verify()
    assert code == 1 and "refused (sha_mismatch)" in text
    pkg.write_bytes(bytes(data[:100]))
    code, text = verify()
    assert code == 1 and "refused (truncated)" in text

    other = fw.sign(IMAGE, OTHER, Version(2, 0, 1), HW)
    pkg.write_bytes(other.encode())
    code, text = verify()
    assert code == 1 and "refused (bad_signature)" in text
    assert (
        runner.invoke(
            cli_firmware.app, ["verify", str(tmp_path / "nope"), "--pubkey", f"{base}.pub"]
        ).exit_code
        == 2
    )


def test_cli_sign_errors(tmp_path: Path) -> None:
    img = tmp_path / "app.bin"
    img.write_bytes(IMAGE)
    r = runner.invoke(
        cli_firmware.app,
        [
            "sign",
            str(img),
            "--key",
            str(tmp_path / "missing.key"),
            "--version",
            "1.0.0",
            "--hardware",
            HW,
        ],
    )
    assert r.exit_code == 2
    fw.generate_keypair(tmp_path / "k")
    r = runner.invoke(
        cli_firmware.app,
        ["sign", str(img), "--key", str(tmp_path / "k.key"), "--version", "1.0", "--hardware", HW],
    )
    assert r.exit_code == 1 and "MAJOR.MINOR.PATCH" in r.output
