"""Platform ingest under city load: thousands of gateways -> mosquitto -> 1, then 2,
`citygw ingest` workers -> PostgreSQL.

Setup. A private mosquitto per phase (`common.broker.Mosquitto` with extra lines: no limit
on queued messages or bytes per client, so the workers' persistent sessions can hold a
whole run; TCP_NODELAY), a fresh PostgreSQL schema per phase, and one or two load
generator processes (`bench/mqtt_load.py`: raw asyncio MQTT 3.1.1 connections, ~1,000 a
process, one per simulated gateway) whose payloads are all encoded before the clock
starts with the real codec and envelope: every gateway (``gw-00001``...) publishes its
retained ``up/meta`` once, then one ``up/batch`` per ``--interval`` s (default: 300
readings = 60 points polled 5 times a second, quantised sensor series, consecutive seq
numbers), starts staggered over the interval. The workers are real ``python -m cli
ingest`` subprocesses in one shared group (``--group bench``, ``$share/bench/...``),
each with its own ``--client-id`` and ``--session-expiry 600``.

Each phase (1 worker, then 2) runs two rounds of the same shape, with fresh batches:

- live: the workers are subscribed, the gateways publish at the offered rate
  (``gateways * readings / interval``, default 600,000 readings/s) for ``--seconds``;
- drain: the workers stop (their persistent sessions stay in the broker), the gateways
  publish the next round as fast as the broker takes it, then the workers start again
  and empty their queues.

The readings/s of a round are counted from the store (`Store.counts()`, polled from this
process every 0.25 s in a live round, every 0.05 s in a drain, which lasts only seconds):
readings stored between the first and the last change of the count, divided by the time
between them; the CPU seconds printed are over the same span.

Which figure is "per worker". The final line's ``readings_per_s_1w`` and
``readings_per_s_2w`` are the DRAIN figures (for 2 workers: both together): in the
live round the worker can never show more than the offered rate, and on this 2-core
machine it shares the CPUs with the load generators (the live figure mixes the two);
in the drain round the messages are already in the broker, nothing else runs, and the
figure is the rate at which the workers, mosquitto and PostgreSQL together can take
uplinks: the capacity. Both figures are printed. The retained metas are removed (an
empty retained publish each, which the workers still receive and reject) before the
workers stop, so that the restarted workers do not spend the drain re-storing 2,000
registries from the retained messages of their re-subscription: what the drain measures
is uplink batches. ``--keep-metas`` keeps them, to see what a restart costs.

lost = readings the broker acknowledged (PUBACK) - readings stored (a drain that did not
finish within ``--drain-timeout``, or stalled for ``--stall`` s, shows as lost > 0);
duplicates = `Store.duplicate_readings()` (copies beyond the first of a (gateway, point,
timestamp)). Per phase it prints the offered and achieved publish rates, the live and
drain rates, CPU seconds (from /proc/<pid>/stat) of the workers, their PostgreSQL
backends and mosquitto, and the store's counts. The bench schemas are dropped at the
end of each phase. Last line:

    ingest: gateways=<N> readings_per_s_1w=<N> readings_per_s_2w=<N> lost=<N> duplicates=<N>

Everything is loopback and bounded: every wait has a deadline (``--drain-timeout`` a
round at most). ``--quick`` is a smoke test (200 gateways, 3 s).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bench.mqtt_load import LoadSpec, RoundResult, generator_main  # noqa: E402
from central.store import Store, StoreCounts  # noqa: E402
from central.store_postgres import split_url  # noqa: E402
from central.stores import open_store  # noqa: E402
from common.broker import Mosquitto  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
GROUP = "bench"
POLL_S = 0.25  # store polling, live rounds
DRAIN_POLL_S = 0.05  # drains are short (seconds): finer

BROKER_CONF = """
# bench/ingest.py: the workers' persistent sessions hold whole runs while they are away
max_queued_messages 0
max_queued_bytes 0
max_inflight_messages 0
set_tcp_nodelay true
"""


# -- processes -----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))


class Generators:
    """The load generator processes and their command pipes."""

    def __init__(self, spec: LoadSpec, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        per = math.ceil(spec.gateways / processes)
        self.pipes: list[Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for p in range(processes):
            indexes = range(p * per, min(spec.gateways, (p + 1) * per))
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=generator_main, args=(theirs, indexes, spec), daemon=True)
            proc.start()
            theirs.close()
            self.pipes.append(ours)
            self.procs.append(proc)
        self.ready = self.collect("ready", 600.0)

    def send(self, *cmd: Any) -> None:
        for pipe in self.pipes:
            pipe.send(cmd)

    def collect(self, name: str, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        out = []
        for pipe in self.pipes:
            while True:  # an answer to a command that timed out earlier is skipped
                if not pipe.poll(max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"load generator: no {name!r} answer within {timeout:.0f} s")
                got, value = pipe.recv()
                if got == name:
                    out.append(value)
                    break
        return out

    def done(self) -> bool:
        return all(pipe.poll(0) for pipe in self.pipes)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("quit",))
        for proc in self.procs:
            proc.join(15)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


class Worker:
    """One `citygw ingest` subprocess (restartable: same client id, same session)."""

    def __init__(self, name: str, broker: str, db_url: str, work: Path) -> None:
        self.name = name
        self.broker = broker
        self.db_url = f"{db_url}&application_name={name}"
        self.work = work
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.cpu_s = 0.0  # CPU seconds of the previous runs

    @property
    def log(self) -> Path:
        return self.work / f"{self.name}-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cli",
                    "ingest",
                    "--broker",
                    self.broker,
                    "--db",
                    self.db_url,
                    "--group",
                    GROUP,
                    "--client-id",
                    self.name,
                    "--session-expiry",
                    "600",
                    "--log-level",
                    "INFO",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def subscribed(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited; see {self.log}")
        return "ingest: subscribed" in self.log.read_text(errors="replace")

    def cpu(self) -> float:
        return self.cpu_s + (proc_cpu_s(self.proc.pid) if self.proc is not None else 0.0)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.cpu_s += proc_cpu_s(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)


def pg_client_ports(pid: int) -> set[int]:
    """Local ports of the process's TCP connections to PostgreSQL (port 5432)."""
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return set()
    ports = set()
    for line in lines:
        cols = line.split()
        local, remote, inode = cols[1], cols[2], cols[9]
        if inode in inodes and remote.endswith(":1538"):  # 5432
            ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


