"""``python -m hil``: the hardware-in-the-loop rig's command line.

    python -m hil sim modbus --port 5020 [--transport rtu-over-tcp --garbage 0.2]
    python -m hil sim mqtt --broker mqtt://127.0.0.1:1883 [--sensors 3 --rate 1 --garbage 0.1]
    python -m hil sim ble --out adverts.jsonl [--duration 60 --garbage 0.1]
    python -m hil sim mcu --link /tmp/ttyMCU [--interval 1 --version 1.0.0 --pubkey fw.pub]
    python -m hil run hil/scenarios/outage.toml [--workdir DIR --seed N]
    python -m hil run-all [--fast] [--parallel N]

Each top-level command is one function in COMMANDS that adds its subparser to the
``add_subparsers()`` action and sets ``func`` (called with the parsed arguments,
returning the exit code) as the parser's default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from common.redact import redact

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _float_01(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not within 0..1")
    return value


def write_record(path: Path, items: Iterable[Any]) -> int:
    """Writes dataclass records as JSON lines (bytes as hex); returns how many."""
    n = 0

    def default(obj: Any) -> Any:
        if isinstance(obj, bytes | bytearray):
            return obj.hex()
        raise TypeError(type(obj).__name__)

    with path.open("wb") as f:
        for item in items:
            is_record = dataclasses.is_dataclass(item) and not isinstance(item, type)
            row = dataclasses.asdict(item) if is_record else item
            f.write(orjson.dumps(row, default=default) + b"\n")
            n += 1
    return n


async def _until_stopped(duration: float | None) -> None:
    """Returns after `duration` seconds, or at SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=duration)


def _say(text: str) -> None:
    print(text, flush=True)


# -- sim modbus -------------------------------------------------------------------------


async def _sim_modbus(args: argparse.Namespace) -> int:
    from hil.sim_modbus import CabinetSimulator, GarbageRtuServer

    if args.garbage and args.transport != "rtu-over-tcp":
        _say("--garbage needs --transport rtu-over-tcp")
        return 2
    garbage: GarbageRtuServer | None = None
    if args.garbage:
        garbage = GarbageRtuServer(
            args.host, args.port, probability=args.garbage, seed=args.seed, tick_s=args.tick
        )
        cabinet = garbage.cabinet
        await garbage.start()
    else:
        cabinet = CabinetSimulator(args.host, args.port, transport=args.transport, tick_s=args.tick)
        await cabinet.start()
    try:
        port = garbage.port if garbage else cabinet.port
        units = ", ".join(f"{u} ({p})" for u, p in cabinet.profiles.items())
        extra = f", garbage p={args.garbage}" if garbage else ""
        _say(f"modbus: units {units} on {args.host}:{port} ({args.transport}{extra})")
        await _until_stopped(args.duration)
    finally:
        await (garbage.stop() if garbage else cabinet.stop())
    summary = f"modbus: served {len(cabinet.served)} reads"
    if garbage is not None:
        summary += f"; answers {dict(garbage.counts)}"
    _say(summary)
    if args.record:
        write_record(args.record, cabinet.served)
        if garbage is not None:
            write_record(args.record.with_name(args.record.name + ".garbage"), garbage.injected)
    return 0


def _add_sim_modbus(kinds: Subparsers) -> None:
    p = kinds.add_parser("modbus", help="the street cabinet: energy meter + level transmitter")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: a free one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--transport", choices=("tcp", "rtu-over-tcp"), default="tcp")
    p.add_argument("--tick", type=float, default=1.0, help="seconds between value changes")
    p.add_argument("--garbage", type=_float_01, default=0.0, help="probability of a garbage answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until ^C)")
    p.add_argument("--record", type=Path, help="write every read served to this JSONL file")
    p.set_defaults(func=lambda a: asyncio.run(_sim_modbus(a)))


# -- sim mqtt ---------------------------------------------------------------------------


async def _sim_mqtt(args: argparse.Namespace) -> int:
    from hil.sim_mqtt import MqttSensors

    sensors = MqttSensors(
        args.broker, args.sensors, args.rate, garbage=args.garbage, seed=args.seed
    )
    _say(
        f"mqtt: {len(sensors.names)} sensors ({', '.join(sensors.names)}) publishing "
        f"{args.rate:g}/s each to {redact(args.broker)}"
    )
    await sensors.start()
    try:
        await _until_stopped(args.duration)
    finally:
        await sensors.stop()
    _say(f"mqtt: {dict(sensors.counts)}, connection errors {sensors.connection_errors}")
    if args.record:
        write_record(args.record, sensors.sent)
    return 0


def _add_sim_mqtt(kinds: Subparsers) -> None:
    p = kinds.add_parser("mqtt", help="sensors publishing JSON to a broker")
    p.add_argument("--broker", required=True, help="mqtt://host:port")
    p.add_argument("--sensors", type=int, default=3)
    p.add_argument("--rate", type=float, default=1.0, help="messages per second per sensor")
    p.add_argument("--garbage", type=_float_01, default=0.0, help="probability of garbage")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until ^C)")
    p.add_argument("--record", type=Path, help="write every message sent to this JSONL file")
    p.set_defaults(func=lambda a: asyncio.run(_sim_mqtt(a)))


# -- sim ble ----------------------------------------------------------------------------


