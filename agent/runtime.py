"""The agent process: drivers -> memory queue -> pipeline -> codec -> buffer -> uplink.

Drivers push columnar batches into a bounded in-memory queue (a full queue refuses
the batch and the driver counts a skipped poll). Within `buffer.intake_delay` of a push
the new batches are committed, raw, to the buffer's intake (no fsync), so a process
crash loses only the last few milliseconds of readings. Every flush interval the queue
is drained on the buffer thread: the batches are concatenated, run through the
per-point pipeline, cut into uplink-sized chunks, encoded and appended to the buffer
in one transaction that also deletes their intake rows. The uplink then forwards the
buffer. All SQLite work happens on one dedicated thread, so the event loop never waits
on a disk sync. Every long-lived task runs under `common.supervise`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from functools import cache, partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import native
from agent.commands import (
    FIRMWARE_UPDATE,
    CommandRefused,
    ConfigPushCommand,
    FirmwareUpdateCommand,
    RuleOverrideCommand,
    parse_command,
    response,
)
from agent.config import Config, ConfigError, load_config
from agent.config_push import ConfigPushes
from agent.local_action import LocalAction
from agent.local_config import DERIVED_DRIVER
from agent.metrics import AgentMetrics
from agent.reload import ReloadDiff, ReloadRefused, diff_configs, plan_drivers, stage_points
from agent.stage_config import PointContext, aggregate_functions, aggregate_key, stage_specs
from agent.uplink import BufferPort, Publisher, Uplink, UplinkSettings
from agent.watchdog import keep_alive, service_status
from buffer import Buffer, BufferStats, Lane, Message
from common import timers, wire
from common.logs import Throttle
from common.redact import redact
from common.sdnotify import Notifier
from common.supervise import TaskHealth, supervise
from drivers.base import DeviceHealth, DeviceSpec, Driver, PointSpec
from drivers.registry import load_driver
from native import codec, impl
from native.batch import Batch
from native.pipeline import Pipeline
from native.stages import AlarmEvent
from native.table import PipelineCounts

if TYPE_CHECKING:
    # the firmware code brings cryptography (several MB of RSS): imported when a
    # firmware_update command comes, not by every agent
    from agent.ota_command import Fetch
    from firmware_bridge.ota import OtaResult

log = logging.getLogger("citygw.agent")
T = TypeVar("T")

STATUS_INTERVAL_S = 5.0
# An obviously wrong clock: before 2020 (an RTC that lost power restarts in 1970 or at
# its build date) or over a day ahead of the gateway's own clock.
CLOCK_VALID_FROM_MS = 1_577_836_800_000
CLOCK_AHEAD_MAX_MS = 86_400_000
CLOCK_STEP_S = 2.0  # a wall-clock jump against the monotonic clock worth reporting
COMMAND_TIMEOUT_S = 10.0
#: how often the derive engine's state (last values, window readings) is saved
DERIVE_SAVE_S = 60.0
#: how long a reload or a stop waits for the rules' actions under way to be recorded
LOCAL_IDLE_TIMEOUT_S = 15.0
#: a device's health change sends up/stats at once, then not again sooner than this (a
#: device failing every other poll must not send the whole message every flush)
HEALTH_REPORT_MIN_S = 10.0
#: A flush works on at most this many readings at a time (its pipeline run in parts, its
#: output regrouped into uplink chunks), so that no step of it that holds the GIL (a copy,
#: the set of touched points, a count by point, about 0.4 ms at 4096 on a PC) keeps the event
#: loop waiting, whatever the flush's size: polls stay on time (bench/e2e.py).
FLUSH_PART_ROWS = 4096
#: The longest the event loop waits for the GIL while the buffer thread runs Python code
#: (CPython's default is 5 ms, half a 10 ms poll period): see Agent.start.
SWITCH_INTERVAL_S = 0.0005
#: How much nicer (lower OS priority) the buffer thread is than the event loop's: where the
#: two share a core (a single-core gateway, a pinned agent), a poll falling due takes the
#: core from a flush at once, not after the flush's time slice (milliseconds).
BUFFER_THREAD_NICE = 10


def _lower_thread_priority() -> None:
    """Makes the calling thread BUFFER_THREAD_NICE nicer (Linux: a thread has its own)."""
    if sys.platform != "linux" or not BUFFER_THREAD_NICE:
        return
    tid = threading.get_native_id()
    try:
        nice = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, nice + BUFFER_THREAD_NICE))
    except OSError as exc:  # a sandbox that forbids it: polls only lose some precision
        log.warning("buffer thread priority unchanged", extra={"error": str(exc)})


@cache  # a lookup of the installed distributions: milliseconds, at each reload too
def software_version() -> str:
    """This citygw's version, as up/meta tells the platform."""
    try:
        return version("citygw")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def device_status(
    health: DeviceHealth, previous: wire.DeviceStatus | None, now_ms: int
) -> wire.DeviceStatus:
    """A device's health for up/stats: unhealthy while its last poll failed or its own
    availability signal says offline; `since` moves only when that changes."""
    healthy = health.consecutive_failures == 0 and health.online is not False
    since = previous.since if previous is not None and previous.healthy == healthy else now_ms
    return wire.DeviceStatus(healthy, since, "" if healthy else health.last_error or "")


@dataclass(slots=True)
class Counters:
    read: int = 0  # readings pushed by drivers and accepted
    refused: int = 0  # readings refused by the full memory queue (back-pressure)
    flagged: int = 0  # readings marked bad by the pipeline
    dropped: int = 0  # readings removed by the pipeline as invalid
    lost: int = 0  # pipeline output lost while the buffer refused writes (memory bound)
    clock_flagged: int = 0  # readings stamped by an obviously wrong clock: UNCERTAIN
    clock_steps: int = 0  # wall-clock jumps seen (NTP step, RTC reset, manual change)
    flush_failures: int = 0  # flushes the buffer refused (disk full, I/O error)
    replaced: int = 0  # spikes replaced by their window's median
    clamped: int = 0  # readings moved to their rate limit
    suppressed: int = 0  # readings held back as redundant (deadband, sdt, aggregates)
    windows: int = 0  # aggregate windows closed
    late: int = 0  # readings too late for their aggregate window
    alarms_raised: int = 0
    alarms_cleared: int = 0
    sent: int = 0  # readings the pipeline passed into the buffer (aggregates included)
    encoded_bytes: int = 0  # codec payload bytes appended to the buffer
    flushes: int = 0
    intake_failures: int = 0  # intake commits the buffer refused (readings stay in memory)
    recovered: int = 0  # readings a previous run left in the intake, taken at start
    intake_dropped: int = 0  # intake readings dropped at start after a power cut
    status_failures: int = 0  # status snapshots or sync points the buffer refused
    # device information (up/stats `devices`) cut or left out by wire.bound_devices,
    # counted once per change of a device's information
    info_truncated: int = 0
    info_refused: int = 0
    health_refused: int = 0  # devices left out of up/stats `health` (wire.bound_health)


@dataclass(slots=True, eq=False)
class Held:
    """A batch in the memory queue. `intake_id` is set (on the buffer thread) once the
    batch is committed to the intake; `taken` once a flush took it, after which it is
    never written to the intake (the flush's append carries it)."""

    batch: Batch
    intake_id: int | None = None
    taken: bool = False


