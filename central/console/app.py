"""The console's HTTP API and web page (Starlette).

Every /api route but login and health needs an identity: a session cookie from
POST /api/login, or an ``Authorization: Bearer`` token. Changes (POST) need the role
operator and, with a session, the session's CSRF token in ``X-CSRF-Token``; a POST body must
be JSON (a cross-site form cannot send that without the browser asking first). Errors are
``{"error": "..."}`` with 400 (a bad parameter, named), 401, 403, 404 (what was not found),
409 (an event action its state does not allow) or 500 (logged here, never a trace there).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

import orjson
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from central.console import vitals as vitals_mod
from central.console.auth import (
    CSRF_HEADER,
    SESSION_COOKIE,
    Accounts,
    Identity,
    LoginThrottle,
    session_id_hash,
)
from central.console.config import ConsoleConfig
from central.console.live import LiveHub
from central.console.pool import StorePool
from central.events import EventConflict
from central.sessions import Session
from central.store import Store, StoreMissing
from central.times import iso, now_ms, parse_when
from native.batch import QUALITY_NAMES

log = logging.getLogger("citygw.console")

STATIC: Final = Path(__file__).parent / "static"
EVENT_STATES: Final = ("open", "raised", "acknowledged", "handling", "resolved", "all")
EVENT_ACTIONS: Final = ("ack", "assign", "note", "resolve")
FLEET_SORTS: Final = ("gateway", "state", "last_seen", "backlog", "lost", "evicted", "events")
#: a POST body larger than this is refused (a note is text for people, not a file)
MAX_BODY: Final = 16_384
MAX_NOTE: Final = 2_000
MAX_NAME: Final = 100
#: CSV export: a range with more readings is refused with the count (narrow it)
MAX_CSV_ROWS: Final = 500_000
#: what "recent" means: the summary of event handling times, a gateway page's alarms
RECENT_MS: Final = 7 * 86_400_000
#: a gateway's page shows its last pushes (the whole history: `citygw platform configs`)
CONFIG_PUSHES_SHOWN: Final = 20
SECURITY_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
}


class JSON(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def fail(status: int, message: str) -> HTTPException:
    return HTTPException(status, message)


# -- parameters ------------------------------------------------------------------------------


def _param(request: Request, name: str, default: str | None = None) -> str | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    if len(value) > 500:
        raise fail(400, f"{name}: longer than 500 characters")
    return value


def _required(request: Request, name: str) -> str:
    value = _param(request, name)
    if value is None:
        raise fail(400, f"{name}: required")
    return value


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    text = _param(request, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise fail(400, f"{name}: {text!r} is not an integer") from None
    if not lo <= value <= hi:
        raise fail(400, f"{name}: {value} is outside {lo}..{hi}")
    return value


def _choice(request: Request, name: str, choices: tuple[str, ...], default: str) -> str:
    value = _param(request, name, default)
    assert value is not None
    if value not in choices:
        raise fail(400, f"{name}: {value!r} is not one of {', '.join(choices)}")
    return value


def _time(request: Request, name: str, default: str, now: int) -> int:
    text = _param(request, name, default)
    assert text is not None
    try:
        return parse_when(text, now)
    except ValueError as exc:
        raise fail(400, f"{name}: {exc}") from None


async def _body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise fail(415, "the body must be JSON (Content-Type: application/json)")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise fail(413, f"the body is larger than {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        raise fail(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise fail(400, "the body must be a JSON object")
    return body


def _text(body: Mapping[str, Any], name: str, limit: int, required: bool) -> str | None:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise fail(400, f"{name}: required")
        return None
    if not isinstance(value, str):
        raise fail(400, f"{name}: must be text")
    if len(value) > limit:
        raise fail(400, f"{name}: longer than {limit} characters")
    return value.strip()


# -- the app -------------------------------------------------------------------------------


@dataclass(slots=True)
class Console:
    pool: StorePool
    config: ConsoleConfig
    accounts: Accounts
    live: LiveHub
    session_ttl_ms: int
    throttle: LoginThrottle

    async def store(self, call: Callable[[Store], Any]) -> Any:
        return await self.pool.run(call)

    # -- who --------------------------------------------------------------------------------

    async def identity(self, request: Request) -> Identity:
        if not self.accounts.configured:  # loopback only (serve refuses otherwise)
            return LOCAL
        auth = request.headers.get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            who = self.accounts.bearer(token.strip()) if scheme.lower() == "bearer" else None
            if who is None:
                raise fail(401, "invalid bearer token")
            return who
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            h = session_id_hash(sid)
            now = now_ms()
            s: Session | None = await self.store(lambda st: st.session_get(h, now))
            if s is not None:
                return Identity(s.user, s.role, s.csrf, h)
        raise fail(401, "log in first")

    async def require(self, request: Request, role: str = "viewer") -> Identity:
        who = await self.identity(request)
        origin = request.headers.get("origin")
        if request.method == "POST" and origin is not None and origin != _own_origin(request):
            raise fail(403, f"a change from another site ({origin}) is refused")
        if request.method == "POST" and who.csrf is not None:
            sent = request.headers.get(CSRF_HEADER, "")
            if not secrets.compare_digest(sent.encode(), who.csrf.encode()):
                raise fail(403, "missing or wrong CSRF token (X-CSRF-Token)")
        if not who.may(role):
            raise fail(403, f"{who.name} is a {who.role}; this needs the role {role}")
        return who

    # -- session ---------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        if not self.accounts.configured:
            raise fail(400, "no users are configured: this console needs no login")
        body = await _body(request)
        name = _text(body, "user", MAX_NAME, True)
        password = body.get("password")
        if not isinstance(password, str) or not password or len(password) > 1000:
            raise fail(400, "password: required")
        assert name is not None
        client = request.client.host if request.client else "?"
        if self.throttle.blocked(client):
            log.warning("console: login throttled", extra={"user": name, "client": client})
            raise fail(429, "too many failed logins from this address; wait a minute")
        role = await run_in_threadpool(self.accounts.login, name, password)
        if role is None:
            self.throttle.failed(client)
            log.warning("console: login refused", extra={"user": name, "client": client})
            raise fail(401, "wrong user name or password")
        self.throttle.succeeded(client)
        sid = secrets.token_urlsafe(32)
        now = now_ms()
        session = Session(name, role, secrets.token_urlsafe(24), now + self.session_ttl_ms)
        h = session_id_hash(sid)
        await self.store(lambda st: st.session_open(h, session, now))
        log.info("console: login", extra={"user": name, "role": role, "client": client})
        response = JSON({"user": name, "role": role, "csrf": session.csrf})
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=self.session_ttl_ms // 1000,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        who = await self.require(request)
        if who.session_hash is not None:
            h = who.session_hash
            await self.store(lambda st: st.session_close(h))
        response = JSON({"ok": True})
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    async def session(self, request: Request) -> Response:
        who = await self.require(request)
        return JSON({"user": who.name, "role": who.role, "csrf": who.csrf})

    async def health(self, request: Request) -> Response:
        """For load balancers: no login, nothing about the store's content."""
        tasks = {name: h.as_dict() for name, h in self.live.health.items()}
        ok = all(h.state != "backoff" for h in self.live.health.values())
        return JSON({"ok": ok, "tasks": tasks}, status_code=200 if ok else 503)

    # -- views -----------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        """The vital signs, fleet counts and event summary: the independent queries run
        at once on the pool's connections (the page waits for the slowest, not the sum)."""
        await self.require(request)
        now = now_ms()
        vitals = vitals_mod.chosen(self.config.vitals)
        by_fleet = [v for v in vitals if v.kind in vitals_mod.FLEET_KINDS]
        by_query = [v for v in vitals if v.kind not in vitals_mod.FLEET_KINDS]

        async def from_fleet() -> tuple[list[Any], list[vitals_mod.Vital]]:
            fleet = await self.store(lambda st: st.fleet())
            found = await self.store(
                lambda st: [vitals_mod.evaluate_one(st, v, now, fleet) for v in by_fleet]
            )
            return fleet, found

        (fleet, fleet_vitals), summary, *query_vitals = await asyncio.gather(
            from_fleet(),
            self.store(lambda st: st.event_summary(now - RECENT_MS)),
            *(
                self.store(partial(vitals_mod.evaluate_one, cfg=v, now_ms=now, fleet=None))
                for v in by_query
            ),
        )
        computed = {
            v.id: found
            for v, found in zip([*by_fleet, *by_query], [*fleet_vitals, *query_vitals], strict=True)
        }
        return JSON(
            {
                "vitals": [computed[v.id] for v in vitals],
                "fleet": {
                    "gateways": len(fleet),
                    "online": sum(1 for g in fleet if g.state == "online"),
                    "offline": sum(1 for g in fleet if g.state == "offline"),
                    "never": sum(1 for g in fleet if g.state is None),
                },
                "events": summary,
                "generated_ms": now,
            }
        )

    async def gateways(self, request: Request) -> Response:
        await self.require(request)
        q = (_param(request, "q") or "").lower()
        state = _choice(request, "state", ("all", "online", "offline", "never"), "all")
        sort = _choice(request, "sort", FLEET_SORTS, "gateway")
        desc = _choice(request, "desc", ("0", "1"), "0") == "1"
        rows = await self.store(lambda st: st.fleet())
        if q:
            rows = [
                g
                for g in rows
                if q in g.gateway.lower()
                or q in (g.site or "").lower()
                or q in (g.software or "").lower()
                or q in (g.config_version or "").lower()
            ]
        if state != "all":
            rows = [g for g in rows if (g.state or "never") == state]
        key: Callable[[Any], Any] = {
            "gateway": lambda g: g.gateway,
            "state": lambda g: (g.state or "", g.state_ms or 0),
            "last_seen": lambda g: g.last_seen_ms or 0,
            "backlog": lambda g: g.stats.backlog_points if g.stats else -1,
            "lost": lambda g: g.stats.lost_points if g.stats else -1,
            "evicted": lambda g: g.stats.evicted_points if g.stats else -1,
            "events": lambda g: g.open_events,
        }[sort]
        rows.sort(key=key, reverse=desc)
        return JSON({"gateways": rows})

    async def gateway(self, request: Request) -> Response:
        await self.require(request)
        gw = request.path_params["gateway"]
        now = now_ms()

        def read(st: Store) -> dict[str, Any] | None:
            found = st.fleet(gw)
            if not found:
                return None
            (row,) = found
            return {
                "gateway": row,
                "devices": st.gateway_devices(gw),
                "events": st.events(gateway=gw, limit=50),
                "alarms": st.alarm_episodes(gw, since_ms=now - RECENT_MS)[-50:],
                # the pushed texts stay out (up to 256 KiB each): `citygw platform configs`
                "configs": {
                    "seen": st.configs_seen(gw),
                    "pushes": [
                        {k: v for k, v in asdict(p).items() if k != "text"}
                        for p in st.config_pushes(gw, limit=CONFIG_PUSHES_SHOWN)
                    ],
                },
            }

        found = await self.store(read)
        if found is None:
            raise fail(404, f"no gateway {gw!r}")
        return JSON(found)

    async def map(self, request: Request) -> Response:
        """Every gateway, and the devices that have a location with their health."""
        await self.require(request)

        def read(st: Store) -> dict[str, Any]:
            rows = st.fleet()
            devices = [
                {
                    "gateway": g.gateway,
                    "device": d.device,
                    "location": d.location,
                    "healthy": d.healthy,
                }
                for g in rows
                if g.device_locations
                for d in st.gateway_devices(g.gateway)
                if d.location is not None
            ]
            return {"gateways": rows, "devices": devices}

        return JSON(await self.store(read))

    async def events(self, request: Request) -> Response:
        await self.require(request)
        state = _choice(request, "state", EVENT_STATES, "open")
        gw = _param(request, "gateway")
        limit = _int(request, "limit", 200, 1, 1000)
        before = _int(request, "before", 0, 0, 2**62) or None
        now = now_ms()

        def read(st: Store) -> dict[str, Any]:
            return {
                "events": st.events(
                    state=None if state == "all" else state,
                    gateway=gw,
                    limit=limit,
                    before_id=before,
                ),
                "summary": st.event_summary(now - RECENT_MS),
            }

        return JSON(await self.store(read))

    async def event(self, request: Request) -> Response:
        await self.require(request)
        event_id = _path_id(request)

        def read(st: Store) -> dict[str, Any] | None:
            e = st.event(event_id)
            return None if e is None else {"event": e, "actions": st.event_actions(event_id)}

        found = await self.store(read)
        if found is None:
            raise fail(404, f"no event {event_id}")
        return JSON(found)

    async def event_action(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in EVENT_ACTIONS:
            raise fail(404, f"no event action {action!r} ({', '.join(EVENT_ACTIONS)})")
        who = await self.require(request, "operator")
        event_id = _path_id(request)
        body = await _body(request)
        assignee = _text(body, "assignee", MAX_NAME, action == "assign")
        note = _text(body, "note", MAX_NOTE, action == "note")
        now = now_ms()
        try:
            event = await self.store(
                lambda st: st.event_act(
                    event_id, action, who.name, now, assignee=assignee, note=note
                )
            )
        except StoreMissing:
            raise fail(404, f"no event {event_id}") from None
        except EventConflict as exc:
            raise fail(409, str(exc)) from None
        log.info(
            "console: event action",
            extra={"event": event_id, "action": action, "user": who.name},
        )
        self.live.wake()
        return JSON({"event": event})

    async def points(self, request: Request) -> Response:
        await self.require(request)
        q = _param(request, "q", "")
        assert q is not None
        gw = _param(request, "gateway")
        limit = _int(request, "limit", 50, 1, 500)
        found = await self.store(lambda st: st.find_points(q, gw, limit))
        return JSON({"points": found})

    async def _point_range(self, request: Request) -> tuple[str, str, int, int]:
        gw = _required(request, "gateway")
        key = _required(request, "point")
        now = now_ms()
        since = _time(request, "since", "24h", now)
        until = _time(request, "until", str(now), now)
        if until <= since:
            raise fail(400, f"until ({iso(until)}) is not after since ({iso(since)})")
        return gw, key, since, until

    async def series(self, request: Request) -> Response:
        await self.require(request)
        gw, key, since, until = await self._point_range(request)
        width = _int(request, "width", 1000, 100, 4000)

        def read(st: Store) -> dict[str, Any] | None:
            point = st.point(gw, key)
            if point is None:
                return None
            s = st.series(gw, point.point_id, since, until, width)
            related = [
                p.key
                for p in st.find_points(key + ":", gw, 50)
                if p.key.startswith(key + ":") and ":" not in p.key[len(key) + 1 :]
            ]
            return {
                "gateway": gw,
                "point": key,
                "unit": point.unit,
                "since_ms": since,
                "until_ms": until,
                "bucket_ms": s.bucket_ms,
                "t": s.t,
                "min": s.vmin,
                "max": s.vmax,
                "mean": s.vmean,
                "n": s.n,
                "n_bad": s.n_bad,
                "related": related,
                "alarms": st.point_alarms(gw, point.point_id, since, until),
            }

        found = await self.store(read)
        if found is None:
            raise await self._no_point(gw, key)
        return JSON(found)

    async def series_csv(self, request: Request) -> Response:
        await self.require(request)
        gw, key, since, until = await self._point_range(request)

        def read(st: Store) -> list[Any] | None:
            if st.point(gw, key) is None:
                return None
            return st.query(key, since, until, gateway=gw, limit=MAX_CSV_ROWS + 1)

        rows = await self.store(read)
        if rows is None:
            raise await self._no_point(gw, key)
        if len(rows) > MAX_CSV_ROWS:
            raise fail(400, f"more than {MAX_CSV_ROWS} readings in this range: narrow it")
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(["time", "ts_ms", "value", "quality"])
        for r in rows:
            value = "" if math.isnan(r.value) else repr(r.value)
            out.writerow([iso(r.ts), r.ts, value, QUALITY_NAMES.get(r.quality, r.quality)])
        name = f"{gw}_{key}".replace("/", "_").replace(":", "_")
        return Response(
            buf.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{name}.csv"'},
        )

    async def _no_point(self, gw: str, key: str) -> HTTPException:
        known = await self.store(lambda st: bool(st.fleet(gw)))
        if not known:
            return fail(404, f"no gateway {gw!r}")
        return fail(404, f"no point {key!r} on gateway {gw!r}")

    async def live_stream(self, request: Request) -> Response:
        await self.require(request)

        async def stream() -> Any:
            async with self.live.subscribe() as q:
                yield ServerSentEvent(data='{"kinds": []}', event="hello")
                while True:
                    kinds = await q.get()
                    yield ServerSentEvent(
                        data=orjson.dumps({"kinds": sorted(kinds)}).decode(), event="change"
                    )

        return EventSourceResponse(stream(), ping=15)

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})


