"""A private Mosquitto broker on a free loopback port, for the demo, the tests and
the benchmarks: started from the binary on PATH with a config written to a
temporary directory, stoppable and restartable on the same port (outages).

For the security tests: `tls_listener` (a TLS listener, optionally requiring client
certificates) for `extra_conf`, and `write_password_file` with `allow_anonymous=False`.
For a broker with the shipped ACL (deploy/mosquitto/citygw.acl): `acl_conf` (users,
their password file and the ACL, for `extra_conf`) and `gateway_listener`."""

from __future__ import annotations

import base64
import getpass
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

#: deploy/mosquitto in a source checkout: the shipped ACL and mosquitto.conf
DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"
SHIPPED_ACL = DEPLOY_DIR / "citygw.acl"
SHIPPED_CONF = DEPLOY_DIR / "citygw.conf"
#: the platform's role users in the shipped ACL (a '.' makes them invalid gateway ids)
ROLE_INGEST = "role.ingest"
ROLE_COMMANDS = "role.commands"


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


def tls_listener(
    port: int,
    cafile: Path,
    certfile: Path,
    keyfile: Path,
    *,
    require_certificate: bool = False,
    use_identity_as_username: bool = False,
    use_username_as_clientid: bool = False,
) -> str:
    """mosquitto.conf lines for a TLS listener on 127.0.0.1:`port` (for `extra_conf`):
    the broker's certificate and key, and the CA its clients' certificates must chain to
    when `require_certificate`; `use_identity_as_username` makes a client certificate's
    CN its username, `use_username_as_clientid` the username its client id."""
    lines = [
        f"listener {port} 127.0.0.1",
        f"cafile {cafile}",
        f"certfile {certfile}",
        f"keyfile {keyfile}",
    ]
    if require_certificate:
        lines.append("require_certificate true")
    if use_identity_as_username:
        lines.append("use_identity_as_username true")
    if use_username_as_clientid:
        lines.append("use_username_as_clientid true")
    return "\n" + "\n".join(lines) + "\n"


def gateway_listener(port: int) -> str:
    """mosquitto.conf lines for a plain listener on 127.0.0.1:`port` for gateways, as
    the shipped citygw.conf has them (there with TLS): the client id is the username, so
    no client can take over another's session by its client id. The broker's own
    listener (`Mosquitto.port`) stays the platform's, where clients keep their ids."""
    return f"\nlistener {port} 127.0.0.1\nuse_username_as_clientid true\n"


def write_acl_file(path: Path, prefix: str = "citygw") -> Path:
    """The shipped ACL (deploy/mosquitto/citygw.acl) at `path`, its topics moved under
    `prefix` the way its header tells a deployment to (the leading ``citygw/``)."""
    try:
        text = SHIPPED_ACL.read_text()
    except OSError as exc:
        raise BrokerError(
            f"cannot read the shipped ACL {SHIPPED_ACL} (a source checkout has it): {exc}"
        ) from None
    lines = [
        line.replace(" citygw/", f" {prefix}/", 1)
        if line.startswith(("topic ", "pattern "))
        else line
        for line in text.splitlines()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def acl_conf(workdir: Path, users: Mapping[str, str], *, prefix: str = "citygw") -> str:
    """mosquitto.conf lines (for `Mosquitto(extra_conf=...)`) for the shipped ACL: no
    anonymous clients, `users` (name -> password; a gateway's name is its id, the
    platform's are ROLE_INGEST and ROLE_COMMANDS) in a password file, and the ACL, both
    written to `workdir`. E.g.::

        conf = acl_conf(work, {"gw-1": "pw1", ROLE_INGEST: "pw2"}) + gateway_listener(p)
        with Mosquitto(workdir=work, extra_conf=conf) as broker: ...
    """
    passwords = write_password_file(workdir / "citygw.passwd", users)
    acl = write_acl_file(workdir / "citygw.acl", prefix)
    # after the Mosquitto's own "allow_anonymous true": the last one counts
    return f"\nallow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n"


def write_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A Mosquitto password file for `users` (name -> password), mode 0600: made by
    `mosquitto_passwd` when it is installed, else in its PBKDF2-SHA512 format ($7$)."""
    path.write_text("")
    path.chmod(0o600)
    tool = shutil.which("mosquitto_passwd")
    if tool is not None:
        for user, password in users.items():
            subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
        return path
    lines = []
    for user, password in users.items():
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
        b64 = base64.b64encode
        lines.append(f"{user}:$7$101${b64(salt).decode()}${b64(digest).decode()}\n")
    path.write_text("".join(lines))
    return path


class Mosquitto:
    """`with Mosquitto() as broker: ... broker.url ...`"""

    def __init__(
        self,
        port: int | None = None,
        workdir: Path | None = None,
        extra_conf: str = "",
        *,
        allow_anonymous: bool = True,
        password_file: Path | None = None,
    ) -> None:
        """`extra_conf` is appended to the generated mosquitto.conf (e.g. a TLS listener,
        see `tls_listener`). `allow_anonymous=False` with a `password_file` (see
        `write_password_file`) makes every listener require a username and password."""
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
        auth = f"allow_anonymous {'true' if allow_anonymous else 'false'}\n"
        if password_file is not None:
            auth += f"password_file {password_file}\n"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # started as root, mosquitto would switch to user "mosquitto", which cannot
            # write the persistence file and log in our (private) work directory
            f"user {getpass.getuser()}\n" + auth +
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
