"""Store URLs (``asyncsession.repository_from_url``): what each part means, and clean
refusals of what it cannot mean (found by helper-42)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
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
    ipv6 = redis_store("redis://[::1]:6390/")
    assert ipv6.prefix == "asyncsession:"
    assert repr(ipv6) == "RedisRepository('[::1]:6390', prefix='asyncsession:')"  # not ::1:6390
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
        "redis://app@S3cr?tPass@db.example:6379/0",
        "unix://app@S3cr#tPass@/run/r.sock",
        # helper-185: an empty or numeric part before the '/' parsed as a port, and the
        # path error quoted the rest of the password
        "redis://admin:/S3crPass@db.example.com:6379/0",
        "redis://admin:6379/S3crPass@db.example/0",
        "rediss://admin:/S3crPass@db.example/0",
    ],
)
def test_errors_do_not_show_a_password_with_url_delimiters(url: str) -> None:
    """An unencoded password holding '#', '/' or '?' was printed: the mask stopped at the
    first of those, and urllib's message quoted the text before it (found by helper-55);
    the part after a '?' was named as an unknown query parameter."""
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration, match="Invalid Redis URL") as caught:
        s.repository_from_url(url)
    assert "S3cr" not in str(caught.value) and "***@" in str(caught.value)
    assert "Pass" not in str(caught.value)


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


# -- Redis URL query parameters: the ones the store honours, refusals of the rest ----------------

ENTRY_POINTS = {
    "repository_from_url": lambda url: s.repository_from_url(url),
    "RedisRepository": lambda url: s.RedisRepository(url),
}


def refusal(entry: str, url: str) -> str:
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration, match="Invalid Redis URL") as caught:
        ENTRY_POINTS[entry](url)
    return str(caught.value)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    "query",
    [
        "?prefx=app:",
        "?client-name=web",
        "?ssl_context=x",
        "?connection_class=x",
        "?credential_provider=x",
    ],
)
def test_unknown_redis_query_parameters_are_refused(entry: str, query: str) -> None:
    """coredis ignored query parameters it does not know: with the typo ?prefx=app: the
    store silently used the default prefix, writing where the application never looks
    (and coredis would take ?ssl_context=x as a string)."""
    name = query[1:].partition("=")[0]
    message = refusal(entry, f"redis://localhost:6379/0{query}")
    assert f"unknown query parameter {name!r}" in message
    assert "db, client_name, max_idle_time, noevict, notouch" in message
    assert ("prefix, db" in message) == (entry == "repository_from_url")
    assert message.endswith("noevict, notouch.")  # TLS parameters are for rediss:// URLs
    message = refusal(entry, f"rediss://localhost:6379/0{query}")
    assert "notouch, ssl_ca_certs, ssl_cert_reqs, ssl_certfile, ssl_keyfile" in message


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("?noreply=true", "the store needs every reply"),
        ("?noreply=false", "the store needs every reply"),
        ("?max_connections=3", "pass RedisRepository(url, max_connections=N) instead"),
        ("?timeout=1", "pass RedisRepository(url, timeout=seconds) instead"),
        ("?stream_timeout=1", "pass RedisRepository(url, timeout=seconds) instead"),
        ("?connect_timeout=1", "pass RedisRepository(url, timeout=seconds) instead"),
        ("?decode_responses=false", "the store decodes what it reads itself"),
        ("?encoding=latin-1", "the store decodes what it reads itself"),
        ("?username=app", "redis://user:password@host:6379/0"),
    ],
)
def test_redis_query_parameters_the_store_owns_are_refused(
    entry: str, query: str, says: str
) -> None:
    """The query won over the store's options in coredis: ?max_connections= and the
    timeouts replaced the store's own (?timeout= even set the pool timeout the store
    avoids), ?noreply=true made coredis stop waiting for the scripts' replies, and
    ?decode_responses=false decoded replies (any non-empty string was true)."""
    name = query[1:].partition("=")[0]
    message = refusal(entry, f"redis://localhost:6379/0{query}")
    assert f"{name} is not accepted: " in message and says in message
    assert "a redis:// URL takes" in message


def test_redis_repository_refuses_a_prefix_in_its_url() -> None:
    """RedisRepository(url) gave ?prefix= to coredis, which ignored it: the store wrote
    under the default prefix."""
    message = refusal("RedisRepository", "redis://localhost:6379/0?prefix=app:")
    assert "pass RedisRepository(url, prefix='app:')" in message


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://localhost/0?client_name=a&client_name=b", "it gives client_name 2 times"),
        ("redis://localhost/0?db=0&db=0", "it gives db 2 times"),
        ("unix:///run/r.sock?db=1&db=2", "it gives db 2 times"),
        ("redis://localhost/0?client_name=my+app", "client_name='my app' is not a Redis"),
        ("redis://localhost/0?client_name=", "client_name='' is not a Redis client name"),
        ("redis://localhost/0?max_idle_time=0", "max_idle_time='0' is not whole seconds"),
        ("redis://localhost/0?max_idle_time=1.5", "max_idle_time='1.5' is not whole seconds"),
        ("redis://localhost/0?noevict=maybe", "noevict='maybe' is not true or false"),
        ("redis://localhost/0?notouch", "notouch='' is not true or false"),
        ("redis://localhost/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs is for TLS; use a rediss://"),
        ("unix:///run/r.sock?ssl_cert_reqs=none", "ssl_cert_reqs is for TLS"),
        ("rediss://localhost/0?ssl_cert_reqs=REQUIRED", "use none, optional or required"),
        ("rediss://localhost/0?ssl_check_hostname=on", "ssl_check_hostname='on' is not true"),
        ("rediss://localhost/0?ssl_ca_certs=", "ssl_ca_certs= gives no file"),
        ("rediss://localhost/0?ssl_certfile=/c.pem", "ssl_certfile and ssl_keyfile"),
        ("rediss://localhost/0?ssl_keyfile=/k.pem", "give both or neither"),
        # helper-185: the client dropped a fragment (two prefixes became one) ...
        ("redis://localhost/0?client_name=a#1", "takes no fragment"),
        ("redis://localhost/0#x", "write a '#' in a query value as %23"),
        # ... and ssl's ValueError escaped RedisRepository
        (
            "rediss://localhost/0?ssl_cert_reqs=none&ssl_check_hostname=true",
            "drop ssl_check_hostname=true",
        ),
    ],
)
def test_bad_redis_query_values_are_refused(entry: str, url: str, says: str) -> None:
    """coredis took the first of a repeated parameter, dropped blank ones, read any
    unknown word as true (?noevict=maybe), ignored ssl_* outside rediss:// and a client
    certificate without its key; a bad name or idle time failed at connect, or at once
    with a bare ValueError or KeyError."""
    assert says in refusal(entry, url)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_an_unreadable_tls_file_is_a_configuration_error(entry: str, tmp_path: Path) -> None:
    """coredis loads rediss:// certificate files at once: a missing one raised
    FileNotFoundError."""
    message = refusal(entry, f"rediss://:hunter2@localhost/0?ssl_ca_certs={tmp_path}/no.pem")
    assert "its TLS files could not be loaded" in message and "hunter2" not in message


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_accepted_redis_query_parameters_reach_the_client(entry: str) -> None:
    pytest.importorskip("coredis")
    query = "client_name=web-1&max_idle_time=30&noevict=yes&notouch=0&db=3"
    store = ENTRY_POINTS[entry](f"unix:///run/r.sock?{query}")
    options = pool(store).connection_kwargs
    assert (options["client_name"], options["max_idle_time"], options["db"]) == ("web-1", 30, 3)
    assert (options["noevict"], options["notouch"], options["noreply"]) == (True, False, False)
    tls = "ssl_cert_reqs=required&ssl_check_hostname=true"
    context = pool(ENTRY_POINTS[entry](f"rediss://localhost:6380/0?{tls}")).connection_kwargs[
        "ssl_context"
    ]
    assert (context.check_hostname, context.verify_mode) == (True, ssl.CERT_REQUIRED)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_password_in_the_query_is_masked(entry: str) -> None:
    message = refusal(entry, "redis://localhost/0?password=hunter2&x=1")
    assert "hunter2" not in message and "?password=***&x=1" in message
    assert "write the password before the host" in message


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cli_refuses_an_unknown_redis_query_parameter(backend: str, tmp_path: Path) -> None:
    """The CLI's --store path: exit 2, one line, before connecting anywhere."""
    pytest.importorskip("click")
    pytest.importorskip("coredis")
    url = "redis://:hunter2@127.0.0.1:1/0?prefx=app:"
    result = subprocess.run(
        [sys.executable, "-m", "asyncsession", "list", "--store", url, "--backend", backend],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "unknown query parameter 'prefx'" in result.stderr
    assert "hunter2" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


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
    "url",
    [
        "sqlite:///prod.db\n",
        "sqlite:///prod.db ",
        " sqlite:///prod.db",
        "sqlite:///pro\td.db",
        "file:///tmp/dir\n",
        "memory://\r\n",
        "redis://localhost/0?prefix=app:\n",
        "redis://localhost/0\x7f",
        "sqlite:///a\x9b31mb.db",  # helper-204: C1 control characters passed
        "redis://localhost/0?prefix=a\x85b",
    ],
)
def test_urls_with_whitespace_at_an_end_or_control_characters_are_refused(url: str) -> None:
    """helper-185: a trailing newline (an environment file's) became part of the file
    name, directory or prefix: the CLI made a new, empty store without an error."""
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration, match="whitespace at an end or a control"):
        s.repository_from_url(url)
    if url.startswith("redis"):
        with pytest.raises(s.InvalidConfiguration, match="whitespace at an end"):
            s.RedisRepository(url)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://user:s3cr3t#x@h/0", "a '?' or '#' comes before its last '@'"),
        ("redis://user:s3cr3t?x@h:6379/0", "a '?' or '#' comes before its last '@'"),
        ("redis://user:s3/cr3t@h/0", "a '/' comes before its last '@'"),
        ("redis://user:%ff@h/0", "are not UTF-8 text"),
    ],
)
def test_a_password_the_url_cannot_carry_is_named_as_the_problem(url: str, says: str) -> None:
    """helper-204: an unencoded '#', '?' or '/' in a password was reported as "its port
    is not a number", and a password that is not UTF-8 became U+FFFD for the client."""
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration, match="Invalid Redis URL") as caught:
        s.repository_from_url(url)
    assert says in str(caught.value) and "port" not in str(caught.value)
    assert "s3cr3t" not in str(caught.value) and "%ff" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///x.db?password=hunter2",
        "file:///tmp/store?passphrase=hunter2",
        "redis://localhost/0?Password=hunter2",
    ],
)
def test_a_password_like_query_parameter_is_masked_in_every_error(url: str) -> None:
    """helper-204: local URLs' errors quoted the URL as written, and only a parameter
    named exactly ``password`` was masked."""
    pytest.importorskip("coredis")
    with pytest.raises(s.InvalidConfiguration) as caught:
        s.repository_from_url(url)
    assert "hunter2" not in str(caught.value) and "=***" in str(caught.value)


