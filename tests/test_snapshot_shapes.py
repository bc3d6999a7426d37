"""What a listing's items and an append's result hold, on every store alike.

The durable stores list sessions without their messages (an empty window with an exact
``total``) and answer an append with a window of the appended messages. The memory
store, the pytest plugin's default, returned whole histories for both, so code tested
on it read ``item.messages[0]`` or ``add_message(...).messages[0]`` and broke on SQLite,
files and Redis (review of the user-asyncio app: listmsgs.py, windows.py).
"""

from __future__ import annotations

import attrs
import pytest

from asyncsession import (
    MemoryRepository,
    MessageLog,
    SessionManager,
    SessionQuery,
    SessionRepository,
    StorageError,
)
from asyncsession.testing import ManualClock
from asyncsession.testing._contract import POLICY, at, make_session, msg

pytestmark = pytest.mark.anyio


def shape(log: MessageLog) -> tuple[list[str], int, int, bool]:
    return [m.content for m in log], log.offset, log.total, log.is_complete


async def test_list_items_hold_no_messages_and_exact_totals(
    any_repository: SessionRepository,
) -> None:
    talk = make_session(messages=("hello", "b", "c"))
    quiet = make_session(created=1)
    for session in (talk, quiet):
        await any_repository.add(session)
    items = {s.id: s for s in (await any_repository.list(SessionQuery())).items}
    assert shape(items[talk.id].messages) == ([], 3, 3, False)
    assert shape(items[quiet.id].messages) == ([], 0, 0, True)
    # the search still reads the first message; the store still holds every message
    found = (await any_repository.list(SessionQuery(search="HELLO"))).items
    assert [s.id for s in found] == [talk.id]
    assert shape(found[0].messages) == ([], 3, 3, False)
    loaded = await any_repository.get(talk.id)
    assert loaded is not None and shape(loaded.messages) == (["hello", "b", "c"], 0, 3, True)


async def test_append_returns_a_window_of_the_appended_messages(
    any_repository: SessionRepository,
) -> None:
    session = make_session(messages=("a", "b"))
    await any_repository.add(session)
    one = await any_repository.append(session.id, [msg("c", 1)], at=at(1), policy=POLICY)
    two = await any_repository.append(
        session.id, [msg("d", 2), msg("e", 2)], at=at(2), policy=POLICY
    )
    none = await any_repository.append(session.id, [], at=at(3), policy=POLICY)
    assert shape(one.messages) == (["c"], 2, 3, False)
    assert shape(two.messages) == (["d", "e"], 3, 5, False)
    assert shape(none.messages) == ([], 5, 5, False)
    assert (one.revision, two.revision, none.revision) == (1, 2, 3)
    loaded = await any_repository.get(session.id)
    assert loaded is not None
    assert shape(loaded.messages) == (["a", "b", "c", "d", "e"], 0, 5, True)
    # a first message: the window is the whole history
    empty = make_session()
    await any_repository.add(empty)
    first = await any_repository.append(empty.id, [msg("x", 1)], at=at(1), policy=POLICY)
    assert shape(first.messages) == (["x"], 0, 1, True)


async def test_the_manager_returns_the_same_shapes_on_every_store(
    any_repository: SessionRepository,
) -> None:
    """The user's repro (listmsgs.py), through the manager."""
    async with SessionManager(any_repository, clock=ManualClock(), cleanup_interval=None) as m:
        created = await m.create(owner="a", name="trip")
        added = await m.add_messages(
            created.id, [("user", "plan a trip to Rome"), ("assistant", "sure")]
        )
        assert shape(added.messages) == (["plan a trip to Rome", "sure"], 0, 2, True)
        item = (await m.list(owner="a")).items[0]
        assert shape(item.messages) == ([], 2, 2, False)
        with pytest.raises(IndexError):
            item.messages[0]
        third = await m.add_message(created.id, "user", "third")
        assert shape(third.messages) == (["third"], 2, 3, False)
        assert third.messages[0].content == "third"
        full = await m.get(created.id)
        assert [x.content for x in full.messages] == ["plan a trip to Rome", "sure", "third"]


async def test_memory_windows_share_the_stored_history() -> None:
    """No copy per listing or append: a window is a view of the stored log."""
    async with MemoryRepository() as repo:
        session = make_session(messages=tuple(f"m{i}" for i in range(1000)))
        await repo.add(session)
        appended = await repo.append(session.id, [msg("new", 1)], at=at(1), policy=POLICY)
        listed = (await repo.list(SessionQuery())).items[0]
        stored = await repo.get(session.id)
        assert stored is not None
        for window in (appended.messages, listed.messages):
            assert window._items is stored.messages._items


async def test_a_closed_store_refuses_every_operation_alike(
    any_repository: SessionRepository,
) -> None:
    """The memory store (the pytest plugin's default) worked unopened and after the
    manager closed it, where the durable stores raise StorageError: a test that read the
    store after `async with SessionManager(store)` passed on memory only (helper-190).
    Every store refuses alike, keeps what it holds, and opens again."""
    session = make_session(messages=("a",))
    await any_repository.add(session)
    other = make_session(created=1)
    await any_repository.aclose()  # the fixture's open: the last close
    try:
        calls = {
            "get": lambda: any_repository.get(session.id),
            "add": lambda: any_repository.add(other),
            "save": lambda: any_repository.save(
                attrs.evolve(session, revision=1), expected_revision=0
            ),
            "append": lambda: any_repository.append(
                session.id, [msg("b", 1)], at=at(1), policy=POLICY
            ),
            "touch": lambda: any_repository.touch(session.id, at=at(1), policy=POLICY),
            "delete": lambda: any_repository.delete(session.id),
            "list": lambda: any_repository.list(SessionQuery()),
            "count_by_status": lambda: any_repository.count_by_status(),
            "expired": lambda: any_repository.expired(at(10**6)),
            "remove_expired": lambda: any_repository.remove_expired(session.id, now=at(1)),
        }
        refused = []
        for name, call in calls.items():
            try:
                await call()
            except StorageError as exc:
                assert "not open" in str(exc), (name, exc)
                refused.append(name)
        assert refused == list(calls)
    finally:
        await any_repository.open()  # for the fixture, which closes it
    assert await any_repository.get(session.id) == session  # kept, nothing written
    assert await any_repository.get(other.id) is None
