"""SessionMiddleware driven in-process through httpx's ASGI transport, on asyncio and trio."""

from __future__ import annotations

import itertools
import logging
import re
import types
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import orjson
import pytest
from redis_support import RedisServer
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import asyncsession as s
from asyncsession.asgi import SessionDict, SessionMiddleware, get_session
from asyncsession.testing import ManualClock

pytestmark = pytest.mark.anyio

KEY = "test-secret-key-0123456789abcdef"
OLD_KEY = "old-secret-key-fedcba9876543210"
BASE = "https://testserver"

Scope = MutableMapping[str, Any]


class Gates:
    """Lets a test hold a request inside its handler: ``entered`` then wait ``release``."""

    def __init__(self) -> None:
        self.entered: dict[str, anyio.Event] = {}
        self.release: dict[str, anyio.Event] = {}

    def add(self, name: str) -> tuple[anyio.Event, anyio.Event]:
        self.entered[name] = anyio.Event()
        self.release[name] = anyio.Event()
        return self.entered[name], self.release[name]


def make_app(manager: s.SessionManager, gates: Gates | None = None, **options: Any) -> Starlette:
    """A Starlette app exercising request.session."""
    gates = gates or Gates()
    options.setdefault("secret_key", KEY)

    async def read(request: Request) -> JSONResponse:
        session = request.session
        return JSONResponse({"data": dict(session), "id": str(get_session(request.scope).id)})

    async def write(request: Request) -> JSONResponse:
        request.session.update(await request.json())
        return JSONResponse({"ok": True})

    async def remove(request: Request) -> JSONResponse:
        del request.session[request.path_params["key"]]
        return JSONResponse({"ok": True})

    async def login(request: Request) -> JSONResponse:
        request.session["user"] = "alice"
        request.session.rotate()  # type: ignore[attr-defined]
        return JSONResponse({"ok": True})

    async def logout(request: Request) -> JSONResponse:
        request.session.clear()
        return JSONResponse({"ok": True})

    async def gated(request: Request) -> JSONResponse:
        name = request.path_params["name"]
        request.session.update(await request.json())
        gates.entered[name].set()
        with anyio.fail_after(10):
            await gates.release[name].wait()
        return JSONResponse({"ok": True})

    async def ensure(request: Request) -> JSONResponse:
        request.session["made"] = True
        sid = await get_session(request.scope).ensure_created()
        await manager.add_message(sid, "user", "hello")
        return JSONResponse({"id": str(sid)})

    routes = [
        Route("/read", read),
        Route("/write", write, methods=["POST"]),
        Route("/remove/{key}", remove, methods=["POST"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/gated/{name}", gated, methods=["POST"]),
        Route("/ensure", ensure, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(SessionMiddleware, manager, **options)])


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


async def count(manager: s.SessionManager) -> int:
    return (await manager.stats()).total


def cookie_id(response: httpx.Response) -> uuid.UUID:
    value = response.cookies["session"]
    return uuid.UUID(value.partition(".")[0])


@asynccontextmanager
async def running(
    repository: s.SessionRepository, **options: Any
) -> AsyncIterator[s.SessionManager]:
    async with s.SessionManager(repository, cleanup_interval=None, **options) as manager:
        yield manager


@pytest.fixture
async def manager(any_repository: s.SessionRepository) -> AsyncIterator[s.SessionManager]:
    async with running(any_repository) as manager:
        yield manager


@pytest.fixture
async def memory_manager(anyio_backend: str) -> AsyncIterator[s.SessionManager]:
    async with running(s.MemoryRepository()) as manager:
        yield manager


# --- every store -----------------------------------------------------------------------


async def test_lazy_creation_and_round_trip(manager: s.SessionManager) -> None:
    async with client(make_app(manager)) as http:
        response = await http.get("/read")
        assert response.json()["data"] == {}
        assert "set-cookie" not in response.headers
        assert await count(manager) == 0

        response = await http.post("/write", json={"a": 1, "nested": {"x": [1, 2]}})
        assert response.status_code == 200
        sid = cookie_id(response)
        assert await count(manager) == 1
        stored = await manager.get(sid)
        assert stored.state == {"a": 1, "nested": {"x": (1, 2)}}

        response = await http.get("/read")
        assert response.json() == {"data": {"a": 1, "nested": {"x": [1, 2]}}, "id": str(sid)}
        assert cookie_id(response) == sid  # the same cookie again: Max-Age slides
        assert response.headers["vary"] == "Cookie"


async def test_two_concurrent_requests_changing_different_keys_both_survive(
    manager: s.SessionManager,
) -> None:
    gates = Gates()
    async with client(make_app(manager, gates)) as http:
        sid = cookie_id(await http.post("/write", json={"base": 0}))
        a_in, a_go = gates.add("a")
        b_in, b_go = gates.add("b")
        results: dict[str, httpx.Response] = {}

        async def call(name: str, body: dict[str, Any]) -> None:
            results[name] = await http.post(f"/gated/{name}", json=body)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "a", {"a": 1})
                tg.start_soon(call, "b", {"b": 2})
                await a_in.wait()
                await b_in.wait()  # both loaded the same snapshot
                a_go.set()
                b_go.set()
        assert results["a"].status_code == results["b"].status_code == 200
        assert (await manager.get(sid)).state == {"base": 0, "a": 1, "b": 2}


async def test_delete_key_keeps_concurrent_changes(manager: s.SessionManager) -> None:
    async with client(make_app(manager)) as http:
        sid = cookie_id(await http.post("/write", json={"a": 1, "b": 2}))
        await http.post("/remove/a")
        assert (await manager.get(sid)).state == {"b": 2}


async def test_rotate_keeps_data_and_kills_old_id(manager: s.SessionManager) -> None:
    async with client(make_app(manager)) as http:
        old = await http.post("/write", json={"cart": [1]})
        old_cookie = old.cookies["session"]
        old_id = cookie_id(old)
        response = await http.post("/login")
        new_id = cookie_id(response)
        assert new_id != old_id
        with pytest.raises(s.SessionNotFound):
            await manager.get(old_id)
        assert (await manager.get(new_id)).state == {"cart": (1,), "user": "alice"}
        assert (await http.get("/read")).json()["data"] == {"cart": [1], "user": "alice"}
    async with client(make_app(manager)) as stale:
        response = await stale.get("/read", headers={"cookie": f"session={old_cookie}"})
        assert response.json()["data"] == {}


class PausingRepository(s.MemoryRepository):
    """A memory store whose next ``add`` (with ``pause_saves``, its next ``add`` or
    ``save``: an update's write), or next call of the method :meth:`hold` names, waits
    for ``release`` (after setting ``entered``); its adds fail while ``failing_adds`` is
    set. ``adds`` lists the ids added."""

    def __init__(self, *, pause_saves: bool = False) -> None:
        super().__init__()
        self.entered = anyio.Event()
        self.release: anyio.Event | None = None
        self.held: str | None = None
        self.failing_adds = False
        self.pause_saves = pause_saves
        self.adds: list[uuid.UUID] = []

    def hold(self, method: str | None = None) -> anyio.Event:
        """Hold the next write (or the next call of ``method``: "touch", "get",
        "get_for_update") until the event returned is set (``entered``: a new event,
        set once the call waits)."""
        self.entered = anyio.Event()
        self.release = anyio.Event()
        self.held = method
        return self.release

    async def _pause(self, method: str) -> None:
        if self.release is not None and self.held in (method, None if method == "add" else ""):
            release, self.release = self.release, None
            self.entered.set()
            await release.wait()

    async def add(self, session: s.Session) -> None:
        if self.failing_adds:
            raise s.StorageError("disk on fire", recoverable=True)
        await self._pause("add")
        self.adds.append(session.id)
        await super().add(session)

    async def save(self, session: s.Session, **kwargs: Any) -> None:
        if self.pause_saves:
            await self._pause("add")
        await super().save(session, **kwargs)

    async def touch(self, session_id: uuid.UUID, **kwargs: Any) -> Any:
        await self._pause("touch")
        return await super().touch(session_id, **kwargs)

    async def get(self, session_id: uuid.UUID, **kwargs: Any) -> s.Session | None:
        await self._pause("get")
        return await super().get(session_id, **kwargs)

    async def get_for_update(self, session_id: uuid.UUID) -> s.Session | None:
        await self._pause("get_for_update")
        return await super().get_for_update(session_id)


async def test_login_changes_never_exist_under_the_old_id(anyio_backend: str) -> None:
    # Session fixation: whoever knows the pre-login cookie must never see the login.
    store = PausingRepository()
    async with running(store) as manager, client(make_app(manager)) as http:
        fixated = (await http.post("/write", json={"cart": [1]})).cookies["session"]
        old = {"cookie": f"session={fixated}"}
        release = store.release = anyio.Event()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(http.post, "/login")
                await store.entered.wait()  # the login is storing the new id
                async with client(make_app(manager)) as attacker:
                    during = await attacker.get("/read", headers=old)
                release.set()
        assert during.json()["data"] == {"cart": [1]}
        async with client(make_app(manager)) as attacker:
            assert (await attacker.get("/read", headers=old)).json()["data"] == {}

        # A login whose rotation fails answers 500 and leaves the old session unchanged.
    async with running(store) as manager, client(make_app(manager)) as http:
        fixated = (await http.post("/write", json={"cart": [2]})).cookies["session"]
        store.failing_adds = True
        assert (
            await http.post("/login", headers={"cookie": f"session={fixated}"})
        ).status_code == 500
        store.failing_adds = False
        async with client(make_app(manager)) as attacker:
            response = await attacker.get("/read", headers={"cookie": f"session={fixated}"})
            assert response.json()["data"] == {"cart": [2]}


async def test_rotate_then_ensure_created_gives_an_id_that_stays_valid(
    manager: s.SessionManager,
) -> None:
    seen: list[uuid.UUID] = []

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session["step"] = len(seen)
        session.rotate()
        seen.append(await session.ensure_created())
        await JSONResponse({})(scope, receive, send)

    async with client(SessionMiddleware(handler, manager, secret_key=KEY)) as http:
        first = await http.get("/")  # no stored session: rotate() is a no-op
        second = await http.get("/")  # existing session: ensure_created() rotates now
    assert cookie_id(first) == seen[0] and cookie_id(second) == seen[1] != seen[0]
    assert not await manager.exists(seen[0])
    assert (await manager.get(seen[1])).state == {"step": 1}


async def test_ensure_created_after_a_logout_meanwhile_starts_a_fresh_session(
    memory_manager: s.SessionManager,
) -> None:
    stored = await memory_manager.create(state={"cart": [1]})
    session = SessionDict(memory_manager, await memory_manager.get(stored.id))
    await memory_manager.delete(stored.id)  # another request logged out meanwhile
    session["user"] = "alice"
    session.rotate()
    sid = await session.ensure_created()
    assert sid != stored.id
    assert (await memory_manager.get(sid)).state == {"user": "alice"}  # not the old cart


@asynccontextmanager
async def one_visit(
    store: s.SessionRepository, app: Any, seed: dict[str, Any] | None
) -> AsyncIterator[tuple[s.SessionManager, uuid.UUID]]:
    """One request to ``app`` behind the middleware (with the cookie of a session of
    state ``seed``, unless None); yields the running manager and the cookie's id."""
    async with running(store) as manager:
        middleware = SessionMiddleware(app, manager, secret_key=KEY)
        headers: dict[str, str] = {}
        if seed is not None:
            seeded = await manager.create(state=seed)
            headers = {"cookie": f"session={middleware.sign(seeded.id)}"}
        with anyio.fail_after(10):
            async with client(middleware) as http:
                sid = cookie_id(await http.get("/", headers=headers))
        yield manager, sid


@pytest.mark.parametrize("rotating", [False, True], ids=["create", "rotate"])
async def test_changes_made_while_ensure_created_writes_are_saved_at_the_response(
    anyio_backend: str, rotating: bool
) -> None:
    # Another task of the handler sets a key and changes a nested value while
    # ensure_created() awaits the store: they were not written then, so they stay
    # pending and the response saves them.
    store = PausingRepository()

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session["user"] = "alice"
        session.setdefault("cart", [])
        if rotating:
            session.rotate()
        release = store.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(session.ensure_created)
            await store.entered.wait()  # ensure_created() is storing the session
            session["prefs"] = "dark"
            session["cart"].append("book")
            release.set()
        await JSONResponse({})(scope, receive, send)

    async with one_visit(store, handler, {"cart": []} if rotating else None) as (manager, sid):
        assert (await manager.get(sid)).state == {
            "user": "alice",
            "cart": ("book",),
            "prefs": "dark",
        }
        assert await count(manager) == 1


@pytest.mark.parametrize("callers", [1, 2])
@pytest.mark.parametrize("then", [None, "bob"], ids=["logout", "new-user"])
@pytest.mark.parametrize("rotating", [False, True], ids=["create", "rotate"])
async def test_a_logout_while_ensure_created_writes_logs_its_session_out(
    anyio_backend: str, rotating: bool, then: str | None, callers: int
) -> None:
    # clear() by another task while ensure_created() stores the session: the session
    # it made (or rotated to) was still given to the browser, undoing the logout. Now
    # it is deleted, and the call starts afresh as clear() + ensure_created() would: a
    # fresh session with what was set after the clear, the same for a second caller
    # that was waiting.
    store = PausingRepository()
    made: list[uuid.UUID] = []

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session["user"] = "alice"
        if rotating:
            session.rotate()

        async def ensure(started: anyio.Event | None = None) -> None:
            if started is not None:
                started.set()
            made.append(await session.ensure_created())

        release = store.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ensure)
            await store.entered.wait()  # ensure_created() is storing the session
            if callers == 2:
                waiting = anyio.Event()
                tg.start_soon(ensure, waiting)
                await waiting.wait()
            session.clear()
            if then is not None:
                session["user"] = then
            release.set()
        await JSONResponse({})(scope, receive, send)

    seed = {"cart": ["book"]} if rotating else None
    async with one_visit(store, handler, seed) as (manager, sid):
        assert made == [sid] * callers
        assert await count(manager) == 1  # the old session and the one stored are gone
        assert (await manager.get(sid)).state == ({} if then is None else {"user": then})