class Cpu:
    """CPU seconds of the workers, their PostgreSQL backends (found by the workers'
    client ports) and mosquitto."""

    def __init__(self, workers: Sequence[Worker], broker_pid: int, admin: psycopg.Connection[Any]):
        self.workers = workers
        self.broker_pid = broker_pid
        self.admin = admin
        self._backends: dict[int, float] = {}  # pid -> CPU seconds at its last sighting

    def backends(self) -> float:
        ports = [p for w in self.workers if w.proc is not None for p in pg_client_ports(w.proc.pid)]
        if ports:
            rows = self.admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE client_port = ANY(%s) "
                "AND client_addr = '127.0.0.1'",
                (ports,),
            ).fetchall()
            for (pid,) in rows:
                cpu = proc_cpu_s(int(pid))
                if cpu:
                    self._backends[int(pid)] = cpu
        return sum(self._backends.values())

    def snapshot(self) -> tuple[float, float, float]:
        return sum(w.cpu() for w in self.workers), self.backends(), proc_cpu_s(self.broker_pid)


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Round:
    name: str
    published: RoundResult = field(default_factory=RoundResult)
    stored: int = 0  # readings stored during the round
    rate: float = 0.0  # readings/s between the first and the last change
    span_s: float = 0.0  # between the first and the last change
    span_readings: int = 0  # stored in that span (the CPU seconds are over it too)
    worker_cpu_s: float = 0.0
    pg_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    complete: bool = False
    samples: list[Sample] = field(default_factory=list)

    def line(self, workers: int) -> str:
        per_m = self.span_readings / 1e6 if self.span_readings else math.nan
        return (
            f"  {self.name:5} stored={self.stored:>9}, {self.span_readings} of them in "
            f"{self.span_s:6.2f} s -> "
            f"{self.rate:>9.0f} readings/s ({self.rate / workers:>8.0f} per worker)"
            f"{'' if self.complete else ' INCOMPLETE'}; cpu s: workers={self.worker_cpu_s:.1f} "
            f"pg_backends={self.pg_cpu_s:.1f} mosquitto={self.broker_cpu_s:.1f} "
            f"(workers {self.worker_cpu_s / per_m:.2f} s/M readings)"
        )


Sample = tuple[float, int, tuple[float, float, float]]  # time, readings stored, Cpu snapshot


def changes(samples: Sequence[Sample]) -> tuple[Sample, Sample] | None:
    """The first and the last sample at which the stored count had changed."""
    idx = [i for i in range(1, len(samples)) if samples[i][1] != samples[i - 1][1]]
    return (samples[idx[0]], samples[idx[-1]]) if idx else None


def watch(
    store: Store,
    cpu: Cpu,
    base: int,
    target: Callable[[], int | None],
    deadline: float,
    stall_s: float,
    poll_s: float,
) -> tuple[list[Sample], bool]:
    """Poll the stored readings (and the CPU counters) every `poll_s` until `target()`
    (None while the publishers run) is reached, nothing changed for `stall_s` after the
    publishers finished, or the deadline passed. Returns the samples and whether the
    target was reached."""
    samples: list[Sample] = []
    last_change = time.monotonic()
    while True:
        now = time.monotonic()
        n = store.counts().readings - base
        if samples and n != samples[-1][1]:
            last_change = now
        samples.append((now, n, cpu.snapshot()))
        goal = target()
        if goal is not None:
            if n >= goal:
                return samples, True
            if now - last_change > stall_s:
                return samples, False
        if now > deadline:
            return samples, False
        time.sleep(max(0.0, poll_s - (time.monotonic() - now)))


