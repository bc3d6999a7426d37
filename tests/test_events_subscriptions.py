"""Subscriptions used without ``async with`` do not stay registered (review finding 4 of
helper-27)."""

from __future__ import annotations

import gc
import logging
import warnings
from typing import Any

import anyio
import anyio.abc
import pytest

import asyncsession as s

pytestmark = pytest.mark.anyio


async def test_a_subscription_nobody_holds_stops_receiving(anyio_backend: str) -> None:
    async with s.SessionManager(s.MemoryRepository()) as manager:
        kinds: list[s.EventKind] = []

        async def handler(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            events = manager.subscribe()  # no async with: returns after one event
            task_status.started()
            async for event in events:
                kinds.append(event.kind)
                return

        async def stuck(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            task_status.started()
            async for _ in manager.subscribe():  # cancelled while it waits
                pass

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(10):
                async with anyio.create_task_group() as tg:
                    await tg.start(handler)
                    await manager.create()
            async with anyio.create_task_group() as tg:
                await tg.start(stuck)
                assert (await manager.stats()).subscribers == 1
                tg.cancel_scope.cancel()
            gc.collect()
        assert kinds == [s.EventKind.CREATED] * 10
        assert (await manager.stats()).subscribers == 0
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)]

        # one that is still referred to keeps receiving, with or without async with
        kept = manager.subscribe()
        async with manager.subscribe() as scoped:
            session = await manager.create()
            assert kept.receive_nowait().session_id == session.id
            assert scoped.receive_nowait().session_id == session.id
            assert (await manager.stats()).subscribers == 2
        assert (await manager.stats()).subscribers == 1
        await kept.aclose()
        assert (await manager.stats()).subscribers == 0
        # helper-184: a closed one raised anyio.ClosedResourceError, not as documented
        for ended in (kept, scoped):
            with pytest.raises(anyio.EndOfStream):
                ended.receive_nowait()


async def test_a_refused_buffer_leaves_nothing_behind(anyio_backend: str) -> None:
    async with s.SessionManager(s.MemoryRepository()) as manager:
        bad: Any = 0
        with pytest.raises(s.InvalidConfiguration):
            manager.subscribe(buffer=bad)
        gc.collect()
        assert (await manager.stats()).subscribers == 0


async def test_a_consumer_task_nobody_holds_keeps_its_subscription(anyio_backend: str) -> None:
    """asyncio keeps no task alive by itself: a consumer started with create_task and no
    handle kept lives only through what it waits on (helper-35)."""
    got: list[s.EventKind] = []
    done = anyio.Event()

    async def consume(manager: s.SessionManager) -> None:
        async for event in manager.subscribe():  # the only reference: the waiting task
            got.append(event.kind)
            if len(got) == 5:
                done.set()
                return

    async with s.SessionManager(s.MemoryRepository()) as manager:
        if anyio_backend == "asyncio":
            import asyncio

            asyncio.get_running_loop().create_task(consume(manager))
        else:
            import trio

            trio.lowlevel.spawn_system_task(consume, manager)
        for _ in range(5):
            await anyio.wait_all_tasks_blocked()
            gc.collect()  # would collect the task with its subscription if held weakly
            await manager.create()
        with anyio.fail_after(10):
            await done.wait()
        await anyio.wait_all_tasks_blocked()
        assert got == [s.EventKind.CREATED] * 5
        assert (await manager.stats()).subscribers == 0  # it left with its task


async def test_tasks_sharing_a_subscription_keep_it_while_any_waits(anyio_backend: str) -> None:
    """Two consumer tasks nobody holds iterate one subscription; the first leaves after
    one event: the other still gets the rest (helper-38)."""
    got = {"once": 0, "rest": 0}
    done = anyio.Event()

    async def once(events: s.Subscription) -> None:
        async for _ in events:
            got["once"] += 1
            return

    async def rest(events: s.Subscription) -> None:
        async for _ in events:
            got["rest"] += 1
            if sum(got.values()) == 6:
                done.set()
                return

    async with s.SessionManager(s.MemoryRepository()) as manager:
        events = manager.subscribe()
        for consumer in (once, rest):
            if anyio_backend == "asyncio":
                import asyncio

                asyncio.get_running_loop().create_task(consumer(events))
            else:
                import trio

                trio.lowlevel.spawn_system_task(consumer, events)
        del events
        for _ in range(6):
            await anyio.wait_all_tasks_blocked()
            gc.collect()
            await manager.create()
        with anyio.fail_after(10):
            await done.wait()
    assert got == {"once": 1, "rest": 5}


