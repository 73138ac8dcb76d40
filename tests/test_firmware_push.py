"""`push_firmware` and `citygw firmware push` over a real pty against the simulated
microcontroller (drivers/mcu/simulator.py, given the fleet's public key): an update completes
and the new version reports; a link drop and a gateway restart resume from the
device's offset; a bad signature is refused before any byte is sent; an image that
crashes at boot is rolled back and reported.

No timing bounds: every wait is generous, the checks are on outcomes and byte counts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from cli import firmware as cli_firmware
from drivers.mcu.simulator import SimMcu
from firmware_bridge import image as fw
from firmware_bridge import messages as m
from firmware_bridge.bridge import McuBridge
from firmware_bridge.image import UpdatePolicy, Version
from firmware_bridge.link import Timers
from firmware_bridge.ota import OtaResult, Outcome, chunk_size_for
from firmware_bridge.ota_push import PushSettings, push_firmware
from firmware_bridge.ota_state import OtaStateStore

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
HW = "citygw-mcu-r1"
IMAGE = random.Random(1).randbytes(96 * 1024)
PACKAGE = fw.sign(IMAGE, KEY, Version(1, 1, 0), HW)
POLICY = UpdatePolicy(KEY.public_key())
TIMERS = Timers(heartbeat=0.5, lost_after=4)
# ack_timeout beyond link-loss detection (2 s): a stalled line pauses the sender first
SETTINGS = PushSettings(window=4, ack_timeout=5.0, stall_timeout=120.0, reboot_timeout=60.0)

pytestmark = pytest.mark.timeout(180)


def simulated(**kwargs: object) -> contextlib.AbstractAsyncContextManager[SimMcu]:
    return SimMcu.on_pty(
        interval=1.0, hardware_id=HW, timers=TIMERS, ota_public_key=KEY.public_key(), **kwargs
    ).running()


def chunks(sim: SimMcu) -> int:
    return sim.counts["ota_chunk_bytes"]


def test_update_completes_and_new_version_reports(tmp_path: Path) -> None:
    async def go() -> tuple[OtaResult, m.Capabilities | None, SimMcu]:
        async with simulated() as sim, McuBridge(sim.port, timers=TIMERS) as bridge:
            seen: list[int] = []
            result = await push_firmware(
                bridge,
                PACKAGE,
                POLICY,
                state_dir=tmp_path,
                progress=lambda done, total: seen.append(done),
                settings=SETTINGS,
            )
            assert seen[-1] == len(IMAGE) and seen == sorted(seen)
            return result, bridge.capabilities, sim

    result, caps, sim = asyncio.run(go())
    assert result.outcome is Outcome.UPDATED, result
    assert (result.from_version, result.to_version) == ("1.0.0", "1.1.0")
    assert result.bytes_resent == 0 and result.bytes_sent == len(IMAGE)
    assert caps is not None and str(caps.firmware) == "1.1.0"
    assert caps.boot_reason is m.BootReason.OTA_UPDATE
    active = sim.slots.slots[sim.slots.active]
    assert active is not None and active.image == IMAGE and not sim.slots.trial
    assert not list(tmp_path.iterdir())  # the transfer record is gone once finished


def test_link_drop_resumes_from_offset(tmp_path: Path) -> None:
    window_bytes: list[int] = []

    async def go() -> tuple[OtaResult, int, SimMcu]:
        async with simulated() as sim, McuBridge(sim.port, timers=TIMERS) as bridge:
            loop = asyncio.get_running_loop()
            at_drop: list[int] = []

            def progress(done: int, total: int) -> None:
                if done >= total // 2 and not at_drop:
                    at_drop.append(done)
                    sim.faults.stall = True  # the line goes dead both ways
                    loop.call_later(4.0, setattr, sim.faults, "stall", False)

            result = await push_firmware(
                bridge, PACKAGE, POLICY, state_dir=tmp_path, progress=progress, settings=SETTINGS
            )
            window_bytes.append(SETTINGS.window * chunk_size_for(bridge.link.max_payload))
            return result, at_drop[0], sim

    result, acked_at_drop, sim = asyncio.run(go())
    assert result.outcome is Outcome.UPDATED, result
    assert result.resume_offset >= acked_at_drop  # resumed, not restarted
    assert result.bytes_resent <= window_bytes[0]
    assert chunks(sim) <= len(IMAGE) + window_bytes[0]


def test_gateway_restart_resumes_from_persisted_state(tmp_path: Path) -> None:
    async def go() -> tuple[OtaResult, int, SimMcu]:
        async with simulated() as sim:
            stopped = asyncio.Event()
            at_stop: list[int] = []

            def progress(done: int, total: int) -> None:
                if done >= total // 2 and not at_stop:
                    at_stop.append(done)
                    stopped.set()

            async with McuBridge(sim.port, timers=TIMERS) as bridge:
                push = push_firmware(
                    bridge,
                    PACKAGE,
                    POLICY,
                    state_dir=tmp_path,
                    progress=progress,
                    settings=SETTINGS,
                )
                first = asyncio.create_task(push)
                await stopped.wait()
                first.cancel()  # the gateway process dies mid-transfer
                with contextlib.suppress(asyncio.CancelledError):
                    await first
            saved = OtaStateStore(tmp_path).load(PACKAGE.manifest.sha256.hex())
            assert saved is not None
            async with McuBridge(sim.port, timers=TIMERS) as bridge:
                result = await push_firmware(
                    bridge, PACKAGE, POLICY, state_dir=tmp_path, settings=SETTINGS
                )
            return result, at_stop[0], sim

    result, acked_at_stop, sim = asyncio.run(go())
    assert result.outcome is Outcome.UPDATED, result
    assert result.resume_offset >= acked_at_stop
    assert chunks(sim) <= len(IMAGE) + 8 * 1024  # the first half was not sent again
    assert result.bytes_sent <= len(IMAGE) - acked_at_stop + 8 * 1024


def test_bad_signature_refused_before_any_byte(tmp_path: Path) -> None:
    forged = fw.sign(IMAGE, Ed25519PrivateKey.generate(), Version(1, 1, 0), HW)

    async def go() -> tuple[OtaResult, SimMcu]:
        async with simulated() as sim, McuBridge(sim.port, timers=TIMERS) as bridge:
            result = await push_firmware(bridge, forged, POLICY, state_dir=tmp_path)
            await asyncio.sleep(0.2)
            return result, sim

    result, sim = asyncio.run(go())
    assert result.outcome is Outcome.REFUSED and result.reason.startswith("bad_signature")
    assert sim.counts["ota_messages"] == 0 and sim.slots.slots[1] is None


def test_refusals_by_policy_and_device(tmp_path: Path) -> None:
    older = fw.sign(IMAGE, KEY, Version(0, 9, 0), HW)
    other = fw.sign(IMAGE, KEY, Version(2, 0, 0), "another-board")

    async def go() -> list[OtaResult]:
        async with simulated() as sim, McuBridge(sim.port, timers=TIMERS) as bridge:
            out = [await push_firmware(bridge, older, POLICY, state_dir=tmp_path)]
            out.append(await push_firmware(bridge, other, POLICY, state_dir=tmp_path))
            assert sim.counts["ota_messages"] == 0
            sim.faults.reject_images = True
            out.append(await push_firmware(bridge, PACKAGE, POLICY, state_dir=tmp_path))
            return out

    downgrade, wrong_hw, rejected = asyncio.run(go())
    assert downgrade.outcome is Outcome.REFUSED and downgrade.reason.startswith("downgrade")
    assert wrong_hw.outcome is Outcome.REFUSED and wrong_hw.reason.startswith("wrong_hardware")
    assert rejected.outcome is Outcome.REFUSED and "rejected" in rejected.reason


def test_image_failing_to_boot_is_rolled_back(tmp_path: Path) -> None:
    async def go() -> tuple[OtaResult, m.Capabilities | None]:
        async with (
            simulated(crash_time=0.5) as sim,
            McuBridge(sim.port, timers=TIMERS) as bridge,
        ):
            sim.faults.crash_versions.add("1.1.0")
            result = await push_firmware(
                bridge, PACKAGE, POLICY, state_dir=tmp_path, settings=SETTINGS
            )
            return result, bridge.capabilities

    result, caps = asyncio.run(go())
    assert result.outcome is Outcome.ROLLED_BACK, result
    assert result.from_version == "1.0.0" and result.to_version == "1.1.0"
    assert caps is not None and caps.boot_reason is m.BootReason.ROLLED_BACK
    assert str(caps.firmware) == "1.0.0" and str(caps.failed_version) == "1.1.0"


# -- the command line -----------------------------------------------------------------


@contextlib.contextmanager
def sim_in_thread(**kwargs: object) -> Iterator[SimMcu]:
    """The sim on its own event loop in a thread (the CLI calls asyncio.run itself)."""
    loop = asyncio.new_event_loop()
    ready: list[SimMcu] = []
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        sim = SimMcu.on_pty(interval=1.0, hardware_id=HW, ota_public_key=KEY.public_key(), **kwargs)
        ready.append(sim)
        tasks.append(loop.create_task(sim.run()))

    thread = threading.Thread(target=loop.run_forever, name="sim-mcu", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield ready[0]
    finally:

        async def stop() -> None:
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        ready[0].close()
        loop.close()


def test_cli_push(tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "250", "NO_COLOR": "1"})
    pub = tmp_path / "fw.pub"
    pub.write_text(fw.raw_public_key(KEY.public_key()).hex())
    pkg = tmp_path / "app.cgfw"
    pkg.write_bytes(PACKAGE.encode())
    forged = tmp_path / "forged.cgfw"
    forged.write_bytes(fw.sign(IMAGE, Ed25519PrivateKey.generate(), Version(1, 1, 0), HW).encode())
    state = tmp_path / "state"
    with sim_in_thread() as sim:
        args = ["--port", sim.port, "--pubkey", str(pub), "--state-dir", str(state)]
        bad = runner.invoke(cli_firmware.app, ["push", str(forged), *args])
        assert bad.exit_code == 1 and "refused (bad_signature)" in bad.output
        ok = runner.invoke(cli_firmware.app, ["push", str(pkg), *args])
        assert ok.exit_code == 0, ok.output
        assert "updated citygw-mcu-r1 1.0.0 -> 1.1.0" in ok.output
        again = runner.invoke(cli_firmware.app, ["push", str(pkg), *args])
        assert again.exit_code == 1 and "same_version" in again.output
    with sim_in_thread(crash_time=0.5) as sim:
        sim.faults.crash_versions.add("1.1.0")
        args = ["--port", sim.port, "--pubkey", str(pub), "--state-dir", str(state)]
        back = runner.invoke(cli_firmware.app, ["push", str(pkg), *args])
        assert back.exit_code == 3, back.output
        assert "rolled back: 1.1.0 did not start, the device runs 1.0.0 again" in back.output
