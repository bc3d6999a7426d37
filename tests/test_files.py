"""FileRepository: the contract, the document format, corruption, locks, faults, crashes."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import pickle
import signal
import stat
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import orjson
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from loops_support import run_in_threads

import asyncsession
from asyncsession import (
    CURRENT_VERSION,
    CorruptSessionError,
    InvalidSessionId,
    SessionManager,
    SessionNotFound,
    SessionQuery,
    SessionRepository,
    StorageError,
)
from asyncsession.stores import files
from asyncsession.stores.files import FileRepository, LockTimeout
from asyncsession.testing import ManualClock, RepositoryContract
from asyncsession.testing._contract import (
    POLICY,
    at,
    changed,
    make_session,
    msg,
    version_0_document,
)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).with_name("files_child.py")
HAVE_PROCFS = Path("/proc/self").is_dir()


class TestFileContract(RepositoryContract):
    # The deadline index is read from the documents: a newer release's document has a
    # deadline this release cannot read, so the scan leaves it out of expired() (and
    # lists it by unreadable(), warned about once per change) instead of guessing one.
    lists_newer_documents_as_expired = False

    @pytest.fixture
    async def repository(self, anyio_backend: str, tmp_path: Path) -> AsyncIterator[FileRepository]:
        async with FileRepository(tmp_path / "store") as repo:
            yield repo

    async def replace_document(
        self, repository: SessionRepository, session_id: uuid.UUID, document: bytes
    ) -> None:
        assert isinstance(repository, FileRepository)
        await anyio.Path(doc_path(repository, session_id)).write_bytes(document)


@pytest.fixture
async def repo(anyio_backend: str, tmp_path: Path) -> AsyncIterator[FileRepository]:
    async with FileRepository(tmp_path / "store") as store:
        yield store


def doc_path(repo: FileRepository, sid: uuid.UUID) -> Path:
    return repo.directory / "sessions" / f"{sid}.json"


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def temp_files(repo: FileRepository) -> list[str]:
    return [p.name for p in (repo.directory / "sessions").iterdir() if p.name.startswith(".")]


def quarantined(repo: FileRepository) -> list[Path]:
    return sorted((repo.directory / "quarantine").iterdir())


# -- layout and format ----------------------------------------------------------------


async def test_document_is_readable_json_that_loads_reads(repo: FileRepository) -> None:
    session = make_session(messages=("hello", "wörld"))
    await repo.add(session)
    path = doc_path(repo, session.id)
    text = path.read_text("utf-8")
    assert text.startswith('{\n  "version": 1,\n') and text.endswith("}\n")
    assert '"content": "wörld"' in text  # not escaped: readable by people
    assert asyncsession.loads(path.read_bytes()) == session
    assert files.decode_document(path.read_bytes(), session.id) == session
    assert sorted(p.name for p in repo.directory.iterdir()) == ["locks", "quarantine", "sessions"]


async def test_legacy_document_without_checksum_is_read(repo: FileRepository) -> None:
    session = make_session(messages=("a",))
    doc_path(repo, session.id).write_bytes(asyncsession.dumps(session))
    assert await repo.get(session.id) == session


async def test_open_errors_name_the_path(tmp_path: Path, anyio_backend: str) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in (tmp_path / "missing" / "store", a_file, a_file / "store"):
        with pytest.raises(StorageError, match=str(bad)):
            async with FileRepository(bad):
                pass
    if HAVE_PROCFS:  # procfs refuses new directories, even to root
        with pytest.raises(StorageError, match="/proc/asyncsession"):
            async with FileRepository("/proc/asyncsession-test-store"):
                pass
    if os.geteuid() != 0:  # root ignores permissions
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        with pytest.raises(StorageError, match="ro"):
            async with FileRepository(locked / "store"):
                pass


async def test_closed_store_refuses_work(tmp_path: Path, anyio_backend: str) -> None:
    repo = FileRepository(tmp_path / "store")
    with pytest.raises(StorageError, match="not open"):
        await repo.get(uuid.uuid4())
    with pytest.raises(asyncsession.InvalidConfiguration):
        FileRepository(tmp_path, lock_timeout=0)


async def test_data_survives_reopen(tmp_path: Path, anyio_backend: str) -> None:
    session = make_session(owner="bob", messages=("x",))
    async with FileRepository(tmp_path / "store") as repo:
        await repo.add(session)
        await repo.append(session.id, [msg("y", 1)], at=at(1), policy=POLICY)
    async with FileRepository(tmp_path / "store", shared=False) as repo:
        page = await repo.list(SessionQuery(owner="bob"))
        assert [s.id for s in page] == [session.id] and page.items[0].messages.total == 2
        assert list(await repo.expired(at(61))) == [session.id]
        loaded = await repo.get(session.id, last_messages=1)
        assert loaded is not None and [m.content for m in loaded.messages] == ["y"]


async def test_listing_sees_other_writers(tmp_path: Path, anyio_backend: str) -> None:
    async with FileRepository(tmp_path / "s") as one, FileRepository(tmp_path / "s") as two:
        a = make_session(owner="o")
        await one.add(a)
        assert [s.id for s in await two.list(SessionQuery())] == [a.id]
        await two.save(changed(a, owner="p"), expected_revision=0)
        assert [s.id for s in await one.list(SessionQuery(owner="p"))] == [a.id]
        assert dict(await one.count_by_status("o")) == {}
        await two.delete(a.id)
        assert len(await one.list(SessionQuery())) == 0
        assert list(await one.expired(at(1000))) == []


# -- ids never become arbitrary paths ----------------------------------------------


async def test_bad_ids_never_touch_the_filesystem(tmp_path: Path, anyio_backend: str) -> None:
    bad_ids: list[Any] = [
        "../x",
        "../../etc/passwd",
        "a/b",
        "/etc/passwd",
        "..",
        "",
        "x\x00y",
        str(uuid.uuid4()),
        42,
        None,
    ]
    async with FileRepository(tmp_path / "store") as repo:
        before = tree(tmp_path)
        for bad in bad_ids:  # refused (InvalidSessionId) before any path is made
            with pytest.raises(InvalidSessionId):
                await repo.get(bad)
            with pytest.raises(InvalidSessionId):
                await repo.touch(bad, at=at(1), policy=POLICY)
            with pytest.raises(InvalidSessionId):
                await repo.delete(bad)
            with pytest.raises(InvalidSessionId):
                await repo.remove_expired(bad, now=at(1000))
            with pytest.raises(InvalidSessionId):
                await repo.append(bad, [msg("x")], at=at(1), policy=POLICY)
            with pytest.raises(InvalidSessionId):
                await repo.document_versions([bad])
        # unknown but valid ids leave no lock files behind either
        assert await repo.get(uuid.uuid4()) is None
        assert await repo.touch(uuid.uuid4(), at=at(1), policy=POLICY) is None
        assert tree(tmp_path) == before
        async with SessionManager(repo) as sessions:
            for bad in ("../../etc/passwd", "../x", "a/b", "/etc/passwd"):
                with pytest.raises(SessionNotFound):
                    await sessions.get(bad)
                with pytest.raises(SessionNotFound):
                    await sessions.update(bad, lambda s: s)
                with pytest.raises(SessionNotFound):
                    await sessions.delete(bad)
        assert tree(tmp_path) == before


# -- corruption and quarantine --------------------------------------------------------


async def test_truncated_documents_are_quarantined(repo: FileRepository) -> None:
    victim = make_session(messages=("one", "two"))
    other = make_session(messages=("safe",))
    await repo.add(victim)
    await repo.add(other)
    path = doc_path(repo, victim.id)
    good = path.read_bytes()
    offsets = sorted({*range(0, len(good) - 1, max(1, len(good) // 40)), len(good) - 2})
    for n, offset in enumerate(offsets):
        path.write_bytes(good[:offset])
        with pytest.raises(CorruptSessionError) as info:
            await repo.get(victim.id)
        assert info.value.session_id == victim.id and "quarantine" in str(info.value)
        assert not path.exists()
        kept = quarantined(repo)
        assert len(kept) == n + 1  # moved, never deleted, never overwritten
        assert {p.read_bytes() for p in kept} == {good[:o] for o in offsets[: n + 1]}
        assert await repo.get(other.id) == other
        assert await repo.get(victim.id) is None
    assert [s.id for s in await repo.list(SessionQuery())] == [other.id]
    assert (repo.directory / "quarantine" / f"{victim.id}.json").exists()
    assert (repo.directory / "quarantine" / f"{victim.id}.1.json").exists()


async def test_flipped_bytes_are_detected(repo: FileRepository) -> None:
    victim = make_session(messages=("some text", "more"), state={"n": 12345})
    other = make_session()
    await repo.add(victim)
    await repo.add(other)
    path = doc_path(repo, victim.id)
    good = path.read_bytes()
    detected = 0
    positions = range(0, len(good), max(1, len(good) // 60))
    for position in positions:
        damaged = bytearray(good)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        try:
            loaded = await repo.get(victim.id)
        except CorruptSessionError:
            detected += 1
            assert not path.exists()
        else:  # only harmless flips (e.g. in the name of the checksum key) may pass
            assert loaded == victim
    assert detected >= len(positions) - 2
    assert len(quarantined(repo)) == detected
    assert await repo.get(other.id) == other


async def test_foreign_documents_are_quarantined(repo: FileRepository) -> None:
    a, b = make_session(), make_session()
    await repo.add(a)
    await repo.add(b)
    foreign = [
        b'{"hello": "world"}',
        b"[1, 2, 3]",
        b"\xff\xfe\x00",
        b"",
        asyncsession.dumps(b),
    ]  # a valid document of another session
    for data in foreign:
        doc_path(repo, a.id).write_bytes(data)
        with pytest.raises(CorruptSessionError):
            await repo.get(a.id)
    assert len(quarantined(repo)) == len(foreign)
    assert await repo.get(b.id) == b


async def test_listing_skips_and_quarantines_corrupt_files(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad, late = make_session(created=1), make_session(created=2), make_session(created=3)
    async with FileRepository(tmp_path / "store") as repo:
        for s in (good, bad, late):
            await repo.add(s)
        doc_path(repo, bad.id).write_bytes(b'{"version": 1, "id": ')
        with caplog.at_level(logging.WARNING, logger="asyncsession.stores.files"):
            assert [s.id for s in await repo.list(SessionQuery())] == [late.id, good.id]
        assert any("corrupt" in r.getMessage() for r in caplog.records)
        assert len(quarantined(repo)) == 1
        # at open, too
        doc_path(repo, late.id).write_bytes(b"garbage")
    async with FileRepository(tmp_path / "store", shared=False) as repo:
        assert [s.id for s in await repo.list(SessionQuery())] == [good.id]
        assert dict(await repo.count_by_status()) == {asyncsession.SessionStatus.ACTIVE: 1}
        assert len(quarantined(repo)) == 2


async def test_a_newer_release_document_is_reported_once_per_change(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    older, newer = make_session(created=1), make_session(created=2)
    async with FileRepository(tmp_path / "store") as repo:
        for s in (older, newer):
            await repo.add(s)
        future = {**orjson.loads(version_0_document(newer)), "version": CURRENT_VERSION + 1}
        doc_path(repo, newer.id).write_bytes(orjson.dumps(future))
        with caplog.at_level(logging.WARNING, logger="asyncsession.stores.files"):
            assert [s.id for s in (await repo.list(SessionQuery())).items] == [older.id]
            await repo.add(make_session(created=3))  # the directory changes: rescans
            await repo.list(SessionQuery())
            await repo.delete(older.id)
            await repo.list(SessionQuery())
        skipped = [r for r in caplog.records if "skipping" in r.getMessage()]
        assert len(skipped) == 1 and str(newer.id) in skipped[0].getMessage()
        assert len(quarantined(repo)) == 0  # left in place for the newer release


async def test_quarantined_lists_the_quarantined_documents_by_session(
    repo: FileRepository,
) -> None:
    """What ``asyncsession export`` warns about: the store's counts leave these out."""
    twice, once, kept = make_session(created=1), make_session(created=2), make_session(created=3)
    for s in (twice, once, kept):
        await repo.add(s)
    assert await repo.quarantined() == []
    for victim in (twice, twice, once):
        if not doc_path(repo, victim.id).exists():  # quarantined before: added again
            await repo.add(victim)
        doc_path(repo, victim.id).write_bytes(b"garbage")
        with pytest.raises(CorruptSessionError):
            await repo.get(victim.id)
    folder = repo.directory / "quarantine"
    for junk in ("notes.txt", "x.json", f"{kept.id}.a.json", f"{str(kept.id).upper()}.json"):
        (folder / junk).write_bytes(b"not a quarantined document")
    expected = [
        (twice.id, folder / f"{twice.id}.json"),
        (twice.id, folder / f"{twice.id}.1.json"),
        (once.id, folder / f"{once.id}.json"),
    ]
    assert await repo.quarantined() == sorted(expected, key=lambda x: x[1])
    assert dict(await repo.count_by_status()) == {asyncsession.SessionStatus.ACTIVE: 1}
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()  # removed by hand: nothing quarantined
    assert await repo.quarantined() == []


