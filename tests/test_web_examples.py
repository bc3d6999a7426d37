"""The web examples as real applications.

The chat server (examples/chat_server.py) runs as a real process on a free 127.0.0.1
port under hypercorn (asyncio and trio workers) and uvicorn, driven by httpx from
asyncio and trio. The websocket gateway (examples/websocket_gateway.py) is driven
in-process through a small ASGI websocket harness (both loops, a ManualClock for
expiry) and as a real process with the ``websockets`` client.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
import socket
import sqlite3
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import anyio
import httpx
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis_support import RedisServer
from web_support import CHAT, GATEWAY, SERVERS, serve, serve_process, serve_sync

import asyncsession as s
from asyncsession.testing import ManualClock


def load_example(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def server_log(tmp_path: Path) -> Iterator[IO[bytes]]:
    with (tmp_path / "server.log").open("wb") as log:
        yield log


class EventStream:
    """Reads server-sent events from a streaming httpx response."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str, dict[str, Any]]:
        event, data = "message", ""
        while True:
            line = await self._lines.__anext__()
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "" and data:
                return event, json.loads(data)

    async def drain(self) -> list[str]:
        """Read to the end of the stream (so httpx's generators finish); return the kinds."""
        kinds: list[str] = []
        with contextlib.suppress(StopAsyncIteration):
            while True:
                kinds.append((await self.next())[0])
        return kinds


async def contents_until(events: EventStream, last: str) -> list[str]:
    """Message contents from the stream until one equals ``last``."""
    seen: list[str] = []
    while last not in seen:
        kind, data = await events.next()
        assert kind in ("updated", "message_added"), (kind, data)
        seen.extend(m["content"] for m in data["messages"])
    return seen


STOP_LIMIT = 30  # seconds; a hang guard, not a timing assertion (the grace period is 2 s)