@dataclass
class Phase:
    workers: int
    live: Round
    drain: Round
    acked: int = 0
    counts: StoreCounts | None = None
    duplicates: int = 0
    connected: int = 0
    metas: int = 0

    @property
    def lost(self) -> int:
        stored = self.counts.readings if self.counts else 0
        return max(0, self.acked - stored)


def run_phase(
    n_workers: int, gens: Generators, spec: LoadSpec, args: argparse.Namespace, work: Path
) -> Phase:
    schema = f"bench_ingest_{os.getpid()}_{n_workers}w"
    db_url = f"{PG_URL}?schema={schema}"
    phase = Phase(n_workers, Round("live"), Round("drain"))
    pdir = work / f"{n_workers}w"
    pdir.mkdir()
    admin = psycopg.connect(split_url(db_url)[0], autocommit=True)
    store = open_store(db_url)  # creates the schema
    broker = Mosquitto(workdir=pdir, extra_conf=BROKER_CONF)
    broker.start()
    assert broker._proc is not None
    workers = [
        Worker(f"bench-{n_workers}w-{i}", broker.url, db_url, pdir) for i in range(n_workers)
    ]
    cpu = Cpu(workers, broker._proc.pid, admin)
    try:
        for w in workers:
            w.start()
        wait_for("workers subscribed", lambda: all(w.subscribed() for w in workers), 60)

        gens.send("connect", "127.0.0.1", broker.port)
        answers = gens.collect("connect", 120)
        phase.connected = sum(a["connected"] for a in answers)
        phase.metas = sum(a["metas_acked"] for a in answers)
        print(
            f"  {phase.connected} gateways connected, {phase.metas} retained metas acknowledged",
            flush=True,
        )
        wait_for("metas stored", lambda: store.counts().gateways >= phase.connected, 120)

        # live: the offered rate, workers subscribed
        run_round(phase.live, 0, True, gens, store, cpu, spec, args)
        if not args.keep_metas:  # a restarted worker would re-store every registry
            gens.send("clear")
            gens.collect("clear", 60)
            time.sleep(1.0)
        for w in workers:
            w.stop()

        # drain: queue a round in the broker with the workers away, then start them
        gens.send("round", 1, time.monotonic() + 0.5, False, args.ack_timeout)
        queued = gens.collect("round", args.drain_timeout)
        for res in queued:
            phase.drain.published.add(res)
        pub = phase.drain.published
        pub_s = pub.last_s - pub.first_s
        print(
            f"  queued {pub.acked_messages} batches ({pub.acked_readings} readings) in the "
            f"broker in {pub_s:.1f} s ({pub.acked_readings / max(pub_s, 1e-9):.0f} readings/s "
            f"accepted by mosquitto, no consumer)",
            flush=True,
        )
        base = store.counts().readings
        for w in workers:
            w.start()
        measure(phase.drain, store, cpu, base, lambda: pub.acked_readings, args, DRAIN_POLL_S)

        phase.acked = phase.live.published.acked_readings + pub.acked_readings
        phase.counts = store.counts()
        t = time.monotonic()
        phase.duplicates = store.duplicate_readings()
        print(f"  duplicate_readings() took {time.monotonic() - t:.1f} s", flush=True)
    finally:
        for w in workers:
            w.stop()
        gens.send("disconnect")
        try:
            gens.collect("disconnect", 60)
        finally:
            store.close()
            broker.stop()
            (pdir / "mosquitto.db").unlink(missing_ok=True)
            admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )
            admin.close()
    return phase


def run_round(
    rnd: Round,
    r: int,
    paced: bool,
    gens: Generators,
    store: Store,
    cpu: Cpu,
    spec: LoadSpec,
    args: argparse.Namespace,
) -> None:
    base = store.counts().readings
    start = time.monotonic() + 1.0
    gens.send("round", r, start, paced, args.ack_timeout)
    results: list[RoundResult] = []

    def target() -> int | None:
        if not results:
            if not gens.done():
                return None
            results.extend(gens.collect("round", 5))
            for res in results:
                rnd.published.add(res)
        return rnd.published.acked_readings

    measure(rnd, store, cpu, base, target, args)
    if not results:
        for res in gens.collect("round", args.ack_timeout + 10):
            rnd.published.add(res)
    pub = rnd.published
    offered = spec.gateways * spec.readings / spec.interval
    pub_s = pub.last_s - pub.first_s
    print(
        f"  offered {offered:.0f} readings/s ({spec.gateways} gateways x {spec.readings} "
        f"readings / {spec.interval:g} s); published {pub.sent_messages} batches, "
        f"{pub.acked_readings} readings acknowledged in {pub_s:.1f} s "
        f"({pub.acked_readings / max(pub_s, 1e-9):.0f}/s), late publishes={pub.late} "
        f"(max {pub.max_late_s:.2f} s), unacked={pub.unacked_messages}, "
        f"generator cpu={pub.cpu_s:.1f} s",
        flush=True,
    )


