"""examples/openai_agents_session.py: openai-agents' Session protocol over asyncsession,
on every store in tests/_store_*.py, on asyncio and trio."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import IDLE, OtherTask, load_example

import asyncsession as s
from asyncsession.testing import ManualClock

pytestmark = pytest.mark.anyio


ex = load_example("openai_agents_session.py")


def items() -> list[dict[str, Any]]:
    """One item of each kind Runner stores, as fresh plain dicts."""
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer in Norwegian when asked in Norwegian."},
        {
            "role": "user",
            "content": "Hvordan er været i Tromsø? 🌧️ 日本語, e\u0301, \u05e9\u05dc\u05d5\u05dd",
        },
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "and this picture?"},
                {
                    "type": "input_image",
                    "image_url": "data:image/png;base64,iVBORw0=",
                    "detail": "auto",
                },
            ],
        },
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "Need the weather tool."}],
            "encrypted_content": "gAAAAB…",
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "weather",
            "arguments": '{"city": "Tromsø"}',
            "status": "completed",
        },
        {"type": "function_call_output", "call_id": "call_1", "output": '{"celsius": -3.5}'},
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [
                {"type": "output_text", "text": "Det er \u22123,5 °C i Tromsø.", "annotations": []}
            ],
        },
        {"role": "assistant", "content": ""},
        {
            "type": "computer_call_output",
            "call_id": "call_2",
            "output": {"type": "computer_screenshot", "image_url": "https://example.test/s.png"},
            "acknowledged_safety_checks": [],
        },
        {"type": "item_reference", "id": "msg_0"},
        {
            "role": "user",
            "content": "numbers",
            "extra": {"n": 1, "x": 0.1, "big": 2**53 + 1, "ok": True, "none": None},
            "nested": [[1, [2, []]], {"k": [{}]}],
        },
    ]


ROLES = [
    "system",
    "developer",
    "user",
    "user",
    "assistant",
    "assistant",
    "tool",
    "assistant",
    "assistant",
    "tool",
    "assistant",
    "user",
]


def turn(n: int) -> list[dict[str, Any]]:
    """A question and its answer, told apart by ``n``."""
    return [
        {"role": "user", "content": f"q{n}"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": f"a{n}", "annotations": []}],
        },
    ]


def assert_plain(value: Any) -> None:
    """Plain, mutable JSON: dicts and lists all the way down (no FrozenDict, no tuple)."""
    if isinstance(value, dict):
        assert type(value) is dict, type(value)
        for v in value.values():
            assert_plain(v)
    elif isinstance(value, (list, tuple)):
        assert type(value) is list, type(value)
        for v in value:
            assert_plain(v)


async def new_conversation(sessions: s.SessionManager, owner: str = "user_123") -> Any:
    return ex.AgentsSession(sessions, (await sessions.create(owner=owner)).id)


async def revision(sessions: s.SessionManager, agent: Any) -> tuple[int, int]:
    session = await sessions.get(agent.id, touch=False, last_messages=0)
    return session.revision, session.messages.total


async def test_items_come_back_equal_and_mutable(sessions: s.SessionManager) -> None:
    agent = await new_conversation(sessions)
    await agent.add_items(items())
    got = await agent.get_items()
    assert got == items()
    assert_plain(got)
    got[3]["content"].append({"type": "input_text", "text": "changed"})  # a copy: mutable
    got[0]["content"] = "changed"
    assert await agent.get_items() == items()
    assert agent.session_id == str(agent.id) and isinstance(agent.session_id, str)


async def test_each_item_is_one_message_with_its_role_and_text(sessions: s.SessionManager) -> None:
    agent = await new_conversation(sessions)
    given = items()
    await agent.add_items(given)
    assert given == items()  # the caller's items are left as they were
    stored = (await sessions.get(agent.id, touch=False)).messages
    assert [m.role for m in stored] == ROLES
    texts = [i["content"] if isinstance(i.get("content"), str) else "" for i in items()]
    assert [m.content for m in stored] == texts
    for message, item in zip(stored, items(), strict=True):
        data = s.thaw(message.data)  # lists for the stored tuples
        if message.content:  # the text is kept once, in the message
            assert data == {k: v for k, v in item.items() if k != "content"}
        else:
            assert data == item
    page = await sessions.list(search="TERSE")  # list searches the first message's text
    assert [x.id for x in page.items] == [agent.id]


async def test_messages_written_directly_read_as_role_and_content(
    sessions: s.SessionManager,
) -> None:
    agent = await new_conversation(sessions)
    await sessions.add_message(agent.id, "system", "Be brief.")
    await agent.add_items(turn(1))
    assert await agent.get_items() == [{"role": "system", "content": "Be brief."}, *turn(1)]


async def test_get_items_limit_is_the_latest_n_in_order(sessions: s.SessionManager) -> None:
    agent = await new_conversation(sessions)
    history = [item for n in range(5) for item in turn(n)]
    await agent.add_items(history[:4])
    await agent.add_items(history[4:])
    assert await agent.get_items(limit=3) == history[-3:]
    assert await agent.get_items(3) == history[-3:]
    assert await agent.get_items(limit=1) == history[-1:]
    assert await agent.get_items(limit=len(history)) == history
    assert await agent.get_items(limit=100) == history
    assert await agent.get_items(limit=None) == history
    assert await agent.get_items() == history
    assert await agent.get_items(limit=0) == []
    with pytest.raises(s.InvalidConfiguration):
        await agent.get_items(limit=-1)


async def test_get_items_loads_only_the_tail(
    sessions: s.SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = await new_conversation(sessions)
    await agent.add_items([item for n in range(10) for item in turn(n)])
    loaded: list[tuple[int | None, int]] = []
    get = sessions.get

    async def spy(session_id: Any, **kwargs: Any) -> s.Session:
        session = await get(session_id, **kwargs)
        loaded.append((kwargs.get("last_messages"), len(session.messages)))
        return session

    monkeypatch.setattr(sessions, "get", spy)
    assert await agent.get_items(limit=2) == turn(9)
    assert loaded == [(2, 2)]


async def test_pop_item_removes_and_returns_the_newest(sessions: s.SessionManager) -> None:
    agent = await new_conversation(sessions)
    history = items()
    await agent.add_items(history)
    popped = await agent.pop_item()
    assert popped == history[-1]
    assert_plain(popped)
    assert await agent.get_items() == history[:-1]
    assert await agent.pop_item() == history[-2]
    assert await agent.get_items(limit=2) == history[-4:-2]
    assert (await sessions.get(agent.id, touch=False)).messages.total == len(history) - 2


async def test_pop_item_of_an_empty_history_is_none_and_writes_nothing(
    sessions: s.SessionManager,
) -> None:
    agent = await new_conversation(sessions)
    before = await revision(sessions, agent)
    assert await agent.pop_item() is None
    assert await revision(sessions, agent) == before
    await agent.add_items(turn(1))
    assert [await agent.pop_item(), await agent.pop_item()] == turn(1)[::-1]
    emptied = await revision(sessions, agent)
    assert emptied[1] == 0 and emptied[0] > before[0]
    assert await agent.pop_item() is None
    assert await revision(sessions, agent) == emptied


async def test_pop_item_returns_the_item_of_the_run_that_was_saved(
    sessions: s.SessionManager, other_task: OtherTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An item appended while pop_item's update function runs makes it run again: the
    pop then takes that newer item, and returns it (not the one the first run saw)."""
    agent = await new_conversation(sessions)
    await agent.add_items(turn(1))
    late = {"role": "user", "content": "sent while popping"}
    update = sessions.update
    runs = 0

    async def racing_update(session_id: Any, fn: Callable[[s.Session], s.Session]) -> s.Session:
        async def first_run_races(x: s.Session) -> s.Session:
            nonlocal runs
            runs += 1
            result = fn(x)
            if runs == 1:
                await other_task(lambda: agent.add_items([late]))
            return result

        return await update(session_id, first_run_races)

    monkeypatch.setattr(sessions, "update", racing_update)
    assert await agent.pop_item() == late
    assert runs == 2
    assert await agent.get_items() == turn(1)


