"""`citygw demo`: a simulated street block through the real pipeline, buffer and
uplink, into a private Mosquitto and an in-process platform ingest.

Nothing has to be installed or started by hand: with a `mosquitto` binary on PATH
the demo starts its own broker on a free loopback port; without one the uplink
talks to the ingest over an in-process link (cli/loopback.py). The gateway's
microcontroller is simulated on a pseudo-terminal (drivers/mcu/simulator.py) and read
by the mcu driver over its serial protocol. Files go to a temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiomqtt
import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

import drivers.ble
from agent.config import Config, parse_config
from agent.runtime import Agent
from central.stores import open_store
from central.worker import IngestWorker
from cli.loopback import LoopbackLink
from common.broker import Mosquitto, mosquitto_binary
from common.mqtt_url import BrokerAddress
from drivers.mcu.simulator import SimMcu
from drivers.modbus.profiles import load_profile
from drivers.modbus.settings import ModbusPointSettings
from drivers.modbus.simulator import ModbusSimulator, RegisterImage

# (device kind, how many, poll, points: (name, unit, sim waveform, range limits))
_BLOCK: list[tuple[str, int, str, list[tuple[str, str, str, tuple[float, float]]]]] = [
    (
        "bridge",
        4,
        "1s",
        [
            (
                f"strain_{i}",
                "µε",
                "base = 120.0\namplitude = 25.0\nperiod = '10m'\nnoise = 1.5\n"
                "spike_probability = 0.002\nspike_size = 400.0\nresolution = 0.1",
                (-3000.0, 3000.0),
            )
            for i in range(1, 17)
        ]
        + [
            (
                "temperature",
                "°C",
                "base = 14.0\namplitude = 3.0\nperiod = '1h'\nnoise = 0.05\nresolution = 0.01",
                (-40.0, 85.0),
            )
        ],
    ),
    (
        "manhole",
        6,
        "1s",
        [
            (
                "tilt",
                "°",
                "base = 0.4\nnoise = 0.05\nstep_probability = 0.001\nstep_size = 12.0\n"
                "resolution = 0.1",
                (-90.0, 90.0),
            ),
            (
                "cover_open",
                "",
                "base = 0.0\nstep_probability = 0.0005\nstep_size = 1.0\nresolution = 1",
                (-1.0, 2.0),
            ),
            (
                "water_cm",
                "cm",
                "base = 80.0\ndrift = 0.5\nnoise = 0.3\nresolution = 0.1",
                (0.0, 400.0),
            ),
            (
                "battery",
                "V",
                "base = 3.6\ndrift = -0.001\nnoise = 0.002\nresolution = 0.01",
                (0.0, 5.0),
            ),
        ],
    ),
    (
        "river-gauge",
        3,
        "10s",
        [
            (
                "level",
                "m",
                "base = 2.35\namplitude = 0.2\nperiod = '6h'\nnoise = 0.004\nresolution = 0.001",
                (0.0, 12.0),
            ),
            (
                "flow",
                "m3/s",
                "base = 14.0\namplitude = 2.0\nperiod = '6h'\nnoise = 0.2\nresolution = 0.01",
                (0.0, 500.0),
            ),
            ("water_temp", "°C", "base = 11.0\nnoise = 0.02\nresolution = 0.01", (-5.0, 40.0)),
        ],
    ),
    (
        "air",
        6,
        "10s",
        [
            (
                "pm2_5",
                "µg/m3",
                "base = 12.0\namplitude = 6.0\nperiod = '2h'\nnoise = 1.5\n"
                "spike_probability = 0.01\nspike_size = 60.0\nresolution = 0.1",
                (0.0, 1000.0),
            ),
            (
                "pm10",
                "µg/m3",
                "base = 20.0\namplitude = 8.0\nperiod = '2h'\nnoise = 2.0\nresolution = 0.1",
                (0.0, 1000.0),
            ),
            (
                "no2",
                "ppb",
                "base = 18.0\namplitude = 9.0\nperiod = '3h'\nnoise = 1.0\nresolution = 0.1",
                (0.0, 2000.0),
            ),
            (
                "o3",
                "ppb",
                "base = 30.0\namplitude = 10.0\nperiod = '4h'\nnoise = 1.0\nresolution = 0.1",
                (0.0, 500.0),
            ),
            (
                "co2",
                "ppm",
                "base = 420.0\namplitude = 30.0\nperiod = '1h'\nnoise = 3.0\nresolution = 1",
                (0.0, 10000.0),
            ),
            (
                "temperature",
                "°C",
                "base = 16.0\namplitude = 4.0\nperiod = '6h'\nnoise = 0.05\nresolution = 0.01",
                (-40.0, 85.0),
            ),
            (
                "humidity",
                "%",
                "base = 65.0\namplitude = 10.0\nperiod = '6h'\nnoise = 0.3\nresolution = 0.1",
                (0.0, 100.0),
            ),
        ],
    ),
    (
        "noise",
        6,
        "1s",
        [
            (
                "laeq_1s",
                "dB(A)",
                "base = 58.0\namplitude = 6.0\nperiod = '30m'\nnoise = 2.5\n"
                "spike_probability = 0.01\nspike_size = 25.0\nresolution = 0.1",
                (20.0, 140.0),
            ),
            (
                "lafmax_1s",
                "dB(A)",
                "base = 66.0\namplitude = 6.0\nperiod = '30m'\nnoise = 3.5\nresolution = 0.1",
                (20.0, 140.0),
            ),
        ],
    ),
    (
        "streetlight",
        6,
        "10s",
        [
            (
                "power",
                "W",
                "base = 48.0\nnoise = 0.4\nstep_probability = 0.002\nstep_size = 48.0\n"
                "resolution = 0.1",
                (-1.0, 400.0),
            ),
            (
                "voltage",
                "V",
                "base = 230.0\namplitude = 2.0\nperiod = '1h'\nnoise = 0.3\nresolution = 0.1",
                (0.0, 300.0),
            ),
            ("current", "A", "base = 0.21\nnoise = 0.002\nresolution = 0.001", (0.0, 5.0)),
            ("lamp_on", "", "base = 1.0\nresolution = 1", (-1.0, 2.0)),
            ("burn_hours", "h", "base = 18234.0\ndrift = 1.0\nresolution = 1", (0.0, 1e6)),
            (
                "dimming",
                "%",
                "base = 80.0\nstep_probability = 0.001\nstep_size = 20.0\nresolution = 1",
                (0.0, 100.0),
            ),
            (
                "temperature",
                "°C",
                "base = 22.0\namplitude = 5.0\nperiod = '6h'\nnoise = 0.1\nresolution = 0.1",
                (-40.0, 120.0),
            ),
            (
                "ambient_lux",
                "lx",
                "base = 400.0\namplitude = 390.0\nperiod = '24h'\nnoise = 5.0\nresolution = 1",
                (0.0, 100000.0),
            ),
        ],
    ),
]


# what each kind of point does on the gateway, after its range check: spike filters,
# compression (deadband, swinging door), aggregates, and the alarm rules of a street block
_STAGES: dict[tuple[str, str], str] = {
    ("bridge", "strain"): (
        '{ type = "hampel", window = 7, threshold = 3.0 }, '
        '{ type = "threshold", id = "overstrain", above = 600.0, hysteresis = 50.0, '
        'for = "3s", severity = "critical" }, '
        '{ type = "sdt", deviation = 3.0, max_interval = "1m" }'
    ),
    ("bridge", "temperature"): ('{ type = "deadband", band = 0.1, heartbeat = "5m" }'),
    ("manhole", "tilt"): (
        '{ type = "threshold", id = "cover-tilted", above = 5.0, hysteresis = 1.0, '
        'severity = "critical" }, '
        '{ type = "deadband", band = 0.3, heartbeat = "5m" }'
    ),
    ("manhole", "cover_open"): (
        '{ type = "threshold", id = "cover-open", above = 0.5, severity = "critical" }, '
        '{ type = "deadband", band = 0.5, heartbeat = "1m" }'
    ),
    ("manhole", "water_cm"): ('{ type = "sdt", deviation = 0.5, max_interval = "5m" }'),
    ("manhole", "battery"): (
        '{ type = "threshold", id = "battery-low", below = 3.65, hysteresis = 0.05, for = "1s" }, '
        '{ type = "deadband", band = 0.01, heartbeat = "10m" }'
    ),
    ("river-gauge", "level"): (
        '{ type = "threshold", id = "flood", above = 4.0, for = "30s", severity = "critical" }, '
        '{ type = "flatline", id = "gauge-stuck", for = "30m" }, '
        '{ type = "sdt", deviation = 0.005, max_interval = "10m" }'
    ),
    ("river-gauge", "flow"): (
        '{ type = "ema", alpha = 0.5 }, { type = "sdt", deviation = 0.2, max_interval = "10m" }'
    ),
    ("river-gauge", "water_temp"): ('{ type = "deadband", band = 0.05, heartbeat = "10m" }'),
    ("air", "pm2_5"): (
        '{ type = "hampel", window = 5, threshold = 3.5 }, '
        '{ type = "threshold", id = "pm25-high", above = 55.0, hysteresis = 5.0, for = "1m" }, '
        '{ type = "deadband", band = 0.5, heartbeat = "5m" }'
    ),
    ("air", "pm10"): (
        '{ type = "median", window = 3 }, { type = "deadband", band = 1.0, heartbeat = "5m" }'
    ),
    ("air", "no2"): ('{ type = "deadband", band = 1.0, heartbeat = "5m" }'),
    ("air", "o3"): ('{ type = "deadband", band = 1.0, heartbeat = "5m" }'),
    ("air", "co2"): (
        '{ type = "ratelimit", max_rate = 20.0 }, '
        '{ type = "deadband", band = 5.0, heartbeat = "5m" }'
    ),
    ("air", "temperature"): ('{ type = "deadband", band = 0.1, heartbeat = "5m" }'),
    ("air", "humidity"): ('{ type = "deadband", band = 0.5, heartbeat = "5m" }'),
    ("noise", "laeq_1s"): (
        '{ type = "threshold", id = "loud", above = 85.0, for = "5s" }, '
        '{ type = "aggregate", window = "10s", functions = ["laeq", "min", "max"] }'
    ),
    ("noise", "lafmax_1s"): ('{ type = "aggregate", window = "10s", functions = ["max"] }'),
    ("streetlight", "power"): (
        '{ type = "bad_quality", id = "meter-fault", count = 3 }, '
        '{ type = "deadband", band = 2.0, heartbeat = "1m" }'
    ),
    ("streetlight", "voltage"): ('{ type = "deadband", band = 1.0, heartbeat = "5m" }'),
    ("streetlight", "current"): ('{ type = "deadband", band = 0.01, heartbeat = "5m" }'),
    ("streetlight", "lamp_on"): ('{ type = "deadband", band = 0.5, heartbeat = "5m" }'),
    ("streetlight", "burn_hours"): ('{ type = "deadband", band = 0.5, heartbeat = "10m" }'),
    ("streetlight", "dimming"): ('{ type = "deadband", band = 0.5, heartbeat = "5m" }'),
    ("streetlight", "temperature"): ('{ type = "deadband", band = 0.2, heartbeat = "5m" }'),
    ("streetlight", "ambient_lux"): ('{ type = "sdt", deviation = 10.0, max_interval = "5m" }'),
}


#: the pump station on Modbus TCP: a serial server with two units behind it
MODBUS_UNITS = {1: "sdm120", 2: "adam4017-level"}

# a plausible centre for each unit of measure the demo profiles use
_TYPICAL = {"V": 231.0, "A": 4.8, "W": 1080.0, "VA": 1120.0, "VAr": 140.0, "°": 8.0,
            "Hz": 50.0, "kWh": 18234.5, "kVArh": 1532.0, "m": 2.4, "": 0.96}  # fmt: skip


def modbus_image(profile_name: str) -> RegisterImage:
    """A register image that answers the profile's points with values that move."""
    profile = load_profile(profile_name, Path("."))
    keys = set(ModbusPointSettings.model_fields)
    image = RegisterImage()
    for point in profile.points:
        m = ModbusPointSettings.model_validate({k: v for k, v in point.items() if k in keys})
        if m.table in ("coil", "discrete_input"):
            image.set(m.table, m.address, [True])
            continue
        base = _TYPICAL.get(str(point.get("unit", "")), 1000.0)
        if point.get("unit") == "" and m.datatype == "uint16":
            base = 30000.0  # a raw analog channel, mid-range
        image.wave(
            m.table, m.address, datatype=m.datatype, order=m.order, base=base,
            amplitude=abs(base) * 0.02, period=90.0, scale=m.scale, offset=m.offset,
        )  # fmt: skip
    return image


