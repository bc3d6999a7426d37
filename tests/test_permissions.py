"""Files the durable stores create are their owner's only by default (session data):
``file_mode`` (found by helper-51: everything followed the umask, 0644 under the usual
022, and the file store put an operator's chmod back to 0644 at the next write)."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
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


async def test_a_group_shared_file_store_keeps_its_top_directory_unwritable_to_the_group(
    tmp_path: Path, anyio_backend: str
) -> None:
    # Whoever may rename sessions/ or locks/ could point them outside the store: the
    # group gets write access to those three directories only, not to the one above.
    old = os.umask(0o002)
    try:
        root = tmp_path / "store"
        async with s.FileRepository(root, file_mode=0o660) as repo:
            await repo.add(make_session())
    finally:
        os.umask(old)
    assert mode(root) == 0o750
    assert [mode(root / d) for d in ("sessions", "locks", "quarantine")] == [0o770] * 3
    assert {mode(p) for p in (root / "sessions").iterdir()} == {0o660}


@pytest.mark.parametrize("swapped", ["sessions", "locks", "quarantine"])
async def test_a_file_store_refuses_a_subdirectory_swapped_for_a_link(
    tmp_path: Path, anyio_backend: str, swapped: str
) -> None:
    # A store made before its top directory lost group write: a member renamed one of
    # its directories and put a link to another place there.
    root = tmp_path / "store"
    async with s.FileRepository(root):
        pass
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(root / swapped, tmp_path / "moved")
    os.symlink(outside, root / swapped)
    with pytest.raises(s.StorageError) as info:
        async with s.FileRepository(root) as repo:
            await repo.add(make_session())
    message = str(info.value)
    assert str(root / swapped) in message and "symbolic link" in message
    assert list(outside.iterdir()) == []


async def test_a_file_store_warns_of_a_top_directory_others_may_write(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    async with s.FileRepository(root, file_mode=0o660):
        pass
    with caplog.at_level(logging.WARNING, "asyncsession"):
        async with s.FileRepository(root, file_mode=0o660):
            pass
        os.chmod(root, 0o775)  # a group that does not share the store (umask 002)
        async with s.FileRepository(root):
            pass
        assert not caplog.records
        os.chmod(root, 0o770)  # as releases before this one made it for a shared store
        async with s.FileRepository(root, file_mode=0o660) as repo:
            await repo.add(make_session())
    (record,) = caplog.records
    message = record.getMessage()
    assert str(root) in message and "chmod g-w,o-w" in message, message


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


async def test_sqlite_gives_a_new_file_behind_a_dangling_link_its_mode(
    tmp_path: Path, umask_022: None, anyio_backend: str
) -> None:
    """``link/b.db -> ../real/b.db`` (not there yet): the exclusive create failed on the
    link (EEXIST), and SQLite created real/b.db with the umask's 0644."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "b.db").symlink_to(Path("..") / "real" / "b.db")
    async with s.SQLiteRepository(tmp_path / "link" / "b.db") as repo:
        await repo.add(make_session())
        assert [mode(tmp_path / "real" / n) for n in ("b.db", "b.db-wal", "b.db-shm")] == [
            0o600
        ] * 3
    assert (tmp_path / "link" / "b.db").is_symlink()


async def test_file_store_gives_a_directory_behind_a_dangling_link_its_mode(
    tmp_path: Path, umask_022: None, anyio_backend: str
) -> None:
    """The store directory a dangling link: os.mkdir does not follow it (EEXIST), and
    opening failed with "Could not create the store directory .../sessions"."""
    (tmp_path / "real").mkdir()
    (tmp_path / "store").symlink_to(tmp_path / "real" / "store")
    async with s.FileRepository(tmp_path / "store") as repo:
        await repo.add(make_session())
    assert mode(tmp_path / "real" / "store") == 0o700
    assert len(list((tmp_path / "real" / "store" / "sessions").iterdir())) == 1


# -- as another user: what this process may not read or write --------------------------------

#: Opens a store of KIND at PATH on BACKEND, adds a session and appends to it, and prints
#: the SessionError it raised (or null) as JSON. As root it first does the same in a
#: directory of its own, which loads every module the stores and the backend use (the
#: interpreter's own files may be out of nobody's reach), and then becomes nobody; as
#: another user it runs as that user.
AS_ANOTHER_USER = """
import json, os, pwd, sys, tempfile
import anyio, asyncsession as s
kind, backend, path = sys.argv[1:]
async def write(path):
    store = s.SQLiteRepository(path) if kind == "sqlite" else s.FileRepository(path)
    async with s.SessionManager(store, cleanup_interval=None) as sessions:
        created = await sessions.create()
        await sessions.add_message(created.id, "user", "hi")
if os.geteuid() == 0:
    with tempfile.TemporaryDirectory() as directory:
        anyio.run(write, os.path.join(directory, "warm-up"), backend=backend)
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
try:
    anyio.run(write, path, backend=backend)
except s.SessionError as exc:
    print(json.dumps([type(exc).__name__, str(exc), exc.recoverable]))
else:
    print(json.dumps(None))
"""

needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to become another user"
)


