"""What the config models of agent/config.py, agent/stage_config.py, the drivers and the
console (central/console/config.py) share: the base of a section that forbids unknown keys,
errors that name the key at fault, and the issues a config file's loading collects."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError

#: custom error type whose ctx may name the key the problem is about
AT_KEY = "citygw_at_key"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def at(key: str, message: str) -> PydanticCustomError:
    """An error from a model validator that belongs to one of the model's keys."""
    return PydanticCustomError(AT_KEY, "{message}", {"key": key, "message": message})


def fail(message: str) -> PydanticCustomError:
    return PydanticCustomError(AT_KEY, "{message}", {"key": "", "message": message})


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file: where (``key_path``) and what (``message``)."""

    source: str
    key_path: str
    message: str

    def __str__(self) -> str:
        if self.key_path:
            return f"{self.source}: {self.key_path}: {self.message}"
        return f"{self.source}: {self.message}"


class ConfigError(Exception):
    """A config file is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues: list[ConfigIssue] = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    def __str__(self) -> str:
        return "\n".join(str(i) for i in self.issues)


def key_path(loc: Iterable[str | int]) -> str:
    """``("devices", 3, "points", 7, "min")`` -> ``devices[3].points[7].min``."""
    out = ""
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        else:
            out += f".{item}" if out else item
    return out
