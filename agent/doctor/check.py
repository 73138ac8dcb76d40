"""What every doctor check returns, and the verdict of a whole run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

Status = Literal["pass", "warn", "fail", "skip"]

#: the exit code of `citygw doctor` per overall result
EXIT_CODES: dict[Status, int] = {"pass": 0, "skip": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the doctor's report: `name` says what was checked ("broker.tls",
    "device street-7"), `message` what was found, `fix` what to do about a warn or fail."""

    name: str
    status: Status
    message: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def passed(name: str, message: str) -> Check:
    return Check(name, "pass", message)


def skipped(name: str, why: str) -> Check:
    return Check(name, "skip", why)


def result(checks: Iterable[Check]) -> Status:
    """fail if any check failed, else warn if any warned, else pass (skips count as pass)."""
    statuses = {c.status for c in checks}
    if "fail" in statuses:
        return "fail"
    if "warn" in statuses:
        return "warn"
    return "pass"


def exit_code(checks: Iterable[Check]) -> int:
    return EXIT_CODES[result(checks)]
