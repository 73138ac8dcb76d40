"""Pushing a signed package to the microcontroller over a live `McuBridge`.

`push_firmware` checks the package against the device's CAPABILITIES and the policy
(nothing is sent if it fails), takes or creates the persisted transfer record, and runs
an `OtaSender` on the event loop: OTA messages and link events in, messages out through
the bridge's link, timers from the sender's deadline. A link drop pauses the sender and
the next LinkUp resumes it (OTA_BEGIN with the same transfer id), so a pulled cable
costs at most one window of chunks. docs/firmware-ota.md describes the whole exchange.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from firmware_bridge import messages as m
from firmware_bridge.bridge import BridgeError, McuBridge
from firmware_bridge.image import FirmwareError, Package, UpdatePolicy, Version, check_update
from firmware_bridge.link import Event, LinkLost, LinkUp, MessageReceived
from firmware_bridge.ota import OtaResult, OtaSender, Outcome, chunk_size_for
from firmware_bridge.ota_state import OtaStateStore, TransferState

__all__ = ["ProgressCallback", "PushSettings", "push_firmware", "run_transfer"]

log = logging.getLogger("citygw.firmware")

#: progress(acknowledged bytes, image size)
ProgressCallback = Callable[[int, int], None]

_OTA_REPLIES = (m.OtaBeginResult, m.OtaChunkAck, m.OtaEndResult, m.OtaStatus)
SAVE_EVERY = 64 * 1024  # persist the acknowledged offset this often (SD cards wear)


class PushSettings:
    """Tunables of a push (defaults suit 115200 baud on a loaded gateway)."""

    def __init__(
        self,
        *,
        window: int = 4,
        ack_timeout: float = 2.0,
        begin_timeout: float = 3.0,
        stall_timeout: float = 60.0,
        reboot_timeout: float = 30.0,
        link_timeout: float = 10.0,
        max_chunk: int = 4096,
    ) -> None:
        self.window = window
        self.ack_timeout = ack_timeout
        self.begin_timeout = begin_timeout
        self.stall_timeout = stall_timeout
        self.reboot_timeout = reboot_timeout
        self.link_timeout = link_timeout  # wait this long for a first CAPABILITIES
        self.max_chunk = max_chunk


async def push_firmware(
    bridge: McuBridge,
    package: Package,
    policy: UpdatePolicy,
    *,
    state_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    settings: PushSettings | None = None,
) -> OtaResult:
    """Install `package` on the device behind `bridge` (open; up or coming up). Never
    raises for what the device, the link or the policy decides: the result says
    `updated`, `rolled_back`, `refused` (with the reason) or `failed` (the link or the
    device stopped answering)."""
    s = settings or PushSettings()
    events: asyncio.Queue[Event | None] = asyncio.Queue()
    pump = asyncio.create_task(_pump(bridge, events), name="ota-events")
    await asyncio.sleep(0)  # the pump subscribes before anything is sent
    try:
        try:
            caps = await bridge.wait_up(s.link_timeout)
        except (TimeoutError, BridgeError) as exc:
            why = str(exc) or f"no answer from the device in {s.link_timeout:g} s"
            return OtaResult(Outcome.FAILED, why, to_version=str(package.manifest.version))
        running = Version(*caps.firmware)
        try:  # the gateway's checks, before a single byte of the image leaves it
            check_update(package, policy, caps.hardware_id, running)
        except FirmwareError as exc:
            return OtaResult(Outcome.REFUSED, str(exc), str(running), str(package.manifest.version))
        man = package.manifest
        store = OtaStateStore(state_dir) if state_dir is not None else None
        sha = man.sha256.hex()
        if store is not None:
            state = store.begin(sha, man.size, str(man.version), man.hardware_id)
        else:
            tid = _transfer_id(man.sha256)
            state = TransferState(tid, sha, man.size, str(man.version), man.hardware_id)
        payload = min(bridge.link.max_payload, s.max_chunk + m.OtaChunk.HEAD)
        sender = OtaSender(
            package,
            state.transfer_id,
            chunk_size=chunk_size_for(payload),
            window=s.window,
            ack_timeout=s.ack_timeout,
            begin_timeout=s.begin_timeout,
            stall_timeout=s.stall_timeout,
            reboot_timeout=s.reboot_timeout,
            from_version=str(running),
        )
        log.info(
            "firmware push started",
            extra={
                "transfer_id": state.transfer_id,
                "version": str(man.version),
                "size": man.size,
                "chunk": sender.chunk_size,
                "from": str(running),
            },
        )
        saver = _Saver(store, state)
        result = await run_transfer(
            sender, bridge.send_nowait, events, progress=progress, save=saver
        )
        if store is not None and result.outcome is not Outcome.FAILED:
            store.clear(sha)  # FAILED keeps it: the next push resumes
        log.info(
            "firmware push finished",
            extra={"outcome": str(result.outcome), "reason": result.reason},
        )
        return result
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump


async def _pump(bridge: McuBridge, queue: asyncio.Queue[Event | None]) -> None:
    """The bridge's events into `queue`; None once the port died or the bridge closed."""
    try:
        async for ev in bridge.events():
            queue.put_nowait(ev)
    except BridgeError:
        queue.put_nowait(None)