class MemoryQueue:
    """The bounded queue between drivers and the flusher (the BatchSink). `on_push` is
    called after each accepted batch (the agent schedules the intake commit)."""

    def __init__(
        self, max_points: int, counters: Counters, on_push: Callable[[], None] | None = None
    ) -> None:
        #: the derived readings of a pushed batch (agent/local_action.py), queued with it
        self.derive: Callable[[Batch], Batch] | None = None
        self.max_points = max_points
        self._held: list[Held] = []
        self._unsaved: list[Held] = []  # pushed, not yet handed to an intake commit
        self._points = 0
        self._counters = counters
        self._throttle = Throttle()
        self.on_push = on_push

    @property
    def points(self) -> int:
        """Readings held now."""
        return self._points

    def push(self, batch: Batch) -> bool:
        read = len(batch)
        # before the bound: the rules act on what was read even when the queue is full
        if self.derive is not None and len(derived := self.derive(batch)):
            batch = Batch.concat([batch, derived])
        n = len(batch)
        if self._points + n > self.max_points:
            self._counters.refused += n
            if (count := self._throttle.ready("full", n)) is not None:
                log.warning(
                    "memory queue full, poll skipped (back-pressure)",
                    extra={"refused_readings": count, "max_memory_points": self.max_points},
                )
            return False
        held = Held(batch)
        self._held.append(held)
        self._unsaved.append(held)
        self._points += n
        self._counters.read += read  # from the drivers; derived readings are counted apart
        if self.on_push is not None:
            self.on_push()
        return True

    def restore(self, held: list[Held]) -> None:
        """Puts batches recovered from the intake in front of the queue (not counted as
        read again, never refused: they were accepted before)."""
        self._held[:0] = held
        self._points += sum(len(h.batch) for h in held)

    def take(self) -> list[Held]:
        held, self._held, self._points = self._held, [], 0
        self._unsaved = []  # taken, all of them: the flush's append carries them
        for h in held:
            h.taken = True
        return held

    def take_unsaved(self) -> list[Held]:
        unsaved, self._unsaved = self._unsaved, []
        return [h for h in unsaved if not h.taken]


#: how many points a pipeline warning names (the most affected first)
WARN_POINTS = 5