async def test_unreadable_lists_the_documents_left_out_of_listings(
    tmp_path: Path, anyio_backend: str
) -> None:
    """A newer release's document and an entry that cannot be read are in no listing or
    count, so ``asyncsession export`` asks for them."""
    older, newer = make_session(created=1), make_session(created=2)
    async with FileRepository(tmp_path / "store") as repo:
        for s in (older, newer):
            await repo.add(s)
        assert await repo.unreadable() == []
        future = {**orjson.loads(version_0_document(newer)), "version": CURRENT_VERSION + 1}
        doc_path(repo, newer.id).write_bytes(orjson.dumps(future))
        directory_id = uuid.uuid4()
        doc_path(repo, directory_id).mkdir()  # read fails (EISDIR), as EACCES or EIO would
        expected = sorted(
            [(newer.id, doc_path(repo, newer.id)), (directory_id, doc_path(repo, directory_id))],
            key=lambda x: x[1],
        )
        assert await repo.unreadable() == expected  # the directory is scanned first
        assert [s.id for s in await repo.list(SessionQuery())] == [older.id]
        doc_path(repo, directory_id).rmdir()
        assert await repo.unreadable() == [(newer.id, doc_path(repo, newer.id))]
    async with FileRepository(tmp_path / "store", shared=False) as repo:  # found at open
        assert await repo.unreadable() == [(newer.id, doc_path(repo, newer.id))]


