"""SQLiteRepository: the contract suite plus layout, fault, cancellation and crash tests."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import orjson
import pytest
from hypothesis import given, settings
from strategies import messages, sessions
from test_sqlite_repair import add_a_failing_commit

from asyncsession import (
    CURRENT_VERSION,
    CorruptSessionError,
    ExpiryPolicy,
    FileRepository,
    InvalidConfiguration,
    InvalidSessionId,
    LimitExceeded,
    Message,
    Session,
    SessionConflict,
    SessionManager,
    SessionQuery,
    SessionRepository,
    StorageError,
)
from asyncsession._models import replace_trusted
from asyncsession._serialization import (
    dump_message,
    session_from_document,
    session_to_document,
)
from asyncsession.stores import sqlite as sqlite_store
from asyncsession.stores.sqlite import (
    CHUNK_MESSAGES,
    SCHEMA_VERSION,
    WAL_AUTOCHECKPOINT,
    SQLiteRepository,
    _dump_message,
    _encode,
    _fast_session,
    _message,
    _upgrade_1_to_2,
)
from asyncsession.testing import RepositoryContract
from asyncsession.testing._contract import (
    POLICY,
    at,
    changed,
    make_session,
    msg,
    version_0_document,
)

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().parent / "sqlite_child.py"


class TestSQLiteContract(RepositoryContract):
    @pytest.fixture
    async def repository(
        self, anyio_backend: str, tmp_path: Path
    ) -> AsyncIterator[SQLiteRepository]:
        async with SQLiteRepository(tmp_path / "contract.db") as repo:
            yield repo

    async def replace_document(
        self, repository: SessionRepository, session_id: uuid.UUID, document: bytes
    ) -> None:
        assert isinstance(repository, SQLiteRepository)
        await anyio.to_thread.run_sync(set_doc, repository.path, session_id, document)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection to the store's file."""
    return sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)


def set_doc(path: Path, session_id: uuid.UUID, document: bytes) -> None:
    """Overwrite a stored session's ``doc`` column through a second connection."""
    conn = raw(path)
    try:
        changed = conn.execute(
            "UPDATE sessions SET doc = ? WHERE id = ?", (document, str(session_id))
        ).rowcount
    finally:
        conn.close()
    assert changed == 1, f"no session {session_id} in {path}"


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition about the worker thread (bounded; no assertion on time)."""
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110 - the state lives in the worker thread
            await anyio.sleep(0.002)


def test_exported_names_are_sorted() -> None:
    """``__all__`` listed WAL_AUTOCHECKPOINT before the SQLite classes (an isort-style
    order); the package's public names are kept in plain sorted order."""
    assert sqlite_store.__all__ == sorted(sqlite_store.__all__)


# -- layout and upgrades ----------------------------------------------------------------


async def test_fresh_file_layout(
    db: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "asyncsession.stores.sqlite"):
        async with SQLiteRepository(db) as repo:
            await repo.add(make_session(messages=("hi",)))
    assert not [r for r in caplog.records if "upgrading" in r.getMessage()]  # new, not old
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"sessions_owner", "sessions_status", "sessions_expiry", "sessions_activity"} <= (
        indexes
    )
    plan = " ".join(
        str(r[-1])
        for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM sessions WHERE expires_at <= 5 "
            "ORDER BY expires_at LIMIT 10"
        )
    )
    assert "sessions_expiry" in plan
    conn.close()


async def test_wal_autocheckpoint_default_and_override(db: Path, anyio_backend: str) -> None:
    def setting(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])

    async with SQLiteRepository(db) as repo:
        assert await repo._call(setting, write=False) == WAL_AUTOCHECKPOINT
    async with SQLiteRepository(db, pragmas={"wal_autocheckpoint": 100}) as repo:
        assert await repo._call(setting, write=False) == 100


