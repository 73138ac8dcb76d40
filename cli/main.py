"""The ``citygw`` command line: what a technician uses at the cabinet.

Commands are grouped by purpose below: setting up (init, validate), running (run,
demo, ingest), inspecting (status, buffer) and the Modbus tools (cli/modbus.py).
The helpers every command reports through are in common/cli.py.

Exit codes: 0 success, 1 invalid input (e.g. config errors), 2 file not found or
unreadable, 3 no running agent (reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from agent.config import Config
from central import cli as platform
from cli import ble, doctor, firmware, modbus, mqtt, platform_config, service
from cli.config import ConfigOption, load_or_exit
from common import timers
from common.broker import BrokerError
from common.cli import EXIT_INVALID, EXIT_NO_FILE, err_console, fail
from common.cli import out_console as _out
from common.logs import setup_logging

#: `citygw reload`: no running agent found, or it did not answer in time
EXIT_NO_AGENT = 3

app = typer.Typer(
    name="citygw",
    help="Edge gateway for city sensors.",
    no_args_is_help=True,
    add_completion=False,
    # a traceback must not print local variables: broker and database URLs hold passwords
    pretty_exceptions_show_locals=False,
)


def template_text() -> str:
    """The commented starter config written by ``citygw init``."""
    return resources.files("agent.templates").joinpath("gateway.toml").read_text(encoding="utf-8")


app.add_typer(modbus.app, name="modbus")
app.add_typer(ble.app, name="ble")
app.add_typer(mqtt.app, name="mqtt")
app.add_typer(firmware.app, name="firmware")
app.add_typer(platform.app, name="platform")
app.command()(doctor.doctor)
# push-config and configs validate a gateway config: in cli/, above agent/ and central/
platform.app.command("push-config")(platform_config.push_config)
platform.app.command("configs")(platform_config.configs)
app.command("install-service")(service.install_service)


@app.callback()
def _root() -> None:
    """Edge gateway for city sensors."""


# -- setting up ----------------------------------------------------------------------


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the config.", dir_okay=False)] = Path(
        "gateway.toml"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter config to PATH (default gateway.toml)."""
    if path.is_dir():
        fail(f"{path} is a directory; give a file name, e.g. {path / 'gateway.toml'}")
    if path.exists() and not force:
        fail(f"{path} already exists; use --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template_text(), encoding="utf-8")
    except OSError as exc:
        fail(f"{path}: cannot write: {exc.strerror or exc}", EXIT_NO_FILE)
    _out().print(Text(f"wrote {path}; edit it, then check it with: citygw validate -c {path}"))


@app.command()
def validate(config: ConfigOption = Path("gateway.toml")) -> None:
    """Check a config file and list every problem in it."""
    cfg = load_or_exit(config)
    devices = len(cfg.devices)
    _out().print(
        Text(
            f"{config}: OK ({devices} device{'s' if devices != 1 else ''}, "
            f"{cfg.point_count()} point{'s' if cfg.point_count() != 1 else ''})"
        )
    )


# -- running -------------------------------------------------------------------------


@app.command()
def run(
    config: ConfigOption = Path("gateway.toml"),
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
    json_logs: Annotated[
        bool, typer.Option("--json-logs", help="One JSON object per log line.")
    ] = False,
) -> None:
    """Run the agent until SIGINT/SIGTERM; a graceful stop flushes memory to the buffer.

    SIGHUP (`citygw reload`, `systemctl reload`) reloads the config file without a
    restart; an invalid one is refused and the running one stays."""
    from agent.config_push import settle_interrupted
    from agent.runtime import run_agent

    setup_logging(log_level, json=json_logs)
    settle_interrupted(config)  # a config push's trial a restart cut short
    cfg = load_or_exit(config)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_agent(cfg, stop, config)

    try:
        timers.run(main())  # timers to the microsecond: polls start on time
    except (BufferError, OSError) as exc:  # the buffer cannot be opened or written
        fail(f"{cfg.buffer.path}: {exc}")


@app.command()
def reload(
    config: ConfigOption = Path("gateway.toml"),
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the agent's answer.", min=0.1)
    ] = 30.0,
) -> None:
    """Apply a changed config to the running agent without a restart.

    The file is validated first (nothing is sent if it is invalid). The agent, found
    through its buffer, rereads its config file on SIGHUP and applies the difference:
    devices added, removed or changed start, stop or restart; the others poll on.
    Exit 0 applied; 1 invalid or refused (the running config stays); 2 file or
    buffer not found; 3 no running agent, or no answer within --timeout."""
    from agent.status import reload_summary

    cfg = load_or_exit(config)
    path = _existing_buffer(cfg)
    pid, before = _running_agent(path)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:  # not ours to signal (another user), or it just ended
        fail(f"cannot signal the agent (pid {pid}): {exc.strerror or exc}", EXIT_NO_AGENT)
    deadline = time.monotonic() + timeout
    while (record := _state(path).get("reload")) == before:
        if time.monotonic() > deadline:
            fail(
                f"the agent (pid {pid}) did not record a reload within {timeout:g} s; see its log",
                EXIT_NO_AGENT,
            )
        time.sleep(0.1)
    assert record is not None
    if not record.get("ok"):
        err_console().print(Text(str(record.get("error"))))
        fail(f"{config}: reload refused; the agent keeps its running config")
    _out().print(Text(f"{config}: {reload_summary(record)}"))
    if record.get("hash") != cfg.hash:
        err_console().print(
            Text(
                f"note: the agent loaded a config other than {config} (it rereads the file it "
                "was started with, or the file changed meanwhile)"
            )
        )