def measure(
    rnd: Round,
    store: Store,
    cpu: Cpu,
    base: int,
    target: Callable[[], int | None],
    args: argparse.Namespace,
    poll_s: float = POLL_S,
) -> None:
    """Sample until done; the rate and the CPU seconds are taken between the first and
    the last change of the stored count (so a worker's start-up is not counted)."""
    deadline = time.monotonic() + args.drain_timeout
    rnd.samples, rnd.complete = watch(store, cpu, base, target, deadline, args.stall, poll_s)
    rnd.stored = rnd.samples[-1][1] if rnd.samples else 0
    span = changes(rnd.samples)
    if span is None:
        return
    (t0, n0, c0), (t1, n1, c1) = span
    rnd.span_s = t1 - t0
    rnd.span_readings = n1 - n0
    rnd.rate = rnd.span_readings / rnd.span_s if rnd.span_s > 0 else 0.0
    rnd.worker_cpu_s, rnd.pg_cpu_s, rnd.broker_cpu_s = (b - a for a, b in zip(c0, c1, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--gateways", type=int, help="simulated gateways (default 2000)")
    ap.add_argument("--readings", type=int, default=300, help="readings per batch")
    ap.add_argument("--points", type=int, default=60, help="points per gateway")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between batches")
    ap.add_argument("--seconds", type=float, help="length of a round (default 15)")
    ap.add_argument("--window", type=int, default=8, help="unacknowledged publishes a gateway")
    ap.add_argument("--generators", type=int, default=0, help="processes (0: 1 per 1,000)")
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    ap.add_argument("--stall", type=float, default=20.0, help="s without progress = stalled")
    ap.add_argument("--ack-timeout", type=float, default=30.0)
    ap.add_argument(
        "--keep-metas",
        action="store_true",
        help="keep the retained metas for the drain (its restarted workers re-store them all)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 200 gateways, 3 s (unless given)"
    )
    args = ap.parse_args()
    if args.gateways is None:
        args.gateways = 200 if args.quick else 2000
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 15.0
    spec = LoadSpec(
        gateways=args.gateways,
        readings=args.readings,
        points=min(args.points, args.readings),
        interval=args.interval,
        batches=max(1, round(args.seconds / args.interval)),
        rounds=2,
        window=args.window,
        t0_ms=time.time_ns() // 1_000_000,
    )
    processes = args.generators or min(2, max(1, math.ceil(spec.gateways / 1000)))
    raise_fd_limit(spec.gateways + 1024)
    work = Path(tempfile.mkdtemp(prefix="citygw-bench-ingest-"))
    print(
        f"building {spec.gateways} gateways x {spec.batches} batches x {spec.rounds} rounds of "
        f"{spec.readings} readings in {processes} generator process(es); work dir {work}",
        flush=True,
    )
    gens = Generators(spec, processes)
    msgs = sum(r["messages"] for r in gens.ready)
    print(
        f"built {msgs} batches in {max(r['build_s'] for r in gens.ready):.1f} s, "
        f"{sum(r['payload_bytes'] for r in gens.ready) / msgs:.0f} bytes a PUBLISH "
        f"({sum(r['payload_bytes'] for r in gens.ready) / msgs / spec.readings:.2f} a reading)",
        flush=True,
    )
    phases: list[Phase] = []
    try:
        for n in (1, 2):
            print(f"phase: {n} worker(s)", flush=True)
            phase = run_phase(n, gens, spec, args, work)
            phases.append(phase)
            c = phase.counts
            for rnd in (phase.live, phase.drain):
                print(rnd.line(n), flush=True)
            print(
                f"  store: readings={c.readings if c else 0} batches={c.batches if c else 0} "
                f"duplicates_dropped={c.duplicates_dropped if c else 0} "
                f"gateways={c.gateways if c else 0}; acknowledged readings={phase.acked} "
                f"lost={phase.lost} duplicate readings={phase.duplicates}",
                flush=True,
            )
    finally:
        gens.close()
    one, two = phases
    print(
        f"ingest: gateways={spec.gateways} readings_per_s_1w={one.drain.rate:.0f} "
        f"readings_per_s_2w={two.drain.rate:.0f} lost={one.lost + two.lost} "
        f"duplicates={one.duplicates + two.duplicates}"
    )


if __name__ == "__main__":
    main()
