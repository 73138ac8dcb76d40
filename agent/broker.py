"""A private Mosquitto broker on a free loopback port, for the demo, the tests and
the benchmarks: started from the binary on PATH with a config written to a
temporary directory, stoppable and restartable on the same port (outages)."""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class BrokerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None,
    )


class Mosquitto:
    """`with Mosquitto() as broker: ... broker.url ...`"""

    def __init__(
        self, port: int | None = None, workdir: Path | None = None, extra_conf: str = ""
    ) -> None:
        """`extra_conf` is appended to the generated mosquitto.conf (e.g. a TLS listener)."""
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError(
                "mosquitto not found on PATH; install it (Debian/Ubuntu: apt-get install mosquitto)"
            )
        self.binary = binary
        self.port = port or free_port()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="citygw-mosquitto-"))
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # started as root, mosquitto would switch to user "mosquitto", which cannot
            # write the persistence file and log in our (private) work directory
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            # persistence keeps the ingest's session (its subscription and queued
            # messages) across a restart, as a production broker does
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 100000\n"
            "message_size_limit 0\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\n" + extra_conf
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self._proc.returncode} on port {self.port}; "
                    f"see {self.log}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout}s")

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
