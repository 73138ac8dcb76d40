"""hil/inject.py: faults raised inside a subprocess's own parts (the buffer's SQLite
transactions, a driver, the aiomqtt client) as a plan says, changed while it runs, and
recorded exactly.

The subprocess is a small worker (not the agent) that takes one JSON command per line on
stdin and answers one JSON line: the product's result, or the exception it raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from common.broker import Mosquitto
from hil.faults import FakeClock, find_libfaketime
from hil.inject import RELOAD_INTERVAL_S, FaultInjector, Plan, Rule

ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 30.0

_WORKER = r"""
import asyncio, json, sys, time

from buffer import Buffer, Lane

buf = None


def patched():
    mod = sys.modules.get("citygw_inject_site")
    return None if mod is None else sorted(mod.patched)


def driver(n, name):
    from drivers.base import Driver
    from native.batch import Batch

    class Sink:
        def __init__(self):
            self.batches = []

        def push(self, batch):
            self.batches.append(len(batch))
            return True

    class Pusher(Driver):
        async def run(self, sink):
            for i in range(n):
                sink.push(Batch.at(1000 + i, [1, 2], [1.0, 2.0]))

    Pusher.name = name
    sink = Sink()
    try:
        asyncio.run(Pusher([]).run(sink))
        error = None
    except Exception as exc:
        error = [type(exc).__name__, str(exc)]
    return {"pushed": len(sink.batches), "error": error}


def mqtt(port, n):
    import aiomqtt

    steps = []

    async def step(name, coro):
        try:
            result = await coro
            steps.append([name, "ok"])
            return True, result
        except Exception as exc:
            steps.append([name, type(exc).__name__, isinstance(exc, (aiomqtt.MqttError, OSError))])
            return False, None

    async def until_ok(name, make):
        for _ in range(10):
            ok, result = await step(name, make())
            if ok:
                return result
        raise RuntimeError(f"{name} never worked")

    async def session():
        client = aiomqtt.Client("127.0.0.1", port, identifier="inject-test")
        await until_ok("connect", client.__aenter__)
        try:
            await until_ok("subscribe", lambda: client.subscribe("t/#", qos=1))
            for i in range(n):
                await step("publish", client.publish("t/x", str(i).encode(), qos=1))
            # the last message, sent until it is: the end of what comes back
            await until_ok("end", lambda: client.publish("t/x", b"end", qos=1))
            got = []
            it = client.messages
            while True:
                ok, msg = await step("messages", asyncio.wait_for(it.__anext__(), 10))
                if ok and msg.payload == b"end":
                    return got
                if ok:
                    got.append(msg.payload.decode())
                elif steps[-1][1] == "TimeoutError":
                    return got
        finally:
            await client.__aexit__(None, None, None)

    got = asyncio.run(session())
    return {"steps": steps, "got": got}


def run(cmd):
    global buf
    op = cmd["op"]
    if op == "open":
        buf = Buffer(cmd["path"], 1_000_000)
        return None
    if op == "append":
        return buf.append(Lane.TELEMETRY, b"x" * 10, cmd.get("n", 5))
    if op == "ack":
        return buf.ack(cmd["seqs"])
    if op == "peek":
        return [m.seq for m in buf.peek(100)]
    if op == "put_state":
        return buf.put_state(cmd["key"], cmd["value"])
    if op == "get_state":
        return buf.get_state()
    if op == "checkpoint":
        return buf.checkpoint()
    if op == "stats":
        s = buf.stats()
        return {
            "messages": sum(ls.messages for ls in s.lanes.values()),
            "appended": s.appended_points,
            "acked": s.acked_points,
        }
    if op == "patched":
        return patched()
    if op == "time":
        t = time.time()
        time.sleep(0.01)
        return t
    if op == "driver":
        return driver(cmd["n"], cmd["name"])
    if op == "mqtt":
        return mqtt(cmd["port"], cmd["n"])
    raise ValueError(f"unknown op {op}")


for line in sys.stdin:
    cmd = json.loads(line)
    try:
        out = {"ok": run(cmd)}
    except Exception as exc:
        out = {"error": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
               "message": str(exc)}
    print(json.dumps(out), flush=True)