#: BLE tags heard through a replay of recorded adverts (no radio needed)
_BLE_TAGS = [
    ("kiosk-7-climate", 'address = "A4:C1:38:A1:B2:C3"', "bthome",
     [("temperature", "°C"), ("humidity", "%"), ("rssi", "dBm")]),
    ("bus-stop-12-ruuvi", 'name_pattern = "Ruuvi *"', "ruuvi",
     [("temperature", "°C"), ("humidity", "%"), ("pressure", "hPa")]),
]  # fmt: skip

#: the gateway's own microcontroller (a SimMcu on a pty): its sensors by id, and stages
MCU_DEVICE = "cabinet-mcu"
_MCU_POINTS = [
    (1, "level", "m", "{ type = \"range\", min = 0.0, max = 5.0, action = \"flag\" }, "
     "{ type = \"deadband\", band = 0.01, heartbeat = \"1m\" }"),
    (2, "tilt", "", "{ type = \"threshold\", id = \"cover-tilted\", above = 0.5 }"),
    (3, "temperature", "°C", "{ type = \"deadband\", band = 0.1, heartbeat = \"5m\" }"),
    (4, "supply", "mV", "{ type = \"range\", min = 9000.0, max = 15000.0, action = \"flag\" }, "
     "{ type = \"deadband\", band = 50.0, heartbeat = \"5m\" }"),
]  # fmt: skip

