"""Files the durable stores create are their owner's only by default (session data):
``file_mode`` (found by helper-51: everything followed the umask, 0644 under the usual
022, and the file store put an operator's chmod back to 0644 at the next write)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

import asyncsession as s
from asyncsession.testing._contract import make_session

pytestmark = pytest.mark.anyio


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_file_store_creates_owner_only_files_by_default(
    tmp_path: Path, umask_022: None, anyio_backend: str
) -> None:
    root = tmp_path / "store"
    async with s.FileRepository(root) as repo:
        session = make_session()
        await repo.add(session)
        documents = list((root / "sessions").iterdir())
        locks = list((root / "locks").iterdir())
    assert [mode(p) for p in (root, root / "sessions", root / "locks", root / "quarantine")] == [
        0o700
    ] * 4
    assert documents and {mode(p) for p in documents} == {0o600}
    assert locks and {mode(p) for p in locks} == {0o600}


async def test_file_store_mode_is_configurable_and_kept_on_rewrite(
    tmp_path: Path, umask_022: None, anyio_backend: str
) -> None:
    root = tmp_path / "store"
    async with s.SessionManager(s.FileRepository(root, file_mode=0o640)) as sessions:
        created = await sessions.create()
        (document,) = (root / "sessions").iterdir()
        assert mode(document) == 0o640 and mode(root / "sessions") == 0o750
        os.chmod(document, 0o644)
        await sessions.set_state(created.id, a=1)  # rewritten: file_mode again
        assert mode(document) == 0o640


async def test_sqlite_creates_an_owner_only_database_by_default(
    tmp_path: Path, umask_022: None, anyio_backend: str
) -> None:
    path = tmp_path / "s.db"
    async with s.SQLiteRepository(path) as repo:
        await repo.add(make_session())
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert all(p.exists() for p in files)
        assert [mode(p) for p in files] == [0o600] * 3
    other = tmp_path / "other.db"
    async with s.SQLiteRepository(other, file_mode=0o640):
        assert mode(other) == 0o640


async def test_sqlite_leaves_an_existing_files_mode_alone(
    tmp_path: Path, umask_022: None, anyio_backend: str
) -> None:
    path = tmp_path / "s.db"
    async with s.SQLiteRepository(path):
        pass
    os.chmod(path, 0o644)
    async with s.SQLiteRepository(path) as repo:
        await repo.add(make_session())
    assert mode(path) == 0o644


@pytest.mark.parametrize("bad", [0o400, 0o1777, -1, "0o600", True, 0o000])
def test_bad_file_modes_are_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(s.InvalidConfiguration, match="file_mode"):
        s.FileRepository(tmp_path, file_mode=bad)  # type: ignore[arg-type]
    with pytest.raises(s.InvalidConfiguration, match="file_mode"):
        s.SQLiteRepository(tmp_path / "s.db", file_mode=bad)  # type: ignore[arg-type]
