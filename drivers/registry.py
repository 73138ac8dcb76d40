"""Driver discovery: drivers are found by entry points in the group ``citygw.drivers``,
so a third-party package can add a protocol without forking citygw. The drivers that
ship with citygw are registered the same way, in pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from drivers.base import Driver

GROUP = "citygw.drivers"


class DriverNotFound(LookupError):
    """No driver of that name is installed."""

    def __init__(self, name: str, installed: list[str]) -> None:
        self.name = name
        self.installed = installed
        listed = ", ".join(installed) if installed else "none"
        super().__init__(f"unknown driver {name!r}; installed: {listed}")


class DriverLoadError(ImportError):
    """A driver is installed but its module or class cannot be loaded."""


def available_drivers() -> dict[str, EntryPoint]:
    """Installed drivers by name, sorted by name."""
    return {ep.name: ep for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name)}


def load_driver(name: str) -> type[Driver]:
    """The driver class registered under ``name``.

    Raises DriverNotFound (listing the installed drivers) or DriverLoadError."""
    drivers = available_drivers()
    ep = drivers.get(name)
    if ep is None:
        raise DriverNotFound(name, list(drivers))
    try:
        cls = ep.load()
    except Exception as exc:  # an import error in a third-party driver
        raise DriverLoadError(f"driver {name!r} ({ep.value}) cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise DriverLoadError(f"driver {name!r} ({ep.value}) is not a citygw Driver class")
    return cls
