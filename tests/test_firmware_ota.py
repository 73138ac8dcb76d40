"""The OTA transfer, sans-I/O: `OtaSender` and `OtaReceiver` driven against each other
in memory on a virtual clock, through a lossy, reordering line; link drops, a gateway
restart (a new sender from the persisted state), refusals and rollbacks."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import image as fw
from firmware_bridge import messages as m
from firmware_bridge.image import Version
from firmware_bridge.ota import FirmwareSlots, OtaReceiver, OtaResult, OtaSender, Outcome, Slot
from firmware_bridge.ota_state import OtaStateStore

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
HW = "cgw-mcu-r2"
OLD = Version(1, 0, 0)
IMAGE = random.Random(7).randbytes(20_000)
PACKAGE = fw.sign(IMAGE, KEY, Version(1, 1, 0), HW)
CHUNK = 200
WINDOW = 6


@dataclass
class Device:
    """The device end: receiver, slots, and a reset that answers CAPABILITIES."""

    crash_new_image: bool = False
    slots: FirmwareSlots = field(default_factory=lambda: FirmwareSlots.initial(OLD))
    receiver: OtaReceiver = field(init=False)

    def __post_init__(self) -> None:
        self.receiver = OtaReceiver(
            self.slots, KEY.public_key(), HW, max_chunk=512, capacity=64 * 1024
        )

    def reset(self) -> m.Capabilities:
        reason = self.slots.boot()
        if reason is m.BootReason.OTA_UPDATE and self.crash_new_image:
            reason = self.slots.boot()  # it dies before it confirms: the watchdog resets
        if reason is m.BootReason.OTA_UPDATE:
            self.slots.confirm()  # the host's ACK of CAPABILITIES, in the real link
        self.receiver.reset()
        return m.Capabilities(
            protocol_version=1,
            firmware=m.Version(*self.slots.version),
            active_slot=self.slots.active,
            slot_state=self.slots.slot_state,
            boot_reason=reason,
            max_frame=1024,
            uptime_ms=0,
            sampling_interval_ms=1000,
            failed_version=self.slots.failed,
            hardware_id=HW,
        )


@dataclass
class Line:
    """Messages in flight both ways, each delivered after a random delay (reordering)
    unless lost. `up` False: everything sent is lost."""

    rng: random.Random
    loss: float = 0.0
    jitter: float = 0.0
    up: bool = True
    queue: list[tuple[float, int, str, m.Message]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)
    chunks_delivered: int = 0

    def send(self, now: float, to: str, msgs: list[m.Message]) -> None:
        for msg in msgs:
            if not self.up:
                continue
            # CAPABILITIES is ACK_REQUESTED: the link layer repeats it until the host answers
            if self.rng.random() < self.loss and not isinstance(msg, m.Capabilities):
                continue
            at = now + 0.005 + self.rng.random() * self.jitter
            heapq.heappush(self.queue, (at, next(self.counter), to, msg))

    def drop_all(self) -> None:
        self.queue.clear()


def run(
    sender: OtaSender,
    device: Device,
    line: Line,
    *,
    now: float = 0.0,
    until: float = 600.0,
    stop: object = None,
    start: bool = True,
) -> float:
    """Deliver and poll until the sender is done, `stop(sender)` is true, or `until`."""
    if start:
        line.send(now, "dev", sender.start(now))
    while not sender.done and now < until:
        if callable(stop) and stop(sender):
            return now
        nxt = line.queue[0][0] if line.queue else None
        dl = sender.deadline
        if nxt is None and dl is None:
            break
        if nxt is not None and (dl is None or nxt <= dl):
            now, _, to, msg = heapq.heappop(line.queue)
            if to == "dev":
                if isinstance(msg, m.OtaChunk):
                    line.chunks_delivered += 1
                replies = device.receiver.on_message(msg)
                line.send(now, "host", replies)
                if any(isinstance(r, m.OtaEndResult) and r.ok for r in replies):
                    line.send(now + 0.5, "host", [device.reset()])
            elif isinstance(msg, m.Capabilities):
                line.send(now, "dev", sender.on_capabilities(msg, now))
            else:
                line.send(now, "dev", sender.on_message(msg, now))
        else:
            assert dl is not None
            now = dl
            line.send(now, "dev", sender.poll(now))
    return now


def new_sender(package: fw.Package = PACKAGE, transfer_id: int = 77) -> OtaSender:
    return OtaSender(
        package,
        transfer_id,
        chunk_size=CHUNK,
        window=WINDOW,
        ack_timeout=0.5,
        begin_timeout=0.5,
        stall_timeout=60.0,
        reboot_timeout=10.0,
        from_version=str(OLD),
    )


def test_clean_transfer_updates() -> None:
    device, sender = Device(), new_sender()
    run(sender, device, Line(random.Random(1)))
    assert sender.result is not None
    assert sender.result.outcome is Outcome.UPDATED, sender.result
    assert sender.result.summary() == "updated 1.0.0 -> 1.1.0"
    assert device.slots.version == Version(1, 1, 0) and not device.slots.trial
    active = device.slots.slots[device.slots.active]
    assert active is not None and active.image == IMAGE
    assert sender.bytes_sent == len(IMAGE) and sender.bytes_resent == 0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.05, 0.2, 0.35]),
    jitter=st.sampled_from([0.0, 0.02, 0.2]),
)
def test_loss_and_reordering_complete(seed: int, loss: float, jitter: float) -> None:
    device, sender = Device(), new_sender()
    run(sender, device, Line(random.Random(seed), loss=loss, jitter=jitter), until=3600.0)
    assert sender.result is not None
    assert sender.result.outcome is Outcome.UPDATED, sender.result
    active = device.slots.slots[device.slots.active]
    assert active is not None and active.image == IMAGE


def test_link_drop_resumes_from_acknowledged_offset() -> None:
    device, sender = Device(), new_sender()
    line = Line(random.Random(3))
    half = len(IMAGE) // 2
    now = run(sender, device, line, stop=lambda s: s.acked >= half)
    sent_before = sender.bytes_sent
    # the cable is pulled: what is in flight is gone; the host pauses while the
    # heartbeat says the link is down, then resumes with OTA_BEGIN
    line.drop_all()
    now += 30.0
    run(sender, device, line, now=now, start=False, stop=lambda s: True)  # no-op
    line.send(now, "dev", sender.resume(now))
    run(sender, device, line, now=now, start=False)
    assert sender.result is not None and sender.result.outcome is Outcome.UPDATED
    assert sender.resume_offset >= half
    assert sender.bytes_resent <= WINDOW * CHUNK
    assert sender.bytes_sent - sent_before <= len(IMAGE) - half + WINDOW * CHUNK


def test_link_down_while_sending_then_back() -> None:
    """The sender keeps polling while nothing gets through: it goes back to the
    acknowledged offset on every timeout and completes once the line is back."""
    device, sender = Device(), new_sender()
    line = Line(random.Random(4))
    now = run(sender, device, line, stop=lambda s: s.acked >= 5000)
    line.up = False
    line.drop_all()
    now = run(sender, device, line, now=now, start=False, until=now + 5.0)
    line.up = True
    run(sender, device, line, now=now, start=False, until=now + 600)
    assert sender.result is not None and sender.result.outcome is Outcome.UPDATED


def test_gateway_restart_resumes_from_persisted_state(tmp_path: Path) -> None:
    store = OtaStateStore(tmp_path / "ota")
    sha = PACKAGE.manifest.sha256.hex()
    state = store.begin(sha, PACKAGE.manifest.size, "1.1.0", HW)
    device = Device()
    line = Line(random.Random(5))
    first = new_sender(transfer_id=state.transfer_id)
    now = run(first, device, line, stop=lambda s: s.acked >= 12_000)
    store.save(replace(state, acked=first.acked))
    # the gateway process dies here; the line keeps whatever was in flight
    restored = OtaStateStore(tmp_path / "ota").load(sha)
    assert restored is not None and restored.transfer_id == state.transfer_id
    assert restored.acked >= 12_000
    second = new_sender(transfer_id=restored.transfer_id)
    run(second, device, line, now=now + 5.0)
    assert second.result is not None and second.result.outcome is Outcome.UPDATED
    assert second.resume_offset >= restored.acked
    assert second.bytes_sent <= len(IMAGE) - restored.acked + WINDOW * CHUNK
    store.clear(sha)
    assert store.load(sha) is None


def test_state_store(tmp_path: Path) -> None:
    store = OtaStateStore(tmp_path)
    a = store.begin("ab" * 32, 100, "1.0.0", HW)
    assert store.begin("ab" * 32, 100, "1.0.0", HW) == a  # same package: same transfer
    b = store.begin("cd" * 32, 100, "1.0.0", HW)
    assert b.transfer_id != a.transfer_id or b.sha256 != a.sha256
    (tmp_path / f"ota-{'ef' * 16}.json").write_text("{not json")
    assert store.load("ef" * 32) is None
    assert not list(tmp_path.glob("*.tmp"))


def test_device_refuses_bad_signature_before_any_chunk() -> None:
    other = Ed25519PrivateKey.generate()
    forged = fw.sign(IMAGE, other, Version(1, 1, 0), HW)
    device, sender = Device(), new_sender(forged)
    line = Line(random.Random(6))
    run(sender, device, line)
    assert sender.result is not None and sender.result.outcome is Outcome.REFUSED
    assert "bad_signature" in sender.result.reason
    assert sender.bytes_sent == 0 and line.chunks_delivered == 0
    assert device.slots.slots[1] is None and device.slots.version == OLD


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"hardware_id": "other"}, "wrong_hardware"),
        ({"image_size": 1 << 20}, "too_large"),
        ({"chunk_size": 4096}, "bad_chunk_size"),
        ({"version": m.Version(1, 1, 1)}, "bad_signature"),
        ({"sha256": bytes(32)}, "bad_signature"),
    ],
)
def test_receiver_checks_begin(change: dict[str, Any], status: str) -> None:
    begin = new_sender().start(0.0)[0]
    assert isinstance(begin, m.OtaBegin)
    device = Device()
    (reply,) = device.receiver.on_message(replace(begin, **change), seq=9)
    assert isinstance(reply, m.OtaBeginResult)
    assert reply.status.name.lower() == status and reply.request_seq == 9
    assert device.slots.slots[1] is None


def test_device_side_refusal_fault() -> None:
    device, sender = Device(), new_sender()
    device.receiver.refuse = m.OtaBeginStatus.BUSY
    run(sender, device, Line(random.Random(8)))
    assert sender.result is not None and sender.result.outcome is Outcome.REFUSED
    assert sender.result.summary() == "refused: the device refused the image: busy"


def test_image_that_fails_to_boot_is_rolled_back() -> None:
    device, sender = Device(crash_new_image=True), new_sender()
    run(sender, device, Line(random.Random(9)))
    assert sender.result is not None and sender.result.outcome is Outcome.ROLLED_BACK
    assert sender.result.from_version == "1.0.0" and sender.result.to_version == "1.1.0"
    assert "rolled back" in sender.result.summary()
    assert device.slots.version == OLD and device.slots.failed == Version(1, 1, 0)


def test_unconfirmed_trial_rolls_back_at_next_reset() -> None:
    slots = FirmwareSlots.initial(OLD)
    slots.write_inactive(b"new", m.Version(2, 0, 0))
    assert slots.boot() is m.BootReason.OTA_UPDATE
    assert slots.version == Version(2, 0, 0) and slots.slot_state is m.SlotState.TRIAL
    # no confirmation (the host never ACKed the new image's CAPABILITIES): reset
    assert slots.boot() is m.BootReason.ROLLED_BACK
    assert slots.version == OLD and slots.failed == Version(2, 0, 0)
    assert slots.boot() is m.BootReason.POWER_ON
    slots.write_inactive(b"new", m.Version(2, 0, 0))
    slots.boot()
    slots.confirm()
    assert slots.boot() is m.BootReason.POWER_ON and slots.version == Version(2, 0, 0)
    assert isinstance(slots.slots[1 - slots.active], Slot)


def test_sha_mismatch_at_end_is_refused() -> None:
    """A device whose flash corrupts a byte: OTA_END fails its SHA-256 check."""
    device, sender = Device(), new_sender()
    real = device.receiver.on_message

    def corrupting(msg: m.Message, seq: int = 0) -> list[m.Message]:
        if isinstance(msg, m.OtaChunk) and msg.offset == CHUNK * 3:
            msg = m.OtaChunk(msg.transfer_id, msg.offset, b"\xff" + msg.data[1:])
        return real(msg, seq)

    device.receiver.on_message = corrupting  # type: ignore[method-assign]
    run(sender, device, Line(random.Random(10)))
    assert sender.result is not None and sender.result.outcome is Outcome.REFUSED
    assert "sha_mismatch" in sender.result.reason
    assert device.slots.version == OLD and not device.slots.staged


def test_device_reboot_mid_transfer_restarts() -> None:
    """The device resets during the transfer (its receive state is in RAM): its
    CAPABILITIES makes the sender begin again, from wherever the device says."""
    device, sender = Device(), new_sender()
    line = Line(random.Random(11))
    now = run(sender, device, line, stop=lambda s: s.acked >= 8000)
    line.drop_all()
    line.send(now, "host", [device.reset()])
    run(sender, device, line, now=now, start=False)
    assert sender.result is not None and sender.result.outcome is Outcome.UPDATED


def test_silent_device_fails_after_stall_timeout() -> None:
    sender = new_sender()
    line = Line(random.Random(12), up=False)
    run(sender, Device(), line)
    assert sender.result is not None and sender.result.outcome is Outcome.FAILED
    assert "no progress" in sender.result.reason


def test_status_answers_resume_point() -> None:
    device, sender = Device(), new_sender()
    line = Line(random.Random(13))
    run(sender, device, line, stop=lambda s: s.acked >= 4000)
    (status,) = device.receiver.on_message(m.OtaStatusReq(77), seq=3)
    assert isinstance(status, m.OtaStatus)
    assert status.state is m.OtaState.RECEIVING and status.offset >= 4000
    assert status.transfer_id == 77 and status.image_size == len(IMAGE)


def test_begin_again_after_end_keeps_the_staged_image() -> None:
    """The link flaps after OTA_END was handled but before its result arrived: the
    host's OTA_BEGIN (resume) must not erase the verified image."""
    device, sender = Device(), new_sender()
    msgs = sender.start(0.0)
    (res,) = device.receiver.on_message(msgs[0])
    out = sender.on_message(res, 0.0)
    while out:
        nxt: list[m.Message] = []
        for msg in out:
            for reply in device.receiver.on_message(msg):
                nxt += sender.on_message(reply, 0.0)
        out = [x for x in nxt if not isinstance(x, m.OtaEnd)]
        if any(isinstance(x, m.OtaEnd) for x in nxt):
            device.receiver.on_message(m.OtaEnd(77))  # handled; its result is lost
            break
    assert device.slots.staged
    (again,) = device.receiver.on_message(sender.start(1.0)[0])
    assert isinstance(again, m.OtaBeginResult) and again.resume_offset == len(IMAGE)
    (end,) = sender.on_message(again, 1.0)
    assert isinstance(end, m.OtaEnd)
    (ok,) = device.receiver.on_message(end)
    assert isinstance(ok, m.OtaEndResult) and ok.ok and device.slots.staged