"""


class Worker:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __call__(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            pytest.fail(f"worker died: {self.proc.communicate(timeout=WAIT_S)[1]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ok(self, op: str, **args: Any) -> Any:
        answer = self(op, **args)
        assert "ok" in answer, (op, answer)
        return answer["ok"]

    def close(self) -> str:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=WAIT_S)
        err = self.proc.stderr.read()
        assert code == 0, err
        return err


@pytest.fixture
def inj(tmp_path: Path) -> FaultInjector:
    return FaultInjector(tmp_path / "inject")


@pytest.fixture
def worker(inj: FaultInjector, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(inj.env)
    try:
        w.ok("open", path=str(tmp_path / "buffer.db"))
        yield w
    finally:
        if w.proc.poll() is None:
            w.close()


def settle() -> None:
    """Past the subprocess's next look at the plan file."""
    time.sleep(RELOAD_INTERVAL_S * 1.5)


def test_ack_on_a_full_disk_fails_whole_and_is_recorded_exactly(
    inj: FaultInjector, worker: Worker
) -> None:
    seqs = [worker.ok("append", n=5) for _ in range(3)]
    inj.set_plan(Plan([Rule("buffer.ack", "full", every=1, limit=2)]))
    settle()
    for _ in range(2):
        answer = worker("ack", seqs=[seqs[0]])
        assert answer["error"] == "BufferWriteError", answer
        assert "ack failed: SQLITE_FULL: database or disk is full" in answer["message"]
        # rolled back: the DELETE and the counter ran before the COMMIT that failed
        assert worker.ok("peek") == seqs
        assert worker.ok("stats") == {"messages": 3, "appended": 15, "acked": 0}
    # the limit is reached: the same ack now goes through
    assert worker.ok("ack", seqs=[seqs[0]]) == 5
    assert worker.ok("peek") == seqs[1:]

    record = inj.record()
    assert [(r.target, r.kind, r.error, r.where, r.pid) for r in record] == [
        ("buffer.ack", "full", "database or disk is full", "COMMIT", worker.proc.pid)
    ] * 2
    assert [r.call for r in record] == [1, 2]

    inj.set_plan(None)
    settle()
    assert worker.ok("ack", seqs=seqs[1:]) == 10
    assert worker.ok("append", n=5) == seqs[-1] + 1  # the failed transactions used no seq
    assert worker.ok("stats") == {"messages": 1, "appended": 20, "acked": 15}
    assert len(inj.record()) == 2


@pytest.mark.parametrize(
    ("kind", "errorname", "message"),
    [
        ("io", "SQLITE_IOERR_WRITE", "disk I/O error"),
        ("locked", "SQLITE_BUSY", "database is locked"),
        ("full", "SQLITE_FULL", "database or disk is full"),
    ],
)
def test_every_buffer_operation_fails_as_sqlite_would(
    inj: FaultInjector, worker: Worker, kind: str, errorname: str, message: str
) -> None:
    seq = worker.ok("append")
    worker.ok("put_state", key="k", value=1)
    ops: list[tuple[str, dict[str, Any], str]] = [
        ("append", {}, "BufferWriteError"),
        ("ack", {"seqs": [seq]}, "BufferWriteError"),
        ("put_state", {"key": "k", "value": 2}, "BufferWriteError"),
        ("checkpoint", {}, "BufferWriteError"),
        ("peek", {}, "BufferError"),
        ("stats", {}, "BufferError"),
    ]
    inj.set_plan(Plan([Rule(f"buffer.{op}", kind, every=1, limit=1) for op, _, _ in ops]))
    settle()
    for op, args, error in ops:
        answer = worker(op, **args)
        assert answer.get("error") == error, (op, answer)
        if op in ("peek", "stats") and kind == "io":
            assert "SQLITE_IOERR_READ: disk I/O error" in answer["message"]
        else:
            assert f"{errorname}: {message}" in answer["message"], (op, answer)
        assert "BufferError" in answer["mro"]
    # each once (limit=1), and nothing of the failed writes is in the buffer
    assert worker.ok("peek") == [seq]
    assert worker.ok("get_state") == {"k": 1}
    assert worker.ok("stats") == {"messages": 1, "appended": 5, "acked": 0}
    worker.ok("checkpoint")
    assert worker.ok("append") == seq + 1
    record = inj.record()
    assert [r.target for r in record] == [f"buffer.{op}" for op, _, _ in ops]
    assert {r.kind for r in record} == {kind}
    if kind == "locked":
        assert {r.where for r in record if r.target != "buffer.checkpoint"} <= {
            "BEGIN IMMEDIATE",
            "BEGIN",
        }


