"""Store URLs (``asyncsession.repository_from_url``): what each part means, and clean
refusals of what it cannot mean (found by helper-42)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from redis_support import redis_binary, require_redis

import asyncsession as s


def redis_store(url: str) -> Any:
    pytest.importorskip("coredis")
    store = s.repository_from_url(url)
    assert isinstance(store, s.RedisRepository)
    return store


def pool(store: Any) -> Any:
    return store.client.connection_pool


# -- Redis URLs: everything but the prefix goes to the client as written ----------------------


def test_unix_url_keeps_its_empty_authority() -> None:
    """unix:///path was rebuilt as unix:/path (urlunsplit drops the empty '//'), which
    the store refused: no unix:// URL worked."""
    store = redis_store("unix:///run/r.sock?db=3&prefix=a%3A&client_name=me")
    assert store.prefix == "a:"
    assert str(pool(store).location) == "/run/r.sock"
    assert pool(store).connection_kwargs["db"] == 3
    assert pool(store).connection_kwargs["client_name"] == "me"
    assert redis_store("unix:///run/r.sock").prefix == "asyncsession:"


def test_redis_url_parts() -> None:
    store = redis_store("redis://127.0.0.1:6390/4?prefix=p:")
    assert (store.prefix, str(pool(store).location)) == ("p:", "127.0.0.1:6390")
    assert pool(store).connection_kwargs["db"] == 4
    assert redis_store("redis://[::1]:6390/").prefix == "asyncsession:"
    assert redis_store("rediss://example.com/2?prefix=app%3Av1%3A").prefix == "app:v1:"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://localhost:abc/0", "its port is not a number from 1 to 65535"),
        ("redis://localhost:70000/0", "its port is not a number from 1 to 65535"),
        ("redis://localhost:0/0", "port 0"),
        ("redis://[::1/0", "the '[' of its IPv6 address is not closed"),
        ("redis://localhost:6379/five", "the path '/five' is not a database number"),
        ("redis://localhost:6379/0/1", "the path '/0/1' is not a database number"),
        ("redis://localhost/0?db=x", "db='x' is not a database number"),
        ("redis://localhost/1?db=2", "database 1 in the path and db=2"),
        ("redis:///0", "names no host"),
        ("unix://relative.sock", "three slashes"),
        ("unix:///run/r.sock?db=", "db='' is not a database number"),
        ("redis://localhost/0?prefix=a:&prefix=b:", "give ?prefix= once"),
        ("redis://localhost/0?max_connections=many", "Invalid Redis URL"),
    ],
)
def test_malformed_redis_urls_are_refused(url: str, says: str) -> None:
    """These raised ValueError (a traceback in the CLI) or silently meant database 0."""
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration, match="Invalid Redis URL") as caught:
        s.repository_from_url(url)
    assert says in str(caught.value)


@pytest.mark.parametrize("query", ["?prefix=", "?prefix", "?db=0&prefix="])
def test_a_blank_prefix_is_the_stores_error(query: str) -> None:
    """A blank prefix fell back to the default one: the URL seemed to set it."""
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration, match="prefix must be a non-empty string"):
        s.repository_from_url(f"redis://localhost:6379/0{query}")


def test_errors_do_not_show_the_password() -> None:
    pytest.importorskip("coredis")
    for url in ("redis://:hunter2@localhost:x/0", "unix://user:hunter2@/run/r.sock?db=x"):
        with pytest.raises(s.InvalidConfiguration) as caught:
            s.repository_from_url(url)
        assert "hunter2" not in str(caught.value) and ":***@" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:S3cr#tPass@db.example:6379/0",
        "redis://app:S3cr/tPass@db.example:6379/0",
        "redis://app:S3cr?tPass@db.example:6379/0",
        "redis://app:S3cr@tPass@db.example:6379/x",
        "redis://app:S3cr/t#P?ss@db.example:abc/0",
        "REDIS://app:S3cretPass@db.example:6379/x",
        "unix://app:S3cr/tPass@/run/r.sock?db=x",
    ],
)
def test_errors_do_not_show_a_password_with_url_delimiters(url: str) -> None:
    """An unencoded password holding '#', '/' or '?' was printed: the mask stopped at the
    first of those, and urllib's message quoted the text before it (found by helper-55)."""
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration, match="Invalid Redis URL") as caught:
        s.repository_from_url(url)
    assert "S3cr" not in str(caught.value) and "***@" in str(caught.value)


