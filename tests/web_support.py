"""Helpers for the web example tests: run an example server as a child process."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import anyio

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "chat_server.py"
GATEWAY = ROOT / "examples" / "websocket_gateway.py"
SECRET = "web-examples-test-secret-key"
SERVERS = {
    "hypercorn-asyncio": ["--server", "hypercorn", "--worker-class", "asyncio"],
    "hypercorn-trio": ["--server", "hypercorn", "--worker-class", "trio"],
    "uvicorn": ["--server", "uvicorn"],
}
STARTUP_LIMIT = 60  # seconds; a deadlock guard, not a timing assertion


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command(script: Path, kind: str, port: int, store: str) -> list[str]:
    return [sys.executable, str(script), *SERVERS[kind], "--port", str(port), "--store", store]


def environment() -> dict[str, str]:
    return {**os.environ, "CHAT_SECRET_KEY": SECRET, "PYTHONUNBUFFERED": "1"}


@contextlib.asynccontextmanager
async def serve(script: Path, kind: str, store: str, log: IO[bytes]) -> AsyncIterator[str]:
    """Run an example server as a child process; yield its base URL."""
    port = free_port()
    process = await anyio.open_process(
        command(script, kind, port, store), stdout=log, stderr=subprocess.STDOUT, env=environment()
    )
    try:
        with anyio.fail_after(STARTUP_LIMIT):
            while True:
                if process.returncode is not None:
                    raise AssertionError(f"{kind} server exited early; see {log.name}")
                try:
                    stream = await anyio.connect_tcp("127.0.0.1", port)
                except OSError:
                    await anyio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        with anyio.move_on_after(15):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.aclose()


@contextlib.contextmanager
def serve_sync(script: Path, kind: str, store: str, log: IO[bytes]) -> Iterator[str]:
    """Like :func:`serve`, for synchronous tests."""
    with serve_process(script, kind, store, log) as (_, address):
        yield address


@contextlib.contextmanager
def serve_process(
    script: Path, kind: str, store: str, log: IO[bytes]
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """:func:`serve_sync` that also yields the server's process."""
    port = free_port()
    process = subprocess.Popen(
        command(script, kind, port, store), stdout=log, stderr=subprocess.STDOUT, env=environment()
    )
    try:
        deadline = time.monotonic() + STARTUP_LIMIT
        while True:
            assert process.poll() is None, f"{kind} server exited early; see {log.name}"
            assert time.monotonic() < deadline, f"{kind} server did not start; see {log.name}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield process, f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
