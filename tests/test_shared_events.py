"""Lifecycle events shared between managers through Redis (share_events=True)."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from redis_support import RedisServer, free_port, redis_binary, require_redis

import asyncsession as s
from asyncsession.abc import EventTransport, RemoteEvent

pytestmark = pytest.mark.anyio


@pytest.fixture
async def two_managers(
    redis_server: Any, anyio_backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[s.SessionManager, s.SessionManager]]:
    prefix = f"shared-events-{request.node.name}:"
    url = redis_server.url
    async with (
        s.SessionManager(s.RedisRepository(url, prefix=prefix), share_events=True) as one,
        s.SessionManager(s.RedisRepository(url, prefix=prefix), share_events=True) as two,
    ):
        yield one, two


async def test_a_manager_receives_other_managers_events(
    two_managers: tuple[s.SessionManager, s.SessionManager],
) -> None:
    one, two = two_managers
    async with two.subscribe() as events:
        created = await one.create(owner="alice")
        with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
            remote = await events.__anext__()
        assert remote.kind is s.EventKind.CREATED and remote.session_id == created.id
        assert remote.remote and remote.session is None and remote.origin
        # the revision comes along, so a subscriber can order one session's events from
        # several managers (it was dropped on arrival; helper-195)
        assert remote.revision == 0
        await one.add_message(created.id, "user", "hi")
        await one.close(created.id)
        with anyio.fail_after(30):
            later = [await events.__anext__() for _ in range(2)]
        assert [e.kind for e in later] == [s.EventKind.MESSAGE_ADDED, s.EventKind.CLOSED]
        assert [e.revision for e in later] == [1, 2]
        local = await two.create()
        with anyio.fail_after(30):
            mine = await events.__anext__()
        assert mine.session_id == local.id and not mine.remote  # own events once, local
        assert mine.revision == 0 == mine.session.revision  # type: ignore[union-attr]
        await two.delete(local.id)
        with anyio.fail_after(30):
            deleted = await events.__anext__()
        assert deleted.kind is s.EventKind.DELETED and deleted.revision is None


async def test_a_subscription_for_one_session_hears_other_managers_events_of_it(
    two_managers: tuple[s.SessionManager, s.SessionManager],
) -> None:
    one, two = two_managers
    async with two.subscribe() as every:
        watched = await one.create()
        other = await one.create()
        with anyio.fail_after(30):  # both CREATED events have come (they are not for it)
            assert [(await every.__anext__()).session_id for _ in range(2)] == [
                watched.id,
                other.id,
            ]
    async with two.subscribe(session_id=watched.id) as events:
        await one.add_message(other.id, "user", "not for this subscriber")
        await one.add_message(watched.id, "user", "for it")
        with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
            remote = await events.__anext__()
        assert remote.remote and remote.session_id == watched.id
        assert remote.kind is s.EventKind.MESSAGE_ADDED and remote.revision == 1
        await one.close(watched.id)
        with anyio.fail_after(30):
            closed = await events.__anext__()
        assert closed.kind is s.EventKind.CLOSED and closed.session_id == watched.id


async def test_a_subscription_for_some_kinds_filters_other_managers_events_too(
    two_managers: tuple[s.SessionManager, s.SessionManager],
) -> None:
    one, two = two_managers
    async with two.subscribe(kinds=("closed", "deleted")) as ends:
        session = await one.create()
        await one.add_message(session.id, "user", "not an end")
        await one.close(session.id)
        await one.delete(session.id)
        with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
            got = [await ends.__anext__() for _ in range(2)]
        assert all(e.remote and e.session_id == session.id for e in got)
        assert [e.kind for e in got] == [s.EventKind.CLOSED, s.EventKind.DELETED]


async def test_a_short_lived_manager_shares_its_last_events_before_it_leaves(
    redis_server: Any, anyio_backend: str, request: pytest.FixtureRequest
) -> None:
    prefix = f"shared-events-{request.node.name}:"
    listener = s.RedisRepository(redis_server.url, prefix=prefix)
    async with s.SessionManager(listener, share_events=True) as app, app.subscribe() as events:
        # a script: it writes and leaves at once, its events still queued
        script = s.RedisRepository(redis_server.url, prefix=prefix)
        async with s.SessionManager(script, share_events=True) as sessions:
            created = await sessions.create()
            await sessions.add_message(created.id, "user", "hi")
            await sessions.delete(created.id)
        heard = []
        with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
            while len(heard) < 3:
                event = await events.__anext__()
                heard.append((event.kind, event.session_id, event.remote))
    assert heard == [
        (s.EventKind.CREATED, created.id, True),
        (s.EventKind.MESSAGE_ADDED, created.id, True),
        (s.EventKind.DELETED, created.id, True),
    ]


async def test_share_events_needs_a_capable_store() -> None:
    with pytest.raises(s.InvalidConfiguration):
        s.SessionManager(s.MemoryRepository(), share_events=True)


async def test_a_manager_starts_before_its_redis_and_hears_events_once_it_is_up(
    anyio_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_redis()
    binary = redis_binary()
    assert binary is not None
    server = RedisServer(binary, tmp_path, free_port(), appendonly=False)  # not started yet
    caplog.set_level(logging.INFO, logger="asyncsession")
    try:
        store = s.RedisRepository(server.url, prefix="early:", timeout=2)
        with anyio.fail_after(20):  # entering waits for one subscription attempt only
            async with s.SessionManager(store, share_events=True) as early:
                assert early.running
                with pytest.raises(s.StorageError, match=str(server.port)):
                    await early.create()  # the store itself fails until the server is up
                [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
                assert "event subscription failed; subscribing again" in warning.getMessage()
                assert str(server.port) in warning.getMessage()
                await anyio.to_thread.run_sync(server.start)
                async with early.subscribe() as events:
                    other = s.RedisRepository(server.url, prefix="early:")
                    async with s.SessionManager(other, share_events=True) as late:
                        created = set()
                        with anyio.fail_after(30):  # resubscribing, then pub/sub delivery
                            while True:  # events published before it resubscribed are lost
                                created.add((await late.create()).id)
                                with anyio.move_on_after(1.5):
                                    event = await events.__anext__()
                                    assert event.session_id in created and event.remote
                                    break
                assert any(
                    r.getMessage() == "the event subscription works again" for r in caplog.records
                )
    finally:
        server.stop()


async def test_a_lost_subscription_is_logged_and_made_again_once_the_server_is_back(
    anyio_backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """coredis made a lost subscription again with backoff of up to 16 s, so it heard
    nothing for up to 16 s after the server came back, and on asyncio nothing said that
    events were being missed (helper-223)."""
    require_redis()
    binary = redis_binary()
    assert binary is not None
    server = RedisServer(binary, tmp_path, free_port(), appendonly=False)
    server.start()
    caplog.set_level(logging.INFO, logger="asyncsession")

    try:
        store = s.RedisRepository(server.url, prefix="lost:", timeout=2)
        other = s.RedisRepository(server.url, prefix="lost:", timeout=2)
        async with (
            s.SessionManager(store, share_events=True) as listener,
            s.SessionManager(other, share_events=True) as writer,
            listener.subscribe(kinds="created") as events,
        ):
            with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
                await hear_one_created(writer.create, events)
            await anyio.to_thread.run_sync(server.stop)
            with anyio.fail_after(30):
                while not logged(caplog, logging.WARNING, "lost its connection"):  # noqa: ASYNC110 (a log record, no event)
                    await anyio.sleep(0.05)
            warnings = logged(caplog, logging.WARNING, f"{store.events_channel!r} at Redis")
            assert warnings and all(
                "published until it is made again are lost" in w for w in warnings
            )
            await anyio.to_thread.run_sync(server.start)
            with anyio.fail_after(30):  # guard only (the wait between attempts is <= 1 s)
                await hear_one_created(writer.create, events)
        back = logged(caplog, logging.INFO, f"{store.events_channel!r} at Redis")
        assert back and all(line.endswith("works again") for line in back)
    finally:
        server.stop()


# -- sharing bursts ----------------------------------------------------------------------


@pytest.mark.parametrize("window", [60.0, 0.0])
async def test_a_subscription_dropped_again_and_again_is_warned_about_once_a_minute(
    anyio_backend: str,
    lone_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    window: float,
) -> None:
    """Each lost connection of a store's subscription is warned about, at most once a
    minute (``window``) per store; the others at debug level (a server that drops it
    every second gave a warning a second)."""
    monkeypatch.setattr("asyncsession.stores.redis._RESUBSCRIBE_WARNING_EVERY", window)
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    async with listening(lone_redis.url, "flap:") as (store, events, announce):
        with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
            await hear_one_created(announce, events)
            for _ in range(3):
                await anyio.to_thread.run_sync(
                    lone_redis.command, "CLIENT", "KILL", "TYPE", "pubsub"
                )
                await hear_one_created(announce, events)  # subscribed again
    store_lines = [  # (on trio the manager's own "subscribing again" names the channel too)
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "asyncsession.stores.redis" and store.events_channel in r.getMessage()
    ]
    warned = [m for level, m in store_lines if level == logging.WARNING]
    quiet = [m for level, m in store_lines if level == logging.DEBUG and "lost its" in m]
    back = [m for level, m in store_lines if level == logging.INFO]
    assert all("lost its connection" in line for line in warned)
    assert all(line.endswith("works again") for line in back)
    # On trio a loss may also end the manager's subscription (it makes a new one): then
    # one warning of its own a minute (whether a loss ends it depends on timing).
    manager = [r for r in caplog.records if r.name == "asyncsession._manager"]
    assert len([r for r in manager if r.levelno == logging.WARNING]) <= 1
    if window:
        assert len(warned) == 1 and len(quiet) >= 2 and len(back) == 1
    else:
        assert len(warned) >= 3 and not quiet and len(back) >= 3


async def test_a_lost_subscription_not_warned_about_is_once_it_lasts_past_the_minute(
    anyio_backend: str,
    lone_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A subscription lost within a minute of the last warning was never warned about,
    however long the server stayed away (its log's last word was "works again")."""
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    async with listening(lone_redis.url, "long:") as (_, events, announce):
        with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
            await hear_one_created(announce, events)
            await anyio.to_thread.run_sync(lone_redis.command, "CLIENT", "KILL", "TYPE", "pubsub")
            await hear_one_created(announce, events)  # warned about, works again
            caplog.clear()
            await anyio.to_thread.run_sync(lone_redis.stop)  # lost: within the minute
            while not [r for r in caplog.records if "lost" in r.getMessage()]:  # noqa: ASYNC110 (a log record, no event)
                await anyio.sleep(0.05)
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            monkeypatch.setattr("asyncsession.stores.redis._RESUBSCRIBE_WARNING_EVERY", 0.0)
            monkeypatch.setattr("asyncsession._manager._OUTAGE_WARNING_EVERY", 0.0)
            while not [r for r in caplog.records if r.levelno == logging.WARNING]:  # noqa: ASYNC110 (a log record, no event)
                await anyio.sleep(0.05)
            await anyio.to_thread.run_sync(lone_redis.start)
            await hear_one_created(announce, events)
    lines = [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "asyncsession.stores.redis" and r.levelno >= logging.INFO
    ]
    [warning] = [m for level, m in lines if level == logging.WARNING]
    assert "is still lost" in warning and "published until it is made again are lost" in warning
    assert lines[-1][1].endswith("works again")


