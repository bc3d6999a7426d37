"""A websocket gateway: one asyncsession session per connection.

Protocol (JSON text frames)::

    server → {"type": "session_created", "session_id": "<uuid>"}
    client → {"type": "message", "session_id": "<uuid>", "text": "hi"}
    server → {"type": "reply", "session_id": "<uuid>", "text": "echo: hi", "count": 1}
    client → {"type": "bye", "session_id": "<uuid>"}
    server → {"type": "bye", "session_id": "<uuid>"}  then closes with code 1000
    server → {"type": "error", "error": "..."}   then closes with code 4401 (bad session),
                                                  1008 (malformed message) or 1009
                                                  (a frame over 64 KiB)

A message must carry this connection's live session id: an unknown, foreign, malformed
or expired id gets an error and the socket is closed. When the connection ends its
session is closed: EXITED after a clean end (a "bye" message, a close frame with code
1000/1001, or the server stopping), ABNORMAL after an abrupt disconnect, a protocol error
or a server error.
Hypercorn reports every client-initiated close as code 1006 (pgjones/hypercorn#127), so
there only "bye" ends a session cleanly; uvicorn passes the client's close code on.
When the server stops (Ctrl+C, SIGTERM) the open connections are closed with 1001
(going away; uvicorn closes them itself, with 1012), their sessions EXITED, and so is one
that begins as it stops:
``app.state.end_connections()``, which ``main()`` awaits on each signal (see
``serving.py``: hypercorn's asyncio worker on Python 3.12+ waits for open connections
without end, pgjones/hypercorn#308). ``GET /sessions/{id}`` shows a session's status (an
admin view for demos and tests).

Run it::

    python examples/websocket_gateway.py --port 8001 --store sqlite:////tmp/gateway.db
    python examples/websocket_gateway.py --worker-class trio --store memory://
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

import asyncsession as s

logger = logging.getLogger("websocket_gateway")

DEFAULT_STORE = "sqlite:///gateway.db"
CLEAN_CLOSE_CODES = frozenset({1000, 1001, 1012})  # 1012: uvicorn stopping
BAD_SESSION = 4401
POLICY_VIOLATION = 1008
TOO_BIG = 1009
MAX_FRAME = 64 * 1024  # bytes of one text frame (UTF-8)


class ProtocolError(Exception):
    """The client broke the protocol; ``code`` is the websocket close code to use."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class OpenConnections:
    """A cancel scope per open connection, cancelled together when the server stops:
    each connection is then closed with 1001 (going away), its session EXITED."""

    def __init__(self) -> None:
        self._open: set[anyio.CancelScope] = set()
        self.stopping = False

    @contextlib.contextmanager
    def held(self) -> Iterator[anyio.CancelScope]:
        """A connection's scope (not entered), cancelled already if stopping."""
        serving = anyio.CancelScope()
        if self.stopping:
            serving.cancel()
        self._open.add(serving)
        try:
            yield serving
        finally:
            self._open.discard(serving)

    async def end(self) -> None:
        """End every open connection, and any that begins from now on."""
        self.stopping = True
        for serving in list(self._open):
            serving.cancel()


