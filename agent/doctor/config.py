"""The config check: the file loads and validates (every problem listed, as `citygw
validate` lists them); what validation only warns about (an exposed secret file, an MQTT
identity that is not the gateway id) makes it a warn."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from agent.config import Config, ConfigError, load_config
from agent.doctor.check import Check, passed

NAME = "config"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _warnings_of(logger: logging.Logger) -> Iterator[_Collect]:
    """The logger's warnings while the block runs, kept from its usual handlers (they
    become the check's message instead of a log line above the report)."""
    handler, propagate = _Collect(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def check_config(path: Path) -> tuple[Check, Config | None]:
    """The config check and the config (None when it cannot be used)."""
    fix_init = f"create one with: citygw init {path}"
    try:
        with _warnings_of(logging.getLogger("citygw.config")) as warned:
            cfg = load_config(path)
    except FileNotFoundError:
        return Check(NAME, "fail", f"{path}: file not found", fix_init), None
    except IsADirectoryError:
        return Check(NAME, "fail", f"{path}: is a directory, not a config file", fix_init), None
    except OSError as exc:
        return Check(
            NAME,
            "fail",
            f"{path}: cannot read: {exc.strerror or exc}",
            "check the file's permissions (the doctor reads it as the agent would)",
        ), None
    except ConfigError as exc:
        n = len(exc.issues)
        lines = "\n".join(str(issue) for issue in exc.issues)
        return Check(
            NAME,
            "fail",
            f"{path}: {n} problem{'s' if n != 1 else ''}:\n{lines}",
            f"fix each line above (key path: what is wrong), then run: citygw validate -c {path}",
        ), None
    if warned.messages:
        return Check(
            NAME,
            "warn",
            f"{path}: valid, with warnings:\n" + "\n".join(warned.messages),
            "each warning says what to change",
        ), cfg
    devices = len(cfg.devices)
    return passed(
        NAME,
        f"{path}: valid ({devices} device{'s' if devices != 1 else ''}, "
        f"{cfg.point_count()} points, version {cfg.version})",
    ), cfg
