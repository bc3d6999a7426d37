"""Lifecycle events shared between managers through Redis (share_events=True)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

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


async def test_share_events_needs_a_capable_store() -> None:
    with pytest.raises(s.InvalidConfiguration):
        s.SessionManager(s.MemoryRepository(), share_events=True)


async def test_a_manager_that_cannot_subscribe_fails_to_start_with_storage_error(
    anyio_backend: str,
) -> None:
    import socket

    with socket.socket() as free:  # a loopback port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    store = s.RedisRepository(f"redis://127.0.0.1:{port}/0", timeout=2)
    manager = s.SessionManager(store, share_events=True)
    with anyio.fail_after(20), pytest.raises(s.StorageError, match=str(port)):
        async with manager:
            pass
    assert not manager.running