def _sim_ble(args: argparse.Namespace) -> int:
    from hil.sim_ble import BleTagsSim

    if args.duration is None and args.adverts is None:
        args.duration = 60.0
    tags = BleTagsSim(
        interval_s=args.interval, garbage=args.garbage, duplicates=args.duplicates, seed=args.seed
    )
    tags.write(args.out, args.duration, adverts=args.adverts)
    _say(f"ble: {len(tags.adverts)} adverts in {args.out}: {dict(tags.counts)}")
    if args.record:
        write_record(args.record, tags.adverts)
    return 0


def _add_sim_ble(kinds: Subparsers) -> None:
    p = kinds.add_parser("ble", help="write a replay file of BTHome/Ruuvi adverts")
    p.add_argument("--out", type=Path, required=True, help="the JSONL replay file to write")
    p.add_argument("--duration", type=float, default=None, help="seconds of adverts")
    p.add_argument("--adverts", type=int, default=None, help="how many adverts (no repeats)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between adverts of a tag")
    p.add_argument("--garbage", type=_float_01, default=0.0, help="probability of garbage")
    p.add_argument("--duplicates", type=_float_01, default=0.0, help="probability of a repeat")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--record", type=Path, help="write the measurements encoded to this JSONL")
    p.set_defaults(func=_sim_ble)


async def _sim_mcu(args: argparse.Namespace) -> int:
    from drivers.mcu.simulator import SimMcu
    from firmware_bridge.image import load_public_key

    key = load_public_key(args.pubkey) if args.pubkey else None
    sim = SimMcu.on_pty(
        interval=args.interval, version=args.version, seed=args.seed, ota_public_key=key
    )
    if args.link:
        args.link.unlink(missing_ok=True)
        args.link.symlink_to(sim.port)
    _say(f"mcu: firmware {sim.slots.version} on {args.link or sim.port} (pty {sim.port})")
    try:
        async with sim.running():
            await _until_stopped(args.duration)
    finally:
        if args.link:
            args.link.unlink(missing_ok=True)
    _say(f"mcu: {dict(sim.counts)}")
    return 0


def _add_sim_mcu(kinds: Subparsers) -> None:
    p = kinds.add_parser("mcu", help="the gateway's microcontroller on a pseudo-terminal")
    p.add_argument("--link", type=Path, help="a symlink to the pty: the port to configure")
    p.add_argument("--interval", type=float, default=1.0, help="sampling interval, s")
    p.add_argument("--version", default="1.0.0", help="the firmware version it runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pubkey", type=Path, help="accept firmware updates signed for this key")
    p.add_argument("--duration", type=float, default=None, help="seconds to run")
    p.set_defaults(func=lambda a: asyncio.run(_sim_mcu(a)))


# -- commands ---------------------------------------------------------------------------


def add_sim_command(sub: Subparsers) -> None:
    """``sim <kind>``: run one simulator on its own."""
    p = sub.add_parser("sim", help="run one simulator on its own")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{modbus,mqtt,ble,mcu}")
    _add_sim_modbus(kinds)
    _add_sim_mqtt(kinds)
    _add_sim_ble(kinds)
    _add_sim_mcu(kinds)


def _run(args: argparse.Namespace) -> int:
    from hil.runner import run_scenario
    from hil.scenario import SCENARIOS, all_scenarios, load_scenario

    path: Path = args.scenario
    if not path.exists() and (SCENARIOS / f"{path}.toml").exists():
        path = SCENARIOS / f"{path}.toml"  # a scenario's name
    try:
        scenario = load_scenario(path)
    except (OSError, ValueError) as exc:  # tomllib and pydantic errors are ValueErrors
        names = ", ".join(p.stem for p in all_scenarios())
        print(f"hil run: cannot load scenario {args.scenario}: {exc}\n(names: {names})")
        return 2
    verdict = asyncio.run(run_scenario(scenario, args.workdir, args.seed))
    print(verdict.line(), flush=True)
    return 0 if verdict.passed else 1


def add_run_command(sub: Subparsers) -> None:
    """``run SCENARIO``: one scenario, its figures, and its verdict line."""
    p = sub.add_parser("run", help="run one scenario (hil/scenarios/NAME.toml)")
    p.add_argument("scenario", type=Path, help="a scenario's name or its .toml file")
    p.add_argument("--workdir", type=Path, default=None, help="keep files here (default: temp)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random fault moments")
    p.set_defaults(func=_run)


def _run_all(args: argparse.Namespace) -> int:
    from hil.runner import run_all
    from hil.scenario import all_scenarios, load_scenario

    paths = [p for p in all_scenarios() if not args.fast or load_scenario(p).fast]
    verdicts = asyncio.run(run_all(paths, args.parallel))
    for verdict in verdicts:
        print(verdict.line(), flush=True)
    return 0 if all(v.passed for v in verdicts) else 1


def add_run_all_command(sub: Subparsers) -> None:
    """``run-all``: every shipped scenario, then one verdict line each."""
    p = sub.add_parser("run-all", help="run every scenario in hil/scenarios")
    p.add_argument("--fast", action="store_true", help="only the ones marked fast (CI)")
    p.add_argument("--parallel", type=int, default=1, help="scenarios at a time")
    p.set_defaults(func=_run_all)


#: one function per top-level command: gets the subparsers action, adds its parser with
#: ``set_defaults(func=...)`` (func(args) -> exit code)
COMMANDS: list[Callable[[Subparsers], None]] = [
    add_sim_command,
    add_run_command,
    add_run_all_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hil", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
