"""A SQLite open that refuses the file writes nothing to it: the layout, the kind of file
(application_id, other tables) and, with ``upgrade=False``, an older layout are checked
before the store switches the file to WAL mode or applies ``pragmas=`` (second-read
review of the CLI: a rollback-journal backup of an older layout, made with
``VACUUM INTO``, came out of a refused ``list`` in WAL mode)."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from asyncsession import SessionQuery, StorageError
from asyncsession.stores.sqlite import SCHEMA_VERSION, SQLiteRepository
from asyncsession.testing._contract import make_session

#: Bytes 18 and 19 of a SQLite header: the file format's write and read versions, 1 for
#: a rollback journal, 2 for WAL.
ROLLBACK, WAL = b"\x01\x01", b"\x02\x02"


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None, timeout=10)


def journal(path: Path) -> bytes:
    return path.read_bytes()[18:20]


def digests(directory: Path) -> dict[str, str]:
    """Every file in ``directory`` (so a -wal or -shm left behind shows too), digested."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def set_header(path: Path, *pragmas: str) -> None:
    with contextlib.closing(raw(path)) as conn:
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")


async def rollback_backup(directory: Path, layout: int) -> Path:
    """A backup of a store at ``layout``, as ``VACUUM INTO`` makes one: a rollback-journal
    file (header bytes 18-19 are 1, 1) alone in ``directory``."""
    source = directory.parent / f"{directory.name}-source.db"
    async with SQLiteRepository(source) as repo:
        await repo.add(make_session(name="kept"))
    backup = directory / "backup.db"

    def make() -> list[str]:
        set_header(source, f"user_version = {layout}")
        directory.mkdir()
        with contextlib.closing(raw(source)) as conn:
            conn.execute("VACUUM INTO ?", (str(backup),))
        return [p.name for p in directory.iterdir()]

    assert await anyio.to_thread.run_sync(make) == [backup.name]
    assert journal(backup) == ROLLBACK
    return backup


async def refused(path: Path, **options: object) -> StorageError:
    with pytest.raises(StorageError) as caught:
        async with SQLiteRepository(path, **options):  # type: ignore[arg-type]
            pass
    return caught.value


async def test_an_older_rollback_journal_file_is_refused_untouched_without_upgrade(
    tmp_path: Path, anyio_backend: str
) -> None:
    """``upgrade=False`` ("nothing written") switched an older layout's rollback-journal
    file to WAL mode (and applied ``pragmas=``) before it found the layout older."""
    backup = await rollback_backup(tmp_path / "backups", SCHEMA_VERSION - 1)
    before = digests(backup.parent)
    error = await refused(backup, upgrade=False, pragmas={"cache_size": -4000})
    assert f"layout version {SCHEMA_VERSION - 1}, older than" in error.message
    assert "nothing was written" in error.message
    assert digests(backup.parent) == before and journal(backup) == ROLLBACK
    async with SQLiteRepository(backup) as repo:  # upgrade=True: upgraded, in WAL mode
        assert len(await repo.list(SessionQuery())) == 1
    assert journal(backup) == WAL


@pytest.mark.parametrize("upgrade", [True, False])
async def test_a_newer_layout_or_another_programs_file_is_refused_untouched(
    tmp_path: Path, anyio_backend: str, upgrade: bool
) -> None:
    """A file the store refuses whatever ``upgrade`` says (a newer layout, another
    program's database) was switched to WAL mode first: that program, or the newer
    release's backup, then found its file changed."""
    newer = await rollback_backup(tmp_path / "newer", SCHEMA_VERSION + 1)
    before = digests(newer.parent)
    error = await refused(newer, upgrade=upgrade)
    assert "is newer than this asyncsession supports" in error.message
    assert digests(newer.parent) == before

    foreign = await rollback_backup(tmp_path / "foreign", SCHEMA_VERSION)
    await anyio.to_thread.run_sync(set_header, foreign, "application_id = 7")
    before = digests(foreign.parent)
    error = await refused(foreign, upgrade=upgrade)
    assert "it is not an asyncsession store (application_id 0x7)" in error.message
    assert digests(foreign.parent) == before

    other = tmp_path / "other" / "app.db"
    other.parent.mkdir()

    def make_other() -> None:
        with contextlib.closing(raw(other)) as conn:
            conn.execute("CREATE TABLE notes (body TEXT)")

    await anyio.to_thread.run_sync(make_other)
    before = digests(other.parent)
    error = await refused(other, upgrade=upgrade)
    assert "it holds other tables, not an asyncsession store" in error.message
    assert digests(other.parent) == before and journal(other) == ROLLBACK


async def test_a_current_rollback_journal_file_opens_in_wal_mode_without_upgrade(
    tmp_path: Path, anyio_backend: str
) -> None:
    """``upgrade=False`` keeps the layout, not the journal mode: a current backup opens
    (in WAL mode, as every store file) and its sessions are there."""
    backup = await rollback_backup(tmp_path / "backups", SCHEMA_VERSION)
    async with SQLiteRepository(backup, upgrade=False) as repo:
        assert len(await repo.list(SessionQuery())) == 1
    assert journal(backup) == WAL


async def test_an_older_layout_is_refused_at_once_while_another_connection_writes(
    tmp_path: Path, anyio_backend: str
) -> None:
    """``upgrade=False`` finds an older layout by reading it, without the write lock: it
    does not wait ``busy_timeout`` for a writer to finish only to refuse the file."""
    path = await rollback_backup(tmp_path / "backups", SCHEMA_VERSION - 1)
    async with SQLiteRepository(path):  # upgraded, in WAL mode: readers never wait
        pass
    await anyio.to_thread.run_sync(set_header, path, f"user_version = {SCHEMA_VERSION - 1}")
    writer = raw(path)
    writer.execute("BEGIN IMMEDIATE")
    try:
        with anyio.fail_after(15):
            error = await refused(path, upgrade=False, busy_timeout=30)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert f"layout version {SCHEMA_VERSION - 1}, older than" in error.message


async def test_opening_a_current_file_to_read_it_changes_no_byte(
    tmp_path: Path, anyio_backend: str
) -> None:
    """The open's write probe (which turns a read-only file into an error at open) was
    committed on every open: `asyncsession list` or `migrate --dry-run` changed the file,
    a backup copy changed as it was read, and a full disk failed the open of a store
    plain sqlite3 could still read (ops19 by helper-173). Now it is rolled back."""
    path = tmp_path / "s.db"
    async with SQLiteRepository(path) as repo:
        await repo.add(make_session(owner="o"))
    before = digests(tmp_path)
    async with SQLiteRepository(path) as repo:
        assert [s.owner for s in (await repo.list(SessionQuery())).items] == ["o"]
        assert await repo.count_by_status() != {}
    assert digests(tmp_path) == before
    async with SQLiteRepository(path) as repo:  # and writes still work
        await repo.add(make_session(owner="p"))
        assert len((await repo.list(SessionQuery())).items) == 2
