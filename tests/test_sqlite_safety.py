"""SQLiteRepository and the database file under it: a file deleted or replaced while open,
``pragmas=`` that did not take or reach beyond the store's connection, SQLite out of
memory, a write refused as read-only (found in review; the permission cases
that need another user are in test_permissions.py)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncsession import InvalidConfiguration, SessionManager, StorageError
from asyncsession.stores.sqlite import WAL_AUTOCHECKPOINT, SQLiteRepository
from asyncsession.testing._contract import POLICY, at, make_session, msg

pytestmark = pytest.mark.anyio


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


def owners(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT owner FROM sessions ORDER BY owner")]


# -- the file deleted or replaced while open -----------------------------------------------


async def test_a_deleted_database_file_fails_every_write_instead_of_losing_it(
    db: Path, anyio_backend: str
) -> None:
    """An operator deleted the file while a store had it open: the store went on
    appending, acknowledged, to the unlinked file (lost at close), and a new store on the
    path failed with SQLITE_IOERR_SHORT_READ ("Check the disk") through the old -wal."""
    async with SessionManager(SQLiteRepository(db), cleanup_interval=None) as old:
        created = await old.create(owner="old")
        await old.add_message(created.id, "user", "before")
        os.remove(db)  # its -wal and -shm stay
        for _ in range(2):  # and it stays refused
            with pytest.raises(StorageError, match="deleted or replaced") as info:
                await old.add_message(created.id, "user", "lost")
            assert "no file can be found at that path now" in str(info.value)
            assert "restart every process" in str(info.value)
            assert not info.value.recoverable
        errors: list[BaseException] = []

        async def write(n: int) -> None:
            try:
                await old.add_message(created.id, "user", f"lost {n}")
            except StorageError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:  # a group commit: the whole batch
            for n in range(20):
                tg.start_soon(write, n)
        assert len(errors) == 20 and all("deleted or replaced" in str(e) for e in errors)
        assert len({id(e) for e in errors}) == 20  # each caller its own exception
        still = await old.get(created.id, touch=False)
        assert [m.content for m in still.messages] == ["before"]  # nothing committed
        async with SessionManager(SQLiteRepository(db), cleanup_interval=None) as new:
            fresh = await new.create(owner="new")
            for n in range(30):
                await new.add_message(fresh.id, "user", f"new {n}")
            with pytest.raises(StorageError, match="deleted or replaced"):
                await old.create(owner="old again")
            assert (await new.get(fresh.id)).messages.total == 30
    assert owners(db) == ["new"]


async def test_a_replaced_or_moved_database_file_fails_writes(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes after the file was replaced went to the old file; and at close SQLite left
    the old file's -wal at the path (no checkpoint into a moved file), so the next
    opener read the old pages over the file put in its place: a backup moved into
    place read as the old data. That -wal is moved aside at close."""
    path, other = tmp_path / "s.db", tmp_path / "other.db"
    async with SQLiteRepository(other) as repo:
        for _ in range(50):
            await repo.add(make_session(owner="other"))
    with caplog.at_level(logging.WARNING, "asyncsession.stores.sqlite"):
        async with SQLiteRepository(path) as repo:
            session = make_session(owner="mine")
            await repo.add(session)
            os.replace(other, path)  # another file put in its place (a backup, say)
            with pytest.raises(StorageError, match="another file is at that path now"):
                await repo.append(session.id, [msg("x", 1)], at=at(1), policy=POLICY)
            with pytest.raises(StorageError, match="deleted or replaced"):
                await repo.add(make_session(owner="mine too"))
            assert await repo.get(session.id) == session  # reads answer from its file
    (aside,) = [p async for p in anyio.Path(tmp_path).glob("s.db-wal.replaced-*")]
    assert [r.getMessage() for r in caplog.records] == [
        f"SQLite database {path} was deleted or replaced while this store had it open: "
        f"its write-ahead log, holding the last writes to the old file, was moved to "
        f"{aside}, so that it is not read as part of the file at that path now"
    ]
    assert owners(path) == ["other"] * 50
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    moved = tmp_path / "moved.db"
    async with SQLiteRepository(path) as repo:
        os.rename(path, moved)
        with pytest.raises(StorageError, match="no file can be found"):
            await repo.add(make_session())
        os.rename(moved, path)  # put back: the same file, writes go on
        await repo.add(make_session(owner="back"))
    assert owners(path) == ["back"] + ["other"] * 50


# -- pragmas ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["hard_heap_limit", "soft_heap_limit", "threads", "temp_store_directory"]
)
def test_pragmas_reaching_beyond_the_store_are_refused(db: Path, name: str) -> None:
    """pragmas={"hard_heap_limit": 1} failed the store's open with a raw MemoryError,
    and every other store of the process after it (the limit is process-wide)."""
    with pytest.raises(InvalidConfiguration, match=name) as info:
        SQLiteRepository(db, pragmas={name: 1})
    assert "hard_heap_limit" in str(info.value) and "soft_heap_limit" in str(info.value)
    assert not db.exists()


