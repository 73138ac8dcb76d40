from __future__ import annotations

import pytest

from common.mqtt_url import BrokerAddress


def test_defaults_and_credentials() -> None:
    a = BrokerAddress.parse("mqtt://127.0.0.1:1884")
    assert (a.host, a.port, a.tls, a.has_path) == ("127.0.0.1", 1884, False, False)
    a = BrokerAddress.parse("mqtts://user:p%40ss@broker.city")
    assert (a.host, a.port, a.tls, a.username, a.password) == (
        "broker.city",
        8883,
        True,
        "user",
        "p@ss",
    )
    assert BrokerAddress.parse("mqtt://broker.city/x").has_path


@pytest.mark.parametrize("url", ["http://x", "mqtt://", "mqtt://host:0", "mqtt://host:99999"])
def test_rejected_with_the_url_named(url: str) -> None:
    with pytest.raises(ValueError, match="not a valid broker URL"):
        BrokerAddress.parse(url)