#: who uses a console without users or tokens (loopback only: a workstation, the demo)
LOCAL: Final = Identity("local", "admin", None)


def _own_origin(request: Request) -> str:
    """The origin a page of this console has (the proxy's, behind one)."""
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"


def _path_id(request: Request) -> int:
    text = request.path_params["event_id"]
    if not text.isdigit() or len(text) > 18:
        raise fail(400, f"event id {text!r} is not a number")
    return int(text)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = {"www-authenticate": "Bearer"} if exc.status_code == 401 else None
    return JSON({"error": exc.detail}, status_code=exc.status_code, headers=headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error(
        "console: request failed",
        extra={"path": request.url.path, "error": f"{type(exc).__name__}: {exc}"[:300]},
        exc_info=exc,
    )
    return JSON({"error": "internal error (logged on the server)"}, status_code=500)


def create_app(console: Console) -> Starlette:
    c = console
    api = [
        Route("/api/health", c.health),
        Route("/api/login", c.login, methods=["POST"]),
        Route("/api/logout", c.logout, methods=["POST"]),
        Route("/api/session", c.session),
        Route("/api/overview", c.overview),
        Route("/api/gateways", c.gateways),
        Route("/api/gateways/{gateway}", c.gateway),
        Route("/api/map", c.map),
        Route("/api/events", c.events),
        Route("/api/events/{event_id}", c.event),
        Route("/api/events/{event_id}/{action}", c.event_action, methods=["POST"]),
        Route("/api/points", c.points),
        Route("/api/series", c.series),
        Route("/api/series.csv", c.series_csv),
        Route("/api/live", c.live_stream),
        Route("/", c.index),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(
        routes=api,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response, and no-store to the API's (a pure ASGI
    middleware: it leaves the live stream a stream)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith("/api/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers.setdefault(k, v)
                if api:
                    headers.setdefault("cache-control", "no-store")
            await send(message)

        await self.app(scope, receive, with_headers)
