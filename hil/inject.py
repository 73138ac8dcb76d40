"""Faults inside the process under test: errors raised by the agent's own parts at the
place reality raises them, so that the product's own error handling runs.

    inj = FaultInjector(work / "inject")
    agent = AgentProcess(config, log, inj.extend_env(env))   # env: e.g. FakeClock.env
    inj.set_plan(Plan([Rule("buffer.ack", "full", probability=0.1, limit=20),
                       Rule("mqtt.publish", ("runtime", "value", "key"), every=50)],
                      seed=7))                                # any time, also while it runs
    ...
    inj.set_plan(None)                                        # no more faults
    for fault in inj.record(): ...                            # what was really injected

How: `extend_env` puts a private directory on the subprocess's PYTHONPATH, holding a
generated ``sitecustomize.py`` and a copy of hil/inject_site.py (standard library only;
product code never imports hil). It installs an import hook that patches
`buffer.schema.Db`, `drivers.base.Driver` and `aiomqtt.Client` when they are first
imported, then imports any other sitecustomize further down sys.path, so it coexists
with hil.faults.FakeClock's (in either order). Every patched call asks the plan, which
the subprocess re-reads when the file was replaced (checked at most every 100 ms; no
file: no faults, and a cheap clock read per call is all it costs).

Targets (a rule's `target` may be an fnmatch pattern within one family, "buffer.*"):
- ``buffer.<what>``: the buffer's SQLite transactions by the name they give
  `Db.write`/`Db.read` (spaces become "_"): ``append``, ``ack``, ``peek``,
  ``put_state``, ``stats``, ``get_state``, ``pipeline_state``, ``open``, ``close``,
  ``point_registry_update``, ...; and ``buffer.checkpoint`` (`Db.checkpoint`). Kinds
  ``io`` (SQLITE_IOERR_WRITE, or _READ in a read: "disk I/O error"), ``locked``
  (SQLITE_BUSY: "database is locked", without the 5 s busy wait), ``full``
  (SQLITE_FULL: "database or disk is full"). A real `sqlite3.OperationalError` is raised
  by the connection's `execute` of one statement, instead of running it, so the product's
  rollback and its conversion to BufferWriteError / BufferError run. `at`: ``begin``
  (the BEGIN; default for locked), ``statement`` (the first statement after BEGIN),
  ``commit`` (the COMMIT, after all the transaction's statements ran; default for full),
  ``random`` (each statement after BEGIN with odds 1/2, at the latest the COMMIT;
  default for io). Reads have no COMMIT (``commit`` means ``statement`` there) and a
  checkpoint is one statement.
- ``driver.<name>`` (the driver's `name`, e.g. ``driver.sim``): the driver's call of
  `sink.push(batch)` raises, inside the driver's own `run`. `at`: ``after`` (default:
  the batch was taken, nothing lost) or ``before`` (not taken: that poll's readings are
  lost, and the record says how many under "readings").
- ``mqtt.connect`` (`Client.__aenter__`), ``mqtt.publish``, ``mqtt.subscribe``,
  ``mqtt.messages`` (the `client.messages` iterator's next), for every aiomqtt client of
  the process (the uplink's and the mqtt driver's). `at`: ``before`` (default: nothing
  happened) or ``after`` (it happened: published and acknowledged, subscribed, the
  message taken, or connected and then left open).
  Kinds of both: ``runtime``, ``value``, ``key``, ``type`` (RuntimeError, ValueError,
  KeyError, TypeError), never an MqttError or OSError.

A rule fires on every `every`-th call of its target in its window, or with
`probability` per call; `start_s`/`stop_s` bound the window (seconds after `set_plan`),
`limit` caps its faults. The first rule that fires wins. Several kinds: one is drawn per
fault. Deterministic: the draws come from one random stream per rule, seeded with the
plan's seed and the rule's index, so the same calls get the same faults. Counters and
streams are per process and start afresh when the plan file is replaced (also by the
same plan) and when the agent restarts.

Plan file (JSON, replaced atomically): ``{"seed": 7, "rules": [{"target": "buffer.ack",
"kinds": ["full"], "probability": null, "every": 3, "from_mono": 1234.5, "until_mono":
null, "limit": 2, "at": null}]}`` with the window in CLOCK_MONOTONIC seconds, which both
processes share (libfaketime leaves it alone). The record (JSON lines, one `os.write`
each, appended before the fault is raised): t (wall clock of the subprocess), mono,
target, kind, error (the exception's text), pid, rule (index), call (the rule's call
count), where (the statement, or before/after), readings (driver faults before push).
A file-size limit on the subprocess (hil.faults.limit_file_size) applies to the record
too: a fault it keeps out of the record still fires, and says so on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil import inject_site
from hil.inject_site import EXCEPTION_KINDS, PLAN_ENV, RECORD_ENV, SQLITE_KINDS

__all__ = ["RELOAD_INTERVAL_S", "FaultInjector", "Injected", "Plan", "Rule"]

RELOAD_INTERVAL_S = inject_site.RELOAD_INTERVAL_S

_FAMILIES: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # family -> (kinds, places)
    "buffer": (frozenset(SQLITE_KINDS), frozenset({"begin", "statement", "commit", "random"})),
    "driver": (frozenset(EXCEPTION_KINDS), frozenset({"before", "after"})),
    "mqtt": (frozenset(EXCEPTION_KINDS), frozenset({"before", "after"})),
}

_SITECUSTOMIZE = '''\
"""Written by hil.inject.FaultInjector: the fault injector, then any other sitecustomize."""


def _citygw_inject():
    import os
    import sys

    try:
        import citygw_inject_site as site
    except Exception as exc:
        sys.stderr.write(f"citygw fault injector: not installed: {exc!r}\\n")
        return
    try:
        site.install()
    except Exception as exc:
        sys.stderr.write(f"citygw fault injector: not installed: {exc!r}\\n")
    site.chain_sitecustomize(os.path.dirname(os.path.abspath(__file__)))


_citygw_inject()
'''


@dataclass(frozen=True, slots=True)
class Rule:
    """Faults for one target (see the module's docstring for targets, kinds and `at`)."""

    target: str
    kind: str | Sequence[str]
    #: odds of a fault per call (0..1); or
    probability: float | None = None
    #: a fault on every N-th call in the window
    every: int | None = None
    #: the window, seconds after set_plan (None: for good)
    start_s: float = 0.0
    stop_s: float | None = None
    #: at most this many faults
    limit: int | None = None
    at: str | None = None

    def __post_init__(self) -> None:
        family = self.target.split(".", 1)[0]
        if family not in _FAMILIES or "." not in self.target:
            raise ValueError(
                f"fault target {self.target!r}: must start with one of "
                + ", ".join(f"{f}." for f in _FAMILIES)
            )
        kinds, places = _FAMILIES[family]
        bad = [k for k in self.kinds if k not in kinds]
        if not self.kinds or bad:
            raise ValueError(
                f"fault target {self.target!r}: kind {bad or list(self.kinds)} "
                f"is not one of {sorted(kinds)}"
            )
        if self.at is not None and self.at not in places:
            raise ValueError(
                f"fault target {self.target!r}: at={self.at!r} is not one of {sorted(places)}"
            )
        if (self.probability is None) == (self.every is None):
            raise ValueError(f"fault target {self.target!r}: give probability or every")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault target {self.target!r}: probability must be in [0, 1]")
        if self.every is not None and self.every < 1:
            raise ValueError(f"fault target {self.target!r}: every must be >= 1")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"fault target {self.target!r}: limit must be >= 0")
        if self.start_s < 0 or (self.stop_s is not None and self.stop_s < self.start_s):
            raise ValueError(f"fault target {self.target!r}: need 0 <= start_s <= stop_s")

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)

    def to_json(self, now_mono: float) -> dict[str, Any]:
        return {
            "target": self.target,
            "kinds": list(self.kinds),
            "probability": self.probability,
            "every": self.every,
            "from_mono": now_mono + self.start_s,
            "until_mono": None if self.stop_s is None else now_mono + self.stop_s,
            "limit": self.limit,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class Plan:
    rules: Sequence[Rule]
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Injected:
    """One fault the subprocess raised (a line of the record)."""

    t: float
    mono: float
    target: str
    kind: str
    error: str
    pid: int
    rule: int
    call: int
    where: str
    readings: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class FaultInjector:
    """Faults for a subprocess, planned by the rig while it runs (see the module).

    Files in `workdir`: ``site/`` (for PYTHONPATH), ``plan.json``, ``record.jsonl``.
    A new injector removes the plan and the record a previous one left there."""

    def __init__(self, workdir: str | Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.site_dir = self.workdir / "site"
        self.site_dir.mkdir(parents=True, exist_ok=True)
        (self.site_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        shutil.copyfile(inject_site.__file__, self.site_dir / "citygw_inject_site.py")
        self.plan_path = self.workdir / "plan.json"
        self.record_path = self.workdir / "record.jsonl"
        self.plan_path.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)
        #: the plan in force (None: none)
        self.plan: Plan | None = None

    @property
    def env(self) -> dict[str, str]:
        """The variables to add to a subprocess's environment (PYTHONPATH includes what
        os.environ has now). To combine with another tool's env, use `extend_env`."""
        return self.extend_env({})

    def extend_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """`env` plus this injector's variables, its directory first on the PYTHONPATH
        that `env` has (or else os.environ has): e.g. ``inj.extend_env(clock.env)``."""
        path = env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        parts = [str(self.site_dir), *(p for p in path.split(os.pathsep) if p)]
        return {
            **env,
            "PYTHONPATH": os.pathsep.join(parts),
            PLAN_ENV: str(self.plan_path),
            RECORD_ENV: str(self.record_path),
        }

    def set_plan(self, plan: Plan | None) -> None:
        """Replaces the plan (None: no faults from now on). A running subprocess picks it
        up within RELOAD_INTERVAL_S; windows count from now."""
        self.plan = plan
        if plan is None:
            self.plan_path.unlink(missing_ok=True)
            return
        now = time.monotonic()
        text = json.dumps({"seed": plan.seed, "rules": [r.to_json(now) for r in plan.rules]})
        tmp = self.plan_path.with_name(self.plan_path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.plan_path)

    def record(self) -> list[Injected]:
        """Every fault injected so far, oldest first (a line cut short by a kill is
        left out)."""
        try:
            text = self.record_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out: list[Injected] = []
        for line in text.splitlines():
            try:
                raw = json.loads(line)
            except ValueError:
                continue
            known = {k: raw.pop(k) for k in _RECORD_KEYS if k in raw}
            out.append(Injected(**known, extra=raw))
        return out


_RECORD_KEYS = (
    "t",
    "mono",
    "target",
    "kind",
    "error",
    "pid",
    "rule",
    "call",
    "where",
    "readings",
)