async def test_items_outlast_the_manager(
    any_repository: s.SessionRepository, clock: ManualClock
) -> None:
    async with s.SessionManager(
        any_repository, idle_timeout=IDLE, cleanup_interval=None, clock=clock
    ) as sessions:
        agent = await ex.AgentsSession.for_owner(sessions, "user_123")
        await agent.add_items(items())
    async with s.SessionManager(
        any_repository, idle_timeout=IDLE, cleanup_interval=None, clock=clock
    ) as sessions:
        again = await ex.AgentsSession.for_owner(sessions, "user_123")
        assert again.session_id == agent.session_id
        assert await again.pop_item() == items()[-1]
        assert await again.get_items() == items()[:-1]


@pytest.mark.parametrize("kind", ["sqlite", "file"])
async def test_pop_item_after_reopening_the_store(tmp_path: Path, kind: str) -> None:
    def store() -> s.SessionRepository:
        if kind == "sqlite":
            return s.SQLiteRepository(tmp_path / "s.db")
        return s.FileRepository(tmp_path / "files")

    async with s.SessionManager(store(), idle_timeout=IDLE) as sessions:
        agent = await ex.AgentsSession.for_owner(sessions, "user_123")
        await agent.add_items(items())
    async with s.SessionManager(store(), idle_timeout=IDLE) as sessions:
        again = await ex.AgentsSession.for_owner(sessions, "user_123")  # after a restart
        assert again.session_id == agent.session_id
        assert await again.pop_item() == items()[-1]
    async with s.SessionManager(store(), idle_timeout=IDLE) as sessions:
        reread = ex.AgentsSession(sessions, agent.session_id)  # from the str id
        assert await reread.get_items() == items()[:-1]


