"""What the SQLite and Redis stores keep decoded between calls is bounded in bytes too.

Held snapshots (what ``update()`` is based on without a read) and the caches of decoded
documents and messages are counted by the size of their data as stored (JSON bytes):
``snapshot_cache_bytes`` is the held snapshots' budget (a session over a quarter of it
is not held), each cache of decoded documents or messages gets an eighth of it (an item
over 1/64 of it is not cached), and ``snapshot_cache=0`` (or ``snapshot_cache_bytes=0``)
keeps nothing decoded at all. Real stores on a real SQLite file and redis-server; the
tests read the stores' own accounting, never the process's memory.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from redis_support import RedisServer

from asyncsession import InvalidConfiguration, Session, SessionManager
from asyncsession._serialization import dump_message
from asyncsession.stores._held import DecodeCache
from asyncsession.stores.redis import RedisRepository
from asyncsession.stores.sqlite import SQLiteRepository

pytestmark = pytest.mark.anyio

KIB = 1024
Store = SQLiteRepository | RedisRepository
Opener = Callable[..., Store]


@pytest.fixture(params=["sqlite", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens stores on one SQLite file, or one Redis server and prefix (one per test)."""
    if request.param == "sqlite":
        path = tmp_path / "budget.db"
        return lambda **options: SQLiteRepository(path, **options)
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    return lambda **options: RedisRepository(server.url, prefix=prefix, **options)


@pytest.fixture
async def managers(opener: Opener, anyio_backend: str) -> AsyncIterator[Callable[..., Any]]:
    """``await open_manager(**store_options)``: a manager on a new store, closed after."""
    async with AsyncExitStack() as stack:

        async def open_manager(**options: Any) -> SessionManager:
            return await stack.enter_async_context(
                SessionManager(opener(**options), cleanup_interval=None)
            )

        yield open_manager


def decode_caches(store: Store) -> list[Any]:
    """The store's caches of decoded documents (and, for Redis, messages)."""
    if isinstance(store, SQLiteRepository):
        return [store._documents]
    return [store._docs, store._messages]


def held_bytes(store: Store) -> int:
    """The held snapshots' accounted bytes, checked against their entries."""
    held = store._held
    entries = list(held._items.values())
    assert held.nbytes == sum(history + document for _, _, history, document in entries)
    return held.nbytes


def history_size(session: Session) -> int:
    """The bytes of a session's messages as stored (one JSON document each)."""
    return sum(len(dump_message(m)) for m in session.messages)


@pytest.mark.parametrize("value", [-1, 1.5, True, "1000", None])
def test_the_byte_budget_is_checked(opener: Opener, value: Any) -> None:
    with pytest.raises(InvalidConfiguration, match="snapshot_cache_bytes must be an int >= 0"):
        opener(snapshot_cache_bytes=value)


async def test_held_snapshots_stay_within_the_byte_budget(
    managers: Callable[..., Any],
) -> None:
    sessions = await managers(snapshot_cache_bytes=256 * KIB)
    store = sessions.repository
    ids = []
    for n in range(30):  # ~40 KB each: 1.2 MB in all, under the count of 1,000
        session = await sessions.create(state={"n": n})
        for i in range(4):
            await sessions.add_message(session.id, "user", f"{n}.{i} " + "x" * 10_000)
        read = await sessions.get(session.id)
        assert read.messages.total == 4
        ids.append(session.id)
        assert held_bytes(store) <= 256 * KIB
    entry = store._held.entry(ids[-1])
    assert entry is not None and entry[2] == history_size(read)  # the newest is held
    assert store._held.get(ids[0]) is None  # the oldest made room
    assert 4 <= len(store._held) < 30
    for session_id in ids:  # what is held still serves updates; the rest is read again
        updated = await sessions.update(session_id, lambda s: s.with_state({"done": True}))
        assert updated.state["done"] and updated.messages.total == 4
        assert held_bytes(store) <= 256 * KIB


async def test_a_session_over_a_quarter_of_the_budget_is_not_held(
    managers: Callable[..., Any],
) -> None:
    sessions = await managers(snapshot_cache_bytes=256 * KIB)
    store = sessions.repository
    small = await sessions.create()
    await sessions.add_message(small.id, "user", "hi")
    await sessions.get(small.id)
    big = await sessions.create()
    for _ in range(3):  # 90 KB > 64 KiB
        await sessions.add_message(big.id, "user", "y" * 30_000)
    await sessions.get(big.id)
    assert store._held.get(big.id) is None
    assert store._held.get(small.id) is not None  # nothing was evicted for it
    updated = await sessions.update(big.id, lambda s: s.with_message("assistant", "ok"))
    assert updated.messages.total == 4 and store._held.get(big.id) is None
    assert (await sessions.get(big.id)).messages[-1].content == "ok"
    held_bytes(store)


