"""Every public duration takes seconds (an int or float, not a bool) or a timedelta.

The API review found each store with its own rule: ``SQLiteRepository(busy_timeout=)``,
``FileRepository(lock_timeout=)`` and ``RedisRepository(timeout=)`` refused a timedelta,
``RedisRepository(key_expiry_grace=)`` and ``ExpiryPolicy``'s limits refused seconds,
while ``SessionManager`` took both. They now share one parser (``asyncsession._clock``),
each keeping its own range and what ``None`` means; the stores keep working with the
value given either way, on asyncio and trio.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from redis_support import RedisServer

import asyncsession as s
from asyncsession.stores.files import LockTimeout
from asyncsession.stores.redis import RedisRepository
from asyncsession.testing._contract import POLICY, at, make_session, msg

pytestmark = pytest.mark.anyio

HUGE = 10**5000  # beyond sys.get_int_max_str_digits(): it has no repr


# -- the stores work with a timedelta -----------------------------------------------------


async def test_sqlite_busy_timeout_takes_a_timedelta(tmp_path: Path, anyio_backend: str) -> None:
    db = tmp_path / "s.db"
    async with s.SQLiteRepository(db, busy_timeout=timedelta(milliseconds=200)) as repo:
        session = make_session()
        await repo.add(session)
        other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
        try:
            with pytest.raises(s.StorageError, match="locked") as info:
                await repo.append(session.id, [msg("x")], at=at(1), policy=POLICY)
            assert info.value.recoverable
            assert "busy_timeout 0.2s" in str(info.value)  # the one applied (default: 5s)
        finally:
            other.execute("ROLLBACK")
            other.close()
        done = await repo.append(session.id, [msg("x")], at=at(1), policy=POLICY)
        assert done.revision == 1


async def test_file_lock_timeout_takes_a_timedelta(tmp_path: Path, anyio_backend: str) -> None:
    async with s.FileRepository(tmp_path / "store", lock_timeout=timedelta(seconds=0.2)) as repo:
        session = make_session()
        await repo.add(session)
        lock_file = repo.directory / "locks" / f"{session.id}.lock"
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another holder (its own open file description)
            with pytest.raises(LockTimeout) as info:
                await repo.append(session.id, [msg("x")], at=at(1), policy=POLICY)
            assert info.value.timeout == 0.2 and "gave up after 0.2 s" in str(info.value)
        finally:
            os.close(fd)
        assert (await repo.append(session.id, [msg("x")], at=at(1), policy=POLICY)).revision == 1


async def test_redis_timeout_takes_a_timedelta_and_grace_takes_seconds(
    redis_server: RedisServer, anyio_backend: str
) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)  # key expiry: the server's clock
    async with RedisRepository(
        redis_server.url,
        prefix=f"durations:{uuid.uuid4().hex[:12]}:",
        timeout=timedelta(seconds=5),
        key_expiry_grace=60,
    ) as store:
        session = s.Session(uuid.uuid4(), now, now, owner="alice", expires_at=now)
        await store.add(session)
        deadline = await store.client.pexpiretime(f"{store.prefix}s:{session.id}")
        assert deadline == now + timedelta(seconds=60)
        assert await store.get(session.id) == session


async def test_redis_timeout_given_as_a_timedelta_bounds_a_reply(anyio_backend: str) -> None:
    """A server that accepts connections and never answers: the store gives up after its
    ``timeout``, given here as a timedelta."""

    async def stall(client: anyio.abc.SocketStream) -> None:
        async with client:
            await anyio.sleep_forever()

    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, stall)
            store = RedisRepository(
                f"redis://127.0.0.1:{port}/0", timeout=timedelta(milliseconds=300)
            )
            # The default timeout (10 s) would end this fail_after first (TimeoutError);
            # no elapsed time is measured (helper-187: a stalled machine failed that).
            with anyio.fail_after(8), pytest.raises(s.StorageError):
                async with store:
                    await store.count_by_status()
            tg.cancel_scope.cancel()


async def test_expiry_policy_limits_take_seconds(tmp_path: Path, anyio_backend: str) -> None:
    policy = s.ExpiryPolicy(idle_timeout=60, max_age=7200.5, retention=10, touch_interval=1)
    assert policy == s.ExpiryPolicy(
        idle_timeout=timedelta(seconds=60),
        max_age=timedelta(seconds=7200.5),
        retention=timedelta(seconds=10),
        touch_interval=timedelta(seconds=1),
    )
    assert all(
        type(value) is timedelta
        for value in (policy.idle_timeout, policy.max_age, policy.retention, policy.touch_interval)
    )
    async with s.SQLiteRepository(tmp_path / "s.db") as repo:
        session = make_session()
        await repo.add(session)
        done = await repo.append(session.id, [msg("x", 5)], at=at(5), policy=policy)
        assert done.expires_at == at(65)


# -- the same accepted values everywhere --------------------------------------------------


def _sqlite(value: Any) -> object:
    return s.SQLiteRepository("x.db", busy_timeout=value)


def _files(value: Any) -> object:
    return s.FileRepository("store", lock_timeout=value)


def _redis_timeout(value: Any) -> object:
    return RedisRepository("redis://127.0.0.1:6379", timeout=value)


def _redis_grace(value: Any) -> object:
    return RedisRepository("redis://127.0.0.1:6379", key_expiry_grace=value)


def _policy(name: str) -> Callable[[Any], object]:
    return lambda value: s.ExpiryPolicy(**{name: value})


def _manager(name: str) -> Callable[[Any], object]:
    return lambda value: s.SessionManager(s.MemoryRepository(), **{name: value})


def _seconds(name: str, made: Any) -> float:
    """The duration ``made`` (what a PARAMETERS constructor returned) keeps, in seconds."""
    kept: dict[str, Callable[[Any], Any]] = {
        "busy_timeout": lambda store: store._busy_timeout,
        "lock_timeout": lambda store: store._lock_timeout,
        "timeout": lambda store: store._timeout,
        "key_expiry_grace": lambda store: int(store._grace) / 1e6,  # microseconds, as text
        "idle_timeout": lambda manager: manager.policy.idle_timeout,
        "cleanup_interval": lambda manager: manager._cleanup_interval,
    }
    value = kept.get(name, lambda policy: getattr(policy, name.rpartition(".")[2]))(made)
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


# (name in messages, constructor, None accepted, 0 accepted, longest)
DAYS = timedelta(days=36500)
PARAMETERS: list[tuple[str, Callable[[Any], object], bool, bool, timedelta]] = [
    ("busy_timeout", _sqlite, False, False, timedelta(hours=1)),
    ("lock_timeout", _files, False, False, DAYS),
    ("timeout", _redis_timeout, True, False, DAYS),
    ("key_expiry_grace", _redis_grace, True, True, DAYS),
    ("ExpiryPolicy.idle_timeout", _policy("idle_timeout"), True, False, DAYS),
    ("ExpiryPolicy.max_age", _policy("max_age"), True, False, DAYS),
    ("ExpiryPolicy.retention", _policy("retention"), True, False, DAYS),
    ("ExpiryPolicy.touch_interval", _policy("touch_interval"), False, True, DAYS),
    ("idle_timeout", _manager("idle_timeout"), True, False, DAYS),
    ("cleanup_interval", _manager("cleanup_interval"), True, False, DAYS),
]
IDS = [p[0] for p in PARAMETERS]


@pytest.mark.parametrize(("name", "make", "none", "zero", "longest"), PARAMETERS, ids=IDS)
def test_seconds_and_timedeltas_are_both_accepted(
    name: str, make: Callable[[Any], object], none: bool, zero: bool, longest: timedelta
) -> None:
    for value in (1, 2.5, timedelta(seconds=2.5), timedelta(minutes=3), longest):
        make(value)
    make(longest.total_seconds())
    # both forms mean the same duration (seconds are not read as another unit)
    for seconds, delta in ((2.5, timedelta(seconds=2.5)), (180, timedelta(minutes=3))):
        assert _seconds(name, make(seconds)) == _seconds(name, make(delta)) == seconds, name
    if none:
        make(None)
    if zero:
        make(0)
        make(timedelta(0))


@pytest.mark.parametrize(("name", "make", "none", "zero", "longest"), PARAMETERS, ids=IDS)
def test_bad_durations_raise_invalid_configuration_naming_the_parameter(
    name: str, make: Callable[[Any], object], none: bool, zero: bool, longest: timedelta
) -> None:
    bad: list[Any] = [
        True,
        False,
        "5",
        "1h",
        [5],
        float("nan"),
        float("inf"),
        -float("inf"),
        -1,
        timedelta(seconds=-1),
        longest + timedelta(microseconds=1),
        longest.total_seconds() + 1,
        HUGE,
        -HUGE,
        1e300,
        timedelta.max,
    ]
    if not zero:
        bad += [0, 0.0, timedelta(0)]
    if not none:
        bad.append(None)
    for value in bad:
        with pytest.raises(s.InvalidConfiguration) as info:
            make(value)
        text = str(info.value)
        assert name in text, text
        assert "seconds" in text and "timedelta" in text, text  # the types it takes
        assert len(text) < 600 and "0" * 80 not in text, text  # never the huge value itself


def test_cookie_max_age_goes_through_the_same_parser() -> None:
    """``SessionMiddleware(max_age=)`` is parsed like every other duration; it only
    reaches further (to ``timedelta.max``) and None means a browser-session cookie."""
    from asyncsession.asgi import SessionMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("never called")

    manager = s.SessionManager(s.MemoryRepository())

    def make(value: Any) -> SessionMiddleware:
        return SessionMiddleware(app, manager, secret_key="k" * 32, max_age=value)

    assert make(timedelta.max).max_age == 86_400_000_000_000
    assert make(timedelta(seconds=2.5)).max_age == make(2.5).max_age == 3  # rounded up
    assert make(None).max_age is None
    for value in (0, -1, float("nan"), timedelta(0), True, "60", HUGE, 1e300, 1e-7):
        with pytest.raises(s.InvalidConfiguration) as info:
            make(value)
        text = str(info.value)
        assert "max_age" in text and "seconds" in text and "timedelta" in text, text
        assert len(text) < 600 and "0" * 80 not in text, text
        assert "no limit" not in text, text  # None is no "no limit" for a cookie
    with pytest.raises(s.InvalidConfiguration, match="ends with the browser session"):
        make(0)
