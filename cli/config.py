"""The gateway config for a command: the --config option, and loading a config or
exiting with every problem listed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from agent.config import Config, ConfigError, load_config
from common.cli import EXIT_INVALID, EXIT_NO_FILE, err_console, fail

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="The gateway's config file.", dir_okay=False),
]


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
