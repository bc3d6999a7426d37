"""SessionMiddleware with a store another process holds locked (requests are held up
only by what they write) and the visit (touch) it records concurrently with each
request: counted from the request's start however long the request runs, recorded
whether the application raises or not, and racing the request's own writes harmlessly."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from test_asgi import running

import asyncsession as s
from asyncsession.asgi import SessionMiddleware, get_session
from asyncsession.testing import ManualClock

pytestmark = pytest.mark.anyio

KEY = "test-secret-key-0123456789abcdef"
BASE = "https://testserver"
NOT_RECORDED = "the idle deadline was not moved"

Scope = MutableMapping[str, Any]


class Boom(Exception):
    """The application's own error, which must reach the server as it is."""


class Gate:
    """Holds a request in its handler: ``entered`` is set when it gets there, and it
    goes on once ``release`` is set (meanwhile a test moves its ManualClock)."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def hold(self) -> None:
        self.entered.set()
        await self.release.wait()


def make_app(
    manager: s.SessionManager,
    events: list[str] | None = None,
    *,
    gate: Gate | None = None,
    clock: ManualClock | None = None,
    errors: list[type[BaseException]] | None = None,
) -> Any:
    """/health never uses the session, /read answers 503 when it is unavailable,
    /message appends one with the id ensure_created() gives (as the chat example does).
    ``gate`` holds /slow (a write), /stream (between two chunks) and /ws (a websocket).
    /background runs a task that takes 100 s of ``clock`` and, with ?fail, raises Boom;
    /raises raises Boom before responding (Starlette's 500 handler notes its type in
    ``errors``). ``events`` gets "<path> answered" once a response is complete."""
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
        session.update(await request.json())
        session.rotate()
        return JSONResponse({"ok": True})

    async def message(request: Request) -> JSONResponse:
        sid = await get_session(request.scope).ensure_created()
        await manager.add_message(sid, "user", "hello")
        return JSONResponse({"id": str(sid)})

    async def slow(request: Request) -> JSONResponse:
        changes = await request.json()
        assert gate is not None
        await gate.hold()
        get_session(request.scope).update(changes)
        return JSONResponse({"ok": True})

    async def stream(request: Request) -> StreamingResponse:
        get_session(request.scope).mark_accessed()

        async def chunks() -> AsyncIterator[bytes]:
            yield b"first "
            assert gate is not None
            await gate.hold()
            yield b"last"

        return StreamingResponse(chunks())

    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_json(get_session(ws.scope).copy())
        assert gate is not None
        await gate.hold()
        await ws.close()

    async def background(request: Request) -> JSONResponse:
        fail = "fail" in request.query_params

        async def task() -> None:
            assert clock is not None
            clock.advance(100)  # a long task (an email sent, a report built)
            if fail:
                raise Boom("the background task failed")

        get_session(request.scope).mark_accessed()
        return JSONResponse({"ok": True}, background=BackgroundTask(task))

    async def raises(request: Request) -> JSONResponse:
        get_session(request.scope).mark_accessed()
        raise Boom("the route failed")

    async def noted(request: Request, exc: Exception) -> Response:
        if errors is not None:
            errors.append(type(exc))
        return Response("noted", status_code=500)

    routes = [
        Route("/health", health),
        Route("/read", read),
        Route("/write", write, methods=["POST"]),
        Route("/login", login, methods=["POST"]),
        Route("/message", message, methods=["POST"]),
        Route("/slow", slow, methods=["POST"]),
        Route("/stream", stream),
        WebSocketRoute("/ws", websocket),
        Route("/background", background),
        Route("/raises", raises),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(SessionMiddleware, manager, secret_key=KEY)],
        exception_handlers={500: noted},
    )
    if events is None:
        return app
    noted_events = events

    async def noting(scope: Scope, receive: Any, send: Any) -> None:
        async def sending(message: MutableMapping[str, Any]) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                noted_events.append(f"{scope['path']} answered")

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
    # Loading is a read now; the visit is recorded concurrently, best-effort.
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
    # Each read's response was complete before its visit failed to be recorded; the
    # write waits for its visit (then for the lock itself) before it is answered.
    assert events == [
        "/read answered",
        "/health answered",
        "visit not recorded",
        "/read answered",
        "visit not recorded",
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


# --- the visit, recorded concurrently with the request ---------------------------------


async def websocket_call(app: Any, cookie: str) -> list[MutableMapping[str, Any]]:
    """One websocket connection to /ws sending ``cookie``: the messages the app sent."""
    incoming: list[MutableMapping[str, Any]] = [{"type": "websocket.connect"}]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        if incoming:
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "wss",
        "path": "/ws",
        "raw_path": b"/ws",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"cookie", f"session={cookie}".encode())],
        "server": ("testserver", 443),
        "subprotocols": [],
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("kind", ["write", "stream", "websocket"])
async def test_a_request_spanning_the_idle_deadline_keeps_the_session(
    anyio_backend: str, tmp_path: Path, kind: str
) -> None:
    # A request arrives 10 s before the idle deadline and takes 15 s (a slow upload, a
    # stream, a websocket). With the visit recorded after the response, the session had
    # expired by then: the write was dropped, the visitor logged out. The visit counts
    # from the request's start, as a touching load did.
    clock = ManualClock()
    gate = Gate()
    async with running(
        s.SQLiteRepository(tmp_path / "sessions.db"), clock=clock, idle_timeout=60
    ) as manager:
        app = make_app(manager, gate=gate)
        cookie = cookie_of(await call(app, "POST", "/write", json={"a": 1}))
        sid = id_of(cookie)
        clock.advance(50)  # an active visitor: 10 s left
        arrived = clock.now()
        answers: list[Any] = []

        async def request() -> None:
            if kind == "write":
                answers.append(await call(app, "POST", "/slow", cookie, json={"b": 2}))
            elif kind == "stream":
                answers.append(await call(app, "GET", "/stream", cookie))
            else:
                answers.append(await websocket_call(app, cookie))

        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            await gate.entered.wait()
            clock.advance(15)  # past the deadline the session had when the request came
            gate.release.set()
        (answer,) = answers
        stored = await manager.get(sid, touch=False)  # live: SessionNotFound otherwise
        if kind == "write":
            assert answer.status_code == 200 and id_of(cookie_of(answer)) == sid
            assert stored.state == {"a": 1, "b": 2}
            assert stored.last_active == clock.now()  # the write moved it on
        else:
            if kind == "stream":
                assert answer.text == "first last" and id_of(cookie_of(answer)) == sid
            else:
                assert [m["type"] for m in answer] == [
                    "websocket.accept",
                    "websocket.send",
                    "websocket.close",
                ]
                assert json.loads(answer[1]["text"]) == {"a": 1}
            assert stored.last_active == arrived  # a full idle window from the request
        clock.advance(10)  # the visitor comes back: still logged in
        assert (await call(app, "GET", "/read", cookie)).json() == {"a": 1} | (
            {"b": 2} if kind == "write" else {}
        )


@pytest.mark.parametrize("path", ["/raises", "/background?fail", "/background", "raw"])
async def test_the_visit_is_recorded_whatever_the_app_raises_and_its_error_passes_as_is(
    anyio_backend: str, tmp_path: Path, path: str
) -> None:
    # Recorded after the response, the visit was skipped when the route raised (before
    # or after responding) or a background task did, and waited for the background
    # tasks (a 100 s task: recorded at its end, past the idle deadline). It is recorded
    # from the request's start now, and the application's own exception reaches the
    # server (and Starlette's 500 handler) as it is, not in an exception group.
    clock = ManualClock()
    errors: list[type[BaseException]] = []

    async def raw(scope: Scope, receive: Any, send: Any) -> None:
        get_session(scope).mark_accessed()
        await JSONResponse({"ok": True})(scope, receive, send)
        raise Boom("after the response")

    async with running(
        s.SQLiteRepository(tmp_path / "sessions.db"), clock=clock, idle_timeout=60
    ) as manager:
        starlette = make_app(manager, clock=clock, errors=errors)
        app = SessionMiddleware(raw, manager, secret_key=KEY) if path == "raw" else starlette
        cookie = cookie_of(await call(starlette, "POST", "/write", json={"a": 1}))
        clock.advance(50)
        arrived = clock.now()
        if path == "/background":
            response = await call(app, "GET", path, cookie)
            assert response.status_code == 200
        else:
            with pytest.raises(Boom) as raised:
                await call(app, "GET", "/" if path == "raw" else path, cookie)
            assert type(raised.value) is Boom
        stored = await manager.repository.get(id_of(cookie))
    assert stored is not None and stored.last_active == arrived
    assert errors == ([Boom] if path in ("/raises", "/background?fail") else [])


async def test_writes_racing_the_visit_are_neither_lost_nor_conflicting(
    anyio_backend: str, any_repository: s.SessionRepository, caplog: pytest.LogCaptureFixture
) -> None:
    # The visit (a touch, which keeps the revision) runs while the request writes the
    # session: updates, a message appended under ensure_created()'s id and a rotation
    # at login, many at once, must all be saved, none refused as a conflict.
    clock = ManualClock()
    async with running(any_repository, clock=clock, idle_timeout=60) as manager:
        app = make_app(manager)
        cookie = cookie_of(await call(app, "POST", "/write", json={"start": 0}))
        sid = id_of(cookie)
        responses: list[httpx.Response] = []

        async def write(key: str) -> None:
            responses.append(await call(app, "POST", "/write", cookie, json={key: 1}))

        async def message() -> None:
            responses.append(await call(app, "POST", "/message", cookie))

        with caplog.at_level(logging.DEBUG, "asyncsession"):
            for round_ in range(3):
                clock.advance(59)  # just before the idle deadline: every request touches
                async with anyio.create_task_group() as tg:
                    for i in range(8):
                        tg.start_soon(write, f"k{round_}.{i}")
                        tg.start_soon(message)
            clock.advance(59)
            login = await call(app, "POST", "/login", cookie, json={"user": "alice"})
        assert [r.status_code for r in responses] == [200] * 48
        assert all(id_of(cookie_of(r)) == sid for r in responses)
        assert {r.json()["id"] for r in responses if "id" in r.json()} == {str(sid)}
        new = id_of(cookie_of(login))
        assert new != sid and not await manager.exists(sid)
        stored = await manager.get(new, touch=False)
        keys = {"start", "user"} | {f"k{r}.{i}" for r in range(3) for i in range(8)}
        assert set(stored.state) == keys and stored.messages.total == 24
        assert stored.last_active == clock.now()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("conflict" in r.getMessage() for r in caplog.records)


async def test_a_request_cancelled_while_its_visit_waits_for_a_lock_ends_by_busy_timeout(
    anyio_backend: str, tmp_path: Path
) -> None:
    # The middleware waits for the visit before it returns; a server cancelling the
    # request (shutting down) ends that wait as soon as the store gives the touch up
    # (a write the store started is finished or failed whole: busy_timeout here).
    clock = ManualClock()
    db = tmp_path / "sessions.db"
    events: list[str] = []
    returned = False
    async with running(s.SQLiteRepository(db, busy_timeout=1), clock=clock) as manager:
        app = make_app(manager, events)
        cookie = cookie_of(await call(app, "POST", "/write", json={"a": 1}))
        clock.advance(5)
        with write_locked(db):
            with anyio.fail_after(30):  # a guard: the wait ends with the store's give-up
                async with anyio.create_task_group() as waited:

                    async def cancel_once_answered() -> None:  # the visit then waits
                        while "/read answered" not in events:  # noqa: ASYNC110 (a plain list)
                            await anyio.sleep(0.01)
                        await anyio.sleep(0.05)
                        waited.cancel_scope.cancel()

                    waited.start_soon(cancel_once_answered)
                    await call(app, "GET", "/read", cookie)
                    returned = True
            assert not returned  # the call waited for the visit, and was cancelled
        assert events == ["/write answered", "/read answered"]  # the response went out
        assert (await call(app, "GET", "/read", cookie)).json() == {"a": 1}
        assert (await manager.get(id_of(cookie), touch=False)).last_active == clock.now()


async def test_cookies_keep_the_released_format(anyio_backend: str) -> None:
    # <uuid>.<base64url HMAC-SHA256 of "asyncsession.asgi.v1\0" + uuid>: the cookies
    # released versions issued keep selecting their session, and are issued alike.
    async with running(s.MemoryRepository()) as manager:
        stored = await manager.create(state={"a": 1})
        text = str(stored.id)
        digest = hmac.new(
            KEY.encode(), b"asyncsession.asgi.v1\x00" + text.encode(), hashlib.sha256
        ).digest()
        released = f"{text}.{base64.urlsafe_b64encode(digest).rstrip(b'=').decode()}"
        response = await call(make_app(manager), "GET", "/read", released)
        assert response.json() == {"a": 1}
        assert cookie_of(response) == released


class Halt(BaseException):
    """An error that is no Exception, as KeyboardInterrupt is."""


class TouchHangs(s.MemoryRepository):
    """A memory store whose touches wait until cancelled (a store that has stopped
    answering writes), or raise ``escape`` (an error that is no Exception) once
    ``failed`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = False
        self.escape: BaseException | None = None
        self.touching = anyio.Event()
        self.failed = anyio.Event()

    async def touch(self, *args: Any, **kwargs: Any) -> s.Session | None:
        if self.escape is not None:
            await self.failed.wait()
            raise self.escape
        if self.hang:
            self.touching.set()
            await anyio.sleep_forever()
        return await super().touch(*args, **kwargs)


async def raw_request(middleware: SessionMiddleware, cookie: str) -> None:
    """One GET / through ``middleware`` with ``cookie``, without a client in between."""
    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": [(b"cookie", f"session={cookie}".encode())],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    await middleware(scope, receive, send)


async def test_what_stops_the_server_goes_on_without_waiting_for_the_visit(
    anyio_backend: str,
) -> None:
    # A SystemExit (or KeyboardInterrupt) the application raised waited, held, for the
    # visit under way (up to the store's timeout: busy_timeout under a SQLite lock).
    clock = ManualClock()
    store = TouchHangs()
    async with running(store, clock=clock) as manager:
        cookie = cookie_of(await call(make_app(manager), "POST", "/write", json={"a": 1}))
        clock.advance(5)  # past touch_interval: a visit is due
        store.hang = True

        async def stops(scope: Scope, receive: Any, send: Any) -> None:
            await store.touching.wait()  # the visit is under way
            raise SystemExit(3)

        middleware = SessionMiddleware(stops, manager, secret_key=KEY)
        with anyio.fail_after(30):  # a guard: it waited for the hanging visit forever
            with pytest.raises(SystemExit) as stopped:
                await raw_request(middleware, cookie)
        assert stopped.value.code == 3


async def test_an_error_that_escapes_the_visit_is_raised_alone_with_the_apps_as_context(
    anyio_backend: str,
) -> None:
    # An error that is no Exception out of the visit's touch (Ctrl-C lands in any task
    # on trio; a third-party store) came out in an exception group, and the
    # application's own error was lost. (Halt stands for KeyboardInterrupt, which
    # asyncio would also raise out of the event loop, ending the test run.)
    clock = ManualClock()
    store = TouchHangs()
    async with running(store, clock=clock) as manager:
        cookie = cookie_of(await call(make_app(manager), "POST", "/write", json={"a": 1}))
        clock.advance(5)
        store.escape = Halt()

        async def fails(scope: Scope, receive: Any, send: Any) -> None:
            store.failed.set()  # the touch raises once the application has failed
            raise Boom("the application failed")

        middleware = SessionMiddleware(fails, manager, secret_key=KEY)
        with pytest.raises(Halt) as interrupted:
            await raw_request(middleware, cookie)
        assert interrupted.value is store.escape
        assert isinstance(interrupted.value.__context__, Boom)