@pytest.mark.parametrize("during", ["visit", "rotation"])
async def test_a_logout_while_ensure_created_awaits_the_store_starts_afresh_once(
    anyio_backend: str, during: str
) -> None:
    # clear() while ensure_created() waits for the request's visit, or while its
    # rotation finds the session logged out elsewhere: the logged-out session is gone
    # and one fresh session holds what was set after the clear (no throwaway one).
    store = PausingRepository()
    made: list[uuid.UUID] = []
    gone: list[uuid.UUID] = []

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session["user"] = "alice"
        if during == "rotation":
            old = session.id
            assert old is not None
            gone.append(old)
            await manager.delete(old)  # another request logged out meanwhile
            session.rotate()
            release = store.hold("get")  # the rotation's read of the session waits
        else:
            assert session.id is not None
            gone.append(session.id)
            release = visit_release
        async with anyio.create_task_group() as tg:
            tg.start_soon(ensure, session)
            await store.entered.wait()
            await anyio.wait_all_tasks_blocked()  # ensure_created() waits on the store
            session.clear()
            session["user"] = "bob"
            release.set()
        await JSONResponse({})(scope, receive, send)

    async def ensure(session: SessionDict) -> None:
        made.append(await session.ensure_created())

    async with running(store, touch_interval=None) as manager:
        middleware = SessionMiddleware(handler, manager, secret_key=KEY)
        seeded = await manager.create(state={"cart": ["book"]})
        visit_release = store.hold("touch") if during == "visit" else anyio.Event()
        # (the request's visit waits for visit_release)
        store.adds.clear()
        with anyio.fail_after(10):
            async with client(middleware) as http:
                response = await http.get(
                    "/", headers={"cookie": f"session={middleware.sign(seeded.id)}"}
                )
        assert gone == [seeded.id] and made == [cookie_id(response)] == store.adds
        assert await count(manager) == 1
        assert (await manager.get(made[0])).state == {"user": "bob"}


@pytest.mark.parametrize("rotating", [False, True], ids=["create", "rotate"])
async def test_concurrent_ensure_created_calls_give_one_session(
    anyio_backend: str, rotating: bool
) -> None:
    # Two tasks of one handler call ensure_created() at once. A fresh visitor gets one
    # session, not one per call (the other orphaned); after rotate(), the second call
    # does not rotate again, find the old id gone and start afresh without the
    # visitor's data.
    store = PausingRepository()
    ids: list[uuid.UUID] = []

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session["user"] = "alice"
        if rotating:
            session.rotate()
        calling = anyio.Event()

        async def ensure(event: anyio.Event | None = None) -> None:
            if event is not None:
                event.set()  # the call below starts before the first one is done
            ids.append(await session.ensure_created())

        release = store.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ensure)
            await store.entered.wait()  # the first call is storing the session
            tg.start_soon(ensure, calling)
            await calling.wait()
            release.set()
        await JSONResponse({})(scope, receive, send)

    seed = {"cart": ["book"]} if rotating else None
    async with one_visit(store, handler, seed) as (manager, sid):
        assert ids == [sid, sid]
        assert await count(manager) == 1
        expected = {"cart": ("book",), "user": "alice"} if rotating else {"user": "alice"}
        assert (await manager.get(sid)).state == expected


