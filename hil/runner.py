"""The HIL scenario runner: the real agent, as a subprocess, against simulators, a
private broker behind a fault-injecting proxy, and the platform's ingest; a timeline
of faults; then the invariants, checked against the platform store and the agent's own
buffer counters, and a verdict.

What is checked (every scenario):
- produced = readings (and alarm events) the agent flushed into its buffer, from the
  buffer's persistent counter, which moves in the same transaction as the append;
- stored = what the platform store holds for the gateway; evicted = what the full
  buffer evicted (counted in the same transactions);
- lost = produced - evicted - stored must be 0, duplicates (a point with two readings
  at one time) must be 0, and each point's timestamps must strictly increase in sending
  order (uplink seq, then position), so nothing was reordered;
plus the scenario's own checks (see hil/scenario.py `Checks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import itertools
import json
import math
import multiprocessing
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.runtime import STATUS_INTERVAL_S
from buffer import Buffer, Lane
from central.store import Store
from central.stores import open_store
from central.worker import IngestWorker
from cli.demo import modbus_image
from common.broker import Mosquitto, free_port
from common.units import parse_duration
from drivers.mcu.simulator import SimMcu
from drivers.modbus.simulator import ModbusSimulator
from hil.config_push import BadConfigPush
from hil.garbage import GarbageInput
from hil.hostile import Hostile
from hil.inject import FaultInjector, Plan, Rule
from hil.local_action import LocalActionJudge
from hil.powerfs import CutReport, PowerFs
from hil.produced import ReadLoss, Window, modbus_read_loss, modbus_spans
from hil.scenario import Fault, Scenario
from hil.sim_modbus import GarbageRtuServer, UnderpassSimulator
from native.batch import GOOD, UNCERTAIN

ROOT = Path(__file__).resolve().parents[1]
#: how late a loaded machine may be on top of a loss window the design states
LOSS_SLACK_S = 0.5


def backlog_of(path: Path) -> int:
    """Readings in the buffer at `path`; -1 when it is not there (not created yet, moved
    aside) or cannot be read now."""
    try:
        with Buffer.open_readonly(path) as buf:
            return sum(lane.points for lane in buf.stats().lanes.values())
    except Exception:
        return -1


# -- the agent as a subprocess ------------------------------------------------------------


class AgentProcess:
    """``python -m cli run -c CONFIG``, logs appended to ``log``.

    With `boot_id`, the agent sees that file as the machine's boot id
    (/proc/sys/kernel/random/boot_id, bind-mounted in a private mount namespace):
    `reboot()` gives it a new one, as a power cut and the boot after it would."""

    def __init__(
        self,
        config: Path,
        log: Path,
        env: dict[str, str] | None = None,
        boot_id: Path | None = None,
    ) -> None:
        self.config, self.log, self.env = config, log, env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.boot_id = boot_id
        if boot_id is not None:
            self.reboot()

    def reboot(self) -> None:
        assert self.boot_id is not None
        self.boot_id.write_text(f"{uuid.uuid4()}\n")

    def start(self) -> None:
        argv = [sys.executable, "-m", "cli", "run", "-c", str(self.config)]
        if self.boot_id is not None:
            mount = 'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"'
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount,
                    str(self.boot_id), *argv]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, **self.env},
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """A power cut: SIGKILL, nothing flushed."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """A graceful stop (SIGTERM: drivers stop, memory is flushed to the buffer)."""
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


# -- results ------------------------------------------------------------------------------


@dataclass
class Verdict:
    scenario: str
    produced: int = 0
    stored: int = 0
    lost: int = 0
    duplicates: int = 0
    evicted: int = 0
    failures: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    alarm_latency_ms: int | None = None
    read_lost: int = 0  # readings the devices produced that never became durable
    cuts: int | None = None  # power cuts (power-loss)
    first_delivery_s: float | None = None  # broker back -> first reading stored (outage)
    rolled_back: int | None = None  # config pushes the gateway rolled back (bad-config-push)
    # local-action: condition -> the pump's coil written (max over the starts), the rule's
    # actions stored, the starts the simulator received
    action_latency_ms: int | None = None
    actions: int | None = None
    starts: int | None = None

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def line(self) -> str:
        out = (
            f"hil {self.scenario}: produced={self.produced} stored={self.stored} "
            f"lost={self.lost} duplicates={self.duplicates} evicted={self.evicted} "
            f"verdict={'pass' if self.passed else 'fail'}"
        )
        if self.cuts is not None:
            out += f" cuts={self.cuts}"
        out += f" read_lost={self.read_lost}"
        if self.first_delivery_s is not None:
            out += f" first_delivery_s={self.first_delivery_s:.1f}"
        if self.alarm_latency_ms is not None:
            out += f" alarm_latency_ms={self.alarm_latency_ms}"
        if self.rolled_back is not None:
            out += f" rolled_back={self.rolled_back}"
        if self.action_latency_ms is not None:
            out += f" action_latency_ms={self.action_latency_ms}"
        if self.actions is not None:
            out += f" actions={self.actions}"
        if self.starts is not None:
            out += f" starts={self.starts}"
        return out


def _say(msg: str) -> None:
    print(f"[hil] {msg}", file=sys.stderr, flush=True)


# -- the rig ------------------------------------------------------------------------------


class Rig:
    def __init__(self, scn: Scenario, workdir: Path, seed: int = 1) -> None:
        self.scn = scn
        self.work = workdir
        self.rng = random.Random(seed)
        self.gateway = f"hil-{scn.name}"
        self.buffer_path = workdir / "buffer.db"
        self.events: list[tuple[float, str]] = []  # (monotonic, what) of the timeline
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, backlog, stored)
        self.power_cuts = 0
        # (monotonic at the cut, monotonic once the agent is gone, "kill" | "power" | "stop")
        self.cuts: list[tuple[float, float, str]] = []
        self.cut_reports: list[CutReport] = []
        self.run_state: dict[str, Any] = {}  # the agent's last status snapshot of the run
        self.t0 = 0.0
        self.stack = contextlib.AsyncExitStack()
        self.clock: Any = None
        self.modbus: ModbusSimulator | None = None
        self.slow: ModbusSimulator | None = None
        self.mcu: SimMcu | None = None
        self.rtu_garbage: GarbageRtuServer | None = None
        self.injector: FaultInjector | None = None
        self.fault_status = ""  # `citygw status` while internal faults were on
        self.junk = GarbageInput(self) if GarbageInput.wanted(scn.sims) else None
        self.hostile = Hostile(self) if scn.sims.hostile else None
        wants_push = any(f.action == "config_push" for f in scn.faults)
        self.config_push = BadConfigPush(self) if wants_push else None
        self.underpass: UnderpassSimulator | None = None
        self.local_action = LocalActionJudge(self) if scn.checks.local_action else None
        self._reader: ProcessPoolExecutor | None = None  # reads the buffer (_backlog)
        self.metrics_port = free_port()

    # -- set-up -----------------------------------------------------------------------

    async def setup(self) -> None:
        scn, work = self.scn, self.work
        from hil.proxy import MqttProxy

        self.broker: Mosquitto | None = None
        self.proxy: MqttProxy | None = None
        if scn.target.broker:  # real hardware: its broker, no link faults
            self.broker_url = self.agent_broker_url = scn.target.broker
        else:
            (work / "broker").mkdir(parents=True, exist_ok=True)
            conf = self.hostile.conf(work / "broker") if self.hostile is not None else ""
            self.broker = self.stack.enter_context(
                Mosquitto(workdir=work / "broker", extra_conf=conf)
            )
            gateway_port = self.hostile.gateway_port if self.hostile else self.broker.port
            self.proxy = MqttProxy("127.0.0.1", gateway_port)
            await self.proxy.start()
            self.stack.push_async_callback(self.proxy.stop)
            self.broker_url = (
                self.hostile.ingest_url(self.broker.port) if self.hostile else self.broker.url
            )
            self.agent_broker_url = f"mqtt://127.0.0.1:{self.proxy.port}"
        self.store: Store = open_store(f"sqlite:///{work / 'platform.db'}")
        self.stack.callback(self.store.close)
        self.worker = IngestWorker(
            self.broker_url,
            self.store,
            group=None,  # Mosquitto restores plain subscriptions after a restart
            client_id=f"hil-ingest-{scn.name}",
            session_expiry=3600,
            backoff_min=0.05,
            backoff_max=0.5,
        )
        ingest = asyncio.create_task(self.worker.run(), name="ingest")
        self.stack.push_async_callback(_cancel, ingest)
        await asyncio.wait_for(self.worker.connected.wait(), 30)
        ports = await self._start_sims()
        self.powerfs: PowerFs | None = None
        if scn.powerfs:
            for d in ("disk", "mnt", "powerfs"):
                (work / d).mkdir(exist_ok=True)
            self.powerfs = PowerFs(work / "disk", work / "mnt", workdir=work / "powerfs")
            self.stack.enter_context(self.powerfs)
            self.buffer_path = work / "mnt" / "buffer.db"
        self.config = work / "gateway.toml"
        self.config.write_text(self._config_text(ports, drain=False))
        self.drain_config = work / "drain.toml"
        self.drain_config.write_text(self._config_text(ports, drain=True))
        env: dict[str, str] = {}
        if any(f.action == "clock_step" for f in scn.faults):
            from hil.faults import FakeClock

            self.clock = FakeClock(work / "faketime")
            env.update(self.clock.env)
        if scn.inject:
            self.injector = FaultInjector(work / "inject")
            env = self.injector.extend_env(env)
        boot = work / "boot_id" if scn.powerfs else None
        self.agent = AgentProcess(self.config, work / "agent.log", env, boot_id=boot)

    async def _start_sims(self) -> dict[str, Any]:
        sims = self.scn.sims
        ports: dict[str, Any] = {"site_broker": self.broker_url}
        if sims.modbus:
            self.modbus = ModbusSimulator(
                {1: modbus_image("sdm120"), 2: modbus_image("adam4017-level")}, tick_s=0.5
            )
            await self.modbus.start()
            self.stack.push_async_callback(self.modbus.stop)
            ports["modbus_port"] = self.modbus.port
        if sims.modbus_slow:
            self.slow = ModbusSimulator({1: modbus_image("sdm120")}, tick_s=0.5)
            await self.slow.start()
            self.stack.push_async_callback(self.slow.stop)
            ports["modbus_slow_port"] = self.slow.port
        if sims.modbus_garbage:
            garbage = GarbageRtuServer(probability=sims.modbus_garbage, seed=self.rng.random())
            await garbage.start()
            self.stack.push_async_callback(garbage.stop)
            self.rtu_garbage = garbage
            ports["modbus_rtu_port"] = garbage.port
        if sims.mqtt_sensors:
            from hil.sim_mqtt import MqttSensors

            self.sensors = MqttSensors(
                self.broker_url, count=sims.mqtt_sensors, garbage=0.0, seed=7
            )  # on the broker directly: the site's own network, not the uplink; junk goes
            # on once the agent listens (hil/garbage.py)
            task = asyncio.create_task(self.sensors.run(), name="mqtt-sensors")
            self.stack.push_async_callback(_cancel, task)
        if sims.ble_adverts:
            from hil.sim_ble import write_replay

            replay = self.work / "ble.jsonl"
            self.ble_record = write_replay(
                replay, adverts=sims.ble_adverts, garbage=sims.ble_garbage, seed=11
            )
            ports["ble_replay"] = replay.as_posix()
        if sims.mcu:
            # the pty outlives the agent's power cuts: the sim keeps its end and the
            # agent's end open, so each new agent process just opens the port again
            self.mcu = SimMcu.on_pty(interval=1.0, seed=self.rng.randrange(1 << 30))
            task = asyncio.create_task(self.mcu.run(), name="sim-mcu")
            self.stack.push_async_callback(_stop_mcu, self.mcu, task)
            ports["mcu_port"] = self.mcu.port
        if sims.underpass is not None:
            u = sims.underpass
            self.underpass = UnderpassSimulator(level=u.level, outflow=u.outflow, tick_s=u.tick)
            await self.underpass.start()
            self.stack.push_async_callback(self.underpass.stop)
            ports["underpass_port"] = self.underpass.port
        if self.hostile is not None:
            ports["firmware_key"] = self.hostile.firmware_key(self.work).as_posix()
        return ports

    def _config_text(self, ports: dict[str, Any], drain: bool) -> str:
        scn = self.scn
        uplink = {
            "broker": self.agent_broker_url,
            "window": 8,
            "backoff_min": "100ms",
            "backoff_max": "1s",
            "ack_timeout": "3s",
            "keepalive": "5s",
            "stats_interval": "1s",
            "probe_interval": "1s",
            "reconnect_spread": "1s",
            **(self.hostile.uplink_keys() if self.hostile else {}),
            **scn.uplink,
        }
        buf = {"path": self.buffer_path.as_posix(), "flush_interval": "250ms", **scn.buffer}
        # derived points and rules after the devices; not in the drain's config, whose
        # devices are off (a rule's inputs must be points of enabled devices)
        devices = scn.devices if drain else f"{scn.devices}\n{scn.local}"
        for key, value in ports.items():  # not str.format: TOML inline tables use braces
            devices = devices.replace("{" + key + "}", str(value))
        if drain:  # the same points (and pipeline state), no readings: only the backlog
            devices = devices.replace("[[devices]]", "[[devices]]\nenabled = false")
        # a port of its own: rigs run side by side (run-all --parallel, the tests)
        metrics = {"port": self.metrics_port}
        return (
            f'[gateway]\nid = "{self.gateway}"\n\n[uplink]\n{_toml(uplink)}\n'
            f"[buffer]\n{_toml(buf)}\n[metrics]\n{_toml(metrics)}\n{devices}\n"
        )

    # -- the run ----------------------------------------------------------------------

    async def wait_stored(self, batches: int, timeout: float = 60.0) -> None:
        """Until the platform holds `batches` of this gateway's uplinks."""
        deadline = time.monotonic() + timeout
        while len(await asyncio.to_thread(self._uplink_seqs)) < batches:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the platform stored fewer than {batches} uplinks")
            await asyncio.sleep(0.2)

    def seq_high_water(self) -> int:
        """The highest uplink seq of this gateway the platform holds."""
        return max((u[0] for u in self._uplink_seqs()), default=0)

    def mark(self, what: str) -> None:
        self.events.append((time.monotonic(), what))
        _say(f"{time.monotonic() - self.t0:6.1f}s {what}")

    async def run(self) -> Verdict:
        scn = self.scn
        verdict = Verdict(scn.name)
        if scn.checks.corrupt_start:
            self._corrupt_buffer()
        self.t0 = time.monotonic()
        self.agent.start()
        self.mark("agent started")
        if self.injector is not None:
            rules = [Rule(**r) for r in scn.inject]
            self.injector.set_plan(Plan(rules, seed=scn.inject_seed))
            self.mark(f"internal faults: {len(rules)} rules")
        timeline = [asyncio.create_task(self._fault(f)) for f in scn.faults]
        if self.junk is not None:
            timeline.append(asyncio.create_task(self.junk.inject()))
        if self.hostile is not None:
            timeline.append(asyncio.create_task(self.hostile.run()))
        sampler = asyncio.create_task(self._sample())
        await asyncio.sleep(scn.duration)
        for task in timeline:
            task.cancel()
        await asyncio.gather(*timeline, return_exceptions=True)
        if self.junk is not None:
            await self.junk.settle()
        await self._heal()
        self.mark("devices stopped (SIGTERM: flush)")
        t_stop = time.monotonic()
        code = await asyncio.to_thread(self.agent.stop)  # the simulators answer meanwhile
        # a graceful stop abandons a poll that does not end within its grace (STOP_GRACE_S)
        self.cuts.append((t_stop, time.monotonic(), "stop"))
        verdict.check(code == 0, f"agent exited with {code} at the end of the run")
        with Buffer.open_readonly(self.buffer_path) as buf:
            self.run_state = buf.get_state().get("agent", {})
        self.agent.config = self.drain_config
        self.agent.start()
        self.mark("draining the backlog")
        drained = await self._wait_drained(scn.drain_timeout)
        verdict.check(drained, f"backlog not drained within {scn.drain_timeout:g} s")
        status = await asyncio.to_thread(self._status_output)
        await asyncio.to_thread(self.agent.stop)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        if self.modbus is not None:  # what the devices served, to look into a loss later
            with (self.work / "modbus-requests.jsonl").open("w") as f:
                for r in self.modbus.requests:
                    f.write(json.dumps(dataclasses.asdict(r)) + "\n")
        if self.local_action is not None:
            self.local_action.save_record()
        self._judge(verdict, status)
        return verdict

    async def _fault(self, f: Fault) -> None:
        await asyncio.sleep(max(0.0, self.t0 + f.at - time.monotonic()))
        a = f.action
        ours = self.broker is not None and self.proxy is not None
        if not ours and a in ("broker_stop", "broker_start", "link", "flap"):
            self.mark(f"{a} skipped: a real broker is not ours to break")
            return
        broker, proxy = self.broker, self.proxy
        if a == "broker_stop":
            assert broker is not None
            await asyncio.to_thread(broker.stop)
            self.mark("broker stopped")
        elif a == "broker_start":
            assert broker is not None
            await asyncio.to_thread(broker.start)
            self.mark("broker started")
        elif a == "link":
            assert proxy is not None
            proxy.mode = f.mode
            self.mark(f"link {f.mode}")
        elif a == "flap":
            assert proxy is not None
            for _ in range(f.count):
                proxy.mode = "down"
                self.mark("link down (flap)")
                await asyncio.sleep(f.down)
                proxy.mode = "pass"
                self.mark("link up (flap)")
                await asyncio.sleep(f.up)
        elif a == "power_cuts":
            for _ in range(f.count):
                await asyncio.sleep(self.rng.uniform(f.min_up, f.max_up))
                t_kill = time.monotonic()
                await asyncio.to_thread(self.agent.kill)
                self.cuts.append((t_kill, time.monotonic(), "kill"))
                self.power_cuts += 1
                self.mark(f"power cut {self.power_cuts} (SIGKILL)")
                self.agent.start()
        elif a == "power_loss":
            assert self.powerfs is not None
            for _ in range(f.count):
                await asyncio.sleep(self.rng.uniform(f.min_up, f.max_up))
                keep = self.rng.uniform(0.0, f.keep_max)
                t_cut = time.monotonic()
                cut = await asyncio.to_thread(
                    self.powerfs.cut, keep, self.rng.randrange(1 << 30), stay_off=True
                )
                await asyncio.to_thread(self.agent.kill)
                self.cuts.append((t_cut, time.monotonic(), "power"))
                self.power_cuts += 1
                self.cut_reports.append(cut)
                self.mark(
                    f"power cut {self.power_cuts}: {cut.dropped_pages} unsynced pages lost, "
                    f"{cut.kept_pages} written back"
                )
                await asyncio.to_thread(self.powerfs.power_on)
                self.agent.reboot()
                self.agent.start()
        elif a == "device":
            sim = self.slow if f.target == "slow" else self.modbus
            assert sim is not None, f"no simulator {f.target!r} in this scenario"
            if f.silent is not None:
                sim.silent = f.silent
            if f.delay is not None:
                sim.delay = f.delay
            self.mark(f"device {f.target}: silent={sim.silent} delay={sim.delay}")
        elif a == "modbus_set":
            assert self.modbus is not None
            level = self.modbus.devices[2]  # the level transmitter: channel 0, 0-5 m span
            level._waves = [w for w in level._waves if w.address != 0]  # hold the value
            level.set_value("holding_register", 0, f.value, scale=5 / 65535)
            self.mark(f"level set to {f.value} m")
        elif a == "disk_limit":
            from hil.faults import limit_file_size

            limit_file_size(self.agent.pid, f.bytes or None)
            self.mark(f"file size limit {f.bytes or 'off'}")
        elif a == "clock_step":
            self.clock.step(f.seconds)
            self.mark(f"wall clock stepped {f.seconds:+g} s")
        elif a == "config_push":
            assert self.config_push is not None
            await self.config_push.push(f)
        elif a == "flood":
            assert self.underpass is not None
            self.underpass.flood(f.value, f.for_)
            self.mark(f"flood: {f.value:g} m/s into the underpass for {f.for_:g} s")
        elif a == "level_flap":
            assert self.underpass is not None
            self.underpass.flap(f.high, f.low, f.up, f.down, f.count)
            self.mark(
                f"underpass level flapping {f.count}x {f.high:g} m ({f.up:g} s) / "
                f"{f.low:g} m ({f.down:g} s)"
            )
        elif a == "inject_stop":
            assert self.injector is not None, "inject_stop without [[inject]] rules"
            self.fault_status = await asyncio.to_thread(self._status_output, self.config)
            self.injector.set_plan(None)
            self.mark("internal faults stopped")

    async def _heal(self) -> None:
        """Ends every fault still in force, so the drain can happen."""
        if self.proxy is not None:
            self.proxy.mode = "pass"
        if self.broker is not None and not self.broker.running:
            await asyncio.to_thread(self.broker.start)
        for sim in (self.modbus, self.slow):
            if sim is not None:
                sim.silent, sim.delay = False, 0.0
        if self.agent.alive():
            from hil.faults import limit_file_size

            limit_file_size(self.agent.pid, None)
        if self.clock is not None:
            self.clock.step(0.0)

    async def _sample(self) -> None:
        while True:
            backlog = await self._backlog()
            stored = await asyncio.to_thread(lambda: self.store.counts().readings)
            self.samples.append((time.monotonic(), backlog, stored))
            await asyncio.sleep(0.2)

    async def _backlog(self) -> int:
        """Readings in the agent's buffer now (-1: it cannot be read now). Read in a child
        process: SQLite maps the buffer's WAL index, and a power cut under it (powerfs)
        turns a read of that mapping into SIGBUS, which costs the child, not the rig."""
        if self._reader is None:
            self._reader = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            self.stack.callback(self._close_reader)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reader, backlog_of, self.buffer_path)
        except BrokenProcessPool:
            self._close_reader()  # the next sample starts another child
            return -1

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None

    async def _wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self._backlog() == 0:
                await asyncio.sleep(1.5)  # the ingest commits what it was given
                return True
            await asyncio.sleep(0.25)
        return False

    def _corrupt_buffer(self) -> None:
        from hil.faults import corrupt_file

        with Buffer(self.buffer_path, 10_000_000) as buf:
            buf.append_many([(Lane.TELEMETRY, os.urandom(2000), 1)] * 200)  # pages to damage
        corrupt_file(self.buffer_path, seed=3)
        self.mark("buffer database corrupted before the start")

    def _status_output(self, config: Path | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli", "status", "-c", str(config or self.drain_config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        return done.stdout + done.stderr

    # -- the verdict ------------------------------------------------------------------

    def _judge(self, v: Verdict, status: str) -> None:
        checks = self.scn.checks
        with Buffer.open_readonly(self.buffer_path) as buf:
            stats = buf.stats()
        state = self.run_state
        counters = state.get("counters", {})
        rows = self.store.readings(self.gateway)
        alarms = self.store.alarms(self.gateway)
        # a local rule's actions travel on the alarm lane, one counted point each
        actions = self.store.rule_actions(self.gateway, limit=1 << 30)
        v.evicted = stats.evicted_points
        loss = self._read_loss()
        if checks.device_count:
            # A power cut can roll back the buffer's own counter with the appends it
            # counted (sync=normal), so produced is what the devices served, less what
            # the design allows a cut to lose; stored is what of it the store holds.
            assert loss is not None, "device_count needs a Modbus simulator"
            v.produced = loss.produced - loss.read_lost
            v.stored = loss.stored
        else:
            v.produced = stats.appended_points
            v.stored = len(rows) + len(alarms) + len(actions)
        v.lost = v.produced - v.evicted - v.stored
        if loss is not None:
            self._read_loss_checks(v, loss)
        v.duplicates = self.store.duplicate_readings()
        v.check(v.produced > 0, "nothing was produced")
        v.check(v.lost == 0, f"{v.lost} flushed readings neither stored nor evicted")
        v.check(v.duplicates == 0, f"{v.duplicates} readings stored twice")
        skip = {UNCERTAIN} if checks.clock_flagged else set()
        if checks.order:
            # a wall clock stepped back makes the next readings earlier than the last
            # ones: allowed once per step and point, and only then
            timeline = sorted(self.scn.faults, key=lambda f: f.at)
            offsets = [0.0, *(f.seconds for f in timeline if f.action == "clock_step")]
            back = sum(1 for a, b in itertools.pairwise(offsets) if b < a)
            bad = _order_violations(rows, skip, allowed=back)
            v.check(not bad, f"per-point order broken at {bad[:3]}")
        seqs = self._uplink_seqs()
        v.figures["uplinks"] = len(seqs)
        self._first_delivery(v, seqs)
        if seqs:
            # gaps only where the buffer skipped seqs (reserved before an unclean stop:
            # see Buffer.append_many) or evicted messages
            numbers = [u[0] for u in seqs]
            gaps = numbers[-1] - numbers[0] + 1 - len(set(numbers))
            v.figures["seq_gaps"] = gaps
            v.figures["seq_skipped"] = stats.seq_skipped
            v.check(
                gaps <= stats.seq_skipped + stats.evicted_messages,
                f"uplink sequence numbers have {gaps} gaps, but the buffer skipped "
                f"{stats.seq_skipped} and evicted {stats.evicted_messages} messages",
            )
        v.figures["lost_before_buffer"] = counters.get("lost", 0)
        v.figures["read"] = counters.get("read", 0)
        v.figures["agent_starts"] = self.agent.starts
        # evictions: exactly what the buffer counted, reported to the platform and status
        reported = self.store.stats(self.gateway)
        v.check(reported is not None, "the gateway never reported its stats (up/stats)")
        if reported is not None:
            v.check(
                reported.evicted_points == stats.evicted_points,
                f"platform was told {reported.evicted_points} evicted, buffer says "
                f"{stats.evicted_points}",
            )
        v.check(
            f"evicted: {stats.evicted_points} readings" in status,
            "citygw status does not show the evicted count",
        )
        if checks.evictions:
            v.check(v.evicted > 0, "the buffer never filled up (no eviction)")
        if checks.disk_full:
            v.figures["flush_failures"] = counters.get("flush_failures", 0)
            v.check(v.figures["flush_failures"] > 0, "the disk never filled up (no failed flush)")
        if checks.corrupt_start:
            aside = list(self.work.glob("buffer.db.corrupt-*"))
            v.check(bool(aside), "the corrupt buffer database was not moved aside")
            v.check("corrupt" in status.lower(), "citygw status does not report the corruption")
        if checks.min_power_cuts:
            v.figures["power_cuts"] = self.power_cuts
            v.check(self.power_cuts >= checks.min_power_cuts, f"{self.power_cuts} power cuts")
        if self.cut_reports:
            v.cuts = len(self.cut_reports)
            dropped = sum(c.dropped_pages for c in self.cut_reports)
            v.figures["unsynced_pages_lost"] = dropped
            v.figures["unsynced_pages_written_back"] = sum(c.kept_pages for c in self.cut_reports)
            v.figures["loss_window_s"] = round(self._loss_window("power"), 2)
            v.figures["unclean_starts"] = stats.unclean_starts
            v.figures["intake_dropped"] = stats.intake_dropped
            v.check(dropped > 0, "no power cut dropped any unsynced data: nothing was tested")
        if checks.clock_flagged:
            flagged = sum(1 for r in rows if r[3] == UNCERTAIN)
            v.figures["clock_flagged"] = flagged
            v.check(flagged > 0, "no reading under the wrong clock was flagged")
        if checks.jitter_point:
            jitter = self._jitter(checks.jitter_point)
            v.figures.update(jitter)
            v.check(
                jitter["jitter_max_ms"] <= checks.max_jitter_ms,
                f"poll jitter of a healthy device {jitter['jitter_max_ms']} ms",
            )
        if checks.rejections:
            v.check(self.junk is not None, "checks.rejections without any junk in [sims]")
            if self.junk is not None:
                self.junk.judge(v)  # injected = rejected, kind by kind (hil/garbage.py)
        if checks.internal_faults:
            self._internal_fault_checks(v, counters)
        if self.hostile is not None:
            self.hostile.judge(v)
        if self.config_push is not None:
            self.config_push.judge(v)
        if self.mcu is not None:
            self._mcu_figures(v)
        if checks.alarm_latency:
            self._alarm_checks(v, alarms, seqs)
        if self.local_action is not None:
            self.local_action.judge(v, [a for _, a in actions])
        self._drain_figures(v)

    # -- internal faults ---------------------------------------------------------------

    def _internal_fault_checks(self, v: Verdict, counters: dict[str, Any]) -> None:
        """Every planned fault fired; the agent counted exactly what was injected where it
        handles the error itself (flush, intake, status), its supervisor restarted the
        tasks that did not, `citygw status` showed them while it ran, and readings kept
        reaching the platform meanwhile."""
        assert self.injector is not None
        record = self.injector.record()
        by_target: dict[str, int] = {}
        for fault in record:
            by_target[fault.target] = by_target.get(fault.target, 0) + 1
        v.figures["injected"] = dict(sorted(by_target.items()))
        for rule in self.scn.inject:
            fired = sum(n for t, n in by_target.items() if fnmatch.fnmatch(t, rule["target"]))
            v.check(fired > 0, f"the internal fault {rule['target']} never fired")
        exact = {
            "flush_failures": ("buffer.append",),
            "intake_failures": ("buffer.intake",),
            "status_failures": ("buffer.put_state", "buffer.sync_point", "buffer.checkpoint"),
        }
        for counter, targets in exact.items():
            injected = sum(by_target.get(t, 0) for t in targets)
            v.check(
                counters.get(counter, 0) == injected,
                f"the agent counted {counters.get(counter, 0)} {counter}, {injected} injected",
            )
        uplink = self.run_state.get("uplink") or {}
        injected = sum(by_target.get(f"buffer.{t}", 0) for t in ("peek", "ack", "stats"))
        v.check(
            uplink.get("buffer_errors", 0) == injected,
            f"the uplink counted {uplink.get('buffer_errors', 0)} buffer errors, {injected} "
            "injected into its peeks, acks and stats",
        )
        tasks = self.run_state.get("tasks", {})
        failed = {name: t for name, t in tasks.items() if t.get("failures")}
        v.figures["task_failures"] = {name: t["failures"] for name, t in sorted(failed.items())}
        driver_faults = sum(n for t, n in by_target.items() if t.startswith("driver."))
        driver_failures = sum(t["failures"] for n, t in failed.items() if n.startswith("driver:"))
        v.check(
            driver_failures == driver_faults,
            f"{driver_faults} driver faults injected, {driver_failures} driver restarts",
        )
        v.check("uplink" in failed, "the uplink's failures were not supervised")
        v.check(
            all(t.get("state") == "running" and t.get("last_failure_ms") for t in failed.values()),
            f"a failed task did not come back or does not say when it failed: {failed}",
        )
        status = self.fault_status
        v.check(
            "tasks that failed" in status and all(name in status for name in failed),
            "citygw status did not show the failed tasks while the faults went on",
        )
        start = next(t for t, what in self.events if what.startswith("internal faults:"))
        stop = next((t for t, what in self.events if what == "internal faults stopped"), None)
        during = [n for t, _, n in self.samples if start <= t <= (stop or math.inf)]
        stored = max(during) - min(during) if during else 0
        v.figures["stored_during_faults"] = stored
        v.check(stored > 0, "nothing reached the platform while the faults went on")

    # -- what the devices produced ----------------------------------------------------

    def _read_loss(self) -> ReadLoss | None:
        """The healthy Modbus cabinet's served reads against the store (hil/produced.py)."""
        if self.modbus is None:
            return None
        windows = [Window(t - self._loss_window(kind), dead, kind) for t, dead, kind in self.cuts]
        if self.injector is not None:
            # a driver that raises is restarted: its polls in flight are abandoned
            windows += [
                Window(f.mono - LOSS_SLACK_S, f.mono + LOSS_SLACK_S, "driver restart")
                for f in self.injector.record()
                if f.target.startswith("driver.")
            ]
        plan = modbus_spans(self.config, self.modbus.port)
        keys = {k for _, spans in plan.values() for *_, k in spans}
        stored = {k: [r[1] for r in self.store.readings(self.gateway, k)] for k in keys}
        return modbus_read_loss(plan, self.modbus, stored, windows, by_count=self.clock is not None)

    def _loss_window(self, kind: str) -> float:
        """How long before a kill or a power cut a reading may still be lost, by design
        (docs/architecture.md "Durability"): the intake delay after a kill; the flush
        interval after a power cut with sync=full, the sync interval (plus a flush)
        with sync=normal; plus LOSS_SLACK_S for a loaded machine."""
        buf = self.scn.buffer
        flush = parse_duration(str(buf.get("flush_interval", "250ms")))
        intake = parse_duration(str(buf.get("intake_delay", "10ms")))
        if kind in ("kill", "stop"):
            return intake + LOSS_SLACK_S
        if buf.get("sync", "normal") == "full":
            return flush + LOSS_SLACK_S
        return STATUS_INTERVAL_S + flush + LOSS_SLACK_S

    def _read_loss_checks(self, v: Verdict, loss: ReadLoss) -> None:
        v.figures.update(loss.figures())
        # an evicted reading is missing too: with evictions, what is missing beyond them
        # counts as lost outside the windows
        outside = max(0, loss.lost_outside - v.evicted) if v.evicted else loss.lost_outside
        v.read_lost = loss.read_lost + outside
        v.check(loss.produced > 0, "the Modbus cabinet served no reads")
        if outside:
            # when, for a look into the agent's log (rig time, as the timeline marks it)
            at = sorted({round(t - self.t0, 1) for t in loss.outside_at})
            v.figures["lost_outside_at_s"] = at[:20]
        v.check(
            outside == 0,
            f"{outside} readings the devices produced were lost outside the design's "
            f"windows ({len(self.cuts)} kills, cuts or stops)",
        )
        v.check(
            loss.unmatched_stored == 0,
            f"{loss.unmatched_stored} stored Modbus readings match no served request",
        )

    def _mcu_devices(self) -> dict[str, list[str]]:
        """The scenario's devices on the simulated microcontroller's port: their points."""
        assert self.mcu is not None
        config = tomllib.loads(self.config.read_text())
        return {
            d["name"]: [p["name"] for p in d.get("points", [])]
            for d in config.get("devices", [])
            if d.get("driver") == "mcu" and d.get("port") == self.mcu.port
        }

    def _mcu_figures(self, v: Verdict) -> None:
        """What the simulated microcontroller did (and what of it the platform holds)."""
        assert self.mcu is not None
        c = self.mcu.counts
        for k in ("sampled", "readings_sent", "readings_requeued", "hellos"):
            v.figures[f"mcu_{k}"] = c[k]
        v.figures["mcu_retransmits"] = self.mcu.link.counters["retransmits"]
        for k, n in sorted(c.items()):
            if k.startswith("garbage_"):
                v.figures[f"mcu_{k}"] = n
        v.figures["mcu_stored"] = sum(
            len(self.store.readings(self.gateway, f"{name}/{point}"))
            for name, points in self._mcu_devices().items()
            for point in points
        )

    def _uplink_seqs(self) -> list[tuple[int, int, int]]:
        with contextlib.closing(sqlite3.connect(self.work / "platform.db")) as db:
            return [
                (int(s), int(lane), int(ms))
                for s, lane, ms in db.execute(
                    "SELECT seq, lane, received_ms FROM uplinks WHERE gateway = ? ORDER BY seq",
                    (self.gateway,),
                )
            ]

    def _alarm_checks(
        self, v: Verdict, alarms: list[Any], uplinks: list[tuple[int, int, int]]
    ) -> None:
        raised = [a for a in alarms if a.raised]
        v.check(bool(raised), "no alarm reached the platform")
        if not raised:
            return
        alarm_seq, _, alarm_ms = next(u for u in uplinks if u[1] == 0)
        v.alarm_latency_ms = alarm_ms - raised[0].ts_ms
        # the telemetry still queued when the alarm was raised: the alarm must overtake it
        # (up to the window that leaves together with the alarm after a reconnect)
        backlog = [u for u in uplinks if u[0] < alarm_seq and u[1] != 0 and u[2] > raised[0].ts_ms]
        before = [u for u in backlog if u[2] < alarm_ms]
        v.figures["backlog_uplinks_at_raise"] = len(backlog)
        v.figures["of_them_stored_before_the_alarm"] = len(before)
        window = int(self.scn.uplink.get("window", 8))
        v.check(len(backlog) > window, "no telemetry backlog built up before the alarm")
        v.check(len(before) < window, "the alarm waited behind the telemetry backlog")
        restored = [t for t, what in self.events if what == "link pass"]
        if restored:
            v.figures["alarm_after_link_ms"] = round(alarm_ms - _wall(restored[-1]))

    def _first_delivery(self, v: Verdict, uplinks: list[tuple[int, int, int]]) -> None:
        """From the broker's first return to the first uplink the platform stored."""
        back = next((t for t, what in self.events if what == "broker started"), None)
        if back is None:
            return
        back_ms = _wall(back)
        after = [ms for _, _, ms in uplinks if ms >= back_ms]
        v.first_delivery_s = (min(after) - back_ms) / 1000 if after else math.inf
        limit = self.scn.checks.max_first_delivery_s
        if limit is not None:
            v.check(
                v.first_delivery_s <= limit,
                f"the first reading was stored {v.first_delivery_s:.1f} s after the broker "
                f"came back (at most {limit:g} s)",
            )

    def _drain_figures(self, v: Verdict) -> None:
        """How fast the backlog went after the first outage ended, new readings flowing."""
        restored = [t for t, what in self.events if what in ("link pass", "broker started")]
        if not restored:
            return
        t_r = restored[0]
        before = [s for s in self.samples if s[0] < t_r and s[1] >= 0]
        after = [s for s in self.samples if s[0] >= t_r and s[1] >= 0]
        if not before or not after or before[-1][1] <= 0:
            return
        backlog = before[-1][1]
        steady = max(100, backlog // 50)  # what one or two flushes hold
        done = next((s for s in after if s[1] <= steady), None)
        if done is not None:
            seconds = max(0.2, done[0] - t_r)
            v.figures["backlog_at_restore"] = backlog
            v.figures["drain_s"] = round(seconds, 1)
            v.figures["drain_points_per_s"] = round(backlog / seconds)

    def _jitter(self, point: str) -> dict[str, float]:
        rows = [r for r in self.store.readings(self.gateway, point) if r[3] == GOOD]
        ts = [r[1] for r in rows]
        gaps = [b - a for a, b in itertools.pairwise(ts)]
        if not gaps:
            return {"jitter_max_ms": math.inf, "jitter_p99_ms": math.inf}
        period = sorted(gaps)[len(gaps) // 2]
        jitter = sorted(abs(g - period) for g in gaps)
        return {
            "poll_period_ms": period,
            "jitter_p99_ms": jitter[min(len(jitter) - 1, int(len(jitter) * 0.99))],
            "jitter_max_ms": jitter[-1],
        }


def _order_violations(
    rows: list[tuple[int, int, float, int]], skip: set[int], allowed: int = 0
) -> list[tuple[int, int, int]]:
    """(point, previous ts, ts) where a point's time did not increase in sending order,
    beyond ``allowed`` times per point; readings with a quality in ``skip`` are ignored."""
    last: dict[int, int] = {}
    backwards: dict[int, int] = {}
    bad = []
    for pid, ts, _, q in rows:
        if q in skip:
            continue
        if pid in last and ts <= last[pid]:
            backwards[pid] = backwards.get(pid, 0) + 1
            if backwards[pid] > allowed:
                bad.append((pid, last[pid], ts))
        last[pid] = ts
    return bad


def _wall(monotonic_t: float) -> int:
    """A monotonic instant of this process as wall-clock ms."""
    return int((time.time() - (time.monotonic() - monotonic_t)) * 1000)


def _toml(values: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _stop_mcu(sim: SimMcu, task: asyncio.Task[Any]) -> None:
    await _cancel(task)
    sim.close()


async def run_scenario(
    scn: Scenario, workdir: Path | None = None, seed: int = 1, log: Callable[[str], None] = _say
) -> Verdict:
    workdir = workdir or Path(tempfile.mkdtemp(prefix=f"citygw-hil-{scn.name}-"))
    rig = Rig(scn, workdir, seed)
    log(f"scenario {scn.name} in {workdir}")
    try:
        await rig.setup()
        verdict = await rig.run()
    finally:
        if getattr(rig, "agent", None) is not None:
            rig.agent.kill()
        await rig.stack.aclose()
    for k, val in verdict.figures.items():
        log(f"  {k} = {val}")
    for failure in verdict.failures:
        log(f"  FAIL: {failure}")
    return verdict


async def run_all(paths: list[Path], parallel: int = 1) -> list[Verdict]:
    """Runs the scenarios, ``parallel`` at a time (each has its own broker, ports,
    simulators and agent); the verdicts in the order given."""
    from hil.scenario import load_scenario

    gate = asyncio.Semaphore(max(1, parallel))

    async def one(path: Path) -> Verdict:
        async with gate:
            return await run_scenario(load_scenario(path))

    return list(await asyncio.gather(*(one(p) for p in paths)))
