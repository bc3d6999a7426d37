"""SessionMiddleware in a deployment of several workers sharing one store, and with a
store another process holds locked: requests are held up only by what they write, and
a request sent before a login but run after it cannot log the visitor out again."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import asyncsession as s
from asyncsession.asgi import SessionMiddleware, get_session
from asyncsession.testing import ManualClock

pytestmark = pytest.mark.anyio

KEY = "test-secret-key-0123456789abcdef"
BASE = "https://testserver"
NOT_RECORDED = "the idle deadline was not moved"

Scope = MutableMapping[str, Any]


def make_app(manager: s.SessionManager, events: list[str] | None = None) -> Any:
    """/health never uses the session, /read answers 503 when it is unavailable,
    /message needs the id (ensure_created; 409 when the cookie's session just ended).
    ``events`` gets "<path> answered" once a response is complete."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def read(request: Request) -> JSONResponse:
        try:
            return JSONResponse(get_session(request.scope).copy())
        except s.StorageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)

    async def write(request: Request) -> JSONResponse:
        get_session(request.scope).update(await request.json())
        return JSONResponse({"ok": True})

    async def login(request: Request) -> JSONResponse:
        session = get_session(request.scope)
        session["user"] = "alice"
        session.rotate()
        return JSONResponse({"ok": True})

    async def message(request: Request) -> JSONResponse:
        try:
            sid = await get_session(request.scope).ensure_created()
        except s.SessionNotFound as exc:
            return JSONResponse({"error": str(exc)}, status_code=409)
        await manager.add_message(sid, "user", "hello")
        return JSONResponse({"id": str(sid)})

    routes = [
        Route("/health", health),
        Route("/read", read),
        Route("/write", write, methods=["POST"]),
        Route("/login", login, methods=["POST"]),
        Route("/message", message, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes, middleware=[Middleware(SessionMiddleware, manager, secret_key=KEY)]
    )
    if events is None:
        return app
    noted = events

    async def noting(scope: Scope, receive: Any, send: Any) -> None:
        async def sending(message: MutableMapping[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                noted.append(f"{scope['path']} answered")

        await app(scope, receive, sending)

    return noting


async def call(
    app: Any, method: str, path: str, cookie: str | None = None, json: Any = None
) -> httpx.Response:
    """One request from a fresh client (no cookie jar): ``cookie`` is what it sends."""
    headers = {"cookie": f"session={cookie}"} if cookie is not None else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
        return await http.request(method, path, headers=headers, json=json)


def cookie_of(response: httpx.Response) -> str:
    return response.cookies["session"]


def id_of(cookie: str) -> uuid.UUID:
    return uuid.UUID(cookie.partition(".")[0])


@asynccontextmanager
async def running(
    repository: s.SessionRepository, **options: Any
) -> AsyncIterator[s.SessionManager]:
    async with s.SessionManager(repository, cleanup_interval=None, **options) as manager:
        yield manager


@contextmanager
def write_locked(db: Path) -> Iterator[None]:
    """Another connection (another process, for SQLite) holds the file's write lock."""
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")


class Noting(logging.Handler):
    """Appends ``label`` to ``events`` for each log record whose message has ``text``
    and the lock's error (not the debug line with the traceback, its second record)."""

    def __init__(self, events: list[str], text: str, label: str) -> None:
        super().__init__(logging.DEBUG)
        self.events, self.text, self.label = events, text, label

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message and "stayed locked by another connection" in message:
            self.events.append(self.label)


@contextmanager
def noting(events: list[str], text: str, label: str) -> Iterator[None]:
    handler = Noting(events, text, label)
    logger = logging.getLogger("asyncsession")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# --- a store another process holds locked ----------------------------------------------


async def test_a_write_lock_held_by_another_process_holds_up_only_writes(
    anyio_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The middleware loaded a cookie's session with a touching get(): on SQLite a write,
    # which waited busy_timeout for the lock (a VACUUM, a migration) and then failed the
    # session as "unreachable", on every route, even those that never use the session.
    # Loading is a read now; the visit is recorded after the response, best-effort.
    clock = ManualClock()
    db = tmp_path / "sessions.db"
    events: list[str] = []
    async with running(s.SQLiteRepository(db, busy_timeout=0.2), clock=clock) as manager:
        app = make_app(manager, events)
        cookie = cookie_of(await call(app, "POST", "/write", json={"user": "alice"}))
        sid = id_of(cookie)
        written = (await manager.get(sid, touch=False)).last_active
        events.clear()
        with (
            caplog.at_level(logging.DEBUG, "asyncsession"),
            noting(events, NOT_RECORDED, "visit not recorded"),
        ):
            with write_locked(db):
                # Within touch_interval of the last recorded activity: nothing to write.
                soon = await call(app, "GET", "/read", cookie)
                clock.advance(5)  # past touch_interval: a visit to record now
                health = await call(app, "GET", "/health", cookie)
                read = await call(app, "GET", "/read", cookie)
                late = await call(app, "POST", "/write", cookie, json={"late": 1})
            unlocked = (await manager.get(sid, touch=False)).last_active
            again = await call(app, "GET", "/read", cookie)
        recorded = (await manager.get(sid, touch=False)).last_active
    assert soon.status_code == read.status_code == again.status_code == 200
    assert soon.json() == read.json() == again.json() == {"user": "alice"}
    assert health.status_code == 200
    for response in (soon, health, read, again):  # still live: the cookie is refreshed
        assert id_of(cookie_of(response)) == sid
    assert late.status_code == 500  # a write waits for the lock, at most busy_timeout
    # Each response was complete before its visit failed to be recorded.
    assert events == [
        "/read answered",
        "/health answered",
        "visit not recorded",
        "/read answered",
        "visit not recorded",
        "/write answered",
        "/read answered",
    ]
    assert unlocked == written  # nothing was written under the lock
    assert recorded == clock.now()  # the next visit is recorded
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and NOT_RECORDED in warnings[0], warnings  # one per outage
    assert "locked" in warnings[0] and str(sid) in warnings[0]
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert not any("unreachable" in r.getMessage() for r in caplog.records)


async def test_a_session_past_this_managers_deadline_is_not_loaded_and_gets_recorded(
    anyio_backend: str, tmp_path: Path
) -> None:
    # Written under a policy without idle_timeout, read by a manager with one: the load
    # (a read) must not select it, and the visit records its deadline as a touch would.
    clock = ManualClock()
    db = tmp_path / "sessions.db"
    async with running(s.SQLiteRepository(db), clock=clock, idle_timeout=None) as old:
        cookie = cookie_of(await call(make_app(old), "POST", "/write", json={"a": 1}))
    clock.advance(120)
    async with running(s.SQLiteRepository(db), clock=clock, idle_timeout=60) as manager:
        read = await call(make_app(manager), "GET", "/read", cookie)
        stored = await manager.repository.get(id_of(cookie))
    assert read.json() == {} and "set-cookie" not in read.headers
    assert stored is not None and stored.expires_at is not None
    assert stored.expires_at <= clock.now()  # recorded: expired for every reader now


# --- a request sent before a login, run after it ---------------------------------------


@asynccontextmanager
async def two_workers(
    db: Path, clock: ManualClock
) -> AsyncIterator[tuple[s.SessionManager, s.SessionManager]]:
    """Two managers over one SQLite file: two worker processes of one site."""
    async with running(s.SQLiteRepository(db), clock=clock) as a:
        async with running(s.SQLiteRepository(db), clock=clock) as b:
            yield a, b


async def test_a_request_sent_before_a_login_and_run_after_it_elsewhere_sends_no_cookie(
    anyio_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Worker A logs the visitor in (rotation); a request the browser sent with the
    # pre-login cookie runs on worker B afterwards. It found no session, created one for
    # its write and sent that cookie: arriving after the login's, it logged the visitor
    # out, and its write sat in an orphan session.
    clock = ManualClock()
    async with two_workers(tmp_path / "sessions.db", clock) as (a, b):
        worker_a, worker_b = make_app(a), make_app(b)
        old = cookie_of(await call(worker_a, "POST", "/write", json={"cart": [1]}))
        clock.advance(10)
        login = await call(worker_a, "POST", "/login", old)
        new = id_of(cookie_of(login))
        clock.advance(2)
        with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
            late = await call(worker_b, "POST", "/write", old, json={"theme": "dark"})
            late_message = await call(worker_b, "POST", "/message", old)
            late_read = await call(worker_b, "GET", "/read", old)
        assert late.status_code == 200 and "set-cookie" not in late.headers
        assert late_message.status_code == 409 and "set-cookie" not in late_message.headers
        assert "ended moments ago" in late_message.json()["error"]
        assert late_read.json() == {} and "set-cookie" not in late_read.headers
        assert (await b.stats()).total == 1  # no orphan session
        after = await b.get(new)
        assert after.state == {"cart": (1,), "user": "alice"} and after.messages.total == 0
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(id_of(old)) in warning and "dropping its changes to keys ['theme']" in warning


async def test_a_visitor_whose_session_ended_long_ago_or_expired_gets_a_new_one(
    anyio_backend: str,
) -> None:
    # Every visitor whose session is gone for good must be able to write again: a dead
    # cookie only keeps a request from starting a session shortly after it was sent.
    clock = ManualClock()
    async with running(s.MemoryRepository(), clock=clock, max_age=100) as manager:
        app = make_app(manager)
        # Deleted server-side (an admin's revocation): dropped while the cookie is fresh.
        revoked = cookie_of(await call(app, "POST", "/write", json={"a": 1}))
        await manager.delete(id_of(revoked))
        clock.advance(30)
        dropped = await call(app, "POST", "/write", revoked, json={"b": 2})
        assert "set-cookie" not in dropped.headers and (await manager.stats()).total == 0
        clock.advance(31)  # a minute after the browser last got that cookie
        fresh = await call(app, "POST", "/write", revoked, json={"b": 2})
        assert (await manager.get(id_of(cookie_of(fresh)))).state == {"b": 2}

        # Expired (max_age) while the cookie is fresh: the store shows it expired.
        clock.advance(95)
        refreshed = cookie_of(await call(app, "GET", "/read", cookie_of(fresh)))
        clock.advance(10)
        assert (await call(app, "GET", "/read", refreshed)).json() == {}
        restarted = await call(app, "POST", "/write", refreshed, json={"c": 3})
        assert (await manager.get(id_of(cookie_of(restarted)))).state == {"c": 3}
        message = await call(app, "POST", "/message", refreshed)
        assert message.status_code == 200 and id_of(cookie_of(message)) != id_of(refreshed)

    async with running(s.MemoryRepository(), clock=clock, idle_timeout=60) as manager:
        app = make_app(manager)
        idle = cookie_of(await call(app, "POST", "/write", json={"a": 1}))
        clock.advance(61)  # idle-expired, then removed by a cleanup pass
        assert await manager.purge_expired() == 1
        fresh = await call(app, "POST", "/write", idle, json={"b": 2})
        assert (await manager.get(id_of(cookie_of(fresh)))).state == {"b": 2}


async def test_a_logout_then_a_write_in_one_request_starts_a_session(
    anyio_backend: str,
) -> None:
    # clear() is the visitor's own logout: keys set after it start a new session.
    clock = ManualClock()
    async with running(s.MemoryRepository(), clock=clock) as manager:

        async def relogin(scope: Scope, receive: Any, send: Any) -> None:
            session = get_session(scope)
            session.clear()
            session["user"] = "bob"
            await JSONResponse({})(scope, receive, send)

        cookie = cookie_of(await call(make_app(manager), "POST", "/write", json={"a": 1}))
        await manager.delete(id_of(cookie))  # ended elsewhere moments ago
        response = await call(
            SessionMiddleware(relogin, manager, secret_key=KEY), "POST", "/", cookie
        )
        assert (await manager.get(id_of(cookie_of(response)))).state == {"user": "bob"}


async def test_a_cookie_from_before_timestamps_still_selects_its_session(
    anyio_backend: str,
) -> None:
    async with running(s.MemoryRepository()) as manager:
        stored = await manager.create(state={"a": 1})
        text = str(stored.id)
        digest = hmac.new(
            KEY.encode(), b"asyncsession.asgi.v1\x00" + text.encode(), hashlib.sha256
        ).digest()
        legacy = f"{text}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"
        response = await call(make_app(manager), "GET", "/read", legacy)
        assert response.json() == {"a": 1}
        resent = cookie_of(response)
        assert resent != legacy and id_of(resent) == stored.id
        middleware = SessionMiddleware(make_app(manager), manager, secret_key=KEY)
        assert middleware.unsign(legacy) == middleware.unsign(resent) == stored.id
        await manager.delete(stored.id)  # no time in it: not taken for a fresh cookie
        restarted = await call(make_app(manager), "POST", "/write", legacy, json={"b": 2})
        assert (await manager.get(id_of(cookie_of(restarted)))).state == {"b": 2}
