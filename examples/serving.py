"""Serve an ASGI app under hypercorn (asyncio or trio worker) or uvicorn until SIGINT or
SIGTERM: the ``main()`` of ``chat_server.py`` and ``websocket_gateway.py``.

An app with long-lived responses (event streams, websockets) must end them itself as the
server stops: hypercorn's asyncio worker on Python 3.12+ waits for open connections past
its ``graceful_timeout`` without end (pgjones/hypercorn#308). ``on_signal`` is awaited on
each signal (on a later one again: for a response that began meanwhile); the server stops
after the first. Copy this file along with an example you adapt.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

logger = logging.getLogger("serving")

GRACE = 2  # seconds the server gives open requests once it stops


def add_arguments(parser: argparse.ArgumentParser, *, port: int) -> None:
    """The command line options :func:`run` takes: --host, --port, --server, --worker-class."""
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--server", choices=["hypercorn", "uvicorn"], default="hypercorn")
    parser.add_argument("--worker-class", choices=["asyncio", "trio"], default="asyncio")


def run(
    app: Any,
    options: argparse.Namespace,
    *,
    on_signal: Callable[[], Awaitable[None]],
) -> None:
    """Serve ``app`` as ``options`` (from :func:`add_arguments`) say, until SIGINT or
    SIGTERM."""
    host, port = options.host, options.port
    if options.server == "uvicorn":
        if options.worker_class != "asyncio":
            sys.exit("uvicorn runs on asyncio only: pass --worker-class asyncio")
        import uvicorn

        # uvicorn ends open websockets itself, but waits for an open stream without end
        # unless given a grace period
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE)
        return
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = GRACE

    async def serve(serve_app: Callable[..., Awaitable[Any]]) -> None:
        stop = anyio.Event()

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    if stop.is_set():
                        logger.info("stopping: ending the open responses again")
                    stop.set()
                    await on_signal()

        async def hypercorn() -> None:
            await serve_app(app, config, shutdown_trigger=stop.wait)
            tg.cancel_scope.cancel()  # (on_signals)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(hypercorn)  # not in this task: hypercorn leaves it cancelled
                await on_signals()
        except BaseExceptionGroup as group:  # hypercorn's own error (a port in use), alone
            error: BaseException = group
            while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
                error = error.exceptions[0]
            if error is group:
                raise
            raise error from None

    if options.worker_class == "trio":
        import trio
        from hypercorn.trio import serve as trio_serve

        trio.run(serve, trio_serve)
    else:
        import asyncio

        from hypercorn.asyncio import serve as asyncio_serve

        asyncio.run(serve(asyncio_serve))