@pytest.mark.parametrize(
    ("pragmas", "expected"),
    [
        ({"wal_autocheckpoint": "lots"}, "reads back 0"),  # was 0: checkpoints off
        ({"cache_sise": 1000}, "returned nothing"),  # a typo, ignored
        ({"cache_size": -4000, "foreign_keys": 2}, "reads back 1"),
        ({"temp_store": "on"}, "reads back 0"),
        ({"mmap_size": 2**62}, "within its limits"),
        ({"page_size": 8192}, "ignores some changes once the file exists"),
        ({"case_sensitive_like": 1}, "cannot be read back"),
    ],
)
async def test_a_pragma_that_did_not_take_fails_the_open(
    db: Path, pragmas: dict[str, Any], expected: str, anyio_backend: str
) -> None:
    """{"wal_autocheckpoint": "lots"} became 0 without an error: checkpoints off, the WAL
    grew to 513 MB; a misspelt name was ignored."""
    (name,) = [n for n in pragmas if n != "cache_size"]
    with pytest.raises(InvalidConfiguration, match=expected) as info:
        async with SQLiteRepository(db, pragmas=pragmas):
            pass
    assert f"PRAGMA {name}" in str(info.value) and repr(pragmas[name]) in str(info.value)
    async with SQLiteRepository(db) as repo:  # nothing left behind
        setting = await repo._call(
            lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0], write=False
        )
        assert setting == WAL_AUTOCHECKPOINT


@pytest.mark.parametrize(
    ("pragmas", "expected"),
    [
        ({"foreign_keys": "on"}, 1),
        ({"foreign_keys": "OFF"}, 0),
        ({"temp_store": "MEMORY"}, 2),
        ({"secure_delete": "fast"}, 2),
        ({"automatic_index": "no"}, 0),
        ({"cache_size": -4000}, -4000),
        ({"wal_autocheckpoint": 0}, 0),
    ],
)
async def test_pragma_values_sqlite_takes_are_accepted(
    db: Path, pragmas: dict[str, Any], expected: int, anyio_backend: str
) -> None:
    ((name, _),) = pragmas.items()
    async with SQLiteRepository(db, pragmas=pragmas) as repo:
        await repo.add(make_session())
        setting = await repo._call(
            lambda conn: conn.execute(f"PRAGMA {name}").fetchone()[0], write=False
        )
    assert setting == expected


async def test_max_page_count_too_small_says_full_not_writable_path(
    db: Path, anyio_backend: str
) -> None:
    """{"max_page_count": 1} failed the open with "Pass a writable path": the file was
    writable, the page limit was the cause."""
    with pytest.raises(StorageError, match="is full") as info:
        async with SQLiteRepository(db, pragmas={"max_page_count": 1}):
            pass
    assert "max_page_count" in str(info.value) and "writable" not in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.Error)
    async with SQLiteRepository(db):
        pass
    with pytest.raises(InvalidConfiguration, match="max_page_count"):  # below its size
        async with SQLiteRepository(db, pragmas={"max_page_count": 1}):
            pass


# -- SQLite out of memory -------------------------------------------------------------------

#: Another component of the process limits SQLite's heap (process-wide): an operation
#: that needs more, and then opening a store, fail with StorageError, not MemoryError.
#: In a child process: a tiny limit cannot be lifted again.
OUT_OF_MEMORY = """
import json, sqlite3, sys, anyio, asyncsession as s
backend, directory = sys.argv[1:]
def outcome(exc):
    return [type(exc).__name__, str(exc), exc.recoverable, type(exc.__cause__).__name__]
async def main():
    seen = {}
    async with s.SessionManager(s.SQLiteRepository(directory + "/a.db")) as sessions:
        created = await sessions.create()
        other = sqlite3.connect(":memory:")
        other.execute("PRAGMA hard_heap_limit = 8000000")
        try:
            await sessions.add_message(created.id, "user", "x" * 20_000_000)
        except Exception as exc:
            seen["append"] = outcome(exc)
        other.execute("PRAGMA hard_heap_limit = 0")
        await sessions.add_message(created.id, "user", "small")
        seen["after"] = (await sessions.get(created.id)).messages.total
    try:
        other.execute("PRAGMA hard_heap_limit = 1")
    except MemoryError:
        pass
    try:
        async with s.SQLiteRepository(directory + "/b.db"):
            pass
    except Exception as exc:
        seen["open"] = outcome(exc)
    print(json.dumps(seen))
anyio.run(main, backend=backend)
"""


def test_sqlite_out_of_memory_is_a_storage_error(tmp_path: Path, anyio_backend: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", OUT_OF_MEMORY, anyio_backend, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    kind, message, recoverable, cause = seen["append"]
    assert (kind, recoverable, cause) == ("StorageError", True, "MemoryError")
    assert "out of memory" in message and "hard_heap_limit" in message
    assert seen["after"] == 1  # the big message was not stored
    kind, message, _, cause = seen["open"]
    assert (kind, cause) == ("StorageError", "MemoryError")
    assert message.startswith(f"Cannot open SQLite database {tmp_path / 'b.db'}")


# -- a write refused as read-only after the open -------------------------------------------


async def test_a_read_only_refusal_says_what_to_make_writable(db: Path, anyio_backend: str) -> None:
    """A write SQLite refused as read-only failed with "SQLITE_READONLY: attempt to write a
    readonly database" and no advice. (query_only stands for the file, its -wal or its
    directory turned read-only: it is the same SQLite error.)"""
    async with SQLiteRepository(db) as repo:
        session = make_session()
        await repo.add(session)
        await repo._call(lambda conn: conn.execute("PRAGMA query_only = 1"), write=False)
        with pytest.raises(StorageError, match="cannot be written") as info:
            await repo.append(session.id, [msg("x", 1)], at=at(1), policy=POLICY)
        message = str(info.value)
        assert "SQLITE_READONLY" in message or "readonly" in message
        assert f"{db.name}-wal" in message and f"{db.name}-shm" in message
        assert f"directory {db.parent}" in message and "write permission" in message
        assert not info.value.recoverable
        assert await repo.get(session.id) == session