def test_the_redis_stores_own_url_error_does_not_show_the_password() -> None:
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration, match="must start with redis://") as caught:
        s.RedisRepository("http://app:S3cr/t@db.example:6379/0")
    assert "S3cr" not in str(caught.value) and "app:***@db.example" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["REDIS://127.0.0.1:6379/0", "Redis://127.0.0.1:6379/0?prefix=app:", "Rediss://h:6379/0"],
)
def test_redis_schemes_are_case_insensitive(url: str) -> None:
    """REDIS://, Redis:// and Rediss:// URLs were refused ("must start with redis://")
    after the URL checks were added, though they had worked (found by helper-55)."""
    store = redis_store(url)
    assert store.prefix == ("app:" if "prefix" in url else "asyncsession:")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(
    "args",
    [
        ["show", "00000000-0000-4000-8000-000000000000"],
        ["show", "not-an-id"],
        ["delete", "00000000-0000-4000-8000-000000000000"],
        ["close", "00000000-0000-4000-8000-000000000000"],
    ],
)
def test_cli_messages_do_not_show_the_stores_password(
    args: list[str], backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI printed the --store URL as given, password and all (found by helper-55)."""
    pytest.importorskip("click")
    from asyncsession import _cli

    monkeypatch.setattr(_cli, "open_store", lambda url: s.MemoryRepository())
    url = "redis://app:S3cr/tPass@db.example:6379/0"
    with pytest.raises(_cli.CLIError) as caught:
        _cli.cli.main(
            [*args, "--store", url, "--backend", backend],
            prog_name="asyncsession",
            standalone_mode=False,
        )
    assert "S3cr" not in caught.value.message
    assert "redis://app:***@db.example:6379/0" in caught.value.message


# -- sqlite: and file: URLs: percent-decoded paths, no query -------------------------------------


def test_local_paths_are_percent_decoded(tmp_path: Path) -> None:
    """They were taken literally: sqlite:///my%20store.db made a file 'my%20store.db'."""
    store = s.repository_from_url("sqlite:///my%20store.db")
    assert isinstance(store, s.SQLiteRepository) and Path(store.path).name == "my store.db"
    store = s.repository_from_url(f"sqlite:///{tmp_path}/a%3Fb%23c.db")
    assert isinstance(store, s.SQLiteRepository) and Path(store.path) == tmp_path / "a?b#c.db"
    files = s.repository_from_url("file://./my%20dir")
    assert isinstance(files, s.FileRepository) and files.directory == Path("my dir")
    files = s.repository_from_url(f"file://{tmp_path}/caf%C3%A9")
    assert isinstance(files, s.FileRepository) and files.directory == tmp_path / "café"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("sqlite:///s.db?mode=ro", "take no query string"),
        ("sqlite:///s.db#x", "take no query string or fragment"),
        ("file://./dir?x=1", "take no query string"),
        ("sqlite:///s%FF.db", "not UTF-8"),
        ("file:///tmp/a%00b", "NUL"),
    ],
)
def test_local_urls_with_a_query_are_refused(url: str, says: str, tmp_path: Path) -> None:
    """sqlite:///s.db?mode=ro created a file named 's.db?mode=ro'."""
    with pytest.raises(s.InvalidConfiguration, match="Invalid store URL") as caught:
        s.repository_from_url(url)
    assert says in str(caught.value)


# -- a real redis-server on a unix socket ---------------------------------------------------------


@pytest.fixture(scope="module")
def unix_socket() -> Iterator[str]:
    """The path of a private redis-server's unix socket (no TCP port)."""
    require_redis()
    pytest.importorskip("coredis")
    binary = redis_binary()
    assert binary is not None
    directory = Path(tempfile.mkdtemp(prefix="as-unix-"))  # short: socket paths are limited
    path = str(directory / "r.sock")
    args = [binary, "--port", "0", "--unixsocket", path, "--dir", str(directory)]
    args += ["--save", "", "--appendonly", "no", "--logfile", str(directory / "redis.log")]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert process.poll() is None, (directory / "redis.log").read_text()
            try:
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(path)
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)
        yield path
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.anyio
async def test_unix_socket_url_reaches_the_server(unix_socket: str, anyio_backend: str) -> None:
    prefix = f"u-{uuid.uuid4().hex[:8]}:"
    now = datetime.now(timezone.utc)
    session = s.Session(uuid.uuid4(), now, now, owner="unix")
    async with s.repository_from_url(f"unix://{unix_socket}?db=1&prefix={prefix}") as store:
        await store.add(session)
        assert await store.get(session.id) == session
    # The database and the prefix are the URL's: not database 0, not another prefix.
    async with s.repository_from_url(f"unix://{unix_socket}?prefix={prefix}") as db0:
        assert await db0.get(session.id) is None
    async with s.repository_from_url(f"unix://{unix_socket}?prefix=other:&db=1") as other:
        assert await other.get(session.id) is None
    async with s.repository_from_url(f"unix://{unix_socket}?prefix={prefix}&db=1") as again:
        assert await again.get(session.id) == session


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cli_on_a_unix_socket(unix_socket: str, tmp_path: Path, backend: str) -> None:
    pytest.importorskip("click")
    url = f"unix://{unix_socket}?db=2&prefix=cli-{uuid.uuid4().hex[:8]}:"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASYNCSESSION_")}

    def cli(*args: str) -> Any:
        result = subprocess.run(
            [sys.executable, "-m", "asyncsession", *args, "--store", url, "--backend", backend],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    demo = cli("demo", "--users", "4", "--rounds", "3", "--json")
    listing = cli("list", "--json", "--all")
    assert len(listing["items"]) == demo["users"] == 4
