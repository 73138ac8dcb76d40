"""The fault injector's half inside the process under test (the rig's half, and the plan
format, are in hil/inject.py).

`hil.inject.FaultInjector` copies this file as ``citygw_inject_site.py`` into a private
directory beside a generated ``sitecustomize.py`` that calls `install()`, so it runs at
the start of the subprocess. It imports only the standard library. It patches nothing
up front: an import hook patches `buffer.schema`, `drivers.base` and `aiomqtt.client`
right after each is first imported, so a process that never imports them pays nothing,
and a hook that fails to patch only prints a line to stderr.

At run time every patched call asks `draw(target)`, which costs a monotonic-clock read
while no plan is active; at most every RELOAD_INTERVAL_S it stats the plan file and
reloads it when it was replaced. A fault that fires appends one JSON line to the record
file before it is raised. Nothing here may raise into the process except the planned
faults: a bad plan file is reported on stderr and treated as no plan.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

PLAN_ENV = "CITYGW_INJECT_PLAN"
RECORD_ENV = "CITYGW_INJECT_RECORD"
#: the plan file is looked at no more often than this
RELOAD_INTERVAL_S = 0.1

#: kind -> (SQLite extended error code, its name, the message SQLite gives)
SQLITE_KINDS: dict[str, tuple[int, str, str]] = {
    "io": (778, "SQLITE_IOERR_WRITE", "disk I/O error"),
    "locked": (5, "SQLITE_BUSY", "database is locked"),
    "full": (13, "SQLITE_FULL", "database or disk is full"),
}
_IOERR_READ = (266, "SQLITE_IOERR_READ", "disk I/O error")
#: kind -> exception class, for the targets that are not the buffer's
EXCEPTION_KINDS: dict[str, type[Exception]] = {
    "runtime": RuntimeError,
    "value": ValueError,
    "key": KeyError,
    "type": TypeError,
}
#: where in a buffer transaction a fault fires, by default, per kind
SQLITE_DEFAULT_AT = {"io": "random", "locked": "begin", "full": "commit"}


def _warn(text: str) -> None:
    with contextlib.suppress(Exception):  # a closed stderr must not matter
        sys.stderr.write(f"citygw fault injector: {text}\n")
        sys.stderr.flush()


# -- the plan ---------------------------------------------------------------------------


class _Rule:
    """One rule of the plan file, with its own call counter and random stream."""

    def __init__(self, index: int, raw: dict[str, Any], seed: int) -> None:
        self.index = index
        self.pattern = str(raw["target"])
        self.kinds = tuple(str(k) for k in raw["kinds"])
        if not self.kinds:
            raise ValueError("a rule needs at least one kind")
        probability = raw.get("probability")
        self.probability = None if probability is None else float(probability)
        every = raw.get("every")
        self.every = None if every is None else int(every)
        from_mono = raw.get("from_mono")
        self.from_mono = float("-inf") if from_mono is None else float(from_mono)
        until_mono = raw.get("until_mono")
        self.until_mono = float("inf") if until_mono is None else float(until_mono)
        limit = raw.get("limit")
        self.limit = None if limit is None else int(limit)
        at = raw.get("at")
        self.at = None if at is None else str(at)
        self.rng = random.Random(f"{seed}/{index}")
        self.calls = 0
        self.injected = 0

    def fires(self, now: float) -> bool:
        """Counts a call in the window and says whether it gets a fault."""
        if not self.from_mono <= now < self.until_mono:
            return False
        if self.limit is not None and self.injected >= self.limit:
            return False
        self.calls += 1
        if self.every is not None:
            hit = self.calls % self.every == 0
        else:
            hit = self.probability is not None and self.rng.random() < self.probability
        if hit:
            self.injected += 1
        return hit


class Fault:
    """A fault drawn for one call; `fire` records it and returns the exception."""

    def __init__(self, injector: Injector, rule: _Rule, target: str) -> None:
        self.injector = injector
        self.target = target
        self.rule = rule.index
        self.call = rule.calls
        self.kind = rule.kinds[0] if len(rule.kinds) == 1 else rule.rng.choice(rule.kinds)
        self.at = rule.at
        self._rng = rule.rng

    def coin(self) -> bool:
        with self.injector.lock:
            return self._rng.random() < 0.5

    def choice(self, options: tuple[str, ...]) -> str:
        with self.injector.lock:
            return self._rng.choice(options)

    def exception(self) -> Exception:
        cls = EXCEPTION_KINDS.get(self.kind, RuntimeError)
        return cls(f"injected {self.kind} fault: {self.target} (call {self.call})")

    def fire(self, exc: BaseException, where: str, **extra: Any) -> BaseException:
        self.injector.note(self, exc, where, extra)
        return exc


class Injector:
    """Reads the plan file (when it changes), draws faults, appends to the record."""

    def __init__(self, plan_path: str, record_path: str) -> None:
        self.plan_path = plan_path
        self.record_path = record_path
        self.lock = threading.Lock()
        self._next_check = 0.0
        self._stamp: tuple[int, int, int] | None = None
        self._rules: tuple[_Rule, ...] = ()
        self._by_target: dict[str, tuple[_Rule, ...]] = {}

    def draw(self, target: str) -> Fault | None:
        """A fault for this call of `target`, or None (nearly always)."""
        now = time.monotonic()
        if now >= self._next_check:
            self._refresh(now)
        if not self._rules:
            return None
        with self.lock:
            rules = self._by_target.get(target)
            if rules is None:
                rules = tuple(r for r in self._rules if fnmatch.fnmatchcase(target, r.pattern))
                self._by_target[target] = rules
            for rule in rules:
                if rule.fires(now):
                    return Fault(self, rule, target)
        return None

    def _refresh(self, now: float) -> None:
        with self.lock:
            if now < self._next_check:
                return
            self._next_check = now + RELOAD_INTERVAL_S
            try:
                st = os.stat(self.plan_path)
            except OSError:
                self._load(None, ())
                return
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            try:
                with open(self.plan_path, "rb") as f:
                    plan = json.loads(f.read())
                seed = int(plan.get("seed", 0))
                rules = tuple(_Rule(i, r, seed) for i, r in enumerate(plan["rules"]))
            except Exception as exc:
                _warn(f"plan {self.plan_path} ignored: {type(exc).__name__}: {exc}")
                rules = ()
            self._load(stamp, rules)

    def _load(self, stamp: tuple[int, int, int] | None, rules: tuple[_Rule, ...]) -> None:
        self._stamp = stamp
        self._rules = rules
        self._by_target = {}

    def note(self, fault: Fault, exc: BaseException, where: str, extra: dict[str, Any]) -> None:
        entry = {
            "t": time.time(),
            "mono": time.monotonic(),
            "target": fault.target,
            "kind": fault.kind,
            "error": str(exc),
            "pid": os.getpid(),
            "rule": fault.rule,
            "call": fault.call,
            "where": where,
            **extra,
        }
        try:
            line = (json.dumps(entry) + "\n").encode()
            fd = os.open(self.record_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except Exception as err:  # e.g. a file-size limit the rig set: the fault still fires
            _warn(f"could not record a fault in {self.record_path}: {err!r}")


_injector: Injector | None = None


def draw(target: str) -> Fault | None:
    return None if _injector is None else _injector.draw(target)


# -- the buffer: SQLite errors inside its transactions ----------------------------------

_pending = threading.local()


class _SqlFault:
    """A Fault bound to one buffer operation: where in it the SQLite error comes."""

    def __init__(self, fault: Fault, op: str) -> None:
        self.fault = fault
        self.op = op  # "write", "read" or "checkpoint"
        at = fault.at or SQLITE_DEFAULT_AT.get(fault.kind, "statement")
        if op == "checkpoint":
            at = "statement"  # one statement, no BEGIN/COMMIT
        elif op == "read" and at == "commit":
            at = "statement"  # a read ends with ROLLBACK, never COMMIT
        elif op == "read" and at == "random":
            at = fault.choice(("begin", "statement"))
        self.at = at

    def error(self, sql: str) -> BaseException:
        import sqlite3

        code, name, message = SQLITE_KINDS.get(self.fault.kind, SQLITE_KINDS["io"])
        if self.fault.kind == "io" and self.op == "read":
            code, name, message = _IOERR_READ
        exc = sqlite3.OperationalError(message)
        exc.sqlite_errorcode = code
        exc.sqlite_errorname = name
        return self.fault.fire(exc, " ".join(sql.split())[:40])


class _Conn:
    """The Db's connection for one operation that gets a fault: the statement chosen
    raises instead of running; every other attribute is the real connection's."""

    def __init__(self, conn: Any, fault: _SqlFault) -> None:
        self._conn = conn
        self._fault: _SqlFault | None = fault
        self._begun = fault.op == "checkpoint"

    def _check(self, sql: str) -> None:
        fault = self._fault
        if fault is None:
            return
        head = sql.lstrip()[:8].upper()
        if head.startswith("ROLLBACK"):
            return
        if head.startswith("BEGIN"):
            self._begun = True
            fire = fault.at == "begin"
        elif not self._begun:
            return  # e.g. a PRAGMA before the transaction
        elif head.startswith(("COMMIT", "END")):
            fire = True  # the last chance: "statement"/"random" end here at the latest
        elif fault.at == "statement":
            fire = True
        elif fault.at == "random":
            fire = fault.fault.coin()
        else:
            fire = False
        if fire:
            self._fault = None
            raise fault.error(sql)

    def execute(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        self._check(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


class _Armed:
    """Wraps Db.write()/read()'s context manager so that the connection it takes from
    Db._live() is a _Conn."""

    def __init__(self, cm: Any, fault: _SqlFault) -> None:
        self._cm = cm
        self._fault = fault

    def __enter__(self) -> Any:
        _pending.fault = self._fault
        try:
            return self._cm.__enter__()
        finally:
            _pending.fault = None

    def __exit__(self, *exc_info: Any) -> Any:
        return self._cm.__exit__(*exc_info)


def _op_name(what: Any) -> str:
    return "buffer." + str(what).replace(" ", "_")


def patch_buffer(mod: ModuleType) -> None:
    db = mod.Db
    orig_write, orig_read = db.write, db.read
    orig_checkpoint, orig_live = db.checkpoint, db._live

    @functools.wraps(orig_live)
    def _live(self: Any) -> Any:
        conn = orig_live(self)
        fault = getattr(_pending, "fault", None)
        if fault is None:
            return conn
        _pending.fault = None
        return _Conn(conn, fault)

    def _transaction(orig: Callable[..., Any], op: str) -> Callable[..., Any]:
        @functools.wraps(orig)
        def wrapper(self: Any, what: str, *args: Any, **kwargs: Any) -> Any:
            fault = draw(_op_name(what))
            cm = orig(self, what, *args, **kwargs)
            return cm if fault is None else _Armed(cm, _SqlFault(fault, op))

        return wrapper

    @functools.wraps(orig_checkpoint)
    def checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        fault = draw("buffer.checkpoint")
        if fault is None:
            return orig_checkpoint(self, *args, **kwargs)
        _pending.fault = _SqlFault(fault, "checkpoint")
        try:
            return orig_checkpoint(self, *args, **kwargs)
        finally:
            _pending.fault = None

    db._live = _live
    db.write = _transaction(orig_write, "write")
    db.read = _transaction(orig_read, "read")
    db.checkpoint = checkpoint


# -- drivers: the driver's call of sink.push raises --------------------------------------


class _Sink:
    def __init__(self, inner: Any, target: str) -> None:
        self._inner = inner
        self._target = target

    def push(self, batch: Any) -> Any:
        fault = draw(self._target)
        if fault is None:
            return self._inner.push(batch)
        if fault.at == "before":
            try:
                readings = len(batch)
            except Exception:
                readings = None
            raise fault.fire(fault.exception(), "before push", readings=readings)
        self._inner.push(batch)
        raise fault.fire(fault.exception(), "after push")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _wrap_run(run: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run)
    async def wrapped(self: Any, sink: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(sink, _Sink):
            name = getattr(self, "name", None) or type(self).__name__
            sink = _Sink(sink, f"driver.{name}")
        return await run(self, sink, *args, **kwargs)

    wrapped._citygw_inject = True  # type: ignore[attr-defined]
    return wrapped


def patch_drivers(mod: ModuleType) -> None:
    import inspect

    driver = mod.Driver
    own = driver.__dict__.get("__init_subclass__")

    def wrap(cls: type) -> None:
        run = cls.__dict__.get("run")
        if inspect.iscoroutinefunction(run) and not getattr(run, "_citygw_inject", False):
            cls.run = _wrap_run(run)  # type: ignore[attr-defined]

    def __init_subclass__(cls: type, /, **kwargs: Any) -> None:
        if own is not None:
            own.__func__(cls, **kwargs)
        else:
            super(driver, cls).__init_subclass__(**kwargs)
        wrap(cls)

    driver.__init_subclass__ = classmethod(__init_subclass__)
    # the base classes defined beside Driver (PerDeviceDriver: the sim, modbus and mcu
    # drivers inherit its run) exist already
    todo = list(driver.__subclasses__())
    while todo:
        cls = todo.pop()
        wrap(cls)
        todo += cls.__subclasses__()


# -- aiomqtt: an exception that is neither MqttError nor OSError -------------------------


def _wrap_async(orig: Callable[..., Any], target: str) -> Callable[..., Any]:
    @functools.wraps(orig)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        fault = draw(target)
        if fault is None:
            return await orig(*args, **kwargs)
        if fault.at == "after":
            await orig(*args, **kwargs)
            raise fault.fire(fault.exception(), "after")
        raise fault.fire(fault.exception(), "before")

    return wrapped


_CLIENT_TARGETS = {
    "publish": "mqtt.publish",
    "subscribe": "mqtt.subscribe",
    "__aenter__": "mqtt.connect",
}


def patch_aiomqtt(mod: ModuleType) -> None:
    client = mod.Client
    for method, target in _CLIENT_TARGETS.items():
        setattr(client, method, _wrap_async(getattr(client, method), target))
    own = client.__dict__.get("__init_subclass__")

    def __init_subclass__(cls: type, /, **kwargs: Any) -> None:
        # a subclass that overrides one of them (citygw's MqttClient.publish) is wrapped
        # too, or its calls would never reach the wrapped base method
        if own is not None:
            own.__func__(cls, **kwargs)
        else:
            super(client, cls).__init_subclass__(**kwargs)
        for method, target in _CLIENT_TARGETS.items():
            if method in cls.__dict__:
                setattr(cls, method, _wrap_async(cls.__dict__[method], target))

    client.__init_subclass__ = classmethod(__init_subclass__)
    iterator = mod.MessagesIterator
    iterator.__anext__ = _wrap_async(iterator.__anext__, "mqtt.messages")


# -- installation -----------------------------------------------------------------------

PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "buffer.schema": patch_buffer,
    "drivers.base": patch_drivers,
    "aiomqtt.client": patch_aiomqtt,
}
#: the modules patched in this process
patched: list[str] = []


def _apply(name: str, module: ModuleType) -> None:
    try:
        PATCHES[name](module)
    except Exception as exc:
        _warn(f"could not patch {name}: {type(exc).__name__}: {exc}")
    else:
        patched.append(name)


class _Loader:
    """The real loader, plus the patch once the module has run."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _apply(self._name, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _Finder:
    """A meta path finder that only wraps the loader of the modules in PATCHES."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, name)
        return spec


def install() -> None:
    """Called by the generated sitecustomize: active if $CITYGW_INJECT_PLAN is set."""
    global _injector
    plan = os.environ.get(PLAN_ENV)
    if not plan or _injector is not None:
        return
    _injector = Injector(plan, os.environ.get(RECORD_ENV) or plan + ".record")
    for name in PATCHES:
        module = sys.modules.get(name)
        if module is not None:
            _apply(name, module)
    sys.meta_path.insert(0, _Finder())


def chain_sitecustomize(here: str) -> None:
    """Imports the next sitecustomize on sys.path after the one in `here` (another
    tool's, e.g. hil.faults.FakeClock's, or the interpreter's own)."""
    import importlib

    here = os.path.abspath(here)
    me = sys.modules.pop("sitecustomize", None)
    saved = sys.path[:]
    sys.path[:] = [p for p in saved if os.path.abspath(p or ".") != here]
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        if me is not None:
            sys.modules["sitecustomize"] = me
    finally:
        sys.path[:] = saved