async def test_stale_temp_files_are_ignored_and_cleaned(tmp_path: Path, anyio_backend: str) -> None:
    session = make_session()
    async with FileRepository(tmp_path / "store") as repo:
        await repo.add(session)
        sessions_dir = repo.directory / "sessions"
        # what a crash between write and rename leaves: a complete-looking document
        fake = make_session()
        (sessions_dir / f".tmp-{fake.id}-dead.json").write_bytes(files.encode_document(fake))
        (sessions_dir / f".tmp-{session.id}-dead.json").write_bytes(b"{half")
        assert [s.id for s in await repo.list(SessionQuery())] == [session.id]
        assert await repo.get(fake.id) is None
    async with FileRepository(tmp_path / "store") as repo:
        assert temp_files(repo) == []
        assert await repo.get(session.id) == session


# -- locks ------------------------------------------------------------------------------


async def spawn(*args: str, backend: str) -> tuple[Process, BufferedByteReceiveStream]:
    """Start tests/files_child.py; its store runs on ``backend`` (the test's own: every
    child runs on asyncio and on trio)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FILES_CHILD_BACKEND=backend)
    process = await anyio.open_process([sys.executable, str(CHILD), *args], env=env, stderr=None)
    assert process.stdout is not None
    return process, BufferedByteReceiveStream(process.stdout)


@asynccontextmanager
async def locked_by_another_process(lock_file: Path, backend: str) -> AsyncIterator[None]:
    """Hold ``lock_file``'s flock in a child process (on ``backend``) for the block; the
    child then exits cleanly."""
    process, out = await spawn("hold-lock", str(lock_file), backend=backend)
    async with process:
        assert await out.receive_until(b"\n", 100) == b"locked"
        yield
        assert process.stdin is not None
        await process.stdin.aclose()
        assert await process.wait() == 0


async def test_lock_held_by_another_process_times_out(tmp_path: Path, anyio_backend: str) -> None:
    session = make_session()
    async with FileRepository(tmp_path / "store", lock_timeout=0.2) as repo:
        await repo.add(session)
        lock_file = repo.directory / "locks" / f"{session.id}.lock"
        async with locked_by_another_process(lock_file, anyio_backend):
            with pytest.raises(LockTimeout) as info:
                await repo.append(session.id, [msg("x")], at=at(1), policy=POLICY)
            error = info.value
            assert isinstance(error, StorageError) and error.recoverable
            assert str(lock_file) in str(error) and "lock_timeout" in str(error)
            with pytest.raises(LockTimeout):
                await repo.get(session.id)
        result = await repo.append(session.id, [msg("x")], at=at(1), policy=POLICY)
        assert result.revision == 1


# -- injected I/O faults ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("_write", errno.ENOSPC),
        ("_write", errno.EIO),
        ("_fsync", errno.ENOSPC),
        ("_fsync", errno.EIO),
        ("_replace", errno.EIO),
    ],
)
async def test_io_faults_keep_the_previous_version(
    repo: FileRepository, monkeypatch: pytest.MonkeyPatch, target: str, code: int
) -> None:
    session = make_session(messages=("kept",))
    await repo.add(session)
    before = doc_path(repo, session.id).read_bytes()

    def fail(*args: Any) -> Any:
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as patch:
        patch.setattr(files, target, fail)
        with pytest.raises(StorageError) as info:
            await repo.append(session.id, [msg("lost", 1)], at=at(1), policy=POLICY)
        with pytest.raises(StorageError):
            await repo.save(changed(session, state={"x": 1}), expected_revision=0)
    assert isinstance(info.value.__cause__, OSError)
    assert os.strerror(code) in str(info.value) and ".tmp-" in str(info.value)
    assert info.value.recoverable == (code == errno.ENOSPC)
    assert doc_path(repo, session.id).read_bytes() == before
    assert temp_files(repo) == []
    assert await repo.get(session.id) == session
    after = await repo.append(session.id, [msg("next", 1)], at=at(1), policy=POLICY)
    assert after.revision == 1 and after.messages.total == 2
    latest = await repo.get(session.id)
    assert latest is not None and [m.content for m in latest.messages] == ["kept", "next"]


async def test_fault_on_first_write_leaves_nothing(
    repo: FileRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = make_session()

    def fail(*args: Any) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(files, "_fsync", fail)
        with pytest.raises(StorageError):
            await repo.add(session)
    assert await repo.get(session.id) is None
    assert len(await repo.list(SessionQuery())) == 0
    assert list((repo.directory / "sessions").iterdir()) == []
    assert list((repo.directory / "locks").iterdir()) == []
    await repo.add(session)
    assert await repo.get(session.id) == session


async def test_directory_fsync_failure_reports_a_visible_change(
    repo: FileRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = make_session()
    await repo.add(session)
    real_fsync = os.fsync

    def fail_on_directories(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    new = changed(session, owner="carol")
    with monkeypatch.context() as patch:
        patch.setattr(files, "_fsync", fail_on_directories)
        with pytest.raises(StorageError, match="visible but may not survive"):
            await repo.save(new, expected_revision=0)
        # the error says the change happened, and the store agrees
        assert await repo.get(session.id) == new
        assert [s.id for s in await repo.list(SessionQuery(owner="carol"))] == [session.id]
        with pytest.raises(StorageError, match="visible but may not survive"):
            await repo.delete(session.id)
    assert await repo.get(session.id) is None
    assert len(await repo.list(SessionQuery(owner="carol"))) == 0


async def test_newer_schema_is_refused_not_quarantined(repo: FileRepository) -> None:
    session = make_session()
    await repo.add(session)
    path = doc_path(repo, session.id)
    future = orjson.loads(path.read_bytes())
    future.pop("checksum")
    future["version"] = 99
    path.write_bytes(orjson.dumps(future))
    with pytest.raises(asyncsession.SchemaVersionError):
        await repo.get(session.id)
    assert path.exists() and quarantined(repo) == []


async def test_a_checksummed_document_whose_version_bit_flipped_is_damaged(
    repo: FileRepository,
) -> None:
    """helper-182: the checksum was checked at the current version only, so a flipped bit
    that made "version": 1 read 0 passed, and the "version 0" migration dropped the
    messages and state (a read returned an empty session; the next write saved it).
    helper-199: a flip to 3, 5 or 9 said "Upgrade asyncsession" and left the file in
    place for good, though the checksum covers it at version 1. A newer release's own
    document (its checksum covers its version) is still refused and left in place."""
    sessions = [make_session(messages=("hi",), state={"plan": "pro"}) for _ in range(6)]
    for session in sessions:
        await repo.add(session)
    flips = (0x01, 0x02, 0x04, 0x08)  # "1" -> "0", "3", "5", "9"
    for session, flip in zip(sessions, flips, strict=False):
        path = doc_path(repo, session.id)
        data = bytearray(path.read_bytes())
        at = data.index(b'"version": 1') + len(b'"version": ')
        data[at] ^= flip
        path.write_bytes(bytes(data))
    *flipped, newer, intact = sessions
    future = orjson.loads(doc_path(repo, newer.id).read_bytes())
    future.pop("checksum")
    future["version"] = 3
    doc_path(repo, newer.id).write_bytes(files._encode(future, newer.id))
    assert await repo.document_versions([newer.id]) == {newer.id: 3}
    with pytest.raises(CorruptSessionError, match="checksum"):
        await repo.get(flipped[0].id)
    with pytest.raises(CorruptSessionError, match="damaged version field"):
        await repo.document_versions([flipped[1].id])
    for session in flipped[2:]:
        with pytest.raises(CorruptSessionError, match="damaged version field: it says"):
            await repo.get(session.id)
    assert sorted(path.name for path in quarantined(repo)) == sorted(
        f"{session.id}.json" for session in flipped
    )
    with pytest.raises(asyncsession.SchemaVersionError):
        await repo.get(newer.id)
    assert doc_path(repo, newer.id).exists()
    assert await repo.get(intact.id) == intact


async def test_document_versions_quarantine_what_get_would(
    repo: FileRepository, caplog: pytest.LogCaptureFixture
) -> None:
    other, legacy, newer = make_session(), make_session(), make_session()
    flipped, broken_legacy = make_session(state={"n": 12345}), make_session()
    for session in (other, legacy, newer, flipped, broken_legacy):
        await repo.add(session)
    doc_path(repo, legacy.id).write_bytes(version_0_document(legacy))
    future = {**orjson.loads(version_0_document(newer)), "version": 99}
    doc_path(repo, newer.id).write_bytes(orjson.dumps(future))
    path = doc_path(repo, flipped.id)  # valid JSON, but not what the checksum covers
    path.write_bytes(path.read_bytes().replace(b'"n": 12345', b'"n": 12346'))
    no_id = {**orjson.loads(version_0_document(broken_legacy)), "id": None}
    doc_path(repo, broken_legacy.id).write_bytes(orjson.dumps(no_id))
    ids = [other.id, legacy.id, newer.id, flipped.id, broken_legacy.id]

    with caplog.at_level(logging.WARNING, logger="asyncsession.stores.files"):
        for damaged in (flipped, broken_legacy):  # one per call, in the order asked
            with pytest.raises(CorruptSessionError) as info:
                await repo.document_versions(ids)
            assert info.value.session_id == damaged.id and "quarantine" in str(info.value)
            assert not doc_path(repo, damaged.id).exists()
    assert sum("is corrupt" in r.getMessage() for r in caplog.records) == 2
    assert len(quarantined(repo)) == 2
    versions = await repo.document_versions(ids)
    assert versions == {other.id: CURRENT_VERSION, legacy.id: 0, newer.id: 99}
    assert doc_path(repo, newer.id).exists()  # a newer release's document is left alone
    assert await repo.get(flipped.id) is None


# -- real processes -----------------------------------------------------------------------


async def test_kill_9_during_concurrent_writes_loses_no_acknowledged_write(
    tmp_path: Path, anyio_backend: str
) -> None:
    store = tmp_path / "store"
    process, out = await spawn("crash", str(store), "20", "1000", "20", backend=anyio_backend)
    created: set[uuid.UUID] = set()
    acked: dict[uuid.UUID, int] = {}
    async with process:
        while len(acked) < 20 or sum(acked.values()) < 300:
            kind, _, rest = (await out.receive_until(b"\n", 200)).decode().partition(" ")
            if kind == "add":
                created.add(uuid.UUID(rest))
            else:
                assert kind == "ack", kind
                sid, revision = rest.split()
                acked[uuid.UUID(sid)] = max(acked.get(uuid.UUID(sid), 0), int(revision))
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
    assert len(created) == 20
    async with FileRepository(store) as repo:
        assert temp_files(repo) == []  # stale temporary files were removed at open
        assert quarantined(repo) == []  # no half-written document
        listed = {s.id for s in await repo.list(SessionQuery(limit=100))}
        assert listed == created
        total = 0
        for sid in created:
            session = await repo.get(sid)
            assert session is not None
            assert session.revision >= acked.get(sid, 0)
            assert session.messages.total == session.revision
            total += session.revision
        assert sum(acked.values()) <= total < 1000


async def test_two_processes_append_to_one_session(tmp_path: Path, anyio_backend: str) -> None:
    store = tmp_path / "store"
    session = attrs.evolve(make_session(), expires_at=None)  # children use the real time
    async with FileRepository(store) as repo:
        await repo.add(session)
    args = ("append", str(store), str(session.id))
    first, first_out = await spawn(*args, "a", "500", backend=anyio_backend)
    second, second_out = await spawn(*args, "b", "500", backend=anyio_backend)
    async with first, second:
        assert await first_out.receive_until(b"\n", 100) == b"done"
        assert await second_out.receive_until(b"\n", 100) == b"done"
        assert await first.wait() == 0 and await second.wait() == 0
    async with FileRepository(store) as repo:
        loaded = await repo.get(session.id)
    assert loaded is not None
    assert loaded.revision == 1000 and loaded.messages.total == 1000
    contents = [m.content for m in loaded.messages]
    assert len(set(contents)) == 1000
    for tag in ("a", "b"):  # each process's messages arrive once, in its order
        assert [c for c in contents if c.startswith(f"{tag}-")] == [
            f"{tag}-{i}" for i in range(500)
        ]


async def test_deleted_session_lock_files_do_not_accumulate(repo: FileRepository) -> None:
    sessions = [make_session() for _ in range(5)]
    for s in sessions:
        await repo.add(s)
    assert len(list((repo.directory / "locks").iterdir())) == 5
    for s in sessions[:3]:
        assert await repo.delete(s.id)
    expired = attrs.evolve(sessions[3])
    assert await repo.remove_expired(expired.id, now=at(61)) is not None
    assert len(list((repo.directory / "locks").iterdir())) == 1


async def test_kill_9_leaves_no_lock_file_without_a_document(
    tmp_path: Path, anyio_backend: str
) -> None:
    store = tmp_path / "store"
    for step in ("add", "delete"):
        process, out = await spawn("stall-in", step, str(store), backend=anyio_backend)
        async with process:
            line = (await out.receive_until(b"\n", 100)).decode()
            sid = uuid.UUID(line.removeprefix("stalled "))
            # the crash point: the lock file exists, the document (and, so that only
            # the orphan-lock cleanup can remove the lock, any temporary file) does not
            assert (store / "locks" / f"{sid}.lock").exists()
            assert list((store / "sessions").iterdir()) == []
            process.send_signal(signal.SIGKILL)
            assert await process.wait() == -signal.SIGKILL
        async with FileRepository(store):
            assert list((store / "locks").iterdir()) == []
            assert list((store / "sessions").iterdir()) == []


# -- lock waits, expiry under a held lock, leftovers of crashes ---------------------------


def hold_flock(path: Path) -> int:
    """Lock ``path`` through a new open file description (flock treats it as another
    process); close the returned fd to unlock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def lock_path(repo: FileRepository, sid: uuid.UUID) -> Path:
    return repo.directory / "locks" / f"{sid}.lock"


