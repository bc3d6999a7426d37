"""SQLiteRepository: what a deleted session leaves on disk (found in a privacy review).

After a delete or an expiry removal, the session's owner, state and messages stayed
readable with ``strings``: in the ``-wal`` file until a checkpoint (the store's
autocheckpoint is thousands of pages away under light traffic, and the WAL was never
truncated), and in the main file's free space on SQLite builds without
SQLITE_SECURE_DELETE. The store now sets ``PRAGMA secure_delete = ON`` and has
``checkpoint()``, which leaves the WAL empty. These tests read the files' raw bytes.
"""

from __future__ import annotations

import random
import re
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import anyio
import pytest

from asyncsession import SessionManager, StorageError
from asyncsession.stores.sqlite import SQLiteRepository
from asyncsession.testing import ManualClock
from asyncsession.testing._contract import POLICY, at, make_session, msg

pytestmark = pytest.mark.anyio

MARKER = "PRIVATE-7f3a9c"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


def found_in(path: Path) -> bool:
    """Whether :data:`MARKER` is anywhere in the file's raw bytes (a missing file: no)."""
    return path.exists() and MARKER.encode() in path.read_bytes()


def wal(db: Path) -> Path:
    return db.with_name(db.name + "-wal")


@contextmanager
def holding(db: Path, holder: str) -> Iterator[sqlite3.Connection]:
    """Another connection to ``db`` holding a read transaction (``holder`` "reader") or
    the write lock ("writer") open, for the checkpoint to wait for."""
    with closing(sqlite3.connect(db, isolation_level=None)) as other:
        if holder == "reader":
            other.execute("BEGIN")
            other.execute("SELECT count(*) FROM sessions").fetchone()
        else:
            other.execute("BEGIN IMMEDIATE")
            other.execute("DELETE FROM contended")
        yield other


async def store_secret(repo: SQLiteRepository) -> list[uuid.UUID]:
    """Add a session holding the marker in its owner, state and 70 messages (chunk rows
    and overflow pages), beside others that stay; returns the ids of the others."""
    others = [make_session(owner="bob") for _ in range(5)]
    for other in others:
        await repo.add(other)
    secret = make_session(owner=f"alice-{MARKER}", state={"ssn": MARKER})
    await repo.add(secret)
    for start in range(0, 70, 10):
        batch = [msg(f"{MARKER} {i} " + "x" * 200, 1) for i in range(start, start + 10)]
        await repo.append(secret.id, batch, at=at(1), policy=POLICY)
    return [secret.id, *(o.id for o in others)]


@pytest.mark.parametrize("removal", ["delete", "expiry"])
async def test_a_removed_session_is_gone_from_the_files_after_checkpoint(
    db: Path, removal: str, anyio_backend: str
) -> None:
    async with SQLiteRepository(db) as repo:
        secret, *others = await store_secret(repo)
        if removal == "delete":
            assert await repo.delete(secret)
        else:
            removed = await repo.remove_expired(secret, now=at(3600))
            assert removed is not None and removed.owner == f"alice-{MARKER}"
        for i, other in enumerate(others * 10):  # light traffic afterwards
            await repo.append(other, [msg(f"hi {i}", 2)], at=at(2), policy=POLICY)
        assert found_in(wal(db))  # the inserts' frames: what the review found
        await repo.checkpoint()
        assert wal(db).stat().st_size == 0
        assert not found_in(db) and not found_in(wal(db))
        # The store goes on as before.
        assert (await repo.get(others[0])) is not None
    assert not found_in(db) and not found_in(wal(db))


