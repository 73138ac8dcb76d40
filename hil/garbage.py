"""The `garbage-input` bookkeeping: junk injected wherever the gateway listens, kind by
kind, and a verdict that counts exactly: every piece injected was rejected and counted
once, by the agent (device health ``rejected``, by reason) or by the ingest
(``IngestCounters.rejected``, by reason), and every good input around it still arrived.

A piece of junk counts as injected only if the agent could hear it, so each simulator's
junk is on only while the agent listens, and the run waits (`settle`) until everything
injected has reached the agent before it stops it:

- RTU answers (`GarbageRtuFront`): it answers only the agent's requests. At the end its
  junk goes off and the cabinet falls silent; the run waits until the agent sends a
  request that stays unanswered (a serial master: it took every answer before it) or,
  if it backs off after failed polls, until the last answer is older than the devices'
  timeout and a margin (it timed out on it and counted it).
- MQTT sensor payloads: junk goes on once a reading of every sensor is stored (the
  agent's subscription came before it) and off at the end; the run then waits until a
  message of each sensor published after that is stored (one publisher, one topic:
  in order).
- BLE adverts: the replay file is played once, whole (``replay_loop = false``); the run
  waits until the agent logs that it finished.
- Microcontroller frames: garbling goes on once the simulator answered a HELLO (the
  agent's port is open and flushed) and off at the end; the run then waits until a
  reading sampled after that was acknowledged (the agent read every byte before it).
- The platform's uplink topics: junk the rig publishes itself, each kind with the one
  reason the ingest must give it.

Where the receiver cannot tell kinds apart (the MQTT driver sees "bad_json" for random
bytes and cut JSON alike; a frame decoder sees "cobs", "short" or "bad_crc", not how the
line garbled the frame), the check is per reason the receiver gives: the sum of the
kinds that must get it (the microcontroller simulator records, per garbled piece, the
reason a frame decoder gives it). Both figures are reported: ``injected_<source>_<kind>``
and ``rejected_<source>_<reason>``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from agent.config import Config, load_config
from common.mqtt_url import BrokerAddress

if TYPE_CHECKING:
    from hil.runner import Rig, Verdict
    from hil.scenario import Sims

__all__ = [
    "MQTT_REASONS",
    "RTU_REASONS",
    "UPLINK_JUNK",
    "GarbageInput",
    "compare_counts",
    "uplink_junk",
]

#: the GarbageRtuFront's kinds -> the kind the agent's Modbus client names
RTU_REASONS = {"random": "junk", "truncated": "truncated", "bad_crc": "bad_crc"}
#: the MqttSensors' garbage kinds -> the PayloadError reason the mqtt driver gives them
MQTT_REASONS = {
    "not_json": "bad_json",
    "truncated_json": "bad_json",
    "missing_field": "missing_path",
    "wrong_type": "not_numeric",
}
#: junk on the platform's uplink topics: kind -> (topic kind, the ingest's reason)
UPLINK_JUNK: dict[str, tuple[str, str]] = {
    "noise": ("up/batch", "envelope"),  # random bytes, not an envelope
    "bad_version": ("up/alarm", "version"),  # an envelope of an unknown version
    "wrong_lane": ("up/alarm", "lane"),  # a telemetry envelope on the alarm topic
    "bad_codec": ("up/batch", "codec"),  # an envelope around a body that is no batch
    "forged_gateway": ("up/batch", "gateway"),  # a batch that claims another gateway
    "bad_count": ("up/batch", "n_points"),  # a header that miscounts its readings
    "bad_meta": ("up/meta", "meta"),
    "bad_stats": ("up/stats", "stats"),
    "bad_state": ("state", "state"),
}

POLL_S = 0.05
SETTLE_TIMEOUT_S = 20.0
#: beyond a Modbus device's timeout: how late its agent may count a garbled answer
RTU_MARGIN_S = 1.0


def uplink_junk(kind: str, gateway: str, seq: int) -> bytes:
    """One junk message of `kind` (see UPLINK_JUNK) for `gateway`'s topics."""
    from common import wire
    from native import codec
    from native.batch import Batch

    stream = os.urandom(16).hex()  # never the gateway's: nothing of it may be stored
    one = Batch.at(1_700_000_000_000, [1], [1.0])
    if kind == "noise":
        junk = os.urandom(1 + seq % 199)
        return b"XX" + junk if junk.startswith(wire.MAGIC) else junk
    if kind == "bad_version":
        header = wire.wrap(wire.LANE_ALARM, stream, seq, 0, b"")
        return header[:2] + bytes([(wire.VERSION + 100) % 256]) + header[3:] + b"{}"
    if kind == "wrong_lane":
        body = codec.encode(one, gateway=gateway, seq=seq)
        return wire.wrap(wire.LANE_TELEMETRY, stream, seq, 1, body)
    if kind == "bad_codec":
        return wire.wrap(wire.LANE_TELEMETRY, stream, seq, 1, b"not a codec body")
    if kind == "forged_gateway":
        body = codec.encode(one, gateway=f"not-{gateway}", seq=seq)
        return wire.wrap(wire.LANE_TELEMETRY, stream, seq, 1, body)
    if kind == "bad_count":
        body = codec.encode(one, gateway=gateway, seq=seq)
        return wire.wrap(wire.LANE_TELEMETRY, stream, seq, 7, body)
    if kind == "bad_meta":
        return b"\xff not JSON"
    if kind == "bad_stats":
        return b'{"v": 1, "events": "x"}'
    if kind == "bad_state":
        return b"maybe"
    raise ValueError(f"unknown uplink junk kind {kind!r}")