# -- the platform's downlink command ---------------------------------------------------


def test_run_update_fetches_checks_the_named_image_and_answers() -> None:
    import asyncio

    import orjson

    from agent.commands import FirmwareUpdateCommand
    from agent.ota_command import answer, run_update

    updated: list[tuple[bytes, bool]] = []

    async def update(package: bytes, force: bool) -> OtaResult:
        updated.append((package, force))
        return OtaResult(Outcome.UPDATED, "", "1.0.0", "1.1.0")

    async def fetch(url: str) -> bytes:
        if url.endswith("/gone"):
            raise OSError("HTTP Error 404: Not Found")
        return PACKAGE.encode()[:999] if url.endswith("/cut") else PACKAGE.encode()

    def run(url: str, sha: bytes | None = None, force: bool = False) -> dict[str, Any]:
        cmd = FirmwareUpdateCommand("c1", "mcu", url, sha, force)
        result = asyncio.run(run_update(cmd, update, fetch))
        out: dict[str, Any] = orjson.loads(answer(cmd.id, result))
        return out

    base = "https://fw.example/mcu"
    ok = run(f"{base}/1.1.0.cgfw", PACKAGE.manifest.sha256, force=True)
    assert ok["ok"] and ok["outcome"] == "updated" and (ok["from"], ok["to"]) == ("1.0.0", "1.1.0")
    assert updated == [(PACKAGE.encode(), True)]
    other = run(f"{base}/1.1.0.cgfw", b"\0" * 32)
    assert other["outcome"] == "refused" and "sha256 differs" in other["error"]
    cut = run(f"{base}/cut", PACKAGE.manifest.sha256)
    assert cut["outcome"] == "refused" and cut["error"].startswith("truncated")
    gone = run(f"{base}/gone")
    assert gone["outcome"] == "failed" and "404" in gone["error"] and not gone["ok"]
    assert len(updated) == 1  # nothing refused reached the driver


def test_no_new_transfer_while_on_trial() -> None:
    """Until the new image confirms, the inactive slot is the way back: a BEGIN for
    another image must not erase it."""
    device = Device()
    device.slots.write_inactive(b"x" * 100, m.Version(1, 1, 0))
    device.slots.boot()
    assert device.slots.trial
    (reply,) = device.receiver.on_message(new_sender().start(0.0)[0])
    assert isinstance(reply, m.OtaBeginResult) and reply.status is m.OtaBeginStatus.BUSY
    assert device.slots.slots[1 - device.slots.active] is not None
