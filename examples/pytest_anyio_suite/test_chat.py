"""Tests of ChatService using asyncsession's pytest fixtures."""

import anyio
import anyio.lowlevel
import pytest
from chat import ChatService

import asyncsession
from asyncsession.testing import ManualClock

pytestmark = pytest.mark.anyio


async def test_conversation(session_manager: asyncsession.SessionManager) -> None:
    chat = ChatService(session_manager)
    sid = await chat.start("alice")
    assert await chat.say(sid, "hi") == "echo: hi"
    session = await session_manager.get(sid)
    assert [m.content for m in session.messages] == ["hi", "echo: hi"]
    assert session.state["turns"] == 1


async def test_each_test_gets_a_fresh_store(session_manager: asyncsession.SessionManager) -> None:
    assert (await session_manager.list()).items == ()


async def test_idle_session_expires_and_is_collected(
    session_manager: asyncsession.SessionManager, session_clock: ManualClock
) -> None:
    chat = ChatService(session_manager)
    async with session_manager.subscribe() as events:
        sid = await chat.start("bob")
        session_clock.advance(60)  # the idle timeout; the first cleanup pass is due too
        await session_manager.wait_for_cleanup()  # right after advance(): the pass ran
        assert not await session_manager.exists(sid)
        kinds = []
        with anyio.fail_after(1):
            async for event in events:
                kinds.append(event.kind)
                if event.kind is asyncsession.EventKind.EXPIRED:
                    break
    assert kinds == [asyncsession.EventKind.CREATED, asyncsession.EventKind.EXPIRED]
    assert (await session_manager.stats()).expired_total == 1


async def test_activity_keeps_a_session_alive(
    session_manager: asyncsession.SessionManager, session_clock: ManualClock
) -> None:
    chat = ChatService(session_manager)
    sid = await chat.start("carol")
    session_clock.advance(30)
    await session_manager.wait_for_cleanup()
    await chat.say(sid, "still here")
    session_clock.advance(30)
    await session_manager.wait_for_cleanup()
    assert await session_manager.exists(sid)


async def test_concurrent_chats_see_their_own_session(
    session_manager: asyncsession.SessionManager,
) -> None:
    chat = ChatService(session_manager)
    seen = {}

    async def user(name: str) -> None:
        sid = await chat.start(name)
        async with session_manager.bind(sid):
            await anyio.lowlevel.checkpoint()
            seen[name] = (sid, asyncsession.current_session_id())

    async with anyio.create_task_group() as tg:
        for name in ("ann", "ben", "cat"):
            tg.start_soon(user, name)
    assert all(sid == current for sid, current in seen.values())
