"""Secrets out of what citygw logs and prints: a URL shows its user but not its password
(``mqtt://ingest:***@broker:1883``, ``postgresql://citygw:***@db/city``), and a libpq
``password=…`` (query parameter or keyword string) shows as ``password=***``.

`redact` is the one way to show a URL or any text that may hold one; the log formatters
(common/logs.py) run each message, field and traceback through it as a safety net, so it
must stay cheap."""

from __future__ import annotations

import re

MASK = "***"

#: names of settings whose values are secrets (also with a prefix: ``mqtt_password``)
SECRET_NAMES = ("password", "passwd", "secret", "token", "api_key", "psk", "bind_key")

_NAMES = "|".join(SECRET_NAMES)

# ``scheme://user:password@host``: the password runs to the last "@" of its word, as
# urlsplit reads it (a raw "@" or "/" in a password is common enough); the user stays.
# Bounded repeats keep the work per "://" bounded whatever the text (no quadratic scans).
_URL_PASSWORD = re.compile(r"(://[^\s:/?#]{0,256}+:)(?:[^\s@]{0,256}+@){1,8}")

# ``password=value`` (libpq keywords, URL query, ``key=value`` log fields) and
# ``"password": "value"`` / ``'password': 'value'`` (JSON, a dict's repr). A quoted value
# may hold spaces; an unquoted one ends at whitespace or "&" (the next query parameter).
_KEYWORD = re.compile(
    rf"""(?ix)
    ( (?:{_NAMES}) \s{{0,8}}=\s{{0,8}}
    | (?:{_NAMES}) ['"] \s{{0,8}}:\s{{0,8}} )
    ( '(?:[^'\\]|\\.){{0,1024}}' | "(?:[^"\\]|\\.){{0,1024}}" | [^\s&]{{1,1024}} )
    """
)

_SECRET_KEY = re.compile(rf"(?i)(?:^|[_.-])(?:{_NAMES})$")


def is_secret_key(name: str) -> bool:
    """Whether a setting or log field called `name` holds a secret: ``password``,
    ``mqtt_password``, ``bind_key`` (not ``password_file``: a path)."""
    return _SECRET_KEY.search(name) is not None


def _quoted_mask(m: re.Match[str]) -> str:
    value = m.group(2)
    quote = value[0] if value[0] in "'\"" and len(value) > 1 else ""
    return f"{m.group(1)}{quote}{MASK}{quote}"


def redact(text: str) -> str:
    """`text` with every URL password and every ``password=…`` value replaced by ``***``;
    text without one is returned as is (and fast: a few substring tests)."""
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)
    lower = text.lower()
    if any(name in lower for name in SECRET_NAMES):
        text = _KEYWORD.sub(_quoted_mask, text)
    return text