#: air-quality boxes that publish JSON to the site broker (here: the demo's broker)
MQTT_BOXES = ("airbox-1", "airbox-2", "airbox-3")

#: acting at the lowest level: the underpass floods every 20 s (a sine), the gateway
#: computes the inflow from the level and runs the pump itself, within its interlocks
_UNDERPASS = """
[[devices]]
name = "underpass"
driver = "sim"
poll = "500ms"
seed = 99
[[devices.points]]
name = "level"
unit = "m"
base = 0.5
amplitude = 0.45
period = "20s"
noise = 0.01
resolution = 0.01
[[devices.points]]
name = "pump"
writable = true
min = 0
max = 1

[[derived]]
name = "underpass_inflow"
unit = "m3/h"
inputs = { h = "underpass/level" }
expr = "interp(h, [0, 0.5, 1.0], [0, 40, 160])"
max_age = "5s"

[[rules]]
id = "underpass-pump"
inputs = { level = "underpass/level" }
when = "level > 0.8"
until = "level < 0.4"
min_on = "5s"
min_off = "5s"
max_starts_per_hour = 12
start = [
  { write = "underpass/pump", value = 1 },
  { event = "underpass flooding: pump started" },
]
stop = [{ write = "underpass/pump", value = 0 }]
"""

#: with the airboxes: an air-quality index from PM2.5 (US EPA breakpoints, 24 h
#: concentrations applied to the live value for the demo) and a warning sign on the
#: site broker while it is poor
_AQI = """
[[derived]]
name = "aqi_airbox_1"
inputs = { pm = "airbox-1/pm25" }
expr = "interp(pm, [0, 12, 35.4, 55.4, 150.4, 250.4], [0, 50, 100, 150, 200, 300])"
max_age = "1m"

[[rules]]
id = "air-warning-sign"
inputs = { aqi = "derived/aqi_airbox_1" }
when = "aqi > 100"
until = "aqi < 80"
for = "2s"
start = [{ publish = "signs/block-7/air", device = "airbox-1", payload = "AIR QUALITY POOR" }]
stop = [{ publish = "signs/block-7/air", device = "airbox-1", payload = "" }]
"""


