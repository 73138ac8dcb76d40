"""What the config models of agent/config.py, agent/stage_config.py and the drivers share: the
base of a section that forbids unknown keys, and errors that name the key at fault."""

from __future__ import annotations

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
