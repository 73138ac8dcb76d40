"""The serial link: codec speed, and OTA throughput against the line rate.

1. Codec: frames per second through the whole path a frame takes, both ways: a
   message's payload encoding, header, CRC-32C and COBS (`frame.encode`), then
   `FrameDecoder.feed` on the byte stream and the message decoding. The mix is what the
   link carries: READINGS (8 readings), OTA_CHUNK (960 data bytes), OTA_CHUNK_ACK,
   HEARTBEAT. frames_per_s = frames / (encode time + decode time), i.e. a frame
   encoded and decoded once.
2. OTA: `push_firmware` of a 128 KiB signed image over a real pty to the simulated
   microcontroller (drivers/mcu/simulator.py, given the public key), the host's writes paced to
   115200 baud 8N1 (11520 bytes/s, `McuBridge(pace_baud=...)`). The transfer phase is
   timed from the first progress report (OTA_BEGIN going out) to the last chunk
   acknowledged; ota_efficiency = image bytes / (11520 B/s x that time): what framing,
   chunk headers, COBS and waiting for acknowledgements cost against the raw line.

Bounded: ~3 s of codec, ~12 s of transfer. Last line:

    serial: frames_per_s=<N> ota_efficiency=<X.XX>
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from drivers.mcu.simulator import SimMcu  # noqa: E402
from firmware_bridge import frame  # noqa: E402
from firmware_bridge import image as fw  # noqa: E402
from firmware_bridge import messages as m  # noqa: E402
from firmware_bridge.bridge import McuBridge  # noqa: E402
from firmware_bridge.ota import Outcome  # noqa: E402
from firmware_bridge.ota_push import PushSettings, push_firmware  # noqa: E402

BAUD = 115200
LINE_BYTES_PER_S = BAUD / 10  # 8N1: a start bit, 8 data bits, a stop bit
HW = "citygw-mcu-r1"


def sample_messages() -> list[m.Message]:
    rng = random.Random(3)
    readings = m.Readings(
        tuple(m.Reading(i % 4 + 1, 1000 * i, m.ValueType.F32, rng.uniform(0, 5)) for i in range(8))
    )
    chunk = m.OtaChunk(7, 4096, rng.randbytes(960))
    return [readings, chunk, m.OtaChunkAck(7, 5056), m.Heartbeat(123456, True)]


def bench_codec(seconds: float) -> tuple[float, float, float]:
    """(frames_per_s round trip, encode-only, decode-only)."""
    msgs = sample_messages()
    batch = 2000
    encode_t = decode_t = 0.0
    frames = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        parts = [
            frame.encode(msg.TYPE, i & 0xFFFF, msg.encode_payload())
            for i, msg in zip(range(batch), msgs * (batch // len(msgs)), strict=True)
        ]
        stream = b"".join(parts)
        t1 = time.perf_counter()
        decoder = frame.FrameDecoder(1024)
        got = 0
        for piece in range(0, len(stream), 4096):  # as reads from a port arrive
            for item in decoder.feed(stream[piece : piece + 4096]):
                assert isinstance(item, frame.Frame)
                m.decode(item)
                got += 1
        t2 = time.perf_counter()
        assert got == batch
        encode_t += t1 - t0
        decode_t += t2 - t1
        frames += batch
    return frames / (encode_t + decode_t), frames / encode_t, frames / decode_t


async def bench_ota(size: int, window: int) -> tuple[float, float, int]:
    """(efficiency, seconds of transfer, chunk payload bytes sent)."""
    key = Ed25519PrivateKey.generate()
    package = fw.sign(random.Random(5).randbytes(size), key, fw.Version(1, 1, 0), HW)
    sim = SimMcu.on_pty(interval=1.0, hardware_id=HW, ota_public_key=key.public_key())
    marks: list[float] = []

    def progress(done: int, total: int) -> None:
        if not marks:
            marks.append(time.perf_counter())  # OTA_BEGIN has just been written
        if done >= total and len(marks) == 1:
            marks.append(time.perf_counter())

    async with sim.running(), McuBridge(sim.port, BAUD, pace_baud=BAUD) as bridge:
        await bridge.wait_up(10)
        settings = PushSettings(window=window, stall_timeout=30.0)
        policy = fw.UpdatePolicy(key.public_key())
        result = await push_firmware(bridge, package, policy, progress=progress, settings=settings)
    if result.outcome is not Outcome.UPDATED or len(marks) != 2:
        raise SystemExit(f"OTA did not complete: {result.summary()}")
    elapsed = marks[1] - marks[0]
    return size / (LINE_BYTES_PER_S * elapsed), elapsed, result.bytes_sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--codec-seconds", type=float, default=3.0)
    ap.add_argument("--image-kib", type=int, default=128)
    ap.add_argument("--window", type=int, default=4)
    args = ap.parse_args()

    fps, enc, dec = bench_codec(args.codec_seconds)
    print(f"codec: {fps:,.0f} frames/s encoded+decoded ({enc:,.0f} encode, {dec:,.0f} decode)")
    size = args.image_kib * 1024
    eff, elapsed, sent = asyncio.run(bench_ota(size, args.window))
    print(
        f"ota: {size} bytes in {elapsed:.2f} s = {size / elapsed:,.0f} B/s against "
        f"{LINE_BYTES_PER_S:,.0f} B/s line rate (window {args.window}, {sent} chunk bytes sent)"
    )
    print(f"serial: frames_per_s={fps:.0f} ota_efficiency={eff:.2f}")


if __name__ == "__main__":
    main()
