"""The ``mqtt`` driver: sensors that publish to a site broker (see README.md).

- topics.py: topic patterns with wildcards and named captures (sans-I/O)
- payloads.py: number / json / csv / binary payload parsers (sans-I/O)
- settings.py: the config models of devices and points
- driver.py: routing (sans-I/O) and the connections to the brokers
"""

from __future__ import annotations

from drivers.mqtt.payloads import PayloadError, parse
from drivers.mqtt.settings import MqttDeviceSettings, MqttPointSettings
from drivers.mqtt.topics import TopicPattern, TopicPatternError

__all__ = [
    "MqttDeviceSettings",
    "MqttPointSettings",
    "PayloadError",
    "TopicPattern",
    "TopicPatternError",
    "parse",
]