# --- chat server, real process ---------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("kind", sorted(SERVERS))
async def test_chat_users_are_isolated_and_sse_is_per_session(
    kind: str, tmp_path: Path, server_log: IO[bytes]
) -> None:
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    with anyio.fail_after(120):
        async with (
            serve(CHAT, kind, store, server_log) as url,
            httpx.AsyncClient(base_url=url, timeout=60) as alice,
            httpx.AsyncClient(base_url=url, timeout=60) as bob,
        ):
            page = await alice.get("/")
            assert page.status_code == 200 and "EventSource" in page.text
            assert (await alice.get("/api/state")).json()["session_id"] is None
            assert "chat_session" not in alice.cookies  # reading created nothing
            a_id = (await alice.post("/api/session")).json()["session_id"]
            b_id = (await bob.post("/api/session")).json()["session_id"]
            assert a_id != b_id
            async with (
                alice.stream("GET", "/api/events") as a_response,
                bob.stream("GET", "/api/events") as b_response,
            ):
                a_events, b_events = EventStream(a_response), EventStream(b_response)
                assert await a_events.next() == ("ready", {"session_id": a_id})
                assert await b_events.next() == ("ready", {"session_id": b_id})
                for text in ("alice one", "bob one", "alice two", "bob two"):
                    user = alice if text.startswith("alice") else bob
                    answer = await user.post("/api/messages", json={"text": text})
                    assert answer.status_code == 200
                # Events are published in order, so a leak of bob's messages would reach
                # alice before her own last reply (and the other way round).
                a_seen = await contents_until(a_events, "#2 owt ecila")
                b_seen = await contents_until(b_events, "#2 owt bob")
                assert a_seen == ["alice one", "#1 eno ecila", "alice two", "#2 owt ecila"]
                assert b_seen == ["bob one", "#1 eno bob", "bob two", "#2 owt bob"]
                a_state = (await alice.get("/api/state")).json()
                assert a_state["session_id"] == a_id
                assert [m["content"] for m in a_state["messages"]] == a_seen
                interrupted = (await bob.post("/api/interrupt")).json()
                assert interrupted["interrupts"] == 1
                assert interrupted["messages"][-1]["role"] == "system"
                assert len((await alice.get("/api/state")).json()["messages"]) == 4
                # Logging out deletes the session; its stream says so and ends.
                await alice.post("/api/logout")
                assert await a_events.drain() == ["ended"]
                assert "chat_session" not in alice.cookies
                assert (await alice.get("/api/state")).json()["session_id"] is None
                await bob.post("/api/logout")
                assert await b_events.drain() == ["updated", "ended"]  # the interrupt


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("first", "second"),
    [("hypercorn-trio", "hypercorn-asyncio"), ("hypercorn-asyncio", "uvicorn")],
)
async def test_chat_sessions_survive_a_restart(
    first: str, second: str, tmp_path: Path, server_log: IO[bytes]
) -> None:
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    with anyio.fail_after(120):
        async with (
            serve(CHAT, first, store, server_log) as url,
            httpx.AsyncClient(base_url=url, timeout=60) as alice,
        ):
            await alice.post("/api/messages", json={"text": "before restart"})
            state = (await alice.get("/api/state")).json()
            cookie = alice.cookies["chat_session"]
        async with (
            serve(CHAT, second, store, server_log) as url,
            httpx.AsyncClient(
                base_url=url, headers={"cookie": f"chat_session={cookie}"}, timeout=60
            ) as again,
        ):
            assert (await again.get("/api/state")).json() == state
            answer = await again.post("/api/messages", json={"text": "after"})
            assert [m["content"] for m in answer.json()["messages"]] == ["after", "#2 retfa"]
            assert answer.json()["session_id"] == state["session_id"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("listener", "poster"),
    [("hypercorn-trio", "hypercorn-asyncio"), ("uvicorn", "hypercorn-trio")],
)
async def test_chat_sse_hears_messages_posted_through_another_worker_on_redis(
    listener: str,
    poster: str,
    redis_server: RedisServer,
    tmp_path: Path,
    server_log: IO[bytes],
) -> None:
    # Two worker processes on one Redis, as behind a load balancer: a browser's event
    # stream on one worker must show what it posted through the other, and keep going.
    store = f"{redis_server.url}?prefix=chat-{uuid.uuid4().hex[:8]}:"
    with anyio.fail_after(120):
        async with (
            serve(CHAT, listener, store, server_log) as a,
            serve(CHAT, poster, store, server_log) as b,
            httpx.AsyncClient(timeout=60) as browser,  # cookies are per host, not port
        ):
            sid = (await browser.post(f"{a}/api/session")).json()["session_id"]
            async with browser.stream("GET", f"{a}/api/events") as response:
                events = EventStream(response)
                assert await events.next() == ("ready", {"session_id": sid})
                await browser.post(f"{b}/api/messages", json={"text": "via b"})
                with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
                    assert await contents_until(events, "#1 b aiv") == ["via b", "#1 b aiv"]
                await browser.post(f"{a}/api/messages", json={"text": "via a"})
                await browser.post(f"{b}/api/messages", json={"text": "b again"})
                with anyio.fail_after(30):
                    seen = await contents_until(events, "#3 niaga b")
                assert seen == ["via a", "#2 a aiv", "b again", "#3 niaga b"]
                await browser.post(f"{b}/api/logout")  # deleted on b: a's stream ends
                with anyio.fail_after(30):
                    assert (await events.drain())[-1:] == ["ended"]


# --- chat server, in process ------------------------------------------------------------


@pytest.mark.anyio
async def test_chat_bad_message_bodies_get_400() -> None:
    app = load_example(CHAT).create_app("memory://", secret_key="in-process-test-key")
    async with app.state.sessions as sessions:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            await http.post("/api/session")
            json_type = {"content-type": "application/json"}
            bodies = [b"{not json", b"", b"\xff\xfe", b"[]", b'{"text": 5}', b'{"text": ""}']
            # helper-184: these two answered 500 (RecursionError; InvalidJSONValue)
            bodies += [b"[" * 6000 + b"]" * 6000, b'{"text": "a\\ud800b"}']
            for body in bodies:
                response = await http.post("/api/messages", content=body, headers=json_type)
                assert response.status_code == 400, body
                assert "error" in response.json(), body
            huge = b'{"text": "' + b"x" * 50_000 + b'"}'  # read whole before, any size
            response = await http.post("/api/messages", content=huge, headers=json_type)
            assert response.status_code == 413 and "bytes" in response.json()["error"]
            assert (await http.get("/api/state")).json()["messages"] == []
            (stored,) = await sessions.list(limit=10)
            assert stored.messages.total == 0
            # helper-186: the longest text, escaped as json.dumps writes it, still fits
            longest = json.dumps({"text": "\U0001f600" * 2000}).encode()
            response = await http.post("/api/messages", content=longest, headers=json_type)
            assert response.status_code == 200, response.text


