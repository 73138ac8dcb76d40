"""The host side of the serial link to the gateway's microcontroller
(docs/firmware-protocol.md).

- cobs.py, crc.py, frame.py: framing (COBS, CRC-32C, header), sans-I/O decoder
- messages.py: every message type as a dataclass, payload codecs
- link.py: HostLink / DeviceLink, the sans-I/O reliability and session engine
- serial_io.py: asyncio adapter over a tty/pty file descriptor
- bridge.py: McuBridge, the async controller (wait_up, send, request, command, events)
- image.py, ota.py: signed firmware images and the OTA transfer
"""