def _transfer_id(sha256: bytes) -> int:
    """Without a state directory: an id derived from the image, stable across runs."""
    return int.from_bytes(sha256[:4], "little") or 1


class _Saver:
    """Persists the acknowledged offset every SAVE_EVERY bytes."""

    def __init__(self, store: OtaStateStore | None, state: TransferState) -> None:
        self.store = store
        self.state = state

    def __call__(self, acked: int) -> None:
        if self.store is None or acked - self.state.acked < SAVE_EVERY:
            return
        self.state = replace(self.state, acked=acked)
        try:
            self.store.save(self.state)
        except OSError as exc:  # a full disk must not abort an update that is working
            log.warning("cannot save the transfer state", extra={"error": str(exc)})


async def run_transfer(
    sender: OtaSender,
    send: Callable[[m.Message, bool], object],
    events: asyncio.Queue[Event | None],
    *,
    progress: ProgressCallback | None = None,
    save: Callable[[int], None] | None = None,
) -> OtaResult:
    """Drives `sender` until it has a result: link events from `events` (None: the
    port is gone), messages out through `send(message, reliable)`."""
    loop = asyncio.get_running_loop()
    closed: list[str] = []

    def out(msgs: list[m.Message]) -> None:
        for msg in msgs:
            try:
                # chunks are acknowledged by OTA_CHUNK_ACK; the rest by the link as well
                send(msg, not isinstance(msg, m.OtaChunk))
            except BridgeError as exc:
                closed.append(str(exc))
                return

    acked = -1
    out(sender.start(loop.time()))
    while sender.result is None:
        if closed:
            return OtaResult(
                Outcome.FAILED, closed[0], sender.from_version, str(sender.package.manifest.version)
            )
        if sender.acked != acked:
            acked = sender.acked
            if progress is not None:
                progress(acked, sender.size)
            if save is not None:
                save(acked)
        timeout = None if sender.deadline is None else max(0.0, sender.deadline - loop.time())
        try:
            # asyncio.timeout, not wait_for: before 3.12 wait_for can swallow a cancel
            # that races a ready queue, and a cancelled push must stop
            async with asyncio.timeout(timeout):
                ev = await events.get()
        except TimeoutError:
            out(sender.poll(loop.time()))
            continue
        now = loop.time()
        if ev is None:
            closed.append("the serial port is gone")
            continue
        if isinstance(ev, MessageReceived) and isinstance(ev.message, _OTA_REPLIES):
            out(sender.on_message(ev.message, now))
        elif isinstance(ev, LinkUp):
            out(sender.on_capabilities(ev.capabilities, now))
        elif isinstance(ev, LinkLost):
            log.info("firmware push: link lost", extra={"reason": ev.reason, "acked": sender.acked})
            sender.pause(now)
        out(sender.poll(now))
    if progress is not None and sender.result.outcome is Outcome.UPDATED:
        progress(sender.size, sender.size)
    return sender.result