async def test_a_response_starting_while_ensure_created_writes_sends_its_session(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The response's save waits for an ensure_created() under way and sends the cookie
    # of the session it made, instead of creating a second one.
    store = PausingRepository()
    made: list[uuid.UUID] = []

    async def handler(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session["cart"] = ["book"]
        responding = anyio.Event()

        async def ensure() -> None:
            made.append(await session.ensure_created())

        async def respond() -> None:
            responding.set()
            await JSONResponse({})(scope, receive, send)

        release = store.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ensure)
            await store.entered.wait()  # ensure_created() is storing the session
            tg.start_soon(respond)
            await responding.wait()
            release.set()

    async with running(store) as manager:
        with caplog.at_level(logging.WARNING, "asyncsession.asgi"), anyio.fail_after(10):
            async with client(SessionMiddleware(handler, manager, secret_key=KEY)) as http:
                response = await http.get("/")
        assert made == [cookie_id(response)]
        assert await count(manager) == 1
        assert (await manager.get(made[0])).state == {"cart": ("book",)}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_reading_the_id_varies_on_cookie(memory_manager: s.SessionManager) -> None:
    async def whoami(scope: Scope, receive: Any, send: Any) -> None:
        await JSONResponse({"id": str(get_session(scope).id)})(scope, receive, send)

    async with client(make_app(memory_manager)) as http:
        await http.post("/write", json={"a": 1})
        async with client(SessionMiddleware(whoami, memory_manager, secret_key=KEY)) as other:
            cookie = {"cookie": f"session={http.cookies['session']}"}
            response = await other.get("/", headers=cookie)
            anonymous = await other.get("/", headers={"cookie": ""})
    assert response.headers["vary"] == anonymous.headers["vary"] == "Cookie"
    assert "set-cookie" not in anonymous.headers  # no session: no cookie


async def test_nested_changes_that_python_calls_equal_are_saved(
    memory_manager: s.SessionManager,
) -> None:
    async def toggle(scope: Scope, receive: Any, send: Any) -> None:
        flags = get_session(scope)["flags"]
        flags["beta"] = True  # was 1: equal in Python, not in JSON
        flags["ratio"][0] = 0.0  # was 0
        await JSONResponse({})(scope, receive, send)

    async with client(make_app(memory_manager)) as http:
        sid = cookie_id(await http.post("/write", json={"flags": {"beta": 1, "ratio": [0]}}))
        middleware = SessionMiddleware(toggle, memory_manager, secret_key=KEY)
        async with client(middleware) as other:
            await other.post("/", headers={"cookie": f"session={http.cookies['session']}"})
    flags = (await memory_manager.get(sid)).state["flags"]
    assert flags["beta"] is True and type(flags["ratio"][0]) is float


async def test_logout_wins_over_slow_concurrent_request(
    manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    gates = Gates()
    async with client(make_app(manager, gates)) as http:
        sid = cookie_id(await http.post("/write", json={"user": "alice"}))
        entered, release = gates.add("slow")
        slow: list[httpx.Response] = []

        async def slow_request() -> None:
            slow.append(await http.post("/gated/slow", json={"draft": "x"}))

        with anyio.fail_after(20), caplog.at_level(logging.WARNING, "asyncsession.asgi"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_request)
                await entered.wait()
                out = await http.post("/logout")
                assert "Max-Age=0" in out.headers["set-cookie"]
                release.set()
        assert slow[0].status_code == 200
        assert "set-cookie" not in slow[0].headers
        assert await count(manager) == 0
        with pytest.raises(s.SessionNotFound):
            await manager.get(sid)
        assert any("dropping its changes" in r.getMessage() for r in caplog.records)
        response = await http.get("/read")
        assert response.json()["data"] == {}


@pytest.mark.parametrize("action", ["/login", "/logout"])
async def test_a_slow_read_finishing_after_a_login_or_logout_keeps_the_new_cookie(
    manager: s.SessionManager, action: str
) -> None:
    # The slow request changes nothing: it must not send the cookie it loaded once that
    # session was rotated away or logged out, or the browser would lose its new cookie.
    gates = Gates()
    async with client(make_app(manager, gates)) as http:
        old_id = cookie_id(await http.post("/write", json={"user": "alice"}))
        entered, release = gates.add("slow")
        slow: list[httpx.Response] = []

        async def slow_request() -> None:
            slow.append(await http.post("/gated/slow", json={}))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_request)
                await entered.wait()
                out = await http.post(action)
                release.set()
        assert slow[0].status_code == 200
        assert "set-cookie" not in slow[0].headers
        assert not await manager.exists(old_id)
        data = (await http.get("/read")).json()["data"]  # with the cookie the browser kept
        if action == "/login":
            assert cookie_id(out) != old_id
            assert data == {"user": "alice"}
            assert await count(manager) == 1
        else:
            assert "Max-Age=0" in out.headers["set-cookie"]
            assert data == {}
            assert await count(manager) == 0


@pytest.mark.parametrize("end", ["delete", "close"])
async def test_a_session_ended_by_the_handler_gets_no_cookie_again(
    manager: s.SessionManager, end: str
) -> None:
    async def ender(scope: Scope, receive: Any, send: Any) -> None:
        sid = get_session(scope).id
        assert sid is not None
        if end == "delete":
            await manager.delete(sid)
        else:
            await manager.close(sid)
        await JSONResponse({})(scope, receive, send)

    async with client(make_app(manager)) as http:
        cookie = (await http.post("/write", json={"user": "alice"})).cookies["session"]
    async with client(SessionMiddleware(ender, manager, secret_key=KEY)) as http:
        response = await http.get("/", headers={"cookie": f"session={cookie}"})
    assert response.status_code == 200
    assert "set-cookie" not in response.headers


async def test_a_store_failing_the_liveness_check_only_skips_the_cookie_refresh(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    class UnreadableRepository(s.MemoryRepository):
        failing = False
        reads = 0

        async def get(self, *args: Any, **kwargs: Any) -> s.Session | None:
            self.reads += 1
            if self.failing and self.reads > 1:
                raise s.StorageError("disk on fire", recoverable=True)
            return await super().get(*args, **kwargs)

    store = UnreadableRepository()
    async with running(store) as manager, client(make_app(manager)) as http:
        await http.post("/write", json={"a": 1})
        store.failing, store.reads = True, 0  # the load reads (works), then the check
        with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
            response = await http.get("/read")
        assert response.status_code == 200
        assert response.json()["data"] == {"a": 1}
        assert "set-cookie" not in response.headers
        assert any("is not refreshed" in r.getMessage() for r in caplog.records)
        store.failing = False
        assert "set-cookie" in (await http.get("/read")).headers


async def test_clear_then_write_starts_fresh_session(manager: s.SessionManager) -> None:
    app = make_app(manager)

    async def clear_and_set(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session.clear()
        session["flash"] = "bye"
        await app.router(scope, receive, send)  # answers 404; the session still saves

    wrapped = SessionMiddleware(clear_and_set, manager, secret_key=KEY)
    async with client(make_app(manager)) as http:
        old_cookie = (await http.post("/write", json={"user": "alice"})).cookies["session"]
        old_id = uuid.UUID(old_cookie.partition(".")[0])
    async with client(wrapped) as http:
        response = await http.get("/nowhere", headers={"cookie": f"session={old_cookie}"})
        new_id = cookie_id(response)
    assert new_id != old_id
    assert not await manager.exists(old_id)
    assert (await manager.get(new_id)).state == {"flash": "bye"}


async def test_ensure_created_gives_handler_an_id(manager: s.SessionManager) -> None:
    async with client(make_app(manager)) as http:
        response = await http.post("/ensure")
        sid = uuid.UUID(response.json()["id"])
        assert cookie_id(response) == sid
        stored = await manager.get(sid)
        assert stored.state == {"made": True}
        assert [m.content for m in stored.messages] == ["hello"]


async def test_clear_create_clear_deletes_every_session_it_logged_out(
    manager: s.SessionManager,
) -> None:
    made: list[uuid.UUID] = []

    async def change_of_mind(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session.clear()  # log out the visitor's session
        session["guest"] = True
        made.append(await session.ensure_created())  # a guest session, stored now
        session.clear()  # and log that out too
        await JSONResponse({})(scope, receive, send)

    async with client(make_app(manager)) as http:
        cookie = (await http.post("/write", json={"user": "alice"})).cookies["session"]
    async with client(SessionMiddleware(change_of_mind, manager, secret_key=KEY)) as http:
        response = await http.get("/", headers={"cookie": f"session={cookie}"})
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert len(made) == 1 and await count(manager) == 0  # the first session is gone too
    async with client(make_app(manager)) as http:
        response = await http.get("/read", headers={"cookie": f"session={cookie}"})
        assert response.json()["data"] == {}


async def test_every_response_of_a_live_session_refreshes_its_cookie(
    memory_manager: s.SessionManager,
) -> None:
    # Like Starlette's SessionMiddleware: the same cookie with a fresh Max-Age on every
    # response, so a visitor who keeps using the site (reading, or writing through the
    # manager as the chat example does) is not logged out max_age after the last write.
    async def append(scope: Scope, receive: Any, send: Any) -> None:
        sid = await get_session(scope).ensure_created()
        await memory_manager.add_message(sid, "user", "hi")
        await JSONResponse({})(scope, receive, send)

    async with client(make_app(memory_manager, max_age=600)) as http:
        first = await http.post("/write", json={"a": 1})
        cookie = first.headers["set-cookie"]
        middleware = SessionMiddleware(append, memory_manager, secret_key=KEY, max_age=600)
        async with client(middleware) as other:
            cookie_header = {"cookie": f"session={http.cookies['session']}"}
            appended = await other.post("/", headers=cookie_header)
        for response in (await http.get("/read"), appended):
            assert response.headers["set-cookie"] == cookie
            assert "Max-Age=600" in cookie
            assert response.headers["vary"] == "Cookie"
        assert (await memory_manager.get(cookie_id(first))).messages.total == 1
        await http.post("/logout")
        assert "set-cookie" not in (await http.get("/read")).headers


async def test_session_operations_after_the_response_started_are_refused(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    refused: list[str] = []
    advice = "before the response starts"

    async def late(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        with pytest.raises(s.InvalidUpdate, match=advice) as rotating:
            session.rotate()
        with pytest.raises(s.InvalidUpdate, match=advice) as clearing:
            session.clear()
        with pytest.raises(s.InvalidUpdate, match=advice) as creating:
            await session.ensure_created()
        refused.extend(str(info.value) for info in (rotating, clearing, creating))
        await send({"type": "http.response.body", "body": b""})

    async with client(make_app(memory_manager)) as http:
        sid = cookie_id(await http.post("/write", json={"user": "alice"}))
        cookie = {"cookie": f"session={http.cookies['session']}"}
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        async with client(SessionMiddleware(late, memory_manager, secret_key=KEY)) as http:
            await http.get("/", headers=cookie)  # a visitor with a session
            await http.get("/")  # and one without
    assert len(refused) == 6
    assert [x.id for x in await memory_manager.list(limit=10)] == [sid]  # nothing changed
    assert (await memory_manager.get(sid)).state == {"user": "alice"}
    assert not caplog.records


async def _unused_receive() -> Scope:
    raise AssertionError("not called")


async def _unused_send(message: Scope) -> None:
    raise AssertionError("not called")


async def test_a_logout_whose_response_never_went_out_is_reported(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        get_session(scope).clear()  # and then no response at all

    stored = await memory_manager.create(state={"user": "alice"})
    middleware = SessionMiddleware(app, memory_manager, secret_key=KEY)
    cookie = f"session={middleware.sign(stored.id)}".encode()
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"cookie", cookie)]}
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        await middleware(scope, _unused_receive, _unused_send)
    assert await memory_manager.exists(stored.id)  # nothing is done without a response
    (record,) = caplog.records
    text = record.getMessage()
    assert f"the logout was not done: the stored session {stored.id} stays" in text
    assert "sent no response" in text and "changes" not in text


async def test_a_new_session_whose_cookie_never_went_out_is_reported(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await get_session(scope).ensure_created()  # and then no response at all

    middleware = SessionMiddleware(app, memory_manager, secret_key=KEY)
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        await middleware(
            {"type": "http", "method": "GET", "path": "/"}, _unused_receive, _unused_send
        )
    (stored,) = await memory_manager.list(limit=10)
    (record,) = caplog.records
    assert f"cookie of the new session {stored.id} was never sent" in record.getMessage()
    assert "sent no response" in record.getMessage()


async def test_a_clients_path_cannot_forge_log_lines(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """The ASGI path is percent-decoded client input: logged as is, a ``%0A`` in it
    started a line of the client's choosing (found by helper-51)."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await get_session(scope).ensure_created()

    middleware = SessionMiddleware(app, memory_manager, secret_key=KEY)
    scope = {"type": "http", "method": "GET\n", "path": "/x\nCRITICAL admin logged in"}
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        await middleware(scope, _unused_receive, _unused_send)
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line
    assert "(GET%0A /x%0ACRITICAL%20admin%20logged%20in)" in line


# --- cookies ---------------------------------------------------------------------------


async def test_cookie_attributes(memory_manager: s.SessionManager) -> None:
    async with client(make_app(memory_manager, max_age=600, domain="example.org")) as http:
        header = (await http.post("/write", json={"a": 1})).headers["set-cookie"]
    value, *attributes = [part.strip() for part in header.split(";")]
    name, _, signed = value.partition("=")
    assert name == "session"
    text, _, signature = signed.partition(".")
    assert str(uuid.UUID(text)) == text
    assert len(signature) == 43  # base64url of 32 bytes, unpadded
    assert set(attributes) == {
        "Path=/",
        "Domain=example.org",
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        "Max-Age=600",
    }


def _forgeries(middleware: SessionMiddleware, victim: uuid.UUID) -> dict[str, str]:
    good = middleware.sign(victim)
    text, _, signature = good.partition(".")
    wrong_key = SessionMiddleware(_noop, middleware.manager, secret_key="another-key").sign(victim)
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return {
        "forged signature": f"{text}.{flipped}",
        "wrong key": wrong_key,
        "truncated signature": good[:-3],
        "no signature": text,
        "empty": "",
        "garbage": "not-a-session-value",
        "uppercase id": f"{text.upper()}.{signature}",
        "padded signature": f"{good}==",
        "non-ascii signature": f"{text}.{signature[:-1]}é",
        "two dots": f"{text}.{signature}.{signature}",
        "unknown id, valid signature": middleware.sign(uuid.uuid4()),
    }


async def _noop(scope: Scope, receive: Any, send: Any) -> None:
    raise AssertionError("not called")


async def test_tampered_cookies_never_select_or_adopt(memory_manager: s.SessionManager) -> None:
    manager = memory_manager
    app = make_app(manager)
    middleware = SessionMiddleware(_noop, manager, secret_key=KEY)
    async with client(app) as http:
        victim = cookie_id(await http.post("/write", json={"secret": "victim"}))
    for label, value in _forgeries(middleware, victim).items():
        claimed = value.partition(".")[0]
        async with client(app) as attacker:
            headers = {"cookie": f"session={value}".encode("latin-1")}
            response = await attacker.get("/read", headers=headers)
            assert response.json()["data"] == {}, label
            assert "set-cookie" not in response.headers, label
            response = await attacker.post("/write", json={"x": 1}, headers=headers)
            new_id = cookie_id(response)
            assert str(new_id) != claimed.lower(), label
            assert new_id != victim, label
    assert (await manager.get(victim)).state == {"secret": "victim"}


async def test_unsign_accepts_only_canonical_signed_ids(memory_manager: s.SessionManager) -> None:
    middleware = SessionMiddleware(_noop, memory_manager, secret_key=KEY)
    sid = uuid.uuid4()
    assert middleware.unsign(middleware.sign(sid)) == sid
    for label, value in _forgeries(middleware, sid).items():
        if label == "unknown id, valid signature":
            assert middleware.unsign(value) == uuid.UUID(value.partition(".")[0]) != sid
        else:
            assert middleware.unsign(value) is None, label


async def test_key_rotation(memory_manager: s.SessionManager) -> None:
    manager = memory_manager
    async with client(make_app(manager, secret_key=OLD_KEY)) as http:
        old_cookie = (await http.post("/write", json={"a": 1})).cookies["session"]
    for options in (
        {"secret_key": [KEY, OLD_KEY]},
        {"secret_key": KEY, "fallback_keys": [OLD_KEY]},
    ):
        async with client(make_app(manager, **options)) as http:
            headers = {"cookie": f"session={old_cookie}"}
            response = await http.get("/read", headers=headers)
            assert response.json()["data"]["a"] == 1  # old key verifies
            resigned = response.cookies["session"]  # and the first key signs it again
            assert SessionMiddleware(_noop, manager, secret_key=KEY).unsign(resigned)
            response = await http.post("/write", json={"b": 2}, headers=headers)
            new_cookie = response.cookies["session"]  # new key signs
            only_new = SessionMiddleware(_noop, manager, secret_key=KEY)
            only_old = SessionMiddleware(_noop, manager, secret_key=OLD_KEY)
            assert only_new.unsign(new_cookie) == cookie_id(response)
            assert only_old.unsign(new_cookie) is None
    async with client(make_app(manager, secret_key=KEY)) as http:
        response = await http.get("/read", headers={"cookie": f"session={old_cookie}"})
        assert response.json()["data"] == {}  # retired key no longer verifies


def test_a_single_fallback_key_string_is_one_key() -> None:
    manager = s.SessionManager(s.MemoryRepository())
    middleware = SessionMiddleware(_noop, manager, secret_key=KEY, fallback_keys=OLD_KEY)
    sid = uuid.uuid4()
    assert middleware.unsign(SessionMiddleware(_noop, manager, secret_key=OLD_KEY).sign(sid)) == sid
    one_letter = SessionMiddleware(_noop, manager, secret_key=OLD_KEY[0]).sign(sid)
    assert middleware.unsign(one_letter) is None


def test_short_cookie_keys_are_logged_as_guessable(caplog: pytest.LogCaptureFixture) -> None:
    """One signed cookie lets anyone test key guesses offline (helper-171 found a
    5-character key taken silently): a key under 32 bytes is logged, never shown."""
    manager = s.SessionManager(s.MemoryRepository())
    strong = "k" * 32
    with caplog.at_level(logging.WARNING, logger="asyncsession.asgi"):
        SessionMiddleware(_noop, manager, secret_key=strong, fallback_keys=[strong.encode()])
        assert caplog.records == []
        SessionMiddleware(_noop, manager, secret_key="hunter2", fallback_keys=[strong, "old"])
    (record,) = caplog.records
    message = record.getMessage()
    assert "shorter than the recommended 32 bytes: 2 of 3" in message
    assert "secrets.token_urlsafe" in message
    assert "hunter2" not in message and "old" not in message


async def test_a_secure_cookie_sent_over_plain_http_is_logged_once(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """With the default secure=True, a client on http:// never sends the cookie back and
    every request seems to lose its session (helper-171: nothing said why). The first new
    cookie over plain http is logged, once per middleware; https and localhost are not."""

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "asyncsession.asgi"]

    async def post(app: Starlette, base: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base) as http:
            return await http.post("/write", json={"a": 1})

    with caplog.at_level(logging.WARNING, logger="asyncsession.asgi"):
        app = make_app(memory_manager)
        for base in ("https://testserver", "http://localhost:8000", "http://127.0.0.1"):
            assert "Secure" in (await post(app, base)).headers["set-cookie"]
        for proxied in ({"x-forwarded-proto": "https"}, {"forwarded": "for=1.2.3.4;proto=https"}):
            transport = httpx.ASGITransport(app=app)  # a TLS proxy the server does not trust
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                assert (await http.post("/write", json={"a": 1}, headers=proxied)).cookies
        assert warnings() == []
        for _ in range(2):
            assert "session=" in (await post(app, "http://testserver")).headers["set-cookie"]
        assert await post(make_app(memory_manager, secure=False), "http://testserver")
    (message,) = warnings()
    assert message.startswith("POST /write: a new session cookie marked Secure went out over")
    assert "secure=False" in message and "Serve over https" in message


async def test_several_session_cookies_pick_the_valid_one(memory_manager: s.SessionManager) -> None:
    middleware = SessionMiddleware(_noop, memory_manager, secret_key=KEY)
    async with client(make_app(memory_manager)) as http:
        good = (await http.post("/write", json={"a": 1})).cookies["session"]
    fake = middleware.sign(uuid.uuid4())
    async with client(make_app(memory_manager)) as http:
        cookie = f"other=1; session=garbage; session={fake}; session={good}"
        response = await http.get("/read", headers={"cookie": cookie})
        assert response.json()["data"] == {"a": 1}


def test_configuration_errors() -> None:
    manager = s.SessionManager(s.MemoryRepository())
    for options in (
        {"secret_key": ""},
        {"secret_key": []},
        {"secret_key": KEY, "fallback_keys": [b""]},
        {"secret_key": KEY, "cookie_name": "bad name"},
        {"secret_key": KEY, "same_site": "none", "secure": False},
        {"secret_key": KEY, "max_age": 0},
        {"secret_key": KEY, "path": "/; evil"},
        {"secret_key": KEY, "path": "/日本"},  # not ASCII: could never be sent
        {"secret_key": KEY, "domain": "example.com\x00"},
        {"secret_key": KEY, "path": ""},  # would send "Path=": browsers use the default
        {"secret_key": KEY, "path": "api"},  # a cookie path starts with "/"
        {"secret_key": KEY, "domain": ""},  # would send "Domain="
        {"secret_key": KEY, "max_age": float("nan")},
        {"secret_key": KEY, "max_age": float("inf")},
        {"secret_key": KEY, "max_age": 10**400},  # too large for a float
        {"secret_key": KEY, "max_age": 10**5000},  # too long for repr() on 3.11+
        {"secret_key": KEY, "max_age": 87_000_000_000_000},  # beyond timedelta.max
        {"secret_key": KEY, "fallback_keys": None},
    ):
        with pytest.raises(s.InvalidConfiguration):
            SessionMiddleware(_noop, manager, **options)
    with pytest.raises(s.InvalidConfiguration):
        SessionMiddleware(_noop, object(), secret_key=KEY)  # type: ignore[arg-type]
    for app in (None, 5, "app"):  # accepted, to fail at the first request (helper-220)
        with pytest.raises(s.InvalidConfiguration, match="app must be an ASGI application"):
            SessionMiddleware(app, manager, secret_key=KEY)  # type: ignore[arg-type]
    assert SessionMiddleware(_noop, manager, secret_key=KEY, max_age=0.5).max_age == 1
    longest = SessionMiddleware(_noop, manager, secret_key=KEY, max_age=timedelta.max)
    assert longest.max_age == 86_400_000_000_000


async def test_closed_session_is_not_selected(memory_manager: s.SessionManager) -> None:
    middleware = SessionMiddleware(_noop, memory_manager, secret_key=KEY)
    closed = await memory_manager.create(state={"a": 1})
    await memory_manager.close(closed.id)
    async with client(make_app(memory_manager)) as http:
        headers = {"cookie": f"session={middleware.sign(closed.id)}"}
        assert (await http.get("/read", headers=headers)).json()["data"] == {}
        response = await http.post("/write", json={"b": 2}, headers=headers)
        assert cookie_id(response) != closed.id


# --- expiry, errors --------------------------------------------------------------------


async def test_expired_session_is_not_revived(anyio_backend: str) -> None:
    clock = ManualClock()
    async with running(s.MemoryRepository(), idle_timeout=60, clock=clock) as manager:
        async with client(make_app(manager)) as http:
            old = cookie_id(await http.post("/write", json={"a": 1}))
            clock.advance(30)
            assert (await http.get("/read")).json()["data"] == {"a": 1}  # activity
            clock.advance(59)
            assert (await http.get("/read")).json()["data"] == {"a": 1}
            clock.advance(61)
            assert (await http.get("/read")).json()["data"] == {}
            new = cookie_id(await http.post("/write", json={"b": 2}))
            assert new != old
            assert (await manager.get(new)).state == {"b": 2}


class FailingRepository(s.MemoryRepository):
    """A memory store whose writes fail while ``failing`` is set."""

    failing = False

    async def save(self, *args: Any, **kwargs: Any) -> None:
        if self.failing:
            raise s.StorageError("disk on fire", recoverable=True)
        await super().save(*args, **kwargs)

    async def add(self, session: s.Session) -> None:
        if self.failing:
            raise s.StorageError("disk on fire", recoverable=True)
        await super().add(session)


async def test_storage_error_becomes_500_and_is_logged(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingRepository()
    async with running(store) as manager, client(make_app(manager)) as http:
        await http.post("/write", json={"a": 1})
        store.failing = True
        with caplog.at_level(logging.ERROR, "asyncsession.asgi"):
            response = await http.post("/write", json={"a": 2})
            assert response.status_code == 500
            assert "set-cookie" not in response.headers
            async with client(make_app(manager)) as fresh:
                assert (await fresh.post("/write", json={"z": 1})).status_code == 500
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2
        assert all(isinstance(r.exc_info[1], s.StorageError) for r in errors if r.exc_info)
        store.failing = False
        assert (await http.get("/read")).json()["data"] == {"a": 1}


async def test_sends_after_a_failed_save_raise_so_a_stream_stops(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingRepository()
    store.failing = True
    raised: list[OSError] = []

    class Ticks:
        """An endless event stream: it stops only when send() raises. (Not an async
        generator, which Starlette would leave unclosed: a ResourceWarning on trio.)"""

        chunks = 0

        def __aiter__(self) -> Ticks:
            return self

        async def __anext__(self) -> str:
            await anyio.lowlevel.checkpoint()
            Ticks.chunks += 1
            return "data: tick\n\n"

    async def starlette_stream(scope: Scope, receive: Any, send: Any) -> None:
        scope["session"]["visits"] = 1
        await StreamingResponse(Ticks(), media_type="text/event-stream")(scope, receive, send)

    async def raw_stream(scope: Scope, receive: Any, send: Any) -> None:
        scope["session"]["visits"] = 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
        except OSError as exc:
            raised.append(exc)
            raise

    async def receive() -> dict[str, Any]:
        await anyio.sleep_forever()  # the client stays: only send() can end the stream
        raise AssertionError("unreachable")

    sent: list[Scope] = []

    async def send(message: Scope) -> None:
        sent.append(message)

    async with running(store) as manager:
        # Starlette reads receive() for a disconnect before ASGI 2.4; from 2.4 on it
        # turns send()'s OSError into ClientDisconnect, which must not reach the server.
        for spec, app in itertools.product(("2.3", "2.4"), (starlette_stream, raw_stream)):
            sent.clear()
            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": spec},
                "method": "GET",
                "path": "/events",
                "headers": [],
            }
            with caplog.at_level(logging.ERROR, "asyncsession.asgi"), anyio.fail_after(10):
                await SessionMiddleware(app, manager, secret_key=KEY)(scope, receive, send)
            assert [m.get("status") for m in sent] == [500, None]
            assert sent[1]["body"] == b"Internal Server Error"
    assert Ticks.chunks == 2  # one per spec version
    assert len(raised) == 2
    assert all("the session could not be saved" in str(exc) for exc in raised)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 4  # one each


async def test_non_json_value_is_refused_at_assignment(memory_manager: s.SessionManager) -> None:
    refused: list[BaseException] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        session = scope["session"]
        session["ok"] = {"n": [1]}
        for bad in ({1, 2}, {"x": float("nan")}, [b"bytes"]):
            with pytest.raises(s.InvalidJSONValue) as info:
                session["bad"] = bad
            refused.append(info.value)
        assert "bad" not in session and session["ok"] == {"n": [1]}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = SessionMiddleware(app, memory_manager, secret_key=KEY)
    async with client(wrapped) as http:
        response = await http.get("/")
    assert response.status_code == 200 and len(refused) == 3
    (stored,) = await memory_manager.list(limit=10)
    assert stored.state == {"ok": {"n": (1,)}}  # the refused values were never stored


async def test_non_json_value_set_inside_a_nested_value_becomes_500(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        scope["session"]["cart"] = {"items": []}
        scope["session"]["cart"]["items"].append({1, 2})  # only the save can see this
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = SessionMiddleware(app, memory_manager, secret_key=KEY)
    with caplog.at_level(logging.ERROR, "asyncsession.asgi"):
        async with client(wrapped) as http:
            response = await http.get("/")
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], s.InvalidJSONValue)
    assert "is not JSON" in record.getMessage()
    assert await count(memory_manager) == 0


async def test_the_logged_save_error_leaves_out_the_value(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """The ERROR record of a save refused for a non-JSON value (its message, the
    exception's text and the traceback, as a handler formats them) names the key path
    and the value's type, never the value: here a user's e-mail address and birth date
    in an object's repr (privacy review)."""
    Profile = types.SimpleNamespace
    refused: list[BaseException] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        session = scope["session"]
        with pytest.raises(s.InvalidUpdate) as info:
            session[4111111111111111] = "x"  # a key that is not a str, refused at once
        refused.append(info.value)
        session["prefs"] = {"a": 1}
        session["prefs"]["user"] = Profile(email="alice@example.com", dob="1980-01-02")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wrapped = SessionMiddleware(app, memory_manager, secret_key=KEY)
    with caplog.at_level(logging.ERROR, "asyncsession.asgi"):
        async with client(wrapped) as http:
            response = await http.get("/")
    assert response.status_code == 500
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    logged = logging.Formatter().format(record)
    assert "alice@example.com" not in logged and "1980-01-02" not in logged
    assert "state['prefs']['user']: a types.SimpleNamespace object is not a JSON value" in logged
    (error,) = refused
    assert "4111111111111111" not in str(error) and "int" in str(error)


# --- bare ASGI, websocket, lifespan ---------------------------------------------------


def counter_app() -> Callable[[Scope, Any, Any], Awaitable[None]]:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        session = scope["session"]
        assert isinstance(session, SessionDict)
        if scope["path"] == "/hit":
            session["hits"] = session.get("hits", 0) + 1
        body = str(session.get("hits", 0)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_bare_asgi_app(memory_manager: s.SessionManager) -> None:
    wrapped = SessionMiddleware(counter_app(), memory_manager, secret_key=KEY, cookie_name="sid")
    async with client(wrapped) as http:
        assert (await http.get("/look")).text == "0"
        assert await count(memory_manager) == 0
        for expected in ("1", "2", "3"):
            assert (await http.get("/hit")).text == expected
        assert (await http.get("/look")).text == "3"
        assert "sid" in http.cookies
        assert await count(memory_manager) == 1


async def test_nested_changes_after_response_start_are_reported(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    # A change inside a nested value cannot be refused when it is made (the session
    # sees it only when comparing): it is reported at the end of the request.
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        cart = scope["session"].get("cart")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        cart.append(2)
        await send({"type": "http.response.body", "body": b""})

    async with client(make_app(memory_manager)) as http:
        sid = cookie_id(await http.post("/write", json={"cart": [1]}))
        cookie = {"cookie": f"session={http.cookies['session']}"}
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        async with client(SessionMiddleware(app, memory_manager, secret_key=KEY)) as http:
            await http.get("/", headers=cookie)
    assert any("after the response started" in r.getMessage() for r in caplog.records)
    assert (await memory_manager.get(sid)).state == {"cart": (1,)}


async def test_a_nested_change_made_while_the_response_saves_is_logged_as_lost(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A task still running changes a nested value while the save at the response awaits
    # the store: that change was not written, so it is logged as lost, not taken as saved.
    store = PausingRepository(pause_saves=True)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session["seen"] = True
        cart = session["cart"]
        release = store.hold()

        async def add_to_cart() -> None:
            await store.entered.wait()  # the response's save is storing "seen"
            cart.append("book")
            release.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(add_to_cart)
            await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async with running(store) as manager:
        seeded = await manager.create(state={"cart": []})
        middleware = SessionMiddleware(app, manager, secret_key=KEY)
        cookie = {"cookie": f"session={middleware.sign(seeded.id)}"}
        with caplog.at_level(logging.WARNING, "asyncsession.asgi"), anyio.fail_after(10):
            async with client(middleware) as http:
                assert (await http.get("/", headers=cookie)).status_code == 200
        assert (await manager.get(seeded.id)).state == {"cart": (), "seen": True}
    assert any(
        "keys ['cart'] were not saved" in r.getMessage()
        and "after the response started" in r.getMessage()
        for r in caplog.records
    )


async def test_changes_without_any_response_are_reported(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        scope["session"]["lost"] = 1

    middleware = SessionMiddleware(app, memory_manager, secret_key=KEY)
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        await middleware({"type": "http", "method": "GET", "path": "/"}, _noop, _noop)
    assert any("sent no response" in r.getMessage() for r in caplog.records)
    assert await count(memory_manager) == 0


class CorruptOne(s.MemoryRepository):
    """A memory store whose session ``broken`` cannot be read."""

    broken: uuid.UUID | None = None

    async def get(self, session_id: uuid.UUID, **kwargs: Any) -> s.Session | None:
        if session_id == self.broken:
            raise s.CorruptSessionError("truncated document", session_id=session_id)
        return await super().get(session_id, **kwargs)

    async def touch(self, session_id: uuid.UUID, **kwargs: Any) -> s.Session | None:
        if session_id == self.broken:
            raise s.CorruptSessionError("truncated document", session_id=session_id)
        return await super().touch(session_id, **kwargs)


async def test_unreadable_session_starts_the_visitor_afresh(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = CorruptOne()
    async with running(store) as manager, client(make_app(manager)) as http:
        store.broken = cookie_id(await http.post("/write", json={"a": 1}))
        with caplog.at_level(logging.ERROR, "asyncsession.asgi"):
            response = await http.get("/read")
        assert response.status_code == 200 and response.json()["data"] == {}
        assert any("cannot be read" in r.getMessage() for r in caplog.records)
        fresh = await http.post("/write", json={"b": 2})
        assert cookie_id(fresh) != store.broken
        assert (await http.get("/read")).json()["data"] == {"b": 2}


async def test_a_session_from_a_newer_asyncsession_selects_nothing(
    anyio_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from asyncsession.stores.files import FileRepository

    store = FileRepository(tmp_path / "store")
    async with store, running(store) as manager:
        app = outage_app(manager, [])
        async with client(app) as http:
            sid = cookie_id(await http.post("/write", json={"user": "alice"}))
            path = store.directory / "sessions" / f"{sid}.json"
            future = orjson.loads(path.read_bytes())
            future.pop("checksum")
            future["version"] = 99  # as a newer asyncsession would write it
            path.write_bytes(orjson.dumps(future))
            with caplog.at_level(logging.ERROR, "asyncsession.asgi"):
                health = await http.get("/health")
                read = await http.get("/read")
            logout = await http.post("/logout")
            fresh = await http.post("/write", json={"b": 2})
        assert health.status_code == 200 and read.status_code == 200 and read.json() == {}
        errors = [r for r in caplog.records if r.name == "asyncsession.asgi"]
        assert len(errors) == 3  # /health, /read and /logout each met it
        for error in errors:
            assert error.levelno == logging.ERROR and "cannot be read" in error.getMessage()
            assert str(sid) in error.getMessage() and error.exc_info is not None
            assert isinstance(error.exc_info[1], s.SchemaVersionError)
        assert logout.status_code == 200 and "Max-Age=0" in logout.headers["set-cookie"]
        assert cookie_id(fresh) != sid
        assert orjson.loads(path.read_bytes())["version"] == 99  # left for a newer release


async def test_a_session_the_store_refuses_selects_nothing_and_is_no_outage(
    anyio_backend: str, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from asyncsession.stores.redis import RedisRepository

    prefix = f"asgi:{uuid.uuid4().hex[:8]}:"
    store = RedisRepository(redis_server.url, prefix=prefix)
    async with store, running(store) as manager:
        app = outage_app(manager, [])
        async with client(app) as a, client(app) as b:
            broken = cookie_id(await a.post("/write", json={"user": "alice"}))
            await b.post("/write", json={"user": "bob"})
            key = f"{prefix}s:{broken}"
            await store.client.delete([key])
            await store.client.rpush(key, ["not a session"])  # Redis: WRONGTYPE
            with caplog.at_level(logging.INFO, "asyncsession"):
                for _ in range(3):
                    read_a, read_b = await a.get("/read"), await b.get("/read")
                    assert read_a.status_code == 200 and read_a.json() == {}
                    assert read_b.json() == {"user": "bob"}
                logout = await a.post("/logout")
            assert await store.client.type(key) == b"list"  # the data is left as it is
    assert logout.status_code == 200 and "Max-Age=0" in logout.headers["set-cookie"]
    logged = [r for r in caplog.records if r.name.startswith("asyncsession")]
    assert len(logged) == 4  # one error per request of that visitor, no outage
    for record in logged:
        assert record.levelno == logging.ERROR and str(broken) in record.getMessage()
        assert record.exc_info is not None
        error = record.exc_info[1]
        assert isinstance(error, s.StorageError) and not error.recoverable


async def test_a_session_locked_by_another_writer_is_unavailable_and_no_outage(
    anyio_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A file store session whose lock another writer holds past lock_timeout: that
    # visitor's request runs with the session unavailable (LockTimeout, recoverable),
    # logged as about that session; the store is not down, so no outage warning and no
    # "works again" for the next visitor to flip.
    import fcntl

    from asyncsession.stores.files import FileRepository, LockTimeout

    seen: list[BaseException] = []
    store = FileRepository(tmp_path / "store", lock_timeout=0.2)
    async with store, running(store) as manager:
        app = outage_app(manager, seen)
        async with client(app) as a, client(app) as b:
            locked = cookie_id(await a.post("/write", json={"user": "alice"}))
            await b.post("/write", json={"user": "bob"})
            with caplog.at_level(logging.INFO, "asyncsession"):
                lock_file = store.directory / "locks" / f"{locked}.lock"
                with open(lock_file, "a+b") as holder:  # noqa: ASYNC230 - a local lock file
                    fcntl.flock(holder, fcntl.LOCK_EX)  # another open file: it conflicts
                    read_a, read_b = await a.get("/read"), await b.get("/read")
                    again_a = await a.get("/read")
                    fcntl.flock(holder, fcntl.LOCK_UN)
                after_a, after_b = await a.get("/read"), await b.get("/read")
    assert read_a.status_code == again_a.status_code == 503
    assert read_b.json() == after_b.json() == {"user": "bob"}
    assert after_a.json() == {"user": "alice"}
    assert len(seen) == 2 and all(isinstance(e.__cause__, LockTimeout) for e in seen)
    for error in seen:
        assert type(error) is s.StorageError and error.recoverable
        assert "locked by another writer" in str(error) and "retry" in str(error)
    logged = [r for r in caplog.records if r.name.startswith("asyncsession")]
    assert [r.levelno for r in logged] == [logging.WARNING, logging.WARNING]
    for record in logged:
        message = record.getMessage()
        assert str(locked) in message and "locked" in message, message
        assert "could not load the session" not in message


async def test_logout_of_a_locked_session_deletes_it_once_the_lock_is_free(
    anyio_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The store works; one session's lock was held while the request loaded it. The
    # logout deletes it server-side at the response (a stolen cookie must die with it);
    # if the lock is still held then, the cookie is expired all the same and a warning
    # says the session was locked (not that the store was unreachable).
    import fcntl

    from asyncsession.stores.files import FileRepository

    store = FileRepository(tmp_path / "store", lock_timeout=0.2)
    async with store, running(store) as manager:
        app = outage_app(manager, [])
        seen: dict[str, str] = {}

        async def probe(scope: Scope, receive: Any, send: Any) -> None:
            seen["repr"] = repr(get_session(scope))
            await JSONResponse({})(scope, receive, send)

        async def logout_after_release(scope: Scope, receive: Any, send: Any) -> None:
            fcntl.flock(holder, fcntl.LOCK_UN)  # free again before the response starts
            get_session(scope).clear()
            await JSONResponse({})(scope, receive, send)

        async with client(app) as a, client(app) as b:
            freed = cookie_id(await a.post("/write", json={"user": "alice"}))
            stuck = cookie_id(await b.post("/write", json={"user": "bob"}))
            cookie_a = a.cookies["session"]
            cookie_b = b.cookies["session"]
            with caplog.at_level(logging.WARNING, "asyncsession"):
                for sid, cookie, inner in (
                    (freed, cookie_a, logout_after_release),
                    (stuck, cookie_b, None),
                ):
                    lock_file = store.directory / "locks" / f"{sid}.lock"
                    with open(lock_file, "a+b") as holder:  # noqa: ASYNC230 - a local lock file
                        fcntl.flock(holder, fcntl.LOCK_EX)
                        headers = {"cookie": f"session={cookie}"}
                        async with client(SessionMiddleware(probe, manager, secret_key=KEY)) as p:
                            await p.get("/", headers=headers)
                        if inner is None:
                            out = await b.post("/logout")
                        else:
                            async with client(
                                SessionMiddleware(inner, manager, secret_key=KEY)
                            ) as h:
                                out = await h.post("/", headers=headers)
                        assert "Max-Age=0" in out.headers["set-cookie"]
            assert not await manager.exists(freed)  # deleted server-side
            assert await manager.exists(stuck)  # still locked at the response: kept
    assert seen["repr"] == "SessionDict(unavailable: the session is locked by another writer)"
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("logout")]
    assert len(messages) == 1 and str(stuck) in messages[0], messages
    assert "locked" in messages[0] and "unreachable" not in messages[0]


async def test_logout_works_while_the_store_is_unreachable(
    anyio_backend: str, lone_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from asyncsession.stores.redis import RedisRepository

    store = RedisRepository(lone_redis.url, prefix=f"asgi:{uuid.uuid4().hex[:8]}:", timeout=2)
    async with running(store) as manager:
        app = outage_app(manager, [])
        async with client(app) as http:
            sid = cookie_id(await http.post("/write", json={"user": "alice"}))
            headers = {"cookie": f"session={http.cookies['session']}"}
        await anyio.to_thread.run_sync(lone_redis.stop)
        with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
            async with client(app) as http:
                read = await http.get("/read", headers=headers)
                logout = await http.post("/logout", headers=headers)  # request.session.clear()
    assert read.status_code == 503 and "set-cookie" not in read.headers
    assert logout.status_code == 200
    assert logout.headers["set-cookie"].startswith("session=;")
    assert "Max-Age=0" in logout.headers["set-cookie"] and logout.headers["vary"] == "Cookie"
    (warning,) = [r for r in caplog.records if r.name == "asyncsession.asgi"]
    assert str(sid) in warning.getMessage() and "was not deleted" in warning.getMessage()


async def test_websocket_sees_session_read_only(memory_manager: s.SessionManager) -> None:
    async with client(make_app(memory_manager)) as http:
        cookie = (await http.post("/write", json={"user": "alice"})).cookies["session"]
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        seen["data"] = dict(session)
        seen["read_only"] = session.read_only
        with pytest.raises(s.InvalidUpdate):
            session["x"] = 1
        with pytest.raises(s.InvalidUpdate):
            session.clear()
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [(b"cookie", f"session={cookie}".encode())],
    }
    await SessionMiddleware(app, memory_manager, secret_key=KEY)(scope, receive, send)
    assert seen == {"data": {"user": "alice"}, "read_only": True}
    assert sent == [{"type": "websocket.accept"}]


async def test_lifespan_passes_through(memory_manager: s.SessionManager) -> None:
    scopes: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        scopes.append(scope)

    async def receive() -> dict[str, Any]:
        raise AssertionError("not called")

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError("not called")

    await SessionMiddleware(app, memory_manager, secret_key=KEY)(
        {"type": "lifespan"}, receive, send
    )
    assert scopes == [{"type": "lifespan"}]


# --- a store outage --------------------------------------------------------------------


def outage_app(manager: s.SessionManager, seen: list[BaseException]) -> Starlette:
    """/health never touches the session; /read answers 503 when the session is
    unavailable; /crash does not catch that error."""

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def read(request: Request) -> JSONResponse:
        try:
            return JSONResponse(request.session.copy())  # type: ignore[attr-defined]
        except s.StorageError as exc:
            seen.append(exc)
            return JSONResponse({"error": str(exc)}, status_code=503)

    async def crash(request: Request) -> JSONResponse:
        return JSONResponse(dict(request.session))

    routes = [Route("/health", health), Route("/read", read), Route("/crash", crash)]
    middleware = [Middleware(SessionMiddleware, manager, secret_key=KEY)]
    return Starlette(routes=[*routes, *make_app(manager).routes], middleware=middleware)


def unavailable_accesses(session: SessionDict) -> dict[str, Callable[[], Any]]:
    """Every way of using a session, each a call that must raise on an unavailable one
    (but clear(), a logout, and mark_accessed(), which Starlette's request.session calls)."""

    def set_item() -> None:
        session["a"] = 1

    def del_item() -> None:
        del session["a"]

    def merge_into() -> None:
        session.__ior__({"a": 1})

    return {
        "get": lambda: session.get("user"),
        "getitem": lambda: session["user"],
        "contains": lambda: "user" in session,
        "iter": lambda: list(session),
        "len": lambda: len(session),
        "bool": lambda: bool(session),
        "items": lambda: dict(session.items()),
        "eq": lambda: session == {},
        "id": lambda: session.id,
        "copy": session.copy,
        "or": lambda: session | {"a": 1},
        "ror": lambda: {"a": 1} | session,
        "ior": merge_into,
        "setitem": set_item,
        "delitem": del_item,
        "update": lambda: session.update(a=1),
        "pop": lambda: session.pop("user", None),
        "setdefault": lambda: session.setdefault("a", 1),
        "rotate": session.rotate,
    }


async def test_a_store_outage_leaves_routes_without_the_session_working(
    anyio_backend: str, lone_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from asyncsession.stores.redis import RedisRepository

    seen: list[BaseException] = []
    refused: dict[str, BaseException] = {}
    store = RedisRepository(lone_redis.url, prefix=f"asgi:{uuid.uuid4().hex[:8]}:", timeout=2)
    async with running(store) as manager:
        app = outage_app(manager, seen)

        async def probe(scope: Scope, receive: Any, send: Any) -> None:
            session = get_session(scope)
            for name, access in unavailable_accesses(session).items():
                with pytest.raises(s.StorageError) as info:
                    access()
                refused[name] = info.value
            with pytest.raises(s.StorageError):
                await session.ensure_created()
            assert "unavailable" in repr(session)
            await JSONResponse({"probed": True})(scope, receive, send)

        async with client(app) as http:
            cookie = (await http.post("/write", json={"user": "alice"})).cookies["session"]
        headers = {"cookie": f"session={cookie}"}
        await anyio.to_thread.run_sync(lone_redis.stop)

        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        with caplog.at_level(logging.DEBUG, "asyncsession"):
            async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
                health = await http.get("/health", headers=headers)
                read = await http.get("/read", headers=headers)
                crash = await http.get("/crash", headers=headers)  # the app's own 500
                anonymous = await http.get("/read")  # no cookie: no store read
            probe_app = SessionMiddleware(probe, manager, secret_key=KEY)
            async with client(probe_app) as http:
                probed = await http.get("/", headers=headers)

            # A websocket with a cookie is accepted; its session raises the same way.
            ws_sent: list[dict[str, Any]] = []
            ws_errors: list[BaseException] = []

            async def ws_app(scope: Scope, receive: Any, send: Any) -> None:
                assert (await receive())["type"] == "websocket.connect"
                await send({"type": "websocket.accept"})
                try:
                    get_session(scope).get("user")
                except s.StorageError as exc:
                    ws_errors.append(exc)
                await send({"type": "websocket.close", "code": 1000})

            async def ws_receive() -> dict[str, Any]:
                return {"type": "websocket.connect"}

            async def ws_send(message: dict[str, Any]) -> None:
                ws_sent.append(message)

            scope = {
                "type": "websocket",
                "path": "/ws",
                "headers": [(b"cookie", headers["cookie"].encode())],
            }
            await SessionMiddleware(ws_app, manager, secret_key=KEY)(scope, ws_receive, ws_send)
        outage_logs = [r for r in caplog.records if r.levelno >= logging.WARNING]

        assert health.status_code == 200 and "set-cookie" not in health.headers
        assert read.status_code == 503 and "set-cookie" not in read.headers
        assert read.headers["vary"] == "Cookie"
        assert crash.status_code == 500 and "set-cookie" not in crash.headers
        assert anonymous.status_code == 200 and anonymous.json() == {}
        assert probed.status_code == 200 and "set-cookie" not in probed.headers
        assert sorted(refused) == sorted(unavailable_accesses(SessionDict(manager, None)))
        for error in [*seen, *refused.values(), *ws_errors]:
            assert type(error) is s.StorageError and error.recoverable
            assert "session store is unreachable" in str(error) and "retry" in str(error)
            assert isinstance(error.__cause__, s.StorageError)
        assert len(seen) == 1 and len(ws_errors) == 1
        assert [m["type"] for m in ws_sent] == ["websocket.accept", "websocket.close"]
        # One warning for the outage, not one per request (the rest at debug level).
        (warning,) = outage_logs
        assert "could not load the session" in warning.getMessage()

        await anyio.to_thread.run_sync(lone_redis.start)  # empty: the data was in memory
        caplog.clear()
        with caplog.at_level(logging.INFO, "asyncsession"):
            async with client(app) as http:
                for attempt in range(3):  # the first call may still meet a dead connection
                    response = await http.get("/read", headers=headers)
                    if response.status_code == 200:
                        break
                    assert attempt < 2
        assert response.json() == {}
        assert any("works again" in r.getMessage() for r in caplog.records)


# --- rotate() and id -------------------------------------------------------------------


async def test_id_is_none_while_a_rotation_is_pending(manager: s.SessionManager) -> None:
    seen: dict[str, Any] = {}

    async def login(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        seen["before"] = session.id
        session["user"] = "alice"
        session.rotate()
        seen["pending"] = session.id  # the old id dies when the response starts
        seen["created"] = await session.ensure_created()
        seen["after"] = session.id
        await JSONResponse({})(scope, receive, send)

    async def deferred(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        session.rotate()
        seen["deferred"] = session.id
        await JSONResponse({})(scope, receive, send)

    async with client(make_app(manager)) as http:
        old = cookie_id(await http.post("/write", json={"cart": [1]}))
        cookie = {"cookie": f"session={http.cookies['session']}"}
    async with client(SessionMiddleware(login, manager, secret_key=KEY)) as http:
        response = await http.get("/", headers=cookie)
    assert seen["before"] == old and seen["pending"] is None
    assert seen["created"] == seen["after"] == cookie_id(response) != old
    async with client(SessionMiddleware(deferred, manager, secret_key=KEY)) as http:
        response = await http.get("/", headers={"cookie": f"session={response.cookies['session']}"})
    assert seen["deferred"] is None and cookie_id(response) != seen["created"]
    assert (await manager.get(cookie_id(response))).state == {"cart": (1,), "user": "alice"}


# --- changes after the response started ------------------------------------------------


async def test_every_change_after_the_response_started_is_refused(
    manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    refused: dict[str, str] = {}

    def changes(session: SessionDict) -> dict[str, Callable[[], Any]]:
        def set_item() -> None:
            session["late"] = 1

        def del_item() -> None:
            del session["user"]

        def merge_into() -> None:
            session.__ior__({"late": 1})

        return {
            "setitem": set_item,
            "delitem": del_item,
            "update": lambda: session.update(late=1),
            "pop": lambda: session.pop("user"),
            "popitem": session.popitem,
            "setdefault": lambda: session.setdefault("late", 1),
            "ior": merge_into,
            "clear": session.clear,
            "rotate": session.rotate,
        }

    async def late(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for name, change in changes(session).items():
            with pytest.raises(s.InvalidUpdate, match="before the response starts") as info:
                change()
            refused[name] = str(info.value)
        assert dict(session) == {"user": "alice"}  # reading still works
        assert session.setdefault("user", "bob") == "alice"  # not a change
        await send({"type": "http.response.body", "body": b""})

    async with client(make_app(manager)) as http:
        sid = cookie_id(await http.post("/write", json={"user": "alice"}))
        cookie = {"cookie": f"session={http.cookies['session']}"}
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        async with client(SessionMiddleware(late, manager, secret_key=KEY)) as http:
            response = await http.get("/", headers=cookie)
    assert response.status_code == 200
    assert sorted(refused) == sorted(changes(SessionDict(manager, None)))
    assert "streaming" in refused["setitem"] and "background task" in refused["setitem"]
    assert (await manager.get(sid)).state == {"user": "alice"}
    assert not caplog.records


async def test_a_write_in_a_streaming_body_raises(memory_manager: s.SessionManager) -> None:
    errors: list[BaseException] = []

    async def stream(request: Request) -> StreamingResponse:
        session = request.session

        async def body() -> AsyncIterator[bytes]:
            yield b"a"
            try:
                session["in_stream"] = 1
            except s.InvalidUpdate as exc:
                errors.append(exc)
            yield b"b"

        return StreamingResponse(body())

    app = Starlette(
        routes=[Route("/stream", stream)],
        middleware=[Middleware(SessionMiddleware, memory_manager, secret_key=KEY)],
    )
    async with client(app) as http:
        assert (await http.get("/stream")).text == "ab"
    (error,) = errors
    assert "streaming response body" in str(error)
    assert await count(memory_manager) == 0


async def test_a_change_once_the_response_is_complete_is_logged_and_later_tasks_run(
    manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    # Starlette runs background tasks after the last body: an exception there reaches
    # the server ("Exception in ASGI application") and the remaining tasks never run.
    ran: list[str] = []
    refused: dict[str, BaseException] = {}

    async def later(request: Request) -> JSONResponse:
        session = get_session(request.scope)

        async def touch_session() -> None:
            request.session["last_seen"] = 1
            session = get_session(request.scope)
            session.update(visits=2)
            session |= {"theme": "dark"}
            del session["user"]
            assert session.pop("cart") == [1]
            ran.append("touch")

        async def log_in_or_out() -> None:
            # A login or logout that cannot happen must not pass silently: these raise.
            for name, call in (("rotate", session.rotate), ("clear", session.clear)):
                with pytest.raises(s.InvalidUpdate, match="after the response started"):
                    call()
                refused[name] = s.InvalidUpdate(name)
            with pytest.raises(s.InvalidUpdate, match="after the response started"):
                await session.ensure_created()
            refused["ensure_created"] = s.InvalidUpdate("ensure_created")

        async def send_email() -> None:
            ran.append("email")

        tasks = BackgroundTasks()
        for task in (touch_session, log_in_or_out, send_email):
            tasks.add_task(task)
        return JSONResponse({}, background=tasks)

    app = Starlette(
        routes=[Route("/later", later), *make_app(manager).routes],
        middleware=[Middleware(SessionMiddleware, manager, secret_key=KEY)],
    )
    async with client(app) as http:
        sid = cookie_id(await http.post("/write", json={"user": "alice", "cart": [1]}))
        with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
            response = await http.get("/later")
    assert response.status_code == 200 and cookie_id(response) == sid
    assert ran == ["touch", "email"]
    assert sorted(refused) == ["clear", "ensure_created", "rotate"]
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "after the response was complete" in warning.getMessage()
    assert "['cart', 'last_seen', 'theme', 'user', 'visits']" in warning.getMessage()
    assert "GET /later" in warning.getMessage()
    assert (await manager.get(sid)).state == {"user": "alice", "cart": (1,)}


async def test_the_last_body_or_a_path_send_completes_the_response(
    memory_manager: s.SessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    outcomes: list[str] = []

    def try_change(session: SessionDict) -> None:
        try:
            session["late"] = len(outcomes)
        except s.InvalidUpdate:
            outcomes.append("raised")
        else:
            outcomes.append("let through")

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        session = get_session(scope)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try_change(session)
        if scope["path"] == "/pathsend":
            await send({"type": "http.response.pathsend", "path": "/dev/null"})
        else:
            await send({"type": "http.response.body", "body": b"a", "more_body": True})
            try_change(session)
            await send({"type": "http.response.body", "body": b"b"})  # more_body False
        try_change(session)

    sent: list[Scope] = []

    async def send(message: Scope) -> None:
        sent.append(message)

    middleware = SessionMiddleware(app, memory_manager, secret_key=KEY)
    with caplog.at_level(logging.WARNING, "asyncsession.asgi"):
        for path in ("/body", "/pathsend"):
            scope: Scope = {"type": "http", "method": "GET", "path": path, "headers": []}
            await middleware(scope, _unused_receive, send)
    assert outcomes == ["raised", "raised", "let through", "raised", "let through"]
    assert len([r for r in caplog.records if "was complete" in r.getMessage()]) == 2
    assert await count(memory_manager) == 0


async def test_update_and_ior_set_every_key_or_none(manager: s.SessionManager) -> None:
    refused: list[BaseException] = []

    async def merge(request: Request) -> JSONResponse:
        session = get_session(request.scope)
        for bad in (
            {"c": 1, "bad": object()},
            [("c", 1), ("bad", {1, 2})],
            {"c": 1, 5: "not a str key"},
        ):
            with pytest.raises((s.InvalidJSONValue, s.InvalidUpdate)) as info:
                session |= bad  # type: ignore[arg-type]
            refused.append(info.value)
        with pytest.raises(s.InvalidJSONValue) as info:
            session.update({"c": 1}, bad=float("nan"))
        refused.append(info.value)
        assert session.copy() == {"user": "alice"}
        session |= [("d", 4)]
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/merge", merge), *make_app(manager).routes],
        middleware=[Middleware(SessionMiddleware, manager, secret_key=KEY)],
    )
    async with client(app) as http:
        sid = cookie_id(await http.post("/write", json={"user": "alice"}))
        assert (await http.get("/merge")).status_code == 200
    assert [type(error) for error in refused] == [
        s.InvalidJSONValue,
        s.InvalidJSONValue,
        s.InvalidUpdate,
        s.InvalidJSONValue,
    ]
    assert (await manager.get(sid)).state == {"user": "alice", "d": 4}


# --- configuration ---------------------------------------------------------------------


def test_cookie_settings_that_would_fail_silently_are_refused() -> None:
    manager = s.SessionManager(s.MemoryRepository())
    for options, advice in (
        ({"cookie_name": "__Host-session", "secure": False}, "secure=True"),
        ({"cookie_name": "__host-session", "secure": False}, "secure=True"),
        ({"cookie_name": "__Host-session", "domain": "example.com"}, "domain=None"),
        ({"cookie_name": "__Host-session", "path": "/app"}, "path='/'"),
        ({"cookie_name": "__Secure-session", "secure": False}, "secure=True"),
        ({"secure": "false"}, "True or False"),
        ({"secure": 0}, "True or False"),
        ({"http_only": "false"}, "True or False"),
        ({"http_only": None}, "True or False"),
        ({"secret_key": {"a": 1}}, "list or tuple"),
        ({"secret_key": {"key-one", "key-two"}}, "list or tuple"),
        ({"secret_key": frozenset({"key-one"})}, "list or tuple"),
        ({"secret_key": iter(["key-one"])}, "list or tuple"),
        ({"secret_key": None}, "list or tuple"),
        ({"secret_key": 123}, "list or tuple"),
        ({"secret_key": [None]}, "non-empty str or bytes"),
        ({"secret_key": ["key", ""]}, "non-empty str or bytes"),
        ({"secret_key": [], "fallback_keys": [OLD_KEY]}, "at least one"),
        ({"fallback_keys": {"old": OLD_KEY}}, "list or tuple"),
    ):
        options.setdefault("secret_key", KEY)
        with pytest.raises(s.InvalidConfiguration, match=re.escape(advice)):
            SessionMiddleware(_noop, manager, **options)
    # What is allowed: the prefixes used right, short keys, a tuple of keys.
    for options in (
        {"cookie_name": "__Host-session"},
        {"cookie_name": "__Secure-session", "domain": "example.com", "path": "/app"},
        {"secret_key": "k"},
        {"secret_key": (KEY, b"old"), "fallback_keys": ["older"]},
        {"secure": False, "http_only": False},
    ):
        options.setdefault("secret_key", KEY)
        SessionMiddleware(_noop, manager, **options)


# --- dict-like use ---------------------------------------------------------------------


async def test_copy_and_merge_give_plain_dicts(manager: s.SessionManager) -> None:
    results: dict[str, Any] = {}

    async def show(request: Request) -> JSONResponse:
        session = get_session(request.scope)
        copied = session.copy()
        results.update(
            copy=copied,
            merged=session | {"extra": 1},
            reflected={"extra": 1, "user": "bob"} | session,
            proxy=session | types.MappingProxyType({"m": 1}),
        )
        copied["cart"].append(99)  # a copy: the session does not change
        session |= {"visits": 2}
        results["same_object"] = session is get_session(request.scope)
        return JSONResponse(request.session.copy())  # type: ignore[attr-defined]

    app = Starlette(
        routes=[Route("/show", show), *make_app(manager).routes],
        middleware=[Middleware(SessionMiddleware, manager, secret_key=KEY)],
    )
    async with client(app) as http:
        sid = cookie_id(await http.post("/write", json={"user": "alice", "cart": [1]}))
        response = await http.get("/show")
    assert response.json() == {"user": "alice", "cart": [1], "visits": 2}
    assert results["proxy"] == {"user": "alice", "cart": [1], "m": 1}
    for name in ("copy", "merged", "reflected", "proxy"):
        assert type(results[name]) is dict, name
    assert results["copy"] == {"user": "alice", "cart": [1, 99]}
    assert results["merged"] == {"user": "alice", "cart": [1], "extra": 1}
    assert results["reflected"] == {"extra": 1, "user": "alice", "cart": [1]}
    assert results["same_object"]
    assert (await manager.get(sid)).state == {"user": "alice", "cart": (1,), "visits": 2}
    assert isinstance(SessionDict(manager, None), MutableMapping)
    # dict(session) is a shallow copy, unlike copy(): the docstring must not equate them.
    doc = " ".join((SessionDict.__doc__ or "").split())
    assert "``dict(session)`` is only a shallow copy" in doc and "deep copy" in doc
    with pytest.raises(TypeError):
        SessionDict(manager, None) | [("a", 1)]  # type: ignore[operator]