async def publish_mqtt_sensors(broker_url: str, stop: asyncio.Event) -> None:
    """The airboxes: every second each publishes one JSON message with its own clock,
    as such boxes do, to sensors/<box>/air."""
    address = BrokerAddress.parse(broker_url)
    rng = random.Random(7)
    async with aiomqtt.Client(address.host, address.port, identifier="demo-airboxes") as client:
        while not stop.is_set():
            now = time.time()
            for i, box in enumerate(MQTT_BOXES):
                body = {
                    "ts": round(now, 3),
                    "data": {
                        "pm25": round(9.0 + 3 * i + rng.gauss(0, 1.2), 1),
                        "no2": round(21.0 + 2 * i + rng.gauss(0, 2.0), 1),
                    },
                }
                await client.publish(f"sensors/{box}/air", orjson.dumps(body), qos=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)


def demo_config_text(
    broker_url: str,
    buffer_path: Path,
    modbus_port: int | None = None,
    site_broker: str | None = None,
    mcu_port: str | None = None,
) -> str:
    """The embedded config of the simulated street block (valid citygw TOML); with
    `modbus_port`, also the pump station on the Modbus simulator at that port, with
    `site_broker`, the airboxes that publish there, and with `mcu_port`, the gateway's
    microcontroller on that serial port."""
    out = [
        '[gateway]\nid = "gw-demo-block-7"\nsite = "Demo street block 7"\n'
        "location = { lat = 52.5200, lon = 13.4050 }\n",
        f'[uplink]\nbroker = "{broker_url}"\nwindow = 8\nbackoff_min = "200ms"\n'
        'backoff_max = "5s"\n',
        f'[buffer]\npath = "{buffer_path.as_posix()}"\ncapacity = "64MB"\nflush_interval = "1s"\n',
    ]
    seed = 0
    for kind, count, poll, points in _BLOCK:
        for n in range(1, count + 1):
            seed += 1
            out.append(
                f'[[devices]]\nname = "{kind}-{n}"\ndriver = "sim"\n'
                f'poll = "{poll}"\nseed = {seed}\n'
            )
            for name, unit, wave, (lo, hi) in points:
                more = _STAGES.get((kind, name)) or _STAGES.get((kind, name.rsplit("_", 1)[0]))
                stages = f'{{ type = "range", min = {lo}, max = {hi}, action = "flag" }}'
                if more:
                    stages += ",\n  " + more.replace("}, {", "},\n  {")
                out.append(
                    f'[[devices.points]]\nname = "{name}"\nunit = "{unit}"\n{wave}\n'
                    f"pipeline = [\n  {stages},\n]\n"
                )
    out.append(_UNDERPASS)
    if site_broker is not None:
        out.append(_AQI)
    if modbus_port is not None:
        for unit_id, profile in MODBUS_UNITS.items():
            out.append(
                f'[[devices]]\nname = "pump-station-{profile}"\ndriver = "modbus"\n'
                f'host = "127.0.0.1"\nport = {modbus_port}\nunit_id = {unit_id}\n'
                f'profile = "{profile}"\npoll = "1s"\n'
            )
    replay = (Path(drivers.ble.__file__).parent / "replay" / "demo.jsonl").as_posix()
    for name, allow, fmt, measurements in _BLE_TAGS:
        out.append(
            f'[[devices]]\nname = "{name}"\ndriver = "ble"\nsource = "replay"\n'
            f'replay_file = "{replay}"\n{allow}\nformat = "{fmt}"\n'
        )
        for measurement, unit in measurements:
            out.append(
                f'[[devices.points]]\nname = "{measurement}"\nunit = "{unit}"\n'
                f'measurement = "{measurement}"\n'
            )
    if site_broker is not None:
        for box in MQTT_BOXES:
            out.append(f'[[devices]]\nname = "{box}"\ndriver = "mqtt"\nbroker = "{site_broker}"\n')
            for quantity, unit in (("pm25", "ug/m3"), ("no2", "ppb")):
                out.append(
                    f'[[devices.points]]\nname = "{quantity}"\nunit = "{unit}"\n'
                    f'topic = "sensors/{{device}}/air"\nformat = "json"\n'
                    f'path = "data.{quantity}"\ntimestamp = "ts"\ntimestamp_format = "epoch_s"\n'
                )
    if mcu_port is not None:
        out.append(
            f'[[devices]]\nname = "{MCU_DEVICE}"\ndriver = "mcu"\nport = "{mcu_port}"\n'
            'sampling_interval = "1s"\n'
        )
        for sensor_id, name, unit, stages in _MCU_POINTS:
            out.append(
                f'[[devices.points]]\nname = "{name}"\nunit = "{unit}"\nsensor_id = {sensor_id}\n'
                f"pipeline = [{stages}]\n"
            )
    return "\n".join(out)


