"""Hostile clients against a broker with the shipped ACLs (deploy/mosquitto), for the
`hostile-clients` scenario: impostors, strangers, forged commands, a downgrade, and
messages that decode but no store can keep.

The broker runs the shipped ACL and a password file (`common.broker.acl_conf`): the agent
is its gateway (username = gateway id) on the gateway listener (behind the rig's proxy),
the ingest is ROLE_INGEST on the platform listener. Then, while the agent forwards:

- a client without credentials, on both listeners: refused at CONNECT;
- an impostor, a gateway with valid credentials of its own, speaks for the rig's gateway:
  batches pre-claiming its next (stream, seq) keys, its meta, its state "offline" (all
  retained where the gateway's are), and a `write` command to it; it also subscribes to
  the gateway's commands. Every publish must come back refused (MQTT 5 PUBACK 0x87), and
  nothing of it may reach the store or the agent;
- the command role asks the gateway's microcontroller for a forced firmware update (a
  downgrade) without the gateway allowing it: refused, before any download;
- a second gateway, with valid credentials, publishes on its own topics messages that
  decode but that no store can keep (NUL in a meta string and in an alarm rule id, a
  location nested deeper than a store can write), then good batches: every poison is
  dead-lettered, and every good batch behind it stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import orjson

from common import wire
from common.broker import ROLE_COMMANDS, ROLE_INGEST, acl_conf, free_port, gateway_listener
from common.reconnect import MqttClient, PublishRefused
from firmware_bridge.image import generate_keypair
from native import codec
from native.batch import Batch

if TYPE_CHECKING:
    from hil.runner import Rig, Verdict

IMPOSTOR = "hil-impostor"
POISONER = "hil-poisoner"
FORGED_VALUE = -666.0
NOT_AUTHORIZED = 0x87
GOOD_BATCHES = 10  # what the poisoner sends after its poison


@dataclass
class Hostile:
    """Set up before the broker starts (`conf`), run once the agent forwards (`run`),
    judged with the rest (`judge`)."""

    rig: Rig
    passwords: dict[str, str] = field(default_factory=dict)
    gateway_port: int = 0
    refused_connects: dict[str, str] = field(default_factory=dict)  # listener -> error
    impostor_codes: list[int] = field(default_factory=list)
    impostor_received: int = 0
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # command id -> answer
    poison: list[tuple[str, str]] = field(default_factory=list)  # (topic, expected reason)
    ran: bool = False
    error: str | None = None

    def conf(self, workdir: Path) -> str:
        """The mosquitto.conf lines: the shipped ACL, the users, a gateway listener."""
        users = (self.rig.gateway, IMPOSTOR, POISONER, ROLE_INGEST, ROLE_COMMANDS)
        self.passwords = {u: secrets.token_urlsafe(12) for u in users}
        self.gateway_port = free_port()
        return acl_conf(workdir, self.passwords) + gateway_listener(self.gateway_port)

    def ingest_url(self, port: int) -> str:
        return f"mqtt://{ROLE_INGEST}:{self.passwords[ROLE_INGEST]}@127.0.0.1:{port}"

    def uplink_keys(self) -> dict[str, str]:
        """The agent's [uplink] credentials: its identity is its gateway id."""
        return {"username": self.rig.gateway, "password": self.passwords[self.rig.gateway]}

    @staticmethod
    def firmware_key(workdir: Path) -> Path:
        """A fleet key pair; the gateway's microcontroller takes updates signed for it."""
        _, public = generate_keypair(workdir / "fleet")
        return public

    def _client(self, user: str | None, port: int, **kw: Any) -> aiomqtt.Client:
        return MqttClient(
            "127.0.0.1",
            port,
            identifier=f"{user or 'anonymous'}-{secrets.token_hex(3)}",
            username=user,
            password=self.passwords.get(user or ""),
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=5.0,
            **kw,
        )

    # -- the attacks --------------------------------------------------------------------

    async def run(self) -> None:
        rig = self.rig
        assert rig.broker is not None
        try:
            await rig.wait_stored(1)  # the gateway forwards: its stream and seqs are known
            await self._strangers(rig.broker.port)
            await self._impostor(rig.gateway, self._stream())
            await self._commands(rig.gateway, rig.broker.port)
            await self._poisoner()
        except Exception as exc:  # the verdict says so
            self.error = f"{type(exc).__name__}: {exc}"
            rig.mark(f"hostile clients failed: {self.error}")
            raise
        self.ran = True
        rig.mark(
            f"hostile clients: {len(self.impostor_codes)} impostor publishes, "
            f"{len(self.poison)} poison messages, {len(self.answers)} commands answered"
        )

    def _stream(self) -> str:
        """The gateway's stream id, from the uplinks the platform stored."""
        with contextlib.closing(sqlite3.connect(self.rig.work / "platform.db")) as db:
            row = db.execute(
                "SELECT stream FROM uplinks WHERE gateway = ? LIMIT 1", (self.rig.gateway,)
            ).fetchone()
        return str(row[0])

    async def _strangers(self, platform_port: int) -> None:
        for name, port in (("gateway", self.gateway_port), ("platform", platform_port)):
            try:
                async with self._client(None, port):
                    pass
            except aiomqtt.MqttError as exc:
                self.refused_connects[name] = str(exc)

    async def _impostor(self, gateway: str, stream: str) -> None:
        prefix = wire.DEFAULT_PREFIX

        def forged_batch(seq: int) -> bytes:
            batch = Batch()
            batch.append(1, int(time.time() * 1000) + seq, FORGED_VALUE)
            body = codec.encode(batch, gateway=gateway, seq=seq)
            return wire.wrap(wire.LANE_TELEMETRY, stream, seq, 1, body)

        forged_meta = orjson.dumps(
            {"v": 1, "gateway": gateway, "stream": stream, "points": [{"id": 1, "key": "x/y"}]}
        )
        command = orjson.dumps({"id": "forged", "op": "write", "point": "x/y", "value": 1})
        own = self.rig.seq_high_water()
        sends: list[tuple[str, bytes, bool]] = [
            (wire.topic(prefix, gateway, wire.KIND_BATCH), forged_batch(own + i), False)
            for i in range(1, 21)  # the gateway's next keys: its real batches would be dups
        ]
        sends += [
            (wire.topic(prefix, gateway, wire.KIND_META), forged_meta, True),
            (wire.topic(prefix, gateway, wire.KIND_STATE), wire.STATE_OFFLINE, True),
            (wire.topic(prefix, gateway, wire.KIND_CMD), command, False),
        ]
        async with self._client(IMPOSTOR, self.gateway_port) as c:
            await c.subscribe(f"{prefix}/{gateway}/down/#", qos=1)  # not a kind: a filter
            for topic, payload, retain in sends:
                try:
                    await c.publish(topic, payload, qos=1, retain=retain)
                    self.impostor_codes.append(0)
                except PublishRefused as exc:
                    self.impostor_codes.append(exc.reason.value)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    async for _ in c.messages:
                        self.impostor_received += 1

    async def _commands(self, gateway: str, platform_port: int) -> None:
        """A legitimate write, then a forced firmware update (a downgrade)."""
        prefix = wire.DEFAULT_PREFIX
        commands = [
            {"id": "legit", "op": "write", "point": "pump/setpoint", "value": 2.5},
            {
                "id": "downgrade",
                "op": "firmware_update",
                "device": "cabinet-mcu",
                "url": "https://fw.city.example/mcu/0.9.0.cgfw",
                "force": True,
            },
        ]
        async with self._client(ROLE_COMMANDS, platform_port) as c:
            await c.subscribe(wire.topic(prefix, gateway, wire.KIND_RESP), qos=1)
            for cmd in commands:
                await c.publish(
                    wire.topic(prefix, gateway, wire.KIND_CMD), orjson.dumps(cmd), qos=1
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15.0):
                    async for m in c.messages:
                        assert isinstance(m.payload, bytes)
                        answer = orjson.loads(m.payload)
                        self.answers[str(answer.get("id"))] = answer
                        if {"legit", "downgrade"} <= self.answers.keys():
                            break

    async def _poisoner(self) -> None:
        prefix, gw = wire.DEFAULT_PREFIX, POISONER
        stream = secrets.token_hex(16)
        point = {"id": 1, "key": "p/v", "device": "p", "name": "v"}

        def meta(**extra: Any) -> bytes:
            return orjson.dumps(
                {"v": 1, "gateway": gw, "stream": stream, "points": [point]} | extra
            )

        # deeper than orjson writes (254 levels) or a store keeps: built as text
        deep = b'{"in":' * 300 + b'{"lat":1.0}' + b"}" * 300
        alarm = orjson.dumps(
            {
                "v": 1,
                "gateway": gw,
                "events": [
                    {"point": 1, "rule": "high\x00", "severity": "warning", "state": "raise",
                     "ts": int(time.time() * 1000), "value": 1.0, "since": 0}
                ],
            }
        )  # fmt: skip
        self.poison = [
            (wire.topic(prefix, gw, wire.KIND_META), "meta"),  # NUL in a point's unit
            (wire.topic(prefix, gw, wire.KIND_ALARM), "alarm"),  # NUL in the rule id
            (wire.topic(prefix, gw, wire.KIND_META), "meta"),  # a location 300 levels deep
        ]
        payloads = [
            meta(points=[point | {"unit": "m\x00"}]),
            wire.wrap(wire.LANE_ALARM, stream, 1, 1, alarm),
            meta()[:-1] + b',"location":' + deep + b"}",
        ]

        def good(seq: int) -> bytes:
            batch = Batch()
            batch.append(1, int(time.time() * 1000) + seq, float(seq))
            body = codec.encode(batch, gateway=gw, seq=seq)
            return wire.wrap(wire.LANE_TELEMETRY, stream, seq, 1, body)

        # the poisoner is a gateway: it speaks on the gateway listener, as itself
        async with self._client(POISONER, self.gateway_port) as c:
            for (topic, _), payload in zip(self.poison, payloads, strict=True):
                await c.publish(topic, payload, qos=1, retain=topic.endswith(wire.KIND_META))
            for seq in range(2, 2 + GOOD_BATCHES):
                await c.publish(wire.topic(prefix, gw, wire.KIND_BATCH), good(seq), qos=1)
            # a retained poison must not stay to stall whoever subscribes next
            await c.publish(wire.topic(prefix, gw, wire.KIND_META), b"", qos=1, retain=True)

    # -- the verdict ----------------------------------------------------------------------

    def judge(self, v: Verdict) -> None:
        rig = self.rig
        v.check(self.ran, f"the hostile clients did not run through: {self.error}")
        v.figures["refused_connects"] = sorted(self.refused_connects)
        v.check(
            sorted(self.refused_connects) == ["gateway", "platform"],
            f"a client without credentials got in: refused only on {self.refused_connects}",
        )
        v.figures["impostor_publishes"] = len(self.impostor_codes)
        v.check(
            bool(self.impostor_codes) and set(self.impostor_codes) == {NOT_AUTHORIZED},
            f"the broker took an impostor's publishes (PUBACK codes {set(self.impostor_codes)})",
        )
        v.check(self.impostor_received == 0, "the impostor received another gateway's commands")
        rows = rig.store.readings(rig.gateway)
        v.check(all(r[2] != FORGED_VALUE for r in rows), "a forged reading was stored")
        keys = set(rig.store.point_keys(rig.gateway))
        v.check("x/y" not in keys, "the impostor's meta renamed the gateway's points")
        legit, down = self.answers.get("legit"), self.answers.get("downgrade")
        v.check("forged" not in self.answers, "the agent answered the impostor's command")
        v.check(legit is not None and legit.get("ok") is True, f"legit command: {legit}")
        v.check(
            down is not None
            and down.get("ok") is False
            and "does not allow a forced update" in str(down.get("error")),
            f"the forced firmware update was not refused as a downgrade: {down}",
        )
        dead = [d for d in rig.store.dead_letters() if f"/{POISONER}/" in d.topic]
        reasons = sorted(d.reason for d in dead)
        v.figures["poison_dead_letters"] = reasons
        v.check(
            reasons == sorted(r for _, r in self.poison),
            f"poison dead-lettered as {reasons}, expected {sorted(r for _, r in self.poison)}",
        )
        good = len(rig.store.readings(POISONER))
        v.figures["good_batches_behind_the_poison"] = good
        v.check(good == GOOD_BATCHES, f"{good} of {GOOD_BATCHES} good batches behind it stored")
        # A pre-claimed (stream, seq) key that got through would show elsewhere: the
        # gateway's own batch under it dropped (lost, read_lost) and the impostor's
        # readings stored (stored_without_request), all checked by the runner. Dropped
        # duplicates alone are not a sign of it: a QoS 1 resend after a PUBACK lost in a
        # stop or a reconnect is one, by design.
        v.figures["duplicates_dropped"] = rig.store.counts().duplicates_dropped
