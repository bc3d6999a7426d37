"""Redis answers deadlines and times as exactly as the memory store, up to datetime.max.

The Lua scripts computed deadlines in doubles, exact only up to 2**53 microseconds
(about the year 2255): later, a deadline came out a few microseconds off, and in the
last 30 microseconds before datetime.max a deadline came out as none or up to 31 us
late, and ``last_active`` and the expiry checks were rounded too.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from _store_redis import open_store

from asyncsession import (
    ExpiryPolicy,
    MemoryRepository,
    Message,
    Session,
    SessionRepository,
    SessionStatus,
)
from asyncsession.stores.redis import RedisRepository

US = timedelta(microseconds=1)
DAY = timedelta(days=1)
END = datetime.max.replace(tzinfo=timezone.utc)
LATE = datetime(3000, 1, 1, tzinfo=timezone.utc) + 123_457 * US  # past 2**53 us, odd


def cases() -> list[tuple[str, datetime, datetime, ExpiryPolicy]]:
    """(name, created_at, the touch's time, policy): deadlines near the end, both sides."""
    out = []
    idle = ExpiryPolicy(idle_timeout=10 * DAY)
    age = ExpiryPolicy(max_age=20 * DAY)
    for delta in (*range(-40, 4), -64, -100, -1001):  # where the deadline lands from END
        at = END - 10 * DAY + delta * US
        out.append((f"idle{delta:+}", at - DAY, at, idle))
        created = END - 20 * DAY + delta * US
        out.append((f"age{delta:+}", created, created + DAY, age))
        # both deadlines within microseconds of each other (and of the end)
        both = ExpiryPolicy(idle_timeout=15 * DAY, max_age=20 * DAY + 3 * US)
        out.append((f"both{delta:+}", created, created + 5 * DAY + (delta % 7) * US, both))
    for odd in (1, 3, 7, 31, 33, 999):  # past 2**53 us, far from the end
        policy = ExpiryPolicy(idle_timeout=DAY + odd * US, max_age=2 * DAY + 2 * odd * US)
        out.append((f"late{odd}", LATE, LATE + DAY - odd * US, policy))
    return out


@pytest.fixture
async def redis(
    request: pytest.FixtureRequest, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[RedisRepository]:
    async with open_store(request, tmp_path) as store:
        yield store


async def observe(
    store: SessionRepository, created: datetime, at: datetime, policy: ExpiryPolicy
) -> list[Any]:
    """What the store answers along one session's life near the end of time."""
    sid = uuid.UUID(int=1)
    session = Session(
        sid,
        created,
        created,
        expires_at=policy.deadline(SessionStatus.ACTIVE, created, created, None),
    )
    await store.add(session)
    seen: list[Any] = []
    touched = await store.touch(sid, at=at, policy=policy)
    assert touched is not None
    seen.append(("touch", touched.last_active, touched.expires_at))
    later = at + 5 * US
    appended = await store.append(
        sid, [Message("user", "hi", later, None)], at=later, policy=policy
    )
    seen.append(("append", appended.last_active, appended.expires_at, appended.revision))
    # an append by a caller whose clock is behind keeps last_active
    behind = await store.append(sid, [Message("user", "b", at, None)], at=at, policy=policy)
    seen.append(("behind", behind.last_active, behind.expires_at, behind.revision))
    got = await store.get(sid)
    assert got is not None
    seen.append(("get", got.last_active, got.expires_at))
    deadline = got.expires_at
    if deadline is not None:
        for now in (deadline - US, deadline):
            seen.append(("expired", now, list(await store.expired(now))))
        gone = await store.remove_expired(sid, now=deadline - US)
        seen.append(("early removal", gone))
        # a touch a microsecond before the deadline still finds it (and moves it)
        still = await store.touch(sid, at=deadline - US, policy=policy)
        seen.append(("last touch", still and (still.last_active, still.expires_at)))
        deadline = still and still.expires_at
        if deadline is not None:
            for now in (deadline - US, deadline):
                seen.append(("expired", now, list(await store.expired(now))))
            removed = await store.remove_expired(sid, now=deadline)
            seen.append(("removal", None if removed is None else removed.expires_at))
    return seen


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "created", "at", "policy"), cases(), ids=[case[0] for case in cases()]
)
async def test_redis_answers_times_near_the_end_as_the_memory_store(
    redis: RedisRepository,
    name: str,
    created: datetime,
    at: datetime,
    policy: ExpiryPolicy,
) -> None:
    async with MemoryRepository() as memory:
        expected = await observe(memory, created, at, policy)
    assert await observe(redis, created, at, policy) == expected, name


@pytest.mark.anyio
async def test_an_expiry_scan_skips_entries_not_due_that_the_index_rounds_into_range(
    redis: RedisRepository,
) -> None:
    """Index scores are doubles (32 us apart near datetime.max): a session due 2 us after
    ``now`` is in the index's range; the scan skips it, one entry per script too."""
    now = END - 40 * US
    not_due, due = uuid.UUID(int=1), uuid.UUID(int=2)  # the index lists not_due first
    for sid, deadline in ((not_due, now + 2 * US), (due, now - US)):
        await redis.add(Session(sid, now - DAY, now - DAY, expires_at=deadline))
    for budget in (1, 2, 1000):
        redis.scan_budget = budget
        assert list(await redis.expired(now)) == [due]
        assert await redis.remove_expired(not_due, now=now) is None
    # (deadlines that round to one score are listed in id order, not deadline order)
    assert set(await redis.expired(now + 2 * US)) == {due, not_due}