def demo_config(
    broker_url: str,
    buffer_path: Path,
    modbus_port: int | None = None,
    site_broker: str | None = None,
    mcu_port: str | None = None,
) -> Config:
    text = demo_config_text(broker_url, buffer_path, modbus_port, site_broker, mcu_port)
    return parse_config(text, source="<demo>")


async def _stop_task(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
        await asyncio.wait_for(task, timeout=5)


@dataclass(frozen=True, slots=True)
class DemoResult:
    read: int
    sent: int
    ingested: int
    lost: int
    duplicates: int
    bytes_per_point: float  # uplink bytes per reading taken
    read_by_driver: dict[str, int]
    ingested_mcu: int  # readings of the microcontroller's points the platform stored
    alarms_sent: int  # raise and clear events the gateway sent
    alarms_stored: int  # ... and the platform stored
    #: the local rules' actions the gateway recorded, and those the platform stored
    #: (rule: transition action target outcome)
    rule_actions_sent: int = 0
    rule_actions: tuple[str, ...] = ()
    derived_ingested: int = 0  # readings of the derived inflow the platform stored

    def summary(self) -> str:
        return (
            f"demo: read={self.read} sent={self.sent} ingested={self.ingested} "
            f"lost={self.lost} duplicates={self.duplicates} "
            f"bytes_per_point={self.bytes_per_point:.2f}"
        )


def _status_table(agent: Agent, ingested: int, elapsed: float, duration: float) -> Table:
    c = agent.counters
    up = agent.uplink.status if agent.uplink else None
    devices = [h for d in agent.drivers for h in d.health().values()]
    t = Table(title=f"citygw demo — {elapsed:4.0f}/{duration:.0f} s", show_header=False)
    t.add_row("devices / healthy", f"{len(devices)} / {sum(1 for h in devices if h.errors == 0)}")
    t.add_row("read (from drivers)", str(c.read))
    t.add_row("sent (into buffer)", str(c.sent))
    t.add_row("held back (deadband, sdt)", str(c.suppressed))
    t.add_row("aggregate windows", str(c.windows))
    t.add_row("flagged / spikes replaced", f"{c.flagged} / {c.replaced}")
    t.add_row("alarms raised / cleared", f"{c.alarms_raised} / {c.alarms_cleared}")
    if agent.local is not None:
        t.add_row("derived readings", str(agent.local.counters["derived"]))
        for rule_id, r in agent.local.status().items():
            last = r["last_actions"][-1] if r["last_actions"] else None
            what = f"{last['transition']} {last['action']} {last['outcome']}" if last else "-"
            t.add_row(f"rule {rule_id}", f"{r['state']} (last: {what})")
    t.add_row("uplink", up.state if up else "-")
    t.add_row("acked by broker (points)", str(up.published_points if up else 0))
    t.add_row("ingested by platform", str(ingested))
    return t


@dataclass(frozen=True, slots=True)
class DemoConsole:
    """`citygw demo --console`: the platform console over the demo's store, from the start
    (watch it live), and after the run until interrupted. One operator, `demo`, with a
    password made for this run."""

    listen: str
    password: str

    @property
    def url(self) -> str:
        return f"http://{self.listen}/"


async def _start_console(stack: contextlib.AsyncExitStack, db: str, settings: DemoConsole) -> None:
    from central.console.auth import hash_password
    from central.console.config import ConsoleConfig, User
    from central.console.serve import Listen, build, serve

    config = ConsoleConfig(
        users=[User(name="demo", role="operator", password_hash=hash_password(settings.password))]
    )
    listening = asyncio.Event()
    task = asyncio.create_task(
        serve(build(db, config, connections=2), Listen.parse(settings.listen), started=listening),
        name="console",
    )

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)
    done, _ = await asyncio.wait(
        [task, asyncio.create_task(listening.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    if task in done:
        task.result()  # why it could not listen


async def run_demo(
    duration: float,
    console: Console | None = None,
    workdir: Path | None = None,
    use_broker: bool | None = None,
    web: DemoConsole | None = None,
    on_result: Callable[[DemoResult], None] | None = None,
) -> DemoResult:
    """Runs the street block for `duration` seconds, drains, and compares what was sent
    with what the platform stored. `use_broker` defaults to "mosquitto is on PATH"; without
    it the uplink talks to the ingest over an in-process link (cli/loopback.py). With
    `web`, the console serves the store from the start; after the run `on_result` is
    called and the console keeps serving until this is cancelled."""
    console = console or Console(stderr=True)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="citygw-demo-"))
    if use_broker is None:
        use_broker = mosquitto_binary() is not None
    modbus = ModbusSimulator({u: modbus_image(p) for u, p in MODBUS_UNITS.items()}, tick_s=1.0)
    async with contextlib.AsyncExitStack() as stack:
        await modbus.start()
        stack.push_async_callback(modbus.stop)
        mcu = await stack.enter_async_context(SimMcu.on_pty(interval=1.0, seed=7).running())
        db = f"sqlite:///{workdir / 'platform.db'}"
        store = open_store(db)
        stack.callback(store.close)
        if web is not None:
            await _start_console(stack, db, web)
            console.print(f"console: {web.url} (user demo, password {web.password})")
        ingest_task: asyncio.Task[None] | None = None
        if use_broker:
            broker_url = stack.enter_context(Mosquitto(workdir=workdir)).url
            worker = IngestWorker(
                broker_url,
                store,
                group="citygw-demo",
                client_id="citygw-demo-ingest",
                session_expiry=3600,
            )
            ingest_task = asyncio.create_task(worker.run(), name="ingest")
            await asyncio.wait_for(worker.connected.wait(), timeout=30)
            console.print(f"uplink: private mosquitto at {broker_url}")
            agent = Agent(
                demo_config(broker_url, workdir / "buffer.db", modbus.port, broker_url, mcu.port)
            )
            airboxes_stop = asyncio.Event()
            airboxes = asyncio.create_task(publish_mqtt_sensors(broker_url, airboxes_stop))
            stack.push_async_callback(_stop_task, airboxes, airboxes_stop)
        else:
            broker_url = "mqtt://127.0.0.1"  # never contacted: the link is in-process
            worker = IngestWorker(broker_url, store, group=None)
            agent = Agent(
                demo_config(broker_url, workdir / "buffer.db", modbus.port, mcu_port=mcu.port),
                connect=LoopbackLink(worker.deliver).connect,
            )
            console.print("uplink: no mosquitto on PATH, using the in-process link")
        try:
            await agent.start()
            started = time.monotonic()
            with Live(console=console, refresh_per_second=2, transient=False) as live:
                while (elapsed := time.monotonic() - started) < duration:
                    ingested = (await asyncio.to_thread(store.counts)).readings
                    live.update(_status_table(agent, ingested, elapsed, duration))
                    await asyncio.sleep(min(0.5, max(0.0, duration - elapsed)))
                # stop reading, put everything in memory into the buffer, let it drain
                await agent.stop_drivers()
                await agent.flush()
                drained = await agent.drain(timeout=60.0)
                # the platform has everything once it stored as many as were sent
                deadline = time.monotonic() + 30.0
                while time.monotonic() < deadline:
                    ingested = (await asyncio.to_thread(store.counts)).readings
                    if ingested >= agent.counters.sent:
                        break
                    await asyncio.sleep(0.1)
                live.update(_status_table(agent, ingested, time.monotonic() - started, duration))
            console.line()
            if not drained:
                console.print("[yellow]buffer not drained within 60 s[/]")
        finally:
            await agent.stop()
            if ingest_task is not None:
                ingest_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ingest_task
        counts = store.counts()
        dups = store.duplicate_readings()
        gateway = agent.config.gateway.id
        alarms_stored = len(store.alarms(gateway))
        ingested_mcu = sum(
            len(store.readings(gateway, f"{MCU_DEVICE}/{name}")) for _, name, _, _ in _MCU_POINTS
        )
        actions = tuple(
            f"{a.rule}: {a.transition} {a.action} {a.target} {a.outcome}".replace("  ", " ")
            for _, a in store.rule_actions(gateway)
        )
        for line in actions:
            console.print(f"rule action (platform): {line}")
        derived = len(store.readings(gateway, "derived/underpass_inflow"))
        result = _result(agent, counts.readings, dups, alarms_stored, ingested_mcu, actions)
        result = replace(result, derived_ingested=derived)
        if web is not None:
            if on_result is not None:
                on_result(result)
            console.print(
                f"console: serving {web.url} (user demo, password {web.password}) "
                "until interrupted (Ctrl-C)"
            )
            await asyncio.Event().wait()
    return result


def _result(
    agent: Agent,
    ingested: int,
    dups: int,
    alarms_stored: int,
    ingested_mcu: int,
    rule_actions: tuple[str, ...],
) -> DemoResult:
    c = agent.counters
    up = agent.uplink.status if agent.uplink else None
    return DemoResult(
        read=c.read,
        sent=c.sent,
        ingested=ingested,
        lost=c.sent - ingested,
        duplicates=dups,
        bytes_per_point=(up.published_bytes / c.read) if up and c.read else 0.0,
        read_by_driver={
            d.name: sum(h.readings for h in d.health().values()) for d in agent.drivers
        },
        ingested_mcu=ingested_mcu,
        alarms_sent=c.alarms_raised + c.alarms_cleared,
        alarms_stored=alarms_stored,
        rule_actions_sent=sum(agent.local.counters[k] for k in ("done", "suppressed", "failed"))
        if agent.local
        else 0,
        rule_actions=rule_actions,
    )
