"""RedisRepository against a real, private redis-server (never a fake).

The contract and manager suites also run against Redis (tests/_store_redis.py); this
module adds what only a shared server can show: several processes, cleanup claimed
once, cancellation, a server restart, refused connections and the optional import.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import attrs
import coredis
import pytest
from _store_redis import open_store
from redis_support import HOST, RedisServer, free_port, require_redis, start_redis

from asyncsession import (
    CorruptSessionError,
    EventKind,
    ExpiryPolicy,
    InvalidConfiguration,
    InvalidSessionId,
    Message,
    Session,
    SessionManager,
    SessionNotFound,
    SessionQuery,
    SessionRepository,
    SessionStatus,
    StorageError,
    Subscription,
    repository_from_url,
)
from asyncsession.stores import redis as redis_store
from asyncsession.stores.redis import REMOVE_ATTEMPTS, RedisEvent, RedisRepository
from asyncsession.testing import RepositoryContract

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "redis_worker.py"
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
POLICY = ExpiryPolicy(idle_timeout=timedelta(seconds=60), retention=timedelta(seconds=10))
FAR = timedelta(days=3650)


class TestRedisContract(RepositoryContract):
    @pytest.fixture
    async def repository(
        self, request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
    ) -> AsyncIterator[RedisRepository]:
        async with open_store(request, tmp_path) as store:
            yield store

    async def replace_document(
        self, repository: SessionRepository, session_id: uuid.UUID, document: bytes
    ) -> None:
        assert isinstance(repository, RedisRepository)
        key = f"{repository.prefix}s:{session_id}"
        assert await repository.client.exists([key]) == 1, f"no session {session_id}"
        await repository.client.hset(key, {"d": document})
        repository._held.drop(session_id)  # revision and times unchanged: forget the snapshot


@pytest.fixture
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[RedisRepository]:
    async with open_store(request, tmp_path) as repository:
        yield repository


def new_session(*, created: datetime = T0, owner: str | None = "alice", **kw: Any) -> Session:
    return Session(
        uuid.uuid4(),
        created,
        created,
        owner=owner,
        expires_at=POLICY.deadline(SessionStatus.ACTIVE, created, created, None),
        **kw,
    )


def msg(text: str, when: datetime = T0) -> Message:
    return Message("user", text, when, None)


def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


async def assert_store_works(store: RedisRepository) -> None:
    """Add a session and read it back; a regression that lost the pool's connections
    waited for ever, so this gives up after 20 s."""
    with anyio.fail_after(20):
        session = new_session()
        await store.add(session)
        assert await store.get(session.id) == session


# -- layout and Redis key expiry -------------------------------------------------------


@pytest.mark.anyio
async def test_hot_paths_are_single_scripts_and_keys_are_prefixed(
    store: RedisRepository,
) -> None:
    session = new_session(messages=[msg("a"), msg("b")])
    await store.add(session)
    keys = {k.decode() async for k in store.client.scan_iter(match=f"{store.prefix}*")}
    sid = str(session.id)
    assert {f"{store.prefix}s:{sid}", f"{store.prefix}m:{sid}"} <= keys
    assert all(k.startswith(store.prefix) for k in keys)
    assert await store.client.lrange(f"{store.prefix}m:{sid}", 0, -1) != []
    # Redis key expiry follows the deadline (plus the grace) on both data keys
    ttl = await store.client.pttl(f"{store.prefix}s:{sid}")
    assert ttl > 0
    touched = await store.touch(session.id, at=T0 + timedelta(seconds=30), policy=POLICY)
    assert touched is not None
    assert touched.expires_at is not None
    for key in (f"{store.prefix}s:{sid}", f"{store.prefix}m:{sid}"):
        assert await store.client.pexpiretime(key) == touched.expires_at + FAR
    # no deadline: no key expiry
    forever = attrs.evolve(touched, expires_at=None, revision=1, status=SessionStatus.ARCHIVED)
    await store.save(forever, expected_revision=0, new_messages=())
    assert await store.client.pttl(f"{store.prefix}s:{sid}") == -1


@pytest.mark.anyio
async def test_data_expired_by_redis_vanishes_and_indexes_heal(
    store: RedisRepository,
) -> None:
    keep = new_session(owner="o")
    vanish = new_session(owner="o", messages=[msg("bye")])
    for s in (keep, vanish):
        await store.add(s)
    # what Redis's own key expiry does when no manager ran cleanup in time
    await store.client.delete([f"{store.prefix}s:{vanish.id}", f"{store.prefix}m:{vanish.id}"])
    assert await store.get(vanish.id) is None
    page = await store.list(SessionQuery(owner="o"))
    assert [s.id for s in page] == [keep.id]
    assert list(await store.expired(T0 + timedelta(days=1))) == [keep.id]
    assert dict(await store.count_by_status()) == {SessionStatus.ACTIVE: 1}
    assert dict(await store.count_by_status("o")) == {SessionStatus.ACTIVE: 1}
    assert await store.delete(vanish.id) is False


@pytest.mark.anyio
async def test_past_key_deadline_drops_the_data_at_once(redis_server: RedisServer) -> None:
    now = datetime.now(timezone.utc)  # only to place the deadline far in the server's past
    async with RedisRepository(
        redis_server.url, prefix=prefix(), key_expiry_grace=timedelta(0)
    ) as store:
        old = new_session(created=now - timedelta(days=30))
        await store.add(old)
        assert await store.get(old.id) is None
        assert dict(await store.count_by_status()) == {}
        assert list(await store.expired(now)) == []


# -- several processes ---------------------------------------------------------------


def run_workers(commands: list[list[str]]) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for args in commands
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0, out
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def shared(redis_server: RedisServer) -> tuple[str, str]:
    return redis_server.url, prefix()


@pytest.mark.anyio
async def test_four_processes_update_one_session_exactly(shared: tuple[str, str]) -> None:
    url, key_prefix = shared
    async with SessionManager(
        RedisRepository(url, prefix=key_prefix, key_expiry_grace=FAR), cleanup_interval=None
    ) as manager:
        sid = (await manager.create(state={"n": 0})).id
    backends = ["asyncio", "trio", "asyncio", "trio"]
    commands = [["update", url, key_prefix, b, str(sid), "250"] for b in backends]
    results = await anyio.to_thread.run_sync(run_workers, commands)
    assert sum(r["updates"] for r in results) == 1000
    async with RedisRepository(url, prefix=key_prefix) as repo:
        final = await repo.get(sid)
    assert final is not None
    assert final.state["n"] == 1000 and final.revision == 1000


@pytest.mark.anyio
async def test_two_processes_purge_each_expiry_once(shared: tuple[str, str]) -> None:
    url, key_prefix = shared
    count = 300
    async with RedisRepository(url, prefix=key_prefix, key_expiry_grace=FAR) as repo:
        expected = set()
        for i in range(count):
            session = new_session(created=T0 + timedelta(milliseconds=i))
            await repo.add(session)
            expected.add(str(session.id))
        await repo.add(new_session(created=T0 + timedelta(days=1)))  # not expired
    later = (T0 + timedelta(hours=1)).isoformat()
    commands = [["purge", url, key_prefix, b, later] for b in ("asyncio", "trio")]
    results = await anyio.to_thread.run_sync(run_workers, commands)
    reported = [sid for r in results for sid in r["ids"]]
    assert sum(r["removed"] for r in results) == count
    assert len(reported) == count and set(reported) == expected
    async with RedisRepository(url, prefix=key_prefix) as repo:
        assert sum((await repo.count_by_status()).values()) == 1


# -- cancellation ----------------------------------------------------------------------


def connected_clients(server: RedisServer) -> int:
    info = server.command("INFO", "clients").decode()
    for line in info.splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    raise AssertionError(info)


@pytest.mark.anyio
async def test_cancelled_calls_leak_nothing_and_never_cross_replies(
    redis_server: RedisServer,
) -> None:
    rng = random.Random(1234)
    before = connected_clients(redis_server)
    async with RedisRepository(
        redis_server.url, prefix=prefix(), key_expiry_grace=FAR, max_connections=4
    ) as store:
        mine = [new_session(owner=f"owner-{i}", state={"who": i}) for i in range(8)]
        for s in mine:
            await store.add(s)
        cancelled = 0

        async def worker(index: int, rounds: int) -> None:
            nonlocal cancelled
            session = mine[index]
            for n in range(rounds):
                op = rng.randrange(4)
                with anyio.move_on_after(rng.uniform(0, 0.004)) as scope:
                    if op == 0:
                        got = await store.get(session.id, last_messages=1)
                        assert got is not None and got.id == session.id
                        assert got.state["who"] == index
                    elif op == 1:
                        got = await store.append(
                            session.id, [msg(f"{index}:{n}")], at=T0, policy=POLICY
                        )
                        assert got.id == session.id and got.messages[-1].content == f"{index}:{n}"
                    elif op == 2:
                        got = await store.touch(session.id, at=T0, policy=POLICY)
                        assert got is not None and got.state["who"] == index
                    else:
                        page = await store.list(SessionQuery(owner=f"owner-{index}"))
                        assert [s.id for s in page] == [session.id]
                if scope.cancelled_caught:
                    cancelled += 1

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(worker, i, 125)  # 8 x 125 = 1,000 calls
        assert cancelled > 50  # the deadlines really interrupted calls
        with anyio.fail_after(10):  # a leaked pool slot (max 4) would hang here
            async with anyio.create_task_group() as tg:
                for s in mine:
                    for _ in range(10):
                        tg.start_soon(store.get, s.id)
        for i, s in enumerate(mine):
            got = await store.get(s.id)
            assert got is not None and got.state["who"] == i
            contents = [m.content for m in got.messages]
            assert all(c.startswith(f"{i}:") for c in contents)
            assert got.revision == len(contents)
        during = connected_clients(redis_server)
        assert during - before <= 4
    assert connected_clients(redis_server) <= before + 1


# -- outages -------------------------------------------------------------------------


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    require_redis()
    server = start_redis(appendonly=True, directory=tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.anyio
async def test_restart_raises_storage_error_then_recovers(aof_server: RedisServer) -> None:
    async with SessionManager(
        RedisRepository(aof_server.url, prefix=prefix(), timeout=5),
        cleanup_interval=None,
    ) as manager:
        acknowledged = []
        for i in range(20):
            s = await manager.create(owner="o", state={"i": i})
            await manager.add_message(s.id, "user", f"hello {i}")
            acknowledged.append(s.id)
        await anyio.to_thread.run_sync(aof_server.stop)
        for call in (
            lambda: manager.get(acknowledged[0]),
            lambda: manager.add_message(acknowledged[0], "user", "lost?"),
            lambda: manager.create(),
            lambda: manager.list(owner="o"),
        ):
            with pytest.raises(StorageError) as info:
                await call()
            assert info.value.recoverable
            assert f"{HOST}:{aof_server.port}" in str(info.value)
        await anyio.to_thread.run_sync(aof_server.start)
        for attempt in range(3):  # the first call may still meet the dead connection
            try:
                await manager.get(acknowledged[0])
                break
            except StorageError:
                assert attempt < 2
        for i, sid in enumerate(acknowledged):
            s = await manager.get(sid)
            assert s.state["i"] == i and [m.content for m in s.messages] == [f"hello {i}"]
        fresh = await manager.create(owner="o")
        await manager.update(fresh.id, lambda x: x.with_state(ok=True))
        assert (await manager.stats()).total == 21


@pytest.mark.anyio
async def test_connection_refused_names_the_address() -> None:
    port = free_port()
    async with RedisRepository(f"redis://{HOST}:{port}/0", timeout=2) as store:
        with pytest.raises(StorageError) as info:
            await store.get(uuid.uuid4())
    assert info.value.recoverable
    assert f"{HOST}:{port}" in str(info.value)


@pytest.mark.anyio
async def test_a_store_may_be_opened_by_one_task_and_closed_by_another(
    redis_server: RedisServer,
) -> None:
    """coredis ties a client to the task that enters it; the store enters its client in
    a task of its own, so a task that has ended may open it (a startup hook) and another
    close it, again and again, and nothing stays connected after the close."""

    async def connected(probe: coredis.Redis[str]) -> int:
        return len([c for c in (await probe.client_list()) if c.get("name") != "probe"])

    async with coredis.Redis(
        host=HOST, port=redis_server.port, decode_responses=True, client_name="probe"
    ) as probe:
        before = await connected(probe)
        store = RedisRepository(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
        session = Session(uuid.uuid4(), T0, T0)
        for _ in range(2):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.open)  # opened by a task that then ends
            await store.add(session)
            assert await store.get(session.id) == session
            assert await connected(probe) > before
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.aclose)  # closed by yet another
            assert await connected(probe) == before
            session = Session(uuid.uuid4(), T0, T0)


def test_a_store_opened_in_a_pure_python_asyncio_task(redis_server: RedisServer) -> None:
    """asyncio only: an asyncio task of the pure-Python class (on Python 3.10,
    pytest-asyncio runs tests in backports.asyncio.runner's tasks, which subclass it)
    hosts the client as the C class's tasks do."""
    import asyncio

    async def use() -> None:
        async with RedisRepository(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:") as store:
            assert await store.count_by_status() == {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.tasks._PyTask(use(), loop=loop)  # type: ignore[attr-defined]

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_store_left_open_ends_quietly_with_its_event_loop(
    redis_server: RedisServer, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The task that holds the client ends with the event loop (cancelled) if nobody
    closed the store: no error, no warning (on trio an error there would end the run)."""

    async def main() -> bool:
        store = RedisRepository(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
        await store.open()
        return await store.count_by_status() == {}

    with caplog.at_level(logging.WARNING, logger="asyncsession"):
        assert anyio.run(main, backend=backend)
    assert not caplog.records


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_store_left_open_by_an_ended_event_loop_says_to_reopen_it(
    redis_server: RedisServer, backend: str
) -> None:
    """Its client ended with the loop that opened it (twice): calls in the next loop say
    to open the store again, and that works, however many opens are unmatched."""
    store = RedisRepository(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")

    async def first_run() -> None:
        await store.open()
        await store.open()

    async def next_run() -> None:
        with pytest.raises(StorageError, match=r"event loop ended.*open the store again"):
            await store.count_by_status()
        await store.open()
        assert await store.count_by_status() == {}
        for _ in range(3):
            await store.aclose()
        async with store:  # closed for good above: opens afresh
            assert await store.count_by_status() == {}

    anyio.run(first_run, backend=backend)
    anyio.run(next_run, backend=backend)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_close_from_another_loop_gives_up_on_a_stopped_loop(
    redis_server: RedisServer, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The client's host waits in an asyncio loop that stopped (not closed) and never
    runs again: a close from another loop returns, saying so, instead of waiting."""
    store = RedisRepository(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(store.open())
        with caplog.at_level(logging.WARNING, logger="asyncsession"):
            anyio.run(store.aclose, backend=backend)
        assert "its event loop stopped" in caplog.text
        loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop)))  # it leaves now
    finally:
        loop.close()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_the_last_close_may_come_from_another_event_loop(
    redis_server: RedisServer, backend: str
) -> None:
    """Opened by a loop in one thread and by one in another, closed twice by the second
    while the first still runs: the close ends the first loop's client (it would wait
    forever for it, on asyncio, or end the trio run), and the first may open it again."""
    store = RedisRepository(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    opened, closed = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    async def first() -> None:
        await store.open()
        opened.set()
        await anyio.to_thread.run_sync(closed.wait)
        async with store:  # the client was left: it opens again here
            results["first"] = await store.count_by_status()

    async def second() -> None:
        await anyio.to_thread.run_sync(opened.wait)
        await store.open()
        await store.aclose()
        await store.aclose()  # the last close: the client's host runs in the first loop
        closed.set()
        results["second"] = "closed"

    def run(fn: Callable[[], Awaitable[None]], name: str) -> None:
        try:
            anyio.run(fn, backend=backend)
        except BaseException as exc:  # reported below
            results[name] = exc
            opened.set()
            closed.set()

    threads = [
        threading.Thread(target=run, args=(first, "first")),
        threading.Thread(target=run, args=(second, "second")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a close never returned"
    assert results == {"first": {}, "second": "closed"}


def _url_store(server: RedisServer) -> RedisRepository:
    """A store that makes its own client from the server's URL (a fresh key prefix)."""
    return RedisRepository(server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")


async def _add_one_and_count(store: RedisRepository) -> int:
    """Open ``store``, add a session, and return how many it holds."""
    async with store:
        await store.add(Session(uuid.uuid4(), T0, T0))
        return sum((await store.count_by_status()).values())


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "left-open"])
@pytest.mark.parametrize("backends", [("asyncio", "trio"), ("trio", "asyncio")])
def test_a_store_made_from_a_url_reopens_on_the_other_event_loop(
    redis_server: RedisServer, backends: tuple[str, str], closed: bool
) -> None:
    """One store object used by a run of each backend (anyio's test plugin runs a
    module's tests on asyncio and then on trio): the client the store made is made
    anew for the other backend, whether the first run closed the store or left it open
    to end with its loop."""
    store = _url_store(redis_server)

    async def run(n: int) -> int:
        if n and not closed:
            with pytest.raises(StorageError, match=r"open the store again"):
                await store.count_by_status()
        async with contextlib.AsyncExitStack() as stack:
            if closed:
                await stack.enter_async_context(store)
            else:
                await store.open()
            await store.add(Session(uuid.uuid4(), T0, T0))
            return sum((await store.count_by_status()).values())

    assert anyio.run(run, 0, backend=backends[0]) == 1
    assert anyio.run(run, 1, backend=backends[1]) == 2
    assert anyio.run(run, 2, backend=backends[0]) == 3


@pytest.mark.parametrize("backends", [("asyncio", "trio"), ("trio", "asyncio")])
def test_a_store_made_in_a_run_of_one_backend_opens_under_the_other(
    redis_server: RedisServer, backends: tuple[str, str]
) -> None:
    """coredis gives a client made while an event loop runs that backend's locks."""

    async def make() -> RedisRepository:
        return _url_store(redis_server)

    store = anyio.run(make, backend=backends[0])
    assert anyio.run(_add_one_and_count, store, backend=backends[1]) == 1


@pytest.mark.parametrize("backends", [("asyncio", "trio"), ("trio", "asyncio")])
def test_an_open_cancelled_on_the_other_event_loop_leaves_the_store_usable(
    redis_server: RedisServer, backends: tuple[str, str]
) -> None:
    """The client made anew for the other backend belongs to it even when entering it is
    cancelled (a startup timeout): the first backend's next open makes its own again."""
    store = _url_store(redis_server)

    async def cancelled_open() -> bool:
        with anyio.CancelScope() as scope:
            scope.cancel()
            await store.open()
        return scope.cancelled_caught

    assert anyio.run(_add_one_and_count, store, backend=backends[0]) == 1
    assert anyio.run(cancelled_open, backend=backends[1])
    assert anyio.run(_add_one_and_count, store, backend=backends[0]) == 2
    assert anyio.run(_add_one_and_count, store, backend=backends[1]) == 3


def test_a_store_made_under_asyncio_opens_in_a_trio_guest_run(redis_server: RedisServer) -> None:
    """Trio's guest mode runs trio inside an asyncio loop: the store tells whose task
    opens it (trio's) and makes its client for trio."""

    async def make() -> RedisRepository:
        return _url_store(redis_server)

    store = anyio.run(make, backend="asyncio")

    async def host() -> int:
        import trio

        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        trio.lowlevel.start_guest_run(
            _add_one_and_count,
            store,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            done_callback=done.set_result,
        )
        count: int = (await asyncio.wait_for(done, 60)).unwrap()
        return count

    assert asyncio.run(host()) == 1
    assert anyio.run(_add_one_and_count, store, backend="asyncio") == 2


def _construction_error(coredis_setup: str) -> str:
    """The ImportError constructing a RedisRepository gives, in a fresh interpreter
    where ``coredis_setup`` stood in for coredis first."""
    code = (
        f"import sys, types\n{coredis_setup}\n"
        "import asyncsession.stores.redis as r\n"
        "try:\n"
        "    r.RedisRepository('redis://127.0.0.1:6379')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout


def test_missing_coredis_gives_a_helpful_import_error() -> None:
    out = _construction_error("sys.modules['coredis'] = None")
    assert "pip install 'asyncsession[redis]'" in out


def test_a_coredis_older_than_6_9_is_refused_at_construction() -> None:
    """coredis 6.0-6.8 lack names and pool methods the store uses (found by installing
    each): refused up front, naming the version, instead of an AttributeError later."""
    out = _construction_error(
        "old = types.ModuleType('coredis')\nold.__version__ = '6.8.0'\nsys.modules['coredis'] = old"
    )
    assert "coredis 6.8.0 is installed" in out and "6.9 or later" in out, out
    assert "pip install 'asyncsession[redis]'" in out


def test_bad_arguments_are_rejected() -> None:
    for kwargs in ({"prefix": ""}, {"timeout": 0}, {"key_expiry_grace": timedelta(-1)}):
        with pytest.raises(ValueError):
            RedisRepository(f"redis://{HOST}:6379", **kwargs)
    # coredis raised ValueError/TypeError for some, and took 0 (its default) and True
    # and a huge one (meant as "no limit") took gigabytes for its slots (helper-220)
    for bad in (0, -1, "4", 1.5, True, False, 100_001, 10**12):
        with pytest.raises(InvalidConfiguration, match=r"max_connections must be an int from 1 to"):
            RedisRepository(f"redis://{HOST}:6379", max_connections=bad)  # type: ignore[arg-type]
    for good in (None, 1, 64, 100_000):
        store = RedisRepository(f"redis://{HOST}:6379", max_connections=good)
        assert store.client.connection_pool.max_connections == (good or 64)
    with pytest.raises(ValueError):
        RedisRepository("http://example.invalid")
    with pytest.raises(ValueError):
        RedisRepository(42)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_url_query_parameters_reach_the_server(redis_server: RedisServer) -> None:
    """The query parameters the URL checks accept still work: the server sees the
    client names, the database and the no-evict flag the URLs give."""
    name = f"as-{uuid.uuid4().hex[:8]}"
    key_prefix = prefix()
    base = redis_server.url.removesuffix("/0")
    # now, not T0: the URL-made store lets Redis expire keys an hour after the deadline
    session = new_session(created=datetime.now(timezone.utc))
    async with (
        repository_from_url(f"{base}/2?client_name={name}-a&noevict=yes&prefix={key_prefix}") as a,
        RedisRepository(
            f"{base}?db=2&client_name={name}-b&max_idle_time=60", prefix=key_prefix
        ) as b,
    ):
        await a.add(session)
        assert await b.get(session.id) == session
        clients = {c["name"]: c for c in await a.client.client_list()}
    assert clients[f"{name}-a"]["db"] == clients[f"{name}-b"]["db"] == 2
    assert "e" in clients[f"{name}-a"]["flags"] and "e" not in clients[f"{name}-b"]["flags"]


# -- cross-process events --------------------------------------------------------------


async def publish_until_heard(
    store: RedisRepository, kind: str, sid: uuid.UUID, **options: Any
) -> None:
    """Publish until a subscriber hears it (a new subscription may need a moment to
    register on the server); the caller bounds the wait."""
    for _attempt in range(1000):
        if await store.publish_event(kind, sid, at=T0, **options):
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"nobody heard {kind} of {sid} after 1,000 attempts")


@pytest.mark.anyio
async def test_events_travel_between_stores(redis_server: RedisServer) -> None:
    key_prefix = prefix()
    sid = uuid.uuid4()
    async with (
        RedisRepository(redis_server.url, prefix=key_prefix) as a,
        RedisRepository(redis_server.url, prefix=key_prefix) as b,
        b.subscribe_events() as events,
    ):
        with anyio.fail_after(10):
            await publish_until_heard(a, "updated", sid, revision=3, origin="a")
            event = await events.__anext__()
    assert (event.kind, event.session_id, event.revision, event.origin) == (
        "updated",
        sid,
        3,
        "a",
    )
    assert event.at == T0


@pytest.mark.anyio
async def test_events_of_ids_that_are_not_uuids_are_refused(redis_server: RedisServer) -> None:
    """publish_event() takes a uuid.UUID id, as every store operation does: other ids
    raise InvalidSessionId and publish nothing (subscribers dropped them as malformed,
    with a warning); a UUID subclass travels as its plain UUID."""

    class Shouting(uuid.UUID):
        def __str__(self) -> str:
            return "NOT-A-UUID"

    key_prefix = prefix()
    sid = uuid.uuid4()
    async with (
        RedisRepository(redis_server.url, prefix=key_prefix) as a,
        RedisRepository(redis_server.url, prefix=key_prefix) as b,
        b.subscribe_events() as events,
    ):
        with anyio.fail_after(10):
            await publish_until_heard(a, "created", sid, origin="a")
            assert (await events.__anext__()).kind == "created"
            for bad in ("not-a-uuid", str(sid), sid.int, None):
                with pytest.raises(InvalidSessionId):
                    await a.publish_event("updated", bad, at=T0, origin="a")  # type: ignore[arg-type]
            assert await a.publish_event("deleted", Shouting(int=sid.int), at=T0) == 1
            event = await events.__anext__()  # the refused ones never went out
    assert (event.kind, event.session_id, type(event.session_id)) == ("deleted", sid, uuid.UUID)


@pytest.mark.anyio
async def test_a_batch_of_events_goes_out_in_one_request_as_single_events(
    redis_server: RedisServer,
) -> None:
    """publish_events() sends a whole batch in one round trip (a manager sharing a burst
    of events sent one PUBLISH at a time, ~1/RTT events per second), and each event
    still travels as its own message, as publish_event() sends it: subscribers of
    earlier releases read them alike. An id that is not a UUID refuses the whole batch
    before anything is sent; an empty batch sends nothing."""
    key_prefix = prefix()
    ids = [uuid.uuid4() for _ in range(3)]
    batch = [
        RedisEvent("created", ids[0], T0, None, "a"),
        RedisEvent("message_added", ids[1], T0 + timedelta(seconds=1), 7, "a"),
        RedisEvent("deleted", ids[2], T0 + timedelta(seconds=2), None, ""),
    ]
    async with (
        RedisRepository(redis_server.url, prefix=key_prefix) as a,
        RedisRepository(redis_server.url, prefix=key_prefix) as b,
        b.subscribe_events() as events,
    ):
        with anyio.fail_after(10):
            await publish_until_heard(a, "updated", ids[0], origin="warm-up")
            assert (await events.__anext__()).origin == "warm-up"
            # the script's first call on a server that has not seen it is two EVALSHAs
            # (NOSCRIPT, then again after loading it): warm it up too
            assert await a.publish_events(batch[:1]) == 1
            assert (await events.__anext__()).session_id == ids[0]
            info = await a.client.info("commandstats")
            before = info.get("cmdstat_evalsha", {}).get("calls", 0)
            assert await a.publish_events(batch) == 3  # one subscriber heard each
            info = await a.client.info("commandstats")
            assert info["cmdstat_evalsha"]["calls"] == before + 1
            heard = [await events.__anext__() for _ in batch]
            for event in batch:  # the same events, one at a time
                await a.publish_event(
                    event.kind,
                    event.session_id,
                    at=event.at,
                    revision=event.revision,
                    origin=event.origin,
                )
            singly = [await events.__anext__() for _ in batch]
            assert await a.publish_events([]) == 0
            with pytest.raises(InvalidSessionId):
                await a.publish_events([batch[0], RedisEvent("deleted", "x", T0, None, "a")])  # type: ignore[arg-type]
            await a.publish_event("closed", ids[1], at=T0, origin="after")
            after = await events.__anext__()  # the refused batch never went out
    assert heard == batch == singly
    assert (after.kind, after.origin) == ("closed", "after")


@pytest.mark.anyio
async def test_events_stay_in_their_database(redis_server: RedisServer) -> None:
    """Redis pub/sub is server-wide: stores with one prefix on databases 0 and 1 of one
    server heard each other's events (found by helper-40)."""
    key_prefix = prefix()
    url0 = redis_server.url
    url1 = url0.removesuffix("/0") + "/1"
    sid = uuid.uuid4()
    async with (
        RedisRepository(url0, prefix=key_prefix) as a,
        RedisRepository(url1, prefix=key_prefix) as b,
        RedisRepository(url1, prefix=key_prefix) as c,
        b.subscribe_events() as events,
    ):
        assert a.events_channel == f"{key_prefix}events:0"
        assert b.events_channel == c.events_channel == f"{key_prefix}events:1"
        with anyio.fail_after(10):
            await publish_until_heard(c, "updated", sid, origin="c")
            # b is subscribed now: nobody on database 0 hears this, and b never gets it
            assert await a.publish_event("created", sid, at=T0, origin="a") == 0
            assert await c.publish_event("deleted", sid, at=T0, origin="c") == 1
            first, second = await events.__anext__(), await events.__anext__()
    assert [(e.kind, e.origin) for e in (first, second)] == [("updated", "c"), ("deleted", "c")]


def test_the_events_channel_names_the_database_of_any_client() -> None:
    p = prefix()
    channels = {
        f"redis://{HOST}:6379": 0,
        f"redis://{HOST}:6379/0": 0,
        f"redis://{HOST}:6379/5": 5,
        f"redis://{HOST}:6379?db=7": 7,
        f"rediss://{HOST}:6379/2": 2,
        "unix:///tmp/redis.sock": 0,
        "unix:///tmp/redis.sock?db=3": 3,
    }
    for url, db in channels.items():
        assert RedisRepository(url, prefix=p).events_channel == f"{p}events:{db}", url
    for client, db in ((coredis.Redis(host=HOST, port=6379), 0), (coredis.Redis(db=4), 4)):
        assert RedisRepository(client, prefix=p).events_channel == f"{p}events:{db}"
    pool = coredis.ConnectionPool.from_url(f"redis://{HOST}:6379/6")
    assert RedisRepository(coredis.Redis(connection_pool=pool), prefix=p).events_channel == (
        f"{p}events:6"
    )


# -- reads of a huge window and expiry scans of many stale entries -------------------


@pytest.mark.anyio
async def test_a_huge_last_messages_reads_the_whole_history(store: RedisRepository) -> None:
    session = new_session(messages=[msg("a"), msg("b"), msg("c")])
    await store.add(session)
    async with RedisRepository(store.client, prefix=store.prefix, snapshot_cache=0) as cold:
        whole = await cold.get(session.id)
        assert whole is not None and whole.messages.total == 3
        for n in (10**17, 2**53 + 1, sys.maxsize):
            assert await cold.get(session.id, last_messages=n) == whole
        touched = await cold.touch(session.id, at=T0, policy=POLICY, last_messages=sys.maxsize)
        assert touched is not None
        assert [m.content for m in touched.messages] == ["a", "b", "c"]
        assert touched.messages.is_complete


async def script_calls(server: RedisServer) -> int:
    """Scripts the server has run so far (EVALSHA answers other than NOSCRIPT)."""
    async with coredis.Redis(host=HOST, port=server.port, decode_responses=True) as probe:
        stats = await probe.info("commandstats")
    evalsha = stats.get("cmdstat_evalsha", {})
    return int(evalsha.get("calls", 0)) - int(evalsha.get("failed_calls", 0))


@pytest.mark.anyio
async def test_expiry_scan_examines_a_bounded_number_of_entries_per_script(
    store: RedisRepository, redis_server: RedisServer
) -> None:
    sessions = [new_session(created=T0 + timedelta(seconds=i), owner="o") for i in range(30)]
    for s in sessions:
        await store.add(s)
    live = sessions[::6]  # the other 25 lost their data to Redis key expiry
    for s in sessions:
        if s not in live:
            await store.client.delete([f"{store.prefix}s:{s.id}", f"{store.prefix}m:{s.id}"])
    store.scan_budget = 10
    later = T0 + timedelta(days=1)
    before = await script_calls(redis_server)
    assert list(await store.expired(later, limit=3)) == [s.id for s in live[:3]]
    # 3 live + 10 stale entries lie before the third live one: two calls of 10 at most
    assert await script_calls(redis_server) - before == 2
    before = await script_calls(redis_server)
    assert list(await store.expired(later)) == [s.id for s in live]
    assert await script_calls(redis_server) - before >= 2  # 5 live + 15 stale entries left
    assert dict(await store.count_by_status("o")) == {SessionStatus.ACTIVE: len(live)}
    page = await store.list(SessionQuery(owner="o"))
    assert {s.id for s in page} == {s.id for s in live}


@pytest.mark.anyio
async def test_huge_limits_and_scan_budgets_mean_no_bound(store: RedisRepository) -> None:
    """Redis refused an expiry scan whose limit and scan budget were both 2**63 or more
    (Lua printed their sum as a float; helper-220)."""
    sessions = [new_session(created=T0 + timedelta(seconds=i), owner="o") for i in range(3)]
    for session in sessions:
        await store.add(session)
    store.scan_budget = 2**64
    found = await store.expired(T0 + timedelta(days=1), limit=2**64)
    assert found == [session.id for session in sessions]
    page = await store.list(SessionQuery(owner="o"))
    assert {session.id for session in page} == {session.id for session in sessions}


@pytest.mark.anyio
async def test_an_expiry_removal_removes_only_the_session_it_decoded(
    store: RedisRepository, redis_server: RedisServer
) -> None:
    """The script cannot decode, so it removes an expired session only when told the
    version the caller decoded (an unreadable one is kept, see the contract): one call
    with a current held snapshot, else it answers the session and a second call removes
    it, if it is still that version."""
    held, other = new_session(messages=[msg("a")]), new_session(messages=[msg("b")])
    for session in (held, other):
        await store.add(session)
    later = T0 + timedelta(days=1)
    before = await script_calls(redis_server)
    assert await store.remove_expired(held.id, now=later) == held
    assert await script_calls(redis_server) - before == 1
    async with RedisRepository(
        redis_server.url, prefix=store.prefix, key_expiry_grace=FAR
    ) as elsewhere:  # changed elsewhere: this store's snapshot is outdated
        await elsewhere.save(attrs.evolve(other, revision=1, state={"k": 2}), expected_revision=0)
    before = await script_calls(redis_server)
    removed = await store.remove_expired(other.id, now=later)
    assert await script_calls(redis_server) - before == 2
    assert removed is not None and removed.id == other.id
    assert removed.revision == 1 and removed.state == {"k": 2} and removed.messages.total == 1
    assert await store.get(other.id) is None
    assert await store.remove_expired(other.id, now=later) is None


async def key_expiries(store: RedisRepository, sid: uuid.UUID) -> list[datetime | None]:
    """When Redis drops the session's data keys (None: never)."""
    found: list[datetime | None] = []
    for key in (f"{store.prefix}s:{sid}", f"{store.prefix}m:{sid}"):
        if await store.client.pttl(key) == -1:
            found.append(None)
        else:
            found.append(await store.client.pexpiretime(key))
    return found


@pytest.mark.anyio
async def test_an_unreadable_expired_session_keeps_its_keys_until_written_again(
    store: RedisRepository,
) -> None:
    """Cleanup keeps an unreadable expired session for a repair or a delete(), so Redis
    key expiry must not drop it ``key_expiry_grace`` later: its keys lose their expiry,
    and the write that repairs it sets the expiry again."""
    kept = new_session(messages=[msg("a")])
    await store.add(kept)
    assert kept.expires_at is not None
    assert await key_expiries(store, kept.id) == [kept.expires_at + FAR] * 2
    await store.client.hset(f"{store.prefix}s:{kept.id}", {"d": b'{"version": 1, "'})
    store._held.drop(kept.id)
    later = T0 + timedelta(days=1)
    for _ in range(2):  # kept at every pass
        with pytest.raises(CorruptSessionError):
            await store.remove_expired(kept.id, now=later)
        assert await key_expiries(store, kept.id) == [None, None]
    repaired = attrs.evolve(kept, revision=1)
    await store.save(repaired, expected_revision=0)
    assert await key_expiries(store, kept.id) == [kept.expires_at + FAR] * 2
    assert await store.remove_expired(kept.id, now=later) == repaired


@pytest.mark.anyio
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
async def test_a_client_that_decodes_replies_keeps_an_unreadable_session_too(
    redis_server: RedisServer, encoding: str
) -> None:
    """The keep call compares a hash of the document read with the stored bytes; a
    passed client that decodes replies in latin-1 handed non-ASCII documents over as
    text the store hashed as UTF-8, so the session was never kept (None after every
    attempt, its key expiry left to drop it)."""
    client = coredis.Redis.from_url(redis_server.url, decode_responses=True, encoding=encoding)
    async with client, RedisRepository(client, prefix=prefix(), key_expiry_grace=FAR) as store:
        for damaged in (b'{"version": 1, "\xc3\xa9', b"\xff\xfe{", b'{"version": 1, "'):
            kept = new_session(messages=[msg("a")])
            await store.add(kept)
            await store.client.hset(f"{store.prefix}s:{kept.id}", {"d": damaged})
            store._held.drop(kept.id)
            with pytest.raises(CorruptSessionError):
                await store.remove_expired(kept.id, now=T0 + timedelta(days=1))
            assert await key_expiries(store, kept.id) == [None, None]


@pytest.mark.anyio
async def test_a_kept_unreadable_session_written_past_its_key_deadline_goes_at_once(
    redis_server: RedisServer,
) -> None:
    """A write to a kept unreadable session sets its key expiry again from the deadline
    it writes: one whose deadline plus ``key_expiry_grace`` has passed removes it at once,
    as such a write removes any session; a later deadline keeps it."""
    now = datetime.now(timezone.utc).replace(microsecond=0)  # deadlines in the server's past
    grace = timedelta(hours=1)
    async with RedisRepository(redis_server.url, prefix=prefix(), key_expiry_grace=grace) as store:
        created = now - timedelta(minutes=50)
        gone = new_session(created=created, messages=[msg("a", created)])
        kept = new_session(created=created, messages=[msg("b", created)])
        for session in (gone, kept):
            await store.add(session)
            await store.client.hset(f"{store.prefix}s:{session.id}", {"d": b'{"version": 1, "'})
            store._held.drop(session.id)
            with pytest.raises(CorruptSessionError):
                await store.remove_expired(session.id, now=now)
            assert await key_expiries(store, session.id) == [None, None]
        assert gone.expires_at is not None
        past = attrs.evolve(gone, revision=1, expires_at=gone.expires_at - grace)
        await store.save(past, expected_revision=0)
        assert await store.get(gone.id) is None
        assert await store.client.exists([f"{store.prefix}s:{gone.id}"]) == 0
        later = attrs.evolve(kept, revision=1, expires_at=now + timedelta(days=1))
        await store.save(later, expected_revision=0)
        assert await key_expiries(store, kept.id) == [now + timedelta(days=1) + grace] * 2
        assert list(await store.expired(now)) == []


@pytest.mark.anyio
async def test_a_past_deadline_a_write_finds_keeps_the_keys_for_cleanup(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    """An append or touch whose policy's deadline has passed (a max_age added since)
    records it; the keys then stay ``key_expiry_grace`` from the server's time, not
    from that deadline (already more than the grace ago), so that cleanup still finds
    the session and announces it EXPIRED instead of Redis dropping it unannounced."""
    now = datetime.now(timezone.utc)  # the deadlines are in the server's past
    grace = timedelta(hours=1)
    shorter = ExpiryPolicy(max_age=timedelta(days=1))
    async with RedisRepository(redis_server.url, prefix=prefix(), key_expiry_grace=grace) as store:
        created = now - timedelta(days=2)
        appended, touched = (
            attrs.evolve(new_session(created=created, messages=[msg("a")]), expires_at=None)
            for _ in range(2)
        )
        for session in (appended, touched):
            await store.add(session)
            assert await key_expiries(store, session.id) == [None, None]
        with pytest.raises(SessionNotFound):
            await store.append(appended.id, [msg("b", now)], at=now, policy=shorter)
        reply = await store.touch(touched.id, at=now, policy=shorter)
        assert reply is not None and reply.expires_at == touched.created_at + timedelta(days=1)
        for session in (appended, touched):
            stored = await store.get(session.id)
            assert stored == attrs.evolve(session, expires_at=session.created_at + timedelta(1))
            for when in await key_expiries(store, session.id):
                assert when is not None
                assert (
                    now + grace - timedelta(minutes=5) < when < now + grace + timedelta(minutes=5)
                )
        async with SessionManager(store, cleanup_interval=None) as sessions:
            async with sessions.subscribe() as events:
                assert await sessions.purge_expired() == 2
                kinds = [events.receive_nowait().kind for _ in range(2)]
        assert kinds == [EventKind.EXPIRED] * 2


class OutpacedStore(RedisRepository):
    """A store whose expiry removals another writer outpaces: ``meddle`` runs after each
    expiry-removal script that answered the session (for the caller to decode), i.e.
    between the store's read and its removal of what it read."""

    meddle: Callable[[], Awaitable[None]] | None = None

    async def _run(self, script: Any, action: str, *args: Any, **kwargs: Any) -> Any:
        reply = await super()._run(script, action, *args, **kwargs)
        if script is self._remove_expired and isinstance(reply, list) and self.meddle:
            await self.meddle()
        return reply


@pytest.mark.anyio
async def test_an_expiry_removal_keeps_only_the_unreadable_version_it_read(
    store: RedisRepository, redis_server: RedisServer
) -> None:
    """A session repaired between the read that found it unreadable and the script that
    would keep it is not kept: the new version is read and removed."""
    session = new_session(messages=[msg("a")])
    await store.add(session)
    await store.client.hset(f"{store.prefix}s:{session.id}", {"d": b'{"version": 1, "'})
    repaired = attrs.evolve(session, revision=1)
    async with OutpacedStore(
        redis_server.url, prefix=store.prefix, key_expiry_grace=FAR
    ) as outpaced:

        async def repair() -> None:
            outpaced.meddle = None
            await store.save(repaired, expected_revision=0)

        outpaced.meddle = repair
        removed = await outpaced.remove_expired(session.id, now=T0 + timedelta(days=1))
    assert removed is not None and (removed.id, removed.revision) == (session.id, 1)
    assert removed.messages.total == 1
    assert await store.client.exists([f"{store.prefix}s:{session.id}"]) == 0


@pytest.mark.anyio
async def test_an_expiry_removal_does_not_keep_a_document_repaired_in_place(
    store: RedisRepository, redis_server: RedisServer
) -> None:
    """A repair that rewrites only the document (revision and times as they were) between
    the read that found it unreadable and the script that would keep it: the session is
    read again and removed, not kept without a Redis expiry and reported unreadable."""
    session = new_session(messages=[msg("a")])
    await store.add(session)
    key = f"{store.prefix}s:{session.id}"
    good = await store.client.hget(key, "d")
    assert good is not None
    await store.client.hset(key, {"d": b'{"version": 1, "'})
    async with OutpacedStore(
        redis_server.url, prefix=store.prefix, key_expiry_grace=FAR
    ) as outpaced:

        async def repair() -> None:
            outpaced.meddle = None
            await store.client.hset(key, {"d": good})

        outpaced.meddle = repair
        removed = await outpaced.remove_expired(session.id, now=T0 + timedelta(days=1))
    assert removed is not None and (removed.id, removed.revision) == (session.id, 0)
    assert removed.messages.total == 1
    assert await store.client.exists([key, f"{store.prefix}m:{session.id}"]) == 0


@pytest.mark.anyio
async def test_an_expiry_removal_keeps_an_unreadable_version_found_at_its_last_read(
    store: RedisRepository, redis_server: RedisServer
) -> None:
    """Outpaced by a writer until the last read the attempt bound allows, which finds the
    session unreadable: that version is still kept (no Redis expiry) and reported."""
    current = new_session(messages=[msg("a")])
    await store.add(current)
    key = f"{store.prefix}s:{current.id}"
    reads = 0

    async def save_again() -> None:
        nonlocal current, reads
        reads += 1
        if reads == REMOVE_ATTEMPTS:  # the last read: leave it alone from here on
            return
        changed = attrs.evolve(current, revision=current.revision + 1)
        await store.save(changed, expected_revision=current.revision)
        current = changed
        if reads == REMOVE_ATTEMPTS - 1:  # the next read, the last, finds it unreadable
            await store.client.hset(key, {"d": b'{"version": 1, "'})

    async with OutpacedStore(
        redis_server.url, prefix=store.prefix, key_expiry_grace=FAR
    ) as outpaced:
        outpaced.meddle = save_again
        with pytest.raises(CorruptSessionError):
            await outpaced.remove_expired(current.id, now=T0 + timedelta(days=1))
    assert reads == REMOVE_ATTEMPTS
    assert await key_expiries(store, current.id) == [None, None]


@pytest.mark.anyio
async def test_an_expiry_removal_outpaced_at_every_attempt_leaves_it_to_the_next_pass(
    store: RedisRepository, redis_server: RedisServer
) -> None:
    """A writer that saves the expired session between each read and removal does not
    keep remove_expired() looping: after the first read and REMOVE_ATTEMPTS attempts to
    remove what it read it answers None, and the session stays listed for the next
    pass, which removes it once left alone."""
    current = new_session(messages=[msg("a")])
    await store.add(current)
    later = T0 + timedelta(days=1)
    saves = 0

    async def save_again() -> None:
        nonlocal current, saves
        changed = attrs.evolve(current, revision=current.revision + 1)
        await store.save(changed, expected_revision=current.revision)
        current, saves = changed, saves + 1

    async with OutpacedStore(
        redis_server.url, prefix=store.prefix, key_expiry_grace=FAR
    ) as outpaced:
        outpaced.meddle = save_again
        with anyio.fail_after(20):  # without a bound it would loop for ever
            assert await outpaced.remove_expired(current.id, now=later) is None
        assert saves == 1 + REMOVE_ATTEMPTS
        assert list(await outpaced.expired(later)) == [current.id]
        outpaced.meddle = None
        removed = await outpaced.remove_expired(current.id, now=later)
    assert removed is not None and (removed.id, removed.revision) == (current.id, saves)


@pytest.mark.anyio
async def test_subscribing_to_an_unreachable_server_raises_storage_error() -> None:
    port = free_port()
    async with RedisRepository(f"redis://{HOST}:{port}/0", timeout=2) as store:
        with anyio.fail_after(60):  # only so that a regression fails instead of hanging
            with pytest.raises(StorageError) as info:
                async with store.subscribe_events():
                    pytest.fail("subscribed to a server that does not exist")
    assert info.value.recoverable
    assert f"{HOST}:{port}" in str(info.value)
    assert "Unable to establish a connection" in str(info.value)  # the cause


@pytest.mark.anyio
async def test_what_the_subscribers_block_raises_comes_out_as_it_is(
    redis_server: RedisServer,
) -> None:
    async with RedisRepository(redis_server.url, prefix=prefix()) as store:
        for mine in (TimeoutError("mine"), FileNotFoundError("mine"), KeyError("mine")):
            with pytest.raises(type(mine)) as info:
                async with store.subscribe_events():
                    raise mine
            assert info.value is mine
        with anyio.CancelScope() as scope:
            async with store.subscribe_events() as events:
                scope.cancel()
                await events.__anext__()
        assert scope.cancelled_caught
        # the store still subscribes and publishes
        async with store.subscribe_events() as events:  # confirmed by the server
            assert await store.publish_event("updated", uuid.uuid4(), at=T0) == 1
            with anyio.fail_after(10):
                assert (await events.__anext__()).kind == "updated"


@pytest.mark.anyio
async def test_a_subscription_needs_a_second_connection(redis_server: RedisServer) -> None:
    async with RedisRepository(redis_server.url, prefix=prefix(), max_connections=1) as store:
        with pytest.raises(InvalidConfiguration, match="max_connections=2 or more"):
            async with store.subscribe_events():
                pytest.fail("subscribed with the only connection")
        assert await store.get(uuid.uuid4()) is None  # the store still works
    url, key_prefix = redis_server.url, prefix()
    async with SessionManager(
        RedisRepository(url, prefix=key_prefix, max_connections=2),
        share_events=True,
        cleanup_interval=None,
    ) as manager:
        with anyio.fail_after(10):  # a regression would wait for a connection forever
            created = await manager.create()
            assert (await manager.get(created.id)).id == created.id


@pytest.mark.anyio
async def test_subscriptions_leave_a_connection_for_everything_else(
    redis_server: RedisServer,
) -> None:
    async with RedisRepository(
        redis_server.url, prefix=prefix(), max_connections=2, timeout=1, key_expiry_grace=FAR
    ) as store:
        for _round in range(2):  # a subscription that ended gives its connection back
            async with store.subscribe_events():
                with pytest.raises(InvalidConfiguration, match="max_connections=3 or more"):
                    async with store.subscribe_events():
                        pytest.fail("the second subscription took the last connection")
                with anyio.fail_after(10):  # a regression would wait for a connection forever
                    session = new_session()
                    await store.add(session)
                    assert await store.get(session.id) is not None


class Network:
    """The switches of :func:`tcp_proxy`."""

    def __init__(self) -> None:
        #: new connections are accepted and never answered (a hung middlebox during a
        #: network blip); when false they are forwarded
        self.stall = True
        self._open: set[object] = set()
        self._dead: set[object] = set()
        self.requests = 0  # chunks passed on to the server
        self._more = anyio.Event()  # set (and replaced) at each of them
        self._held: anyio.Event | None = None

    def black_hole(self) -> None:
        """From now on the connections open now carry nothing either way, and are not
        closed (a NAT or load balancer that forgot them without a reset); later ones
        are forwarded."""
        self._dead |= self._open

    def hold_replies(self) -> None:
        """Hold what the server sends from now until :meth:`release_replies`, then pass
        it on in order (a server busy for a while: a slow script, a fork for a snapshot)."""
        self._held = anyio.Event()

    def release_replies(self) -> None:
        if self._held is not None:
            self._held.set()
            self._held = None

    async def sent(self, count: int) -> None:
        """Wait until ``count`` chunks in all have been passed on to the server."""
        with anyio.fail_after(30):  # a hang guard
            while self.requests < count:
                await self._more.wait()

    def passed_on(self) -> None:
        """A chunk was passed on to the server."""
        self.requests += 1
        self._more.set()
        self._more = anyio.Event()

    def opened(self) -> object:
        """A token for a connection just opened."""
        token = object()
        self._open.add(token)
        return token

    def carries(self, token: object) -> bool:
        """Whether the connection of ``token`` still carries data."""
        return token not in self._dead


@asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[tuple[int, Network]]:
    """A TCP proxy to 127.0.0.1:``target_port``: its port and its :class:`Network`
    switches (new connections stall until ``network.stall = False``)."""
    network = Network()

    async def pipe(
        source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream, pair: object, replies: bool
    ) -> None:
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            async for chunk in source:
                held = network._held
                if replies and held is not None:
                    await held.wait()
                if network.carries(pair):
                    await sink.send(chunk)
                    if not replies:
                        network.passed_on()
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await sink.send_eof()

    async def handle(client: anyio.abc.SocketStream) -> None:
        async with client:
            if network.stall:
                await anyio.sleep_forever()
            pair = network.opened()
            async with await anyio.connect_tcp(HOST, target_port) as upstream:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(pipe, client, upstream, pair, False)
                    tg.start_soon(pipe, upstream, client, pair, True)

    listener = await anyio.create_tcp_listener(local_host=HOST, local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield port, network
        tg.cancel_scope.cancel()


@asynccontextmanager
async def proxied_store(
    server: RedisServer, *, store_timeout: float
) -> AsyncIterator[tuple[RedisRepository, Network]]:
    """A store (``timeout=store_timeout``) with two connections reaching ``server``
    through :func:`tcp_proxy`, and the proxy's :class:`Network` (stalling new
    connections until ``network.stall = False``)."""
    async with (
        tcp_proxy(server.port) as (port, switch),
        RedisRepository(
            f"redis://{HOST}:{port}/0",
            prefix=prefix(),
            timeout=store_timeout,
            max_connections=2,
            key_expiry_grace=FAR,
        ) as store,
    ):
        yield store, switch


@pytest.mark.anyio
async def test_slow_connects_during_a_network_blip_do_not_use_up_the_pool(
    redis_server: RedisServer,
) -> None:
    async with proxied_store(redis_server, store_timeout=0.5) as (store, switch):
        for _ in range(3):  # more slow connects than the pool has connections
            with pytest.raises(StorageError) as info:
                await store.get(uuid.uuid4())
            assert info.value.recoverable
            assert "nothing was sent" in str(info.value)
        switch.stall = False  # the network is back
        with anyio.fail_after(10):
            assert await store.get(uuid.uuid4()) is None  # the pool still has its slots
            session = new_session()
            await store.add(session)
            assert await store.get(session.id) is not None


@pytest.mark.anyio
async def test_a_connection_that_stopped_carrying_anything_is_dropped(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A connection the network silently stopped carrying (a NAT that forgot it, no
    reset) stayed in the pool after its request timed out, so every later request on
    it timed out too, for as long as the kernel kept the connection."""
    async with proxied_store(redis_server, store_timeout=0.5) as (store, network):
        network.stall = False
        session = new_session()
        await store.add(session)
        network.black_hole()
        with pytest.raises(StorageError) as info:
            await store.get(session.id)
        assert info.value.recoverable and "did not answer" in str(info.value)
        assert "its connection is retired" in caplog.text
        with anyio.fail_after(10):
            for _ in range(3):  # a new connection, and it stays
                got = await store.get(session.id)
                assert got is not None and got.id == session.id


@pytest.mark.anyio
async def test_a_slow_reply_retires_its_connection_but_fails_no_other_request(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests share a connection. When one timed out, closing the connection at once
    failed another request sent on it that was answered within its own deadline
    ("Connection lost!", "the write may or may not have been applied"), and a warning
    came for each timed-out request. Now the connection is retired: taken out of the
    pool, closed once its replies came, with one warning."""
    async with proxied_store(redis_server, store_timeout=3) as (store, network):
        network.stall = False
        first, second = new_session(), new_session()
        await store.add(first)
        outcome: dict[str, object] = {}

        late_done = anyio.Event()

        async def late() -> None:  # its reply is held past its deadline: times out
            try:
                await store.get(first.id)
            except StorageError as exc:
                outcome["late"] = exc
            late_done.set()

        async def in_time() -> None:  # answered once late timed out: 1.5 s to spare
            await store.add(second)
            outcome["in time"] = True

        with caplog.at_level(logging.WARNING, "asyncsession.stores.redis"):
            network.hold_replies()
            async with anyio.create_task_group() as tg:
                sent = network.requests
                tg.start_soon(late)
                await network.sent(sent + 1)
                await anyio.sleep(1.5)  # so in_time's deadline comes 1.5 s after late's
                tg.start_soon(in_time)
                await network.sent(sent + 2)
                with anyio.fail_after(30):  # a hang guard
                    await late_done.wait()
                network.release_replies()
        assert isinstance(outcome.get("late"), StorageError), outcome
        assert outcome.get("in time") is True, outcome
        retired = [r for r in caplog.records if "its connection is retired" in r.getMessage()]
        assert len(retired) == 1, caplog.text
        with anyio.fail_after(10):  # both pool slots work
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(store.get, second.id)
            assert (await store.get(second.id)).id == second.id


@pytest.mark.anyio
async def test_a_retired_connection_closes_though_a_request_on_it_was_cancelled(
    redis_server: RedisServer,
) -> None:
    """A retired connection waited for the reply of a request whose caller had given up
    (cancelled): on a dead network it never came, so each such stall left one more
    connection open, beyond max_connections."""
    async with proxied_store(redis_server, store_timeout=0.5) as (store, network):
        network.stall = False
        session = new_session()
        await store.add(session)
        pool = store.client.connection_pool
        for _ in range(4):
            network.black_hole()  # the connections open now; new ones pass

            async def gives_up() -> None:
                with anyio.move_on_after(0.2):
                    await store.get(session.id)

            async with anyio.create_task_group() as tg:
                tg.start_soon(gives_up)
                await anyio.sleep(0.05)
                with pytest.raises(StorageError):
                    await store.get(session.id)  # on the same connection: times out
            await anyio.sleep(0.1)
            assert (await store.get(session.id)).id == session.id  # a new connection
        # closed by the deadlines of the requests sent on them at the latest
        with anyio.fail_after(30):  # a regression keeps them open: this fails
            while len(pool._online_connections) > pool.max_connections:  # noqa: ASYNC110
                await anyio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("client", ["store-made", "passed"])
async def test_a_subscription_whose_connection_stopped_carrying_anything_recovers(
    redis_server: RedisServer, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager sharing events through a connection the network silently stopped
    carrying never heard another manager's events again: the keep-alive PING timed
    out and was retried on the same dead connection for ever. A passed client's
    subscription connection is dropped too (its own stream_timeout bounds the PING)."""
    monkeypatch.setattr(redis_store, "_SUBSCRIPTION_IDLE", 1.0)  # not 15 s of silence
    key_prefix = prefix()
    send, receive = anyio.create_memory_object_stream[uuid.UUID](100_000)

    async def listen(subscription: Subscription) -> None:
        async for event in subscription:
            send.send_nowait(event.session_id)

    async def heard(session_id: uuid.UUID, within: float) -> bool:
        with anyio.move_on_after(within):
            async for received in receive:
                if received == session_id:
                    return True
        return False

    async with (
        send,
        receive,
        tcp_proxy(redis_server.port) as (port, network),
        contextlib.AsyncExitStack() as stack,
    ):
        network.stall = False
        url = f"redis://{HOST}:{port}/0"
        if client == "passed":
            own = coredis.Redis.from_url(
                url, stream_timeout=0.5, connect_timeout=0.5, max_connections=2
            )
            await stack.enter_async_context(own)
        store = (
            RedisRepository(url, prefix=key_prefix, timeout=0.5, max_connections=2)
            if client == "store-made"
            else RedisRepository(own, prefix=key_prefix, timeout=0.5)
        )
        async with (
            SessionManager(
                store,
                share_events=True,
                cleanup_interval=None,
            ) as listener,
            SessionManager(
                RedisRepository(redis_server.url, prefix=key_prefix),
                share_events=True,
                cleanup_interval=None,
            ) as speaker,
            anyio.create_task_group() as tg,
        ):
            subscription = listener.subscribe()
            tg.start_soon(listen, subscription)
            first = await speaker.create()
            assert await heard(first.id, within=10)
            network.black_hole()
            with anyio.fail_after(20):  # a regression never heard another event
                while not await heard((later := await speaker.create()).id, within=0.3):
                    pass
            with anyio.fail_after(10):  # the dropped connection's pool slot came back
                assert (await listener.get(later.id)).id == later.id
            await subscription.aclose()
            tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_leaving_a_subscription_after_the_server_went_away_is_prompt(
    lone_redis: RedisServer,
) -> None:
    async with RedisRepository(lone_redis.url, prefix=prefix(), timeout=1) as store:
        with anyio.fail_after(30):  # a regression kept reconnecting and never left
            async with store.subscribe_events() as events:
                await anyio.to_thread.run_sync(lone_redis.stop)
                # No publisher, so no event comes. Asking raises StorageError, unless
                # coredis's background reconnect got there first: then it waits for the
                # server (a race; both happen here).
                error: StorageError | None = None
                with anyio.move_on_after(3):
                    try:
                        await events.__anext__()
                    except StorageError as exc:
                        error = exc
                if error is not None:
                    assert error.recoverable and "Subscribe again" in str(error)
            # leaving normally raised nothing: the lost connection is no news any more,
            # and leaving did not wait for the server (the fail_after above)
        await anyio.to_thread.run_sync(lone_redis.start)
        with anyio.fail_after(30):
            async with store.subscribe_events() as events:  # confirmed by the server
                assert await store.publish_event("updated", uuid.uuid4(), at=T0) == 1
                assert (await events.__anext__()).kind == "updated"


# -- scan budget -----------------------------------------------------------------------


def test_scan_budget_must_be_a_positive_int() -> None:
    url = f"redis://{HOST}:6379"
    bad: Any
    for bad in (0, -1, 1.5, True, "10", None):
        with pytest.raises(InvalidConfiguration, match="scan_budget must be an int >= 1"):
            RedisRepository(url, scan_budget=bad)
    store = RedisRepository(url, scan_budget=7)
    assert store.scan_budget == 7
    with pytest.raises(InvalidConfiguration, match="scan_budget must be an int >= 1"):
        store.scan_budget = 0
    assert store.scan_budget == 7


@pytest.mark.anyio
async def test_an_expiry_scan_stops_when_entries_due_earlier_arrive_between_scripts(
    store: RedisRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    due = [
        attrs.evolve(new_session(), expires_at=T0 + timedelta(seconds=100 + i)) for i in range(3)
    ]
    for session in due:
        await store.add(session)
    early = attrs.evolve(new_session(), expires_at=T0 + timedelta(seconds=50))
    store.scan_budget = 1
    run = store._run
    calls = 0

    async def run_then_add(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        reply = await run(*args, **kwargs)
        if calls == 1:  # another process adds a session due before all found so far
            await store.add(early)
        return reply

    monkeypatch.setattr(store, "_run", run_then_add)
    with anyio.fail_after(10):  # a regression called the script again for ever
        found = await store.expired(T0 + timedelta(days=1), limit=10)
    assert calls < 10 and len(found) == len(set(found))
    assert set(found) <= {s.id for s in [*due, early]} and due[0].id in found


@pytest.mark.anyio
async def test_an_expiry_scan_whose_script_examines_nothing_stops(store: RedisRepository) -> None:
    session = new_session()
    await store.add(session)
    later = T0 + timedelta(days=1)
    store._scan_budget = 0  # past the validation: no script examines anything
    with anyio.fail_after(10):  # a regression called the script again for ever
        assert list(await store.expired(later)) == []
    store.scan_budget = 1
    assert list(await store.expired(later)) == [session.id]


# -- a document decoded before, stored under another session's id --------------------------


@pytest.mark.anyio
async def test_a_document_holding_another_session_is_corrupt_even_when_decoded_before(
    store: RedisRepository,
) -> None:
    """The decoded-document cache (keyed by the document's bytes) answered get(B) with
    session A when B's hash held A's document and A had been read (found by helper-40)."""
    a, b = new_session(name="alice"), new_session(name="bob")
    await store.add(a)
    await store.add(b)
    doc = await store.client.hget(f"{store.prefix}s:{a.id}", "d")
    assert doc is not None
    await store.client.hset(f"{store.prefix}s:{b.id}", {"d": doc})
    async with RedisRepository(store.client, prefix=store.prefix, snapshot_cache=0) as cold:
        assert await cold.get(a.id) == a  # A's document is decoded and remembered
        with pytest.raises(CorruptSessionError, match=f"the document holds session {a.id}"):
            await cold.get(b.id)
        with pytest.raises(CorruptSessionError, match=f"the document holds session {a.id}"):
            await cold.touch(b.id, at=T0, policy=POLICY)
        listed = (await cold.list(SessionQuery())).items
        assert [s.id for s in listed] == [a.id]  # B is skipped as unreadable, not listed as A


@pytest.mark.anyio
async def test_damaged_status_counts_raise_a_storage_error_that_does_not_show_them(
    store: RedisRepository,
) -> None:
    """count_by_status() raised a bare ValueError quoting the damaged field of the
    counts hash (error privacy second read)."""
    await store.add(new_session())
    key = f"{store.prefix}i:cnt"
    await store.client.hset(key, {"alice@example.com": "1"})
    with pytest.raises(StorageError, match="are damaged") as info:
        await store.count_by_status()
    assert "alice" not in str(info.value)
    await store.client.hdel(key, ["alice@example.com"])
    await store.client.hset(key, {"active": "x@example.com"})
    with pytest.raises(StorageError, match="the count of active is not an integer") as info:
        await store.count_by_status()
    assert "example" not in str(info.value)


# -- a URL's percent-encoded password -------------------------------------------------------

PASSWORD = "s3cr/t@x:%41"  # '/', '@' and ':' must be percent-encoded in a URL; so must '%'


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[RedisServer]:
    require_redis()
    server = start_redis(directory=tmp_path, extra_args=["--requirepass", PASSWORD])
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.anyio
async def test_a_percent_encoded_password_in_the_url_is_decoded(
    password_server: RedisServer,
) -> None:
    """coredis sent the password in the URL to the server still percent-encoded, so no
    password with such characters could be given in the URL (found by helper-42)."""
    encoded = quote(PASSWORD, safe="")
    assert encoded == "s3cr%2Ft%40x%3A%2541"
    for userinfo in (f":{encoded}", f"default:{encoded}"):
        url = f"redis://{userinfo}@{HOST}:{password_server.port}/0"
        async with RedisRepository(url, prefix=prefix(), key_expiry_grace=FAR) as store:
            session = new_session()
            await store.add(session)
            assert await store.get(session.id) == session
    wrong = f"redis://:{quote('s3cr/t@x:A', safe='')}@{HOST}:{password_server.port}/0"
    with pytest.raises(StorageError):
        async with RedisRepository(wrong, prefix=prefix()) as store:
            await store.get(uuid.uuid4())


# -- the connection pool: bounded waits, no lost slots ---------------------------------------


@pytest.mark.anyio
async def test_a_request_waits_for_a_free_connection_at_most_timeout(
    redis_server: RedisServer,
) -> None:
    """A request waited for ever when every connection of the pool was held (e.g. by
    blocking commands or subscriptions on store.client)."""
    async with RedisRepository(
        redis_server.url, prefix=prefix(), max_connections=2, timeout=1, key_expiry_grace=FAR
    ) as store:
        pool = store.client.connection_pool
        session = new_session()
        with anyio.fail_after(30):  # a regression waited for ever
            async with pool.acquire(), pool.acquire():  # every connection is held
                for call in (lambda: store.add(session), lambda: store.get(session.id)):
                    with pytest.raises(StorageError) as info:
                        await call()
                    assert info.value.recoverable
                    text = str(info.value)
                    assert "All 2 connections" in text and "nothing was sent" in text
                    assert "raise max_connections" in text and f"{HOST}:" in text
            # nothing of the add reached the server; the pool works again
            assert await store.get(session.id) is None
            assert dict(await store.count_by_status()) == {}
            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(store.get, uuid.uuid4())
            await store.add(session)
            assert await store.get(session.id) == session


@pytest.mark.anyio
async def test_a_cancelled_wait_for_a_connection_leaves_nothing_behind(
    redis_server: RedisServer,
) -> None:
    """coredis's wait for a free connection, once cancelled, left its wake-up behind: the
    next connection given back woke nobody and the next waiter waited on although a
    connection was free."""
    async with RedisRepository(
        redis_server.url, prefix=prefix(), max_connections=2, timeout=30, key_expiry_grace=FAR
    ) as store:
        pool = store.client.connection_pool
        session = new_session()
        await store.add(session)
        with anyio.fail_after(20):  # a regression waited for another connection to come back
            async with pool.acquire():
                async with pool.acquire() as second:
                    async with anyio.create_task_group() as waiters:
                        for _ in range(3):
                            waiters.start_soon(store.get, session.id)
                        await anyio.wait_all_tasks_blocked()  # all three are waiting
                        waiters.cancel_scope.cancel()
                    got: list[Session | None] = []

                    async def read() -> None:
                        got.append(await store.get(session.id))

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(read)
                        await anyio.wait_all_tasks_blocked()  # it waits for a connection
                        pool.release(second)  # one comes back: the waiter gets it
                    # (leaving the block gives `second` back again: take it first)
                    second = await pool.get_connection()
                assert got == [session]
            async with anyio.create_task_group() as tg:  # every slot is still there
                async with pool.acquire(), pool.acquire():
                    pass
                for _ in range(10):
                    tg.start_soon(store.get, session.id)


@pytest.mark.anyio
async def test_cancelled_blocking_commands_on_the_client_do_not_use_up_the_pool(
    redis_server: RedisServer,
) -> None:
    """A cancelled blocking command closes its connection, and coredis dropped the
    connection's pool slot with it: after max_connections of them every request of the
    store waited for ever."""
    async with RedisRepository(
        redis_server.url, prefix=prefix(), max_connections=2, timeout=5, key_expiry_grace=FAR
    ) as store:
        assert await store.get(uuid.uuid4()) is None

        async def wait_for_ever() -> None:
            await store.client.blpop([f"{store.prefix}never"], 0)

        for _ in range(3):  # more than the pool has connections
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_ever)
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
        await assert_store_works(store)


@pytest.mark.anyio
async def test_a_subscription_whose_connection_was_lost_gives_its_slot_back(
    lone_redis: RedisServer,
) -> None:
    """coredis dropped the pool slot of a subscription's connection lost while subscribed:
    with max_connections=2, the next subscription took the last one and every request
    of the store waited for ever."""
    async with (
        RedisRepository(
            lone_redis.url, prefix=prefix(), max_connections=2, timeout=5, key_expiry_grace=FAR
        ) as store,
        RedisRepository(lone_redis.url, prefix=store.prefix) as publisher,
    ):
        for _round in range(2):
            async with store.subscribe_events() as events:
                with anyio.fail_after(20):
                    await publish_until_heard(publisher, "updated", uuid.uuid4())
                    await events.__anext__()
                    await anyio.to_thread.run_sync(
                        lone_redis.command, "CLIENT", "KILL", "TYPE", "pubsub"
                    )

                    async def publish() -> None:
                        while True:
                            await publisher.publish_event("updated", uuid.uuid4(), at=T0)
                            await anyio.sleep(0.01)

                    # until the store noticed: an event after resubscribing, or the error
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(publish)
                        with contextlib.suppress(StorageError):
                            await events.__anext__()
                        tg.cancel_scope.cancel()
        async with store.subscribe_events():
            await assert_store_works(store)


@pytest.mark.anyio
async def test_a_request_cancelled_while_its_connection_is_set_up_gives_its_slot_back(
    redis_server: RedisServer,
) -> None:
    """coredis lost the pool slot of a connection whose setup was cancelled (asyncio; after
    max_connections of them every request waited for ever); on trio the cancellation
    came out of the cancelled scope as a StorageError."""
    async with proxied_store(redis_server, store_timeout=30) as (store, switch):
        for _ in range(3):  # more than the pool has connections
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(store.get, uuid.uuid4())
                    await anyio.wait_all_tasks_blocked()  # the handshake is never answered
                    scope.cancel()
            assert scope.cancelled_caught
        switch.stall = False  # the network is back
        await assert_store_works(store)


@pytest.mark.anyio
async def test_requests_before_the_store_is_open_do_not_use_up_the_pool(
    redis_server: RedisServer,
) -> None:
    """coredis took a pool slot for a request before the client was open and never gave
    it back: with max_connections=1 the store, once open, waited for ever."""
    store = RedisRepository(redis_server.url, prefix=prefix(), max_connections=1, timeout=5)
    with anyio.fail_after(20):  # a regression waited for ever
        for _ in range(2):
            with pytest.raises(StorageError, match="is not open"):
                await store.get(uuid.uuid4())
        async with store:
            assert await store.get(uuid.uuid4()) is None


@pytest.mark.anyio
async def test_subscribing_while_every_connection_is_held_says_the_pool_is_busy(
    redis_server: RedisServer,
) -> None:
    """The subscription's own deadline (the store's timeout from the start) always came
    before the wait for a connection gave up: the error blamed an unreachable server."""
    async with RedisRepository(
        redis_server.url, prefix=prefix(), max_connections=2, timeout=1, key_expiry_grace=FAR
    ) as store:
        pool = store.client.connection_pool
        with anyio.fail_after(30):  # a regression waited for ever
            async with pool.acquire(), pool.acquire():  # every connection is held
                with pytest.raises(StorageError) as info:
                    async with store.subscribe_events():
                        pytest.fail("subscribed without a connection")
            assert info.value.recoverable
            text = str(info.value)
            assert "All 2 connections" in text and "a subscription got none" in text
            assert "nothing was sent" in text and "raise max_connections" in text
            async with store.subscribe_events() as events:  # the pool works again
                assert await store.publish_event("updated", uuid.uuid4(), at=T0) == 1
                assert (await events.__anext__()).kind == "updated"


@pytest.mark.anyio
async def test_requests_queued_behind_stalled_connects_blame_the_server_not_the_pool(
    redis_server: RedisServer,
) -> None:
    """During an outage where the server accepts connections and never answers, the
    requests waiting for a connection were told to raise max_connections."""
    async with proxied_store(redis_server, store_timeout=1) as (store, switch):
        errors: list[StorageError] = []

        async def read() -> None:
            try:
                await store.get(uuid.uuid4())
            except StorageError as exc:
                errors.append(exc)

        with anyio.fail_after(30):
            # two connect and stall; the others wait for a slot, and some of them give up
            # while both slots are still connecting (the rest then connect and stall)
            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(read)
        assert len(errors) == 6
        texts = [str(exc) for exc in errors]
        assert all(exc.recoverable and "nothing was sent" in str(exc) for exc in errors), texts
        assert not any("max_connections" in text for text in texts), texts
        assert any("connections were still connecting" in text for text in texts), texts
        switch.stall = False  # the network is back
        await assert_store_works(store)


@pytest.mark.anyio
async def test_store_client_raises_what_coredis_raises_when_it_gets_no_connection(
    redis_server: RedisServer,
) -> None:
    """The store-made pool's private exceptions reached code using store.client: neither
    a wait for a free connection that timed out nor a failed connect was a coredis error."""
    async with RedisRepository(
        redis_server.url, prefix=prefix(), max_connections=2, timeout=1, key_expiry_grace=FAR
    ) as store:
        pool = store.client.connection_pool
        with anyio.fail_after(30):
            async with pool.acquire(), pool.acquire():
                # coredis's own pool raises TimeoutError when its wait times out
                with pytest.raises(TimeoutError, match="no free connection within 1 s"):
                    await store.client.get(f"{store.prefix}x")
            assert await store.client.get(f"{store.prefix}x") is None
    port = free_port()
    async with RedisRepository(f"redis://{HOST}:{port}/0", timeout=2) as store:
        with anyio.fail_after(30):
            with pytest.raises(coredis.exceptions.ConnectionError):
                await store.client.get("x")
            # the store still knows the request was never sent
            with pytest.raises(StorageError, match="nothing was sent"):
                await store.add(new_session())


@pytest.mark.anyio
async def test_a_passed_clients_pool_timeout_is_named_as_a_possible_cause(
    redis_server: RedisServer,
) -> None:
    """With a client of the caller's whose pool has a timeout, a wait for a free
    connection that timed out was reported only as a reply that never came; a
    subscription waiting for a connection was reported as unconfirmed."""
    client: coredis.Redis[Any] = coredis.Redis.from_url(
        redis_server.url, max_connections=2, pool_timeout=0.5
    )
    store = RedisRepository(client, prefix=prefix(), timeout=1, key_expiry_grace=FAR)
    async with client, store:
        pool = client.connection_pool
        with anyio.fail_after(30):
            async with pool.acquire(), pool.acquire():
                with pytest.raises(StorageError) as info:
                    await store.add(new_session())
                text = str(info.value)
                assert "had no free connection within its timeout" in text, text
                assert "may or may not have been applied" in text  # coredis may have retried
        with anyio.fail_after(30):
            async with pool.acquire(), pool.acquire():
                with pytest.raises(StorageError) as info:
                    async with store.subscribe_events():
                        pytest.fail("subscribed without a connection")
                text = str(info.value)
                assert "within the client's own timeouts" in text and "pool timeout" in text
                assert "nothing was sent" in text, text


@pytest.mark.anyio
async def test_subscriptions_never_cancel_a_passed_clients_connection_setup(
    redis_server: RedisServer,
) -> None:
    """The subscription's deadline cancelled a passed client's connection setup, and
    coredis on asyncio never gave that pool slot back: after max_connections timed-out
    subscriptions every request on the caller's client waited for ever. On trio the
    cancellation came out as "did not answer a subscription (ConnectionError ...)"."""
    async with tcp_proxy(redis_server.port) as (port, switch):
        # the client's own timeouts are longer than the store's: only they may end a setup
        client: coredis.Redis[Any] = coredis.Redis.from_url(
            f"redis://{HOST}:{port}/0", max_connections=2, connect_timeout=1, stream_timeout=1
        )
        store = RedisRepository(client, prefix=prefix(), timeout=0.2, key_expiry_grace=FAR)
        async with client, store:
            with anyio.fail_after(30):  # a regression waited for ever
                for _ in range(3):  # more than the pool has connections
                    with pytest.raises(StorageError) as info:
                        async with store.subscribe_events():
                            pytest.fail("subscribed through a stalled network")
                    assert info.value.recoverable
                    text = str(info.value)
                    assert "No connection to Redis" in text and "nothing was sent" in text
                    assert "within the client's own timeouts" in text, text
            switch.stall = False  # the network is back
            await assert_store_works(store)
            with anyio.fail_after(20):
                async with store.subscribe_events() as events:
                    assert await store.publish_event("updated", uuid.uuid4(), at=T0) == 1
                    assert (await events.__anext__()).kind == "updated"


@pytest.mark.anyio
async def test_the_pool_busy_error_of_store_client_survives_pickle_and_copy(
    redis_server: RedisServer,
) -> None:
    """The TimeoutError a store-made pool raises when no connection came free could not
    be pickled or copied (its constructor did not take its own args)."""
    async with RedisRepository(
        redis_server.url, prefix=prefix(), max_connections=2, timeout=0.5, key_expiry_grace=FAR
    ) as store:
        pool = store.client.connection_pool
        with anyio.fail_after(30):
            async with pool.acquire(), pool.acquire():
                with pytest.raises(TimeoutError) as info:
                    await store.client.get(f"{store.prefix}x")
        error = info.value
        error.__notes__ = ["seen by the caller"]  # as add_note() does (Python 3.11+)
        for twin in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
            assert type(twin) is type(error) and isinstance(twin, TimeoutError)
            assert str(twin) == str(error) == "no free connection within 0.5 s"
            assert twin.__notes__ == ["seen by the caller"]
            assert vars(twin) == vars(error)
