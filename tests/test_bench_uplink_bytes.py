"""bench/uplink_bytes.py's arithmetic and senders on a short run (a second or two): MQTT and
TLS/TCP framing, the Sparkplug B schema's bytes, every sender given the same readings."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from bench import uplink_bytes as ub  # noqa: E402
from bench.sparkplug_b import DOUBLE, Payload  # noqa: E402


def test_mqtt_publish_qos1_and_tls_tcp_framing() -> None:
    # fixed header, remaining length (1 byte below 128), topic length, topic, packet id
    assert ub.publish_bytes("a/b", 10) == 1 + 1 + 2 + 3 + 2 + 10
    assert ub.publish_bytes("a/b", 200) == 1 + 2 + 2 + 3 + 2 + 200  # 2-byte length
    assert ub.tls_tcp(4) == 4 + 22 + 40  # a PUBACK in its own record and segment
    assert ub.tls_tcp(1400) == 1400 + 22 + 2 * 40  # 1422 bytes: two segments
    assert ub.tls_tcp(20_000) == 20_000 + 2 * 22 + 15 * 40  # two records, 15 segments


def test_sparkplug_payload_bytes_follow_the_official_field_numbers() -> None:
    p = Payload(timestamp=1, seq=3)
    m = p.metrics.add(alias=17, timestamp=1_717_274_700_123)
    m.double_value = 230.1
    raw = p.SerializeToString()
    # timestamp (1, varint), metrics (2, length-delimited), seq (3, varint)
    assert raw[:2] == b"\x08\x01" and raw[2] == 0x12 and raw[-2:] == b"\x18\x03"
    metric = raw[4 : 4 + raw[3]]
    # alias (2), timestamp (3), double_value (13, fixed64): 2 + 7 + 9 bytes
    assert metric[0] == 0x10 and metric[2] == 0x18 and metric[-9] == (13 << 3 | 1)
    assert len(metric) == 18
    birth = Payload()
    birth.metrics.add(name="voltage_l1", alias=1, datatype=DOUBLE).double_value = 1.0
    assert Payload.FromString(birth.SerializeToString()) == birth


def test_a_short_cabinet_run_gives_every_sender_the_same_readings() -> None:
    setup = replace(ub.SETUPS[3], duration_s=120)
    r = ub.run(setup)  # every citygw message is decoded back and compared inside
    sent = r.rows["citygw"].readings
    assert 0 < sent < r.polled  # the deadband/SDT stages held readings back
    for key in ("sparkplug", "tb", "tb_gw", "zstd"):
        assert r.rows[key].readings == sent, key
        assert r.rows[key].mqtt > r.rows[key].payload > 0
        assert r.rows[key].wire > r.rows[key].mqtt
    # Sparkplug sends a DDATA per device per flush, citygw one message per flush
    assert r.rows["sparkplug"].messages >= r.rows["citygw"].messages
    assert r.rows["tb_gw"].messages >= r.rows["tb"].messages