def other_user() -> tuple[int, int]:
    """Who AS_ANOTHER_USER runs as: nobody when the tests run as root, else this user."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    return os.geteuid(), os.getegid()


def as_other_user(kind: str, backend: str, path: Path) -> Any:
    result = subprocess.run(
        [sys.executable, "-c", AS_ANOTHER_USER, kind, backend, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def give(path: Path, owner: tuple[int, int], file_mode: int) -> None:
    if os.geteuid() == 0:
        os.chown(path, *owner)
    path.chmod(file_mode)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory the other user can reach (tmp_path's parents are root's own)."""
    directory = Path(tempfile.mkdtemp(prefix="asyncsession-permissions-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        for path in (directory, *directory.rglob("*")):
            if not path.is_symlink():
                path.chmod(0o700)
        shutil.rmtree(directory)


async def make_sqlite_store(path: Path) -> None:
    async with s.SQLiteRepository(path) as repo:
        await repo.add(make_session())


def assert_refused_at_open(outcome: Any, path: Path, cause: str) -> None:
    """A StorageError at open naming the file, the cause and what to make writable."""
    assert outcome is not None, "the store opened"
    kind, message, recoverable = outcome
    assert kind == "StorageError" and not recoverable
    assert message.startswith(f"Cannot open SQLite database {path}: {cause}"), message
    for needed in (
        "read and write permission",
        f"{path.name}-wal and {path.name}-shm",
        f"the directory {path.parent}",
    ):
        assert needed in message, message


def test_sqlite_refuses_a_database_it_may_only_read(shared: Path, anyio_backend: str) -> None:
    """A 0444 file opened (SQLite fell back to read-only without a word) and every write
    then failed with "SQLITE_READONLY: attempt to write a readonly database", not
    recoverable, no advice, although the README promises an open error."""
    path = shared / "s.db"
    anyio.run(make_sqlite_store, path, backend=anyio_backend)
    owner = other_user()
    give(shared, owner, 0o755)
    give(path, owner, 0o444)
    before = path.read_bytes()
    outcome = as_other_user("sqlite", anyio_backend, path)
    assert_refused_at_open(outcome, path, "SQLite could open it for reading only")
    assert path.read_bytes() == before


@needs_root
def test_sqlite_refuses_a_database_another_user_owns(shared: Path, anyio_backend: str) -> None:
    """root's 0644 file in root's directory, opened as nobody: the same silent fall-back."""
    path = shared / "s.db"
    anyio.run(make_sqlite_store, path, backend=anyio_backend)
    path.chmod(0o644)
    outcome = as_other_user("sqlite", anyio_backend, path)
    assert_refused_at_open(outcome, path, "SQLite could open it for reading only")


@needs_root
def test_sqlite_refuses_wal_files_another_user_left(shared: Path, anyio_backend: str) -> None:
    """The database is nobody's, but a process of root's was killed with it open: its
    -wal and -shm (0644, root's) stay, and nobody may only read them."""
    path = shared / "s.db"
    crash = (
        "import os, sys, anyio, asyncsession as s\n"
        "async def main():\n"
        "    store = s.SQLiteRepository(sys.argv[1])\n"
        "    async with s.SessionManager(store, cleanup_interval=None) as sessions:\n"
        "        await sessions.create()\n"
        "        os._exit(0)\n"
        "anyio.run(main)\n"
    )
    subprocess.run([sys.executable, "-c", crash, str(path)], check=True, timeout=60)
    wal, shm = Path(f"{path}-wal"), Path(f"{path}-shm")
    assert wal.exists() and shm.exists()
    owner = other_user()
    give(shared, owner, 0o755)
    give(path, owner, 0o600)
    wal.chmod(0o644)
    shm.chmod(0o644)
    outcome = as_other_user("sqlite", anyio_backend, path)
    assert_refused_at_open(outcome, path, "SQLite could open it for reading only")


def test_sqlite_refuses_a_directory_it_may_not_write(shared: Path, anyio_backend: str) -> None:
    """The file is writable, its directory is not: SQLite cannot create the -wal."""
    path = shared / "s.db"
    anyio.run(make_sqlite_store, path, backend=anyio_backend)
    owner = other_user()
    give(path, owner, 0o600)
    give(shared, owner, 0o555)
    outcome = as_other_user("sqlite", anyio_backend, path)
    assert_refused_at_open(outcome, path, "SQLite could open it for reading only")


@pytest.mark.parametrize("blocked", ["parent", "parent/store", "parent/store/sessions"])
def test_file_store_names_the_directory_it_may_not_enter(
    shared: Path, anyio_backend: str, blocked: str
) -> None:
    """The store's directories existed but a directory on the way could not be entered:
    opening said "Could not create the store directory .../sessions" (or raised a raw
    PermissionError), as if it were missing."""
    root = shared / "parent" / "store"
    (shared / "parent").mkdir()

    async def make() -> None:
        async with s.FileRepository(root) as repo:
            await repo.add(make_session())

    anyio.run(make, backend=anyio_backend)
    owner = other_user()
    for path in (shared / "parent", *(shared / "parent").rglob("*")):
        give(path, owner, 0o700 if path.is_dir() else 0o600)
    (shared / blocked).chmod(0o600)  # neither the owner nor anyone else may enter
    outcome = as_other_user("files", anyio_backend, root)
    assert outcome is not None, "the store opened"
    kind, message, recoverable = outcome
    assert kind == "StorageError" and not recoverable
    assert message.startswith(f"Cannot access the store directory {root}: this process"), message
    assert f"may not enter {shared / blocked} (Permission denied)" in message
    assert "search (x) permission on every directory above the store" in message
    assert "Could not create" not in message