class GarbageInput:
    """The junk of one run of `rig`: `inject` (a task of the timeline), `settle` (after
    the run's duration, before the agent stops), `judge` (into the verdict)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.uplink: Counter[str] = Counter()  # junk published by kind
        self.mqtt_open: float | None = None  # wall clock: junk went on / off
        self.mqtt_close: float | None = None
        self.mcu_open = False
        self.mcu_sampled_at_close = 0
        self.unsettled: list[str] = []  # sources whose junk may not all have arrived

    @staticmethod
    def wanted(sims: Sims) -> bool:
        return bool(
            sims.modbus_garbage
            or sims.mqtt_garbage
            or sims.ble_garbage
            or sims.mcu_garbage
            or sims.uplink_garbage
        )

    # -- the run ------------------------------------------------------------------------

    async def inject(self) -> None:
        sims = self.rig.scn.sims
        jobs: list[Awaitable[None]] = []
        if sims.uplink_garbage:
            jobs.append(self._publish_uplink_junk(sims.uplink_garbage))
        if sims.mqtt_garbage and getattr(self.rig, "sensors", None) is not None:
            jobs.append(self._open_mqtt(sims.mqtt_garbage))
        if sims.mcu_garbage and self.rig.mcu is not None:
            jobs.append(self._open_mcu(sims.mcu_garbage))
        await asyncio.gather(*jobs)

    async def _publish_uplink_junk(self, n: int) -> None:
        """A hostile or broken client publishing junk on this gateway's uplink topics."""
        import aiomqtt

        from common import wire

        await asyncio.sleep(2.0)
        kinds = list(UPLINK_JUNK)
        addr = BrokerAddress.parse(self.rig.broker_url)
        async with aiomqtt.Client(
            addr.host,
            addr.port,
            identifier="hil-rogue",
            username=addr.username,
            password=addr.password,
        ) as client:
            for i in range(n):
                kind = kinds[i % len(kinds)]
                topic = wire.topic(wire.DEFAULT_PREFIX, self.rig.gateway, UPLINK_JUNK[kind][0])
                await client.publish(topic, uplink_junk(kind, self.rig.gateway, i + 1), qos=1)
                self.uplink[kind] += 1
        self.rig.mark(f"{n} junk messages published on the uplink topics")

    async def _open_mqtt(self, probability: float) -> None:
        sensors = self.rig.sensors
        keys = [f"{name}/{point}" for name, point in _mqtt_points(self._config(), sensors.names)]
        while not all(await asyncio.gather(*(self._stored_any(k) for k in keys))):
            await asyncio.sleep(0.2)
        sensors.garbage = probability
        self.mqtt_open = time.time()
        self.rig.mark("MQTT sensor junk on (the agent's subscription delivers)")

    async def _open_mcu(self, probability: float) -> None:
        mcu = self.rig.mcu
        assert mcu is not None
        while mcu.counts["hellos"] < 1:
            await asyncio.sleep(POLL_S)
        mcu.faults.garbage_tx = probability
        self.mcu_open = True
        self.rig.mark("microcontroller line noise on (the agent's port is open)")

    async def settle(self) -> None:
        """Turns every junk off and waits until all of it reached the agent."""
        rig = self.rig
        waits: dict[str, Callable[[], Awaitable[bool]]] = {}
        server = rig.rtu_garbage
        if server is not None:
            server.probability = 0.0
            server.cabinet.silent = True  # nothing good in flight when the agent stops
            waits["rtu"] = self._settle_rtu
        sensors = getattr(rig, "sensors", None)
        if sensors is not None and self.mqtt_open is not None:
            sensors.garbage = 0.0
            self.mqtt_close = time.time()
            waits["mqtt"] = self._settle_mqtt
        if rig.mcu is not None and self.mcu_open:
            rig.mcu.faults.garbage_tx = 0.0
            self.mcu_sampled_at_close = rig.mcu.counts["sampled"]
            waits["mcu"] = self._settle_mcu
        if getattr(rig, "ble_record", None) is not None:
            waits["ble"] = self._settle_ble
        done = await asyncio.gather(
            *(asyncio.wait_for(w(), SETTLE_TIMEOUT_S) for w in waits.values()),
            return_exceptions=True,
        )
        self.unsettled = [name for name, ok in zip(waits, done, strict=True) if ok is not True]
        late = f" (not settled: {', '.join(self.unsettled)})" if self.unsettled else ""
        rig.mark(f"junk off, all of it with the agent{late}")

    async def _settle_rtu(self) -> bool:
        server = self.rig.rtu_garbage
        assert server is not None
        loop = asyncio.get_running_loop()
        silenced = loop.time()
        timeout = max(
            (
                float(getattr(d.settings, "timeout", 1.0))
                for d in self._config().devices
                if _on_port(d, server.port)
            ),
            default=1.0,
        )
        requests = server.cabinet.requests
        while not (requests and requests[-1].time > silenced):
            last = server.front.last_answer
            if last is None or loop.time() > last + timeout + RTU_MARGIN_S:
                break  # backing off: done with its last answer (timed out and counted)
            await asyncio.sleep(POLL_S)
        return True

    async def _settle_mqtt(self) -> bool:
        sensors = self.rig.sensors
        assert self.mqtt_close is not None
        points = dict(_mqtt_points(self._config(), sensors.names))
        for name in sensors.names:
            if name not in points:
                continue
            while True:
                later = {
                    _payload_ms(m.payload)
                    for m in sensors.sent
                    if m.sensor == name and m.garbage is None and m.time > self.mqtt_close
                }
                stored = await self._stored_ts(f"{name}/{points[name]}")
                if later & stored:
                    break
                await asyncio.sleep(0.2)
        return True

    async def _settle_mcu(self) -> bool:
        mcu = self.rig.mcu
        assert mcu is not None
        while mcu.counts["sampled"] <= self.mcu_sampled_at_close or mcu.backlog:
            await asyncio.sleep(POLL_S / 2)
        return True

    async def _settle_ble(self) -> bool:
        log = self.rig.agent.log
        while not any(
            "ble replay" in line and "finished" in line
            for line in log.read_text(errors="replace").splitlines()
        ):
            await asyncio.sleep(0.2)
        return True

    async def _stored_any(self, key: str) -> bool:
        return bool(await self._stored_ts(key))

    async def _stored_ts(self, key: str) -> set[int]:
        rows = await asyncio.to_thread(self.rig.store.readings, self.rig.gateway, key)
        return {ts for _, ts, _, _ in rows}

    def _config(self) -> Config:
        return load_config(self.rig.config)

    # -- the verdict --------------------------------------------------------------------

    def judge(self, v: Verdict) -> None:
        rig = self.rig
        cfg = self._config()
        devices: dict[str, Any] = rig.run_state.get("devices", {})
        v.figures["device_errors"] = sum(d.get("errors", 0) for d in devices.values())
        v.check(not self.unsettled, f"junk of {self.unsettled} still on its way at the stop")
        if rig.rtu_garbage is not None:
            self._judge_rtu(v, cfg, devices)
        if getattr(rig, "sensors", None) is not None and rig.scn.sims.mqtt_garbage:
            self._judge_mqtt(v, cfg, devices)
        if getattr(rig, "ble_record", None) is not None and rig.scn.sims.ble_garbage:
            self._judge_ble(v, cfg, devices)
        if rig.mcu is not None and rig.scn.sims.mcu_garbage:
            self._judge_mcu(v, cfg, devices)
        if rig.scn.sims.uplink_garbage:
            expected = {kind: UPLINK_JUNK[kind][1] for kind in UPLINK_JUNK}
            compare_counts(v, "uplink", self.uplink, rig.worker.counters.rejected, expected)

    def _judge_rtu(self, v: Verdict, cfg: Config, devices: Mapping[str, Any]) -> None:
        server = self.rig.rtu_garbage
        assert server is not None
        front = server.front
        ours = [d for d in cfg.devices if _on_port(d, front.port)]
        injected: Counter[str] = Counter({k: front.counts[k] for k in front.kinds})
        rejected = _rejected(devices, (d.name for d in ours))
        compare_counts(v, "rtu", injected, rejected, RTU_REASONS)
        # every answer relayed intact became readings: a garbled answer cost no other
        expected = sum(n * _points_answered(ours, request) for request, n in front.relayed.items())
        stored = sum(len(self.rig.store.readings(self.rig.gateway, k)) for k in _keys(ours))
        v.figures["rtu_answers_valid"] = front.counts["valid"]
        v.figures["rtu_readings_expected"] = expected
        v.figures["rtu_readings_stored"] = stored
        v.check(
            stored == expected,
            f"RTU: {front.counts['valid']} valid answers carried {expected} readings, "
            f"{stored} stored",
        )

    def _judge_mqtt(self, v: Verdict, cfg: Config, devices: Mapping[str, Any]) -> None:
        sensors = self.rig.sensors
        v.check(self.mqtt_open is not None, "MQTT junk never went on (no reading stored)")
        v.check(sensors.counts["failed"] == 0, "MQTT publishes failed: their fate is unknown")
        points = dict(_mqtt_points(cfg, sensors.names))
        fanout = {d.name: len(d.points) for d in cfg.devices if d.name in points}
        injected: Counter[str] = Counter({k: 0 for k in sensors.kinds})
        for m in sensors.sent:  # a payload is parsed (and rejected) for each point
            if m.garbage is not None:
                injected[m.garbage] += fanout.get(m.sensor, 0)
        rejected = _rejected(devices, points)
        compare_counts(v, "mqtt", injected, rejected, MQTT_REASONS)
        # every valid message published while junk was on became a reading
        opened = self.mqtt_open if self.mqtt_open is not None else float("inf")
        closed = self.mqtt_close if self.mqtt_close is not None else float("-inf")
        missing = 0
        sent = 0
        for name, point in points.items():
            stored = {
                ts for _, ts, _, _ in self.rig.store.readings(self.rig.gateway, f"{name}/{point}")
            }
            for m in sensors.sent:
                if m.sensor == name and m.garbage is None and opened <= m.time <= closed:
                    sent += 1
                    missing += _payload_ms(m.payload) not in stored
        v.figures["mqtt_valid_sent"] = sent
        v.figures["mqtt_valid_missing"] = missing
        v.check(sent > 0 and missing == 0, f"MQTT: {missing} of {sent} valid messages not stored")

    def _judge_ble(self, v: Verdict, cfg: Config, devices: Mapping[str, Any]) -> None:
        record = self.rig.ble_record
        ble = [d for d in cfg.devices if d.driver == "ble"]
        injected: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        reasons: dict[str, str] = {}
        for d in ble:
            fmt = str(getattr(d.settings, "format", ""))
            for a in record:
                if a.format == fmt and a.garbage is not None:
                    injected[f"{fmt}_{a.garbage}"] += 1
                    reasons[f"{fmt}_{a.garbage}"] = f"{fmt}_{a.garbage}"
            for reason, n in _rejected(devices, [d.name]).items():
                rejected[f"{fmt}_{reason}"] += n
        compare_counts(v, "ble", injected, rejected, reasons)
        # every valid advert became a reading of each point it carries
        missing = 0
        for d in ble:
            fmt = str(getattr(d.settings, "format", ""))
            for p in d.points:
                measurement = getattr(p.settings, "measurement", None)
                want = sum(
                    1
                    for a in record
                    if a.format == fmt and not a.duplicate and measurement in a.measurements
                )
                got = len(self.rig.store.readings(self.rig.gateway, f"{d.name}/{p.name}"))
                v.figures[f"ble_{d.name}_{p.name}_valid"] = want
                missing += want - got
        v.figures["ble_valid_missing"] = missing
        v.check(missing == 0, f"BLE: {missing} readings of valid adverts not stored (or extra)")

    def _judge_mcu(self, v: Verdict, cfg: Config, devices: Mapping[str, Any]) -> None:
        mcu = self.rig.mcu
        assert mcu is not None
        v.check(self.mcu_open, "microcontroller line noise never went on (no HELLO)")
        ours = [
            d
            for d in cfg.devices
            if d.driver == "mcu" and getattr(d.settings, "port", None) == mcu.port
        ]
        by_kind: Counter[str] = Counter()
        by_reason: dict[str, str] = {}
        for (kind, reason), n in mcu.garbled.items():
            by_kind[f"{kind}_{reason}"] += n  # each piece: its kind and its reason
            by_reason[f"{kind}_{reason}"] = reason
        for kind in ("flip", "cut", "junk"):
            v.figures[f"injected_mcu_{kind}"] = mcu.counts[f"garbage_{kind}"]
        compare_counts(
            v,
            "mcu",
            by_kind,
            _rejected(devices, (d.name for d in ours)),
            by_reason,
            report_kinds=False,
        )
        # every reading sampled before the noise went off was delivered and stored
        stored = sum(len(self.rig.store.readings(self.rig.gateway, k)) for k in _keys(ours))
        v.figures["mcu_sampled_at_close"] = self.mcu_sampled_at_close
        v.check(
            stored >= self.mcu_sampled_at_close > 0,
            f"microcontroller: {self.mcu_sampled_at_close} readings sampled before the end, "
            f"{stored} stored",
        )