def _state(path: Path) -> dict[str, Any]:
    from agent.status import collect

    try:
        return collect(path)[1]
    except (BufferError, OSError) as exc:  # not a usable buffer, newer schema, unreadable
        fail(str(exc), EXIT_NO_FILE)


def _running_agent(path: Path) -> tuple[int, Any]:
    """The pid of the agent running on this buffer, from its status snapshot, and its
    last reload record; exits if none runs."""
    from agent.status import agent_running

    state = _state(path)
    agent = state.get("agent") or {}
    pid = agent.get("pid")
    if not isinstance(pid, int) or not agent_running(state, time.time_ns() // 1_000_000):
        fail(f"{path}: no agent is running on this buffer (start it: citygw run)", EXIT_NO_AGENT)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        fail(f"{path}: its agent (pid {pid}) is gone", EXIT_NO_AGENT)
    except PermissionError:
        pass  # alive, another user's: the SIGHUP says whether we may
    return pid, state.get("reload")


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Seconds of simulated readings.", min=1)] = 30.0,
    console: Annotated[
        bool,
        typer.Option(
            "--console",
            help="Serve the platform console over the demo's store, during the run and "
            "after it until interrupted.",
        ),
    ] = False,
    console_listen: Annotated[
        str, typer.Option(help="HOST:PORT of the console (loopback).")
    ] = "127.0.0.1:8080",
) -> None:
    """A simulated street block through the real pipeline, buffer, uplink and ingest."""
    import secrets

    from central.console.serve import ServeRefused
    from cli.demo import DemoConsole, DemoResult, run_demo

    setup_logging("WARNING")
    web = DemoConsole(console_listen, secrets.token_urlsafe(9)) if console else None

    def show(result: DemoResult) -> None:
        _out().print(Text(result.summary()))

    try:
        result = asyncio.run(run_demo(duration, web=web, on_result=show))
    except BrokerError as exc:
        fail(str(exc), EXIT_NO_FILE)
    except ServeRefused as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # --console: served until Ctrl-C, the line was printed
        return
    show(result)
    if result.lost or result.duplicates:
        raise typer.Exit(EXIT_INVALID)


