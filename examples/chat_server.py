"""A multi-user chat backend on Starlette with asyncsession web sessions.

Each browser gets its own session (a signed cookie, see :mod:`asyncsession.asgi`) and its
own conversation, stored as the session's messages. The "assistant" answers
deterministically: ``#<n> <your text reversed>``.

Endpoints::

    GET  /               the chat page (inline HTML + JS)
    POST /api/session    start (or continue) this browser's conversation
    POST /api/messages   {"text": "..."}: append the message and the assistant's reply
    GET  /api/state      this browser's conversation
    POST /api/interrupt  record an interruption (a system message)
    POST /api/logout     forget this browser's conversation (deleted server-side)
    GET  /api/events     server-sent events for this browser's session only

Run it (the default store is SQLite; any store by URL)::

    python examples/chat_server.py --port 8000 --store sqlite:////tmp/chat.db
    python examples/chat_server.py --server hypercorn --worker-class trio --store memory://
    python examples/chat_server.py --server uvicorn --store redis://localhost:6379/0

Store URLs (``asyncsession.repository_from_url``): ``sqlite:///relative.db`` or
``sqlite:////abs/path.db``, ``memory://``,
``file:///abs/dir``, ``redis://...``. Set ``CHAT_SECRET_KEY`` so cookies outlive a restart.
With hypercorn directly: ``hypercorn --worker-class trio 'chat_server:create_app()'`` (from
``examples/``; the store comes from ``CHAT_STORE``).

Several worker processes (``hypercorn --workers 4 'chat_server:create_app()'`` from
``examples/``, or servers behind a load balancer) need Redis and one ``CHAT_SECRET_KEY``
(without it each worker signs with a key of its own and rejects the others' cookies):
on Redis the app turns on ``share_events``, so a browser's event stream hears what it
posted through any worker. SQLite and files can be shared by processes but not their
events: each stream then shows only what its own worker handled (reload the page to see
the rest), so run them in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import asyncsession as s
from asyncsession.abc import EventTransport
from asyncsession.asgi import SessionMiddleware, get_session

logger = logging.getLogger("chat_server")

DEFAULT_STORE = "sqlite:///chat.db"
MAX_TEXT = 2000
#: The largest request body read: MAX_TEXT characters as JSON escapes (12 bytes for a
#: character beyond the BMP: "\\ud83d\\ude00", as json.dumps writes it) and room.
MAX_BODY = 12 * MAX_TEXT + 1024
ENDED = {"error": "this conversation has ended (logged out, expired or closed); start anew"}


def assistant_reply(number: int, text: str) -> str:
    """The deterministic assistant: numbers its answers and reverses the text."""
    return f"#{number} {text[::-1]}"


def _messages(session: s.Session, start: int = 0) -> list[dict[str, Any]]:
    log = session.messages
    return [
        {"index": log.offset + i, "role": m.role, "content": m.content}
        for i, m in enumerate(log)
        if log.offset + i >= start
    ]


def _state(session: s.Session | None) -> dict[str, Any]:
    if session is None:
        return {"session_id": None, "messages": [], "interrupts": 0}
    return {
        "session_id": str(session.id),
        "messages": _messages(session),
        "interrupts": session.state.get("interrupts", 0),
    }


def create_app(
    manager: Callable[[], s.SessionManager] | str | None = None,
    *,
    secret_key: str | None = None,
    secure_cookies: bool = False,
) -> Starlette:
    """The chat app; ``manager`` is a store URL or a factory of an unentered manager.

    The lifespan enters the manager, so the app works under any ASGI server. Cookies are
    not ``Secure`` by default because the demo serves plain HTTP on localhost.
    """
    if manager is None or isinstance(manager, str):
        store = s.repository_from_url(manager or os.environ.get("CHAT_STORE", DEFAULT_STORE))
        # Redis tells the other worker processes about changes; other stores cannot.
        shared = isinstance(store, EventTransport)
        sessions = s.SessionManager(store, idle_timeout=3600, share_events=shared)
    else:
        sessions = manager()
    key = secret_key or os.environ.get("CHAT_SECRET_KEY")
    if not key:
        logger.warning(
            "CHAT_SECRET_KEY is not set: a random key is used, so cookies will not survive "
            "a restart, and with several workers each rejects the others' cookies (a "
            "browser then starts a new conversation); set it to one secret for them all"
        )
        key = secrets.token_urlsafe(32)
    streams = OpenStreams()

    async def current(request: Request) -> s.Session | None:
        sid = get_session(request.scope).id
        if sid is None:
            return None
        try:
            return await sessions.get(sid, touch=False)
        except s.SessionNotFound:
            return None

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def start(request: Request) -> JSONResponse:
        sid = await get_session(request.scope).ensure_created()
        return JSONResponse(_state(await sessions.get(sid, touch=False)))

    async def send_message(request: Request) -> JSONResponse:
        too_big = JSONResponse({"error": f"the body is over {MAX_BODY} bytes"}, 413)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            return too_big  # without reading it
        raw = b""
        async with contextlib.aclosing(request.stream()) as chunks:
            async for chunk in chunks:  # read no more than MAX_BODY bytes
                raw += chunk
                if len(raw) > MAX_BODY:  # a chunked body, without a content-length
                    return too_big
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, empty, nested too deep
            return JSONResponse({"error": 'the body must be JSON: {"text": "..."}'}, 400)
        text = body.get("text") if isinstance(body, dict) else None
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
            return JSONResponse({"error": f"text must be 1-{MAX_TEXT} characters"}, 400)
        sid = await get_session(request.scope).ensure_created()

        def exchange(session: s.Session) -> s.Session:
            number = sum(1 for m in session.messages if m.role == "user") + 1
            return session.with_message("user", text).with_message(
                "assistant", assistant_reply(number, text)
            )

        try:
            session = await sessions.update(sid, exchange)
        except (s.SessionNotFound, s.SessionClosed):  # logged out in another tab, expired...
            return JSONResponse(ENDED, 409)
        except s.InvalidJSONValue:  # e.g. a lone surrogate ("\ud800"): not storable text
            return JSONResponse({"error": "text must be valid Unicode text"}, 400)
        except s.LimitExceeded as exc:  # a manager with max_messages or max_message_size
            return JSONResponse({"error": f"{exc.what} is limited to {exc.limit}"}, 413)
        return JSONResponse({"session_id": str(sid), "messages": _messages(session)[-2:]})

    async def state(request: Request) -> JSONResponse:
        return JSONResponse(_state(await current(request)))

    async def interrupt(request: Request) -> JSONResponse:
        session = await current(request)
        if session is None:
            return JSONResponse({"error": "no conversation to interrupt"}, 409)

        def mark(session: s.Session) -> s.Session:
            count = int(session.state.get("interrupts", 0)) + 1
            return session.with_state(interrupts=count).with_message(
                "system", "Interrupted by the user."
            )

        try:
            session = await sessions.update(session.id, mark)
        except (s.SessionNotFound, s.SessionClosed):  # logged out in another tab, expired...
            return JSONResponse(ENDED, 409)
        return JSONResponse(_state(session))

    async def logout(request: Request) -> JSONResponse:
        request.session.clear()  # the middleware deletes it before the response starts
        return JSONResponse({"ok": True})

    async def events(request: Request) -> Response:
        session = await current(request)
        if session is None:
            return JSONResponse({"error": "start a conversation first"}, 409)
        return StreamingResponse(
            _event_stream(sessions, session.id, session.messages.total, session.revision, streams),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions:
            yield

    routes = [
        Route("/", page),
        Route("/api/session", start, methods=["POST"]),
        Route("/api/messages", send_message, methods=["POST"]),
        Route("/api/state", state),
        Route("/api/interrupt", interrupt, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/events", events),
    ]
    middleware = [
        Middleware(
            SessionMiddleware,
            sessions,
            secret_key=key,
            cookie_name="chat_session",
            secure=secure_cookies,
        )
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.sessions = sessions
    app.state.end_event_streams = streams.end
    return app


class OpenStreams:
    """The open event streams' subscriptions, ended together when the server stops (an
    open page never ends its stream; its EventSource connects again, to another worker
    or once the server is back)."""

    def __init__(self) -> None:
        self._open: set[s.Subscription] = set()
        self.stopping = False

    def __len__(self) -> int:
        return len(self._open)

    async def add(self, subscription: s.Subscription) -> None:
        """Hold ``subscription`` until :meth:`discard`; end it at once if stopping."""
        self._open.add(subscription)
        if self.stopping:  # a stream that began as the server was stopping
            await subscription.aclose()

    def discard(self, subscription: s.Subscription) -> None:
        self._open.discard(subscription)

    async def end(self) -> None:
        """End every open stream, and any that begins from now on."""
        self.stopping = True
        for subscription in list(self._open):
            await subscription.aclose()


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _event_stream(
    sessions: s.SessionManager,
    session_id: uuid.UUID,
    seen: int,
    revision: int,
    streams: OpenStreams,
) -> AsyncIterator[str]:
    """SSE for one session: its new messages, state changes and its end.

    "ready" is sent once subscribed, so a client that waits for it misses nothing: the
    session is read again first, and a change since the page read it (at ``revision``)
    or its end follows "ready". Another worker's events carry no session
    (``event.remote``): it is read again too. It ends when its subscription does: the
    manager leaving, or the server stopping (``streams.end()``).
    """
    async with sessions.subscribe(session_id=session_id) as subscription:
        await streams.add(subscription)
        try:
            session = await _read(sessions, session_id)
            yield _sse("ready", {"session_id": str(session_id)})
            if session is None:  # it ended before the subscription began
                yield _sse("ended", {"kind": "not_found"})
                return
            if session.revision == revision:
                session = None  # unchanged since the page read it: wait for an event
            kind = s.EventKind.UPDATED.value
            events = subscription.__aiter__()
            while True:
                if session is not None:
                    new = _messages(session, seen)
                    if new:
                        seen = new[-1]["index"] + 1
                    interrupts = session.state.get("interrupts", 0)
                    yield _sse(kind, {"messages": new, "interrupts": interrupts})
                event = await anext(events, None)
                if event is None:  # the server is stopping (the page connects again)
                    return
                if event.kind in (s.EventKind.DELETED, s.EventKind.EXPIRED):
                    yield _sse("ended", {"kind": event.kind.value})
                    return
                kind = event.kind.value
                session = event.session or await _read(sessions, session_id)
                if session is None:  # expired or deleted since another worker's event
                    yield _sse("ended", {"kind": "not_found"})
                    return
        finally:
            streams.discard(subscription)


async def _read(sessions: s.SessionManager, session_id: uuid.UUID) -> s.Session | None:
    """The session, or None once it expired, was deleted or rotated away."""
    try:
        return await sessions.get(session_id, touch=False)
    except s.SessionNotFound:
        return None


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>asyncsession chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:42rem;margin:2rem auto;padding:0 1rem;
      background:#f6f7f9;color:#222}
 h1{font-size:1.3rem} #sid{font-family:monospace;color:#666;font-size:.85rem}
 #log{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.75rem;
      min-height:12rem;list-style:none;margin:1rem 0}
 #log li{margin:.35rem 0;padding:.4rem .6rem;border-radius:6px;max-width:80%}
 li.user{background:#dbeafe;margin-left:auto!important;text-align:right}
 li.assistant{background:#ecfdf5} li.system{background:#fef3c7;font-style:italic}
 form{display:flex;gap:.5rem} #text{flex:1;padding:.5rem;font-size:1rem}
 button{padding:.5rem .9rem;font-size:1rem} #status{color:#666;font-size:.85rem}
</style></head>
<body>
<h1>asyncsession chat</h1>
<div>session <span id="sid">...</span> &middot; <span id="status">connecting</span></div>
<ul id="log"></ul>
<form id="form"><input id="text" autocomplete="off" placeholder="Say something" disabled>
<button id="send" disabled>Send</button>
<button id="interrupt" type="button" disabled>Interrupt</button></form>
<script>
const log = document.getElementById("log");
function render(messages) {
  log.replaceChildren(...messages.map(m => {
    const li = document.createElement("li");
    li.className = m.role; li.dataset.index = m.index; li.textContent = m.content;
    return li;
  }));
}
async function refresh() {
  const state = await (await fetch("/api/state")).json();
  render(state.messages);
}
async function main() {
  const state = await (await fetch("/api/session", {method: "POST"})).json();
  document.getElementById("sid").textContent = state.session_id;
  render(state.messages);
  const events = new EventSource("/api/events");
  events.addEventListener("ready", () => {
    document.getElementById("status").textContent = "live";
    for (const id of ["text", "send", "interrupt"]) document.getElementById(id).disabled = false;
  });
  for (const kind of ["updated", "message_added", "closed"]) events.addEventListener(kind, refresh);
  events.addEventListener("ended", () => {
    document.getElementById("status").textContent = "ended"; events.close();
  });
  document.getElementById("form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = document.getElementById("text");
    const text = input.value.trim(); if (!text) return;
    input.value = "";
    await fetch("/api/messages", {method: "POST", headers: {"content-type": "application/json"},
                                  body: JSON.stringify({text})});
    await refresh();
  });
  document.getElementById("interrupt").addEventListener("click", async () => {
    await fetch("/api/interrupt", {method: "POST"}); await refresh();
  });
}
main();
</script>
</body></html>
"""


def main() -> None:
    from serving import add_arguments, run  # beside this file (in a package: .serving)

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_arguments(parser, port=8000)
    parser.add_argument(
        "--store",
        default=os.environ.get("CHAT_STORE", DEFAULT_STORE),
        help="store URL (default: %(default)s); several processes: redis://... (live updates)",
    )
    parser.add_argument("--secure-cookies", action="store_true", help="serve behind HTTPS")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(args.store, secure_cookies=args.secure_cookies)
    run(app, args, on_signal=app.state.end_event_streams)


if __name__ == "__main__":
    try:
        main()
    except ModuleNotFoundError as exc:
        if exc.name not in ("hypercorn", "trio", "uvicorn"):
            raise
        sys.exit(
            f"{exc.name} is not installed: `pip install hypercorn trio` (for --worker-class "
            "trio), or `pip install 'uvicorn[standard]'` and pass --server uvicorn"
        )