def compare_counts(
    v: Verdict,
    source: str,
    injected: Mapping[str, int],
    rejected: Mapping[str, int],
    reason_of: Mapping[str, str],
    report_kinds: bool = True,
) -> None:
    """Figures injected_<source>_<kind> and rejected_<source>_<reason>; checks that each
    reason was given exactly as often as the kinds that must get it were injected, and
    no other reason at all."""
    expected: Counter[str] = Counter()
    for kind, n in injected.items():
        expected[reason_of[kind]] += n
        if report_kinds:
            v.figures[f"injected_{source}_{kind}"] = n
    for reason in sorted(set(expected) | set(rejected)):
        got = rejected.get(reason, 0)
        v.figures[f"rejected_{source}_{reason}"] = got
        want = expected.get(reason, 0)
        kinds = ", ".join(sorted(k for k in injected if reason_of.get(k) == reason)) or "none"
        v.check(got == want, f"{source}: {got} rejected as {reason!r}, {want} injected ({kinds})")
    v.check(sum(injected.values()) > 0, f"{source}: no junk was injected")


def _rejected(devices: Mapping[str, Any], names: Iterable[str]) -> Counter[str]:
    """The agent's rejected inputs of these devices, by reason (its last status)."""
    out: Counter[str] = Counter()
    for name in names:
        out.update(devices.get(name, {}).get("rejected", {}))
    return out


