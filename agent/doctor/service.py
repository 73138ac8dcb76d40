"""The service checks: the agent's systemd unit is installed for this config with its
watchdog on (`<unit-dir>/citygw-agent.service`, as `citygw install-service` writes it),
and systemd has it enabled and running. The unit's user is also whom the device checks
ask about serial port permissions (a technician runs the doctor as root)."""

from __future__ import annotations

import configparser
import contextlib
import grp
import os
import pwd
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.doctor.check import Check, passed

UNIT = "citygw-agent.service"
#: runs `systemctl <args>`: (exit code, its output)
Systemctl = Callable[[list[str]], tuple[int, str]]

_INSTALL = "install it: citygw install-service --config {config}"
_OFF = re.compile(r"\s*(0+(\.0*)?\s*[a-z]*|infinity)?\s*", re.IGNORECASE)


def read_unit(text: str) -> configparser.ConfigParser:
    """A unit file's sections and keys (a repeated key: its last value; a line ending
    with a backslash continues on the next, as systemd reads it)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep their case
    parser.read_string(re.sub(r"\\\n", " ", text))
    return parser


def _config_arg(exec_start: str) -> str | None:
    """The config path `citygw run` is given in an ExecStart line."""
    args = shlex.split(exec_start.lstrip("@-:+!"))
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config="):
            return arg.removeprefix("--config=")
    return None


@dataclass(frozen=True, slots=True)
class ServiceUser:
    """Whom the unit runs the agent as: its User= and SupplementaryGroups=."""

    name: str
    groups: tuple[str, ...] = ()

    def may_read_write(self, path: str, mode: int = os.R_OK | os.W_OK) -> bool:
        """Whether this user may open `path` for `mode` (R_OK, W_OK) by its permission bits:
        as the file's owner, through one of its groups, or as anyone else."""
        try:
            pw = pwd.getpwnam(self.name)
            st = os.stat(path)
        except (KeyError, OSError):
            return False
        if pw.pw_uid == 0:
            return True
        gids = set(os.getgrouplist(self.name, pw.pw_gid))
        for group in self.groups:
            with contextlib.suppress(KeyError):
                gids.add(grp.getgrnam(group).gr_gid)
        if st.st_uid == pw.pw_uid:
            bits = st.st_mode >> 6
        elif st.st_gid in gids:
            bits = st.st_mode >> 3
        else:
            bits = st.st_mode
        wanted = (4 if mode & os.R_OK else 0) | (2 if mode & os.W_OK else 0)
        return bits & wanted == wanted


def service_user(unit_dir: Path) -> ServiceUser | None:
    """The installed unit's user, None without a unit or a User= (then: root)."""
    try:
        unit = read_unit((unit_dir / UNIT).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None
    service = unit["Service"] if unit.has_section("Service") else {}
    name = service.get("User", "").strip()
    if not name:
        return None
    return ServiceUser(name, tuple(service.get("SupplementaryGroups", "").split()))


def unit_check(unit_dir: Path, config: Path) -> Check:
    name = "service.unit"
    path = unit_dir / UNIT
    install = _INSTALL.format(config=config)
    try:
        unit = read_unit(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Check(name, "fail", f"{path} is not there: the agent is not a service", install)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        return Check(name, "fail", f"{path}: cannot read it: {exc}", install)
    service = unit["Service"] if unit.has_section("Service") else {}
    exec_start = service.get("ExecStart", "")
    given = _config_arg(exec_start)
    if given is None or Path(given).resolve() != config.resolve():
        return Check(
            name,
            "fail",
            f"{path} runs {exec_start or 'nothing (no ExecStart)'!s}, not this config "
            f"({config.resolve()})",
            f"re{install}",
        )
    watchdog = service.get("WatchdogSec", "").strip()
    if _OFF.fullmatch(watchdog):
        return Check(
            name,
            "fail",
            f"{path}: the watchdog is off (WatchdogSec={watchdog}): a wedged agent would "
            "never be restarted",
            f"set WatchdogSec=30 in [Service], or re{install}",
        )
    if service.get("Type") != "notify" and not service.get("NotifyAccess"):
        return Check(
            name,
            "fail",
            f"{path}: WatchdogSec={watchdog} but Type={service.get('Type', 'simple')}: "
            "systemd ignores the agent's watchdog pings and kills it every "
            f"{watchdog}",
            f"set Type=notify in [Service], or re{install}",
        )
    return passed(name, f"{path}: runs this config, watchdog {watchdog}")


def systemctl_runner(timeout: float) -> Systemctl | None:
    """How to ask systemd, or None when it is not the init system (no /run/systemd/system,
    the sd_booted rule) or systemctl is missing."""
    tool = shutil.which("systemctl")
    if tool is None or not Path("/run/systemd/system").is_dir():
        return None

    def run(args: list[str]) -> tuple[int, str]:
        try:
            done = subprocess.run(
                [tool, *args], capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return 1, str(exc)
        return done.returncode, (done.stdout or done.stderr).strip()

    return run


def systemd_check(systemctl: Systemctl | None) -> Check:
    name = "service.systemd"
    if systemctl is None:
        return Check(
            name,
            "warn",
            "not under systemd: nothing restarts the agent if it stops or wedges",
            "run the agent as a systemd service (citygw install-service), or make sure "
            "whatever supervises it restarts it",
        )
    unit = UNIT.removesuffix(".service")
    _, enabled = systemctl(["is-enabled", unit])
    _, active = systemctl(["is-active", unit])
    if active != "active":
        return Check(
            name,
            "fail",
            f"{UNIT} is {active or 'unknown'} ({enabled or 'unknown'} at boot)",
            f"systemctl enable --now {unit}; journalctl -u {unit} -n 50 shows why it stopped",
        )
    if enabled != "enabled":
        return Check(
            name,
            "warn",
            f"{UNIT} runs, but is {enabled or 'unknown'} at boot: it will not start after a "
            "power cut",
            f"systemctl enable {unit}",
        )
    return passed(name, f"{UNIT} is active and enabled")