async def test_secure_delete_is_on_by_default_and_off_keeps_deleted_bytes(
    db: Path, tmp_path: Path, anyio_backend: str
) -> None:
    """The store sets secure_delete itself (SQLite's own default is off; some builds,
    Debian's among them, turn it on). With pragmas={"secure_delete": "off"} the deleted
    session stays in the main file's free space after delete + checkpoint: only the WAL
    is emptied."""

    def setting(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA secure_delete").fetchone()[0])

    async with SQLiteRepository(db) as repo:
        assert await repo._call(setting, write=False) == 1
    off = tmp_path / "off.db"
    async with SQLiteRepository(off, pragmas={"secure_delete": "off"}) as repo:
        assert await repo._call(setting, write=False) == 0
        secret, *_ = await store_secret(repo)
        await repo.checkpoint()  # the secret now in the main file
        assert await repo.delete(secret)
        await repo.checkpoint()
        assert wal(off).stat().st_size == 0
        assert found_in(off)  # free space, not overwritten
    async with SQLiteRepository(off, pragmas={"secure_delete": "fast"}) as repo:
        assert await repo._call(setting, write=False) == 2  # the user's value wins


@pytest.mark.parametrize("holder", ["reader", "writer"])
async def test_checkpoint_blocked_by_another_connection_raises_and_recovers(
    db: Path, holder: str, anyio_backend: str
) -> None:
    """A read (or write) transaction of another connection keeps the WAL in use:
    checkpoint() raises a recoverable StorageError saying to retry, the store goes on
    working, and checkpoint() succeeds once the other transaction is gone."""
    async with SessionManager(SQLiteRepository(db, busy_timeout=0.3), cleanup_interval=None) as m:
        repo = m.repository
        assert isinstance(repo, SQLiteRepository)
        secret = await m.create(owner=f"alice-{MARKER}", state={"ssn": MARKER})
        await m.add_message(secret.id, "user", f"{MARKER} hello")
        await m.delete(secret.id)
        kept = await m.create(owner="carol")
        with holding(db, holder) as other:
            with pytest.raises(StorageError, match="retry the checkpoint") as info:
                await repo.checkpoint()
            assert info.value.recoverable
            assert "another connection" in str(info.value)
            assert found_in(wal(db))
            # Nothing is broken meanwhile (the manager's get() writes: a touch).
            found = await repo.get(kept.id)
            assert found is not None and found.owner == "carol"
            if holder == "reader":
                assert (await m.create(owner="dave")).owner == "dave"
            other.execute("COMMIT")
        await repo.checkpoint()
        assert wal(db).stat().st_size == 0
        assert not found_in(db) and not found_in(wal(db))
        assert (await m.get(kept.id)).owner == "carol"
        assert (await m.create(owner="erin")).owner == "erin"


async def test_reads_are_answered_while_a_checkpoint_waits(db: Path, anyio_backend: str) -> None:
    """A checkpoint waiting for another connection's reader does not hold up the store's
    reads (answered meanwhile); its writes run after it (the worker's own statements, in
    the order it ran them, show it)."""
    events: list[str] = []
    ran: list[str] = []

    def trace(statement: str) -> None:
        if "wal_checkpoint" in statement or statement.startswith("INSERT INTO sessions"):
            ran.append("checkpoint" if "wal_checkpoint" in statement else "insert")

    def install(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(trace)

    async with SessionManager(SQLiteRepository(db, busy_timeout=2), cleanup_interval=None) as m:
        repo = m.repository
        assert isinstance(repo, SQLiteRepository)
        kept = await m.create(owner="carol")
        await m.delete((await m.create(owner=f"alice-{MARKER}")).id)
        await repo._call(install, write=False, transaction=False)

        async def checkpoint() -> None:
            with pytest.raises(StorageError, match="retry"):
                await repo.checkpoint()
            events.append("checkpoint failed")

        async def write() -> None:
            await m.create(owner="dave")
            events.append("write")

        with holding(db, "reader"):
            async with anyio.create_task_group() as tg:
                tg.start_soon(checkpoint)
                await anyio.wait_all_tasks_blocked()  # the checkpoint waits for the reader
                for _ in range(5):  # the store's reads (the manager's get() touches)
                    found = await repo.get(kept.id)
                    assert found is not None and found.owner == "carol"
                    events.append("read")
                tg.start_soon(write)
        await repo.checkpoint()
    # The reads were answered while the checkpoint waited; the write ran after its last
    # try (their answers may come in the same tick, woken in either order).
    assert events[:5] == ["read"] * 5
    assert sorted(events[5:]) == ["checkpoint failed", "write"]
    first_insert = ran.index("insert")
    assert ran[:first_insert] and set(ran[:first_insert]) == {"checkpoint"}
    assert ran[first_insert:] == ["insert", "checkpoint"]  # dave, then the last checkpoint


async def test_checkpoint_on_a_closed_store_raises(db: Path, anyio_backend: str) -> None:
    repo = SQLiteRepository(db)
    with pytest.raises(StorageError, match="is not open"):
        await repo.checkpoint()
    async with repo:
        await repo.checkpoint()  # nothing written yet: nothing to do
    with pytest.raises(StorageError, match="is not open"):
        await repo.checkpoint()


async def test_checkpoint_of_a_memory_database_does_nothing(anyio_backend: str) -> None:
    async with SQLiteRepository(":memory:") as repo:
        await repo.add(make_session())
        await repo.checkpoint()


# -- many sessions changed in random order (second-read review) --------------------------
#
# With 200 sessions appended to in random order and half of them removed, a plain
# checkpoint() empties the -wal file, but SQLite may leave older copies of some removed
# rows in the unused gap of table pages it reorganised (secure_delete zeroes a deleted
# cell, not those): only VACUUM removes them, hence checkpoint(vacuum=True).

SESSIONS = 200
#: The random order of the appends and removals. With this one, SQLite 3.40 left copies
#: of removed sessions in the database file after a plain checkpoint in every test below
#: (not asserted: it depends on SQLite's page layout).
SEED = 6


def label(i: int) -> str:
    return f"PII{i:05d}Z"


def labels_in(*paths: Path) -> set[int]:
    """The numbers of the sessions whose :func:`label` is in the files' raw bytes."""
    found: set[int] = set()
    for path in paths:
        if path.exists():
            found |= {int(m) for m in re.findall(rb"PII(\d{5})Z", path.read_bytes())}
    return found


async def fill(repo: SQLiteRepository, rng: random.Random) -> list[uuid.UUID]:
    """Add :data:`SESSIONS` sessions holding their label in owner, state and messages of
    varied sizes, appended to in random order; return their ids."""
    ids = []
    for i in range(SESSIONS):
        session = make_session(owner=label(i), state={"secret": label(i)})
        await repo.add(session)
        ids.append(session.id)
    for _ in range(3):
        for i in rng.sample(range(SESSIONS), SESSIONS):
            text = f"{label(i)} says " + "y" * rng.choice([10, 100, 600, 3000])
            await repo.append(ids[i], [msg(text, 1)], at=at(1), policy=POLICY)
    return ids


@pytest.mark.parametrize("removal", ["delete", "remove_expired"])
async def test_checkpoint_vacuum_leaves_no_copy_of_removed_sessions(
    db: Path, removal: str, anyio_backend: str
) -> None:
    rng = random.Random(SEED)
    async with SQLiteRepository(db) as repo:
        ids = await fill(repo, rng)
        gone = set(rng.sample(range(SESSIONS), SESSIONS // 2))
        for i in gone:
            if removal == "delete":
                assert await repo.delete(ids[i])
            else:
                assert await repo.remove_expired(ids[i], now=at(3600)) is not None
        await repo.checkpoint()
        assert wal(db).stat().st_size == 0  # what a plain checkpoint promises
        await repo.checkpoint(vacuum=True)
        assert wal(db).stat().st_size == 0
        assert labels_in(db, wal(db)) == set(range(SESSIONS)) - gone
        kept = next(i for i in range(SESSIONS) if i not in gone)
        found = await repo.get(ids[kept])
        assert found is not None and found.owner == label(kept)
        assert len(found.messages) == 3
        assert await repo.get(ids[next(iter(gone))]) is None
    assert labels_in(db, wal(db)) == set(range(SESSIONS)) - gone


async def test_checkpoint_vacuum_after_the_managers_purge(db: Path, anyio_backend: str) -> None:
    rng = random.Random(SEED)
    clock = ManualClock()
    repo = SQLiteRepository(db)
    async with SessionManager(
        repo, idle_timeout=100, retention=1, cleanup_interval=None, clock=clock
    ) as m:
        ids = []
        for i in range(SESSIONS):
            session = await m.create(owner=label(i), state={"secret": label(i)})
            ids.append(session.id)
        for _ in range(3):
            for i in rng.sample(range(SESSIONS), SESSIONS):
                text = f"{label(i)} says " + "y" * rng.choice([10, 100, 600, 3000])
                await m.add_message(ids[i], "user", text)
        clock.advance(60)
        kept = set(rng.sample(range(SESSIONS), SESSIONS // 2))
        for i in kept:
            await m.add_message(ids[i], "user", "still here")
        clock.advance(50)
        assert await m.purge_expired() == SESSIONS - len(kept)
        await repo.checkpoint(vacuum=True)
        assert wal(db).stat().st_size == 0
        assert labels_in(db, wal(db)) == kept
        some = next(iter(kept))
        assert (await m.get(ids[some])).owner == label(some)
    assert labels_in(db, wal(db)) == kept


@pytest.mark.parametrize("holder", ["reader", "writer"])
async def test_checkpoint_vacuum_blocked_by_another_connection_raises_and_recovers(
    db: Path, holder: str, anyio_backend: str
) -> None:
    """VACUUM waits for another connection's write transaction (then fails as any busy
    write does); the checkpoint after it for a reader's. Both are recoverable."""
    async with SQLiteRepository(db, busy_timeout=0.2) as repo:
        secret, *others = await store_secret(repo)
        assert await repo.delete(secret)
        with holding(db, holder) as other:
            with pytest.raises(StorageError, match="retry") as info:
                await repo.checkpoint(vacuum=True)
            assert info.value.recoverable
            assert re.search(r"\d\.\d\ds \(busy_timeout 0\.2s", str(info.value))
            assert (await repo.get(others[0])) is not None
            other.execute("COMMIT")
        await repo.checkpoint(vacuum=True)
        assert wal(db).stat().st_size == 0
        assert not found_in(db) and not found_in(wal(db))
        assert (await repo.get(others[0])) is not None


async def test_checkpoint_vacuum_of_a_memory_database(anyio_backend: str) -> None:
    async with SQLiteRepository(":memory:") as repo:
        sessions = [make_session() for _ in range(300)]
        for session in sessions:
            await repo.add(session)
        for session in sessions[1:]:
            await repo.delete(session.id)

        def pages(conn: sqlite3.Connection) -> int:
            return int(conn.execute("PRAGMA page_count").fetchone()[0])

        before = await repo._call(pages, write=False)
        await repo.checkpoint(vacuum=True)  # compacts it: there is no log to truncate
        assert await repo._call(pages, write=False) < before / 2
        assert await repo.get(sessions[0].id) == sessions[0]


async def test_checkpoints_of_one_batch_stop_waiting_once_one_gives_up(
    db: Path, anyio_backend: str
) -> None:
    """Many checkpoints queued while another connection keeps a read open: once one of a
    batch gives up at the batch's busy_timeout deadline, the others fail without trying
    again (they each tried, waiting once more, so reads queued behind them waited for all
    of them). The checkpoint statement is counted with a trace of the worker's own
    connection: far fewer runs than checkpoint() calls."""
    calls = 100
    ran: list[str] = []

    def trace(statement: str) -> None:
        if "wal_checkpoint" in statement:
            ran.append(statement)

    def install(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(trace)

    failures: list[StorageError] = []
    async with SQLiteRepository(db, busy_timeout=0.2) as repo:
        kept = make_session(owner="carol")
        await repo.add(kept)
        await repo._call(install, write=False, transaction=False)

        async def checkpoint() -> None:
            with pytest.raises(StorageError) as info:
                await repo.checkpoint()
            failures.append(info.value)

        with closing(sqlite3.connect(db, isolation_level=None)) as reader:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM sessions").fetchone()
            async with anyio.create_task_group() as tg:
                for _ in range(calls):
                    tg.start_soon(checkpoint)
                await anyio.wait_all_tasks_blocked()  # all of them are queued
                found = await repo.get(kept.id)  # queued meanwhile: answered
                assert found is not None and found.owner == "carol"
            reader.execute("COMMIT")
        assert len(failures) == calls
        for failure in failures:
            assert failure.recoverable
            assert "retry the checkpoint" in str(failure)
            assert "It waited" in str(failure)
        assert 0 < len(ran) < calls // 2
        ran.clear()
        await repo.checkpoint()  # the reader is gone
        assert ran == ["PRAGMA wal_checkpoint(TRUNCATE)"]
        assert wal(db).stat().st_size == 0
