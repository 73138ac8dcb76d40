"""``citygw install-service``: the agent's systemd unit for a config, put in place.

The unit is agent/templates/citygw-agent.service filled in for the config: the
absolute config path, the buffer's directory as its only writable place, this
citygw's executable, the service user and the device groups that exist here.
deploy/systemd/citygw-agent.service is the same template for the default paths.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from cli.config import ConfigOption, load_or_exit
from common.cli import EXIT_INVALID, EXIT_NO_FILE, err_console, fail
from common.cli import out_console as _out

UNIT_NAME = "citygw-agent.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
#: groups that open devices to the agent: serial ports (dialout); BlueZ's D-Bus policy
#: on some distributions (bluetooth)
DEVICE_GROUPS = ("dialout", "bluetooth")
#: what a path in a unit may hold without quoting rules (systemd expands % and $)
_PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/@+-]*")
#: what the unit's sandbox hides from the agent, and the option that does
_HIDDEN = (
    (Path("/home"), "ProtectHome="),
    (Path("/root"), "ProtectHome="),
    (Path("/run/user"), "ProtectHome="),
    (Path("/tmp"), "PrivateTmp="),
    (Path("/var/tmp"), "PrivateTmp="),
)


def template() -> str:
    return (
        resources.files("agent.templates")
        .joinpath("citygw-agent.service")
        .read_text(encoding="utf-8")
    )


def render_unit(
    exec_start: str, config: Path, buffer_dir: Path, user: str, groups: tuple[str, ...]
) -> str:
    """The agent's unit text. Paths must be absolute and plain (see `check_path`)."""
    return template().format(
        exec_start=exec_start,
        config=config,
        buffer_dir=buffer_dir,
        user=user,
        groups=" ".join(groups),
    )


def check_path(path: Path, what: str) -> Path:
    """`path` absolute, if a unit can name it as it is; else the command fails."""
    path = path.absolute()
    if not _PLAIN_PATH.fullmatch(str(path)):
        fail(
            f"{path}: the {what}'s path has characters a systemd unit would need quoted "
            "(spaces, %, $, quotes); move it to a plain path such as /etc/citygw/gateway.toml"
        )
    return path


def executable() -> str:
    """This citygw's command, absolute: the console script installed beside this
    Python (a virtualenv's bin/) or on the PATH, else this Python running the cli
    package."""
    beside = Path(sys.executable).parent / "citygw"
    script = str(beside) if os.access(beside, os.X_OK) else shutil.which("citygw")
    if script is not None:
        return str(check_path(Path(script), "citygw executable"))
    return f"{check_path(Path(sys.executable), 'Python executable')} -m cli"


def install_service(
    config: ConfigOption = Path("gateway.toml"),
    unit_dir: Annotated[
        Path, typer.Option(help="Where to write the unit.", file_okay=False)
    ] = SYSTEM_UNIT_DIR,
    user: Annotated[str, typer.Option(help="The user the agent runs as.")] = "citygw",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the unit instead of writing it.")
    ] = False,
) -> None:
    """Install the agent as a systemd service for a config.

    Validates the config, writes citygw-agent.service (Type=notify, watchdog, restart,
    hardening) into UNIT_DIR, then enables and starts it with systemctl when UNIT_DIR
    is the system's; otherwise prints the steps left."""
    cfg = load_or_exit(config)
    config_path = check_path(config.resolve(), "config")
    buffer_dir = check_path(cfg.buffer.path.parent, "buffer directory")
    groups = tuple(g for g in DEVICE_GROUPS if _group_exists(g))
    unit = render_unit(executable(), config_path, buffer_dir, user, groups)
    system = unit_dir.absolute() == SYSTEM_UNIT_DIR
    problems = [
        f"the service cannot see {path}: the unit's {option} hides {hidden}; "
        f"move the {what} (e.g. to {instead})"
        for what, path, instead in (
            ("config", config_path, "/etc/citygw/"),
            ("buffer", buffer_dir, "/var/lib/citygw/"),
        )
        for hidden, option in _HIDDEN
        if path.is_relative_to(hidden)
    ]
    if not _user_exists(user):
        problems.append(
            f"user {user!r} does not exist: create it with "
            f"useradd --system --no-create-home --shell /usr/sbin/nologin {user}"
        )
    if system and not dry_run and problems:
        fail("; ".join(problems))
    for problem in problems:
        err_console().print(Text(f"warning: {problem}", style="yellow"))
    if dry_run:
        _out().print(Text(unit), end="")
        return
    if not unit_dir.is_dir():
        fail(f"{unit_dir}: no such directory (is systemd installed? --unit-dir to choose)")
    if system and os.geteuid() != 0:
        fail(f"{unit_dir}: writing a system unit needs root: sudo citygw install-service ...")
    _prepare_buffer_dir(cfg.buffer.path, user)
    target = unit_dir / UNIT_NAME
    try:
        target.write_text(unit, encoding="utf-8")
    except OSError as exc:
        fail(f"{target}: cannot write: {exc.strerror or exc}", EXIT_NO_FILE)
    _out().print(Text(f"wrote {target} (config {config_path}, buffer in {buffer_dir})"))
    systemctl = shutil.which("systemctl")
    if system and systemctl is not None:
        for args in (["daemon-reload"], ["enable", "--now", UNIT_NAME]):
            done = subprocess.run([systemctl, *args], check=False)
            if done.returncode != 0:
                fail(f"systemctl {' '.join(args)} failed (exit {done.returncode})")
        _out().print(Text(f"enabled and started {UNIT_NAME}: systemctl status {UNIT_NAME}"))
        return
    _out().print(
        Text(
            f"next: copy it to {SYSTEM_UNIT_DIR} if it is not there, then\n"
            f"  systemctl daemon-reload && systemctl enable --now {UNIT_NAME}\n"
            f"  journalctl -u {UNIT_NAME} -f"
        )
    )


def _prepare_buffer_dir(buffer: Path, user: str) -> None:
    """The buffer's directory exists (ReadWritePaths= of a missing path fails the
    start) and, when installing as root, it and the buffer's files (left by a run as
    root) belong to the service user."""
    path = buffer.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and _user_exists(user):
            entry = pwd.getpwnam(user)
            for owned in (path, *path.glob(f"{buffer.name}*")):
                os.chown(owned, entry.pw_uid, entry.pw_gid)
    except OSError as exc:
        fail(f"{path}: cannot prepare the buffer directory: {exc.strerror or exc}", EXIT_INVALID)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True