def create_app(manager: Callable[[], s.SessionManager] | str | None = None) -> Starlette:
    """The gateway app; ``manager`` is a store URL or a factory of an unentered manager."""
    if manager is None or isinstance(manager, str):
        url = manager or os.environ.get("GATEWAY_STORE", DEFAULT_STORE)
        sessions = s.SessionManager(s.repository_from_url(url), idle_timeout=900)
    else:
        sessions = manager()

    async def handle(session: s.Session, frame: Mapping[str, Any]) -> dict[str, Any]:
        """Validate one client message and answer it."""
        raw = frame.get("text") or ""
        if len(raw.encode("utf-8", "surrogatepass")) > MAX_FRAME:
            raise ProtocolError(f"messages are limited to {MAX_FRAME} bytes", TOO_BIG)
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise ProtocolError("messages must be JSON text", POLICY_VIOLATION) from None
        if not isinstance(data, dict) or data.get("type") not in ("message", "bye"):
            raise ProtocolError('expected {"type": "message" or "bye", ...}', POLICY_VIOLATION)
        if data.get("session_id") != str(session.id):
            raise ProtocolError("invalid or expired session", BAD_SESSION)
        if data["type"] == "bye":
            return {"type": "bye", "session_id": str(session.id)}
        text = data.get("text")
        if not isinstance(text, str):
            raise ProtocolError("text must be a string", POLICY_VIOLATION)
        reply = f"echo: {text}"
        try:
            await sessions.get(session.id, last_messages=0)  # live? (counts as activity)
            stored = await sessions.add_messages(
                session.id, [("user", text, None), ("assistant", reply, None)]
            )
        except (s.SessionNotFound, s.SessionClosed):  # expired, or closed by an admin
            raise ProtocolError("invalid or expired session", BAD_SESSION) from None
        except s.InvalidJSONValue:  # e.g. a lone surrogate ("\ud800"): not storable text
            raise ProtocolError("text must be valid Unicode text", POLICY_VIOLATION) from None
        except s.LimitExceeded as exc:  # a manager with max_messages or max_message_size
            raise ProtocolError(f"{exc.what} is limited to {exc.limit}", POLICY_VIOLATION) from None
        count = stored.messages.total // 2
        return {"type": "reply", "session_id": str(session.id), "text": reply, "count": count}

    def disconnected(session: s.Session, code: int) -> s.SessionStatus:
        """The status a client's close with ``code`` ends its session with."""
        logger.info("session %s disconnected with code %s", session.id, code)
        return s.SessionStatus.EXITED if code in CLEAN_CLOSE_CODES else s.SessionStatus.ABNORMAL

    connections = OpenConnections()

    async def converse(websocket: WebSocket, session: s.Session) -> s.SessionStatus:
        """Answer the client's messages until the connection ends; return the status
        its session ends with."""
        try:
            await websocket.send_json({"type": "session_created", "session_id": str(session.id)})
            while True:
                frame = await websocket.receive()
                if frame["type"] == "websocket.disconnect":
                    return disconnected(session, frame.get("code", 1005))
                try:
                    answer = await handle(session, frame)
                except ProtocolError as exc:
                    await websocket.send_json({"type": "error", "error": str(exc)})
                    await websocket.close(code=exc.code)
                    return s.SessionStatus.ABNORMAL
                await websocket.send_json(answer)
                if answer["type"] == "bye":
                    await websocket.close(code=1000)
                    return s.SessionStatus.EXITED
        except WebSocketDisconnect as exc:  # the client closed while a frame was sent
            code = exc.code  # 1006 from Starlette: the client's own code comes in receive()
            with anyio.move_on_after(1):
                frame = await websocket.receive()
                if frame["type"] == "websocket.disconnect":
                    code = frame.get("code", code)
            return disconnected(session, code)

    async def gateway(websocket: WebSocket) -> None:
        # Held from the start: one that begins as the server stops ends at once too.
        with connections.held() as serving:
            await websocket.accept()
            session = await sessions.create(name="websocket")
            status = s.SessionStatus.ABNORMAL
            try:
                with serving:
                    status = await converse(websocket, session)
                if serving.cancelled_caught:  # connections.end(): the server is stopping
                    status = s.SessionStatus.EXITED
                    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                        await websocket.close(code=1001)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    try:
                        await sessions.close(session.id, status=status)
                    except (s.SessionNotFound, s.SessionClosed):
                        logger.info("session %s had already ended", session.id)

    async def show(request: Request) -> JSONResponse:
        try:
            session = await sessions.get(request.path_params["session_id"], touch=False)
        except s.SessionNotFound:
            return JSONResponse({"error": "not found"}, 404)
        return JSONResponse(
            {
                "session_id": str(session.id),
                "status": session.status.value,
                "messages": [{"role": m.role, "content": m.content} for m in session.messages],
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with sessions:
            yield

    app = Starlette(
        routes=[WebSocketRoute("/ws", gateway), Route("/sessions/{session_id}", show)],
        lifespan=lifespan,
    )
    app.state.sessions = sessions
    app.state.end_connections = connections.end
    return app


def main() -> None:
    from serving import add_arguments, run  # beside this file (in a package: .serving)

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_arguments(parser, port=8001)
    parser.add_argument("--store", default=os.environ.get("GATEWAY_STORE", DEFAULT_STORE))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(args.store)
    run(app, args, on_signal=app.state.end_connections)


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