@app.command()
def ingest(
    # from the environment too, so that passwords in the URLs stay out of `ps`
    broker: Annotated[
        str,
        typer.Option(envvar="CITYGW_BROKER", help="mqtt://host:port or mqtts://user:pw@host:port"),
    ],
    db: Annotated[
        str, typer.Option(envvar="CITYGW_DB", help="sqlite:///path.db or postgresql://...")
    ] = "sqlite:///platform.db",
    group: Annotated[str, typer.Option(help="Shared-subscription group name.")] = "citygw-ingest",
    prefix: Annotated[str, typer.Option(help="Topic prefix.")] = "citygw",
    client_id: Annotated[
        str,
        typer.Option(help="MQTT client id; stable and unique per worker (default: from the host)."),
    ] = "",
    session_expiry: Annotated[
        int,
        typer.Option(
            help="Seconds the broker keeps this worker's session and queued messages "
            "while it is away (0: a clean session every time)."
        ),
    ] = 3600,
    report_every: Annotated[
        float, typer.Option(help="Seconds between throughput lines in the log (0: none).", min=0)
    ] = 10.0,
    metrics_port: Annotated[
        int,
        typer.Option(
            help="Port of the Prometheus endpoint (0: none); each worker on a host needs its own.",
            min=0,
            max=65535,
        ),
    ] = 9466,
    metrics_address: Annotated[
        str, typer.Option(help="Address of the Prometheus endpoint (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Platform ingest: store what gateways send, once.

    Decodes uplinks, drops duplicates and bad batches (kept as dead letters), stores
    readings, alarms, gateway state and device information; logs its throughput and
    serves Prometheus metrics at http://METRICS_ADDRESS:METRICS_PORT/metrics."""
    from central.worker import run_ingest

    setup_logging(log_level)

    async def main() -> None:
        task = asyncio.ensure_future(
            run_ingest(
                broker,
                db,
                group,
                prefix,
                client_id=client_id or f"citygw-ingest-{socket.gethostname()}-{group}",
                session_expiry=session_expiry,
                report_every=report_every,
                metrics_address=metrics_address,
                metrics_port=metrics_port,
            )
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


# -- inspecting ----------------------------------------------------------------------


def _existing_buffer(cfg: Config) -> Path:
    if not cfg.buffer.path.exists():
        fail(f"{cfg.buffer.path}: no buffer database yet (has the agent run?)", EXIT_NO_FILE)
    return cfg.buffer.path


@app.command()
def status(config: ConfigOption = Path("gateway.toml")) -> None:
    """The gateway's state: buffer, uplink, devices.

    Buffer depth per lane, oldest unsent, evictions, last ack, uplink, device health and
    device information."""
    from agent.status import collect, render_device_info, render_status

    path = _existing_buffer(load_or_exit(config))
    try:
        stats, state = collect(path)
    except (BufferError, OSError) as exc:  # not a usable buffer, newer schema, unreadable
        fail(str(exc), EXIT_NO_FILE)
    _out().print(render_status(stats, state))
    if (info := render_device_info(state)) is not None:
        _out().print(info)


buffer_app = typer.Typer(help="Look into the durable buffer.", no_args_is_help=True)
app.add_typer(buffer_app, name="buffer")


@buffer_app.command("inspect")
def buffer_inspect(
    config: ConfigOption = Path("gateway.toml"),
    limit: Annotated[int, typer.Option(help="How many queued batches to list.", min=0)] = 20,
) -> None:
    """The buffer's identity, fill level and the next batches to be sent."""
    from agent.status import render_inspect

    path = _existing_buffer(load_or_exit(config))
    try:
        view = render_inspect(path, limit)
    except (BufferError, OSError) as exc:  # not a usable buffer, newer schema, unreadable
        fail(str(exc), EXIT_NO_FILE)
    _out().print(view)


def main() -> None:
    """Entry point of the ``citygw`` console script."""
    app()


if __name__ == "__main__":
    main()