@asynccontextmanager
async def listening(
    url: str, prefix: str
) -> AsyncIterator[tuple[s.RedisRepository, s.Subscription, Callable[[], Awaitable[None]]]]:
    """A sharing manager's store and its subscription to CREATED events, and an
    ``announce()`` that publishes one through another store (not subscribed itself)."""
    store = s.RedisRepository(url, prefix=prefix, timeout=2)
    async with (
        s.RedisRepository(url, prefix=prefix, timeout=2) as other,
        s.SessionManager(store, share_events=True) as listener,
        listener.subscribe(kinds="created") as events,
    ):

        async def announce() -> None:
            now = datetime.now(timezone.utc)
            await other.publish_event("created", uuid.uuid4(), at=now, origin="writer")

        yield store, events, announce


async def hear_one_created(create: Callable[[], Awaitable[object]], events: s.Subscription) -> None:
    """Create sessions (``writer.create``, say) until ``events`` hears one as a remote
    event (events published while it is not subscribed are lost)."""
    while True:
        with contextlib.suppress(s.StorageError):
            await create()
        with anyio.move_on_after(0.5):
            if (await events.__anext__()).remote:
                return


def logged(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def burst(manager: s.SessionManager, tasks: int, appends: int) -> None:
    """``tasks`` sessions created, then ``appends`` messages added to each by a task of
    its own, all at once."""
    ids = [(await manager.create()).id for _ in range(tasks)]

    async def write(sid: Any) -> None:
        for i in range(appends):
            await manager.add_message(sid, "user", f"m{i}")

    async with anyio.create_task_group() as tg:
        for sid in ids:
            tg.start_soon(write, sid)


async def test_a_burst_from_many_tasks_reaches_the_other_manager_complete(
    two_managers: tuple[s.SessionManager, s.SessionManager], caplog: pytest.LogCaptureFixture
) -> None:
    """The manager shared one event per round trip (~1,750/s on localhost) while 50
    tasks wrote concurrently: of 5,000 appends the other manager heard 1,099 and 3,901
    WARNING lines said so (soak review). It now shares what is queued in batches, so the
    default event_buffer (1000) holds such a burst."""
    one, two = two_managers
    tasks, appends = 50, 100
    async with two.subscribe(buffer=100_000) as events:
        await burst(one, tasks, appends)
        heard: dict[Any, int] = {}
        with anyio.fail_after(60):  # guard only: pub/sub delivery is asynchronous
            while sum(heard.values()) < tasks * (appends + 1):
                event = await events.__anext__()
                heard[event.kind] = heard.get(event.kind, 0) + 1
    assert heard == {s.EventKind.CREATED: tasks, s.EventKind.MESSAGE_ADDED: tasks * appends}
    assert (await one.stats()).events_unshared == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_events_that_do_not_fit_the_outbox_are_counted_and_warned_once_per_episode(
    redis_server: Any,
    anyio_backend: str,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a one-event outbox a burst from 20 tasks overflows it: every event is either
    heard by the other manager or counted in stats().events_unshared, and each overflow
    episode gives one WARNING and, once the outbox drained, one INFO (each dropped event
    was logged as a WARNING of its own before)."""
    caplog.set_level(logging.INFO, logger="asyncsession")
    prefix = f"shared-events-{request.node.name}:"
    url = redis_server.url
    async with (
        s.SessionManager(
            s.RedisRepository(url, prefix=prefix), share_events=True, event_buffer=1
        ) as one,
        s.SessionManager(s.RedisRepository(url, prefix=prefix), share_events=True) as two,
        two.subscribe(buffer=100_000) as events,
    ):
        tasks, appends = 20, 50
        await burst(one, tasks, appends)
        total, heard = tasks * (1 + appends), 0
        with anyio.fail_after(30):  # guard only: pub/sub delivery is asynchronous
            while heard + (await one.stats()).events_unshared < total:
                with anyio.move_on_after(0.5):
                    await events.__anext__()
                    heard += 1
        unshared = (await one.stats()).events_unshared
    assert heard + unshared == total and unshared > 0
    warnings = logged(caplog, logging.WARNING, "event sharing")
    caught_up = logged(caplog, logging.INFO, "event sharing caught up")
    assert len(warnings) == len(caught_up) <= unshared
    assert all("stats().events_unshared" in w for w in warnings)
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "event sharing" not in r.getMessage()
    ]


class GatedTransport(s.MemoryRepository, EventTransport):
    """A user's own transport (over a memory store): it records the batches and events
    it publishes, and publishing waits while it is held (a slow link)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.published: list[tuple[str, uuid.UUID]] = []
        self._gate = anyio.Event()
        self._gate.set()
        self._progress = anyio.Event()  # set at each publish call

    def hold(self) -> None:
        self._gate = anyio.Event()

    def release(self) -> None:
        self._gate.set()

    async def publish_events(self, events: Sequence[RemoteEvent]) -> int:
        self.batches.append(len(events))
        self._progress.set()
        return await super().publish_events(events)

    async def publish_event(
        self,
        kind: str,
        session_id: uuid.UUID,
        *,
        at: datetime,
        revision: int | None = None,
        origin: str = "",
    ) -> int:
        await self._gate.wait()
        self.published.append((kind, session_id))
        self._progress.set()
        return 0

    @asynccontextmanager
    async def _events(self) -> AsyncIterator[AsyncIterator[RemoteEvent]]:
        async def nothing() -> AsyncIterator[RemoteEvent]:
            await anyio.sleep_forever()
            yield  # type: ignore[misc]  # unreachable: makes this an async generator

        yield nothing()

    def subscribe_events(self) -> AbstractAsyncContextManager[AsyncIterator[RemoteEvent]]:
        return self._events()

    async def wait_until(self, done: Callable[[], bool]) -> None:
        with anyio.fail_after(10):  # guard only
            while not done():
                self._progress = anyio.Event()
                await self._progress.wait()

    async def wait_published(self, count: int) -> None:
        await self.wait_until(lambda: len(self.published) >= count)


async def test_the_manager_hands_its_transport_what_is_queued_in_batches(
    anyio_backend: str,
) -> None:
    """Events queued while a publish is under way go out together in the next one (at
    most 500 at a time), in the order they happened."""
    store = GatedTransport()
    async with s.SessionManager(store, share_events=True, cleanup_interval=None) as m:
        store.hold()
        session = await m.create()
        await anyio.wait_all_tasks_blocked()  # its publish waits at the gate
        for i in range(600):
            await m.add_message(session.id, "user", f"m{i}")
        store.release()
        await store.wait_published(601)
        assert store.batches == [1, 500, 100]
        assert store.published == [("created", session.id)] + [("message_added", session.id)] * 600
        assert (await m.stats()).events_unshared == 0


async def test_an_overflowing_outbox_warns_once_per_episode_with_an_exact_count(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="asyncsession")
    store = GatedTransport()
    async with s.SessionManager(
        store, share_events=True, cleanup_interval=None, event_buffer=2
    ) as m:
        session = await m.create()
        await store.wait_published(1)
        for episode in (1, 2):
            store.hold()
            await m.add_message(session.id, "user", "taken")
            await anyio.wait_all_tasks_blocked()  # its publish waits at the gate
            for _ in range(10):  # 2 fit in the outbox, 8 do not
                await m.add_message(session.id, "user", "queued")
            assert (await m.stats()).events_unshared == 8 * episode
            warnings = logged(caplog, logging.WARNING, "event sharing")
            assert len(warnings) == episode
            assert f"{8 * episode - 7} not shared so far" in warnings[-1]
            assert "stats().events_unshared" in warnings[-1]
            store.release()
            await store.wait_published(1 + 3 * episode)
            caught_up = logged(caplog, logging.INFO, "event sharing caught up")
            assert len(caught_up) == episode and "8 events" in caught_up[-1]
    assert not [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and "event sharing" not in r.getMessage()
    ]


async def test_an_outbox_emptied_into_a_batch_still_overflowing_is_one_episode(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The outbox empties each time the publisher takes its events into a batch; with
    event_buffer <= 500 that ended the overflow episode ("caught up") before the batch
    went out, so under constant overload every round trip logged a WARNING and an INFO
    (second read: 48 of each in a second). The episode ends only once a batch went out
    and nothing was queued meanwhile."""
    caplog.set_level(logging.INFO, logger="asyncsession")
    store = GatedTransport()
    async with s.SessionManager(
        store, share_events=True, cleanup_interval=None, event_buffer=2
    ) as m:
        session = await m.create()
        await store.wait_published(1)
        store.hold()
        await m.add_message(session.id, "user", "taken")
        await anyio.wait_all_tasks_blocked()  # its publish waits at the gate
        for _ in range(10):  # 2 fit in the outbox, 8 do not
            await m.add_message(session.id, "user", "queued")
        store.release()  # "taken" goes out; the next batch takes the 2 queued ...
        store.hold()  # ... and waits at the gate again
        await store.wait_published(2)
        await anyio.wait_all_tasks_blocked()
        for _ in range(10):  # still overloaded: 2 fit, 8 do not
            await m.add_message(session.id, "user", "queued")
        assert (await m.stats()).events_unshared == 16
        assert len(logged(caplog, logging.WARNING, "event sharing")) == 1
        assert logged(caplog, logging.INFO, "event sharing caught up") == []
        store.release()
        await store.wait_published(6)
        await anyio.wait_all_tasks_blocked()
        [caught_up] = logged(caplog, logging.INFO, "event sharing caught up")
        assert "16 events" in caught_up


class FailingTransport(GatedTransport):
    """A transport whose server is down: every publish fails as a store's would."""

    async def publish_event(
        self,
        kind: str,
        session_id: uuid.UUID,
        *,
        at: datetime,
        revision: int | None = None,
        origin: str = "",
    ) -> int:
        raise s.StorageError("the server is down (test)", recoverable=True)


async def test_events_of_a_failed_publish_are_counted_unshared(
    anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingTransport()
    async with s.SessionManager(store, share_events=True, cleanup_interval=None) as m:
        session = await m.create()
        for _ in range(9):
            await m.add_message(session.id, "user", "hi")
        await store.wait_until(lambda: sum(store.batches) >= 10)
        assert (await m.stats()).events_unshared == 10
    assert len(logged(caplog, logging.WARNING, "could not share")) == 1  # once per outage


async def test_the_default_publish_events_publishes_each_event_in_turn() -> None:
    """A transport written for an earlier release has only publish_event():
    publish_events() calls it for each event, in order, and adds up who heard them."""

    class OneAtATime(EventTransport):
        def __init__(self) -> None:
            self.calls: list[tuple[str, uuid.UUID, datetime, int | None, str]] = []

        async def publish_event(
            self,
            kind: str,
            session_id: uuid.UUID,
            *,
            at: datetime,
            revision: int | None = None,
            origin: str = "",
        ) -> int:
            self.calls.append((kind, session_id, at, revision, origin))
            return 2

        def subscribe_events(self) -> AbstractAsyncContextManager[AsyncIterator[RemoteEvent]]:
            raise AssertionError("not used")

    @attrs.frozen
    class Event:
        kind: str
        session_id: uuid.UUID
        at: datetime
        revision: int | None
        origin: str

    at = datetime(2026, 1, 1, tzinfo=timezone.utc)
    events = [
        Event("created", uuid.uuid4(), at, 1, "me"),
        Event("deleted", uuid.uuid4(), at, None, ""),
    ]
    transport = OneAtATime()
    assert await transport.publish_events(events) == 4
    assert await transport.publish_events([]) == 0
    assert transport.calls == [(e.kind, e.session_id, e.at, e.revision, e.origin) for e in events]


async def test_events_left_at_exit_are_counted_unshared(
    anyio_backend: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manager leaving while its transport hangs counts the events it could not share:
    those still queued and the batch under way (the warning at exit left that batch
    out)."""
    monkeypatch.setattr("asyncsession._manager._SHARE_AT_EXIT_SECONDS", 0.2)
    store = GatedTransport()
    manager = s.SessionManager(store, share_events=True, cleanup_interval=None)
    async with manager:
        store.hold()
        session = await manager.create()
        await anyio.wait_all_tasks_blocked()  # its publish waits at the gate
        await manager.add_message(session.id, "user", "a")
        await manager.add_message(session.id, "user", "b")
    assert logged(caplog, logging.WARNING, "3 events were not shared at exit")
    store.release()
    async with manager:  # the count stays with the manager
        assert (await manager.stats()).events_unshared == 3
    assert store.published == []
