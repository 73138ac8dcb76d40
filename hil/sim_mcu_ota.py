"""The simulated microcontroller's OTA receiver: `attach_ota(sim, public_key)` plugs
firmware_bridge.ota.OtaReceiver into `SimMcu.ota`, writing into the sim's slots.

The glue is what a firmware's main loop does around the receiver: a reset forgets the
transfer held in RAM, and the sim's `reject_images` fault refuses every OTA_BEGIN.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware_bridge import messages as m
from firmware_bridge.frame import OVERHEAD
from firmware_bridge.ota import OtaReceiver
from hil.sim_mcu import SimMcu

__all__ = ["SimOta", "attach_ota"]

SLOT_CAPACITY = 1024 * 1024


class SimOta:
    def __init__(self, sim: SimMcu, public_key: Ed25519PublicKey, capacity: int) -> None:
        self.sim = sim
        self.receiver = OtaReceiver(
            sim.slots,
            public_key,
            sim.hardware_id,
            max_chunk=sim.max_frame - OVERHEAD - m.OtaChunk.HEAD,
            capacity=capacity,
        )
        self.boots = len(sim.boots)
        self.received: list[m.Message] = []  # every OTA message handled (tests look)

    def handle(self, message: m.Message, now: float) -> list[m.Message]:
        if len(self.sim.boots) != self.boots:  # the sim reset since the last message
            self.boots = len(self.sim.boots)
            self.receiver.reset()
        reject = self.sim.faults.reject_images
        self.receiver.refuse = m.OtaBeginStatus.REJECTED if reject else None
        self.received.append(message)
        return self.receiver.on_message(message)


def attach_ota(sim: SimMcu, public_key: Ed25519PublicKey, capacity: int = SLOT_CAPACITY) -> SimOta:
    hook = SimOta(sim, public_key, capacity)
    sim.ota = hook
    return hook