async def test_lock_timeout_bounds_the_wait_of_queued_tasks(
    tmp_path: Path, anyio_backend: str
) -> None:
    """lock_timeout bounds the whole wait, counted from the call: queued behind this
    process's tasks, then polling another process's lock file. Had a waiter started its
    clock only when its turn in the queue came, the waiters queued behind a task that
    keeps the session would wait as long as it does; here that is for ever, and the
    hang guard fails the test. Nothing depends on how fast the machine is."""
    waiters = 6
    async with FileRepository(tmp_path / "store", lock_timeout=0.05, fsync=False) as repo:
        session = make_session()
        await repo.add(session)

        async def outcomes_of_waiters() -> list[str]:
            outcomes: list[str] = []

            async def wait_for_the_lock() -> None:
                try:
                    await repo.get(session.id)
                except LockTimeout:
                    outcomes.append("timed out")
                else:
                    outcomes.append("got the lock")

            with anyio.move_on_after(30) as guard:  # a hang guard, no timing requirement
                async with anyio.create_task_group() as tg:
                    for _ in range(waiters):
                        tg.start_soon(wait_for_the_lock)
            assert not guard.cancelled_caught, f"{waiters - len(outcomes)} waiters never gave up"
            return outcomes

        # Queued behind a task of this process that holds the session (as a long
        # operation does) and lets go only after every waiter gave up.
        async with repo._session_locks(session.id):
            assert await outcomes_of_waiters() == ["timed out"] * waiters
        # Queued behind each other, the first polling another process's lock file.
        fd = hold_flock(lock_path(repo, session.id))
        try:
            assert await outcomes_of_waiters() == ["timed out"] * waiters
        finally:
            os.close(fd)
        assert await repo.get(session.id) == session


