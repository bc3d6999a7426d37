"""Tests run by pytest-asyncio (strict mode) using asyncsession's fixtures."""

import asyncio

import pytest

import asyncsession
from asyncsession.testing import ManualClock


@pytest.mark.asyncio
async def test_create_and_message(session_manager: asyncsession.SessionManager) -> None:
    session = await session_manager.create(owner="alice")
    session = await session_manager.add_message(session.id, "user", "hello")
    assert session.messages.total == 1
    assert (await session_manager.get(session.id)).owner == "alice"


@pytest.mark.asyncio
async def test_own_fixture_on_top(
    session_manager: asyncsession.SessionManager, alice_session: asyncsession.Session
) -> None:
    page = await session_manager.list(owner="alice")
    assert [s.id for s in page] == [alice_session.id]


@pytest.mark.asyncio
async def test_idle_session_expires_and_is_collected(
    session_manager: asyncsession.SessionManager, session_clock: ManualClock
) -> None:
    session = await session_manager.create()
    session_clock.advance(60)
    await session_manager.wait_for_cleanup()  # right after advance(): the pass ran
    assert not await session_manager.exists(session.id)
    assert (await session_manager.stats()).expired_total == 1


@pytest.mark.asyncio
async def test_cleanup_runs_on_the_tests_loop(
    session_manager: asyncsession.SessionManager, session_clock: ManualClock
) -> None:
    # Each wait_for_cleanup() returns once the manager's cleanup task (a task of the
    # test's loop, which entered the manager) has made the pass the clock made due.
    for _ in range(3):
        session_clock.advance(30)
        await session_manager.wait_for_cleanup()
    assert (await session_manager.stats()).cleanup_passes == 3


@pytest.mark.asyncio
async def test_concurrent_tasks_see_their_own_session(
    session_manager: asyncsession.SessionManager,
) -> None:
    async def user(name: str) -> bool:
        session = await session_manager.create(owner=name)
        async with session_manager.bind(session.id):
            await asyncio.sleep(0)
            return asyncsession.current_session_id() == session.id

    assert all(await asyncio.gather(*(user(n) for n in ("ann", "ben", "cat"))))


@pytest.mark.asyncio
async def test_own_sqlite_manager(sqlite_sessions: asyncsession.SessionManager) -> None:
    session = await sqlite_sessions.create(state={"step": 1})
    await sqlite_sessions.set_state(session.id, step=2)
    assert (await sqlite_sessions.get(session.id)).state == {"step": 2}