def test_draws_are_deterministic_per_seed_and_bounded_by_window_and_limit(
    tmp_path: Path,
) -> None:
    def failures(seed: int, name: str) -> list[int]:
        inj = FaultInjector(tmp_path / name)
        inj.set_plan(Plan([Rule("buffer.put_state", ("io", "full"), probability=0.5)], seed))
        w = Worker(inj.env)
        try:
            w.ok("open", path=str(tmp_path / f"{name}.db"))
            failed = [i for i in range(40) if "error" in w("put_state", key="k", value=i)]
            # a window that has not begun, and a spent limit: nothing more
            inj.set_plan(
                Plan(
                    [
                        Rule("buffer.*", "io", every=1, start_s=3600),
                        Rule("buffer.*", "io", every=1, limit=0),
                    ]
                )
            )
            settle()
            assert all("ok" in w("put_state", key="k", value=i) for i in range(10))
            assert w.ok("get_state") == {"k": 9}
        finally:
            w.close()
        record = inj.record()
        assert len(record) == len(failed)
        assert {r.kind for r in record} == {"io", "full"}
        return failed

    first = failures(7, "a")
    assert 5 < len(first) < 35
    assert failures(7, "b") == first
    assert failures(8, "c") != first


@pytest.mark.parametrize(("at", "pushed"), [("after", 3), ("before", 2)])
def test_a_driver_raises_from_its_own_run(inj: FaultInjector, at: str, pushed: int) -> None:
    inj.set_plan(Plan([Rule("driver.pusher", "runtime", every=3, at=at)]))
    w = Worker(inj.env)
    try:
        assert w.ok("driver", n=10, name="other") == {"pushed": 10, "error": None}
        result = w.ok("driver", n=10, name="pusher")
    finally:
        w.close()
    assert result["pushed"] == pushed
    assert result["error"][0] == "RuntimeError"
    assert "injected runtime fault: driver.pusher (call 3)" in result["error"][1]
    [fault] = inj.record()
    assert (fault.target, fault.where) == ("driver.pusher", f"{at} push")
    assert fault.readings == (2 if at == "before" else None)


def test_the_mqtt_client_raises_what_no_handler_expects(
    inj: FaultInjector, mosquitto: Mosquitto
) -> None:
    inj.set_plan(
        Plan(
            [
                Rule("mqtt.connect", "key", every=1, limit=1),
                Rule("mqtt.subscribe", "type", every=1, limit=1),
                Rule("mqtt.publish", "value", every=2),
                Rule("mqtt.messages", "runtime", every=1, limit=1),
            ]
        )
    )
    w = Worker(inj.env)
    try:
        result = w.ok("mqtt", port=mosquitto.port, n=3)
    finally:
        w.close()
    # the third element: is it an MqttError or OSError (what the uplink handles)?
    assert result["steps"] == [
        ["connect", "KeyError", False],
        ["connect", "ok"],
        ["subscribe", "TypeError", False],
        ["subscribe", "ok"],
        ["publish", "ok"],
        ["publish", "ValueError", False],
        ["publish", "ok"],
        ["end", "ValueError", False],
        ["end", "ok"],
        ["messages", "RuntimeError", False],
        ["messages", "ok"],
        ["messages", "ok"],
        ["messages", "ok"],
    ]
    # nothing was lost to a fault raised before the call did anything
    assert result["got"] == ["0", "2"]
    assert [(r.target, r.kind, r.where) for r in inj.record()] == [
        ("mqtt.connect", "key", "before"),
        ("mqtt.subscribe", "type", "before"),
        ("mqtt.publish", "value", "before"),
        ("mqtt.publish", "value", "before"),
        ("mqtt.messages", "runtime", "before"),
    ]


