"""What the gateway (agent/), the platform (central/), the drivers and the command line
share: the wire format, units, log helpers and redaction, broker URLs and connections,
config key paths, the test broker and the command line's output helpers. A leaf: it
imports nothing of citygw's but the kernels (native/)."""
