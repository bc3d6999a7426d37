"""ManualClock: naive times, endless and out-of-range sleeps (review finding 5 of helper-27)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import anyio
import anyio.lowlevel
import pytest

from asyncsession import InvalidConfiguration
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


def test_advance_refuses_what_no_datetime_holds() -> None:
    clock = ManualClock(START)
    for bad in (math.nan, -math.inf):
        with pytest.raises(InvalidConfiguration):
            clock.advance(bad)
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
        while clock.sleepers == 0:
            await anyio.lowlevel.checkpoint()
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        assert not woke.is_set()
        clock.advance(timedelta(microseconds=1))
        await woke.wait()
