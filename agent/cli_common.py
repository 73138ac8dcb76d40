"""What every `citygw` command shares: consoles, exit codes, the --config option, and
loading a config or exiting with every problem listed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from agent.config import Config, ConfigError, load_config

EXIT_INVALID = 1
EXIT_NO_FILE = 2

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="The gateway's config file.", dir_okay=False),
]


def out_console() -> Console:
    return Console(soft_wrap=True, highlight=False)


def err_console() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    console = err_console()
    console.print(Text.assemble(("error: ", "bold red"), message))
    raise typer.Exit(code)


def load_or_exit(path: Path) -> Config:
    """The validated config, or every problem printed to stderr and exit 1
    (exit 2 if the file cannot be read)."""
    try:
        return load_config(path)
    except FileNotFoundError:
        fail(f"{path}: file not found (create one with: citygw init {path})", EXIT_NO_FILE)
    except IsADirectoryError:
        fail(f"{path}: is a directory, not a config file", EXIT_NO_FILE)
    except OSError as exc:
        fail(f"{path}: cannot read: {exc.strerror or exc}", EXIT_NO_FILE)
    except ConfigError as exc:
        console = err_console()
        for issue in exc.issues:
            console.print(Text(str(issue)))
        n = len(exc.issues)
        console.print(Text(f"{path}: {n} problem{'s' if n != 1 else ''} found", style="bold red"))
        raise typer.Exit(EXIT_INVALID) from None
