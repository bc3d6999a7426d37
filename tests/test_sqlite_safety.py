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
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from asyncsession import (
    InvalidConfiguration,
    SessionManager,
    StorageError,
    repository_from_url,
)
from asyncsession.stores.sqlite import WAL_AUTOCHECKPOINT, SQLiteRepository
from asyncsession.testing._contract import POLICY, at, make_session, msg

pytestmark = pytest.mark.anyio


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


def owners(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
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
    """Writes after the file was replaced went to the old file. SQLite leaves the old
    file's -wal at the path when the store closes (no checkpoint into a moved file): the
    store leaves it alone (it may be the -wal another process uses now, see the next
    test), and it is the operator's to remove before the file at the path is opened."""
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
    assert caplog.records == []
    assert sorted(os.listdir(tmp_path)) == ["s.db", "s.db-shm", "s.db-wal"]  # none moved
    for stale in ("s.db-wal", "s.db-shm"):  # the operator's part (README)
        os.remove(tmp_path / stale)
    assert owners(path) == ["other"] * 50
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    moved = tmp_path / "moved.db"
    async with SQLiteRepository(path) as repo:
        os.rename(path, moved)
        with pytest.raises(StorageError, match="no file can be found"):
            await repo.add(make_session())
        os.rename(moved, path)  # put back: the same file, writes go on
        await repo.add(make_session(owner="back"))
    assert owners(path) == ["back"] + ["other"] * 50


#: A process with the old file open: open, write, say "open", close on a line from
#: stdin, say "closed".
OLD_FILE_HOLDER = """
import sys, anyio, asyncsession as s
from asyncsession.testing._contract import make_session
async def main():
    async with s.SQLiteRepository(sys.argv[2]) as repo:
        for _ in range(5):
            await repo.add(make_session(owner="old"))
        print("open", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
    print("closed", flush=True)
anyio.run(main, backend=sys.argv[1])
"""


async def test_closing_a_store_on_a_replaced_file_leaves_the_wal_another_process_uses(
    tmp_path: Path, anyio_backend: str
) -> None:
    """The file was replaced (``mv restore.db app.db``) under process A; process B opened
    the new file, and so the same app.db-wal, and wrote. At its close A moved that -wal
    aside as the old file's: B's further acknowledged writes went into the moved file
    only, a new connection failed with "disk I/O error" meanwhile, and once B was killed
    the database had none of them. Closing no longer touches the -wal."""
    path, restore = tmp_path / "app.db", tmp_path / "restore.db"
    async with SQLiteRepository(restore):
        pass
    with subprocess.Popen(  # noqa: ASYNC220 - a child answering at once, lines at a time
        [sys.executable, "-c", OLD_FILE_HOLDER, anyio_backend, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as old:
        assert old.stdin is not None and old.stdout is not None
        try:
            assert old.stdout.readline() == "open\n"
            with closing(sqlite3.connect(path)) as conn:  # A idle, its WAL checkpointed
                assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            os.replace(restore, path)
            async with SQLiteRepository(path) as repo:
                for _ in range(5):
                    await repo.add(make_session(owner="new"))
                old.stdin.write("close\n")
                old.stdin.flush()
                assert old.stdout.readline() == "closed\n"
                assert old.wait(timeout=60) == 0
                for _ in range(5):
                    await repo.add(make_session(owner="new"))
                assert sorted(os.listdir(tmp_path)) == ["app.db", "app.db-shm", "app.db-wal"]
                assert owners(path) == ["new"] * 10  # another connection sees them all
        finally:
            if old.poll() is None:
                old.kill()
    assert owners(path) == ["new"] * 10
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_a_relative_path_keeps_its_file_after_a_chdir(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLiteRepository("sessions.db") (or sqlite:///sessions.db), then os.chdir()
    elsewhere (a daemon's chdir("/") after setup): every write failed with "deleted or
    replaced ... no file can be found at that path now", the check looking the relative
    path up from the new directory. The file SQLite opened is checked."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    async with SQLiteRepository(second / "sessions.db") as repo:  # a file at the name there
        await repo.add(make_session(owner="other"))
    monkeypatch.chdir(first)
    async with repository_from_url("sqlite:///sessions.db") as repo:
        await repo.add(make_session(owner="before"))
        os.chdir(second)
        await repo.add(make_session(owner="after"))
        os.chdir(tmp_path)  # nothing at the name here
        await repo.add(make_session(owner="after too"))
        os.remove(first / "sessions.db")  # still caught once the file is gone
        with pytest.raises(StorageError, match="deleted or replaced") as info:
            await repo.add(make_session(owner="lost"))
        assert "no file can be found" in str(info.value)
        assert str(first / "sessions.db") in str(info.value)
    assert owners(second / "sessions.db") == ["other"]


async def test_a_path_through_a_link_keeps_its_file_when_the_link_is_retargeted(
    tmp_path: Path, anyio_backend: str
) -> None:
    """current.db -> v1.db, opened through the link; a deploy switched the link to
    v2.db: every write to v1.db, intact, failed as "deleted or replaced" (the check
    looked at the link, SQLite has the target open). Writes go on to v1.db, and the
    target deleted or replaced is still caught."""
    v1, v2, link = tmp_path / "v1.db", tmp_path / "v2.db", tmp_path / "current.db"
    async with SQLiteRepository(v2) as repo:
        await repo.add(make_session(owner="v2"))
    link.symlink_to(v1.name)
    async with SQLiteRepository(link) as repo:
        await repo.add(make_session(owner="before"))
        link.unlink()
        link.symlink_to(v2.name)
        await repo.add(make_session(owner="after"))
        link.unlink()  # no link at all
        await repo.add(make_session(owner="after too"))
    assert owners(v1) == ["after", "after too", "before"]
    assert owners(v2) == ["v2"]
    link.symlink_to(v1.name)
    async with SQLiteRepository(link) as repo:
        os.replace(v2, v1)  # the target replaced, the link intact
        with pytest.raises(StorageError, match="another file is at that path now") as info:
            await repo.add(make_session(owner="lost"))
        assert f"{link} (the file {v1})" in str(info.value)
    async with SQLiteRepository(tmp_path / "w.db") as repo:
        link.unlink()
        link.symlink_to("w.db")
        async with SQLiteRepository(link) as through_link:
            await through_link.add(make_session())
            os.remove(tmp_path / "w.db")  # the target deleted, the link dangling
            with pytest.raises(StorageError, match="no file can be found"):
                await through_link.add(make_session())
            with pytest.raises(StorageError, match="no file can be found"):
                await repo.add(make_session())


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
        # a word it takes, ignored in WAL mode (said "a word it does not take")
        ({"auto_vacuum": "incremental"}, "ignores some changes once the file exists"),
        # a boolean word is 0 or 1 for a switch only: these turned into 0
        ({"cache_size": "off"}, "reads back 0"),
        ({"mmap_size": "no"}, "reads back 0"),
        ({"wal_autocheckpoint": "off"}, "reads back 0"),
    ],
)
async def test_a_pragma_that_did_not_take_fails_the_open(
    db: Path, pragmas: dict[str, Any], expected: str, anyio_backend: str
) -> None:
    """{"wal_autocheckpoint": "lots"} became 0 without an error: checkpoints off, the WAL
    grew to 513 MB; a misspelt name was ignored."""
    name = list(pragmas)[-1]  # the one that did not take
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
        ({"reverse_unordered_selects": "yes"}, 1),
        ({"trusted_schema": "false"}, 0),
        ({"cache_spill": "off"}, 0),
        ({"cache_spill": 0}, 0),
        ({"cache_spill": 100_000}, 100_000),
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


@pytest.mark.parametrize("value", ["on", "YES", 100, -100])
async def test_cache_spill_on_reads_back_the_spill_size(
    db: Path, value: int | str, anyio_backend: str
) -> None:
    """PRAGMA cache_spill reads back the number of pages at which the cache spills (at
    least the cache's size), not 1 or the value set: {"cache_spill": "on"} (483) and
    {"cache_spill": 100} failed the open as "did not take"."""
    async with SQLiteRepository(db, pragmas={"cache_spill": value, "cache_size": 50}) as repo:
        spill = await repo._call(
            lambda conn: conn.execute("PRAGMA cache_spill").fetchone()[0], write=False
        )
    assert spill >= max(50, value if isinstance(value, int) else 1)


async def test_action_and_unreadable_pragmas_run_without_a_read_back(
    db: Path, anyio_backend: str
) -> None:
    """{"optimize": 65538} (an action: reading it back returns no rows, and would run it
    again) and {"case_sensitive_like": 1} (SQLite cannot report it) failed the open as
    "did not take". They run, unchecked."""
    pragmas = {"optimize": 65538, "incremental_vacuum": 10, "case_sensitive_like": "on"}
    async with SQLiteRepository(db, pragmas=pragmas) as repo:
        await repo.add(make_session())
        like = await repo._call(
            lambda conn: conn.execute("SELECT 'a' LIKE 'A'").fetchone()[0], write=False
        )
    assert like == 0  # case-sensitive: it took
    async with SQLiteRepository(db, pragmas={"case_sensitive_like": 0}) as repo:
        like = await repo._call(
            lambda conn: conn.execute("SELECT 'a' LIKE 'A'").fetchone()[0], write=False
        )
    assert like == 1


@pytest.mark.parametrize(
    ("pragmas", "expected"),
    [
        ({"optimize": "lots"}, "wants a number"),
        ({"incremental_vacuum": "all"}, "wants a number"),
        ({"case_sensitive_like": "lots"}, "a number or on/off/yes/no/true/false"),
        ({"cache_spill": "lots"}, "a number or on/off"),  # read back as on
    ],
)
def test_words_a_pragma_would_take_unseen_are_refused(
    db: Path, pragmas: dict[str, Any], expected: str
) -> None:
    """SQLite takes a word it does not know for these without an error, as off
    (case_sensitive_like) or on (cache_spill), and reading them back cannot show it:
    refused before the open."""
    with pytest.raises(InvalidConfiguration, match=expected) as info:
        SQLiteRepository(db, pragmas=pragmas)
    ((name, value),) = pragmas.items()
    assert repr(name) in str(info.value) and repr(value) in str(info.value)
    assert not db.exists()


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
    if sys.version_info >= (3, 11):
        assert (kind, recoverable, cause) == ("StorageError", True, "MemoryError")
        assert "out of memory" in message and "hard_heap_limit" in message
    else:  # Python 3.10's sqlite3 reports the bind that ran out of memory as an
        # InterfaceError ("Error binding parameter 0"): a StorageError all the same
        assert (kind, cause) == ("StorageError", "InterfaceError")
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