async def test_remove_expired_skips_a_session_locked_elsewhere(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with FileRepository(tmp_path / "store", lock_timeout=0.05, fsync=False) as repo:
        stuck, other = make_session(), make_session()
        for s in (stuck, other):
            await repo.add(s)
        fd = hold_flock(lock_path(repo, stuck.id))
        try:
            with caplog.at_level(logging.WARNING, logger="asyncsession.stores.files"):
                assert await repo.remove_expired(stuck.id, now=at(61)) is None
            removed = await repo.remove_expired(other.id, now=at(61))
            assert removed is not None and removed.id == other.id
        finally:
            os.close(fd)
        assert any(str(stuck.id) in r.getMessage() for r in caplog.records)
        assert list(await repo.expired(at(61))) == [stuck.id]  # found again by the next pass
        removed = await repo.remove_expired(stuck.id, now=at(61))
        assert removed is not None and removed.id == stuck.id
        assert list(await repo.expired(at(61))) == []


def records_about(
    caplog: pytest.LogCaptureFixture, sid: uuid.UUID, level: int
) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == level and str(sid) in r.getMessage()]


async def test_an_expired_session_locked_by_another_process_is_warned_about_once(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Cleanup passes over a session another process keeps locked, and tries it again
    at each pass. The store used to warn "expiry skipped" at every pass, so a
    long-running app's log filled with one line per cleanup_interval; now it warns
    once, and says at info level when the session is removed at last."""
    clock = ManualClock()
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    repo = FileRepository(tmp_path / "store", lock_timeout=0.05, fsync=False)
    async with SessionManager(repo, idle_timeout=60, cleanup_interval=None, clock=clock) as mgr:
        sid = (await mgr.create()).id
        async with locked_by_another_process(lock_path(repo, sid), anyio_backend):
            clock.advance(61)
            for _ in range(3):
                assert await mgr.purge_expired() == 0
        [warning] = records_about(caplog, sid, logging.WARNING)
        assert "locked by another process" in warning.getMessage()
        assert len(records_about(caplog, sid, logging.DEBUG)) == 2  # the later passes
        assert await mgr.purge_expired() == 1
        [info] = records_about(caplog, sid, logging.INFO)
        assert "at last" in info.getMessage()
        assert len(records_about(caplog, sid, logging.WARNING)) == 1


async def test_a_damaged_document_locked_by_another_process_is_warned_about_once(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A scan (each cleanup pass lists expired sessions) finds a damaged document whose
    lock another process holds, so it cannot quarantine it and reads it again at the
    next scan. It used to warn at each scan; now once, and at info level when the
    document is quarantined at last."""
    clock = ManualClock()
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    repo = FileRepository(tmp_path / "store", lock_timeout=0.05, fsync=False)
    async with SessionManager(repo, idle_timeout=60, cleanup_interval=None, clock=clock) as mgr:
        sid = (await mgr.create()).id
        async with locked_by_another_process(lock_path(repo, sid), anyio_backend):
            path = doc_path(repo, sid)
            path.write_bytes(path.read_bytes().replace(b'"revision": 0', b'"revision": 7'))
            clock.advance(61)
            for _ in range(3):
                await mgr.create()  # the directory changed: the pass scans it again
                assert await mgr.purge_expired() == 0
        [warning] = records_about(caplog, sid, logging.WARNING)
        assert "looks corrupt but its lock is held" in warning.getMessage()
        assert len(records_about(caplog, sid, logging.DEBUG)) == 2
        await mgr.create()
        assert await mgr.purge_expired() == 0
        [info] = records_about(caplog, sid, logging.INFO)
        assert "is quarantined" in info.getMessage()
        assert [p.name for p in quarantined(repo)] == [f"{sid}.json"]


async def test_an_expired_session_revived_elsewhere_and_stuck_again_is_warned_again(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Expiry skips a session another process keeps locked; another writer then revives
    it, so expired() stops listing it and remove_expired() never says it was dealt
    with. Its note used to stay for as long as the session lived: when it expired
    again while locked, that new episode was logged at debug level only."""
    clock, other_clock = ManualClock(), ManualClock()
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    root = tmp_path / "store"
    repo = FileRepository(root, lock_timeout=0.05, fsync=False)
    async with (
        SessionManager(repo, idle_timeout=60, cleanup_interval=None, clock=clock) as mgr,
        SessionManager(
            FileRepository(root, fsync=False),
            idle_timeout=60,
            cleanup_interval=None,
            clock=other_clock,
        ) as other,
    ):
        sid = (await mgr.create()).id
        clock.advance(61)
        async with locked_by_another_process(lock_path(repo, sid), anyio_backend):
            assert await mgr.purge_expired() == 0
        assert len(records_about(caplog, sid, logging.WARNING)) == 1
        other_clock.advance(50)
        await other.add_message(sid, "user", "still here")  # revived: expires at 110
        assert await mgr.purge_expired() == 0
        [info] = records_about(caplog, sid, logging.INFO)
        assert "no longer expired" in info.getMessage()
        assert repo._expiry_notes.noted() == []
        clock.advance(1000)
        async with locked_by_another_process(lock_path(repo, sid), anyio_backend):
            assert await mgr.purge_expired() == 0
        assert len(records_about(caplog, sid, logging.WARNING)) == 2
        assert await mgr.purge_expired() == 1


async def test_a_damaged_document_read_fine_before_the_next_scan_is_warned_again(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A scan leaves a damaged document in place (its lock is held elsewhere); the
    writer then repairs it, and a get() of this process reads it before any scan does,
    so no scan reads it again to say so. Its note used to stay: when the document was
    damaged again under a held lock, the scan only logged at debug level."""
    clock = ManualClock()
    caplog.set_level(logging.DEBUG, logger="asyncsession")
    repo = FileRepository(tmp_path / "store", lock_timeout=0.05, fsync=False)
    async with SessionManager(repo, idle_timeout=60, cleanup_interval=None, clock=clock) as mgr:
        sid = (await mgr.create()).id
        path = doc_path(repo, sid)
        good = path.read_bytes()
        damaged = good.replace(b'"revision": 0', b'"revision": 7')
        for episode in (1, 2):
            async with locked_by_another_process(lock_path(repo, sid), anyio_backend):
                path.write_bytes(damaged)
                await mgr.create()  # the directory changed: the pass scans it again
                assert await mgr.purge_expired() == 0
                path.write_bytes(good)  # repaired by the lock's holder
            assert len(records_about(caplog, sid, logging.WARNING)) == episode
            assert await repo.get(sid) is not None
            [*_, info] = records_about(caplog, sid, logging.INFO)
            assert "can be read again" in info.getMessage()
            assert repo._scan_notes.noted() == []
        assert quarantined(repo) == []


async def test_beyond_the_sessions_remembered_one_warning_says_so(
    tmp_path: Path,
    anyio_backend: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The memory of sessions passed over is bounded: beyond it, one warning says so and
    the others are logged at debug level, at every pass."""
    monkeypatch.setattr(files, "_NOTES_REMEMBERED", 2)
    caplog.set_level(logging.DEBUG, logger="asyncsession.stores.files")
    async with FileRepository(tmp_path / "store", lock_timeout=0.05, fsync=False) as repo:
        stuck = [make_session() for _ in range(4)]
        for session in stuck:
            await repo.add(session)
        fds = [hold_flock(lock_path(repo, session.id)) for session in stuck]
        try:
            for _ in range(3):
                for session in stuck:
                    assert await repo.remove_expired(session.id, now=at(61)) is None
        finally:
            for fd in fds:
                os.close(fd)
        warnings = [len(records_about(caplog, s.id, logging.WARNING)) for s in stuck]
        assert warnings == [1, 1, 1, 0]
        overflow = records_about(caplog, stuck[2].id, logging.WARNING)[0].getMessage()
        assert "more than 2 sessions" in overflow
        assert sorted(repo._expiry_notes.noted()) == sorted(s.id for s in stuck[:2])
        assert [len(records_about(caplog, s.id, logging.DEBUG)) for s in stuck] == [2, 2, 2, 3]


async def test_orphan_lock_files_are_removed_at_open(tmp_path: Path, anyio_backend: str) -> None:
    root = tmp_path / "store"
    kept = make_session()
    async with FileRepository(root) as repo:
        await repo.add(kept)
    locks = root / "locks"
    orphan, busy = uuid.uuid4(), uuid.uuid4()
    (locks / f"{orphan}.lock").touch()  # what a kill after deleting a document leaves
    (locks / "notes.txt").write_text("not a lock file")
    fd = hold_flock(locks / f"{busy}.lock")  # another process is adding this session
    try:
        async with FileRepository(root) as repo:
            assert sorted(p.name for p in locks.iterdir()) == sorted(
                [f"{kept.id}.lock", f"{busy}.lock", "notes.txt"]
            )
            assert await repo.get(kept.id) == kept
    finally:
        os.close(fd)
    async with FileRepository(root):
        assert sorted(p.name for p in locks.iterdir()) == sorted([f"{kept.id}.lock", "notes.txt"])


# -- entries that are not files: symbolic links, FIFOs -------------------------------------
# In a store shared by a group (file_mode=0o660, directories 0o770), any member may
# replace an entry of sessions/ or locks/. The store runs with its own privileges (maybe
# root), so it never follows such an entry out of its directory, nor waits on it.


def lexists(path: Path) -> bool:
    """Whether anything, a dangling symbolic link included, has the name ``path``."""
    return os.path.lexists(path)


def outside_files(tmp_path: Path) -> dict[str, tuple[bytes, int, int]]:
    """Content, mode and link count of every file in ``tmp_path / "outside"``."""
    return {
        p.name: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode), p.stat().st_nlink)
        for p in sorted((tmp_path / "outside").iterdir())
    }


async def test_a_lock_file_replaced_by_a_symlink_is_refused_and_never_followed(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    missing = outside / "nologin"  # what the store process would create, as root
    existing = outside / "passwd"
    existing.write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    existing.chmod(0o644)
    before = outside_files(tmp_path)
    root = tmp_path / "store"
    async with FileRepository(root, file_mode=0o660, lock_timeout=1) as repo:
        session, other = make_session(created=1), make_session(created=2)
        await repo.add(session)
        await repo.add(other)
        lock = lock_path(repo, session.id)
        for target in (missing, existing):
            lock.unlink(missing_ok=True)
            lock.symlink_to(target)  # a group member swaps the lock file for a link
            for attempt in (
                lambda: repo.get(session.id),
                lambda: repo.append(session.id, [msg("x", 1)], at=at(1), policy=POLICY),
                lambda: repo.delete(session.id),
            ):
                with pytest.raises(StorageError, match="symbolic link") as info:
                    await attempt()
                assert str(lock) in str(info.value) and not info.value.recoverable
                assert not isinstance(info.value, LockTimeout)
            assert not lexists(missing)
            assert outside_files(tmp_path) == before
            assert lock.is_symlink()  # left for the administrator to look at
            assert await repo.get(other.id) == other  # other sessions keep working
        lock.unlink()
        assert await repo.get(session.id) == session
    # at open: the lock file of a session without a document is checked, not followed
    orphan = root / "locks" / f"{uuid.uuid4()}.lock"
    orphan.symlink_to(missing)
    with caplog.at_level(logging.WARNING, logger="asyncsession.stores.files"):
        async with FileRepository(root, file_mode=0o660) as repo:
            assert await repo.get(session.id) == session
    assert not lexists(missing)
    assert outside_files(tmp_path) == before
    assert any(str(orphan) in r.getMessage() for r in caplog.records)


async def test_a_document_replaced_by_a_symlink_is_quarantined_never_followed(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_link = os.link

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        # os.link as on macOS and Python >= 3.14 on Linux: follows a link unless told not to
        if kwargs.pop("follow_symlinks", True):
            src = os.path.realpath(src)
        real_link(src, dst, follow_symlinks=False, **kwargs)

    monkeypatch.setattr(os, "link", link)
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "store"
    read, listed, versioned, kept, at_open = (make_session(created=n) for n in range(1, 6))
    async with FileRepository(root, file_mode=0o660) as repo:
        for s in (read, listed, versioned, kept, at_open):
            await repo.add(s)
        links: dict[uuid.UUID, Path] = {}
        for s in (read, listed, versioned):
            # a valid document of the session, elsewhere: the store must not take it
            target = outside / f"{s.id}.json"
            target.write_bytes(files.encode_document(changed(s, state={"planted": True})))
            path = doc_path(repo, s.id)
            path.unlink()
            path.symlink_to(target)
            links[s.id] = target
        before = outside_files(tmp_path)
        with pytest.raises(CorruptSessionError, match="symbolic link"):
            await repo.document_versions([versioned.id])
        with pytest.raises(CorruptSessionError, match="symbolic link") as info:
            await repo.get(read.id)
        assert info.value.session_id == read.id and "quarantine" in str(info.value)
        assert [s.id for s in await repo.list(SessionQuery())] == [at_open.id, kept.id]
        for s in (read, listed, versioned):
            assert await repo.get(s.id) is None
            assert not lexists(doc_path(repo, s.id))
        assert await repo.get(kept.id) == kept
        # quarantine holds the links themselves, never a hard link to their targets
        aside = await repo.quarantined()
        assert sorted(sid for sid, _ in aside) == sorted(links)
        for sid, path in aside:
            assert path.is_symlink() and Path(os.readlink(path)) == links[sid]
        assert outside_files(tmp_path) == before  # targets untouched, link count 1
        path = doc_path(repo, at_open.id)
    target = outside / "at-open.json"
    target.write_bytes(files.encode_document(at_open))
    path.unlink()
    path.symlink_to(target)
    async with FileRepository(root, file_mode=0o660, shared=False) as repo:  # found at open
        assert [s.id for s in await repo.list(SessionQuery())] == [kept.id]
        assert await repo.get(at_open.id) is None
        assert (root / "quarantine" / f"{at_open.id}.json").is_symlink()
        assert await repo.unreadable() == []
    assert target.read_bytes() == files.encode_document(at_open)
    assert target.stat().st_nlink == 1


async def test_a_fifo_with_a_document_name_is_quarantined_not_waited_on(
    tmp_path: Path, anyio_backend: str
) -> None:
    root = tmp_path / "store"
    read, listed, kept = make_session(created=1), make_session(created=2), make_session(created=3)
    fifos: list[Path] = []
    unblocked: list[Path] = []
    done = threading.Event()

    def unblock() -> None:
        """After 5 s, open each FIFO for writing whenever a reader waits on it (a reader
        blocked in open() then reads end-of-file): a store that waits fails, not hangs."""
        if done.wait(5):
            return
        while not done.wait(0.2):
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    continue  # no reader waiting (ENXIO), or moved away
                unblocked.append(fifo)

    watcher = threading.Thread(target=unblock, daemon=True)
    watcher.start()
    try:
        async with FileRepository(root, file_mode=0o660) as repo:
            for s in (read, listed, kept):
                await repo.add(s)
            for s in (read, listed):
                doc_path(repo, s.id).unlink()
                os.mkfifo(doc_path(repo, s.id))
                fifos.append(doc_path(repo, s.id))
            with pytest.raises(CorruptSessionError, match="FIFO"):
                await repo.get(read.id)
            assert [s.id for s in await repo.list(SessionQuery())] == [kept.id]
            aside = await repo.quarantined()
            assert sorted(sid for sid, _ in aside) == sorted([read.id, listed.id])
            assert all(stat.S_ISFIFO(p.lstat().st_mode) for _, p in aside)
            assert await repo.get(kept.id) == kept
        late = root / "sessions" / f"{uuid.uuid4()}.json"
        os.mkfifo(late)
        fifos.append(late)
        async with FileRepository(root, file_mode=0o660, shared=False) as repo:  # at open
            assert [s.id for s in await repo.list(SessionQuery())] == [kept.id]
        assert not lexists(late)
        assert len(list((root / "quarantine").iterdir())) == 3
    finally:
        done.set()
        watcher.join()
    assert unblocked == []


# -- unreadable entries, failing system calls, platforms ---------------------------------


async def test_an_unreadable_entry_is_skipped_and_reported_once(
    tmp_path: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad_id = make_session(created=1), uuid.uuid4()
    with caplog.at_level(logging.WARNING, logger="asyncsession.stores.files"):
        async with FileRepository(tmp_path / "store") as repo:
            await repo.add(good)
            bad = doc_path(repo, bad_id)
            bad.mkdir()  # read fails (EISDIR), as EACCES or EIO would on one file
            assert [s.id for s in await repo.list(SessionQuery())] == [good.id]
            late = make_session(created=2)
            await repo.add(late)  # the directory changes: rescans
            assert [s.id for s in await repo.list(SessionQuery())] == [late.id, good.id]
            assert dict(await repo.count_by_status()) == {asyncsession.SessionStatus.ACTIVE: 2}
            assert set(await repo.expired(at(1000))) == {good.id, late.id}
            with pytest.raises(StorageError, match=str(bad)):
                await repo.get(bad_id)
            assert len(quarantined(repo)) == 0  # not damaged, just unreadable: left alone
        reported = [r for r in caplog.records if str(bad) in r.getMessage()]
        assert len(reported) == 1 and reported[0].getMessage().startswith("skipping")
        async with FileRepository(tmp_path / "store", shared=False) as repo:  # at open, too
            assert [s.id for s in await repo.list(SessionQuery())] == [late.id, good.id]


async def test_an_entry_whose_read_failed_once_is_read_again(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "store"
    async with FileRepository(root, fsync=False) as a, FileRepository(root, fsync=False) as b:
        session = make_session()
        await b.add(session)  # another process adds a session
        real = FileRepository._read_bytes
        failed: list[str] = []

        def flaky(path: str) -> tuple[bytes, Any]:
            if not failed and str(session.id) in path:  # the fd limit is hit once
                failed.append(path)
                error = OSError(errno.EMFILE, os.strerror(errno.EMFILE))
                raise files._storage_error("open", path, error) from error
            return real(path)

        monkeypatch.setattr(files, "_RETRY_FAILING_S", 0.0)  # read it again at once
        monkeypatch.setattr(a, "_read_bytes", flaky)
        assert [s.id for s in await a.list(SessionQuery())] == []  # left out this time
        monkeypatch.setattr(a, "_read_bytes", real)
        assert failed
        assert [s.id for s in await a.list(SessionQuery())] == [session.id]  # read again
        assert list(await a.expired(at(10**6))) == [session.id]


async def test_an_entry_that_keeps_failing_is_reported_once_and_costs_no_rescan_per_call(
    tmp_path: Path,
    anyio_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = tmp_path / "store"
    async with FileRepository(root, fsync=False) as a, FileRepository(root, fsync=False) as b:
        bad = make_session()
        await b.add(bad)
        await b.add(make_session())
        real = FileRepository._read_bytes

        def denied(path: str) -> tuple[bytes, Any]:  # another user's file, mode 0600
            if str(bad.id) in path:
                error = OSError(errno.EACCES, os.strerror(errno.EACCES))
                raise files._storage_error("open", path, error) from error
            return real(path)

        monkeypatch.setattr(a, "_read_bytes", denied)
        scans: list[object] = []
        scandir = os.scandir

        def counting(path: Any) -> Any:
            scans.append(path)
            return scandir(path)

        past = time.time_ns() - 10 * 10**9  # the directory's last change is not recent
        os.utime(root / "sessions", ns=(past, past))
        with caplog.at_level(logging.WARNING, logger="asyncsession.stores.files"):
            assert len(await a.list(SessionQuery())) == 1
            monkeypatch.setattr(files.os, "scandir", counting)
            for _ in range(5):  # nothing changes in the directory meanwhile
                await a.list(SessionQuery())
                await a.expired(at(10**6))
            assert scans == []  # the retry waits _RETRY_FAILING_S, not the next call
            monkeypatch.setattr(files, "_RETRY_FAILING_S", 0.0)
            a._retry_at = 0.0  # the retry is due
            assert len(await a.list(SessionQuery())) == 1 and len(scans) == 1
        reported = [r for r in caplog.records if "skipping" in r.getMessage()]
        assert len(reported) == 1


async def test_a_failed_close_of_the_temporary_file_closes_it_once(
    tmp_path: Path, repo: FileRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = make_session()
    await repo.add(session)
    before = doc_path(repo, session.id).read_bytes()
    closed: list[int] = []
    others: list[int] = []

    def close(fd: int) -> None:  # EIO at close (NFS): the fd is released all the same
        closed.append(fd)
        os.close(fd)
        if len(closed) == 1:
            # another thread opens a file now and may get the freed number
            others.append(os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT))
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    with monkeypatch.context() as patch:
        patch.setattr(files, "_close", close)
        with pytest.raises(StorageError, match="Could not close"):
            await repo.append(session.id, [msg("lost", 1)], at=at(1), policy=POLICY)
    assert len(closed) == 1
    os.fstat(others[0])  # still open: nobody closed it behind its owner's back
    os.close(others[0])
    assert doc_path(repo, session.id).read_bytes() == before
    assert temp_files(repo) == []


async def test_a_failed_lock_file_check_leaves_the_lock_free(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with FileRepository(tmp_path / "store", lock_timeout=0.05) as repo:
        session = make_session()
        await repo.add(session)
        lock = os.fspath(lock_path(repo, session.id))
        real_lstat = os.lstat

        def lstat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if os.fspath(path) == lock:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real_lstat(path, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(os, "lstat", lstat)
            with pytest.raises(StorageError, match=f"Could not check the lock file {lock}"):
                await repo.get(session.id)
        os.close(hold_flock(Path(lock)))  # the failed attempt did not keep the flock
        assert await repo.get(session.id) == session


async def test_a_failed_document_lookup_is_an_error_and_keeps_the_lock_file(
    repo: FileRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = make_session()
    await repo.add(session)
    path = os.fspath(doc_path(repo, session.id))
    real_stat, real_lstat = os.stat, os.lstat

    def failing(real: Any) -> Any:
        def stat(name: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if os.fspath(name) == path:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            result: os.stat_result = real(name, *args, **kwargs)
            return result

        return stat

    with monkeypatch.context() as patch:
        patch.setattr(os, "stat", failing(real_stat))
        patch.setattr(os, "lstat", failing(real_lstat))
        with pytest.raises(StorageError, match=path):  # not "no such session"
            await repo.get(session.id)
        with pytest.raises(StorageError, match=path):  # not written over the document
            await repo.add(changed(session, owner="carol"))
    assert lock_path(repo, session.id).exists()  # a live session's lock file stays
    assert await repo.get(session.id) == session


async def test_a_document_that_cannot_be_removed_is_quarantined_once(
    repo: FileRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Quarantine links a damaged document into quarantine/, then removes it from
    sessions/. When the removal failed (EACCES, EBUSY, EIO), each later read or scan
    linked the same file again, as <id>.1.json, <id>.2.json, ... without bound; now it
    finds its earlier link and only tries the removal again. A different damaged version
    of the session still gets a copy of its own."""
    session = make_session()
    await repo.add(session)
    path = doc_path(repo, session.id)
    real_unlink = os.unlink

    def unlink(name: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(name) == os.fspath(path):  # e.g. sessions/ not writable by this user
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        real_unlink(name, *args, **kwargs)

    def replace_with(data: bytes) -> None:  # a new file, as every write of a store makes
        tmp = path.with_name(".tmp-by-hand")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    async def listed() -> list[uuid.UUID]:
        await repo.add(make_session())  # the directory changed: the listing scans it
        return [s.id for s in await repo.list(SessionQuery())]

    replace_with(b"garbage")
    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", unlink)
        for _ in range(3):
            with pytest.raises(CorruptSessionError, match="quarantine failed"):
                await repo.get(session.id)
            assert session.id not in await listed()
        assert [p.name for p in quarantined(repo)] == [f"{session.id}.json"]
        replace_with(b"other garbage")
        for _ in range(3):
            with pytest.raises(CorruptSessionError, match="quarantine failed"):
                await repo.get(session.id)
            assert session.id not in await listed()
    assert path.exists()
    kept = quarantined(repo)
    assert {p.name: p.read_bytes() for p in kept} == {
        f"{session.id}.json": b"garbage",
        f"{session.id}.1.json": b"other garbage",
    }
    assert session.id not in await listed()  # the removal works now
    assert not path.exists()
    assert quarantined(repo) == kept
    assert await repo.get(session.id) is None


async def test_a_failed_lookup_of_the_document_in_quarantine_names_both_files(
    repo: FileRepository, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding an earlier quarantine link compares the document with it; an I/O error
    on the document itself was logged as "could not look up <the quarantine copy>"."""
    session = make_session()
    await repo.add(session)
    path = doc_path(repo, session.id)
    path.write_bytes(b"garbage")
    real_unlink, real_link, real_lstat = os.unlink, os.link, os.lstat
    linked_before = False

    def unlink(name: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(name) == os.fspath(path):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        real_unlink(name, *args, **kwargs)

    def link(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal linked_before
        try:
            real_link(src, dst, *args, **kwargs)
        except FileExistsError:
            linked_before = True  # quarantine now compares the document with dst
            raise

    def lstat(name: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if linked_before and os.fspath(name) == os.fspath(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_lstat(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "unlink", unlink)
        with pytest.raises(CorruptSessionError, match="quarantine failed"):
            await repo.get(session.id)  # linked into quarantine/, not removed
        caplog.clear()
        patch.setattr(os, "link", link)
        patch.setattr(os, "lstat", lstat)
        with pytest.raises(CorruptSessionError, match="quarantine failed"):
            await repo.get(session.id)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    copy = repo.directory / "quarantine" / f"{session.id}.json"
    assert record.getMessage() == f"could not compare {path} with {copy}"


async def test_a_removed_quarantine_directory_is_recreated(repo: FileRepository) -> None:
    session = make_session()
    await repo.add(session)
    (repo.directory / "quarantine").rmdir()
    doc_path(repo, session.id).write_bytes(b"garbage")
    with pytest.raises(CorruptSessionError, match="moved to quarantine"):
        await repo.get(session.id)
    assert [p.name for p in quarantined(repo)] == [f"{session.id}.json"]
    assert not doc_path(repo, session.id).exists()


async def test_first_open_makes_the_new_directories_durable(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def record(fd: int) -> None:
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    def key(path: Path) -> tuple[int, int]:
        st = path.stat()
        return (st.st_dev, st.st_ino)

    monkeypatch.setattr(files, "_fsync", record)
    root = tmp_path / "store"
    async with FileRepository(root):
        pass
    assert {key(tmp_path), key(root)} <= synced  # the entries of root and of sessions/ etc.
    synced.clear()
    async with FileRepository(root):
        pass
    assert synced == set()  # nothing new to make durable


def test_lock_timeout_survives_pickling() -> None:
    error = LockTimeout(uuid.uuid4(), "/store/locks/x.lock", 0.5)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is LockTimeout and str(copy) == str(error)
    assert (copy.session_id, copy.path, copy.timeout) == (error.session_id, error.path, 0.5)
    assert copy.recoverable


async def test_import_works_without_fcntl(anyio_backend: str) -> None:
    code = (
        "import sys\n"
        "sys.modules['fcntl'] = None  # as on Windows\n"
        "import asyncsession\n"
        "try:\n"
        "    asyncsession.FileRepository('store')\n"
        "except asyncsession.InvalidConfiguration as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = await anyio.run_process([sys.executable, "-c", code], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == (
        "FileRepository needs POSIX file locks (fcntl); use SQLiteRepository on this platform."
    )


@pytest.mark.parametrize("backends", [("asyncio", "trio"), ("trio", "trio")], ids="+".join)
def test_one_store_serves_managers_on_event_loops_in_two_threads(
    backends: tuple[str, str], tmp_path: Path
) -> None:
    # helper-204: the per-session locks woke a waiter of the other loop from the wrong
    # thread, and the worker-thread limiter belonged to the loop that opened the store:
    # raw AssertionError/RuntimeError, and false LockTimeouts after long waits.
    repo = FileRepository(tmp_path / "s", fsync=False)

    async def create() -> uuid.UUID:
        async with SessionManager(repo) as sessions:
            return (await sessions.create()).id

    sid = anyio.run(create)
    both_open, both_done = threading.Barrier(2), threading.Barrier(2)

    async def writer(name: str) -> None:
        async with SessionManager(repo) as sessions:
            await anyio.to_thread.run_sync(both_open.wait)  # the store is open in both

            async def add(n: int) -> None:
                for i in range(10):
                    await sessions.add_message(sid, "user", f"{name}-{n}-{i}")

            with anyio.fail_after(120):  # a hang guard
                async with anyio.create_task_group() as tg:
                    for n in range(2):
                        tg.start_soon(add, n)
            await anyio.to_thread.run_sync(both_done.wait)

    def release_the_other() -> None:
        both_open.abort()
        both_done.abort()

    assert run_in_threads(writer, backends, on_failure=release_the_other) == []

    async def read() -> list[str]:
        async with SessionManager(repo) as sessions:
            return [m.content for m in (await sessions.get(sid)).messages]

    contents = anyio.run(read)
    assert len(contents) == len(set(contents)) == 2 * 2 * 10