def make_v1_file(path: Path, sessions: list[Session]) -> None:
    """Write a layout-1 database (as the first release did) holding ``sessions``."""
    conn = raw(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(
        """
        CREATE TABLE sessions (pk INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, owner TEXT,
            name TEXT, status TEXT NOT NULL, created_at INTEGER NOT NULL,
            last_active INTEGER NOT NULL, closed_at INTEGER, expires_at INTEGER,
            revision INTEGER NOT NULL, message_count INTEGER NOT NULL, doc BLOB NOT NULL);
        CREATE INDEX sessions_activity ON sessions (last_active, id);
        CREATE INDEX sessions_owner ON sessions (owner, last_active, id);
        CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
        CREATE TABLE messages (session_pk INTEGER NOT NULL, seq INTEGER NOT NULL,
            body BLOB NOT NULL, PRIMARY KEY (session_pk, seq));
        PRAGMA application_id = 1634956147;
        PRAGMA user_version = 1;
        """
    )
    us = 1_000_000
    for s in sessions:
        cur = conn.execute(
            "INSERT INTO sessions (id, owner, name, status, created_at, last_active, "
            "closed_at, expires_at, revision, message_count, doc) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?)",
            (
                str(s.id),
                s.owner,
                s.name,
                s.status.value,
                int(s.created_at.timestamp()) * us,
                int(s.last_active.timestamp()) * us,
                int(s.expires_at.timestamp()) * us if s.expires_at else None,
                s.revision,
                s.messages.total,
                orjson.dumps(session_to_document(s, messages=False)),
            ),
        )
        conn.executemany(
            "INSERT INTO messages VALUES (?, ?, ?)",
            [(cur.lastrowid, i, dump_message(m)) for i, m in enumerate(s.messages)],
        )
    conn.close()


async def test_upgrade_from_layout_1_in_place(
    db: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    old = [
        make_session(name="Alpha", messages=("Find the NEEDLE",)),
        make_session(name="beta", created=1),
    ]
    make_v1_file(db, old)
    with caplog.at_level(logging.INFO, "asyncsession.stores.sqlite"):
        async with SQLiteRepository(db) as repo:
            pass
    (upgraded,) = [r.getMessage() for r in caplog.records if "upgrading" in r.getMessage()]
    assert upgraded.endswith(f"from layout 1 to {SCHEMA_VERSION}")
    async with SQLiteRepository(db) as repo:
        for s in old:
            assert await repo.get(s.id) == s
        found = await repo.list(SessionQuery(search="needle"))
        assert [s.id for s in found] == [old[0].id]
        assert [s.id for s in await repo.list(SessionQuery(search="ALPHA"))] == [old[0].id]
        await repo.append(old[1].id, [msg("more", 1)], at=at(1), policy=POLICY)
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


async def test_unreadable_first_messages_found_by_the_upgrade_are_warned_about_after_commit(
    db: Path, anyio_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Upgrading layout 1 warned "session row <pk> has an unreadable first message"
    inside its transaction, one line per row, without the file's name: a COMMIT that
    failed left the warnings of an upgrade that never happened, and each retry logged
    them again. Now one warning names the file, a few sessions and how many more, once
    the upgrade has committed: here the first COMMIT fails (a deferred foreign key the
    file's own trigger breaks) and logs nothing; the next open commits and warns."""
    damaged = [make_session(messages=(f"m{i}",)) for i in range(7)]
    make_v1_file(db, [*damaged, make_session(messages=("fine",))])
    conn = raw(db)
    conn.executemany(
        "UPDATE messages SET body = x'00ff00' WHERE seq = 0 AND session_pk = "
        "(SELECT pk FROM sessions WHERE id = ?)",
        [(str(s.id),) for s in damaged],
    )
    conn.close()
    await anyio.to_thread.run_sync(add_a_failing_commit, db)

    def unreadable_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "unreadable first" in r.getMessage()]

    with caplog.at_level(logging.WARNING, "asyncsession.stores.sqlite"):
        with pytest.raises(StorageError, match="FOREIGN KEY constraint failed"):
            async with SQLiteRepository(db, pragmas={"foreign_keys": 1}):
                pass
        assert unreadable_warnings() == []
        async with SQLiteRepository(db):  # foreign keys off: it commits
            pass
    named = ", ".join(str(s.id) for s in damaged[:5])  # the first ones stored
    assert unreadable_warnings() == [
        f"{db}: 7 session(s) have an unreadable first message, which searches will not "
        f"find them by ({named} and 2 more)"
    ]


def make_v2_file(path: Path, sessions: list[Session]) -> None:
    """Write a layout-2 database: layout 1 upgraded by the release that introduced 2.

    Its documents still hold ``last_active``, ``expires_at`` and ``revision``, and each
    message row holds one message.
    """
    make_v1_file(path, sessions)
    conn = raw(path)
    conn.execute("BEGIN IMMEDIATE")
    assert _upgrade_1_to_2(conn, path) is None
    conn.execute("PRAGMA user_version = 2")
    conn.execute("COMMIT")
    conn.close()


async def test_upgrade_from_layout_2_in_place(db: Path, anyio_backend: str) -> None:
    long = make_session(name="long", messages=tuple(f"m{i}" for i in range(CHUNK_MESSAGES + 5)))
    old = [make_session(name="Alpha", messages=("Find the NEEDLE",)), long]
    make_v2_file(db, old)
    async with SQLiteRepository(db) as repo:
        for s in old:
            assert await repo.get(s.id) == s
        window = await repo.get(long.id, last_messages=3)
        assert window is not None and [m.content for m in window.messages] == [
            f"m{i}" for i in range(CHUNK_MESSAGES + 2, CHUNK_MESSAGES + 5)
        ]
        assert [s.id for s in await repo.list(SessionQuery(search="needle"))] == [old[0].id]
        # Appends go on from the one-message rows (and merge them into chunks).
        contents = [m.content for m in long.messages]
        for i in range(2 * CHUNK_MESSAGES):
            appended = await repo.append(long.id, [msg(f"n{i}", 1)], at=at(1), policy=POLICY)
            contents.append(f"n{i}")
            assert appended.revision == long.revision + i + 1
            assert appended.messages.total == len(contents)
        loaded = await repo.get(long.id)
        assert loaded is not None and [m.content for m in loaded.messages] == contents
        assert loaded.last_active == at(1) and loaded.expires_at == at(61)
        # A layout-2 document is rewritten without its hot fields on the next save.
        touched = await repo.touch(old[0].id, at=at(5), policy=POLICY)
        assert touched is not None and touched.last_active == at(5)
        saved = attrs.evolve(touched, name="renamed", revision=touched.revision + 1)
        await repo.save(saved, expected_revision=touched.revision, new_messages=())
        assert await repo.get(old[0].id) == saved
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    doc = orjson.loads(
        conn.execute("SELECT doc FROM sessions WHERE id = ?", (str(old[0].id),)).fetchone()[0]
    )
    assert doc["name"] == "renamed" and not {"last_active", "expires_at", "revision"} & set(doc)
    conn.close()


async def test_newer_layout_is_refused(db: Path, anyio_backend: str) -> None:
    async with SQLiteRepository(db):
        pass
    conn = raw(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        async with SQLiteRepository(db):
            pass


async def test_foreign_database_is_refused(db: Path, anyio_backend: str) -> None:
    conn = raw(db)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.close()
    with pytest.raises(StorageError, match="not an asyncsession store") as info:
        async with SQLiteRepository(db):
            pass
    assert str(db) in str(info.value)


# -- open errors ------------------------------------------------------------------------


async def test_missing_directory(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "nowhere" / "s.db"
    with pytest.raises(StorageError, match="does not exist") as info:
        async with SQLiteRepository(path):
            pass
    assert str(path) in str(info.value)
    assert not path.parent.exists()
    assert "'~' is not expanded" not in str(info.value)


async def test_a_missing_directory_under_tilde_says_it_is_not_expanded(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-185: sqlite:///~/x.db said "directory ~ does not exist" only."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="'~' is not expanded here"):
        async with SQLiteRepository("~/asyncsession-test/s.db"):
            pass
    with pytest.raises(StorageError, match="'~' is not expanded here"):
        async with FileRepository("~/asyncsession-test/store"):
            pass
    with pytest.raises(StorageError, match="'~' is not expanded here"):  # file:///~/store
        async with FileRepository("/~/asyncsession-test/store"):
            pass
    assert os.listdir(tmp_path) == []


async def test_path_under_a_regular_file(tmp_path: Path, anyio_backend: str) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        async with SQLiteRepository(blocker / "s.db"):
            pass


async def test_read_only_location(tmp_path: Path, anyio_backend: str) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("x")
        except OSError:
            pass
        else:  # root ignores permissions: use a location nobody may write instead
            probe.unlink()
            locked = Path("/proc")
        path = locked / "sessions.db"
        with pytest.raises(StorageError, match="Cannot open SQLite database") as info:
            async with SQLiteRepository(path):
                pass
        assert str(path) in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.Error)
    finally:
        (tmp_path / "ro").chmod(0o700)


@pytest.mark.parametrize(
    "junk",
    [
        b"this is not a database, " * 100,
        # SQLite itself takes a one-byte file for an empty database and overwrites it
        # (helper-218); no database is shorter than a page of 512 bytes
        b"x",
        b"\n",
        b"SQLite format 3\x00" + bytes(495),
    ],
    ids=["text", "one-byte", "newline", "header-and-no-page"],
)
async def test_not_a_database(db: Path, junk: bytes, anyio_backend: str) -> None:
    await anyio.Path(db).write_bytes(junk)
    with pytest.raises(StorageError, match="not a SQLite database") as info:
        async with SQLiteRepository(db):
            pass
    assert str(db) in str(info.value)
    assert await anyio.Path(db).read_bytes() == junk  # never overwritten


async def test_a_first_page_sqlite_recovers_from_the_wal_is_opened(
    tmp_path: Path, anyio_backend: str
) -> None:
    """The check against foreign files looked at the main file's header alone, so it
    refused a database whose damaged first page SQLite restores from the -wal file (a
    write torn by a crash, simulated here; helper-219)."""
    path, crashed = tmp_path / "a.db", tmp_path / "b.db"
    async with SessionManager(SQLiteRepository(path)) as sessions:
        session = await sessions.create(owner="alice")
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("CREATE TABLE extra(x)")  # page 1 (the schema) now in the -wal
        for suffix in ("", "-wal"):  # the files as a crash leaves them
            crashed.with_name(crashed.name + suffix).write_bytes(
                path.with_name(path.name + suffix).read_bytes()
            )
    finally:
        writer.close()
    with crashed.open("r+b") as file:
        file.write(bytes(16))  # the main file's header is gone
    async with SessionManager(SQLiteRepository(crashed)) as sessions:
        assert (await sessions.get(session.id)).owner == "alice"


def test_pragmas_must_be_a_mapping() -> None:
    with pytest.raises(InvalidConfiguration, match="pragmas must be a mapping"):
        SQLiteRepository("x.db", pragmas=5)  # type: ignore[arg-type]


def test_bad_options() -> None:
    for kwargs in (
        {"synchronous": "SOMETIMES"},
        {"busy_timeout": 0},
        {"max_batch": 0},
        {"pragmas": {"cache_size; DROP TABLE sessions": 1}},
        {"pragmas": {"cache_size": "1; DROP"}},
    ):
        with pytest.raises(InvalidConfiguration):
            SQLiteRepository("x.db", **kwargs)


@pytest.mark.parametrize(
    "pragma",
    [
        {"user_version": 2},
        {"journal_mode": "delete"},
        {"application_id": 7},
        {"locking_mode": "exclusive"},
        {"writable_schema": 1},
        {"synchronous": "off"},
        {"busy_timeout": 1},
        {"cache_size": -2000, "schema_version": 1},
    ],
)
def test_pragmas_the_store_owns_are_refused(db: Path, pragma: dict[str, Any]) -> None:
    """pragmas={"user_version": 2} made an open rerun old upgrades and fail, for good (the
    version stayed on disk); journal_mode=delete turned WAL off unnoticed (review
    finding 7 of helper-25)."""
    with pytest.raises(InvalidConfiguration, match="store owns these pragmas") as info:
        SQLiteRepository(db, pragmas=pragma)
    assert "user_version" in str(info.value) and "journal_mode" in str(info.value)
    assert not db.exists()
    SQLiteRepository(db, pragmas={"cache_size": -2000, "wal_autocheckpoint": 100})


async def test_closed_store_refuses_work(db: Path, anyio_backend: str) -> None:
    repo = SQLiteRepository(db)
    with pytest.raises(StorageError, match="not open"):
        await repo.get(uuid.uuid4())
    async with repo:
        async with repo:  # nested opens are counted
            pass
        assert await repo.get(uuid.uuid4()) is None
    with pytest.raises(StorageError, match="not open"):
        await repo.get(uuid.uuid4())


# -- corruption -------------------------------------------------------------------------


@pytest.mark.parametrize("huge", [2**63, 2**64 + 5, 10**30])
async def test_limits_beyond_64_bits_mean_no_limit(db: Path, huge: int, anyio_backend: str) -> None:
    """Counts and limits SQLite cannot bind (the manager accepts any positive int) used
    to fail with a raw OverflowError (review finding 6 of helper-25)."""
    async with SQLiteRepository(db) as repo:
        session = make_session(messages=("a",))
        await repo.add(session)
        appended = await repo.append(
            session.id, [msg("b", 1)], at=at(1), policy=POLICY, max_messages=huge
        )
        assert appended.messages.total == 2
        loaded = await repo.get(session.id, last_messages=huge)
        assert loaded is not None and [m.content for m in loaded.messages] == ["a", "b"]
        assert await repo.expired(at(10_000), limit=huge) == [session.id]
    async with SessionManager(
        SQLiteRepository(db.with_name("managed.db")),
        max_messages=huge,
        cleanup_batch=huge,
        cleanup_interval=None,
    ) as sessions:
        created = await sessions.create()
        assert (await sessions.add_message(created.id, "user", "hi")).messages.total == 1
        assert await sessions.purge_expired() == 0


@attrs.frozen(slots=True)
class _SubclassPolicy(ExpiryPolicy):
    """An ExpiryPolicy subclass: append() takes its general path (not one statement)."""


def _stored_rows(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every column of every row of ``sessions`` (with ``typeof(revision)``) and of
    ``messages``, through a second connection."""
    conn = raw(path)
    try:
        sessions_rows = conn.execute(
            "SELECT *, typeof(revision) FROM sessions ORDER BY pk"
        ).fetchall()
        message_rows = conn.execute("SELECT * FROM messages ORDER BY rowid").fetchall()
    finally:
        conn.close()
    return sessions_rows, message_rows


@pytest.mark.parametrize("path", ["one statement", "no RETURNING", "policy subclass"])
async def test_append_at_the_last_revision_leaves_the_row_untouched(
    db: Path, path: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At revision 2**63 - 1, ``revision = revision + 1`` made SQLite store the REAL
    9.223372036854776e+18 and commit it with the messages: the session was unreadable
    (CorruptSessionError) for good. Now the append, on every path, and a save raise
    LimitExceeded and the row stays as it was (review finding of helper-48)."""
    top = 2**63 - 1
    policy = POLICY
    if path == "no RETURNING":  # SQLite before 3.35: the general path
        monkeypatch.setattr(sqlite_store, "_HAS_RETURNING", False)
    elif path == "policy subclass":
        policy = _SubclassPolicy(
            idle_timeout=POLICY.idle_timeout, max_age=None, retention=POLICY.retention
        )
    session = attrs.evolve(make_session(messages=("a",)), revision=top)
    async with SQLiteRepository(db) as repo:
        await repo.add(session)
        before = await anyio.to_thread.run_sync(_stored_rows, db)
        assert [row[-1] for row in before[0]] == ["integer"]
        with pytest.raises(LimitExceeded, match=r"revision of session .* Nothing was written"):
            await repo.append(session.id, [msg("b", 1)], at=at(1), policy=policy)
        assert await anyio.to_thread.run_sync(_stored_rows, db) == before
        past = replace_trusted(
            session, messages=session.messages.append(msg("b", 1)), revision=top + 1
        )
        with pytest.raises(LimitExceeded):
            await repo.save(past, expected_revision=top, new_messages=[msg("b", 1)])
        with pytest.raises(LimitExceeded):
            await repo.save(past, expected_revision=top)
        assert await anyio.to_thread.run_sync(_stored_rows, db) == before
        assert await repo.get(session.id) == session
    async with SQLiteRepository(db) as reopened:  # nothing held: read from the file
        assert await reopened.get(session.id) == session


async def test_corrupt_document_only_affects_its_session(db: Path, anyio_backend: str) -> None:
    async with SQLiteRepository(db) as repo:
        bad, bad_msg, good = (make_session(messages=("a", "b")) for _ in range(3))
        for s in (bad, bad_msg, good):
            await repo.add(s)
        conn = raw(db)
        conn.execute(
            "UPDATE sessions SET doc = ? WHERE id = ?", (b'{"version": 1, "id', str(bad.id))
        )
        # Both messages share one row (a chunk): damage the second one only.
        pk, body = conn.execute(
            "SELECT session_pk, body FROM messages WHERE seq = 0 AND session_pk = "
            "(SELECT pk FROM sessions WHERE id = ?)",
            (str(bad_msg.id),),
        ).fetchone()
        first, _ = body.split(b"\n")
        conn.execute(
            "UPDATE messages SET body = ? WHERE session_pk = ? AND seq = 0",
            (first + b'\n{"role": "wizard"}', pk),
        )
        conn.close()
        with pytest.raises(CorruptSessionError) as info:
            await repo.get(bad.id)
        assert info.value.session_id == bad.id
        # Message rows are decoded lazily: a damaged one raises when it is accessed.
        loaded = await repo.get(bad_msg.id)
        assert loaded is not None and loaded.messages[0].content == "a"
        for access in (lambda log: log[1], list, lambda log: log[-1:], hash):
            with pytest.raises(CorruptSessionError) as info:
                access(loaded.messages)
            assert info.value.session_id == bad_msg.id
        assert await repo.get(good.id) == good
        window = await repo.get(bad_msg.id, last_messages=0)  # the document itself is fine
        assert window is not None and window.messages.total == 2
        listed = await repo.list(SessionQuery())
        assert bad.id not in {s.id for s in listed} and good.id in {s.id for s in listed}
        assert await repo.delete(bad.id) is True
        await repo.append(good.id, [msg("c", 1)], at=at(1), policy=POLICY)


async def test_document_versions_in_one_worker_hop(
    db: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "_IDS_PER_STATEMENT", 3)  # several statements
    async with SQLiteRepository(db) as repo:
        sessions = [make_session(messages=("m",)) for _ in range(8)]
        for session in sessions:
            await repo.add(session)
        old, layout_2 = sessions[6], sessions[1]
        set_doc(db, old.id, version_0_document(old))
        # a layout-2 document still carries the hot fields; only its version matters here
        full = orjson.loads(_encode(layout_2))
        full.update(last_active=layout_2.last_active.isoformat(), expires_at=None, revision=0)
        set_doc(db, layout_2.id, orjson.dumps(full))
        ids = [uuid.uuid4(), *(s.id for s in reversed(sessions))]
        before = repo.statistics().operations
        versions = await repo.document_versions(ids)
        assert repo.statistics().operations == before + 1
        assert list(versions) == [s.id for s in reversed(sessions)]  # in the order asked
        assert {sid: v for sid, v in versions.items() if v != CURRENT_VERSION} == {old.id: 0}
        # an id that is not a UUID is refused before any worker hop, as in the other stores
        before = repo.statistics().operations
        with pytest.raises(InvalidSessionId):
            await repo.document_versions([old.id, str(old.id)])  # type: ignore[list-item]
        assert repo.statistics().operations == before


def test_fast_message_decoder_matches_the_reference() -> None:
    from asyncsession import Message
    from asyncsession._serialization import load_message

    samples = [
        msg("plain"),
        Message("tool", "x", at(3), {"a": [1, {"b": None}], "c": "d"}),
        Message("assistant", "üñï €", at(4), [1, 2.5, True]),
    ]
    for m in samples:
        body = dump_message(m)
        decoded = _message(orjson.loads(body))
        assert decoded == load_message(body) == m
        assert type(decoded.data) is type(m.data)
    with pytest.raises(CorruptSessionError):
        _message({"role": "user", "content": 3, "timestamp": "x"})


# -- locking, faults ----------------------------------------------------------------------


async def test_locked_database_gives_recoverable_storage_error(
    db: Path, anyio_backend: str
) -> None:
    async with SQLiteRepository(db, busy_timeout=0.2) as repo:
        session = make_session()
        await repo.add(session)
        other = raw(db)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            with pytest.raises(StorageError, match="locked") as info:
                await repo.append(session.id, [msg("x")], at=at(1), policy=POLICY)
            assert info.value.recoverable
            assert isinstance(info.value.__cause__, sqlite3.OperationalError)
            assert await repo.get(session.id) == session  # WAL: reads go on
        finally:
            other.execute("ROLLBACK")
            other.close()
        done = await repo.append(session.id, [msg("x")], at=at(1), policy=POLICY)
        assert done.revision == 1


async def test_disk_full_is_a_storage_error_and_keeps_the_old_version(
    db: Path, anyio_backend: str
) -> None:
    async with SQLiteRepository(db) as repo:
        session = make_session(messages=("a",))
        await repo.add(session)
    conn = raw(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    # A real SQLITE_FULL: the file may not grow by more than a few pages.
    async with SQLiteRepository(db, pragmas={"max_page_count": pages + 4}) as repo:
        huge = msg("x" * 200_000, 1)
        with pytest.raises(StorageError, match="full") as info:
            await repo.append(session.id, [huge], at=at(1), policy=POLICY)
        assert info.value.recoverable
        assert isinstance(info.value.__cause__, sqlite3.Error)
        assert await repo.get(session.id) == session
        # in a group commit, only the operation that hit the limit fails
        results: dict[str, Any] = {}

        async def write(name: str, text: str) -> None:
            try:
                results[name] = await repo.append(
                    session.id, [msg(text, 2)], at=at(2), policy=POLICY
                )
            except StorageError as exc:
                results[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(write, "small1", "s1")
            tg.start_soon(write, "huge", "y" * 200_000)
            tg.start_soon(write, "small2", "s2")
        assert isinstance(results["huge"], StorageError)
        loaded = await repo.get(session.id)
        assert loaded is not None
        assert [m.content for m in loaded.messages][1:] in (["s1", "s2"], ["s2", "s1"])
        assert loaded.revision == 2
    conn = raw(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


# -- group commit -----------------------------------------------------------------------


async def test_group_commit_batches_and_isolates_failures(db: Path, anyio_backend: str) -> None:
    async with SQLiteRepository(db, busy_timeout=20) as repo:
        target = make_session()
        await repo.add(target)
        sessions = [make_session(owner=f"o{i}") for i in range(100)]
        for s in sessions:
            await repo.add(s)
        before = repo.statistics()
        wins: list[int] = []
        appended: dict[uuid.UUID, Session] = {}

        async def append(s: Session) -> None:
            appended[s.id] = await repo.append(
                s.id, [msg(f"to {s.id}", 1)], at=at(1), policy=POLICY
            )

        async def cas(n: int) -> None:
            try:
                await repo.save(changed(target, state={"winner": n}), expected_revision=0)
            except SessionConflict:
                return
            wins.append(n)

        other = raw(db)
        other.execute("BEGIN IMMEDIATE")  # stall the worker so every request queues up
        async with anyio.create_task_group() as tg:
            for i, s in enumerate(sessions):
                tg.start_soon(append, s)
                if i % 10 == 0:
                    tg.start_soon(cas, i)
            await wait_until(lambda: repo.statistics().operations > before.operations)
            other.execute("ROLLBACK")
        other.close()
        stats = repo.statistics()
        assert stats.operations - before.operations == 110
        assert stats.commits - before.commits < 110
        assert stats.largest_batch > 1
        assert len(wins) == 1
        for s in sessions:
            loaded = await repo.get(s.id)
            assert (
                loaded is not None
                and loaded.revision == 1
                and loaded == attrs.evolve(appended[s.id], messages=loaded.messages)
            )
            assert [m.content for m in loaded.messages] == [f"to {s.id}"]
        final = await repo.get(target.id)
        assert final is not None and final.state == {"winner": wins[0]}


# -- cancellation -----------------------------------------------------------------------


async def test_cancel_while_queued_withdraws_the_operation(db: Path, anyio_backend: str) -> None:
    async with SQLiteRepository(db, busy_timeout=20) as repo:
        session = make_session()
        await repo.add(session)
        base = repo.statistics()
        other = raw(db)
        other.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                partial(repo.append, session.id, [msg("first", 1)], at=at(1), policy=POLICY)
            )
            await wait_until(lambda: repo.statistics().operations == base.operations + 1)
            with anyio.CancelScope() as scope:
                tg.start_soon(cancel, scope)
                await repo.append(session.id, [msg("withdrawn", 1)], at=at(1), policy=POLICY)
            assert scope.cancelled_caught
            other.execute("ROLLBACK")
        other.close()
        loaded = await repo.get(session.id)
        assert loaded is not None
        assert [m.content for m in loaded.messages] == ["first"] and loaded.revision == 1
        assert repo.statistics().withdrawn == base.withdrawn + 1


async def test_cancel_while_running_waits_for_the_outcome(db: Path, anyio_backend: str) -> None:
    async with SQLiteRepository(db, busy_timeout=20) as repo:
        session = make_session()
        await repo.add(session)
        base = repo.statistics()
        other = raw(db)
        other.execute("BEGIN IMMEDIATE")
        outcome: list[str] = []

        async def cancelled_writer(scope: anyio.CancelScope) -> None:
            with scope:
                await repo.append(session.id, [msg("running", 1)], at=at(1), policy=POLICY)
                outcome.append("returned")
            outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")

        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancelled_writer, scope)
            await wait_until(lambda: repo.statistics().operations == base.operations + 1)
            scope.cancel()  # the worker is inside the operation (waiting for the lock)
            await anyio.wait_all_tasks_blocked()
            assert outcome == []  # the caller waits, shielded, for the outcome
            other.execute("ROLLBACK")
        other.close()
        assert outcome == ["cancelled"]
        loaded = await repo.get(session.id)
        assert loaded is not None and [m.content for m in loaded.messages] == ["running"]


async def test_cancellation_at_every_point_leaves_whole_states(
    db: Path, anyio_backend: str
) -> None:
    async with SQLiteRepository(db) as repo:
        session = make_session()
        await repo.add(session)
        for delay in range(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    partial(
                        repo.append, session.id, [msg(f"bg{delay}", 1)], at=at(1), policy=POLICY
                    )
                )
                with anyio.CancelScope() as scope:

                    async def cancel_later(n: int = delay, s: anyio.CancelScope = scope) -> None:
                        for _ in range(n):
                            await anyio.lowlevel.checkpoint()
                        s.cancel()

                    tg.start_soon(cancel_later)
                    await repo.append(session.id, [msg(f"c{delay}", 1)], at=at(1), policy=POLICY)
        loaded = await repo.get(session.id)
        assert loaded is not None
        assert loaded.revision == loaded.messages.total >= 40
        contents = [m.content for m in loaded.messages]
        assert len(contents) == len(set(contents))
        assert {f"bg{i}" for i in range(40)} <= set(contents)
        stats = repo.statistics()
        # add + 40 background + 40 cancellable appends + get: each ran or was withdrawn
        assert stats.operations + stats.withdrawn == 82
    assert not any(t.name.startswith("asyncsession-sqlite") for t in _threads())


async def cancel(scope: anyio.CancelScope) -> None:
    scope.cancel()


def _threads() -> list[Any]:
    import threading

    return threading.enumerate()


async def test_file_descriptors_stay_constant(db: Path, anyio_backend: str) -> None:
    fd_dir = "/proc/self/fd"
    if not sys.platform.startswith("linux"):
        pytest.skip("needs /proc")
    async with SQLiteRepository(db) as repo:
        await repo.add(make_session())
        before = len(os.listdir(fd_dir))
        for i in range(300):
            await repo.add(make_session(messages=(f"m{i}",)))
        assert len(os.listdir(fd_dir)) == before


# -- real processes ---------------------------------------------------------------------


def _child(*args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )


def _kill_after_acknowledgements(db: Path, backend: str, wanted: int) -> list[uuid.UUID]:
    acknowledged: list[uuid.UUID] = []
    with _child("crash", str(db), backend) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while len(acknowledged) < wanted:
                line = proc.stdout.readline()
                if not line:
                    raise AssertionError(f"child ended early: {proc.stderr.read()!r:.2000}")
                acknowledged.append(uuid.UUID(line.decode().strip()))
            os.kill(proc.pid, signal.SIGKILL)
            rest = proc.stdout.read()  # through the same buffer readline() used
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for line in rest.splitlines(keepends=True):
        if line.endswith(b"\n"):  # a complete line was an acknowledged write
            acknowledged.append(uuid.UUID(line.decode().strip()))
    return acknowledged


async def test_kill_9_loses_no_acknowledged_write(db: Path, anyio_backend: str) -> None:
    acknowledged = await anyio.to_thread.run_sync(
        _kill_after_acknowledgements, db, anyio_backend, 300
    )
    conn = raw(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    async with SQLiteRepository(db) as repo:
        for sid in acknowledged:
            loaded = await repo.get(sid)
            assert loaded is not None and loaded.messages.total == 1, sid
        counts = await repo.count_by_status()
        assert sum(counts.values()) >= len(acknowledged)


async def test_two_processes_append_to_one_session(db: Path, anyio_backend: str) -> None:
    session = make_session(owner="shared")
    async with SQLiteRepository(db) as repo:
        await repo.add(session)

    def run_both() -> list[tuple[int, bytes, bytes]]:
        procs = [
            _child("append", str(db), anyio_backend, str(session.id), tag) for tag in ("p", "q")
        ]
        outputs = [p.communicate(timeout=120) for p in procs]
        return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]

    for code, out, err in await anyio.to_thread.run_sync(run_both):
        assert code == 0, err.decode()[-2000:]
        assert out == b"done\n"
        assert b"Traceback" not in err
    async with SQLiteRepository(db) as repo:
        loaded = await repo.get(session.id)
    assert loaded is not None
    contents = [m.content for m in loaded.messages]
    assert len(contents) == loaded.messages.total == 1000
    assert sorted(contents) == sorted(f"{t}-{i}" for t in "pq" for i in range(500))
    assert loaded.revision == 1000
    for tag in "pq":  # each process's own appends keep their order
        mine = [int(c[2:]) for c in contents if c[0] == tag]
        assert len(mine) == 500


@settings(max_examples=200, deadline=None)
@given(messages)
def test_fast_message_encoder_matches_the_reference(message: Message) -> None:
    assert _dump_message(message) == dump_message(message)


@settings(max_examples=100, deadline=None)
@given(sessions())
def test_fast_session_decoder_matches_the_reference(session: Any) -> None:
    doc = orjson.loads(_encode(session))
    assert not {"last_active", "expires_at", "revision"} & doc.keys()  # columns only
    hot = (session.last_active, session.expires_at, session.revision)
    fast = _fast_session(doc, session.messages, session.id, *hot)
    assert fast is not None
    whole = {
        **doc,
        "last_active": session.last_active.isoformat(),
        "expires_at": None if session.expires_at is None else session.expires_at.isoformat(),
        "revision": session.revision,
    }
    assert fast == session == session_from_document(whole, messages=session.messages)
    assert type(fast.state) is type(session.state)
    # A layout-2 document still carries the hot fields: the columns win.
    assert _fast_session(whole, session.messages, session.id, *hot) == session
    stale = {**whole, "revision": session.revision + 7}
    assert _fast_session(stale, session.messages, session.id, *hot) == session
    for key, bad in (("owner", ""), ("name", "a b"), ("status", "x"), ("errors", -1)):
        assert _fast_session({**doc, key: bad}, session.messages, session.id, *hot) is None
    assert (
        _fast_session(
            {**doc, "created_at": "2026-01-01T00:00:00+01:00"}, session.messages, session.id, *hot
        )
        is None
    )
    assert _fast_session({**doc, "extra": 1}, session.messages, session.id, *hot) is None
    assert _fast_session(doc, session.messages, uuid.uuid4(), *hot) is None
