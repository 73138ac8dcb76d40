"""What every `citygw` command shares, gateway and platform side: consoles, exit codes,
and failing with a clear message."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

EXIT_INVALID = 1
EXIT_NO_FILE = 2


def out_console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def err_console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    console = err_console()
    console.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


def age(ms: int | None, now_ms: int) -> str:
    """How long ago epoch-ms `ms` was at `now_ms`, for people: "4.2 s ago", "never"."""
    if ms is None:
        return "never"
    s = max(0.0, (now_ms - ms) / 1000.0)
    if s < 120:
        return f"{s:.1f} s ago"
    if s < 7200:
        return f"{s / 60:.1f} min ago"
    return f"{s / 3600:.1f} h ago"
