"""Who may use the console: users with argon2 password hashes and API tokens, from the
console config; roles viewer < operator < admin; sessions kept in the store
(central/sessions.py); a throttle on failed logins.

A password or token is never logged; a refused login logs the user name and the address."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES: Final = ("viewer", "operator", "admin")
SESSION_COOKIE: Final = "citygw_session"
CSRF_HEADER: Final = "x-csrf-token"
TOKEN_PREFIX: Final = "sha256:"

_hasher = PasswordHasher()
# verified when the user is unknown, so that a refusal takes as long either way and the
# timing does not tell which names exist
_DUMMY_HASH: Final = _hasher.hash(secrets.token_urlsafe(16))


class UserEntry(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def password_hash(self) -> str: ...


class TokenEntry(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def token_hash(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a request is: a user by session or an API client by token."""

    name: str
    role: str
    csrf: str | None  # the session's CSRF token; None for a bearer token (no cookie)
    session_hash: str | None = None

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_password(password: str) -> str:
    """An argon2id hash for the console config (`citygw platform hash-password`)."""
    return _hasher.hash(password)


def token_hash(token: str) -> str:
    """A token's entry in the console config: tokens are long random strings, so a plain
    SHA-256 is enough (no salt or stretching needed, unlike passwords)."""
    return TOKEN_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def session_id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class Accounts:
    def __init__(self, users: Sequence[UserEntry], tokens: Sequence[TokenEntry]) -> None:
        self._users = {u.name: u for u in users}
        self._tokens = {t.token_hash: t for t in tokens}

    @property
    def configured(self) -> bool:
        return bool(self._users or self._tokens)

    def login(self, name: str, password: str) -> str | None:
        """The user's role if the password is right. Slow on purpose (argon2): run it in
        a thread."""
        user = self._users.get(name)
        try:
            _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        return user.role if user else None

    def bearer(self, token: str) -> Identity | None:
        # looked up by its hash: what a timing of the lookup could tell is about the hash
        entry = self._tokens.get(token_hash(token))
        return None if entry is None else Identity(entry.name, entry.role, None)


class LoginThrottle:
    """At most `limit` failed logins per client address in `window_s`; more are refused
    before the password is checked (one process's memory: behind a load balancer each
    process counts its own share)."""

    def __init__(self, limit: int = 5, window_s: float = 60.0, max_clients: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client)
        if times is None:
            if len(self._failures) >= self._max_clients:  # bounded: forget the oldest
                self._failures.pop(next(iter(self._failures)))
            times = self._failures[client] = deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def blocked(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return len(self._recent(client, now)) >= self.limit

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._recent(client, now).append(now)

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)