@pytest.mark.anyio
async def test_chat_a_conversation_ended_meanwhile_gets_409(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """helper-184: a logout in another tab between finding the session and updating it
    (or an expiry, or an admin's close) answered 500."""
    app = load_example(CHAT).create_app("memory://", secret_key="in-process-test-key")
    async with app.state.sessions as sessions:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            sid = uuid.UUID((await http.post("/api/session")).json()["session_id"])
            update = sessions.update

            async def ended_first(session_id: Any, fn: Any, **options: Any) -> s.Session:
                await sessions.close(session_id)  # as `asyncsession close` would
                return await update(session_id, fn, **options)

            monkeypatch.setattr(sessions, "update", ended_first)
            for path, body in (("/api/messages", {"text": "hi"}), ("/api/interrupt", None)):
                response = await http.post(path, json=body)
                assert response.status_code == 409, (path, response.text)
                assert "ended" in response.json()["error"]
                await sessions.delete(sid)  # the same after a logout elsewhere
                sid = uuid.UUID((await http.post("/api/session")).json()["session_id"])


@pytest.mark.anyio
async def test_chat_events_of_a_session_that_changed_or_ended_before_subscribing() -> None:
    """helper-211: the page reads the session, then its event stream subscribes; a
    session deleted in between left the stream waiting for ever after "ready", and a
    message added in between reached the page only with the next event."""
    chat = load_example(CHAT)

    def parsed(chunk: str) -> tuple[str, Any]:
        head, data = chunk.strip().split("\n")
        return head.removeprefix("event: "), json.loads(data.removeprefix("data: "))

    async with s.SessionManager(s.MemoryRepository()) as sessions:
        ended = await sessions.create()
        await sessions.delete(ended.id)
        with anyio.fail_after(30):
            got = [
                parsed(c)
                async for c in chat._event_stream(sessions, ended.id, 0, 0, chat.OpenStreams())
            ]
        assert [kind for kind, _ in got] == ["ready", "ended"]

        changed = await sessions.create()
        await sessions.add_message(changed.id, "user", "sent before the stream began")
        stream = chat._event_stream(sessions, changed.id, 0, 0, chat.OpenStreams())
        with anyio.fail_after(30):
            assert parsed(await anext(stream))[0] == "ready"
            kind, data = parsed(await anext(stream))
            assert kind == "updated" and [m["content"] for m in data["messages"]] == [
                "sent before the stream began"
            ]
            await sessions.add_message(changed.id, "user", "then this")
            kind, data = parsed(await anext(stream))
            assert kind == "message_added"
            assert [m["content"] for m in data["messages"]] == ["then this"]
        await stream.aclose()

        quiet = await sessions.create()  # unchanged: nothing until its first event
        streams = chat.OpenStreams()
        stream = chat._event_stream(sessions, quiet.id, 0, quiet.revision, streams)
        with anyio.fail_after(30):
            assert parsed(await anext(stream))[0] == "ready"
            await sessions.close(quiet.id)
            assert parsed(await anext(stream))[0] == "closed"
            # Stopping the server ends the open streams (hypercorn's asyncio worker on
            # Python 3.12+ waits for open connections without end)...
            assert len(streams) == 1
            await streams.end()
            assert [c async for c in stream] == []
            assert not streams
            # ...and one that begins as it stops: it says "ready" and ends.
            late = [c async for c in chat._event_stream(sessions, changed.id, 1, 0, streams)]
            assert [parsed(c)[0] for c in late] == ["ready", "updated"]
            assert not streams


@pytest.mark.anyio
async def test_chat_a_manager_limit_is_413_with_what_it_limits() -> None:
    """helper-186: a LimitExceeded (max_messages) was answered "text must be valid
    Unicode text", as every ValidationError was."""
    app = load_example(CHAT).create_app(
        lambda: s.SessionManager(s.MemoryRepository(), max_messages=2),
        secret_key="in-process-test-key",
    )
    async with app.state.sessions:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            assert (await http.post("/api/messages", json={"text": "one"})).status_code == 200
            response = await http.post("/api/messages", json={"text": "two"})
            assert response.status_code == 413
            assert response.json() == {"error": "Messages in this session is limited to 2"}


@pytest.mark.anyio
async def test_chat_activity_keeps_the_cookie_fresh() -> None:
    # The chat stores messages through the manager, not request.session: every answer
    # must still carry the cookie with a fresh Max-Age, or the visitor is logged out
    # max_age after starting the conversation however active they are.
    app = load_example(CHAT).create_app("memory://", secret_key="in-process-test-key")
    async with app.state.sessions:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            cookie = (await http.post("/api/session")).headers["set-cookie"]
            assert "Max-Age=" in cookie
            for response in (
                await http.post("/api/messages", json={"text": "hello"}),
                await http.get("/api/state"),
            ):
                assert response.status_code == 200
                assert response.headers["set-cookie"] == cookie


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_chat_server_stops_on_ctrl_c_while_a_browser_listens(
    kind: str, tmp_path: Path, server_log: IO[bytes]
) -> None:
    # An open page keeps its event stream open for good: Ctrl+C must still stop the
    # server (uvicorn waited for that stream without end unless given a grace period).
    store = f"sqlite:///{tmp_path / 'chat.db'}"
    with (
        serve_process(CHAT, kind, store, server_log) as (process, address),
        httpx.Client(base_url=f"http://{address}", timeout=None) as browser,
    ):
        assert browser.post("/api/session").status_code == 200
        with browser.stream("GET", "/api/events") as stream:
            lines = stream.iter_lines()
            assert next(lines) == "event: ready"
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_LIMIT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{kind} did not stop on Ctrl+C with a stream open")
            assert process.returncode == 0
            with contextlib.suppress(httpx.TransportError):  # cut, or ended in order
                for _ in lines:
                    pass


# --- websocket gateway, in process -----------------------------------------------------


class WebSocketHarness:
    """Drives one ASGI websocket connection to an app, as a server would."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.to_app: MemoryObjectSendStream[dict[str, Any]]
        self.app_in: MemoryObjectReceiveStream[dict[str, Any]]
        self.to_app, self.app_in = anyio.create_memory_object_stream[dict[str, Any]](100)
        self.app_out: MemoryObjectSendStream[dict[str, Any]]
        self.from_app: MemoryObjectReceiveStream[dict[str, Any]]
        self.app_out, self.from_app = anyio.create_memory_object_stream[dict[str, Any]](100)
        self.done = anyio.Event()
        self.client_gone = False  # sends raise OSError, as uvicorn's to a closed client

    async def _send(self, message: dict[str, Any]) -> None:
        if self.client_gone and message["type"] == "websocket.send":
            raise OSError("client disconnected")
        await self.app_out.send(message)

    async def run(self) -> None:
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0"},
            "path": "/ws",
            "raw_path": b"/ws",
            "query_string": b"",
            "headers": [],
            "scheme": "ws",
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 5000),
            "subprotocols": [],
            "state": {},
        }
        try:
            async with self.app_out:
                await self.app(scope, self.app_in.receive, self._send)
        finally:
            self.done.set()

    async def receive(self) -> dict[str, Any]:
        return await self.from_app.receive()

    def close(self) -> None:
        for stream in (self.to_app, self.app_in, self.app_out, self.from_app):
            stream.close()

    async def receive_json(self) -> dict[str, Any]:
        message = await self.receive()
        assert message["type"] == "websocket.send", message
        return dict(json.loads(message["text"]))

    async def send_json(self, data: Any) -> None:
        await self.to_app.send({"type": "websocket.receive", "text": json.dumps(data)})


@contextlib.asynccontextmanager
async def gateway(
    clock: ManualClock | None = None, **options: Any
) -> AsyncIterator[tuple[Any, s.SessionManager]]:
    module = load_example(GATEWAY)
    app = module.create_app(
        lambda: s.SessionManager(s.MemoryRepository(), idle_timeout=60, clock=clock, **options)
    )
    async with app.state.sessions as sessions:
        yield app, sessions


@contextlib.asynccontextmanager
async def connection(app: Any) -> AsyncIterator[tuple[WebSocketHarness, uuid.UUID]]:
    ws = WebSocketHarness(app)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(ws.run)
            await ws.to_app.send({"type": "websocket.connect"})
            assert (await ws.receive())["type"] == "websocket.accept"
            created = await ws.receive_json()
            assert created["type"] == "session_created"
            yield ws, uuid.UUID(created["session_id"])
            with anyio.fail_after(10):
                await ws.done.wait()
    finally:
        ws.close()


async def status_of(sessions: s.SessionManager, sid: uuid.UUID) -> s.SessionStatus:
    return (await sessions.get(sid, touch=False)).status


@pytest.mark.anyio
async def test_gateway_round_trip_and_clean_disconnect() -> None:
    async with gateway() as (app, sessions):
        async with connection(app) as (ws, sid):
            assert await status_of(sessions, sid) == s.SessionStatus.ACTIVE
            for n, text in enumerate(["hi", "there"], start=1):
                await ws.send_json({"type": "message", "session_id": str(sid), "text": text})
                assert await ws.receive_json() == {
                    "type": "reply",
                    "session_id": str(sid),
                    "text": f"echo: {text}",
                    "count": n,
                }
            await ws.send_json({"type": "bye", "session_id": str(sid)})
            assert await ws.receive_json() == {"type": "bye", "session_id": str(sid)}
            assert await ws.receive() == {"type": "websocket.close", "code": 1000, "reason": ""}
        assert await status_of(sessions, sid) == s.SessionStatus.EXITED


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("code", "expected"), [(1000, "exited"), (1001, "exited"), (1006, "abnormal")]
)
async def test_gateway_disconnect_status(code: int, expected: str) -> None:
    async with gateway() as (app, sessions):
        async with connection(app) as (ws, sid):
            await ws.send_json({"type": "message", "session_id": str(sid), "text": "x"})
            await ws.receive_json()
            await ws.to_app.send({"type": "websocket.disconnect", "code": code})
        session = await sessions.get(sid, touch=False)
        assert session.status.value == expected
        assert [m.content for m in session.messages] == ["x", "echo: x"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "bad_id", ["", "not-a-uuid", str(uuid.uuid4()), "00000000-0000-0000-0000-000000000000"]
)
async def test_gateway_invalid_id_gets_error_and_close(bad_id: str) -> None:
    async with gateway() as (app, sessions):
        async with connection(app) as (ws, sid):
            await ws.send_json({"type": "message", "session_id": bad_id, "text": "x"})
            error = await ws.receive_json()
            assert error == {"type": "error", "error": "invalid or expired session"}
            assert await ws.receive() == {"type": "websocket.close", "code": 4401, "reason": ""}
        assert await status_of(sessions, sid) == s.SessionStatus.ABNORMAL


@pytest.mark.anyio
async def test_gateway_foreign_session_id_is_rejected() -> None:
    async with gateway() as (app, sessions):
        async with connection(app) as (ws_a, a_id), connection(app) as (ws_b, _b_id):
            await ws_b.send_json({"type": "message", "session_id": str(a_id), "text": "x"})
            assert (await ws_b.receive_json())["type"] == "error"
            assert (await ws_b.receive())["code"] == 4401
            await ws_a.to_app.send({"type": "websocket.disconnect", "code": 1000})
        assert await status_of(sessions, a_id) == s.SessionStatus.EXITED
        assert (await sessions.get(a_id, touch=False)).messages.total == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", 1008),
        # helper-184: these three closed with 1011 and no error frame (RecursionError,
        # InvalidJSONValue from the store), and a 5 MB text was stored
        ("[" * 6000 + "]" * 6000, 1008),
        ('{"type": "message", "session_id": "SID", "text": "a\\ud800b"}', 1008),
        ('{"type": "message", "session_id": "SID", "text": "' + "x" * 70_000 + '"}', 1009),
        # helper-186: the limit counted characters; these are 40,000 of 80,000 bytes
        ('{"type": "message", "session_id": "SID", "text": "' + "é" * 40_000 + '"}', 1009),
    ],
    ids=["not-json", "deep", "lone-surrogate", "too-big", "too-many-bytes"],
)
async def test_gateway_malformed_message_is_a_policy_violation(frame: str, code: int) -> None:
    async with gateway() as (app, sessions):
        async with connection(app) as (ws, sid):
            text = frame.replace("SID", str(sid))
            await ws.to_app.send({"type": "websocket.receive", "text": text})
            assert (await ws.receive_json())["type"] == "error"
            assert (await ws.receive())["code"] == code
        session = await sessions.get(sid, touch=False)
        assert session.status == s.SessionStatus.ABNORMAL and session.messages.total == 0


@pytest.mark.anyio
async def test_gateway_a_manager_limit_is_a_policy_violation_saying_what_it_limits() -> None:
    """helper-186: a LimitExceeded (max_messages) was answered "text must be valid
    Unicode text"."""
    async with gateway(max_messages=2) as (app, sessions):
        async with connection(app) as (ws, sid):
            await ws.send_json({"type": "message", "session_id": str(sid), "text": "one"})
            assert (await ws.receive_json())["type"] == "reply"
            await ws.send_json({"type": "message", "session_id": str(sid), "text": "two"})
            error = await ws.receive_json()
            assert error == {"type": "error", "error": "Messages in this session is limited to 2"}
            assert (await ws.receive())["code"] == 1008
        assert (await sessions.get(sid, touch=False)).messages.total == 2


@pytest.mark.anyio
async def test_gateway_session_closed_elsewhere_gets_error_and_close() -> None:
    """helper-184: a session closed by an admin (``asyncsession close``) while its socket
    was open made the next message fail with SessionClosed: close code 1011, no error."""
    async with gateway() as (app, sessions):
        async with connection(app) as (ws, sid):
            await sessions.close(sid, status=s.SessionStatus.CRASHED)
            await ws.send_json({"type": "message", "session_id": str(sid), "text": "x"})
            error = await ws.receive_json()
            assert error == {"type": "error", "error": "invalid or expired session"}
            assert (await ws.receive())["code"] == 4401
        assert await status_of(sessions, sid) == s.SessionStatus.CRASHED


@pytest.mark.anyio
async def test_gateway_client_closing_while_a_reply_is_sent_keeps_its_close_code() -> None:
    """helper-184: under uvicorn a send to a client that just closed (code 1000) raises
    OSError, which Starlette turns into WebSocketDisconnect(1006): the session ended
    ABNORMAL with a traceback. The gateway now reads the client's close frame."""
    async with gateway() as (app, sessions):
        async with connection(app) as (ws, sid):
            ws.client_gone = True
            await ws.send_json({"type": "message", "session_id": str(sid), "text": "x"})
            await ws.to_app.send({"type": "websocket.disconnect", "code": 1000})
        session = await sessions.get(sid, touch=False)
        assert session.status == s.SessionStatus.EXITED and session.messages.total == 2


@pytest.mark.anyio
async def test_gateway_expired_session_gets_error_and_close() -> None:
    clock = ManualClock()
    async with gateway(clock) as (app, sessions):
        async with connection(app) as (ws, sid):
            await ws.send_json({"type": "message", "session_id": str(sid), "text": "x"})
            assert (await ws.receive_json())["type"] == "reply"
            clock.advance(61)
            await ws.send_json({"type": "message", "session_id": str(sid), "text": "late"})
            error = await ws.receive_json()
            assert error == {"type": "error", "error": "invalid or expired session"}
            assert (await ws.receive())["code"] == 4401
        assert not await sessions.exists(sid)


# --- websocket gateway, real process ------------------------------------------------------


def wait_for_status(address: str, sid: str, expected: str) -> dict[str, Any]:
    """Poll the gateway's admin view until the session's status is ``expected``."""
    deadline = time.monotonic() + 30
    with httpx.Client(base_url=f"http://{address}") as http:
        while True:
            data: dict[str, Any] = http.get(f"/sessions/{sid}").json()
            if data.get("status") == expected or time.monotonic() > deadline:
                return data
            time.sleep(0.05)


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_gateway_stops_on_ctrl_c_with_a_connection_open(
    kind: str, tmp_path: Path, server_log: IO[bytes]
) -> None:
    # hypercorn on Python 3.12+ waited for the open connection for good (hypercorn#308):
    # the gateway closes its connections as it stops, 1001 (going away), sessions EXITED.
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    db = tmp_path / "gateway.db"
    with (
        serve_process(GATEWAY, kind, f"sqlite:///{db}", server_log) as (process, address),
        connect(f"ws://{address}/ws", open_timeout=10, close_timeout=5) as ws,
    ):
        sid = json.loads(ws.recv(timeout=10))["session_id"]
        process.send_signal(signal.SIGINT)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=STOP_LIMIT)
        try:
            process.wait(timeout=STOP_LIMIT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{kind} did not stop on Ctrl+C with a connection open")
        assert process.returncode == 0
    assert closed.value.rcvd is not None  # (uvicorn closes them itself, with 1012)
    assert closed.value.rcvd.code == (1012 if kind == "uvicorn" else 1001)
    with contextlib.closing(sqlite3.connect(db)) as stored:
        [(status,)] = stored.execute("SELECT status FROM sessions WHERE id = ?", [sid])
    assert status == "exited"


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_gateway_real_process(kind: str, tmp_path: Path, server_log: IO[bytes]) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    store = f"sqlite:///{tmp_path / 'gateway.db'}"
    with serve_sync(GATEWAY, kind, store, server_log) as address:
        url = f"ws://{address}/ws"
        with connect(url, open_timeout=10, close_timeout=5) as ws:
            created = json.loads(ws.recv(timeout=10))
            assert created["type"] == "session_created"
            clean = created["session_id"]
            ws.send(json.dumps({"type": "message", "session_id": clean, "text": "hello"}))
            reply = json.loads(ws.recv(timeout=10))
            assert reply == {
                "type": "reply",
                "session_id": clean,
                "text": "echo: hello",
                "count": 1,
            }
            ws.send(json.dumps({"type": "bye", "session_id": clean}))
            assert json.loads(ws.recv(timeout=10)) == {"type": "bye", "session_id": clean}
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
        assert wait_for_status(address, clean, "exited")["status"] == "exited"

        if kind == "uvicorn":  # hypercorn reports a client's close frame as 1006
            with connect(url, open_timeout=10, close_timeout=5) as ws:
                closing = json.loads(ws.recv(timeout=10))["session_id"]
            assert wait_for_status(address, closing, "exited")["status"] == "exited"

        broken_ids: list[str] = []
        with contextlib.suppress(OSError, ConnectionClosed):  # closing a dead socket fails
            with connect(url, open_timeout=10, close_timeout=5) as ws:
                broken_ids.append(json.loads(ws.recv(timeout=10))["session_id"])
                ws.socket.shutdown(socket.SHUT_RDWR)  # vanish without a close frame
                ws.socket.close()
        (broken,) = broken_ids
        assert wait_for_status(address, broken, "abnormal")["status"] == "abnormal"

        with connect(url, open_timeout=10, close_timeout=5) as ws:
            sid = json.loads(ws.recv(timeout=10))["session_id"]
            ws.send(json.dumps({"type": "message", "session_id": str(uuid.uuid4()), "text": "x"}))
            assert json.loads(ws.recv(timeout=10))["type"] == "error"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert wait_for_status(address, sid, "abnormal")["status"] == "abnormal"
