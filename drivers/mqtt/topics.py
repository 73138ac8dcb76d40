"""Topic patterns (sans-I/O): MQTT filters with named captures.

A pattern is a topic filter whose levels may also be captures written ``{name}``:
``sensors/{device}/air/{point}``, ``city/+/noise/{point}``, ``sensors/street-7/#``.
``subscription`` is the MQTT filter to subscribe to (each capture becomes ``+``);
``match(topic)`` returns the captured levels when the topic matches, else None.
"""

from __future__ import annotations

import re

__all__ = ["TopicPattern", "TopicPatternError", "covers", "join_topic", "overlap"]

_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class TopicPatternError(ValueError):
    """A pattern that is not a valid topic filter; the message says why."""


class TopicPattern:
    """A compiled pattern. Levels are literals, ``+``, ``{name}`` or a final ``#``."""

    __slots__ = ("_levels", "_multi", "pattern", "subscription")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        if not pattern:
            raise TopicPatternError("a topic must not be empty")
        if "\0" in pattern:
            raise TopicPatternError("a topic must not contain a NUL character")
        parts = pattern.split("/")
        levels: list[tuple[str, str | None]] = []  # (kind, text): literal/plus/capture
        names: set[str] = set()
        self._multi = False
        for i, part in enumerate(parts):
            if part == "#":
                if i != len(parts) - 1:
                    raise TopicPatternError(
                        f"{pattern!r}: '#' must be the last level (it matches everything below)"
                    )
                self._multi = True
            elif part == "+":
                levels.append(("plus", None))
            elif m := _CAPTURE.fullmatch(part):
                name = m.group(1)
                if name in names:
                    raise TopicPatternError(f"{pattern!r}: capture {{{name}}} appears twice")
                names.add(name)
                levels.append(("capture", name))
            elif "{" in part or "}" in part:
                raise TopicPatternError(
                    f"{pattern!r}: a capture must be a whole level with a plain name, "
                    f"like sensors/{{device}}/pm25 (got level {part!r})"
                )
            elif "+" in part or "#" in part:
                raise TopicPatternError(
                    f"{pattern!r}: wildcards + and # must be a whole level (got level {part!r})"
                )
            else:
                levels.append(("literal", part))
        self._levels = tuple(levels)
        self.subscription = "/".join(
            ["+" if kind != "literal" else str(text) for kind, text in levels]
            + (["#"] if self._multi else [])
        )

    @property
    def captures(self) -> tuple[str, ...]:
        """The names of the pattern's captures, in order."""
        return tuple(str(text) for kind, text in self._levels if kind == "capture")

    def match(self, topic: str) -> dict[str, str] | None:
        """The captures (name -> level) if `topic` matches, else None. Follows MQTT's
        rules: ``+`` is exactly one level (possibly empty), ``#`` zero or more trailing
        levels, and wildcards at the first level do not match topics starting with $."""
        parts = topic.split("/")
        levels = self._levels
        n = len(levels)
        if len(parts) < n or (len(parts) > n and not self._multi):
            return None
        if topic.startswith("$") and (n == 0 or levels[0][0] != "literal"):
            return None
        captures: dict[str, str] = {}
        for (kind, text), part in zip(levels, parts, strict=False):
            if kind == "literal":
                if part != text:
                    return None
            elif kind == "capture":
                captures[str(text)] = part
        return captures

    def __repr__(self) -> str:
        return f"TopicPattern({self.pattern!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TopicPattern) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


def join_topic(prefix: str, topic: str) -> str:
    """A device's topic_prefix and a point's topic as one pattern."""
    return f"{prefix.rstrip('/')}/{topic}" if prefix else topic


def covers(general: str, specific: str) -> bool:
    """Whether MQTT filter `general` matches every topic filter `specific` matches (so
    subscribing to both only makes the broker send some messages twice)."""
    g, s = general.split("/"), specific.split("/")
    for i, level in enumerate(g):
        if level == "#":  # matches the parent level too ("a/#" matches "a")
            return i <= len(s) and not (i == 0 and s[0].startswith("$"))
        if i >= len(s) or s[i] == "#":
            return False
        if level == "+":
            if i == 0 and s[0].startswith("$"):
                return False
        elif level != s[i]:
            return False
    return len(g) == len(s)


def overlap(a: str, b: str) -> bool:
    """Whether some topic matches both MQTT filters `a` and `b`."""
    x, y = a.split("/"), b.split("/")
    for i in range(max(len(x), len(y))):
        p = x[i] if i < len(x) else None
        q = y[i] if i < len(y) else None
        if p == "#" or q == "#":  # "a/#" also matches "a": one may end right here
            return not (i == 0 and ((p or "").startswith("$") or (q or "").startswith("$")))
        if p is None or q is None:
            return False
        if p != q and "+" not in (p, q):
            return False
        if i == 0 and "+" in (p, q) and (p + q).lstrip("+").startswith("$"):
            return False
    return True