async def test_a_slow_subscriber_is_warned_about_once_per_episode(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Drops for a subscriber whose buffer is full give one WARNING (with the count and
    where it is kept), an INFO once it has taken every buffered event, and one WARNING
    again if it falls behind again; subscription.dropped counts them all."""
    caplog.set_level(logging.INFO, logger="asyncsession")
    async with s.SessionManager(s.MemoryRepository()) as manager:
        session = await manager.create()
        async with manager.subscribe(buffer=2) as slow:
            for episode in (1, 2):
                for i in range(10):  # 2 fit, 8 do not
                    await manager.add_message(session.id, "user", f"m{i}")
                assert slow.dropped == 8 * episode
                warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
                assert len(warnings) == episode
                assert "subscription.dropped" in warnings[-1]
                assert f"{8 * episode - 7} dropped so far" in warnings[-1]
                slow.receive_nowait()
                still = [r for r in caplog.records if "caught up" in r.getMessage()]
                assert len(still) == episode - 1  # one event is still buffered
                await slow.__anext__()  # the last buffered one
                caught_up = [
                    r.getMessage() for r in caplog.records if "caught up" in r.getMessage()
                ]
                assert len(caught_up) == episode and "8 events" in caught_up[-1]


async def test_a_subscription_shows_its_buffer_and_drops(anyio_backend: str) -> None:
    """A subscription's repr says whether it receives, how much of its buffer is used
    and how many events were dropped for it (no ids, no session data)."""
    async with s.SessionManager(s.MemoryRepository()) as sessions:
        async with sessions.subscribe(buffer=2) as events:
            assert repr(events) == "<Subscription receiving: 0 of 2 buffered, 0 dropped>"
            created = [await sessions.create(owner="alice@example.com") for _ in range(3)]
            assert repr(events) == "<Subscription receiving: 2 of 2 buffered, 1 dropped>"
            assert "alice" not in repr(events) and str(created[0].id) not in repr(events)
        assert repr(events) == "<Subscription closed (buffer 2), 1 dropped>"


async def test_a_subscription_for_one_session_receives_its_events_only(
    anyio_backend: str,
) -> None:
    async with s.SessionManager(s.MemoryRepository()) as manager:
        a = await manager.create()
        b = await manager.create()
        async with (
            manager.subscribe(session_id=a.id, buffer=2) as only_a,
            manager.subscribe(session_id=str(b.id)) as only_b,
            manager.subscribe() as every,
        ):
            assert only_a.session_id == a.id and only_b.session_id == b.id
            assert every.session_id is None
            with pytest.raises(AttributeError):  # the hub files it under this id
                only_a.session_id = b.id  # type: ignore[misc]
            for n in range(10):  # a busy other session fills no one else's buffer
                await manager.add_message(b.id, "user", f"b{n}")
            await manager.add_message(a.id, "user", "a0")
            await manager.close(a.id)
            got_a = [only_a.receive_nowait() for _ in range(2)]
            with pytest.raises(anyio.WouldBlock):
                only_a.receive_nowait()
            assert [(e.kind, e.session_id) for e in got_a] == [
                (s.EventKind.MESSAGE_ADDED, a.id),
                (s.EventKind.CLOSED, a.id),
            ]
            assert only_a.dropped == 0
            assert [e.seq for e in got_a] == [11, 12]  # seq skips the other session's
            got_b = [only_b.receive_nowait() for _ in range(10)]
            assert {e.session_id for e in got_b} == {b.id}
            assert [e.seq for e in got_b] == list(range(1, 11))
            with pytest.raises(anyio.WouldBlock):
                only_b.receive_nowait()
            assert [every.receive_nowait().seq for _ in range(12)] == list(range(1, 13))
            assert (await manager.stats()).subscribers == 3
        assert (await manager.stats()).subscribers == 0


async def test_a_subscription_for_one_session_counts_its_own_drops(anyio_backend: str) -> None:
    async with s.SessionManager(s.MemoryRepository()) as manager:
        a = await manager.create()
        async with manager.subscribe(session_id=a.id, buffer=1) as only_a:
            for n in range(3):
                await manager.add_message(a.id, "user", f"a{n}")
            assert only_a.receive_nowait().session.messages[-1].content == "a0"  # type: ignore[union-attr]
            assert only_a.dropped == 2


async def test_a_subscription_for_some_kinds_receives_those_only(anyio_backend: str) -> None:
    async with s.SessionManager(s.MemoryRepository()) as manager:
        a = await manager.create()
        ends = {s.EventKind.CLOSED, s.EventKind.EXPIRED, s.EventKind.DELETED}
        async with (
            manager.subscribe(kinds={"closed", s.EventKind.EXPIRED, "deleted"}, buffer=2) as end,
            manager.subscribe(kinds="message_added", session_id=a.id) as a_messages,
            manager.subscribe(kinds=[]) as nothing,
            manager.subscribe() as every,
        ):
            assert end.kinds == ends and a_messages.kinds == {s.EventKind.MESSAGE_ADDED}
            assert every.kinds is None and nothing.kinds == frozenset()
            b = await manager.create()
            for n in range(10):  # other kinds take no room in a buffer of two
                await manager.add_message(a.id, "user", f"a{n}")
                await manager.add_message(b.id, "user", f"b{n}")
            await manager.close(a.id)
            await manager.delete(b.id)
            got = [end.receive_nowait() for _ in range(2)]
            assert [(e.kind, e.session_id) for e in got] == [
                (s.EventKind.CLOSED, a.id),
                (s.EventKind.DELETED, b.id),
            ]
            assert end.dropped == 0 and [e.seq for e in got] == [22, 23]
            contents = [a_messages.receive_nowait().session.messages[-1].content for _ in range(10)]  # type: ignore[union-attr]
            assert contents == [f"a{n}" for n in range(10)]
            for subscription in (end, a_messages, nothing):
                with pytest.raises(anyio.WouldBlock):
                    subscription.receive_nowait()
            assert [every.receive_nowait().seq for _ in range(23)] == list(range(1, 24))


async def test_unknown_kinds_are_refused_and_register_nothing(anyio_backend: str) -> None:
    async with s.SessionManager(s.MemoryRepository()) as manager:
        with pytest.raises(s.InvalidConfiguration, match=r"'Closed' \(it differs from 'closed'"):
            manager.subscribe(kinds=["created", "Closed"])
        with pytest.raises(s.InvalidConfiguration, match="Unknown event kind 'gone': use one of"):
            manager.subscribe(kinds="gone")
        # bytes were read as numbers, a mapping's values were ignored (helper-220)
        for bad in (3, b"closed", {"closed": True, "expired": False}):
            with pytest.raises(s.InvalidConfiguration, match="or a list or set of them"):
                manager.subscribe(kinds=bad)
        with pytest.raises(s.InvalidConfiguration, match="Unknown event kind"):
            manager.subscribe(kinds=[{}])  # unhashable
        assert (await manager.stats()).subscribers == 0


async def test_subscribing_to_a_malformed_id_or_a_session_registers_nothing(
    anyio_backend: str,
) -> None:
    async with s.SessionManager(s.MemoryRepository()) as manager:
        session = await manager.create()
        with pytest.raises(s.SessionNotFound):
            manager.subscribe(session_id="not-an-id")
        bad: Any = session
        with pytest.raises(s.InvalidSessionId, match=r"session\.id"):
            manager.subscribe(session_id=bad)
        assert (await manager.stats()).subscribers == 0


async def test_one_session_subscriptions_dropped_unclosed_leave_the_index(
    anyio_backend: str,
) -> None:
    """Subscriptions for one session each, dropped without closing (a handler that
    returned), do not keep their sessions' index entries: it follows the live ones."""
    async with s.SessionManager(s.MemoryRepository()) as manager:
        ids = [(await manager.create()).id for _ in range(300)]
        for sid in ids:
            manager.subscribe(session_id=sid)  # dropped at once
        gc.collect()
        async with manager.subscribe(session_id=ids[0]) as kept:
            hub = manager._events
            assert len(hub._by_session) < 150
            assert (await manager.stats()).subscribers == 1
            await manager.add_message(ids[0], "user", "hi")
            await manager.add_message(ids[1], "user", "hi")  # its empty entry goes
            assert kept.receive_nowait().session_id == ids[0]
            assert ids[1] not in hub._by_session