async def test_held_sizes_are_the_stored_sizes_whatever_the_path(
    managers: Callable[..., Any],
) -> None:
    """Appends, updates (appending or rewriting), touches and reads of another store
    all account a held snapshot at the size its data has in the store."""
    a = await managers()
    b = await managers()
    session = await a.create(state={"k": "v" * 500})
    for i in range(40):  # past 32 messages: SQLite merges them into a chunk row
        await a.add_message(session.id, "user", f"message {i} " + "é" * i)
    await a.update(session.id, lambda s: s.with_message("assistant", "added by fn"))
    await a.update(session.id, lambda s: s.with_state({"k": "w"}))
    await a.get(session.id)  # a touch
    whole = await b.get(session.id, touch=False)
    assert whole.messages.total == 41
    mine, theirs = a.repository._held.entry(session.id), b.repository._held.entry(session.id)
    assert mine is not None and theirs is not None
    assert mine[0].revision == theirs[0].revision
    assert mine[2] == theirs[2] == history_size(whole)
    assert mine[3] == theirs[3] > 0  # the stored document's bytes
    held_bytes(a.repository)
    held_bytes(b.repository)


@pytest.mark.parametrize("off", [{"snapshot_cache": 0}, {"snapshot_cache_bytes": 0}])
async def test_turning_the_cache_off_keeps_nothing_decoded(
    managers: Callable[..., Any], off: dict[str, int]
) -> None:
    sessions = await managers(**off)
    store = sessions.repository
    for n in range(5):
        session = await sessions.create(state={"n": n})
        await sessions.add_messages(session.id, [("user", f"{n}-{i}") for i in range(3)])
        for _ in range(2):
            assert (await sessions.get(session.id)).messages.total == 3
            assert [m.content for m in (await store.get(session.id, last_messages=2)).messages] == [
                f"{n}-1",
                f"{n}-2",
            ]
        updated = await sessions.update(session.id, lambda s: s.with_state({"u": 1}))
        assert updated.state == {"n": n, "u": 1}
    assert len(store._held) == 0 and store._held.nbytes == 0
    assert not store._held.enabled
    for cache in decode_caches(store):
        assert len(cache) == 0 and cache.nbytes == 0


async def test_decode_caches_are_bounded_by_bytes(managers: Callable[..., Any]) -> None:
    """Each cache of decoded documents or messages keeps at most an eighth of the budget
    (64 KiB here), and nothing over 1/64 of it (8 KiB). The sessions are written by
    another store, so every read here decodes what it gets."""
    writer = await managers()
    store = (await managers(snapshot_cache_bytes=512 * KIB)).repository
    for n in range(40):  # windows are never held: only the decode caches keep them
        session = await writer.create(state={"pad": "s" * 3_000, "n": n})
        await writer.add_messages(
            session.id, [("user", f"{n}-{i} " + "m" * 3_000) for i in range(6)]
        )
        for _ in range(2):
            window = await store.get(session.id, last_messages=3)
            assert [m.content.split()[0] for m in window.messages] == [f"{n}-3", f"{n}-4", f"{n}-5"]
    for cache in decode_caches(store):
        assert 0 < cache.nbytes <= 64 * KIB
    before = [(len(cache), cache.nbytes) for cache in decode_caches(store)]
    big = await writer.create(state={"pad": "S" * 9_000})
    await writer.add_message(big.id, "user", "M" * 9_000)
    for _ in range(2):
        window = await store.get(big.id, last_messages=1)
        assert window.messages[0].content == "M" * 9_000 and window.state["pad"] == "S" * 9_000
    assert [(len(cache), cache.nbytes) for cache in decode_caches(store)] == before


def test_decode_cache_keeps_the_recently_used() -> None:
    """The one cache class both stores decode through: least recently used dropped first,
    within its count and byte bounds; a key over an eighth of the budget, or over
    ``largest``, is not kept; a budget of 0 keeps nothing."""
    cache: DecodeCache[int] = DecodeCache(3, 800)
    for n in range(3):
        cache.put(b"%d" % n * 10, n)
    assert cache.get(b"0" * 10) == 0  # now the most recently used
    cache.put(b"3" * 10, 3)
    assert [cache.get(b"%d" % n * 10) for n in range(4)] == [0, None, 2, 3]
    assert len(cache) == 3 and cache.nbytes == 30
    cache.put(b"4" * 100, 4)  # 100 = 800 // 8: kept, and the bytes push out the oldest
    cache.put(b"5" * 101, 5)  # over an eighth: not kept
    assert cache.get(b"4" * 100) == 4 and cache.get(b"5" * 101) is None
    assert cache.nbytes == sum(len(key) for key in cache._items) <= 800
    small: DecodeCache[int] = DecodeCache(10, 800, largest=20)
    small.put(b"x" * 21, 1)
    assert len(small) == 0
    off: DecodeCache[int] = DecodeCache(10, 0)
    off.put(b"", 1)
    off.put(b"x", 1)
    assert len(off) == 0 and off.nbytes == 0
