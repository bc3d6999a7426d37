"""Opening a SQLite store without upgrading its layout (``upgrade=False``), and opening
one whose write lock another connection holds past ``busy_timeout``."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from test_sqlite import make_v1_file

from asyncsession import InvalidConfiguration, SessionQuery, StorageError
from asyncsession.stores.sqlite import SCHEMA_VERSION, SQLiteRepository
from asyncsession.testing._contract import POLICY, at, make_session, msg


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection to the store's file."""
    return sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)


def layout(path: Path) -> int:
    with contextlib.closing(raw(path)) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def files(path: Path) -> dict[str, str]:
    """The digest of the database file and of its -wal and -shm files, if there."""
    found = {}
    for suffix in ("", "-wal", "-shm"):
        f = Path(f"{path}{suffix}")
        if f.exists():
            found[suffix] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


async def make_layout_4_file(path: Path) -> list[str]:
    """A layout-4 file (layout 5 has the same tables) holding two sessions; their ids."""
    sessions = [make_session(name="one", messages=("hello",)), make_session(name="two")]
    async with SQLiteRepository(path) as repo:
        for session in sessions:
            await repo.add(session)

    def mark() -> None:
        with contextlib.closing(raw(path)) as conn:
            conn.execute("PRAGMA user_version = 4")

    await anyio.to_thread.run_sync(mark)
    return [str(session.id) for session in sessions]


@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_upgrade_must_be_a_bool(tmp_path: Path, value: object) -> None:
    with pytest.raises(InvalidConfiguration, match="upgrade must be True or False"):
        SQLiteRepository(tmp_path / "s.db", upgrade=value)  # type: ignore[arg-type]


async def test_an_older_layout_is_refused_and_left_as_it_was_without_upgrade(
    tmp_path: Path, anyio_backend: str
) -> None:
    """Every open upgraded an older layout in place, so a tool that only reads (the
    CLI's list, export, migrate --dry-run) left a file the release that wrote it then
    refused ("layout version 5 is newer than this asyncsession supports (4)"). With
    upgrade=False such a file fails the open, untouched, saying what to do."""
    path = tmp_path / "s.db"
    await make_layout_4_file(path)
    before = files(path)
    with pytest.raises(StorageError) as caught:
        async with SQLiteRepository(path, upgrade=False):
            pass
    message = caught.value.message
    assert str(path) in message
    assert f"layout version 4, older than this asyncsession's ({SCHEMA_VERSION})" in message
    assert "nothing was written" in message
    assert f"asyncsession migrate --store sqlite:///{path}" in message
    assert "upgrade=True" in message and "release that wrote it" in message
    assert not caught.value.recoverable
    assert files(path) == before
    assert await anyio.to_thread.run_sync(layout, path) == 4
    async with SQLiteRepository(path) as repo:  # upgrade=True: the default
        assert len(await repo.list(SessionQuery())) == 2
    assert await anyio.to_thread.run_sync(layout, path) == SCHEMA_VERSION


async def test_layout_1_is_refused_too_without_upgrade(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "s.db"
    await anyio.to_thread.run_sync(make_v1_file, path, [make_session(name="old")])
    before = files(path)
    with pytest.raises(StorageError, match="layout version 1, older than"):
        async with SQLiteRepository(path, upgrade=False):
            pass
    assert files(path) == before
    assert await anyio.to_thread.run_sync(layout, path) == 1


async def test_a_current_layout_opens_for_reads_and_writes_without_upgrade(
    tmp_path: Path, anyio_backend: str
) -> None:
    """upgrade=False only keeps the layout as it is: the store is not read-only, and a
    new file is created (at this release's layout, as there is nothing to keep)."""
    path = tmp_path / "new.db"
    session = make_session(name="fresh")
    async with SQLiteRepository(path, upgrade=False) as repo:
        await repo.add(session)
        appended = await repo.append(session.id, [msg("hi", 1)], at=at(1), policy=POLICY)
        assert appended.messages.total == 1
    assert await anyio.to_thread.run_sync(layout, path) == SCHEMA_VERSION
    async with SQLiteRepository(path, upgrade=False) as repo:
        loaded = await repo.get(session.id)
        assert loaded is not None and loaded.messages.total == 1


async def test_a_newer_layout_is_refused_as_before_without_upgrade(
    tmp_path: Path, anyio_backend: str
) -> None:
    path = tmp_path / "s.db"
    async with SQLiteRepository(path):
        pass

    def mark() -> None:
        with contextlib.closing(raw(path)) as conn:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")

    await anyio.to_thread.run_sync(mark)
    with pytest.raises(StorageError, match="is newer than this asyncsession supports"):
        async with SQLiteRepository(path, upgrade=False):
            pass


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another connection holds the file's write lock (as a long upgrade does)."""
    conn = raw(path)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


@pytest.mark.parametrize("upgrade", [True, False])
async def test_a_write_lock_held_past_busy_timeout_at_open_says_so(
    tmp_path: Path, anyio_backend: str, upgrade: bool
) -> None:
    """A second process opening the file while another upgraded a big layout-1 file
    (seconds) was told "SQLite error (database is locked). Pass a writable path to a
    new or existing asyncsession database": the wrong advice. It is told that another
    connection holds the write lock, to retry or raise busy_timeout, recoverably.
    (upgrade=False refuses a layout-4 file before it waits for the lock: it is given a
    current one.)"""
    path = tmp_path / "s.db"
    await make_layout_4_file(path)
    if not upgrade:
        async with SQLiteRepository(path):
            pass
    with write_lock_held(path):
        with pytest.raises(StorageError) as caught:
            async with SQLiteRepository(path, busy_timeout=0.3, upgrade=upgrade):
                pass
    message = caught.value.message
    assert message.startswith(f"Cannot open SQLite database {path}: another connection ")
    assert "write lock" in message and "upgrade" in message
    assert "retry" in message and "busy_timeout" in message
    assert "Pass a writable path" not in message
    assert caught.value.recoverable
    assert await anyio.to_thread.run_sync(layout, path) == (4 if upgrade else SCHEMA_VERSION)


async def test_an_open_waiting_for_a_lock_released_within_busy_timeout_succeeds(
    tmp_path: Path, anyio_backend: str
) -> None:
    path = tmp_path / "s.db"
    await make_layout_4_file(path)
    conn = raw(path)
    conn.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: conn.execute("ROLLBACK"))
    release.start()
    try:
        async with SQLiteRepository(path, busy_timeout=5) as repo:
            assert len(await repo.list(SessionQuery())) == 2
    finally:
        release.join()
        conn.close()
    assert await anyio.to_thread.run_sync(layout, path) == SCHEMA_VERSION
