"""`citygw firmware …`: signed firmware images for the gateway's microcontroller.

- `keygen --out BASE`: an Ed25519 key pair, BASE.key (0600) and BASE.pub.
- `sign IMAGE --key K --version X.Y.Z --hardware HWID`: the signed package.
- `verify PACKAGE --pubkey P [--hardware H --current X.Y.Z]`: would the gateway send it?
- `push --port /dev/ttyX PACKAGE --pubkey P`: update the microcontroller over the serial
  link, with a progress bar and one outcome line.

Exit codes: 0 success (push: updated), 1 refused or invalid input (the reason is
printed), 2 file not found or unreadable, 3 push: the device rolled back to its old
firmware, 4 push: the link failed or the device did not answer in time.
Container and transfer: docs/firmware-ota.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from common.cli import EXIT_INVALID, EXIT_NO_FILE, err_console, fail, out_console

if TYPE_CHECKING:
    from firmware_bridge import image as fw
    from firmware_bridge.ota import OtaResult

# firmware_bridge.image (and cryptography, several MB) is imported by the commands that
# use it, not by every `citygw` command: `citygw run` stays small

EXIT_ROLLED_BACK = 3
EXIT_LINK = 4

app = typer.Typer(
    help="Signed firmware for the microcontroller: keys, sign, verify, push.", no_args_is_help=True
)

PubkeyOption = Annotated[
    Path, typer.Option("--pubkey", help="The Ed25519 public key (PEM) images must verify with.")
]


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        fail(f"{path}: {what} not found", EXIT_NO_FILE)
    except IsADirectoryError:
        fail(f"{path}: is a directory, not a {what}", EXIT_NO_FILE)
    except OSError as exc:
        fail(f"{path}: cannot read: {exc.strerror or exc}", EXIT_NO_FILE)


def _public_key(path: Path) -> fw.Ed25519PublicKey:
    from firmware_bridge import image as fw

    try:
        return fw.public_key_from_bytes(_read(path, "public key"), str(path))
    except ValueError as exc:
        fail(str(exc))


def _version(text: str) -> fw.Version:
    from firmware_bridge import image as fw

    try:
        return fw.Version.parse(text)
    except ValueError as exc:
        fail(str(exc))


def _package(path: Path) -> fw.Package:
    from firmware_bridge import image as fw

    try:
        return fw.parse(_read(path, "package"))
    except fw.FirmwareError as exc:
        _refused(path, exc)


def _refused(path: Path, exc: fw.FirmwareError) -> NoReturn:
    fail(f"{path}: refused ({exc.reason}): {exc.detail}")


@app.command()
def keygen(
    out: Annotated[Path, typer.Option("--out", help="Key files to write: OUT.key and OUT.pub.")],
) -> None:
    """Create an Ed25519 signing key pair; never overwrites an existing key."""
    from firmware_bridge import image as fw

    try:
        private, public = fw.generate_keypair(out)
    except FileExistsError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{out}: cannot write: {exc.strerror or exc}", EXIT_NO_FILE)
    out_console().print(
        Text(f"wrote {private} (private, mode 0600: keep it off gateways) and {public}")
    )


@app.command()
def sign(
    image: Annotated[Path, typer.Argument(help="The raw firmware image.", dir_okay=False)],
    key: Annotated[Path, typer.Option("--key", help="The Ed25519 private key (PEM).")],
    version: Annotated[str, typer.Option("--version", help="The image's version, X.Y.Z.")],
    hardware: Annotated[str, typer.Option("--hardware", help="The board's hardware id.")],
    out: Annotated[Path | None, typer.Option("--out", help="Default: IMAGE.cgfw")] = None,
) -> None:
    """Sign IMAGE for one hardware id and version; writes the signed package."""
    from firmware_bridge import image as fw

    data = _read(image, "image")
    try:
        private = fw.load_private_key(key) if key.is_file() else None
    except ValueError as exc:
        fail(str(exc))
    if private is None:
        fail(f"{key}: private key not found", EXIT_NO_FILE)
    try:
        package = fw.sign(data, private, _version(version), hardware)
    except ValueError as exc:
        fail(str(exc))
    target = out or image.with_name(image.name + ".cgfw")
    try:
        target.write_bytes(package.encode())
    except OSError as exc:
        fail(f"{target}: cannot write: {exc.strerror or exc}", EXIT_NO_FILE)
    m = package.manifest
    out_console().print(
        Text(
            f"wrote {target}: firmware {m.version} for {m.hardware_id}, {m.size} bytes, "
            f"sha256 {m.sha256.hex()}"
        )
    )


@app.command()
def verify(
    package: Annotated[Path, typer.Argument(help="A signed package.", dir_okay=False)],
    pubkey: PubkeyOption,
    hardware: Annotated[
        str | None, typer.Option("--hardware", help="The device's hardware id.")
    ] = None,
    current: Annotated[
        str | None, typer.Option("--current", help="The device's running version, X.Y.Z.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Allow a downgrade or reinstall.")] = False,
) -> None:
    """Check PACKAGE as the gateway does before sending it: intact, signed by the key,
    and (when given) for this hardware and newer than the running version."""
    from firmware_bridge import image as fw

    key = _public_key(pubkey)
    pkg = _package(package)
    m = pkg.manifest
    running = _version(current) if current is not None else None
    try:
        fw.check_update(pkg, fw.UpdatePolicy(key, force), hardware, running)
    except fw.FirmwareError as exc:
        _refused(package, exc)
    out_console().print(
        Text(
            f"{package}: OK: firmware {m.version} for {m.hardware_id}, {m.size} bytes, "
            f"sha256 {m.sha256.hex()}, signature valid"
        )
    )


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "citygw" / "ota"


@app.command()
def push(
    package: Annotated[Path, typer.Argument(help="A signed package.", dir_okay=False)],
    port: Annotated[str, typer.Option("--port", help="The serial port, e.g. /dev/ttyACM0.")],
    pubkey: PubkeyOption,
    force: Annotated[bool, typer.Option("--force", help="Allow a downgrade or reinstall.")] = False,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Where an unfinished transfer is recorded, so running the same command "
            "again resumes it (default: $XDG_STATE_HOME/citygw/ota).",
            file_okay=False,
        ),
    ] = None,
    baudrate: Annotated[int, typer.Option("--baudrate", help="Line speed.")] = 115200,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds without progress before giving up.", min=1)
    ] = 60.0,
) -> None:
    """Update the microcontroller on PORT with PACKAGE: checked against the public key,
    the device's hardware id and version first, then sent with a progress bar."""
    from firmware_bridge import image as fw
    from firmware_bridge.bridge import McuBridge
    from firmware_bridge.ota import Outcome
    from firmware_bridge.ota_push import PushSettings, push_firmware

    key = _public_key(pubkey)
    pkg = _package(package)
    try:  # fail fast, before the port is opened; the device's checks come after HELLO
        pkg.verify_signature(key)
    except fw.FirmwareError as exc:
        _refused(package, exc)
    m = pkg.manifest
    settings = PushSettings(stall_timeout=timeout)
    started = time.monotonic()

    async def go(progress: Progress) -> OtaResult:
        task = progress.add_task(f"{m.hardware_id} -> {m.version}", total=m.size)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        async with McuBridge(port, baudrate) as bridge:
            return await push_firmware(
                bridge,
                pkg,
                fw.UpdatePolicy(key, force),
                state_dir=state_dir or _default_state_dir(),
                progress=advance,
                settings=settings,
            )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=err_console(), transient=True) as progress:
            result = asyncio.run(go(progress))
    except OSError as exc:
        fail(f"{port}: cannot open: {exc.strerror or exc}", EXIT_NO_FILE)
    elapsed = time.monotonic() - started
    if result.outcome is Outcome.UPDATED:
        out_console().print(
            Text(
                f"updated {m.hardware_id} {result.from_version} -> {result.to_version} "
                f"({m.size} bytes in {elapsed:.1f} s)"
            )
        )
        return
    err_console().print(Text(result.summary(), style="bold red"))
    codes = {Outcome.ROLLED_BACK: EXIT_ROLLED_BACK, Outcome.REFUSED: EXIT_INVALID}
    raise typer.Exit(codes.get(result.outcome, EXIT_LINK))


__all__ = ["EXIT_INVALID", "EXIT_LINK", "EXIT_ROLLED_BACK", "app"]
