"""Lifecycle events shared between managers through Redis (share_events=True)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis_support import RedisServer, free_port, redis_binary, require_redis

import asyncsession as s

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
        await one.add_message(created.id, "user", "hi")
        await one.close(created.id)
        with anyio.fail_after(30):
            kinds = [(await events.__anext__()).kind for _ in range(2)]
        assert kinds == [s.EventKind.MESSAGE_ADDED, s.EventKind.CLOSED]
        local = await two.create()
        with anyio.fail_after(30):
            mine = await events.__anext__()
        assert mine.session_id == local.id and not mine.remote  # own events once, local


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