def _on_port(device: Any, port: int) -> bool:
    """A Modbus device of the config behind the garbage front on `port`."""
    return bool(device.driver == "modbus" and getattr(device.settings, "port", None) == port)


def _keys(devices: Iterable[Any]) -> list[str]:
    return [f"{d.name}/{p.name}" for d in devices for p in d.points]


def _mqtt_points(cfg: Config, names: Iterable[str]) -> list[tuple[str, str]]:
    """(device, its first point) of the mqtt devices named like the simulated sensors."""
    wanted = set(names)
    return [
        (d.name, p.name)
        for d in cfg.devices
        if d.driver == "mqtt" and d.name in wanted
        for p in d.points[:1]
    ]


def _payload_ms(payload: bytes) -> int:
    """A simulated sensor's timestamp as the mqtt driver reads it (``epoch_s``)."""
    return round(float(orjson.loads(payload)["ts"]) * 1000.0)


_TABLES = {1: "coil", 2: "discrete_input", 3: "holding_register", 4: "input_register"}


def _points_answered(devices: Iterable[Any], request: bytes) -> int:
    """The numeric points a read request (an RTU frame) of these devices covers."""
    unit, fc = request[0], request[1]
    table = _TABLES.get(fc)
    if table is None or len(request) < 6:
        return 0
    address = int.from_bytes(request[2:4], "big")
    count = int.from_bytes(request[4:6], "big")
    n = 0
    for d in devices:
        if getattr(d.settings, "unit_id", None) != unit:
            continue
        for p in d.points:
            s = p.settings
            if (
                s.table == table
                and s.datatype != "string"
                and address <= s.address
                and s.address + s.size <= address + count
            ):
                n += 1
    return n
