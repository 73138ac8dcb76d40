"""A config pushed from the platform (`config_push`, agent/commands.py): tried, kept only
if the uplink is healthy again within the command's deadline, else rolled back by the
gateway itself, so a config that cuts the gateway off never strands it.

The trial, for the running config file `<path>`:

1. the pushed text is validated as the file would be (parse_config, relative paths
   against `<path>`'s folder); invalid, or another gateway.id: answered `refused`;
2. `<path>.previous` gets the running config, `<path>.trial` (the marker) says which
   command is on trial, until when (wall clock) and which hashes it moves between,
   then the new text replaces `<path>`; each write atomic (temp file, fsync, rename,
   fsync of the folder);
3. `Agent.reload(new)`; a config it cannot apply live (ReloadRefused) puts the old file
   back: `refused`;
4. healthy = the uplink online and a PUBACK after the apply (UplinkStatus.healthy_since),
   within the deadline: `applied`, marker removed; else the previous file is restored
   and reloaded, and `rolled_back` goes out through the old (working) uplink.

The marker makes a trial survive a restart (power cut, crash, a config that crashes the
agent): before the config is loaded, `settle_interrupted` rolls back a trial whose
deadline has passed or whose config no longer loads; at start `ConfigPushes.resume`
continues a trial still within its deadline with the time left, or sends the answer a
settled one still owes. The wall clock may step at boot (an RTC that lost its time), so
the time left is never more than the command's own deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from agent.commands import CONFIG_PUSH, CommandRefused, ConfigPushCommand, response
from agent.config import ConfigError, load_config, parse_config
from agent.reload import ReloadRefused

if TYPE_CHECKING:
    from agent.runtime import Agent

log = logging.getLogger("citygw.config_push")

#: how often the trial looks at the uplink's health
HEALTH_POLL_S = 0.2
APPLIED, REFUSED, ROLLED_BACK = "applied", "refused", "rolled_back"


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".previous")


def trial_path(path: Path) -> Path:
    return path.with_name(path.name + ".trial")


def text_hash(data: bytes) -> str:
    """As Config.hash: ``sha256:<hex>`` of the file's bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, whatever happens when: temp file,
    fsync, rename, fsync of the folder. The mode of the file it replaces is kept (a
    config holding a password is 0600)."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # the umask may have taken bits away
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_durably(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(slots=True)
class Trial:
    """The marker `<path>.trial`: a config push not yet settled."""

    id: str  # the command's
    deadline: float  # time.time() by which the uplink must be healthy
    deadline_s: float  # the command's own deadline (bounds the time left after a restart)
    hash: str  # the pushed config's
    previous_hash: str  # the config it replaced
    outcome: str | None = None  # set when settled before the agent started (rolled_back)
    error: str | None = None

    def save(self, path: Path) -> None:
        write_atomic(trial_path(path), orjson.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> Trial | None:
        """The marker next to config `path`; None if there is none. An unreadable one
        (cut short by a crash before its rename cannot happen; edited by hand can) is
        logged and ignored."""
        marker = trial_path(path)
        try:
            return Trial(**orjson.loads(marker.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError, TypeError) as exc:
            log.error(
                "config trial marker unreadable, ignored",
                extra={"marker": str(marker), "error": str(exc)},
            )
            return None


def settle_interrupted(path: Path) -> Trial | None:
    """Before the agent loads `path`: a trial a restart interrupted (the marker names the
    file's config) whose deadline has passed, or whose config no longer loads, is rolled
    back now, before the config can cut the gateway off again; the marker then holds the
    answer the agent sends once it is up. Returns the marker, if any."""
    trial = Trial.load(path)
    if trial is None or trial.outcome is not None:
        return trial
    try:
        current = text_hash(path.read_bytes())
    except OSError:
        current = ""
    if current != trial.hash:
        return trial  # the new config never replaced the old one: `resume` answers
    error: str | None = None
    if time.time() >= trial.deadline:
        error = "the gateway restarted during the trial and its deadline passed"
    else:
        try:
            load_config(path)
        except (OSError, ConfigError) as exc:
            error = (
                "the gateway restarted during the trial and the pushed config no longer "
                f"loads: {exc}"
            )
    if error is None:
        return trial
    try:
        previous = previous_path(path).read_bytes()
    except OSError as exc:  # removed by hand: the pushed config is all there is
        log.error(
            "config push cannot be rolled back: the previous config is gone; the pushed one stays",
            extra={"id": trial.id, "previous": str(previous_path(path)), "error": str(exc)},
        )
        remove_durably(trial_path(path))
        return None
    write_atomic(path, previous)
    trial.outcome, trial.error = ROLLED_BACK, error
    trial.save(path)
    log.warning("config push rolled back before start", extra={"id": trial.id, "error": error})
    return trial


class ConfigPushes:
    """The agent's config pushes: one on trial at a time."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        source = Path(agent.config.source)
        #: the running config's file; None if the agent was started from text
        self.path: Path | None = source.resolve() if source.is_file() else None
        self._task: asyncio.Task[None] | None = None
        self._running_id = ""

    def start(self, cmd: ConfigPushCommand) -> bytes | None:
        """Starts the trial as a task (its answer comes through the uplink when it is
        over), or the refusal now."""
        if self.path is None:
            return self._refuse(
                cmd.id, "this agent's config has no file to write (it was started from text)"
            )
        if self._task is not None and not self._task.done():
            return self._refuse(
                cmd.id, f"a config push is already on trial (command {self._running_id!r})"
            )
        self._begin(cmd.id, self._push(cmd, self.path))
        return None

    def resume(self) -> None:
        """At start: answers a trial settled before start, or continues one a restart
        interrupted with the time it has left (see the module's doc)."""
        if self.path is None or (trial := Trial.load(self.path)) is None:
            return
        path = self.path
        if trial.outcome is not None:
            self._answer(trial.id, trial.error, {"outcome": trial.outcome, **self._identity()})
            remove_durably(trial_path(path))
        elif self.agent.config.hash == trial.hash:
            left = min(trial.deadline - time.time(), trial.deadline_s)
            log.warning(
                "config push trial resumed after a restart",
                extra={"id": trial.id, "left_s": round(left, 1)},
            )
            self._begin(trial.id, self._trial(trial, path, max(left, 0.0), None))
        elif self.agent.config.hash == trial.previous_hash:
            error = "the gateway restarted before the pushed config was applied"
            self._answer(trial.id, error, {"outcome": ROLLED_BACK, **self._identity()})
            remove_durably(trial_path(path))
        else:
            log.warning(
                "config trial marker names neither the running config nor the previous one "
                "(the file was changed by hand?); marker removed",
                extra={"id": trial.id, "marker": str(trial_path(path))},
            )
            remove_durably(trial_path(path))

    async def stop(self) -> None:
        """Cancels a trial (the agent stops): its marker stays, the next start resumes it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def _begin(self, cid: str, work: Any) -> None:
        self._running_id = cid
        self._task = asyncio.create_task(work, name="config-push")

    async def _push(self, cmd: ConfigPushCommand, path: Path) -> None:
        old = self.agent.config
        try:
            new = parse_config(cmd.config, source=str(path), base_dir=path.parent)
        except ConfigError as exc:
            self._answer(cmd.id, str(exc), {"outcome": REFUSED})
            return
        if new.gateway.id != old.gateway.id:
            error = (
                f"the pushed config's gateway.id {new.gateway.id!r} is not this gateway's "
                f"({old.gateway.id!r}); a gateway's identity is not changed by a push"
            )
            self._answer(cmd.id, error, {"outcome": REFUSED})
            return
        previous = await asyncio.to_thread(path.read_bytes)
        if text_hash(previous) != old.hash:
            # a rollback must return to a config known to run: the running one
            error = (
                f"{path} is not the config the agent runs (changed since it was loaded); "
                "reload or restart the agent first"
            )
            self._answer(cmd.id, error, {"outcome": REFUSED})
            return
        trial = Trial(
            cmd.id, time.time() + cmd.deadline_s, cmd.deadline_s, new.hash, text_hash(previous)
        )

        def write() -> None:
            write_atomic(previous_path(path), previous)
            trial.save(path)
            write_atomic(path, cmd.config.encode())

        await asyncio.to_thread(write)
        log.info(
            "config push on trial",
            extra={
                "id": cmd.id,
                "version": new.version,
                "hash": new.hash,
                "deadline_s": cmd.deadline_s,
            },
        )
        try:
            diff = await self.agent.reload(new, "push")
        except ReloadRefused as exc:
            await asyncio.to_thread(self._restore, path)
            self._answer(cmd.id, str(exc), {"outcome": REFUSED})
            return
        except Exception as exc:  # a reload that failed half-way: back to the known config
            log.exception("config push: reload failed", extra={"id": cmd.id})
            await self._roll_back(trial, path, f"the reload failed: {type(exc).__name__}: {exc}")
            return
        await self._trial(trial, path, cmd.deadline_s, diff.as_dict())

    async def _trial(
        self, trial: Trial, path: Path, deadline_s: float, diff: dict[str, Any] | None
    ) -> None:
        """Waits for a healthy uplink; applied, or rolled back to `<path>.previous`."""
        cid = trial.id
        applied_at = time.monotonic()
        give_up = applied_at + deadline_s
        if self.agent.uplink is not None:
            self.agent.uplink.report_now()  # a publish whose PUBACK shows the way is open
        while time.monotonic() < give_up:
            uplink = self.agent.uplink  # a reload may have replaced it
            if uplink is not None and uplink.status.healthy_since(applied_at):
                await asyncio.to_thread(remove_durably, trial_path(path))
                config = self.agent.config
                log.info(
                    "config push applied",
                    extra={"id": cid, "version": config.version, "hash": config.hash},
                )
                self._answer(cid, None, {"outcome": APPLIED, **self._identity(), "diff": diff})
                return
            await asyncio.sleep(HEALTH_POLL_S)
        uplink = self.agent.uplink
        why = uplink.status.last_error if uplink is not None else None
        error = f"the uplink was not healthy within {deadline_s:g} s" + (f" ({why})" if why else "")
        await self._roll_back(trial, path, error)

    async def _roll_back(self, trial: Trial, path: Path, error: str) -> None:
        """The previous file back, and applied. The marker says so first: should the
        previous config not apply live, the process ends and its service manager's
        restart starts it on the previous file, owing the answer (see `resume`)."""
        trial.outcome, trial.error = ROLLED_BACK, error

        def restore() -> None:
            write_atomic(path, previous_path(path).read_bytes())
            trial.save(path)

        await asyncio.to_thread(restore)
        try:
            old = await asyncio.to_thread(load_config, path)
            await self.agent.reload(old, "rollback")
        except Exception:
            # never strand the gateway on the pushed config: a crash exit (not a clean
            # one, which a Restart=on-failure unit would not restart); the intake keeps
            # what was read, as after any crash
            log.critical(
                "config push: the previous config does not apply live; the agent exits so "
                "that its restart runs the previous config",
                extra={"id": trial.id, "config": str(path)},
                exc_info=True,
            )
            os.kill(os.getpid(), signal.SIGKILL)
            raise
        await asyncio.to_thread(remove_durably, trial_path(path))
        log.warning(
            "config push rolled back",
            extra={"id": trial.id, "error": error, "version": old.version},
        )
        self._answer(trial.id, error, {"outcome": ROLLED_BACK, **self._identity()})

    @staticmethod
    def _restore(path: Path) -> None:
        """The pushed config was never applied: the previous file back, no marker."""
        write_atomic(path, previous_path(path).read_bytes())
        remove_durably(trial_path(path))

    def _identity(self) -> dict[str, str]:
        return {"version": self.agent.config.version, "hash": self.agent.config.hash}

    def _refuse(self, cid: str, error: str) -> bytes:
        log.warning("config push refused", extra={"id": cid, "error": error})
        return CommandRefused(error, cid, CONFIG_PUSH).response()

    def _answer(self, cid: str, error: str | None, extra: dict[str, Any]) -> None:
        if error is not None and extra.get("outcome") == REFUSED:
            log.warning("config push refused", extra={"id": cid, "error": error})
        assert self.agent.uplink is not None
        self.agent.uplink.respond(response(cid, error, extra))