async def test_clear_session_empties_the_history_but_keeps_the_session(
    sessions: s.SessionManager,
) -> None:
    agent = await new_conversation(sessions, owner="alice")
    await agent.add_items(items())
    await agent.clear_session()
    assert await agent.get_items() == []
    session = await sessions.get(agent.id, touch=False)
    assert (session.owner, session.status, session.messages.total) == (
        "alice",
        s.SessionStatus.ACTIVE,
        0,
    )
    before = await revision(sessions, agent)
    await agent.clear_session()  # nothing to clear: no write
    assert await revision(sessions, agent) == before
    await agent.add_items(turn(2))
    assert await agent.get_items() == turn(2)


async def test_add_items_of_nothing_writes_nothing(sessions: s.SessionManager) -> None:
    agent = await new_conversation(sessions)
    await agent.add_items(turn(1))
    before = await revision(sessions, agent)
    await agent.add_items([])
    assert await revision(sessions, agent) == before
    assert await agent.get_items() == turn(1)


async def test_add_items_is_one_write(sessions: s.SessionManager) -> None:
    agent = await new_conversation(sessions)
    before = await revision(sessions, agent)
    await agent.add_items(items())
    after = await revision(sessions, agent)
    assert after == (before[0] + 1, len(items()))


async def test_concurrent_add_items_keep_both_batches_whole(sessions: s.SessionManager) -> None:
    sid = (await sessions.create()).id
    one, two = ex.AgentsSession(sessions, sid), ex.AgentsSession(sessions, str(sid))
    first = [*turn(1), *turn(2)]
    second = [*turn(3), *turn(4)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(one.add_items, first)
        tg.start_soon(two.add_items, second)
    assert await one.get_items() in ([*first, *second], [*second, *first])


async def test_other_sessions_are_left_alone(sessions: s.SessionManager) -> None:
    mine, theirs = await new_conversation(sessions), await new_conversation(sessions, "bob")
    await theirs.add_items(items())
    await mine.add_items(turn(1))
    assert await mine.pop_item() == turn(1)[-1]
    await mine.add_items(turn(2))
    await mine.clear_session()
    await mine.add_items(turn(3))
    assert await theirs.get_items() == items()
    assert await mine.get_items() == turn(3)


async def test_for_owner_creates_a_session_then_resumes_it(sessions: s.SessionManager) -> None:
    first = await ex.AgentsSession.for_owner(sessions, "user_123")
    created = await sessions.get(first.id, touch=False)
    assert (created.owner, created.messages.total) == ("user_123", 0)
    assert first.session_id == str(created.id)
    again = await ex.AgentsSession.for_owner(sessions, "user_123")
    assert again.session_id == first.session_id
    other = await ex.AgentsSession.for_owner(sessions, "user_456")
    assert other.session_id != first.session_id
    assert (await sessions.stats()).total == 2


async def test_for_owner_resumes_the_newest_active_session(
    sessions: s.SessionManager, clock: ManualClock
) -> None:
    older = await sessions.create(owner="user_123")
    clock.advance(1)
    newer = await sessions.create(owner="user_123")
    clock.advance(1)
    await sessions.create(owner="someone else")  # newest of all, not theirs
    assert (await ex.AgentsSession.for_owner(sessions, "user_123")).id == newer.id
    clock.advance(1)
    await ex.AgentsSession(sessions, older.id).add_items(turn(1))  # now the most recent
    assert (await ex.AgentsSession.for_owner(sessions, "user_123")).id == older.id
    await sessions.close(older.id)  # the newest is closed: the newest active one
    assert (await ex.AgentsSession.for_owner(sessions, "user_123")).id == newer.id


async def test_for_owner_starts_anew_when_none_is_active(
    sessions: s.SessionManager, clock: ManualClock
) -> None:
    closed = await sessions.create(owner="user_123")
    await sessions.close(closed.id)
    clock.advance(1)
    archived = await sessions.create(owner="user_123")
    await sessions.archive(archived.id)
    fresh = await ex.AgentsSession.for_owner(sessions, "user_123")
    assert fresh.id not in (closed.id, archived.id)
    session = await sessions.get(fresh.id, touch=False)
    assert (session.owner, session.status) == ("user_123", s.SessionStatus.ACTIVE)
    assert (await ex.AgentsSession.for_owner(sessions, "user_123")).id == fresh.id


async def test_a_closed_conversation_refuses_items(sessions: s.SessionManager) -> None:
    agent = await new_conversation(sessions)
    await agent.add_items(turn(1))
    await sessions.close(agent.id)
    assert await agent.get_items() == turn(1)  # readable until retention passes
    with pytest.raises(s.SessionClosed):
        await agent.add_items(turn(2))
    with pytest.raises(s.SessionClosed):
        await agent.pop_item()


def test_a_malformed_id_is_refused() -> None:
    with pytest.raises(ValueError):
        ex.AgentsSession(None, "not-a-uuid")
    assert ex.AgentsSession(None, uuid.UUID(int=1)).session_id == str(uuid.UUID(int=1))


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_example_runs(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    await ex.run(store)
    out = capsys.readouterr().out
    assert "agent: It is 14 °C in Oslo." in out
    assert "agent: You said 2 thing(s) so far; the last: 'thanks'." in out
    assert out.count("undone: ") == 2 and "undone: user: oops, wrong chat" in out
    new, resumed = (line.split()[-1] for line in out.splitlines()[:3:2])
    assert new == resumed
    assert "history: 7 items" in out
    roles = "user, assistant, assistant, tool, assistant, user, assistant"
    assert f"stored as 7 messages: {roles}" in out
    assert "after close: new session, 0 items" in out


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_example_command_line(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    ex.main(["--backend", backend, "--store", "memory"])
    assert "history: 7 items" in capsys.readouterr().out