def test_a_sqlite_path_naming_a_directory_is_refused(tmp_path: Path) -> None:
    """helper-204: sqlite:///mystore/ quietly made a database file named mystore."""
    with pytest.raises(s.InvalidConfiguration, match="names a directory"):
        s.repository_from_url("sqlite:///mystore/")
    for path in (f"{tmp_path}/", f"{tmp_path}/.", f"{tmp_path}/sub/.."):
        with pytest.raises(s.InvalidConfiguration, match="names a directory"):
            s.SQLiteRepository(path)
    assert list(tmp_path.iterdir()) == []


def test_a_tilde_in_a_file_url_is_said_not_to_be_expanded() -> None:
    """helper-186: file://~/store (a host of '~') said only "Invalid store URL"."""
    with pytest.raises(s.InvalidConfiguration, match="'~' is not expanded here"):
        s.repository_from_url("file://~/store")


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


@pytest.mark.anyio
@pytest.mark.parametrize("option", ["notouch", "noevict"])
async def test_a_client_option_the_server_is_too_old_for_says_so(
    redis_server: Any, anyio_backend: str, option: str
) -> None:
    """helper-185: ?notouch= (Redis 7.2) and ?noevict= (7.0) made every operation fail on
    an older server with "unknown subcommand 'NO-TOUCH'", not naming the option."""
    from asyncsession.stores.redis import _CLIENT_OPTIONS

    release = next(r for name, _, r in _CLIENT_OPTIONS if name == option)
    async with s.RedisRepository(redis_server.url) as plain:
        version = (await plain.client.info("server"))["redis_version"]
    too_old = tuple(map(int, str(version).split(".")[:2])) < tuple(map(int, release.split(".")))
    session = s.Session(uuid.uuid4(), datetime.now(timezone.utc), datetime.now(timezone.utc))
    url = f"{redis_server.url}?{option}=true&prefix=opt-{uuid.uuid4().hex[:8]}:"
    async with s.repository_from_url(url) as store:
        if too_old:
            with pytest.raises(s.StorageError) as caught:
                await store.add(session)
            assert f"?{option}= needs Redis {release} or later" in str(caught.value)
            assert "leave it out" in str(caught.value) and ".." not in str(caught.value)
        else:
            await store.add(session)
            assert await store.get(session.id) == session