def _most(by_point: dict[str, int]) -> str:
    """``"a/x 3, b/y 1"``: the points with the most readings first, at most WARN_POINTS."""
    ranked = sorted(by_point.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{key} {n}" for key, n in ranked[:WARN_POINTS])
    if len(ranked) > WARN_POINTS:
        text += f" and {len(ranked) - WARN_POINTS} more points"
    return text


def _readings(n: int) -> str:
    return f"{n} reading{'s' if n != 1 else ''}"


def point_meta(config: Config) -> list[dict[str, Any]]:
    """Registry entries for every configured point, every derived point (with its
    expression) and every aggregate series made of one (``<device>/<point>:<function>``);
    the platform gets these in up/meta."""
    out: list[dict[str, Any]] = []

    def add(
        key: str, name: str, unit: str, kind: str, stages: list[Any], entry: dict[str, str]
    ) -> None:
        out.append({"key": key, "name": name, "unit": unit, "type": kind, **entry})
        for f in aggregate_functions(stages):
            out.append(
                {
                    "key": aggregate_key(key, f),
                    "name": f"{name}:{f}",
                    "unit": "" if f == "count" else unit,
                    "type": "float",
                    "device": entry["device"],
                    "driver": entry["driver"],
                }
            )

    for d in config.devices:
        for p in d.points:
            entry = {"device": d.name, "driver": d.driver}
            add(f"{d.name}/{p.name}", p.name, p.unit, p.type, p.pipeline, entry)
    for dv in config.derived:
        entry = {"device": dv.device, "driver": DERIVED_DRIVER, "expr": dv.expr}
        add(dv.key, dv.name, dv.unit, dv.type, dv.pipeline, entry)
    return out


def build_pipeline(config: Config, ids: dict[str, int]) -> Pipeline:
    """The pipeline of the enabled devices' points and the derived points; `ids` as from
    `point_meta`'s keys."""
    return Pipeline(
        {
            ids[key]: stage_specs(p.pipeline, PointContext(key, p.min, p.max, ids))
            for key, p in config.staged_points()
        }
    )


def device_specs(config: Config, ids: dict[str, int]) -> dict[str, list[DeviceSpec]]:
    """The enabled devices as their drivers see them, by driver name; `ids` maps
    "device/point" to the point's registry id."""
    by_driver: dict[str, list[DeviceSpec]] = {}
    for d in config.devices:
        if not d.enabled:
            continue
        points = tuple(
            PointSpec(
                id=ids[f"{d.name}/{p.name}"],
                key=f"{d.name}/{p.name}",
                name=p.name,
                unit=p.unit,
                kind=p.type,
                writable=p.writable,
                settings=p.settings,
                min=p.min,
                max=p.max,
            )
            for p in d.points
        )
        by_driver.setdefault(d.driver, []).append(
            DeviceSpec(name=d.name, poll_s=d.poll, settings=d.settings, points=points)
        )
    return by_driver


class Agent:
    def __init__(
        self,
        config: Config,
        connect: Callable[[], AbstractAsyncContextManager[Publisher]] | None = None,
        fetch_firmware: Fetch | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        """`connect` replaces the MQTT connection to the broker (the demo's in-process
        link on a machine without mosquitto); by default the config's broker is used.
        `fetch_firmware` downloads a firmware_update command's package (default:
        `agent.ota_command.fetch_https`; tests fake it). `notifier` talks to systemd
        (`citygw run` under a unit): with a watchdog, the agent pings it while its loops
        make progress (agent/watchdog.py)."""
        self.config = config
        self.notifier = notifier or Notifier({})
        #: time.monotonic() of the last turn of the "flush" and the "uplink" loops
        self.heartbeats: dict[str, float] = {}
        self._connect = connect
        self._fetch_firmware = fetch_firmware
        self.counters = Counters()
        self.queue = MemoryQueue(
            config.buffer.max_memory_points, self.counters, on_push=self._schedule_intake
        )
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="citygw-buffer", initializer=_lower_thread_priority
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._driver_tasks: dict[str, asyncio.Task[None]] = {}  # by driver name
        self._reload_lock = asyncio.Lock()  # one reload at a time
        self._reload_tasks: set[asyncio.Task[ReloadDiff | None]] = set()  # SIGHUP's
        #: every supervised task's health, by task name, for the status
        self.task_health: dict[str, TaskHealth] = {}
        self._intake_timer: asyncio.TimerHandle | None = None
        self._intake_next = 0.0  # loop time before which a push waits for the timer
        self._throttle = Throttle()
        self.started_ms = time.time_ns() // 1_000_000
        self._stopped = False
        self._stopping = False  # no reload from now on
        self.buffer: Buffer | None = None
        self.drivers: list[Driver] = []
        self.uplink: Uplink | None = None
        #: the Prometheus endpoint and its histograms (None: [metrics] enabled = false)
        self.metrics: AgentMetrics | None = None
        self.points: dict[str, PointSpec] = {}  # "device/point" -> spec, enabled devices only
        self._driver_of: dict[str, Driver] = {}
        # device -> None if it takes firmware updates, else why not (for the commands)
        self._firmware: dict[str, str | None] = {}
        self._downgrades: frozenset[str] = frozenset()  # devices whose config allows force
        self._updates: dict[str, tuple[str, asyncio.Task[None]]] = {}  # device -> (id, task)
        self._key_of: dict[int, str] = {}  # point id -> key, for logs
        self._pipeline_held = PipelineCounts()  # flagged/dropped since the last warning
        # pipeline output a failed append left behind (see _flush_sync)
        self._pending: list[Batch] = []
        self._pending_alarms: list[AlarmEvent] = []
        self._pending_state: dict[str, bytes] = {}
        self._pending_intake: list[int] = []  # intake rows the pending output came from
        self._clock_offset = time.time() - time.monotonic()
        #: the drivers' device information as last collected, and as sent (bounded)
        self._info_raw: wire.DeviceInfo = {}
        self.device_info: wire.DeviceInfo = {}
        #: every device's health as up/stats tells it (a device not polled yet: healthy
        #: since the start)
        self.device_health: wire.DeviceHealthMap = {}
        self._health_changed = False  # since the last up/stats `_flush_loop` asked for
        self._reported = -HEALTH_REPORT_MIN_S  # time.monotonic() of that request
        self.pushes = ConfigPushes(self)  # config_push commands (agent/config_push.py)
        #: derived points and local rules (None until start)
        self.local: LocalAction | None = None
        self._derive_saved = time.monotonic()  # when the derive engine's state was saved
        self._flushed_alarms: list[AlarmEvent] = []  # for the alarm rules, after a flush
        # rule actions an append refused, and their rules' state (buffer thread only)
        self._pending_actions: list[wire.RuleAction] = []
        self._pending_rule_state: dict[str, bytes] = {}

    async def _on_buffer(self, fn: Any, *args: Any) -> Any:
        """Runs `fn` on the buffer thread. Work handed over runs to its end even if the
        caller is cancelled: a stop cancels the flush loop, whose flush may already have
        taken the memory queue and still wait behind an intake commit."""
        work = asyncio.get_running_loop().run_in_executor(self._executor, partial(fn, *args))
        return await asyncio.shield(work)

    # -- start -----------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        self.buffer = buffer = await self._on_buffer(
            Buffer, cfg.buffer.path, cfg.buffer.capacity, cfg.buffer.sync
        )
        metas = point_meta(cfg)
        ids: dict[str, int] = await self._on_buffer(buffer.registry.ensure, metas)
        self.pipeline = build_pipeline(cfg, ids)
        self._key_of = {pid: key for key, pid in ids.items()}
        saved = await self._on_buffer(buffer.pipeline_state)
        resumed = self.pipeline.load_state(saved)
        await self._recover_intake()
        self.drivers = self._build_drivers(ids)
        self.local = self._local_action(cfg, ids)
        resumed += self.local.load_state(saved)
        if cfg.metrics.enabled:
            self.metrics = AgentMetrics(self, software_version())
        self.uplink = self._make_uplink(self._meta(cfg, metas, ids))
        for driver in self.drivers:
            self._start_driver(driver)
        self._beat("flush")
        self._beat("uplink")
        self._tasks += [
            self._supervised("uplink", self.uplink.run, forever=True),
            self._supervised("flush", self._flush_loop, forever=True),
            self._supervised("status", self._status_loop, forever=True),
        ]
        if self.local.rules:
            self._tasks.append(self._supervised("rules", self.local.run, forever=True))
        if self.metrics is not None:
            self._tasks.append(self._supervised("metrics", self.metrics.serve))
        if self.notifier.watchdog_s is not None:
            self._tasks.append(
                self._supervised("watchdog", partial(keep_alive, self), forever=True)
            )
        self.uplink.wake()  # a backlog from before a restart
        self.pushes.resume()  # a config push a restart interrupted
        # Everything built so far (modules, config models, drivers) lives as long as the
        # process: keep it out of the garbage collector's full passes, which otherwise
        # scan it all and stall the event loop for milliseconds (late polls are skipped).
        gc.freeze()
        # The buffer thread's Python steps (a flush's glue, saving stage state) hand the GIL
        # back to the event loop within this, not CPython's 5 ms (bench/e2e.py measures it).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        # this thread runs the event loop: a poll falling due takes the core at once
        short_slice = timers.request_short_slice()
        log.info(
            "agent started",
            extra={
                "gateway": cfg.gateway.id,
                "devices": len(cfg.devices),
                "points": len(metas),
                "buffer": str(cfg.buffer.path),
                "codec": codec.FORMAT_VERSION,
                "stages_resumed": resumed,
                "accelerated": native.ACCELERATED,
                "loop_slice": "short" if short_slice is None else f"default ({short_slice})",
            },
        )

    def _meta(self, cfg: Config, metas: list[dict[str, Any]], ids: dict[str, int]) -> bytes:
        """The retained up/meta: the gateway, its points with their ids, its config."""
        assert self.buffer is not None
        return wire.encode_meta(
            {
                "v": 1,
                "gateway": cfg.gateway.id,
                "site": cfg.gateway.site,
                "location": cfg.gateway.location.model_dump() if cfg.gateway.location else None,
                "stream": self.buffer.stream_id,
                "points": [{"id": ids[m["key"]], **m} for m in metas],
                "software": software_version(),
                "config": {"version": cfg.version, "hash": cfg.hash},
                "locations": {
                    d.name: d.location.model_dump()
                    for d in cfg.devices
                    if d.enabled and d.location is not None
                },
            }
        )

    def _local_action(self, cfg: Config, ids: dict[str, int]) -> LocalAction:
        """Derived points and rules for `cfg`, hooked into the memory queue."""
        local = LocalAction(
            cfg,
            ids,
            lambda key: self.points.get(key),
            self.write_point,
            self._publish,
            self._append_actions,
        )
        self.queue.derive = local.process if local.active else None
        return local

    async def write_point(self, point: PointSpec, value: float) -> float:
        """Writes through the point's driver (COMMAND_TIMEOUT_S); the value read back.
        Raises with the driver's words (they name device, point and why) or a timeout."""
        driver = self._driver_of[point.key.split("/", 1)[0]]
        try:
            return await asyncio.wait_for(driver.write(point, value), COMMAND_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(
                f"write to {point.key!r} timed out after {COMMAND_TIMEOUT_S:g} s"
            ) from None

    async def _publish(self, device: str, topic: str, payload: bytes, retain: bool) -> None:
        driver = self._driver_of[device]
        await asyncio.wait_for(driver.publish(device, topic, payload, retain), COMMAND_TIMEOUT_S)

    async def _append_actions(
        self, actions: list[wire.RuleAction], state: dict[str, bytes]
    ) -> None:
        """A rule's action events and state, on the alarm lane, in one transaction; if the
        buffer refuses, they go with the next flush (never lost, never reordered)."""
        try:
            await self._on_buffer(self._append_actions_sync, actions, state)
        except Exception as exc:
            log.error(
                "rule actions kept in memory for the next flush: the buffer refused them",
                extra={"error": f"{type(exc).__name__}: {exc}", "actions": len(actions)},
            )
            return
        if self.uplink is not None:
            self.uplink.wake()

    def _append_actions_sync(self, actions: list[wire.RuleAction], state: dict[str, bytes]) -> None:
        """On the buffer thread: these and any still pending, in order; on failure they
        all stay pending (the next flush or action takes them)."""
        assert self.buffer is not None
        self._pending_actions += actions
        self._pending_rule_state.update(state)
        pending = self._pending_actions
        body = wire.encode_alarms(self.config.gateway.id, [], pending)
        self.buffer.append_many([(Lane.ALARM, body, len(pending))], self._pending_rule_state)
        self._pending_actions, self._pending_rule_state = [], {}

    def _make_uplink(self, meta: bytes) -> Uplink:
        assert self.buffer is not None
        uplink = Uplink(
            UplinkSettings.of(self.config),
            BufferPort(self._peek, self._ack, self.buffer.release),
            self.buffer.stream_id,
            meta,
            self._connect,
            self.handle_command,
            self._stats,
            on_turn=partial(self._beat, "uplink"),
        )
        if self.metrics is not None:
            uplink.observe_puback = self.metrics.puback_latency.observe
        return uplink

    def _start_driver(self, driver: Driver) -> None:
        # a driver that crashes is restarted; it must not take the agent down
        self._driver_tasks[driver.name] = self._supervised(
            f"driver:{driver.name}", partial(driver.run, self.queue)
        )

    def _supervised(
        self, name: str, run: Callable[[], Any], forever: bool = False
    ) -> asyncio.Task[None]:
        health = self.task_health[name] = TaskHealth(name)
        return asyncio.create_task(supervise(health, run, restart_on_return=forever), name=name)

    async def _recover_intake(self) -> None:
        """What a crashed run had read but not yet put through the pipeline goes first."""
        assert self.buffer is not None
        rows, dropped = await self._on_buffer(self.buffer.intake_recover)
        if dropped:
            self.counters.intake_dropped += dropped
            log.warning(
                "power cut: intake dropped (with sync=normal its readings may be on the "
                "platform already; they are within what a power cut may lose)",
                extra={"readings": dropped},
            )
        held: list[Held] = []
        bad: list[int] = []
        for intake_id, data in rows:
            try:
                held.append(Held(Batch.from_bytes(data), intake_id))
            except ValueError as exc:
                bad.append(intake_id)
                log.error(
                    "unreadable intake row dropped",
                    extra={"intake_id": intake_id, "error": str(exc)},
                )
        if bad:
            await self._on_buffer(self.buffer.intake_drop, bad)
        if held:
            self.queue.restore(held)
            n = sum(len(h.batch) for h in held)
            self.counters.recovered += n
            log.warning(
                "readings recovered from the intake (the last run did not stop cleanly)",
                extra={"readings": n, "batches": len(held)},
            )

    # -- intake ----------------------------------------------------------------------

    def _schedule_intake(self) -> None:
        """Called on each push. A push after a quiet `intake_delay` is committed at once;
        one within `intake_delay` of the last commit waits for a timer, so a fast driver
        still makes one commit per delay. At street rates (polls further apart than the
        delay) every poll is committed at once: no timer, no extra wakeup of the loop."""
        if self._intake_timer is not None or self._stopped:
            return
        loop = asyncio.get_running_loop()
        wait = self._intake_next - loop.time()
        if wait > 0:
            self._intake_timer = loop.call_later(wait, self._intake)
        else:
            self._intake()

    def _intake(self) -> None:
        self._intake_timer = None
        self._intake_next = asyncio.get_running_loop().time() + self.config.buffer.intake_delay
        held = self.queue.take_unsaved()
        if held:
            # nothing on the loop waits for the commit (its errors are handled on the
            # buffer thread), so its end wakes nothing; a flush, a stop and the final
            # close queue behind it on the same single thread
            self._executor.submit(self._write_intake, held)

    def _write_intake(self, held: list[Held]) -> None:
        """On the buffer thread: the commit, or its failure counted and logged."""
        try:
            self._intake_sync(held)
        except Exception as exc:  # the readings stay in memory for the flush
            self.counters.intake_failures += 1
            if (n := self._throttle.ready("intake-failed")) is not None:
                log.error(
                    "intake commit failed; readings kept in memory for the next flush",
                    extra={"error": f"{type(exc).__name__}: {exc}", "failures": n},
                )

    def _intake_sync(self, held: list[Held]) -> None:
        """On the buffer thread, so a flush taking these batches runs before or after it,
        never during: a batch already taken is left to the flush's append. Whole batches
        in rows of about FLUSH_PART_ROWS readings, one commit: a flush takes the whole
        queue, so it takes all of a row's batches."""
        assert self.buffer is not None
        rows: list[list[Held]] = []
        n = FLUSH_PART_ROWS
        for h in held:
            if h.taken:
                continue
            if n >= FLUSH_PART_ROWS:
                rows.append([])
                n = 0
            rows[-1].append(h)
            n += len(h.batch)
        if not rows:
            return
        batches = [
            row[0].batch if len(row) == 1 else Batch.concat(h.batch for h in row) for row in rows
        ]
        ids = self.buffer.intake_put([(b.to_bytes(), len(b)) for b in batches])
        for row, intake_id in zip(rows, ids, strict=True):
            for h in row:
                h.intake_id = intake_id

    def _collect_info(self) -> wire.DeviceInfo:
        """Every device's information as its driver has it now (devices with none left out)."""
        info: wire.DeviceInfo = {}
        for drv in self.drivers:
            for dev in drv.devices:
                try:
                    entries = drv.device_info(dev.name)
                except Exception as exc:  # a driver's bug must not stop the stats
                    if (n := self._throttle.ready(f"info-{dev.name}")) is not None:
                        log.error(
                            "device information unreadable",
                            extra={"device": dev.name, "error": repr(exc), "failures": n},
                        )
                    continue
                if entries:
                    info[dev.name] = dict(entries)
        return info

    def refresh_device_info(self) -> bool:
        """Takes the drivers' device information; True if it changed since last time.
        What `wire.bound_devices` cuts or leaves out is counted and logged once per change."""
        raw = self._collect_info()
        if raw == self._info_raw:
            return False
        self._info_raw = raw
        self.device_info, problems = wire.bound_devices(raw)
        if problems:
            truncated = sum(p.truncated for p in problems)
            self.counters.info_truncated += truncated
            self.counters.info_refused += len(problems) - truncated
            log.warning(
                "device information cut or left out (the platform stores text only within "
                "its limits)",
                extra={
                    "truncated": truncated,
                    "left_out": len(problems) - truncated,
                    "entries": [f"{p.device}/{p.name[:64]}: {p.reason}" for p in problems[:10]],
                },
            )
        return True

    def refresh_health(self) -> bool:
        """Takes the drivers' device health; True if a device's healthy flag changed."""
        now = time.time_ns() // 1_000_000
        old = self.device_health
        self.device_health = {
            name: device_status(h, old.get(name), self.started_ms if not old else now)
            for drv in self.drivers
            for name, h in drv.health().items()
        }
        return any(
            name not in old or old[name].healthy != status.healthy
            for name, status in self.device_health.items()
        )

    async def _stats(self) -> bytes:
        """The retained up/stats message: what the buffer took, evicted and still holds,
        every device's information and health."""
        assert self.buffer is not None
        self.refresh_device_info()
        self.refresh_health()
        health, left_out = wire.bound_health(self.device_health)
        if left_out:
            self.counters.health_refused += len(left_out)
            if (n := self._throttle.ready("health-left-out", len(left_out))) is not None:
                log.warning(
                    "device health left out of up/stats (its size is bounded)",
                    extra={"devices": left_out[:10], "left_out": n},
                )
        stats = await self._on_buffer(self.buffer.stats)
        return wire.encode_stats(
            wire.GatewayStats(
                gateway=self.config.gateway.id,
                ts=time.time_ns() // 1_000_000,
                appended_points=stats.appended_points,
                evicted_points=stats.evicted_points,
                evicted_messages=stats.evicted_messages,
                backlog_points=sum(lane.points for lane in stats.lanes.values()),
                backlog_messages=sum(lane.messages for lane in stats.lanes.values()),
                lost_points=self.counters.lost,
                devices=self.device_info,
                health=health,
            )
        )

    async def handle_command(self, payload: bytes) -> bytes | None:
        """A downlink command in, its response out (see agent/commands.py); None for a
        firmware update, which runs on in a task and answers through the uplink."""
        rules = self.local.by_id if self.local is not None else {}
        try:
            cmd = parse_command(payload, self.points, self._firmware, self._downgrades, rules)
        except CommandRefused as exc:
            log.warning("command refused", extra={"id": exc.command_id, "error": str(exc)})
            return exc.response()
        if isinstance(cmd, FirmwareUpdateCommand):
            return self._start_update(cmd)
        if isinstance(cmd, ConfigPushCommand):
            return self.pushes.start(cmd)
        if isinstance(cmd, RuleOverrideCommand):
            assert self.local is not None
            self.local.override(cmd.rule, f"platform (command {cmd.id})" if cmd.override else "")
            log.info(
                "rule override", extra={"id": cmd.id, "rule": cmd.rule, "override": cmd.override}
            )
            return response(cmd.id, extra={"rule": cmd.rule, "override": cmd.override})
        try:
            written = await self.write_point(cmd.point, cmd.value)
        except (NotImplementedError, TimeoutError) as exc:
            error = str(exc)
        except Exception as exc:  # the driver's own error names device, point and why
            error = f"{type(exc).__name__}: {exc}"
        else:
            log.info(
                "command executed",
                extra={
                    "id": cmd.id,
                    "point": cmd.point.key,
                    "value": cmd.value,
                    "written": written,
                },
            )
            return response(cmd.id, extra={"written": written})
        log.warning("command failed", extra={"id": cmd.id, "point": cmd.point.key, "error": error})
        return response(cmd.id, error)

    def _start_update(self, cmd: FirmwareUpdateCommand) -> bytes | None:
        """Starts a firmware update as a task (one per device at a time)."""
        running = self._updates.get(cmd.device)
        if running is not None:
            error = f"an update of {cmd.device!r} is already running (command {running[0]!r})"
            log.warning("command refused", extra={"id": cmd.id, "error": error})
            return CommandRefused(error, cmd.id, FIRMWARE_UPDATE).response()
        task = asyncio.create_task(self._update(cmd), name=f"firmware:{cmd.device}")
        self._updates[cmd.device] = (cmd.id, task)
        task.add_done_callback(lambda _: self._updates.pop(cmd.device, None))
        log.info(
            "firmware update started",
            extra={"id": cmd.id, "device": cmd.device, "url": redact(cmd.url), "force": cmd.force},
        )
        return None

    async def _update(self, cmd: FirmwareUpdateCommand) -> None:
        from agent.ota_command import fetch_https, run_update
        from firmware_bridge.ota import OtaResult, Outcome

        driver = self._driver_of[cmd.device]
        logged = [0]

        def progress(done: int, total: int) -> None:
            quarter = done * 4 // max(total, 1)
            if quarter > logged[0]:
                logged[0] = quarter
                log.info(
                    "firmware update progress",
                    extra={"id": cmd.id, "device": cmd.device, "percent": 25 * quarter},
                )

        async def update(package: bytes, force: bool) -> OtaResult:
            return await driver.update_firmware(cmd.device, package, force, progress)

        try:
            result = await run_update(cmd, update, self._fetch_firmware or fetch_https)
        except asyncio.CancelledError:
            result = OtaResult(Outcome.FAILED, "the agent stopped during the update")
            self._answer(cmd, result)
            raise
        except Exception as exc:  # a driver bug must still be answered
            log.exception("firmware update crashed", extra={"id": cmd.id, "device": cmd.device})
            result = OtaResult(Outcome.FAILED, f"{type(exc).__name__}: {exc}")
        self._answer(cmd, result)

    def _answer(self, cmd: FirmwareUpdateCommand, result: OtaResult) -> None:
        from agent.ota_command import answer
        from firmware_bridge.ota import Outcome

        extra = {
            "id": cmd.id,
            "device": cmd.device,
            "outcome": str(result.outcome),
            "from": result.from_version,
            "to": result.to_version,
            "reason": result.reason,
        }
        if result.outcome is Outcome.UPDATED:
            log.info("firmware update finished", extra=extra)
        else:
            log.warning("firmware update finished", extra=extra)
        assert self.uplink is not None
        self.uplink.respond(answer(cmd.id, result))

    def _build_drivers(self, ids: dict[str, int]) -> list[Driver]:
        by_driver = device_specs(self.config, ids)
        drivers = [load_driver(name)(devices) for name, devices in by_driver.items()]
        self._index_devices(drivers)
        return drivers

    def _index_devices(self, drivers: list[Driver]) -> None:
        """What the commands look up by device and point, from the drivers' devices."""
        self._driver_of = {dev.name: drv for drv in drivers for dev in drv.devices}
        self._firmware = {dev: drv.firmware_updates(dev) for dev, drv in self._driver_of.items()}
        self._downgrades = frozenset(
            dev for dev, drv in self._driver_of.items() if drv.firmware_downgrades(dev)
        )
        self.points = {p.key: p for drv in drivers for dev in drv.devices for p in dev.points}

    # -- buffer thread ---------------------------------------------------------

    async def _peek(self, limit: int, exclude: Collection[int]) -> list[Message]:
        assert self.buffer is not None
        return await self._on_buffer(self.buffer.peek, limit, tuple(exclude), True)

    async def _ack(self, seqs: Sequence[int]) -> int:
        assert self.buffer is not None
        return await self._on_buffer(self.buffer.ack, list(seqs))

    def _flush_sync(
        self, held: list[Held], now_ms: int, monotonic_ms: int, derive_state: dict[str, bytes]
    ) -> int:
        """Runs on the buffer thread: pipeline, encode, one append transaction.

        The pipeline's output (alarms, telemetry chunks), the stage state it leaves and
        the deletion of the intake rows it came from are one transaction, so a restart
        resumes the stages exactly where the buffer's content ends and replays exactly
        the intake that had not been through them. If the append fails (disk full, I/O
        error), the output stays pending, in memory within the queue's bound, and goes
        first next time: the readings are not run through the stateful stages twice."""
        assert self.buffer is not None
        if held or self.pipeline.timed:
            # one run of the pipeline in parts (Pipeline.process, last=False): see FLUSH_PART_ROWS
            parts = Batch.regroup((h.batch for h in held), FLUSH_PART_ROWS) or [Batch()]
            outs: list[Batch] = []
            flagged = 0
            touched: set[int] = set()  # the points whose stage state may change (if kept)
            for k, part in enumerate(parts):
                flagged += impl.flag_timestamps(
                    part.timestamps, part.quality, CLOCK_VALID_FROM_MS, now_ms + CLOCK_AHEAD_MAX_MS
                )
                if self.pipeline.persistent:
                    touched.update(part.point_ids)
                out, counts = self.pipeline.process(
                    part, now_ms, monotonic_ms, last=k == len(parts) - 1
                )
                self._count(counts)
                self._pending_alarms.extend(counts.alarms)
                outs.append(out)
            if flagged:
                self.counters.clock_flagged += flagged
                if (n := self._throttle.ready("clock", flagged)) is not None:
                    log.warning(
                        "readings stamped by an obviously wrong clock flagged uncertain",
                        extra={"readings": n, "gateway_clock_ms": now_ms},
                    )
            self._pending += Batch.regroup(outs, self.config.uplink.max_batch_points)
            self._pending_state.update(self.pipeline.save_state(touched))
            self._pending_state.update(derive_state)
            self._bound_pending()
        # only now: if the pipeline raised, the rows stay in the intake for the next start
        self._pending_intake += sorted({h.intake_id for h in held if h.intake_id is not None})
        # The taken batches go here, one at a time (the loop between frees lets the GIL go):
        # freed with the list at the end of flush(), on the event loop, they would stall it
        # for as long as thousands of frees take (1.8 ms for 1000 polls, 25 ms for 30000).
        while held:
            held.pop()
        if not (
            self._pending
            or self._pending_alarms
            or self._pending_state
            or self._pending_intake
            or self._pending_actions
        ):
            return 0
        gateway = self.config.gateway.id
        sizes: list[int] = []

        def encoded(chunk: Batch) -> Callable[[int], bytes]:
            def make(seq: int) -> bytes:
                payload = codec.encode(chunk, gateway=gateway, seq=seq)
                sizes.append(len(payload))
                return payload

            return make

        items: list[tuple[Lane, bytes | Callable[[int], bytes], int]] = []
        actions = self._pending_actions
        state = self._pending_state | self._pending_rule_state
        if self._pending_alarms or actions:
            alarms = wire.encode_alarms(gateway, self._pending_alarms, actions)
            items.append((Lane.ALARM, alarms, len(self._pending_alarms) + len(actions)))
        items += [(Lane.TELEMETRY, encoded(chunk), len(chunk)) for chunk in self._pending]
        self.buffer.append_many(items, state, self._pending_intake)
        n = sum(len(chunk) for chunk in self._pending)
        c = self.counters
        c.sent += n
        c.encoded_bytes += sum(sizes)
        c.flushes += 1
        for e in self._pending_alarms:
            log.warning(
                "alarm raised" if e.raised else "alarm cleared",
                extra={
                    "point": self._key_of.get(e.point_id, e.point_id),
                    "rule": e.rule,
                    "severity": e.severity,
                    "value": e.value,
                    "ts_ms": e.ts_ms,
                    "since_ms": e.since_ms,
                },
            )
        self._flushed_alarms += self._pending_alarms
        self._pending, self._pending_alarms, self._pending_state = [], [], {}
        self._pending_intake, self._pending_actions, self._pending_rule_state = [], [], {}
        return n

    def _bound_pending(self) -> None:
        """Output waiting for a failed buffer stays within the memory bound: beyond it the
        oldest telemetry is lost, counted and logged (alarms are kept)."""
        excess = sum(len(b) for b in self._pending) - self.queue.max_points
        lost = 0
        while excess > 0 and self._pending:
            chunk = self._pending.pop(0)
            excess -= len(chunk)
            lost += len(chunk)
        if lost:
            self.counters.lost += lost
            log.error(
                "buffer unavailable for too long: oldest readings lost",
                extra={"lost_readings": lost, "max_memory_points": self.queue.max_points},
            )

    def _count(self, counts: PipelineCounts) -> None:
        c = self.counters
        c.flagged += counts.flagged
        c.dropped += counts.dropped
        c.replaced += counts.replaced
        c.clamped += counts.clamped
        c.suppressed += counts.suppressed
        c.windows += counts.windows
        c.late += counts.late
        raised = sum(e.raised for e in counts.alarms)
        c.alarms_raised += raised
        c.alarms_cleared += len(counts.alarms) - raised
        if counts.flagged or counts.dropped or counts.late:
            # what the throttled lines would have said, until the next line says it
            held = self._pipeline_held
            for mine, theirs in (
                (held.flagged_by_point, counts.flagged_by_point),
                (held.dropped_by_point, counts.dropped_by_point),
            ):
                for pid, n in theirs.items():
                    mine[pid] = mine.get(pid, 0) + n
            held.flagged += counts.flagged
            held.dropped += counts.dropped
            held.late += counts.late
            n = counts.flagged + counts.dropped + counts.late
            if self._throttle.ready("pipeline", n) is not None:
                self._pipeline_held = PipelineCounts()
                self._warn_pipeline(held)

    def _warn_pipeline(self, held: PipelineCounts) -> None:
        """One line for what the pipeline flagged (sent, marked bad), dropped and found
        too late for its aggregate window since the last such line, naming the points."""
        parts = []
        extra: dict[str, object] = {}
        for what, total, by_point in (
            ("flagged", held.flagged, held.flagged_by_point),
            ("dropped", held.dropped, held.dropped_by_point),
        ):
            if total:
                points = {self._key_of.get(p, str(p)): k for p, k in by_point.items()}
                parts.append(f"{what} {_readings(total)} ({_most(points)})")
                extra[what] = total
                extra[f"{what}_points"] = dict(
                    sorted(points.items(), key=lambda kv: -kv[1])[: 10 * WARN_POINTS]
                )
        if held.late:
            parts.append(f"{_readings(held.late)} too late for their aggregate window")
            extra["late"] = held.late
        log.warning("pipeline: " + "; ".join(parts), extra=extra)

    async def flush(self) -> int:
        batches = self.queue.take()
        pending = (
            self._pending or self._pending_alarms or self._pending_intake or self._pending_actions
        )
        if not (batches or self.pipeline.timed or pending):
            return 0
        # the derived points' inputs as of these readings, stored with their output: every
        # DERIVE_SAVE_S (window rings are kilobytes: saved every second they would wear a
        # street gateway's flash) and at a stop
        local = self.local
        derive_state: dict[str, bytes] = {}
        mono = time.monotonic()
        due = self._stopping or mono - self._derive_saved >= DERIVE_SAVE_S
        if batches and local is not None and local.active and due:
            derive_state, self._derive_saved = local.save_state(), mono
        now_ms = time.time_ns() // 1_000_000
        monotonic_ms = time.monotonic_ns() // 1_000_000  # the timed stages' real time
        self._check_clock(now_ms)
        started = time.perf_counter()
        alarms = self.counters.alarms_raised + self.counters.alarms_cleared
        try:
            n: int = await self._on_buffer(
                self._flush_sync, batches, now_ms, monotonic_ms, derive_state
            )
        except Exception as exc:
            self.counters.flush_failures += 1
            if (n_failed := self._throttle.ready("flush-failed")) is not None:
                log.error(
                    "flush to buffer failed; output kept in memory for the next flush",
                    extra={
                        "buffer": str(self.config.buffer.path),
                        "error": f"{type(exc).__name__}: {exc}",
                        "pending_readings": sum(len(b) for b in self._pending),
                        "failed_flushes": n_failed,
                    },
                )
            return 0
        finally:
            if self.metrics is not None:
                self.metrics.flush_duration.observe(time.perf_counter() - started)
        if self._flushed_alarms:
            alarms_out, self._flushed_alarms = self._flushed_alarms, []
            if local is not None:
                local.on_alarms(alarms_out, self._key_of)
        # alarms alone (a stale rule on a quiet gateway) are news for the uplink too
        news = n or self.counters.alarms_raised + self.counters.alarms_cleared != alarms
        if news and self.uplink is not None:
            self.uplink.wake()
        return n

    def _check_clock(self, now_ms: int) -> None:
        """Reports a step of the wall clock (readings keep the time they were taken, and
        sequence numbers do not depend on the clock, so nothing is reordered)."""
        offset = now_ms / 1000.0 - time.monotonic()
        step = offset - self._clock_offset
        self._clock_offset = offset
        if abs(step) > CLOCK_STEP_S:
            self.counters.clock_steps += 1
            log.warning("wall clock stepped", extra={"step_s": round(step, 3), "now_ms": now_ms})

    def _beat(self, loop: str) -> None:
        self.heartbeats[loop] = time.monotonic()

    async def _flush_loop(self) -> None:
        while True:
            self._beat("flush")
            await asyncio.sleep(self.config.buffer.flush_interval)  # a reload may change it
            await self.flush()
            # a device's information changed (a serial read, a BTHome text heard) or a
            # device failed or recovered: up/stats goes now, not at the next stats_interval
            info_changed = self.refresh_device_info()
            self._health_changed |= self.refresh_health()
            now = time.monotonic()
            health_due = self._health_changed and now - self._reported >= HEALTH_REPORT_MIN_S
            if (info_changed or health_due) and self.uplink is not None:
                self._health_changed, self._reported = False, now
                self.uplink.report_now()

    # -- status ----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "state": "stopped" if self._stopped else "running",
            "started_ms": self.started_ms,
            "updated_ms": time.time_ns() // 1_000_000,
            "counters": asdict(self.counters),
            "uplink": self.uplink.status.as_dict() if self.uplink else None,
            "devices": {
                name: h.as_dict() for drv in self.drivers for name, h in drv.health().items()
            },
            "tasks": {name: h.as_dict() for name, h in self.task_health.items()},
            "info": self.device_info,
            "rules": self.local.status() if self.local is not None else {},
            "local": (
                {**self.local.counters, "last_error": self.local.last_error}
                if self.local is not None
                else {}
            ),
            "metrics": self.metrics.as_dict() if self.metrics else None,
        }

    async def write_status(self) -> None:
        assert self.buffer is not None
        await self._on_buffer(self.buffer.put_state, "agent", self.snapshot())

    async def _status_loop(self) -> None:
        """The status snapshot, the sync point and the checkpoint, every STATUS_INTERVAL_S
        in one trip to the buffer thread (one wakeup of it and of the loop, not three)."""
        while True:
            try:
                snapshot: dict[str, Any] | None = self.snapshot()
            except Exception as exc:  # a bug in a driver's health: the sync point goes on
                self._status_failed("status snapshot", exc)
                snapshot = None
            await self._on_buffer(self._status_sync, snapshot)
            await asyncio.sleep(STATUS_INTERVAL_S)

    def _status_sync(self, snapshot: dict[str, Any] | None) -> None:
        """On the buffer thread, each step on its own: a failed snapshot must not skip the
        sync point, which (with sync=normal) is what bounds what a power cut can roll
        back to STATUS_INTERVAL_S. A failed step is retried at the next tick."""
        buffer = self.buffer
        assert buffer is not None
        steps: list[tuple[str, Callable[[], None]]] = [
            ("sync point", buffer.sync_point),
            ("checkpoint", buffer.checkpoint),
        ]
        if snapshot is not None:
            steps.insert(0, ("status snapshot", partial(buffer.put_state, "agent", snapshot)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # the buffer's errors
                self._status_failed(what, exc)

    def _status_failed(self, what: str, exc: Exception) -> None:
        self.counters.status_failures += 1
        if (n := self._throttle.ready(f"status-{what}")) is not None:
            log.error(
                "buffer status step failed",
                extra={"step": what, "error": f"{type(exc).__name__}: {exc}", "failures": n},
            )

    # -- reload ----------------------------------------------------------------

    def request_reload(self, path: Path, source: str = "sighup") -> None:
        """Reloads the config file at `path` in a task (a signal handler's way in)."""
        task = asyncio.create_task(self.reload_file(path, source), name="reload")
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def reload_file(self, path: Path, source: str) -> ReloadDiff | None:
        """Validates the file and applies it; an invalid or refused config is logged and
        recorded, and the running one stays. None if it did not apply."""
        if self.buffer is None or self._stopping:
            log.warning("config reload ignored: the agent is not running", extra={"source": source})
            return None
        try:
            # parsed off the loop: a large config takes milliseconds the polls need
            new = await asyncio.to_thread(load_config, path)
        except (ConfigError, OSError) as exc:
            error = str(exc) if isinstance(exc, ConfigError) else f"{path}: {exc}"
            log.error(
                "config reload refused: invalid config, the running one stays",
                extra={"source": source, "config": str(path), "error": error},
            )
            await self.record_reload(source, None, error=error)
            return None
        try:
            return await self.reload(new, source)
        except Exception:  # refused or failed: logged and recorded by reload()
            return None

    async def record_reload(
        self,
        source: str,
        config: Config | None,
        diff: ReloadDiff | None = None,
        error: str | None = None,
    ) -> None:
        """The outcome of a reload, as `citygw reload` and `citygw status` show it."""
        assert self.buffer is not None
        record: dict[str, Any] = {
            "ts_ms": time.time_ns() // 1_000_000,
            "ok": error is None,
            "source": source,
            "version": config.version if config is not None else None,
            "hash": config.hash if config is not None else None,
        }
        record.update({"diff": diff.as_dict()} if diff is not None else {"error": error})
        try:
            await self._on_buffer(self.buffer.put_state, "reload", record)
        except BufferError as exc:  # the reload stands; only its record is missing
            log.error("reload record not written", extra={"error": str(exc)})

    async def reload(self, new: Config, source: str = "api") -> ReloadDiff:
        """Applies a validated config as a diff of the running one (agent/reload.py);
        raises ReloadRefused, before touching anything, if it needs a restart. Devices
        added, removed or changed are started, stopped or restarted; the others poll
        on; stage state is kept where a point's stage spec is unchanged; the uplink
        reconnects only if its settings changed. One reload at a time."""
        async with self._reload_lock:
            if self._stopping:
                raise ReloadRefused("the agent is stopping")
            self.notifier.reloading()  # systemd: READY=1 again when it is over
            try:
                diff = await self._apply(new)
            except ReloadRefused as exc:
                log.warning(
                    "config reload refused, the running one stays",
                    extra={"source": source, "version": new.version, "error": str(exc)},
                )
                await self.record_reload(source, new, error=str(exc))
                raise
            except Exception as exc:  # a bug, or the buffer failing: said, then raised
                log.exception("config reload failed", extra={"source": source})
                await self.record_reload(source, new, error=f"reload failed: {exc!r}")
                raise
            else:
                log.info(
                    "config reloaded",
                    extra={"source": source, "version": new.version, "hash": new.hash}
                    | diff.as_dict(),
                )
                await self.record_reload(source, new, diff)
                return diff
            finally:
                self.notifier.ready(service_status(self))

    async def _apply(self, new: Config) -> ReloadDiff:
        assert self.buffer is not None and self.uplink is not None
        old = self.config
        # the pure work runs off the loop: for hundreds of devices it takes milliseconds
        # the polls need (nothing changes a Config once loaded)
        diff = await asyncio.to_thread(diff_configs, old, new)
        if (refused := diff.refusal()) is not None:
            raise refused
        by_driver = {drv.name: drv for drv in self.drivers}
        plan = plan_drivers(
            diff,
            new,
            {name: [d.name for d in drv.devices] for name, drv in by_driver.items()},
            {name for name, drv in by_driver.items() if drv.live_devices},
        )
        self._refuse_if_updating(plan.stopping)
        diff.restarted = plan.restarted
        # everything that can fail before anything stops
        metas = await asyncio.to_thread(point_meta, new)
        ids: dict[str, int] = await self._on_buffer(self.buffer.registry.ensure, metas)
        specs, pipeline, kept, meta = await asyncio.to_thread(self._prepare, old, new, metas, ids)
        fresh = {name: load_driver(name)(specs[name]) for name in plan.whole if name in specs}
        if diff.restarted:
            log.warning(
                "devices restarted with their driver, which cannot add or remove a device "
                "while it runs",
                extra={"drivers": plan.whole, "devices": plan.restarted},
            )

        # 1. nothing more comes from the devices that stop
        for name, (stop, _) in plan.live.items():
            for device in stop:
                await by_driver[name].remove_device(device)
        for name in plan.whole:
            if (task := self._driver_tasks.pop(name, None)) is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                self.task_health.pop(f"driver:{name}", None)
            by_driver.pop(name, None)
        # 2. what they read goes through the old pipeline; then the new one takes over,
        # on the buffer thread, between two flushes
        await self.flush()
        await self._on_buffer(self._swap_pipeline, pipeline, kept, ids)
        # 3. the devices that start
        self.config = new
        for name, (_, start) in plan.live.items():
            for spec in specs[name]:
                if spec.name in start:
                    await by_driver[name].add_device(spec)
        for name, drv in fresh.items():
            by_driver[name] = drv
            self._start_driver(drv)
        self.drivers = list(by_driver.values())
        self._index_devices(self.drivers)
        await self._reload_local(old, new, ids)
        self.queue.max_points = new.buffer.max_memory_points
        if diff.uplink_changed:
            await self._restart_uplink(meta)
        elif meta != self.uplink.meta:
            self.uplink.set_meta(meta)
        # up/stats: the devices as they are now (the removed ones gone)
        self.refresh_device_info()
        self.refresh_health()
        self.uplink.report_now()
        # what was just built lives until the next reload: out of the collector's full
        # passes, as at start (the few cycles the old config leaves are kept, once)
        gc.freeze()
        return diff

    async def _reload_local(self, old: Config, new: Config, ids: dict[str, int]) -> None:
        """New derived points or rules: the new ones take over once every decision of the
        old ones is carried out and recorded; their state goes on where unchanged."""
        before = self.local
        assert before is not None
        if old.derived == new.derived and old.rules == new.rules:
            return
        if not await before.idle(LOCAL_IDLE_TIMEOUT_S):
            log.warning("rule actions still running at a reload are cut short")
        await self._stop_task("rules")
        self.local = self._local_action(new, ids)
        self.local.carry_state(before)
        if self.local.rules:
            self._tasks.append(self._supervised("rules", self.local.run, forever=True))

    async def _stop_task(self, name: str) -> None:
        """Ends the supervised task `name`, if it runs."""
        task = next((t for t in self._tasks if t.get_name() == name), None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._tasks.remove(task)
            self.task_health.pop(name, None)

    def _prepare(
        self, old: Config, new: Config, metas: list[dict[str, Any]], ids: dict[str, int]
    ) -> tuple[dict[str, list[DeviceSpec]], Pipeline, set[int], bytes]:
        """A reload's devices, pipeline, points whose stage state is kept, and up/meta."""
        kept = {ids[key] for key in stage_points(old, new)[0]}
        return device_specs(new, ids), build_pipeline(new, ids), kept, self._meta(new, metas, ids)

    def _refuse_if_updating(self, devices: Collection[str]) -> None:
        """A firmware update is never cut short by a reload."""
        for device in sorted(devices):
            if (running := self._updates.get(device)) is not None:
                raise ReloadRefused(
                    f"device {device!r} is updating its firmware (command {running[0]!r}); "
                    "reload once the update is over"
                )

    def _swap_pipeline(
        self, pipeline: Pipeline, kept: Collection[int], ids: dict[str, int]
    ) -> None:
        """On the buffer thread, so no flush runs meanwhile."""
        carried = pipeline.carry_state(self.pipeline, kept)
        self.pipeline = pipeline
        self._key_of = {pid: key for key, pid in ids.items()}
        log.debug("pipeline swapped", extra={"stage_states_carried": carried})

    async def _restart_uplink(self, meta: bytes) -> None:
        """A new uplink for new connection settings; the old session ends first (its
        claims on the buffer are released), its counters and unsent answers carry on."""
        old = self.uplink
        assert old is not None
        [task] = [t for t in self._tasks if t.get_name() == "uplink"]
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self.uplink = self._make_uplink(meta)
        self.uplink.adopt(old)
        self._tasks[self._tasks.index(task)] = self._supervised(
            "uplink", self.uplink.run, forever=True
        )
        self.uplink.wake()
        log.info(
            "uplink restarted for its new settings", extra={"broker": redact(self.uplink.s.broker)}
        )

    # -- stop ------------------------------------------------------------------

    def buffer_stats_from_thread(self, timeout: float) -> BufferStats:
        """The buffer's stats for another thread (a metrics scrape), read on the buffer
        thread; TimeoutError if that is busy for longer than `timeout` s."""
        assert self.buffer is not None
        return self._executor.submit(self.buffer.stats).result(timeout)

    async def buffer_depth(self) -> int:
        """Messages still in the buffer (all lanes)."""
        assert self.buffer is not None
        stats = await self._on_buffer(self.buffer.stats)
        return sum(lane.messages for lane in stats.lanes.values())

    async def stop_drivers(self) -> None:
        """Stops the drivers, and first any firmware update running through one."""
        updates = [task for _, task in self._updates.values()]
        for task in updates:
            task.cancel()
        await asyncio.gather(*updates, return_exceptions=True)
        for task in self._driver_tasks.values():
            task.cancel()
        await asyncio.gather(*self._driver_tasks.values(), return_exceptions=True)
        self._driver_tasks.clear()

    async def drain(self, timeout: float) -> bool:
        """Waits until the uplink has emptied the buffer; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.buffer_depth() == 0:
                return True
            await asyncio.sleep(0.05)
        return await self.buffer_depth() == 0

    async def stop(self, drain_timeout: float = 0.0) -> None:
        """Graceful stop: drivers first, then flush what is in memory into the buffer,
        optionally wait for the uplink to drain, then stop the rest."""
        await self.pushes.stop()  # a trial's marker stays: the next start resumes it
        async with self._reload_lock:  # a reload under way finishes first, none after
            self._stopping = True
        # the rules' actions under way end (and are recorded) while the drivers still run;
        # then no new one starts (a decision not carried out is not recorded either, and
        # the rule's saved state is the one before it)
        if self.local is not None and not await self.local.idle(LOCAL_IDLE_TIMEOUT_S):
            log.warning("rule actions still running at the stop are cut short")
        await self._stop_task("rules")
        await self.stop_drivers()
        if self._intake_timer is not None:
            self._intake_timer.cancel()
            self._intake_timer = None
        await self.flush()  # after any intake commit: the buffer thread takes them in order
        if drain_timeout > 0:
            await self.drain(drain_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.metrics is not None:
            await self.metrics.close()
        self._stopped = True
        if self.buffer is not None:
            try:
                await self.write_status()
            except BufferError as exc:  # the readings are safe; only the snapshot is old
                log.error("final status snapshot failed", extra={"error": str(exc)})
            await self._on_buffer(self.buffer.close)
        self._executor.shutdown(wait=True)
        log.info("agent stopped", extra={**asdict(self.counters)})


async def run_agent(
    config: Config,
    stop: asyncio.Event,
    config_path: Path | None = None,
    notifier: Notifier | None = None,
) -> Agent:
    """The agent as a service: started, READY=1 to systemd (when started by it: the
    notifier reads $NOTIFY_SOCKET by default), run until `stop`, STOPPING=1, stopped.
    With `config_path`, SIGHUP reloads that file."""
    notifier = notifier or Notifier()
    agent = Agent(config, notifier=notifier)
    if config_path is not None:  # before start: SIGHUP's default action ends the process
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, agent.request_reload, config_path)
    await agent.start()
    notifier.ready(service_status(agent))
    await stop.wait()
    notifier.stopping()
    await agent.stop()
    return agent
