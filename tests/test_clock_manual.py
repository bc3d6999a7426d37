"""ManualClock: naive times, endless and out-of-range sleeps (review finding 5 of helper-27)."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import anyio
import anyio.lowlevel
import pytest

import asyncsession as s
from asyncsession import InvalidConfiguration, SessionManager, SessionNotFound
from asyncsession.stores.redis import RedisRepository
from asyncsession.testing import ManualClock

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def test_jump_to_refuses_naive_datetimes() -> None:
    clock = ManualClock(START)
    with pytest.raises(InvalidConfiguration, match="timezone-aware"):
        clock.jump_to(datetime(2026, 1, 1, 6, 0))  # would depend on the machine's zone
    assert clock.now() == START
    east = timezone(timedelta(hours=2))
    assert clock.jump_to(datetime(2026, 1, 1, 8, 0, tzinfo=east)) == START + timedelta(hours=6)
    assert clock.now().tzinfo is timezone.utc


def test_jump_to_an_earlier_time_names_both_times() -> None:
    """helper-183: the error quoted an advance() by a negative timedelta, a call the user
    never made."""
    clock = ManualClock(START)
    with pytest.raises(InvalidConfiguration) as info:
        clock.jump_to(START - timedelta(days=365))
    assert "jump_to(2025-01-01T00:00:00+00:00)" in str(info.value)
    assert "2026-01-01T00:00:00+00:00" in str(info.value) and "advance" not in str(info.value)
    assert clock.now() == START and clock.jump_to(START) == START


def test_advance_refuses_what_no_datetime_holds() -> None:
    clock = ManualClock(START)
    for bad in (math.nan, -math.inf):
        with pytest.raises(InvalidConfiguration):
            clock.advance(bad)
    # not seconds: True was one second, "5" a bare TypeError
    for wrong in (True, "5", None, [1]):
        with pytest.raises(InvalidConfiguration, match=r"seconds .* or a timedelta"):
            clock.advance(wrong)  # type: ignore[arg-type]
    for too_far in (math.inf, 1e300, 1e12, timedelta.max):
        with pytest.raises(InvalidConfiguration, match="past the last time"):
            clock.advance(too_far)
    assert clock.now() == START


@pytest.mark.anyio
@pytest.mark.parametrize("seconds", [math.inf, 1e12, 1e300, 10**400])
async def test_endless_sleeps_wait_until_cancelled(seconds: float, anyio_backend: str) -> None:
    clock = ManualClock(START)
    woke = False

    async def sleeper() -> None:
        nonlocal woke
        await clock.sleep(seconds)
        woke = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        with anyio.fail_after(60):  # a hang guard
            while clock.sleepers == 0:
                await anyio.lowlevel.checkpoint()
        clock.advance(timedelta(days=365 * 1000))
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert not woke and clock.sleepers == 1
        tg.cancel_scope.cancel()
    assert not woke and clock.sleepers == 0


@pytest.mark.anyio
async def test_long_sleeps_within_range_still_wake(anyio_backend: str) -> None:
    clock = ManualClock(START)
    woke = anyio.Event()

    async def sleeper() -> None:
        await clock.sleep(1e10)  # about 317 years: a datetime still holds it
        woke.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        with anyio.fail_after(60):  # a hang guard
            while clock.sleepers == 0:
                await anyio.lowlevel.checkpoint()
        clock.advance(1e10 - 1)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert not woke.is_set()
        clock.advance(1)
        await woke.wait()
    assert clock.sleepers == 0


@pytest.mark.anyio
async def test_sleep_refuses_nan(anyio_backend: str) -> None:
    clock = ManualClock(START)
    with pytest.raises(InvalidConfiguration, match="nan"):
        await clock.sleep(math.nan)
    assert clock.sleepers == 0


@pytest.mark.anyio
@pytest.mark.parametrize("seconds", [1e-9, 4e-7, 0.4999e-6])
async def test_sleeps_below_a_microsecond_return_without_an_advance(
    seconds: float, anyio_backend: str
) -> None:
    """A datetime holds no time below a microsecond: the deadline is now, so the sleep
    is over (after a checkpoint), like ``sleep(0)``; it does not wait for an advance."""
    clock = ManualClock(START)
    with anyio.fail_after(10):
        with anyio.CancelScope() as scope:
            scope.cancel()
            with pytest.raises(anyio.get_cancelled_exc_class()):
                await clock.sleep(seconds)  # a checkpoint: cancellation is seen
        await clock.sleep(seconds)
    assert clock.sleepers == 0 and clock.now() == START


@pytest.mark.anyio
async def test_a_microsecond_sleep_still_waits_for_the_clock(anyio_backend: str) -> None:
    clock = ManualClock(START)
    woke = anyio.Event()

    async def sleeper() -> None:
        await clock.sleep(1e-6)
        woke.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(sleeper)
        with anyio.fail_after(60):  # a hang guard
            while clock.sleepers == 0:
                await anyio.lowlevel.checkpoint()
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert not woke.is_set()
        clock.advance(timedelta(microseconds=1))
        await woke.wait()


def test_the_default_start_is_now_to_the_whole_second() -> None:
    """Stores that expire data on their own clock (Redis) need a manual time near the
    real one: the default start is the current UTC time, truncated to the second."""
    before = datetime.now(timezone.utc).replace(microsecond=0)
    clock = ManualClock()
    after = datetime.now(timezone.utc)
    assert before <= clock.now() <= after
    assert clock.now().microsecond == 0 and clock.now().tzinfo is timezone.utc
    assert ManualClock(START).now() == START  # a fixed date still when asked for


@pytest.fixture
async def redis_store(
    request: pytest.FixtureRequest, anyio_backend: str
) -> AsyncIterator[RedisRepository]:
    """A Redis store with the default key_expiry_grace (keys go by the server's clock)."""
    server = request.getfixturevalue("redis_server")
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    store = RedisRepository(server.url, prefix=prefix)
    try:
        yield store
    finally:
        async with RedisRepository(server.url, prefix=prefix) as cleaner:
            keys = [key async for key in cleaner.client.scan_iter(match=f"{prefix}*")]
            if keys:
                await cleaner.client.delete(keys)


@pytest.mark.anyio
async def test_a_default_manual_clock_drives_a_redis_store(redis_store: RedisRepository) -> None:
    """A session stamped at a fixed past date had its Redis keys deleted by the server as
    soon as they were written (deadline + key_expiry_grace already past)."""
    clock = ManualClock()
    async with SessionManager(
        redis_store, idle_timeout=60, cleanup_interval=30, clock=clock
    ) as sessions:
        session = await sessions.create()
        await sessions.add_message(session.id, "user", "hi")
        got = await sessions.get(session.id, touch=False)
        assert [m.content for m in got.messages] == ["hi"]
        clock.advance(59)
        assert await sessions.exists(session.id)
        clock.advance(1)  # the idle timeout
        with pytest.raises(SessionNotFound):
            await sessions.get(session.id)
        clock.advance(30)  # past a cleanup pass
        await sessions.wait_for_cleanup()
        assert not await sessions.exists(session.id)


def test_a_time_that_is_no_datetime_is_refused_without_showing_it() -> None:
    """utc() quoted what it refused with repr(), which raises ValueError for an int of
    more than 4300 digits; ManualClock(start=) and jump_to() went through it too."""
    huge = 10**5000
    for refuse in (
        lambda: ManualClock(start=huge),  # type: ignore[arg-type]
        lambda: ManualClock(START).jump_to(huge),  # type: ignore[arg-type]
        lambda: s.Message("user", "hi", huge),  # type: ignore[arg-type]
    ):
        with pytest.raises(InvalidConfiguration, match="timezone-aware datetime; got an int"):
            refuse()
    with pytest.raises(InvalidConfiguration, match="must be timezone-aware; got naive"):
        ManualClock(start=datetime(2026, 1, 1))
