"""`citygw doctor`: every check a technician would make by hand, one line each (pass,
warn, fail or skip) with the fix under it; exit 0 all pass, 1 a warn, 2 a fail.
`--json` prints {"checks": [...], "result": ...} for tooling. The checks: agent/doctor/."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.text import Text

from agent.doctor import Check, Options, Status, exit_code, result, run_checks
from agent.doctor.run import AREAS
from cli.config import ConfigOption
from common.cli import out_console

STYLES: dict[Status, str] = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def render(checks: list[Check]) -> list[Text]:
    """The report's lines: status, name and message; the fix below a warn or fail."""
    lines = []
    for c in checks:
        head, *more = c.message.splitlines() or [""]
        lines.append(
            Text.assemble((f"{c.status.upper():4}", STYLES[c.status]), f"  {c.name}: {head}")
        )
        lines += [Text(f"      {line}") for line in more]
        if c.fix and c.status in ("warn", "fail"):
            lines.append(Text.assemble("      fix: ", (c.fix, "italic")))
    counts = Counter(c.status for c in checks)
    verdict = result(checks)
    lines.append(
        Text.assemble(
            ("result: ", "bold"),
            (verdict, STYLES[verdict]),
            f" ({', '.join(f'{counts[s]} {s}' for s in STYLES)})",
        )
    )
    return lines


def doctor(
    config: ConfigOption = Path("gateway.toml"),
    json: Annotated[bool, typer.Option("--json", help="One JSON object, for tooling.")] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds for each network step and device answer.", min=0.1)
    ] = 5.0,
    unit_dir: Annotated[
        Path, typer.Option(help="Where the agent's systemd unit is installed.", file_okay=False)
    ] = Path("/etc/systemd/system"),
    skip: Annotated[
        list[str] | None,
        typer.Option(help=f"Leave out an area: {', '.join(AREAS)} (repeatable)."),
    ] = None,
) -> None:
    """Check the config, buffer, clock, broker, devices and service; each line says what
    to fix. Exit 0: all pass, 1: a warning, 2: a failure."""
    unknown = sorted(set(skip or ()) - set(AREAS))
    if unknown:  # a usage error (exit 2), as typer's own
        raise typer.BadParameter(
            f"{', '.join(unknown)}: not an area; use {', '.join(AREAS)}", param_hint="--skip"
        )
    opts = Options(timeout=timeout, unit_dir=unit_dir, skip=frozenset(skip or ()))
    checks = asyncio.run(run_checks(config, opts))
    out = out_console()
    if json:
        report = {"checks": [c.as_dict() for c in checks], "result": result(checks)}
        out.print(Text(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode()))
    else:
        for line in render(checks):
            out.print(line)
    raise typer.Exit(exit_code(checks))