def test_a_message_taken_and_then_an_exception(inj: FaultInjector, mosquitto: Mosquitto) -> None:
    inj.set_plan(Plan([Rule("mqtt.messages", "runtime", every=2, at="after")]))
    w = Worker(inj.env)
    try:
        result = w.ok("mqtt", port=mosquitto.port, n=4)
    finally:
        w.close()
    # the second and fourth messages were taken off the queue, then the iterator raised:
    # they are gone
    assert result["got"] == ["0", "2"]
    assert [s for s in result["steps"] if s[0] == "messages"] == [
        ["messages", "ok"],
        ["messages", "RuntimeError", False],
    ] * 2 + [["messages", "ok"]]
    assert [(r.target, r.where) for r in inj.record()] == [("mqtt.messages", "after")] * 2


def test_without_a_plan_nothing_is_injected(inj: FaultInjector, worker: Worker) -> None:
    # the hooks are in place (so this test could see a fault) ...
    assert worker.ok("patched") == ["buffer.schema"]
    seqs = [worker.ok("append") for _ in range(20)]
    for _ in range(20):
        worker.ok("put_state", key="k", value=1)
        worker.ok("checkpoint")
        assert worker.ok("peek") == seqs
    assert worker.ok("driver", n=5, name="sim") == {"pushed": 5, "error": None}
    assert worker.ok("ack", seqs=seqs) == 100
    assert worker.close() == ""
    assert inj.record() == []
    assert not inj.record_path.exists()


def test_a_broken_plan_file_is_no_plan(inj: FaultInjector, worker: Worker) -> None:
    inj.plan_path.write_text('{"rules": [{"target": "buffer.ack"')
    settle()
    seq = worker.ok("append")
    assert worker.ok("ack", seqs=[seq]) == 5
    inj.set_plan(Plan([Rule("buffer.append", "io", every=1)]))
    settle()
    assert worker("append")["error"] == "BufferWriteError"
    err = worker.close()
    assert "citygw fault injector: plan" in err and "ignored" in err
    assert len(inj.record()) == 1


def test_rules_are_checked_in_the_rig() -> None:
    for bad in (
        {"target": "ack", "kind": "full", "every": 1},
        {"target": "buffer.ack", "kind": "value", "every": 1},
        {"target": "mqtt.publish", "kind": "full", "every": 1},
        {"target": "buffer.ack", "kind": "full"},
        {"target": "buffer.ack", "kind": "full", "every": 1, "probability": 0.5},
        {"target": "buffer.ack", "kind": "full", "probability": 1.5},
        {"target": "buffer.ack", "kind": "full", "every": 1, "at": "after"},
        {"target": "driver.sim", "kind": "runtime", "every": 1, "at": "commit"},
        {"target": "buffer.ack", "kind": "full", "every": 1, "start_s": 5, "stop_s": 1},
        {"target": "buffer.ack", "kind": [], "every": 1},
    ):
        with pytest.raises(ValueError, match="fault target"):
            Rule(**bad)


@pytest.mark.parametrize("first", ["inject", "faketime"])
def test_coexists_with_the_fake_clock(inj: FaultInjector, tmp_path: Path, first: str) -> None:
    if find_libfaketime() is None:
        pytest.fail("libfaketime is not installed (Debian: apt-get install faketime)")
    clock = FakeClock(tmp_path / "clock")
    assert clock.site_dir is not None
    if first == "inject":
        env = inj.extend_env(clock.env)
    else:
        env = inj.env
        env.update(clock.env)
        env["PYTHONPATH"] = os.pathsep.join([str(clock.site_dir), inj.env["PYTHONPATH"]])
    paths = env["PYTHONPATH"].split(os.pathsep)
    assert {str(inj.site_dir), str(clock.site_dir)} <= set(paths)
    inj.set_plan(Plan([Rule("buffer.put_state", "locked", every=1)]))
    clock.step(-3600)
    w = Worker(env)
    try:
        w.ok("open", path=str(tmp_path / "buffer.db"))
        # FakeClock's sitecustomize ran (time.sleep works under libfaketime) ...
        assert w.ok("time") < time.time() - 3000
        # ... and so did the injector's
        assert "SQLITE_BUSY: database is locked" in w("put_state", key="k", value=1)["message"]
    finally:
        w.close()
        clock.step(0)
    assert len(inj.record()) == 1
