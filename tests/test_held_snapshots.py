"""Held snapshots: `update()` is one store round trip, and stays correct across processes.

Two store objects on one SQLite file, or on one Redis server and prefix, stand for two
processes (each has its own held snapshots). The store's compare-and-set is the
authority; these tests show that a stale held snapshot never loses a write nor refuses a
live session.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs
import coredis
import pytest
from redis_support import RedisServer

from asyncsession import (
    ExpiryPolicy,
    InvalidConfiguration,
    Message,
    Session,
    SessionClosed,
    SessionConflict,
    SessionManager,
    SessionNotFound,
    SessionStatus,
)
from asyncsession.abc import SessionRepository
from asyncsession.stores._held import _MAX_BASES_PER_SESSION, HeldSnapshots, current_updater
from asyncsession.stores.redis import RedisRepository
from asyncsession.stores.sqlite import SQLiteRepository
from asyncsession.testing import ManualClock

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def bump(key: str) -> Any:
    def fn(session: Session) -> Session:
        return session.with_state({key: session.state.get(key, 0) + 1})

    return fn


@attrs.define
class Place:
    """Where two 'processes' keep their sessions, and how to count store round trips."""

    open: Callable[..., SessionRepository]
    round_trips: Callable[[Callable[[], Awaitable[Any]]], Awaitable[int]]


@pytest.fixture(params=["sqlite", "redis"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    if request.param == "sqlite":
        path = tmp_path / "shared.db"
        stores: list[SQLiteRepository] = []

        def open_sqlite(**options: Any) -> SessionRepository:
            stores.append(SQLiteRepository(path, **options))
            return stores[-1]

        async def hops(action: Callable[[], Awaitable[Any]]) -> int:
            before = sum(store.statistics().operations for store in stores)
            await action()
            return sum(store.statistics().operations for store in stores) - before

        return Place(open_sqlite, hops)
    server: RedisServer = request.getfixturevalue("redis_server")
    key_prefix = f"test:{uuid.uuid4().hex[:12]}:"

    def open_redis(**options: Any) -> SessionRepository:
        # the manual clock is far from the server's: no key expiry
        return RedisRepository(server.url, prefix=key_prefix, key_expiry_grace=None, **options)

    async def scripts(action: Callable[[], Awaitable[Any]]) -> int:
        """Scripts the server ran for ``action()`` (the store's only commands)."""
        async with coredis.Redis(
            host="127.0.0.1", port=server.port, decode_responses=True
        ) as probe:

            async def calls() -> int:
                stats = await probe.info("commandstats")
                return sum(  # NOSCRIPT answers (a script's first use) are failed calls
                    int(value["calls"]) - int(value.get("failed_calls", 0))
                    for key, value in stats.items()
                    if key.startswith(("cmdstat_eval", "cmdstat_fcall"))
                )

            before = await calls()
            await action()
            return await calls() - before

    return Place(open_redis, scripts)


@pytest.fixture
async def pair(
    place: Place, anyio_backend: str
) -> AsyncIterator[tuple[SessionManager, SessionManager, ManualClock]]:
    """Two managers, as two processes would have, sharing one clock."""
    clock = ManualClock(T0)
    async with AsyncExitStack() as stack:
        managers = [
            await stack.enter_async_context(
                SessionManager(place.open(), clock=clock, idle_timeout=60, cleanup_interval=None)
            )
            for _ in range(2)
        ]
        yield managers[0], managers[1], clock


async def test_warm_update_is_one_round_trip(
    pair: tuple[SessionManager, SessionManager, ManualClock], place: Place
) -> None:
    a, _, _ = pair
    session = await a.create(state={"n": 0})
    assert await place.round_trips(lambda: a.update(session.id, bump("n"))) == 1
    await a.add_message(session.id, "user", "hi")  # the held snapshot follows appends
    assert await place.round_trips(lambda: a.update(session.id, bump("n"))) == 1
    final = await a.get(session.id, touch=False)
    assert final.state["n"] == 2 and final.revision == 3
    assert [m.content for m in final.messages] == ["hi"]


async def test_without_the_cache_update_reads_first(place: Place, anyio_backend: str) -> None:
    async with SessionManager(place.open(snapshot_cache=0), cleanup_interval=None) as manager:
        session = await manager.create()
        assert await place.round_trips(lambda: manager.update(session.id, bump("n"))) == 2


async def test_updating_a_missing_session_reads_once(
    pair: tuple[SessionManager, SessionManager, ManualClock], place: Place
) -> None:
    a, b, _ = pair
    session = await a.create()
    await b.delete(session.id)  # elsewhere: a still holds its snapshot

    async def missing(sid: uuid.UUID) -> None:
        with pytest.raises(SessionNotFound):
            await a.update(sid, bump("n"))

    # the held snapshot is refused by the store's compare-and-set, which brings no session
    assert await place.round_trips(lambda: missing(session.id)) == 1
    assert await place.round_trips(lambda: missing(uuid.uuid4())) == 1  # never held: one read


@pytest.mark.parametrize("size", [-1, 1.5, True, "10"])
def test_snapshot_cache_size_is_checked(place: Place, size: Any) -> None:
    with pytest.raises(InvalidConfiguration, match="snapshot_cache"):
        place.open(snapshot_cache=size)


async def test_other_process_writes_are_never_lost(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    a, b, _ = pair
    session = await a.create(state={"a": 0, "b": 0})
    await a.update(session.id, bump("a"))  # a now holds revision 1
    await b.update(session.id, bump("b"))  # revision 2, unknown to a
    await b.add_message(session.id, "user", "from b")  # revision 3
    result = await a.update(session.id, bump("a"))  # stale snapshot refused, re-read
    assert result.state == {"a": 2, "b": 1} and result.revision == 4
    assert [m.content for m in result.messages] == ["from b"]
    assert await b.get(session.id, touch=False) == result


async def test_a_refused_save_brings_the_current_session(
    pair: tuple[SessionManager, SessionManager, ManualClock], place: Place
) -> None:
    a, b, _ = pair
    session = await a.create(state={"a": 0, "b": 0})
    await a.update(session.id, bump("a"))
    await b.update(session.id, bump("b"))
    # a's held snapshot is refused and the refusal carries revision 2: no separate read
    assert await place.round_trips(lambda: a.update(session.id, bump("a"))) == 2
    final = await b.get(session.id, touch=False)
    assert final.state == {"a": 2, "b": 1} and final.revision == 3


async def test_many_tasks_in_two_managers_apply_every_update(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    a, b, _ = pair
    session = await a.create(state={"n": 0})

    async def worker(manager: SessionManager) -> None:
        for _ in range(25):
            await manager.update(session.id, bump("n"))

    async with anyio.create_task_group() as tg:
        for manager in (a, b, a, b):
            tg.start_soon(worker, manager)
    final = await a.get(session.id, touch=False)
    assert final.state["n"] == 100 and final.revision == 100


async def test_stale_idle_deadline_does_not_refuse_a_touched_session(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    a, b, clock = pair
    session = await a.create()
    await a.update(session.id, bump("n"))  # a holds last_active T0
    clock.advance(50)
    await b.get(session.id)  # b's read moves the idle deadline (no new revision)
    clock.advance(50)  # past a's held deadline (T0 + 60 s), not the stored one
    result = await a.update(session.id, bump("n"))
    assert result.state["n"] == 2 and result.last_active == clock.now()


async def test_a_session_deleted_and_added_again_elsewhere_is_not_overwritten(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    """The same id, revision and times in a new life (an export imported again after a
    delete): a snapshot held from the earlier life must be neither served nor updated."""
    a, b, _ = pair
    session = await a.create(state={"v": "app"})
    held = await a.update(session.id, bump("n"))  # a holds this snapshot
    await b.delete(session.id)
    await b.repository.add(held.with_state({"v": "imported"}))  # same revision and times
    updated = await a.update(session.id, bump("n"))  # based on a's held snapshot first
    assert updated.state == {"v": "imported", "n": 2}
    stored = await b.get(session.id, touch=False)
    assert stored.state == {"v": "imported", "n": 2} and stored.revision == held.revision + 1


@pytest.mark.parametrize("cache", [1000, 0])
async def test_this_stores_own_read_while_fn_runs_does_not_refuse_the_save(
    place: Place, cache: int, anyio_backend: str
) -> None:
    clock = ManualClock(T0)
    async with SessionManager(
        place.open(snapshot_cache=cache),
        clock=clock,
        idle_timeout=60,
        cleanup_interval=None,
        max_retries=3,
    ) as sessions:
        created = await sessions.create(state={"n": 0})
        sessions.repository._held.drop(created.id)  # type: ignore[attr-defined]
        calls = 0

        async def fn(old: Session) -> Session:
            nonlocal calls
            calls += 1
            clock.advance(5)
            await sessions.get(created.id)  # e.g. the same handler reads (touches) it
            return old.with_state({"n": old.state["n"] + 1})

        updated = await sessions.update(created.id, fn)
    assert calls == 1 and updated.state == {"n": 1}


@pytest.mark.parametrize("cache", [1000, 0])
async def test_an_update_based_on_a_fresh_read_is_not_applied_to_another_life(
    place: Place, cache: int, anyio_backend: str
) -> None:
    """Nothing held: the update reads the session. Deleted and added again elsewhere
    while the callback runs (same revision and times), it must not be overwritten."""
    clock = ManualClock(T0)
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                SessionManager(place.open(snapshot_cache=cache), clock=clock, cleanup_interval=None)
            )
            for _ in range(2)
        ]
        created = await b.create(state={"life": 1})  # a holds nothing of it
        calls = 0

        async def fn(old: Session) -> Session:
            nonlocal calls
            calls += 1
            if calls == 1:  # an import elsewhere: delete, then add a new life
                await b.delete(created.id)
                await b.repository.add(created.with_state({"life": 2}))
            return old.with_state({"n": old.state.get("n", 0) + 1})

        result = await a.update(created.id, fn)
        assert calls == 2 and result.state == {"life": 2, "n": 1}
        assert (await b.get(created.id, touch=False)).state == {"life": 2, "n": 1}


@pytest.mark.parametrize("cache", [1000, 0])
async def test_two_updates_in_flight_each_check_the_life_they_were_based_on(
    place: Place, cache: int, anyio_backend: str
) -> None:
    """Two tasks update one session through one store object by hand (its managers
    take turns, so only direct store calls have two in flight). Another process deletes
    it and adds it again (same revision and times) after the first task's update read
    it; the second task reads the new life and starts its update. The first update's
    save must be refused, not overwrite the new life (review finding of helper-159: what
    the saves check was kept per session, so the second update's read replaced the
    first's)."""
    clock = ManualClock(T0)
    async with AsyncExitStack() as stack:
        shared = await stack.enter_async_context(place.open(snapshot_cache=cache))
        b = await stack.enter_async_context(
            SessionManager(place.open(snapshot_cache=cache), clock=clock, cleanup_interval=None)
        )
        created = await b.create(state={"life": 1})
        first_read, second_read, finish_first = anyio.Event(), anyio.Event(), anyio.Event()
        outcome: dict[str, object] = {}

        async def first() -> None:
            old = await shared.get_for_update(created.id)
            assert old is not None and old.state["life"] == 1
            first_read.set()
            await finish_first.wait()
            new = attrs.evolve(old, state={**old.state, "first": True}, revision=1)
            try:
                await shared.save(new, expected_revision=old.revision)
            except SessionConflict:
                outcome["first"] = "refused"
            else:
                outcome["first"] = "saved"

        async def second() -> None:
            await shared.get(created.id)  # reads (and holds) the new life
            old = await shared.get_for_update(created.id)
            assert old is not None
            outcome["second based on"] = old.state["life"]
            second_read.set()
            await first_done.wait()
            new = attrs.evolve(old, state={**old.state, "second": True}, revision=1)
            await shared.save(new, expected_revision=old.revision)

        first_done = anyio.Event()

        async def first_then_done() -> None:
            await first()
            first_done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(first_then_done)
            await first_read.wait()
            await b.delete(created.id)
            await b.repository.add(created.with_state({"life": 2}))
            tg.start_soon(second)
            await second_read.wait()
            finish_first.set()  # the second update saves after the first is done
        stored = await b.get(created.id, touch=False)
    assert outcome == {"first": "refused", "second based on": 2}
    assert stored.state == {"life": 2, "second": True}


class Refused(Exception):
    pass


def refuse(session: Session) -> Session:
    raise Refused


async def test_updates_that_never_saved_do_not_crowd_out_the_check_of_one_in_flight(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    """Many updates of a session that never save (their function raised) leave what
    their saves would have checked; a long-lived task's update in flight must keep its
    own check all the same, and the session's new life (deleted and added again
    elsewhere, then read here) must not be overwritten (review finding of helper-160:
    the long-lived task's earlier lend kept its old place and was dropped as oldest)."""
    a, b, _ = pair
    created = await a.create(state={"life": 1})
    await a.get(created.id)  # held here
    go, read, finish = anyio.Event(), anyio.Event(), anyio.Event()
    based_on: list[int] = []

    async def fn(old: Session) -> Session:
        based_on.append(old.state["life"])
        if len(based_on) == 1:
            read.set()
            await finish.wait()
        return old.with_state({**old.state, "by": "long-lived"})

    async def long_lived() -> None:
        with pytest.raises(Refused):
            await a.update(created.id, refuse)  # an earlier update of it failed
        await go.wait()
        await a.update(created.id, fn)

    async def request() -> None:
        with pytest.raises(Refused):
            await a.update(created.id, refuse)

    async with anyio.create_task_group() as tg:
        tg.start_soon(long_lived)
        await anyio.wait_all_tasks_blocked()
        async with anyio.create_task_group() as requests:
            for _ in range(_MAX_BASES_PER_SESSION + 72):
                requests.start_soon(request)
        go.set()
        await read.wait()
        await b.delete(created.id)
        await b.repository.add(created.with_state({"life": 2}))  # same revision and times
        await a.get(created.id)  # this process reads the new life
        finish.set()
    assert based_on == [1, 2]
    stored = await b.get(created.id, touch=False)
    assert stored.state == {"life": 2, "by": "long-lived"}


async def test_reads_of_a_session_deleted_and_added_again_elsewhere_are_fresh(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    """Reads too: a Redis store answers a read from its held snapshot when the stored
    session matches it, which another life of the session must never do."""
    a, b, _ = pair
    session = await a.create(state={"v": "one"})
    first = await a.get(session.id, touch=False)  # a holds it
    await b.delete(session.id)
    await b.repository.add(first.with_state({"v": "two"}))  # same revision and times
    assert (await a.get(session.id, touch=False)).state == {"v": "two"}
    again = await a.get(session.id, touch=False)  # a holds the second life now
    await b.delete(session.id)
    await b.repository.add(again.with_state({"v": "three"}))
    assert (await a.get(session.id)).state == {"v": "three"}  # a touch within the interval


async def test_close_and_delete_elsewhere_are_seen(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    a, b, _ = pair
    closed, deleted = await a.create(), await a.create()
    for sid in (closed.id, deleted.id):
        await a.update(sid, bump("n"))
    await b.close(closed.id)
    await b.delete(deleted.id)
    with pytest.raises(SessionClosed):
        await a.update(closed.id, bump("n"))
    with pytest.raises(SessionNotFound):
        await a.update(deleted.id, bump("n"))
    assert (await b.get(closed.id, touch=False)).status is SessionStatus.EXITED


async def test_archive_elsewhere_then_reactivate_is_seen(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    a, b, _ = pair
    session = await a.create()
    await a.archive(session.id)  # a holds the archived snapshot
    await b.activate(session.id)
    result = await a.update(session.id, bump("n"))
    assert result.status is SessionStatus.ACTIVE and result.state["n"] == 1


async def test_own_touches_keep_the_held_snapshot_current(
    pair: tuple[SessionManager, SessionManager, ManualClock], place: Place
) -> None:
    a, _, clock = pair
    session = await a.create(state={"n": 0})
    await a.update(session.id, bump("n"))
    clock.advance(5)
    await a.get(session.id, last_messages=1)  # a touch that returns a window
    assert await place.round_trips(lambda: a.update(session.id, bump("n"))) == 1


async def test_rotate_reads_the_session_afresh(
    pair: tuple[SessionManager, SessionManager, ManualClock],
) -> None:
    a, b, _ = pair
    changed, closed, deleted = await a.create(), await a.create(), await a.create()
    for sid in (changed.id, closed.id, deleted.id):
        await a.update(sid, bump("n"))  # a holds revision 1 of each
    await b.set_state(changed.id, paid=True)
    await b.close(closed.id)
    await b.delete(deleted.id)
    rotated = await a.rotate(changed.id)
    assert rotated.state == {"n": 1, "paid": True}
    with pytest.raises(SessionClosed):
        await a.rotate(closed.id)
    with pytest.raises(SessionNotFound):
        await a.rotate(deleted.id)


async def test_a_stale_held_snapshot_does_not_use_up_a_retry(
    place: Place, anyio_backend: str
) -> None:
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                SessionManager(place.open(), max_retries=1, cleanup_interval=None)
            )
            for _ in range(2)
        ]
        session = await a.create(state={"n": 0})
        await a.update(session.id, bump("n"))
        await b.update(session.id, bump("n"))  # a's held snapshot is now stale
        assert (await a.update(session.id, bump("n"))).state["n"] == 3


async def test_only_a_stale_held_snapshot_gets_an_attempt_more_and_the_error_counts_it(
    place: Place, anyio_backend: str, other_task: Callable[[Any], Awaitable[None]]
) -> None:
    """The extra attempt is for a remembered snapshot another process had outdated
    before the update began, once; conflicts with writes of this process while fn runs
    each count (fn ran max_retries + 1 times, review finding), and the error tells how
    many times fn ran."""
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                SessionManager(place.open(), max_retries=2, cleanup_interval=None)
            )
            for _ in range(2)
        ]
        session = await a.create(state={"n": 0})
        await a.update(session.id, bump("n"))  # a holds it
        calls = 0

        async def appending_here(x: Session) -> Session:
            nonlocal calls
            calls += 1
            await other_task(lambda: a.add_message(session.id, "user", "again"))
            return x.with_state(n=-1)

        with pytest.raises(SessionConflict, match="during 2 attempts") as info:
            await a.update(session.id, appending_here)
        assert calls == 2 and info.value.attempts == 2

        await b.update(session.id, bump("n"))  # a's held snapshot is now stale
        calls = 0

        async def written_elsewhere(x: Session) -> Session:
            nonlocal calls
            calls += 1
            await b.add_message(session.id, "user", "elsewhere")
            return x.with_state(n=-1)

        with pytest.raises(SessionConflict, match="during 3 attempts") as info:
            await a.update(session.id, written_elsewhere)
        assert calls == 3 and info.value.attempts == 3
        assert (await a.get(session.id, touch=False)).state == {"n": 2}


async def test_a_refusal_is_no_stale_snapshot_when_this_process_wrote(
    place: Place, anyio_backend: str
) -> None:
    """Two updates of one session in flight in one process (direct calls of one store
    object in two tasks, say): the first is refused because this process appended since. That the
    second was lent a remembered snapshot nothing changed since does not make the
    refusal a stale snapshot (another process's doing; the state machine found it
    reported so, which gives a manager's update an attempt more)."""
    policy = ExpiryPolicy(idle_timeout=timedelta(seconds=60))
    async with place.open() as store:
        session = Session(uuid.uuid4(), T0, T0, expires_at=T0 + timedelta(seconds=60))
        await store.add(session)
        first = await store.get_for_update(session.id)  # an update of revision 0
        assert first is not None
        later = T0 + timedelta(seconds=1)
        await store.append(session.id, [Message("user", "hi", later)], at=later, policy=policy)
        second = await store.get_for_update(session.id)  # one of revision 1, held
        assert second is not None and second.revision == 1
        with pytest.raises(SessionConflict) as info:
            await store.save(attrs.evolve(first, revision=1), expected_revision=0)
        assert not info.value.stale_snapshot
        await store.save(attrs.evolve(second, state={"n": 1}, revision=2), expected_revision=1)
        assert (await store.get(session.id)) == attrs.evolve(second, state={"n": 1}, revision=2)


async def test_a_touch_under_another_policy_is_not_overruled(
    place: Place, anyio_backend: str
) -> None:
    """A shorter idle timeout elsewhere expires the session: a's held copy cannot revive it."""
    clock = ManualClock(T0)
    async with AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                SessionManager(place.open(), clock=clock, idle_timeout=idle, cleanup_interval=None)
            )
            for idle in (3600, 60)
        ]
        session = await a.create()
        await a.update(session.id, bump("n"))  # held by a: deadline T0 + 1 h
        clock.advance(10)
        await b.get(session.id)  # b's touch stores b's deadline: T0 + 70 s
        clock.advance(190)
        with pytest.raises(SessionNotFound):
            await a.update(session.id, bump("n"))


async def test_a_save_elsewhere_does_not_revive_a_session_a_new_max_age_expired(
    place: Place, anyio_backend: str
) -> None:
    """Review finding (two processes, a rolling deploy): b (no max_age) updates with a
    slow function, holding the session; meanwhile a (max_age 10 s) finds the 20 s old
    session expired and records its deadline, which leaves the revision. b's save then
    passed the compare-and-set and stored a deadline 30 minutes on: live again, left out
    of cleanup. It now raises SessionNotFound, and the session stays expired."""
    clock = ManualClock(T0)
    async with AsyncExitStack() as stack:
        b, a = [
            await stack.enter_async_context(
                SessionManager(
                    place.open(),
                    clock=clock,
                    idle_timeout=1800,
                    max_age=max_age,
                    cleanup_interval=None,
                )
            )
            for max_age in (None, 10)
        ]
        session = await b.create(state={"n": 0})
        await b.update(session.id, bump("n"))  # held by b
        clock.advance(20)

        async def expired_elsewhere(x: Session) -> Session:
            with pytest.raises(SessionNotFound):
                await a.get(x.id)
            clock.advance(1)
            return x.with_state(n=5)

        with pytest.raises(SessionNotFound):
            await b.update(session.id, expired_elsewhere)
        for manager in (a, b):
            assert not await manager.exists(session.id)
            assert (await manager.list()).items == ()
        with pytest.raises(SessionNotFound):  # b's next update knows it too
            await b.update(session.id, bump("n"))
        stored = await b.repository.get(session.id)
        assert stored is not None and stored.state == {"n": 1}
        assert stored.expires_at == T0 + timedelta(seconds=10)
        assert await a.purge_expired() == 1


class TickingDatetime(datetime):
    """A datetime subclass, as freezegun's and pendulum's clocks return."""


class SubclassClock(ManualClock):
    def now(self) -> datetime:
        t = super().now()
        return TickingDatetime(*t.timetuple()[:6], t.microsecond, tzinfo=timezone.utc)


async def test_datetime_subclasses_are_stored(place: Place, anyio_backend: str) -> None:
    async with SessionManager(
        place.open(), clock=SubclassClock(T0), cleanup_interval=None
    ) as manager:
        session = await manager.create(state={"n": 0})
        await manager.add_message(session.id, "user", "hi")
        await manager.update(session.id, bump("n"))
        final = await manager.get(session.id, touch=False)
        assert final.state["n"] == 1 and final.messages[0].timestamp == T0


async def test_sqlite_leaves_no_contention_mark_behind(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "marks.db"

    def marks() -> int:
        with closing(sqlite3.connect(path)) as conn:
            return int(conn.execute("SELECT count(*) FROM contended").fetchone()[0])

    async with SQLiteRepository(path) as repo:
        session = snapshot(1)
        await repo.add(session)
        await repo.save(attrs.evolve(session, revision=1), expected_revision=0)
        with pytest.raises(SessionConflict):  # a refused save marks the session
            await repo.save(attrs.evolve(session, revision=1), expected_revision=0)
        assert await anyio.to_thread.run_sync(marks) == 1
        await repo.delete(session.id)  # its rowid may be reused: the mark goes too
    assert await anyio.to_thread.run_sync(marks) == 0


# -- the bounded holder itself ----------------------------------------------------------


def snapshot(messages: int = 0, revision: int = 0) -> Session:
    return Session(
        uuid.uuid4(),
        T0,
        T0,
        messages=[Message("user", str(i), T0) for i in range(messages)],
        revision=revision,
    )


def test_holder_is_bounded_by_sessions_and_by_messages() -> None:
    held = HeldSnapshots(3, max_messages=10)
    first, second, third, fourth = (snapshot(2) for _ in range(4))
    for s in (first, second, third):
        held.keep(s)
    assert held.get(first.id) is first  # now the most recently used
    held.keep(fourth)
    assert len(held) == 3 and held.get(second.id) is None  # least recently used went
    held.keep(snapshot(6))  # 2 + 2 + 2 + 6 messages > 10: the oldest use goes
    assert len(held) == 3 and held.get(third.id) is None
    too_long = snapshot(11)
    held.keep(too_long)
    assert held.get(too_long.id) is None  # never held, and nothing evicted for it
    assert len(held) == 3


def test_holder_keeps_the_newest_revision_and_whole_histories_only() -> None:
    held = HeldSnapshots(10)
    newer = snapshot(3, revision=5)
    held.keep(newer)
    held.keep(attrs.evolve(newer, revision=4))  # a late reply of an older read
    assert held.get(newer.id) is newer
    window = attrs.evolve(newer, revision=6, messages=newer.messages.tail(1))
    held.keep(window)
    assert held.get(newer.id) is newer
    off = HeldSnapshots(0)
    off.keep(newer)
    assert not off.enabled and off.get(newer.id) is None


def test_holder_never_mixes_incarnations() -> None:
    """Replies about another life of a session (deleted and added again) drop the entry."""
    held = HeldSnapshots(10)
    life = snapshot(2, revision=3)
    held.keep(life, "first")
    assert held.entry(life.id) == (life, "first", 0, 0)
    held.keep(attrs.evolve(life, revision=4), "second")  # newer or older? cannot be told
    assert held.get(life.id) is None
    held.keep(life, "second")
    assert held.get(life.id) is life  # from now on the second life is held

    held.seen(life.id, attrs.evolve(life, messages=life.messages.tail(1)), "third")
    assert held.get(life.id) is None  # a window of a third life
    held.keep(life, "third")
    before = held.take(life.id)
    appended = attrs.evolve(life, revision=4, messages=life.messages.tail(1))
    held.appended(before, [Message("user", "x", T0)], appended, "fourth")
    assert held.get(life.id) is None  # the append went to another life
    held.keep(life, "fourth")
    held.touched(attrs.evolve(life, last_active=T0 + timedelta(seconds=5)), "fifth")
    assert held.get(life.id) is life

    held.lend(life.id)
    assert held.before_save(life.id, life.revision) == (life.last_active, "fourth")


def test_holder_checks_the_read_an_update_is_based_on() -> None:
    """lend_read(): the save of an update based on a fresh read checks that read."""
    held = HeldSnapshots(10, max_messages=5)
    read = snapshot(2, revision=3)
    held.seen(read.id, read, "life")
    assert held.lend(read.id) is read  # held now: lent as any held snapshot
    held.lend_read(read, "life")
    assert held.before_save(read.id, 3) == (read.last_active, "life")

    long = snapshot(6, revision=2)  # too long to hold: only what the save checks is kept
    held.seen(long.id, long, "other")
    assert held.lend(long.id) is None
    held.lend_read(long, "other")
    assert held.before_save(long.id, 1) is None  # based on another revision
    held.lend_read(long, "other")
    assert held.before_save(long.id, 2) == (long.last_active, "other")
    assert held.before_save(long.id, 2) is None  # once
    held.lend_read(long, "other")
    held.drop(long.id)  # e.g. a read found it deleted: it may come back in another life
    assert held.before_save(long.id, 2) == (long.last_active, "other")

    off = HeldSnapshots(0)
    off.lend_read(read, "life")
    assert off.before_save(read.id, 3) == (read.last_active, "life")
    off.lend_read(None)  # nothing was read: nothing to check


def test_holder_keeps_the_check_of_a_lent_snapshot_whatever_removes_it() -> None:
    """Reads, deletes, appends and evictions while an update runs never drop what its
    save checks (review finding of helper-25: a read of another life dropped the lent
    mark, and the save then overwrote that life)."""
    life = snapshot(2, revision=3)
    later = T0 + timedelta(seconds=5)

    def lent() -> HeldSnapshots:
        held = HeldSnapshots(2)
        held.keep(life, "one")
        assert held.lend(life.id) is life
        return held

    held = lent()  # a read of another life with the same revision and times
    held.seen(life.id, life, "two")
    assert held.before_save(life.id, 3) == (life.last_active, "one")
    held = lent()  # the same: a window of it
    held.seen(life.id, attrs.evolve(life, messages=life.messages.tail(1)), "two")
    assert held.before_save(life.id, 3) == (life.last_active, "one")
    held = lent()  # a read of a newer revision of this life
    held.seen(life.id, attrs.evolve(life, revision=4, last_active=later), "one")
    assert held.before_save(life.id, 3) == (life.last_active, "one")
    held = lent()  # a read finding it touched elsewhere: the lend follows it
    touched = attrs.evolve(life, last_active=later)
    held.seen(life.id, touched, "one")
    assert held.get(life.id) is touched
    assert held.before_save(life.id, 3) == (later, "one")
    held = lent()  # a read finding no session (deleted: it may come back)
    held.seen(life.id, None)
    assert held.before_save(life.id, 3) == (life.last_active, "one")
    held = lent()  # an append's take()
    held.take(life.id)
    assert held.before_save(life.id, 3) == (life.last_active, "one")
    held = lent()  # evicted by reads of other sessions
    held.keep(snapshot(1))
    held.keep(snapshot(1))
    assert held.get(life.id) is None
    assert held.before_save(life.id, 3) == (life.last_active, "one")
    assert held.before_save(life.id, 3) is None  # checked once


def test_holder_keeps_what_each_updaters_save_checks() -> None:
    """Updates of one session in flight in several tasks (updaters): each save checks
    the snapshot its own update was based on, whatever others were lent or read since."""
    life = snapshot(2, revision=3)
    later = T0 + timedelta(seconds=5)
    held = HeldSnapshots(10)
    held.keep(life, "one")
    assert held.lend(life.id, "first") is life and held.lend(life.id, "second") is life
    assert held.lent_unchanged(life.id, 3, "first") and held.lent_unchanged(life.id, 3, "second")
    assert not held.lent_unchanged(life.id, 3, "third")  # never lent it
    held.touched(attrs.evolve(life, last_active=later), "one")  # both follow own touches
    held.seen(life.id, None)  # deleted elsewhere: it may come back in another life
    reborn = attrs.evolve(life, last_active=T0 + timedelta(seconds=9))
    held.seen(reborn.id, reborn, "two")  # read here, held now
    assert held.lend(life.id, "third") is reborn
    held.seen(life.id, attrs.evolve(reborn, messages=reborn.messages.tail(1)), "two")
    assert held.before_save(life.id, 3, "first") == (later, "one")
    assert held.before_save(life.id, 3, "third") == (reborn.last_active, "two")
    assert held.before_save(life.id, 3, "second") == (later, "one")
    assert held.before_save(life.id, 3, "second") is None  # checked once

    long = snapshot(6, revision=2)  # not held: only what the saves check is kept
    small = HeldSnapshots(10, max_messages=5)
    for updater in range(_MAX_BASES_PER_SESSION + 1):
        small.lend_read(
            attrs.evolve(long, last_active=T0 + timedelta(seconds=updater)), updater=updater
        )
    assert small.before_save(long.id, 2, 0) is None  # the oldest of one session's go first
    assert small.before_save(long.id, 2, 1) == (T0 + timedelta(seconds=1), None)

    class Task:  # what current_updater() refers to weakly
        pass

    # read in one task, saved in another (a blocking portal's calls): the save checks
    # the newest read by a task that ended, and the older ones are forgotten
    portal_tasks = [Task(), Task()]
    small.lend_read(attrs.evolve(long, last_active=T0), updater=weakref.ref(portal_tasks[0]))
    small.lend_read(long, updater=weakref.ref(portal_tasks[1]))
    del portal_tasks
    assert small.before_save(long.id, 2, "saving task") == (long.last_active, None)
    assert small.before_save(long.id, 2, "saving task") is None

    alive, ended = Task(), [Task() for _ in range(_MAX_BASES_PER_SESSION - 1)]
    held.keep(life, "three")
    held.lend(life.id, weakref.ref(alive))  # lent first: the oldest
    for task in ended:
        held.lend(life.id, weakref.ref(task))
    del task, ended  # those tasks ended: their lends go before the oldest live one
    held.lend(life.id, "one more")
    assert held.before_save(life.id, 3, weakref.ref(alive)) == (life.last_active, "three")

    # A session's records all of tasks that ended, then one more: none kept, no empty
    # entry left behind (review finding of helper-162)
    fresh = HeldSnapshots(10)
    tasks = [Task() for _ in range(_MAX_BASES_PER_SESSION + 1)]
    for task in tasks[:-1]:  # reads of it while it is not held
        fresh.lend_read(life, "four", weakref.ref(task))
    fresh.keep(life, "four")
    fresh.lend(life.id, weakref.ref(tasks[-1]))
    del task, tasks
    fresh.take(life.id)  # the held snapshot leaves: its lend becomes a record
    assert all(fresh._bases.values()) and fresh._nbases == sum(map(len, fresh._bases.values()))


def test_an_asyncio_task_that_is_done_has_ended_though_referred_to() -> None:
    """A read in a task something still refers to (``t = create_task(...); await t``),
    saved in another: the save checks that read, as a portal's (helper-162)."""
    held = HeldSnapshots(10, max_messages=1)
    long = snapshot(3, revision=2)  # not held

    async def main() -> None:
        async def read() -> None:
            held.lend_read(long, "life", current_updater())

        task = asyncio.create_task(read())
        await task
        assert held.before_save(long.id, 2, current_updater()) == (long.last_active, "life")

    asyncio.run(main())


def test_a_trio_task_whose_coroutine_returned_has_ended_though_referred_to() -> None:
    """A read in a finished trio task something still refers to (a blocking portal's
    call, until the garbage collector runs), saved in another: the save checked the
    revision alone, so a session deleted and added again meanwhile was overwritten
    (the state machine found it on Redis)."""
    trio = pytest.importorskip("trio")
    held = HeldSnapshots(10, max_messages=1)
    long = snapshot(3, revision=2)  # not held
    kept: list[object] = []

    async def main() -> None:
        async def read() -> None:
            kept.append(trio.lowlevel.current_task())
            held.lend_read(long, "life", current_updater())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
        assert kept  # the task object lives on
        assert held.before_save(long.id, 2, current_updater()) == (long.last_active, "life")

    trio.run(main)


@pytest.mark.parametrize("read", ["repository", "manager"])
async def test_a_read_while_fn_runs_does_not_let_the_save_overwrite_another_life(
    pair: tuple[SessionManager, SessionManager, ManualClock], read: str
) -> None:
    """Deleted and added again elsewhere (same revision and times) while fn runs, then
    read here: the save based on the held snapshot must still be refused."""
    a, b, _ = pair
    session = await a.create(state={"life": 1})
    held = await a.update(session.id, bump("n"))  # a holds this snapshot
    calls = 0

    async def fn(old: Session) -> Session:
        nonlocal calls
        calls += 1
        if calls == 1:
            await b.delete(session.id)
            await b.repository.add(held.with_state({"life": 2}))  # same revision and times
            if read == "repository":
                await a.repository.get(session.id)
            else:
                await a.get(session.id)
        return old.with_state({**old.state, "by_a": True})

    updated = await a.update(session.id, fn)
    assert calls == 2 and updated.state == {"life": 2, "n": 1, "by_a": True}
    assert (await b.get(session.id, touch=False)).state == updated.state


# -- Redis: a read of a current held snapshot sends no history -----------------------------


RedisPair = tuple[SessionManager, SessionManager, ManualClock, Callable[[], Awaitable[int]]]


@pytest.fixture
async def redis_pair(redis_server: RedisServer, anyio_backend: str) -> AsyncIterator[RedisPair]:
    """Two managers on one Redis prefix, a shared clock, and a count of history reads."""
    clock = ManualClock(T0)
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    async with AsyncExitStack() as stack:
        managers = [
            await stack.enter_async_context(
                SessionManager(
                    RedisRepository(redis_server.url, prefix=prefix, key_expiry_grace=None),
                    clock=clock,
                    idle_timeout=60,
                    cleanup_interval=None,
                )
            )
            for _ in range(2)
        ]
        probe = await stack.enter_async_context(
            coredis.Redis(host="127.0.0.1", port=redis_server.port, decode_responses=True)
        )

        async def history_reads() -> int:
            """LRANGE commands the server has run so far (inside scripts too)."""
            stats = await probe.info("commandstats")
            return int(stats.get("cmdstat_lrange", {}).get("calls", 0))

        yield managers[0], managers[1], clock, history_reads


async def fresh(manager: SessionManager, session_id: uuid.UUID, **options: Any) -> Session:
    """The session as a store holding nothing reads it."""
    store = manager.repository
    assert isinstance(store, RedisRepository)
    async with RedisRepository(store.client, prefix=store.prefix, snapshot_cache=0) as cold:
        session = await cold.get(session_id, **options)
    assert session is not None
    return session


async def test_redis_read_of_a_current_snapshot_sends_no_history(redis_pair: RedisPair) -> None:
    a, _, _, history_reads = redis_pair
    session = await a.create(state={"n": 1})
    for text in ("one", "two", "three"):
        await a.add_message(session.id, "user", text)
    before = await history_reads()
    whole = await a.repository.get(session.id)
    window = await a.repository.get(session.id, last_messages=2)
    empty = await a.repository.get(session.id, last_messages=0)
    assert await history_reads() == before  # answered from the held snapshot
    assert whole == await fresh(a, session.id)
    assert window == await fresh(a, session.id, last_messages=2)
    assert window is not None and window.messages.offset == 1
    assert [m.content for m in window.messages] == ["two", "three"]
    assert empty == await fresh(a, session.id, last_messages=0)


async def test_redis_read_sees_writes_and_touches_made_elsewhere(redis_pair: RedisPair) -> None:
    a, b, clock, history_reads = redis_pair
    session = await a.create()
    await a.add_message(session.id, "user", "from a")
    await b.add_message(session.id, "user", "from b")  # unknown to a's held snapshot
    before = await history_reads()
    seen = await a.get(session.id, touch=False)
    assert await history_reads() > before
    assert [m.content for m in seen.messages] == ["from a", "from b"]
    clock.advance(30)
    touched = await b.get(session.id)  # moves last_active without a new revision
    assert touched.last_active == clock.now()
    assert (await a.get(session.id, touch=False)).last_active == clock.now()
    await b.update(session.id, bump("n"))
    assert (await a.get(session.id, touch=False)).state == {"n": 1}


async def test_redis_touch_of_a_current_snapshot_sends_no_history(redis_pair: RedisPair) -> None:
    a, _, clock, history_reads = redis_pair
    session = await a.create()
    await a.add_message(session.id, "user", "hi")
    clock.advance(10)
    before = await history_reads()
    touched = await a.get(session.id, last_messages=5)  # a touch script answering briefly
    assert await history_reads() == before
    assert touched.last_active == clock.now()
    assert touched.expires_at == clock.now() + timedelta(seconds=60)
    assert touched == await fresh(a, session.id, last_messages=5)
    # the held snapshot follows the touch: the next update is based on it and is accepted
    result = await a.update(session.id, bump("n"))
    assert result.revision == touched.revision + 1 and result.last_active == clock.now()


async def test_redis_a_short_touch_reply_keeps_a_lent_snapshot_checked(
    redis_pair: RedisPair,
) -> None:
    a, b, clock, _ = redis_pair
    session = await a.create()
    await a.add_message(session.id, "user", "hi")
    store = a.repository
    lent = await store.get_for_update(session.id)  # what an update's callback is based on
    assert lent is not None
    clock.advance(10)
    await a.get(session.id, last_messages=0)  # this process touches: a short reply
    clock.advance(20)
    await b.get(session.id)  # then another process touches
    stale = attrs.evolve(
        lent.with_state(n=1), revision=lent.revision + 1, last_active=T0 + timedelta(seconds=10)
    )
    with pytest.raises(SessionConflict):  # saving it would move last_active back 20 s
        await store.save(stale, expected_revision=lent.revision, new_messages=())
    assert (await b.get(session.id, touch=False)).last_active == clock.now()
