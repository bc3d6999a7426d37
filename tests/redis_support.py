"""A private ``redis-server`` for tests and benchmarks (127.0.0.1 only, temp directory).

``start_redis()`` / ``RedisServer.stop()`` work without pytest (benchmarks and child
processes use them); the ``redis_server`` fixture is session-scoped and skips when no
``redis-server`` binary exists, unless ``ASYNCSESSION_REQUIRE_REDIS=1`` makes it fail.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One ``redis-server`` process bound to 127.0.0.1 with its own directory."""

    def __init__(
        self,
        binary: str,
        directory: Path,
        port: int,
        *,
        appendonly: bool,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        self.appendonly = appendonly
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        args = [
            self.binary,
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always" if self.appendonly else "everysec",
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.directory / "redis.log"),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited at start:\n{log}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    # -NOAUTH: up, but started with --requirepass
                    if sock.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on {HOST}:{self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and wait for it to exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and directory."""
        self.stop()
        self.start()

    def command(self, *args: str) -> bytes:
        """Run one command over a raw socket; return a bulk reply's payload (or the line)."""
        with socket.create_connection((HOST, self.port), timeout=5) as sock:
            parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
            sock.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
            data = b""
            while b"\r\n" not in data:
                data += sock.recv(65536)
            header, _, rest = data.partition(b"\r\n")
            if not header.startswith(b"$") or header == b"$-1":
                return header
            size = int(header[1:])
            while len(rest) < size + 2:
                rest += sock.recv(65536)
            return rest[:size]


def redis_binary() -> str | None:
    return shutil.which("redis-server")


def start_redis(
    *,
    appendonly: bool = False,
    directory: Path | None = None,
    extra_args: Sequence[str] = (),
) -> RedisServer:
    """Start a private server on a free port; raise RuntimeError if there is no binary.

    ``extra_args`` are passed to ``redis-server`` after this module's own options (a
    later option wins), e.g. ``["--requirepass", "pw"]``.
    """
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="asyncsession-redis-"))
    server = RedisServer(
        binary, directory, free_port(), appendonly=appendonly, extra_args=extra_args
    )
    server.start()
    return server


def require_redis() -> None:
    """Skip (or fail with ASYNCSESSION_REQUIRE_REDIS=1) when redis-server is missing."""
    if redis_binary() is not None:
        return
    reason = "redis-server is not installed; the Redis tests need a real server"
    if os.environ.get("ASYNCSESSION_REQUIRE_REDIS") == "1":
        pytest.fail(f"{reason} (ASYNCSESSION_REQUIRE_REDIS=1)")
    pytest.skip(reason)


@pytest.fixture
def lone_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server that a test may stop (the shared one must keep running)."""
    require_redis()
    server = start_redis(directory=tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server shared by the test session (each test uses its own prefix)."""
    require_redis()
    server = start_redis(directory=tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()
